//! Rates and budgets for relayed bytes: token buckets that slow a circuit down instead
//! of cutting it, and a daily budget that stops new circuits once it is spent.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use super::CircuitBytes;

/// How much a bucket holds: this long at its rate. Short, so a shaped transfer runs at
/// its rate from the start, not at line speed for its first seconds.
const BURST: Duration = Duration::from_millis(50);
/// The least a bucket holds, so slow rates still move whole QUIC packets.
const MIN_BURST_BYTES: f64 = 16.0 * 1024.0;
/// A stream that ran dry waits until about this much is available (or the whole burst,
/// if smaller), rather than waking for every few bytes.
const WAKE_BYTES: f64 = 16.0 * 1024.0;

/// A token bucket of bytes.
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket for `rate` bytes per second (greater than 0).
    pub fn new(rate: u64, now: Instant) -> Self {
        let rate = rate as f64;
        let burst = (rate * BURST.as_secs_f64()).max(MIN_BURST_BYTES);
        Bucket {
            rate,
            burst,
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
    }

    /// Whole bytes that may go now for a caller wanting `want`, or how long until a
    /// useful amount may: all of `want`, or [`WAKE_BYTES`] (the whole burst, if
    /// smaller). A stream that ran dry so waits for a real chunk instead of moving a
    /// few bytes per wake-up.
    pub fn available(&mut self, want: usize, now: Instant) -> Result<usize, Duration> {
        self.refill(now);
        let useful = (want.max(1) as f64).min(WAKE_BYTES.min(self.burst));
        if self.tokens >= useful {
            return Ok(self.tokens as usize);
        }
        Err(Duration::from_secs_f64((useful - self.tokens) / self.rate))
    }

    /// `n` bytes went (the balance may go below zero when streams share a bucket).
    pub fn take(&mut self, n: usize) {
        self.tokens -= n as f64;
    }
}

/// Rates for circuit bytes: one circuit's, each direction (`--max-circuit-rate`), and
/// all circuits' together (`--max-relay-rate`). Zero is unlimited.
#[derive(Debug, Default)]
pub struct Rates {
    pub circuit: u64,
    pub relay: Option<Mutex<Bucket>>,
}

impl Rates {
    pub fn new(circuit: u64, relay: u64) -> Self {
        Rates {
            circuit,
            relay: (relay > 0).then(|| Mutex::new(Bucket::new(relay, Instant::now()))),
        }
    }

    pub fn shapes(&self) -> bool {
        self.circuit > 0 || self.relay.is_some()
    }

    /// Bytes one direction of a circuit may move now (its own bucket and the relay's),
    /// or how long to wait.
    pub fn available(
        &self,
        own: Option<&mut Bucket>,
        want: usize,
        now: Instant,
    ) -> Result<usize, Duration> {
        let mine = own.map_or(Ok(usize::MAX), |b| b.available(want, now));
        let relay = match &self.relay {
            Some(b) => b
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .available(want, now),
            None => Ok(usize::MAX),
        };
        match (mine, relay) {
            (Ok(a), Ok(b)) => Ok(a.min(b)),
            (Err(a), Err(b)) => Err(a.max(b)),
            (Err(w), _) | (_, Err(w)) => Err(w),
        }
    }

    pub fn take(&self, own: Option<&mut Bucket>, n: usize) {
        if let Some(b) = own {
            b.take(n);
        }
        if let Some(b) = &self.relay {
            b.lock().unwrap_or_else(|e| e.into_inner()).take(n);
        }
    }
}

/// `--max-relayed-bytes-per-day`: once circuits have carried this much since 00:00 UTC
/// (both directions), new circuits are refused until the next UTC day. Open circuits
/// go on: cutting them would break syncs already paid for.
#[derive(Debug)]
pub struct DailyBudget {
    limit: u64,
    bytes: CircuitBytes,
    /// (UTC day number, relayed bytes when that day began, refusal logged).
    day: Mutex<(u64, u64, bool)>,
}

impl DailyBudget {
    pub fn new(limit: u64, bytes: CircuitBytes) -> Self {
        let total = relayed(&bytes);
        DailyBudget {
            limit,
            bytes,
            day: Mutex::new((utc_day(SystemTime::now()), total, false)),
        }
    }

    /// Whether a new circuit may open now.
    pub fn allows(&self, now: SystemTime) -> bool {
        let total = relayed(&self.bytes);
        let today = utc_day(now);
        let mut day = self.day.lock().unwrap_or_else(|e| e.into_inner());
        if day.0 != today {
            *day = (today, total, false);
        }
        let spent = total - day.1;
        if spent < self.limit {
            return true;
        }
        if !day.2 {
            day.2 = true;
            tracing::warn!(
                "--max-relayed-bytes-per-day {} reached ({spent} bytes relayed today); new circuits are refused until 00:00 UTC",
                self.limit
            );
        }
        false
    }
}

fn relayed(bytes: &CircuitBytes) -> u64 {
    bytes.to_destination.get() + bytes.from_destination.get()
}

fn utc_day(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_gives_its_rate_after_a_short_burst() {
        let start = Instant::now();
        let mut b = Bucket::new(1_000_000, start);
        assert_eq!(b.available(100_000, start), Ok(50_000));
        b.take(50_000);
        let wait = b.available(100_000, start).unwrap_err();
        assert!(
            wait >= Duration::from_millis(16) && wait <= Duration::from_millis(17),
            "{wait:?}"
        );
        // Ten bytes are not worth a wake-up of a stream wanting more: it waits for 16 KiB.
        let later = start + Duration::from_micros(10);
        assert!(b.available(100_000, later).is_err());
        assert_eq!(b.available(5, later), Ok(10));
        // Over one second of steady use: the burst plus the rate, no more.
        let mut moved = 50_000;
        let mut now = start;
        while now < start + Duration::from_secs(1) {
            now += Duration::from_millis(3);
            if let Ok(n) = b.available(100_000, now) {
                b.take(n);
                moved += n;
            }
        }
        assert!((1_040_000..=1_060_000).contains(&moved), "{moved}");
    }

    #[test]
    fn shared_buckets_bound_every_taker() {
        let now = Instant::now();
        let rates = Rates::new(0, 100_000);
        assert!(rates.shapes());
        let mut own = Bucket::new(1_000_000, now);
        // The relay's 16 KiB minimum burst bounds even a fast circuit.
        assert_eq!(rates.available(Some(&mut own), 1 << 20, now), Ok(16 * 1024));
        rates.take(Some(&mut own), 16 * 1024);
        assert!(rates.available(Some(&mut own), 1 << 20, now).is_err());
        assert!(rates.available(None, 1 << 20, now).is_err());
        assert!(!Rates::new(0, 0).shapes());
    }

    #[test]
    fn the_daily_budget_resets_at_midnight_utc() {
        let bytes = CircuitBytes::default();
        let day = UNIX_EPOCH + Duration::from_secs(20_000 * 86_400);
        let budget = DailyBudget::new(1000, bytes.clone());
        *budget.day.lock().unwrap() = (utc_day(day), 0, false);
        assert!(budget.allows(day));
        bytes.to_destination.inc_by(600);
        bytes.from_destination.inc_by(399);
        assert!(budget.allows(day + Duration::from_secs(3600)));
        bytes.from_destination.inc_by(1);
        assert!(!budget.allows(day + Duration::from_secs(86_399)));
        assert!(budget.allows(day + Duration::from_secs(86_400)));
    }
}
