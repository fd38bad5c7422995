//! Shared test helpers: an in-process relay and real rust-libp2p client peers over
//! loopback QUIC, each driven by its own task.

#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::time::Duration;

use futures::StreamExt;
use libp2p::kad::store::MemoryStore;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder, identify, kad, noise, ping, relay,
    yamux,
};
use privstack_relay::config::{MetricsAddress, RunArgs};
use privstack_relay::{Config, Server};
use tokio::sync::{mpsc, oneshot};

pub const WAIT: Duration = Duration::from_secs(60);

/// A relay in this process on ports picked by the OS.
pub async fn spawn_relay(tweak: impl FnOnce(&mut RunArgs)) -> Server {
    let mut args = RunArgs {
        port: 0,
        http_port: 0,
        metrics_address: MetricsAddress(Some("127.0.0.1:0".parse().unwrap())),
        ..RunArgs::default()
    };
    tweak(&mut args);
    let config = Config::try_from(&args).expect("valid test config");
    Server::spawn(libp2p::identity::Keypair::generate_ed25519(), config)
        .await
        .expect("relay starts")
}

#[derive(NetworkBehaviour)]
pub struct ClientBehaviour {
    pub relay_client: relay::client::Behaviour,
    pub identify: identify::Behaviour,
    pub kad: kad::Behaviour<MemoryStore>,
    pub ping: ping::Behaviour,
    pub stream: libp2p_stream::Behaviour,
}

pub type ClientEvent = SwarmEvent<ClientBehaviourEvent>;
type Cmd = Box<dyn FnOnce(&mut Swarm<ClientBehaviour>) + Send>;

