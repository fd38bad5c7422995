#!/usr/bin/env python3
"""privstack-relay against libp2p-server 0.13.0 (and the direct path), side by side.

Usage:
  benches/compare.py [--runs N] [--write]   the whole comparison (about 19 min per run)
  benches/compare.py --smoke                every scenario on a small scale, this relay only:
                                            fails if any scenario fails (CI runs this)
  benches/compare.py --from-results F [--write]   the table of a saved run

Runs each scenario of the load generator (benches/load.rs) against a fresh relay
process per scenario and run, this relay and libp2p-server back to back, and prints one
table: min / median / max over the runs for each, and the median of the per-run ratios.
--write replaces the table in BENCHMARKS.md (between the compare markers) with it.

Prepares what it needs: wrk and musl-tools (apt-get), libp2p-server 0.13.0
(`cargo install --locked` into target/bench-tools), the load generator
(`cargo bench --bench load --no-run`; --smoke: `cargo test`'s profile) and, unless --relay-bin is given, the release
binary (`release/build.sh` for this machine's musl target). Then it re-runs itself in a
new network namespace (unshare; root, or user namespaces for others) with only a
loopback interface: all traffic stays on 127.0.0.0/8, libp2p-server's fixed metrics
port (8888) cannot collide with anything, and its attempt to join the public IPFS DHT
goes nowhere. (--smoke starts only this relay, on free ports, without a namespace.)
"""
import argparse, base64, datetime, json, os, platform, re, shutil, signal, socket
import statistics, subprocess, sys, tempfile, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "target", "bench-tools")
LIBP2P_SERVER_VERSION = "0.13.0"
MARK_BEGIN, MARK_END = "<!-- compare:begin -->", "<!-- compare:end -->"
# Scenarios libp2p-server runs but cannot do: only their failure rows show its figures.
RUNS_BUT_CANNOT = {"dht": "acknowledges puts but stores nothing (its Kademlia record TTL is 0)",
                   "fleet-2000": "stores no records, so every get fails",
                   "fleet-20000": "stores no records, so every get fails"}
# Of those, the figures that do not depend on stored records (connections held, memory,
# packets), shown for libp2p-server too.
STILL_SHOWN = {"failures", "online", "rss_per_device_kib", "rss_after_vs_idle",
               "rest_packets_per_device_min", "rest_cpu_s_per_device_hour"}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def run(cmd, **kw):
    log("+", " ".join(cmd))
    return subprocess.run(cmd, check=True, **kw)


# ----- preparation (outside the namespace: it may download) ----------------------------

def prepare(args):
    arch = platform.machine()
    triple = f"{arch}-unknown-linux-musl"
    missing = [p for p, tool in (("wrk", "wrk"), ("musl-tools", "musl-gcc")) if not shutil.which(tool)]
    if missing and not args.smoke:
        if os.geteuid() != 0:
            sys.exit(f"compare.py: missing {' '.join(missing)}: apt-get install {' '.join(missing)}")
        # A fresh machine has no package lists yet.
        run(["apt-get", "update", "-qq"], stdout=subprocess.DEVNULL)
        run(["apt-get", "install", "-y", "--no-install-recommends", *missing],
            stdout=subprocess.DEVNULL)
    paths = {}
    if args.relay_bin:
        paths["relay"] = os.path.abspath(args.relay_bin)
    else:
        paths["relay"] = os.path.join(ROOT, "target", triple, "release", "privstack-relay")
        if not os.path.exists(paths["relay"]):
            run(["rustup", "target", "add", triple])
            run([os.path.join(ROOT, "release", "build.sh")], cwd=ROOT,
                env=dict(os.environ, TARGETS=triple, BUILDER="native",
                         DIST=os.path.join(ROOT, "target", "bench-dist")))
    if not os.access(paths["relay"], os.X_OK):
        sys.exit(f"compare.py: relay binary {paths['relay']} is not an executable file")
    if not args.smoke:
        paths["libp2p_server"] = os.path.join(TOOLS, "bin", "libp2p-server")
        if not os.path.exists(paths["libp2p_server"]):
            run(["cargo", "install", "--locked", "libp2p-server", "--version",
                 LIBP2P_SERVER_VERSION, "--root", TOOLS])
    # The smoke run measures nothing, so it takes the generator in the test profile, whose
    # crate graph `cargo test` has just built (only load.rs is compiled); figures come
    # from the optimised bench profile.
    out = subprocess.run(
        ["cargo", "test" if args.smoke else "bench", "--locked", "--bench", "load", "--no-run",
         "--message-format=json"],
        cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True).stdout
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == "load" \
                and msg.get("executable"):
            paths["load"] = msg["executable"]
    if "load" not in paths:
        sys.exit("compare.py: cargo did not report the load generator's executable")
    return paths


