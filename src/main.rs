//! privstack-relay binary: command line, logging, signals. The relay itself is
//! [`privstack_relay::Server`].

#![forbid(unsafe_code)]

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow};
use privstack_relay::config::{CheckConfigArgs, Command, KeygenArgs, ProbeArgs, RunArgs};
use privstack_relay::identity::{self, KeySource};
use privstack_relay::logwriter::NonBlocking;
use privstack_relay::settings::{self, Parsed, exit};
use privstack_relay::{Config, Server, defaults, notify, probe};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Why the process stops: a settings error exits 78 (the unit does not restart on
/// it), anything else 1.
enum Fail {
    Config(anyhow::Error),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for Fail {
    fn from(e: anyhow::Error) -> Self {
        Fail::Other(e)
    }
}

fn config_error(e: impl Into<anyhow::Error>) -> Fail {
    Fail::Config(e.into())
}

fn main() -> ExitCode {
    let parsed = match settings::parse(std::env::args_os(), &settings::process_env) {
        Ok(p) => p,
        Err(e) => {
            e.print();
            return ExitCode::from(e.exit_code());
        }
    };
    let result = match &parsed.cli.command {
        Some(Command::Keygen(args)) => keygen(args),
        Some(Command::Probe(args)) => run_probe(args),
        Some(Command::CheckConfig(args)) => check_config(args),
        None => run(&parsed),
    };
    match result {
        Ok(code) => code,
        Err(Fail::Config(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit::CONFIG)
        }
        Err(Fail::Other(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit::FAILURE)
        }
    }
}

/// Write `text` to stdout; a closed or full stdout is an error, not a panic.
fn print_out(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("cannot write to standard output")
}

/// Log to stderr: `-v` is debug, `RUST_LOG` (`level` or `target=level,...`) overrides.
/// `Targets` rather than `EnvFilter`: the same directives without a regex engine.
/// Lines go through [`NonBlocking`]: a stderr nobody reads costs log lines, never the
/// relay (the returned writer flushes what is queued at exit).
fn init_logging(verbose: bool, quiet_level: &str) -> NonBlocking {
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
    let writer = NonBlocking::new(std::io::stderr(), defaults::LOG_QUEUE_LINES);
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(writer.clone())
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .with(filter)
        .init();
    if let Some(msg) = bad_rust_log {
        tracing::warn!("{msg}");
    }
    writer
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn keygen(args: &KeygenArgs) -> Result<ExitCode, Fail> {
    let (key, source) = identity::load_or_generate(&args.identity).map_err(config_error)?;
    let how = match source {
        KeySource::Generated => "generated",
        KeySource::Loaded => "already exists",
    };
    eprintln!("identity key {}: {how}", args.identity.display());
    if let Some(mode) = identity::loose_permissions(&args.identity) {
        eprintln!(
            "warning: identity key {} has mode {mode:o}: other users can read it; chmod 600 it",
            args.identity.display()
        );
    }
    print_out(&format!("{}\n", key.public().to_peer_id()))?;
    Ok(ExitCode::SUCCESS)
}

fn run_probe(args: &ProbeArgs) -> Result<ExitCode, Fail> {
    let _log = init_logging(args.verbose, "warn");
    let rt = runtime()?;
    let timeout = Duration::from_secs(args.timeout.max(1));
    print_out(&format!("probe {}\n", args.target))?;
    match rt.block_on(probe::probe(&args.target, timeout, !args.no_reservation)) {
        Ok(report) => {
            let mut text = String::new();
            for line in &report.lines {
                text += &format!("  {line}\n");
            }
            print_out(&(text + "OK\n"))?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            print_out("FAILED\n")?;
            eprintln!("probe failed: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn check_config(args: &CheckConfigArgs) -> Result<ExitCode, Fail> {
    let report =
        settings::check_config(args.env_file.as_deref()).map_err(|e| config_error(anyhow!(e)))?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    let mut text = report.lines.join("\n");
    text.push('\n');
    print_out(&text)?;
    Ok(ExitCode::SUCCESS)
}

fn run(parsed: &Parsed) -> Result<ExitCode, Fail> {
    let args: &RunArgs = &parsed.cli.run;
    let log = init_logging(args.verbose, "info");
    let result = run_logged(parsed, args);
    log.flush(Duration::from_secs(1));
    result
}

fn run_logged(parsed: &Parsed, args: &RunArgs) -> Result<ExitCode, Fail> {
    for var in settings::unknown_process_variables() {
        tracing::warn!("{var} is not a privstack-relay setting; ignored");
    }
    // jemalloc returns freed memory to the OS only while the allocator is in use, so a
    // relay that goes quiet after a burst of clients would keep its peak RSS; its
    // background thread purges on a timer instead (BENCHMARKS.md, churn).
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::debug!("jemalloc background thread not enabled: {e}");
    }
    // A settings error names the variable when one set the flag.
    let named = |e: privstack_relay::config::ConfigError| match parsed.variable_of(e.flag()) {
        Some(from) => config_error(anyhow!("{}: {e}", from.var)),
        None => config_error(e),
    };
    let config = Config::try_from(args).map_err(named)?;
    let (key, source) = identity::load_or_generate(&args.identity).map_err(config_error)?;
    config
        .check_peer_id(&key.public().to_peer_id())
        .map_err(named)?;
    match source {
        KeySource::Generated => {
            tracing::info!(path = %args.identity.display(), "generated a new identity key")
        }
        KeySource::Loaded => {
            tracing::debug!(path = %args.identity.display(), "loaded identity key")
        }
    }
    if let Some(mode) = identity::loose_permissions(&args.identity) {
        tracing::warn!(
            path = %args.identity.display(),
            mode = format_args!("{mode:o}"),
            "identity key is readable by other users; chmod 600 it"
        );
    }
    let drain_grace = config.drain_grace;
    let rt = runtime()?;
    let code = rt.block_on(async {
        // Signal handlers first, so a SIGTERM during startup is not lost.
        let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let mut sigquit = signal(SignalKind::quit()).context("installing SIGQUIT handler")?;
        // Sent by terminals, tools and log rotation: without a handler each would kill
        // the relay at once. They are logged and the relay keeps running.
        let mut sighup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
        let mut sigusr1 =
            signal(SignalKind::user_defined1()).context("installing SIGUSR1 handler")?;
        let mut sigusr2 =
            signal(SignalKind::user_defined2()).context("installing SIGUSR2 handler")?;

        let mut server = Server::spawn(key, config).await?;
        print_banner(&server);
        if let Err(e) = notify::notify("READY=1") {
            tracing::warn!("sd_notify READY=1 failed: {e}");
        }

        let signal = loop {
            let ignored = tokio::select! {
                _ = sigterm.recv() => break "SIGTERM",
                _ = sigint.recv() => break "SIGINT",
                _ = sigquit.recv() => break "SIGQUIT",
                _ = sighup.recv() => "SIGHUP",
                _ = sigusr1.recv() => "SIGUSR1",
                _ = sigusr2.recv() => "SIGUSR2",
                stopped = server.join() => {
                    // The supervisor: one task gone stops the rest, and the exit code
                    // tells systemd to start a fresh relay.
                    tracing::error!("{stopped}; stopping the relay");
                    let _ = notify::notify("STOPPING=1");
                    let _ = tokio::time::timeout(Duration::from_secs(4), server.shutdown()).await;
                    anyhow::bail!("relay stopped: {stopped}");
                }
            };
            tracing::info!("{ignored} received and ignored (SIGTERM stops the relay)");
        };
        tracing::info!("{signal} received, shutting down");
        let _ = notify::notify("STOPPING=1");
        // Drain: no new reservations or circuits; open circuits get the grace to end.
        // A second SIGTERM/SIGINT stops at once.
        if !drain_grace.is_zero() {
            tokio::select! {
                left = server.drain(drain_grace) => if left > 0 {
                    tracing::info!(
                        "drain grace of {} s over; closing {left} open circuits",
                        drain_grace.as_secs()
                    );
                },
                _ = sigterm.recv() => tracing::info!("SIGTERM again: not waiting for circuits"),
                _ = sigint.recv() => tracing::info!("SIGINT again: not waiting for circuits"),
            }
        }
        match tokio::time::timeout(Duration::from_secs(4), server.shutdown()).await {
            Ok(stats) => tracing::info!("final counters: {stats}"),
            Err(_) => tracing::warn!("shutdown took longer than 4 s; exiting anyway"),
        }
        anyhow::Ok(ExitCode::SUCCESS)
    })?;
    Ok(code)
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
    if let Some(addr) = server.metrics_addr() {
        let _ = writeln!(out, "  Metrics: http://{addr}/metrics");
    }
    for addr in server.addresses() {
        if !privstack_relay::addrs::is_unspecified(&addr) {
            let _ = writeln!(out, "  Address: {addr}/p2p/{peer_id}");
        }
    }
    let _ = out.flush();
}