/// A PrivStack-like client: QUIC only, Kademlia in server mode on the default protocol,
/// identify, ping, the relay client (noise + yamux over circuits) and raw streams.
pub struct TestClient {
    pub peer_id: PeerId,
    pub control: libp2p_stream::Control,
    cmds: mpsc::UnboundedSender<Cmd>,
    events: mpsc::UnboundedReceiver<ClientEvent>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestClient {
    /// A client listening on `ip` (a 127.0.0.0/8 address, so many clients look like
    /// many hosts to the relay's per-IP limits), or not listening at all.
    pub async fn new(listen: Option<Ipv4Addr>) -> Self {
        let mut swarm = SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_quic()
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .unwrap()
            .with_behaviour(|key, relay_client| {
                let peer_id = key.public().to_peer_id();
                let mut kad = kad::Behaviour::new(peer_id, MemoryStore::new(peer_id));
                kad.set_mode(Some(kad::Mode::Server));
                ClientBehaviour {
                    relay_client,
                    identify: identify::Behaviour::new(identify::Config::new(
                        "/privstack/1.0.0".into(),
                        key.public(),
                    )),
                    kad,
                    ping: ping::Behaviour::default(),
                    stream: libp2p_stream::Behaviour::new(),
                }
            })
            .unwrap()
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();
        let peer_id = *swarm.local_peer_id();
        let control = swarm.behaviour().stream.new_control();
        if let Some(ip) = listen {
            let addr = Multiaddr::empty()
                .with(Protocol::Ip4(ip))
                .with(Protocol::Udp(0))
                .with(Protocol::QuicV1);
            swarm.listen_on(addr).unwrap();
            loop {
                if let SwarmEvent::NewListenAddr { .. } = swarm.select_next_some().await {
                    break;
                }
            }
        }
        let (cmds, mut cmd_rx) = mpsc::unbounded_channel::<Cmd>();
        let (ev_tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    cmd = cmd_rx.recv() => match cmd {
                        Some(cmd) => cmd(&mut swarm),
                        None => break,
                    },
                    ev = swarm.select_next_some() => { let _ = ev_tx.send(ev); }
                }
            }
        });
        Self {
            peer_id,
            control,
            cmds,
            events,
            task,
        }
    }

    /// Run `f` on the swarm inside its task and return the result.
    pub async fn with<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Swarm<ClientBehaviour>) -> R + Send + 'static,
    ) -> R {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Box::new(move |s| {
                let _ = tx.send(f(s));
            }))
            .expect("client task alive");
        rx.await.expect("client task alive")
    }

    /// Consume events until `f` returns `Some`, failing the test after [`WAIT`].
    pub async fn wait<T>(&mut self, what: &str, f: impl FnMut(ClientEvent) -> Option<T>) -> T {
        self.wait_within(WAIT, f)
            .await
            .unwrap_or_else(|| panic!("timed out waiting for {what}"))
    }

    /// Consume events until `f` returns `Some`, or `None` after `limit`.
    pub async fn wait_within<T>(
        &mut self,
        limit: Duration,
        mut f: impl FnMut(ClientEvent) -> Option<T>,
    ) -> Option<T> {
        let fut = async {
            loop {
                let ev = self.events.recv().await.expect("client task alive");
                if let Some(t) = f(ev) {
                    return t;
                }
            }
        };
        tokio::time::timeout(limit, fut).await.ok()
    }

    /// Dial `addr` (ending in /p2p/<peer>) and wait until connected and identified.
    pub async fn connect(&mut self, addr: Multiaddr) -> identify::Info {
        let Some(Protocol::P2p(peer)) = addr.iter().last() else {
            panic!("{addr} has no /p2p/");
        };
        self.with(move |s| s.dial(addr)).await.expect("dial starts");
        self.wait("identify from the dialed peer", |ev| match ev {
            SwarmEvent::Behaviour(ClientBehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) if peer_id == peer => Some(info),
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(p),
                error,
                ..
            } if p == peer => panic!("dial {peer} failed: {error}"),
            _ => None,
        })
        .await
    }

    /// Join the DHT through `relay`, as PrivStack clients do.
    pub async fn bootstrap_via(&mut self, relay: Multiaddr) {
        let Some(Protocol::P2p(peer)) = relay.iter().last() else {
            panic!("{relay} has no /p2p/");
        };
        let mut plain = relay.clone();
        plain.pop();
        self.with(move |s| {
            s.behaviour_mut().kad.add_address(&peer, plain);
        })
        .await;
        self.connect(relay).await;
        let id = self
            .with(|s| s.behaviour_mut().kad.bootstrap().expect("has a peer"))
            .await;
        self.wait("kademlia bootstrap", |ev| match ev {
            SwarmEvent::Behaviour(ClientBehaviourEvent::Kad(
                kad::Event::OutboundQueryProgressed {
                    id: qid,
                    result: kad::QueryResult::Bootstrap(_),
                    step,
                    ..
                },
            )) if qid == id && step.last => Some(()),
            _ => None,
        })
        .await;
    }

    pub async fn put_record(&mut self, record: kad::Record) -> Result<(), kad::PutRecordError> {
        self.put_record_within(record, WAIT)
            .await
            .expect("timed out waiting for the put_record result")
    }

    /// `put_record` (`Quorum::One`), or `None` if it has no result within `limit`.
    pub async fn put_record_within(
        &mut self,
        record: kad::Record,
        limit: Duration,
    ) -> Option<Result<(), kad::PutRecordError>> {
        let id = self
            .with(move |s| {
                s.behaviour_mut()
                    .kad
                    .put_record(record, kad::Quorum::One)
                    .expect("record stored locally")
            })
            .await;
        self.wait_within(limit, |ev| match ev {
            SwarmEvent::Behaviour(ClientBehaviourEvent::Kad(
                kad::Event::OutboundQueryProgressed {
                    id: qid,
                    result: kad::QueryResult::PutRecord(r),
                    ..
                },
            )) if qid == id => Some(r.map(|_| ())),
            _ => None,
        })
        .await
    }

    /// All records found for `key` (empty if none).
    pub async fn get_record(&mut self, key: kad::RecordKey) -> Vec<kad::PeerRecord> {
        self.get_record_within(key, WAIT)
            .await
            .expect("timed out waiting for get_record progress")
    }

    /// `get_record`, or `None` if the query makes no progress within `limit`.
    pub async fn get_record_within(
        &mut self,
        key: kad::RecordKey,
        limit: Duration,
    ) -> Option<Vec<kad::PeerRecord>> {
        let id = self
            .with(move |s| s.behaviour_mut().kad.get_record(key))
            .await;
        let mut found = Vec::new();
        loop {
            let (res, last) = self
                .wait_within(limit, |ev| match ev {
                    SwarmEvent::Behaviour(ClientBehaviourEvent::Kad(
                        kad::Event::OutboundQueryProgressed {
                            id: qid,
                            result: kad::QueryResult::GetRecord(r),
                            step,
                            ..
                        },
                    )) if qid == id => Some((r, step.last)),
                    _ => None,
                })
                .await?;
            if let Ok(kad::GetRecordOk::FoundRecord(r)) = res {
                found.push(r);
                // One is enough; stop the query rather than wait out its timeout.
                self.with(move |s| {
                    if let Some(mut q) = s.behaviour_mut().kad.query_mut(&id) {
                        q.finish();
                    }
                })
                .await;
                return Some(found);
            }
            if last {
                return Some(found);
            }
        }
    }

    /// Peers the DHT returns as closest to `key`, with the query's statistics (how
    /// many peers it contacted and how many of those failed).
    pub async fn closest_peers(&mut self, key: PeerId) -> (Vec<PeerId>, kad::QueryStats) {
        let id = self
            .with(move |s| s.behaviour_mut().kad.get_closest_peers(key))
            .await;
        self.wait("get_closest_peers result", |ev| match ev {
            SwarmEvent::Behaviour(ClientBehaviourEvent::Kad(
                kad::Event::OutboundQueryProgressed {
                    id: qid,
                    result: kad::QueryResult::GetClosestPeers(r),
                    step,
                    stats,
                },
            )) if qid == id && step.last => Some((
                match r {
                    Ok(ok) => ok.peers.into_iter().map(|p| p.peer_id).collect(),
                    Err(kad::GetClosestPeersError::Timeout { peers, .. }) => {
                        peers.into_iter().map(|p| p.peer_id).collect()
                    }
                },
                stats,
            )),
            _ => None,
        })
        .await
    }
}

