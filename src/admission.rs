//! Who may take a reservation or open a circuit, beyond libp2p's relay's own counts:
//! rates per peer and per host, caps per host and network, the daily byte budget.
//!
//! These are `libp2p::relay::RateLimiter`s, which the relay asks (in order, stopping at
//! the first refusal) after its own per-peer and total checks:
//!
//! - [`RateTable`]: token buckets per peer ID or per host (libp2p's own rates: 30 per
//!   peer per 2 minutes, 60 per host per minute), in a table that is bounded. libp2p's
//!   limiter keeps an entry for every peer and IP ever seen until its bucket refills,
//!   and its refill queue for as long again; here a bucket that has refilled is the
//!   same as no bucket and is dropped, the table is pruned at most once a second, and
//!   it never holds more than [`MAX_TABLE_ENTRIES`] (past that, new keys pass
//!   untracked: the relay's other caps bound what they can take).
//! - [`HostReservations`]: peers of one host (IPv4 address, IPv6 /64) and of one network
//!   (IPv4 /24, IPv6 /48) holding reservations, capped, so a flood from one host cannot
//!   take the reservations of everyone else, nor of a household behind the same NAT
//!   beyond the host's share. It must be the last reservation limiter: it counts what
//!   it lets through.
//! - [`DailyBudget`](crate::circuits::shaping::DailyBudget) as a circuit limiter.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use libp2p::relay::RateLimiter;
use libp2p::{Multiaddr, PeerId};

use crate::addrs;
use crate::circuits::CircuitBytes;
use crate::circuits::shaping::DailyBudget;

/// Most keys a [`RateTable`] tracks.
pub const MAX_TABLE_ENTRIES: usize = 65_536;
/// How often a [`RateTable`] drops buckets that have refilled.
const PRUNE_EVERY: Duration = Duration::from_secs(1);
/// An allowed reservation that never showed up as accepted is forgotten after this.
const UNCONFIRMED_GRACE: Duration = Duration::from_secs(30);

/// A token bucket per key: `burst` tokens, one more every `interval`.
#[derive(Debug)]
pub struct RateTable<K> {
    burst: u32,
    interval: Duration,
    /// Tokens left and when they were counted.
    buckets: HashMap<K, (u32, Instant)>,
    pruned: Option<Instant>,
}

impl<K: Hash + Eq + Copy> RateTable<K> {
    pub fn new(burst: u32, interval: Duration) -> Self {
        assert!(burst > 0 && !interval.is_zero());
        RateTable {
            burst,
            interval,
            buckets: HashMap::new(),
            pruned: None,
        }
    }

    /// Tokens in a bucket counted `at` with `tokens`, refilled until `now`.
    fn refilled(&self, tokens: u32, at: Instant, now: Instant) -> (u32, Instant) {
        let elapsed = now.saturating_duration_since(at);
        let gained = (elapsed.as_nanos() / self.interval.as_nanos()).min(u128::from(self.burst));
        let tokens = (tokens + gained as u32).min(self.burst);
        if tokens == self.burst {
            return (tokens, now);
        }
        // Keep the part of an interval already waited.
        (tokens, at + self.interval * gained as u32)
    }

    /// Take a token of `key`'s bucket, if it has one.
    pub fn try_take(&mut self, key: K, now: Instant) -> bool {
        self.prune(now);
        match self.buckets.get(&key).copied() {
            Some((tokens, at)) => {
                let (tokens, at) = self.refilled(tokens, at, now);
                if tokens == 0 {
                    self.buckets.insert(key, (0, at));
                    return false;
                }
                self.buckets.insert(key, (tokens - 1, at));
                true
            }
            None => {
                if self.buckets.len() < MAX_TABLE_ENTRIES {
                    self.buckets.insert(key, (self.burst - 1, now));
                }
                true
            }
        }
    }

