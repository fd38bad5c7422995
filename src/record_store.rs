//! The relay's Kademlia record store: what it keeps, for how long, and for whom.
//!
//! Written here rather than wrapped around libp2p's `MemoryStore` because every policy
//! needs to know who stored what, which `MemoryStore` does not keep:
//! - Every record and provider record is kept [`StoreLimits::ttl`] after its last put
//!   (Kademlia would shorten a record's life by the number of peers closer to its key,
//!   and a relay knows every connected client), and expired entries are purged (by
//!   [`RelayStore::purge`], and first whenever room is needed).
//! - Each entry is charged to the source that stored it: its peer, its host (IPv4 /32,
//!   IPv6 /64) and its network (IPv4 /24, IPv6 /48). Each has a quota, so no single
//!   device, household or network can take the store from everyone else. Sources on
//!   this host (loopback) are charged per peer only.
//! - Keys and values are bounded, so the store's worst-case memory is known.
//! - A refusal is an error to Kademlia, which then resets the client's request: the
//!   client's `put_record` fails instead of being acknowledged and silently lost.
//!
//! Kademlia calls the store from inside its event handling, so the source of a put is
//! set by [`crate::kademlia::Kademlia`] around each handler event ([`RelayStore::set_source`]).

use std::borrow::Cow;
use std::collections::HashMap;
use std::collections::hash_map::{Entry, RandomState};
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::kad::store::{Error, RecordStore, Result};
use libp2p::kad::{ProviderRecord, Record, RecordKey};

use crate::addrs;
use crate::metrics::StoreMetrics;
use crate::routing::{self, Origin};

/// Bounds of the store (0 in a quota field: no quota of that kind).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreLimits {
    pub max_records: usize,
    pub max_providers: usize,
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    pub per_peer: usize,
    pub per_host: usize,
    pub per_network: usize,
    /// Providers kept per key (Kademlia's replication factor).
    pub providers_per_key: usize,
    pub ttl: Duration,
}

/// Who is storing: the peer and the IP its connection comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    pub peer: PeerId,
    pub ip: Option<IpAddr>,
}

/// Why the store refused an entry (the `reason` label of the refusal counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The store is full of live entries.
    Full,
    /// The source holds its share already.
    Quota,
    /// The value is larger than `--kad-max-value-bytes`.
    TooLarge,
    /// The key is empty or larger than `--kad-max-key-bytes`.
    BadKey,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Full => "full",
            Refusal::Quota => "quota",
            Refusal::TooLarge => "too_large",
            Refusal::BadKey => "bad_key",
        }
    }

    fn error(self) -> Error {
        match self {
            Refusal::TooLarge | Refusal::BadKey => Error::ValueTooLarge,
            Refusal::Full | Refusal::Quota => Error::MaxRecords,
        }
    }
}

/// What a quota is counted against. A peer's account is a 64-bit hash of its ID,
/// keyed at random per store (so no one can aim a collision), not the 80-byte ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Account {
    Peer(u64),
    Host(u128),
    Network(u128),
}

/// Who an entry is charged to: its source's peer (hashed) and IP, from which the
/// host and network accounts follow. Kept with every entry, so it is small and
/// needs no allocation of its own (a list of accounts cost ~100-250 B per entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Charge {
    peer: u64,
    ip: Option<IpAddr>,
}

impl Charge {
    fn accounts(self) -> impl Iterator<Item = Account> {
        let networks = self
            .ip
            .filter(|ip| Origin::of_ip(*ip) != Origin::Loopback)
            .map(|ip| {
                [
                    Account::Host(addrs::host_prefix(ip)),
                    Account::Network(addrs::network_prefix(ip)),
                ]
            });
        std::iter::once(Account::Peer(self.peer)).chain(networks.into_iter().flatten())
    }
}

/// The accounts of `charge` (none for the relay's own entries).
fn accounts(charge: Option<Charge>) -> impl Iterator<Item = Account> {
    charge.into_iter().flat_map(Charge::accounts)
}

