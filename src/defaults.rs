//! Every default the relay ships with, each with the reason it has this value.
//!
//! The command line (`config.rs`) and the README quote these; change them here.

use std::time::Duration;

/// UDP port for QUIC v1. PrivStack clients dial `/udp/4001/quic-v1` (SPEC §3).
pub const PORT: u16 = 4001;

/// TCP port of the HTTP identity API (SPEC §1).
pub const HTTP_PORT: u16 = 4002;

/// Identity key file, relative to the working directory, as the original relay used.
pub const IDENTITY_FILE: &str = "relay-identity.key";

/// identify protocol version; clients match on it.
pub const PROTOCOL_VERSION: &str = "/privstack/relay/1.0.0";

/// identify agent version: `privstack-relay/<crate version>`.
pub const AGENT_VERSION: &str = concat!("privstack-relay/", env!("CARGO_PKG_VERSION"));

/// Kademlia protocol name: rust-libp2p's and IPFS's default, which PrivStack clients use.
pub const KAD_PROTOCOL: &str = "/ipfs/kad/1.0.0";

/// Kademlia query timeout (SPEC §1).
pub const KAD_QUERY_TIMEOUT: Duration = Duration::from_secs(60);

/// Records held in memory. One record is one sync group; the original's 1,024 (the
/// `MemoryStore` default) filled up on a busy relay. 65,536 holds more than the 50,000
/// sync groups the relay is sized for, and with `KAD_MAX_VALUE_BYTES` bounds the store
/// at about 290 MiB in the worst case (typical records are ~300 bytes: ~25 MiB).
pub const KAD_MAX_RECORDS: usize = 65_536;

/// How long the relay keeps a record after its last `put`: rust-libp2p's default record
/// TTL. PrivStack clients re-publish every 30 s, so this only decides how long a group
/// whose devices have all gone stays findable.
pub const KAD_RECORD_TTL: Duration = Duration::from_secs(48 * 60 * 60);

/// Largest record value accepted. A PrivStack record is JSON
/// `{"device_name","addresses","timestamp"}`: under 1.5 KiB even with a dozen addresses,
/// so 4 KiB covers it with room while keeping the worst-case store small.
pub const KAD_MAX_VALUE_BYTES: usize = 4 * 1024;

/// Longest key accepted. PrivStack's keys are 53 bytes (`/privstack/syncgroup/` and a
/// SHA-256); IPFS and js-libp2p keys (multihashes, `/ipns/`, `/pk/`) are under 50.
/// 128 leaves room while keeping a full store's worst case small (README, "Records").
pub const KAD_MAX_KEY_BYTES: usize = 128;

/// Provider records held (js-libp2p and IPFS peers announce content with them;
/// PrivStack does not use them). Each is a key and a few addresses.
pub const KAD_MAX_PROVIDERS: usize = 65_536;

/// Providers kept per key: Kademlia's replication factor, as libp2p's store keeps.
pub const KAD_PROVIDERS_PER_KEY: usize = 20;

/// Records one peer may hold. A PrivStack device holds one per sync group it is in
/// (most are in one or two); 64 leaves room without letting one key fill the store.
pub const KAD_MAX_RECORDS_PER_PEER: usize = 64;

/// Records the peers behind one IPv4 address (IPv6 /64) may hold: a household or an
/// office behind one NAT, a few dozen devices with a few groups each; 1,024 also
/// leaves room for a small CGNAT pool sharing one address. One host so holds at most
/// 1/64 of the default store.
pub const KAD_MAX_RECORDS_PER_HOST: usize = 1024;

/// Records the peers of one IPv4 /24 (IPv6 /48) may hold: 1/16 of the default store.
pub const KAD_MAX_RECORDS_PER_NETWORK: usize = 4096;

/// Largest Kademlia message rust-libp2p accepts (its default `max_packet_size`).
pub const KAD_MAX_MESSAGE_BYTES: usize = 16 * 1024;

