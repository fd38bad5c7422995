//! Load generator: thousands of real rust-libp2p clients in one process against one relay.
//!
//!   cargo bench --bench load -- <scenario> --relay /ip4/127.0.0.1/udp/<port>/quic-v1/p2p/<id> \
//!       [--pid <relay pid>] [options]
//!
//! Scenarios (each client is a full swarm: QUIC, identify, the relay client, raw streams,
//! Kademlia for `dht`; each binds its own 127.0.0.0/8 address so the relay's per-IP rate
//! limits see separate hosts):
//!
//! - `reservations`: `--clients` N clients connect, identify and reserve a slot, at most
//!   `--concurrency` setting up at once, then hold their reservations for `--hold` seconds.
//! - `circuits`: `--clients` C listeners reserve; C dialers connect to the relay, then each
//!   opens a circuit to its listener and moves `--payload` bytes (at most `--concurrency`
//!   circuits open at once). Circuits/s counts from the first circuit dial to the last echo.
//! - `bulk`: one pair moves `--mib` MiB directly, then the same amount through a circuit.
//! - `dht`: `--clients` M clients each store `--records` PrivStack records on the relay
//!   (`/privstack/syncgroup/` + SHA-256 keys, JSON values), then each reads back records
//!   another client stored.
//! - `churn`: `--concurrency` workers connect, reserve and disconnect in a loop for
//!   `--seconds`, then the relay's RSS is followed until it is back within 10% of idle
//!   (or `--settle` seconds pass).
//! - `flood`: `--clients` clients of one host (one address) reserve, `--concurrency` at a
//!   time, while 50 honest clients, each its own host, reserve too; reports what the
//!   flood got and the honest clients' failures and latency.
//! - `fleet`: the workload of today's PrivStack devices (SPEC §3). `--clients` devices
//!   (no relay client, Kademlia server mode, identify without listen addresses, as the
//!   relay sees a device behind a NAT) connect, `--concurrency` at a time, and
//!   store their sync-group record (pairs of devices share a code); from then on each
//!   does, every `--period` seconds, a `get_record` of its group and a `put_record` of
//!   its own, and the rounds started in the `--seconds` after the last device came
//!   online are the figures; then all hold their connections `--rest` seconds (packets
//!   counted) and leave, and the relay's RSS is followed for `--settle` seconds.
//!
//! `reservations` and `fleet` run past one process's descriptor budget (or `--per-process`
//! clients) in child processes of the same binary, which report back on stdout.
//!
//! With `--pid`, the relay's RSS and CPU seconds are read from /proc. Progress goes to
//! stderr; the last line on stdout is one JSON object with the figures, which
//! `benches/compare.py` collects. The exit status is non-zero if any operation failed.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, ValueEnum};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::core::ConnectedPoint;
use libp2p::kad::store::MemoryStore;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder, identify, kad, noise, relay, yamux,
};
use serde_json::json;
use tokio::sync::{Semaphore, mpsc, watch};

// The relay's allocator, for the generator too: each device's QUIC endpoint callocs a
// receive buffer of about 3 MiB (quinn: 32 batches of 64 GRO segments), which glibc
// serves from its arenas once its mmap threshold has risen, zeroing (and so keeping
// resident) all of it: 1.3 MiB of generator RSS per device, too much for 20,000 on one
// machine. jemalloc maps such buffers fresh and they stay mostly untouched.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Longest any single step (handshake, reservation, circuit, request) may take before it
/// counts as a failure.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Protocol the clients move payloads on (an echo of the byte count comes back).
const TRANSFER: StreamProtocol = StreamProtocol::new("/privstack-bench/transfer/1");

/// Write size for payloads.
const CHUNK: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Reservations,
    Circuits,
    Bulk,
    Dht,
    Churn,
    Flood,
    Fleet,
}

#[derive(Parser, Debug)]
#[command(
    about = "Load a privstack-relay (or any circuit relay v2 + Kademlia server) with real libp2p clients"
)]
struct Args {
    /// What to measure.
    #[arg(value_enum)]
    scenario: Scenario,
    /// The relay's QUIC address, ending in /p2p/<peer id>.
    #[arg(long)]
    relay: Multiaddr,
    /// The relay's process ID, to read its RSS and CPU time from /proc.
    #[arg(long)]
    pid: Option<u32>,
    /// Clients (reservations), pairs (circuits) or DHT clients (dht).
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Setups in flight at once (reservations, dht), circuits open at once (circuits),
    /// workers (churn).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// reservations: seconds to hold all reservations after the last one is accepted.
    #[arg(long, default_value_t = 5)]
    hold: u64,
    /// circuits: bytes each dialer sends through its circuit.
    #[arg(long, default_value_t = 64 * 1024)]
    payload: usize,
    /// bulk: MiB moved directly and then relayed.
    #[arg(long, default_value_t = 1024)]
    mib: usize,
    /// dht: records each client stores.
    #[arg(long, default_value_t = 500)]
    records: usize,
    /// dht: records each client reads back.
    #[arg(long, default_value_t = 50)]
    gets: usize,
    /// churn: seconds of connect/reserve/disconnect; fleet: seconds of operations.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// fleet: seconds between one device's rounds (a get, then a put), as PrivStack's 30.
    #[arg(long, default_value_t = 30)]
    period: u64,
    /// fleet: seconds at rest after the operations (connections held, nothing asked),
    /// over which the packets per device are counted.
    #[arg(long, default_value_t = 20)]
    rest: u64,
    /// churn: rounds of `--seconds` each; the relay's RSS is read after every round, so
    /// memory that grows with the number of peers ever seen shows as a rising series.
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// churn, fleet: seconds to wait for the relay's RSS to come back within 10% of idle.
    #[arg(long, default_value_t = 60)]
    settle: u64,
    /// First client address; clients count up from the next address.
    #[arg(long, default_value = "127.1.0.0")]
    ip_base: Ipv4Addr,
    /// reservations, fleet: clients (devices) per generator process; the rest run in
    /// child processes. Default: what the descriptor limit allows (about 10,000 here).
    #[arg(long)]
    per_process: Option<usize>,
    /// reservations, fleet: run as a helper of another generator process (internal).
    #[arg(long, hide = true)]
    child: bool,
    /// fleet --child: number of the first device (internal).
    #[arg(long, hide = true, default_value_t = 0)]
    first: usize,
    /// fleet --child: the run's tag in the sync codes (internal).
    #[arg(long, hide = true)]
    run: Option<String>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(NetworkBehaviour)]
struct Client {
    relay: Toggle<relay::client::Behaviour>,
    identify: identify::Behaviour,
    kad: Toggle<kad::Behaviour<MemoryStore>>,
    stream: libp2p_stream::Behaviour,
}

type Event = SwarmEvent<ClientEvent>;

/// The relay under test: its address and peer ID.
#[derive(Clone)]
struct Relay {
    addr: Multiaddr,
    peer: PeerId,
}

impl Relay {
    fn circuit(&self) -> Multiaddr {
        self.addr.clone().with(Protocol::P2pCircuit)
    }
    fn circuit_to(&self, target: PeerId) -> Multiaddr {
        self.circuit().with(Protocol::P2p(target))
    }
}

/// What a load client runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A circuit relay client (reservations, circuits, churn, flood).
    Relay,
    /// A relay client that also asks the relay's Kademlia (dht).
    Dht,
    /// A PrivStack device as shipped (SPEC §3): no relay client, Kademlia in server
    /// mode, identify `/privstack/sync/1.0.0` with its listen addresses (fleet).
    Device,
}

