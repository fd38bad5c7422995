//! Relay CPU cost of relayed bulk traffic, for comparing builds (not a pass/fail test).
//!
//! PRIVSTACK_RELAY_BIN=target/x86_64-unknown-linux-musl/release/privstack-relay \
//!   cargo test --test relay_cpu -- --ignored --nocapture
//!
//! Starts the given binary, pushes PRIVSTACK_BENCH_MIB (default 256) MiB through one
//! circuit between two clients in this process, and prints the relay process's CPU
//! seconds (utime + stime from /proc) per GiB relayed. CPU time rather than throughput,
//! so the (unoptimised) test clients do not decide the figure.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::Multiaddr;

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; needs PRIVSTACK_RELAY_BIN"]
async fn relay_cpu_per_gib() {
    let bin = std::env::var("PRIVSTACK_RELAY_BIN").expect("PRIVSTACK_RELAY_BIN");
    let mib: usize = std::env::var("PRIVSTACK_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let quic = free_udp_port();
    // Unshaped: the figure is the relay's CPU per byte, not its rate limit.
    let unshaped = ["--max-circuit-rate", "0", "--max-relay-rate", "0"].map(String::from);
    let relay = RelayBinary::start(&[], &bin, quic, &unshaped);
    let peer = relay.peer_id;
    let relay_addr: Multiaddr = format!("/ip4/127.0.0.1/udp/{quic}/quic-v1/p2p/{peer}")
        .parse()
        .unwrap();

    let mut a = TestClient::new(None).await;
    let mut b = TestClient::new(None).await;
    a.reserve(&relay_addr).await.expect("reservation");
    let a_id = a.peer_id;
    let mut incoming = a.control.accept(TRANSFER_PROTOCOL).unwrap();
    b.dial_via_circuit(&relay_addr, a_id).await;

    let reader = tokio::spawn(async move {
        let (_, mut s) = incoming.next().await.unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0usize;
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break total;
            }
            total += n;
        }
    });
    let mut stream = b
        .control
        .open_stream(a_id, TRANSFER_PROTOCOL)
        .await
        .unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    let cpu0 = cpu_seconds(relay.pid());
    let t0 = Instant::now();
    for _ in 0..mib {
        stream.write_all(&chunk).await.unwrap();
    }
    stream.close().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(600), reader)
        .await
        .unwrap()
        .unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(relay.pid()) - cpu0;
    assert_eq!(got, mib << 20);
    println!(
        "{bin}: {mib} MiB in {secs:.2} s ({:.1} MiB/s, client-bound); relay CPU {cpu:.2} s = {:.2} s/GiB",
        mib as f64 / secs,
        cpu * 1024.0 / mib as f64
    );
}
