//! Command line and the validated relay configuration.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use libp2p::{Multiaddr, PeerId, StreamProtocol, multiaddr::Protocol};

use crate::circuits::frames::WireLimit;
use crate::record_store::StoreLimits;
use crate::{addrs, defaults};

#[derive(Debug, Parser)]
#[command(
    name = "privstack-relay",
    version,
    about = "Stateless libp2p circuit relay and Kademlia bootstrap node for PrivStack clients",
    args_conflicts_with_subcommands = true,
    after_help = AFTER_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub run: RunArgs,
}

const AFTER_HELP: &str = "\
Every flag of the relay has the variable shown beside it; the command line wins over a
variable, and an empty variable (or an empty item of a comma-separated list) is unset.
Boolean variables take 1/0, true/false, yes/no or on/off.

Exit codes:
  0   stopped by SIGTERM/SIGINT/SIGQUIT, or --help / --version / check-config passed
  1   the relay failed at run time (a port in use, a listener that died), or a probe failed
  78  a settings error: unknown flag, bad value or variable, bad settings file line,
      unusable identity key file (the systemd unit does not restart on it)";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the identity key if it does not exist and print the peer ID.
    Keygen(KeygenArgs),
    /// Check a relay from the outside: identity API, QUIC dial, identify, reservation.
    Probe(ProbeArgs),
    /// Check the relay's settings and print every one (defaults included) as
    /// PRIVSTACK_RELAY_X=value lines; exit 78 naming the first bad one.
    CheckConfig(CheckConfigArgs),
}

