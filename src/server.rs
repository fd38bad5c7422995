//! [`Server`]: the running relay (swarm event loop + HTTP API) behind one handle.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{Multiaddr, PeerId, Swarm, SwarmBuilder, Transport};
use prometheus_client::registry::Registry;
use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::{self, JoinSet};

use crate::admission::{Admission, HostCaps};
use crate::behaviour::Behaviour;
use crate::circuits::{self, Circuits, shaping::Rates};
use crate::config::Config;
use crate::event_loop::{EventLoop, Fault};
use crate::metrics::RelayMetrics;
use crate::state::{Snapshot, Stats};
use crate::{api, defaults, quic};

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("setting up QUIC")]
    Quic(#[source] crate::quic::Error),
    #[error("cannot listen on UDP port {port} ({addr}, QUIC)")]
    BindQuic {
        addr: SocketAddr,
        port: u16,
        source: io::Error,
    },
    #[error("cannot listen on TCP port {port} ({addr}, metrics; --metrics-address)")]
    BindMetrics {
        addr: SocketAddr,
        port: u16,
        source: io::Error,
    },
    #[error("cannot listen on TCP port {port} ({addr}, HTTP API)")]
    BindHttp {
        addr: SocketAddr,
        port: u16,
        source: io::Error,
    },
}

/// Why a running relay stopped on its own: the task that ended first and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stopped {
    /// `event loop`, `HTTP API on ADDR` or `metrics on ADDR`.
    pub task: String,
    pub reason: String,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.task, self.reason)
    }
}

/// What one of the relay's tasks returns when it ends.
enum TaskEnd {
    EventLoop(Result<Stats, String>),
    Listener(io::Result<()>),
}

/// A running relay: the swarm's event loop and the HTTP listeners, each a task under
/// one supervisor ([`Server::join`]): none of them is meant to end while the relay runs,
/// so the first that does stops the relay. Dropping it aborts its tasks;
/// [`Server::shutdown`] stops it gracefully.
pub struct Server {
    peer_id: PeerId,
    quic_addrs: Vec<SocketAddr>,
    http_addrs: Vec<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    snapshot: watch::Receiver<Snapshot>,
    registry: Arc<Registry>,
    shutdown: watch::Sender<bool>,
    drain: watch::Sender<bool>,
    /// While draining: circuits still open.
    open_circuits: watch::Receiver<Option<i64>>,
    tasks: JoinSet<TaskEnd>,
    names: HashMap<task::Id, String>,
    faults: mpsc::UnboundedSender<Fault>,
}

