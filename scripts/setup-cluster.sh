#!/usr/bin/env bash
# What a node of the test bed's kubeadm cluster runs besides the Kubernetes binaries
# (scripts/build-k8s.sh) and the images (scripts/build-images.sh): Debian's container runtime and
# CNI plugins, and the tools kubeadm's preflight looks for. Idempotent; instant when installed.
#
#   scripts/setup-cluster.sh
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
log() { printf 'setup-cluster: %s\n' "$*" >&2; }
# shellcheck source=scripts/lib/apt.sh
. "$here/scripts/lib/apt.sh"

# containerd, runc and the CNI plugins (bridge, host-local, loopback in /usr/lib/cni) are the
# node's runtime; conntrack, iptables, socat, ethtool, ebtables are kubeadm preflight's list
# (iptables only for real kube-proxy in the e2e anchor run); openssl pins the CA for join.
pkgs=(containerd runc containernetworking-plugins conntrack iptables socat ethtool ebtables openssl
      util-linux curl)
zp_apt_install "${pkgs[@]}" || { log "apt-get install failed"; exit 1; }
# Debian's containerd package would start a system containerd on /run/containerd at the next
# boot; the bed runs one per node inside the node's namespaces, never the system one.
if [ -d /run/systemd/system ]; then
    systemctl disable --now containerd.service >/dev/null 2>&1 || true
fi