/// A client listening on its own loopback address (dials to the relay leave from it).
async fn client(ip: Ipv4Addr, kind: Kind) -> Result<Swarm<Client>> {
    let mut swarm = SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_quic()
        .with_relay_client(noise::Config::new, yamux::Config::default)?
        .with_behaviour(|key, relay| {
            let id = key.public().to_peer_id();
            let kad = (kind != Kind::Relay).then(|| {
                let mut cfg = kad::Config::new(kad::PROTOCOL_NAME);
                // Devices bootstrap every 5 min; a walk would dial other devices, which
                // behind their NATs they cannot, so the fleet leaves it out.
                cfg.set_periodic_bootstrap_interval(None);
                cfg.set_query_timeout(Duration::from_secs(60));
                let mut k = kad::Behaviour::with_config(id, MemoryStore::new(id), cfg);
                // dht: records live on the relay and clients only ask; devices force
                // server mode, as PrivStack does even behind a NAT.
                k.set_mode(Some(if kind == Kind::Device {
                    kad::Mode::Server
                } else {
                    kad::Mode::Client
                }));
                k
            });
            let protocol = if kind == Kind::Device {
                "/privstack/sync/1.0.0"
            } else {
                "/privstack/1.0.0"
            };
            // A device's identify hides its listen address: behind its NAT a device
            // announces LAN addresses from an internet connection, which the relay never
            // hands out (README, "Routing policy"); here its loopback address would be
            // handed to every other device, and devices would dial each other.
            let identify = identify::Config::new(protocol.into(), key.public())
                .with_hide_listen_addrs(kind == Kind::Device);
            Client {
                // The transport is there either way (it is invisible to the relay); a
                // device has no relay client behaviour, so none is announced.
                relay: (kind != Kind::Device).then_some(relay).into(),
                identify: identify::Behaviour::new(identify),
                kad: kad.into(),
                stream: libp2p_stream::Behaviour::new(),
            }
        })?
        .with_swarm_config(|c| {
            // A device keeps its one connection to the relay for as long as it is online.
            c.with_idle_connection_timeout(if kind == Kind::Device {
                Duration::from_secs(24 * 3600)
            } else {
                Duration::from_secs(60)
            })
        })
        .build();
    let addr = Multiaddr::empty()
        .with(Protocol::Ip4(ip))
        .with(Protocol::Udp(0))
        .with(Protocol::QuicV1);
    swarm
        .listen_on(addr)
        .with_context(|| format!("listen on {ip}"))?;
    until(&mut swarm, "listen address", |ev| match ev {
        SwarmEvent::NewListenAddr { .. } => Some(Ok(())),
        SwarmEvent::ListenerError { error, .. } => Some(Err(anyhow!("listen on {ip}: {error}"))),
        _ => None,
    })
    .await?;
    Ok(swarm)
}

/// Drive the swarm until `f` decides, or fail after [`STEP_TIMEOUT`].
async fn until<T>(
    swarm: &mut Swarm<Client>,
    what: &str,
    mut f: impl FnMut(Event) -> Option<Result<T>>,
) -> Result<T> {
    let wait = async {
        loop {
            if let Some(r) = f(swarm.select_next_some().await) {
                return r;
            }
        }
    };
    tokio::time::timeout(STEP_TIMEOUT, wait)
        .await
        .map_err(|_| anyhow!("timed out waiting for {what}"))?
}

/// Run `work` while driving the swarm (streams need the swarm polled), with a timeout.
async fn drive<T>(
    swarm: &mut Swarm<Client>,
    what: &str,
    timeout: Duration,
    work: impl Future<Output = Result<T>>,
) -> Result<T> {
    let work = tokio::time::timeout(timeout, work);
    tokio::pin!(work);
    loop {
        tokio::select! {
            r = &mut work => return r.map_err(|_| anyhow!("timed out: {what}"))?,
            _ = swarm.select_next_some() => {}
        }
    }
}

/// Dial the relay and wait until it has identified itself.
async fn connect(swarm: &mut Swarm<Client>, relay: &Relay) -> Result<()> {
    swarm.dial(relay.addr.clone())?;
    let peer = relay.peer;
    until(swarm, "identify from the relay", |ev| match ev {
        SwarmEvent::Behaviour(ClientEvent::Identify(identify::Event::Received {
            peer_id, ..
        })) if peer_id == peer => Some(Ok(())),
        SwarmEvent::OutgoingConnectionError { error, .. } => {
            Some(Err(anyhow!("dial relay: {error}")))
        }
        SwarmEvent::ConnectionClosed { peer_id, cause, .. } if peer_id == peer => {
            Some(Err(anyhow!("relay closed the connection: {cause:?}")))
        }
        _ => None,
    })
    .await
}

/// Reserve a slot on the relay (already connected).
async fn reserve(swarm: &mut Swarm<Client>, relay: &Relay) -> Result<()> {
    let listener = swarm.listen_on(relay.circuit())?;
    until(swarm, "reservation", |ev| match ev {
        SwarmEvent::Behaviour(ClientEvent::Relay(
            relay::client::Event::ReservationReqAccepted { .. },
        )) => Some(Ok(())),
        SwarmEvent::ListenerClosed {
            listener_id,
            reason,
            ..
        } if listener_id == listener => Some(Err(anyhow!("reservation refused: {reason:?}"))),
        _ => None,
    })
    .await
}

/// Disconnect from `peer` and wait until the connection is gone.
async fn disconnect(swarm: &mut Swarm<Client>, peer: PeerId) -> Result<()> {
    if swarm.disconnect_peer_id(peer).is_err() {
        return Ok(());
    }
    until(swarm, "connection close", |ev| match ev {
        SwarmEvent::ConnectionClosed {
            peer_id,
            num_established: 0,
            ..
        } if peer_id == peer => Some(Ok(())),
        _ => None,
    })
    .await
}

/// Answer transfers on `swarm` forever: read to EOF, reply with the byte count.
async fn serve(mut swarm: Swarm<Client>) {
    let mut incoming = swarm
        .behaviour()
        .stream
        .new_control()
        .accept(TRANSFER)
        .expect("one acceptor");
    loop {
        tokio::select! {
            Some((_, mut s)) = incoming.next() => {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; CHUNK];
                    let mut total = 0u64;
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) => break,
                            Ok(n) => total += n as u64,
                            Err(_) => return,
                        }
                    }
                    let _ = s.write_all(&total.to_be_bytes()).await;
                    let _ = s.close().await;
                });
            }
            _ = swarm.select_next_some() => {}
        }
    }
}

/// Send `bytes` to `target` on a new stream and wait for its count to come back.
async fn transfer(mut control: libp2p_stream::Control, target: PeerId, bytes: usize) -> Result<()> {
    let mut s = control
        .open_stream(target, TRANSFER)
        .await
        .map_err(|e| anyhow!("open stream: {e}"))?;
    let chunk = vec![0x5au8; CHUNK.min(bytes.max(1))];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n]).await.context("write")?;
        left -= n;
    }
    s.close().await.context("close")?;
    let mut echo = [0u8; 8];
    s.read_exact(&mut echo).await.context("read echo")?;
    let got = u64::from_be_bytes(echo);
    if got != bytes as u64 {
        bail!("peer received {got} of {bytes} bytes");
    }
    Ok(())
}

/// Open a circuit to `target` through the relay; returns when it is established.
async fn dial_circuit(swarm: &mut Swarm<Client>, relay: &Relay, target: PeerId) -> Result<()> {
    swarm.dial(relay.circuit_to(target))?;
    until(swarm, "circuit", |ev| match ev {
        SwarmEvent::ConnectionEstablished {
            peer_id, endpoint, ..
        } if peer_id == target => Some(
            if endpoint
                .get_remote_address()
                .iter()
                .any(|p| p == Protocol::P2pCircuit)
            {
                Ok(())
            } else {
                Err(anyhow!("connected to {target} without the relay"))
            },
        ),
        SwarmEvent::OutgoingConnectionError { error, .. } => {
            Some(Err(anyhow!("circuit dial: {error}")))
        }
        _ => None,
    })
    .await
}

// ----- figures -------------------------------------------------------------------------

/// RSS (KiB) and CPU seconds of a process, from /proc.
#[derive(Clone, Copy, Default)]
struct Sample {
    rss_kib: u64,
    hwm_kib: u64,
    cpu_s: f64,
}

fn sample(pid: Option<u32>) -> Option<Sample> {
    let pid = pid?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().ok()? + fields[12].parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(Sample {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
        cpu_s: ticks / hz,
    })
}