/// A stored entry and whom it is charged to (`None`: the relay itself).
#[derive(Debug)]
pub struct Stored<T> {
    entry: T,
    charged: Option<Charge>,
}

#[derive(Debug)]
pub struct RelayStore {
    local: PeerId,
    limits: StoreLimits,
    records: HashMap<RecordKey, Stored<Record>>,
    providers: HashMap<RecordKey, Vec<Stored<ProviderRecord>>>,
    provider_count: usize,
    usage: HashMap<Account, usize>,
    /// The key of the peer accounts' hash.
    peer_hash: RandomState,
    source: Option<Source>,
    metrics: StoreMetrics,
    /// The last refusal, for the event loop's rate-limited warning.
    last_refusal: Option<Refusal>,
}

impl RelayStore {
    /// Gives back the room expired records and departed publishers left in its
    /// tables ([`crate::tables`]).
    pub fn shrink(&mut self) {
        crate::tables::shrink(&mut self.records);
        crate::tables::shrink(&mut self.providers);
        crate::tables::shrink(&mut self.usage);
    }

    pub fn new(local: PeerId, limits: StoreLimits, metrics: StoreMetrics) -> Self {
        Self {
            local,
            limits,
            records: HashMap::new(),
            providers: HashMap::new(),
            provider_count: 0,
            usage: HashMap::new(),
            peer_hash: RandomState::new(),
            source: None,
            metrics,
            last_refusal: None,
        }
    }

    /// Who the next puts come from (`None`: the relay itself, no quota).
    pub fn set_source(&mut self, source: Option<Source>) {
        self.source = source;
    }

    pub fn record_count(&self) -> usize {
        self.records.len()
    }

    pub fn provider_count(&self) -> usize {
        self.provider_count
    }

    pub fn metrics(&self) -> &StoreMetrics {
        &self.metrics
    }

    /// The last refusal since the previous call.
    pub fn take_last_refusal(&mut self) -> Option<Refusal> {
        self.last_refusal.take()
    }

    /// Entries currently charged to the peer.
    pub fn held_by(&self, peer: &PeerId) -> usize {
        let account = Account::Peer(self.peer_hash.hash_one(peer));
        self.usage.get(&account).copied().unwrap_or(0)
    }

    /// Remove every expired record and provider record; returns how many went.
    pub fn purge(&mut self, now: Instant) -> usize {
        let mut gone = Vec::new();
        self.records.retain(|_, s| {
            let keep = !s.entry.is_expired(now);
            if !keep {
                gone.push(s.charged);
            }
            keep
        });
        let mut providers_gone = 0;
        self.providers.retain(|_, list| {
            list.retain_mut(|s| {
                let keep = !s.entry.is_expired(now);
                if !keep {
                    gone.push(s.charged);
                    providers_gone += 1;
                }
                keep
            });
            !list.is_empty()
        });
        self.provider_count -= providers_gone;
        let n = gone.len();
        for charged in gone {
            self.release(charged);
        }
        self.metrics.purged.inc_by(n as u64);
        n
    }

    fn refuse(&mut self, why: Refusal) -> Error {
        self.metrics
            .refused
            .get_or_create(&vec![("reason", why.label())])
            .inc();
        self.last_refusal = Some(why);
        why.error()
    }

    fn check_key(&self, key: &RecordKey) -> std::result::Result<(), Refusal> {
        let len = key.as_ref().len();
        if len == 0 || len > self.limits.max_key_bytes {
            return Err(Refusal::BadKey);
        }
        Ok(())
    }

    /// Whether `charge`'s accounts may be charged one more entry.
    fn within_quota(&self, charge: Option<Charge>) -> bool {
        accounts(charge).all(|a| {
            let limit = match a {
                Account::Peer(_) => self.limits.per_peer,
                Account::Host(_) => self.limits.per_host,
                Account::Network(_) => self.limits.per_network,
            };
            limit == 0 || self.usage.get(&a).copied().unwrap_or(0) < limit
        })
    }

