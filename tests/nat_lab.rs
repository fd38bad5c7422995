//! The relay as it runs on the internet: a NAT lab of network namespaces.
//!
//! Each test builds its own topology under a prefix of its own (`psrl-<pid>-<n>-`):
//!
//! ```text
//!   relay ns: 11.0.0.10/16 ──┐
//!                            ├── inet ns: bridge "br0" (the internet, 11.0.0.0/16)
//!   home N router: wan 11.0.N.1/16 ──┘   nft masquerade (home 2: random ports, like a
//!        │ lan 192.168.N.1/24              symmetric NAT), stateful: nothing comes in
//!   home N LAN ns: eth0 192.168.N.2/24, default route via the router
//!
//!   cloud gateway ns: wan 11.0.0.20/16 ──┘  1:1 NAT to the VPS (as cloud providers do:
//!        │ lan 10.0.0.1/24                  the host only has its private address)
//!   vps ns: eth0 10.0.0.10/24, default route via the gateway
//! ```
//!
//! No namespace has an interface or route to the host's network: veths are created
//! between lab namespaces only, so packets cannot leave. Everything is deleted when the
//! lab is dropped, also when a test fails; namespaces left by a run that crashed (its
//! process is gone) are deleted before a new lab is built. Needs root, `ip` and `nft`;
//! without them the tests say so and pass without running, unless
//! `PRIVSTACK_NAT_LAB=required` (`.ci/run`, as root) makes that a failure.
//!
//! The relay and the devices run in this process, each in a thread that entered its
//! namespace (`setns`) and drives its own single-threaded runtime, so every socket they
//! open belongs to that namespace. Devices are real rust-libp2p peers behaving like
//! PrivStack: QUIC only, Kademlia in server mode, listening on 0.0.0.0 so identify
//! carries their LAN and loopback addresses, put + get of sync-group records.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, identify, kad};
use privstack_relay::addrs::{self, Reach};
use privstack_relay::config::{MetricsAddress, RunArgs};
use privstack_relay::{Config, Server};
use tokio::sync::oneshot;

const RELAY_IP: Ipv4Addr = Ipv4Addr::new(11, 0, 0, 10);
/// Home 1's router forwards this address to the relay: a device that dials it reports
/// an observed address the relay is not at (a forgery from one network).
const DECOY_IP: Ipv4Addr = Ipv4Addr::new(11, 0, 66, 66);
/// The cloud gateway's public address, forwarded one to one to the VPS's private one.
const CLOUD_IP: Ipv4Addr = Ipv4Addr::new(11, 0, 0, 20);
const VPS_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const PREFIX: &str = "psrl-";

static LABS: AtomicUsize = AtomicUsize::new(0);

/// The namespaces of one test; deleted on drop.
struct Lab {
    prefix: String,
    homes: usize,
}

fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn sh(cmd: &str, args: &[&str]) {
    run(cmd, args).unwrap_or_else(|e| panic!("lab setup: {e}"));
}

/// Give interface `dev` in namespace `ns` the address `cidr` and bring it up.
fn addr_up(ns: &str, dev: &str, cidr: &str) {
    sh("ip", &["-n", ns, "addr", "add", cidr, "dev", dev]);
    sh("ip", &["-n", ns, "link", "set", dev, "up"]);
}

/// Make namespace `ns` a router: IPv4 forwarding on, and the nftables `rules` loaded.
fn route(ns: &str, rules: &str) {
    sh(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ],
    );
    let path = std::env::temp_dir().join(format!("{ns}.nft"));
    std::fs::write(&path, rules).unwrap();
    let file = path.to_str().unwrap().to_owned();
    sh("ip", &["netns", "exec", ns, "nft", "-f", &file]);
    let _ = std::fs::remove_file(path);
}

/// Delete namespaces of earlier runs whose process is gone.
fn remove_stale() {
    let Ok(list) = run("ip", &["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run("ip", &["netns", "delete", name]);
        }
    }
}