/// Latencies in milliseconds: p50 and p99.
fn percentiles(mut ms: Vec<f64>) -> (f64, f64) {
    if ms.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
    (at(0.50), at(0.99))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Client addresses: `base` + 1 + i, so every client is its own host to the relay
/// (or, [`Addrs::one_host`], all the same address).
struct Addrs {
    base: u32,
    next: AtomicU32,
    step: u32,
}

impl Addrs {
    fn new(base: Ipv4Addr) -> Self {
        Self {
            base: u32::from(base),
            next: AtomicU32::new(0),
            step: 1,
        }
    }
    /// Every client on `base` + 1: one host behind one IP.
    fn one_host(base: Ipv4Addr) -> Self {
        Self {
            step: 0,
            ..Self::new(base)
        }
    }
    fn take(&self) -> Ipv4Addr {
        // Stay inside one /16 so a long churn run wraps rather than leaving 127/8.
        let i = self.next.fetch_add(1, Ordering::Relaxed) % 65_534;
        Ipv4Addr::from(self.base + 1 + i * self.step)
    }
}

/// Failure messages, counted by kind, for the report.
#[derive(Default)]
struct Failures(std::sync::Mutex<std::collections::BTreeMap<String, usize>>);

impl Failures {
    fn add(&self, what: &str, e: &anyhow::Error) {
        let msg = format!("{what}: {e:#}");
        let mut m = self.0.lock().unwrap();
        if m.is_empty() {
            eprintln!("first failure: {msg}");
        }
        *m.entry(msg).or_default() += 1;
    }
    fn count(&self) -> usize {
        self.0.lock().unwrap().values().sum()
    }
    fn json(&self) -> serde_json::Value {
        let m = self.0.lock().unwrap();
        let mut top: Vec<_> = m.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1));
        json!(
            top.iter()
                .take(5)
                .map(|(k, v)| json!({"count": v, "error": k}))
                .collect::<Vec<_>>()
        )
    }
}

// ----- scenarios -----------------------------------------------------------------------

/// Start `n` clients that connect, reserve and hold their reservation until `stop`;
/// each reports its setup time (or `None` on failure) on the returned channel.
fn hold_clients(
    n: usize,
    concurrency: usize,
    addrs: Arc<Addrs>,
    relay: &Relay,
    failures: &Arc<Failures>,
    lost: &Arc<AtomicUsize>,
    stop: &watch::Receiver<bool>,
) -> mpsc::UnboundedReceiver<Option<Duration>> {
    let gate = Arc::new(Semaphore::new(concurrency));
    let (done_tx, done) = mpsc::unbounded_channel::<Option<Duration>>();
    for _ in 0..n {
        let (relay, addrs, gate, failures, lost) = (
            relay.clone(),
            addrs.clone(),
            gate.clone(),
            failures.clone(),
            lost.clone(),
        );
        let (mut stop, done_tx) = (stop.clone(), done_tx.clone());
        tokio::spawn(async move {
            let permit = gate.acquire_owned().await.unwrap();
            let setup = async {
                let mut swarm = client(addrs.take(), Kind::Relay).await?;
                let t = Instant::now();
                connect(&mut swarm, &relay).await?;
                reserve(&mut swarm, &relay).await?;
                anyhow::Ok((swarm, t.elapsed()))
            };
            let mut swarm = match setup.await {
                Ok((swarm, took)) => {
                    let _ = done_tx.send(Some(took));
                    swarm
                }
                Err(e) => {
                    failures.add("setup", &e);
                    let _ = done_tx.send(None);
                    return;
                }
            };
            drop(permit);
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    ev = swarm.select_next_some() => match ev {
                        SwarmEvent::ConnectionClosed { peer_id, num_established: 0, cause, .. }
                            if peer_id == relay.peer => {
                            failures.add("hold", &anyhow!("relay connection closed: {cause:?}"));
                            lost.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        _ => {}
                    }
                }
            }
            // Hold the swarm (and its connection) until the scenario ends.
            let _ = stop.wait_for(|s| *s).await;
        });
    }
    done
}

/// Clients one process can hold: `--per-process` if given, else what the descriptor
/// limit allows (libp2p-quic keeps two descriptors per listening client: its socket and
/// a clone for hole punching, and the limit may be fixed).
fn clients_per_process(args: &Args) -> usize {
    if let Some(n) = args.per_process {
        return n.max(1);
    }
    // SAFETY: getrlimit with a valid pointer to a local struct.
    let soft = unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur
    };
    (soft.saturating_sub(256) / 2).clamp(1, 100_000) as usize
}

/// How `--clients` are spread over generator processes: this one runs the first
/// `share`, child `k` the `k`-th, the last child what is left; each sets up at most
/// `concurrency` at once.
struct Split {
    procs: usize,
    share: usize,
    concurrency: usize,
}

impl Split {
    fn new(args: &Args) -> Self {
        // Beyond what one process's descriptors allow, child processes take the rest.
        let procs = args.clients.div_ceil(clients_per_process(args));
        Self {
            procs,
            share: args.clients.div_ceil(procs),
            concurrency: (args.concurrency / procs).max(1),
        }
    }

    /// This process's own share.
    fn own(&self, args: &Args) -> usize {
        self.share.min(args.clients)
    }
}

/// A child generator process (`reservations` or `fleet` with `--child`), its input and
/// its stdout lines.
struct ChildGenerator {
    proc: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl ChildGenerator {
    /// Start child `k` (from 1) of `split`, running `scenario --child` on its share with
    /// `extra` arguments.
    fn spawn(
        args: &Args,
        scenario: &str,
        split: &Split,
        k: usize,
        extra: &[String],
    ) -> Result<Self> {
        use tokio::io::AsyncBufReadExt as _;
        let first = k * split.share;
        let count = split.share.min(args.clients - first);
        let base = Ipv4Addr::from(u32::from(args.ip_base) + first as u32);
        let mut proc = tokio::process::Command::new(std::env::current_exe()?)
            .arg(scenario)
            .arg("--child")
            .args(["--relay", &args.relay.to_string()])
            .args(["--clients", &count.to_string()])
            .args(["--concurrency", &split.concurrency.to_string()])
            .args(["--ip-base", &base.to_string()])
            .args(extra)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("start a child load generator")?;
        let stdin = proc.stdin.take().expect("piped");
        let lines = tokio::io::BufReader::new(proc.stdout.take().expect("piped")).lines();
        Ok(Self { proc, stdin, lines })
    }

    async fn send(&mut self, command: &str) -> Result<()> {
        use tokio::io::AsyncWriteExt as _;
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .context("write to a child load generator")
    }

    /// Its next line, with the `ms` lists named in `lists` appended to `into`.
    async fn next(&mut self, lists: &mut [(&str, &mut Vec<f64>)]) -> Result<serde_json::Value> {
        let line = self
            .lines
            .next_line()
            .await?
            .context("a child load generator ended early")?;
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("a child load generator printed {line:?}"))?;
        for (name, into) in lists.iter_mut() {
            into.extend(
                v[*name]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|x| x.as_f64()),
            );
        }
        Ok(v)
    }
}

/// `reservations --child`: hold a share of the clients for a parent process. Prints one
/// JSON line when set up, waits for stdin to close, prints one line with the losses.
async fn reservations_child(args: &Args, relay: &Relay) -> Result<serde_json::Value> {
    let failures = Arc::new(Failures::default());
    let lost = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop) = watch::channel(false);
    let mut done = hold_clients(
        args.clients,
        args.concurrency,
        Arc::new(Addrs::new(args.ip_base)),
        relay,
        &failures,
        &lost,
        &stop,
    );
    let mut lat = Vec::with_capacity(args.clients);
    for _ in 0..args.clients {
        if let Some(Some(d)) = done.recv().await {
            lat.push(ms(d));
        }
    }
    println!(
        "{}",
        json!({"latencies": lat, "failures": failures.count(), "errors": failures.json()})
    );
    let _ = tokio::task::spawn_blocking(|| {
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
    })
    .await;
    let _ = stop_tx.send(true);
    Ok(json!({"lost": lost.load(Ordering::Relaxed), "failures": 0}))
}