/// A `Limit` a client was told, as (duration, data); `None`: none announced.
pub type SeenLimit = Option<(Option<Duration>, Option<u64>)>;

impl TestClient {
    /// Connect to the relay and reserve a slot there (`listen_on .../p2p-circuit`);
    /// returns the relayed addresses built from the reservation's relay addresses, or
    /// the reason the relay refused.
    pub async fn reserve(&mut self, relay_addr: &Multiaddr) -> Result<Vec<Multiaddr>, String> {
        self.reserve_with_limit(relay_addr).await.map(|(a, _)| a)
    }

    /// [`Self::reserve`], also returning the limit the reservation announced.
    pub async fn reserve_with_limit(
        &mut self,
        relay_addr: &Multiaddr,
    ) -> Result<(Vec<Multiaddr>, SeenLimit), String> {
        let Some(Protocol::P2p(relay)) = relay_addr.iter().last() else {
            panic!("{relay_addr} has no /p2p/");
        };
        self.connect(relay_addr.clone()).await;
        let circuit = relay_addr.clone().with(Protocol::P2pCircuit);
        let listener = self.with(move |s| s.listen_on(circuit)).await.unwrap();
        let mut accepted = None;
        let mut addrs = Vec::new();
        while accepted.is_none() || addrs.is_empty() {
            let ev = self
                .wait("reservation outcome", |ev| match ev {
                    SwarmEvent::Behaviour(ClientBehaviourEvent::RelayClient(
                        relay::client::Event::ReservationReqAccepted {
                            relay_peer_id,
                            limit,
                            ..
                        },
                    )) if relay_peer_id == relay => {
                        Some(Ok(Err(limit.map(|l| (l.duration(), l.data_in_bytes())))))
                    }
                    SwarmEvent::NewListenAddr {
                        listener_id,
                        address,
                    } if listener_id == listener => Some(Ok(Ok(address))),
                    SwarmEvent::ListenerClosed {
                        listener_id,
                        reason,
                        ..
                    } if listener_id == listener => Some(Err(format!("{reason:?}"))),
                    _ => None,
                })
                .await?;
            match ev {
                Err(limit) => accepted = Some(limit),
                Ok(a) => addrs.push(a),
            }
        }
        Ok((addrs, accepted.flatten()))
    }

