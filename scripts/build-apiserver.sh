#!/usr/bin/env bash
# Build a real kube-apiserver for the tests, offline, from Debian bookworm's `kubernetes` source
# package, and make sure etcd is installed next to it. Prints the path of the binary on stdout.
#
# No registry reachable from our machines ships a kube-apiserver binary, but Debian's source
# package carries the whole Kubernetes 1.20.2 tree including vendor/, so Debian's Go 1.19 can
# build it without any network access beyond the Debian mirror. Two things need fixing first:
#   - the tarball lacks the generated OpenAPI definitions: run the vendored openapi-gen;
#   - the vendored modern-go/reflect2 1.0.1 crashes under Go >= 1.18 on the first CRD request:
#     swap in Debian's reflect2 1.0.2.
#
# The binary is cached under $ZP_CACHE_DIR (default /var/tmp/zeroproxy), keyed by version, so
# only the first run builds (a few minutes on 2 cores); later runs take well under a second.
# Idempotent and safe to run concurrently (flock). The system's apt configuration is never
# changed: the source package is fetched with a private sources list and private list/cache dirs.
#
#   scripts/build-apiserver.sh                    build if missing, print the binary path
#   ZP_CACHE_DIR=/somewhere scripts/build-apiserver.sh
#   ZP_KEEP_BUILD=1 scripts/build-apiserver.sh    keep the build tree (debugging the build)
set -euo pipefail
# The body is one brace group, so bash parses the whole file before running any of it: editing
# the script (e.g. a git pull) during a multi-minute build cannot change what the build runs.
{

k8s_version=1.20.2
cache_dir=${ZP_CACHE_DIR:-/var/tmp/zeroproxy}
out_dir=$cache_dir/kube-apiserver-$k8s_version
binary=$out_dir/kube-apiserver
build_dir=$cache_dir/build-kube-apiserver-$k8s_version
apt_dir=$cache_dir/apt-src
go_root=/usr/lib/go-1.19
# What DevCluster runs: etcd, etcdctl (compaction, to force 410 Gone) and openssl (its certs).
runtime_pkgs=(etcd-server etcd-client openssl)
build_pkgs=(golang-1.19-go golang-github-modern-go-reflect2-dev dpkg-dev xz-utils
            debian-archive-keyring ca-certificates)

log() { printf 'build-apiserver: %s\n' "$*" >&2; }
die() { printf 'build-apiserver: ERROR: %s\n' "$*" >&2; exit 1; }

# shellcheck source=scripts/lib/apt.sh
. "$(dirname "$0")/lib/apt.sh"

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

mkdir -p "$cache_dir"
exec 9>"$cache_dir/build-kube-apiserver.lock"
if ! flock -n 9; then
    log "another build holds $cache_dir/build-kube-apiserver.lock, waiting"
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
apt_install "${build_pkgs[@]}"
[ -x "$go_root/bin/go" ] || die "$go_root/bin/go missing after installing golang-1.19-go"
reflect2_src=/usr/share/gocode/src/github.com/modern-go/reflect2
[ -f "$reflect2_src/reflect2.go" ] || die "$reflect2_src missing after installing golang-github-modern-go-reflect2-dev"

start=$(date +%s)

# --- fetch the source package with a private apt configuration --------------------------------
# deb-src entries are derived from the system's own Debian bookworm sources so that whichever
# mirror this machine is configured for is the one we use; nothing host-specific is in the repo.
system_source_uris() {
    local f
    # deb822 files: URIs of stanzas that are of type deb and name a bookworm suite.
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk 'BEGIN { RS = ""; FS = "\n" }
             {
               types = ""; uris = ""; suites = ""; comps = ""
               for (i = 1; i <= NF; i++) {
                 if ($i ~ /^#/) continue
                 split($i, kv, ":"); key = tolower(kv[1]); val = substr($i, length(kv[1]) + 2)
                 if (key == "types") types = val
                 else if (key == "uris") uris = val
                 else if (key == "suites") suites = val
                 else if (key == "components") comps = val
               }
               if (types ~ /(^|[ \t])deb([ \t]|$)/ && suites ~ /(^|[ \t])bookworm(-updates|-security)?([ \t]|$)/ \
                   && comps ~ /(^|[ \t])main([ \t]|$)/ && $0 !~ /(^|\n)Enabled:[ \t]*no/) {
                 n = split(uris, u, /[ \t]+/)
                 ns = split(suites, s, /[ \t]+/)
                 for (j = 1; j <= n; j++) for (k = 1; k <= ns; k++)
                   if (u[j] != "" && s[k] ~ /^bookworm(-updates|-security)?$/) print u[j], s[k]
               }
             }' "$f"
    done
    # One-line format: "deb [options] URI suite components..."
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" |
            awk '$1 == "deb" && $3 ~ /^bookworm(-updates|-security)?$/ {
                   for (i = 4; i <= NF; i++) if ($i == "main") { print $2, $3; break }
                 }'
    done
}

mapfile -t entries < <(system_source_uris | sort -u)
((${#entries[@]})) || die "no Debian bookworm 'deb' entry with component main in /etc/apt/sources.list or
/etc/apt/sources.list.d/*.sources; cannot tell which Debian mirror to fetch the kubernetes source from"

mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/sources.list.d"
: > "$apt_dir/sources.list.d/zeroproxy-src.sources"
for e in "${entries[@]}"; do
    read -r uri suite <<<"$e"
    printf 'Types: deb-src\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: %s\n\n' \
        "$uri" "$suite" /usr/share/keyrings/debian-archive-keyring.gpg \
        >> "$apt_dir/sources.list.d/zeroproxy-src.sources"
done
private_apt=(-o "Dir::Etc::SourceList=/dev/null"
             -o "Dir::Etc::SourceParts=$apt_dir/sources.list.d"
             -o "Dir::State::Lists=$apt_dir/lists"
             -o "Dir::Cache=$apt_dir/cache"
             -o "APT::Sandbox::User=root")
log "fetching the kubernetes source package (deb-src from: ${entries[*]})"
apt-get "${private_apt[@]}" update -qq || die "apt-get update with the private deb-src list failed"

src_version=$(apt-cache "${private_apt[@]}" showsrc kubernetes 2>/dev/null |
              awk '/^Version:/ { print $2 }' | sort -V | tail -n 1)
[ -n "$src_version" ] || die "no source package 'kubernetes' on ${entries[*]}"
case "$src_version" in
    *really"$k8s_version"-*) ;;
    *) die "kubernetes source version $src_version is not Kubernetes $k8s_version; update k8s_version here" ;;
esac

rm -rf "$build_dir"
src_parent=$build_dir/gopath/src/k8s.io
mkdir -p "$src_parent"
(cd "$build_dir" && apt-get "${private_apt[@]}" source -qq --download-only "kubernetes=$src_version" >&2) \
    || die "apt-get source kubernetes=$src_version failed"
dsc=$(ls "$build_dir"/kubernetes_*.dsc)
# Extract with Debian's patches applied. Hashes were already checked by apt against the signed
# Sources index, so the .dsc's own (usually absent) signature check is not needed.
dpkg-source --no-check -x "$dsc" "$src_parent/kubernetes" >&2 || die "dpkg-source -x $dsc failed"
rm -f "$build_dir"/kubernetes_*
tree=$src_parent/kubernetes
[ -d "$tree/vendor" ] && [ -d "$tree/cmd/kube-apiserver" ] || die "$tree does not look like a Kubernetes tree"

# --- build -----------------------------------------------------------------------------------
export GOPATH=$build_dir/gopath
export GOCACHE=$build_dir/gocache
export GO111MODULE=off GOPROXY=off GOFLAGS= CGO_ENABLED=0
export PATH=$go_root/bin:$PATH
cd "$tree"

# Debian's reflect2 1.0.2 replaces the vendored 1.0.1 (which crashes under Go >= 1.18).
rm -rf vendor/github.com/modern-go/reflect2
cp -r "$reflect2_src" vendor/github.com/modern-go/reflect2

# OpenAPI definitions. The inputs are chosen the way Kubernetes' own Makefile does
# (build/root/Makefile.generated_files): every package with a +k8s:openapi-gen= tag, except the
# code-generator examples and sample-apiserver. Its check is reused too: the API rule violations
# openapi-gen reports must equal the tree's known list, which proves the input set matches.
log "generating OpenAPI definitions"
go build -o "$build_dir/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen \
    || die "building the vendored openapi-gen failed"
mapfile -t openapi_dirs < <(grep -rl --include='*.go' '^// *+k8s:openapi-gen=' pkg staging/src |
    xargs -n1 dirname |
    grep -v -e '^staging/src/k8s.io/code-generator/' -e '^staging/src/k8s.io/sample-apiserver/' |
    sed -e 's#^staging/src/##' -e 's#^pkg/#k8s.io/kubernetes/pkg/#' | LC_ALL=C sort -u)
((${#openapi_dirs[@]})) || die "found no packages tagged +k8s:openapi-gen="
inputs=$(IFS=,; echo "${openapi_dirs[*]}")
report=$build_dir/openapi-violations.report
"$build_dir/openapi-gen" \
    --go-header-file vendor/k8s.io/code-generator/hack/boilerplate.go.txt \
    --input-dirs "$inputs" \
    --output-base "$GOPATH/src" \
    --output-package k8s.io/kubernetes/pkg/generated/openapi \
    --output-file-base zz_generated.openapi \
    --report-filename "$report" \
    >"$build_dir/openapi-gen.log" 2>&1 \
    || { tail -n 30 "$build_dir/openapi-gen.log" >&2; die "openapi-gen failed"; }
diff -u api/api-rules/violation_exceptions.list "$report" >&2 \
    || die "openapi-gen's API rule report differs from api/api-rules/violation_exceptions.list:
the OpenAPI input packages do not match what Kubernetes' Makefile would use"
[ -s pkg/generated/openapi/zz_generated.openapi.go ] || die "openapi-gen wrote no zz_generated.openapi.go"

log "building cmd/kube-apiserver (takes a few minutes on a cold cache)"
# Stamp the version the way hack/lib/version.sh does; /version answers from client-go's copy.
ldflags="-s -w"
for pkg in k8s.io/kubernetes/vendor/k8s.io/component-base/version k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=v$k8s_version -X $pkg.gitMajor=$(cut -d. -f1 <<<"$k8s_version")"
    ldflags+=" -X $pkg.gitMinor=$(cut -d. -f2 <<<"$k8s_version") -X $pkg.gitTreeState=archive"
done
go build -trimpath -ldflags "$ldflags" -o "$build_dir/kube-apiserver" ./cmd/kube-apiserver \
    || die "go build ./cmd/kube-apiserver failed (tree kept in $build_dir)"
"$build_dir/kube-apiserver" --version >&2 || die "the built kube-apiserver does not run"

mkdir -p "$out_dir"
mv "$build_dir/kube-apiserver" "$binary.tmp"
mv "$binary.tmp" "$binary"
cd /
if [ -z "${ZP_KEEP_BUILD:-}" ]; then
    # The go cache holds read-only files; make them writable so rm can remove them.
    chmod -R u+w "$build_dir" 2>/dev/null || true
    rm -rf "$build_dir"
fi
log "built $binary in $(( $(date +%s) - start ))s"
echo "$binary"
exit 0
}
