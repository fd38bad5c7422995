//! What the relay tells each client about its own addresses: the listen addresses in
//! identify and the relay addresses in a reservation.
//!
//! The relay knows its listen addresses (loopback, the LAN or cloud-private address of
//! its interface, a public one where the host has it), `--external-address`es, and
//! observed addresses that peers from enough networks agreed on ([`crate::external`]).
//! Not every one of them is of use to every client: a device on the internet cannot
//! dial `127.0.0.1` or a VPS's `10.x` address, and a rust-libp2p device that is handed
//! them adds them as the relay's addresses (identify) or announces circuits through
//! them (reservations). So each client is offered only what it could dial from where
//! its connection comes from ([`Origin`], the same rule as for the routing table:
//! loopback addresses to this host, private ones to private networks, public ones to
//! everyone). Where that leaves nothing a client on another network could dial (a
//! relay behind a cloud's 1:1 NAT, with no `--external-address` and not yet enough
//! agreeing observers), the client is offered the address it says it reached the relay
//! at (identify's observed address): it dialed that address, and it is told nothing
//! that another client said.
//!
//! [`identify`] and [`relay`] apply the policy to libp2p's behaviours.

pub mod identify;
pub mod relay;

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;

use crate::addrs::{self, Reach};
use crate::routing::{Origin, admissible};

/// The offer to one connection's client.
#[derive(Debug, Clone)]
pub struct Offer {
    origin: Origin,
    /// The relay's address as this client sees it (without `/p2p`), once it said so.
    observed: Option<Multiaddr>,
}

impl Offer {
    /// The offer for a connection with this remote address.
    /// (Relayed connections count as the internet: [`Origin::of`].)
    pub fn new(remote: &Multiaddr) -> Offer {
        Offer {
            origin: Origin::of(remote),
            observed: None,
        }
    }

    /// The client reports the address it sees the relay at. Kept if the client could
    /// dial it (by the same rule as the relay's own addresses) and it is a direct
    /// QUIC address; returns whether the offer may have changed.
    pub fn observed(&mut self, addr: &Multiaddr) -> bool {
        let addr = addrs::without_p2p(addr);
        if !(self.direct(&addr) && is_direct_quic(&addr)) || self.observed.as_ref() == Some(&addr) {
            return false;
        }
        self.observed = Some(addr);
        true
    }

    /// Whether the observed address was reported.
    pub fn knows_observed(&self) -> bool {
        self.observed.is_some()
    }

    /// Whether, among `own`, the client has an address it could dial from another
    /// network than the relay's host (or is on the relay's host, where all are).
    pub fn has_dialable<'a>(&self, own: impl IntoIterator<Item = &'a Multiaddr>) -> bool {
        self.origin == Origin::Loopback || own.into_iter().any(|a| self.direct(a))
    }

    /// A usable address this client could dial, not relayed.
    fn direct(&self, a: &Multiaddr) -> bool {
        usable(a) && admissible(a, self.origin) && addrs::reach(a) != Reach::Other
    }

    /// The relay's addresses offered to this client, best first (public, private,
    /// loopback; the given order within each): those of `own` it could dial, or, where
    /// none is, the address it reported seeing the relay at (`with_p2p`: with the
    /// relay's `/p2p/<id>` appended, as reservations carry it). May be empty: then the
    /// relay knows no address this client could dial.
    pub fn select<'a>(
        &self,
        own: impl IntoIterator<Item = &'a Multiaddr>,
        with_p2p: Option<libp2p::PeerId>,
    ) -> Vec<Multiaddr> {
        let mut out: Vec<Multiaddr> = Vec::new();
        for a in own {
            if usable(a) && admissible(a, self.origin) && !out.contains(a) {
                out.push(a.clone());
            }
        }
        if !self.has_dialable(&out)
            && let Some(seen) = &self.observed
        {
            let seen = match with_p2p {
                Some(peer) => seen.clone().with(Protocol::P2p(peer)),
                None => seen.clone(),
            };
            out.insert(0, seen);
        }
        out.sort_by_key(addrs::reach); // stable
        out
    }
}

/// Neither a wildcard nor a link-local address (which needs a scope nobody else has).
fn usable(a: &Multiaddr) -> bool {
    !addrs::is_unspecified(a) && !addrs::is_link_local(a)
}

