//! Who enters the Kademlia routing table, with which addresses, and who is forgotten.
//!
//! What the relay puts into its routing table is what it hands to *other* devices in
//! answers to their queries, so an address goes in only if a peer on the asking side
//! of the network could dial it (the table in the README, "Routing policy"):
//!
//! | listen address \ connection from | loopback | private | public |
//! |---|---|---|---|
//! | loopback (`127/8`, `::1`)        | yes      | no      | no     |
//! | private (RFC 1918, ULA, CGNAT, link-local) | yes | yes | no |
//! | public IP, DNS name, `/p2p-circuit` | yes   | yes     | yes    |
//! | wildcard, non-IP                 | no       | no      | no     |
//!
//! - Only peers that list the Kademlia protocol in identify are inserted.
//! - An inbound connection's remote address is never inserted: behind a NAT it is the
//!   router's mapping for this one connection, which nobody else can dial.
//! - At most [`defaults::ROUTING_MAX_ADDRS_PER_PEER`] addresses and
//!   [`defaults::ROUTING_MAX_ADDR_BYTES_PER_PEER`] bytes per peer, most useful first
//!   (public, relayed, private, loopback), so no answer outgrows what clients accept.
//! - On its last disconnect a peer is forgotten unless it is a `--bootstrap` relay or
//!   the relay has evidence that others can reach it: it claimed the very public
//!   address its connection came from, or the relay itself dialed it there.
//!
//! This module only decides; the event loop applies the [`Action`]s to Kademlia.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};

use crate::addrs::{self, Reach};
use crate::defaults;

/// A change to the routing table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Add(PeerId, Multiaddr),
    Remove(PeerId, Multiaddr),
    /// Drop the peer and all its addresses.
    Forget(PeerId),
}

/// Where a connection comes from, as far as the addresses it may vouch for go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    /// From this host: may vouch for loopback, private and public addresses.
    Loopback,
    /// From a private network (the relay's LAN, a CGNAT): private and public.
    Private,
    /// From anywhere else, relayed connections included: public addresses only.
    Public,
}

impl Origin {
    /// The origin of a connection with this remote address.
    pub fn of(remote: &Multiaddr) -> Origin {
        Origin::from_reach(addrs::reach(remote))
    }

    pub fn of_ip(ip: IpAddr) -> Origin {
        Origin::from_reach(addrs::ip_reach(ip))
    }

    fn from_reach(reach: Reach) -> Origin {
        match reach {
            Reach::Loopback => Origin::Loopback,
            Reach::Private => Origin::Private,
            Reach::Public | Reach::Other => Origin::Public,
        }
    }
}

/// Whether a peer connected from `origin` may have `addr` handed to others.
pub fn admissible(addr: &Multiaddr, origin: Origin) -> bool {
    if is_circuit(addr) {
        return true;
    }
    match addrs::reach(addr) {
        Reach::Public => true,
        Reach::Private => origin <= Origin::Private,
        Reach::Loopback => origin == Origin::Loopback,
        Reach::Other => false,
    }
}

