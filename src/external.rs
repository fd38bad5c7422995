//! Which observed address the relay adopts as its own external address, when the
//! operator gave none (`--external-address` always wins and is recommended).
//!
//! Peers tell the relay, in identify, the address they see it at. One host can mint any
//! number of peer IDs, so a candidate is adopted only once peers from
//! [`defaults::OBSERVED_ADDR_NETWORKS`] distinct networks (IPv4 /24, IPv6 /48) report
//! it. The candidate table is bounded; when it is full the candidate with the fewest
//! networks behind it (the oldest among equals) makes room, so a flood of invented
//! addresses cannot push out one that honest peers keep confirming.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use libp2p::Multiaddr;

use crate::addrs::{self, Reach};
use crate::defaults;

/// The network a reporter's connection comes from: IPv4 /24, IPv6 /48.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Network(u128);

impl Network {
    pub fn of(ip: IpAddr) -> Network {
        Network(addrs::network_prefix(ip))
    }
}

#[derive(Debug)]
struct Candidate {
    networks: Vec<Network>,
    last_seen: Instant,
}

#[derive(Debug, Default)]
pub struct ObservedAddrs {
    candidates: HashMap<Multiaddr, Candidate>,
}

impl ObservedAddrs {
    /// A peer connected from `reporter` sees the relay at `addr`. Returns the address
    /// to adopt once enough distinct networks agree (then it leaves the table).
    pub fn observed(
        &mut self,
        addr: &Multiaddr,
        reporter: IpAddr,
        now: Instant,
    ) -> Option<Multiaddr> {
        if addrs::reach(addr) != Reach::Public {
            return None;
        }
        // A reporter on a private network or this host says nothing about the internet.
        if addrs::ip_reach(reporter) != Reach::Public {
            return None;
        }
        let addr = addrs::without_p2p(addr);
        let network = Network::of(reporter);
        if !self.candidates.contains_key(&addr)
            && self.candidates.len() >= defaults::OBSERVED_ADDR_CANDIDATES
        {
            let weakest = self
                .candidates
                .iter()
                .min_by_key(|(_, c)| (c.networks.len(), c.last_seen))
                .map(|(a, _)| a.clone())
                .expect("table is full");
            self.candidates.remove(&weakest);
        }
        let c = self.candidates.entry(addr.clone()).or_insert(Candidate {
            networks: Vec::new(),
            last_seen: now,
        });
        c.last_seen = now;
        if !c.networks.contains(&network) {
            c.networks.push(network);
        }
        if c.networks.len() >= defaults::OBSERVED_ADDR_NETWORKS {
            self.candidates.remove(&addr);
            return Some(addr);
        }
        None
    }

    pub fn len(&self) -> usize {
        self.candidates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.candidates.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const SEEN: &str = "/ip4/11.0.0.10/udp/4001/quic-v1";

    #[test]
    fn networks() {
        assert_eq!(Network::of(ip("11.0.1.1")), Network::of(ip("11.0.1.200")));
        assert_ne!(Network::of(ip("11.0.1.1")), Network::of(ip("11.0.2.1")));
        assert_eq!(
            Network::of(ip("2a01:4f8:1:2::1")),
            Network::of(ip("2a01:4f8:1:ffff::1"))
        );
        assert_ne!(
            Network::of(ip("2a01:4f8:1::1")),
            Network::of(ip("2a01:4f8:2::1"))
        );
        assert_eq!(
            Network::of(ip("::ffff:11.0.1.1")),
            Network::of(ip("11.0.1.9"))
        );
    }

    #[test]
    fn many_keys_from_one_network_change_nothing() {
        let mut o = ObservedAddrs::default();
        let now = Instant::now();
        let seen: Multiaddr = SEEN.parse().unwrap();
        for host in 1..=200u8 {
            assert_eq!(o.observed(&seen, ip(&format!("11.0.1.{host}")), now), None);
        }
    }

    #[test]
    fn distinct_networks_agree() {
        let mut o = ObservedAddrs::default();
        let now = Instant::now();
        let seen: Multiaddr = SEEN.parse().unwrap();
        let mut adopted = None;
        for n in 1..=defaults::OBSERVED_ADDR_NETWORKS as u8 {
            adopted = o.observed(&seen, ip(&format!("11.0.{n}.1")), now);
        }
        assert_eq!(adopted, Some(seen));
        assert!(o.is_empty());
    }

    #[test]
    fn private_reporters_and_private_addresses_are_ignored() {
        let mut o = ObservedAddrs::default();
        let now = Instant::now();
        let seen: Multiaddr = SEEN.parse().unwrap();
        for n in 1..=10u8 {
            assert_eq!(o.observed(&seen, ip(&format!("192.168.{n}.1")), now), None);
            assert_eq!(o.observed(&seen, ip(&format!("127.0.{n}.1")), now), None);
        }
        let private: Multiaddr = "/ip4/10.0.0.1/udp/4001/quic-v1".parse().unwrap();
        for n in 1..=10u8 {
            assert_eq!(o.observed(&private, ip(&format!("11.0.{n}.1")), now), None);
        }
        assert!(o.is_empty());
    }

    #[test]
    fn a_flood_of_invented_addresses_does_not_evict_a_confirmed_candidate() {
        let mut o = ObservedAddrs::default();
        let t0 = Instant::now();
        let seen: Multiaddr = SEEN.parse().unwrap();
        for n in 1..defaults::OBSERVED_ADDR_NETWORKS as u8 {
            o.observed(&seen, ip(&format!("11.0.{n}.1")), t0);
        }
        let later = t0 + std::time::Duration::from_secs(1);
        for port in 1..1000u16 {
            let fake: Multiaddr = format!("/ip4/11.9.9.9/udp/{port}/quic-v1").parse().unwrap();
            o.observed(&fake, ip("11.0.99.1"), later);
        }
        assert!(o.len() <= defaults::OBSERVED_ADDR_CANDIDATES);
        // One more network and the honest candidate is adopted.
        assert_eq!(o.observed(&seen, ip("11.0.200.1"), later), Some(seen));
    }
}
