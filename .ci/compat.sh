#!/usr/bin/env bash
# The two foreign clients of compat/ against a running relay binary: a PrivStack-style
# device on rust-libp2p 0.56 (what shipped devices run) and three js-libp2p devices
# (QUIC from npm). The tests' own clients are rust-libp2p 0.57; these keep the relay's
# QUIC transport honest against the other implementations its users run.
#
#   .ci/compat.sh RELAY_BINARY
#
# The relay runs on free ports on this machine with a throw-away key; every client
# dials it on 127.0.0.1. Exit status 1 names the client that failed.
set -euo pipefail
cd "$(dirname "$0")/.."
relay_bin=${1:?usage: .ci/compat.sh RELAY_BINARY}
[ -x "$relay_bin" ] || { echo "compat.sh: $relay_bin is not an executable file" >&2; exit 1; }

# Built before the relay starts, so its idle timers do not run during a compile.
cargo build --locked --manifest-path compat/rust-libp2p-0.56/Cargo.toml --target-dir target
# `npm install`, not `npm ci`: the lock file lists only this platform's QUIC binary.
npm install --silent --no-audit --no-fund --prefix compat/js-libp2p

tmp=$(mktemp -d)
relay_pid=""
cleanup() {
    if [ -n "$relay_pid" ]; then
        kill "$relay_pid" 2>/dev/null || true
        wait "$relay_pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

"$relay_bin" --port 0 --http-port 0 --metrics-address none --identity "$tmp/key" \
    > "$tmp/out" 2> "$tmp/log" &
relay_pid=$!
peer="" port=""
for _ in $(seq 100); do
    peer=$(sed -n 's/^  PeerId: //p' "$tmp/out")
    # The IPv4 listener's socket address, "  QUIC: 0.0.0.0:<port>".
    port=$(sed -n 's/^  QUIC: [0-9.]*:\([0-9]*\)$/\1/p' "$tmp/out" | head -n 1)
    [ -n "$peer" ] && [ -n "$port" ] && break
    kill -0 "$relay_pid" 2>/dev/null || { cat "$tmp/log" >&2; echo "compat.sh: the relay exited" >&2; exit 1; }
    sleep 0.1
done
if [ -z "$peer" ] || [ -z "$port" ]; then
    cat "$tmp/out" "$tmp/log" >&2
    echo "compat.sh: the relay printed no peer ID and IPv4 QUIC port within 10 s" >&2
    exit 1
fi
addr="/ip4/127.0.0.1/udp/$port/quic-v1/p2p/$peer"
echo "relay: $addr"

failed=""
echo "== rust-libp2p 0.56"
target/debug/privstack-relay-compat-0-56 "$addr" || failed="$failed rust-libp2p-0.56"
echo "== js-libp2p"
node compat/js-libp2p/device.mjs "$addr" || failed="$failed js-libp2p"
if ! kill -0 "$relay_pid" 2>/dev/null; then
    cat "$tmp/log" >&2
    failed="$failed (and the relay exited)"
fi
if [ -n "$failed" ]; then
    echo "compat.sh: failed:$failed" >&2
    exit 1
fi
echo "compat.sh: every client passed"
