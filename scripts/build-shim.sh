#!/usr/bin/env bash
# Build containerd-shim-zeroproxy-v2 (shim/, a Go module on containerd v1.6.20's packages), cache
# it, print the binary's path on stdout.
#
# The cache key is the hash of shim/'s sources (go.mod, go.sum, every .go file) and of `go version`,
# so an edit or a new Go rebuilds and anything else returns the cached binary at once. Modules and
# the build cache live under the cache directory too, never in the repository or ~/go: the first
# build fetches the modules pinned by go.sum from the Go module proxy, every later one is offline.
# The binary is static (CGO_ENABLED=0), -trimpath, stripped (-s -w), and is named as containerd
# expects, so the directory it is in can go on the PATH of a containerd.
#
#   scripts/build-shim.sh                    build (or reuse), print e.g. /var/tmp/zeroproxy/shim-build/bin/<key>/containerd-shim-zeroproxy-v2
#   ZP_CACHE_DIR=/elsewhere scripts/build-shim.sh
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/../shim" && pwd)
cache=${ZP_CACHE_DIR:-/var/tmp/zeroproxy}/shim-build
name=containerd-shim-zeroproxy-v2
keep=3 # cached builds kept (the newest), so switching branches back and forth stays fast

log() { printf 'build-shim: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

if ! command -v go >/dev/null; then
    [ -x /usr/local/go/bin/go ] || die "no 'go' on PATH or in /usr/local/go/bin (this build needs Go >= 1.26)"
    PATH=/usr/local/go/bin:$PATH
fi
mkdir -p "$cache/bin"

goversion=$(go env GOVERSION) || die "'go env GOVERSION' failed"
key=$( { printf '%s\n' "$goversion"
         cd "$src" && find . -type f \( -name '*.go' -o -name go.mod -o -name go.sum \) -print0 \
             | LC_ALL=C sort -z | xargs -0 sha256sum; } | sha256sum | cut -c1-16)
out=$cache/bin/$key/$name
if [ -x "$out" ]; then
    echo "$out"
    exit 0
fi

# Concurrent callers (parallel test runs, CI jobs) wait for one build instead of racing it.
exec 9>"$cache/build.lock"
flock 9
if [ -x "$out" ]; then
    echo "$out"
    exit 0
fi

export GOMODCACHE=$cache/mod GOCACHE=$cache/gocache GOPATH=$cache/gopath
# -mod=readonly: a build never rewrites go.mod/go.sum; GOTOOLCHAIN=local: a go.mod that asks for
# a newer Go fails with the go command's own message instead of downloading a toolchain.
export GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0 GOTOOLCHAIN=local GOWORK=off
start=$(date +%s%N)
tmp=$(mktemp -d "$cache/bin/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
log "building $name ($goversion, key $key)"
(cd "$src" && nice -n 10 go build -trimpath -ldflags '-s -w' -o "$tmp/$name" ./cmd/$name) \
    || die "go build of $src failed"
"$tmp/$name" -v >/dev/null 2>&1 || die "the built $name does not run ('$name -v' failed)"
mkdir -p "$(dirname "$out")"
mv "$tmp/$name" "$out"
log "built $out ($(du -k "$out" | cut -f1) KiB) in $(( ($(date +%s%N) - start) / 1000000 )) ms"

# Older builds beyond the newest $keep go.
find "$cache/bin" -mindepth 1 -maxdepth 1 -type d ! -name '.*' -printf '%T@ %p\n' | sort -rn \
    | tail -n +$((keep + 1)) | cut -d' ' -f2- | xargs -r rm -rf
echo "$out"
