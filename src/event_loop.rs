//! The task that owns the [`Swarm`]: a thin driver that feeds swarm events to the
//! policies and applies what they decide.
//!
//! The decisions live in their own modules, each testable without a swarm: who enters
//! the routing table ([`crate::routing`]), what the store keeps ([`crate::record_store`],
//! inside Kademlia), which observed address the relay adopts ([`crate::external`]).
//! Nothing else touches the swarm: the HTTP side reads [`Snapshot`]s published on a
//! watch channel and the shared metrics registry.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::core::transport::ListenerId;
use libp2p::metrics::{Metrics as Libp2pMetrics, Recorder};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::{Multiaddr, PeerId, Swarm, identify, kad, relay};
use tokio::sync::{mpsc, watch};

use crate::addrs;
use crate::admission::Admission;
use crate::behaviour::{Behaviour, BehaviourEvent};
use crate::config::Config;
use crate::defaults;
use crate::denials::Denials;
use crate::external::ObservedAddrs;
use crate::metrics::{RelayMetrics, UniquePeers};
use crate::notify;
use crate::record_store::Refusal;
use crate::routing::{Action, RoutingPolicy};
use crate::state::{Heartbeat, Snapshot, Stats, stopped};

pub struct EventLoop {
    pub(crate) swarm: Swarm<Behaviour>,
    config: Config,
    metrics: RelayMetrics,
    libp2p_metrics: Libp2pMetrics,
    unique_peers: UniquePeers,
    routing: RoutingPolicy,
    /// Active reservations per peer.
    reservations: HashMap<PeerId, u32>,
    /// The relay's rate tables and per-host reservation counts (src/admission.rs).
    admission: Admission,
    /// When each open circuit opened, per (source, destination); entries go when
    /// their circuits close, so this is bounded by `--max-circuits`.
    circuits_opened: HashMap<(PeerId, PeerId), VecDeque<Instant>>,
    /// Concrete addresses per QUIC listener.
    listeners: HashMap<ListenerId, Vec<Multiaddr>>,
    /// Wildcard addresses we asked to listen on, per listener.
    listen_requests: HashMap<ListenerId, Multiaddr>,
    observed: ObservedAddrs,
    snapshot: watch::Sender<Snapshot>,
    /// Bootstrap relays given by name: their addresses as just resolved.
    resolved_tx: mpsc::UnboundedSender<(PeerId, Vec<Multiaddr>)>,
    resolved_rx: mpsc::UnboundedReceiver<(PeerId, Vec<Multiaddr>)>,
    heartbeat: Heartbeat,
    denials: Denials,
    /// Set when something the relay cannot run without has gone (a QUIC listener);
    /// the loop ends with it.
    fatal: Option<String>,
    faults_tx: mpsc::UnboundedSender<Fault>,
    faults_rx: mpsc::UnboundedReceiver<Fault>,
}

/// Faults a test can inject into a running loop, to check that the relay notices them
/// as it would the real ones.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Close the first QUIC listener, as a dead socket would.
    CloseQuicListener,
}

impl EventLoop {
    pub fn new(
        swarm: Swarm<Behaviour>,
        config: Config,
        metrics: RelayMetrics,
        libp2p_metrics: Libp2pMetrics,
        snapshot: watch::Sender<Snapshot>,
        admission: Admission,
    ) -> Self {
        let routing = RoutingPolicy::new(config.bootstrap.iter().map(|(p, _)| *p));
        let (resolved_tx, resolved_rx) = mpsc::unbounded_channel();
        let (faults_tx, faults_rx) = mpsc::unbounded_channel();
        Self {
            swarm,
            config,
            metrics,
            libp2p_metrics,
            unique_peers: UniquePeers::default(),
            routing,
            reservations: HashMap::new(),
            admission,
            circuits_opened: HashMap::new(),
            listeners: HashMap::new(),
            listen_requests: HashMap::new(),
            observed: ObservedAddrs::default(),
            snapshot,
            resolved_tx,
            resolved_rx,
            heartbeat: Heartbeat::default(),
            denials: Denials::default(),
            fatal: None,
            faults_tx,
            faults_rx,
        }
    }