/// Addresses the relay keeps in its routing table per peer. A device has a handful of
/// interfaces; libp2p's identify keeps a bounded set of its own too.
pub const ROUTING_MAX_ADDRS_PER_PEER: usize = 16;

/// Bytes of (binary multiaddr) addresses per peer. The largest Kademlia answer is a
/// `GET_PROVIDERS` reply with 20 providers and 20 closer peers: 40 entries of a 38-byte
/// peer ID, up to 256 bytes of addresses and protobuf framing (~2 bytes per field) stay
/// under 14 KiB, inside the 16 KiB rust-libp2p clients accept; a `GET_VALUE` reply (20
/// peers and a record of at most 128 + 4,096 bytes) likewise. 256 bytes are 12 IPv6 or
/// 28 IPv4 QUIC addresses.
pub const ROUTING_MAX_ADDR_BYTES_PER_PEER: usize = 256;

/// identify updates per peer and minute that change the routing table; later ones
/// wait (the latest is applied when the minute has passed). A device sends one when
/// it connects and one per change of its interfaces.
pub const ROUTING_MAX_IDENTIFY_PER_MINUTE: usize = 10;

/// How often the relay re-bootstraps Kademlia (refreshes its buckets and reconnects to
/// `--bootstrap` relays). Five minutes keeps a federation joined after a peer restarts
/// without generating noticeable traffic.
pub const BOOTSTRAP_INTERVAL: Duration = Duration::from_secs(5 * 60);

/// Total reservations held at once. Each reservation is one idle QUIC connection
/// (tens of KiB), so 4,096 fits a 512 MiB VPS with room for circuits; libp2p's default
/// of 128 turns clients away on any real deployment.
pub const MAX_RESERVATIONS: usize = 4096;

/// Reservations per peer (libp2p's default): a client renews on its connection and
/// rarely needs more than one or two.
pub const MAX_RESERVATIONS_PER_PEER: usize = 4;

/// Reservation lifetime (libp2p's default); clients renew before it ends.
pub const RESERVATION_DURATION_SECS: u64 = 60 * 60;

/// Circuits open at once. Circuits carry whole syncs between symmetric-NAT peers, so
/// this is far above libp2p's 16, while bounded so a burst cannot exhaust memory.
pub const MAX_CIRCUITS: usize = 512;

/// Circuits per peer: a device syncing with several group members at once.
pub const MAX_CIRCUITS_PER_PEER: usize = 16;

/// Circuit lifetime: none (0). js-libp2p and go-libp2p treat a circuit whose
/// reservation announces any limit as *limited*: they run only a few protocols on it
/// and close or replace it, which broke 64 MiB transfers through the relay. So by
/// default no `Limit` is announced, and the relay protects itself by rate instead
/// ([`MAX_CIRCUIT_RATE`], [`MAX_RELAY_RATE`]) and by the idle timeout of its
/// connections.
pub const MAX_CIRCUIT_DURATION_SECS: u64 = 0;

/// Bytes per circuit, both directions together: none (0), for the reason given at
/// [`MAX_CIRCUIT_DURATION_SECS`].
pub const MAX_CIRCUIT_BYTES: u64 = 0;

/// Bytes per second one circuit may move in each direction: 8 MiB/s (about 67 Mbit/s)
/// lets a 1 GiB sync cross in about two minutes while a few circuits cannot take a
/// small VPS's uplink.
pub const MAX_CIRCUIT_RATE: &str = "8MiB";

/// Bytes per second all circuits together may move (both directions): 32 MiB/s (about
/// 270 Mbit/s), a quarter of a 1 Gbit/s VPS port, so circuits never starve the DHT
/// traffic every connected device depends on.
pub const MAX_RELAY_RATE: &str = "32MiB";

/// Bytes relayed per UTC day before new circuits are refused: off (0), since
/// bandwidth bills differ too much for one default (README: how to size it).
pub const MAX_RELAYED_BYTES_PER_DAY: u64 = 0;

/// Established connections in total: reservations, circuits and DHT-only clients
/// (each client is one QUIC connection). Bounds memory under a connection flood.
pub const MAX_CONNECTIONS: u32 = 8192;

