# Shared by build-apiserver.sh and build-k8s.sh (sourced, not run): fetch Debian bookworm's
# `kubernetes` source package and prepare it for offline builds of any Kubernetes 1.20.2 binary.
# The caller defines log() and die().
#
# The prepared tree is kept in the cache with its Go build cache, so each build script only pays
# for the packages its binaries add; the first one to run pays for the fetch (a minute) and the
# preparation (openapi-gen, a few minutes on 2 cores). Layout, under $zp_k8s_src_dir:
#   gopath/src/k8s.io/kubernetes   the tree, Debian's patches and our fixes applied
#   gocache/                       GOCACHE shared by every build from this tree
#   .prepared                      written last: a tree without it is half made and is redone
#
# Preparation (Debian's Go 1.19 builds the tree in GOPATH mode, with no network at all):
#   - the tarball lacks the generated OpenAPI definitions: run the vendored openapi-gen;
#   - the vendored modern-go/reflect2 1.0.1 crashes under Go >= 1.18 on the first CRD request:
#     swap in Debian's reflect2 1.0.2.
# The system's apt configuration is never changed: the source package is fetched with a private
# sources list and private list/cache dirs.

# shellcheck source=scripts/lib/apt.sh
. "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

zp_k8s_version=1.20.2
zp_k8s_cache_dir=${ZP_CACHE_DIR:-/var/tmp/zeroproxy}
zp_k8s_src_dir=$zp_k8s_cache_dir/k8s-src-$zp_k8s_version
zp_k8s_tree=$zp_k8s_src_dir/gopath/src/k8s.io/kubernetes
zp_k8s_go_root=/usr/lib/go-1.19
zp_k8s_build_pkgs=(golang-1.19-go golang-github-modern-go-reflect2-dev dpkg-dev xz-utils
                   debian-archive-keyring ca-certificates)
_zp_k8s_reflect2_src=/usr/share/gocode/src/github.com/modern-go/reflect2
_zp_k8s_apt_dir=$zp_k8s_cache_dir/apt-src

zp_k8s_src_ready() {
    [ -f "$zp_k8s_src_dir/.prepared" ] && [ -x "$zp_k8s_go_root/bin/go" ]
}

# The Go environment every build from the tree uses. Exported into the caller's shell.
zp_k8s_go_env() {
    export GOPATH=$zp_k8s_src_dir/gopath
    export GOCACHE=$zp_k8s_src_dir/gocache
    export GO111MODULE=off GOPROXY=off GOFLAGS= CGO_ENABLED=0
    export PATH=$zp_k8s_go_root/bin:$PATH
}

# -ldflags that stamp the version the way hack/lib/version.sh does: component-base's copy is what
# `--version` and kubeadm's version checks read, client-go's is what /version answers from.
zp_k8s_ldflags() {
    local pkg flags="-s -w" major minor
    major=$(cut -d. -f1 <<<"$zp_k8s_version")
    minor=$(cut -d. -f2 <<<"$zp_k8s_version")
    for pkg in k8s.io/kubernetes/vendor/k8s.io/component-base/version \
               k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
        flags+=" -X $pkg.gitVersion=v$zp_k8s_version -X $pkg.gitMajor=$major"
        flags+=" -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=archive"
    done
    printf '%s\n' "$flags"
}

# deb-src entries are derived from the system's own Debian bookworm sources so that whichever
# mirror this machine is configured for is the one we use; nothing host-specific is in the repo.
# shellcheck source=scripts/lib/debian-sources.sh
. "$(dirname "${BASH_SOURCE[0]}")/debian-sources.sh"