    fn charge(&mut self, charge: Option<Charge>) {
        for a in accounts(charge) {
            *self.usage.entry(a).or_default() += 1;
        }
    }

    fn release(&mut self, charge: Option<Charge>) {
        for a in accounts(charge) {
            if let Entry::Occupied(mut e) = self.usage.entry(a) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
    }

    /// The charge for the next put: its source (`None`: the relay itself).
    fn current_charge(&self) -> Option<Charge> {
        self.source.map(|s| Charge {
            peer: self.peer_hash.hash_one(s.peer),
            ip: s.ip,
        })
    }

    fn put_checked(&mut self, mut r: Record) -> std::result::Result<(), Refusal> {
        self.check_key(&r.key)?;
        if r.value.len() > self.limits.max_value_bytes {
            return Err(Refusal::TooLarge);
        }
        let now = Instant::now();
        r.expires = Some(now + self.limits.ttl);
        let charge = self.current_charge();
        if let Some(old) = self.records.get_mut(&r.key) {
            if accounts(old.charged).eq(accounts(charge)) {
                // The same source refreshing its record: nothing changes hands.
                old.entry = r;
                return Ok(());
            }
            // The entry changes hands (another device of the group writes the key, or
            // the same device from another network): judged with the old charge gone.
            let previous = old.charged;
            self.release(previous);
            if !self.within_quota(charge) {
                self.charge(previous);
                return Err(Refusal::Quota);
            }
            self.records.remove(&r.key);
        } else {
            if self.records.len() >= self.limits.max_records {
                self.purge(now);
            }
            if self.records.len() >= self.limits.max_records {
                return Err(Refusal::Full);
            }
            if !self.within_quota(charge) {
                return Err(Refusal::Quota);
            }
        }
        self.charge(charge);
        self.records.insert(
            r.key.clone(),
            Stored {
                entry: r,
                charged: charge,
            },
        );
        Ok(())
    }

    fn add_provider_checked(&mut self, mut p: ProviderRecord) -> std::result::Result<(), Refusal> {
        self.check_key(&p.key)?;
        let now = Instant::now();
        p.expires = Some(now + self.limits.ttl);
        // A provider's addresses are handed out like routing-table addresses: only
        // what a peer on the asking side could dial, within the same budget.
        let origin = self
            .source
            .and_then(|s| s.ip)
            .map(Origin::of_ip)
            .unwrap_or(Origin::Loopback);
        p.addresses = routing::select(&p.provider, &p.addresses, origin);
        let charge = self.current_charge();
        if let Some(list) = self.providers.get_mut(&p.key)
            && let Some(s) = list.iter_mut().find(|s| s.entry.provider == p.provider)
        {
            s.entry = p;
            return Ok(());
        }
        if self
            .providers
            .get(&p.key)
            .is_some_and(|l| l.len() >= self.limits.providers_per_key)
        {
            // As libp2p's store does: the first providers of a key stay (a Sybil flood
            // cannot displace them), later ones are not kept.
            return Err(Refusal::Full);
        }
        if self.provider_count >= self.limits.max_providers {
            self.purge(now);
        }
        if self.provider_count >= self.limits.max_providers {
            return Err(Refusal::Full);
        }
        if !self.within_quota(charge) {
            return Err(Refusal::Quota);
        }
        self.charge(charge);
        self.provider_count += 1;
        self.providers
            .entry(p.key.clone())
            .or_default()
            .push(Stored {
                entry: p,
                charged: charge,
            });
        Ok(())
    }
}

impl RecordStore for RelayStore {
    type RecordsIter<'a> = std::iter::Map<
        std::collections::hash_map::Values<'a, RecordKey, Stored<Record>>,
        fn(&'a Stored<Record>) -> Cow<'a, Record>,
    >;
    type ProvidedIter<'a> = std::iter::Empty<Cow<'a, ProviderRecord>>;

    fn get(&self, k: &RecordKey) -> Option<Cow<'_, Record>> {
        self.records.get(k).map(|s| Cow::Borrowed(&s.entry))
    }

