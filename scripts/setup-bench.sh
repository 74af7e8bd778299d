#!/usr/bin/env bash
# Extra set-up for bench/ on top of scripts/setup.sh: nginx (the backends), gcc (builds the load
# client at run time) and the `bench` Python extra (matplotlib for the plots, tqdm for progress).
# Idempotent and fast when already done; python -m bench and tests/test_bench.py call it.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv=${ZP_VENV:-$here/.venv}

log() { printf 'setup-bench: %s\n' "$*" >&2; }
# shellcheck source=scripts/lib/apt.sh
. "$here/scripts/lib/apt.sh"

bash "$here/scripts/setup.sh"

pkgs=(nginx-light gcc libc6-dev iptables nftables util-linux)
# nginx's package would start a system-wide nginx on port 80; zp_apt_install keeps it from
# starting, and it is disabled for the next boot too: the benchmark runs its own nginx processes
# inside pod namespaces only.
if [ -n "$(zp_missing_packages "${pkgs[@]}")" ]; then
    zp_apt_install "${pkgs[@]}"
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
        systemctl disable --now nginx >/dev/null 2>&1 || true
    fi
fi

if ! "$venv/bin/python" -c 'import matplotlib, tqdm' 2>/dev/null; then
    log "installing the bench extra (matplotlib, tqdm) into $venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -e "$here[dev,bench]"
fi