impl Lab {
    /// A lab with `homes` homes, or `None` (after saying why) where namespaces cannot
    /// be made here.
    /// With `PRIVSTACK_NAT_LAB=required` (as `.ci/run` sets it) a lab that cannot be
    /// made fails the test instead.
    fn new(homes: usize) -> Option<Lab> {
        let skip = |why: &str| {
            if std::env::var("PRIVSTACK_NAT_LAB").as_deref() == Ok("required") {
                panic!("the NAT lab cannot run here: {why}");
            }
            eprintln!("SKIPPED: {why}");
        };
        if !nix::unistd::geteuid().is_root() {
            skip("the NAT lab needs root (network namespaces)");
            return None;
        }
        for tool in ["ip", "nft"] {
            if run(tool, &["-V"]).is_err() {
                skip(&format!("the NAT lab needs `{tool}` (iproute2, nftables)"));
                return None;
            }
        }
        remove_stale();
        let n = LABS.fetch_add(1, Ordering::SeqCst);
        let lab = Lab {
            prefix: format!("{PREFIX}{}-{n}-", std::process::id()),
            homes,
        };
        // Built after `lab` exists: a failure half way is cleaned up by its drop.
        lab.build();
        Some(lab)
    }

    fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn names(&self) -> Vec<String> {
        let mut v = vec![
            self.ns("inet"),
            self.ns("relay"),
            self.ns("gw"),
            self.ns("vps"),
        ];
        for h in 1..=self.homes {
            v.push(self.ns(&format!("r{h}")));
            v.push(self.ns(&format!("h{h}")));
        }
        v
    }

