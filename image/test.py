#!/usr/bin/env python3
"""Boot the appliance images under qemu (TCG) and check them as an operator would.

    image/test.py [CASE...]    CASE = x86_64-bios | x86_64-uefi | aarch64-uefi | aarch64-rpi
                               (default: every case whose image is in DIST)

Each case boots a copy of DIST/privstack-relay-VERSION-VARIANT.img (KEEP=1
image/build.sh leaves it there, else the .img.xz is unpacked), grown by 1 GiB, with
an SSH public key placed on its FAT partition (x86_64-bios also gets a
privstack-relay.env moving the relay to 4101/4102 with a public address, x86_64-uefi
a malformed one), the relay's ports (4001/udp, 4002/tcp) and 22/tcp forwarded from
free ports on 127.0.0.1, and checks:
  - GET /api/v1/identity answers (the time from qemu start is printed);
  - `privstack-relay probe` (the x86_64 release binary) dials the forwarded QUIC
    port expecting the API's peer ID: QUIC, identify, a relay reservation;
  - SSH with the provisioned key works; `systemctl --failed` is empty; the key file
    is 0600 and owned by the service user; the root file system grew to the disk;
  - a listener started inside on a port the firewall does not open is reachable
    from inside and not from outside;
  - /metrics answers on 127.0.0.1:4003 inside and is 404 on the public API port;
  - the boot partition holds privstack-relay.txt with the peer ID;
  - (x86_64-bios) a bad setting in relay.env leaves the unit failed with exit code 78,
    not restarting, the setting named in the journal; fixed, the relay starts again;
  - (x86_64-bios) a newer build of the package (the next Debian revision, in a
    repository signed with release/build.sh's throw-away key, copied into the guest)
    is installed by unattended-upgrades through the image's own apt source and key:
    the relay restarts with the same peer ID, relay.env edits kept, no failed units;
    at the end, apt-get remove stops and disables it, purge keeps the identity key,
    and the archive's install.sh --apt installs it again from the repository;
  - after a reboot the peer ID is the same and the first-boot unit did not run
    (x86_64-bios and aarch64-uefi only: x86_64-uefi boots the same image as
    x86_64-bios, and qemu's raspi3b loads the kernel itself, so a second boot there
    goes through no boot loader or firmware that the other two cases do not);
  - after power-off the peer ID file reads from the image with mtools (what someone
    who flashed an SD card sees on another computer).
Environment: DIST (default dist), VERSION (default Cargo.toml's), RELAY_BIN (the
host's privstack-relay for probe; default: from DIST's x86_64 archive),
BOOT_TIMEOUT (seconds per boot, default 900: a deadline that catches a hung boot, not a
speed target; the raspi3b boot takes ~110 s on an idle machine under TCG and well over
300 s on a busy one; the time each boot took is printed), LOGS (serial console logs, default
target/image-test).
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent
DIST = Path(os.environ.get("DIST", SRC / "dist")).resolve()
VERSION = os.environ.get("VERSION") or re.search(
    r'^version = "(.*)"$', (SRC / "Cargo.toml").read_text(), re.M).group(1)
BOOT_TIMEOUT = float(os.environ.get("BOOT_TIMEOUT", "900"))
LOGS = Path(os.environ.get("LOGS", SRC / "target" / "image-test")).resolve()
GROW = 1 << 30
CLOSED_PORT = 8080  # a port the firewall does not open
EXTERNAL = "/ip4/203.0.113.7/udp/4101/quic-v1"

CASES = {
    # Provisioned relay settings (written with CRLF line ends, as a Windows editor
    # would): other ports, which the firewall must follow (one quoted, as systemd
    # allows), a public address, and a boolean written as people write them.
    "x86_64-bios": dict(variant="x86_64", fat_mount="/boot/efi", ports=(4101, 4102),
                        env="PRIVSTACK_RELAY_PORT=\"4101\"\r\nPRIVSTACK_RELAY_HTTP_PORT=4102  \r\n"
                            f"PRIVSTACK_RELAY_EXTERNAL_ADDRESS={EXTERNAL}\r\nPRIVSTACK_RELAY_VERBOSE=1\r\n", qemu=[
        "qemu-system-x86_64", "-machine", "pc"]),
    # A settings file with a typo is refused as a whole; the defaults stay.
    "x86_64-uefi": dict(variant="x86_64", fat_mount="/boot/efi",
                        env="PRIVSTACK_RELAY_PORT=4101\n--port 4101\n",
                        refused="ignored privstack-relay.env on the boot partition: line 2", qemu=[
        "qemu-system-x86_64", "-machine", "q35",
        "-drive", "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
        "-drive", "if=pflash,format=raw,unit=1,file={vars}"], vars="/usr/share/OVMF/OVMF_VARS_4M.fd",
                        reboot=False),
    "aarch64-uefi": dict(variant="aarch64-uefi", fat_mount="/boot/efi", qemu=[
        "qemu-system-aarch64", "-machine", "virt", "-cpu", "cortex-a57",
        "-drive", "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/AAVMF/AAVMF_CODE.fd",
        "-drive", "if=pflash,format=raw,unit=1,file={vars}"], vars="/usr/share/AAVMF/AAVMF_VARS.fd"),
    # qemu's raspi3b cannot run the Pi's GPU firmware (bootcode.bin, start*.elf), so
    # qemu loads what that firmware would: the kernel, initramfs, device tree and
    # command line named by config.txt and cmdline.txt on the image's FAT partition.
    # 4 cores and 1 GiB are fixed by the board; the SD card, an SD card's size (a power
    # of two); the network, a USB (RNDIS) adapter on the board's dwc2 controller.
    "aarch64-rpi": dict(variant="aarch64-rpi", fat_mount="/boot/firmware", board="raspi3b",
                        reboot=False, qemu=["qemu-system-aarch64", "-machine", "raspi3b"]),
}


class CheckFailed(Exception):
    pass


def log(msg: str) -> None:
    print(msg, flush=True)


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, timeout=60, check=True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise CheckFailed(f"{' '.join(map(str, cmd))} exited {p.returncode}: {p.stderr.strip()}")
    return p


def fat_offset(image: Path) -> int:
    """Byte offset of the image's FAT partition (the ESP, or the first on MBR)."""
    table = json.loads(run(["sfdisk", "--json", str(image)]).stdout)["partitiontable"]
    for part in table["partitions"]:
        if part.get("name") == "esp" or part["type"].lower() in ("c", "b", "ef"):
            return part["start"] * table.get("sectorsize", 512)
    raise CheckFailed(f"{image}: no FAT partition")


