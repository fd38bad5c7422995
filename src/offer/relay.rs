//! Circuit relay v2, with each reservation's relay addresses chosen by the client's
//! [`Offer`].
//!
//! libp2p's relay puts all of the relay's external addresses into every accepted
//! reservation. This behaviour rewrites that acceptance on its way to the connection:
//! the client gets the addresses it could dial. Where those depend on where the client
//! sees the relay (its identify report, which usually arrives just after the
//! reservation request), the acceptance waits for that report, at most
//! [`defaults::OFFER_WAIT_FOR_OBSERVED`].

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use either::Either;
use libp2p::PeerId;
use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::relay;
use libp2p::swarm::{
    ConnectionClosed, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, NotifyHandler,
    THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use tokio::time::{Instant, Sleep};

use super::Offer;
use crate::defaults;

/// The left side of an `Either`: the relay's handler input is
/// `Either<handler::In, Infallible>`, and its `In` lives in a private module.
pub trait Left {
    type L;
}

impl<L, R> Left for Either<L, R> {
    type L = L;
}

type RelayIn = <THandlerInEvent<relay::Behaviour> as Left>::L;
type Event = ToSwarm<relay::Event, THandlerInEvent<relay::Behaviour>>;

/// An acceptance waiting for the client's identify report.
struct Parked {
    peer: PeerId,
    event: RelayIn,
    until: Instant,
}

pub struct Relay {
    inner: relay::Behaviour,
    local: PeerId,
    offers: HashMap<ConnectionId, Offer>,
    parked: HashMap<ConnectionId, Parked>,
    /// Acceptances ready to go out (in order).
    ready: VecDeque<Event>,
    timer: Option<Pin<Box<Sleep>>>,
    waker: Option<Waker>,
}

impl Relay {
    /// Gives back the room departed connections left in its tables
    /// ([`crate::tables`]).
    pub fn shrink(&mut self) {
        crate::tables::shrink(&mut self.offers);
        crate::tables::shrink(&mut self.parked);
    }

    pub fn new(local: PeerId, inner: relay::Behaviour) -> Self {
        Self {
            inner,
            local,
            offers: HashMap::new(),
            parked: HashMap::new(),
            ready: VecDeque::new(),
            timer: None,
            waker: None,
        }
    }

    /// The client on `connection` sees the relay at `addr` (from its identify report).
    /// Offer or stop offering the hop protocol (`None`: libp2p's automatic choice).
    pub fn set_status(&mut self, status: Option<relay::Status>) {
        self.inner.set_status(status);
    }

    pub fn observed(&mut self, connection: ConnectionId, addr: &Multiaddr) {
        let Some(offer) = self.offers.get_mut(&connection) else {
            return;
        };
        offer.observed(addr);
        if let Some(p) = self.parked.remove(&connection) {
            self.release(connection, p);
        }
    }

    fn release(&mut self, connection: ConnectionId, p: Parked) {
        let event = self.rewrite(connection, p.event);
        self.ready.push_back(ToSwarm::NotifyHandler {
            peer_id: p.peer,
            handler: NotifyHandler::One(connection),
            event: Either::Left(event),
        });
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    fn rewrite(&self, connection: ConnectionId, event: RelayIn) -> RelayIn {
        match (event, self.offers.get(&connection)) {
            (
                RelayIn::AcceptReservationReq {
                    inbound_reservation_req,
                    addrs,
                },
                Some(offer),
            ) => {
                let offered = offer.select(&addrs, Some(self.local));
                if offered.is_empty() {
                    tracing::debug!(
                        ?addrs,
                        "reservation: no relay address the client could dial is known (set --external-address)"
                    );
                }
                RelayIn::AcceptReservationReq {
                    inbound_reservation_req,
                    addrs: offered,
                }
            }
            (event, _) => event,
        }
    }

    /// What to do with an event on its way to a connection: pass, rewrite, or park.
    fn intercept(&mut self, event: Event) -> Option<Event> {
        let ToSwarm::NotifyHandler {
            peer_id,
            handler: NotifyHandler::One(connection),
            event: Either::Left(event),
        } = event
        else {
            return Some(event);
        };
        // (Without an observed address, the offer holds something dialable exactly when
        // the relay's own addresses do.)
        if let RelayIn::AcceptReservationReq { addrs, .. } = &event
            && let Some(offer) = self.offers.get(&connection)
            && !offer.knows_observed()
            && !offer.has_dialable(addrs)
        {
            let until = Instant::now() + defaults::OFFER_WAIT_FOR_OBSERVED;
            self.parked.insert(
                connection,
                Parked {
                    peer: peer_id,
                    event,
                    until,
                },
            );
            if self.timer.as_ref().is_none_or(|t| t.deadline() > until) {
                self.timer = Some(Box::pin(tokio::time::sleep_until(until)));
            }
            return None;
        }
        let event = self.rewrite(connection, event);
        Some(ToSwarm::NotifyHandler {
            peer_id,
            handler: NotifyHandler::One(connection),
            event: Either::Left(event),
        })
    }

    fn release_expired(&mut self, now: Instant) {
        let due: Vec<ConnectionId> = self
            .parked
            .iter()
            .filter(|(_, p)| p.until <= now)
            .map(|(c, _)| *c)
            .collect();
        for c in due {
            if let Some(p) = self.parked.remove(&c) {
                self.release(c, p);
            }
        }
        self.timer = self
            .parked
            .values()
            .map(|p| p.until)
            .min()
            .map(|until| Box::pin(tokio::time::sleep_until(until)));
    }
}

impl NetworkBehaviour for Relay {
    type ConnectionHandler = THandler<relay::Behaviour>;
    type ToSwarm = relay::Event;

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
        self.offers.insert(connection_id, Offer::new(remote_addr));
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
        self.offers.insert(connection_id, Offer::new(addr));
        Ok(handler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. }) = &event {
            self.offers.remove(connection_id);
            // Its handler, which holds the request, is gone with it.
            self.parked.remove(connection_id);
        }
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

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        // Polling the (re)armed timer registers this task for its deadline.
        while self
            .timer
            .as_mut()
            .is_some_and(|t| t.as_mut().poll(cx).is_ready())
        {
            self.release_expired(Instant::now());
        }
        if let Some(event) = self.ready.pop_front() {
            return Poll::Ready(event);
        }
        while let Poll::Ready(event) = self.inner.poll(cx) {
            if let Some(event) = self.intercept(event) {
                return Poll::Ready(event);
            }
        }
        self.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}
