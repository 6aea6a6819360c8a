#!/usr/bin/env bash
# Builds a Debian package of optimus with dpkg-deb (Debian's own tool; no
# download, no root: files are owned by root:root in the package):
#   /usr/bin/optimus, its man page and bash/zsh/fish completions (made by the
#   binary itself), the systemd template units optimus-consume@.service and
#   optimus-work@.service, the example config and the license; postinst
#   makes the `optimus` system user the units run as and /etc/optimus.
#
#   packaging/deb.sh                      # builds the release binary first
#   packaging/deb.sh --binary PATH --out DIR
# Prints the path of the .deb.
set -euo pipefail
cd "$(dirname "$0")/.."

BINARY=""
OUT="target/debian"
while [ $# -gt 0 ]; do
    case $1 in
    --binary) BINARY=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "usage: packaging/deb.sh [--binary PATH] [--out DIR]" >&2; exit 2 ;;
    esac
done
command -v dpkg-deb >/dev/null || { echo "dpkg-deb not found: install Debian's dpkg package" >&2; exit 1; }
if [ -z "$BINARY" ]; then
    cargo build --release --locked >&2
    BINARY=target/release/optimus
fi

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
ARCH=$(dpkg --print-architecture 2>/dev/null || echo amd64)
ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT
PKG="$ROOT/optimus_${VERSION}_${ARCH}"

install -D -m 755 "$BINARY" "$PKG/usr/bin/optimus"
if command -v strip >/dev/null; then
    strip --strip-unneeded "$PKG/usr/bin/optimus"
fi
mkdir -p "$PKG/usr/share/man/man1"
"$BINARY" man | gzip -9n >"$PKG/usr/share/man/man1/optimus.1.gz"
install -d "$PKG/usr/share/bash-completion/completions" \
    "$PKG/usr/share/zsh/vendor-completions" "$PKG/usr/share/fish/vendor_completions.d"
"$BINARY" completions bash >"$PKG/usr/share/bash-completion/completions/optimus"
"$BINARY" completions zsh >"$PKG/usr/share/zsh/vendor-completions/_optimus"
"$BINARY" completions fish >"$PKG/usr/share/fish/vendor_completions.d/optimus.fish"
install -D -m 644 -t "$PKG/lib/systemd/system" packaging/systemd/optimus-consume@.service \
    packaging/systemd/optimus-work@.service
install -D -m 644 packaging/optimus.toml.example "$PKG/usr/share/doc/optimus/examples/optimus.toml"
install -D -m 644 LICENSE "$PKG/usr/share/doc/optimus/copyright"

install -d "$PKG/DEBIAN"
cat >"$PKG/DEBIAN/control" <<EOF
Package: optimus
Version: $VERSION
Architecture: $ARCH
Maintainer: optimus developers <optimus@localhost>
Depends: libc6
Section: net
Priority: optional
Homepage: $(sed -n 's/^repository = "\(.*\)"/\1/p' Cargo.toml)
Description: Redis Pub/Sub to a durable Redis Stream, exactly once
 optimus bridges Redis Pub/Sub channels into Redis Streams with a pool of
 cooperating workers: while one worker is alive and subscribed, every
 message lands in the stream exactly once, in publish order. Run it with
 the systemd templates optimus-consume@<name> and optimus-work@<name>,
 configured by /etc/optimus/<name>.toml.
EOF
cat >"$PKG/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    if ! getent passwd optimus >/dev/null; then
        adduser --system --group --no-create-home --home /nonexistent optimus >/dev/null
    fi
    install -d -m 750 -o root -g optimus /etc/optimus
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null || true
    fi
fi
EOF
cat >"$PKG/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
fi
EOF
chmod 755 "$PKG/DEBIAN/postinst" "$PKG/DEBIAN/postrm"

mkdir -p "$OUT"
dpkg-deb --root-owner-group -Zxz --build "$PKG" "$OUT/" >/dev/null
echo "$OUT/optimus_${VERSION}_${ARCH}.deb"