def enter_namespace():
    """Re-run this script in a fresh network namespace with loopback up."""
    if os.environ.get("PRIVSTACK_BENCH_NETNS") == "1":
        run(["ip", "link", "set", "lo", "up"])
        return
    if not shutil.which("unshare"):
        sys.exit("compare.py: unshare (util-linux) is needed to isolate the benchmark network")
    cmd = ["unshare", "--net"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    env = dict(os.environ, PRIVSTACK_BENCH_NETNS="1")
    os.execvpe(cmd[0], cmd + [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)


# ----- relays under test ---------------------------------------------------------------

def free_port(kind):
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_http(url, proc, what, timeout=20):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} while starting")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.001)
    raise RuntimeError(f"{what} did not answer {url} within {timeout} s")


class Relay:
    """One relay process on loopback; `addr` is its /p2p/ multiaddr."""

    def __init__(self, kind, paths, tmp, extra=()):
        self.kind = kind
        self.port = free_port(socket.SOCK_DGRAM)
        key = os.path.join(tmp, "relay-identity.key")
        # keygen creates the key if needed and prints the peer ID either way.
        peer = subprocess.run([paths["relay"], "keygen", "--identity", key], check=True,
                              stdout=subprocess.PIPE, text=True).stdout
        self.peer = re.search(r"12D3KooW\w+", peer).group(0)
        quic = f"/ip4/127.0.0.1/udp/{self.port}/quic-v1"
        self.addr = f"{quic}/p2p/{self.peer}"
        if kind == "privstack-relay":
            self.http = free_port(socket.SOCK_STREAM)
            cmd = [paths["relay"], "--port", str(self.port), "--http-port", str(self.http),
                   "--metrics-address", "127.0.0.1:0",
                   "--identity", key, *caps_off(extra), *extra]
            self.ready_url = f"http://127.0.0.1:{self.http}/api/v1/identity"
        else:
            with open(key, "rb") as f:
                priv = base64.b64encode(f.read()).decode()
            config = os.path.join(tmp, "libp2p-server.json")
            with open(config, "w") as f:
                json.dump({"Identity": {"PeerID": self.peer, "PrivKey": priv},
                           # The announced address makes Kademlia run in server mode and
                           # the relay advertise its hop protocol (both need an external
                           # address in rust-libp2p).
                           "Addresses": {"Swarm": [quic], "AppendAnnounce": [quic]}}, f)
            cmd = [paths["libp2p_server"], "--config", config, "--enable-kademlia"]
            self.ready_url = "http://127.0.0.1:8888/metrics"
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(self.ready_url, self.proc, kind)
        self.ready_ms = (time.perf_counter() - self.t0) * 1000

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ----- scenarios -----------------------------------------------------------------------

# The load generator's clients share a few loopback /24s, which no real fleet does: the
# relay's per-host and per-network caps are lifted so they do not decide the figures.
HOST_CAPS_OFF = ["--max-connections-per-host", "0", "--max-connections-per-network", "0",
                 "--max-reservations-per-host", "0", "--max-reservations-per-network", "0"]


def caps_off(extra):
    """HOST_CAPS_OFF without the flags `extra` sets itself."""
    pairs = zip(HOST_CAPS_OFF[::2], HOST_CAPS_OFF[1::2])
    return [x for flag, value in pairs if flag not in extra for x in (flag, value)]

# (name, load generator arguments, extra flags for privstack-relay, libp2p-server: True to
#  run it, or the reason it cannot)
FULL = [
    ("reservations-128", ["reservations", "--clients", "128", "--concurrency", "32"], [], True),
    ("reservations-2000", ["reservations", "--clients", "2000", "--concurrency", "32"], [],
     "refuses past 128 reservations"),
    ("reservations-10000", ["reservations", "--clients", "10000", "--concurrency", "32"],
     ["--max-reservations", "10000", "--max-connections", "16384"],
     "refuses past 128 reservations"),
    ("circuits-100", ["circuits", "--clients", "100", "--concurrency", "16",
                      "--payload", str(64 * 1024)], [], True),
    ("circuits-500", ["circuits", "--clients", "500", "--concurrency", "500",
                      "--payload", str(64 * 1024)], [],
     "128 reservations, 16 circuits at once"),
    ("bulk", ["bulk", "--mib", "1024"], ["--max-circuit-rate", "0", "--max-relay-rate", "0"],
     "circuits end after 128 KiB"),
    # The same with the default rates (8 MiB/s per circuit direction, 32 MiB/s in all).
    ("bulk-shaped", ["bulk", "--mib", "256"], [], "circuits end after 128 KiB"),
    # 500 records per client measure the store, not a PrivStack device (one or two per
    # sync group): the per-peer quota is lifted for it.
    ("dht", ["dht", "--clients", "100", "--records", "500", "--gets", "50"],
     ["--kad-max-records-per-peer", "0"], True),
    ("churn", ["churn", "--concurrency", "32", "--rounds", "3", "--seconds", "10", "--settle", "60"],
     [], True),
    # One host floods reservations while honest hosts reserve: the relay's real per-host
    # caps, not HOST_CAPS_OFF.
    # Today's PrivStack devices (SPEC §3): one QUIC connection each, a get and a put of
    # sync-group records every 30 s; what sizes the relay per connected device.
    ("fleet-2000", ["fleet", "--clients", "2000", "--concurrency", "64", "--period", "30",
                    "--seconds", "60", "--rest", "20", "--settle", "60"], [], True),
    ("fleet-20000", ["fleet", "--clients", "20000", "--concurrency", "64", "--period", "30",
                     "--seconds", "60", "--rest", "20", "--settle", "60"],
     ["--max-connections", "24000"], True),
    ("flood", ["flood", "--clients", "400", "--concurrency", "64"],
     ["--max-connections-per-host", "256", "--max-reservations-per-host", "64",
      "--max-connections-per-network", "1024", "--max-reservations-per-network", "256"],
     True),
]

SMOKE = [
    ("reservations", ["reservations", "--clients", "50", "--hold", "1"], []),
    ("circuits", ["circuits", "--clients", "10", "--concurrency", "4",
                  "--payload", str(64 * 1024)], []),
    ("bulk", ["bulk", "--mib", "16"], []),
    ("dht", ["dht", "--clients", "5", "--records", "20", "--gets", "10"], []),
    ("churn", ["churn", "--concurrency", "4", "--seconds", "3", "--settle", "5"], []),
    # Three generator processes, so the parent/child protocol runs too.
    ("fleet", ["fleet", "--clients", "20", "--concurrency", "8", "--period", "2",
               "--seconds", "5", "--rest", "2", "--settle", "3", "--per-process", "8"], []),
]


def load(paths, relay, gen_args, ip_base):
    cmd = [paths["load"], *gen_args, "--relay", relay.addr, "--pid", str(relay.proc.pid),
           "--ip-base", ip_base]
    log("+", " ".join(cmd))
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if not lines:
        return {"failures": -1, "errors": [f"load generator exited {p.returncode} without figures"]}
    return json.loads(lines[-1])["result"]


def scenario(paths, kind, gen_args, extra, ip_base):
    with tempfile.TemporaryDirectory() as tmp:
        relay = Relay(kind, paths, tmp, extra)
        try:
            if relay.proc.poll() is not None:
                raise RuntimeError(f"{kind} exited")
            return load(paths, relay, gen_args, ip_base)
        finally:
            relay.stop()


def footprint(paths, kind):
    """exec -> HTTP answering (ms) and idle RSS (KiB) two seconds later."""
    with tempfile.TemporaryDirectory() as tmp:
        relay = Relay(kind, paths, tmp)
        try:
            time.sleep(2)
            return {"ready_ms": relay.ready_ms, "rss_idle_kib": relay.rss_kib()}
        finally:
            relay.stop()


def wrk(paths):
    with tempfile.TemporaryDirectory() as tmp:
        relay = Relay("privstack-relay", paths, tmp)
        try:
            out = subprocess.run(["wrk", "-t1", "-c16", "-d10s", "--latency", relay.ready_url],
                                 check=True, stdout=subprocess.PIPE, text=True).stdout
        finally:
            relay.stop()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"per_s": rps, "p99_ms": float(p99.group(1)) * scale,
            "failures": int(errors.group(1)) if errors else 0}


