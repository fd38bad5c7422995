//! Kademlia with a record store that knows who is storing.
//!
//! libp2p's Kademlia calls `RecordStore::put` from inside its handling of a peer's
//! request without saying whose request it is. This behaviour wraps it, remembers the
//! remote IP of every connection, and tells the [`RelayStore`] the source (peer and IP)
//! around each event of Kademlia's connection handlers, so quotas are charged to the
//! real sender. Everything else is passed through unchanged.

use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::{Deref, DerefMut};
use std::task::{Context, Poll};

use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{
    ConnectionClosed, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{PeerId, kad};

use crate::addrs;
use crate::record_store::{RelayStore, Source};

type Inner = kad::Behaviour<RelayStore>;

pub struct Kademlia {
    inner: Inner,
    remote_ips: HashMap<ConnectionId, IpAddr>,
}

impl Kademlia {
    /// Gives back the room departed connections left in its table
    /// ([`crate::tables`]).
    pub fn shrink(&mut self) {
        crate::tables::shrink(&mut self.remote_ips);
    }

    pub fn new(inner: Inner) -> Self {
        Self {
            inner,
            remote_ips: HashMap::new(),
        }
    }

    fn remember(&mut self, connection: ConnectionId, remote: &Multiaddr) {
        if let Some(ip) = first_ip(remote) {
            self.remote_ips.insert(connection, ip);
        }
    }
}

/// The IP a connection with this remote address comes from (none for relayed ones).
fn first_ip(addr: &Multiaddr) -> Option<IpAddr> {
    if addr.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
        return None;
    }
    addrs::ip(addr)
}

impl Deref for Kademlia {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

impl DerefMut for Kademlia {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.inner
    }
}

impl NetworkBehaviour for Kademlia {
    type ConnectionHandler = THandler<Inner>;
    type ToSwarm = kad::Event;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(connection_id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let handler = self.inner.handle_established_inbound_connection(
            connection_id,
            peer,
            local_addr,
            remote_addr,
        )?;
        self.remember(connection_id, remote_addr);
        Ok(handler)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner.handle_pending_outbound_connection(
            connection_id,
            maybe_peer,
            addresses,
            effective_role,
        )
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let handler = self.inner.handle_established_outbound_connection(
            connection_id,
            peer,
            addr,
            role_override,
            port_use,
        )?;
        self.remember(connection_id, addr);
        Ok(handler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. }) = &event {
            self.remote_ips.remove(connection_id);
        }
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        let source = Source {
            peer: peer_id,
            ip: self.remote_ips.get(&connection_id).copied(),
        };
        self.inner.store_mut().set_source(Some(source));
        self.inner
            .on_connection_handler_event(peer_id, connection_id, event);
        self.inner.store_mut().set_source(None);
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<kad::Event, THandlerInEvent<Self>>> {
        self.inner.poll(cx)
    }
}
