#!/usr/bin/env bash
# Build the appliance images into dist/.
#
#   image/build.sh [VARIANT...]      (default: every file in image/variants/)
#
# Each variant (image/variants/VARIANT.conf) becomes
#   privstack-relay-VERSION-VARIANT.img.xz   (raw disk image, xz-compressed)
#   privstack-relay-VERSION-VARIANT.qcow2    (where the variant says QCOW2=yes)
# with a .sha256 beside each, and DIST/SHA256SUMS is rewritten.
#
# Needs root (mmdebstrap --mode=root), the packages image/deps.sh installs, and the
# relay's Debian package for the variant's architecture in DIST (release/build.sh makes
# it): the relay is installed into the image with dpkg, as on a VPS from the apt
# repository, with that repository preconfigured (its key, and its origin in
# unattended-upgrades' allowed origins), so the daily upgrade run upgrades the relay too.
#
# Environment:
#   DIST      output directory and where the release archives are (default: dist)
#   VERSION   version in the file names (default: Cargo.toml's)
#   MIRROR    Debian mirror (default: http://deb.debian.org/debian)
#   SECURITY_MIRROR  (default: http://deb.debian.org/debian-security)
#   SUITE     Debian release (default: trixie)
#   APT_URL   the relay's apt repository (default: $DEFAULT_APT_URL)
#   APT_KEY   its public key, for signed-by= (default: DIST/apt's, the key that signed
#             the repository release/build.sh made; the release workflow checks that
#             it is release/privstack-relay-archive-keyring.pgp)
#   WORKDIR   scratch space, several GiB (default: a new directory under /var/tmp)
#   KEEP=1    keep the uncompressed .img in DIST (the boot tests use it)
#   JOBS      variants built at once (default 1; more only helps with more than two
#             CPUs: on two, three side by side took as long as one after another)
set -euo pipefail

cd "$(dirname "$0")/.."
SRC=$(pwd)
CARGO_VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
VERSION=${VERSION:-$CARGO_VERSION}
DIST=${DIST:-dist}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
SUITE=${SUITE:-trixie}
DEFAULT_APT_URL=https://privstack.github.io/privstack-relay/apt
APT_URL=${APT_URL:-$DEFAULT_APT_URL}
KEEP=${KEEP:-0}
JOBS=${JOBS:-1}
case "$JOBS" in ''|*[!0-9]*) echo "image/build.sh: JOBS=$JOBS is not a number" >&2; exit 1 ;; esac

