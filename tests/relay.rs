//! The relay in-process with real rust-libp2p clients over loopback QUIC.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::*;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, kad};
use privstack_relay::client;

const V: &str = env!("CARGO_PKG_VERSION");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_api_matches_what_a_client_authenticates() {
    let server = spawn_relay(|_| {}).await;
    let url = format!("{}/api/v1/identity", server.loopback_http_url());
    let resp = client::request("GET", &url, WAIT).await.unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.content_type.as_deref(), Some("application/json"));
    let json: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    let obj = json.as_object().unwrap();
    let mut keys: Vec<_> = obj.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        ["addresses", "agent_version", "peer_id", "protocol_version"]
    );
    assert_eq!(obj["protocol_version"], "/privstack/relay/1.0.0");
    assert_eq!(obj["agent_version"], format!("privstack-relay/{V}"));
    let addresses: Vec<Multiaddr> = obj["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().parse().unwrap())
        .collect();
    // Dialable addresses first, the wildcard listen addresses (as the original listed) last.
    let port = server.quic_addrs()[0].port();
    assert!(!privstack_relay::addrs::is_unspecified(&addresses[0]));
    assert!(addresses.contains(&format!("/ip4/0.0.0.0/udp/{port}/quic-v1").parse().unwrap()));
    assert!(
        addresses.contains(
            &format!("/ip4/127.0.0.1/udp/{port}/quic-v1")
                .parse()
                .unwrap()
        )
    );

    // Dial a listed address with the advertised peer ID: the TLS handshake
    // authenticates the relay as exactly that peer.
    let peer_id = obj["peer_id"].as_str().unwrap().to_owned();
    let loopback = addresses
        .iter()
        .find(|a| a.to_string().starts_with("/ip4/127.0.0.1/"))
        .unwrap()
        .clone()
        .with(Protocol::P2p(peer_id.parse().unwrap()));
    let mut c = TestClient::new(None).await;
    let info = c.connect(loopback).await;
    // The IPv6 listener answers too, on the same port (when the host has IPv6).
    if server.quic_addrs().iter().any(|a| a.is_ipv6()) {
        assert_eq!(server.quic_addrs()[1].port(), port);
        let v6: Multiaddr = format!("/ip6/::1/udp/{port}/quic-v1/p2p/{peer_id}")
            .parse()
            .unwrap();
        let mut c6 = TestClient::new(None).await;
        let info6 = c6.connect(v6).await;
        assert_eq!(info6.public_key.to_peer_id().to_string(), peer_id);
    }
    assert_eq!(info.public_key.to_peer_id().to_string(), peer_id);
    assert_eq!(info.protocol_version, obj["protocol_version"]);
    assert_eq!(info.agent_version, obj["agent_version"]);
    // Kademlia and the relay hop protocol are both advertised.
    let protocols: Vec<String> = info.protocols.iter().map(|p| p.to_string()).collect();
    assert!(
        protocols.contains(&"/ipfs/kad/1.0.0".to_owned()),
        "{protocols:?}"
    );
    assert!(
        protocols.contains(&"/libp2p/circuit/relay/0.2.0/hop".to_owned()),
        "{protocols:?}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_errors_health_and_metrics() {
    let server = spawn_relay(|_| {}).await;
    let base = server.loopback_http_url();

    let resp = client::request("GET", &format!("{base}/nope"), WAIT)
        .await
        .unwrap();
    assert_eq!(resp.status, 404);
    let body: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(body["error"], "not found");

    for method in ["POST", "PUT", "DELETE"] {
        let resp = client::request(method, &format!("{base}/api/v1/identity"), WAIT)
            .await
            .unwrap();
        assert_eq!(resp.status, 405, "{method}");
        assert!(resp.headers.get("allow").is_some());
    }

    let resp = client::request("GET", &format!("{base}/healthz"), WAIT)
        .await
        .unwrap();
    assert_eq!(resp.status, 200);

    // IPv6 serves the same API when the host has it.
    if let Some(v6) = server.http_addrs().iter().find(|a| a.is_ipv6()) {
        let resp = client::request("GET", &format!("http://[::1]:{}/healthz", v6.port()), WAIT)
            .await
            .unwrap();
        assert_eq!(resp.status, 200);
    }

    // Metrics live on their own (loopback) address, not on the public API port.
    let public = client::request(
        "GET",
        &format!("{}/metrics", server.loopback_http_url()),
        WAIT,
    )
    .await
    .unwrap();
    assert_eq!(public.status, 404, "no /metrics on the public port");
    let text = fetch_metrics(&server).await;
    assert!(server.metrics_addr().unwrap().ip().is_loopback());
    assert!(
        text.contains(&format!(
            "build_info{{version=\"{}\",target=\"",
            env!("CARGO_PKG_VERSION")
        )) && text.contains("revision=\""),
        "build_info gauge:\n{text}"
    );
    assert_eq!(metric(&text, "peers_served_total"), Some(0.0));
    assert_eq!(metric(&text, "relayed_connections_total"), Some(0.0));
    assert!(
        text.contains("libp2p_"),
        "libp2p's own metrics are exported"
    );

    // The same peer twice counts once; a second peer counts.
    let mut a = TestClient::new(None).await;
    a.connect(server.loopback_multiaddr()).await;
    wait_metric(&server, "peers_served_total", |v| v == 1.0).await;
    wait_metric(&server, "relay_connections", |v| v == 1.0).await;
    let relay = server.peer_id();
    a.with(move |s| s.disconnect_peer_id(relay)).await.unwrap();
    wait_metric(&server, "relay_connections", |v| v == 0.0).await;
    a.connect(server.loopback_multiaddr()).await;
    let mut b = TestClient::new(None).await;
    b.connect(server.loopback_multiaddr()).await;
    wait_metric(&server, "relay_connections", |v| v == 2.0).await;
    assert_eq!(
        metric(&fetch_metrics(&server).await, "peers_served_total"),
        Some(2.0)
    );
    let stats = server.shutdown().await;
    assert_eq!(stats.peers_served, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_rejects_oversized_and_malformed_requests() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = spawn_relay(|_| {}).await;
    let addr = format!("127.0.0.1:{}", server.http_addrs()[0].port());

    async fn raw(addr: &str, request: &[u8]) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    let big_body = raw(
        &addr,
        b"GET /api/v1/identity HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(big_body.starts_with("HTTP/1.1 413"), "{big_body}");

    let mut huge_header = b"GET /api/v1/identity HTTP/1.1\r\nHost: x\r\nX-Junk: ".to_vec();
    huge_header.extend(std::iter::repeat_n(b'a', 64 * 1024));
    huge_header.extend_from_slice(b"\r\n\r\n");
    let resp = raw(&addr, &huge_header).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");

    let garbage = raw(&addr, b"\x16\x03\x01garbage that is not HTTP\r\n\r\n").await;
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");

    // The relay is still fine afterwards.
    let resp = client::request("GET", &format!("http://{addr}/healthz"), WAIT)
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_group_discovery_through_records() {
    let server = spawn_relay(|_| {}).await;
    let mut a = TestClient::new(Some(Ipv4Addr::new(127, 0, 0, 1))).await;
    let mut b = TestClient::new(Some(Ipv4Addr::new(127, 0, 0, 1))).await;
    a.bootstrap_via(server.loopback_multiaddr()).await;
    b.bootstrap_via(server.loopback_multiaddr()).await;

    let key = syncgroup_key("correct-horse-battery-staple");
    let value = serde_json::json!({
        "device_name": "laptop",
        "addresses": ["/ip4/192.168.1.20/udp/51000/quic-v1"],
        "timestamp": 1_764_000_000u64,
    });
    let mut record = kad::Record::new(key.clone(), serde_json::to_vec(&value).unwrap());
    record.publisher = Some(a.peer_id);
    a.put_record(record)
        .await
        .expect("put_record with Quorum::One succeeds");

    let found = b.get_record(key).await;
    let rec = &found.first().expect("B finds A's record").record;
    assert_eq!(
        rec.publisher,
        Some(a.peer_id),
        "publisher survives the relay"
    );
    let got: serde_json::Value = serde_json::from_slice(&rec.value).unwrap();
    assert_eq!(got, value);

    let other = b.get_record(syncgroup_key("another-code")).await;
    assert!(other.is_empty(), "a different sync code finds nothing");

    let text = fetch_metrics(&server).await;
    assert!(metric(&text, "peers_served_total").unwrap() >= 2.0);
    server.shutdown().await;
}

/// Kademlia shortens a received record's lifetime by the number of known peers closer to
/// its key than itself (down to zero). A relay knows every connected client, so on a busy
/// relay records put on it expired on arrival; it must keep them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_put_on_a_busy_relay_stay_there() {
    let server = spawn_relay(|_| {}).await;
    let relay = server.peer_id();
    let mut crowd = Vec::new();
    for i in 0..60u8 {
        let mut c = TestClient::new(Some(Ipv4Addr::new(127, 0, 4, 10 + i))).await;
        c.connect(server.loopback_multiaddr()).await;
        crowd.push(c);
    }
    // (k-buckets hold 20 peers each, so not all 60 fit in the routing table.)
    wait_metric(&server, "relay_kad_routing_peers", |v| v >= 40.0).await;

    let writer = &mut crowd[0];
    let keys: Vec<kad::RecordKey> = (0..30)
        .map(|i| syncgroup_key(&format!("busy-relay-{i}")))
        .collect();
    for key in &keys {
        let mut record = kad::Record::new(key.clone(), b"{}".to_vec());
        record.publisher = Some(writer.peer_id);
        let id = writer
            .with(move |s| {
                s.behaviour_mut().kad.put_record_to(
                    record,
                    std::iter::once(relay),
                    kad::Quorum::One,
                )
            })
            .await;
        writer
            .wait("put_record_to the relay", |ev| match ev {
                SwarmEvent::Behaviour(ClientBehaviourEvent::Kad(
                    kad::Event::OutboundQueryProgressed {
                        id: qid,
                        result: kad::QueryResult::PutRecord(r),
                        ..
                    },
                )) if qid == id => Some(r.expect("relay accepts the record")),
                _ => None,
            })
            .await;
    }

    // Every acknowledged record is in the relay's store (the gauge is refreshed every
    // 10 s; before the fix, records with enough closer peers were dropped on arrival).
    wait_metric(&server, "relay_kad_records", |v| v == 30.0).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn departed_nated_peers_leave_the_routing_table() {
    let server = spawn_relay(|_| {}).await;
    let relay = server.peer_id();
    let mut a = TestClient::new(Some(Ipv4Addr::new(127, 0, 0, 2))).await;
    let mut b = TestClient::new(Some(Ipv4Addr::new(127, 0, 0, 3))).await;
    a.bootstrap_via(server.loopback_multiaddr()).await;
    b.bootstrap_via(server.loopback_multiaddr()).await;

    // While A is connected the relay hands it out.
    let a_id = a.peer_id;
    let (closest, _) = b.closest_peers(a_id).await;
    assert!(
        closest.contains(&a_id),
        "connected peer is in the DHT: {closest:?}"
    );
    wait_metric(&server, "relay_kad_routing_peers", |v| v == 2.0).await;

    // A leaves; its only addresses are loopback (not publicly dialable), so the relay
    // must drop it and stop handing it to queries.
    a.with(move |s| s.disconnect_peer_id(relay)).await.unwrap();
    a.wait("A disconnected", |ev| match ev {
        SwarmEvent::ConnectionClosed {
            peer_id,
            num_established: 0,
            ..
        } if peer_id == relay => Some(()),
        _ => None,
    })
    .await;
    drop(a);
    wait_metric(&server, "relay_connections", |v| v == 1.0).await;
    wait_metric(&server, "relay_kad_routing_peers", |v| v == 1.0).await;

    // B forgets what it learnt itself, so only the relay's answer counts. Had the relay
    // handed A out, B would have tried to reach it and counted a failure (a handshake
    // timeout on a real NAT).
    b.with(move |s| {
        s.behaviour_mut().kad.remove_peer(&a_id);
    })
    .await;
    let (closest, stats) = b.closest_peers(a_id).await;
    assert!(!closest.contains(&a_id), "{closest:?}");
    assert!(closest.contains(&relay));
    assert_eq!(
        stats.num_failures(),
        0,
        "query was handed a departed peer: {stats:?}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_carries_64_mib_each_way() {
    const SIZE: usize = 64 * 1024 * 1024;
    let server = spawn_relay(|_| {}).await;
    let relay_addr = server.loopback_multiaddr();

    // Neither A nor B listens directly, so their only path is the circuit.
    let mut a = TestClient::new(None).await;
    let mut b = TestClient::new(None).await;
    a.reserve(&relay_addr).await.expect("reservation accepted");
    wait_metric(&server, "relay_reservations", |v| v == 1.0).await;

    let endpoint = b.dial_via_circuit(&relay_addr, a.peer_id).await;
    assert!(endpoint.is_relayed());
    exchange_through_circuit(&mut a, &mut b, SIZE).await;

    let text = fetch_metrics(&server).await;
    assert_eq!(metric(&text, "relayed_connections_total"), Some(1.0));
    assert_eq!(metric(&text, "relay_circuits"), Some(1.0));
    let events = |text: &str, event: &str| {
        metric(
            text,
            &format!("relay_reservation_events_total{{event=\"{event}\"}}"),
        )
    };
    assert_eq!(events(&text, "opened"), Some(1.0), "{text}");
    assert_eq!(events(&text, "closed"), Some(0.0), "{text}");
    // Each way: the payload plus the end-to-end noise and yamux framing inside the
    // circuit (a few percent), nothing of other streams.
    for direction in ["to_destination", "from_destination"] {
        let name = format!("relay_circuit_bytes_total{{direction=\"{direction}\"}}");
        let bytes = metric(&text, &name).unwrap_or_else(|| panic!("{name}:\n{text}"));
        assert!(
            bytes >= SIZE as f64 && bytes < SIZE as f64 * 1.05,
            "{name} = {bytes} for {SIZE} bytes"
        );
    }
    assert_eq!(
        metric(&text, "relay_circuit_duration_seconds_count"),
        Some(0.0)
    );
    drop(b);
    wait_metric(&server, "relay_circuits", |v| v == 0.0).await;
    let text = fetch_metrics(&server).await;
    assert_eq!(
        metric(&text, "relay_circuit_duration_seconds_count"),
        Some(1.0)
    );
    let took = metric(&text, "relay_circuit_duration_seconds_sum").unwrap();
    assert!(took > 0.0 && took < WAIT.as_secs_f64() * 2.0, "{took}");
    drop(a);
    wait_metric(&server, "relay_reservations", |v| v == 0.0).await;
    let text = fetch_metrics(&server).await;
    assert_eq!(events(&text, "closed"), Some(1.0), "{text}");
    assert_eq!(events(&text, "expired"), Some(0.0), "{text}");
    server.shutdown().await;
}

/// SIGTERM drains (src/main.rs): no new reservations or circuits, open circuits get a
/// bounded grace to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_refuses_new_reservations_and_waits_for_open_circuits() {
    let mut server = spawn_relay(|_| {}).await;
    let relay_addr = server.loopback_multiaddr();
    let mut a = TestClient::new(None).await;
    let mut b = TestClient::new(None).await;
    a.reserve(&relay_addr).await.expect("reservation accepted");
    b.dial_via_circuit(&relay_addr, a.peer_id).await;
    wait_metric(&server, "relay_circuits", |v| v == 1.0).await;

    let started = std::time::Instant::now();
    let left = server.drain(Duration::from_millis(800)).await;
    assert_eq!(
        left, 1,
        "the open circuit is still open when the grace ends"
    );
    assert!(started.elapsed() >= Duration::from_millis(800));

    let mut c = TestClient::new(None).await;
    let refused = c.reserve(&relay_addr).await;
    assert!(
        refused.is_err(),
        "a reservation while draining: {refused:?}"
    );

    drop(b);
    let started = std::time::Instant::now();
    assert_eq!(server.drain(Duration::from_secs(30)).await, 0);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the drain ends when the last circuit does"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_form_one_dht() {
    let r1 = spawn_relay(|_| {}).await;
    let r1_addr = r1.loopback_multiaddr();
    let r2 = spawn_relay(move |a| a.bootstrap = vec![r1_addr]).await;
    let r2_addr = r2.loopback_multiaddr();
    // Relay 3 only knows relay 2: it must learn relay 1 through the DHT.
    let r3 = spawn_relay(move |a| a.bootstrap = vec![r2_addr]).await;
    wait_metric(&r1, "relay_connections", |v| v >= 1.0).await;
    wait_metric(&r2, "relay_connections", |v| v >= 2.0).await;
    wait_metric(&r3, "relay_kad_routing_peers", |v| v >= 2.0).await;

    let mut c1 = TestClient::new(Some(Ipv4Addr::new(127, 0, 0, 4))).await;
    let mut c3 = TestClient::new(Some(Ipv4Addr::new(127, 0, 0, 5))).await;
    c1.bootstrap_via(r1.loopback_multiaddr()).await;
    c3.bootstrap_via(r3.loopback_multiaddr()).await;

    let key = syncgroup_key("federated-group");
    let mut record = kad::Record::new(
        key.clone(),
        br#"{"device_name":"phone","addresses":[],"timestamp":1}"#.to_vec(),
    );
    record.publisher = Some(c1.peer_id);
    c1.put_record(record).await.unwrap();
    let found = c3.get_record(key).await;
    assert_eq!(
        found
            .first()
            .expect("client of relay 3 finds the record")
            .record
            .publisher,
        Some(c1.peer_id)
    );
    for r in [r1, r2, r3] {
        r.shutdown().await;
    }
}

/// Operators federate relays by name: `--bootstrap /dns4/<name>/...` is resolved by
/// the system resolver (`localhost` through /etc/hosts here) and dialed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_relay_given_by_name_is_resolved_and_joined() {
    let r1 = spawn_relay(|_| {}).await;
    let port = r1.quic_addrs()[0].port();
    let by_name: Multiaddr = format!("/dns4/localhost/udp/{port}/quic-v1/p2p/{}", r1.peer_id())
        .parse()
        .unwrap();
    let r2 = spawn_relay(move |a| a.bootstrap = vec![by_name]).await;
    wait_metric(&r1, "relay_connections", |v| v >= 1.0).await;
    wait_metric(&r2, "relay_kad_routing_peers", |v| v >= 1.0).await;
    for r in [r1, r2] {
        r.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_address_is_listed_first_and_carried_by_reservations() {
    let external: Multiaddr = "/ip4/203.0.114.7/udp/4001/quic-v1".parse().unwrap();
    let ext = external.clone();
    let server = spawn_relay(move |a| a.external_addresses = vec![ext]).await;
    let relay = server.peer_id();
    let identity = client::fetch_identity(&server.loopback_http_url(), WAIT)
        .await
        .unwrap();
    assert_eq!(identity.addresses[0], external.to_string());

    let mut a = TestClient::new(None).await;
    let info = a.connect(server.loopback_multiaddr()).await;
    assert!(
        info.listen_addrs.contains(&external),
        "identify announces it"
    );
    let circuit = server.loopback_multiaddr().with(Protocol::P2pCircuit);
    let listener = a.with(move |s| s.listen_on(circuit)).await.unwrap();
    // The relayed address the client learns is built from the reservation's addresses.
    let relayed = a
        .wait("relayed listen address", |ev| match ev {
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } if listener_id == listener => Some(address),
            _ => None,
        })
        .await;
    let expected = external
        .with(Protocol::P2p(relay))
        .with(Protocol::P2pCircuit)
        .with(Protocol::P2p(a.peer_id));
    assert_eq!(relayed, expected);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_http_clients_are_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = spawn_relay(|_| {}).await;
    let addr = format!("127.0.0.1:{}", server.http_addrs()[0].port());
    let limit = privstack_relay::defaults::HTTP_HEADER_TIMEOUT + Duration::from_secs(5);

    // Connects and sends nothing; then one that never finishes its request head.
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /api/v1/identity HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    for (name, stream) in [("silent", &mut silent), ("slow", &mut slow)] {
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(limit, stream.read_to_end(&mut buf)).await;
        assert!(
            closed.is_ok(),
            "{name} client still connected after {limit:?}"
        );
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_limits_come_from_the_flags() {
    let server = spawn_relay(|a| {
        a.max_reservations = 1;
        a.max_circuit_bytes = 64 * 1024;
    })
    .await;
    let relay_addr = server.loopback_multiaddr();

    // Distinct source addresses, so only the reservation limit can refuse B.
    let mut a = TestClient::new(Some(Ipv4Addr::new(127, 0, 0, 6))).await;
    let mut b = TestClient::new(Some(Ipv4Addr::new(127, 0, 0, 7))).await;
    a.reserve(&relay_addr).await.expect("first reservation");
    let denied = b.reserve(&relay_addr).await.unwrap_err();
    assert!(denied.contains("ResourceLimitExceeded"), "{denied}");
    let text = fetch_metrics(&server).await;
    assert!(
        text.contains(
            "relay_denied_total{kind=\"reservation\",reason=\"ResourceLimitExceeded\"} 1"
        ),
        "refusals are counted by kind and reason:\n{text}"
    );

    // A circuit to A is cut once it has carried --max-circuit-bytes.
    let mut incoming = a.control.accept(TRANSFER_PROTOCOL).unwrap();
    let a_id = a.peer_id;
    b.dial_via_circuit(&relay_addr, a_id).await;
    let reader = tokio::spawn(async move {
        let (_, mut s) = incoming.next().await.unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got).await;
        got.len()
    });
    let mut control = b.control.clone();
    let writer = tokio::spawn(async move {
        let mut stream = control.open_stream(a_id, TRANSFER_PROTOCOL).await.unwrap();
        let _ = stream.write_all(&vec![7u8; 1024 * 1024]).await;
        let _ = stream.close().await;
    });
    let received = tokio::time::timeout(WAIT, reader)
        .await
        .expect("the cut circuit ends the stream")
        .unwrap();
    assert!(
        received < 1024 * 1024,
        "1 MiB crossed a circuit limited to 64 KiB"
    );
    writer.abort();
    server.shutdown().await;
}

/// 400 connections from one host (127.0.0.2) that send nothing, the way a slowloris
/// or a port scanner holds an API: honest requests from another host (127.0.0.1) are
/// answered at once (before, the flood held every slot and they waited for its 10 s
/// header timeout), the flood beyond its host's share gets a 429 at once, and its
/// share is closed after the first-byte timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_flood_from_one_host_leaves_the_api_to_everyone_else() {
    use privstack_relay::defaults;
    use tokio::io::AsyncReadExt as _;
    let server = spawn_relay(|_| {}).await;
    let api: std::net::SocketAddr = (Ipv4Addr::LOCALHOST, server.http_addrs()[0].port()).into();
    let mut flood = Vec::new();
    for _ in 0..400 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        flood.push(socket.connect(api).await.unwrap());
    }
    let url = format!("{}/healthz", server.loopback_http_url());
    for i in 0..20 {
        let answer = client::request("GET", &url, Duration::from_secs(3))
            .await
            .unwrap_or_else(|e| panic!("honest request {i} during the flood: {e}"));
        assert_eq!(answer.status, 200);
    }
    // What each flood connection sees: a 429 and the end, or nothing yet (held).
    let mut refused = 0;
    let mut held = Vec::new();
    for mut conn in flood {
        let mut buf = Vec::new();
        match tokio::time::timeout(Duration::from_millis(200), conn.read_to_end(&mut buf)).await {
            Ok(_) => {
                let text = String::from_utf8_lossy(&buf);
                assert!(text.starts_with("HTTP/1.1 429 "), "{text}");
                refused += 1;
            }
            Err(_) => held.push(conn),
        }
    }
    assert!(
        held.len() <= defaults::HTTP_MAX_CONNECTIONS_PER_HOST,
        "{} flood connections held, {refused} refused",
        held.len()
    );
    assert_eq!(refused + held.len(), 400);
    // The held ones sent nothing: closed by the relay, without an answer.
    for mut conn in held {
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(
            defaults::HTTP_FIRST_BYTE_TIMEOUT + Duration::from_secs(5),
            conn.read_to_end(&mut buf),
        )
        .await
        .expect("an idle connection is closed after the first-byte timeout");
        assert!(closed.is_err() || buf.is_empty(), "{buf:?}");
    }
    // And the host's share is free again.
    let answer = client::request("GET", &url, Duration::from_secs(3))
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    server.shutdown().await;
}

/// The supervisor: a QUIC listener that closes ends the relay, naming it (before, the
/// relay went on answering 503 on /healthz forever while systemd saw it running).
#[tokio::test]
async fn a_closed_quic_listener_stops_the_relay_naming_it() {
    let mut server = spawn_relay(|_| {}).await;
    let port = server.quic_addrs()[0].port();
    server.inject(privstack_relay::event_loop::Fault::CloseQuicListener);
    let stopped = tokio::time::timeout(WAIT, server.join())
        .await
        .expect("the relay notices its closed listener");
    assert_eq!(stopped.task, "event loop", "{stopped}");
    assert!(
        stopped.reason.starts_with("QUIC listener on /ip")
            && stopped
                .reason
                .ends_with(&format!("/udp/{port}/quic-v1 closed")),
        "{stopped}"
    );
    // The other tasks stop when asked.
    tokio::time::timeout(WAIT, server.shutdown())
        .await
        .expect("the rest of the relay stops");
}

/// Reservations renewed by their clients are counted as renewals, not as new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_reservations_are_counted_as_renewals() {
    // The client renews after three quarters of the reservation's lifetime: 3 s here.
    let server = spawn_relay(|a| a.reservation_duration_secs = 4).await;
    let mut a = TestClient::new(None).await;
    a.reserve(&server.loopback_multiaddr())
        .await
        .expect("reservation accepted");
    let renewed = r#"relay_reservation_events_total{event="renewed"}"#;
    wait_metric(&server, renewed, |v| v >= 1.0).await;
    let text = fetch_metrics(&server).await;
    let opened = r#"relay_reservation_events_total{event="opened"}"#;
    assert_eq!(metric(&text, opened), Some(1.0), "{text}");
    assert_eq!(metric(&text, "relay_reservations"), Some(1.0), "{text}");
    drop(a);
    server.shutdown().await;
}

/// By default reservations and circuits announce no `Limit` at all: the circuit relay
/// spec's "unlimited", and what js-libp2p and go-libp2p need to treat a relayed
/// connection as a full one. With --max-circuit-bytes / --max-circuit-duration-secs
/// the limit is announced as set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuits_announce_no_limit_unless_one_is_set() {
    for (bytes, secs, expected) in [
        (0, 0, None),
        (
            1 << 20,
            600,
            Some((Some(Duration::from_secs(600)), Some(1 << 20))),
        ),
        (1 << 20, 0, Some((Some(Duration::ZERO), Some(1 << 20)))),
    ] {
        let server = spawn_relay(|a| {
            a.max_circuit_bytes = bytes;
            a.max_circuit_duration_secs = secs;
        })
        .await;
        let relay_addr = server.loopback_multiaddr();
        let mut a = TestClient::new(None).await;
        let mut b = TestClient::new(None).await;
        let (_, reserved) = a.reserve_with_limit(&relay_addr).await.unwrap();
        assert_eq!(reserved, expected, "reservation with {bytes} B / {secs} s");
        let (_, circuit) = b
            .try_dial_via_circuit(&relay_addr, a.peer_id)
            .await
            .unwrap();
        assert_eq!(circuit, expected, "circuit with {bytes} B / {secs} s");
        // The rewritten messages leave the circuit working.
        exchange_through_circuit(&mut a, &mut b, 100_000).await;
        server.shutdown().await;
    }
}

/// --max-circuit-rate slows a circuit down without cutting it: 24 MiB one way at
/// 4 MiB/s take about 6 s and arrive whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_circuit_is_slowed_to_its_rate_not_cut() {
    const SIZE: usize = 24 << 20;
    let server = spawn_relay(|a| a.max_circuit_rate = 4 << 20).await;
    let relay_addr = server.loopback_multiaddr();
    let mut a = TestClient::new(None).await;
    let mut b = TestClient::new(None).await;
    a.reserve(&relay_addr).await.unwrap();
    b.dial_via_circuit(&relay_addr, a.peer_id).await;

    let mut incoming = a.control.accept(TRANSFER_PROTOCOL).unwrap();
    let a_id = a.peer_id;
    let reader = tokio::spawn(async move {
        let (_, mut s) = incoming.next().await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let (mut total, mut first) = (0usize, None);
        loop {
            let n = s.read(&mut buf).await.expect("the circuit stays open");
            if n == 0 {
                break;
            }
            first.get_or_insert_with(std::time::Instant::now);
            total += n;
        }
        (total, first.unwrap().elapsed())
    });
    let mut control = b.control.clone();
    let writer = tokio::spawn(async move {
        let mut stream = control.open_stream(a_id, TRANSFER_PROTOCOL).await.unwrap();
        stream.write_all(&vec![7u8; SIZE]).await.unwrap();
        stream.close().await.unwrap();
    });
    let (received, took) = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("24 MiB at 4 MiB/s within a minute")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(received, SIZE, "the whole payload crossed");
    let rate = SIZE as f64 / took.as_secs_f64() / (1 << 20) as f64;
    eprintln!("24 MiB in {took:?}: {rate:.2} MiB/s");
    assert!(
        (2.0..=4.6).contains(&rate),
        "24 MiB took {took:?}: {rate:.2} MiB/s at --max-circuit-rate 4MiB"
    );
    server.shutdown().await;
}

