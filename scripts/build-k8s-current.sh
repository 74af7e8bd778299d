#!/usr/bin/env bash
# Build a current Kubernetes release's binaries from the `k8s.io/kubernetes` Go module, fetched
# through the Go module proxy, with the machine's Go (1.26). Prints the bin directory on stdout:
#   $ZP_CACHE_DIR/k8s-<version>/bin/   (default /var/tmp/zeroproxy)
#
#   kubeadm kubectl kubelet kube-apiserver kube-controller-manager kube-scheduler kube-proxy
#             from k8s.io/kubernetes/cmd/..., CGO_ENABLED=0, stamped v<version>
#   agnhost   k8s.io/kubernetes/test/images/agnhost, stamped with its own VERSION file
#   e2e.test  `go test -c k8s.io/kubernetes/test/e2e` (its manifests are go:embed files now)
#
# Upstream's go.mod points every k8s.io staging module at ./staging, which the module zip does
# not contain. So the build runs in a module of our own, written here into the cache: it
# requires k8s.io/kubernetes v<version>, replaces each staging module that upstream's replace
# block names with the published v0.<minor>.<patch> of the same release, and lists the
# binaries as `tool` lines so `go mod tidy` records exactly their dependencies. go.sum is
# checked against sum.golang.org like any module download.
#
# This is a side build (issue 10): the test cluster still runs 1.20.2 from
# scripts/build-k8s.sh; docs/test-cluster.md says why and what this build measured. A cold run
# downloads about 150 MB of module zips and spends most of its time compiling; each binary is
# moved into place only after its version check passed. When every requested binary exists the
# script only looks at the files. Idempotent and safe to run concurrently (flock). Compiles run
# under `nice -n 19`.
#
#   scripts/build-k8s-current.sh                      build whatever is missing, print the bin dir
#   scripts/build-k8s-current.sh kubeadm kubelet      only those (names as in the bin dir)
#   ZP_CACHE_DIR=/somewhere scripts/build-k8s-current.sh
set -euo pipefail
# One brace group, so bash parses the whole file before running any of it: editing the script
# during a long build cannot change what the build runs.
{

log() { printf 'build-k8s-current: %s\n' "$*" >&2; }
die() { printf 'build-k8s-current: ERROR: %s\n' "$*" >&2; exit 1; }

# The release. The staging modules of release 1.X.Y are published as v0.X.Y.
version=1.37.2
staging_version=v0.${version#*.}

cache_dir=${ZP_CACHE_DIR:-/var/tmp/zeroproxy}
work_dir=$cache_dir/k8s-current
mod_dir=$work_dir/mod-$version
bin_dir=$cache_dir/k8s-$version/bin
all=(kubeadm kubectl kubelet kube-apiserver kube-controller-manager kube-scheduler kube-proxy
     agnhost e2e.test)

if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
    sed -n '2,/^set -euo/{/^set -euo/d; s/^# \{0,1\}//; p}' "$0"
    exit 0
fi


# shellcheck source=scripts/lib/binaries.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/binaries.sh"
zp_select_binaries "$@"
zp_done_or_lock "$work_dir/build.lock"

command -v go >/dev/null || die "no 'go' on PATH (this build needs Go >= 1.26)"
# Everything the go command writes stays in the cache, never in the repository. GOTOOLCHAIN=local:
# a module that wants a newer Go fails here with the go command's own message instead of
# fetching a toolchain behind our back.
export GOCACHE=$work_dir/gocache GOMODCACHE=$work_dir/gomodcache
export GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0 GOTOOLCHAIN=local GOWORK=off
upstream_dir=$GOMODCACHE/k8s.io/kubernetes@v$version

# Write our module and resolve it. A module dir without .ready is from an interrupted run.
prepare_module() {
    local start staging m
    start=$(date +%s)
    rm -rf "$mod_dir"
    mkdir -p "$mod_dir"
    log "downloading k8s.io/kubernetes@v$version from the Go module proxy"
    go mod download "k8s.io/kubernetes@v$version" || die "go mod download k8s.io/kubernetes@v$version failed"
    [ -f "$upstream_dir/go.mod" ] || die "$upstream_dir/go.mod missing after go mod download"
    mapfile -t staging < <(sed -n '/^replace (/,/^)/p' "$upstream_dir/go.mod" |
                           awk '$2 == "=>" && $3 ~ /^\.\/staging\// { print $1 }')
    ((${#staging[@]})) || die "no './staging/...' replace lines in $upstream_dir/go.mod; the layout changed"
    {
        printf '// Written by scripts/build-k8s-current.sh; rewritten whenever the module is prepared.\n'
        printf 'module zeroproxy.local/k8s-current\n\ngo %s\n\n' \
            "$(awk '$1 == "go" { print $2; exit }' "$upstream_dir/go.mod")"
        printf 'require k8s.io/kubernetes v%s\n\nreplace (\n' "$version"
        for m in "${staging[@]}"; do
            printf '\t%s => %s %s\n' "$m" "$m" "$staging_version"
        done
        printf ')\n\ntool (\n'
        for m in kubeadm kubectl kubelet kube-apiserver kube-controller-manager kube-scheduler kube-proxy; do
            printf '\tk8s.io/kubernetes/cmd/%s\n' "$m"
        done
        printf '\tk8s.io/kubernetes/test/images/agnhost\n)\n'
    } > "$mod_dir/go.mod"
    (cd "$mod_dir" && nice -n 19 go mod tidy) \
        || die "go mod tidy in $mod_dir failed (staging modules pinned to $staging_version)"
    # test/e2e is a test package, so no tool line covers it; list it once so its test-only
    # dependencies are downloaded and recorded in go.sum now, not halfway through the build.
    (cd "$mod_dir" && go list -deps -test k8s.io/kubernetes/test/e2e >/dev/null) \
        || die "resolving k8s.io/kubernetes/test/e2e's dependencies in $mod_dir failed"
    touch "$mod_dir/.ready"
    log "prepared $mod_dir in $(( $(date +%s) - start ))s ($(du -sh "$GOMODCACHE/cache/download" | cut -f1) of module zips)"
}

# -ldflags that stamp the version where hack/lib/version.sh does: component-base's copy is what
# `--version` and kubeadm read (unstamped, kubeadm takes v1.0.0-placeholder-version and its
# skew checks fail), client-go's is what /version answers from.
ldflags() {
    local pkg flags="-s -w"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        flags+=" -X $pkg.gitVersion=v$version -X $pkg.gitMajor=${version%%.*}"
        flags+=" -X $pkg.gitMinor=$(cut -d. -f2 <<<"$version") -X $pkg.gitTreeState=archive"
    done
    printf '%s\n' "$flags"
}

# go_build TMP PKG build|test EXTRA-LDFLAGS
go_build() {
    local out=$1 pkg=$2 mode=$3 extra=$4 cmd
    if [ "$mode" = test ]; then cmd=(test -c); else cmd=(build); fi
    (cd "$mod_dir" && nice -n 19 go "${cmd[@]}" -trimpath -ldflags "$(ldflags)$extra" -o "$out" "$pkg") \
        || { rm -f "$out"; die "go ${cmd[*]} $pkg failed (module in $mod_dir)"; }
}

log "building ${todo[*]} into $bin_dir"
[ -f "$mod_dir/.ready" ] || prepare_module
mkdir -p "$bin_dir"

build_one() {  # build_one NAME TMP
    local name=$1 tmp=$2
    case "$name" in
        agnhost)
            agnhost_version=$(cat "$upstream_dir/test/images/agnhost/VERSION")
            go_build "$tmp" k8s.io/kubernetes/test/images/agnhost build " -X main.Version=$agnhost_version"
            zp_check_version "$tmp" "$agnhost_version" --version ;;
        e2e.test)
            go_build "$tmp" k8s.io/kubernetes/test/e2e test ""
            zp_check_version "$tmp" "v$version" --version ;;
        kubectl)
            go_build "$tmp" k8s.io/kubernetes/cmd/kubectl build ""
            zp_check_version "$tmp" "v$version" version --client ;;
        kubeadm)
            go_build "$tmp" k8s.io/kubernetes/cmd/kubeadm build ""
            zp_check_version "$tmp" "v$version" version -o short ;;
        *)
            go_build "$tmp" "k8s.io/kubernetes/cmd/$name" build ""
            zp_check_version "$tmp" "v$version" --version ;;
    esac
}
zp_build_todo build_one
}
