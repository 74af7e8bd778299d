# shellcheck shell=bash
# The parts every binary-building script shares (scripts/build-k8s.sh, build-k8s-current.sh):
# which binaries to build, which are missing, one lock, and a version check of what was built.
#
#   all=(kubeadm kubelet ...); bin_dir=...
#   current() { [ -x "$bin_dir/$1" ]; }      # optional: when a binary counts as built
#   zp_select_binaries "$@"                  # wanted=(...): the named ones, in all's order, else all
#   zp_done_or_lock LOCKFILE                 # prints $bin_dir and exits if nothing is missing;
#                                            # else holds the lock, todo=(...) = what is missing
#   zp_check_version FILE WANT ARGS...       # FILE ARGS... must run and print WANT
#   zp_build_todo BUILDER                    # BUILDER NAME TMP for each of todo, then moves TMP
#                                            # into $bin_dir, prints $bin_dir and exits
#
# The caller defines log() and die().

zp_select_binaries() {
    local name
    wanted=()
    if (($# == 0)); then
        wanted=("${all[@]}")
        return
    fi
    for name in "$@"; do
        [[ " ${all[*]} " == *" $name "* ]] || die "unknown binary '$name'; known: ${all[*]}"
    done
    for name in "${all[@]}"; do
        [[ " $* " == *" $name "* ]] && wanted+=("$name")
    done
    return 0
}

if ! declare -F current >/dev/null; then
    current() { [ -x "$bin_dir/$1" ]; }
fi

zp_missing() {
    local name
    for name in "${wanted[@]}"; do
        current "$name" || echo "$name"
    done
}

zp_done_or_lock() {
    local lock=$1
    # Fast path: nothing to do, no lock.
    if [ -z "$(zp_missing)" ]; then
        echo "$bin_dir"
        exit 0
    fi
    mkdir -p "$(dirname "$lock")"
    exec 9>"$lock"
    if ! flock -n 9; then
        log "another build holds $lock, waiting"
        flock 9
    fi
    mapfile -t todo < <(zp_missing)
    if ! ((${#todo[@]})); then
        echo "$bin_dir"
        exit 0
    fi
}

zp_check_version() {
    local file=$1 want=$2 out name
    shift 2
    name=$(basename "$file" .tmp)
    name=${name#.}
    out=$("$file" "$@" 2>&1) || die "the new $name does not run: $name $* says: $out"
    [[ "$out" == *"$want"* ]] || die "the new $name is not $want: $name $* says: $out"
    log "$name $*: $(head -n 1 <<<"$out")"
}

zp_build_todo() {
    local builder=$1 name start total_start
    total_start=$(date +%s)
    tmp=
    trap '[ -z "$tmp" ] || rm -f "$tmp"' EXIT
    for name in "${todo[@]}"; do
        start=$(date +%s)
        tmp=$bin_dir/.$name.tmp
        rm -f "$tmp"
        "$builder" "$name" "$tmp"
        mv -f "$tmp" "$bin_dir/$name"
        log "built $name in $(( $(date +%s) - start ))s ($(du -h "$bin_dir/$name" | cut -f1))"
    done
    log "done in $(( $(date +%s) - total_start ))s: ${todo[*]}"
    echo "$bin_dir"
    exit 0
}
