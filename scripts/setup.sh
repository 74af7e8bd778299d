#!/usr/bin/env bash
# Bring a fresh Debian 12 machine (root) to the point where zeroproxy builds, runs and tests.
# Idempotent: every step checks first, so a second run takes about a second.
#
#   scripts/setup.sh            system packages, kernel headers for bcc, bpffs, .venv
#   ZP_VENV=/path scripts/setup.sh   put the venv elsewhere
#   ZP_IMAGE_BUILD=1 scripts/setup.sh  inside a container image build: no bpffs mount and no
#                                     kernel-header links (the node's are mounted at run time)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv=${ZP_VENV:-$here/.venv}

log() { printf 'setup: %s\n' "$*" >&2; }
# shellcheck source=scripts/lib/apt.sh
. "$here/scripts/lib/apt.sh"

# --- system packages -------------------------------------------------------------------------
pkgs=(python3-bpfcc bpfcc-tools libbpf1 bpftool linux-headers-amd64 iproute2 nftables iptables
      python3-venv curl procps util-linux kmod)
zp_apt_install "${pkgs[@]}"

# --- kernel headers for bcc ------------------------------------------------------------------
# The running kernel ships no headers; Debian's newest linux-headers-*-amd64 works for the
# socket and TC programs. bcc looks in /lib/modules/$(uname -r)/{build,source}, and Debian
# splits the headers into an arch dir and a -common dir, so both links are needed.
kdir=/lib/modules/$(uname -r)
if [ -z "${ZP_IMAGE_BUILD:-}" ] && [ ! -e "$kdir/build/include" ]; then
    arch_dir=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | grep -v -e cloud -e rt | sort -V | tail -n 1)
    [ -n "$arch_dir" ] || { log "no /usr/src/linux-headers-*-amd64 found"; exit 1; }
    common_dir=${arch_dir%-amd64}-common
    [ -d "$common_dir" ] || { log "missing $common_dir"; exit 1; }
    mkdir -p "$kdir"
    ln -sfn "$arch_dir" "$kdir/build"
    ln -sfn "$common_dir" "$kdir/source"
    log "kernel headers: $kdir/build -> $arch_dir"
fi

# --- bpffs -----------------------------------------------------------------------------------
if [ -z "${ZP_IMAGE_BUILD:-}" ] && ! mountpoint -q /sys/fs/bpf; then
    mkdir -p /sys/fs/bpf
    mount -t bpf bpf /sys/fs/bpf
    log "mounted bpffs on /sys/fs/bpf"
fi

# --- Python venv -----------------------------------------------------------------------------
# bcc only exists as Debian's python3-bpfcc; a .pth file makes it importable from the venv
# without pulling in the rest of Debian's dist-packages.
py=${ZP_PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
    log "creating $venv"
    "$py" -m venv "$venv"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$site/_zeroproxy_bcc"
ln -sfn /usr/lib/python3/dist-packages/bcc "$site/_zeroproxy_bcc/bcc"
echo "$site/_zeroproxy_bcc" > "$site/zeroproxy-bcc.pth"
# The test bed and the benchmark (testbed/, bench/) are not in the wheel; the dev venv finds them
# in the checkout, from any working directory (the agents and helpers the tests start included).
echo "$here" > "$site/zeroproxy-dev.pth"

# Reinstall only when the project metadata changed since the last install.
want=$(sha256sum "$here/pyproject.toml" | cut -d' ' -f1)
have=$(cat "$venv/.zeroproxy-installed" 2>/dev/null || true)
if [ "$want" != "$have" ]; then
    log "installing zeroproxy and its Python dependencies into $venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -e "$here[dev]"
    echo "$want" > "$venv/.zeroproxy-installed"
fi

"$venv/bin/python" -c 'import bcc' || { log "bcc is not importable from $venv"; exit 1; }