    fn build(&self) {
        for ns in self.names() {
            sh("ip", &["netns", "add", &ns]);
            sh("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        }
        let inet = self.ns("inet");
        sh("ip", &["-n", &inet, "link", "add", "br0", "type", "bridge"]);
        sh("ip", &["-n", &inet, "link", "set", "br0", "up"]);
        let relay = self.ns("relay");
        self.plug("p-relay", &relay, "eth0");
        addr_up(&relay, "eth0", "11.0.0.10/16");
        self.build_cloud();
        for h in 1..=self.homes {
            let router = self.ns(&format!("r{h}"));
            let home = self.ns(&format!("h{h}"));
            self.plug(&format!("p-r{h}"), &router, "wan");
            addr_up(&router, "wan", &format!("11.0.{h}.1/16"));
            self.wire(&router, "lan", &home, "eth0");
            addr_up(&router, "lan", &format!("192.168.{h}.1/24"));
            addr_up(&home, "eth0", &format!("192.168.{h}.2/24"));
            sh(
                "ip",
                &[
                    "-n",
                    &home,
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("192.168.{h}.1"),
                ],
            );
            // Home 2 maps every flow to a random port (like a symmetric NAT); home 1
            // keeps ports where it can. Both are stateful: only replies come in.
            let random = if h == 2 { " random,fully-random" } else { "" };
            // Home 1 also forwards DECOY_IP to the relay (see DECOY_IP).
            let decoy = if h == 1 {
                format!(
                    "chain decoy {{ type nat hook prerouting priority dstnat; ip daddr {DECOY_IP} dnat to {RELAY_IP}; }}"
                )
            } else {
                String::new()
            };
            let rules = format!(
                "table ip nat {{\n\
                 chain masq {{ type nat hook postrouting priority srcnat; oifname \"wan\" masquerade{random}; }}\n\
                 {decoy}\n\
                 }}\n\
                 table ip filter {{\n\
                 chain forwarding {{ type filter hook forward priority filter; policy drop;\n\
                 ct state established,related accept; iifname \"lan\" oifname \"wan\" accept; }}\n\
                 }}\n"
            );
            route(&router, &rules);
        }
    }

    /// The cloud: a gateway on the internet that forwards its public address one to
    /// one to a VPS, which has only its private address (as on most cloud providers).
    fn build_cloud(&self) {
        let (gw, vps) = (self.ns("gw"), self.ns("vps"));
        self.plug("p-gw", &gw, "wan");
        addr_up(&gw, "wan", &format!("{CLOUD_IP}/16"));
        self.wire(&gw, "lan", &vps, "eth0");
        addr_up(&gw, "lan", "10.0.0.1/24");
        addr_up(&vps, "eth0", &format!("{VPS_IP}/24"));
        sh(
            "ip",
            &["-n", &vps, "route", "add", "default", "via", "10.0.0.1"],
        );
        let rules = format!(
            "table ip nat {{\n\
             chain in {{ type nat hook prerouting priority dstnat; iifname \"wan\" ip daddr {CLOUD_IP} dnat to {VPS_IP}; }}\n\
             chain out {{ type nat hook postrouting priority srcnat; oifname \"wan\" ip saddr {VPS_IP} snat to {CLOUD_IP}; }}\n\
             }}\n"
        );
        route(&gw, &rules);
    }

    /// Join `dev` of namespace `ns` to the internet's bridge (`port` on its side).
    fn plug(&self, port: &str, ns: &str, dev: &str) {
        let inet = self.ns("inet");
        self.wire(&inet, port, ns, dev);
        sh(
            "ip",
            &["-n", &inet, "link", "set", port, "master", "br0", "up"],
        );
    }

    /// A veth pair between two lab namespaces (never the host's).
    fn wire(&self, a: &str, a_if: &str, b: &str, b_if: &str) {
        sh(
            "ip",
            &[
                "-n", a, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b,
            ],
        );
    }

    /// The relay in its namespace on a free port, with `tweak` applied to its
    /// defaults; `external`: with `--external-address` at its public address and port.
    async fn relay(
        &self,
        external: bool,
        tweak: impl FnOnce(&mut RunArgs) + Send + 'static,
    ) -> InNs<Server> {
        self.relay_in("relay", external, tweak).await
    }

    /// The relay in namespace `ns` (`relay`, or `vps` behind the cloud's NAT).
    async fn relay_in(
        &self,
        ns: &str,
        external: bool,
        tweak: impl FnOnce(&mut RunArgs) + Send + 'static,
    ) -> InNs<Server> {
        InNs::start(&self.ns(ns), async move {
            let port = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
                .and_then(|s| s.local_addr())
                .expect("a free UDP port in the relay's namespace")
                .port();
            let mut args = RunArgs {
                port,
                http_port: 0,
                metrics_address: MetricsAddress(Some("127.0.0.1:0".parse().unwrap())),
                ..RunArgs::default()
            };
            if external {
                args.external_addresses = vec![
                    format!("/ip4/{RELAY_IP}/udp/{port}/quic-v1")
                        .parse()
                        .unwrap(),
                ];
            }
            tweak(&mut args);
            let config = Config::try_from(&args).expect("valid lab config");
            Server::spawn(libp2p::identity::Keypair::generate_ed25519(), config)
                .await
                .expect("relay starts")
        })
        .await
    }

    /// A PrivStack-style device in home `h`: it listens on 0.0.0.0, so identify
    /// carries the home's LAN and loopback addresses, as PrivStack's do.
    async fn device(&self, h: usize) -> InNs<TestClient> {
        InNs::start(&self.ns(&format!("h{h}")), async move {
            TestClient::new(Some(Ipv4Addr::UNSPECIFIED)).await
        })
        .await
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.names().into_iter().rev() {
            let _ = run("ip", &["netns", "delete", &ns]);
        }
    }
}

/// A value made inside a namespace by a thread that stays there, running the runtime
/// that drives it, until this is dropped.
struct InNs<T> {
    value: Option<T>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl<T: Send + 'static> InNs<T> {
    async fn start<F>(ns: &str, make: F) -> InNs<T>
    where
        F: std::future::Future<Output = T> + Send + 'static,
    {
        let path = format!("/run/netns/{ns}");
        let (tx, rx) = oneshot::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("namespace exists");
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let _ = tx.send(make.await);
                let _ = stopped.await;
            });
        });
        let value = rx.await.expect("namespace thread started");
        InNs {
            value: Some(value),
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Take the value out (its tasks keep running in the namespace thread).
    fn into_parts(mut self) -> (T, InNs<()>) {
        let value = self.value.take().unwrap();
        let rest = InNs {
            value: Some(()),
            stop: self.stop.take(),
            thread: self.thread.take(),
        };
        (value, rest)
    }
}

impl<T> std::ops::Deref for InNs<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.value.as_ref().unwrap()
    }
}

impl<T> std::ops::DerefMut for InNs<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.value.as_mut().unwrap()
    }
}