# ----- table -----------------------------------------------------------------------------

def fleet_rows(n, label):
    """The table rows of the fleet-N scenario (N devices, written `label`)."""
    k = f"fleet-{n}"
    return [
        (f"Fleet, {label} devices: online", k, "online", "", "{:.0f}", True, label),
        (f"Fleet, {label}: get + put per s", k, "ops_per_s", "/s", "{:.0f}", True, ""),
        (f"Fleet, {label}: put p99", k, "put_p99_ms", "ms", "{:.1f}", False, "≤ 100 ms"),
        (f"Fleet, {label}: get p99", k, "get_p99_ms", "ms", "{:.1f}", False, "≤ 100 ms"),
        (f"Fleet, {label}: RSS per connected device", k, "rss_per_device_kib", "KiB", "{:.1f}",
         False, "≤ 40 KiB"),
        (f"Fleet, {label}: relay CPU per 1,000 operations", k, "cpu_s_per_1000_ops", "s",
         "{:.3f}", False, ""),
        (f"Fleet, {label}: relay CPU per device-hour", k, "cpu_s_per_device_hour", "s",
         "{:.2f}", False, ""),
        (f"Fleet, {label}: packets per device per minute at rest", k,
         "rest_packets_per_device_min", "", "{:.1f}", False, ""),
        (f"Fleet, {label}: RSS after / idle (devices gone)", k, "rss_after_vs_idle", "",
         "{:.3f}", False, "≤ 1.10"),
        (f"Fleet, {label}: failures", k, "failures", "", "{:.0f}", False, "0"),
    ]