fn is_circuit(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// Usefulness to others, best first: public, relayed, private, loopback.
fn rank(addr: &Multiaddr) -> u8 {
    if is_circuit(addr) {
        return 1;
    }
    match addrs::reach(addr) {
        Reach::Public => 0,
        Reach::Private => 2,
        Reach::Loopback => 3,
        Reach::Other => 4,
    }
}

/// The addresses of a peer connected from `origin` that go into the routing table:
/// admissible ones, without a trailing `/p2p/<peer>`, deduplicated, most useful first,
/// within the per-peer count and byte budgets.
pub fn select(peer: &PeerId, listen: &[Multiaddr], origin: Origin) -> Vec<Multiaddr> {
    let mut candidates: Vec<Multiaddr> = Vec::new();
    for a in listen {
        let a = strip_own_p2p(a, peer);
        if admissible(&a, origin) && !candidates.contains(&a) {
            candidates.push(a);
        }
        // Scanning is bounded as well: identify may carry hundreds of addresses.
        if candidates.len() >= 4 * defaults::ROUTING_MAX_ADDRS_PER_PEER {
            break;
        }
    }
    candidates.sort_by_key(rank); // stable: the peer's own order within a rank
    let mut out = Vec::new();
    let mut bytes = 0;
    for a in candidates {
        if out.len() == defaults::ROUTING_MAX_ADDRS_PER_PEER {
            break;
        }
        let len = a.as_ref().len();
        if bytes + len > defaults::ROUTING_MAX_ADDR_BYTES_PER_PEER {
            continue;
        }
        bytes += len;
        out.push(a);
    }
    out
}

fn strip_own_p2p(addr: &Multiaddr, peer: &PeerId) -> Multiaddr {
    let mut a = addr.clone();
    if let Some(Protocol::P2p(p)) = a.iter().last()
        && p == *peer
    {
        a.pop();
    }
    a
}

/// One open connection of a peer.
#[derive(Debug, Clone)]
struct Conn {
    remote: Multiaddr,
    /// The relay dialed it (at `remote`).
    outbound: bool,
}

#[derive(Debug, Default)]
struct Peer {
    conns: HashMap<ConnectionId, Conn>,
    speaks_kad: bool,
    /// What the relay put into Kademlia for this peer.
    inserted: Vec<Multiaddr>,
    /// Others can reach it (see the module docs).
    confirmed: bool,
    /// Recent identify updates, for the rate limit.
    updates: VecDeque<Instant>,
    /// The latest update refused by the rate limit, applied by [`RoutingPolicy::tick`].
    pending: Option<(Vec<Multiaddr>, bool)>,
}

impl Peer {
    /// Whether the identify rate limit lets an update through at `now`; if so, it is
    /// counted.
    fn may_update(&mut self, now: Instant) -> bool {
        while self
            .updates
            .front()
            .is_some_and(|t| now.duration_since(*t) >= IDENTIFY_WINDOW)
        {
            self.updates.pop_front();
        }
        if self.updates.len() >= defaults::ROUTING_MAX_IDENTIFY_PER_MINUTE {
            return false;
        }
        self.updates.push_back(now);
        true
    }

    /// The most local origin among its connections (it may vouch for what that reaches).
    fn origin(&self) -> Origin {
        self.conns
            .values()
            .map(|c| Origin::of(&c.remote))
            .min()
            .unwrap_or(Origin::Public)
    }
}

/// The routing-table policy's state: facts about connected peers.
#[derive(Debug)]
pub struct RoutingPolicy {
    peers: HashMap<PeerId, Peer>,
    bootstrap: HashSet<PeerId>,
}

impl RoutingPolicy {
    pub fn new(bootstrap: impl IntoIterator<Item = PeerId>) -> Self {
        Self {
            peers: HashMap::new(),
            bootstrap: bootstrap.into_iter().collect(),
        }
    }

    /// Gives back the room departed peers left in its table ([`crate::tables`]).
    pub fn shrink(&mut self) {
        crate::tables::shrink(&mut self.peers);
    }

    /// Peers with at least one open connection.
    pub fn connected_peers(&self) -> usize {
        self.peers.len()
    }

    /// The remote address of one of a peer's open connections.
    pub fn remote(&self, peer: &PeerId, conn: ConnectionId) -> Option<&Multiaddr> {
        Some(&self.peers.get(peer)?.conns.get(&conn)?.remote)
    }

    /// A connection was established. `outbound`: the relay dialed `remote`.
    pub fn connected(
        &mut self,
        peer: PeerId,
        conn: ConnectionId,
        remote: &Multiaddr,
        outbound: bool,
    ) -> Vec<Action> {
        let remote = addrs::without_p2p(remote);
        let p = self.peers.entry(peer).or_default();
        if outbound && addrs::is_public(&remote) {
            // The relay reached it there itself (Kademlia inserts that address).
            p.confirmed = true;
        }
        p.conns.insert(conn, Conn { remote, outbound });
        Vec::new()
    }

    /// The peer sent identify information: its listen addresses and whether it lists
    /// the configured Kademlia protocol.
    pub fn identified(
        &mut self,
        peer: PeerId,
        listen: Vec<Multiaddr>,
        speaks_kad: bool,
        now: Instant,
    ) -> Vec<Action> {
        let Some(p) = self.peers.get_mut(&peer) else {
            return Vec::new(); // already gone
        };
        if !p.may_update(now) {
            p.pending = Some((listen, speaks_kad));
            return Vec::new();
        }
        p.pending = None;
        let bootstrap = self.bootstrap.contains(&peer);
        apply(peer, p, listen, speaks_kad, bootstrap)
    }

    /// Apply identify updates the rate limit held back, once the peer may update again.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        for (peer, p) in self.peers.iter_mut() {
            if p.pending.is_some() && p.may_update(now) {
                let (listen, kad) = p.pending.take().expect("checked");
                let bootstrap = self.bootstrap.contains(peer);
                actions.extend(apply(*peer, p, listen, kad, bootstrap));
            }
        }
        actions
    }

    /// A connection closed; `remaining` connections to the peer are still open.
    pub fn disconnected(
        &mut self,
        peer: PeerId,
        conn: ConnectionId,
        remaining: u32,
    ) -> Vec<Action> {
        let Some(p) = self.peers.get_mut(&peer) else {
            return Vec::new();
        };
        p.conns.remove(&conn);
        if remaining > 0 && !p.conns.is_empty() {
            return Vec::new();
        }
        let p = self.peers.remove(&peer).expect("present");
        if self.bootstrap.contains(&peer) || (p.confirmed && p.speaks_kad) {
            return Vec::new();
        }
        vec![Action::Forget(peer)]
    }
}

