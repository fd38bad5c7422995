#!/usr/bin/env bash
# Build the Debian package of one release binary.
#
#   release/deb.sh BINARY DEB_ARCH VERSION OUTDIR
#
# Writes OUTDIR/privstack-relay_VERSION-1_DEB_ARCH.deb (DEB_ARCH: amd64 | arm64) from a
# staged tree with dpkg-deb: the static binary needs nothing cargo-deb adds (no shared
# library dependencies to compute), and dpkg-deb is already on every Debian machine,
# where cargo-deb would be one more crate to build. Reproducible: every mtime is
# SOURCE_DATE_EPOCH (dpkg-deb also uses it for the ar members), owners are root,
# modes are set here, and dpkg-deb sorts the entries.
#
# Environment: SOURCE_DATE_EPOCH (required), DEB_REVISION (default 1),
# DEB_MAINTAINER (default: the project's address below).
set -euo pipefail
cd "$(dirname "$0")/.."

[ $# -eq 4 ] || { echo "usage: release/deb.sh BINARY DEB_ARCH VERSION OUTDIR" >&2; exit 2; }
BIN=$1 ARCH=$2 VERSION=$3 OUT=$4
: "${SOURCE_DATE_EPOCH:?release/deb.sh: set SOURCE_DATE_EPOCH}"
REVISION=${DEB_REVISION:-1}
MAINTAINER=${DEB_MAINTAINER:-The privstack-relay developers <privstack-relay@users.noreply.github.com>}
case "$ARCH" in amd64|arm64) ;; *) echo "release/deb.sh: unknown DEB_ARCH $ARCH" >&2; exit 2 ;; esac
[ -f "$BIN" ] || { echo "release/deb.sh: $BIN not found" >&2; exit 1; }

umask 022
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root="$stage/root"
doc="$root/usr/share/doc/privstack-relay"

install -D -m 755 "$BIN" "$root/usr/bin/privstack-relay"
# The same unit as the archive's, with the package's binary path.
install -d "$root/usr/lib/systemd/system"
sed 's#/usr/local/bin/privstack-relay#/usr/bin/privstack-relay#g' systemd/privstack-relay.service \
    > "$root/usr/lib/systemd/system/privstack-relay.service"
install -D -m 644 systemd/privstack-relay.sysusers "$root/usr/lib/sysusers.d/privstack-relay.conf"
install -D -m 644 systemd/privstack-relay.tmpfiles "$root/usr/lib/tmpfiles.d/privstack-relay.conf"
install -D -m 644 systemd/privstack-relay.sysctl "$root/usr/lib/sysctl.d/60-privstack-relay.conf"
install -D -m 644 systemd/relay.env "$root/etc/privstack-relay/relay.env"
install -D -m 644 release/deb/copyright "$doc/copyright"
gzip -n -9 -c README.md > "$doc/README.md.gz"
{
    echo "privstack-relay ($VERSION-$REVISION) stable; urgency=medium"
    echo
    echo "  * privstack-relay $VERSION; the changes are in the project's release notes."
    echo
    echo " -- $MAINTAINER  $(LC_ALL=C date -u -R -d "@$SOURCE_DATE_EPOCH")"
} | gzip -n -9 > "$doc/changelog.Debian.gz"

install -D -m 644 release/deb/lintian-overrides "$root/usr/share/lintian/overrides/privstack-relay"

install -d "$root/DEBIAN"
install -m 755 release/deb/postinst release/deb/prerm release/deb/postrm "$root/DEBIAN/"
echo /etc/privstack-relay/relay.env > "$root/DEBIAN/conffiles"
size=$(du -sk --apparent-size --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: privstack-relay
Version: $VERSION-$REVISION
Architecture: $ARCH
Maintainer: $MAINTAINER
Installed-Size: $size
Section: net
Priority: optional
Homepage: https://github.com/privstack/privstack-relay
Description: libp2p circuit relay and Kademlia bootstrap node for PrivStack
 A stateless libp2p node for PrivStack clients: circuit relay v2 for devices
 behind NATs, a Kademlia DHT bootstrap node that stores their records, and a
 small HTTP API with its peer ID and dialable addresses.
 .
 Runs as the privstack-relay systemd service under its own user, with its
 settings in /etc/privstack-relay/relay.env and its identity key in
 /var/lib/privstack.
CONTROL
find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

mkdir -p "$OUT"
deb="$OUT/privstack-relay_${VERSION}-${REVISION}_${ARCH}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
