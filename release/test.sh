#!/usr/bin/env bash
# Acceptance tests for the release artifacts (run by .ci/run after release/build.sh):
#   - each binary is static, stripped, for the right machine
#   - the x86_64 binary runs natively and the aarch64 one under qemu-user: both serve
#     the identity API and pass the x86_64 binary's probe (a real QUIC dial, identify
#     and relay reservation)
#   - archive names, contents and checksums
#   - the Debian packages: fields, contents, modes, the same binary, conffile, lintian
#     without errors; the apt repository's signatures verify with its key and apt
#     itself (a private apt root, nothing of the host's apt touched) reads, trusts and
#     downloads from it
#   - a second build of the same commit from another directory is byte-identical
#     (archive and .deb)
#   - install.sh --root places every file with the right modes; a second run changes
#     nothing
#   - the systemd unit verifies and its exposure score is under 2.0
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$(pwd)
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
DIST=${DIST:-$SRC/dist}
TARGET_DIR=${CARGO_TARGET_DIR:-$SRC/target}
X86=x86_64-unknown-linux-musl
ARM=aarch64-unknown-linux-musl
PROBE="$TARGET_DIR/$X86/release/privstack-relay"

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

fail() { echo "FAIL: $*" >&2; exit 1; }
pass() { echo "ok: $*"; }

free_port() { # $1 = udp|tcp
    python3 - "$1" <<'EOF'
import socket, sys
kind = socket.SOCK_DGRAM if sys.argv[1] == "udp" else socket.SOCK_STREAM
while True:
    s = socket.socket(socket.AF_INET, kind); s.bind(("0.0.0.0", 0)); port = s.getsockname()[1]
    t = socket.socket(socket.AF_INET6, kind)
    t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        t.bind(("::", port)); break
    except OSError:
        pass
    finally:
        s.close(); t.close()
print(port)
EOF
}

# --- binaries -------------------------------------------------------------------
for t in $X86 $ARM; do
    bin="$TARGET_DIR/$t/release/privstack-relay"
    info=$(file -b "$bin")
    echo "$t: $info"
    case "$info" in *"statically linked"*|*"static-pie linked"*) ;; *) fail "$t binary is not static" ;; esac
    case "$info" in *stripped*) ;; *) fail "$t binary is not stripped" ;; esac
    case "$info" in *"not stripped"*) fail "$t binary is not stripped" ;; esac
    case "$t" in
        x86_64*) [[ "$info" == *x86-64* ]] || fail "$t binary is not x86-64" ;;
        aarch64*) [[ "$info" == *aarch64* ]] || fail "$t binary is not aarch64" ;;
    esac
    readelf -lW "$bin" | grep -q 'program interpreter' && fail "$t binary has a program interpreter"
    pass "$t binary is static, stripped, right machine ($(stat -c %s "$bin") bytes)"
done

# --- smoke: run each binary, query it, probe it ---------------------------------
smoke() { # $1 = target, $2... = runner prefix
    local t=$1; shift
    local bin="$TARGET_DIR/$t/release/privstack-relay"
    local quic http dir pid peer api_peer
    quic=$(free_port udp); http=$(free_port tcp)
    dir="$WORK/smoke-$t"; mkdir -p "$dir"
    "$@" "$bin" --version | grep -q "target: $t" || fail "$t --version does not name its target"
    "$@" "$bin" --version | grep -q "allocator: jemalloc" || fail "$t --version does not name jemalloc"
    "$@" "$bin" --port "$quic" --http-port "$http" --metrics-address 127.0.0.1:0 \
        --identity "$dir/key" >"$dir/out" 2>"$dir/err" &
    pid=$!; PIDS+=("$pid")
    for _ in $(seq 1 600); do
        grep -q '^  PeerId: ' "$dir/out" && break
        kill -0 "$pid" 2>/dev/null || { cat "$dir/err"; fail "$t relay exited"; }
        sleep 0.1
    done
    peer=$(sed -n 's/^  PeerId: //p' "$dir/out")
    [ -n "$peer" ] || { cat "$dir/err"; fail "$t relay printed no PeerId"; }
    api_peer=$(curl -fsS --max-time 10 "http://127.0.0.1:$http/api/v1/identity" \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["peer_id"])')
    [ "$api_peer" = "$peer" ] || fail "$t identity API peer $api_peer != banner $peer"
    "$PROBE" probe --timeout 20 "http://127.0.0.1:$http" >"$dir/probe" 2>&1 \
        || { cat "$dir/probe" "$dir/err"; fail "$t probe failed"; }
    grep -q "peer $peer" "$dir/probe" || fail "$t probe saw another peer"
    grep -q "reservation   ok" "$dir/probe" || fail "$t probe took no reservation"
    kill -TERM "$pid"
    local status=0
    wait "$pid" || status=$?
    [ "$status" -eq 0 ] || fail "$t relay exited $status on SIGTERM"
    pass "$t relay ${*:+under $* }serves the identity API and passes probe (peer $peer)"
}
smoke $X86
QEMU=$(command -v qemu-aarch64-static || command -v qemu-aarch64 || true)
[ -n "$QEMU" ] || fail "qemu-aarch64-static not installed"
smoke $ARM "$QEMU"

