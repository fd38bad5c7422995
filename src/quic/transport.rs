//! The libp2p `Transport`: one quinn endpoint per listening socket (IPv4 and IPv6
//! apart), dials sent from a listening socket where one fits (so peers and NATs see the
//! relay's well-known port), else from one ephemeral socket per address family.

use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
};

use futures::{FutureExt, StreamExt, future::BoxFuture, stream::SelectAll};
use if_watch::{IfEvent, tokio::IfWatcher};
use libp2p::{
    Multiaddr, PeerId,
    core::{
        Endpoint,
        multiaddr::Protocol,
        transport::{DialOpts, ListenerId, PortUse, TransportError, TransportEvent},
    },
    identity::Keypair,
};
use socket2::{Domain, Socket, Type};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{
    Config, Error,
    connection::{Connection, handshake},
    tls,
};

type Upgrade = BoxFuture<'static, Result<(PeerId, Connection), Error>>;

/// What one endpoint needs: built once, cloned into every endpoint.
#[derive(Clone)]
struct Quinn {
    endpoint: quinn::EndpointConfig,
    server: quinn::ServerConfig,
    client: quinn::ClientConfig,
}

pub struct Transport {
    quinn: Quinn,
    config: Config,
    handshakes: Arc<Semaphore>,
    listeners: SelectAll<Listener>,
    /// Ephemeral-port endpoints for dials no listener fits, one per address family.
    dialers: HashMap<bool, quinn::Endpoint>,
    waker: Option<Waker>,
}

impl Transport {
    pub fn new(key: &Keypair, config: Config) -> Result<Self, Error> {
        let cert = Arc::new(tls::Certificate::generate(key)?);
        let server_tls = tls::server_config(cert.clone(), config.cipher_order)?;
        let client_tls = tls::client_config(cert, config.cipher_order)?;
        let bad = |e: &dyn std::fmt::Display| Error::Config(e.to_string());

        let mut transport = quinn::TransportConfig::default();
        transport
            .max_concurrent_uni_streams(0u32.into())
            .max_concurrent_bidi_streams(config.max_streams.into())
            .datagram_receive_buffer_size(None)
            .keep_alive_interval(Some(config.keep_alive_interval))
            .max_idle_timeout(Some(
                config
                    .idle_timeout
                    .try_into()
                    .map_err(|e: quinn::VarIntBoundsExceeded| bad(&e))?,
            ))
            .allow_spin(false)
            .stream_receive_window(config.stream_receive_window.into())
            .receive_window(config.receive_window.into())
            .enable_segmentation_offload(config.segmentation_offload);
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        if let Some(bound) = config.mtu_upper_bound {
            mtu.upper_bound(bound);
        }
        transport.mtu_discovery_config(Some(mtu));
        let transport = Arc::new(transport);

        let server_crypto =
            quinn::crypto::rustls::QuicServerConfig::try_from(server_tls).map_err(|e| bad(&e))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport = transport.clone();
        server.migration(false);
        server.max_incoming(config.max_incoming);

        let client_crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).map_err(|e| bad(&e))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
        client.transport_config(transport);