#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// Read the settings from FILE, as systemd's EnvironmentFile= reads it (quotes,
    /// comments, continuation lines), instead of from this process's environment.
    #[arg(long, value_name = "FILE")]
    pub env_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Path of the ED25519 identity key file.
    #[arg(long, env = "PRIVSTACK_RELAY_IDENTITY", default_value = defaults::IDENTITY_FILE)]
    pub identity: PathBuf,
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Relay to check: its identity API URL (`http://host:4002`) or a QUIC multiaddr
    /// ending in `/p2p/<peer id>`.
    pub target: String,

    /// Seconds allowed for each step.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,

    /// Skip taking a relay reservation.
    #[arg(long)]
    pub no_reservation: bool,

    /// Debug-level logging.
    #[arg(short, long)]
    pub verbose: bool,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// UDP port for QUIC v1 on 0.0.0.0 and :: (0 picks a free port).
    #[arg(long, env = "PRIVSTACK_RELAY_PORT", default_value_t = defaults::PORT)]
    pub port: u16,

    /// TCP port of the HTTP API on 0.0.0.0 and :: (0 picks a free port).
    #[arg(long, env = "PRIVSTACK_RELAY_HTTP_PORT", default_value_t = defaults::HTTP_PORT)]
    pub http_port: u16,

    /// Path of the ED25519 identity key file (created on first run).
    #[arg(long, env = "PRIVSTACK_RELAY_IDENTITY", default_value = defaults::IDENTITY_FILE)]
    pub identity: PathBuf,

    /// Address of the Prometheus /metrics endpoint, kept off the public API port:
    /// IP:PORT, or `none` to serve no metrics.
    #[arg(
        long,
        env = "PRIVSTACK_RELAY_METRICS_ADDRESS",
        default_value = defaults::METRICS_ADDRESS,
        value_parser = parse_metrics_address
    )]
    pub metrics_address: MetricsAddress,

    /// Debug-level logging (RUST_LOG overrides). As a variable: 1/0, true/false, yes/no, on/off.
    #[arg(short, long, env = "PRIVSTACK_RELAY_VERBOSE")]
    pub verbose: bool,

    /// Publicly dialable address of this relay, e.g. /ip4/203.0.113.7/udp/4001/quic-v1
    /// (repeatable; comma-separated in the env var). Announced via identify, put in
    /// reservations, listed first by the identity API.
    #[arg(
        long = "external-address",
        env = "PRIVSTACK_RELAY_EXTERNAL_ADDRESS",
        value_delimiter = ','
    )]
    pub external_addresses: Vec<Multiaddr>,

    /// Another relay to join into one DHT, as a multiaddr ending in /p2p/<peer id>
    /// (repeatable; comma-separated in the env var).
    #[arg(
        long = "bootstrap",
        env = "PRIVSTACK_RELAY_BOOTSTRAP",
        value_delimiter = ','
    )]
    pub bootstrap: Vec<Multiaddr>,

    /// Kademlia protocol name.
    #[arg(long, env = "PRIVSTACK_RELAY_KAD_PROTOCOL", default_value = defaults::KAD_PROTOCOL)]
    pub kad_protocol: String,

    /// Kademlia records (sync groups) held in memory.
    #[arg(long, env = "PRIVSTACK_RELAY_KAD_MAX_RECORDS", default_value_t = defaults::KAD_MAX_RECORDS)]
    pub kad_max_records: usize,

    /// Largest Kademlia record value accepted, in bytes.
    #[arg(long, env = "PRIVSTACK_RELAY_KAD_MAX_VALUE_BYTES", default_value_t = defaults::KAD_MAX_VALUE_BYTES)]
    pub kad_max_value_bytes: usize,

    /// Longest Kademlia record or provider key accepted, in bytes.
    #[arg(long, env = "PRIVSTACK_RELAY_KAD_MAX_KEY_BYTES", default_value_t = defaults::KAD_MAX_KEY_BYTES)]
    pub kad_max_key_bytes: usize,

    /// Kademlia provider records held in memory.
    #[arg(long, env = "PRIVSTACK_RELAY_KAD_MAX_PROVIDERS", default_value_t = defaults::KAD_MAX_PROVIDERS)]
    pub kad_max_providers: usize,

    /// Records and provider records one peer may hold (0 = no quota).
    #[arg(long, env = "PRIVSTACK_RELAY_KAD_MAX_RECORDS_PER_PEER", default_value_t = defaults::KAD_MAX_RECORDS_PER_PEER)]
    pub kad_max_records_per_peer: usize,

    /// Records and provider records the peers of one host (IPv4 address, IPv6 /64) may
    /// hold together (0 = no quota).
    #[arg(long, env = "PRIVSTACK_RELAY_KAD_MAX_RECORDS_PER_HOST", default_value_t = defaults::KAD_MAX_RECORDS_PER_HOST)]
    pub kad_max_records_per_host: usize,

    /// Records and provider records the peers of one network (IPv4 /24, IPv6 /48) may
    /// hold together (0 = no quota).
    #[arg(long, env = "PRIVSTACK_RELAY_KAD_MAX_RECORDS_PER_NETWORK", default_value_t = defaults::KAD_MAX_RECORDS_PER_NETWORK)]
    pub kad_max_records_per_network: usize,

    /// Relay reservations held at once (0 = unlimited).
    #[arg(long, env = "PRIVSTACK_RELAY_MAX_RESERVATIONS", default_value_t = defaults::MAX_RESERVATIONS)]
    pub max_reservations: usize,

    /// Relay reservations per peer (0 = unlimited).
    #[arg(long, env = "PRIVSTACK_RELAY_MAX_RESERVATIONS_PER_PEER", default_value_t = defaults::MAX_RESERVATIONS_PER_PEER)]
    pub max_reservations_per_peer: usize,

    /// Lifetime of a reservation in seconds (clients renew it).
    #[arg(long, env = "PRIVSTACK_RELAY_RESERVATION_DURATION_SECS", default_value_t = defaults::RESERVATION_DURATION_SECS)]
    pub reservation_duration_secs: u64,

    /// Relay circuits open at once (0 = unlimited).
    #[arg(long, env = "PRIVSTACK_RELAY_MAX_CIRCUITS", default_value_t = defaults::MAX_CIRCUITS)]
    pub max_circuits: usize,

    /// Relay circuits per peer (0 = unlimited).
    #[arg(long, env = "PRIVSTACK_RELAY_MAX_CIRCUITS_PER_PEER", default_value_t = defaults::MAX_CIRCUITS_PER_PEER)]
    pub max_circuits_per_peer: usize,

    /// Lifetime of a circuit in seconds (0 = unlimited).
    #[arg(long, env = "PRIVSTACK_RELAY_MAX_CIRCUIT_DURATION_SECS", default_value_t = defaults::MAX_CIRCUIT_DURATION_SECS)]
    pub max_circuit_duration_secs: u64,

    /// Bytes a circuit may carry, both directions together (0 = unlimited). Any limit
    /// is announced to clients, and js-libp2p and go-libp2p then treat the circuit as
    /// limited. Sizes: plain bytes or K, M, G, Ki, Mi, Gi (e.g. 64MiB).
    #[arg(long, env = "PRIVSTACK_RELAY_MAX_CIRCUIT_BYTES", default_value_t = defaults::MAX_CIRCUIT_BYTES, value_parser = parse_bytes)]
    pub max_circuit_bytes: u64,

    /// Bytes per second one circuit moves in each direction (0 = unlimited); a faster
    /// circuit is slowed, not cut. Plain bytes or K, M, G, Ki, Mi, Gi (e.g. 4MiB).
    #[arg(long, env = "PRIVSTACK_RELAY_MAX_CIRCUIT_RATE", default_value = defaults::MAX_CIRCUIT_RATE, value_parser = parse_bytes)]
    pub max_circuit_rate: u64,

    /// Bytes per second all circuits together move, both directions (0 = unlimited).
    #[arg(long, env = "PRIVSTACK_RELAY_MAX_RELAY_RATE", default_value = defaults::MAX_RELAY_RATE, value_parser = parse_bytes)]
    pub max_relay_rate: u64,

    /// Bytes circuits may carry per UTC day; once reached, new circuits are refused until
    /// 00:00 UTC while open ones go on (0 = no budget).
    #[arg(long, env = "PRIVSTACK_RELAY_MAX_RELAYED_BYTES_PER_DAY", default_value_t = defaults::MAX_RELAYED_BYTES_PER_DAY, value_parser = parse_bytes)]
    pub max_relayed_bytes_per_day: u64,

    /// Peers of one host (IPv4 address, IPv6 /64) holding reservations at once
    /// (0 = unlimited).
    #[arg(long, env = "PRIVSTACK_RELAY_MAX_RESERVATIONS_PER_HOST", default_value_t = defaults::MAX_RESERVATIONS_PER_HOST)]
    pub max_reservations_per_host: usize,

    /// Peers of one network (IPv4 /24, IPv6 /48) holding reservations at once
    /// (0 = unlimited).
    #[arg(long, env = "PRIVSTACK_RELAY_MAX_RESERVATIONS_PER_NETWORK", default_value_t = defaults::MAX_RESERVATIONS_PER_NETWORK)]
    pub max_reservations_per_network: usize,

    /// Seconds open circuits get to end on SIGTERM, while the relay takes no new
    /// reservations or circuits (0 = stop at once).
    #[arg(long, env = "PRIVSTACK_RELAY_DRAIN_GRACE_SECS", default_value_t = defaults::DRAIN_GRACE_SECS)]
    pub drain_grace_secs: u64,

    /// Generic segmentation offload for the own QUIC transport (measurement knob).
    #[arg(long, hide = true, default_value_t = true, action = clap::ArgAction::Set)]
    pub quic_gso: bool,

    /// Handshakes the own QUIC transport runs at once (measurement knob).
    #[arg(long, hide = true, default_value_t = defaults::QUIC_MAX_HANDSHAKES)]
    pub quic_max_handshakes: usize,

    /// Established connections in total (0 = unlimited).
    #[arg(long, env = "PRIVSTACK_RELAY_MAX_CONNECTIONS", default_value_t = defaults::MAX_CONNECTIONS)]
    pub max_connections: u32,

    /// Established connections per peer (0 = unlimited).
    #[arg(long, env = "PRIVSTACK_RELAY_MAX_CONNECTIONS_PER_PEER", default_value_t = defaults::MAX_CONNECTIONS_PER_PEER)]
    pub max_connections_per_peer: u32,

    /// Established connections from one host (IPv4 address, IPv6 /64; 0 = unlimited).
    #[arg(long, env = "PRIVSTACK_RELAY_MAX_CONNECTIONS_PER_HOST", default_value_t = defaults::MAX_CONNECTIONS_PER_HOST)]
    pub max_connections_per_host: u32,

    /// Established connections from one network (IPv4 /24, IPv6 /48; 0 = unlimited).
    #[arg(long, env = "PRIVSTACK_RELAY_MAX_CONNECTIONS_PER_NETWORK", default_value_t = defaults::MAX_CONNECTIONS_PER_NETWORK)]
    pub max_connections_per_network: u32,
}

