#!/usr/bin/env python3
"""Footprint of the release binary: size, exec-to-ready time, idle RSS.

Usage: benches/footprint.py [BINARY] [RUNS]   (default target/release/privstack-relay, 10)

Exec-to-ready is measured as systemd sees it: from exec until the relay sends READY=1
on $NOTIFY_SOCKET (both listeners bound, existing key). Idle RSS is VmRSS two seconds
after READY with no peers. Prints min / median / max over RUNS.
"""
import os, signal, socket, statistics, subprocess, sys, tempfile, time, urllib.request

binary = sys.argv[1] if len(sys.argv) > 1 else "target/release/privstack-relay"
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 10


def free_port(kind):
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("0.0.0.0", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss_kib(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


with tempfile.TemporaryDirectory() as tmp:
    key = os.path.join(tmp, "relay-identity.key")
    subprocess.run([binary, "keygen", "--identity", key], check=True, capture_output=True)
    ready_ms, rss, hwm = [], [], []
    for _ in range(runs):
        sock_path = os.path.join(tmp, "notify.sock")
        if os.path.exists(sock_path):
            os.unlink(sock_path)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(sock_path)
        notify.settimeout(10)
        http = free_port(socket.SOCK_STREAM)
        env = dict(os.environ, NOTIFY_SOCKET=sock_path)
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [binary, "--port", str(free_port(socket.SOCK_DGRAM)), "--http-port", str(http),
             "--metrics-address", "127.0.0.1:0", "--identity", key],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            msg = notify.recv(64)
            ready_ms.append((time.perf_counter() - t0) * 1000)
            assert msg == b"READY=1", msg
            urllib.request.urlopen(f"http://127.0.0.1:{http}/api/v1/identity", timeout=5).read()
            time.sleep(2)
            rss.append(rss_kib(proc.pid))
            hwm.append(rss_kib(proc.pid, "VmHWM"))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
            notify.close()


def row(name, values, unit, fmt="{:.1f}"):
    values = sorted(values)
    print(f"{name:<28} {fmt.format(values[0]):>8} {fmt.format(statistics.median(values)):>8} "
          f"{fmt.format(values[-1]):>8}  {unit}")


print(f"binary: {binary}")
print(f"size: {os.path.getsize(binary)} bytes ({os.path.getsize(binary) / 2**20:.2f} MiB)")
print(f"runs: {runs}")
print(f"{'':<28} {'min':>8} {'median':>8} {'max':>8}")
row("exec to READY=1", ready_ms, "ms")
row("idle RSS (VmRSS)", [r / 1024 for r in rss], "MiB", "{:.2f}")
row("peak RSS (VmHWM)", [r / 1024 for r in hwm], "MiB", "{:.2f}")
