//! privstack-relay binary: command line, logging, signals. The relay itself is
//! [`privstack_relay::Server`].

#![forbid(unsafe_code)]

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use privstack_relay::config::{Command, KeygenArgs, ProbeArgs, RunArgs};
use privstack_relay::identity::{self, KeySource};
use privstack_relay::{Cli, Config, Server, notify, probe};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Keygen(args)) => keygen(&args),
        Some(Command::Probe(args)) => run_probe(&args),
        None => run(&cli.run),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Log to stderr: `-v` is debug, `RUST_LOG` (`level` or `target=level,...`) overrides.
/// `Targets` rather than `EnvFilter`: the same directives without a regex engine.
fn init_logging(verbose: bool, quiet_level: &str) {
    let default: Targets = (if verbose { "debug" } else { quiet_level })
        .parse()
        .expect("valid default filter");
    let mut bad_rust_log = None;
    let filter = match std::env::var("RUST_LOG") {
        Ok(s) if !s.is_empty() => s.parse().unwrap_or_else(|e| {
            bad_rust_log = Some(format!("ignoring RUST_LOG={s:?}: {e}"));
            default
        }),
        _ => default,
    };
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .with(filter)
        .init();
    if let Some(msg) = bad_rust_log {
        tracing::warn!("{msg}");
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn keygen(args: &KeygenArgs) -> anyhow::Result<ExitCode> {
    let (key, source) = identity::load_or_generate(&args.identity)?;
    let how = match source {
        KeySource::Generated => "generated",
        KeySource::Loaded => "already exists",
    };
    eprintln!("identity key {}: {how}", args.identity.display());
    println!("{}", key.public().to_peer_id());
    Ok(ExitCode::SUCCESS)
}

fn run_probe(args: &ProbeArgs) -> anyhow::Result<ExitCode> {
    init_logging(args.verbose, "warn");
    let rt = runtime()?;
    let timeout = Duration::from_secs(args.timeout.max(1));
    println!("probe {}", args.target);
    match rt.block_on(probe::probe(&args.target, timeout, !args.no_reservation)) {
        Ok(report) => {
            for line in &report.lines {
                println!("  {line}");
            }
            println!("OK");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("FAILED");
            eprintln!("probe failed: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    init_logging(args.verbose, "info");
    // jemalloc returns freed memory to the OS only while the allocator is in use, so a
    // relay that goes quiet after a burst of clients would keep its peak RSS; its
    // background thread purges on a timer instead (BENCHMARKS.md, churn).
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::debug!("jemalloc background thread not enabled: {e}");
    }
    let config = Config::try_from(args)?;
    let (key, source) = identity::load_or_generate(&args.identity)?;
    match source {
        KeySource::Generated => {
            tracing::info!(path = %args.identity.display(), "generated a new identity key")
        }
        KeySource::Loaded => {
            tracing::debug!(path = %args.identity.display(), "loaded identity key")
        }
    }
    let rt = runtime()?;
    rt.block_on(async {
        // Signal handlers first, so a SIGTERM during startup is not lost.
        let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;

        let mut server = Server::spawn(key, config).await?;
        print_banner(&server);
        if let Err(e) = notify::notify("READY=1") {
            tracing::warn!("sd_notify READY=1 failed: {e}");
        }

        let signal = tokio::select! {
            _ = sigterm.recv() => "SIGTERM",
            _ = sigint.recv() => "SIGINT",
            stats = server.join() => {
                anyhow::bail!("relay event loop stopped unexpectedly ({stats})");
            }
        };
        tracing::info!("{signal} received, shutting down");
        let _ = notify::notify("STOPPING=1");
        match tokio::time::timeout(Duration::from_secs(4), server.shutdown()).await {
            Ok(stats) => tracing::info!("final counters: {stats}"),
            Err(_) => tracing::warn!("shutdown took longer than 4 s; exiting anyway"),
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn print_banner(server: &Server) {
    let mut out = std::io::stdout().lock();
    let peer_id = server.peer_id();
    let _ = writeln!(
        out,
        "privstack-relay {}",
        privstack_relay::build_info::VERSION
    );
    // Client test suites parse this line; keep its exact shape.
    let _ = writeln!(out, "  PeerId: {peer_id}");
    for addr in server.quic_addrs() {
        let _ = writeln!(out, "  QUIC: {addr}");
    }
    for addr in server.http_addrs() {
        let _ = writeln!(out, "  HTTP: {addr}");
    }
    for addr in server.addresses() {
        if !privstack_relay::addrs::is_unspecified(&addr) {
            let _ = writeln!(out, "  Address: {addr}/p2p/{peer_id}");
        }
    }
    let _ = out.flush();
}
