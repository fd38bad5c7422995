//! Connection limits: handshakes in progress, established connections in total, per
//! peer, and (inbound) per host and per network.
//!
//! The per-host (IPv4 address, IPv6 /64) and per-network (IPv4 /24, IPv6 /48) caps are
//! checked before the total, so one host cannot fill `--max-connections` and turn
//! everyone else away; a household behind one NAT is one host.
//!
//! This replaces `libp2p-connection-limits` (0.7.0), which keeps an entry for every peer
//! that ever connected (its per-peer set is emptied on disconnect but never removed):
//! about 300 bytes per distinct peer for the life of the process, which on a relay open
//! to the internet grows without bound (BENCHMARKS.md, churn). Here a peer's entry goes
//! when its last connection does.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::task::{Context, Poll};

use libp2p::PeerId;
use libp2p::core::transport::PortUse;
use libp2p::core::{ConnectedPoint, Endpoint, Multiaddr};
use libp2p::swarm::behaviour::ConnectionEstablished;
use libp2p::swarm::{
    ConnectionClosed, ConnectionDenied, ConnectionId, FromSwarm, ListenFailure, NetworkBehaviour,
    THandler, THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
};

/// Limits; `None` means unlimited.
#[derive(Clone, Copy, Debug, Default)]
pub struct Limits {
    pub max_pending_incoming: Option<u32>,
    pub max_established: Option<u32>,
    pub max_established_per_peer: Option<u32>,
    pub max_established_per_host: Option<u32>,
    pub max_established_per_network: Option<u32>,
}

/// Which limit a connection ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exceeded {
    pub limit: &'static str,
    pub max: u32,
}

impl fmt::Display for Exceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "connection limit exceeded: at most {} {}",
            self.max, self.limit
        )
    }
}

impl std::error::Error for Exceeded {}

#[derive(Debug, Default)]
pub struct Behaviour {
    limits: Limits,
    pending_incoming: HashSet<ConnectionId>,
    /// Connections in `per_peer`, all peers together.
    established: usize,
    per_peer: HashMap<PeerId, HashSet<ConnectionId>>,
    /// Inbound established connections: their (host, network) prefixes.
    inbound: HashMap<ConnectionId, (u128, u128)>,
    per_host: HashMap<u128, usize>,
    per_network: HashMap<u128, usize>,
}

impl Behaviour {
    /// Gives back the room departed connections left in its tables
    /// ([`crate::tables`]).
    pub fn shrink(&mut self) {
        use crate::tables::shrink;
        shrink(&mut self.pending_incoming);
        shrink(&mut self.per_peer);
        shrink(&mut self.inbound);
        shrink(&mut self.per_host);
        shrink(&mut self.per_network);
    }
}

/// Add `delta` (+1 or -1) to `key`'s count, dropping counts that reach zero.
fn count(map: &mut HashMap<u128, usize>, key: u128, add: bool) {
    if add {
        *map.entry(key).or_default() += 1;
    } else if let Some(n) = map.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            map.remove(&key);
        }
    }
}

fn prefixes(addr: &Multiaddr) -> Option<(u128, u128)> {
    let ip = crate::addrs::ip(addr)?;
    Some((
        crate::addrs::host_prefix(ip),
        crate::addrs::network_prefix(ip),
    ))
}

impl Behaviour {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// Peers with at least one established connection (what the per-peer table holds).
    pub fn tracked_peers(&self) -> usize {
        self.per_peer.len()
    }

    fn check(
        limit: Option<u32>,
        current: usize,
        name: &'static str,
    ) -> Result<(), ConnectionDenied> {
        match limit {
            Some(max) if current >= max as usize => {
                Err(ConnectionDenied::new(Exceeded { limit: name, max }))
            }
            _ => Ok(()),
        }
    }

