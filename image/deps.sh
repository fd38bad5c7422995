#!/usr/bin/env bash
# Install what image/build.sh and image/test.py need on a Debian or Ubuntu host, and
# let the host run arm64 programs (mmdebstrap runs the arm64 image's maintainer
# scripts through qemu-user). Idempotent; run as root.
#
# On Debian 12 (bookworm) qemu comes from bookworm-backports (10.x): bookworm's own
# 7.2 conflicts with the backported qemu-utils 10 that CI machines already have.
# Elsewhere (trixie, Ubuntu 24.04 on GitHub's runners) the release's own qemu is used.
set -euo pipefail
[ "$(id -u)" -eq 0 ] || { echo "image/deps.sh: run as root" >&2; exit 1; }

BACKPORTS=/etc/apt/sources.list.d/bookworm-backports.sources
QEMU_PKGS="qemu-system-x86 qemu-system-arm qemu-efi-aarch64 ovmf qemu-user-static qemu-utils"
# Every tool image/build.sh, its hooks and image/test.py call, by package (the check at
# the end names any that is still missing). Installed without Recommends, so what
# mmdebstrap only recommends but needs here is listed: arch-test (foreign-architecture
# root file systems), gpg (it reads the archive keyring to sign-check the mirror).
PKGS="mmdebstrap arch-test gpg debian-archive-keyring dosfstools mtools fdisk e2fsprogs
xz-utils openssh-client python3 curl coreutils tar gzip util-linux"
. /etc/os-release
BACKPORTS_SUITE=""
[ "${VERSION_CODENAME:-}" = bookworm ] && BACKPORTS_SUITE=bookworm-backports

missing() {
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || echo "$p"
    done
}
need_qemu=$(missing $QEMU_PKGS)
need=$(missing $PKGS)
if [ -n "$need_qemu$need" ]; then
    if [ -n "$BACKPORTS_SUITE" ] && [ ! -f "$BACKPORTS" ]; then
        cat > "$BACKPORTS" <<SOURCES
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
    fi
    apt-get update -q
    export DEBIAN_FRONTEND=noninteractive
    if [ -n "$need_qemu" ]; then
        apt-get install -y -q --no-install-recommends ${BACKPORTS_SUITE:+-t $BACKPORTS_SUITE} $need_qemu
    fi
    [ -z "$need" ] || apt-get install -y -q --no-install-recommends $need
fi

# arm64 binaries through qemu-user: binfmt_misc mounted, qemu-aarch64 registered with
# the F flag (the interpreter is opened now, so it works inside chroots).
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    conf=$(ls /usr/lib/binfmt.d/qemu-aarch64.conf /usr/lib/binfmt.d/qemu-aarch64-static.conf 2>/dev/null | head -n1 || true)
    [ -n "$conf" ] || { echo "image/deps.sh: no qemu-aarch64 binfmt definition" >&2; exit 1; }
    grep -v '^#' "$conf" > /proc/sys/fs/binfmt_misc/register
fi
# Check what was installed, not what was asked for: a package that installs without the
# command (renamed, split) fails here, not in the middle of an image build.
absent=""
for cmd in mmdebstrap arch-test gpg sfdisk mkfs.vfat mcopy mmd mtype mke2fs xz qemu-img \
    qemu-system-x86_64 qemu-system-aarch64 qemu-aarch64-static ssh ssh-keygen python3 curl chroot; do
    command -v "$cmd" >/dev/null 2>&1 || absent="$absent $cmd"
done
for f in /usr/share/OVMF/OVMF_CODE_4M.fd /usr/share/OVMF/OVMF_VARS_4M.fd \
    /usr/share/AAVMF/AAVMF_CODE.fd /usr/share/AAVMF/AAVMF_VARS.fd; do
    [ -e "$f" ] || absent="$absent $f"
done
[ -z "$absent" ] || { echo "image/deps.sh: still missing after install:$absent" >&2; exit 1; }
echo "image/deps.sh: ready (qemu $(qemu-system-x86_64 --version | head -n1 | awk '{print $4}'), mmdebstrap $(mmdebstrap --version | awk '{print $2}'))"