def relay_bin(tmp: Path) -> Path:
    if os.environ.get("RELAY_BIN"):
        return Path(os.environ["RELAY_BIN"])
    archive = DIST / f"privstack-relay-{VERSION}-x86_64-unknown-linux-musl.tar.gz"
    with tarfile.open(archive) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/privstack-relay"))
        tar.extract(member, tmp, filter="data")
    return tmp / member.name


def base_image(variant: str, tmp: Path) -> Path:
    raw = DIST / f"privstack-relay-{VERSION}-{variant}.img"
    if raw.exists():
        return raw
    xz = raw.with_name(raw.name + ".xz")
    if not xz.exists():
        raise FileNotFoundError(f"{raw} (or .xz) not found: run image/build.sh {variant}")
    out = tmp / raw.name
    with open(out, "wb") as f:
        subprocess.run(["xz", "-dc", str(xz)], stdout=f, check=True)
    return out


class Machine:
    """One qemu guest with forwarded ports and a serial log."""

    def __init__(self, case: str, spec: dict, disk: Path, tmp: Path):
        self.case, self.spec, self.disk, self.tmp = case, spec, disk, tmp
        self.quic = free_port(socket.SOCK_DGRAM)
        self.http = free_port(socket.SOCK_STREAM)
        self.ssh_port = free_port(socket.SOCK_STREAM)
        self.closed = free_port(socket.SOCK_STREAM)
        LOGS.mkdir(parents=True, exist_ok=True)
        self.serial = LOGS / f"{case}-serial.log"
        self.key = tmp / "id_ed25519"
        self.proc = None

    def start(self) -> None:
        vars_copy = self.tmp / f"{self.case}-vars.fd"
        if "vars" in self.spec:
            shutil.copyfile(self.spec["vars"], vars_copy)
        quic, http = self.spec.get("ports", (4001, 4002))
        fwd = (f"hostfwd=udp:127.0.0.1:{self.quic}-:{quic},hostfwd=tcp:127.0.0.1:{self.http}-:{http},"
               f"hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22,hostfwd=tcp:127.0.0.1:{self.closed}-:{CLOSED_PORT}")
        cmd = [a.format(vars=vars_copy) for a in self.spec["qemu"]] + [
            "-accel", "tcg", "-display", "none", "-monitor", "none", "-netdev", f"user,id=net0,{fwd}"]
        if self.spec.get("board") == "raspi3b":
            kernel, initrd, dtb, cmdline = self.pi_boot_files()
            cmd += ["-kernel", kernel, "-initrd", initrd, "-dtb", dtb, "-append", cmdline,
                    "-drive", f"file={self.disk},format=raw,if=sd",
                    # serial0 of the Pi's device tree is the mini UART, qemu's second.
                    "-serial", "null", "-serial", f"file:{self.serial}",
                    "-usb", "-device", "usb-net,netdev=net0,mac=52:54:00:12:34:56"]
        else:
            cmd += ["-smp", "2", "-m", "1024", "-serial", f"file:{self.serial}",
                    "-drive", f"file={self.disk},format=raw,if=virtio",
                    "-device", "virtio-net-pci,netdev=net0"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(self.tmp / f"{self.case}-qemu.err", "w"),
                                     start_new_session=True)

    def pi_boot_files(self) -> tuple[str, str, str, str]:
        fat = f"{self.disk}@@{fat_offset(self.disk)}"
        env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
        config = run(["mtype", "-i", fat, "::config.txt"], env=env).stdout
        kernel = re.search(r"^kernel=(\S+)", config, re.M).group(1)
        initrd = re.search(r"^initramfs (\S+)", config, re.M).group(1)
        # qemu's usb-net answers to both cdc_ether and cdc_subset; whichever binds first
        # decides the MAC (cdc_subset's is random), and with it slirp's DHCP address,
        # which the port forwards point at. Real boards' Ethernet is not affected.
        cmdline = run(["mtype", "-i", fat, "::cmdline.txt"], env=env).stdout.strip()
        cmdline += " modprobe.blacklist=cdc_subset"
        dtb = "bcm2837-rpi-3-b.dtb"
        for name in (kernel, initrd, dtb):
            run(["mcopy", "-o", "-i", fat, f"::{name}", str(self.tmp / name)], env=env)
        return str(self.tmp / kernel), str(self.tmp / initrd), str(self.tmp / dtb), cmdline

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def alive(self) -> None:
        if self.proc.poll() is not None:
            err = (self.tmp / f"{self.case}-qemu.err").read_text().strip()
            raise CheckFailed(f"qemu exited with {self.proc.returncode}: {err}")

    def identity(self, deadline: float) -> dict:
        """Wait for a real answer from the identity API (slirp accepts connections
        before the guest listens, so a connect proves nothing)."""
        url = f"http://127.0.0.1:{self.http}/api/v1/identity"
        while True:
            self.alive()
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    return json.loads(r.read())
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    raise CheckFailed(f"{url} did not answer in {BOOT_TIMEOUT:.0f} s")
                time.sleep(1)

    def ssh(self, command: str, timeout=60, check=True) -> str:
        p = run(["ssh", "-i", str(self.key), "-p", str(self.ssh_port), "-o", "BatchMode=yes",
                 "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                 "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", "root@127.0.0.1", command],
                timeout=timeout, check=check)
        return p.stdout.strip()

    def push(self, local: Path, remote: str) -> None:
        """Copy the directory `local` into the guest as `remote` (tar over SSH)."""
        tar = subprocess.run(["tar", "-C", str(local), "-cf", "-", "."], capture_output=True,
                             check=True).stdout
        p = subprocess.run(["ssh", "-i", str(self.key), "-p", str(self.ssh_port), "-o", "BatchMode=yes",
                            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                            "-o", "LogLevel=ERROR", "root@127.0.0.1",
                            f"mkdir -p {remote} && tar -C {remote} -xf -"],
                           input=tar, capture_output=True, timeout=120)
        if p.returncode != 0:
            raise CheckFailed(f"copying {local} into the guest failed: {p.stderr.decode().strip()}")

    def wait_ssh(self, deadline: float) -> None:
        while True:
            self.alive()
            try:
                self.ssh("true", timeout=30)
                return
            except (CheckFailed, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise CheckFailed("SSH with the provisioned key did not work")
                time.sleep(2)


def check(cond: bool, what: str) -> None:
    if not cond:
        raise CheckFailed(what)
    log(f"  ok: {what}")


def newer_repository(tmp: Path) -> tuple[Path, str]:
    """The amd64 package of DIST rebuilt as the next Debian revision, in an apt
    repository signed with the throw-away key release/build.sh made (DIST/apt.test-key):
    what a relay fix looks like to an installed image."""
    keyring = Path(os.environ.get("APT_TEST_KEYRING", DIST / "apt.test-key"))
    if not keyring.is_dir():
        raise CheckFailed(f"{keyring} not found: the upgrade test signs with release/build.sh's "
                          "throw-away key (build without APT_SIGNING_KEY, or set APT_TEST_KEYRING)")
    tree = tmp / "newer-deb"
    shutil.rmtree(tree, ignore_errors=True)
    run(["dpkg-deb", "-R", str(DIST / f"privstack-relay_{VERSION}-1_amd64.deb"), str(tree)])
    control = tree / "DEBIAN" / "control"
    version = f"{VERSION}-2"
    control.write_text(re.sub(r"^Version: .*$", f"Version: {version}", control.read_text(), flags=re.M))
    deb = tmp / f"privstack-relay_{version}_amd64.deb"
    run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)])
    fpr = [l.split(":")[9] for l in run(["gpg", "--batch", "--with-colons", "--list-secret-keys"],
                                          env=dict(os.environ, GNUPGHOME=str(keyring))).stdout.splitlines()
           if l.startswith("fpr:")][0]
    repo = tmp / "newer-apt"
    gpg_env = dict(os.environ, GNUPGHOME=str(keyring))
    try:
        run([str(SRC / "release" / "apt-repo.sh"), str(repo), str(deb)],
            env=dict(gpg_env, APT_SIGNING_FINGERPRINT=fpr))
    finally:
        # Signing started gpg's agent for that keyring; nothing of the test stays running.
        run(["gpgconf", "--kill", "gpg-agent"], env=gpg_env, check=False)
    return repo, version


