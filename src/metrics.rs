//! Counters the relay exports on `/metrics` and logs.

use std::collections::HashSet;
use std::hash::BuildHasher;

use libp2p::PeerId;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::circuits::CircuitBytes;
use crate::defaults;

/// The relay's own metrics; libp2p's are registered beside them in the same registry.
#[derive(Clone)]
pub struct RelayMetrics {
    /// Unique peers that have connected (SPEC `peers_served`).
    pub peers_served: Counter,
    /// Relay circuits established (SPEC `relayed_connections`).
    pub relayed_connections: Counter,
    pub reservations: Gauge,
    pub circuits: Gauge,
    pub connections: Gauge,
    pub kad_routing_peers: Gauge,
    pub kad_records: Gauge,
    pub kad_providers: Gauge,
    /// Refused reservations and circuits by kind and reason.
    pub denied: Family<Vec<(&'static str, String)>, Counter>,
    /// Reservation events: opened, renewed, expired, closed (the peer went away).
    pub reservation_events: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// Bytes through circuits, counted on the relay's connections.
    pub circuit_bytes: CircuitBytes,
    /// How long circuits stayed open.
    pub circuit_duration: Histogram,
    pub store: StoreMetrics,
}

/// Buckets of `relay_circuit_duration_seconds`: from a probe's instant exchange to the
/// longest circuit `--max-circuit-duration-secs` allows by default (an hour).
const CIRCUIT_DURATION_BUCKETS: [f64; 10] = [
    0.1, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0,
];

/// What the record store refused (by reason) and purged; counted by the store itself.
#[derive(Clone, Default, Debug)]
pub struct StoreMetrics {
    pub refused: Family<Vec<(&'static str, &'static str)>, Counter>,
    pub purged: Counter,
}

impl StoreMetrics {
    pub fn refused(&self, reason: &'static str) -> u64 {
        self.refused.get_or_create(&vec![("reason", reason)]).get()
    }
}

impl RelayMetrics {
    /// Count one reservation event (`opened`, `renewed`, `expired`, `closed`).
    pub fn reservation_event(&self, event: &'static str, n: u64) {
        self.reservation_events
            .get_or_create(&vec![("event", event)])
            .inc_by(n);
    }

    pub fn register(registry: &mut Registry) -> Self {
        let build_info = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
        build_info
            .get_or_create(&vec![
                ("version", crate::build_info::VERSION),
                ("target", crate::build_info::TARGET),
                ("revision", crate::build_info::GIT_REV),
            ])
            .set(1);
        registry.register(
            "build_info",
            "The relay's version, target triple and git revision (always 1)",
            build_info,
        );
        let circuit_bytes_family = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
        // One statement each: a family's read guard lives to the end of its statement,
        // and creating the second label set needs the write lock.
        let to_destination = circuit_bytes_family
            .get_or_create(&vec![("direction", "to_destination")])
            .clone();
        let from_destination = circuit_bytes_family
            .get_or_create(&vec![("direction", "from_destination")])
            .clone();
        let circuit_bytes = CircuitBytes {
            to_destination,
            from_destination,
        };
        let reservation_events = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
        for event in ["opened", "renewed", "expired", "closed"] {
            let _ = reservation_events.get_or_create(&vec![("event", event)]);
        }
        let m = Self {
            peers_served: Counter::default(),
            relayed_connections: Counter::default(),
            reservations: Gauge::default(),
            circuits: Gauge::default(),
            connections: Gauge::default(),
            kad_routing_peers: Gauge::default(),
            kad_records: Gauge::default(),
            kad_providers: Gauge::default(),
            denied: Family::default(),
            reservation_events,
            circuit_bytes,
            circuit_duration: Histogram::new(CIRCUIT_DURATION_BUCKETS),
            store: StoreMetrics::default(),
        };
        registry.register(
            "relay_reservation_events",
            "Reservations opened, renewed, expired, and closed because the peer's last connection closed",
            m.reservation_events.clone(),
        );
        registry.register(
            "relay_circuit_bytes",
            "Bytes relayed through circuits, by direction (to_destination: sent by circuit sources; from_destination: sent back), including each circuit's few dozen bytes of setup",
            circuit_bytes_family,
        );
        registry.register(
            "relay_circuit_duration_seconds",
            "How long closed circuits stayed open",
            m.circuit_duration.clone(),
        );
        registry.register(
            "peers_served",
            "Unique peers that have connected since start",
            m.peers_served.clone(),
        );
        registry.register(
            "relayed_connections",
            "Relay circuits established since start",
            m.relayed_connections.clone(),
        );
        registry.register(
            "relay_reservations",
            "Relay reservations currently held",
            m.reservations.clone(),
        );
        registry.register(
            "relay_circuits",
            "Relay circuits currently open",
            m.circuits.clone(),
        );
        registry.register(
            "relay_connections",
            "Established connections",
            m.connections.clone(),
        );
        registry.register(
            "relay_kad_routing_peers",
            "Peers in the Kademlia routing table",
            m.kad_routing_peers.clone(),
        );
        registry.register(
            "relay_kad_records",
            "Records in the Kademlia store",
            m.kad_records.clone(),
        );
        registry.register(
            "relay_kad_providers",
            "Provider records in the Kademlia store",
            m.kad_providers.clone(),
        );
        registry.register(
            "relay_kad_refused",
            "Records and provider records the store refused, by reason (full, quota, too_large, bad_key)",
            m.store.refused.clone(),
        );
        registry.register(
            "relay_kad_purged",
            "Expired records and provider records removed from the store",
            m.store.purged.clone(),
        );
        registry.register(
            "relay_denied",
            "Reservations and circuits the relay refused, by kind (reservation, circuit) and reason",
            m.denied.clone(),
        );
        m
    }
}

/// Counts distinct peers in bounded memory.
///
/// Exact (a set of 64-bit keyed hashes) up to `UNIQUE_PEERS_EXACT_LIMIT` peers, about
/// 2 MiB at the limit; past it the set is dropped and a HyperLogLog with 2^14 one-byte
/// registers (16 KiB, ~0.8% standard error), fed all along, takes over.
pub struct UniquePeers {
    hasher: std::collections::hash_map::RandomState,
    exact: Option<HashSet<u64>>,
    hll: HyperLogLog,
    exact_limit: usize,
}

impl Default for UniquePeers {
    fn default() -> Self {
        Self::with_exact_limit(defaults::UNIQUE_PEERS_EXACT_LIMIT)
    }
}

impl UniquePeers {
    pub fn with_exact_limit(exact_limit: usize) -> Self {
        Self {
            hasher: Default::default(),
            exact: Some(HashSet::new()),
            hll: HyperLogLog::new(),
            exact_limit,
        }
    }