async fn reservations(args: &Args, relay: &Relay) -> Result<serde_json::Value> {
    if args.child {
        return reservations_child(args, relay).await;
    }
    let idle = sample(args.pid);
    let failures = Arc::new(Failures::default());
    let lost = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop) = watch::channel(false);
    let split = Split::new(args);
    let (procs, concurrency) = (split.procs, split.concurrency);
    let t0 = Instant::now();
    let mut children = Vec::new();
    for k in 1..procs {
        children.push(ChildGenerator::spawn(args, "reservations", &split, k, &[])?);
    }
    let own = split.own(args);
    let mut done = hold_clients(
        own,
        concurrency,
        Arc::new(Addrs::new(args.ip_base)),
        relay,
        &failures,
        &lost,
        &stop,
    );
    let mut lat = Vec::with_capacity(args.clients);
    let mut seen = 0;
    while seen < own {
        let Some(r) = done.recv().await else { break };
        seen += 1;
        if let Some(d) = r {
            lat.push(ms(d));
        }
        if seen % 1000 == 0 {
            eprintln!(
                "{seen}/{own} set up here ({:.1} s)",
                t0.elapsed().as_secs_f64()
            );
        }
    }
    let mut child_failures = 0;
    for c in &mut children {
        let r = c.next(&mut [("latencies", &mut lat)]).await?;
        child_failures += r["failures"].as_u64().unwrap_or(0) as usize;
        for e in r["errors"].as_array().into_iter().flatten() {
            eprintln!("child: {e}");
        }
    }
    let setup_s = t0.elapsed().as_secs_f64();
    let ok = lat.len();
    // Let the last handshakes' buffers and the keep-alive cycle settle before reading RSS.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let at_n = sample(args.pid);
    tokio::time::sleep(Duration::from_secs(args.hold)).await;
    let _ = stop_tx.send(true);
    let local_lost = lost.load(Ordering::Relaxed);
    let mut child_lost = 0;
    for c in children {
        let ChildGenerator {
            mut proc,
            stdin,
            mut lines,
        } = c;
        drop(stdin);
        if let Some(line) = lines.next_line().await? {
            let r: serde_json::Value = serde_json::from_str(&line)?;
            child_lost += r["result"]["lost"].as_u64().unwrap_or(0) as usize;
        }
        proc.wait().await?;
    }
    let (p50, p99) = percentiles(lat);
    let mut out = json!({
        "clients": args.clients,
        "processes": procs,
        "held": ok - (local_lost + child_lost).min(ok),
        // Local losses are in `failures` already.
        "failures": failures.count() + child_failures + child_lost,
        "errors": failures.json(),
        "setup_s": setup_s,
        "per_s": ok as f64 / setup_s,
        "p50_ms": p50,
        "p99_ms": p99,
    });
    if let (Some(idle), Some(at_n)) = (idle, at_n) {
        out["rss_idle_kib"] = json!(idle.rss_kib);
        out["rss_at_n_kib"] = json!(at_n.rss_kib);
        out["rss_per_reservation_kib"] =
            json!((at_n.rss_kib as f64 - idle.rss_kib as f64) / ok.max(1) as f64);
        out["cpu_ms_per_reservation"] =
            json!((at_n.cpu_s - idle.cpu_s) * 1000.0 / ok.max(1) as f64);
    }
    Ok(out)
}

/// Honest clients of the `flood` scenario.
const FLOOD_HONEST: usize = 50;

/// `flood`: `--clients` clients of one host (the address after `--ip-base`) connect and
/// reserve, `--concurrency` at a time, while 50 honest clients, each its own host in
/// the next /16, do the same once the flood runs. Refusals of the flood are expected;
/// the figures that count are the honest clients' (failures, latency).
async fn flood(args: &Args, relay: &Relay) -> Result<serde_json::Value> {
    let flood_failures = Arc::new(Failures::default());
    let honest_failures = Arc::new(Failures::default());
    let lost = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop) = watch::channel(false);
    let t0 = Instant::now();
    let mut flood_done = hold_clients(
        args.clients,
        args.concurrency,
        Arc::new(Addrs::one_host(args.ip_base)),
        relay,
        &flood_failures,
        &lost,
        &stop,
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let honest_base = Ipv4Addr::from(u32::from(args.ip_base) + 65_536);
    let mut honest_done = hold_clients(
        FLOOD_HONEST,
        8,
        Arc::new(Addrs::new(honest_base)),
        relay,
        &honest_failures,
        &lost,
        &stop,
    );
    let mut honest = Vec::new();
    for _ in 0..FLOOD_HONEST {
        if let Some(Some(d)) = honest_done.recv().await {
            honest.push(ms(d));
        }
    }
    let honest_s = t0.elapsed().as_secs_f64();
    let mut flood_ok = 0;
    for _ in 0..args.clients {
        if let Some(Some(_)) = flood_done.recv().await {
            flood_ok += 1;
        }
    }
    let _ = stop_tx.send(true);
    let honest_ok = honest.len();
    let (p50, p99) = percentiles(honest);
    eprintln!(
        "flood from one host: {flood_ok} of {} reserved; honest: {honest_ok} of {FLOOD_HONEST}",
        args.clients
    );
    Ok(json!({
        "flood_clients": args.clients,
        "flood_reserved": flood_ok,
        "flood_refused": args.clients - flood_ok,
        "flood_errors": flood_failures.json(),
        "honest_clients": FLOOD_HONEST,
        "honest_reserved": honest_ok,
        "honest_p50_ms": p50,
        "honest_p99_ms": p99,
        "honest_done_s": honest_s,
        "failures": honest_failures.count(),
        "errors": honest_failures.json(),
    }))
}