die() { echo "image/build.sh: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "must run as root (mmdebstrap --mode=root)"
for tool in mmdebstrap sfdisk mkfs.vfat mcopy mke2fs python3 xz qemu-img; do
    command -v "$tool" >/dev/null || die "$tool not found: run image/deps.sh"
done

if [ $# -eq 0 ]; then
    set -- $(cd image/variants && ls *.conf | sed 's/\.conf$//')
fi
mkdir -p "$DIST"
DIST=$(cd "$DIST" && pwd)
APT_KEY=${APT_KEY:-$DIST/apt/privstack-relay-archive-keyring.pgp}
[ -f "$APT_KEY" ] || die "$APT_KEY not found: run release/build.sh first (or set APT_KEY)"
WORKDIR=${WORKDIR:-$(mktemp -d /var/tmp/privstack-image.XXXXXX)}
mkdir -p "$WORKDIR"

# Packages every image has; the variant adds its kernel and boot loader.
BASE_PACKAGES="systemd systemd-sysv udev dbus systemd-resolved systemd-timesyncd
systemd-repart nftables netbase kmod initramfs-tools zstd iproute2 procps
openssh-server unattended-upgrades ca-certificates"

# Left out of every package, now and on upgrades (the dpkg setting stays in the image):
# documentation, translations, and kernel modules for hardware a relay never has.
DPKG_EXCLUDES="/usr/share/doc/* /usr/share/man/* /usr/share/info/* /usr/share/locale/*
/usr/share/lintian/* /usr/lib/modules/*/kernel/sound/* /usr/lib/modules/*/kernel/drivers/gpu/*
/usr/lib/modules/*/kernel/drivers/media/* /usr/lib/modules/*/kernel/drivers/net/wireless/*
/usr/lib/modules/*/kernel/net/wireless/* /usr/lib/modules/*/kernel/net/mac80211/*
/usr/lib/modules/*/kernel/net/bluetooth/* /usr/lib/modules/*/kernel/drivers/bluetooth/*
/usr/lib/modules/*/kernel/drivers/infiniband/* /usr/lib/modules/*/kernel/drivers/iio/*
/usr/lib/modules/*/kernel/drivers/comedi/* /usr/lib/modules/*/kernel/drivers/staging/*
/usr/lib/modules/*/kernel/drivers/isdn/*"

# A stable UUID per version and variant (identical rebuilds, no random disk IDs).
derived_uuid() {
    local h
    h=$(printf 'privstack-relay %s' "$*" | sha256sum | cut -c1-32)
    echo "${h:0:8}-${h:8:4}-4${h:13:3}-8${h:17:3}-${h:20:12}"
}

build_variant() (
    local variant=$1
    local conf="$SRC/image/variants/$variant.conf"
    [ -f "$conf" ] || die "no variant $variant (image/variants/$variant.conf)"
    # shellcheck source=/dev/null
    . "$conf"
    local name="privstack-relay-$VERSION-$variant"
    local deb="$DIST/privstack-relay_${VERSION}-1_$DEB_ARCH.deb"
    [ -f "$deb" ] || die "$deb not found: run release/build.sh first"

    local work="$WORKDIR/$variant" start=$SECONDS
    rm -rf "$work"
    mkdir -p "$work"
    local root="$work/root"

    export IMAGE_SRC="$SRC" IMAGE_WORK="$work" IMAGE_DEB="$deb" IMAGE_APT_URL="$APT_URL" \
        IMAGE_APT_KEY="$APT_KEY"
    export IMAGE_ROOT_UUID IMAGE_FAT_ID
    IMAGE_ROOT_UUID=$(derived_uuid "$VERSION $variant root")
    IMAGE_FAT_ID=$(printf 'privstack-relay %s %s fat' "$VERSION" "$variant" | sha256sum | cut -c1-8)
    export DEB_ARCH BOOT GRUB_EFI_TARGET GRUB_EFI_NAME FAT_MOUNT FAT_MIB ROOT_TYPE ROOT_LABEL CMDLINE INITRD_MODULES

    local opts=()
    set -f  # the patterns are for dpkg, not for this shell
    for p in $DPKG_EXCLUDES; do opts+=("--dpkgopt=path-exclude=$p"); done
    set +f
    opts+=("--dpkgopt=path-include=/usr/share/locale/locale.alias")

    echo "== $name: root file system ($SUITE, $DEB_ARCH)"
    mmdebstrap --mode=root --variant=minbase --architectures="$DEB_ARCH" \
        --include="$(echo $BASE_PACKAGES $PACKAGES | tr ' ' ',')" \
        "${opts[@]}" \
        --setup-hook="$SRC/image/hooks/setup.sh \"\$1\"" \
        --customize-hook="$SRC/image/hooks/customize.sh \"\$1\"" \
        "$SUITE" "$root" \
        "deb $MIRROR $SUITE ${COMPONENTS:-main}" \
        "deb $MIRROR $SUITE-updates ${COMPONENTS:-main}" \
        "deb $SECURITY_MIRROR $SUITE-security ${COMPONENTS:-main}"

    # Every written copy of the image is a new machine: its machine ID (and with it the
    # DHCP client identity) is made at first boot, which is also what the first-boot
    # unit's ConditionFirstBoot keys on. (After mmdebstrap: its cleanup empties the file.)
    printf 'uninitialized\n' > "$root/etc/machine-id"
    rm -f "$root/var/lib/dbus/machine-id"
    rm -f "$root"/var/cache/apt/archives/*.deb

    echo "== $name: disk"
    "$SRC/image/hooks/assemble.sh" "$root" "$work/$name.img"

    echo "== $name: compress"
    xz -T0 -6 -c "$work/$name.img" > "$DIST/$name.img.xz"
    (cd "$DIST" && sha256sum "$name.img.xz" > "$name.img.xz.sha256")
    if [ "${QCOW2:-no}" = yes ]; then
        qemu-img convert -O qcow2 -c "$work/$name.img" "$DIST/$name.qcow2"
        (cd "$DIST" && sha256sum "$name.qcow2" > "$name.qcow2.sha256")
    fi
    if [ "$KEEP" = 1 ]; then
        mv "$work/$name.img" "$DIST/$name.img"
    fi
    rm -rf "$work"
    echo "== $name: done in $((SECONDS - start)) s"
    ls -l "$DIST/$name".*
)

# With JOBS > 1, variants build side by side, each logging to its own file, shown when
# it ends. (Measured on two CPUs, BENCHMARKS.md: no faster than one after another, as
# qemu-user, the initramfs and xz keep both busy.)
if [ "$JOBS" -le 1 ] || [ $# -le 1 ]; then
    for variant in "$@"; do
        build_variant "$variant"
    done
else
    declare -A pids=()
    failed=""
    for variant in "$@"; do
        while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 2; done
        echo "== $variant: building (log: $WORKDIR/$variant.log)"
        build_variant "$variant" > "$WORKDIR/$variant.log" 2>&1 &
        pids[$variant]=$!
    done
    for variant in "$@"; do
        if wait "${pids[$variant]}"; then
            grep -E '^(== |-rw)' "$WORKDIR/$variant.log" || true
        else
            echo "== $variant: FAILED, its log:" >&2
            tail -n 60 "$WORKDIR/$variant.log" >&2
            failed="$failed $variant"
        fi
        rm -f "$WORKDIR/$variant.log"
    done
    [ -z "$failed" ] || die "failed:$failed"
fi

(cd "$DIST" && find . -maxdepth 1 -type f ! -name SHA256SUMS ! -name '*.sha256' ! -name '*.img' -printf '%P\n' \
    | LC_ALL=C sort | xargs -r sha256sum > SHA256SUMS)
rmdir "$WORKDIR" 2>/dev/null || true
