#!/bin/sh
# Install privstack-relay from an unpacked release archive.
#
#   sudo ./install.sh                 install, create the user, enable and start the
#                                     service, open the ports in the active firewall
#   ./install.sh --root DIR           install into the tree DIR (an image's root file
#                                     system); starts nothing, touches no firewall
#   sudo ./install.sh --apt           Debian/Ubuntu: add the relay's apt repository
#                                     (its key from this archive) and install the
#                                     package from it, so apt upgrades the relay; a
#                                     tarball install is moved over (relay.env and the
#                                     identity key stay)
#   options: --no-start  --no-firewall  --apt-url URL  --help
#
# Idempotent: files that are already in place are left alone, an existing
# /etc/privstack-relay/relay.env is never overwritten, and a second run changes nothing.
set -eu

usage() {
    sed -n '2,16s/^# \{0,1\}//p' "$0"
}

ROOT=""
START=1
FIREWALL=1
APT=0
APT_URL=https://privstack.github.io/privstack-relay/apt
while [ $# -gt 0 ]; do
    case "$1" in
        --root) [ $# -ge 2 ] || { echo "install.sh: --root needs a directory" >&2; exit 2; }
                ROOT="$2"; shift 2 ;;
        --root=*) ROOT="${1#--root=}"; shift ;;
        --no-start) START=0; shift ;;
        --no-firewall) FIREWALL=0; shift ;;
        --apt) APT=1; shift ;;
        --apt-url) [ $# -ge 2 ] || { echo "install.sh: --apt-url needs a URL" >&2; exit 2; }
                   APT_URL="$2"; shift 2 ;;
        --apt-url=*) APT_URL="${1#--apt-url=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

HERE=$(cd "$(dirname "$0")" && pwd)
BIN="$HERE/privstack-relay"
[ -f "$BIN" ] || { echo "install.sh: $BIN not found; run me from the unpacked archive" >&2; exit 1; }

# The binary's architecture, from its ELF header (e_machine at offset 18).
elf_arch() {
    case "$(od -An -tu2 -j18 -N2 "$1" | tr -d ' ')" in
        62) echo x86_64 ;;
        183) echo aarch64 ;;
        *) echo unknown ;;
    esac
}
PKG_ARCH=$(elf_arch "$BIN")

if [ "$APT" -eq 1 ] && [ -n "$ROOT" ]; then
    echo "install.sh: --apt installs on this machine; it does not go with --root" >&2
    exit 2
fi

if [ -n "$ROOT" ]; then
    # Building an image for another machine: the host's architecture does not matter.
    mkdir -p "$ROOT"
    ROOT=$(cd "$ROOT" && pwd)
    START=0
    FIREWALL=0
else
    HOST_ARCH=$(uname -m)
    [ "$HOST_ARCH" = arm64 ] && HOST_ARCH=aarch64
    if [ "$PKG_ARCH" != "$HOST_ARCH" ]; then
        echo "install.sh: this package is for $PKG_ARCH but this machine is $HOST_ARCH;" >&2
        echo "install.sh: download privstack-relay-<version>-$HOST_ARCH-unknown-linux-musl.tar.gz instead" >&2
        exit 1
    fi
    if [ "$(id -u)" -ne 0 ]; then
        echo "install.sh: run as root (sudo ./install.sh), or use --root DIR" >&2
        exit 1
    fi
fi

# settings_port NAME DEFAULT: a port setting from check-config's output in $SETTINGS.
settings_port() {
    v=$(echo "$SETTINGS" | sed -n "s/^$1=\([0-9][0-9]*\)\$/\1/p")
    echo "${v:-$2}"
}