impl Server {
    /// Bind the QUIC and HTTP listeners and start the relay. Returns once every
    /// listener is bound, so `READY=1` and the banner can follow.
    pub async fn spawn(key: Keypair, config: Config) -> Result<Server, SpawnError> {
        let mut registry = Registry::default();
        let metrics = RelayMetrics::register(&mut registry);
        let libp2p_metrics = libp2p::metrics::Metrics::new(&mut registry);

        let l = &config.relay;
        let circuits = Arc::new(Circuits {
            bytes: metrics.circuit_bytes.clone(),
            rates: Rates::new(l.max_circuit_rate, l.max_relay_rate),
            wire_limit: l.wire_limit,
        });
        let admission = Admission::new(
            HostCaps {
                per_host: (l.max_reservations_per_host > 0).then_some(l.max_reservations_per_host),
                per_network: (l.max_reservations_per_network > 0)
                    .then_some(l.max_reservations_per_network),
            },
            l.max_relayed_bytes_per_day,
            metrics.circuit_bytes.clone(),
        );
        let transport = quic_transport(&key, &config)?;
        let swarm = build_swarm(&key, transport, circuits, &mut registry, |key| {
            Behaviour::new(key, &config, metrics.store.clone(), &admission)
        });
        let peer_id = *swarm.local_peer_id();

        let (snapshot_tx, snapshot) = watch::channel(Snapshot {
            peer_id,
            addresses: Vec::new(),
            listening: false,
        });
        let mut event_loop = EventLoop::new(
            swarm,
            config.clone(),
            metrics,
            libp2p_metrics,
            snapshot_tx,
            admission,
        );
        let heartbeat = event_loop.heartbeat();
        let faults = event_loop.faults();

        // QUIC: IPv4 first; IPv6 on the same port (the one IPv4 got, if 0 was asked).
        let mut quic_addrs = Vec::new();
        let v4 = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), config.port);
        let port = listen_quic(&mut event_loop, v4).await?;
        quic_addrs.push(SocketAddr::new(v4.ip(), port));
        let v6 = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port);
        // With IPv6 disabled by sysctl, binding `::` still works but nothing can be
        // sent or received there: that is a host without IPv6, not an error.
        let v6_off = ipv6_disabled();
        match check_bind(v6, Type::DGRAM) {
            Err(e) if ipv6_missing(&e) => {
                tracing::warn!("IPv6 unavailable ({e}); QUIC listens on IPv4 only");
            }
            _ if v6_off.is_some() => {
                let why = v6_off.as_deref().unwrap_or_default();
                tracing::warn!(
                    "IPv6 is disabled on this host ({why}); QUIC and HTTP listen on IPv4 only"
                );
            }
            _ => {
                let port = listen_quic(&mut event_loop, v6).await?;
                quic_addrs.push(SocketAddr::new(v6.ip(), port));
            }
        }

        // HTTP on both families, same port.
        let mut listeners = Vec::new();
        let v4 = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), config.http_port);
        let l4 = bind_tcp(v4).await?;
        let http_port = l4
            .local_addr()
            .map(|a| a.port())
            .unwrap_or(config.http_port);
        listeners.push(l4);
        if v6_off.is_none() {
            match bind_tcp(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), http_port)).await {
                Ok(l6) => listeners.push(l6),
                Err(SpawnError::BindHttp { source, .. }) if ipv6_missing(&source) => {
                    tracing::warn!("IPv6 unavailable ({source}); HTTP API listens on IPv4 only");
                }
                Err(e) => return Err(e),
            }
        }
        let http_addrs = listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();

        // Metrics on their own address (loopback by default), never on the public port.
        let metrics_listener =
            match config.metrics_address {
                None => None,
                Some(addr) if !config.metrics_address_required => match bind_tcp_once(addr) {
                    Ok(l) => Some(l),
                    Err(e) => {
                        tracing::warn!(
                            "metrics not served: cannot listen on {addr} ({e}); another relay on \
                         this host? set --metrics-address (or none)"
                        );
                        None
                    }
                },
                Some(addr) => Some(bind_retrying(|| bind_tcp_once(addr)).await.map_err(
                    |source| SpawnError::BindMetrics {
                        addr,
                        port: addr.port(),
                        source,
                    },
                )?),
            };
        let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());

        event_loop.start();

        let registry = Arc::new(registry);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let app = api::router(snapshot.clone(), heartbeat, defaults::EVENT_LOOP_STALL);
        let slots = api::Slots::new(
            defaults::HTTP_MAX_CONNECTIONS,
            defaults::HTTP_MAX_CONNECTIONS_PER_HOST,
        );
        let mut tasks = JoinSet::new();
        let mut names = HashMap::new();
        for l in listeners {
            let name = match l.local_addr() {
                Ok(addr) => format!("HTTP API on {addr}"),
                Err(_) => "HTTP API".to_owned(),
            };
            let serve = api::serve(l, app.clone(), slots.clone(), shutdown_rx.clone());
            let id = tasks.spawn(async { TaskEnd::Listener(serve.await) }).id();
            names.insert(id, name);
        }
        if let (Some(l), Some(addr)) = (metrics_listener, metrics_addr) {
            // Loopback by default: every scraper is one host, so it gets all the slots.
            let slots = api::Slots::new(
                defaults::METRICS_MAX_CONNECTIONS,
                defaults::METRICS_MAX_CONNECTIONS,
            );
            let router = api::metrics_router(registry.clone());
            let serve = api::serve(l, router, slots, shutdown_rx.clone());
            let id = tasks.spawn(async { TaskEnd::Listener(serve.await) }).id();
            names.insert(id, format!("metrics on {addr}"));
        }
        let (drain, drain_rx) = watch::channel(false);
        let (open_tx, open_circuits) = watch::channel(None);
        let run = event_loop.run(shutdown_rx, drain_rx, open_tx);
        let id = tasks.spawn(async { TaskEnd::EventLoop(run.await) }).id();
        names.insert(id, "event loop".to_owned());

        Ok(Server {
            peer_id,
            quic_addrs,
            http_addrs,
            metrics_addr,
            snapshot,
            registry,
            shutdown,
            drain,
            open_circuits,
            tasks,
            names,
            faults,
        })
    }

    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Bound QUIC sockets (IPv4 first).
    pub fn quic_addrs(&self) -> &[SocketAddr] {
        &self.quic_addrs
    }

    /// Bound HTTP sockets (IPv4 first).
    pub fn http_addrs(&self) -> &[SocketAddr] {
        &self.http_addrs
    }

    /// Where `/metrics` is served, if anywhere.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// A loopback address clients in the same host can dial, with `/p2p/`.
    pub fn loopback_multiaddr(&self) -> Multiaddr {
        Multiaddr::empty()
            .with(Protocol::Ip4(Ipv4Addr::LOCALHOST))
            .with(Protocol::Udp(self.quic_addrs[0].port()))
            .with(Protocol::QuicV1)
            .with(Protocol::P2p(self.peer_id))
    }

    /// The identity API base URL on loopback.
    pub fn loopback_http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_addrs[0].port())
    }

    /// Current addresses as the API lists them.
    pub fn addresses(&self) -> Vec<Multiaddr> {
        self.snapshot.borrow().addresses.clone()
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The supervisor: resolves when the first of the relay's tasks ends (none should
    /// while it runs), naming it and why. The others keep running until
    /// [`Server::shutdown`].
    pub async fn join(&mut self) -> Stopped {
        let Some(ended) = self.tasks.join_next_with_id().await else {
            return std::future::pending().await;
        };
        let (id, reason) = match ended {
            Ok((id, TaskEnd::EventLoop(Ok(stats)))) => (id, format!("ended ({stats})")),
            Ok((id, TaskEnd::EventLoop(Err(why)))) => (id, why),
            Ok((id, TaskEnd::Listener(Ok(())))) => (id, "ended".to_owned()),
            Ok((id, TaskEnd::Listener(Err(e)))) => {
                (id, format!("listening socket gone (accept: {e})"))
            }
            Err(e) if e.is_panic() => {
                let id = e.id();
                let panic = e.into_panic();
                let text = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".to_owned());
                (id, format!("panicked: {text}"))
            }
            Err(e) => (e.id(), "was cancelled".to_owned()),
        };
        let task = self.names.remove(&id).unwrap_or_else(|| "task".to_owned());
        Stopped { task, reason }
    }

    /// Inject a fault into the running relay (tests only: they check that the relay
    /// notices it as it would the real one).
    #[doc(hidden)]
    pub fn inject(&self, fault: Fault) {
        let _ = self.faults.send(fault);
    }

    /// Stop offering the relay (no new reservations or circuits) and wait until the
    /// open circuits have ended, at most `grace`. Returns the circuits still open then.
    pub async fn drain(&mut self, grace: std::time::Duration) -> i64 {
        let _ = self.drain.send(true);
        let mut open = self.open_circuits.clone();
        let _ = tokio::time::timeout(grace, open.wait_for(|c| *c == Some(0))).await;
        open.borrow().unwrap_or(0)
    }

    /// Stop accepting, let in-flight HTTP requests finish, close the swarm; returns the
    /// final counters (empty if the event loop has already ended).
    pub async fn shutdown(mut self) -> Stats {
        let _ = self.shutdown.send(true);
        let mut stats = Stats::default();
        while let Some(ended) = self.tasks.join_next().await {
            if let Ok(TaskEnd::EventLoop(Ok(s))) = ended {
                stats = s;
            }
        }
        stats
    }
}