# (label, result key, field, unit, format, higher is better, target)
ROWS = [
    ("Binary size", "footprint", "size_mib", "MiB", "{:.2f}", False, ""),
    ("exec → HTTP answering", "footprint", "ready_ms", "ms", "{:.1f}", False, "≤ 50 ms"),
    ("Idle RSS", "footprint", "rss_idle_mib", "MiB", "{:.2f}", False, "≤ 8 MiB"),
    ("Reservations, N=128: setup rate", "reservations-128", "per_s", "/s", "{:.0f}", True,
     "≥ libp2p-server"),
    ("Reservations, N=128: p50 latency", "reservations-128", "p50_ms", "ms", "{:.1f}", False, ""),
    ("Reservations, N=128: p99 latency", "reservations-128", "p99_ms", "ms", "{:.1f}", False, ""),
    ("Reservations, N=128: RSS per reservation", "reservations-128",
     "rss_per_reservation_kib", "KiB", "{:.1f}", False, ""),
    ("Reservations, N=128: failures", "reservations-128", "failures", "", "{:.0f}", False, "0"),
    ("Reservations, N=2,000: setup rate", "reservations-2000", "per_s", "/s", "{:.0f}", True, ""),
    ("Reservations, N=2,000: p99 latency", "reservations-2000", "p99_ms", "ms", "{:.1f}", False, ""),
    ("Reservations, N=2,000: RSS per reservation", "reservations-2000",
     "rss_per_reservation_kib", "KiB", "{:.1f}", False, "≤ 40 KiB"),
    ("Reservations, N=2,000: failures", "reservations-2000", "failures", "", "{:.0f}", False, "0"),
    ("Reservations, N=10,000: setup rate", "reservations-10000", "per_s", "/s", "{:.0f}", True, ""),
    ("Reservations, N=10,000: p99 latency", "reservations-10000", "p99_ms", "ms", "{:.1f}", False, ""),
    ("Reservations, N=10,000: RSS per reservation", "reservations-10000",
     "rss_per_reservation_kib", "KiB", "{:.1f}", False, "≤ 40 KiB"),
    ("Reservations, N=10,000: RSS held", "reservations-10000", "rss_at_n_mib", "MiB",
     "{:.0f}", False, ""),
    ("Reservations, N=10,000: failures", "reservations-10000", "failures", "", "{:.0f}", False, "0"),
    ("Circuits, 100 pairs, 16 at once, 64 KiB: rate", "circuits-100", "per_s", "/s", "{:.0f}",
     True, "≥ libp2p-server"),
    ("Circuits, 100 pairs: setup p99", "circuits-100", "setup_p99_ms", "ms", "{:.1f}", False, ""),
    ("Circuits, 100 pairs: failures", "circuits-100", "failures", "", "{:.0f}", False, "0"),
    ("Circuits, 500 pairs at once, 64 KiB: rate", "circuits-500", "per_s", "/s", "{:.0f}", True, ""),
    ("Circuits, 500 pairs: failures", "circuits-500", "failures", "", "{:.0f}", False, "0"),
    ("Bulk 1 GiB direct (no relay)", "bulk", "direct_mib_s", "MiB/s", "{:.0f}", True, ""),
    ("Bulk 1 GiB relayed", "bulk", "relayed_mib_s", "MiB/s", "{:.0f}", True, ""),
    ("Bulk: relayed / direct", "bulk", "ratio", "", "{:.2f}", True, "≥ 0.50"),
    ("Bulk: relay CPU per GiB", "bulk", "relay_cpu_s_per_gib", "s", "{:.2f}", False, ""),
    ("Bulk 256 MiB relayed at the default rates", "bulk-shaped", "relayed_mib_s", "MiB/s",
     "{:.1f}", False, "≤ 8 MiB/s"),
    ("DHT put (100 clients × 500)", "dht", "put_per_s", "/s", "{:.0f}", True, ""),
    ("DHT put p99", "dht", "put_p99_ms", "ms", "{:.1f}", False, ""),
    ("DHT get", "dht", "get_per_s", "/s", "{:.0f}", True, ""),
    ("DHT get p99", "dht", "get_p99_ms", "ms", "{:.1f}", False, ""),
    ("DHT RSS per stored record (50,000)", "dht", "rss_per_record_bytes", "B", "{:.0f}", False, ""),
    ("DHT failures", "dht", "failures", "", "{:.0f}", False, "0"),
    ("Churn 3 × 10 s, 32 workers: cycles/s", "churn", "per_s", "/s", "{:.0f}", True, ""),
    ("Churn: RSS 60 s after", "churn", "rss_after_mib", "MiB", "{:.1f}", False, ""),
    ("Churn: RSS after / idle", "churn", "rss_after_vs_idle", "", "{:.3f}", False, "≤ 1.10"),
    ("Churn: failures", "churn", "failures", "", "{:.0f}", False, "0"),
    *fleet_rows("2000", "2,000"),
    *fleet_rows("20000", "20,000"),
    ("Flood, 400 clients of one host: reserved", "flood", "flood_reserved", "", "{:.0f}", True,
     "≤ 64"),
    ("Flood: honest clients failed (of 50)", "flood", "failures", "", "{:.0f}", True, "0"),
    ("Flood: honest setup p99", "flood", "honest_p99_ms", "ms", "{:.1f}", True, ""),
    ("Identity API (wrk, 16 conns): requests", "wrk", "per_s", "/s", "{:.0f}", True, ""),
    ("Identity API: p99", "wrk", "p99_ms", "ms", "{:.2f}", False, ""),
]