# Open the relay's ports in the active firewall, if there is one.
open_ports() {
    if command -v ufw >/dev/null 2>&1 && ufw status 2>/dev/null | grep -q 'Status: active'; then
        ufw allow "$QUIC_PORT/udp" >/dev/null
        ufw allow "$HTTP_PORT/tcp" >/dev/null
        echo "ufw: allowed $QUIC_PORT/udp and $HTTP_PORT/tcp"
    elif command -v firewall-cmd >/dev/null 2>&1 && firewall-cmd --state >/dev/null 2>&1; then
        firewall-cmd --quiet --permanent --add-port="$QUIC_PORT/udp" --add-port="$HTTP_PORT/tcp"
        firewall-cmd --quiet --reload
        echo "firewalld: allowed $QUIC_PORT/udp and $HTTP_PORT/tcp"
    elif command -v nft >/dev/null 2>&1 && nft list chain inet filter input >/dev/null 2>&1; then
        if ! nft list chain inet filter input | grep -q 'comment "privstack-relay"'; then
            nft add rule inet filter input udp dport "$QUIC_PORT" accept comment '"privstack-relay"'
            nft add rule inet filter input tcp dport "$HTTP_PORT" accept comment '"privstack-relay"'
        fi
        echo "nftables: allowed $QUIC_PORT/udp and $HTTP_PORT/tcp in inet filter input"
        echo "nftables: add the same rules to /etc/nftables.conf to keep them after a reboot"
    else
        echo "no active firewall found (ufw, firewalld, nftables inet filter);"
        echo "make sure $QUIC_PORT/udp and $HTTP_PORT/tcp are reachable"
    fi
}

# --apt: the package from the repository instead of this archive's files. apt picks
# the architecture; this archive only brings the repository's key.
if [ "$APT" -eq 1 ]; then
    command -v apt-get >/dev/null 2>&1 \
        || { echo "install.sh: --apt needs apt-get (Debian, Ubuntu); run ./install.sh without --apt" >&2; exit 1; }
    KEY="$HERE/privstack-relay-archive-keyring.pgp"
    [ -f "$KEY" ] || { echo "install.sh: $KEY not found; run me from the unpacked archive" >&2; exit 1; }
    install -D -m 644 "$KEY" /etc/apt/keyrings/privstack-relay.pgp
    cat > /etc/apt/sources.list.d/privstack-relay.sources <<SOURCES
# privstack-relay's own repository (install.sh --apt)
Types: deb
URIs: $APT_URL
Suites: stable
Components: main
Signed-By: /etc/apt/keyrings/privstack-relay.pgp
SOURCES
    echo "added the apt source $APT_URL (/etc/apt/sources.list.d/privstack-relay.sources)"
    # A tarball install's files would shadow the package's (/etc/systemd/system before
    # /usr/lib/systemd/system, /usr/local/bin before /usr/bin): they go, while
    # relay.env (kept by dpkg as the local version of its conffile) and the identity
    # key under /var/lib/privstack stay.
    OLD="/usr/local/bin/privstack-relay /etc/systemd/system/privstack-relay.service
/etc/systemd/system/multi-user.target.wants/privstack-relay.service
/etc/sysusers.d/privstack-relay.conf /etc/tmpfiles.d/privstack-relay.conf"
    moved=0
    for f in $OLD; do
        if [ -e "$f" ] || [ -L "$f" ]; then
            [ "$moved" -eq 1 ] || systemctl stop privstack-relay.service 2>/dev/null || true
            rm -f "$f"
            echo "removed $f (the tarball install's; the package brings its own)"
            moved=1
        fi
    done
    [ "$moved" -eq 0 ] || systemctl daemon-reload 2>/dev/null || true
    # Only this source is refreshed here; the daily apt run refreshes all of them.
    apt-get update -q -o Dir::Etc::SourceParts=- \
        -o Dir::Etc::SourceList=/etc/apt/sources.list.d/privstack-relay.sources \
        -o APT::Get::List-Cleanup=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o Dpkg::Options::=--force-confold \
        privstack-relay
    BIN=/usr/bin/privstack-relay
    if [ "$FIREWALL" -eq 1 ]; then
        SETTINGS=$("$BIN" check-config --env-file /etc/privstack-relay/relay.env || true)
        QUIC_PORT=$(settings_port PRIVSTACK_RELAY_PORT 4001)
        HTTP_PORT=$(settings_port PRIVSTACK_RELAY_HTTP_PORT 4002)
        open_ports
    fi
    # The package enabled and started the relay (a first install) or restarted it.
    sleep 1
    systemctl --no-pager --lines=0 status privstack-relay.service || true
    echo "peer ID: $(runuser -u privstack -- "$BIN" keygen \
        --identity /var/lib/privstack/relay-identity.key 2>/dev/null || echo unknown)"
    echo "upgrades: apt (unattended-upgrades, if installed, needs the origin allowed: see the README)"
    exit 0
fi

CHANGED=0
# put SRC DST MODE: install SRC as DST unless an identical file with that mode is there.
put() {
    dst="$ROOT$2"
    if [ -f "$dst" ] && cmp -s "$1" "$dst" && [ "$(stat -c %a "$dst")" = "$3" ]; then
        return 0
    fi
    install -D -m "$3" "$1" "$dst"
    echo "installed $2"
    CHANGED=1
}