impl<T> Drop for InNs<T> {
    fn drop(&mut self) {
        drop(self.value.take());
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Shut the in-process relay down, then end its namespace thread.
async fn stop(relay: InNs<Server>) {
    let (relay, ns) = relay.into_parts();
    relay.shutdown().await;
    drop(ns);
}

/// `d` puts its record for the sync group `code`.
async fn put_own(d: &mut TestClient, code: &str, lan: Ipv4Addr) -> Result<(), kad::PutRecordError> {
    let r = record(syncgroup_key(code), d.peer_id, lan);
    d.put_record(r).await
}

/// `reader` finds the record of `code`, published by `writer`.
async fn find_published_by(reader: &mut TestClient, code: &str, writer: PeerId) {
    let found = reader.get_record(syncgroup_key(code)).await;
    let rec = &found.first().expect("the record is found").record;
    assert_eq!(rec.publisher, Some(writer), "publisher survives the relay");
}

/// The relay's address as devices dial it.
fn public_addr(relay: &Server) -> Multiaddr {
    Multiaddr::empty()
        .with(Protocol::Ip4(RELAY_IP))
        .with(Protocol::Udp(relay.quic_addrs()[0].port()))
        .with(Protocol::QuicV1)
        .with(Protocol::P2p(relay.peer_id()))
}

fn relay_metric(relay: &Server, name: &str) -> Option<f64> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, relay.registry()).unwrap();
    metric(&text, name)
}