/// How long the identify rate limit remembers an update.
const IDENTIFY_WINDOW: Duration = Duration::from_secs(60);

fn apply(
    peer: PeerId,
    p: &mut Peer,
    listen: Vec<Multiaddr>,
    speaks_kad: bool,
    bootstrap: bool,
) -> Vec<Action> {
    p.speaks_kad = speaks_kad;
    if !speaks_kad {
        if bootstrap || p.inserted.is_empty() {
            return Vec::new();
        }
        p.inserted.clear();
        return vec![Action::Forget(peer)];
    }
    let wanted = select(&peer, &listen, p.origin());
    // A public address it claims that is exactly where its connection comes from: it
    // is not behind a NAT there, so others can reach it after it has left as well.
    let inbound_remotes: Vec<&Multiaddr> = p
        .conns
        .values()
        .filter(|c| !c.outbound)
        .map(|c| &c.remote)
        .collect();
    if wanted
        .iter()
        .any(|a| addrs::is_public(a) && inbound_remotes.iter().any(|r| same_socket(a, r)))
    {
        p.confirmed = true;
    }
    let mut actions = Vec::new();
    for old in &p.inserted {
        if !wanted.contains(old) {
            actions.push(Action::Remove(peer, old.clone()));
        }
    }
    for new in &wanted {
        if !p.inserted.contains(new) {
            actions.push(Action::Add(peer, new.clone()));
        }
    }
    p.inserted = wanted;
    actions
}