/// `/ip4|ip6/<ip>/udp/<port>/quic-v1`, the only transport the relay listens on.
fn is_direct_quic(a: &Multiaddr) -> bool {
    let mut it = a.iter();
    matches!(it.next(), Some(Protocol::Ip4(_) | Protocol::Ip6(_)))
        && matches!(it.next(), Some(Protocol::Udp(_)))
        && matches!(it.next(), Some(Protocol::QuicV1))
        && it.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    const LOOPBACK: &str = "/ip4/127.0.0.1/udp/4001/quic-v1";
    const CLOUD_PRIVATE: &str = "/ip4/10.0.0.5/udp/4001/quic-v1";
    const LINK_LOCAL: &str = "/ip6/fe80::1/udp/4001/quic-v1";
    const PUBLIC: &str = "/ip4/11.1.2.3/udp/4001/quic-v1";
    const PUBLIC6: &str = "/ip6/2a01:4f8::1/udp/4001/quic-v1";
    const WILDCARD: &str = "/ip4/0.0.0.0/udp/4001/quic-v1";
    const SEEN: &str = "/ip4/11.9.9.9/udp/4001/quic-v1";

    fn own(list: &[&str]) -> Vec<Multiaddr> {
        list.iter().map(|s| m(s)).collect()
    }

    fn strs(v: Vec<Multiaddr>) -> Vec<String> {
        v.into_iter().map(|a| a.to_string()).collect()
    }

    /// The table the README states: who is offered what, by where the client's
    /// connection comes from and what the relay knows.
    #[test]
    fn offer_table() {
        let relay: libp2p::PeerId = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let all = [LOOPBACK, CLOUD_PRIVATE, LINK_LOCAL, WILDCARD];
        // client remote, relay's own addresses, client's observed, offered
        type Case<'a> = (&'a str, &'a [&'a str], Option<&'a str>, &'a [&'a str]);
        let cases: &[Case] = &[
            (
                "/ip4/127.0.0.1/udp/5/quic-v1",
                &all,
                None,
                &[CLOUD_PRIVATE, LOOPBACK],
            ),
            ("/ip4/10.0.0.9/udp/5/quic-v1", &all, None, &[CLOUD_PRIVATE]),
            // A cloud VPS behind 1:1 NAT: an internet client gets what it dialed.
            ("/ip4/11.5.5.5/udp/5/quic-v1", &all, None, &[]),
            ("/ip4/11.5.5.5/udp/5/quic-v1", &all, Some(SEEN), &[SEEN]),
            // Loopback and private addresses never go to the internet, also when
            // public ones exist; public ones go to everyone.
            (
                "/ip4/11.5.5.5/udp/5/quic-v1",
                &[LOOPBACK, PUBLIC, CLOUD_PRIVATE, PUBLIC6],
                Some(SEEN),
                &[PUBLIC, PUBLIC6],
            ),
            (
                "/ip4/192.168.1.9/udp/5/quic-v1",
                &[LOOPBACK, CLOUD_PRIVATE, PUBLIC],
                None,
                &[PUBLIC, CLOUD_PRIVATE],
            ),
            // A private client with no private or public address of the relay.
            (
                "/ip4/192.168.1.9/udp/5/quic-v1",
                &[LOOPBACK],
                Some(SEEN),
                &[SEEN],
            ),
            // Relayed connections count as the internet.
            (
                "/ip4/11.1.1.1/udp/5/quic-v1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit",
                &[LOOPBACK, CLOUD_PRIVATE],
                None,
                &[],
            ),
        ];
        for (remote, relay_addrs, seen, want) in cases {
            let mut offer = Offer::new(&m(remote));
            if let Some(s) = seen {
                assert!(offer.observed(&m(s)), "{remote}: {s} accepted");
            }
            let got = strs(offer.select(&own(relay_addrs), None));
            assert_eq!(&got, want, "client at {remote}, relay at {relay_addrs:?}");
            // Reservations carry the relay's peer ID on every address.
            let own_p2p: Vec<Multiaddr> = own(relay_addrs)
                .into_iter()
                .map(|a| a.with(Protocol::P2p(relay)))
                .collect();
            let got = offer.select(&own_p2p, Some(relay));
            assert_eq!(got.len(), want.len(), "{remote}: with /p2p");
            assert!(
                got.iter()
                    .all(|a| a.iter().last() == Some(Protocol::P2p(relay)))
            );
        }
    }

    #[test]
    fn observed_addresses_the_client_could_not_dial_are_ignored() {
        let mut public = Offer::new(&m("/ip4/11.5.5.5/udp/5/quic-v1"));
        for bad in [
            LOOPBACK,
            CLOUD_PRIVATE,
            WILDCARD,
            "/ip4/11.9.9.9/tcp/4001",
            "/ip4/11.9.9.9/udp/4001/quic-v1/p2p-circuit",
            "/dns4/relay.example/udp/4001/quic-v1",
        ] {
            assert!(!public.observed(&m(bad)), "{bad}");
        }
        assert!(!public.knows_observed());
        assert!(public.observed(&m(SEEN)));
        assert!(!public.observed(&m(SEEN)), "unchanged");
        let with_p2p = format!("{SEEN}/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN");
        assert!(!public.observed(&m(&with_p2p)), "the same without /p2p");
        // A private client may have seen the relay at a private address.
        let mut lan = Offer::new(&m("/ip4/192.168.1.9/udp/5/quic-v1"));
        assert!(lan.observed(&m(CLOUD_PRIVATE)));
    }

    #[test]
    fn dialable() {
        let public = Offer::new(&m("/ip4/11.5.5.5/udp/5/quic-v1"));
        assert!(!public.has_dialable(&own(&[LOOPBACK, CLOUD_PRIVATE])));
        assert!(public.has_dialable(&own(&[LOOPBACK, PUBLIC])));
        let local = Offer::new(&m("/ip4/127.0.0.1/udp/5/quic-v1"));
        assert!(local.has_dialable(&own(&[])));
    }
}
