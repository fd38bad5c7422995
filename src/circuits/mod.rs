//! Circuits where they pass through the relay's QUIC connections: their bytes counted,
//! their rate shaped, and their limits announced the way clients read them.
//!
//! libp2p's relay copies a circuit's bytes between two streams inside its connection
//! handler; it reports no byte counts, cannot shape a rate, and always announces a
//! `Limit` (with its own encoding of "unlimited") in reservations and circuits. So this
//! muxer wrapper looks at the start of every stream the relay writes, where
//! multistream-select names the protocol in the clear (inside the encrypted
//! connection):
//!
//! - Every circuit has exactly one stop stream, opened by the relay to the circuit's
//!   destination (`/libp2p/circuit/relay/0.2.0/stop`): what the relay writes to it came
//!   from the source, what it reads from it goes back to the source. Those bytes are
//!   counted ([`CircuitBytes`]) and, with rates set, paced by token buckets
//!   ([`shaping`]): a slowed write or read holds QUIC's flow control, so the sender
//!   slows down and nothing is cut or buffered.
//! - The first message on a stop stream (`CONNECT`) and on a hop stream the client
//!   opened (the answer to its `RESERVE` or `CONNECT`) carries the `Limit`; it is
//!   rewritten to [`Circuits::wire_limit`] (see [`frames`]).
//!
//! Other streams pass through once their negotiation shows what they are.

pub mod frames;
pub mod shaping;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures::{AsyncRead, AsyncWrite};
use libp2p::core::muxing::{StreamMuxer, StreamMuxerEvent};
use prometheus_client::metrics::counter::Counter;
use tokio::time::{Instant, Sleep};

use frames::{Negotiated, Side, WireLimit};
use shaping::{Bucket, Rates};

/// Bytes through circuits, by direction.
#[derive(Clone, Default, Debug)]
pub struct CircuitBytes {
    /// Written to destinations: sent by circuit sources.
    pub to_destination: Counter,
    /// Read from destinations: sent back to circuit sources.
    pub from_destination: Counter,
}

/// What is done to circuit streams, shared by all connections.
#[derive(Debug, Default)]
pub struct Circuits {
    pub bytes: CircuitBytes,
    pub rates: Rates,
    /// The limit announced in reservations and circuits (`None`: no `Limit` field).
    pub wire_limit: Option<WireLimit>,
}

/// A muxer whose circuit streams are handled as [`Circuits`] says.
pub struct Muxer<M> {
    inner: M,
    circuits: Arc<Circuits>,
}

impl<M> Muxer<M> {
    pub fn new(inner: M, circuits: Arc<Circuits>) -> Self {
        Muxer { inner, circuits }
    }
}

