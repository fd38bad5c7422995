#!/bin/sh
# mmdebstrap setup hook: initramfs settings, in place before the kernel package
# builds the first initramfs. MODULES=list with the variant's short list keeps the
# initramfs small and, for arm64 built under qemu-user, the build minutes instead of
# tens of minutes; everything else loads from the root file system.
set -eu
ROOT=$1
mkdir -p "$ROOT/etc/initramfs-tools/conf.d"
cat > "$ROOT/etc/initramfs-tools/conf.d/privstack-relay.conf" <<CONF
MODULES=list
COMPRESS=zstd
CONF
mkdir -p "$ROOT/usr/share/initramfs-tools/modules.d"
echo "$INITRD_MODULES" | tr ' ' '\n' > "$ROOT/usr/share/initramfs-tools/modules.d/privstack-relay"
