#!/bin/sh
# mmdebstrap customize hook: turns the Debian root file system into the appliance.
# Runs on the build host with the image's root as $1 (commands inside it through
# chroot); settings come from image/build.sh's environment.
set -eu
ROOT=$1
in_root() { chroot "$ROOT" "$@"; }

# The appliance's own files.
cp -r --preserve=mode "$IMAGE_SRC/image/rootfs/." "$ROOT/"
if [ -d "$IMAGE_SRC/image/rootfs-$BOOT" ]; then
    cp -r --preserve=mode "$IMAGE_SRC/image/rootfs-$BOOT/." "$ROOT/"
fi

# The relay's package, as on a VPS (its maintainer scripts create the user and state
# directory and enable the unit without a running systemd), and the repository it
# comes from: unattended-upgrades takes the relay's updates from there
# (52privstack-relay-upgrades allows its origin) and the package restarts the relay.
cp "$IMAGE_DEB" "$ROOT/tmp/privstack-relay.deb"
in_root dpkg -i /tmp/privstack-relay.deb
rm "$ROOT/tmp/privstack-relay.deb"
install -D -m 644 "$IMAGE_APT_KEY" "$ROOT/etc/apt/keyrings/privstack-relay.pgp"
cat > "$ROOT/etc/apt/sources.list.d/privstack-relay.sources" <<SOURCES
# privstack-relay's own repository (image/hooks/customize.sh)
Types: deb
URIs: $IMAGE_APT_URL
Suites: stable
Components: main
Signed-By: /etc/apt/keyrings/privstack-relay.pgp
SOURCES

# Services: networkd (with wait-online), resolved, timesyncd, nftables, the relay and
# its first-boot unit; SSH only when first boot finds authorized_keys.
in_root systemctl enable systemd-networkd.service systemd-resolved.service \
    systemd-timesyncd.service nftables.service privstack-relay-firstboot.service
in_root systemctl disable ssh.service
# systemd-firstboot would stop at the console asking for a locale and a root password.
in_root systemctl mask systemd-firstboot.service
rm -f "$ROOT"/etc/ssh/ssh_host_*_key "$ROOT"/etc/ssh/ssh_host_*_key.pub
ln -sf ../run/systemd/resolve/stub-resolv.conf "$ROOT/etc/resolv.conf"
in_root /usr/lib/privstack-relay/firewall

# Root locked (no password login at all); the boot partition is root's only.
in_root passwd --lock root >/dev/null
mkdir -p "$ROOT$FAT_MOUNT"
cat > "$ROOT/etc/fstab" <<FSTAB
# <file system>  <mount point>  <type>  <options>  <dump>  <pass>
UUID=$IMAGE_ROOT_UUID  /  ext4  rw,errors=remount-ro,x-systemd.growfs  0  1
UUID=$(echo "$IMAGE_FAT_ID" | sed 's/^\(....\)\(....\)$/\1-\2/' | tr a-f A-F)  $FAT_MOUNT  vfat  umask=0077,nofail  0  2
FSTAB

case "$BOOT" in
grub-*)
    # First boot grows the root partition to the end of the disk (systemd-repart) and
    # the file system with it (x-systemd.growfs above).
    mkdir -p "$ROOT/etc/repart.d"
    cat > "$ROOT/etc/repart.d/50-root.conf" <<REPART