    /// Dial `target` through the relay's circuit; returns the connection's endpoint.
    pub async fn dial_via_circuit(
        &mut self,
        relay_addr: &Multiaddr,
        target: PeerId,
    ) -> libp2p::core::ConnectedPoint {
        match self.try_dial_via_circuit(relay_addr, target).await {
            Ok((endpoint, _)) => endpoint,
            Err(e) => panic!("relayed dial failed: {e}"),
        }
    }

    /// Open a new circuit to `target` (also when connected already); returns the
    /// connection's endpoint and the limit the circuit announced, or why it failed.
    pub async fn try_dial_via_circuit(
        &mut self,
        relay_addr: &Multiaddr,
        target: PeerId,
    ) -> Result<(libp2p::core::ConnectedPoint, SeenLimit), String> {
        use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
        let addr = relay_addr
            .clone()
            .with(Protocol::P2pCircuit)
            .with(Protocol::P2p(target));
        let opts = DialOpts::peer_id(target)
            .addresses(vec![addr])
            .condition(PeerCondition::Always)
            .build();
        let id = opts.connection_id();
        self.with(move |s| s.dial(opts)).await.unwrap();
        let (mut endpoint, mut limit) = (None, None);
        while endpoint.is_none() || limit.is_none() {
            match self
                .wait("relayed connection", |ev| match ev {
                    SwarmEvent::ConnectionEstablished {
                        connection_id,
                        endpoint,
                        ..
                    } if connection_id == id => Some(Ok(Ok(endpoint))),
                    SwarmEvent::Behaviour(ClientBehaviourEvent::RelayClient(
                        relay::client::Event::OutboundCircuitEstablished { limit, .. },
                    )) => Some(Ok(Err(limit.map(|l| (l.duration(), l.data_in_bytes()))))),
                    SwarmEvent::OutgoingConnectionError {
                        connection_id,
                        error,
                        ..
                    } if connection_id == id => Some(Err(error.to_string())),
                    _ => None,
                })
                .await?
            {
                Ok(e) => endpoint = Some(e),
                Err(l) => limit = Some(l),
            }
        }
        Ok((endpoint.unwrap(), limit.flatten()))
    }

    /// Dial `addr` (ending in /p2p/<peer>): `Ok` once identified, `Err` if the peer
    /// refuses or closes the connection first.
    pub async fn try_connect(&mut self, addr: Multiaddr) -> Result<(), String> {
        use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
        let Some(Protocol::P2p(peer)) = addr.iter().last() else {
            panic!("{addr} has no /p2p/");
        };
        let opts = DialOpts::peer_id(peer)
            .addresses(vec![addr])
            .condition(PeerCondition::Always)
            .build();
        let id = opts.connection_id();
        self.with(move |s| s.dial(opts)).await.expect("dial starts");
        self.wait("identify or refusal", |ev| match ev {
            SwarmEvent::Behaviour(ClientBehaviourEvent::Identify(identify::Event::Received {
                connection_id,
                ..
            })) if connection_id == id => Some(Ok(())),
            SwarmEvent::ConnectionClosed {
                connection_id,
                cause,
                ..
            } if connection_id == id => Some(Err(format!("closed: {cause:?}"))),
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                error,
                ..
            } if connection_id == id => Some(Err(error.to_string())),
            _ => None,
        })
        .await
    }
}