# Fetch and extract the source package into $zp_k8s_tree (Debian's patches applied).
_zp_k8s_fetch() {
    local entries e uri suite src_version dsc private_apt
    mapfile -t entries < <(zp_debian_source_uris | sort -u)
    ((${#entries[@]})) || die "no Debian bookworm 'deb' entry with component main in /etc/apt/sources.list or
/etc/apt/sources.list.d/*.sources; cannot tell which Debian mirror to fetch the kubernetes source from"

    mkdir -p "$_zp_k8s_apt_dir/lists/partial" "$_zp_k8s_apt_dir/cache/archives/partial" \
             "$_zp_k8s_apt_dir/sources.list.d"
    : > "$_zp_k8s_apt_dir/sources.list.d/zeroproxy-src.sources"
    for e in "${entries[@]}"; do
        read -r uri suite <<<"$e"
        printf 'Types: deb-src\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: %s\n\n' \
            "$uri" "$suite" /usr/share/keyrings/debian-archive-keyring.gpg \
            >> "$_zp_k8s_apt_dir/sources.list.d/zeroproxy-src.sources"
    done
    private_apt=(-o "Dir::Etc::SourceList=/dev/null"
                 -o "Dir::Etc::SourceParts=$_zp_k8s_apt_dir/sources.list.d"
                 -o "Dir::State::Lists=$_zp_k8s_apt_dir/lists"
                 -o "Dir::Cache=$_zp_k8s_apt_dir/cache"
                 -o "APT::Sandbox::User=root")
    log "fetching the kubernetes source package (deb-src from: ${entries[*]})"
    apt-get "${private_apt[@]}" update -qq || die "apt-get update with the private deb-src list failed"

    src_version=$(apt-cache "${private_apt[@]}" showsrc kubernetes 2>/dev/null |
                  awk '/^Version:/ { print $2 }' | sort -V | tail -n 1)
    [ -n "$src_version" ] || die "no source package 'kubernetes' on ${entries[*]}"
    case "$src_version" in
        *really"$zp_k8s_version"-*) ;;
        *) die "kubernetes source version $src_version is not Kubernetes $zp_k8s_version; update zp_k8s_version in scripts/lib/k8s-src.sh" ;;
    esac

    mkdir -p "$(dirname "$zp_k8s_tree")"
    (cd "$zp_k8s_src_dir" && apt-get "${private_apt[@]}" source -qq --download-only "kubernetes=$src_version" >&2) \
        || die "apt-get source kubernetes=$src_version failed"
    dsc=$(ls "$zp_k8s_src_dir"/kubernetes_*.dsc)
    # Hashes were already checked by apt against the signed Sources index, so the .dsc's own
    # (usually absent) signature check is not needed.
    dpkg-source --no-check -x "$dsc" "$zp_k8s_tree" >&2 || die "dpkg-source -x $dsc failed"
    rm -f "$zp_k8s_src_dir"/kubernetes_*
    [ -d "$zp_k8s_tree/vendor" ] && [ -d "$zp_k8s_tree/cmd/kube-apiserver" ] \
        || die "$zp_k8s_tree does not look like a Kubernetes tree"
}

# The OpenAPI definitions. The inputs are chosen the way Kubernetes' own Makefile does
# (build/root/Makefile.generated_files): every package with a +k8s:openapi-gen= tag, except the
# code-generator examples and sample-apiserver. Its check is reused too: the API rule violations
# openapi-gen reports must equal the tree's known list, which proves the input set matches.
_zp_k8s_openapi() {
    local openapi_dirs inputs report=$zp_k8s_src_dir/openapi-violations.report
    log "generating OpenAPI definitions"
    nice -n 10 go build -o "$zp_k8s_src_dir/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen \
        || die "building the vendored openapi-gen failed"
    mapfile -t openapi_dirs < <(grep -rl --include='*.go' '^// *+k8s:openapi-gen=' pkg staging/src |
        xargs -n1 dirname |
        grep -v -e '^staging/src/k8s.io/code-generator/' -e '^staging/src/k8s.io/sample-apiserver/' |
        sed -e 's#^staging/src/##' -e 's#^pkg/#k8s.io/kubernetes/pkg/#' | LC_ALL=C sort -u)
    ((${#openapi_dirs[@]})) || die "found no packages tagged +k8s:openapi-gen="
    inputs=$(IFS=,; echo "${openapi_dirs[*]}")
    nice -n 10 "$zp_k8s_src_dir/openapi-gen" \
        --go-header-file vendor/k8s.io/code-generator/hack/boilerplate.go.txt \
        --input-dirs "$inputs" \
        --output-base "$GOPATH/src" \
        --output-package k8s.io/kubernetes/pkg/generated/openapi \
        --output-file-base zz_generated.openapi \
        --report-filename "$report" \
        >"$zp_k8s_src_dir/openapi-gen.log" 2>&1 \
        || { tail -n 30 "$zp_k8s_src_dir/openapi-gen.log" >&2; die "openapi-gen failed"; }
    diff -u api/api-rules/violation_exceptions.list "$report" >&2 \
        || die "openapi-gen's API rule report differs from api/api-rules/violation_exceptions.list:
the OpenAPI input packages do not match what Kubernetes' Makefile would use"
    [ -s pkg/generated/openapi/zz_generated.openapi.go ] || die "openapi-gen wrote no zz_generated.openapi.go"
}

# Make the prepared tree exist (fetching and preparing it if needed) and export the Go
# environment for it. Takes its own lock, so build scripts that hold theirs can call it.
zp_k8s_src_prepare() {
    local start
    if ! zp_k8s_src_ready; then
        if [ -n "$(zp_missing_packages "${zp_k8s_build_pkgs[@]}")" ]; then
            [ "$(id -u)" = 0 ] || die "need root to install $(zp_missing_packages "${zp_k8s_build_pkgs[@]}" | tr '\n' ' ')"
            zp_apt_install "${zp_k8s_build_pkgs[@]}" || die "apt-get install failed"
        fi
        [ -x "$zp_k8s_go_root/bin/go" ] || die "$zp_k8s_go_root/bin/go missing after installing golang-1.19-go"
        [ -f "$_zp_k8s_reflect2_src/reflect2.go" ] \
            || die "$_zp_k8s_reflect2_src missing after installing golang-github-modern-go-reflect2-dev"
        mkdir -p "$zp_k8s_cache_dir"
        exec 8>"$zp_k8s_cache_dir/k8s-src.lock"
        if ! flock -n 8; then
            log "another build holds $zp_k8s_cache_dir/k8s-src.lock (preparing the source tree), waiting"
            flock 8
        fi
        if ! zp_k8s_src_ready; then
            start=$(date +%s)
            # A tree without the stamp is from an interrupted run: start over, keeping nothing.
            if [ -e "$zp_k8s_src_dir" ]; then
                chmod -R u+w "$zp_k8s_src_dir" 2>/dev/null || true
                rm -rf "$zp_k8s_src_dir"
            fi
            mkdir -p "$zp_k8s_src_dir"
            _zp_k8s_fetch
            zp_k8s_go_env
            (
                cd "$zp_k8s_tree"
                # Debian's reflect2 1.0.2 replaces the vendored 1.0.1 (crashes under Go >= 1.18).
                rm -rf vendor/github.com/modern-go/reflect2
                cp -r "$_zp_k8s_reflect2_src" vendor/github.com/modern-go/reflect2
                _zp_k8s_openapi
            )
            touch "$zp_k8s_src_dir/.prepared"
            log "prepared the Kubernetes $zp_k8s_version source tree in $zp_k8s_src_dir in $(( $(date +%s) - start ))s"
        fi
        exec 8>&-
    fi
    zp_k8s_go_env
}

# Build one Go package of the tree (path relative to the tree) to a file, stamped with the
# version. Callers build to a temporary name and move it into place after checking it, so a
# reader never sees a half-written or broken binary under the real name.
#   zp_k8s_go_build cmd/kubeadm /path/kubeadm.tmp
#   zp_k8s_go_build test/e2e /path/e2e.test.tmp test    (a test binary: go test -c)
zp_k8s_go_build() {
    local pkg=$1 out=$2 mode=${3:-build} cmd
    mkdir -p "$(dirname "$out")"
    if [ "$mode" = test ]; then cmd=(test -c); else cmd=(build); fi
    (cd "$zp_k8s_tree" && nice -n 10 go "${cmd[@]}" -trimpath -ldflags "$(zp_k8s_ldflags)" -o "$out" "./$pkg") \
        || { rm -f "$out"; die "go ${cmd[*]} ./$pkg failed (tree in $zp_k8s_tree)"; }
}
