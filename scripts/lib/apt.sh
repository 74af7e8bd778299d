# Shared by the set-up and build scripts (sourced, not run): install the Debian packages that
# are missing. The caller defines log().
#
# apt's lists may be stale or absent on a fresh machine: they are refreshed at most once an hour
# (a stamp under $ZP_CACHE_DIR). A package's daemon (nginx, etcd) is kept from starting at
# install time: the project runs its own instances inside namespaces, on ports of its own.

zp_missing_packages() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
    done
}

zp_apt_install() {
    local missing stamp policy=/usr/sbin/policy-rc.d created=0 rc=0
    mapfile -t missing < <(zp_missing_packages "$@")
    ((${#missing[@]})) || return 0
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    stamp=${ZP_CACHE_DIR:-/var/tmp/zeroproxy}/apt-updated
    mkdir -p "$(dirname "$stamp")"
    if [ ! -f "$stamp" ] || [ -n "$(find "$stamp" -mmin +60)" ]; then
        apt-get -o DPkg::Lock::Timeout=600 update -qq || return 1
        touch "$stamp"
    fi
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod +x "$policy"
        created=1
    fi
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || rc=$?
    if ((created)); then
        rm -f "$policy"
    fi
    return "$rc"
}