# --- archives -------------------------------------------------------------------
(cd "$DIST" && sha256sum -c --quiet SHA256SUMS) || fail "SHA256SUMS does not verify"
for t in $X86 $ARM; do
    name="privstack-relay-$VERSION-$t"
    [ -f "$DIST/$name.tar.gz" ] || fail "missing $name.tar.gz"
    (cd "$DIST" && sha256sum -c --quiet "$name.tar.gz.sha256") || fail "$name.tar.gz.sha256 does not verify"
    grep -q " $name.tar.gz\$" "$DIST/SHA256SUMS" || fail "$name.tar.gz not in SHA256SUMS"
    listing=$(tar -tvzf "$DIST/$name.tar.gz")
    expected="$name/
$name/LICENSE
$name/README.md
$name/install.sh
$name/privstack-relay
$name/privstack-relay-archive-keyring.pgp
$name/systemd/
$name/systemd/privstack-relay.service
$name/systemd/privstack-relay.sysusers
$name/systemd/privstack-relay.tmpfiles
$name/systemd/relay.env"
    [ "$(tar -tzf "$DIST/$name.tar.gz")" = "$expected" ] || { echo "$listing"; fail "$name contents"; }
    echo "$listing" | awk '{print $2}' | grep -qvE '^(0/0|root/root)$' && fail "$name has non-root owners"
    echo "$listing" | grep -q -- '-rwxr-xr-x .* '"$name/privstack-relay\$" || fail "$name binary mode"
    tar -xzf "$DIST/$name.tar.gz" -C "$WORK"
    cmp -s "$WORK/$name/privstack-relay" "$TARGET_DIR/$t/release/privstack-relay" || fail "$name binary differs"
    pass "$name.tar.gz: names, contents, owners, modes, checksums"
done