    fn put(&mut self, r: Record) -> Result<()> {
        self.put_checked(r).map_err(|why| self.refuse(why))
    }

    fn remove(&mut self, k: &RecordKey) {
        if let Some(old) = self.records.remove(k) {
            self.release(old.charged);
        }
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        self.records.values().map(|s| Cow::Borrowed(&s.entry))
    }

    fn add_provider(&mut self, record: ProviderRecord) -> Result<()> {
        if record.provider == self.local {
            // The relay provides nothing itself; Kademlia would only ask to re-publish.
            return Ok(());
        }
        self.add_provider_checked(record)
            .map_err(|why| self.refuse(why))
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        let now = Instant::now();
        self.providers
            .get(key)
            .map(|l| {
                l.iter()
                    .filter(|s| !s.entry.is_expired(now))
                    .map(|s| s.entry.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        std::iter::empty()
    }

    fn remove_provider(&mut self, k: &RecordKey, p: &PeerId) {
        let Some(list) = self.providers.get_mut(k) else {
            return;
        };
        let Some(i) = list.iter().position(|s| s.entry.provider == *p) else {
            return;
        };
        let old = list.swap_remove(i);
        if list.is_empty() {
            self.providers.remove(k);
        }
        self.provider_count -= 1;
        self.release(old.charged);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::Multiaddr;

    fn limits() -> StoreLimits {
        StoreLimits {
            max_records: 100,
            max_providers: 100,
            max_key_bytes: 64,
            max_value_bytes: 10,
            per_peer: 5,
            per_host: 8,
            per_network: 12,
            providers_per_key: 3,
            ttl: Duration::from_secs(3600),
        }
    }

    fn src(ip: &str) -> Source {
        Source {
            peer: PeerId::random(),
            ip: Some(ip.parse().unwrap()),
        }
    }

    fn rec(key: &str, len: usize) -> Record {
        Record::new(RecordKey::new(&key), vec![b'x'; len])
    }

    fn put(store: &mut RelayStore, who: Source, r: Record) -> std::result::Result<(), Refusal> {
        store.set_source(Some(who));
        let out = store.put_checked(r);
        store.set_source(None);
        out
    }

    #[test]
    fn value_and_key_bounds_mean_what_they_say() {
        let mut s = RelayStore::new(PeerId::random(), limits(), StoreMetrics::default());
        let a = src("11.0.1.1");
        assert_eq!(put(&mut s, a, rec("k", 10)), Ok(()));
        assert_eq!(put(&mut s, a, rec("k2", 11)), Err(Refusal::TooLarge));
        assert_eq!(put(&mut s, a, rec(&"k".repeat(64), 1)), Ok(()));
        assert_eq!(
            put(&mut s, a, rec(&"k".repeat(65), 1)),
            Err(Refusal::BadKey)
        );
        assert_eq!(put(&mut s, a, rec("", 1)), Err(Refusal::BadKey));
        // Through the trait, a refusal is an error (Kademlia resets the request) and
        // counted by reason.
        s.set_source(Some(a));
        assert!(s.put(rec("k3", 11)).is_err());
        assert_eq!(s.metrics().refused("too_large"), 1);
    }

    #[test]
    fn every_put_gets_the_full_ttl() {
        let mut s = RelayStore::new(PeerId::random(), limits(), StoreMetrics::default());
        let mut r = rec("k", 1);
        r.expires = Some(Instant::now()); // what Kademlia may have shortened it to
        put(&mut s, src("11.0.1.1"), r).unwrap();
        let stored = s.get(&RecordKey::new(&"k")).unwrap();
        assert!(stored.expires.unwrap() > Instant::now() + Duration::from_secs(3500));
    }

    #[test]
    fn a_device_refreshing_its_record_from_a_new_address_keeps_its_quota() {
        let mut s = RelayStore::new(PeerId::random(), limits(), StoreMetrics::default());
        let a = src("2a01:4f8:1:2::1");
        for i in 0..5 {
            assert_eq!(put(&mut s, a, rec(&format!("a{i}"), 1)), Ok(()));
        }
        // The device's privacy address changed within its /64: at its quota, it still
        // refreshes its own record, which stays charged once.
        let moved = Source {
            ip: src("2a01:4f8:1:2::99").ip,
            ..a
        };
        assert_eq!(put(&mut s, moved, rec("a0", 2)), Ok(()));
        assert_eq!(s.held_by(&a.peer), 5);
        assert_eq!(s.usage.len(), 3, "one peer, one host, one network account");
        // From another network the record moves to that host and network, and the
        // peer, at its quota, still holds 5.
        let away = Source {
            ip: src("11.0.1.1").ip,
            ..a
        };
        assert_eq!(put(&mut s, away, rec("a1", 2)), Ok(()));
        assert_eq!(s.held_by(&a.peer), 5);
        assert_eq!(s.usage.len(), 5, "the peer, two hosts, two networks");
        // A new key is still refused at the peer's quota, and nothing changes.
        assert_eq!(put(&mut s, away, rec("a5", 2)), Err(Refusal::Quota));
        assert_eq!(s.held_by(&a.peer), 5);
        // Another peer at its own quota cannot take one of them over; the owner keeps it.
        let b = src("11.0.9.1");
        for i in 0..5 {
            assert_eq!(put(&mut s, b, rec(&format!("b{i}"), 1)), Ok(()));
        }
        assert_eq!(put(&mut s, b, rec("a2", 1)), Err(Refusal::Quota));
        assert_eq!(s.held_by(&a.peer), 5);
        assert_eq!(s.get(&RecordKey::new(&"a2")).unwrap().value, vec![b'x']);
        for i in 0..5 {
            s.remove(&RecordKey::new(&format!("a{i}")));
            s.remove(&RecordKey::new(&format!("b{i}")));
        }
        assert!(s.usage.is_empty(), "every account released");
    }

    #[test]
    fn quotas_per_peer_host_and_network() {
        let mut s = RelayStore::new(PeerId::random(), limits(), StoreMetrics::default());
        // (who, key, expected): per peer 5, per host 8, per /24 12.
        let a = src("11.0.1.1");
        for i in 0..5 {
            assert_eq!(put(&mut s, a, rec(&format!("a{i}"), 1)), Ok(()));
        }
        assert_eq!(
            put(&mut s, a, rec("a5", 1)),
            Err(Refusal::Quota),
            "per peer"
        );
        // Refreshing an own record is always possible.
        assert_eq!(put(&mut s, a, rec("a0", 2)), Ok(()));
        // A second key on the same host: 3 more fit (host quota 8).
        let b = Source {
            peer: PeerId::random(),
            ..a
        };
        for i in 0..3 {
            assert_eq!(put(&mut s, b, rec(&format!("b{i}"), 1)), Ok(()));
        }
        assert_eq!(
            put(&mut s, b, rec("b3", 1)),
            Err(Refusal::Quota),
            "per host"
        );
        // Another host of the same /24: 4 more fit (network quota 12).
        let c = src("11.0.1.2");
        for i in 0..4 {
            assert_eq!(put(&mut s, c, rec(&format!("c{i}"), 1)), Ok(()));
        }
        assert_eq!(
            put(&mut s, c, rec("c4", 1)),
            Err(Refusal::Quota),
            "per network"
        );
        // Another network is not affected.
        let d = src("11.0.2.1");
        assert_eq!(put(&mut s, d, rec("d0", 1)), Ok(()));
        // IPv6: /64 hosts, /48 networks.
        let e = src("2a01:4f8:1:2::1");
        let f = src("2a01:4f8:1:2::2");
        for i in 0..5 {
            put(&mut s, e, rec(&format!("e{i}"), 1)).unwrap();
        }
        for i in 0..3 {
            put(&mut s, f, rec(&format!("f{i}"), 1)).unwrap();
        }
        assert_eq!(put(&mut s, f, rec("f3", 1)), Err(Refusal::Quota), "per /64");
        // Loopback sources: per peer only.
        for _ in 0..4 {
            let l = src("127.0.0.1");
            for i in 0..5 {
                put(&mut s, l, rec(&format!("l{}{i}", l.peer), 1)).unwrap();
            }
        }
    }

    #[test]
    fn a_record_taken_over_changes_owner() {
        let mut s = RelayStore::new(PeerId::random(), limits(), StoreMetrics::default());
        let a = src("11.0.1.1");
        let b = src("11.0.2.1");
        put(&mut s, a, rec("group", 1)).unwrap();
        put(&mut s, b, rec("group", 2)).unwrap();
        assert_eq!(s.held_by(&a.peer), 0);
        assert_eq!(s.held_by(&b.peer), 1);
        assert_eq!(s.record_count(), 1);
        s.remove(&RecordKey::new(&"group"));
        assert_eq!(s.held_by(&b.peer), 0);
    }

    #[test]
    fn full_store_purges_expired_entries_first() {
        let mut l = limits();
        l.max_records = 3;
        l.per_peer = 0;
        l.per_host = 0;
        l.per_network = 0;
        let mut s = RelayStore::new(PeerId::random(), l, StoreMetrics::default());
        let a = src("11.0.1.1");
        for i in 0..3 {
            put(&mut s, a, rec(&format!("k{i}"), 1)).unwrap();
        }
        assert_eq!(put(&mut s, a, rec("k3", 1)), Err(Refusal::Full));
        // Age one record past its TTL: the next put finds room.
        s.records
            .get_mut(&RecordKey::new(&"k0"))
            .unwrap()
            .entry
            .expires = Some(Instant::now());
        assert_eq!(put(&mut s, a, rec("k3", 1)), Ok(()));
        assert_eq!(s.metrics().purged.get(), 1);
        assert_eq!(s.record_count(), 3);
        assert_eq!(s.held_by(&a.peer), 3);
    }

    #[test]
    fn providers_are_bounded_filtered_and_purged() {
        let mut s = RelayStore::new(PeerId::random(), limits(), StoreMetrics::default());
        let key = RecordKey::new(&"cid");
        let add = |s: &mut RelayStore, who: Source, addrs: &[&str]| {
            s.set_source(Some(who));
            let out = s.add_provider_checked(ProviderRecord {
                key: key.clone(),
                provider: who.peer,
                expires: None,
                addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            });
            s.set_source(None);
            out
        };
        let a = src("11.0.1.1");
        add(
            &mut s,
            a,
            &[
                "/ip4/192.168.1.2/udp/1/quic-v1",
                "/ip4/11.0.1.1/udp/1/quic-v1",
            ],
        )
        .unwrap();
        let got = s.providers(&key);
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0].addresses,
            vec!["/ip4/11.0.1.1/udp/1/quic-v1".parse::<Multiaddr>().unwrap()],
            "a private address from a public source is not handed out"
        );
        for n in 2..=3 {
            add(&mut s, src(&format!("11.0.{n}.1")), &[]).unwrap();
        }
        assert_eq!(add(&mut s, src("11.0.9.1"), &[]), Err(Refusal::Full));
        assert_eq!(s.provider_count(), 3);
        for list in s.providers.values_mut() {
            for p in list {
                p.entry.expires = Some(Instant::now());
            }
        }
        assert_eq!(s.purge(Instant::now()), 3);
        assert_eq!(s.provider_count(), 0);
        assert_eq!(s.held_by(&a.peer), 0);
    }
}