/// Same IP and UDP port (what a QUIC peer listening there also dials from).
fn same_socket(a: &Multiaddr, b: &Multiaddr) -> bool {
    fn socket(m: &Multiaddr) -> Option<(IpAddr, u16)> {
        let mut it = m.iter();
        let ip: IpAddr = match it.next()? {
            Protocol::Ip4(ip) => ip.into(),
            Protocol::Ip6(ip) => ip.into(),
            _ => return None,
        };
        match it.next()? {
            Protocol::Udp(port) => Some((ip, port)),
            _ => None,
        }
    }
    socket(a).is_some() && socket(a) == socket(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    const LOOP: &str = "/ip4/127.0.0.1/udp/4100/quic-v1";
    const LAN: &str = "/ip4/192.168.1.20/udp/4100/quic-v1";
    const CGNAT: &str = "/ip4/100.64.3.4/udp/4100/quic-v1";
    const ULA: &str = "/ip6/fd00::20/udp/4100/quic-v1";
    const PUB: &str = "/ip4/198.51.99.7/udp/4100/quic-v1";
    const PUB6: &str = "/ip6/2a01:4f8::20/udp/4100/quic-v1";
    const DNS: &str = "/dns4/device.example.org/udp/4100/quic-v1";
    const CIRCUIT: &str = "/ip4/198.51.99.1/udp/4001/quic-v1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit";
    const WILD: &str = "/ip4/0.0.0.0/udp/4100/quic-v1";

    #[test]
    fn admissibility_table() {
        use Origin::*;
        // (address, from loopback, from private, from public)
        let table = [
            (LOOP, true, false, false),
            ("/ip6/::1/udp/1/quic-v1", true, false, false),
            (LAN, true, true, false),
            (CGNAT, true, true, false),
            (ULA, true, true, false),
            ("/ip6/fe80::1/udp/1/quic-v1", true, true, false),
            (PUB, true, true, true),
            (PUB6, true, true, true),
            (DNS, true, true, true),
            (CIRCUIT, true, true, true),
            (WILD, false, false, false),
            ("/memory/5", false, false, false),
        ];
        for (addr, l, p, g) in table {
            let a = m(addr);
            assert_eq!(admissible(&a, Loopback), l, "{addr} from loopback");
            assert_eq!(admissible(&a, Private), p, "{addr} from private");
            assert_eq!(admissible(&a, Public), g, "{addr} from public");
        }
    }

    #[test]
    fn origin_of_connections() {
        assert_eq!(
            Origin::of(&m("/ip4/127.0.0.9/udp/5/quic-v1")),
            Origin::Loopback
        );
        assert_eq!(
            Origin::of(&m("/ip4/10.0.0.9/udp/5/quic-v1")),
            Origin::Private
        );
        assert_eq!(
            Origin::of(&m("/ip4/100.100.0.9/udp/5/quic-v1")),
            Origin::Private
        );
        assert_eq!(
            Origin::of(&m("/ip4/11.0.1.1/udp/5/quic-v1")),
            Origin::Public
        );
        assert_eq!(Origin::of(&m(CIRCUIT)), Origin::Public);
    }

    #[test]
    fn selection_prefers_useful_addresses_and_stays_in_budget() {
        let peer = PeerId::random();
        let listen = vec![m(LOOP), m(LAN), m(PUB), m(CIRCUIT), m(PUB6), m(PUB)];
        assert_eq!(
            select(&peer, &listen, Origin::Loopback),
            vec![m(PUB), m(PUB6), m(CIRCUIT), m(LAN), m(LOOP)]
        );
        assert_eq!(
            select(&peer, &listen, Origin::Public),
            vec![m(PUB), m(PUB6), m(CIRCUIT)]
        );
        // A peer's own /p2p/ suffix is dropped.
        let with_id = m(PUB).with(Protocol::P2p(peer));
        assert_eq!(select(&peer, &[with_id], Origin::Public), vec![m(PUB)]);

        // Thousands of addresses: a bounded count and byte size.
        let many: Vec<Multiaddr> = (0..5000u32)
            .map(|i| {
                m(&format!(
                    "/ip6/2a01:4f8::{:x}/udp/{}/quic-v1",
                    i,
                    1 + i % 60000
                ))
            })
            .collect();
        let chosen = select(&peer, &many, Origin::Public);
        assert!(!chosen.is_empty());
        assert!(chosen.len() <= defaults::ROUTING_MAX_ADDRS_PER_PEER);
        let bytes: usize = chosen.iter().map(|a| a.as_ref().len()).sum();
        assert!(bytes <= defaults::ROUTING_MAX_ADDR_BYTES_PER_PEER);
    }

    fn conn(n: usize) -> ConnectionId {
        ConnectionId::new_unchecked(n)
    }

    struct Case {
        name: &'static str,
        remote: &'static str,
        outbound: bool,
        listen: &'static [&'static str],
        kad: bool,
        bootstrap: bool,
        /// Addresses inserted after identify.
        inserted: &'static [&'static str],
        /// Forgotten after the last disconnect.
        forgotten: bool,
    }

    #[test]
    fn who_enters_and_who_is_forgotten() {
        let nat_mapping = "/ip4/11.0.1.1/udp/27500/quic-v1";
        let cases = [
            Case {
                name: "NATed device: LAN and loopback addresses, connects from its router",
                remote: nat_mapping,
                outbound: false,
                listen: &[LAN, LOOP],
                kad: true,
                bootstrap: false,
                inserted: &[],
                forgotten: true,
            },
            Case {
                name: "NATed device claiming a public address it does not connect from",
                remote: nat_mapping,
                outbound: false,
                listen: &[LAN, PUB],
                kad: true,
                bootstrap: false,
                inserted: &[PUB],
                forgotten: true,
            },
            Case {
                name: "device on a public address, connecting from it",
                remote: PUB,
                outbound: false,
                listen: &[PUB, LAN],
                kad: true,
                bootstrap: false,
                inserted: &[PUB],
                forgotten: false,
            },
            Case {
                name: "public device without Kademlia (a probe)",
                remote: PUB,
                outbound: false,
                listen: &[PUB],
                kad: false,
                bootstrap: false,
                inserted: &[],
                forgotten: true,
            },
            Case {
                name: "LAN client of a LAN appliance",
                remote: "/ip4/192.168.1.20/udp/4100/quic-v1",
                outbound: false,
                listen: &[LAN, LOOP],
                kad: true,
                bootstrap: false,
                inserted: &[LAN],
                forgotten: true,
            },
            Case {
                name: "loopback client (tests, same host)",
                remote: "/ip4/127.0.0.1/udp/4100/quic-v1",
                outbound: false,
                listen: &[LOOP, WILD],
                kad: true,
                bootstrap: false,
                inserted: &[LOOP],
                forgotten: true,
            },
            Case {
                name: "bootstrap relay the relay dialed",
                remote: PUB,
                outbound: true,
                listen: &[PUB],
                kad: true,
                bootstrap: true,
                inserted: &[PUB],
                forgotten: false,
            },
            Case {
                name: "bootstrap relay on loopback",
                remote: "/ip4/127.0.0.1/udp/4100/quic-v1",
                outbound: true,
                listen: &[LOOP],
                kad: true,
                bootstrap: true,
                inserted: &[LOOP],
                forgotten: false,
            },
            Case {
                name: "peer the relay dialed at a public address",
                remote: PUB6,
                outbound: true,
                listen: &[PUB6],
                kad: true,
                bootstrap: false,
                inserted: &[PUB6],
                forgotten: false,
            },
        ];
        for c in cases {
            let peer = PeerId::random();
            let mut policy = RoutingPolicy::new(c.bootstrap.then_some(peer));
            let now = Instant::now();
            assert!(
                policy
                    .connected(peer, conn(1), &m(c.remote), c.outbound)
                    .is_empty(),
                "{}: connecting inserts nothing",
                c.name
            );
            let listen = c.listen.iter().map(|s| m(s)).collect();
            let actions = policy.identified(peer, listen, c.kad, now);
            let expected: Vec<Action> =
                c.inserted.iter().map(|a| Action::Add(peer, m(a))).collect();
            assert_eq!(actions, expected, "{}", c.name);
            let left = policy.disconnected(peer, conn(1), 0);
            assert_eq!(
                left == vec![Action::Forget(peer)],
                c.forgotten,
                "{}: {left:?}",
                c.name
            );
            assert_eq!(policy.connected_peers(), 0);
        }
    }

    #[test]
    fn updates_replace_addresses_and_are_rate_limited() {
        let peer = PeerId::random();
        let mut policy = RoutingPolicy::new([]);
        let t0 = Instant::now();
        policy.connected(peer, conn(1), &m("/ip4/127.0.0.1/udp/9/quic-v1"), false);
        assert_eq!(
            policy.identified(peer, vec![m(LOOP)], true, t0),
            vec![Action::Add(peer, m(LOOP))]
        );
        // A push with new addresses replaces the old ones.
        assert_eq!(
            policy.identified(peer, vec![m(LAN)], true, t0),
            vec![Action::Remove(peer, m(LOOP)), Action::Add(peer, m(LAN))]
        );
        // It stops speaking Kademlia: it leaves the table.
        assert_eq!(
            policy.identified(peer, vec![m(LAN)], false, t0),
            vec![Action::Forget(peer)]
        );
        // Past the per-minute budget, updates wait for the window to pass.
        for _ in 3..defaults::ROUTING_MAX_IDENTIFY_PER_MINUTE {
            policy.identified(peer, vec![m(LAN)], true, t0);
        }
        assert!(policy.identified(peer, vec![m(PUB)], true, t0).is_empty());
        assert!(policy.tick(t0 + Duration::from_secs(30)).is_empty());
        assert_eq!(
            policy.tick(t0 + IDENTIFY_WINDOW),
            vec![Action::Remove(peer, m(LAN)), Action::Add(peer, m(PUB))]
        );
    }

    #[test]
    fn a_second_connection_keeps_the_peer() {
        let peer = PeerId::random();
        let mut policy = RoutingPolicy::new([]);
        let remote = m("/ip4/127.0.0.1/udp/9/quic-v1");
        policy.connected(peer, conn(1), &remote, false);
        policy.connected(peer, conn(2), &remote, false);
        policy.identified(peer, vec![m(LOOP)], true, Instant::now());
        assert!(policy.disconnected(peer, conn(1), 1).is_empty());
        assert_eq!(
            policy.disconnected(peer, conn(2), 0),
            vec![Action::Forget(peer)]
        );
    }
}
