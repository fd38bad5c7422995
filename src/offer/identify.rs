//! Identify, with each connection's listen addresses chosen by its [`Offer`].
//!
//! libp2p's identify sends every connection the same set (external and listen
//! addresses). This behaviour keeps that set itself and wraps each connection's
//! handler: the handler replaces the set its inner handler would send by the offer for
//! its client before the first message, and again when the relay's addresses change
//! or the client reports where it sees the relay (then it pushes the new set).

use std::collections::HashSet;
use std::task::{Context, Poll};

use libp2p::PeerId;
use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::identify;
use libp2p::swarm::handler::ConnectionEvent;
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, ExternalAddresses,
    FromSwarm, ListenAddresses, NetworkBehaviour, SubstreamProtocol, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};

use super::Offer;

type InnerHandler = THandler<identify::Behaviour>;
/// identify's handler input (`AddressesChanged`, `Push`); its module is private.
type HandlerIn = THandlerInEvent<identify::Behaviour>;
/// identify's handler output (`Identified`, ...).
type HandlerOut = THandlerOutEvent<identify::Behaviour>;

pub struct Identify {
    inner: identify::Behaviour,
    listen: ListenAddresses,
    external: ExternalAddresses,
}

impl Identify {
    pub fn new(inner: identify::Behaviour) -> Self {
        Self {
            inner,
            listen: ListenAddresses::default(),
            external: ExternalAddresses::default(),
        }
    }

    /// What libp2p's identify would send everyone: external and listen addresses.
    fn own(&self) -> HashSet<Multiaddr> {
        self.external
            .iter()
            .chain(self.listen.iter())
            .cloned()
            .collect()
    }
}

impl NetworkBehaviour for Identify {
    type ConnectionHandler = Handler;
    type ToSwarm = identify::Event;

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
    ) -> Result<Handler, ConnectionDenied> {
        let inner = self.inner.handle_established_inbound_connection(
            connection_id,
            peer,
            local_addr,
            remote_addr,
        )?;
        Ok(Handler::new(inner, Offer::new(remote_addr), self.own()))
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
    ) -> Result<Handler, ConnectionDenied> {
        let inner = self.inner.handle_established_outbound_connection(
            connection_id,
            peer,
            addr,
            role_override,
            port_use,
        )?;
        Ok(Handler::new(inner, Offer::new(addr), self.own()))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        self.listen.on_swarm_event(&event);
        self.external.on_swarm_event(&event);
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.inner
            .on_connection_handler_event(peer_id, connection_id, event)
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<identify::Event, THandlerInEvent<Self>>> {
        self.inner.poll(cx)
    }
}

/// identify's connection handler with the addresses it sends replaced by the offer.
pub struct Handler {
    /// Boxed: identify's handler is 3.4 KiB inline, and libp2p-swarm keeps the
    /// handler inline in each connection's task more than once (src/behaviour.rs).
    inner: Box<InnerHandler>,
    offer: Offer,
    /// The relay's addresses as identify would send them to everyone.
    own: HashSet<Multiaddr>,
    /// What the inner handler sends.
    offered: HashSet<Multiaddr>,
}

impl Handler {
    fn new(mut inner: InnerHandler, offer: Offer, own: HashSet<Multiaddr>) -> Self {
        let offered: HashSet<Multiaddr> = offer.select(&own, None).into_iter().collect();
        // Before the connection runs, so no message ever carries the unfiltered set.
        inner.on_behaviour_event(HandlerIn::AddressesChanged(offered.clone()));
        Self {
            inner: Box::new(inner),
            offer,
            own,
            offered,
        }
    }

    /// Hand the inner handler the offer for the current facts; `push` it to the client
    /// if it changed.
    fn update(&mut self, push: bool) {
        let offered: HashSet<Multiaddr> = self.offer.select(&self.own, None).into_iter().collect();
        if offered == self.offered {
            return;
        }
        self.offered = offered.clone();
        self.inner
            .on_behaviour_event(HandlerIn::AddressesChanged(offered));
        if push {
            self.inner.on_behaviour_event(HandlerIn::Push);
        }
    }
}

impl ConnectionHandler for Handler {
    type FromBehaviour = <InnerHandler as ConnectionHandler>::FromBehaviour;
    type ToBehaviour = <InnerHandler as ConnectionHandler>::ToBehaviour;
    type InboundProtocol = <InnerHandler as ConnectionHandler>::InboundProtocol;
    type OutboundProtocol = <InnerHandler as ConnectionHandler>::OutboundProtocol;
    type InboundOpenInfo = <InnerHandler as ConnectionHandler>::InboundOpenInfo;
    type OutboundOpenInfo = <InnerHandler as ConnectionHandler>::OutboundOpenInfo;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, Self::InboundOpenInfo> {
        self.inner.listen_protocol()
    }

    fn connection_keep_alive(&self) -> bool {
        self.inner.connection_keep_alive()
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<
        ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>,
    > {
        let event = self.inner.poll(cx);
        if let Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(HandlerOut::Identified(info))) =
            &event
            && self.offer.observed(&info.observed_addr)
        {
            // Pushed once the inner handler is polled again, which the connection
            // does right after this event.
            self.update(true);
        }
        event
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Option<Self::ToBehaviour>> {
        self.inner.poll_close(cx)
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        match event {
            HandlerIn::AddressesChanged(own) => {
                self.own = own;
                // identify itself pushes after listen address changes.
                self.update(false);
            }
            other => self.inner.on_behaviour_event(other),
        }
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<
            Self::InboundProtocol,
            Self::OutboundProtocol,
            Self::InboundOpenInfo,
            Self::OutboundOpenInfo,
        >,
    ) {
        self.inner.on_connection_event(event)
    }
}