async fn circuits(args: &Args, relay: &Relay) -> Result<serde_json::Value> {
    let addrs = Arc::new(Addrs::new(args.ip_base));
    let setup_gate = Arc::new(Semaphore::new(64));
    let failures = Arc::new(Failures::default());
    // Listeners: reserve, then answer transfers until the process ends.
    let (ready_tx, mut ready) = mpsc::unbounded_channel::<Option<PeerId>>();
    let mut tasks = Vec::new();
    for _ in 0..args.clients {
        let (relay, addrs, gate, failures, ready_tx) = (
            relay.clone(),
            addrs.clone(),
            setup_gate.clone(),
            failures.clone(),
            ready_tx.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await.unwrap();
            let setup = async {
                let mut swarm = client(addrs.take(), Kind::Relay).await?;
                connect(&mut swarm, &relay).await?;
                reserve(&mut swarm, &relay).await?;
                anyhow::Ok(swarm)
            };
            match setup.await {
                Ok(swarm) => {
                    let _ = ready_tx.send(Some(*swarm.local_peer_id()));
                    drop(permit);
                    serve(swarm).await;
                }
                Err(e) => {
                    failures.add("listener setup", &e);
                    let _ = ready_tx.send(None);
                }
            }
        }));
    }
    let mut targets = Vec::new();
    for _ in 0..args.clients {
        if let Some(Some(p)) = ready.recv().await {
            targets.push(p);
        }
    }
    eprintln!("{} listeners reserved", targets.len());
    // Dialers: connect to the relay first so the timed part is the circuit alone.
    let (go_tx, go) = watch::channel(false);
    let (done_tx, mut done) = mpsc::unbounded_channel::<Option<Duration>>();
    let (conn_tx, mut connected) = mpsc::unbounded_channel::<()>();
    let circuit_gate = Arc::new(Semaphore::new(args.concurrency));
    let payload = args.payload;
    for target in targets.iter().copied() {
        let (relay, addrs, setup_gate, circuit_gate, failures) = (
            relay.clone(),
            addrs.clone(),
            setup_gate.clone(),
            circuit_gate.clone(),
            failures.clone(),
        );
        let (mut go, done_tx, conn_tx) = (go.clone(), done_tx.clone(), conn_tx.clone());
        tasks.push(tokio::spawn(async move {
            let permit = setup_gate.acquire_owned().await.unwrap();
            let setup = async {
                let mut swarm = client(addrs.take(), Kind::Relay).await?;
                connect(&mut swarm, &relay).await?;
                anyhow::Ok(swarm)
            };
            let mut swarm = match setup.await {
                Ok(s) => s,
                Err(e) => {
                    failures.add("dialer setup", &e);
                    let _ = conn_tx.send(());
                    let _ = done_tx.send(None);
                    return;
                }
            };
            drop(permit);
            let _ = conn_tx.send(());
            // Keep the relay connection alive while waiting for the start.
            loop {
                tokio::select! {
                    _ = go.wait_for(|g| *g) => break,
                    _ = swarm.select_next_some() => {}
                }
            }
            let _permit = circuit_gate.acquire_owned().await.unwrap();
            let t = Instant::now();
            let run = async {
                dial_circuit(&mut swarm, &relay, target).await?;
                let setup = t.elapsed();
                let control = swarm.behaviour().stream.new_control();
                drive(
                    &mut swarm,
                    "transfer",
                    STEP_TIMEOUT,
                    transfer(control, target, payload),
                )
                .await?;
                disconnect(&mut swarm, target).await?;
                anyhow::Ok(setup)
            };
            match run.await {
                Ok(setup) => {
                    let _ = done_tx.send(Some(setup));
                }
                Err(e) => {
                    failures.add("circuit", &e);
                    let _ = done_tx.send(None);
                }
            }
        }));
    }
    drop((done_tx, conn_tx));
    for _ in 0..targets.len() {
        connected.recv().await;
    }
    eprintln!("{} dialers connected; opening circuits", targets.len());
    let before = sample(args.pid);
    let t0 = Instant::now();
    let _ = go_tx.send(true);
    let mut lat = Vec::new();
    while let Some(r) = done.recv().await {
        if let Some(d) = r {
            lat.push(ms(d));
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let after = sample(args.pid);
    for t in tasks {
        t.abort();
    }
    let (p50, p99) = percentiles(lat.clone());
    let mut out = json!({
        "pairs": args.clients,
        "completed": lat.len(),
        "failures": failures.count(),
        "errors": failures.json(),
        "payload_bytes": payload,
        "secs": secs,
        "per_s": lat.len() as f64 / secs,
        "setup_p50_ms": p50,
        "setup_p99_ms": p99,
    });
    if let (Some(b), Some(a)) = (before, after) {
        out["cpu_ms_per_circuit"] = json!((a.cpu_s - b.cpu_s) * 1000.0 / lat.len().max(1) as f64);
    }
    Ok(out)
}

/// Move `bytes` to `target` over the swarm's connection to it; returns the seconds taken.
async fn timed_transfer(
    swarm: &mut Swarm<Client>,
    what: &str,
    target: PeerId,
    bytes: usize,
) -> Result<f64> {
    let control = swarm.behaviour().stream.new_control();
    let t = Instant::now();
    drive(
        swarm,
        what,
        Duration::from_secs(600),
        transfer(control, target, bytes),
    )
    .await?;
    Ok(t.elapsed().as_secs_f64())
}

async fn bulk(args: &Args, relay: &Relay) -> Result<serde_json::Value> {
    let addrs = Addrs::new(args.ip_base);
    let bytes = args.mib << 20;
    let mut a = client(addrs.take(), Kind::Relay).await?;
    connect(&mut a, relay).await?;
    reserve(&mut a, relay).await?;
    let a_id = *a.local_peer_id();
    let a_addr = a
        .listeners()
        .find(|l| !l.iter().any(|p| p == Protocol::P2pCircuit))
        .cloned()
        .context("listener address")?
        .with(Protocol::P2p(a_id));
    let a_task = tokio::spawn(serve(a));
    let mut b = client(addrs.take(), Kind::Relay).await?;
    connect(&mut b, relay).await?;

    // Direct: the physical limit of this machine for two QUIC peers.
    b.dial(a_addr)?;
    until(&mut b, "direct connection", |ev| match ev {
        SwarmEvent::ConnectionEstablished {
            peer_id,
            endpoint: ConnectedPoint::Dialer { .. },
            ..
        } if peer_id == a_id => Some(Ok(())),
        SwarmEvent::OutgoingConnectionError { error, .. } => Some(Err(anyhow!("{error}"))),
        _ => None,
    })
    .await?;
    let direct_s = timed_transfer(&mut b, "direct transfer", a_id, bytes).await?;
    disconnect(&mut b, a_id).await?;
    eprintln!("direct: {:.1} MiB/s", args.mib as f64 / direct_s);

    // Relayed: the same pair through a circuit.
    dial_circuit(&mut b, relay, a_id).await?;
    let before = sample(args.pid);
    let relayed_s = timed_transfer(&mut b, "relayed transfer", a_id, bytes).await?;
    let after = sample(args.pid);
    eprintln!("relayed: {:.1} MiB/s", args.mib as f64 / relayed_s);
    a_task.abort();
    let gib = bytes as f64 / (1u64 << 30) as f64;
    let mut out = json!({
        "mib": args.mib,
        "failures": 0,
        "direct_mib_s": args.mib as f64 / direct_s,
        "relayed_mib_s": args.mib as f64 / relayed_s,
        "ratio": direct_s / relayed_s,
    });
    if let (Some(b), Some(a)) = (before, after) {
        out["relay_cpu_s_per_gib"] = json!((a.cpu_s - b.cpu_s) / gib);
    }
    Ok(out)
}

/// A PrivStack sync-group record: key `/privstack/syncgroup/` + SHA-256(code), JSON value.
fn record(code: &str, device: &str, addr: &Multiaddr) -> kad::Record {
    use sha2::Digest;
    let mut key = b"/privstack/syncgroup/".to_vec();
    key.extend_from_slice(&sha2::Sha256::digest(code.as_bytes()));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let value = json!({
        "device_name": device,
        "addresses": [addr.to_string()],
        "timestamp": now,
    });
    kad::Record::new(kad::RecordKey::new(&key), value.to_string().into_bytes())
}

/// Keep the swarm running until the scenario reaches phase `p`.
async fn wait_phase(swarm: &mut Swarm<Client>, phase: &mut watch::Receiver<u8>, p: u8) {
    loop {
        tokio::select! {
            _ = phase.wait_for(|v| *v >= p) => return,
            _ = swarm.select_next_some() => {}
        }
    }
}

fn kad_of(swarm: &mut Swarm<Client>) -> &mut kad::Behaviour<MemoryStore> {
    swarm
        .behaviour_mut()
        .kad
        .as_mut()
        .expect("dht clients run kad")
}

/// Store `rec` on the relay; Ok once the relay has acknowledged it.
async fn put(swarm: &mut Swarm<Client>, relay: &Relay, mut rec: kad::Record) -> Result<()> {
    // put_record (what PrivStack calls) names the publisher; put_record_to leaves it to us.
    rec.publisher = Some(*swarm.local_peer_id());
    let id = kad_of(swarm).put_record_to(rec, std::iter::once(relay.peer), kad::Quorum::One);
    until(swarm, "put_record", |ev| match ev {
        SwarmEvent::Behaviour(ClientEvent::Kad(kad::Event::OutboundQueryProgressed {
            id: q,
            result: kad::QueryResult::PutRecord(r),
            ..
        })) if q == id => Some(r.map(|_| ()).map_err(|e| anyhow!("put: {e:?}"))),
        _ => None,
    })
    .await
}

/// Look `key` up; Ok once a record with the expected publisher comes back.
async fn get(swarm: &mut Swarm<Client>, key: kad::RecordKey) -> Result<()> {
    let id = kad_of(swarm).get_record(key);
    let found = until(swarm, "get_record", |ev| match ev {
        SwarmEvent::Behaviour(ClientEvent::Kad(kad::Event::OutboundQueryProgressed {
            id: q,
            result: kad::QueryResult::GetRecord(r),
            step,
            ..
        })) if q == id => match r {
            Ok(kad::GetRecordOk::FoundRecord(r)) => Some(Ok(r.record.publisher.is_some())),
            Ok(_) if step.last => Some(Err(anyhow!("record not found"))),
            Err(e) => Some(Err(anyhow!("get: {e:?}"))),
            Ok(_) => None,
        },
        _ => None,
    })
    .await;
    // One record is enough; end the query instead of waiting for more peers.
    if let Some(mut q) = kad_of(swarm).query_mut(&id) {
        q.finish();
    }
    match found? {
        true => Ok(()),
        false => bail!("record came back without its publisher"),
    }
}

async fn dht(args: &Args, relay: &Relay) -> Result<serde_json::Value> {
    let addrs = Arc::new(Addrs::new(args.ip_base));
    let gate = Arc::new(Semaphore::new(args.concurrency));
    let failures = Arc::new(Failures::default());
    let (records, gets, m) = (args.records, args.gets.min(args.records), args.clients);
    // Phase barriers: connected -> put -> (sample) -> get.
    let (phase_tx, phase) = watch::channel(0u8);
    let (conn_tx, mut connected) = mpsc::unbounded_channel::<()>();
    let (put_tx, mut puts_done) = mpsc::unbounded_channel::<Vec<f64>>();
    let (get_tx, mut gets_done) = mpsc::unbounded_channel::<Vec<f64>>();
    let run = format!("{:x}", rand::random::<u64>());
    let mut tasks = Vec::new();
    for i in 0..m {
        let (relay, addrs, gate, failures, run) = (
            relay.clone(),
            addrs.clone(),
            gate.clone(),
            failures.clone(),
            run.clone(),
        );
        let (mut phase, conn_tx, put_tx, get_tx) = (
            phase.clone(),
            conn_tx.clone(),
            put_tx.clone(),
            get_tx.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await.unwrap();
            let ip = addrs.take();
            let setup = async {
                let mut swarm = client(ip, Kind::Dht).await?;
                connect(&mut swarm, &relay).await?;
                anyhow::Ok(swarm)
            };
            let mut swarm = match setup.await {
                Ok(s) => s,
                Err(e) => {
                    failures.add("setup", &e);
                    let _ = conn_tx.send(());
                    let _ = put_tx.send(Vec::new());
                    let _ = get_tx.send(Vec::new());
                    return;
                }
            };
            drop(permit);
            let _ = conn_tx.send(());
            wait_phase(&mut swarm, &mut phase, 1).await;
            let my_addr = Multiaddr::empty()
                .with(Protocol::Ip4(ip))
                .with(Protocol::Udp(4001))
                .with(Protocol::QuicV1);
            let mut lat = Vec::with_capacity(records);
            for j in 0..records {
                let rec = record(&format!("{run}-{i}-{j}"), &format!("bench-{i}"), &my_addr);
                let t = Instant::now();
                match put(&mut swarm, &relay, rec).await {
                    Ok(()) => lat.push(ms(t.elapsed())),
                    Err(e) => failures.add("put", &e),
                }
            }
            let _ = put_tx.send(lat);
            wait_phase(&mut swarm, &mut phase, 2).await;
            let other = (i + 1) % m;
            let mut lat = Vec::with_capacity(gets);
            for j in 0..gets {
                let key = record(&format!("{run}-{other}-{j}"), "", &my_addr).key;
                let t = Instant::now();
                match get(&mut swarm, key).await {
                    Ok(()) => lat.push(ms(t.elapsed())),
                    Err(e) => failures.add("get", &e),
                }
            }
            let _ = get_tx.send(lat);
            wait_phase(&mut swarm, &mut phase, 3).await;
        }));
    }
    drop((conn_tx, put_tx, get_tx));
    for _ in 0..m {
        connected.recv().await;
    }
    eprintln!("{m} clients connected");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = sample(args.pid);
    let t0 = Instant::now();
    let _ = phase_tx.send(1);
    let mut put_lat = Vec::new();
    for _ in 0..m {
        put_lat.extend(puts_done.recv().await.unwrap_or_default());
    }
    let put_s = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = sample(args.pid);
    eprintln!("{} records stored in {put_s:.1} s", put_lat.len());
    let t0 = Instant::now();
    let _ = phase_tx.send(2);
    let mut get_lat = Vec::new();
    for _ in 0..m {
        get_lat.extend(gets_done.recv().await.unwrap_or_default());
    }
    let get_s = t0.elapsed().as_secs_f64();
    let _ = phase_tx.send(3);
    for t in tasks {
        t.abort();
    }
    let stored = put_lat.len();
    let (put_ops, get_ops) = (stored as f64 / put_s, get_lat.len() as f64 / get_s);
    let ((put_p50, put_p99), (get_p50, get_p99)) = (percentiles(put_lat), percentiles(get_lat));
    let mut out = json!({
        "clients": m,
        "records": stored,
        "failures": failures.count(),
        "errors": failures.json(),
        "put_per_s": put_ops,
        "put_p50_ms": put_p50,
        "put_p99_ms": put_p99,
        "get_per_s": get_ops,
        "get_p50_ms": get_p50,
        "get_p99_ms": get_p99,
    });
    if let (Some(b), Some(a)) = (before, after) {
        out["rss_per_record_bytes"] =
            json!((a.rss_kib as f64 - b.rss_kib as f64) * 1024.0 / stored.max(1) as f64);
        out["rss_records_kib"] = json!(a.rss_kib);
    }
    Ok(out)
}