def upgrade(m: "Machine", tmp: Path, peer: str, http: int) -> None:
    """A newer package in the image's own repository reaches the relay through
    unattended-upgrades, as the daily run would deliver it."""
    repo, version = newer_repository(tmp)
    m.push(repo, "/srv/privstack-apt")
    # The image's own source and key, pointed at the copy; only this source is read
    # (the guest reaches no mirror from here).
    m.ssh("mkdir -p /run/apt-test && sed 's#^URIs: .*#URIs: file:/srv/privstack-apt#' "
          "/etc/apt/sources.list.d/privstack-relay.sources > /run/apt-test/privstack-relay.sources && "
          "printf 'Dir::Etc::SourceList \"/dev/null\";\\nDir::Etc::SourceParts \"/run/apt-test\";\\n' "
          "> /run/apt-test.conf")
    apt_env = "APT_CONFIG=/run/apt-test.conf"
    before = m.ssh("systemctl show -P MainPID privstack-relay.service")
    env_before = m.ssh("cat /etc/privstack-relay/relay.env")
    m.ssh(f"{apt_env} apt-get update -q", timeout=300)
    out = m.ssh(f"{apt_env} unattended-upgrade -v 2>&1", timeout=600, check=False)
    now = m.ssh("dpkg-query -W -f '${Version}' privstack-relay")
    check(now == version, f"unattended-upgrades installed {version} from the signed repository ({now})"
          + ("" if now == version else f"\n{out}"))
    again = m.identity(time.monotonic() + BOOT_TIMEOUT)
    after = m.ssh("systemctl show -P MainPID privstack-relay.service")
    check(after != before and again["peer_id"] == peer,
          f"the package restarted the relay (pid {before} -> {after}) with the same peer ID")
    check(m.ssh("cat /etc/privstack-relay/relay.env") == env_before and f"PORT=\"{m.spec['ports'][0]}\"" in env_before,
          "relay.env edits kept across the upgrade (a conffile)")
    failed = m.ssh("systemctl --failed --plain --no-legend")
    check(failed == "", f"no failed units after the upgrade ({failed!r})")


