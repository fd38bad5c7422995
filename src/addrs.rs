//! Multiaddr classification: which addresses other peers on the internet can dial.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;

/// How far an address reaches, best first (used to order the addresses the API lists).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reach {
    /// Publicly routable IP, or a DNS name.
    Public,
    /// Private, shared (CGNAT), link-local or unique-local.
    Private,
    Loopback,
    /// `0.0.0.0`, `::`, relayed (`/p2p-circuit`) or not IP at all.
    Other,
}

pub fn reach(addr: &Multiaddr) -> Reach {
    if addr.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
        return Reach::Other;
    }
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => ip_reach(IpAddr::V4(ip)),
        Some(Protocol::Ip6(ip)) => ip_reach(IpAddr::V6(ip)),
        Some(Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_)) => Reach::Public,
        _ => Reach::Other,
    }
}

/// Whether a peer at this address could be dialed from the internet.
pub fn is_public(addr: &Multiaddr) -> bool {
    reach(addr) == Reach::Public
}

/// How far an IP reaches (as [`reach`] for an address starting with it).
pub fn ip_reach(ip: IpAddr) -> Reach {
    match ip {
        IpAddr::V4(ip) => v4_reach(ip),
        IpAddr::V6(ip) => {
            if let Some(v4) = ip.to_ipv4_mapped() {
                return v4_reach(v4);
            }
            let seg0 = ip.segments()[0];
            if ip.is_unspecified() {
                Reach::Other
            } else if ip.is_loopback() {
                Reach::Loopback
            } else if (seg0 & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (seg0 & 0xffc0) == 0xfe80 // link local fe80::/10
                || (seg0 == 0x2001 && ip.segments()[1] == 0x0db8) // documentation
                || ip.is_multicast()
            {
                Reach::Private
            } else if is_v6_global_unicast(ip) {
                Reach::Public
            } else {
                Reach::Private
            }
        }
    }
}

fn is_v6_global_unicast(ip: Ipv6Addr) -> bool {
    // 2000::/3 is the only block IANA allocates for global unicast.
    (ip.segments()[0] & 0xe000) == 0x2000
}

fn v4_reach(ip: Ipv4Addr) -> Reach {
    let o = ip.octets();
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
        Reach::Other
    } else if ip.is_loopback() {
        Reach::Loopback
    } else if ip.is_private()
        || ip.is_link_local()
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // shared address space 100.64.0.0/10
        || ip.is_documentation()
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // benchmarking 198.18.0.0/15
        || o[0] >= 240
    {
        Reach::Private
    } else {
        Reach::Public
    }
}

/// Whether the address is IPv4 169.254/16 or IPv6 fe80::/10.
pub fn is_link_local(addr: &Multiaddr) -> bool {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => ip.is_link_local(),
        Some(Protocol::Ip6(ip)) => (ip.segments()[0] & 0xffc0) == 0xfe80,
        _ => false,
    }
}

/// Whether the address is a wildcard listen address (`0.0.0.0` or `::`).
pub fn is_unspecified(addr: &Multiaddr) -> bool {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => ip.is_unspecified(),
        Some(Protocol::Ip6(ip)) => ip.is_unspecified(),
        _ => false,
    }
}

/// The IP an address starts with.
pub fn ip(addr: &Multiaddr) -> Option<IpAddr> {
    match addr.iter().next()? {
        Protocol::Ip4(ip) => Some(ip.into()),
        Protocol::Ip6(ip) => Some(ip.into()),
        _ => None,
    }
}

/// The host an IP belongs to, as a prefix: IPv4 /32, IPv6 /64 (IPv4-mapped IPv6 as
/// IPv4). IPv6 prefixes have their lowest bit set, which no /64 or /48 has, so they
/// never equal an IPv4 one.
pub fn host_prefix(ip: IpAddr) -> u128 {
    prefix(ip, 32, 64)
}

/// The network an IP belongs to, as a prefix: IPv4 /24, IPv6 /48 (tagged as in
/// [`host_prefix`]).
pub fn network_prefix(ip: IpAddr) -> u128 {
    prefix(ip, 24, 48)
}