[Partition]
Type=root
GrowFileSystem=yes
REPART

    # GRUB reads its configuration and modules from the root file system and boots the
    # kernel through the /vmlinuz and /initrd.img links that kernel upgrades keep
    # current, so unattended upgrades need no boot loader step.
    mkdir -p "$ROOT/boot/grub"
    {
        echo "# privstack-relay appliance (image/hooks/customize.sh)"
        echo "set default=0"
        echo "set timeout=1"
        case "$BOOT" in grub-bios-efi)
            echo "serial --unit=0 --speed=115200"
            echo "terminal_input console serial"
            echo "terminal_output console serial" ;;
        esac
        echo "search --no-floppy --fs-uuid --set=root $IMAGE_ROOT_UUID"
        echo "menuentry 'PrivStack relay' {"
        echo "    linux /vmlinuz root=UUID=$IMAGE_ROOT_UUID ro $CMDLINE"
        echo "    initrd /initrd.img"
        echo "}"
        echo "menuentry 'PrivStack relay (previous kernel)' {"
        echo "    linux /vmlinuz.old root=UUID=$IMAGE_ROOT_UUID ro $CMDLINE"
        echo "    initrd /initrd.img.old"
        echo "}"
    } > "$ROOT/boot/grub/grub.cfg"
    printf 'search --no-floppy --fs-uuid --set=root %s\nset prefix=($root)/boot/grub\n' \
        "$IMAGE_ROOT_UUID" > "$ROOT/boot/grub/early.cfg"
    mkdir -p "$ROOT/boot/grub/$GRUB_EFI_TARGET"
    cp "$ROOT/usr/lib/grub/$GRUB_EFI_TARGET"/*.mod "$ROOT/usr/lib/grub/$GRUB_EFI_TARGET"/*.lst \
        "$ROOT/boot/grub/$GRUB_EFI_TARGET/"
    in_root grub-mkimage -O "$GRUB_EFI_TARGET" -o "/boot/grub/$GRUB_EFI_NAME" \
        -c /boot/grub/early.cfg -p /boot/grub part_gpt part_msdos ext2 search search_fs_uuid
    mv "$ROOT/boot/grub/$GRUB_EFI_NAME" "$IMAGE_WORK/$GRUB_EFI_NAME"
    if [ "$BOOT" = grub-bios-efi ]; then
        mkdir -p "$ROOT/boot/grub/i386-pc"
        cp "$ROOT/usr/lib/grub/i386-pc"/*.mod "$ROOT/usr/lib/grub/i386-pc"/*.lst "$ROOT/boot/grub/i386-pc/"
        in_root grub-mkimage -O i386-pc -o /boot/grub/i386-pc/core.img \
            -c /boot/grub/early.cfg -p /boot/grub biosdisk part_gpt part_msdos ext2 search search_fs_uuid
        cp "$ROOT/usr/lib/grub/i386-pc/boot.img" "$ROOT/boot/grub/i386-pc/boot.img"
    fi
    ;;
raspi)
    # raspi-firmware's kernel and initramfs hooks have filled /boot/firmware (firmware,
    # kernel, initrd, device trees, config.txt, cmdline.txt with root=LABEL=RASPIROOT);
    # assemble.sh moves it onto the FAT partition.
    [ -f "$ROOT/boot/firmware/cmdline.txt" ] || { echo "customize.sh: raspi-firmware left no cmdline.txt" >&2; exit 1; }
    # Root by label (SD card or USB alike), and the serial console on the GPIO header
    # (serial0: the mini UART, ttyS1) besides the screen; raspi-firmware writes
    # cmdline.txt from these settings on every kernel upgrade.
    cat >> "$ROOT/etc/default/raspi-firmware" <<RASPI

# privstack-relay appliance (image/hooks/customize.sh)
ROOTPART=LABEL=RASPIROOT
CONSOLES="ttyS1,115200 tty0"
RASPI
    sed -i 's|root=[^ ]*|root=LABEL=RASPIROOT|; s|console=tty0|console=ttyS1,115200 console=tty0|' \
        "$ROOT/boot/firmware/cmdline.txt"
    in_root systemctl enable privstack-relay-growroot.service
    ;;
esac

# Boards without a real-time clock (the Pi) start with systemd's clock floor until
# timesyncd reaches an NTP server; make that floor the image's build time, not the
# older date systemd was built on. Relay reservations carry absolute expiry times.
touch "$ROOT/usr/lib/clock-epoch"

# Nothing from the build host stays behind.
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/tmp/* "$ROOT"/var/tmp/*
rm -f "$ROOT"/var/log/*.log "$ROOT"/var/log/apt/*
