//! What the event loop publishes and the other tasks read, and the shutdown signal:
//! shared by the event loop, the HTTP API and the server handle, so none of them
//! imports another.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use tokio::sync::watch;

/// When the event loop last went round, for `/healthz`: the loop beats on its own timer
/// between events, so a loop wedged in one event stops beating.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    start: Instant,
    /// Milliseconds after `start` of the last beat.
    last: Arc<AtomicU64>,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            last: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Heartbeat {
    pub fn beat(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }

    /// Time since the last beat (since creation if there was none).
    pub fn age(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// What the HTTP API serves, published by the event loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub peer_id: PeerId,
    /// Dialable addresses first (configured, then public, private, loopback), then the
    /// wildcard listen addresses the original relay listed.
    pub addresses: Vec<Multiaddr>,
    /// At least one QUIC listener is up.
    pub listening: bool,
}

/// Final figures, logged periodically and returned at shutdown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub peers_served: u64,
    pub relayed_connections: u64,
    pub reservations: i64,
    pub circuits: i64,
    pub connections: i64,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "peers_served={} relayed_connections={} reservations={} circuits={} connections={}",
            self.peers_served,
            self.relayed_connections,
            self.reservations,
            self.circuits,
            self.connections
        )
    }
}

/// Resolves once `rx` holds `true` (or its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    // Drop the borrow at once: holding it across an await would make the future !Send.
    let _ = rx.wait_for(|stop| *stop).await;
}
