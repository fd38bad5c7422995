//! A log writer that never blocks the relay.
//!
//! Logs go to stderr, which is a pipe under systemd (the journal) and in most
//! supervisors. When nobody reads that pipe (a wedged journald, a `docker logs` that
//! stopped, a test harness holding the pipe), a plain `write` blocks once the pipe's
//! 64 KiB buffer is full, and with it whichever runtime thread was logging: measured,
//! QUIC stopped answering and SIGTERM was ignored while `/healthz` still said 200.
//!
//! Here each log line is handed to one writer thread through a bounded queue; when
//! the queue is full the line is dropped and counted, and the writer says how many were
//! lost once it can write again. Only that thread ever waits for stderr.

use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::time::Duration;

enum Msg {
    Line(Vec<u8>),
    /// Everything before this has been written when the writer answers.
    Flush(SyncSender<()>),
}

/// A `MakeWriter` for `tracing_subscriber::fmt` that queues lines for a writer thread.
#[derive(Clone)]
pub struct NonBlocking {
    tx: SyncSender<Msg>,
    dropped: Arc<AtomicU64>,
}

impl NonBlocking {
    /// Lines for `out` (stderr in the relay), at most `capacity` waiting.
    pub fn new<W: Write + Send + 'static>(mut out: W, capacity: usize) -> Self {
        let (tx, rx): (SyncSender<Msg>, Receiver<Msg>) = mpsc::sync_channel(capacity);
        let dropped = Arc::new(AtomicU64::new(0));
        let lost = dropped.clone();
        let spawned = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || {
                for msg in rx {
                    let n = lost.swap(0, Ordering::Relaxed);
                    if n > 0 {
                        let _ = writeln!(
                            out,
                            "privstack-relay: {n} log lines dropped: the log output was not being read"
                        );
                    }
                    match msg {
                        Msg::Line(line) => {
                            let _ = out.write_all(&line);
                        }
                        Msg::Flush(done) => {
                            let _ = out.flush();
                            let _ = done.send(());
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            // Without a thread every line is dropped (and counted); say so once.
            eprintln!("privstack-relay: no log writer thread ({e}); logs are lost");
        }
        Self { tx, dropped }
    }

    /// Lines dropped so far (and not yet reported by the writer).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Wait until what was logged before is written, at most `limit` (stderr may be
    /// blocked for good; the process must still exit).
    pub fn flush(&self, limit: Duration) -> bool {
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        let deadline = std::time::Instant::now() + limit;
        let mut msg = Msg::Flush(done_tx);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if std::time::Instant::now() < deadline => {
                    msg = m;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return false,
            }
        }
        done_rx
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .is_ok()
    }
}

/// One log event's bytes, queued when the formatter is done with it.
pub struct Line {
    buf: Vec<u8>,
    tx: SyncSender<Msg>,
    dropped: Arc<AtomicU64>,
}

impl Write for Line {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let line = std::mem::take(&mut self.buf);
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.tx.try_send(Msg::Line(line))
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for NonBlocking {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            buf: Vec::new(),
            tx: self.tx.clone(),
            dropped: self.dropped.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tracing_subscriber::fmt::MakeWriter;

    /// A sink that blocks until released, like a pipe nobody reads.
    #[derive(Clone)]
    struct Stuck {
        gate: Arc<Mutex<()>>,
        got: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Stuck {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let _open = self.gate.lock().unwrap();
            self.got.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_blocked_output_drops_and_counts_instead_of_blocking() {
        let gate = Arc::new(Mutex::new(()));
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = Stuck {
            gate: gate.clone(),
            got: got.clone(),
        };
        let held = gate.lock().unwrap();
        let w = NonBlocking::new(sink, 8);
        // The writer takes this line and blocks on the output.
        writeln!(w.make_writer(), "first").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let started = std::time::Instant::now();
        for i in 0..1000 {
            writeln!(w.make_writer(), "line {i}").unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "logging blocked"
        );
        // 8 wait in the queue; the rest are dropped and counted.
        assert_eq!(w.dropped(), 1000 - 8);
        assert!(
            !w.flush(Duration::from_millis(100)),
            "a stuck output cannot flush"
        );
        drop(held);
        assert!(w.flush(Duration::from_secs(5)));
        let text = String::from_utf8(got.lock().unwrap().clone()).unwrap();
        assert!(text.contains("line 0\n"), "{text}");
        assert!(text.contains("log lines dropped"), "{text}");
        writeln!(w.make_writer(), "after").unwrap();
        assert!(w.flush(Duration::from_secs(5)));
        assert!(
            String::from_utf8(got.lock().unwrap().clone())
                .unwrap()
                .ends_with("after\n")
        );
    }
}
