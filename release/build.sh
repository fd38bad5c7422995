#!/usr/bin/env bash
# Build the release artifacts into dist/, the same way by hand and in CI.
#
#   release/build.sh [VERSION]
#
# VERSION defaults to the version in Cargo.toml. Environment:
#   TARGETS   space-separated target triples
#             (default: x86_64-unknown-linux-musl aarch64-unknown-linux-musl)
#   BUILDER   cross | native | prebuilt   (default: cross when a Docker engine answers,
#             else native). native uses Debian's musl-tools (x86_64) and
#             gcc-aarch64-linux-gnu (aarch64); prebuilt packages binaries already in
#             target/<triple>/release (the release workflow builds them with cross).
#   DIST      output directory (default: dist)
#   CARGO_TARGET_DIR  as for cargo (default: target)
#   IMAGES    yes: also build the appliance images from the new archives
#             (image/build.sh; needs root and image/deps.sh's tools; default: no)
#
# Output per target: privstack-relay-VERSION-TARGET.tar.gz and a .sha256 beside it,
# and the Debian package privstack-relay_VERSION-1_ARCH.deb (release/deb.sh); one
# SHA256SUMS for everything in DIST; DIST/apt, the signed apt repository of the
# packages (release/apt-repo.sh: APT_SIGNING_KEY or APT_SIGNING_FINGERPRINT name the
# key, else a throw-away test key signs it). APT=no skips the repository (the release
# workflow makes it once from every architecture's package). Builds are reproducible: SOURCE_DATE_EPOCH
# comes from the commit, paths are remapped out of the binary, and the archives have
# sorted entries, fixed owners, modes and mtimes.
set -euo pipefail

cd "$(dirname "$0")/.."
SRC=$(pwd)

CARGO_VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
VERSION=${1:-$CARGO_VERSION}
TARGETS=${TARGETS:-x86_64-unknown-linux-musl aarch64-unknown-linux-musl}
DIST=${DIST:-dist}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}

if [ -z "${BUILDER:-}" ]; then
    if command -v cross >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        BUILDER=cross
    else
        BUILDER=native
    fi
fi

if git rev-parse --git-dir >/dev/null 2>&1; then
    SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}
    PRIVSTACK_GIT_REV=${PRIVSTACK_GIT_REV:-$(git rev-parse --short=12 HEAD)}
fi
: "${SOURCE_DATE_EPOCH:?not a git checkout: set SOURCE_DATE_EPOCH}"
export SOURCE_DATE_EPOCH PRIVSTACK_GIT_REV

# No build path or home directory may leak into the binary.
REMAP="--remap-path-prefix=$SRC=/build/privstack-relay --remap-path-prefix=$CARGO_HOME=/cargo"
export RUSTFLAGS="${RUSTFLAGS:-} $REMAP"
CREMAP="-ffile-prefix-map=$SRC=/build/privstack-relay -ffile-prefix-map=$CARGO_HOME=/cargo"

# One cargo invocation for every native target: each release build ends in a fat-LTO
# link on one codegen unit, which is single-threaded, so building the targets together
# lets one's link run beside the other's compilation instead of after it.
native_env() {
    local target=$1 tvar=${1//-/_}
    case "$target" in
        x86_64-unknown-linux-musl)
            export "CC_$tvar=musl-gcc" "AR_$tvar=ar"
            ;;
        aarch64-unknown-linux-musl)
            export "CC_$tvar=aarch64-linux-gnu-gcc" "AR_$tvar=aarch64-linux-gnu-ar"
            export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=aarch64-linux-gnu-gcc
            ;;
        *) echo "build.sh: no native recipe for $target" >&2; exit 1 ;;
    esac
    export "CFLAGS_$tvar=$CREMAP"
}

build_all() {
    case "$BUILDER" in
        cross)
            for target in $TARGETS; do
                echo "== $target (cross)"
                cross build --release --locked --target "$target"
            done
            ;;
        native)
            local args=()
            for target in $TARGETS; do
                native_env "$target"
                args+=(--target "$target")
            done
            echo "== $TARGETS (native)"
            cargo build --release --locked "${args[@]}"
            ;;
        prebuilt) ;;
        *) echo "build.sh: unknown BUILDER=$BUILDER" >&2; exit 1 ;;
    esac
}

# Refuse to ship a binary that is not what it claims to be.
check_binary() {
    local bin=$1 target=$2 machine
    case "$target" in
        x86_64-*) machine="Advanced Micro Devices X86-64" ;;
        aarch64-*) machine="AArch64" ;;
    esac
    if readelf -lW "$bin" | grep -q 'Requesting program interpreter'; then
        echo "build.sh: $bin is dynamically linked" >&2; exit 1
    fi
    if readelf -dW "$bin" 2>/dev/null | grep -q NEEDED; then
        echo "build.sh: $bin needs shared libraries" >&2; exit 1
    fi
    if ! readelf -hW "$bin" | grep -q "Machine: *$machine"; then
        echo "build.sh: $bin is not a $target binary" >&2; exit 1
    fi
    if readelf -SW "$bin" | grep -q '\.symtab'; then
        echo "build.sh: $bin is not stripped" >&2; exit 1
    fi
}

package() {
    local target=$1 name="privstack-relay-$VERSION-$1"
    local stage
    stage=$(mktemp -d)
    mkdir -p "$stage/$name/systemd"
    install -m 755 "$TARGET_DIR/$target/release/privstack-relay" "$stage/$name/privstack-relay"
    install -m 755 release/install.sh "$stage/$name/install.sh"
    install -m 644 README.md LICENSE release/privstack-relay-archive-keyring.pgp "$stage/$name/"
    install -m 644 systemd/privstack-relay.service systemd/relay.env \
        systemd/privstack-relay.sysusers systemd/privstack-relay.tmpfiles "$stage/$name/systemd/"
    find "$stage" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
    tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" \
        --format=gnu -C "$stage" -cf - "$name" | gzip -n -9 > "$DIST/$name.tar.gz"
    rm -rf "$stage"
    (cd "$DIST" && sha256sum "$name.tar.gz" > "$name.tar.gz.sha256")
    echo "$DIST/$name.tar.gz"
    release/deb.sh "$TARGET_DIR/$target/release/privstack-relay" "$(deb_arch "$target")" \
        "$VERSION" "$DIST"
}

deb_arch() {
    case "$1" in
        x86_64-*) echo amd64 ;;
        aarch64-*) echo arm64 ;;
        *) echo "build.sh: no Debian architecture for $1" >&2; exit 1 ;;
    esac
}

mkdir -p "$DIST"
DIST=$(cd "$DIST" && pwd)
build_all
for target in $TARGETS; do
    check_binary "$TARGET_DIR/$target/release/privstack-relay" "$target"
    package "$target"
done

if [ "${APT:-yes}" = yes ]; then
    debs=()
    for target in $TARGETS; do
        debs+=("$DIST/privstack-relay_${VERSION}-${DEB_REVISION:-1}_$(deb_arch "$target").deb")
    done
    release/apt-repo.sh "$DIST/apt" "${debs[@]}"
fi

if [ "${IMAGES:-no}" = yes ]; then
    DIST="$DIST" VERSION="$VERSION" image/build.sh
fi

# One checksum file for everything in DIST (images included when present).
(cd "$DIST" && find . -maxdepth 1 -type f ! -name SHA256SUMS ! -name '*.sha256' ! -name '*.img' -printf '%P\n' \
    | LC_ALL=C sort | xargs -r sha256sum > SHA256SUMS)
echo "== $DIST/SHA256SUMS"
cat "$DIST/SHA256SUMS"