async fn churn(args: &Args, relay: &Relay) -> Result<serde_json::Value> {
    let idle = sample(args.pid);
    let addrs = Arc::new(Addrs::new(args.ip_base));
    let failures = Arc::new(Failures::default());
    let cycles = Arc::new(AtomicUsize::new(0));
    let mut rounds = Vec::new();
    for _ in 0..args.rounds {
        let deadline = Instant::now() + Duration::from_secs(args.seconds);
        let mut workers = Vec::new();
        for _ in 0..args.concurrency {
            let (relay, addrs, failures, cycles) = (
                relay.clone(),
                addrs.clone(),
                failures.clone(),
                cycles.clone(),
            );
            workers.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    let cycle = async {
                        let mut swarm = client(addrs.take(), Kind::Relay).await?;
                        connect(&mut swarm, &relay).await?;
                        reserve(&mut swarm, &relay).await?;
                        disconnect(&mut swarm, relay.peer).await
                    };
                    match cycle.await {
                        Ok(()) => {
                            cycles.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failures.add("cycle", &e),
                    }
                }
            }));
        }
        for w in workers {
            w.await?;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        if let Some(s) = sample(args.pid) {
            eprintln!(
                "after round {}: {} cycles, relay RSS {} KiB",
                rounds.len() + 1,
                cycles.load(Ordering::Relaxed),
                s.rss_kib
            );
            rounds.push(s.rss_kib);
        }
    }
    let n = cycles.load(Ordering::Relaxed);
    eprintln!("{n} connect/reserve/disconnect cycles");
    let peak = sample(args.pid);
    let mut out = json!({
        "cycles": n,
        "per_s": n as f64 / (args.seconds * u64::from(args.rounds)) as f64,
        "rss_rounds_kib": rounds,
        "failures": failures.count(),
        "errors": failures.json(),
    });
    if let (Some(idle), Some(peak)) = (idle, peak) {
        // Follow RSS until it is back within 10% of idle (the target) or time runs out.
        let t = Instant::now();
        let mut last = peak;
        while t.elapsed() < Duration::from_secs(args.settle) {
            last = sample(args.pid).unwrap_or(last);
            if (last.rss_kib as f64) <= idle.rss_kib as f64 * 1.10 {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        out["rss_idle_kib"] = json!(idle.rss_kib);
        out["rss_peak_kib"] = json!(peak.hwm_kib);
        out["rss_after_kib"] = json!(last.rss_kib);
        out["rss_after_vs_idle"] = json!(last.rss_kib as f64 / idle.rss_kib as f64);
        out["settle_s"] = json!(t.elapsed().as_secs_f64());
    }
    Ok(out)
}

/// UDP datagrams received in this network namespace (`/proc/net/snmp`), all of them to
/// or from the relay when only the fleet runs here (compare.py's namespace): each packet
/// between a device and the relay is received once, so this counts the relay's packets
/// in both directions.
fn udp_datagrams_in() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let names: Vec<&str> = udp.next()?.split_whitespace().collect();
    let values: Vec<&str> = udp.next()?.split_whitespace().collect();
    let at = names.iter().position(|n| *n == "InDatagrams")?;
    values.get(at)?.parse().ok()
}

