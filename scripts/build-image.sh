#!/usr/bin/env bash
# Build zeroproxy's own node image, offline and reproducibly, as a docker-archive tar that
# `ctr -n k8s.io images import` loads. Prints the archive's path on stdout.
#
# No registry is involved: the base is a minimal Debian bookworm root made by mmdebstrap from the
# mirror this machine's apt already uses (scripts/lib/debian-sources.sh), with the packages
# scripts/setup.sh installs plus runc and CRIU's runtime libraries. Then, exactly as on a
# developer machine, scripts/setup.sh runs inside that root (ZP_IMAGE_BUILD=1: venv at
# /opt/zeroproxy/.venv, zeroproxy and its Python dependencies from PyPI), and the CRIU that
# scripts/build-criu.sh built on this host goes to /usr/local/sbin/criu, the shim that
# scripts/build-shim.sh built to /usr/local/bin/containerd-shim-zeroproxy-v2. The root becomes one
# layer (testbed/images.py) with the ENV, WORKDIR, ENTRYPOINT and CMD the Containerfile
# declares; the Containerfile itself is `FROM scratch` + `ADD` of the same rootfs tarball
# (--rootfs), so what the tests load and what a user builds with podman are the same files.
#
# Reproducible: files keep their Debian package mtimes, everything the build wrote is clamped to
# SOURCE_DATE_EPOCH (default: the last commit touching the image's sources), .pyc files are
# hash-checked (pip honours SOURCE_DATE_EPOCH), entries are sorted, owners numeric. What the
# mirror and PyPI serve on the day is the remaining input: the same day's two builds are equal.
#
# Cached: the default tag is <version>-<12 hex>, the sha256 of everything that goes in (the
# repository files below, this script, the image writer, the package list, the CRIU and shim
# binaries);
# an unchanged tag is a ~0.3 s no-op. The mmdebstrap base is cached by its package list and
# mirror, so a code change costs a setup.sh run (a minute: pip) instead of a bootstrap.
#
#   scripts/build-image.sh                         build or reuse, print the archive path
#   scripts/build-image.sh --tag 0.1.0-test2       the same image under another tag (a DaemonSet
#                                                  rolling update needs a new image reference)
#   scripts/build-image.sh --rootfs build/zeroproxy-rootfs.tar   also copy the rootfs tarball
#                                                  there, for `podman build -f Containerfile .`
#   scripts/build-image.sh --print-tag             the default tag only (no build)
#   scripts/build-image.sh --print-sources         the repository files that go into the image
#   ZP_CACHE_DIR=/elsewhere scripts/build-image.sh
set -euo pipefail
# One brace group: bash parses the whole file before running it, so editing the script during
# a build cannot change what the build runs.
{

here=$(cd "$(dirname "$0")/.." && pwd)
cache=${ZP_CACHE_DIR:-/var/tmp/zeroproxy}
images=$cache/images
work=$cache/zeroproxy-image
repository=localhost/zeroproxy

log() { printf 'build-image: %s\n' "$*" >&2; }
die() { printf 'build-image: ERROR: %s\n' "$*" >&2; exit 1; }

tag= rootfs_copy= mode=build
while (($#)); do
    case "$1" in
        --tag) [ $# -ge 2 ] || die "--tag needs a value"; tag=$2; shift 2 ;;
        --tag=*) tag=${1#--tag=}; shift ;;
        --rootfs) [ $# -ge 2 ] || die "--rootfs needs a path"; rootfs_copy=$2; shift 2 ;;
        --rootfs=*) rootfs_copy=${1#--rootfs=}; shift ;;
        --print-tag) mode=print-tag; shift ;;
        --print-sources) mode=print-sources; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
if [ -n "$tag" ] && ! [[ "$tag" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]]; then
    die "--tag $tag: not a valid image tag (letters, digits, _ . -; at most 128)"
fi

# --- what goes in ------------------------------------------------------------------------------
# The repository files the image installs from: what setup.sh's `pip install -e .` packages
# (pyproject.toml's packages) and what it runs. Tracked and untracked-but-not-ignored files, so a
# working tree with uncommitted edits builds what is on disk.
source_paths=(pyproject.toml README.md zp scripts/setup.sh scripts/lib bpf controlplane dataplane scaletozero zeroproxy)
cd "$here"
mapfile -t sources < <(git ls-files --cached --others --exclude-standard -- "${source_paths[@]}" | LC_ALL=C sort -u |
                       while read -r f; do [ -f "$f" ] && printf '%s\n' "$f"; done)
((${#sources[@]})) || die "git ls-files found none of ${source_paths[*]} in $here"
if [ "$mode" = print-sources ]; then
    printf '%s\n' "${sources[@]}"
    exit 0
fi

# setup.sh's own package list (one list: the image cannot install something else than a machine).
eval "$(sed -n '/^pkgs=(/,/)$/p' scripts/setup.sh)"
((${#pkgs[@]})) || die "could not read the pkgs=(...) list from scripts/setup.sh"
setup_pkgs=("${pkgs[@]}")

criu=$(bash "$here/scripts/build-criu.sh") || die "scripts/build-criu.sh failed"
[ -x "$criu" ] || die "scripts/build-criu.sh printed $criu, which is not an executable"
# containerd-shim-zeroproxy-v2 (static), for the installer to put on a node's containerd PATH.
shim=$(bash "$here/scripts/build-shim.sh") || die "scripts/build-shim.sh failed"
[ -x "$shim" ] || die "scripts/build-shim.sh printed $shim, which is not an executable"
shim_sha=$(sha256sum < "$shim" | cut -d' ' -f1)

# shellcheck source=scripts/lib/debian-sources.sh
. "$here/scripts/lib/debian-sources.sh"
mapfile -t mirrors < <(zp_debian_source_uris | LC_ALL=C sort -u | awk '{ print "deb " $1 " " $2 " main" }')
((${#mirrors[@]})) || die "no Debian bookworm 'deb' entry with component main in /etc/apt/sources.list or
/etc/apt/sources.list.d/*.sources; cannot tell which mirror to bootstrap from"

criu_sha=$(sha256sum < "$criu" | cut -d' ' -f1)
# The base holds setup.sh's packages, runc and CRIU's libraries (derived from the binary, hence
# its hash here rather than the package names: resolving them takes a second).
base_key=$( { printf '%s\n' "${setup_pkgs[@]}" "${mirrors[@]}" "criu $criu_sha"
             dpkg-query -W -f='mmdebstrap ${Version}\n' mmdebstrap 2>/dev/null || true; } |
            sha256sum | cut -c1-16)
key=$( { printf 'base %s\n' "$base_key"
         sha256sum -- "${sources[@]}" scripts/build-image.sh testbed/images.py Containerfile
         printf 'criu %s\nshim %s\n' "$criu_sha" "$shim_sha"; } | sha256sum | cut -d' ' -f1)
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)
[ -n "$version" ] || die "no version = \"...\" in pyproject.toml"
default_tag=$version-${key:0:12}
if [ "$mode" = print-tag ]; then
    echo "$default_tag"
    exit 0
fi
tag=${tag:-$default_tag}
archive=$images/zeroproxy-$tag.tar
rootfs_tar=$work/rootfs-${key:0:12}.tar
tag_key=$work/tags/$tag

copy_rootfs() {
    [ -n "$rootfs_copy" ] || return 0
    mkdir -p "$(dirname "$rootfs_copy")"
    cp --reflink=auto "$rootfs_tar" "$rootfs_copy.tmp" && mv -f "$rootfs_copy.tmp" "$rootfs_copy"
    log "rootfs tarball for the Containerfile: $rootfs_copy"
}

# Fast path: this tag was built from these inputs.
if [ -f "$archive" ] && [ "$(cat "$tag_key" 2>/dev/null)" = "$key" ] && [ -f "$rootfs_tar" ]; then
    copy_rootfs
    echo "$archive"
    exit 0
fi

[ "$(id -u)" = 0 ] || die "needs root (mmdebstrap, chroot, overlay mounts)"
mkdir -p "$images" "$work/tags"
exec 9>"$work/build.lock"
if ! flock -n 9; then
    log "another build holds $work/build.lock, waiting"
    flock 9
fi
if [ -f "$archive" ] && [ "$(cat "$tag_key" 2>/dev/null)" = "$key" ] && [ -f "$rootfs_tar" ]; then
    copy_rootfs
    echo "$archive"
    exit 0
fi

# shellcheck source=scripts/lib/apt.sh
. "$here/scripts/lib/apt.sh"
zp_apt_install mmdebstrap debian-archive-keyring || die "installing mmdebstrap failed"
start=$(date +%s)
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct -- "${source_paths[@]}" 2>/dev/null || true)}
epoch=${epoch:-0}

# --- the Debian base ---------------------------------------------------------------------------
base=$work/base-$base_key
if [ ! -f "$base.done" ]; then
    rm -rf "$base"
    # CRIU's shared libraries, as the Debian packages that ship them.
    mapfile -t criu_pkgs < <(PYTHONPATH=$here python3 -m testbed.images deb-packages "$criu") \
        || die "could not map $criu's libraries to Debian packages"
    mapfile -t base_pkgs < <(printf '%s\n' "${setup_pkgs[@]}" "${criu_pkgs[@]}" runc ca-certificates | LC_ALL=C sort -u)
    log "bootstrapping Debian bookworm into $base (${#base_pkgs[@]} packages; a few minutes)"
    # --variant=apt: Essential packages and apt; recommends are not installed. The apt lists and
    # caches are dropped at the end: the image never runs apt.
    nice -n 10 mmdebstrap --mode=root --variant=apt --format=directory \
        --include="$(IFS=,; echo "${base_pkgs[*]}")" \
        --aptopt='Acquire::Retries "3"' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/cache/ldconfig/aux-cache' \
        bookworm "$base" "${mirrors[@]}" >&2 \
        || { rm -rf "$base"; die "mmdebstrap failed"; }
    touch "$base.done"
    # Older bases are of an older package list: drop them.
    for old in "$work"/base-*.done; do
        [ "$old" = "$base.done" ] && continue
        rm -rf "${old%.done}" "$old"
    done
fi

# --- zeroproxy on top, in a private mount namespace --------------------------------------------
# An overlay keeps the base pristine for the next build; every mount lives in a mount namespace
# of its own (unshare -m), so nothing stays mounted if the build dies halfway.
if [ ! -f "$rootfs_tar" ]; then
    tmp=$(mktemp -d "$work/build.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    mkdir -p "$tmp/upper" "$tmp/work" "$tmp/root"
    log "installing zeroproxy into the image root (scripts/setup.sh, ZP_IMAGE_BUILD=1)"
    export ZP_BASE=$base ZP_TMP=$tmp ZP_HERE=$here ZP_CRIU=$criu ZP_SHIM=$shim ZP_EPOCH=$epoch ZP_ROOTFS_TAR=$rootfs_tar
    printf '%s\n' "${sources[@]}" > "$tmp/sources"
    nice -n 10 unshare --mount --propagation private bash -euo pipefail -c '
        root=$ZP_TMP/root
        mount -t overlay overlay -o "lowerdir=$ZP_BASE,upperdir=$ZP_TMP/upper,workdir=$ZP_TMP/work" "$root"
        mkdir -p "$root/opt/zeroproxy" "$root/usr/local/sbin"
        # The sources, with a fixed mtime, so nothing derived from them records the clock.
        tar -C "$ZP_HERE" -cf - --files-from="$ZP_TMP/sources" | tar -C "$root/opt/zeroproxy" -xf - \
            --no-same-owner --mtime="@$ZP_EPOCH"
        install -m 0755 "$ZP_CRIU" "$root/usr/local/sbin/criu"
        touch -d "@$ZP_EPOCH" "$root/usr/local/sbin/criu"
        install -D -m 0755 "$ZP_SHIM" "$root/usr/local/bin/containerd-shim-zeroproxy-v2"
        touch -d "@$ZP_EPOCH" "$root/usr/local/bin/containerd-shim-zeroproxy-v2"
        # What the chroot needs while setup.sh runs, none of it kept: /proc, /dev, name
        # resolution and the host'"'"'s CA bundle for pip (this network intercepts TLS).
        mount -t proc proc "$root/proc"
        mount --rbind /dev "$root/dev"
        created_resolv=0
        [ -e "$root/etc/resolv.conf" ] || { touch "$root/etc/resolv.conf"; created_resolv=1; }
        mount --bind /etc/resolv.conf "$root/etc/resolv.conf"
        touch "$root/tmp/zp-build-ca.crt"
        mount --bind /etc/ssl/certs/ca-certificates.crt "$root/tmp/zp-build-ca.crt"
        chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            HOME=/root LANG=C.UTF-8 ZP_IMAGE_BUILD=1 SOURCE_DATE_EPOCH="$ZP_EPOCH" PYTHONDONTWRITEBYTECODE=1 \
            PIP_CERT=/tmp/zp-build-ca.crt PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
            PIP_DEFAULT_TIMEOUT="${PIP_DEFAULT_TIMEOUT:-60}" ${PIP_INDEX_URL:+PIP_INDEX_URL="$PIP_INDEX_URL"} \
            bash /opt/zeroproxy/scripts/setup.sh >&2
        umount "$root/tmp/zp-build-ca.crt" "$root/etc/resolv.conf"
        umount -R "$root/dev"
        umount "$root/proc"
        rm -f "$root/tmp/zp-build-ca.crt"
        ((created_resolv)) && rm -f "$root/etc/resolv.conf"
        rm -rf "$root/root/.cache" "$root/tmp/"* "$root/var/cache/ldconfig/aux-cache"
        # The files that prove the image works: the agent, bcc, CRIU, runc, the shim.
        for f in /opt/zeroproxy/.venv/bin/zeroproxy /usr/local/sbin/criu /usr/sbin/runc \
                 /usr/local/bin/containerd-shim-zeroproxy-v2; do
            [ -x "$root$f" ] || { echo "build-image: $f missing in the image root" >&2; exit 1; }
        done
        chroot "$root" /usr/bin/ldd /usr/local/sbin/criu | grep -q "not found" \
            && { echo "build-image: criu lacks libraries in the image root" >&2; exit 1; }
        PYTHONPATH=$ZP_HERE python3 -m testbed.images rootfs-image --rootfs "$root" --tag "localhost/zeroproxy:pending" \
            --containerfile "$ZP_HERE/Containerfile" --out "$ZP_TMP/image.tar" --layer-out "$ZP_ROOTFS_TAR.tmp" \
            --clamp-mtime "$ZP_EPOCH" >/dev/null
    ' || die "building the image root failed (see above)"
    mv -f "$rootfs_tar.tmp" "$rootfs_tar"
    rm -rf "$tmp"
    trap - EXIT
fi

# --- the archive for this tag --------------------------------------------------------------------
PYTHONPATH=$here python3 -m testbed.images rootfs-image --tag "$repository:$tag" \
    --containerfile "$here/Containerfile" --out "$archive.tmp" --layer-out "$rootfs_tar" >/dev/null \
    || die "writing $archive failed"
mv -f "$archive.tmp" "$archive"
echo "$key" > "$tag_key"
# Archives and rootfs tarballs of older contents: keep the newest two contents (a bed or a test
# may still be loading the previous one while the tree is edited), drop the rest.
mapfile -t keep < <(ls -t "$work"/rootfs-*.tar | head -n 2)
for f in "$work"/rootfs-*.tar; do
    [[ " ${keep[*]} " == *" $f "* ]] || rm -f "$f"
done
for f in "$work"/tags/*; do
    [ -f "$work/rootfs-$(cut -c1-12 "$f").tar" ] && continue
    rm -f "$images/zeroproxy-$(basename "$f").tar" "$f"
done
copy_rootfs
log "$repository:$tag: $archive ($(du -m "$archive" | cut -f1) MB) in $(( $(date +%s) - start ))s"
echo "$archive"
exit 0
}
