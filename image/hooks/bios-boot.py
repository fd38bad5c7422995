#!/usr/bin/env python3
"""Make a GPT disk image boot on legacy BIOS with GRUB, without a loop device.

    bios-boot.py IMAGE BOOT_IMG CORE_IMG

Does what `grub-bios-setup` does for a GPT disk with a BIOS boot partition (GRUB's
util/setup.c, embedding case, without Reed-Solomon codes): core.img goes into the
BIOS boot partition, its first sector's block list points at the rest of it, and
boot.img goes into the MBR, pointing at core.img, keeping the protective MBR's
partition table. grub-bios-setup itself needs a block device whose file systems it
can identify; on a plain image file it cannot run.
"""
import struct
import sys

SECTOR = 512
BIOS_BOOT_GUID = "21686148-6E49-704E-6461-6E6F74454649"

# Offsets in boot.img (GRUB include/grub/i386/pc/boot.h).
BPB_START, BPB_END = 0x03, 0x5A
KERNEL_SECTOR = 0x5C
BOOT_DRIVE = 0x64
DRIVE_CHECK = 0x66
PART_TABLE_START, PART_TABLE_END = 0x1B8, 0x1FE
# core.img's first sector (diskboot.img) ends with its block list entries of
# (start u64, len u16, segment u16), growing downwards.
BLOCK = struct.Struct("<QHH")
FIRST_BLOCK = SECTOR - BLOCK.size
# Where diskboot loads the rest of core.img: GRUB_BOOT_I386_PC_KERNEL_SEG + 0x20.
LOAD_SEGMENT = 0x820


def guid(raw: bytes) -> str:
    a, b, c = struct.unpack_from("<IHH", raw)
    d = raw[8:10].hex().upper()
    e = raw[10:16].hex().upper()
    return f"{a:08X}-{b:04X}-{c:04X}-{d}-{e}"


def bios_boot_partition(disk) -> tuple[int, int]:
    disk.seek(SECTOR)
    header = disk.read(SECTOR)
    if header[:8] != b"EFI PART":
        sys.exit("bios-boot.py: no GPT header in the image")
    entries_lba, count, size = struct.unpack_from("<QII", header, 72)
    disk.seek(entries_lba * SECTOR)
    table = disk.read(count * size)
    for i in range(count):
        entry = table[i * size:(i + 1) * size]
        if guid(entry[:16]) == BIOS_BOOT_GUID:
            first, last = struct.unpack_from("<QQ", entry, 32)
            return first, last - first + 1
    sys.exit("bios-boot.py: the image has no BIOS boot partition")


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    image, boot_path, core_path = sys.argv[1:]
    boot = bytearray(open(boot_path, "rb").read())
    core = bytearray(open(core_path, "rb").read())
    if len(boot) != SECTOR:
        sys.exit(f"bios-boot.py: {boot_path} is {len(boot)} bytes, not {SECTOR}")
    core += bytes(-len(core) % SECTOR)
    sectors = len(core) // SECTOR

    with open(image, "r+b") as disk:
        start, length = bios_boot_partition(disk)
        if sectors > length:
            sys.exit(f"bios-boot.py: core.img needs {sectors} sectors, the BIOS boot partition has {length}")
        disk.seek(0)
        mbr = disk.read(SECTOR)

        boot[BPB_START:BPB_END] = mbr[BPB_START:BPB_END]
        # A hard disk: skip boot.img's check of the BIOS drive number (some BIOSes
        # pass a wrong one), as grub-bios-setup does for non-floppies.
        boot[DRIVE_CHECK:DRIVE_CHECK + 2] = b"\x90\x90"
        boot[BOOT_DRIVE] = 0xFF
        struct.pack_into("<Q", boot, KERNEL_SECTOR, start)
        boot[PART_TABLE_START:PART_TABLE_END] = mbr[PART_TABLE_START:PART_TABLE_END]

        offset = FIRST_BLOCK
        while offset >= 0 and BLOCK.unpack_from(core, offset)[1] != 0:
            BLOCK.pack_into(core, offset, 0, 0, 0)
            offset -= BLOCK.size
        BLOCK.pack_into(core, FIRST_BLOCK, start + 1, sectors - 1, LOAD_SEGMENT)
        BLOCK.pack_into(core, FIRST_BLOCK - BLOCK.size, 0, 0, 0)

        disk.seek(start * SECTOR)
        disk.write(core)
        disk.seek(0)
        disk.write(boot)


if __name__ == "__main__":
    main()