        // Stateless resets stay valid across restarts: the key derives from the
        // identity, as libp2p-quic's does.
        let mut endpoint = match key.derive_secret(b"libp2p quic stateless reset key") {
            Some(secret) => quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
                ring::hmac::HMAC_SHA256,
                &secret,
            ))),
            None => quinn::EndpointConfig::default(),
        };
        endpoint.supported_versions(vec![1]);

        Ok(Self {
            quinn: Quinn {
                endpoint,
                server,
                client,
            },
            handshakes: Arc::new(Semaphore::new(config.max_handshakes)),
            config,
            listeners: SelectAll::new(),
            dialers: HashMap::new(),
            waker: None,
        })
    }

    fn endpoint(&self, socket: UdpSocket, server: bool) -> Result<quinn::Endpoint, Error> {
        Ok(quinn::Endpoint::new(
            self.quinn.endpoint.clone(),
            server.then(|| self.quinn.server.clone()),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?)
    }

    /// A listener whose socket can send to `to`: same address family, and on loopback
    /// only for loopback destinations (a loopback source cannot reach anything else).
    fn listener_for(&self, to: SocketAddr) -> Option<quinn::Endpoint> {
        let fits = |l: &&Listener| {
            !l.closed
                && l.local.is_ipv4() == to.is_ipv4()
                && (l.local.ip().is_unspecified()
                    || l.local.ip().is_loopback() == to.ip().is_loopback())
        };
        self.listeners.iter().find(fits).map(|l| l.endpoint.clone())
    }

    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

/// `/ip4|ip6/<ip>/udp/<port>/quic-v1` with an optional trailing `/p2p/<peer>`.
fn socket_addr(addr: &Multiaddr) -> Option<SocketAddr> {
    let mut iter = addr.iter();
    let ip: IpAddr = match iter.next()? {
        Protocol::Ip4(ip) => ip.into(),
        Protocol::Ip6(ip) => ip.into(),
        _ => return None,
    };
    let Protocol::Udp(port) = iter.next()? else {
        return None;
    };
    let Protocol::QuicV1 = iter.next()? else {
        return None;
    };
    match iter.next() {
        None | Some(Protocol::P2p(_)) if iter.next().is_none() => Some(SocketAddr::new(ip, port)),
        _ => None,
    }
}

fn multiaddr(addr: SocketAddr) -> Multiaddr {
    Multiaddr::empty()
        .with(addr.ip().into())
        .with(Protocol::Udp(addr.port()))
        .with(Protocol::QuicV1)
}

fn bind(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if addr.is_ipv6() {
        // IPv4 and IPv6 on separate sockets, so both can bind the same port.
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Asks for a receive buffer of `wanted` bytes, and says so when the kernel caps it
/// (at `net.core.rmem_max`): a burst of connection attempts then loses datagrams.
/// Returns whether it got them.
fn grow_recv_buffer(socket: &UdpSocket, local: SocketAddr, wanted: usize) -> bool {
    let socket = socket2::SockRef::from(socket);
    // Linux reports twice what it granted (its bookkeeping overhead included).
    let granted = match socket.set_recv_buffer_size(wanted) {
        Ok(()) => socket.recv_buffer_size().map(|b| b / 2).unwrap_or(0),
        Err(_) => 0,
    };
    if granted < wanted {
        tracing::warn!(
            "UDP port {} ({local}): receive buffer is {} KiB, not the {} KiB asked for \
             (raise net.core.rmem_max): bursts of connecting peers may lose packets",
            local.port(),
            granted >> 10,
            wanted >> 10
        );
        false
    } else {
        tracing::debug!(%local, "UDP receive buffer {} KiB", granted >> 10);
        true
    }
}

impl libp2p::core::Transport for Transport {
    type Output = (PeerId, Connection);
    type Error = Error;
    type ListenerUpgrade = Upgrade;
    type Dial = Upgrade;

    fn listen_on(
        &mut self,
        id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        let local = socket_addr(&addr).ok_or(TransportError::MultiaddrNotSupported(addr))?;
        let socket = bind(local).map_err(|e| TransportError::Other(e.into()))?;
        let local = socket
            .local_addr()
            .map_err(|e| TransportError::Other(e.into()))?;
        let _ = grow_recv_buffer(&socket, local, self.config.socket_recv_buffer);
        let endpoint = self.endpoint(socket, true)?;
        let listener = Listener::new(
            id,
            endpoint,
            local,
            self.handshakes.clone(),
            self.config.handshake_timeout,
        )
        .map_err(TransportError::Other)?;
        self.listeners.push(listener);
        // Dials of this family now leave from the listening port.
        self.dialers.remove(&local.is_ipv4());
        self.wake();
        Ok(())
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        match self.listeners.iter_mut().find(|l| l.id == id) {
            Some(listener) => {
                listener.close();
                self.wake();
                true
            }
            None => false,
        }
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        opts: DialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        let to = match socket_addr(&addr) {
            Some(to) if to.port() != 0 && !to.ip().is_unspecified() => to,
            _ => return Err(TransportError::MultiaddrNotSupported(addr)),
        };
        if opts.role == Endpoint::Listener && opts.port_use == PortUse::New {
            // Hole punching (dialing as the listener): the relay does not take part.
            return Err(TransportError::MultiaddrNotSupported(addr));
        }
        let endpoint = match opts.port_use {
            PortUse::Reuse => match self.listener_for(to) {
                Some(endpoint) => endpoint,
                None => match self.dialers.get(&to.is_ipv4()) {
                    Some(endpoint) => endpoint.clone(),
                    None => {
                        let endpoint = self.ephemeral(to)?;
                        self.dialers.insert(to.is_ipv4(), endpoint.clone());
                        endpoint
                    }
                },
            },
            PortUse::New => self.ephemeral(to)?,
        };
        let client = self.quinn.client.clone();
        let timeout = self.config.handshake_timeout;
        Ok(async move {
            // The server name is not checked by libp2p peers (the certificate is).
            let connecting = endpoint.connect_with(client, to, "l")?;
            handshake(connecting, timeout, None).await
        }
        .boxed())
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        if let Poll::Ready(Some(event)) = self.listeners.poll_next_unpin(cx) {
            return Poll::Ready(event);
        }
        self.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Transport {
    fn ephemeral(&self, to: SocketAddr) -> Result<quinn::Endpoint, Error> {
        let any: IpAddr = if to.is_ipv4() {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            Ipv6Addr::UNSPECIFIED.into()
        };
        self.endpoint(bind(SocketAddr::new(any, 0))?, false)
    }
}

type Accepted = Option<(quinn::Incoming, OwnedSemaphorePermit)>;

struct Listener {
    id: ListenerId,
    endpoint: quinn::Endpoint,
    local: SocketAddr,
    handshakes: Arc<Semaphore>,
    handshake_timeout: std::time::Duration,
    /// The next connection attempt and, once one is free, a handshake slot for it:
    /// until then it waits unanswered (quinn keeps its datagrams) and the attempts
    /// after it wait in quinn's queue.
    accept: BoxFuture<'static, Accepted>,
    /// Interface addresses, for a listener on the unspecified address.
    if_watcher: Option<IfWatcher>,
    events: VecDeque<TransportEvent<Upgrade, Error>>,
    closed: bool,
}

impl Listener {
    fn new(
        id: ListenerId,
        endpoint: quinn::Endpoint,
        local: SocketAddr,
        handshakes: Arc<Semaphore>,
        handshake_timeout: std::time::Duration,
    ) -> Result<Self, Error> {
        let mut events = VecDeque::new();
        let if_watcher = if local.ip().is_unspecified() {
            Some(IfWatcher::new()?)
        } else {
            events.push_back(TransportEvent::NewAddress {
                listener_id: id,
                listen_addr: multiaddr(local),
            });
            None
        };
        let accept = next(endpoint.clone(), handshakes.clone());
        Ok(Self {
            id,
            endpoint,
            local,
            handshakes,
            handshake_timeout,
            accept,
            if_watcher,
            events,
            closed: false,
        })
    }

    fn close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        self.endpoint.close(0u32.into(), &[]);
        self.events.push_back(TransportEvent::ListenerClosed {
            listener_id: self.id,
            reason: Ok(()),
        });
    }

    /// An interface address appeared or went: a listen address of ours if it is of
    /// the socket's family.
    fn interface(&mut self, event: IfEvent) -> Option<TransportEvent<Upgrade, Error>> {
        let (ip, up) = match event {
            IfEvent::Up(net) => (net.addr(), true),
            IfEvent::Down(net) => (net.addr(), false),
        };
        if ip.is_ipv4() != self.local.is_ipv4() {
            return None;
        }
        let listen_addr = multiaddr(SocketAddr::new(ip, self.local.port()));
        Some(if up {
            TransportEvent::NewAddress {
                listener_id: self.id,
                listen_addr,
            }
        } else {
            TransportEvent::AddressExpired {
                listener_id: self.id,
                listen_addr,
            }
        })
    }
}

fn next(endpoint: quinn::Endpoint, handshakes: Arc<Semaphore>) -> BoxFuture<'static, Accepted> {
    async move {
        // In this order, a listener nobody connects to holds no slot.
        let incoming = endpoint.accept().await?;
        let permit = handshakes.acquire_owned().await.ok()?;
        Some((incoming, permit))
    }
    .boxed()
}

impl futures::Stream for Listener {
    type Item = TransportEvent<Upgrade, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(event) = this.events.pop_front() {
                return Poll::Ready(Some(event));
            }
            if this.closed {
                return Poll::Ready(None);
            }
            if let Some(watcher) = this.if_watcher.as_mut() {
                match watcher.poll_if_event(cx) {
                    Poll::Ready(Ok(event)) => {
                        if let Some(event) = this.interface(event) {
                            return Poll::Ready(Some(event));
                        }
                        continue;
                    }
                    Poll::Ready(Err(error)) => {
                        return Poll::Ready(Some(TransportEvent::ListenerError {
                            listener_id: this.id,
                            error: error.into(),
                        }));
                    }
                    Poll::Pending => {}
                }
            }
            match this.accept.poll_unpin(cx) {
                Poll::Ready(Some((incoming, permit))) => {
                    this.accept = next(this.endpoint.clone(), this.handshakes.clone());
                    let from = incoming.remote_address();
                    let connecting = match incoming.accept() {
                        Ok(connecting) => connecting,
                        Err(e) => {
                            tracing::debug!(%from, "QUIC connection attempt dropped: {e}");
                            continue;
                        }
                    };
                    let upgrade = handshake(connecting, this.handshake_timeout, Some(permit));
                    return Poll::Ready(Some(TransportEvent::Incoming {
                        listener_id: this.id,
                        upgrade: upgrade.boxed(),
                        local_addr: multiaddr(this.local),
                        send_back_addr: multiaddr(from),
                    }));
                }
                Poll::Ready(None) => {
                    // The endpoint closed under us.
                    this.close();
                    continue;
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quic_multiaddrs_map_to_socket_addresses() {
        let v4: Multiaddr = "/ip4/127.0.0.1/udp/4001/quic-v1".parse().unwrap();
        assert_eq!(socket_addr(&v4), Some("127.0.0.1:4001".parse().unwrap()));
        let peer = PeerId::random();
        let v6: Multiaddr = format!("/ip6/::1/udp/9/quic-v1/p2p/{peer}")
            .parse()
            .unwrap();
        assert_eq!(socket_addr(&v6), Some("[::1]:9".parse().unwrap()));
        for other in [
            "/ip4/127.0.0.1/udp/4001",
            "/ip4/127.0.0.1/udp/4001/quic",
            "/ip4/127.0.0.1/tcp/4001",
            "/ip4/127.0.0.1/udp/4001/quic-v1/webtransport",
            "/dns4/example.org/udp/4001/quic-v1",
        ] {
            assert_eq!(socket_addr(&other.parse().unwrap()), None, "{other}");
        }
        assert_eq!(multiaddr("127.0.0.1:4001".parse().unwrap()), v4);
    }

    #[test]
    fn a_capped_receive_buffer_is_reported() {
        let socket = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let local = socket.local_addr().unwrap();
        assert!(grow_recv_buffer(&socket, local, 64 << 10));
        // Past any net.core.rmem_max a machine sets.
        assert!(!grow_recv_buffer(&socket, local, 1 << 30));
    }
}
