//! The relay's own libp2p QUIC transport, over quinn and rustls, in place of
//! libp2p-quic (whose TLS and quinn configurations are private). It speaks the libp2p
//! QUIC and TLS specs exactly as libp2p-quic does (QUIC v1, ALPN `libp2p`, one
//! self-signed certificate with the libp2p extension on each side, bidirectional
//! streams only), and gives the relay what libp2p-quic cannot:
//!
//! - the cipher suite by the CPU it runs on ([`CipherOrder`]), chosen by the server;
//! - GSO, MTU, stream and flow-control limits ([`Config`]);
//! - bounds before a connection exists: quinn's queue of unanswered connection
//!   attempts, and a handshake admission that lets the handshakes in progress finish
//!   before new ones start, so a burst of devices on a busy CPU is served in turn
//!   rather than all timing out together.

mod certificate;
mod connection;
mod tls;
mod transport;

use std::{io, time::Duration};

use crate::defaults;

pub use connection::{Connection, Stream};
pub use tls::CipherOrder;
pub use transport::Transport;

/// What the transport is built with; [`Config::new`] gives the relay's defaults.
#[derive(Debug, Clone)]
pub struct Config {
    /// A handshake not finished in this long is abandoned (libp2p-quic: 5 s).
    pub handshake_timeout: Duration,
    /// A connection not heard from in this long is closed (libp2p-quic: 10 s).
    pub idle_timeout: Duration,
    /// Ping a connection after this long without hearing from it.
    pub keep_alive_interval: Duration,
    /// Bidirectional streams a peer may have open at once.
    pub max_streams: u32,
    /// Flow-control windows, per stream and per connection (libp2p-quic's).
    pub stream_receive_window: u32,
    pub receive_window: u32,
    /// Largest UDP payload path-MTU discovery may try (`None`: quinn's 1452).
    pub mtu_upper_bound: Option<u16>,
    /// Send up to 10 datagrams per system call where the kernel supports GSO; quinn
    /// then keeps a send buffer of that size for each connection's life.
    pub segmentation_offload: bool,
    /// Handshakes in progress at once; further connection attempts wait in quinn's
    /// queue until one finishes.
    pub max_handshakes: usize,
    /// Connection attempts quinn queues before refusing more.
    pub max_incoming: usize,
    /// Which AEAD to prefer.
    pub cipher_order: CipherOrder,
    /// Receive buffer asked for on listening sockets (the kernel may give less).
    pub socket_recv_buffer: usize,
}

impl Config {
    pub fn new() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(10),
            keep_alive_interval: defaults::QUIC_KEEP_ALIVE_INTERVAL,
            max_streams: defaults::QUIC_MAX_STREAMS_PER_CONNECTION,
            stream_receive_window: 10_000_000,
            receive_window: 15_000_000,
            mtu_upper_bound: None,
            segmentation_offload: true,
            max_handshakes: defaults::QUIC_MAX_HANDSHAKES,
            max_incoming: 4096,
            cipher_order: CipherOrder::detect(),
            socket_recv_buffer: defaults::QUIC_SOCKET_RECV_BUFFER,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("QUIC dial: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("QUIC connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("QUIC handshake timed out")]
    HandshakeTimedOut,
    #[error("the peer presented no valid libp2p certificate")]
    NoPeerId,
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("QUIC configuration: {0}")]
    Config(String),
}

impl From<Error> for libp2p::core::transport::TransportError<Error> {
    fn from(e: Error) -> Self {
        Self::Other(e)
    }
}