def remove_and_purge(m: "Machine") -> None:
    """Removing the package stops and disables the relay; purging keeps its identity."""
    m.ssh("DEBIAN_FRONTEND=noninteractive apt-get remove -y -q privstack-relay", timeout=300)
    state = m.ssh("systemctl is-active privstack-relay.service; "
                  "test -L /etc/systemd/system/multi-user.target.wants/privstack-relay.service "
                  "&& echo enabled || echo disabled")
    check(state.split() in (["inactive", "disabled"], ["failed", "disabled"]),
          f"apt-get remove stops and disables the relay ({' '.join(state.split())})")
    m.ssh("DEBIAN_FRONTEND=noninteractive apt-get purge -y -q privstack-relay", timeout=300)
    left = m.ssh("test -f /var/lib/privstack/relay-identity.key && echo key; "
                 "test -e /etc/privstack-relay/relay.env && echo env; true")
    check(left == "key", f"apt-get purge removes relay.env and keeps the identity key ({left!r})")


def install_apt(m: "Machine", tmp: Path, peer: str) -> None:
    """The release archive's install.sh --apt: adds the repository (here the copy in
    the guest, and the test key in place of the project's) and installs the package;
    the identity kept by the purge gives the same peer ID."""
    unpacked = tmp / "archive"
    shutil.rmtree(unpacked, ignore_errors=True)
    unpacked.mkdir()
    with tarfile.open(DIST / f"privstack-relay-{VERSION}-x86_64-unknown-linux-musl.tar.gz") as tar:
        tar.extractall(unpacked, filter="data")
    top = next(unpacked.iterdir())
    shutil.copy(tmp / "newer-apt" / "privstack-relay-archive-keyring.pgp",
                top / "privstack-relay-archive-keyring.pgp")
    m.push(top, "/root/archive")
    out = m.ssh("/root/archive/install.sh --apt --apt-url file:/srv/privstack-apt --no-firewall 2>&1",
                timeout=600, check=False)
    version = m.ssh("dpkg-query -W -f '${Version}' privstack-relay 2>/dev/null; true")
    check(version == f"{VERSION}-2", f"install.sh --apt installs the package from the repository "
          f"({version or 'not installed'})" + ("" if version == f"{VERSION}-2" else f"\n{out}"))
    # The purge took the provisioned relay.env, so the relay is back on its default
    # ports, which are not the forwarded ones: ask it from inside.
    inside = m.ssh("for i in $(seq 30); do python3 -c 'import json, urllib.request as u; "
                   "print(json.load(u.urlopen(\"http://127.0.0.1:4002/api/v1/identity\", timeout=2))[\"peer_id\"])' "
                   "2>/dev/null && break; sleep 1; done", timeout=120)
    check(inside == peer, f"the reinstalled relay runs with the identity the purge kept ({inside!r})")