    pub fn peer_id(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    /// Where [`Fault`]s are sent.
    pub(crate) fn faults(&self) -> mpsc::UnboundedSender<Fault> {
        self.faults_tx.clone()
    }

    /// The loop's heartbeat, for `/healthz`.
    pub fn heartbeat(&self) -> Heartbeat {
        self.heartbeat.clone()
    }

    /// Start a QUIC listener on a wildcard address and wait until it reports its
    /// bound addresses; returns them.
    pub async fn listen(
        &mut self,
        addr: Multiaddr,
    ) -> Result<Vec<Multiaddr>, libp2p::TransportError<std::io::Error>> {
        let id = self.swarm.listen_on(addr.clone())?;
        self.listen_requests.insert(id, addr);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(addrs) = self.listeners.get(&id).filter(|a| !a.is_empty()) {
                return Ok(addrs.clone());
            }
            match tokio::time::timeout_at(deadline, self.swarm.select_next_some()).await {
                Ok(event) => self.handle_swarm_event(event),
                Err(_) => {
                    return Err(libp2p::TransportError::Other(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "listener reported no address within 5 s",
                    )));
                }
            }
        }
    }

    /// Add configured external addresses and dial the bootstrap relays.
    pub fn start(&mut self) {
        for addr in self.config.external_addresses.clone() {
            self.swarm.add_external_address(addr);
        }
        self.bootstrap();
        self.publish();
    }

    /// Dial the `--bootstrap` relays the swarm is not connected to, and run a Kademlia
    /// bootstrap. Names are resolved again each time (off the event loop; the dial
    /// follows in [`Self::bootstrap_resolved`]).
    fn bootstrap(&mut self) {
        if self.config.bootstrap.is_empty() {
            return;
        }
        for (peer, addr) in self.config.bootstrap.clone() {
            if addrs::is_dns(&addr) {
                let tx = self.resolved_tx.clone();
                tokio::spawn(async move {
                    match addrs::resolve(&addr).await {
                        Ok(resolved) => {
                            let _ = tx.send((peer, resolved));
                        }
                        Err(e) => tracing::warn!(%addr, "cannot resolve bootstrap relay: {e}"),
                    }
                });
                continue;
            }
            self.dial_bootstrap(peer, vec![addr]);
        }
        if let Err(e) = self.swarm.behaviour_mut().kad.bootstrap() {
            tracing::debug!("kademlia bootstrap: {e}");
        }
    }

    fn dial_bootstrap(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        for addr in &addrs {
            self.swarm
                .behaviour_mut()
                .kad
                .add_address(&peer, addr.clone());
        }
        if !self.swarm.is_connected(&peer) {
            let shown = addrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            let dial = DialOpts::peer_id(peer).addresses(addrs).build();
            if let Err(e) = self.swarm.dial(dial) {
                tracing::warn!(%peer, addresses = %shown, "cannot dial bootstrap relay: {e}");
            }
        }
    }

    /// A named bootstrap relay's addresses have been resolved.
    fn bootstrap_resolved(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        tracing::debug!(%peer, ?addrs, "bootstrap relay resolved");
        self.dial_bootstrap(peer, addrs);
        if let Err(e) = self.swarm.behaviour_mut().kad.bootstrap() {
            tracing::debug!("kademlia bootstrap: {e}");
        }
    }

    /// Run until `shutdown` fires; returns the final counters. When `drain` fires, the
    /// relay stops offering the hop protocol (no new reservations or circuits) and
    /// from then on keeps `open_circuits` at the number of circuits still open.
    ///
    /// Ends early with the reason when a QUIC listener closes: a relay that cannot
    /// accept connections must stop, so its supervisor (systemd) starts a new one.
    pub async fn run(
        mut self,
        mut shutdown: watch::Receiver<bool>,
        mut drain: watch::Receiver<bool>,
        open_circuits: watch::Sender<Option<i64>>,
    ) -> Result<Stats, String> {
        let mut draining = false;
        let mut stats_log = tokio::time::interval(self.config.stats_log_interval);
        stats_log.reset();
        let mut gauges = tokio::time::interval(Duration::from_secs(10));
        let mut bootstrap = tokio::time::interval(defaults::BOOTSTRAP_INTERVAL);
        bootstrap.reset();
        // The heartbeat (and systemd's watchdog) come from this loop's own timer: a loop
        // stuck in one event misses them, /healthz turns 503 and systemd restarts it.
        let watchdog = notify::watchdog_interval();
        let mut heartbeat =
            tokio::time::interval(watchdog.map_or(defaults::HEARTBEAT_INTERVAL, |w| {
                w.min(defaults::HEARTBEAT_INTERVAL)
            }));
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.handle_swarm_event(event),
                _ = stats_log.tick() => tracing::info!("{}", self.stats()),
                _ = gauges.tick() => {
                    self.update_gauges();
                    if let Some(summary) = self.denials.take_summary() {
                        tracing::info!("in the last {} s: {summary}", gauges.period().as_secs());
                    }
                }
                _ = bootstrap.tick() => self.bootstrap(),
                _ = heartbeat.tick() => {
                    self.heartbeat.beat();
                    if watchdog.is_some() && let Err(e) = notify::notify("WATCHDOG=1") {
                        tracing::warn!("sd_notify WATCHDOG=1 failed: {e}");
                    }
                }
                Some((peer, addrs)) = self.resolved_rx.recv() => self.bootstrap_resolved(peer, addrs),
                Some(fault) = self.faults_rx.recv() => self.inject(fault),
                _ = stopped(&mut shutdown) => break,
                _ = stopped(&mut drain), if !draining => {
                    draining = true;
                    self.swarm.behaviour_mut().relay.set_status(Some(relay::Status::Disable));
                    tracing::info!(
                        circuits = self.metrics.circuits.get(),
                        "draining: no new reservations or circuits"
                    );
                }
            }
            if let Some(why) = self.fatal.take() {
                tracing::error!("{why}; stopping ({})", self.stats());
                return Err(why);
            }
            if draining {
                let open = Some(self.metrics.circuits.get().max(0));
                open_circuits.send_if_modified(|c| std::mem::replace(c, open) != open);
            }
        }
        let stats = self.stats();
        tracing::info!("shutting down: {stats}");
        Ok(stats)
    }

    fn inject(&mut self, fault: Fault) {
        tracing::warn!(?fault, "injecting a fault");
        match fault {
            Fault::CloseQuicListener => {
                if let Some(id) = self.listen_requests.keys().next().copied() {
                    self.swarm.remove_listener(id);
                }
            }
        }
    }

    pub fn stats(&self) -> Stats {
        Stats {
            peers_served: self.metrics.peers_served.get(),
            relayed_connections: self.metrics.relayed_connections.get(),
            reservations: self.metrics.reservations.get(),
            circuits: self.metrics.circuits.get(),
            connections: self.metrics.connections.get(),
        }
    }

    fn update_routing_gauge(&mut self) {
        let kad = &mut self.swarm.behaviour_mut().kad;
        let peers: usize = kad.kbuckets().map(|b| b.num_entries()).sum();
        self.metrics.kad_routing_peers.set(peers as i64);
    }

    /// Tables sized by the largest crowd so far give their room back once it has gone
    /// (libp2p's and quinn's own tables cannot be reached; BENCHMARKS.md).
    fn shrink_tables(&mut self) {
        use crate::tables::shrink;
        self.routing.shrink();
        shrink(&mut self.reservations);
        shrink(&mut self.circuits_opened);
        let behaviour = self.swarm.behaviour_mut();
        behaviour.limits.shrink();
        behaviour.relay.shrink();
        behaviour.kad.shrink();
        behaviour.kad.store_mut().shrink();
    }

    fn update_gauges(&mut self) {
        let now = Instant::now();
        self.admission.prune(now);
        let actions = self.routing.tick(now);
        self.apply(actions);
        self.update_routing_gauge();
        let store = self.swarm.behaviour_mut().kad.store_mut();
        // Expired entries go now rather than only when room is needed, so the gauges
        // show what is live.
        store.purge(now);
        let (records, providers) = (store.record_count(), store.provider_count());
        let refusal = store.take_last_refusal();
        self.metrics.kad_records.set(records as i64);
        self.metrics.kad_providers.set(providers as i64);
        if let Some(why) = refusal {
            // Once per gauge interval at most, naming the setting that decides.
            match why {
                Refusal::Full => tracing::warn!(
                    records,
                    providers,
                    "kademlia store is full and refuses new entries (see --kad-max-records, --kad-max-providers)"
                ),
                Refusal::Quota => tracing::info!(
                    "kademlia store refused entries over a source's quota (see --kad-max-records-per-peer, -per-host, -per-network)"
                ),
                Refusal::TooLarge => {
                    tracing::debug!("kademlia store refused values over --kad-max-value-bytes")
                }
                Refusal::BadKey => {
                    tracing::debug!("kademlia store refused keys over --kad-max-key-bytes")
                }
            }
        }
        // After the purge, so the store's room follows what is live.
        self.shrink_tables();
    }

    /// Apply the routing policy's decisions to Kademlia.
    fn apply(&mut self, actions: Vec<Action>) {
        if actions.is_empty() {
            return;
        }
        let kad = &mut self.swarm.behaviour_mut().kad;
        for action in actions {
            match action {
                Action::Add(peer, addr) => {
                    kad.add_address(&peer, addr);
                }
                Action::Remove(peer, addr) => {
                    kad.remove_address(&peer, &addr);
                }
                Action::Forget(peer) => {
                    if kad.remove_peer(&peer).is_some() {
                        tracing::debug!(%peer, "removed from the routing table");
                    }
                }
            }
        }
        self.update_routing_gauge();
    }

    fn handle_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        self.libp2p_metrics.record(&event);
        match event {
            SwarmEvent::Behaviour(event) => self.handle_behaviour_event(event),
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                tracing::debug!(%address, "listening");
                self.listeners
                    .entry(listener_id)
                    .or_default()
                    .push(address.clone());
                // Link-local addresses need a scope and are useless to anyone else.
                if self.config.external_addresses.is_empty() && !addrs::is_link_local(&address) {
                    // Without a configured public address the relay's own listen
                    // addresses are the best it has: reservations must carry at least
                    // one, and libp2p only advertises the relay protocol once there is
                    // an external address.
                    self.swarm.add_external_address(address);
                }
                self.publish();
            }
            SwarmEvent::ExpiredListenAddr {
                listener_id,
                address,
            } => {
                if let Some(addrs) = self.listeners.get_mut(&listener_id) {
                    addrs.retain(|a| a != &address);
                }
                if self.config.external_addresses.is_empty() {
                    self.swarm.remove_external_address(&address);
                }
                self.publish();
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                addresses,
                reason,
            } => {
                if let Some(requested) = self.listen_requests.get(&listener_id) {
                    let port = self.listeners.get(&listener_id).and_then(|a| {
                        a.iter().flat_map(|a| a.iter()).find_map(|p| match p {
                            Protocol::Udp(port) => Some(port),
                            _ => None,
                        })
                    });
                    let on: Multiaddr = requested
                        .iter()
                        .map(|p| match (p, port) {
                            (Protocol::Udp(_), Some(port)) => Protocol::Udp(port),
                            (p, _) => p,
                        })
                        .collect();
                    self.fatal = Some(match &reason {
                        Ok(()) => format!("QUIC listener on {on} closed"),
                        Err(e) => format!("QUIC listener on {on} failed: {e}"),
                    });
                } else {
                    match reason {
                        Ok(()) => tracing::info!(?addresses, "listener closed"),
                        Err(e) => tracing::error!(?addresses, "listener failed: {e}"),
                    }
                }
                for a in self.listeners.remove(&listener_id).unwrap_or_default() {
                    self.swarm.remove_external_address(&a);
                }
                self.listen_requests.remove(&listener_id);
                self.publish();
            }
            SwarmEvent::ListenerError { error, .. } => {
                tracing::warn!("listener error: {error}");
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                self.metrics.connections.inc();
                let grown = self.unique_peers.insert(&peer_id);
                self.metrics.peers_served.inc_by(grown);
                let (remote, outbound) = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => (address, true),
                    ConnectedPoint::Listener { send_back_addr, .. } => (send_back_addr, false),
                };
                tracing::debug!(%peer_id, %remote, "connection established");
                let actions = self
                    .routing
                    .connected(peer_id, connection_id, remote, outbound);
                self.apply(actions);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } => {
                self.metrics.connections.dec();
                tracing::debug!(%peer_id, ?cause, "connection closed");
                if num_established == 0 {
                    let ended = self.reservation_ended(peer_id, u32::MAX);
                    self.metrics.reservation_event("closed", ended.into());
                }
                let actions = self
                    .routing
                    .disconnected(peer_id, connection_id, num_established);
                self.apply(actions);
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                tracing::debug!(%send_back_addr, "incoming connection failed: {error}");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(?peer_id, "outgoing connection failed: {error}");
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                tracing::info!(%address, "external address");
                self.publish();
            }
            SwarmEvent::ExternalAddrExpired { address } => {
                tracing::info!(%address, "external address removed");
                self.publish();
            }
            _ => {}
        }
    }

    fn handle_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            // Not recorded in libp2p's metrics: its identify recorder keeps a copy of
            // every connected peer's identify info (1.4 KiB per connected device) for
            // per-protocol gauges the relay does not need (BENCHMARKS.md).
            BehaviourEvent::Identify(event) => {
                if let identify::Event::Received {
                    peer_id,
                    connection_id,
                    info,
                } = event
                {
                    self.identified(peer_id, connection_id, info);
                }
            }
            BehaviourEvent::Relay(event) => {
                self.libp2p_metrics.record(&event);
                self.relay_event(event);
            }
            BehaviourEvent::Kad(event) => {
                self.libp2p_metrics.record(&event);
                match event {
                    kad::Event::RoutingUpdated { .. } | kad::Event::UnroutablePeer { .. } => {
                        self.update_routing_gauge()
                    }
                    kad::Event::OutboundQueryProgressed {
                        result: kad::QueryResult::Bootstrap(Err(e)),
                        ..
                    } => tracing::debug!("kademlia bootstrap failed: {e:?}"),
                    _ => {}
                }
            }
            BehaviourEvent::Ping(event) => self.libp2p_metrics.record(&event),
            BehaviourEvent::Limits(never) => match never {},
        }
    }

    fn identified(
        &mut self,
        peer: PeerId,
        connection: libp2p::swarm::ConnectionId,
        info: identify::Info,
    ) {
        tracing::debug!(
            %peer,
            agent = %info.agent_version,
            addrs = info.listen_addrs.len(),
            "identified"
        );
        // Where this client sees the relay: what its reservations may offer it.
        self.swarm
            .behaviour_mut()
            .relay
            .observed(connection, &info.observed_addr);
        let speaks_kad = info.protocols.contains(&self.config.kad_protocol);
        let now = Instant::now();
        let reporter = self.routing.remote(&peer, connection).cloned();
        let actions = self
            .routing
            .identified(peer, info.listen_addrs, speaks_kad, now);
        self.apply(actions);
        // Trust an address others see the relay at once peers from enough distinct
        // networks agree, unless the operator configured the external addresses.
        if !self.config.external_addresses.is_empty() {
            return;
        }
        let Some(reporter_ip) = reporter.as_ref().and_then(addrs::ip) else {
            return;
        };
        let observed = addrs::without_p2p(&info.observed_addr);
        if self.swarm.external_addresses().any(|a| a == &observed) {
            return;
        }
        if let Some(addr) = self.observed.observed(&observed, reporter_ip, now) {
            self.swarm.add_external_address(addr);
        }
    }

    fn relay_event(&mut self, event: relay::Event) {
        match event {
            relay::Event::ReservationReqAccepted {
                src_peer_id,
                renewed,
            } => {
                tracing::debug!(peer = %src_peer_id, renewed, "reservation accepted");
                if renewed {
                    self.metrics.reservation_event("renewed", 1);
                } else {
                    *self.reservations.entry(src_peer_id).or_default() += 1;
                    self.admission.host_reservations.confirm(&src_peer_id);
                    self.metrics.reservations.inc();
                    self.metrics.reservation_event("opened", 1);
                }
            }
            relay::Event::ReservationReqDenied {
                src_peer_id,
                status,
            } => {
                tracing::debug!(peer = %src_peer_id, ?status, "reservation denied");
                self.denied("reservation", format!("{status:?}"), src_peer_id);
            }
            relay::Event::ReservationTimedOut { src_peer_id } => {
                tracing::debug!(peer = %src_peer_id, "reservation expired");
                let ended = self.reservation_ended(src_peer_id, 1);
                self.metrics.reservation_event("expired", ended.into());
            }
            relay::Event::CircuitReqAccepted {
                src_peer_id,
                dst_peer_id,
            } => {
                tracing::debug!(src = %src_peer_id, dst = %dst_peer_id, "circuit opened");
                self.metrics.relayed_connections.inc();
                self.metrics.circuits.inc();
                self.circuits_opened
                    .entry((src_peer_id, dst_peer_id))
                    .or_default()
                    .push_back(Instant::now());
            }
            relay::Event::CircuitReqDenied {
                src_peer_id,
                dst_peer_id,
                status,
            } => {
                tracing::debug!(src = %src_peer_id, dst = %dst_peer_id, ?status, "circuit denied");
                self.denied("circuit", format!("{status:?}"), src_peer_id);
            }
            relay::Event::CircuitClosed {
                src_peer_id,
                dst_peer_id,
                error,
            } => {
                tracing::debug!(src = %src_peer_id, dst = %dst_peer_id, ?error, "circuit closed");
                self.metrics.circuits.dec();
                // Circuits between one pair end in the order they opened, near enough.
                let pair = (src_peer_id, dst_peer_id);
                if let Some(opened) = self.circuits_opened.get_mut(&pair) {
                    if let Some(at) = opened.pop_front() {
                        let secs = at.elapsed().as_secs_f64();
                        self.metrics.circuit_duration.observe(secs);
                    }
                    if opened.is_empty() {
                        self.circuits_opened.remove(&pair);
                    }
                }
            }
            relay::Event::StatusChanged { status } => {
                tracing::info!(?status, "relay protocol advertisement")
            }
            _ => {}
        }
    }

    fn denied(&mut self, kind: &'static str, reason: String, peer: PeerId) {
        self.metrics
            .denied
            .get_or_create(&vec![
                ("kind", kind.to_string()),
                ("reason", reason.clone()),
            ])
            .inc();
        self.denials.record(kind, reason, peer);
    }

    /// libp2p's relay reports `ReservationClosed` for every closing connection, with
    /// or without a reservation, and without saying which; so reservations are counted
    /// per peer and released when they expire or the peer's last connection closes.
    /// Returns how many were released.
    fn reservation_ended(&mut self, peer: PeerId, n: u32) -> u32 {
        let Some(count) = self.reservations.get_mut(&peer) else {
            return 0;
        };
        let n = n.min(*count);
        *count -= n;
        self.metrics.reservations.dec_by(i64::from(n));
        if *count == 0 {
            self.reservations.remove(&peer);
            self.admission.host_reservations.release(&peer);
        }
        n
    }

    /// Publish the addresses the API lists.
    fn publish(&mut self) {
        let configured = &self.config.external_addresses;
        let mut dialable: Vec<Multiaddr> = configured.clone();
        let mut others: Vec<Multiaddr> = self
            .swarm
            .external_addresses()
            .filter(|a| !configured.contains(a))
            .cloned()
            .collect();
        others.sort_by_key(addrs::reach);
        dialable.extend(others);
        let mut wildcard: Vec<Multiaddr> = self
            .listen_requests
            .iter()
            .filter_map(|(id, requested)| {
                let bound = self.listeners.get(id)?.first()?;
                let port = bound.iter().find_map(|p| match p {
                    Protocol::Udp(port) => Some(port),
                    _ => None,
                })?;
                Some(
                    requested
                        .iter()
                        .map(|p| match p {
                            Protocol::Udp(_) => Protocol::Udp(port),
                            p => p,
                        })
                        .collect(),
                )
            })
            .collect();
        wildcard.sort_by_key(|a| matches!(a.iter().next(), Some(Protocol::Ip6(_))));
        dialable.extend(wildcard);
        dialable.dedup();
        let snapshot = Snapshot {
            peer_id: self.peer_id(),
            addresses: dialable,
            listening: self.listeners.values().any(|a| !a.is_empty()),
        };
        self.snapshot.send_if_modified(|old| {
            let changed = *old != snapshot;
            *old = snapshot;
            changed
        });
    }
}
