//! One established QUIC connection as a libp2p stream muxer, its streams, and the
//! handshake that produces it. Stream and connection semantics are libp2p-quic's, so
//! peers see no difference: streams are bidirectional, `close` finishes the send side
//! (the read side stays open: a half-close), a stream dropped unfinished is finished by
//! quinn, a stream whose reader went away reads as ended, and closing the connection
//! sends CONNECTION_CLOSE with code 0.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use futures::{AsyncRead, AsyncWrite, FutureExt, future::BoxFuture, ready};
use libp2p::{
    PeerId,
    core::muxing::{StreamMuxer, StreamMuxerEvent},
};
use rustls::pki_types::CertificateDer;
use tokio::sync::OwnedSemaphorePermit;

use super::{Error, tls};

type StreamPair = Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>;

/// Finishes a handshake (bounded by `timeout`) and reads the peer ID from the peer's
/// certificate. `permit` is the handshake slot an inbound connection holds until here.
pub(super) async fn handshake(
    connecting: quinn::Connecting,
    timeout: Duration,
    permit: Option<OwnedSemaphorePermit>,
) -> Result<(PeerId, Connection), Error> {
    let connection = tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| Error::HandshakeTimedOut)??;
    drop(permit);
    let peer = connection
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| tls::peer_id(&chain))
        .ok_or(Error::NoPeerId)?;
    Ok((peer, Connection::new(connection)))
}

pub struct Connection {
    connection: quinn::Connection,
    incoming: Option<BoxFuture<'static, StreamPair>>,
    outgoing: Option<BoxFuture<'static, StreamPair>>,
    closing: Option<BoxFuture<'static, quinn::ConnectionError>>,
}

impl Connection {
    fn new(connection: quinn::Connection) -> Self {
        Self {
            connection,
            incoming: None,
            outgoing: None,
            closing: None,
        }
    }
}

impl StreamMuxer for Connection {
    type Substream = Stream;
    type Error = Error;

    fn poll_inbound(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        let this = self.get_mut();
        poll_stream(&mut this.incoming, cx, || {
            let connection = this.connection.clone();
            async move { connection.accept_bi().await }.boxed()
        })
    }

    fn poll_outbound(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        let this = self.get_mut();
        poll_stream(&mut this.outgoing, cx, || {
            let connection = this.connection.clone();
            async move { connection.open_bi().await }.boxed()
        })
    }

    fn poll(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Result<StreamMuxerEvent, Self::Error>> {
        // The address never changes (migration is off) and a closed connection shows in
        // poll_inbound's error.
        Poll::Pending
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let this = self.get_mut();
        let connection = &this.connection;
        let closing = this.closing.get_or_insert_with(|| {
            connection.close(0u32.into(), &[]);
            let connection = connection.clone();
            async move { connection.closed().await }.boxed()
        });
        match ready!(closing.poll_unpin(cx)) {
            quinn::ConnectionError::LocallyClosed => Poll::Ready(Ok(())),
            e => Poll::Ready(Err(e.into())),
        }
    }
}

/// Polls the pending accept or open in `slot`, starting it with `start` if none is;
/// the slot empties once it yields.
fn poll_stream(
    slot: &mut Option<BoxFuture<'static, StreamPair>>,
    cx: &mut Context<'_>,
    start: impl FnOnce() -> BoxFuture<'static, StreamPair>,
) -> Poll<Result<Stream, Error>> {
    let pair = ready!(slot.get_or_insert_with(start).poll_unpin(cx));
    *slot = None;
    let (send, recv) = pair?;
    Poll::Ready(Ok(Stream::new(send, recv)))
}

/// One bidirectional QUIC stream.
pub struct Stream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// How `close` ended, so a second `close` answers the same and a failed one ends
    /// reading too.
    closed: Option<Result<(), io::ErrorKind>>,
}

impl Stream {
    fn new(send: quinn::SendStream, recv: quinn::RecvStream) -> Self {
        Self {
            send,
            recv,
            closed: None,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if matches!(self.closed, Some(Err(_))) {
            return Poll::Ready(Ok(0));
        }
        Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.send)
            .poll_write(cx, buf)
            .map_err(Into::into)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.send).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(closed) = self.closed {
            return Poll::Ready(closed.map_err(Into::into));
        }
        let closed = ready!(Pin::new(&mut self.send).poll_close(cx));
        self.closed = Some(closed.as_ref().map(|_| ()).map_err(io::Error::kind));
        Poll::Ready(closed)
    }
}
