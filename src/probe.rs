//! `privstack-relay probe`: check a relay the way a client meets it.
//!
//! Steps: fetch the identity API (for an http:// target), dial the relay over QUIC and
//! check it authenticates as the advertised peer, check its identify versions and
//! protocols, take a relay reservation (the hop protocol and a listed relay address
//! are what rust-libp2p clients need), then drop it.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent, dial_opts::DialOpts};
use libp2p::{Multiaddr, PeerId, SwarmBuilder, identify, noise, ping, relay, yamux};

use crate::{addrs, client, defaults, quic};

pub const HOP_PROTOCOL: &str = "/libp2p/circuit/relay/0.2.0/hop";

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "invalid target {0:?}: expected http://host:port or a multiaddr ending in /p2p/<peer id>"
    )]
    Target(String),
    #[error("identity API: {0}")]
    Identity(#[from] client::HttpError),
    #[error("identity API: peer_id {0:?} is not a valid peer ID")]
    BadPeerId(String),
    #[error("identity API lists no QUIC address to dial")]
    NoAddress,
    #[error("QUIC dial: {0}")]
    Dial(String),
    #[error("identify: {0}")]
    Identify(String),
    #[error("reservation: {0}")]
    Reservation(String),
    #[error("{step}: no answer within {timeout:?}")]
    Timeout {
        step: &'static str,
        timeout: Duration,
    },
    #[error("building the client: {0}")]
    Client(String),
}

/// What the probe saw.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    pub peer_id: PeerId,
    pub connected_via: Multiaddr,
    pub api_addresses: Option<Vec<String>>,
    pub protocol_version: String,
    pub agent_version: String,
    pub reservation_addrs: Option<usize>,
    pub lines: Vec<String>,
}

#[derive(NetworkBehaviour)]
struct ProbeBehaviour {
    relay_client: relay::client::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

/// Run the probe against `target`; every step must finish within `step_timeout`.
pub async fn probe(
    target: &str,
    step_timeout: Duration,
    reserve: bool,
) -> Result<ProbeReport, ProbeError> {
    let mut lines = Vec::new();
    let (peer_id, candidates, api_addresses) =
        if target.starts_with("http://") || target.starts_with("https://") {
            let t = Instant::now();
            let identity = client::fetch_identity(target, step_timeout).await?;
            let peer_id: PeerId = identity
                .peer_id
                .parse()
                .map_err(|_| ProbeError::BadPeerId(identity.peer_id.clone()))?;
            lines.push(format!(
                "identity API  ok  peer {peer_id}, {} addresses, {} ({} ms)",
                identity.addresses.len(),
                identity.agent_version,
                t.elapsed().as_millis()
            ));
            let url = client::HttpUrl::parse(&client::identity_url(target))?;
            let host_ips: Vec<IpAddr> = url.resolve().await?.iter().map(|a| a.ip()).collect();
            let candidates = dial_candidates(&identity.addresses, &host_ips);
            if candidates.is_empty() {
                return Err(ProbeError::NoAddress);
            }
            (peer_id, candidates, Some(identity.addresses))
        } else {
            let addr: Multiaddr = target
                .parse()
                .map_err(|_| ProbeError::Target(target.to_owned()))?;
            let Some(Protocol::P2p(peer_id)) = addr.iter().last() else {
                return Err(ProbeError::Target(target.to_owned()));
            };
            (peer_id, vec![addrs::without_p2p(&addr)], None)
        };

    let mut swarm = SwarmBuilder::with_new_identity()
        .with_tokio()
        // The relay's own QUIC transport, as a client (the shipped binary carries no
        // other; the tests cross it with libp2p-quic).
        .with_other_transport(|key| {
            quic::Transport::new(key, quic::Config::new())
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        })
        .map_err(|e| ProbeError::Client(e.to_string()))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| ProbeError::Client(e.to_string()))?
        .with_behaviour(|key, relay_client| ProbeBehaviour {
            relay_client,
            identify: identify::Behaviour::new(identify::Config::new(
                "/privstack/probe/1.0.0".into(),
                key.public(),
            )),
            ping: ping::Behaviour::default(),
        })
        .map_err(|e| ProbeError::Client(e.to_string()))?
        .build();