    /// Record `peer`; returns how much the count grew (0 for a peer seen before).
    pub fn insert(&mut self, peer: &PeerId) -> u64 {
        let hash = self.hasher.hash_one(peer);
        let before = self.count();
        self.hll.insert(hash);
        if let Some(set) = &mut self.exact {
            set.insert(hash);
            if set.len() > self.exact_limit {
                self.exact = None;
            }
        }
        self.count().saturating_sub(before)
    }

    pub fn count(&self) -> u64 {
        match &self.exact {
            Some(set) => set.len() as u64,
            None => self.hll.estimate().round() as u64,
        }
    }
}

const HLL_BITS: u32 = 14;
const HLL_REGISTERS: usize = 1 << HLL_BITS;

/// HyperLogLog (Flajolet et al. 2007) with the small-range linear-counting correction.
/// Small enough to keep here rather than add a dependency; the running sum keeps
/// `estimate` O(1).
struct HyperLogLog {
    registers: Box<[u8; HLL_REGISTERS]>,
    sum: f64,
    zeros: usize,
}

impl HyperLogLog {
    fn new() -> Self {
        Self {
            registers: Box::new([0; HLL_REGISTERS]),
            sum: HLL_REGISTERS as f64,
            zeros: HLL_REGISTERS,
        }
    }

    fn insert(&mut self, hash: u64) {
        let index = (hash >> (64 - HLL_BITS)) as usize;
        let rest = (hash << HLL_BITS) | (1 << (HLL_BITS - 1));
        let rank = rest.leading_zeros() as u8 + 1;
        let old = self.registers[index];
        if rank > old {
            self.sum += 2f64.powi(-i32::from(rank)) - 2f64.powi(-i32::from(old));
            if old == 0 {
                self.zeros -= 1;
            }
            self.registers[index] = rank;
        }
    }

    fn estimate(&self) -> f64 {
        let m = HLL_REGISTERS as f64;
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let raw = alpha * m * m / self.sum;
        if raw <= 2.5 * m && self.zeros > 0 {
            m * (m / self.zeros as f64).ln()
        } else {
            raw
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_below_the_limit() {
        let mut u = UniquePeers::default();
        let a = PeerId::random();
        assert_eq!(u.insert(&a), 1);
        assert_eq!(u.insert(&a), 0);
        assert_eq!(u.insert(&PeerId::random()), 1);
        assert_eq!(u.count(), 2);
    }

    #[test]
    fn estimate_past_the_limit_is_close_and_memory_is_bounded() {
        let mut u = UniquePeers::with_exact_limit(1000);
        let peers: Vec<_> = (0..50_000).map(|_| PeerId::random()).collect();
        let mut grown = 0;
        for p in &peers {
            grown += u.insert(p);
        }
        for p in &peers[..1000] {
            u.insert(p);
        }
        assert!(u.exact.is_none());
        let n = u.count() as f64;
        assert!((n - 50_000.0).abs() / 50_000.0 < 0.05, "estimate {n}");
        // The counter only moves forward and ends near the estimate.
        assert!(
            (grown as f64 - n).abs() / n < 0.05,
            "grown {grown}, count {n}"
        );
    }
}