/// A byte count: plain digits, or digits with K, M, G (powers of 1000) or Ki, Mi, Gi
/// (powers of 1024), optionally followed by B: `65536`, `64Ki`, `4MiB`, `500G`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let bad = || format!("{s:?} is not a size: expected bytes like 65536, 64Ki, 4MiB or 500G");
    let number: u64 = number.parse().map_err(|_| bad())?;
    let unit = unit.trim_start();
    let unit = unit.strip_suffix(['B', 'b']).unwrap_or(unit);
    let factor: u64 = match unit {
        "" => 1,
        "K" | "k" => 1_000,
        "M" | "m" => 1_000_000,
        "G" | "g" => 1_000_000_000,
        "Ki" | "ki" | "KI" => 1 << 10,
        "Mi" | "mi" | "MI" => 1 << 20,
        "Gi" | "gi" | "GI" => 1 << 30,
        _ => return Err(bad()),
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// `--metrics-address`: where `/metrics` is served, or nowhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsAddress(pub Option<std::net::SocketAddr>);

fn parse_metrics_address(s: &str) -> Result<MetricsAddress, String> {
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(MetricsAddress(None));
    }
    s.trim()
        .parse()
        .map(|a| MetricsAddress(Some(a)))
        .map_err(|_| "expected IP:PORT (e.g. 127.0.0.1:4003 or [::1]:4003) or none".to_string())
}

