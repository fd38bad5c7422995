#!/usr/bin/env bash
# Assemble a disk image from a finished root file system, as an unprivileged file
# operation (no mounts, no loop devices):
# partition table by sfdisk on a plain file, the FAT partition made by mkfs.vfat and
# filled with mtools, the root by mke2fs -d, both written into place with dd.
#
#   assemble.sh ROOTDIR IMAGE          (settings from image/build.sh's environment)
#
# GPT layout (grub-* variants):  [BIOS boot 1 MiB, grub-bios-efi only] [ESP] [root]
# The root partition has its architecture's root type, so systemd-repart grows it.
# MBR layout (raspi):  [FAT, the Pi firmware's boot files] [root]
set -euo pipefail
ROOT=$1
IMG=$2
WORK=$(dirname "$IMG")

# Root file system: what is there, plus room for a kernel upgrade and logs until the
# first boot grows it to the whole disk.
used=$(du -s --block-size=1M "$ROOT" | cut -f1)
root_mib=$(( used * 120 / 100 + 256 ))
bios_mib=0
[ "$BOOT" = grub-bios-efi ] && bios_mib=1
fat_start=$(( 1 + bios_mib ))
root_start=$(( fat_start + FAT_MIB ))
total_mib=$(( root_start + root_mib + 1 ))

rm -f "$IMG"
truncate -s "${total_mib}M" "$IMG"
if [ "$BOOT" = raspi ]; then
    # MBR: FAT32 (LBA) boot partition, then Linux.
    {
        echo "label: dos"
        echo "start=${fat_start}MiB, size=${FAT_MIB}MiB, type=c, bootable"
        echo "start=${root_start}MiB, size=${root_mib}MiB, type=83"
    } | sfdisk --quiet --no-reread --no-tell-kernel "$IMG"
else
    {
        echo "label: gpt"
        echo "unit: sectors"
        [ "$bios_mib" -eq 1 ] && echo "start=1MiB, size=1MiB, type=21686148-6E49-704E-6461-6E6F74454649, name=\"bios\""
        echo "start=${fat_start}MiB, size=${FAT_MIB}MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=\"esp\""
        echo "start=${root_start}MiB, size=${root_mib}MiB, type=$ROOT_TYPE, name=\"root\", uuid=$IMAGE_ROOT_UUID"
    } | sfdisk --quiet --no-reread --no-tell-kernel "$IMG"
fi

# FAT: the boot loader, and the files an operator reads or provides.
fat="$WORK/fat.img"
rm -f "$fat"
mkfs.vfat -C -F 32 -s 1 -n PRIVSTACK -i "$IMAGE_FAT_ID" "$fat" $(( FAT_MIB * 1024 )) >/dev/null
export MTOOLS_SKIP_CHECK=1
if [ "$BOOT" = raspi ]; then
    # The Pi firmware's files, kept current on the mounted partition by raspi-firmware.
    mcopy -s -i "$fat" "$ROOT/boot/firmware/"* ::
    rm -rf "${ROOT:?}/boot/firmware/"*
else
    mmd -i "$fat" ::EFI ::EFI/BOOT
    mcopy -i "$fat" "$WORK/$GRUB_EFI_NAME" "::EFI/BOOT/$GRUB_EFI_NAME"
fi
sed 's/$/\r/' "$IMAGE_SRC/image/boot-partition-readme.txt" > "$WORK/README.txt"
mcopy -i "$fat" "$WORK/README.txt" ::PRIVSTACK-README.txt

# ext4 root, owned by root whatever the build user; no lost data on a later e2fsck.
rootfs="$WORK/root.img"
rm -f "$rootfs"
mke2fs -q -F -t ext4 -L "${ROOT_LABEL:-privstack-root}" -U "$IMAGE_ROOT_UUID" -E root_owner=0:0 \
    -d "$ROOT" "$rootfs" "${root_mib}M"

dd if="$fat" of="$IMG" bs=1M seek="$fat_start" conv=notrunc,sparse status=none
dd if="$rootfs" of="$IMG" bs=1M seek="$root_start" conv=notrunc,sparse status=none
rm -f "$fat" "$rootfs"

# Legacy BIOS: GRUB's boot sector in the MBR, its core image in the BIOS boot partition.
if [ "$BOOT" = grub-bios-efi ]; then
    "$IMAGE_SRC/image/hooks/bios-boot.py" "$IMG" "$ROOT/boot/grub/i386-pc/boot.img" \
        "$ROOT/boot/grub/i386-pc/core.img"
fi
