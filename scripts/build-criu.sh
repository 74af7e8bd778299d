#!/usr/bin/env bash
# Build CRIU from Debian sid's source archive, cache the binary, print its path on stdout.
#
# Why not Debian's package: bookworm's criu 3.17 cannot dump on kernels >= 6.13 (split vDSO) and
# trixie's 4.1.1 fails on every TCP socket on kernels >= 6.16. CRIU 4.2.1 has both fixes and is
# only in sid, whose binary packages need a newer libc; its source builds on bookworm in ~20 s.
#
# The system's apt configuration stays untouched: sid's source index lives in a private apt
# directory under /var/tmp/zeroproxy/apt-src-sid, and the mirror is taken from the system's own
# sources so no host name is hard-coded here. The pinned version is preferred; when sid has moved
# on, whatever sid carries is built instead (and reported on stderr).
#
# Also installs runc (Debian's 1.1.5), the only consumer of this CRIU in zeroproxy, so one script
# prepares the scale-to-zero runtime.
#
#   scripts/build-criu.sh                      build (or reuse) and print e.g. /var/tmp/zeroproxy/criu-4.2.1/criu
#   ZP_CRIU_VERSION=4.2.2 scripts/build-criu.sh  pin another upstream version
#   ZP_CACHE=/elsewhere scripts/build-criu.sh    cache somewhere else
set -euo pipefail

want=${ZP_CRIU_VERSION:-4.2.1}
cache=${ZP_CACHE:-/var/tmp/zeroproxy}
aptdir=$cache/apt-src-sid
mkdir -p "$cache"

log() { printf 'build-criu: %s\n' "$*" >&2; }

# Concurrent callers (parallel test runs, CI jobs) wait for one build instead of racing it.
exec 9>"$cache/criu-build.lock"
flock 9

# --- runtime and build dependencies from bookworm --------------------------------------------
pkgs=(runc libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler libnl-3-dev libnet1-dev libcap-dev
      libbsd-dev libgnutls28-dev libaio-dev libnftables-dev python3-protobuf pkg-config gcc make
      xz-utils curl ca-certificates dpkg-dev)
# shellcheck source=scripts/lib/apt.sh
. "$(dirname "$0")/lib/apt.sh"

# A cached binary of the pinned version needs nothing but runc next to it.
if [ -x "$cache/criu-$want/criu" ]; then
    zp_apt_install runc
    echo "$cache/criu-$want/criu"
    exit 0
fi
zp_apt_install "${pkgs[@]}"