put "$BIN" /usr/local/bin/privstack-relay 755
put "$HERE/systemd/privstack-relay.service" /etc/systemd/system/privstack-relay.service 644
put "$HERE/systemd/privstack-relay.sysusers" /etc/sysusers.d/privstack-relay.conf 644
put "$HERE/systemd/privstack-relay.tmpfiles" /etc/tmpfiles.d/privstack-relay.conf 644
if [ ! -e "$ROOT/etc/privstack-relay/relay.env" ]; then
    put "$HERE/systemd/relay.env" /etc/privstack-relay/relay.env 644
fi

# The service user and its state directory.
has_user() {
    if [ -n "$ROOT" ]; then
        grep -q '^privstack:' "$ROOT/etc/passwd" 2>/dev/null
    else
        id privstack >/dev/null 2>&1
    fi
}
if ! has_user; then
    if command -v systemd-sysusers >/dev/null 2>&1; then
        if [ -n "$ROOT" ]; then
            systemd-sysusers --root="$ROOT" "$ROOT/etc/sysusers.d/privstack-relay.conf"
        else
            systemd-sysusers /etc/sysusers.d/privstack-relay.conf
        fi
    elif [ -z "$ROOT" ]; then
        useradd --system --home-dir /var/lib/privstack --no-create-home \
            --shell /usr/sbin/nologin --comment "PrivStack relay" privstack
    fi
    has_user && { echo "created user privstack"; CHANGED=1; }
fi
STATE="$ROOT/var/lib/privstack"
if [ ! -d "$STATE" ]; then
    install -d -m 750 "$STATE"
    echo "created /var/lib/privstack"
    CHANGED=1
fi
if [ -n "$ROOT" ]; then
    uid=$(awk -F: '$1 == "privstack" { print $3 }' "$ROOT/etc/passwd" 2>/dev/null)
    gid=$(awk -F: '$1 == "privstack" { print $4 }' "$ROOT/etc/passwd" 2>/dev/null)
    if [ -n "$uid" ] && [ "$(stat -c %u:%g "$STATE")" != "$uid:$gid" ]; then
        chown "$uid:$gid" "$STATE"
        CHANGED=1
    fi
elif [ "$(stat -c %U "$STATE")" != privstack ]; then
    chown privstack:privstack "$STATE"
    CHANGED=1
fi
if [ "$(stat -c %a "$STATE")" != 750 ]; then
    chmod 750 "$STATE"
    CHANGED=1
fi

# Enable at boot: the symlink systemctl enable would make, made by hand so it also
# works inside --root trees.
WANTS="$ROOT/etc/systemd/system/multi-user.target.wants"
if [ ! -L "$WANTS/privstack-relay.service" ]; then
    mkdir -p "$WANTS"
    ln -s /etc/systemd/system/privstack-relay.service "$WANTS/privstack-relay.service"
    echo "enabled privstack-relay.service"
    CHANGED=1
fi

# Ports the relay will use, from relay.env as systemd reads it (the relay's own
# check-config; the binary is this machine's, checked above).
ENV_FILE="$ROOT/etc/privstack-relay/relay.env"
if [ -z "$ROOT" ]; then
    if ! SETTINGS=$("$BIN" check-config --env-file "$ENV_FILE"); then
        echo "install.sh: $ENV_FILE is refused (above); the relay will not start until it is fixed" >&2
        SETTINGS=""
    fi
    QUIC_PORT=$(settings_port PRIVSTACK_RELAY_PORT 4001)
    HTTP_PORT=$(settings_port PRIVSTACK_RELAY_HTTP_PORT 4002)
fi

if [ -z "$ROOT" ]; then
    systemctl daemon-reload
    [ "$FIREWALL" -eq 1 ] && open_ports
    if [ "$START" -eq 1 ]; then
        if [ "$CHANGED" -eq 1 ]; then
            systemctl restart privstack-relay.service
        else
            systemctl start privstack-relay.service
        fi
        sleep 1
        systemctl --no-pager --lines=0 status privstack-relay.service || true
        echo "peer ID: $(runuser -u privstack -- /usr/local/bin/privstack-relay keygen \
            --identity /var/lib/privstack/relay-identity.key 2>/dev/null || echo unknown)"
    fi
fi

if [ "$CHANGED" -eq 0 ]; then
    echo "privstack-relay is already installed; nothing changed"
fi