    // Dial every candidate at once; the first to authenticate wins.
    let t = Instant::now();
    swarm
        .dial(
            DialOpts::peer_id(peer_id)
                .addresses(candidates.clone())
                .build(),
        )
        .map_err(|e| ProbeError::Dial(e.to_string()))?;
    let connected_via = step(step_timeout, "QUIC dial", async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished {
                    peer_id: p,
                    endpoint,
                    ..
                } if p == peer_id => return Ok(addrs::without_p2p(endpoint.get_remote_address())),
                SwarmEvent::OutgoingConnectionError { error, .. } => {
                    return Err(ProbeError::Dial(error.to_string()));
                }
                _ => {}
            }
        }
    })
    .await?;
    lines.push(format!(
        "QUIC dial     ok  {connected_via} ({} ms)",
        t.elapsed().as_millis()
    ));

    let info = step(step_timeout, "identify", async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(ProbeBehaviourEvent::Identify(
                    identify::Event::Received {
                        peer_id: p, info, ..
                    },
                )) if p == peer_id => return Ok(info),
                SwarmEvent::Behaviour(ProbeBehaviourEvent::Identify(identify::Event::Error {
                    error,
                    ..
                })) => return Err(ProbeError::Identify(error.to_string())),
                SwarmEvent::ConnectionClosed {
                    peer_id: p, cause, ..
                } if p == peer_id => {
                    return Err(ProbeError::Identify(format!(
                        "connection closed: {cause:?}"
                    )));
                }
                _ => {}
            }
        }
    })
    .await?;
    if info.protocol_version != defaults::PROTOCOL_VERSION {
        return Err(ProbeError::Identify(format!(
            "protocol version {:?}, expected {:?}",
            info.protocol_version,
            defaults::PROTOCOL_VERSION
        )));
    }
    if !info.agent_version.starts_with("privstack-relay/") {
        return Err(ProbeError::Identify(format!(
            "agent version {:?} is not privstack-relay",
            info.agent_version
        )));
    }
    let has = |p: &str| info.protocols.iter().any(|s| s.as_ref() == p);
    lines.push(format!(
        "identify      ok  {} {}, kad {}, relay hop {}",
        info.protocol_version,
        info.agent_version,
        if has(defaults::KAD_PROTOCOL) {
            "yes"
        } else {
            "no"
        },
        if has(HOP_PROTOCOL) { "yes" } else { "no" },
    ));

    let mut reservation_addrs = None;
    if reserve {
        if !has(HOP_PROTOCOL) {
            return Err(ProbeError::Reservation(
                "relay does not advertise the circuit relay v2 hop protocol (no external address?)"
                    .into(),
            ));
        }
        let t = Instant::now();
        let circuit = connected_via
            .clone()
            .with(Protocol::P2p(peer_id))
            .with(Protocol::P2pCircuit);
        let listener = swarm
            .listen_on(circuit)
            .map_err(|e| ProbeError::Reservation(error_chain(&e)))?;
        let n = step(step_timeout, "reservation", async {
            let mut addrs = 0usize;
            let mut accepted = false;
            loop {
                match swarm.select_next_some().await {
                    SwarmEvent::Behaviour(ProbeBehaviourEvent::RelayClient(
                        relay::client::Event::ReservationReqAccepted { .. },
                    )) => accepted = true,
                    SwarmEvent::NewListenAddr { listener_id, .. } if listener_id == listener => {
                        addrs += 1
                    }
                    SwarmEvent::ListenerClosed {
                        listener_id,
                        reason,
                        ..
                    } if listener_id == listener => {
                        return Err(ProbeError::Reservation(match reason {
                            Ok(()) => "closed by the relay".into(),
                            Err(e) => error_chain(&e),
                        }));
                    }
                    _ => {}
                }
                if accepted && addrs > 0 {
                    return Ok(addrs);
                }
            }
        })
        .await?;
        swarm.remove_listener(listener);
        reservation_addrs = Some(n);
        lines.push(format!(
            "reservation   ok  accepted, {n} relayed address(es) ({} ms)",
            t.elapsed().as_millis()
        ));
    }

    Ok(ProbeReport {
        peer_id,
        connected_via,
        api_addresses,
        protocol_version: info.protocol_version,
        agent_version: info.agent_version,
        reservation_addrs,
        lines,
    })
}

async fn step<T>(
    timeout: Duration,
    name: &'static str,
    fut: impl Future<Output = Result<T, ProbeError>>,
) -> Result<T, ProbeError> {
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ProbeError::Timeout {
            step: name,
            timeout,
        })?
}

/// QUIC addresses to try from the API's list: wildcard entries get the host the API
/// answered on (that is how an operator reaches it); concrete ones are used as they are.
fn dial_candidates(listed: &[String], host_ips: &[IpAddr]) -> Vec<Multiaddr> {
    let mut out: Vec<Multiaddr> = Vec::new();
    for s in listed {
        let Ok(addr) = s.parse::<Multiaddr>() else {
            continue;
        };
        let addr = addrs::without_p2p(&addr);
        if !addr.iter().any(|p| matches!(p, Protocol::QuicV1)) {
            continue;
        }
        if addrs::is_unspecified(&addr) {
            let v6 = matches!(addr.iter().next(), Some(Protocol::Ip6(_)));
            for ip in host_ips.iter().filter(|ip| ip.is_ipv6() == v6) {
                let first = match ip {
                    IpAddr::V4(ip) => Protocol::Ip4(*ip),
                    IpAddr::V6(ip) => Protocol::Ip6(*ip),
                };
                let concrete: Multiaddr =
                    std::iter::once(first).chain(addr.iter().skip(1)).collect();
                if !out.contains(&concrete) {
                    out.insert(0, concrete);
                }
            }
        } else if !out.contains(&addr) {
            out.push(addr);
        }
    }
    out
}

/// `e` and its sources, joined; libp2p's relay errors carry the reason in the sources.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let part = s.to_string();
        if !part.is_empty() && !msg.contains(&part) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&part);
        }
        src = s.source();
    }
    if msg.is_empty() {
        format!("{e:?}")
    } else {
        msg
    }
}