/// Drive the swarm for `d`; an error if the connection to the relay closes meanwhile.
async fn hold_for(swarm: &mut Swarm<Client>, relay: &Relay, d: Duration) -> Result<()> {
    let sleep = tokio::time::sleep(d);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = &mut sleep => return Ok(()),
            ev = swarm.select_next_some() => if let SwarmEvent::ConnectionClosed {
                peer_id, num_established: 0, cause, ..
            } = ev && peer_id == relay.peer {
                bail!("relay connection closed: {cause:?}");
            }
        }
    }
}

/// One device's figures, sent when its operations end.
#[derive(Default)]
struct DeviceReport {
    puts: Vec<f64>,
    gets: Vec<f64>,
}

/// Fleet phases, in order; every device follows the one process-wide value.
const CONNECTING: u8 = 0;
const OPERATING: u8 = 1;
const AT_REST: u8 = 2;
const LEAVING: u8 = 3;

/// The devices one generator process runs.
struct Devices {
    /// One entry per device once it is online (its connect time) or has failed (`None`).
    connected: mpsc::UnboundedReceiver<Option<f64>>,
    /// One report per device, sent when the operations end (or the device failed).
    reports: mpsc::UnboundedReceiver<DeviceReport>,
    failures: Arc<Failures>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Devices {
    /// Connect times of all `n` devices (the ones online), reporting progress.
    async fn online(&mut self, n: usize, t0: Instant) -> Vec<f64> {
        let mut setup = Vec::with_capacity(n);
        for k in 1..=n {
            match self.connected.recv().await {
                Some(Some(took)) => setup.push(took),
                Some(None) => {}
                None => break,
            }
            if k % 1000 == 0 {
                eprintln!(
                    "{k}/{n} devices online here ({:.1} s)",
                    t0.elapsed().as_secs_f64()
                );
            }
        }
        setup
    }

    /// The put and get latencies of all `n` devices, once the operations have ended.
    async fn latencies(&mut self, n: usize) -> (Vec<f64>, Vec<f64>) {
        let (mut puts, mut gets) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let Some(r) = self.reports.recv().await else {
                break;
            };
            puts.extend(r.puts);
            gets.extend(r.gets);
        }
        (puts, gets)
    }

