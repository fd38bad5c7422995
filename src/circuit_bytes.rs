//! Bytes relayed through circuits, counted where they pass: on the relay's
//! connections.
//!
//! libp2p's relay copies a circuit's bytes between two streams inside its connection
//! handler and reports no byte counts. Every circuit has exactly one stop stream, opened
//! by the relay to the circuit's destination (`/libp2p/circuit/relay/0.2.0/stop`):
//! what the relay writes to it came from the source, what it reads from it goes back to
//! the source. So this muxer wrapper recognises the relay's outbound streams that
//! propose the stop protocol (multistream-select sends the protocol name first, in
//! the clear inside the encrypted connection) and counts their bytes from then on,
//! both ways. Other streams pass through after their first few dozen bytes are
//! looked at; inbound streams are not looked at at all.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::{AsyncRead, AsyncWrite};
use libp2p::core::muxing::{StreamMuxer, StreamMuxerEvent};
use prometheus_client::metrics::counter::Counter;

/// The stop protocol's name as multistream-select writes it (newline-terminated).
const STOP_PROTOCOL: &[u8] = b"/libp2p/circuit/relay/0.2.0/stop\n";

/// How much of an outbound stream's start is looked at: the multistream header
/// (`/multistream/1.0.0\n`, 20 bytes with its length) and the proposed protocol
/// (34 bytes with its length) fit.
const SNIFF_BYTES: usize = 64;

/// Bytes through circuits, by direction.
#[derive(Clone, Default, Debug)]
pub struct CircuitBytes {
    /// Written to destinations: sent by circuit sources.
    pub to_destination: Counter,
    /// Read from destinations: sent back to circuit sources.
    pub from_destination: Counter,
}

/// A muxer whose outbound stop streams are counted in [`CircuitBytes`].
pub struct Counting<M> {
    inner: M,
    bytes: CircuitBytes,
}

impl<M> Counting<M> {
    pub fn new(inner: M, bytes: CircuitBytes) -> Self {
        Counting { inner, bytes }
    }
}

impl<M> StreamMuxer for Counting<M>
where
    M: StreamMuxer + Unpin,
    M::Substream: Unpin,
{
    type Substream = CountedStream<M::Substream>;
    type Error = M::Error;

    fn poll_inbound(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        Pin::new(&mut self.inner)
            .poll_inbound(cx)
            .map_ok(|s| CountedStream {
                inner: s,
                state: State::Other,
            })
    }

    fn poll_outbound(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        let bytes = self.bytes.clone();
        Pin::new(&mut self.inner)
            .poll_outbound(cx)
            .map_ok(|s| CountedStream {
                inner: s,
                state: State::Looking(Vec::new(), bytes),
            })
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<StreamMuxerEvent, Self::Error>> {
        Pin::new(&mut self.inner).poll(cx)
    }
}

enum State {
    /// The stream's first bytes written so far, until they show which protocol it
    /// proposes.
    Looking(Vec<u8>, CircuitBytes),
    /// A stop stream: counted.
    Circuit(CircuitBytes),
    /// Anything else: passed through.
    Other,
}

/// A substream of a [`Counting`] muxer.
pub struct CountedStream<S> {
    inner: S,
    state: State,
}

impl<S> CountedStream<S> {
    fn wrote(&mut self, written: &[u8]) {
        match &mut self.state {
            State::Looking(seen, bytes) => {
                seen.extend_from_slice(&written[..written.len().min(SNIFF_BYTES)]);
                if seen
                    .windows(STOP_PROTOCOL.len())
                    .any(|w| w == STOP_PROTOCOL)
                {
                    self.state = State::Circuit(bytes.clone());
                } else if seen.len() >= SNIFF_BYTES {
                    self.state = State::Other;
                }
            }
            State::Circuit(bytes) => {
                bytes.to_destination.inc_by(written.len() as u64);
            }
            State::Other => {}
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CountedStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(n)), State::Circuit(bytes)) = (&read, &self.state) {
            bytes.from_destination.inc_by(*n as u64);
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountedStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            self.wrote(&buf[..n]);
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::AsyncWriteExt;

    fn stream(bytes: &CircuitBytes) -> CountedStream<futures::io::Cursor<Vec<u8>>> {
        CountedStream {
            inner: futures::io::Cursor::new(Vec::new()),
            state: State::Looking(Vec::new(), bytes.clone()),
        }
    }

    #[tokio::test]
    async fn only_streams_proposing_the_stop_protocol_are_counted() {
        let bytes = CircuitBytes::default();
        // Header and protocol in separate writes, as multistream-select may send them.
        let mut stop = stream(&bytes);
        stop.write_all(b"\x13/multistream/1.0.0\n").await.unwrap();
        stop.write_all(b"\x21").await.unwrap();
        stop.write_all(STOP_PROTOCOL).await.unwrap();
        stop.write_all(&[7; 1000]).await.unwrap();
        assert_eq!(bytes.to_destination.get(), 1000);

        let mut hop = stream(&bytes);
        hop.write_all(b"\x13/multistream/1.0.0\n\x20/libp2p/circuit/relay/0.2.0/hop\n")
            .await
            .unwrap();
        hop.write_all(&[7; 1000]).await.unwrap();
        let mut kad = stream(&bytes);
        kad.write_all(&[0; 5000]).await.unwrap();
        assert_eq!(bytes.to_destination.get(), 1000);
        assert!(matches!(kad.state, State::Other));
        assert!(matches!(hop.state, State::Other));
    }
}