async fn wait_relay_metric(relay: &Server, name: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = relay_metric(relay, name).filter(|v| ok(*v)) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metric {name} never reached the expected value (now {:?})",
            relay_metric(relay, name)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn record(key: kad::RecordKey, publisher: PeerId, lan: Ipv4Addr) -> kad::Record {
    let value = serde_json::json!({
        "device_name": "lab device",
        "addresses": [format!("/ip4/{lan}/udp/4100/quic-v1"), "/ip4/127.0.0.1/udp/4100/quic-v1"],
        "timestamp": 1_764_000_000u64,
    });
    let mut r = kad::Record::new(key, serde_json::to_vec(&value).unwrap());
    r.publisher = Some(publisher);
    r
}

/// Whether `addr` is one a device in another network must never be handed: private,
/// loopback, or one of the lab's NAT routers (an inbound mapping).
fn undialable(addr: &Multiaddr) -> bool {
    match addrs::ip(addr) {
        Some(IpAddr::V4(ip)) if ip.octets()[0] == 11 && ip.octets()[3] == 1 => true,
        _ => matches!(addrs::reach(addr), Reach::Private | Reach::Loopback),
    }
}

/// What `b` is told about `a` while it runs `get_closest_peers(a)` through the relay:
/// every address it dials `a` at (a peer handed out in an answer is dialed at the
/// addresses the answer carried), whether it dialed `a` at all, and the query's
/// failures (each one a handshake timeout on a real NAT).
async fn what_b_learns_of(b: &mut TestClient, a: PeerId) -> (Vec<Multiaddr>, bool, u32) {
    let id = b
        .with(move |s| s.behaviour_mut().kad.get_closest_peers(a))
        .await;
    let mut addrs = Vec::new();
    let mut dialed = false;
    loop {
        enum Seen {
            Done(u32),
            Dialing,
            Tried(Vec<Multiaddr>),
            Routing(Vec<Multiaddr>),
        }
        let seen = b
            .wait("get_closest_peers", |ev| match ev {
                SwarmEvent::Behaviour(ClientBehaviourEvent::Kad(
                    kad::Event::OutboundQueryProgressed {
                        id: qid,
                        step,
                        stats,
                        ..
                    },
                )) if qid == id && step.last => Some(Seen::Done(stats.num_failures())),
                SwarmEvent::Dialing {
                    peer_id: Some(p), ..
                } if p == a => Some(Seen::Dialing),
                SwarmEvent::OutgoingConnectionError {
                    peer_id: Some(p),
                    error: libp2p::swarm::DialError::Transport(tried),
                    ..
                } if p == a => Some(Seen::Tried(tried.into_iter().map(|(m, _)| m).collect())),
                SwarmEvent::Behaviour(ClientBehaviourEvent::Kad(kad::Event::RoutingUpdated {
                    peer,
                    addresses,
                    ..
                })) if peer == a => Some(Seen::Routing(addresses.into_vec())),
                _ => None,
            })
            .await;
        match seen {
            Seen::Done(failures) => return (addrs, dialed, failures),
            Seen::Dialing => dialed = true,
            Seen::Tried(m) | Seen::Routing(m) => addrs.extend(m),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_behind_two_nats_find_each_other_and_nothing_undialable_is_handed_out() {
    let Some(lab) = Lab::new(2) else { return };
    let relay = lab.relay(true, |_| {}).await;
    let relay_addr = public_addr(&relay);
    let relay_id = relay.peer_id();
    let mut a = lab.device(1).await;
    let mut b = lab.device(2).await;
    a.bootstrap_via(relay_addr.clone()).await;
    b.bootstrap_via(relay_addr.clone()).await;
    wait_relay_metric(&relay, "relay_connections", |v| v == 2.0).await;

    // Discovery through the sync group's record, across both NATs.
    put_own(&mut a, "lab-group", Ipv4Addr::new(192, 168, 1, 2))
        .await
        .expect("A's put succeeds through its NAT");
    find_published_by(&mut b, "lab-group", a.peer_id).await;

    // While both are connected: the relay tells neither device anything about the
    // other, whose addresses (LAN, loopback, its router's mapping) are all undialable
    // from another network; so nobody dials into a stranger's LAN or waits out a
    // handshake timeout.
    let a_id = a.peer_id;
    let b_id = b.peer_id;
    for (asker, other) in [(&mut b, a_id), (&mut a, b_id)] {
        let (handed, dialed, failures) = what_b_learns_of(asker, other).await;
        let bad: Vec<_> = handed.iter().filter(|x| undialable(x)).collect();
        assert!(bad.is_empty(), "the relay handed out {bad:?}");
        assert!(
            !dialed && failures == 0,
            "the relay handed out a NATed device (dialed at {handed:?}, {failures} failures)"
        );
    }
    // The relay's routing table holds neither device: their only addresses are ones
    // nobody outside their homes could dial.
    assert_eq!(relay_metric(&relay, "relay_kad_routing_peers"), Some(0.0));

    // A leaves: B's queries are not sent anywhere for it (no handshake timeouts).
    drop(a);
    wait_relay_metric(&relay, "relay_connections", |v| v == 1.0).await;
    b.with(move |s| {
        s.behaviour_mut().kad.remove_peer(&a_id);
    })
    .await;
    let (closest, stats) = b.closest_peers(a_id).await;
    assert!(!closest.contains(&a_id), "{closest:?}");
    assert!(closest.contains(&relay_id));
    assert_eq!(stats.num_failures(), 0, "{stats:?}");
    drop(b);
    stop(relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_puts_fail_at_the_device_and_one_home_cannot_fill_the_store() {
    let Some(lab) = Lab::new(2) else { return };
    let relay = lab
        .relay(true, |a| {
            a.kad_max_records = 13;
            a.kad_max_records_per_peer = 4;
            a.kad_max_records_per_host = 10;
            a.kad_max_value_bytes = 600;
        })
        .await;
    let relay_addr = public_addr(&relay);

    // Home 1 floods: three devices behind its one public address try 4 records each.
    let mut flooders = Vec::new();
    for _ in 0..3 {
        let mut d = lab.device(1).await;
        d.bootstrap_via(relay_addr.clone()).await;
        flooders.push(d);
    }
    let mut stored = 0;
    let mut refused = 0;
    for (i, d) in flooders.iter_mut().enumerate() {
        for j in 0..4 {
            let key = syncgroup_key(&format!("flood-{i}-{j}"));
            let r = record(key, d.peer_id, Ipv4Addr::new(192, 168, 1, 2));
            match d.put_record(r).await {
                Ok(()) => stored += 1,
                Err(_) => refused += 1,
            }
        }
    }
    assert_eq!(stored, 10, "home 1 holds its host quota and no more");
    assert_eq!(refused, 2, "puts over the quota fail at the device");
    wait_relay_metric(&relay, "relay_kad_refused_total{reason=\"quota\"}", |v| {
        v == 2.0
    })
    .await;

    // Home 2 still stores and reads its sync group.
    let mut b = lab.device(2).await;
    b.bootstrap_via(relay_addr.clone()).await;
    put_own(&mut b, "home-2-group", Ipv4Addr::new(192, 168, 2, 2))
        .await
        .expect("home 2's put succeeds while home 1 is at its quota");
    let b_id = b.peer_id;
    find_published_by(&mut b, "home-2-group", b_id).await;

    // Too large: fails at the device.
    let mut big = kad::Record::new(syncgroup_key("big"), vec![b'x'; 601]);
    big.publisher = Some(b.peer_id);
    assert!(
        b.put_record(big).await.is_err(),
        "a value over the limit fails"
    );
    // Exactly the limit is accepted.
    let mut edge = kad::Record::new(syncgroup_key("edge"), vec![b'x'; 600]);
    edge.publisher = Some(b.peer_id);
    b.put_record(edge)
        .await
        .expect("a value of exactly --kad-max-value-bytes fits");

    // Full: 13 records in all; the next new key fails at the device.
    let mut c = lab.device(2).await;
    c.bootstrap_via(relay_addr.clone()).await;
    let r = record(
        syncgroup_key("thirteenth"),
        c.peer_id,
        Ipv4Addr::new(192, 168, 2, 3),
    );
    c.put_record(r).await.expect("the thirteenth record fits");
    let r = record(
        syncgroup_key("fourteenth"),
        c.peer_id,
        Ipv4Addr::new(192, 168, 2, 3),
    );
    assert!(
        c.put_record(r).await.is_err(),
        "a full store's refusal fails at the device"
    );
    wait_relay_metric(&relay, "relay_kad_refused_total{reason=\"full\"}", |v| {
        v == 1.0
    })
    .await;
    wait_relay_metric(
        &relay,
        "relay_kad_refused_total{reason=\"too_large\"}",
        |v| v == 1.0,
    )
    .await;
    drop((flooders, b, c));
    stop(relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_behind_nats_carry_the_public_address_and_circuits_cross() {
    let Some(lab) = Lab::new(2) else { return };
    let relay = lab.relay(true, |_| {}).await;
    let relay_addr = public_addr(&relay);
    let (mut a, a_ns) = lab.device(1).await.into_parts();
    let (mut b, b_ns) = lab.device(2).await.into_parts();
    let reserved = a
        .reserve(&relay_addr)
        .await
        .expect("reservation from behind home 1's NAT");
    assert!(
        reserved
            .iter()
            .any(|x| addrs::ip(x) == Some(IpAddr::V4(RELAY_IP))),
        "reservation carries the relay's public address: {reserved:?}"
    );
    wait_relay_metric(&relay, "relay_reservations", |v| v == 1.0).await;
    let endpoint = b.dial_via_circuit(&relay_addr, a.peer_id).await;
    assert!(endpoint.is_relayed());
    exchange_through_circuit(&mut a, &mut b, 64 * 1024 * 1024).await;
    drop((a, b, a_ns, b_ns));
    stop(relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observed_address_forged_from_one_network_is_not_announced() {
    let Some(lab) = Lab::new(2) else { return };
    // No --external-address: the relay may adopt an observed one.
    let relay = lab.relay(false, |_| {}).await;
    let port = relay.quic_addrs()[0].port();
    let decoy = Multiaddr::empty()
        .with(Protocol::Ip4(DECOY_IP))
        .with(Protocol::Udp(port))
        .with(Protocol::QuicV1);
    // Five keys in home 1 reach the relay through the decoy address, so each reports
    // the relay "at" DECOY_IP.
    let mut forgers = Vec::new();
    for _ in 0..5 {
        let mut d = lab.device(1).await;
        d.connect(decoy.clone().with(Protocol::P2p(relay.peer_id())))
            .await;
        forgers.push(d);
    }
    wait_relay_metric(&relay, "relay_connections", |v| v == 5.0).await;
    // A device in home 2 learns what the relay announces.
    let mut b = lab.device(2).await;
    let info = b.connect(public_addr(&relay)).await;
    let decoy_s = DECOY_IP.to_string();
    assert!(
        !info
            .listen_addrs
            .iter()
            .any(|a| a.to_string().contains(&decoy_s)),
        "identify announces the forged address: {:?}",
        info.listen_addrs
    );
    assert!(
        !relay
            .addresses()
            .iter()
            .any(|a| a.to_string().contains(&decoy_s)),
        "the identity API lists the forged address: {:?}",
        relay.addresses()
    );
    drop((forgers, b));
    stop(relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_behind_a_cloud_nat_offers_each_device_an_address_it_can_dial() {
    let Some(lab) = Lab::new(2) else { return };
    // A VPS with only its private address, no --external-address: the relay knows
    // 127.0.0.1 and 10.0.0.10, neither of which a device on the internet can dial.
    let relay = lab.relay_in("vps", false, |_| {}).await;
    let port = relay.quic_addrs()[0].port();
    let public = Multiaddr::empty()
        .with(Protocol::Ip4(CLOUD_IP))
        .with(Protocol::Udp(port))
        .with(Protocol::QuicV1);
    let public_p2p = public.clone().with(Protocol::P2p(relay.peer_id()));
    let cloud_s = CLOUD_IP.to_string();
    assert!(
        !relay
            .addresses()
            .iter()
            .any(|a| a.to_string().contains(&cloud_s)),
        "the relay does not know its public address yet: {:?}",
        relay.addresses()
    );

    let (mut a, a_ns) = lab.device(1).await.into_parts();
    let relay_id = relay.peer_id();
    let first = a.connect(public_p2p.clone()).await;
    let offered_only_dialable = |listen: &[Multiaddr]| {
        listen
            .iter()
            .all(|x| !matches!(addrs::reach(x), Reach::Private | Reach::Loopback))
    };
    assert!(
        offered_only_dialable(&first.listen_addrs),
        "identify offers a device on the internet only addresses it can dial: {:?}",
        first.listen_addrs
    );
    // Once the device said where it sees the relay, identify pushes that address.
    let pushed = if first.listen_addrs.contains(&public) {
        first.listen_addrs
    } else {
        let want = public.clone();
        a.wait(
            "an identify push with the relay's public address",
            |ev| match ev {
                SwarmEvent::Behaviour(ClientBehaviourEvent::Identify(
                    identify::Event::Received { peer_id, info, .. },
                )) if peer_id == relay_id => {
                    assert!(
                        offered_only_dialable(&info.listen_addrs),
                        "{:?}",
                        info.listen_addrs
                    );
                    info.listen_addrs
                        .contains(&want)
                        .then_some(info.listen_addrs)
                }
                _ => None,
            },
        )
        .await
    };
    assert!(offered_only_dialable(&pushed), "{pushed:?}");

    // A reservation lists the address the device reached the relay at, nothing else.
    let reserved = a
        .reserve(&public_p2p)
        .await
        .expect("reservation through the cloud's NAT");
    assert!(
        !reserved.is_empty()
            && reserved
                .iter()
                .all(|x| addrs::ip(x) == Some(IpAddr::V4(CLOUD_IP))),
        "the reservation offers only the relay's public address: {reserved:?}"
    );
    // ... and it works: a device in the other home reaches `a` through it.
    let (mut b, b_ns) = lab.device(2).await.into_parts();
    let endpoint = b.dial_via_circuit(&public_p2p, a.peer_id).await;
    assert!(endpoint.is_relayed());
    exchange_through_circuit(&mut a, &mut b, 1024 * 1024).await;
    drop((a, b, a_ns, b_ns));
    stop(relay).await;
}

/// A relay binary running in the lab's relay namespace (`ip netns exec`), with
/// `--external-address` at its public address; returns it with its public multiaddr.
async fn relay_binary(lab: &Lab, bin: &str, extra: &[String]) -> (RelayBinary, Multiaddr) {
    // A free UDP port in the relay's namespace, found from inside it.
    let port = *InNs::start(&lab.ns("relay"), async {
        std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
            .and_then(|s| s.local_addr())
            .unwrap()
            .port()
    })
    .await;
    let ns = lab.ns("relay");
    let relay = RelayBinary::start(
        &["ip", "netns", "exec", &ns],
        bin,
        port,
        &[
            &[
                "--external-address".into(),
                format!("/ip4/{RELAY_IP}/udp/{port}/quic-v1"),
            ],
            extra,
        ]
        .concat(),
    );
    let addr = Multiaddr::empty()
        .with(Protocol::Ip4(RELAY_IP))
        .with(Protocol::Udp(port))
        .with(Protocol::QuicV1)
        .with(Protocol::P2p(relay.peer_id));
    (relay, addr)
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Put/get latency of PrivStack-style devices behind the lab's two NATs while devices
/// come and go (not a pass/fail test):
///
/// PRIVSTACK_RELAY_BIN=target/x86_64-unknown-linux-musl/release/privstack-relay \
///   cargo test --test nat_lab fleet -- --ignored --nocapture
///
/// PRIVSTACK_LAB_DEVICES (default 50) devices per home; device i of home 1 and device i
/// of home 2 share a sync group. Each of PRIVSTACK_LAB_ROUNDS (default 6) rounds, after
/// a pause of PRIVSTACK_LAB_PAUSE_SECS (default 15), first replaces a fifth of each
/// home's devices (the old ones leave, new ones join and bootstrap), then every device puts its group's record and gets it back (its
/// partner's or its own, whichever was written last), all at once. Prints p50/p99 of
/// put and get and the failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; needs PRIVSTACK_RELAY_BIN"]
async fn fleet_put_get_latency_behind_nats() {
    let bin = std::env::var("PRIVSTACK_RELAY_BIN").expect("PRIVSTACK_RELAY_BIN");
    let per_home = env_or("PRIVSTACK_LAB_DEVICES", 50);
    let rounds = env_or("PRIVSTACK_LAB_ROUNDS", 6);
    let pause = env_or("PRIVSTACK_LAB_PAUSE_SECS", 15);
    let lab = Lab::new(2).expect("the NAT lab needs root, ip and nft");
    // Each home is one address to the relay (its NAT), holding its devices' connections
    // and, until their idle timeout, those of the devices that just left: past the
    // default per-host cap (256) with a few hundred devices per home, as behind a CGNAT.
    let caps = [
        "--max-connections-per-host".to_string(),
        (2 * per_home).max(256).to_string(),
        "--max-connections-per-network".to_string(),
        (4 * per_home).max(1024).to_string(),
    ];
    let (relay, relay_addr) = relay_binary(&lab, &bin, &caps).await;
    // A device joins as PrivStack's do: dial the relay, start one Kademlia bootstrap
    // and go on without waiting for it.
    let join = |h: usize| {
        let lab = &lab;
        let addr = relay_addr.clone();
        async move {
            let mut d = lab.device(h).await;
            let Some(Protocol::P2p(peer)) = addr.iter().last() else {
                unreachable!()
            };
            let mut plain = addr.clone();
            plain.pop();
            d.with(move |s| {
                s.behaviour_mut().kad.add_address(&peer, plain);
            })
            .await;
            d.connect(addr).await;
            d.with(|s| s.behaviour_mut().kad.bootstrap().map(|_| ()))
                .await
                .expect("the relay is known");
            d
        }
    };
    // Kademlia's query timeout (60 s) decides; this only keeps a wedged device from
    // stalling the run.
    let limit = Duration::from_secs(90);
    // (home, pair, device)
    let mut fleet = Vec::new();
    for i in 0..per_home {
        for h in 1..=2 {
            fleet.push((h, i, join(h).await));
        }
    }
    let (mut puts, mut gets) = (Vec::new(), Vec::new());
    let (mut put_failures, mut get_misses) = (0, 0);
    let started = std::time::Instant::now();
    for round in 0..rounds {
        if round > 0 {
            // Devices re-publish every 30 s; the pause also lets the relay notice the
            // departures (QUIC idle timeout) before the next round queries.
            tokio::time::sleep(Duration::from_secs(pause as u64)).await;
            // A fifth of each home leaves; as many join.
            let leaving = per_home / 5;
            for k in 0..leaving {
                let i = (round * leaving + k) % per_home;
                for slot in fleet.iter_mut().filter(|(_, pair, _)| *pair == i) {
                    let h = slot.0;
                    slot.2 = join(h).await;
                }
            }
        }
        let ops = fleet.iter_mut().map(|(h, pair, d)| {
            let key = syncgroup_key(&format!("fleet-{pair}"));
            let lan = Ipv4Addr::new(192, 168, *h as u8, 2);
            async move {
                let rec = record(key.clone(), d.peer_id, lan);
                let t = std::time::Instant::now();
                let put = d.put_record_within(rec, limit).await;
                let put_t = t.elapsed();
                let t = std::time::Instant::now();
                let found = d
                    .get_record_within(key, limit)
                    .await
                    .is_some_and(|f| !f.is_empty());
                (matches!(put, Some(Ok(()))), put_t, found, t.elapsed())
            }
        });
        for (ok, put_t, found, get_t) in futures::future::join_all(ops).await {
            if ok {
                puts.push(put_t);
            } else {
                put_failures += 1;
            }
            if found {
                gets.push(get_t);
            } else {
                get_misses += 1;
            }
        }
    }
    puts.sort();
    gets.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "fleet: {} devices per home, {rounds} rounds in {:.0} s; put p50 {:.0} ms p99 {:.0} ms \
         ({} ok, {put_failures} failed); get p50 {:.0} ms p99 {:.0} ms ({} found, {get_misses} not)",
        per_home,
        started.elapsed().as_secs_f64(),
        ms(percentile(&puts, 0.5)),
        ms(percentile(&puts, 0.99)),
        puts.len(),
        ms(percentile(&gets, 0.5)),
        ms(percentile(&gets, 0.99)),
        gets.len(),
    );
    drop(fleet);
    drop(relay);
}