/// Established connections per peer: a client, its reconnect racing the old
/// connection, and a relayed dial need no more.
pub const MAX_CONNECTIONS_PER_PEER: u32 = 8;

/// Established connections from one host (an IPv4 address, an IPv6 /64). A household
/// behind one NAT, or a CGNAT address shared by dozens of households, stays far below
/// it (each device holds one connection); one host cannot fill
/// [`MAX_CONNECTIONS`] (a thirty-second of it).
pub const MAX_CONNECTIONS_PER_HOST: u32 = 256;

/// Established connections from one network (an IPv4 /24, an IPv6 /48): an eighth of
/// [`MAX_CONNECTIONS`], so a flood must come from many networks to fill the relay.
pub const MAX_CONNECTIONS_PER_NETWORK: u32 = 1024;

/// Peers of one host (IPv4 address, IPv6 /64) holding reservations at once: a
/// household or a CGNAT address has room, one host cannot take more than 1/64 of
/// [`MAX_RESERVATIONS`].
pub const MAX_RESERVATIONS_PER_HOST: usize = 64;

/// Peers of one network (IPv4 /24, IPv6 /48) holding reservations at once.
pub const MAX_RESERVATIONS_PER_NETWORK: usize = 256;

/// Streams a client may have open at once on its QUIC connection. quinn sets up state
/// for every allowed stream when a connection starts, so libp2p-quic's 256 cost about
/// 18 KiB per connection, a fifth of an idle reservation (BENCHMARKS.md). 96 covers
/// what a client uses at once: 16 circuits in each direction (one stream each),
/// Kademlia's 32 concurrent requests, identify and ping; and 96 entries take the same
/// hash-table size in quinn's per-stream maps as 64 would.
pub const QUIC_MAX_STREAMS_PER_CONNECTION: u32 = 96;

/// The relay pings a QUIC connection only after this long without hearing from the
/// peer. libp2p's QUIC peers ping every 5 s themselves (which also keeps their NAT
/// mapping open), and every packet received restarts this timer, so the relay sends no
/// pings of its own to them: at rest a device costs the relay its own pings and their
/// acknowledgements, 24 packets a minute instead of 31 with libp2p-quic's 5 s on both
/// ends (BENCHMARKS.md, "What configuration reaches"). A peer that does not ping (or
/// pings less often) still gets one before libp2p-quic's 10 s idle timeout closes the
/// connection.
pub const QUIC_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(8);

/// Receive buffer the relay asks for on its QUIC sockets.
/// With the kernel's usual 208 KiB, 2,000 devices coming online 64 at a time overflowed
/// it (1,200 datagrams dropped, BENCHMARKS.md), and each drop costs its handshake a
/// 1 s retransmission timeout; with 4 MiB none were dropped and the slowest 1% of
/// setups took 167 ms instead of 1.1 s. The kernel caps it at `net.core.rmem_max`
/// (the .deb and the images raise that; the relay warns when it is capped). It is a
/// bound, not an allocation: memory is used only while datagrams queue.
pub const QUIC_SOCKET_RECV_BUFFER: usize = 4 << 20;

/// Handshakes the relay's QUIC transport runs at once; later connection attempts wait unanswered in quinn's queue until one finishes. At
/// 512 simultaneous dials on a busy machine none timed out, against 41 with
/// libp2p-quic, which runs them all at once (BENCHMARKS.md).
pub const QUIC_MAX_HANDSHAKES: usize = 64;

/// QUIC handshakes in progress at once; bounds the CPU a handshake flood can take.
pub const MAX_PENDING_INCOMING: u32 = 512;

/// A connection with no open streams is closed after this long. Two minutes outlasts
/// the clients' 30-second record re-publication, so an active client keeps one
/// connection instead of re-handshaking every time.
pub const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(120);

/// How often the counters are logged.
pub const STATS_LOG_INTERVAL: Duration = Duration::from_secs(5 * 60);