/// The swarm over the relay's QUIC transport, every connection wrapped so its
/// circuits are counted and shaped.
fn build_swarm<B: NetworkBehaviour>(
    key: &Keypair,
    transport: quic::Transport,
    circuits: Arc<Circuits>,
    registry: &mut Registry,
    behaviour: impl FnOnce(&Keypair) -> B,
) -> Swarm<B> {
    SwarmBuilder::with_existing_identity(key.clone())
        .with_tokio()
        .with_other_transport(|_| {
            transport.map(move |(peer, connection), _| {
                (peer, circuits::Muxer::new(connection, circuits.clone()))
            })
        })
        .unwrap_or_else(|never| match never {})
        .with_bandwidth_metrics(registry)
        .with_behaviour(behaviour)
        .unwrap_or_else(|never| match never {})
        .with_swarm_config(|c| c.with_idle_connection_timeout(defaults::IDLE_CONNECTION_TIMEOUT))
        .build()
}

/// The relay's QUIC transport (src/quic/).
fn quic_transport(key: &Keypair, config: &Config) -> Result<quic::Transport, SpawnError> {
    let c = quic::Config {
        segmentation_offload: config.quic_gso,
        max_handshakes: config.quic_max_handshakes,
        ..quic::Config::new()
    };
    tracing::info!("QUIC cipher suites: {}", c.cipher_order.describe());
    quic::Transport::new(key, c).map_err(SpawnError::Quic)
}