impl<M> StreamMuxer for Muxer<M>
where
    M: StreamMuxer + Unpin,
    M::Substream: Unpin,
{
    type Substream = Stream<M::Substream>;
    type Error = M::Error;

    fn poll_inbound(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        let circuits = self.circuits.clone();
        Pin::new(&mut self.inner)
            .poll_inbound(cx)
            .map_ok(|s| Stream::new(s, Side::Listener, circuits))
    }

    fn poll_outbound(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        let circuits = self.circuits.clone();
        Pin::new(&mut self.inner)
            .poll_outbound(cx)
            .map_ok(|s| Stream::new(s, Side::Dialer, circuits))
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

/// Where a stream's writes are.
enum Phase {
    /// In the negotiation: everything written so far.
    Negotiating(Vec<u8>),
    /// The protocol's first message, collected until complete.
    Message(Vec<u8>),
    /// Past the start: bytes pass (counted and shaped on a stop stream).
    Passing,
}

/// One direction of a stop stream, paced.
#[derive(Default)]
struct Pace {
    bucket: Option<Bucket>,
    sleep: Option<Pin<Box<Sleep>>>,
}

/// A substream of a [`Muxer`].
pub struct Stream<S> {
    inner: S,
    side: Side,
    phase: Phase,
    /// A stop stream: its bytes are counted (and paced, if rates are set).
    stop: bool,
    /// Rewritten bytes not yet handed to `inner`.
    pending: Vec<u8>,
    circuits: Arc<Circuits>,
    /// Stop streams with rates set: (to destination, from destination).
    pace: Option<Box<(Pace, Pace)>>,
}

impl<S> Stream<S> {
    fn new(inner: S, side: Side, circuits: Arc<Circuits>) -> Self {
        Stream {
            inner,
            side,
            phase: Phase::Negotiating(Vec::new()),
            stop: false,
            pending: Vec::new(),
            circuits,
            pace: None,
        }
    }

    /// The protocol is known: `name`'s frame is done.
    fn negotiated(&mut self, name: &[u8]) {
        self.phase = Phase::Message(Vec::new());
        if name == frames::STOP_PROTOCOL {
            self.stop = true;
            let rates = &self.circuits.rates;
            if rates.shapes() {
                let now = Instant::now();
                let bucket = || (rates.circuit > 0).then(|| Bucket::new(rates.circuit, now));
                self.pace = Some(Box::new((
                    Pace {
                        bucket: bucket(),
                        sleep: None,
                    },
                    Pace {
                        bucket: bucket(),
                        sleep: None,
                    },
                )));
            }
        }
    }

    /// The first message is complete (or not one to rewrite): queue what goes out.
    fn message_done(&mut self, message: Vec<u8>) {
        let field = match self.side {
            Side::Dialer => 3,   // StopMessage.limit
            Side::Listener => 4, // HopMessage.limit
        };
        self.pending =
            frames::rewrite_limit(&message, field, self.circuits.wire_limit).unwrap_or(message);
        self.phase = Phase::Passing;
    }
}

impl<S: AsyncWrite + Unpin> Stream<S> {
    /// Hand rewritten bytes to the inner stream before anything else.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.drain(..n);
        }
        Poll::Ready(Ok(()))
    }

    /// Before a flush or close, a message begun but incomplete goes out as it is (a
    /// flush before it begins is the negotiation's own).
    fn give_up_message(&mut self) {
        if let Phase::Message(m) = &mut self.phase
            && !m.is_empty()
        {
            let m = std::mem::take(m);
            self.pending.extend_from_slice(&m);
            self.phase = Phase::Passing;
        }
    }

    fn write_negotiating(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let Phase::Negotiating(seen) = &mut self.phase else {
            unreachable!()
        };
        let before = seen.len();
        seen.extend_from_slice(buf);
        let decided = frames::negotiation(self.side, seen);
        seen.truncate(before);
        // Write no further than the end of the protocol's frame: what follows is the
        // message.
        let take = match decided {
            Negotiated::Protocol { at, .. } => at - before,
            _ => buf.len(),
        };
        let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &buf[..take]))?;
        let Phase::Negotiating(seen) = &mut self.phase else {
            unreachable!()
        };
        seen.extend_from_slice(&buf[..n]);
        match frames::negotiation(self.side, seen) {
            Negotiated::Open => {}
            Negotiated::Protocol { name, .. } => self.negotiated(name),
            Negotiated::Other => self.phase = Phase::Passing,
        }
        Poll::Ready(Ok(n))
    }

    fn write_message(&mut self, buf: &[u8]) -> usize {
        let Phase::Message(m) = &mut self.phase else {
            unreachable!()
        };
        let mut taken = 0;
        while taken < buf.len() {
            match frames::message_len(m) {
                Ok(Some(len)) if m.len() >= len => break,
                Ok(Some(len)) => {
                    let n = (len - m.len()).min(buf.len() - taken);
                    m.extend_from_slice(&buf[taken..taken + n]);
                    taken += n;
                }
                Ok(None) => {
                    m.push(buf[taken]);
                    taken += 1;
                }
                Err(_) => break,
            }
        }
        match frames::message_len(m) {
            Ok(Some(len)) if m.len() >= len => {
                let m = std::mem::take(m);
                self.message_done(m);
            }
            Ok(_) => {}
            Err(_) => {
                let m = std::mem::take(m);
                self.pending = m;
                self.phase = Phase::Passing;
            }
        }
        taken
    }
}