# --- Debian packages --------------------------------------------------------------
for t in $X86 $ARM; do
    case "$t" in x86_64*) arch=amd64 ;; aarch64*) arch=arm64 ;; esac
    name="privstack-relay_${VERSION}-1_$arch.deb"
    deb="$DIST/$name"
    [ -f "$deb" ] || fail "missing $name"
    grep -q " $name\$" "$DIST/SHA256SUMS" || fail "$name not in SHA256SUMS"
    [ "$(dpkg-deb -f "$deb" Package Version Architecture)" = "Package: privstack-relay
Version: ${VERSION}-1
Architecture: $arch" ] || fail "$name control fields: $(dpkg-deb -f "$deb" Package Version Architecture)"
    files=$(dpkg-deb -c "$deb" | awk '$6 !~ /\/$/ { print $1, $2, $6 }')
    expected="-rw-r--r-- root/root ./etc/privstack-relay/relay.env
-rwxr-xr-x root/root ./usr/bin/privstack-relay
-rw-r--r-- root/root ./usr/lib/sysctl.d/60-privstack-relay.conf
-rw-r--r-- root/root ./usr/lib/systemd/system/privstack-relay.service
-rw-r--r-- root/root ./usr/lib/sysusers.d/privstack-relay.conf
-rw-r--r-- root/root ./usr/lib/tmpfiles.d/privstack-relay.conf
-rw-r--r-- root/root ./usr/share/doc/privstack-relay/README.md.gz
-rw-r--r-- root/root ./usr/share/doc/privstack-relay/changelog.Debian.gz
-rw-r--r-- root/root ./usr/share/doc/privstack-relay/copyright
-rw-r--r-- root/root ./usr/share/lintian/overrides/privstack-relay"
    [ "$files" = "$expected" ] || { diff <(echo "$expected") <(echo "$files") || true; fail "$name contents"; }
    dpkg-deb --fsys-tarfile "$deb" | tar -xOf - ./usr/bin/privstack-relay \
        | cmp -s - "$TARGET_DIR/$t/release/privstack-relay" || fail "$name holds another binary"
    dpkg-deb --fsys-tarfile "$deb" | tar -xOf - ./usr/lib/systemd/system/privstack-relay.service \
        | grep -x 'ExecStart=/usr/bin/privstack-relay --identity /var/lib/privstack/relay-identity.key' >/dev/null \
        || fail "$name: the unit does not start /usr/bin/privstack-relay"
    mkdir -p "$WORK/ctrl-$arch"
    dpkg-deb -e "$deb" "$WORK/ctrl-$arch"
    [ "$(cat "$WORK/ctrl-$arch/conffiles")" = /etc/privstack-relay/relay.env ] || fail "$name conffiles"
    for script in postinst prerm postrm; do
        sh -n "$WORK/ctrl-$arch/$script" || fail "$name: $script does not parse"
    done
    # lintian: no errors (the one warning left, no-manual-page, is in the README).
    lintian --fail-on error --tag-display-limit 0 "$deb" >"$WORK/lintian-$arch" 2>&1 \
        || { cat "$WORK/lintian-$arch"; fail "lintian reports errors for $name"; }
    pass "$name: fields, contents, modes, the release binary, conffile, lintian ($(grep -c '^W:' "$WORK/lintian-$arch") warnings)"
done

# --- the apt repository: signatures, indexes, and apt itself reading it --------------
APT="$DIST/apt"
KEYRING="$APT/privstack-relay-archive-keyring.pgp"
for f in dists/stable/InRelease dists/stable/Release dists/stable/Release.gpg "${KEYRING#"$APT/"}"; do
    [ -f "$APT/$f" ] || fail "apt repository: missing $f"
done
gpgv --keyring "$KEYRING" "$APT/dists/stable/InRelease" 2>/dev/null || fail "InRelease does not verify"
gpgv --keyring "$KEYRING" "$APT/dists/stable/Release.gpg" "$APT/dists/stable/Release" 2>/dev/null \
    || fail "Release.gpg does not verify"
grep -q '^Origin: PrivStack$' "$APT/dists/stable/Release" && grep -q '^Label: privstack-relay$' "$APT/dists/stable/Release" \
    || fail "Release lacks the Origin/Label unattended-upgrades matches"
aptroot="$WORK/aptroot"
mkdir -p "$aptroot/etc/apt/sources.list.d" "$aptroot/etc/apt/preferences.d" \
    "$aptroot/var/lib/apt/lists/partial" "$aptroot/var/cache/apt/archives/partial" "$aptroot/var/lib/dpkg"
: > "$aptroot/var/lib/dpkg/status"
for arch in amd64 arm64; do
    cat > "$aptroot/etc/apt/sources.list" <<SOURCES
deb [arch=$arch signed-by=$KEYRING] file:$APT stable main
SOURCES
    aptopts=(-o "Dir=$aptroot" -o "Dir::State::status=$aptroot/var/lib/dpkg/status"
             -o "APT::Architecture=$arch" -o "APT::Architectures=$arch" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root"
             -o "Dir::Etc::trusted=/dev/null" -o "Dir::Etc::trustedparts=$aptroot/none")
    rm -rf "$aptroot/var/lib/apt/lists/"*_* "$aptroot/var/cache/apt/archives/"*.deb
    apt-get "${aptopts[@]}" -q update >"$WORK/apt-$arch" 2>&1 || { cat "$WORK/apt-$arch"; fail "apt-get update ($arch)"; }
    grep -qiE '^(W|E):' "$WORK/apt-$arch" && { cat "$WORK/apt-$arch"; fail "apt-get update ($arch) warned"; }
    cand=$(apt-cache "${aptopts[@]}" policy privstack-relay | sed -n 's/^  Candidate: //p')
    [ "$cand" = "${VERSION}-1" ] || fail "apt sees privstack-relay $cand for $arch, not ${VERSION}-1"
    (cd "$aptroot/var/cache/apt/archives" && apt-get "${aptopts[@]}" -q download privstack-relay >"$WORK/apt-dl-$arch" 2>&1) \
        || { cat "$WORK/apt-dl-$arch"; fail "apt-get download ($arch)"; }
    cmp -s "$aptroot/var/cache/apt/archives/privstack-relay_${VERSION}-1_$arch.deb" "$DIST/privstack-relay_${VERSION}-1_$arch.deb" \
        || fail "apt downloaded another $arch package"
done
pass "apt repository: InRelease and Release.gpg verify with its key; apt-get update, policy and download ($VERSION-1, amd64 and arm64)"

# --- reproducibility: the same commit built again from another directory ----------
if [ "${SKIP_REPRO:-0}" != 1 ]; then
    git clone -q "$SRC" "$WORK/elsewhere"
    (cd "$WORK/elsewhere" && CARGO_TARGET_DIR="$TARGET_DIR" DIST="$WORK/dist2" TARGETS=$X86 \
        BUILDER=native release/build.sh "$VERSION" >"$WORK/repro.log" 2>&1) \
        || { tail -30 "$WORK/repro.log"; fail "second build failed"; }
    name="privstack-relay-$VERSION-$X86.tar.gz"
    cmp "$DIST/$name" "$WORK/dist2/$name" || fail "$name is not reproducible"
    deb="privstack-relay_${VERSION}-1_amd64.deb"
    cmp "$DIST/$deb" "$WORK/dist2/$deb" || fail "$deb is not reproducible"
    pass "$name and $deb are byte-identical when rebuilt from $WORK/elsewhere"
fi

# --- install.sh --root ----------------------------------------------------------
name="privstack-relay-$VERSION-$ARM"
root="$WORK/root"
"$WORK/$name/install.sh" --root "$root" >"$WORK/install1" || fail "install.sh --root failed"
check_mode() { # path mode
    [ -e "$root$1" ] || fail "install.sh did not create $1"
    [ "$(stat -c %a "$root$1")" = "$2" ] || fail "$1 has mode $(stat -c %a "$root$1"), expected $2"
}
check_mode /usr/local/bin/privstack-relay 755
check_mode /etc/systemd/system/privstack-relay.service 644
check_mode /etc/privstack-relay/relay.env 644
check_mode /etc/sysusers.d/privstack-relay.conf 644
check_mode /etc/tmpfiles.d/privstack-relay.conf 644
check_mode /var/lib/privstack 750
[ -L "$root/etc/systemd/system/multi-user.target.wants/privstack-relay.service" ] || fail "service not enabled"
grep -q '^privstack:' "$root/etc/passwd" || fail "no privstack user in $root/etc/passwd"
uid=$(awk -F: '$1 == "privstack" { print $3 }' "$root/etc/passwd")
[ "$(stat -c %u "$root/var/lib/privstack")" = "$uid" ] || fail "/var/lib/privstack not owned by privstack"
before=$(cd "$root" && find . -printf '%p %m %U %G %s %T@\n' | sort)
"$WORK/$name/install.sh" --root "$root" >"$WORK/install2" || fail "second install.sh --root failed"
after=$(cd "$root" && find . -printf '%p %m %U %G %s %T@\n' | sort)
[ "$before" = "$after" ] || { diff <(echo "$before") <(echo "$after"); fail "second install changed the tree"; }
grep -q "nothing changed" "$WORK/install2" || fail "second install did not report 'nothing changed'"
pass "install.sh --root: files, modes, user, state directory; second run changes nothing"

# A wrong-architecture package is refused before anything is touched.
if [ "$(uname -m)" = x86_64 ]; then
    out=$("$WORK/$name/install.sh" 2>&1) && fail "aarch64 install.sh ran on x86_64"
    echo "$out" | grep -q "this package is for aarch64 but this machine is x86_64" || fail "unclear refusal: $out"
    pass "install.sh refuses a package for another architecture"
fi

# --- systemd unit ---------------------------------------------------------------
if command -v systemd-analyze >/dev/null; then
    # Verified against the host's units, pointing at the binary installed above.
    sed "s#/usr/local/bin/privstack-relay#$root/usr/local/bin/privstack-relay#" \
        systemd/privstack-relay.service >"$WORK/privstack-relay.service"
    SYSTEMD_LOG_LEVEL=warning systemd-analyze verify "$WORK/privstack-relay.service" \
        2>"$WORK/verify" || true
    if grep -v -e 'Failed to .*cgroup' -e '^$' "$WORK/verify" | grep -q .; then
        cat "$WORK/verify"; fail "systemd-analyze verify"
    fi
    score=$(systemd-analyze security --offline=true --root="$root" \
        /etc/systemd/system/privstack-relay.service 2>/dev/null \
        | sed -n 's/.*Overall exposure level for privstack-relay.service: \([0-9.]*\).*/\1/p')
    [ -n "$score" ] || fail "no exposure score"
    python3 -c "import sys; sys.exit(0 if float('$score') < 2.0 else 1)" || fail "exposure $score >= 2.0"
    pass "systemd unit verifies; exposure level $score"
fi

echo "release tests passed"