    fn check_established(&self, peer: PeerId) -> Result<(), ConnectionDenied> {
        Self::check(
            self.limits.max_established_per_peer,
            self.per_peer.get(&peer).map_or(0, HashSet::len),
            "connections per peer",
        )?;
        Self::check(
            self.limits.max_established,
            self.established,
            "established connections",
        )
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = std::convert::Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        _local_addr: &Multiaddr,
        _remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        Self::check(
            self.limits.max_pending_incoming,
            self.pending_incoming.len(),
            "incoming handshakes in progress",
        )?;
        self.pending_incoming.insert(connection_id);
        Ok(())
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        _local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.pending_incoming.remove(&connection_id);
        if let Some((host, network)) = prefixes(remote_addr) {
            Self::check(
                self.limits.max_established_per_host,
                self.per_host.get(&host).copied().unwrap_or(0),
                "connections per host",
            )?;
            Self::check(
                self.limits.max_established_per_network,
                self.per_network.get(&network).copied().unwrap_or(0),
                "connections per network",
            )?;
        }
        self.check_established(peer)?;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        peer: PeerId,
        _addr: &Multiaddr,
        _role_override: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check_established(peer)?;
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            }) => {
                let new = self
                    .per_peer
                    .entry(peer_id)
                    .or_default()
                    .insert(connection_id);
                self.established += usize::from(new);
                if let ConnectedPoint::Listener { send_back_addr, .. } = endpoint
                    && new
                    && let Some((host, network)) = prefixes(send_back_addr)
                {
                    self.inbound.insert(connection_id, (host, network));
                    count(&mut self.per_host, host, true);
                    count(&mut self.per_network, network, true);
                }
            }
            FromSwarm::ConnectionClosed(ConnectionClosed {
                peer_id,
                connection_id,
                ..
            }) => {
                if let Some((host, network)) = self.inbound.remove(&connection_id) {
                    count(&mut self.per_host, host, false);
                    count(&mut self.per_network, network, false);
                }
                if let Some(set) = self.per_peer.get_mut(&peer_id) {
                    if set.remove(&connection_id) {
                        self.established -= 1;
                    }
                    if set.is_empty() {
                        self.per_peer.remove(&peer_id);
                    }
                }
            }
            FromSwarm::ListenFailure(ListenFailure { connection_id, .. }) => {
                self.pending_incoming.remove(&connection_id);
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _peer: PeerId,
        _connection: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        libp2p::core::util::unreachable(event)
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint_from(ip: &str) -> ConnectedPoint {
        ConnectedPoint::Listener {
            local_addr: "/ip4/127.0.0.1/udp/4001/quic-v1".parse().unwrap(),
            send_back_addr: format!("/{ip}/udp/5000/quic-v1").parse().unwrap(),
        }
    }

    fn endpoint() -> ConnectedPoint {
        endpoint_from("ip4/127.0.0.2")
    }

    fn established(b: &mut Behaviour, peer: PeerId, id: usize) -> Result<(), ConnectionDenied> {
        established_from(b, peer, id, "ip4/127.0.0.2")
    }

    fn established_from(
        b: &mut Behaviour,
        peer: PeerId,
        id: usize,
        ip: &str,
    ) -> Result<(), ConnectionDenied> {
        let c = ConnectionId::new_unchecked(id);
        let endpoint = endpoint_from(ip);
        let addr = endpoint.get_remote_address().clone();
        b.handle_pending_inbound_connection(c, &addr, &addr)?;
        b.handle_established_inbound_connection(c, peer, &addr, &addr)?;
        b.on_swarm_event(FromSwarm::ConnectionEstablished(ConnectionEstablished {
            peer_id: peer,
            connection_id: c,
            endpoint: &endpoint,
            failed_addresses: &[],
            other_established: 0,
        }));
        Ok(())
    }

    fn closed(b: &mut Behaviour, peer: PeerId, id: usize) {
        b.on_swarm_event(FromSwarm::ConnectionClosed(ConnectionClosed {
            peer_id: peer,
            connection_id: ConnectionId::new_unchecked(id),
            endpoint: &endpoint(),
            cause: None,
            remaining_established: 0,
        }));
    }

    #[test]
    fn hosts_and_networks_are_capped_before_the_total() {
        let mut b = Behaviour::new(Limits {
            max_established: Some(100),
            max_established_per_host: Some(2),
            max_established_per_network: Some(3),
            ..Limits::default()
        });
        established_from(&mut b, PeerId::random(), 1, "ip4/198.51.100.1").unwrap();
        established_from(&mut b, PeerId::random(), 2, "ip4/198.51.100.1").unwrap();
        let e = denied(established_from(
            &mut b,
            PeerId::random(),
            3,
            "ip4/198.51.100.1",
        ));
        assert_eq!(e.limit, "connections per host");
        established_from(&mut b, PeerId::random(), 4, "ip4/198.51.100.2").unwrap();
        let e = denied(established_from(
            &mut b,
            PeerId::random(),
            5,
            "ip4/198.51.100.3",
        ));
        assert_eq!(
            e.to_string(),
            "connection limit exceeded: at most 3 connections per network"
        );
        established_from(&mut b, PeerId::random(), 6, "ip4/198.51.101.1").unwrap();
        // One IPv6 /64 is one host.
        established_from(&mut b, PeerId::random(), 7, "ip6/2001:db8:0:1::1").unwrap();
        established_from(&mut b, PeerId::random(), 8, "ip6/2001:db8:0:1::2").unwrap();
        let e = denied(established_from(
            &mut b,
            PeerId::random(),
            9,
            "ip6/2001:db8:0:1::3",
        ));
        assert_eq!(e.limit, "connections per host");
        // Closing frees the host's slot; nothing is left once all are gone.
        let peer = PeerId::random();
        b.on_swarm_event(FromSwarm::ConnectionClosed(ConnectionClosed {
            peer_id: peer,
            connection_id: ConnectionId::new_unchecked(1),
            endpoint: &endpoint_from("ip4/198.51.100.1"),
            cause: None,
            remaining_established: 0,
        }));
        established_from(&mut b, peer, 10, "ip4/198.51.100.1").unwrap();
        for id in [2, 4, 6, 7, 8, 10] {
            closed(&mut b, PeerId::random(), id);
        }
        assert!(b.inbound.is_empty() && b.per_host.is_empty() && b.per_network.is_empty());
    }

    fn denied(r: Result<(), ConnectionDenied>) -> Exceeded {
        r.expect_err("over the limit")
            .downcast::<Exceeded>()
            .expect("a limit error")
    }

    #[test]
    fn peers_leave_no_entry_behind() {
        let mut b = Behaviour::new(Limits::default());
        let peers: Vec<PeerId> = (0..1000).map(|_| PeerId::random()).collect();
        for (i, p) in peers.iter().enumerate() {
            established(&mut b, *p, 2 * i).unwrap();
            established(&mut b, *p, 2 * i + 1).unwrap();
        }
        assert_eq!(b.tracked_peers(), 1000);
        for (i, p) in peers.iter().enumerate() {
            closed(&mut b, *p, 2 * i);
            assert_eq!(
                b.tracked_peers(),
                1000 - i,
                "peer with one connection left stays"
            );
            closed(&mut b, *p, 2 * i + 1);
        }
        assert_eq!(b.tracked_peers(), 0);
        assert!(b.established == 0 && b.pending_incoming.is_empty());
    }

    #[test]
    fn limits_deny_and_free_up() {
        let mut b = Behaviour::new(Limits {
            max_pending_incoming: None,
            max_established: Some(3),
            max_established_per_peer: Some(2),
            ..Limits::default()
        });
        let (p, q) = (PeerId::random(), PeerId::random());
        established(&mut b, p, 1).unwrap();
        established(&mut b, p, 2).unwrap();
        let e = denied(established(&mut b, p, 3));
        assert_eq!(e.max, 2);
        assert_eq!(
            e.to_string(),
            "connection limit exceeded: at most 2 connections per peer"
        );
        established(&mut b, q, 4).unwrap();
        assert_eq!(
            denied(established(&mut b, q, 5)).limit,
            "established connections"
        );
        closed(&mut b, p, 1);
        established(&mut b, q, 6).unwrap();
        // Denied attempts released their pending-handshake slot.
        assert!(b.pending_incoming.is_empty());
    }

    #[test]
    fn pending_handshakes_are_bounded() {
        let mut b = Behaviour::new(Limits {
            max_pending_incoming: Some(2),
            ..Limits::default()
        });
        let a: Multiaddr = "/ip4/127.0.0.1/udp/1/quic-v1".parse().unwrap();
        for i in 0..2 {
            b.handle_pending_inbound_connection(ConnectionId::new_unchecked(i), &a, &a)
                .unwrap();
        }
        let e = denied(b.handle_pending_inbound_connection(ConnectionId::new_unchecked(2), &a, &a));
        assert_eq!(e.limit, "incoming handshakes in progress");
        b.on_swarm_event(FromSwarm::ListenFailure(ListenFailure {
            local_addr: &a,
            send_back_addr: &a,
            error: &libp2p::swarm::ListenError::Aborted,
            connection_id: ConnectionId::new_unchecked(0),
            peer_id: None,
        }));
        b.handle_pending_inbound_connection(ConnectionId::new_unchecked(3), &a, &a)
            .unwrap();
    }
}
