#!/usr/bin/env bash
# Make the signed apt repository of some .deb files.
#
#   release/apt-repo.sh OUTDIR DEB...
#
# OUTDIR (replaced) gets the layout apt expects, made with Debian's apt-ftparchive:
#   pool/main/p/privstack-relay/*.deb
#   dists/stable/main/binary-{amd64,arm64}/Packages{,.gz}
#   dists/stable/{Release,InRelease,Release.gpg}
#   privstack-relay-archive-keyring.pgp   the public key that signed it (for signed-by=)
#
# The signing key, from the environment:
#   APT_SIGNING_KEY          a file holding the OpenPGP secret key (armored or not);
#                            the release workflow writes its repository secret here
#   APT_SIGNING_FINGERPRINT  or: the fingerprint of a secret key in GNUPGHOME's keyring
# With neither, a throw-away ed25519 test key is made (valid 30 days), the script says
# so, and its keyring is kept as OUTDIR.test-key/ (outside the repository, never
# published) so tests can sign a newer repository with it. Images and install.sh trust
# release/privstack-relay-archive-keyring.pgp, the project's key; the release workflow
# refuses a repository signed by any other key.
set -euo pipefail

[ $# -ge 2 ] || { echo "usage: release/apt-repo.sh OUTDIR DEB..." >&2; exit 2; }
OUT=$1; shift
mkdir -p "$(dirname "$OUT")"
OUT="$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")"
for deb in "$@"; do
    [ -f "$deb" ] || { echo "release/apt-repo.sh: $deb not found" >&2; exit 1; }
done

SUITE=stable
COMPONENT=main
ARCHES="amd64 arm64"

work=$(mktemp -d)
OWN_GNUPG=""
# gpg starts an agent for its home directory: stop the agents of the homes made here.
cleanup() {
    if [ -n "$OWN_GNUPG" ]; then
        gpgconf --kill gpg-agent 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
export GNUPGHOME
if [ -n "${APT_SIGNING_KEY:-}" ]; then
    [ -r "$APT_SIGNING_KEY" ] || { echo "release/apt-repo.sh: APT_SIGNING_KEY=$APT_SIGNING_KEY is not a readable file" >&2; exit 1; }
    GNUPGHOME="$work/gnupg" OWN_GNUPG=1
    install -d -m 700 "$GNUPGHOME"
    gpg --batch --quiet --import "$APT_SIGNING_KEY"
    fpr=$(gpg --batch --quiet --with-colons --list-secret-keys 2>/dev/null | awk -F: '$1 == "fpr" { print $10; exit }')
    [ -n "$fpr" ] || { echo "release/apt-repo.sh: APT_SIGNING_KEY=$APT_SIGNING_KEY holds no secret key" >&2; exit 1; }
elif [ -n "${APT_SIGNING_FINGERPRINT:-}" ]; then
    GNUPGHOME=${GNUPGHOME:-$HOME/.gnupg}
    fpr=$APT_SIGNING_FINGERPRINT
    gpg --batch --list-secret-keys "$fpr" >/dev/null 2>&1 \
        || { echo "release/apt-repo.sh: no secret key $fpr in $GNUPGHOME" >&2; exit 1; }
else
    GNUPGHOME="$OUT.test-key" OWN_GNUPG=1
    rm -rf "$GNUPGHOME"
    install -d -m 700 "$GNUPGHOME"
    gpg --batch --quiet --passphrase '' --quick-generate-key \
        "privstack-relay throw-away test archive key" ed25519 sign 30d
    fpr=$(gpg --batch --quiet --with-colons --list-secret-keys 2>/dev/null | awk -F: '$1 == "fpr" { print $10; exit }')
    echo "release/apt-repo.sh: no APT_SIGNING_KEY or APT_SIGNING_FINGERPRINT given:" >&2
    echo "release/apt-repo.sh: signed with a throw-away test key $fpr (keyring: $GNUPGHOME)" >&2
    echo "release/apt-repo.sh: this repository is for tests only; publish none signed so" >&2
fi

rm -rf "$OUT"
mkdir -p "$OUT/pool/$COMPONENT/p/privstack-relay"
cp "$@" "$OUT/pool/$COMPONENT/p/privstack-relay/"
cd "$OUT"
for arch in $ARCHES; do
    dir="dists/$SUITE/$COMPONENT/binary-$arch"
    mkdir -p "$dir"
    apt-ftparchive --arch "$arch" packages pool > "$dir/Packages"
    gzip -n -9 -c "$dir/Packages" > "$dir/Packages.gz"
done
# Origin and Label are what unattended-upgrades' Origins-Pattern matches (the images
# allow origin=PrivStack,label=privstack-relay).
apt-ftparchive \
    -o APT::FTPArchive::Release::Origin=PrivStack \
    -o APT::FTPArchive::Release::Label=privstack-relay \
    -o APT::FTPArchive::Release::Suite=$SUITE \
    -o APT::FTPArchive::Release::Codename=$SUITE \
    -o "APT::FTPArchive::Release::Architectures=$ARCHES" \
    -o APT::FTPArchive::Release::Components=$COMPONENT \
    -o "APT::FTPArchive::Release::Description=privstack-relay packages" \
    release "dists/$SUITE" > "$work/Release"
mv "$work/Release" "dists/$SUITE/Release"
sign=(gpg --batch --yes --quiet --pinentry-mode loopback --passphrase '' --digest-algo SHA512
      --local-user "$fpr")
"${sign[@]}" --clearsign -o "dists/$SUITE/InRelease" "dists/$SUITE/Release"
"${sign[@]}" --armor --detach-sign -o "dists/$SUITE/Release.gpg" "dists/$SUITE/Release"
gpg --batch --export "$fpr" > privstack-relay-archive-keyring.pgp
echo "$OUT: signed by $fpr"