impl Default for RunArgs {
    /// The defaults, whatever the process environment says.
    fn default() -> Self {
        crate::settings::parse(["privstack-relay"], &|_| None)
            .expect("the defaults parse")
            .cli
            .run
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--external-address {addr}: {reason}")]
    ExternalAddress {
        addr: Multiaddr,
        reason: &'static str,
    },
    #[error("--bootstrap {addr}: {reason}")]
    Bootstrap {
        addr: Multiaddr,
        reason: &'static str,
    },
    #[error("--kad-protocol {0:?}: a protocol name must start with '/'")]
    KadProtocol(String),
    #[error("--{flag} must be greater than 0")]
    Zero { flag: &'static str },
    #[error("--{flag} {value} is too large (at most {max})")]
    TooLarge {
        flag: &'static str,
        value: u64,
        max: u64,
    },
}

impl ConfigError {
    /// The flag (without `--`) the error is about.
    pub fn flag(&self) -> &'static str {
        match self {
            ConfigError::ExternalAddress { .. } => "external-address",
            ConfigError::Bootstrap { .. } => "bootstrap",
            ConfigError::KadProtocol(_) => "kad-protocol",
            ConfigError::Zero { flag } | ConfigError::TooLarge { flag, .. } => flag,
        }
    }
}

impl Config {
    /// The checks that need the relay's own peer ID (known once the key is loaded): a
    /// `/p2p/` in `--external-address` names this relay, `--bootstrap` names others.
    pub fn check_peer_id(&self, own: &PeerId) -> Result<(), ConfigError> {
        if let Some((addr, _)) = self.external_peers.iter().find(|(_, p)| p != own) {
            return Err(ConfigError::ExternalAddress {
                addr: addr.clone(),
                reason: "its /p2p/ names another peer, not this relay",
            });
        }
        if let Some((_, addr)) = self.bootstrap.iter().find(|(p, _)| p == own) {
            return Err(ConfigError::Bootstrap {
                addr: addr.clone().with(Protocol::P2p(*own)),
                reason: "names this relay itself",
            });
        }
        Ok(())
    }
}

/// A validated relay configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub port: u16,
    pub http_port: u16,
    pub external_addresses: Vec<Multiaddr>,
    /// `/p2p/` peer IDs written into `--external-address` values (they must be ours).
    pub external_peers: Vec<(Multiaddr, PeerId)>,
    pub bootstrap: Vec<(PeerId, Multiaddr)>,
    pub kad_protocol: StreamProtocol,
    pub store: StoreLimits,
    pub relay: RelayLimits,
    pub max_connections: Option<u32>,
    pub max_connections_per_peer: Option<u32>,
    pub max_connections_per_host: Option<u32>,
    pub max_connections_per_network: Option<u32>,
    pub stats_log_interval: Duration,
    /// Where `/metrics` is served (`None`: nowhere).
    pub metrics_address: Option<std::net::SocketAddr>,
    /// The operator chose the metrics address: if it is in use, that is an error. The
    /// default one in use (a second relay on the host) only costs the metrics.
    pub metrics_address_required: bool,
    /// How long SIGTERM waits for open circuits (zero: not at all).
    pub drain_grace: Duration,
    pub quic_gso: bool,
    pub quic_max_handshakes: usize,
}

