#!/usr/bin/env bash
# Extra set-up for bench/ on top of scripts/setup.sh: nginx (the backends), gcc (builds the load
# client at run time) and the `bench` Python extra (matplotlib for the plots, tqdm for progress).
# Idempotent and fast when already done; python -m bench and tests/test_bench.py call it.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv=${ZP_VENV:-$here/.venv}
stamp_dir=/var/tmp/zeroproxy
mkdir -p "$stamp_dir"

log() { printf 'setup-bench: %s\n' "$*" >&2; }

bash "$here/scripts/setup.sh"

pkgs=(nginx-light gcc libc6-dev iptables nftables util-linux)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if [ ! -f "$stamp_dir/apt-updated" ] || [ -n "$(find "$stamp_dir/apt-updated" -mmin +60)" ]; then
        apt-get update -qq
        touch "$stamp_dir/apt-updated"
    fi
    # nginx's package starts a system-wide nginx on port 80; policy-rc.d keeps it from starting,
    # since the benchmark runs its own nginx processes inside pod namespaces only.
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod +x "$policy"
        created_policy=1
    fi
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || {
        ((created_policy)) && rm -f "$policy"
        exit 1
    }
    ((created_policy)) && rm -f "$policy"
    # The package enables the service for the next boot; the benchmark never wants it.
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
        systemctl disable --now nginx >/dev/null 2>&1 || true
    fi
fi

if ! "$venv/bin/python" -c 'import matplotlib, tqdm' 2>/dev/null; then
    log "installing the bench extra (matplotlib, tqdm) into $venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -e "$here[dev,bench]"
fi