    /// Drop the buckets that have refilled (at most once per [`PRUNE_EVERY`]).
    pub fn prune(&mut self, now: Instant) {
        if self
            .pruned
            .is_some_and(|at| now.saturating_duration_since(at) < PRUNE_EVERY)
        {
            return;
        }
        self.pruned = Some(now);
        let (burst, interval) = (self.burst, self.interval);
        self.buckets.retain(|_, (tokens, at)| {
            let missing = burst - *tokens;
            now.saturating_duration_since(*at) < interval * missing
        });
        crate::tables::shrink(&mut self.buckets);
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// A [`RateTable`] shared by its limiter and the event loop (which prunes it).
pub type Shared<K> = Arc<Mutex<RateTable<K>>>;

fn locked<K>(t: &Shared<K>) -> std::sync::MutexGuard<'_, RateTable<K>> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// A [`RateTable`] keyed by peer ID.
pub struct PerPeer(pub Shared<PeerId>);

impl RateLimiter for PerPeer {
    fn try_next(&mut self, peer: PeerId, _addr: &Multiaddr, now: Instant) -> bool {
        locked(&self.0).try_take(peer, now)
    }
}

/// A [`RateTable`] keyed by host (IPv4 address, IPv6 /64): one host rotating through
/// the addresses of its /64 is still one host.
pub struct PerHost(pub Shared<u128>);

impl RateLimiter for PerHost {
    fn try_next(&mut self, _peer: PeerId, addr: &Multiaddr, now: Instant) -> bool {
        match addrs::ip(addr) {
            Some(ip) => locked(&self.0).try_take(addrs::host_prefix(ip), now),
            None => true,
        }
    }
}

/// Everything here for one relay: its limiters, and what the event loop keeps tidy.
#[derive(Clone)]
pub struct Admission {
    pub host_reservations: HostReservations,
    peer_tables: [Shared<PeerId>; 2],
    host_tables: [Shared<u128>; 2],
    budget: Option<Arc<DailyBudget>>,
}

impl Admission {
    /// libp2p's relay's rates: 30 per peer per 2 minutes, 60 per host per minute, for
    /// reservations and (per source) circuits.
    pub fn new(caps: HostCaps, bytes_per_day: u64, bytes: CircuitBytes) -> Self {
        let peer = || Arc::new(Mutex::new(RateTable::new(30, Duration::from_secs(120))));
        let host = || Arc::new(Mutex::new(RateTable::new(60, Duration::from_secs(60))));
        Admission {
            host_reservations: HostReservations::new(caps),
            peer_tables: [peer(), peer()],
            host_tables: [host(), host()],
            budget: (bytes_per_day > 0).then(|| Arc::new(DailyBudget::new(bytes_per_day, bytes))),
        }
    }

    /// For `relay::Config::reservation_rate_limiters`.
    pub fn reservation_limiters(&self) -> Vec<Box<dyn RateLimiter>> {
        vec![
            Box::new(PerPeer(self.peer_tables[0].clone())),
            Box::new(PerHost(self.host_tables[0].clone())),
            // It counts what it lets through, so it comes last.
            Box::new(self.host_reservations.clone()),
        ]
    }

    /// For `relay::Config::circuit_src_rate_limiters`.
    pub fn circuit_limiters(&self) -> Vec<Box<dyn RateLimiter>> {
        let mut v: Vec<Box<dyn RateLimiter>> = Vec::new();
        if let Some(b) = &self.budget {
            v.push(Box::new(Budget(b.clone())));
        }
        v.push(Box::new(PerPeer(self.peer_tables[1].clone())));
        v.push(Box::new(PerHost(self.host_tables[1].clone())));
        v
    }

    /// Drop what has refilled or was never confirmed; entries in the rate tables.
    pub fn prune(&self, now: Instant) -> usize {
        self.host_reservations.prune(now);
        let mut n = 0;
        for t in &self.peer_tables {
            let mut t = locked(t);
            t.prune(now);
            n += t.len();
        }
        for t in &self.host_tables {
            let mut t = locked(t);
            t.prune(now);
            n += t.len();
        }
        n
    }
}

/// `--max-relayed-bytes-per-day` as a circuit limiter.
pub struct Budget(pub Arc<DailyBudget>);

impl RateLimiter for Budget {
    fn try_next(&mut self, _peer: PeerId, _addr: &Multiaddr, _now: Instant) -> bool {
        self.0.allows(SystemTime::now())
    }
}

/// Caps on the peers of one host and of one network holding reservations.
#[derive(Debug, Clone, Copy)]
pub struct HostCaps {
    /// Per host (IPv4 address, IPv6 /64); `None`: unlimited.
    pub per_host: Option<usize>,
    /// Per network (IPv4 /24, IPv6 /48); `None`: unlimited.
    pub per_network: Option<usize>,
}

#[derive(Debug)]
struct Holder {
    host: u128,
    network: u128,
    /// When it was let through, until the relay confirms the reservation.
    unconfirmed: Option<Instant>,
}

#[derive(Debug, Default)]
struct Holders {
    peers: HashMap<PeerId, Holder>,
    hosts: HashMap<u128, usize>,
    networks: HashMap<u128, usize>,
}

impl Holders {
    fn release(&mut self, peer: &PeerId) {
        let Some(h) = self.peers.remove(peer) else {
            return;
        };
        for (map, key) in [(&mut self.hosts, h.host), (&mut self.networks, h.network)] {
            if let Some(n) = map.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&key);
                }
            }
        }
    }
}

