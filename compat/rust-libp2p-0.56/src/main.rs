//! A PrivStack-style device on rust-libp2p 0.56 against a running relay:
//! `privstack-relay-compat-0-56 /ip4/127.0.0.1/udp/4001/quic-v1/p2p/<relay>`.
//! Connects over QUIC, checks identify, stores and reads back a sync-group record
//! through Kademlia (server mode), then holds a reservation; prints one line per step
//! and exits non-zero on the first failure.

use std::time::Duration;

use futures::StreamExt;
use libp2p::{
    identify, kad, multiaddr::Protocol, noise, ping, relay, swarm::NetworkBehaviour,
    swarm::SwarmEvent, yamux, Multiaddr, StreamProtocol,
};

#[derive(NetworkBehaviour)]
struct Device {
    relay_client: relay::client::Behaviour,
    identify: identify::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    ping: ping::Behaviour,
}

fn fail(what: &str) -> ! {
    eprintln!("FAIL: {what}");
    std::process::exit(1)
}

#[tokio::main]
async fn main() {
    let relay: Multiaddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| fail("usage: privstack-relay-compat-0-56 RELAY_MULTIADDR"))
        .parse()
        .unwrap_or_else(|_| fail("the relay address is not a multiaddr"));
    let Some(Protocol::P2p(relay_id)) = relay.iter().last() else {
        fail("the relay address ends without /p2p/<peer id>")
    };
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_quic()
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .unwrap()
        .with_behaviour(|key, relay_client| {
            let peer = key.public().to_peer_id();
            let mut kad = kad::Behaviour::new(peer, kad::store::MemoryStore::new(peer));
            kad.set_mode(Some(kad::Mode::Server));
            Device {
                relay_client,
                identify: identify::Behaviour::new(identify::Config::new(
                    "/privstack/sync/1.0.0".into(),
                    key.public(),
                )),
                kad,
                ping: ping::Behaviour::default(),
            }
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    swarm
        .listen_on("/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap())
        .unwrap();
    swarm
        .behaviour_mut()
        .kad
        .add_address(&relay_id, relay.clone());
    swarm
        .dial(relay.clone())
        .unwrap_or_else(|e| fail(&format!("dial: {e}")));

    let deadline = tokio::time::sleep(Duration::from_secs(60));
    tokio::pin!(deadline);
    let key = kad::RecordKey::new(&format!("/privstack/syncgroup/{}", swarm.local_peer_id()));
    let mut step = 0;
    loop {
        let event = tokio::select! {
            e = swarm.select_next_some() => e,
            _ = &mut deadline => fail(&format!("timed out at step {step}")),
        };
        match event {
            SwarmEvent::Behaviour(DeviceEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) if peer_id == relay_id && step == 0 => {
                let kad_ok = info
                    .protocols
                    .contains(&StreamProtocol::new("/ipfs/kad/1.0.0"));
                let hop = info
                    .protocols
                    .contains(&StreamProtocol::new("/libp2p/circuit/relay/0.2.0/hop"));
                if !kad_ok || !hop {
                    fail(&format!(
                        "the relay does not offer kad and hop: {:?}",
                        info.protocols
                    ));
                }
                println!("ok: QUIC connection and identify ({})", info.agent_version);
                let mut record =
                    kad::Record::new(key.clone(), b"{\"device_name\":\"0.56\"}".to_vec());
                record.publisher = Some(*swarm.local_peer_id());
                swarm.behaviour_mut().kad.put_record_to(
                    record,
                    std::iter::once(relay_id),
                    kad::Quorum::One,
                );
                step = 1;
            }
            SwarmEvent::Behaviour(DeviceEvent::Kad(kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::PutRecord(r),
                ..
            })) if step == 1 => {
                r.unwrap_or_else(|e| fail(&format!("put_record: {e:?}")));
                println!("ok: record stored on the relay");
                swarm.behaviour_mut().kad.get_record(key.clone());
                step = 2;
            }
            SwarmEvent::Behaviour(DeviceEvent::Kad(kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::GetRecord(r),
                ..
            })) if step == 2 => match r {
                Ok(kad::GetRecordOk::FoundRecord(found)) => {
                    if found.record.value != b"{\"device_name\":\"0.56\"}" {
                        fail("the record read back differs");
                    }
                    println!("ok: record read back");
                    swarm
                        .listen_on(relay.clone().with(Protocol::P2pCircuit))
                        .unwrap_or_else(|e| fail(&format!("listen on the circuit: {e}")));
                    step = 3;
                }
                Ok(_) => {}
                Err(e) => fail(&format!("get_record: {e:?}")),
            },
            SwarmEvent::Behaviour(DeviceEvent::RelayClient(
                relay::client::Event::ReservationReqAccepted { relay_peer_id, .. },
            )) if step == 3 && relay_peer_id == relay_id => {
                println!("ok: reservation accepted");
                return;
            }
            SwarmEvent::ListenerClosed { reason: Err(e), .. } => fail(&format!("reservation: {e}")),
            SwarmEvent::OutgoingConnectionError { error, .. } => fail(&format!("dial: {error}")),
            SwarmEvent::ConnectionClosed { peer_id, cause, .. } if peer_id == relay_id => {
                fail(&format!("the relay closed the connection: {cause:?}"))
            }
            _ => {}
        }
    }
}