/// Waits on `pace` until `rates` let `want` bytes through; `Ready(n)` with what may go.
fn poll_pace(rates: &Rates, pace: &mut Pace, cx: &mut Context<'_>, want: usize) -> Poll<usize> {
    loop {
        if let Some(sleep) = &mut pace.sleep {
            ready!(sleep.as_mut().poll(cx));
            pace.sleep = None;
        }
        let now = Instant::now();
        match rates.available(pace.bucket.as_mut(), want, now) {
            Ok(n) => return Poll::Ready(n.min(want)),
            Err(wait) => pace.sleep = Some(Box::pin(tokio::time::sleep_until(now + wait))),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Stream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if !this.stop {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let mut len = buf.len();
        if let Some(pace) = &mut this.pace {
            len = ready!(poll_pace(&this.circuits.rates, &mut pace.1, cx, len));
        }
        let n = ready!(Pin::new(&mut this.inner).poll_read(cx, &mut buf[..len]))?;
        this.circuits.bytes.from_destination.inc_by(n as u64);
        if let Some(pace) = &mut this.pace {
            this.circuits.rates.take(pace.1.bucket.as_mut(), n);
        }
        Poll::Ready(Ok(n))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_pending(cx))?;
        match this.phase {
            Phase::Negotiating(_) => return this.write_negotiating(cx, buf),
            Phase::Message(_) => {
                let taken = this.write_message(buf);
                // What was taken is the stream's now; it goes out with the next write
                // or flush.
                let _ = this.poll_pending(cx)?;
                if taken > 0 {
                    return Poll::Ready(Ok(taken));
                }
                ready!(this.poll_pending(cx))?;
            }
            Phase::Passing => {}
        }
        if !this.stop {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        let mut len = buf.len();
        if let Some(pace) = &mut this.pace {
            len = ready!(poll_pace(&this.circuits.rates, &mut pace.0, cx, len));
        }
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &buf[..len]))?;
        this.circuits.bytes.to_destination.inc_by(n as u64);
        if let Some(pace) = &mut this.pace {
            this.circuits.rates.take(pace.0.bucket.as_mut(), n);
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.give_up_message();
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.give_up_message();
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::AsyncWriteExt;

    fn stream(side: Side, circuits: &Arc<Circuits>) -> Stream<futures::io::Cursor<Vec<u8>>> {
        Stream::new(futures::io::Cursor::new(Vec::new()), side, circuits.clone())
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![payload.len() as u8];
        f.extend_from_slice(payload);
        f
    }

    #[tokio::test]
    async fn only_stop_streams_are_counted() {
        let circuits = Arc::new(Circuits::default());
        let bytes = &circuits.bytes;
        // Header and protocol in separate writes, as multistream-select may send them.
        let mut stop = stream(Side::Dialer, &circuits);
        stop.write_all(&frame(b"/multistream/1.0.0\n"))
            .await
            .unwrap();
        stop.write_all(&frame(frames::STOP_PROTOCOL)).await.unwrap();
        // The CONNECT message, then circuit bytes.
        stop.write_all(&frame(&[8, 0])).await.unwrap();
        stop.write_all(&[7; 1000]).await.unwrap();
        assert_eq!(bytes.to_destination.get(), 1000);
        assert!(stop.stop);

        let mut hop = stream(Side::Dialer, &circuits);
        let mut negotiation = frame(b"/multistream/1.0.0\n");
        negotiation.extend(frame(frames::HOP_PROTOCOL));
        hop.write_all(&negotiation).await.unwrap();
        hop.write_all(&[7; 1000]).await.unwrap();
        let mut kad = stream(Side::Dialer, &circuits);
        kad.write_all(&[0; 5000]).await.unwrap();
        assert_eq!(bytes.to_destination.get(), 1000);
        assert!(!kad.stop && !hop.stop);
        assert_eq!(kad.inner.get_ref().len(), 5000);
        assert_eq!(hop.inner.get_ref().len(), negotiation.len() + 1000);
    }

    #[tokio::test]
    async fn limits_are_rewritten_in_the_first_message_only() {
        let circuits = Arc::new(Circuits::default());
        // A hop stream the client opened: the relay echoes, then answers with a limit.
        let mut hop = stream(Side::Listener, &circuits);
        let mut negotiation = frame(b"/multistream/1.0.0\n");
        negotiation.extend(frame(frames::HOP_PROTOCOL));
        let limit = [1 << 3, 0xff, 0xff, 0xff, 0xff, 0x0f, 2 << 3, 0];
        let mut answer = vec![1 << 3, 2, 4 << 3 | 2, limit.len() as u8];
        answer.extend_from_slice(&limit);
        answer.extend_from_slice(&[5 << 3, 100]);
        let mut all = negotiation.clone();
        all.extend(frame(&answer));
        all.extend_from_slice(&frame(&answer)); // circuit data that looks alike
        // One byte at a time, the hardest way a writer can split it.
        for b in &all {
            hop.write_all(&[*b]).await.unwrap();
        }
        hop.flush().await.unwrap();
        let mut expected = negotiation;
        expected.extend(frame(&[1 << 3, 2, 5 << 3, 100]));
        expected.extend(frame(&answer));
        assert_eq!(hop.inner.get_ref(), &expected);
    }
}
