#!/usr/bin/env bash
# Build every container image the real-cluster test bed loads, as docker-archive tars in one
# directory, and print that directory on stdout. Nothing comes from a registry:
#   - the node images kubeadm 1.20.2 names under imageRepository localhost/zp (pause,
#     kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy, etcd, a coredns
#     placeholder) and the e2e images (localhost/zp/e2e/agnhost:2.21, .../pause:3.2), written by
#     `python -m testbed.images build` from scripts/build-k8s.sh's binaries and Debian packages;
#   - zeroproxy's own image localhost/zeroproxy:<version>-<content hash> (scripts/build-image.sh).
# Load them with `ctr -n k8s.io images import DIR/<name>.tar`.
#
# Cached by content: when nothing changed this takes well under a second.
#
#   scripts/build-images.sh                      build or reuse, print /var/tmp/zeroproxy/images
#   ZP_CACHE_DIR=/elsewhere scripts/build-images.sh
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cache=${ZP_CACHE_DIR:-/var/tmp/zeroproxy}
images=$cache/images

log() { printf 'build-images: %s\n' "$*" >&2; }
die() { printf 'build-images: ERROR: %s\n' "$*" >&2; exit 1; }

# What the images copy from Debian: the programs of the e2e exec pods and kube-proxy's tools.
# shellcheck source=scripts/lib/apt.sh
. "$here/scripts/lib/apt.sh"
pkgs=(dash bash coreutils grep sed mawk findutils procps hostname iproute2 curl wget netcat-openbsd
      bind9-dnsutils iputils-ping libc-bin iptables conntrack etcd-server netbase)
# One dpkg-query for all of them (the fast path): each installed package prints one "ii".
installed=$(dpkg-query -W -f='${db:Status-Abbrev}\n' "${pkgs[@]}" 2>/dev/null | grep -c '^ii' || true)
if [ "$installed" != "${#pkgs[@]}" ] && [ -n "$(zp_missing_packages "${pkgs[@]}")" ]; then
    [ "$(id -u)" = 0 ] || die "need root to install $(zp_missing_packages "${pkgs[@]}" | tr '\n' ' ')"
    zp_apt_install "${pkgs[@]}" || die "apt-get install failed"
fi

[ -f "$here/scripts/build-k8s.sh" ] || die "scripts/build-k8s.sh is missing: it builds the Kubernetes binaries the images hold"
k8s_bin=$(bash "$here/scripts/build-k8s.sh") || die "scripts/build-k8s.sh failed"
[ -d "$k8s_bin" ] || die "scripts/build-k8s.sh printed $k8s_bin, which is not a directory"

mkdir -p "$images"
PYTHONPATH=$here python3 -m testbed.images build --out "$images" --k8s-bin "$k8s_bin" >/dev/null \
    || die "python -m testbed.images build failed"
bash "$here/scripts/build-image.sh" >/dev/null || die "scripts/build-image.sh failed"
echo "$images"
