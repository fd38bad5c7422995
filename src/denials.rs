//! Refused reservations and circuits, counted between log summaries: one host flooding
//! the relay produced 728 "reservation denied" lines in 4 s when each was logged. Each
//! refusal is logged at debug level and counted here; the event loop logs one summary
//! line per interval (and `relay_denied_total{kind,reason}` counts them all).

use std::collections::{BTreeMap, HashSet};

use libp2p::PeerId;

/// Distinct peers remembered per interval; past this the summary says "at least".
const MAX_PEERS: usize = 4096;

#[derive(Debug, Default)]
pub struct Denials {
    /// (kind, reason) → count, in a stable order for the summary.
    counts: BTreeMap<(&'static str, String), u64>,
    peers: HashSet<PeerId>,
}

impl Denials {
    /// `kind` is `reservation` or `circuit`; `reason` the status the relay answered.
    pub fn record(&mut self, kind: &'static str, reason: String, peer: PeerId) {
        *self.counts.entry((kind, reason)).or_default() += 1;
        if self.peers.len() < MAX_PEERS {
            self.peers.insert(peer);
        }
    }

    /// What was refused since the last call, as one line; `None` if nothing was.
    pub fn take_summary(&mut self) -> Option<String> {
        if self.counts.is_empty() {
            return None;
        }
        let mut parts = Vec::new();
        for kind in ["reservation", "circuit"] {
            let of_kind: Vec<_> = self
                .counts
                .iter()
                .filter(|((k, _), _)| *k == kind)
                .collect();
            if of_kind.is_empty() {
                continue;
            }
            let total: u64 = of_kind.iter().map(|(_, n)| **n).sum();
            let reasons: Vec<String> = of_kind
                .iter()
                .map(|((_, r), n)| format!("{r} {n}"))
                .collect();
            parts.push(format!("{total} {kind}s ({})", reasons.join(", ")));
        }
        let peers = self.peers.len();
        let at_least = if peers >= MAX_PEERS { "at least " } else { "" };
        self.counts.clear();
        self.peers.clear();
        Some(format!(
            "refused {} from {at_least}{peers} peer{}",
            parts.join(" and "),
            if peers == 1 { "" } else { "s" }
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_one_line() {
        let mut d = Denials::default();
        assert_eq!(d.take_summary(), None);
        let flooder = PeerId::random();
        for _ in 0..728 {
            d.record("reservation", "ResourceLimitExceeded".into(), flooder);
        }
        d.record("circuit", "NoReservation".into(), PeerId::random());
        d.record("reservation", "PermissionDenied".into(), flooder);
        assert_eq!(
            d.take_summary().unwrap(),
            "refused 729 reservations (PermissionDenied 1, ResourceLimitExceeded 728) \
             and 1 circuits (NoReservation 1) from 2 peers"
        );
        assert_eq!(d.take_summary(), None, "counts start again");
    }

    #[test]
    fn peers_remembered_are_bounded() {
        let mut d = Denials::default();
        for _ in 0..MAX_PEERS + 10 {
            d.record("circuit", "NoReservation".into(), PeerId::random());
        }
        assert!(d.peers.len() <= MAX_PEERS);
        assert!(
            d.take_summary()
                .unwrap()
                .ends_with(&format!("from at least {MAX_PEERS} peers"))
        );
    }
}