    /// Drop every device (and its connection to the relay).
    async fn leave(self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// The devices of one generator process: `n`, numbered from `first` (device `i` shares
/// its sync code with the other device of pair `i / 2`, whichever process runs it), on
/// the addresses after `ip_base`, at most `concurrency` connecting at once.
struct Share {
    n: usize,
    first: usize,
    ip_base: Ipv4Addr,
    concurrency: usize,
}

/// Start a share of the fleet; the devices follow `phase`.
fn start_devices(
    args: &Args,
    relay: &Relay,
    share: Share,
    run: &str,
    phase: &watch::Receiver<u8>,
) -> Devices {
    let Share {
        n,
        first,
        ip_base,
        concurrency,
    } = share;
    let period = Duration::from_secs(args.period.max(1));
    let addrs = Arc::new(Addrs::new(ip_base));
    let gate = Arc::new(Semaphore::new(concurrency));
    let failures = Arc::new(Failures::default());
    let (conn_tx, connected) = mpsc::unbounded_channel::<Option<f64>>();
    let (report_tx, reports) = mpsc::unbounded_channel::<DeviceReport>();
    let mut tasks = Vec::with_capacity(n);
    for i in first..first + n {
        let (relay, addrs, gate, failures, run) = (
            relay.clone(),
            addrs.clone(),
            gate.clone(),
            failures.clone(),
            run.to_owned(),
        );
        let (mut phase, conn_tx, report_tx) = (phase.clone(), conn_tx.clone(), report_tx.clone());
        tasks.push(tokio::spawn(async move {
            let mut report = DeviceReport::default();
            let permit = gate.acquire_owned().await.unwrap();
            let ip = addrs.take();
            // Pairs of devices share a sync code, so each reads its partner's record.
            let code = format!("fleet-{run}-{}", i / 2);
            let name = format!("device-{i}");
            let lan = Multiaddr::empty()
                .with(Protocol::Ip4(ip))
                .with(Protocol::Udp(4001))
                .with(Protocol::QuicV1);
            let setup = async {
                let mut swarm = client(ip, Kind::Device).await?;
                let t = Instant::now();
                connect(&mut swarm, &relay).await?;
                let took = ms(t.elapsed());
                // Online: the device stores its record once before the rounds start.
                put(&mut swarm, &relay, record(&code, &name, &lan)).await?;
                anyhow::Ok((swarm, took))
            };
            let mut swarm = match setup.await {
                Ok((swarm, took)) => {
                    let _ = conn_tx.send(Some(took));
                    swarm
                }
                Err(e) => {
                    failures.add("setup", &e);
                    let _ = conn_tx.send(None);
                    let _ = report_tx.send(report);
                    return;
                }
            };
            drop(permit);
            let sent = std::sync::atomic::AtomicBool::new(false);
            let held = async {
                // A device runs its rounds from the moment it is online, as a real one
                // does while others join (and so its connection is never idle for the
                // relay's 2-minute timeout); only the rounds that start while the fleet
                // is operating count towards the figures. The first is spread over one
                // period, as devices that came online at different times are.
                let jitter = period.mul_f64(rand::random::<f64>());
                hold_for(&mut swarm, &relay, jitter).await?;
                let key = record(&code, "", &lan).key;
                while *phase.borrow() < AT_REST {
                    let next = Instant::now() + period;
                    let counted = *phase.borrow() == OPERATING;
                    let t = Instant::now();
                    match get(&mut swarm, key.clone()).await {
                        Ok(()) if counted => report.gets.push(ms(t.elapsed())),
                        Ok(()) => {}
                        Err(e) => failures.add("get", &e),
                    }
                    let t = Instant::now();
                    match put(&mut swarm, &relay, record(&code, &name, &lan)).await {
                        Ok(()) if counted => report.puts.push(ms(t.elapsed())),
                        Ok(()) => {}
                        Err(e) => failures.add("put", &e),
                    }
                    let wait = next.saturating_duration_since(Instant::now());
                    tokio::select! {
                        _ = phase.wait_for(|p| *p >= AT_REST) => {}
                        r = hold_for(&mut swarm, &relay, wait) => r?,
                    }
                }
                let _ = report_tx.send(std::mem::take(&mut report));
                sent.store(true, Ordering::Relaxed);
                tokio::select! {
                    _ = phase.wait_for(|p| *p >= LEAVING) => {}
                    r = hold_for(&mut swarm, &relay, Duration::MAX) => r?,
                }
                anyhow::Ok(())
            };
            if let Err(e) = held.await {
                failures.add("hold", &e);
                if !sent.load(Ordering::Relaxed) {
                    let _ = report_tx.send(report);
                }
            }
        }));
    }
    Devices {
        connected,
        reports,
        failures,
        tasks,
    }
}

/// `fleet --child`: run a share of the devices for a parent process. Protocol, one JSON
/// line on stdout per step: `{"setup": [ms...]}` once every device is online (or has
/// failed); then on the stdin line `operate` the rounds start, on `rest` they stop and
/// `{"puts": [ms...], "gets": [ms...]}` follows; on `leave` (or end of input) the devices
/// leave and main's result line carries the failures.
async fn fleet_child(args: &Args, relay: &Relay) -> Result<serde_json::Value> {
    let run = args.run.clone().context("fleet --child needs --run")?;
    let (phase_tx, phase) = watch::channel(CONNECTING);
    let share = Share {
        n: args.clients,
        first: args.first,
        ip_base: args.ip_base,
        concurrency: args.concurrency,
    };
    let mut devices = start_devices(args, relay, share, &run, &phase);
    let setup = devices.online(args.clients, Instant::now()).await;
    println!("{}", json!({ "setup": setup }));
    // The parent's commands, read on a thread of their own (stdin blocks).
    let (line_tx, mut commands) = mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::stdin().lock()) {
            let Ok(line) = line else { break };
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = commands.recv().await {
        match line.trim() {
            "operate" => {
                let _ = phase_tx.send(OPERATING);
            }
            "rest" => {
                let _ = phase_tx.send(AT_REST);
                let (puts, gets) = devices.latencies(args.clients).await;
                println!("{}", json!({ "puts": puts, "gets": gets }));
            }
            "leave" => break,
            other => bail!("fleet --child: unknown command {other:?}"),
        }
    }
    let _ = phase_tx.send(LEAVING);
    let failures = devices.failures.clone();
    devices.leave().await;
    Ok(json!({"failures": failures.count(), "errors": failures.json()}))
}

async fn fleet(args: &Args, relay: &Relay) -> Result<serde_json::Value> {
    if args.child {
        return fleet_child(args, relay).await;
    }
    let n = args.clients;
    let idle = sample(args.pid);
    let run = format!("{:x}", rand::random::<u64>());
    let (phase_tx, phase) = watch::channel(CONNECTING);
    let split = Split::new(args);
    let (procs, concurrency) = (split.procs, split.concurrency);
    let t0 = Instant::now();
    let mut children = Vec::new();
    for k in 1..procs {
        let extra = [
            "--first".to_owned(),
            (k * split.share).to_string(),
            "--run".to_owned(),
            run.clone(),
            "--period".to_owned(),
            args.period.to_string(),
        ];
        children.push(ChildGenerator::spawn(args, "fleet", &split, k, &extra)?);
    }
    let own = split.own(args);
    let local = Share {
        n: own,
        first: 0,
        ip_base: args.ip_base,
        concurrency,
    };
    let mut devices = start_devices(args, relay, local, &run, &phase);
    let mut setup = devices.online(own, t0).await;
    for c in &mut children {
        c.next(&mut [("setup", &mut setup)]).await?;
    }
    let online = setup.len();
    let connect_s = t0.elapsed().as_secs_f64();
    eprintln!("{online} of {n} devices online in {connect_s:.1} s ({procs} processes)");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let at_n = sample(args.pid);
    let _ = phase_tx.send(OPERATING);
    for c in &mut children {
        c.send("operate").await?;
    }
    let t_ops = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let _ = phase_tx.send(AT_REST);
    for c in &mut children {
        c.send("rest").await?;
    }
    let (mut puts, mut gets) = devices.latencies(own).await;
    for c in &mut children {
        c.next(&mut [("puts", &mut puts), ("gets", &mut gets)])
            .await?;
    }
    let ops_s = t_ops.elapsed().as_secs_f64();
    let after_ops = sample(args.pid);
    let ops = puts.len() + gets.len();
    eprintln!(
        "{ops} operations in {ops_s:.1} s; at rest for {} s",
        args.rest
    );
    let (rest_start, pk0) = (sample(args.pid), udp_datagrams_in());
    tokio::time::sleep(Duration::from_secs(args.rest)).await;
    let (rest_end, pk1) = (sample(args.pid), udp_datagrams_in());
    let _ = phase_tx.send(LEAVING);
    let mut failures = devices.failures.count();
    let mut errors = vec![devices.failures.json()];
    devices.leave().await;
    for mut c in children {
        c.send("leave").await?;
        let r = c.next(&mut []).await?;
        failures += r["result"]["failures"].as_u64().unwrap_or(0) as usize;
        errors.push(r["result"]["errors"].clone());
        c.proc.wait().await?;
    }
    // Devices gone: follow the relay's RSS back towards idle.
    let mut rss_after = None;
    if let Some(idle) = idle {
        let until = Instant::now() + Duration::from_secs(args.settle);
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            rss_after = sample(args.pid);
            let back = rss_after.is_some_and(|a| a.rss_kib as f64 <= idle.rss_kib as f64 * 1.10);
            if back || Instant::now() >= until {
                break;
            }
        }
    }
    let ((setup_p50, setup_p99), (put_p50, put_p99), (get_p50, get_p99)) =
        (percentiles(setup), percentiles(puts), percentiles(gets));
    let mut out = json!({
        "devices": n,
        "processes": procs,
        "online": online,
        "connect_s": connect_s,
        "operations": ops,
        "ops_per_s": ops as f64 / ops_s,
        "failures": failures,
        "errors": errors.into_iter().flat_map(|e| e.as_array().cloned().unwrap_or_default()).collect::<Vec<_>>(),
        "setup_p50_ms": setup_p50,
        "setup_p99_ms": setup_p99,
        "put_p50_ms": put_p50,
        "put_p99_ms": put_p99,
        "get_p50_ms": get_p50,
        "get_p99_ms": get_p99,
    });
    if let (Some(a), Some(b)) = (pk0, pk1) {
        let per_s = (b - a) as f64 / args.rest.max(1) as f64;
        out["rest_packets_per_s"] = json!(per_s);
        out["rest_packets_per_device_min"] = json!(per_s * 60.0 / online.max(1) as f64);
    }
    if let (Some(idle), Some(at_n), Some(after_ops), Some(r0), Some(r1)) =
        (idle, at_n, after_ops, rest_start, rest_end)
    {
        out["rss_idle_kib"] = json!(idle.rss_kib);
        out["rss_at_n_kib"] = json!(at_n.rss_kib);
        out["rss_after_ops_kib"] = json!(after_ops.rss_kib);
        out["rss_per_device_kib"] =
            json!((at_n.rss_kib as f64 - idle.rss_kib as f64) / online.max(1) as f64);
        let cpu_ops = after_ops.cpu_s - at_n.cpu_s;
        out["cpu_s_per_1000_ops"] = json!(cpu_ops * 1000.0 / ops.max(1) as f64);
        out["cpu_s_per_device_hour"] = json!(cpu_ops / (online.max(1) as f64 * ops_s / 3600.0));
        out["rest_cpu_s_per_device_hour"] = json!(
            (r1.cpu_s - r0.cpu_s) / (online.max(1) as f64 * args.rest.max(1) as f64 / 3600.0)
        );
        if let Some(a) = rss_after {
            out["rss_after_kib"] = json!(a.rss_kib);
            out["rss_after_vs_idle"] = json!(a.rss_kib as f64 / idle.rss_kib.max(1) as f64);
        }
    }
    Ok(out)
}

/// Thousands of clients mean thousands of sockets (a few per client): lift the
/// descriptor limit, past the hard limit where allowed (root), else to the hard limit.
fn raise_fd_limit() {
    const WANTED: libc::rlim_t = 1 << 18;
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return;
        }
        let raised = libc::rlimit {
            rlim_cur: WANTED.max(l.rlim_max),
            rlim_max: WANTED.max(l.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let Some(Protocol::P2p(peer)) = args.relay.iter().last() else {
        bail!("--relay {} must end in /p2p/<relay peer id>", args.relay);
    };
    if args.clients == 0 || args.concurrency == 0 || args.rounds == 0 {
        bail!("--clients, --concurrency and --rounds must be at least 1");
    }
    raise_fd_limit();
    let relay = Relay {
        addr: args.relay.clone(),
        peer,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let out = rt.block_on(async {
        match args.scenario {
            Scenario::Reservations => reservations(&args, &relay).await,
            Scenario::Circuits => circuits(&args, &relay).await,
            Scenario::Bulk => bulk(&args, &relay).await,
            Scenario::Dht => dht(&args, &relay).await,
            Scenario::Churn => churn(&args, &relay).await,
            Scenario::Flood => flood(&args, &relay).await,
            Scenario::Fleet => fleet(&args, &relay).await,
        }
    })?;
    let failures = out["failures"].as_u64().unwrap_or(0);
    let scenario = format!("{:?}", args.scenario).to_lowercase();
    println!("{}", json!({"scenario": scenario, "result": out}));
    // Tasks still hold swarms; leave without waiting for them.
    rt.shutdown_background();
    if failures > 0 {
        bail!("{scenario}: {failures} failures");
    }
    Ok(())
}
