//! Relay memory with a full record store at the largest keys and values (not a
//! pass/fail test): the worst case the README states.
//!
//! PRIVSTACK_RELAY_BIN=target/x86_64-unknown-linux-musl/release/privstack-relay \
//!   cargo test --test store_memory -- --ignored --nocapture
//!
//! Starts the given binary with its default store bounds (the per-peer quota lifted, so
//! one client can fill it; loopback sources have no host or network quota), fills the
//! store with `--kad-max-records` records of `--kad-max-key-bytes`-byte keys and
//! `--kad-max-value-bytes`-byte values (PRIVSTACK_BENCH_RECORDS overrides the count),
//! and prints the relay's RSS before and after, and per record.

mod common;

use std::time::Instant;

use common::*;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, kad};
use privstack_relay::defaults;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; needs PRIVSTACK_RELAY_BIN"]
async fn full_store_at_the_largest_keys_and_values() {
    let bin = std::env::var("PRIVSTACK_RELAY_BIN").expect("PRIVSTACK_RELAY_BIN");
    let records: usize = std::env::var("PRIVSTACK_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(defaults::KAD_MAX_RECORDS);
    let quic = free_udp_port();
    let relay = RelayBinary::start(
        &[],
        &bin,
        quic,
        &["--kad-max-records-per-peer".into(), "0".into()],
    );
    let peer = relay.peer_id;
    let relay_addr: Multiaddr = format!("/ip4/127.0.0.1/udp/{quic}/quic-v1/p2p/{peer}")
        .parse()
        .unwrap();
    let mut c = TestClient::new(None).await;
    c.connect(relay_addr).await;
    let idle = rss_kib(relay.pid());

    let key = |i: usize| {
        let mut k = format!("/privstack/syncgroup/{i:08}").into_bytes();
        k.resize(defaults::KAD_MAX_KEY_BYTES, b'k');
        kad::RecordKey::new(&k)
    };
    let t0 = Instant::now();
    let (mut done, mut ok, mut next) = (0usize, 0usize, 0usize);
    const IN_FLIGHT: usize = 64;
    while done < records {
        while next < records && next - done < IN_FLIGHT {
            let mut r = kad::Record::new(
                key(next),
                vec![(next % 251) as u8; defaults::KAD_MAX_VALUE_BYTES],
            );
            r.publisher = Some(c.peer_id);
            c.with(move |s| {
                s.behaviour_mut()
                    .kad
                    .put_record_to(r, std::iter::once(peer), kad::Quorum::One)
            })
            .await;
            next += 1;
        }
        let stored = c
            .wait("put_record_to result", |ev| match ev {
                SwarmEvent::Behaviour(ClientBehaviourEvent::Kad(
                    kad::Event::OutboundQueryProgressed {
                        result: kad::QueryResult::PutRecord(r),
                        ..
                    },
                )) => Some(r.is_ok()),
                _ => None,
            })
            .await;
        done += 1;
        ok += usize::from(stored);
    }
    let secs = t0.elapsed().as_secs_f64();
    let full = rss_kib(relay.pid());
    println!(
        "{bin}: {ok} of {records} records stored ({}-byte keys, {}-byte values) in {secs:.0} s; \
         RSS idle {:.1} MiB, full {:.1} MiB, {:.0} bytes per record",
        defaults::KAD_MAX_KEY_BYTES,
        defaults::KAD_MAX_VALUE_BYTES,
        idle as f64 / 1024.0,
        full as f64 / 1024.0,
        (full - idle) as f64 * 1024.0 / ok.max(1) as f64,
    );
}