def boot_case(case: str, tmp: Path, relay: Path) -> dict:
    spec = CASES[case]
    base = base_image(spec["variant"], tmp)
    disk = tmp / f"{case}.img"
    run(["cp", "--sparse=always", str(base), str(disk)])
    base_root = max(p["size"] for p in json.loads(run(["sfdisk", "--json", str(disk)]).stdout)
                    ["partitiontable"]["partitions"]) * 512
    size = disk.stat().st_size + GROW
    if spec.get("board"):
        size = 1 << (size - 1).bit_length()  # an SD card's size
    with open(disk, "r+b") as f:
        f.truncate(size)

    m = Machine(case, spec, disk, tmp)
    if not m.key.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(m.key)])
    fat = f"{disk}@@{fat_offset(disk)}"
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    run(["mcopy", "-o", "-i", fat, f"{m.key}.pub", "::authorized_keys"], env=env)
    if "env" in spec:
        settings = tmp / f"{case}.env"
        settings.write_bytes(spec["env"].encode())
        run(["mcopy", "-o", "-i", fat, str(settings), "::privstack-relay.env"], env=env)

    figures = {}
    try:
        log(f"{case}: booting {base.name} ({m.serial})")
        started = time.monotonic()
        m.start()
        ident = m.identity(started + BOOT_TIMEOUT)
        figures["first boot to API (s)"] = round(time.monotonic() - started, 1)
        peer = ident["peer_id"]
        log(f"  ok: identity API answered after {figures['first boot to API (s)']} s: {peer}")

        if spec.get("board"):
            # No RTC on the board and no NTP server reachable from here: set the clock
            # as timesyncd would (reservations carry absolute expiry times).
            m.wait_ssh(time.monotonic() + 300)
            m.ssh(f"date -u -s @{int(time.time())} >/dev/null")
        target = f"/ip4/127.0.0.1/udp/{m.quic}/quic-v1/p2p/{peer}"
        probe = run([str(relay), "probe", "--timeout", "30", target], timeout=90, check=False)
        check(probe.returncode == 0 and "OK" in probe.stdout,
              f"probe over the forwarded QUIC port reached peer {peer} and reserved a slot"
              + ("" if probe.returncode == 0 else f"\n{probe.stdout}{probe.stderr}"))

        m.wait_ssh(time.monotonic() + 300)
        log("  ok: SSH with the key from the boot partition")
        state = m.ssh("systemctl is-system-running --wait", timeout=600, check=False)
        failed = m.ssh("systemctl --failed --plain --no-legend")
        check(failed == "" and state == "running", f"no failed units (system {state!r}; failed: {failed!r})")
        rmem = m.ssh("cat /proc/sys/net/core/rmem_max")
        capped = m.ssh("journalctl -b -u privstack-relay.service --no-pager | grep -c 'receive buffer is' || true")
        check(rmem == "4194304" and capped == "0",
              f"the relay's QUIC socket gets its 4 MiB receive buffer (rmem_max {rmem}, {capped} warnings)")
        key = m.ssh("stat -c '%a %U' /var/lib/privstack/relay-identity.key")
        check(key == "600 privstack", f"identity key is 0600 and owned by privstack ({key})")
        size = int(m.ssh("findmnt -bno SIZE /"))
        check(size > base_root + GROW // 2, f"root file system grew to the disk ({base_root >> 20} -> {size >> 20} MiB)")
        txt = m.ssh(f"cat {spec['fat_mount']}/privstack-relay.txt")
        check(f"Peer ID: {peer}" in txt, "privstack-relay.txt on the boot partition names the peer ID")
        if "ports" in spec:
            check(ident["addresses"][0] == EXTERNAL and f"{EXTERNAL}/p2p/{peer}" in txt,
                  f"provisioned settings applied: relay on {spec['ports']}, announcing {EXTERNAL}")
        if "refused" in spec:
            env_now = m.ssh("grep -c '^PRIVSTACK_RELAY_PORT=' /etc/privstack-relay/relay.env || true")
            check(spec["refused"] in txt and env_now == "0",
                  "a malformed privstack-relay.env is refused, with the reason in privstack-relay.txt")

        if "ports" in spec:
            # A bad setting is a failed unit with the reason in the journal (exit 78,
            # RestartPreventExitStatus), not a restart loop; fixed, it starts again.
            env_file = "/etc/privstack-relay/relay.env"
            m.ssh(f"cp {env_file} /run/relay.env.good && echo PRIVSTACK_RELAY_MAX_CIRCUITS=many >> {env_file}"
                  " && systemctl restart privstack-relay.service", check=False)
            time.sleep(8)  # longer than RestartSec=5
            props = dict(l.split("=", 1) for l in m.ssh(
                "systemctl show -p ActiveState -p ExecMainStatus -p NRestarts privstack-relay.service").splitlines())
            journal = m.ssh("journalctl -b -u privstack-relay.service --no-pager -o cat | tail -n 5")
            check(props == {"ActiveState": "failed", "ExecMainStatus": "78", "NRestarts": "0"}
                  and 'PRIVSTACK_RELAY_MAX_CIRCUITS="many"' in journal,
                  f"a bad relay.env leaves a failed unit (exit 78, no restarts) naming the setting ({props})")
            m.ssh(f"mv /run/relay.env.good {env_file} && systemctl restart privstack-relay.service")
            again = m.identity(time.monotonic() + BOOT_TIMEOUT)
            check(again["peer_id"] == peer, "relay.env fixed: the relay starts again")
            m.ssh("systemctl reset-failed")
            upgrade(m, tmp, peer, m.http)

        m.ssh(f"systemd-run --unit=closed-port-test python3 -m http.server {CLOSED_PORT}")
        inside = m.ssh(f"for i in $(seq 20); do python3 -c 'import urllib.request as u; "
                       f"u.urlopen(\"http://127.0.0.1:{CLOSED_PORT}/\", timeout=2)' 2>/dev/null "
                       f"&& echo up && break; sleep 0.5; done")
        check(inside == "up", f"a listener on {CLOSED_PORT}/tcp answers inside the machine")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{m.closed}/", timeout=5).read()
            reached = True
        except OSError:
            reached = False
        check(not reached, f"port {CLOSED_PORT}/tcp is closed from outside by the firewall")
        inside = m.ssh("python3 -c 'import urllib.request as u; "
                       "print(u.urlopen(\"http://127.0.0.1:4003/metrics\", timeout=5).read().decode())'")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{m.http}/metrics", timeout=5).read()
            public = 200
        except urllib.error.HTTPError as e:
            public = e.code
        check("build_info{" in inside and public == 404,
              f"/metrics on 127.0.0.1:4003 inside, 404 on the public API port ({public})")

        if spec.get("reboot", True):
            boot_id = m.ssh("cat /proc/sys/kernel/random/boot_id")
            m.ssh("systemctl reboot", check=False)
            deadline = time.monotonic() + BOOT_TIMEOUT
            while True:
                m.alive()
                try:
                    if m.ssh("cat /proc/sys/kernel/random/boot_id", timeout=30) != boot_id:
                        break
                except (CheckFailed, subprocess.TimeoutExpired):
                    pass
                if time.monotonic() > deadline:
                    raise CheckFailed("the machine did not come back after a reboot")
                time.sleep(2)
            again = m.identity(time.monotonic() + BOOT_TIMEOUT)
            check(again["peer_id"] == peer, "peer ID unchanged after a reboot")
            ran = m.ssh("systemctl show -P ConditionResult privstack-relay-firstboot.service")
            check(ran == "no", "first-boot unit did not run again after the reboot")

        if "ports" in spec:
            remove_and_purge(m)
            install_apt(m, tmp, peer)

        m.ssh("systemctl poweroff", check=False)
        try:
            m.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            raise CheckFailed("the machine did not power off")
        txt = run(["mtype", "-i", fat, "::privstack-relay.txt"], env=env).stdout
        check(f"Peer ID: {peer}" in txt, "privstack-relay.txt reads from the powered-off image")
    except Exception:
        log(f"--- {case}: last lines of the serial console ---")
        if m.serial.exists():
            log("\n".join(m.serial.read_text(errors="replace").splitlines()[-60:]))
        raise
    finally:
        m.kill()
        disk.unlink(missing_ok=True)
    return figures


def main() -> int:
    cases = sys.argv[1:] or [c for c, s in CASES.items()
                             if (DIST / f"privstack-relay-{VERSION}-{s['variant']}.img").exists()
                             or (DIST / f"privstack-relay-{VERSION}-{s['variant']}.img.xz").exists()]
    for c in cases:
        if c not in CASES:
            print(f"image/test.py: unknown case {c} (known: {', '.join(CASES)})", file=sys.stderr)
            return 2
    if not cases:
        print(f"image/test.py: no images in {DIST}: run image/build.sh", file=sys.stderr)
        return 1
    results = {}
    with tempfile.TemporaryDirectory(prefix="privstack-image-test.") as t:
        tmp = Path(t)
        relay = relay_bin(tmp)
        for case in cases:
            try:
                results[case] = boot_case(case, tmp, relay)
            except (CheckFailed, subprocess.TimeoutExpired) as e:
                print(f"FAIL {case}: {e}", file=sys.stderr)
                return 1
    for case, figures in results.items():
        log(f"PASS {case}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