fn prefix(ip: IpAddr, v4_bits: u32, v6_bits: u32) -> u128 {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4) & (u32::MAX << (32 - v4_bits))),
        IpAddr::V6(v6) => (u128::from(v6) & (u128::MAX << (128 - v6_bits))) | 1,
    }
}

/// `addr` without a trailing `/p2p/<peer id>`.
pub fn without_p2p(addr: &Multiaddr) -> Multiaddr {
    addr.iter()
        .filter(|p| !matches!(p, Protocol::P2p(_)))
        .collect()
}

/// Resolve a `/dns/`, `/dns4/` or `/dns6/` address into the `/ip4/`/`/ip6/` addresses
/// its name has now (`/dns4/` only IPv4, `/dns6/` only IPv6), the rest of the address
/// kept. Other addresses come back as they are. Uses the system resolver
/// (`/etc/hosts`, `/etc/resolv.conf`), called anew each time: a relay federated by name
/// follows its peer to a new address.
pub async fn resolve(addr: &Multiaddr) -> std::io::Result<Vec<Multiaddr>> {
    let mut iter = addr.iter();
    let (name, v4, v6) = match iter.next() {
        Some(Protocol::Dns(n)) => (n, true, true),
        Some(Protocol::Dns4(n)) => (n, true, false),
        Some(Protocol::Dns6(n)) => (n, false, true),
        _ => return Ok(vec![addr.clone()]),
    };
    let rest: Vec<Protocol<'_>> = iter.collect();
    let mut out = Vec::new();
    for sock in tokio::net::lookup_host((name.as_ref(), 0)).await? {
        let ip = match sock.ip() {
            IpAddr::V4(ip) if v4 => Protocol::Ip4(ip),
            IpAddr::V6(ip) if v6 => Protocol::Ip6(ip),
            _ => continue,
        };
        let resolved: Multiaddr = std::iter::once(ip).chain(rest.iter().cloned()).collect();
        if !out.contains(&resolved) {
            out.push(resolved);
        }
    }
    if out.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "{name} has no {} address",
                if v4 == v6 {
                    "IP"
                } else if v4 {
                    "IPv4"
                } else {
                    "IPv6"
                }
            ),
        ));
    }
    Ok(out)
}

/// A `/dns/`, `/dns4/` or `/dns6/` address.
pub fn is_dns(addr: &Multiaddr) -> bool {
    matches!(
        addr.iter().next(),
        Some(Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Reach {
        reach(&s.parse().unwrap())
    }

    #[test]
    fn classifies_addresses() {
        assert_eq!(r("/ip4/203.0.114.7/udp/4001/quic-v1"), Reach::Public);
        assert_eq!(r("/ip4/8.8.8.8/udp/1/quic-v1"), Reach::Public);
        assert_eq!(r("/ip4/192.168.1.5/udp/1/quic-v1"), Reach::Private);
        assert_eq!(r("/ip4/10.1.2.3/udp/1/quic-v1"), Reach::Private);
        assert_eq!(r("/ip4/100.64.1.1/udp/1/quic-v1"), Reach::Private);
        assert_eq!(r("/ip4/127.0.0.1/udp/1/quic-v1"), Reach::Loopback);
        assert_eq!(r("/ip4/0.0.0.0/udp/1/quic-v1"), Reach::Other);
        assert_eq!(r("/ip6/::1/udp/1/quic-v1"), Reach::Loopback);
        assert_eq!(r("/ip6/fe80::1/udp/1/quic-v1"), Reach::Private);
        assert_eq!(r("/ip6/fd00::1/udp/1/quic-v1"), Reach::Private);
        assert_eq!(r("/ip6/2a01:4f8::1/udp/1/quic-v1"), Reach::Public);
        assert_eq!(r("/ip6/::ffff:10.0.0.1/udp/1/quic-v1"), Reach::Private);
        assert_eq!(r("/dns4/relay.example.org/udp/4001/quic-v1"), Reach::Public);
        assert_eq!(
            r(
                "/ip4/8.8.8.8/udp/1/quic-v1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit"
            ),
            Reach::Other
        );
    }
}
