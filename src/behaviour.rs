//! The relay's libp2p behaviours, built from a validated [`Config`].

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{identify, kad, ping, relay};

use crate::admission::Admission;
use crate::config::Config;
use crate::defaults;
use crate::kademlia::Kademlia;
use crate::limits;
use crate::metrics::StoreMetrics;
use crate::offer;
use crate::record_store::RelayStore;

#[derive(NetworkBehaviour)]
pub struct Behaviour {
    // First, so connections over the limits are denied before other behaviours see them.
    pub limits: limits::Behaviour,
    pub relay: offer::relay::Relay,
    pub kad: Kademlia,
    pub identify: offer::identify::Identify,
    pub ping: ping::Behaviour,
}

impl Behaviour {
    /// `admission` is shared with the event loop, which confirms and releases
    /// reservations and prunes its tables.
    pub fn new(
        key: &Keypair,
        config: &Config,
        store_metrics: StoreMetrics,
        admission: &Admission,
    ) -> Self {
        let peer_id = key.public().to_peer_id();

        let limits = limits::Behaviour::new(limits::Limits {
            max_pending_incoming: Some(defaults::MAX_PENDING_INCOMING),
            max_established: config.max_connections,
            max_established_per_peer: config.max_connections_per_peer,
            max_established_per_host: config.max_connections_per_host,
            max_established_per_network: config.max_connections_per_network,
        });

        let l = &config.relay;
        // libp2p's relay lets one more than its per-peer limits through (it refuses
        // only when a peer already holds *more* than the limit), so it is given one
        // less: the flags mean what they say.
        let per_peer = |max: usize| if max == usize::MAX { max } else { max - 1 };
        let relay_config = relay::Config {
            max_reservations: l.max_reservations,
            max_reservations_per_peer: per_peer(l.max_reservations_per_peer),
            reservation_duration: l.reservation_duration,
            // Rates per peer and host, caps per host and network (src/admission.rs).
            reservation_rate_limiters: admission.reservation_limiters(),
            max_circuits: l.max_circuits,
            max_circuits_per_peer: per_peer(l.max_circuits_per_peer),
            max_circuit_duration: l.max_circuit_duration,
            max_circuit_bytes: l.max_circuit_bytes,
            circuit_src_rate_limiters: admission.circuit_limiters(),
        };

        let mut kad_config = kad::Config::new(config.kad_protocol.clone());
        kad_config.set_query_timeout(defaults::KAD_QUERY_TIMEOUT);
        // Clients re-publish their records every 30 s, so the relay re-replicating
        // everything it holds every hour would only dial departed peers.
        kad_config.set_replication_interval(None);
        kad_config.set_publication_interval(None);
        // The event loop bootstraps on its own timer, and only when there are
        // `--bootstrap` relays: a lone relay has nobody to bootstrap from.
        kad_config.set_periodic_bootstrap_interval(None);
        // The store keeps every record for the full TTL itself (src/record_store.rs):
        // with a TTL, Kademlia would shorten each received record's lifetime by the
        // number of known peers closer to its key than the relay, and a relay knows
        // every connected client, so on a busy relay most records expired on arrival.
        kad_config.set_record_ttl(None);
        kad_config.set_provider_record_ttl(None);
        // Kademlia asks the store itself and resets the request when the store refuses,
        // so a refused put fails at the client instead of being acknowledged.
        kad_config.set_record_filtering(kad::StoreInserts::Unfiltered);
        let store = RelayStore::new(peer_id, config.store.clone(), store_metrics);
        let mut kad = kad::Behaviour::with_config(peer_id, store, kad_config);
        kad.set_mode(Some(kad::Mode::Server));
        let kad = Kademlia::new(kad);

        // Each client is told the relay's addresses it could dial (src/offer/).
        let identify = offer::identify::Identify::new(identify::Behaviour::new(
            identify::Config::new(defaults::PROTOCOL_VERSION.to_owned(), key.public())
                .with_agent_version(defaults::AGENT_VERSION.to_owned())
                .with_push_listen_addr_updates(true),
        ));

        // js-libp2p's DHT only keeps peers that answer ping.
        let ping = ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(30)));

        Self {
            limits,
            relay: offer::relay::Relay::new(peer_id, relay::Behaviour::new(peer_id, relay_config)),
            kad,
            identify,
            ping,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::swarm::THandler;

    /// libp2p-swarm keeps each connection's handler inline in the connection task's
    /// boxed future, more than once (the future's layout holds it before and while it
    /// runs), so every byte of handler costs the relay a multiple of it per connected
    /// peer. Identify's handler (3.4 KiB inline, mostly its event queue) is boxed for
    /// this reason: 6.3 KiB less per connected device (BENCHMARKS.md).
    #[test]
    fn connection_handler_stays_small() {
        let size = std::mem::size_of::<THandler<Behaviour>>();
        assert!(
            size <= 2048,
            "the relay's connection handler is {size} bytes inline"
        );
    }
}