def cell(values, fmt):
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    s = sorted(values)
    if len(s) == 1:
        return fmt.format(s[0])
    return f"{fmt.format(s[0])} / **{fmt.format(statistics.median(s))}** / {fmt.format(s[-1])}"


def table(results):
    ours, theirs, cannot = results["privstack-relay"], results["libp2p-server"], results["cannot"]
    head = ("| | privstack-relay (min / **median** / max) | libp2p-server 0.13.0 | "
            "ratio (median of runs) | target |\n|---|---|---|---|---|")
    out = [head]
    for label, key, field, unit, fmt, higher, target in ROWS:
        a = [r.get(key, {}).get(field) for r in ours]
        if key in cannot:
            b_cell, ratio = f"cannot: {cannot[key]}", ""
        elif key in RUNS_BUT_CANNOT and field not in STILL_SHOWN:
            b_cell, ratio = f"cannot: {RUNS_BUT_CANNOT[key]}", ""
        elif key == "wrk":
            b_cell, ratio = "cannot: no identity API", ""
        else:
            b = [r.get(key, {}).get(field) for r in theirs]
            b_cell = cell(b, fmt)
            per_run = [x / y for x, y in zip(a, b)
                       if x is not None and y not in (None, 0) and field != "failures"]
            ratio = f"{statistics.median(per_run):.2f}" if per_run else ""
        u = f" {unit}" if unit else ""
        out.append(f"| {label} | {cell(a, fmt)}{u} | {b_cell}{u if b_cell[:6] != 'cannot' and b_cell != '—' else ''} "
                   f"| {ratio} | {target} |")
    return "\n".join(out)