fn quic_multiaddr(addr: SocketAddr) -> Multiaddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) => Protocol::Ip4(ip),
        IpAddr::V6(ip) => Protocol::Ip6(ip),
    };
    Multiaddr::empty()
        .with(ip)
        .with(Protocol::Udp(addr.port()))
        .with(Protocol::QuicV1)
}

/// Listen for QUIC on `addr`; returns the bound port.
async fn listen_quic(event_loop: &mut EventLoop, addr: SocketAddr) -> Result<u16, SpawnError> {
    let err = |source| SpawnError::BindQuic {
        addr,
        port: addr.port(),
        source,
    };
    let grace = InUseGrace::new();
    let bound = loop {
        // libp2p wraps the OS error; binding once ourselves first yields a precise one.
        // The listen binds again, and the probe's port can still be held then: a
        // process that forks meanwhile (a child holds every descriptor until it execs)
        // keeps the probe's socket open for a moment. Both get the same grace.
        let attempt = match check_bind(addr, Type::DGRAM) {
            Ok(()) => event_loop
                .listen(quic_multiaddr(addr))
                .await
                .map_err(|e| match e {
                    libp2p::TransportError::Other(e) if in_use(&e) => {
                        io::Error::new(io::ErrorKind::AddrInUse, error_chain(&e))
                    }
                    e => io::Error::other(error_chain(&e)),
                }),
            Err(e) => Err(e),
        };
        match attempt {
            Ok(bound) => break bound,
            Err(e) if grace.allows_another_try(&e).await => {}
            Err(e) => return Err(err(e)),
        }
    };
    Ok(bound
        .iter()
        .find_map(|a| {
            a.iter().find_map(|p| match p {
                Protocol::Udp(port) => Some(port),
                _ => None,
            })
        })
        .unwrap_or(addr.port()))
}

/// Whether `e` is, or wraps, an "address in use" error. libp2p boxes the transport's
/// error into an `io::Error` of kind `Other` and, on the way, into an `Either` whose
/// `source()` skips its inner error, so past the kinds the OS's own text is looked for.
fn in_use(e: &io::Error) -> bool {
    if e.kind() == io::ErrorKind::AddrInUse {
        return true;
    }
    let os_text = io::Error::from_raw_os_error(libc::EADDRINUSE).to_string();
    let mut cur = e
        .get_ref()
        .map(|inner| inner as &(dyn std::error::Error + 'static));
    while let Some(inner) = cur {
        if let Some(io) = inner.downcast_ref::<io::Error>() {
            return in_use(io);
        }
        if inner.to_string() == os_text {
            return true;
        }
        cur = inner.source();
    }
    false
}

fn new_socket(addr: SocketAddr, ty: Type) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), ty, None)?;
    if addr.is_ipv6() {
        // Separate IPv4 and IPv6 sockets, as libp2p-quic does, so both can bind.
        socket.set_only_v6(true)?;
    }
    Ok(socket)
}

fn check_bind(addr: SocketAddr, ty: Type) -> io::Result<()> {
    new_socket(addr, ty)?.bind(&addr.into())
}