# --- sid's source index, in a private apt directory -----------------------------------------
# The first http(s) mirror of the main archive among the system's sources (deb822 or one-line),
# skipping the security archive, which carries no sid.
find_mirror() {
    local f
    shopt -s nullglob
    for f in /etc/apt/sources.list.d/*.sources; do
        awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) print $i }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk '$1 == "deb" || $1 == "deb-src" {
                 for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\//) { print $i; break } }' "$f"
    done
}
mirror=${ZP_DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
    mirror=$(find_mirror | grep -v -e security -e '/debian-' | grep -E '^https?://.*/debian/?$' | head -n 1 || true)
fi
[ -n "$mirror" ] || { log "no Debian mirror found in /etc/apt/sources*; set ZP_DEBIAN_MIRROR"; exit 1; }
mirror=${mirror%/}

mkdir -p "$aptdir/etc" "$aptdir/lists/partial" "$aptdir/cache/archives/partial"
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror sid main" \
    > "$aptdir/etc/sources.list"
apt_private=(-o "Dir::Etc::SourceList=$aptdir/etc/sources.list" -o "Dir::Etc::SourceParts=$aptdir/etc/none"
             -o "Dir::State::Lists=$aptdir/lists" -o "Dir::Cache=$aptdir/cache"
             -o "APT::Sandbox::User=root")
if [ -z "$(find "$aptdir/lists" -maxdepth 1 -name '*_Sources*' -mmin -60 2>/dev/null)" ]; then
    log "refreshing sid's source index from $mirror"
    apt-get "${apt_private[@]}" update -qq
fi

# Debian revisions of the wanted upstream version (e.g. 4.2.1-1), newest first; otherwise the
# newest version sid has.
versions=$(apt-cache "${apt_private[@]}" showsrc criu | awk '$1 == "Version:" { print $2 }' | sort -rV)
[ -n "$versions" ] || { log "sid's source index has no criu"; exit 1; }
debver=$(printf '%s\n' "$versions" | awk -v w="$want" '{ v = $0; sub(/^[0-9]+:/, "", v); sub(/-[^-]*$/, "", v) }
                                                     v == w { print; exit }')
if [ -z "$debver" ]; then
    debver=$(printf '%s\n' "$versions" | head -n 1)
    log "sid no longer has criu $want; building sid's $debver instead"
fi
upstream=${debver#*:}
upstream=${upstream%-*}
out=$cache/criu-$upstream
if [ -x "$out/criu" ]; then
    echo "$out/criu"
    exit 0
fi

# --- fetch the orig tarball, verified against sid's signed index ------------------------------
# `apt-get source` would also need the .debian.tar.xz, which sid's mirrors have been seen to 404;
# the orig tarball alone is enough for `make criu`, so fetch just that by the URI and hash apt
# resolves.
uris=$(cd "$aptdir" && apt-get "${apt_private[@]}" source --print-uris -qq "criu=$debver")
line=$(printf '%s\n' "$uris" | grep -E "^'[^']*/criu_${upstream}\.orig\.tar\.[a-z0-9]+' " | head -n 1)
[ -n "$line" ] || { log "no orig tarball for criu $debver in sid's index"; exit 1; }
url=$(printf '%s\n' "$line" | awk '{ gsub("\x27", "", $1); print $1 }')
file=$(printf '%s\n' "$line" | awk '{ print $2 }')
sha=$(printf '%s\n' "$line" | awk '{ print $4 }' | sed -n 's/^SHA256://p')
[ -n "$sha" ] || { log "apt gave no SHA256 for $file"; exit 1; }

src=$cache/src
mkdir -p "$src"
if [ ! -f "$src/$file" ] || ! echo "$sha  $src/$file" | sha256sum -c --quiet - 2>/dev/null; then
    log "downloading $url"
    curl -fsSL --retry 3 -o "$src/$file.part" "$url"
    echo "$sha  $src/$file.part" | sha256sum -c --quiet - || { log "checksum mismatch for $file"; exit 1; }
    mv "$src/$file.part" "$src/$file"
fi

# --- build ----------------------------------------------------------------------------------
build=$(mktemp -d "$cache/criu-build.XXXXXX")
trap 'rm -rf "$build"' EXIT
tar -xf "$src/$file" -C "$build" --strip-components=1
log "building criu $upstream in $build"
if ! make -C "$build" -j"$(nproc)" criu >"$build.log" 2>&1; then
    tail -n 40 "$build.log" >&2
    log "make failed; full log in $build.log"
    exit 1
fi
rm -f "$build.log"

# The check runs the fresh binary against this kernel before anything trusts it. In a container
# image build (ZP_IMAGE_BUILD=1) the build host's kernel says nothing about the nodes', and the
# check needs privileges a build does not have: the agent checks on the node instead.
if [ -n "${ZP_IMAGE_BUILD:-}" ]; then
    check="criu check skipped in an image build"
else
    check=$("$build/criu/criu" check 2>&1 || true)
fi
if [ -z "${ZP_IMAGE_BUILD:-}" ] && ! grep -q 'Looks good' <<<"$check"; then
    printf '%s\n' "$check" >&2
    log "criu $upstream built but 'criu check' failed on this kernel"
    exit 1
fi
mkdir -p "$out"
install -m 0755 "$build/criu/criu" "$out/criu.new"
mv "$out/criu.new" "$out/criu"
log "criu $upstream ready: $(printf '%s\n' "$check" | tail -n 1)"
echo "$out/criu"