#[derive(Debug, Clone)]
pub struct RelayLimits {
    pub max_reservations: usize,
    pub max_reservations_per_peer: usize,
    pub reservation_duration: Duration,
    pub max_circuits: usize,
    pub max_circuits_per_peer: usize,
    pub max_circuit_duration: Duration,
    pub max_circuit_bytes: u64,
    /// Each direction of one circuit, bytes per second (0 = unlimited).
    pub max_circuit_rate: u64,
    /// All circuits, bytes per second (0 = unlimited).
    pub max_relay_rate: u64,
    /// Bytes per UTC day before new circuits are refused (0 = no budget).
    pub max_relayed_bytes_per_day: u64,
    /// Peers of one host / network holding reservations (0 = unlimited).
    pub max_reservations_per_host: usize,
    pub max_reservations_per_network: usize,
    /// The circuit limit announced to clients: `None` when there is none, which is
    /// how clients read "unlimited".
    pub wire_limit: Option<WireLimit>,
}

fn unlimited_usize(v: usize) -> usize {
    if v == 0 { usize::MAX } else { v }
}

fn unlimited_u32(v: u32) -> Option<u32> {
    (v != 0).then_some(v)
}

impl TryFrom<&RunArgs> for Config {
    type Error = ConfigError;

    fn try_from(a: &RunArgs) -> Result<Self, ConfigError> {
        let mut external_addresses = Vec::new();
        let mut external_peers = Vec::new();
        for addr in &a.external_addresses {
            let mut iter = addr.iter();
            let ip_ok = matches!(
                iter.next(),
                Some(
                    Protocol::Ip4(_)
                        | Protocol::Ip6(_)
                        | Protocol::Dns(_)
                        | Protocol::Dns4(_)
                        | Protocol::Dns6(_)
                )
            );
            let transport_ok = matches!(iter.next(), Some(Protocol::Udp(_)))
                && matches!(iter.next(), Some(Protocol::QuicV1));
            if !ip_ok || !transport_ok {
                return Err(ConfigError::ExternalAddress {
                    addr: addr.clone(),
                    reason: "expected /ip4|ip6|dns/<host>/udp/<port>/quic-v1",
                });
            }
            let reason = match addr.iter().nth(1) {
                _ if addrs::is_unspecified(addr) => Some(
                    "a wildcard address (0.0.0.0, ::) is not dialable: give the public IP or name",
                ),
                Some(Protocol::Udp(0)) => Some("port 0 is not dialable: give the port clients use"),
                _ => None,
            };
            if let Some(reason) = reason {
                return Err(ConfigError::ExternalAddress {
                    addr: addr.clone(),
                    reason,
                });
            }
            for p in addr.iter() {
                if let Protocol::P2p(peer) = p {
                    external_peers.push((addr.clone(), peer));
                }
            }
            let addr: Multiaddr = addr
                .iter()
                .filter(|p| !matches!(p, Protocol::P2p(_)))
                .collect();
            if !external_addresses.contains(&addr) {
                external_addresses.push(addr);
            }
        }

        let mut bootstrap = Vec::new();
        for addr in &a.bootstrap {
            let Some(Protocol::P2p(peer)) = addr.iter().last() else {
                return Err(ConfigError::Bootstrap {
                    addr: addr.clone(),
                    reason: "must end with /p2p/<peer id>",
                });
            };
            let mut dial = addr.clone();
            dial.pop();
            if dial.is_empty() {
                return Err(ConfigError::Bootstrap {
                    addr: addr.clone(),
                    reason: "has no transport address before /p2p/",
                });
            }
            bootstrap.push((peer, dial));
        }

        let kad_protocol = StreamProtocol::try_from_owned(a.kad_protocol.clone())
            .map_err(|_| ConfigError::KadProtocol(a.kad_protocol.clone()))?;

        if a.kad_max_records == 0 {
            return Err(ConfigError::Zero {
                flag: "kad-max-records",
            });
        }
        if a.kad_max_value_bytes == 0 {
            return Err(ConfigError::Zero {
                flag: "kad-max-value-bytes",
            });
        }
        if a.kad_max_key_bytes == 0 {
            return Err(ConfigError::Zero {
                flag: "kad-max-key-bytes",
            });
        }
        if a.kad_max_providers == 0 {
            return Err(ConfigError::Zero {
                flag: "kad-max-providers",
            });
        }
        // A Kademlia message is at most 16 KiB; a key or value that does not fit in one
        // could never be answered anyway.
        for (flag, value) in [
            ("kad-max-value-bytes", a.kad_max_value_bytes),
            ("kad-max-key-bytes", a.kad_max_key_bytes),
        ] {
            if value > defaults::KAD_MAX_MESSAGE_BYTES {
                return Err(ConfigError::TooLarge {
                    flag,
                    value: value as u64,
                    max: defaults::KAD_MAX_MESSAGE_BYTES as u64,
                });
            }
        }
        if a.drain_grace_secs > defaults::DRAIN_GRACE_MAX_SECS {
            return Err(ConfigError::TooLarge {
                flag: "drain-grace-secs",
                value: a.drain_grace_secs,
                max: defaults::DRAIN_GRACE_MAX_SECS,
            });
        }
        if a.reservation_duration_secs == 0 {
            return Err(ConfigError::Zero {
                flag: "reservation-duration-secs",
            });
        }
        // libp2p's relay sends both durations as u32 seconds.
        let max = u64::from(u32::MAX);
        for (flag, value) in [
            ("reservation-duration-secs", a.reservation_duration_secs),
            ("max-circuit-duration-secs", a.max_circuit_duration_secs),
        ] {
            if value > max {
                return Err(ConfigError::TooLarge { flag, value, max });
            }
        }
        let circuit_secs = if a.max_circuit_duration_secs == 0 {
            max
        } else {
            a.max_circuit_duration_secs
        };

        Ok(Config {
            port: a.port,
            http_port: a.http_port,
            external_addresses,
            external_peers,
            bootstrap,
            kad_protocol,
            store: StoreLimits {
                max_records: a.kad_max_records,
                max_providers: a.kad_max_providers,
                max_key_bytes: a.kad_max_key_bytes,
                max_value_bytes: a.kad_max_value_bytes,
                per_peer: a.kad_max_records_per_peer,
                per_host: a.kad_max_records_per_host,
                per_network: a.kad_max_records_per_network,
                providers_per_key: defaults::KAD_PROVIDERS_PER_KEY,
                ttl: defaults::KAD_RECORD_TTL,
            },
            relay: RelayLimits {
                max_reservations: unlimited_usize(a.max_reservations),
                max_reservations_per_peer: unlimited_usize(a.max_reservations_per_peer),
                reservation_duration: Duration::from_secs(a.reservation_duration_secs),
                max_circuits: unlimited_usize(a.max_circuits),
                max_circuits_per_peer: unlimited_usize(a.max_circuits_per_peer),
                max_circuit_duration: Duration::from_secs(circuit_secs),
                max_circuit_bytes: a.max_circuit_bytes,
                max_circuit_rate: a.max_circuit_rate,
                max_relay_rate: a.max_relay_rate,
                max_relayed_bytes_per_day: a.max_relayed_bytes_per_day,
                max_reservations_per_host: a.max_reservations_per_host,
                max_reservations_per_network: a.max_reservations_per_network,
                wire_limit: (a.max_circuit_bytes > 0 || a.max_circuit_duration_secs > 0).then_some(
                    WireLimit {
                        duration_secs: a.max_circuit_duration_secs as u32,
                        data_bytes: a.max_circuit_bytes,
                    },
                ),
            },
            max_connections: unlimited_u32(a.max_connections),
            max_connections_per_peer: unlimited_u32(a.max_connections_per_peer),
            max_connections_per_host: unlimited_u32(a.max_connections_per_host),
            max_connections_per_network: unlimited_u32(a.max_connections_per_network),
            stats_log_interval: defaults::STATS_LOG_INTERVAL,
            metrics_address: a.metrics_address.0,
            drain_grace: Duration::from_secs(a.drain_grace_secs),
            quic_gso: a.quic_gso,
            quic_max_handshakes: a.quic_max_handshakes.max(1),
            metrics_address_required: a.metrics_address.0.map(|a| a.to_string()).as_deref()
                != Some(defaults::METRICS_ADDRESS),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut full = vec!["privstack-relay"];
        full.extend_from_slice(args);
        let parsed = crate::settings::parse(full, &|_| None).map_err(|e| e.to_string())?;
        Config::try_from(&parsed.cli.run).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_match_the_spec() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.port, 4001);
        assert_eq!(c.http_port, 4002);
        assert_eq!(c.kad_protocol.as_ref(), "/ipfs/kad/1.0.0");
        assert!(c.store.max_records >= 50_000);
        // PrivStack's keys: `/privstack/syncgroup/` + 32 bytes.
        assert!(c.store.max_key_bytes >= 53);
        // Circuits announce no limit (clients read an absent one as unlimited) and are
        // shaped by rate instead.
        assert_eq!(c.relay.max_circuit_bytes, 0);
        assert_eq!(c.relay.wire_limit, None);
        assert_eq!(c.relay.max_circuit_rate, 8 << 20);
        assert_eq!(c.relay.max_relay_rate, 32 << 20);
        let c = parse(&["--max-circuit-duration-secs", "600"]).unwrap();
        assert_eq!(
            c.relay.wire_limit,
            Some(WireLimit {
                duration_secs: 600,
                data_bytes: 0
            })
        );
    }

    #[test]
    fn sizes_take_decimal_and_binary_suffixes() {
        for (text, bytes) in [
            ("65536", 65536),
            ("0", 0),
            ("4MiB", 4 << 20),
            ("4Mi", 4 << 20),
            ("64Ki", 64 << 10),
            ("2GiB", 2 << 30),
            ("500G", 500_000_000_000),
            ("8M", 8_000_000),
            ("1KB", 1000),
            (" 3 MiB ", 3 << 20),
        ] {
            assert_eq!(parse_bytes(text), Ok(bytes), "{text}");
        }
        for bad in [
            "",
            "MiB",
            "4 TiB",
            "-1",
            "1.5M",
            "4Mx",
            "99999999999999999999",
        ] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
        assert!(
            parse_bytes("99999999999G")
                .unwrap_err()
                .contains("too large")
        );
        let e = parse(&["--max-circuit-rate", "fast"]).unwrap_err();
        assert!(
            e.contains("--max-circuit-rate") && e.contains("fast"),
            "{e}"
        );
    }

    #[test]
    fn original_command_line_still_parses() {
        let c = parse(&["--port", "4100", "--identity", "/tmp/k", "-v"]).unwrap();
        assert_eq!(c.port, 4100);
    }

    #[test]
    fn bad_values_name_the_flag() {
        let e = parse(&["--external-address", "/ip4/1.2.3.4/tcp/1"]).unwrap_err();
        assert!(e.contains("--external-address /ip4/1.2.3.4/tcp/1"), "{e}");
        let e = parse(&["--bootstrap", "/ip4/1.2.3.4/udp/1/quic-v1"]).unwrap_err();
        assert!(e.contains("--bootstrap"), "{e}");
        let e = parse(&["--kad-protocol", "kad"]).unwrap_err();
        assert!(e.contains("--kad-protocol"), "{e}");
        let e = parse(&["--reservation-duration-secs", "0"]).unwrap_err();
        assert!(e.contains("--reservation-duration-secs"), "{e}");
        let e = parse(&["--port", "70000"]).unwrap_err();
        assert!(e.contains("--port"), "{e}");
    }

    #[test]
    fn external_addresses_must_be_dialable_and_ours() {
        for bad in [
            "/ip4/0.0.0.0/udp/4001/quic-v1",
            "/ip6/::/udp/4001/quic-v1",
            "/ip4/203.0.113.7/udp/0/quic-v1",
        ] {
            let e = parse(&["--external-address", bad]).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        for good in [
            "/dns4/relay.example.org/udp/4001/quic-v1",
            "/dns6/relay.example.org/udp/4001/quic-v1",
            "/dns/relay.example.org/udp/4001/quic-v1",
        ] {
            parse(&["--external-address", good]).unwrap();
        }
        let own = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let other = PeerId::random();
        let ok = parse(&[
            "--external-address",
            &format!("/ip4/203.0.113.7/udp/4001/quic-v1/p2p/{own}"),
        ])
        .unwrap();
        assert!(ok.check_peer_id(&own).is_ok());
        assert_eq!(
            ok.external_addresses[0].to_string(),
            "/ip4/203.0.113.7/udp/4001/quic-v1"
        );
        let e = ok.check_peer_id(&other).unwrap_err().to_string();
        assert!(e.contains("another peer"), "{e}");
    }

    #[test]
    fn bootstrap_takes_names_and_refuses_the_relay_itself() {
        let own = PeerId::random();
        let other = PeerId::random();
        for host in [
            "dns4/relay-1.example.org",
            "dns6/relay-1.example.org",
            "dns/relay-1.example.org",
        ] {
            let c = parse(&[
                "--bootstrap",
                &format!("/{host}/udp/4001/quic-v1/p2p/{other}"),
            ])
            .unwrap();
            assert_eq!(c.bootstrap[0].0, other);
            assert!(c.check_peer_id(&own).is_ok());
        }
        let c = parse(&[
            "--bootstrap",
            &format!("/ip4/192.0.2.1/udp/4001/quic-v1/p2p/{own}"),
        ])
        .unwrap();
        let e = c.check_peer_id(&own).unwrap_err();
        assert_eq!(e.flag(), "bootstrap");
        assert!(e.to_string().contains("this relay itself"), "{e}");
    }

    #[test]
    fn zero_means_unlimited() {
        let c = parse(&[
            "--max-circuit-bytes",
            "0",
            "--max-circuit-duration-secs",
            "0",
            "--max-reservations",
            "0",
            "--max-connections",
            "0",
        ])
        .unwrap();
        assert_eq!(c.relay.max_circuit_bytes, 0);
        assert_eq!(
            c.relay.max_circuit_duration,
            Duration::from_secs(u32::MAX.into())
        );
        assert_eq!(c.relay.max_reservations, usize::MAX);
        assert_eq!(c.max_connections, None);
    }
}