fn bind_tcp_once(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = new_socket(addr, Type::STREAM)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

async fn bind_tcp(addr: SocketAddr) -> Result<TcpListener, SpawnError> {
    bind_retrying(|| bind_tcp_once(addr))
        .await
        .map_err(|source| SpawnError::BindHttp {
            addr,
            port: addr.port(),
            source,
        })
}

/// Bind, giving a port that is in use [`defaults::BIND_IN_USE_GRACE`] to come free
/// ([`InUseGrace`]). A port that stays in use is reported as before, only later.
async fn bind_retrying<T>(mut bind: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let grace = InUseGrace::new();
    loop {
        match bind() {
            Err(e) if grace.allows_another_try(&e).await => {}
            other => return other,
        }
    }
}

/// The time a port in use gets to come free: the kernel closes a dead process's
/// sockets only while it tears the process down, so a relay started right after the
/// previous one was killed can find its ports still taken for a moment (measured: 1
/// start in 200 right after SIGKILL).
struct InUseGrace {
    deadline: tokio::time::Instant,
}

impl InUseGrace {
    fn new() -> Self {
        Self {
            deadline: tokio::time::Instant::now() + defaults::BIND_IN_USE_GRACE,
        }
    }

    /// Whether a bind that failed with `e` may be tried again (after a pause): only a
    /// port in use, and only within the grace.
    async fn allows_another_try(&self, e: &io::Error) -> bool {
        if e.kind() != io::ErrorKind::AddrInUse || tokio::time::Instant::now() >= self.deadline {
            return false;
        }
        tracing::debug!("{e}; trying again");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        true
    }
}

/// An error with its causes, `a: b: c`; an error whose text is empty (some of
/// libp2p's) is shown by its debug form, so a message never ends in nothing.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = err.source();
    }
    if parts.is_empty() {
        parts.push(format!("{e:?}"));
    }
    parts.join(": ")
}

/// Why IPv6 counts as off on this host, if it does: disabled by sysctl for all
/// interfaces or for loopback (VPS images often set
/// `net.ipv6.conf.all.disable_ipv6=1`), or no IPv6 in the kernel at all.
fn ipv6_disabled() -> Option<String> {
    for name in ["all", "lo"] {
        let path = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
        match std::fs::read_to_string(&path) {
            Ok(v) if v.trim() == "1" => {
                return Some(format!("net.ipv6.conf.{name}.disable_ipv6=1"));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound && name == "all" => {
                return Some("no IPv6 in this kernel".into());
            }
            Err(_) => {}
        }
    }
    None
}

/// The host has no IPv6 (module not loaded, disabled by sysctl, no address).
fn ipv6_missing(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL | libc::EPROTONOSUPPORT)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listen on a port in use fails with an error `in_use` recognises, through
    /// every wrapper libp2p's swarm puts around the transport's: the listen that
    /// follows the probe is retried on exactly that.
    #[tokio::test]
    async fn a_listen_on_a_port_in_use_is_recognised_as_such() {
        let key = Keypair::generate_ed25519();
        let config = Config::try_from(&crate::config::RunArgs::default()).unwrap();
        let mut registry = Registry::default();
        let metrics = RelayMetrics::register(&mut registry);
        let circuits = Arc::new(Circuits {
            bytes: metrics.circuit_bytes.clone(),
            rates: Rates::new(0, 0),
            wire_limit: None,
        });
        let transport = quic_transport(&key, &config).unwrap();
        let mut swarm = build_swarm(&key, transport, circuits, &mut registry, |_| {
            libp2p::swarm::dummy::Behaviour
        });
        let held = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let addr = held.local_addr().unwrap();
        match swarm.listen_on(quic_multiaddr(addr)) {
            Err(libp2p::TransportError::Other(e)) => assert!(in_use(&e), "{e:?}"),
            other => panic!("a listen on a held port: {other:?}"),
        }
        // Another failure is not taken for one.
        let other = io::Error::other(io::Error::from(io::ErrorKind::PermissionDenied));
        assert!(!in_use(&other));
        assert!(in_use(&io::Error::from(io::ErrorKind::AddrInUse)));
    }
}