/// Distinct networks (IPv4 /24, IPv6 /48) whose peers must report the same observed
/// address before the relay adopts it as its own external address (when no
/// `--external-address` is given). Peer IDs are free to mint; networks are not.
pub const OBSERVED_ADDR_NETWORKS: usize = 3;

/// Observed-address candidates remembered at once (src/external.rs evicts the one
/// with the fewest networks behind it).
pub const OBSERVED_ADDR_CANDIDATES: usize = 64;

/// Longest a reservation's acceptance waits for the client's identify report of where
/// it sees the relay, when the relay knows no other address that client could dial
/// (src/offer/relay.rs). Identify answers within a round trip of the connection.
pub const OFFER_WAIT_FOR_OBSERVED: Duration = Duration::from_secs(3);

/// Unique peers counted exactly; beyond this `peers_served` switches to a 16 KiB
/// HyperLogLog estimate (about 1% error) so the count never costs more than ~2 MiB.
pub const UNIQUE_PEERS_EXACT_LIMIT: usize = 100_000;

/// HTTP: time a client gets to send a complete request head (slowloris guard).
pub const HTTP_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP: time a request may take end to end.
pub const HTTP_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP: time a new connection gets to send its first byte. Real clients send their
/// request at once; a connection that sends nothing only holds a slot.
pub const HTTP_FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(2);

/// HTTP: connections served at once; more wait in the kernel's accept queue. Each
/// costs a descriptor and a few KiB; the unit's `LimitNOFILE=` is far above this.
pub const HTTP_MAX_CONNECTIONS: usize = 512;

/// HTTP: connections served at once from one host (an IPv4 address or an IPv6 /64);
/// more are answered 429 and closed. Identity and health requests take milliseconds,
/// so even a household or a CGNAT of devices behind one address rarely holds more
/// than a few at once, and one host cannot take the slots of everyone else.
pub const HTTP_MAX_CONNECTIONS_PER_HOST: usize = 32;

/// HTTP: largest request body accepted. The API is GET-only, so anything bigger is
/// rejected with 413 before it is read.
pub const HTTP_MAX_BODY_BYTES: usize = 4 * 1024;

/// Time given to in-flight HTTP requests and the swarm to finish on shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// How long a port found in use at startup may take to come free before that is an
/// error: a process killed just before may still hold it while the kernel tears it down
/// (its memory goes first, so a big process takes longer). Three seconds covers that and
/// stays well inside systemd's start timeout.
pub const BIND_IN_USE_GRACE: Duration = Duration::from_secs(3);

/// How often the event loop beats (its heartbeat, read by `/healthz`; systemd's watchdog
/// is fed from the same timer, at least this often).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// `/healthz` answers 503 when the event loop has not gone round for this long: ten
/// missed beats, far beyond any single event's work on a healthy relay.
pub const EVENT_LOOP_STALL: Duration = Duration::from_secs(10);

/// Where `/metrics` is served: loopback only, a port of its own, so the firewall's open
/// API port never shows the relay's internals to the world. Scrape it locally or put a
/// reverse proxy / SSH tunnel in front.
pub const METRICS_ADDRESS: &str = "127.0.0.1:4003";

/// Connections the metrics endpoint serves at once: a scraper or two.
pub const METRICS_MAX_CONNECTIONS: usize = 16;

/// Seconds open circuits get on SIGTERM. Long enough for a sync in flight to finish,
/// short enough for a restart during an upgrade; the unit's `TimeoutStopSec=` (30 s)
/// covers it plus the 4 s shutdown.
pub const DRAIN_GRACE_SECS: u64 = 20;

/// The longest drain grace accepted: beyond the unit's `TimeoutStopSec=` systemd would
/// kill the relay mid-drain anyway (raise both together).
pub const DRAIN_GRACE_MAX_SECS: u64 = 3600;

/// Log lines queued for stderr before new ones are dropped (and counted): a burst of a
/// few seconds at debug level; a stderr nobody reads costs lines, never the relay.
pub const LOG_QUEUE_LINES: usize = 4096;
