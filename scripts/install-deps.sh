#!/bin/sh
# Install the Debian packages the project, its tests and its demo need.
# Idempotent; safe to run on a fresh Debian 12 machine as root (or with sudo).
set -eu
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
PKGS="build-essential python3-dev pkg-config libsystemd-dev
cryptsetup cryptsetup-bin e2fsprogs util-linux kmod iproute2
fuse3 libfuse2 libfuse3-dev
initramfs-tools busybox linux-image-amd64 qemu-system-x86 qemu-utils mmdebstrap
swtpm swtpm-tools libtss2-dev tpm2-tools
clang libclang-rt-14-dev systemd curl openssl ca-certificates zstd
nginx-light
debhelper lintian python3.11-venv python3-pip pesign"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "install-deps: installing:$missing"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086
    $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