/// B opens a stream to A over their (relayed) connection and sends `size` random
/// bytes; A reads them all and sends `size` others back. Both sides check the length
/// and SHA-256 of what they received.
pub async fn exchange_through_circuit(a: &mut TestClient, b: &mut TestClient, size: usize) {
    use futures::{AsyncReadExt, AsyncWriteExt};
    use sha2::Digest;
    let mut incoming = a.control.accept(TRANSFER_PROTOCOL).unwrap();
    let a_id = a.peer_id;
    let data = |seed: u8| -> Vec<u8> {
        use rand::{RngCore, SeedableRng};
        let mut v = vec![0u8; size];
        rand::rngs::StdRng::from_seed([seed; 32]).fill_bytes(&mut v);
        v
    };
    let (to_a, to_b) = (data(1), data(2));
    let (to_a_hash, to_b_hash) = (sha2::Sha256::digest(&to_a), sha2::Sha256::digest(&to_b));

    // A: read everything B sends, then send its own payload back.
    let a_side = tokio::spawn(async move {
        let (peer, mut stream) = incoming.next().await.unwrap();
        let mut got = Vec::with_capacity(size);
        stream.read_to_end(&mut got).await.unwrap();
        stream.write_all(&to_b).await.unwrap();
        stream.close().await.unwrap();
        (peer, sha2::Sha256::digest(&got), got.len())
    });
    let mut control = b.control.clone();
    let b_side = tokio::spawn(async move {
        let mut stream = control.open_stream(a_id, TRANSFER_PROTOCOL).await.unwrap();
        stream.write_all(&to_a).await.unwrap();
        stream.close().await.unwrap();
        let mut got = Vec::with_capacity(size);
        stream.read_to_end(&mut got).await.unwrap();
        (sha2::Sha256::digest(&got), got.len())
    });
    let limit = Duration::from_secs(600);
    let (peer, a_got, a_len) = tokio::time::timeout(limit, a_side).await.unwrap().unwrap();
    let (b_got, b_len) = tokio::time::timeout(limit, b_side).await.unwrap().unwrap();
    assert_eq!(peer, b.peer_id);
    assert_eq!(a_len, size);
    assert_eq!(b_len, size);
    assert_eq!(a_got, to_a_hash, "B→A payload intact");
    assert_eq!(b_got, to_b_hash, "A→B payload intact");
}

/// The relay binary, started as an operator would, after `prefix` (e.g. `ip netns exec
/// NS`, or nothing), on UDP port `port` with its key in a new temporary directory and
/// `args` added; killed and cleaned up on drop.
pub struct RelayBinary {
    pub child: std::process::Child,
    pub peer_id: PeerId,
    dir: std::path::PathBuf,
}

impl RelayBinary {
    pub fn start(prefix: &[&str], bin: &str, port: u16, args: &[String]) -> RelayBinary {
        use std::io::{BufRead, BufReader};
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("privstack-bin-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cmd, pre) = match prefix.split_first() {
            Some((cmd, rest)) => (*cmd, rest.iter().map(|s| s.to_string()).collect()),
            None => (bin, Vec::new()),
        };
        let mut command = std::process::Command::new(cmd);
        command.args(pre);
        if !prefix.is_empty() {
            command.arg(bin);
        }
        let mut child = command
            .args(["--port", &port.to_string(), "--http-port", "0"])
            .arg("--identity")
            .arg(dir.join("key"))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("relay binary starts");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let peer_id = stdout
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("  PeerId: ").map(|s| s.parse().unwrap()))
            .expect("relay prints its peer ID");
        RelayBinary {
            child,
            peer_id,
            dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RelayBinary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free UDP port on 127.0.0.1.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// PrivStack's record key: `/privstack/syncgroup/` + SHA-256(normalised sync code).
pub fn syncgroup_key(code: &str) -> kad::RecordKey {
    use sha2::Digest;
    let mut key = b"/privstack/syncgroup/".to_vec();
    key.extend_from_slice(&sha2::Sha256::digest(code.as_bytes()));
    kad::RecordKey::new(&key)
}

pub const TRANSFER_PROTOCOL: StreamProtocol = StreamProtocol::new("/privstack-test/transfer/1");

/// Value of a metric line `name value` in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok())?
    })
}

pub async fn fetch_metrics(server: &Server) -> String {
    let resp = privstack_relay::client::request(
        "GET",
        &format!(
            "http://{}/metrics",
            server.metrics_addr().expect("metrics are served")
        ),
        WAIT,
    )
    .await
    .unwrap();
    assert_eq!(resp.status, 200);
    String::from_utf8(resp.body).unwrap()
}

/// Poll `/metrics` until `name` satisfies `ok`, failing after [`WAIT`].
pub async fn wait_metric(server: &Server, name: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = fetch_metrics(server).await;
        if let Some(v) = metric(&text, name).filter(|v| ok(*v)) {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("metric {name} never reached the expected value:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