def machine():
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) / 2**20
    return f"{os.cpu_count()} × {cpu}, {mem:.0f} GiB, Linux {platform.release()}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="runs of every scenario (default 3)")
    ap.add_argument("--smoke", action="store_true", help="small scale, this relay only")
    ap.add_argument("--write", action="store_true", help="rewrite the table in BENCHMARKS.md")
    ap.add_argument("--only", help="comma-separated scenario names to run (default: all)")
    ap.add_argument("--relay-bin", help="relay binary (default: the release build for this machine)")
    ap.add_argument("--from-results", metavar="JSON",
                    help="print (and with --write, store) the table of a saved run "
                         "(target/bench-results.json) without running anything")
    args = ap.parse_args()
    if args.from_results:
        with open(args.from_results) as f:
            results = json.load(f)
        publish(results, args.write)
        return
    if args.runs < 1:
        sys.exit("compare.py: --runs must be at least 1")
    if os.environ.get("PRIVSTACK_BENCH_PATHS"):
        paths = json.loads(os.environ["PRIVSTACK_BENCH_PATHS"])
    else:
        paths = prepare(args)
        os.environ["PRIVSTACK_BENCH_PATHS"] = json.dumps(paths)
    if not args.smoke:
        # The smoke run starts only this relay, on free ports; no namespace needed.
        enter_namespace()

    if args.smoke:
        failed = []
        for i, (name, gen, extra) in enumerate(SMOKE):
            r = scenario(paths, "privstack-relay", gen, extra, f"127.{10 + i}.0.0")
            log(f"{name}: {json.dumps(r)}")
            # A device that is neither online nor a failure was never started.
            if r.get("failures", -1) != 0 or r.get("online", 0) != r.get("devices", 0):
                failed.append(name)
        if failed:
            sys.exit(f"compare.py --smoke: failures in {', '.join(failed)}")
        log("smoke: every scenario completed without failures")
        return

    only = set(args.only.split(",")) if args.only else None
    results = {"privstack-relay": [], "libp2p-server": [],
               "cannot": {k: v for k, _, _, v in FULL if v is not True}}
    sizes = {k: os.path.getsize(paths[p]) / 2**20
             for k, p in (("privstack-relay", "relay"), ("libp2p-server", "libp2p_server"))}
    started = time.time()
    for n in range(args.runs):
        run_res = {"privstack-relay": {}, "libp2p-server": {}}
        for kind in run_res:
            if only is None or "footprint" in only:
                fp = footprint(paths, kind)
                run_res[kind]["footprint"] = {"ready_ms": fp["ready_ms"],
                                              "rss_idle_mib": fp["rss_idle_kib"] / 1024,
                                              "size_mib": sizes[kind]}
        if only is None or "wrk" in only:
            run_res["privstack-relay"]["wrk"] = wrk(paths)
        for i, (name, gen, extra, other) in enumerate(FULL):
            if only is not None and name not in only:
                continue
            kinds = ["privstack-relay"] + (["libp2p-server"] if other is True else [])
            for kind in kinds:
                log(f"run {n + 1}/{args.runs}: {name} on {kind}")
                r = scenario(paths, kind, gen, extra if kind == "privstack-relay" else [],
                             f"127.{10 + i}.0.0")
                if "rss_at_n_kib" in r:
                    r["rss_at_n_mib"] = r["rss_at_n_kib"] / 1024
                if "rss_after_kib" in r:
                    r["rss_after_mib"] = r["rss_after_kib"] / 1024
                log(f"{name} on {kind}: {json.dumps(r)}")
                run_res[kind][name] = r
        results["privstack-relay"].append(run_res["privstack-relay"])
        results["libp2p-server"].append(run_res["libp2p-server"])
    rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                         stdout=subprocess.PIPE, text=True).stdout.strip()
    results["meta"] = {
        "runs": args.runs, "minutes": (time.time() - started) / 60, "machine": machine(),
        "date": datetime.date.today().isoformat(), "commit": rev,
        "relay": os.path.relpath(paths["relay"], ROOT),
    }
    raw = os.path.join(ROOT, "target", "bench-results.json")
    with open(raw, "w") as f:
        json.dump(results, f, indent=1)
    log(f"raw figures: {raw}")
    publish(results, args.write)


def publish(results, write):
    m = results["meta"]
    doc = (f"Command: `benches/compare.py --runs {m['runs']} --write` "
           f"({m['minutes']:.0f} min). Machine: {m['machine']}. "
           f"Date: {m['date']}. Commit: {m['commit']}. Relay binary: `{m['relay']}`.\n\n"
           + table(results) + "\n")
    print(doc)
    if write:
        path = os.path.join(ROOT, "BENCHMARKS.md")
        with open(path) as f:
            text = f.read()
        if MARK_BEGIN not in text or MARK_END not in text:
            sys.exit(f"compare.py: {path} has no {MARK_BEGIN} ... {MARK_END} section")
        head, rest = text.split(MARK_BEGIN, 1)
        _, tail = rest.split(MARK_END, 1)
        with open(path, "w") as f:
            f.write(f"{head}{MARK_BEGIN}\n{doc}{MARK_END}{tail}")
        log(f"updated {path}")


if __name__ == "__main__":
    main()