/// libp2p's relay lets a peer exceed its per-peer circuit limit by one; the flag means
/// what it says: with --max-circuits-per-peer 2, B's third circuit is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_peer_circuit_limit_allows_exactly_that_many() {
    let server = spawn_relay(|a| a.max_circuits_per_peer = 2).await;
    let relay_addr = server.loopback_multiaddr();
    let mut a = TestClient::new(None).await;
    let mut b = TestClient::new(None).await;
    a.reserve(&relay_addr).await.unwrap();
    for i in 0..2 {
        b.try_dial_via_circuit(&relay_addr, a.peer_id)
            .await
            .unwrap_or_else(|e| panic!("circuit {i}: {e}"));
    }
    wait_metric(&server, "relay_circuits", |v| v == 2.0).await;
    let refused = b.try_dial_via_circuit(&relay_addr, a.peer_id).await;
    assert!(refused.is_err(), "a third circuit was opened");
    assert_eq!(
        metric(&fetch_metrics(&server).await, "relay_circuits"),
        Some(2.0)
    );
    server.shutdown().await;
}

/// One host (127.0.0.8) at --max-connections-per-host cannot connect more, while
/// another host (127.0.0.9) still can; the same for reservations per host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_host_cannot_take_the_connections_or_reservations_of_others() {
    let server = spawn_relay(|a| {
        a.max_connections_per_host = 3;
        a.max_reservations_per_host = 2;
    })
    .await;
    let relay_addr = server.loopback_multiaddr();
    let crowd = Ipv4Addr::new(127, 0, 0, 8);
    let other = Ipv4Addr::new(127, 0, 0, 9);
    // Reservations: two peers of the host hold one each (one connection each), the
    // third is refused; another host reserves.
    let mut clients = Vec::new();
    for i in 0..3 {
        let mut c = TestClient::new(Some(crowd)).await;
        let reserved = c.reserve(&relay_addr).await;
        if i < 2 {
            reserved.unwrap_or_else(|e| panic!("reservation {i} of the host: {e}"));
        } else {
            let denied = reserved.unwrap_err();
            assert!(denied.contains("ResourceLimitExceeded"), "{denied}");
        }
        clients.push(c);
    }
    let mut elsewhere = TestClient::new(Some(other)).await;
    elsewhere
        .reserve(&relay_addr)
        .await
        .expect("another host reserves");

    // Connections: the host holds three, a fourth is refused; the other host connects.
    let mut fourth = TestClient::new(Some(crowd)).await;
    let refused = fourth.try_connect(relay_addr.clone()).await;
    assert!(
        refused.is_err(),
        "a fourth connection from one host was kept"
    );
    let mut second = TestClient::new(Some(other)).await;
    second.try_connect(relay_addr.clone()).await.unwrap();

    // A peer that leaves frees its host's connection and reservation.
    clients.remove(0);
    wait_metric(&server, "relay_reservations", |v| v == 2.0).await;
    let mut later = TestClient::new(Some(crowd)).await;
    later.reserve(&relay_addr).await.expect("the freed slot");
    server.shutdown().await;
}

/// --max-relayed-bytes-per-day: once circuits have carried it, an open circuit goes on
/// but new ones are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_budget_refuses_new_circuits_once_spent() {
    let server = spawn_relay(|a| a.max_relayed_bytes_per_day = 1 << 20).await;
    let relay_addr = server.loopback_multiaddr();
    let mut a = TestClient::new(None).await;
    let mut b = TestClient::new(None).await;
    a.reserve(&relay_addr).await.unwrap();
    b.try_dial_via_circuit(&relay_addr, a.peer_id)
        .await
        .unwrap();
    // 2 MiB each way: past the budget, on a circuit that stays open.
    exchange_through_circuit(&mut a, &mut b, 2 << 20).await;
    let refused = b.try_dial_via_circuit(&relay_addr, a.peer_id).await;
    assert!(refused.is_err(), "a circuit opened past the daily budget");
    server.shutdown().await;
}
