#!/usr/bin/env bash
# Build a real kube-apiserver for the tests, offline, from Debian bookworm's `kubernetes` source
# package, and make sure etcd is installed next to it. Prints the path of the binary on stdout.
#
# No registry reachable from our machines ships a kube-apiserver binary, but Debian's source
# package carries the whole Kubernetes 1.20.2 tree including vendor/, so Debian's Go 1.19 can
# build it without any network access beyond the Debian mirror. Fetching and fixing the tree is
# scripts/lib/k8s-src.sh's job: it keeps the prepared tree and its Go cache under the cache dir,
# shared with scripts/build-k8s.sh, which builds the other binaries of a cluster from it.
#
# The binary is cached under $ZP_CACHE_DIR (default /var/tmp/zeroproxy), keyed by version, so
# only the first run builds (a few minutes on 2 cores); later runs take well under a second.
# Idempotent and safe to run concurrently (flock). The system's apt configuration is never
# changed.
#
#   scripts/build-apiserver.sh                    build if missing, print the binary path
#   ZP_CACHE_DIR=/somewhere scripts/build-apiserver.sh
set -euo pipefail
# The body is one brace group, so bash parses the whole file before running any of it: editing
# the script (e.g. a git pull) during a multi-minute build cannot change what the build runs.
{

log() { printf 'build-apiserver: %s\n' "$*" >&2; }
die() { printf 'build-apiserver: ERROR: %s\n' "$*" >&2; exit 1; }

# shellcheck source=scripts/lib/k8s-src.sh
. "$(dirname "$0")/lib/k8s-src.sh"

out_dir=$zp_k8s_cache_dir/kube-apiserver-$zp_k8s_version
binary=$out_dir/kube-apiserver
# What DevCluster runs: etcd, etcdctl (compaction, to force 410 Gone) and openssl (its certs).
runtime_pkgs=(etcd-server etcd-client openssl)

apt_install() {
    local had_etcd=1
    [ -n "$(zp_missing_packages etcd-server)" ] && had_etcd=0
    [ -z "$(zp_missing_packages "$@")" ] && return 0
    [ "$(id -u)" = 0 ] || die "need root to install $(zp_missing_packages "$@" | tr '\n' ' ')"
    zp_apt_install "$@" || die "apt-get install failed"
    # Debian's etcd-server enables a system etcd on 127.0.0.1:2379 for the next boot. DevCluster
    # runs its own etcd on free ports: disable the system one.
    if ((!had_etcd)) && [[ " $* " == *" etcd-server "* ]] && [ -d /run/systemd/system ]; then
        systemctl disable --now etcd.service >/dev/null 2>&1 || true
    fi
}

ready() {
    [ -x "$binary" ] && [ -z "$(zp_missing_packages "${runtime_pkgs[@]}")" ]
}

# Fast path: nothing to do, no lock, no apt.
if ready; then
    echo "$binary"
    exit 0
fi

mkdir -p "$zp_k8s_cache_dir"
exec 9>"$zp_k8s_cache_dir/build-kube-apiserver.lock"
if ! flock -n 9; then
    log "another build holds $zp_k8s_cache_dir/build-kube-apiserver.lock, waiting"
    flock 9
fi
# A parallel caller may have finished while we waited for the lock.
if ready; then
    echo "$binary"
    exit 0
fi

apt_install "${runtime_pkgs[@]}"
if [ -x "$binary" ]; then
    echo "$binary"
    exit 0
fi
start=$(date +%s)
zp_k8s_src_prepare
log "building cmd/kube-apiserver (takes a few minutes on a cold cache)"
mkdir -p "$out_dir"
trap 'rm -f "$binary.tmp"' EXIT
zp_k8s_go_build cmd/kube-apiserver "$binary.tmp"
version=$("$binary.tmp" --version 2>&1) || die "the built kube-apiserver does not run: $version"
[[ "$version" == *"v$zp_k8s_version" ]] || die "the built kube-apiserver says '$version', expected v$zp_k8s_version"
log "$version"
mv -f "$binary.tmp" "$binary"
log "built $binary in $(( $(date +%s) - start ))s"
echo "$binary"
exit 0
}
