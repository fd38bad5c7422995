//! What the QUIC crypto costs with each rustls provider the relay could ship: ring (the
//! relay's) and aws-lc-rs (what libp2p-quic and libp2p-tls 0.7 build with), on this CPU.
//!
//!   cargo bench --bench crypto [-- --seconds S]
//!
//! Per provider and cipher suite: QUIC packet protection as quinn does it for every
//! datagram (AEAD seal of a 1,400-byte payload plus header protection; then open plus
//! header protection removal on the receiving side), in MiB/s of payload. Per provider:
//! the handshake's public-key work on the server's side: one key exchange (in each
//! group the provider offers, in its order of preference) and one ECDSA P-256 signature (the relay's
//! certificate key signs every handshake). Median of three timed rounds of `--seconds`
//! each. The last line on stdout is one JSON object with the figures.

use std::hint::black_box;
use std::time::{Duration, Instant};

use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use rustls::quic::{Keys, Version};
use rustls::{Side, SupportedCipherSuite};

/// Payload of a full-size datagram at quinn's largest MTU (1,452 bytes of UDP
/// payload) after a short header and the 16-byte tag.
const PAYLOAD: usize = 1400;

struct Provider {
    name: &'static str,
    provider: CryptoProvider,
}

fn providers() -> Vec<Provider> {
    vec![
        Provider {
            name: "ring",
            provider: rustls::crypto::ring::default_provider(),
        },
        Provider {
            name: "aws-lc-rs",
            provider: rustls::crypto::aws_lc_rs::default_provider(),
        },
    ]
}

/// Runs `op` in batches until `seconds` pass; operations per second.
fn rate(seconds: f64, mut op: impl FnMut()) -> f64 {
    let mut done = 0u64;
    let start = Instant::now();
    let budget = Duration::from_secs_f64(seconds);
    while start.elapsed() < budget {
        for _ in 0..64 {
            op();
        }
        done += 64;
    }
    done as f64 / start.elapsed().as_secs_f64()
}

fn median3(seconds: f64, mut op: impl FnMut()) -> f64 {
    let mut runs: Vec<f64> = (0..3).map(|_| rate(seconds, &mut op)).collect();
    runs.sort_by(f64::total_cmp);
    runs[1]
}

/// Packets sealed (and opened) per second with `suite`'s QUIC keys.
fn packet_protection(suite: SupportedCipherSuite, seconds: f64) -> (f64, f64) {
    let tls13 = suite.tls13().expect("a TLS 1.3 suite");
    let quic = tls13.quic.expect("the suite supports QUIC");
    let cid = [7u8; 8];
    let client = Keys::initial(Version::V1, tls13, quic, &cid, Side::Client);
    let server = Keys::initial(Version::V1, tls13, quic, &cid, Side::Server);
    let header = [0x40u8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0];
    let mut pn = 0u64;
    let mut buf = vec![0u8; PAYLOAD + 16];

    let seal = median3(seconds, || {
        pn += 1;
        let mut h = header;
        let tag = client
            .local
            .packet
            .encrypt_in_place(pn, &h, &mut buf[..PAYLOAD])
            .unwrap();
        buf[PAYLOAD..].copy_from_slice(tag.as_ref());
        let (first, rest) = h.split_at_mut(1);
        client
            .local
            .header
            .encrypt_in_place(&buf[4..20], &mut first[0], &mut rest[8..10])
            .unwrap();
        black_box(&buf);
    });

    // One sealed packet, opened again and again (opening works on a copy).
    let sealed = {
        let mut p = vec![0u8; PAYLOAD + 16];
        let tag = client
            .local
            .packet
            .encrypt_in_place(1, &header, &mut p[..PAYLOAD])
            .unwrap();
        p[PAYLOAD..].copy_from_slice(tag.as_ref());
        p
    };
    let mut h = header;
    let open = median3(seconds, || {
        buf.copy_from_slice(&sealed);
        let (first, rest) = h.split_at_mut(1);
        let mut pn_bytes = [rest[8], rest[9]];
        server
            .remote
            .header
            .decrypt_in_place(&buf[4..20], &mut first[0], &mut pn_bytes)
            .unwrap();
        first[0] = header[0];
        let plain = server
            .remote
            .packet
            .decrypt_in_place(1, &header, &mut buf)
            .unwrap();
        black_box(plain);
    });
    (seal, open)
}

fn mib_per_s(packets_per_s: f64) -> f64 {
    packets_per_s * PAYLOAD as f64 / (1024.0 * 1024.0)
}

/// Key exchanges per second on the server's side (the relay's, for devices): its key
/// share (or, for a KEM, the encapsulation) and the shared secret, for a client share.
fn key_exchange(group: &'static dyn SupportedKxGroup, seconds: f64) -> (String, f64) {
    let client = group.start().unwrap();
    let client_share = client.pub_key().to_vec();
    let per_s = median3(seconds, || {
        black_box(group.start_and_complete(&client_share).unwrap());
    });
    (format!("{:?}", group.name()), per_s)
}

/// ECDSA P-256 handshake signatures per second with `p`'s signer.
fn signatures(p: &CryptoProvider, seconds: f64) -> f64 {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signing = p.key_provider.load_private_key(der).unwrap();
    let signer = signing
        .choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256])
        .unwrap();
    let message = [9u8; 130];
    median3(seconds, || {
        black_box(signer.sign(&message).unwrap());
    })
}

fn main() {
    let mut seconds = 1.0;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => {
                seconds = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--seconds takes a number")
            }
            // `cargo bench` passes --bench to every bench binary.
            "--bench" => {}
            other => panic!("unknown argument {other:?} (expected --seconds S)"),
        }
    }
    let mut figures = serde_json::Map::new();
    println!(
        "{:<10} {:<32} {:>12} {:>12}",
        "provider", "QUIC packet protection", "seal MiB/s", "open MiB/s"
    );
    for p in providers() {
        for suite in &p.provider.cipher_suites {
            if suite.tls13().is_none() {
                continue;
            }
            let (seal, open) = packet_protection(*suite, seconds);
            let name = format!("{:?}", suite.suite());
            println!(
                "{:<10} {:<32} {:>12.0} {:>12.0}",
                p.name,
                name,
                mib_per_s(seal),
                mib_per_s(open)
            );
            figures.insert(
                format!("{} {name}", p.name),
                serde_json::json!({"seal_mib_s": mib_per_s(seal).round(), "open_mib_s": mib_per_s(open).round()}),
            );
        }
    }
    println!();
    println!(
        "{:<10} {:<32} {:>12} {:>12}",
        "provider", "handshake key exchange", "per second", "P-256 signs/s"
    );
    for p in providers() {
        let signs = signatures(&p.provider, seconds);
        let mut groups = serde_json::Map::new();
        for (i, group) in p.provider.kx_groups.iter().enumerate() {
            let (name, kx) = key_exchange(*group, seconds);
            let signs = if i == 0 {
                format!("{signs:.0}")
            } else {
                String::new()
            };
            println!("{:<10} {:<32} {:>12.0} {:>12}", p.name, name, kx, signs);
            groups.insert(name, kx.round().into());
        }
        figures.insert(
            format!("{} handshake", p.name),
            serde_json::json!({"kx_per_s": groups, "p256_signs_per_s": signs.round()}),
        );
    }
    println!("{}", serde_json::Value::Object(figures));
}