/// Which peers hold reservations, by host and network; shared by the reservation
/// limiter (which admits) and the event loop (which confirms and releases).
#[derive(Debug, Clone)]
pub struct HostReservations {
    caps: HostCaps,
    holders: Arc<Mutex<Holders>>,
}

impl HostReservations {
    pub fn new(caps: HostCaps) -> Self {
        HostReservations {
            caps,
            holders: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Holders> {
        self.holders.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `peer`, reserving from `ip`, may hold a reservation; counts it if so. A
    /// peer already counted (a renewal, a second connection) always may: the per-peer
    /// limit bounds it.
    pub fn admit(&self, peer: PeerId, ip: IpAddr, now: Instant) -> bool {
        let mut h = self.lock();
        if h.peers.contains_key(&peer) {
            return true;
        }
        let host = addrs::host_prefix(ip);
        let network = addrs::network_prefix(ip);
        let full = |cap: Option<usize>, map: &HashMap<u128, usize>, key| {
            cap.is_some_and(|cap| map.get(&key).copied().unwrap_or(0) >= cap)
        };
        if full(self.caps.per_host, &h.hosts, host)
            || full(self.caps.per_network, &h.networks, network)
        {
            return false;
        }
        *h.hosts.entry(host).or_default() += 1;
        *h.networks.entry(network).or_default() += 1;
        h.peers.insert(
            peer,
            Holder {
                host,
                network,
                unconfirmed: Some(now),
            },
        );
        true
    }

    /// The relay accepted `peer`'s reservation.
    pub fn confirm(&self, peer: &PeerId) {
        if let Some(h) = self.lock().peers.get_mut(peer) {
            h.unconfirmed = None;
        }
    }

    /// `peer` holds no reservation any more.
    pub fn release(&self, peer: &PeerId) {
        self.lock().release(peer);
    }

    /// Forget peers let through that the relay never confirmed (their accept failed,
    /// their connection closed first).
    pub fn prune(&self, now: Instant) {
        let mut h = self.lock();
        let stale: Vec<PeerId> = h
            .peers
            .iter()
            .filter(|(_, p)| {
                p.unconfirmed
                    .is_some_and(|at| now.saturating_duration_since(at) >= UNCONFIRMED_GRACE)
            })
            .map(|(peer, _)| *peer)
            .collect();
        for peer in stale {
            h.release(&peer);
        }
        crate::tables::shrink(&mut h.peers);
        crate::tables::shrink(&mut h.hosts);
        crate::tables::shrink(&mut h.networks);
    }

    /// Peers counted, hosts and networks they are on.
    pub fn counts(&self) -> (usize, usize, usize) {
        let h = self.lock();
        (h.peers.len(), h.hosts.len(), h.networks.len())
    }
}

impl RateLimiter for HostReservations {
    fn try_next(&mut self, peer: PeerId, addr: &Multiaddr, now: Instant) -> bool {
        match addrs::ip(addr) {
            Some(ip) => self.admit(peer, ip, now),
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refill_and_full_ones_are_dropped() {
        let t0 = Instant::now();
        let mut t = RateTable::new(3, Duration::from_secs(10));
        let peer = PeerId::random();
        assert!(t.try_take(peer, t0));
        assert!(t.try_take(peer, t0));
        assert!(t.try_take(peer, t0));
        assert!(!t.try_take(peer, t0));
        assert!(!t.try_take(peer, t0 + Duration::from_secs(9)));
        assert!(t.try_take(peer, t0 + Duration::from_secs(10)));
        assert!(!t.try_take(peer, t0 + Duration::from_secs(15)));
        // Others are not affected.
        assert!(t.try_take(PeerId::random(), t0 + Duration::from_secs(15)));
        assert_eq!(t.len(), 2);
        // Once a bucket would be full again it goes at the next prune: the other peer's
        // (one token short) 10 s after its take, `peer`'s (empty since t0 + 10 s) 30 s
        // after.
        t.prune(t0 + Duration::from_secs(39));
        assert_eq!(t.len(), 1);
        t.prune(t0 + Duration::from_secs(41));
        assert!(t.is_empty());
        assert!(t.try_take(peer, t0 + Duration::from_secs(41)));
    }

    #[test]
    fn the_table_is_bounded() {
        let t0 = Instant::now();
        let mut t = RateTable::new(2, Duration::from_secs(60));
        for _ in 0..MAX_TABLE_ENTRIES + 100 {
            assert!(t.try_take(PeerId::random(), t0));
        }
        assert_eq!(t.len(), MAX_TABLE_ENTRIES);
        t.prune(t0 + Duration::from_secs(61));
        assert!(t.is_empty());
    }

    #[test]
    fn hosts_and_networks_are_capped() {
        let r = HostReservations::new(HostCaps {
            per_host: Some(2),
            per_network: Some(3),
        });
        let now = Instant::now();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        assert!(r.admit(a, ip("198.51.100.1"), now));
        assert!(r.admit(b, ip("198.51.100.1"), now));
        assert!(
            !r.admit(c, ip("198.51.100.1"), now),
            "third peer of one host"
        );
        // A renewal of a peer already counted passes.
        assert!(r.admit(a, ip("198.51.100.1"), now));
        assert!(r.admit(c, ip("198.51.100.2"), now));
        assert!(
            !r.admit(PeerId::random(), ip("198.51.100.3"), now),
            "fourth of the /24"
        );
        assert!(r.admit(PeerId::random(), ip("198.51.101.1"), now));
        // IPv6: one /64 is one host.
        let d = PeerId::random();
        assert!(r.admit(d, ip("2001:db8:1:1::1"), now));
        assert!(r.admit(PeerId::random(), ip("2001:db8:1:1::2"), now));
        assert!(!r.admit(PeerId::random(), ip("2001:db8:1:1:ffff::9"), now));
        // Released and unconfirmed peers free their slot.
        r.release(&a);
        assert!(r.admit(PeerId::random(), ip("198.51.100.1"), now));
        r.confirm(&b);
        r.confirm(&d);
        r.prune(now + UNCONFIRMED_GRACE);
        assert_eq!(r.counts(), (2, 2, 2));
    }
}
