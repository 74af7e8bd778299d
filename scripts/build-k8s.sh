#!/usr/bin/env bash
# Build the Kubernetes 1.20.2 binaries a real kubeadm cluster in the test bed needs, offline,
# from Debian bookworm's `kubernetes` source package (prepared by scripts/lib/k8s-src.sh, shared
# with build-apiserver.sh). Prints the bin directory on stdout:
#   $ZP_CACHE_DIR/k8s-1.20.2/bin/   (default /var/tmp/zeroproxy)
#
#   kubeadm kubelet kubectl kube-apiserver kube-controller-manager kube-scheduler kube-proxy
#                 from cmd/, CGO_ENABLED=0, stamped v1.20.2 as hack/lib/version.sh would
#   crictl        our stand-in (scripts/crictl/main.go): Debian has no cri-tools and kubeadm
#                 1.20 needs crictl on PATH; built inside the tree to use its vendored CRI client
#   pause         gcc -static on build/pause/linux/pause.c, versioned as its Makefile does
#   agnhost       test/images/agnhost, the e2e tests' universal server
#   e2e.test      test/e2e; its bindata.go (missing from the tarball) generated first
#
# Binaries are built in that order (what a cluster needs first comes first) and each is moved
# into place only after its --version check passed, so a reader can use the ones already there
# while the rest build. A cold build from nothing (fetch, prepare, the apiserver, all the above)
# takes about 20 CPU-minutes, 28 minutes of wall time on 2 busy shared cores; the kubelet alone
# is about half of it. When every requested binary exists the script only looks at the files. Idempotent and safe to run concurrently
# (flock).
#
#   scripts/build-k8s.sh                      build whatever is missing, print the bin dir
#   scripts/build-k8s.sh kubeadm kubelet      only those (names as in the bin dir)
#   ZP_CACHE_DIR=/somewhere scripts/build-k8s.sh
set -euo pipefail
# One brace group, so bash parses the whole file before running any of it: editing the script
# during a long build cannot change what the build runs.
{

here=$(cd "$(dirname "$0")" && pwd)
log() { printf 'build-k8s: %s\n' "$*" >&2; }
die() { printf 'build-k8s: ERROR: %s\n' "$*" >&2; exit 1; }

# shellcheck source=scripts/lib/k8s-src.sh
. "$here/lib/k8s-src.sh"

bin_dir=$zp_k8s_cache_dir/k8s-$zp_k8s_version/bin
crictl_src=$here/crictl/main.go
all=(pause crictl kubeadm kubectl kubelet kube-apiserver kube-controller-manager kube-scheduler
     kube-proxy agnhost e2e.test)

if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
    sed -n '2,/^set -euo/{/^set -euo/d; s/^# \{0,1\}//; p}' "$0"
    exit 0
fi

# A binary is current when it exists; crictl also when it is newer than its source (ours, so
# it changes; the tree's sources do not).
current() {
    [ -x "$bin_dir/$1" ] || return 1
    [ "$1" != crictl ] || [ "$bin_dir/crictl" -nt "$crictl_src" ]
}


# shellcheck source=scripts/lib/binaries.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/binaries.sh"
zp_select_binaries "$@"
zp_done_or_lock "$zp_k8s_cache_dir/build-k8s.lock"

log "building ${todo[*]} into $bin_dir"
zp_k8s_src_prepare
mkdir -p "$bin_dir"

# Each builder writes $1 (a temporary name next to the final one) and checks it.
build_go() {  # build_go TMP PKG [build|test] -- VERSION-ARGS...
    local tmp=$1 pkg=$2 mode=$3
    shift 4
    zp_k8s_go_build "$pkg" "$tmp" "$mode"
    zp_check_version "$tmp" "v$zp_k8s_version" "$@"
}

build_pause() {
    local tmp=$1 tag
    if [ -n "$(zp_missing_packages gcc libc6-dev)" ]; then
        [ "$(id -u)" = 0 ] || die "need root to install gcc libc6-dev (for pause)"
        zp_apt_install gcc libc6-dev || die "apt-get install gcc libc6-dev failed"
    fi
    # The version pause.c reports, as build/pause/Makefile makes it: v$(TAG)-$(git describe),
    # and the release tag is what git describe would name.
    tag=$(awk '$1 == "TAG" && $2 == "=" { print $3 }' "$zp_k8s_tree/build/pause/Makefile")
    [ -n "$tag" ] || die "no 'TAG = ...' line in $zp_k8s_tree/build/pause/Makefile"
    nice -n 10 gcc -Os -Wall -Werror -static "-DVERSION=v$tag-v$zp_k8s_version" \
        -o "$tmp" "$zp_k8s_tree/build/pause/linux/pause.c" || die "gcc on build/pause/linux/pause.c failed"
    zp_check_version "$tmp" "v$tag-v$zp_k8s_version" -v
}

build_crictl() {
    local tmp=$1 dir=$zp_k8s_tree/cmd/zp-crictl
    [ -f "$crictl_src" ] || die "$crictl_src missing"
    mkdir -p "$dir"
    cp "$crictl_src" "$dir/main.go"
    zp_k8s_go_build cmd/zp-crictl "$tmp"
    zp_check_version "$tmp" "v$zp_k8s_version" --version
}

build_apiserver() {
    local tmp=$1 built
    # build-apiserver.sh keeps its own cached copy (DevCluster runs that one); link it here.
    built=$(bash "$here/build-apiserver.sh") || die "scripts/build-apiserver.sh failed"
    ln -f "$built" "$tmp" 2>/dev/null || cp "$built" "$tmp"
    zp_check_version "$tmp" "v$zp_k8s_version" --version
}

build_agnhost() {
    local tmp=$1 want
    zp_k8s_go_build test/images/agnhost "$tmp"
    # agnhost carries its own version (its image tag), not the release's.
    want=$(cat "$zp_k8s_tree/test/images/agnhost/VERSION")
    zp_check_version "$tmp" "$want" --version
}

# test/e2e embeds its manifests and test data with go-bindata; the tarball lacks the generated
# file. Generated with the vendored go-bindata and the arguments of hack/generate-bindata.sh.
build_e2e() {
    local tmp=$1 out=test/e2e/generated/bindata.go
    if [ ! -s "$zp_k8s_tree/$out" ]; then
        log "generating $out"
        (
            cd "$zp_k8s_tree"
            nice -n 10 go build -o "$zp_k8s_src_dir/go-bindata" ./vendor/github.com/go-bindata/go-bindata/go-bindata
            nice -n 10 "$zp_k8s_src_dir/go-bindata" -nometadata -o "$out.tmp" -pkg generated \
                -ignore .jpg -ignore .png -ignore .md -ignore 'BUILD(\.bazel)?' \
                "test/conformance/testdata/..." \
                "test/e2e/testing-manifests/..." \
                "test/e2e_node/testing-manifests/..." \
                "test/images/..." \
                "test/fixtures/..."
            gofmt -s -w "$out.tmp"
            mv "$out.tmp" "$out"
        ) || die "generating $out with the vendored go-bindata failed"
    fi
    build_go "$tmp" test/e2e test -- --version
}

build_one() {  # build_one NAME TMP
    local name=$1 tmp=$2
    case "$name" in
        pause) build_pause "$tmp" ;;
        crictl) build_crictl "$tmp" ;;
        kube-apiserver) build_apiserver "$tmp" ;;
        agnhost) build_agnhost "$tmp" ;;
        e2e.test) build_e2e "$tmp" ;;
        kubectl) build_go "$tmp" cmd/kubectl build -- version --client --short ;;
        kubeadm) build_go "$tmp" cmd/kubeadm build -- version -o short ;;
        *) build_go "$tmp" "cmd/$name" build -- --version ;;
    esac
}
zp_build_todo build_one
}
