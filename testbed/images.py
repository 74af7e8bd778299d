"""One-layer container images for the real-cluster test bed, written without any registry.

The bed's containerd must find every image kubeadm, the e2e suite and zeroproxy's DaemonSet name
already in its store: the machines reach no registry. So the images are written here, straight
from files on this machine (the Kubernetes binaries scripts/build-k8s.sh builds, Debian's
packages), as docker-archive tars that `ctr -n k8s.io images import` loads.

Why our own writer: an image is a tar of files plus two small JSON documents, and what the bed
needs from it is that the same inputs give the same bytes (so a cache can trust a digest and two
runs can be compared). Python's tarfile, hashlib and json do all of it; the image tools that
exist (buildah, umoci, kaniko...) need a registry or a daemon, or bring more than they save.

Determinism: entries are written sorted, with uid/gid 0, no user or group names and mtime 0
(a rootfs directory keeps package mtimes, clamped to SOURCE_DATE_EPOCH: see `Layer.host_tree`),
and the config carries no creation time. The image id is the sha256 of the config, which names
the layer by the sha256 of its tar, so equal inputs give an equal id.

CLI (root not needed for `build`):

    python -m testbed.images build --out /var/tmp/zeroproxy/images
    python -m testbed.images build --out DIR --k8s-bin DIR --only kube-proxy
    python -m testbed.images list
    python -m testbed.images repo-list --out /tmp/repo-list.yaml    # for KUBE_TEST_REPO_LIST
    python -m testbed.images rootfs-image --rootfs DIR --tag localhost/zeroproxy:0.1.0-abc \\
        --containerfile Containerfile --out IMAGE.tar --layer-out ROOTFS.tar
    python -m testbed.images deb-packages /path/to/binary          # Debian packages of its libs
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

CACHE_DIR = Path(os.environ.get("ZP_CACHE_DIR", "/var/tmp/zeroproxy"))
IMAGES_DIR = CACHE_DIR / "images"
K8S_VERSION = "1.20.2"
K8S_BIN = CACHE_DIR / f"k8s-{K8S_VERSION}" / "bin"
# kubeadm's `imageRepository` in the bed, and the repository every e2e registry maps to.
NODE_REPOSITORY = "localhost/zp"
E2E_REPOSITORY = f"{NODE_REPOSITORY}/e2e"

PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Debian bookworm's merged /usr: the dynamic loader and every library path ldd prints go through
# these, so each image has them, and files are always stored under their /usr paths.
_USRMERGE = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}
_PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
_GROUP = "root:x:0:\nnogroup:x:65534:\n"
# glibc 2.36 has the files and dns backends built in: with this file and the resolv.conf the
# kubelet mounts, getaddrinfo resolves cluster names in a root that holds nothing else of NSS.
_NSSWITCH = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\n" \
            "protocols: files\nservices: files\n"


class ImageError(Exception):
    """An image cannot be built from what is on this machine; the message says what is missing."""


# --- content hashes, cached by stat -----------------------------------------------------------


class HashCache:
    """sha256 of host files, remembered by (size, mtime_ns, inode, ctime_ns).

    Image caching is keyed by content, but the fast path must take well under a second while the
    inputs include ~400 MB of Kubernetes binaries: a file whose stat did not change is not re-read.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._data: dict[str, list[Any]] = {}
        self._dirty = False
        if path is not None and path.exists():
            try:
                self._data = json.loads(path.read_text())
            except (OSError, ValueError):
                self._data = {}

    def sha256(self, path: Path) -> str:
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
        known = self._data.get(str(path))
        if known is not None and known[:4] == stamp:
            return str(known[4])
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        self._data[str(path)] = [*stamp, h.hexdigest()]
        self._dirty = True
        return h.hexdigest()

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}")
        tmp.write_text(json.dumps(self._data, sort_keys=True))
        tmp.replace(self.path)
        self._dirty = False


# --- layers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One tar member. Exactly one of source/data is set for a file; target for links."""

    kind: str  # "file", "dir", "symlink" or "hardlink"
    mode: int = 0o755
    source: Path | None = None  # file: host file to copy
    data: bytes | None = None  # file: literal content
    target: str = ""  # symlink: as written; hardlink: layer path (no leading /) of the first name
    uid: int = 0
    gid: int = 0
    mtime: int = 0


def _rel(path: str) -> str:
    """Image path to tar member name: absolute, normalised, no leading slash."""
    if not path.startswith("/"):
        raise ImageError(f"image path {path!r}: must be absolute")
    norm = os.path.normpath(path).lstrip("/")
    if norm in ("", "."):
        raise ImageError(f"image path {path!r}: the root itself is not an entry")
    return norm


class Layer:
    """Image path -> Entry, with helpers that copy from the host.

    Paths are kept canonical with respect to the layer's own symlinks (a file added as /bin/sh
    is stored as usr/bin/sh), because a tar that had both a symlink `bin` and a member `bin/sh`
    would be extracted through the link by some tools and refused by others.
    """

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    # -- primitive entries --

    def canonical(self, path: str) -> str:
        """Resolve `path`'s parent directories through symlinks already in the layer."""
        parts = _rel(path).split("/")
        out: list[str] = []
        hops = 0
        i = 0
        while i < len(parts):
            out.append(parts[i])
            here = "/".join(out)
            entry = self.entries.get(here)
            if entry is not None and entry.kind == "symlink" and i < len(parts) - 1:
                hops += 1
                if hops > 40:
                    raise ImageError(f"image path {path!r}: too many symlinks")
                base = "/" if entry.target.startswith("/") else "/" + "/".join(out[:-1])
                rest = parts[i + 1:]
                parts = _rel(os.path.join(base, entry.target)).split("/") + rest
                out = []
                i = 0
                continue
            i += 1
        return "/".join(out)

    def _put(self, path: str, entry: Entry) -> str:
        name = self.canonical(path)
        old = self.entries.get(name)
        if old is not None and old != entry:
            if old.kind == entry.kind == "dir":
                return name  # a directory named twice: the first mode wins
            if not (old.kind == entry.kind == "file" and old.source is not None
                    and entry.source is not None and old.source.resolve() == entry.source.resolve()):
                raise ImageError(f"image path /{name}: added twice with different content ({old.kind}, {entry.kind})")
        self.entries[name] = entry
        return name

    def file(self, path: str, *, source: Path | None = None, data: bytes | str | None = None,
             mode: int | None = None) -> str:
        if (source is None) == (data is None):
            raise ImageError(f"image path {path}: give exactly one of source= or data=")
        if isinstance(data, str):
            data = data.encode()
        if source is not None:
            if not source.is_file():
                raise ImageError(f"image path {path}: source {source} is not a regular file")
            if mode is None:
                mode = stat.S_IMODE(source.stat().st_mode)
        return self._put(path, Entry("file", 0o644 if mode is None else mode, source=source, data=data))

    def dir(self, path: str, mode: int = 0o755) -> str:
        return self._put(path, Entry("dir", mode))

    def symlink(self, path: str, target: str) -> str:
        return self._put(path, Entry("symlink", 0o777, target=target))

    # -- copies from the host --

    def host_path(self, path: str | Path, *, _depth: int = 0) -> None:
        """Add a host path as the host has it: every symlink on the way to it, then the file.

        /lib/x86_64-linux-gnu/libc.so.6 brings the `lib -> usr/lib` link and the library; a
        versioned `.so.1 -> .so.1.2.3` brings both names. Directories are not copied whole.
        """
        if _depth > 40:
            raise ImageError(f"{path}: too many symlinks")
        p = os.path.normpath(os.path.abspath(str(path)))
        parts = p.lstrip("/").split("/")
        for i in range(len(parts)):
            cur = "/" + "/".join(parts[: i + 1])
            if os.path.islink(cur):
                target = os.readlink(cur)
                self.symlink(cur, target)
                base = "/" if target.startswith("/") else os.path.dirname(cur)
                self.host_path(os.path.join(base, target, *parts[i + 1:]), _depth=_depth + 1)
                return
        if os.path.isdir(p):
            self.dir(p, stat.S_IMODE(os.stat(p).st_mode))
        elif os.path.isfile(p):
            self.file(p, source=Path(p))
        else:
            raise ImageError(f"{p}: no such file on this machine")

    def binary(self, host: str | Path, dest: str | None = None) -> None:
        """A dynamically linked (or static) program plus every shared library ldd names for it.

        With `dest`, the program is stored there (e.g. /usr/local/bin/kube-proxy) instead of its
        host path; its libraries always keep their host paths, which is where the loader looks.
        """
        host = Path(host)
        if not host.is_file():
            raise ImageError(f"{host}: no such program on this machine")
        if dest is None:
            self.host_path(host)
        else:
            self.file(dest, source=host.resolve())
        for lib in shared_libraries(host):
            self.host_path(lib)

    def command(self, name: str) -> None:
        """A program found on the host's PATH (and its libraries), at its host path."""
        found = shutil.which(name, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        if found is None:
            raise ImageError(f"command {name!r}: not found on this machine")
        self.host_path(found)
        self.binary(os.path.realpath(found))

    def package_programs(self, package: str) -> None:
        """Every program a Debian package installs in a bin or sbin directory, with libraries."""
        for path in debian_package_files(package):
            if re.match(r"^/(usr/)?s?bin/[^/]+$", path) and (os.path.isfile(path) or os.path.islink(path)):
                real = os.path.realpath(path)
                if not (os.path.isfile(real) and os.access(real, os.X_OK)):
                    continue
                self.host_path(path)
                self.binary(real)

    def shared_objects(self, directory: str) -> None:
        """Every .so in a host directory (plugins loaded with dlopen, e.g. xtables), with theirs."""
        d = Path(directory)
        if not d.is_dir():
            raise ImageError(f"{directory}: no such directory on this machine")
        for p in sorted(d.iterdir()):
            if p.name.endswith(".so") or ".so." in p.name:
                self.host_path(p)
                if p.is_file() and not p.is_symlink():
                    for lib in shared_libraries(p):
                        self.host_path(lib)

    def host_tree(self, root: Path, *, clamp_mtime: int, keep_owner: bool = True,
                  exclude: Callable[[str], bool] | None = None) -> None:
        """A whole directory (a root filesystem) as the layer's root.

        Owners and modes are kept (setuid bits included); mtimes are kept but clamped to
        `clamp_mtime`, the way `tar --clamp-mtime` does: files from Debian packages keep their
        package mtimes, which the timestamp-based .pyc files Debian compiles at install time
        were checked against, while anything the build itself wrote gets the fixed epoch.
        Hardlinked files become tar hardlinks to their first name in sort order; device nodes,
        fifos and sockets are skipped (runtimes make /dev themselves).
        """
        root = root.resolve()
        seen: dict[tuple[int, int], list[str]] = {}
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, root)
                if exclude is not None and exclude(rel):
                    if name in dirnames:
                        dirnames.remove(name)
                    continue
                st = os.lstat(full)
                own = {"uid": st.st_uid, "gid": st.st_gid} if keep_owner else {}
                mtime = min(int(st.st_mtime), clamp_mtime)
                mode = stat.S_IMODE(st.st_mode)
                if stat.S_ISLNK(st.st_mode):
                    self.entries[rel] = Entry("symlink", 0o777, target=os.readlink(full), mtime=mtime, **own)
                elif stat.S_ISDIR(st.st_mode):
                    self.entries[rel] = Entry("dir", mode, mtime=mtime, **own)
                elif stat.S_ISREG(st.st_mode):
                    if st.st_nlink > 1:
                        seen.setdefault((st.st_dev, st.st_ino), []).append(rel)
                    self.entries[rel] = Entry("file", mode, source=Path(full), mtime=mtime, **own)
        for names in seen.values():
            first, *others = sorted(names)
            for other in others:
                e = self.entries[other]
                self.entries[other] = Entry("hardlink", e.mode, target=first, uid=e.uid, gid=e.gid, mtime=e.mtime)

    # -- output --

    def _members(self) -> list[str]:
        """Sorted member names, with every parent directory present."""
        names = set(self.entries)
        for name in list(names):
            parent = os.path.dirname(name)
            while parent and parent not in names:
                names.add(parent)
                parent = os.path.dirname(parent)
        return sorted(names)

    def fingerprint(self, hashes: HashCache) -> str:
        """sha256 over every member's metadata and content: equal fingerprints, equal tars."""
        h = hashlib.sha256()
        for name in self._members():
            e = self.entries.get(name, Entry("dir"))
            if e.kind == "file":
                content = hashes.sha256(e.source) if e.source is not None else hashlib.sha256(e.data or b"").hexdigest()
            else:
                content = e.target
            h.update(json.dumps([name, e.kind, e.mode, e.uid, e.gid, e.mtime, content]).encode() + b"\n")
        return h.hexdigest()

    def write_tar(self, out: IO[bytes]) -> None:
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for name in self._members():
                e = self.entries.get(name, Entry("dir"))
                info = tarfile.TarInfo(name)
                info.mode, info.uid, info.gid, info.mtime = e.mode, e.uid, e.gid, e.mtime
                info.uname = info.gname = ""
                if e.kind == "dir":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif e.kind == "symlink":
                    info.type, info.linkname = tarfile.SYMTYPE, e.target
                    tar.addfile(info)
                elif e.kind == "hardlink":
                    info.type, info.linkname = tarfile.LNKTYPE, e.target
                    tar.addfile(info)
                elif e.source is not None:
                    with e.source.open("rb") as f:
                        info.size = os.fstat(f.fileno()).st_size
                        tar.addfile(info, f)
                else:
                    data = e.data or b""
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def base_layer() -> Layer:
    """What every image of ours starts with: merged-/usr links, a root user, NSS config, /tmp."""
    layer = Layer()
    for link, target in _USRMERGE.items():
        layer.symlink("/" + link, target)
    layer.file("/etc/passwd", data=_PASSWD, mode=0o644)
    layer.file("/etc/group", data=_GROUP, mode=0o644)
    layer.file("/etc/nsswitch.conf", data=_NSSWITCH, mode=0o644)
    layer.dir("/tmp", 0o1777)
    layer.dir("/root", 0o700)
    return layer


def shared_libraries(program: Path) -> list[str]:
    """Host paths of the shared libraries `ldd` resolves for a program (none for a static one)."""
    proc = subprocess.run(["ldd", str(program)], capture_output=True, text=True, check=False)
    text = proc.stdout + proc.stderr
    if "not a dynamic executable" in text or "statically linked" in text:
        return []
    if proc.returncode != 0:
        raise ImageError(f"ldd {program}: {text.strip()}")
    libs: list[str] = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if "=> not found" in line:
            raise ImageError(f"{program}: library {line.split()[0]} not found on this machine")
        m = re.match(r"^\S+ => (/\S+) \(", line) or re.match(r"^(/\S+) \(", line)
        if m:
            libs.append(m.group(1))
    return libs


def debian_package_files(package: str) -> list[str]:
    proc = subprocess.run(["dpkg-query", "-L", package], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ImageError(f"Debian package {package!r} is not installed on this machine "
                         f"(scripts/build-images.sh installs it): {proc.stderr.strip()}")
    return [line for line in proc.stdout.splitlines() if line.startswith("/")]


def debian_packages_of(paths: Iterable[str]) -> list[str]:
    """The installed Debian packages that own these files (looked up under /usr too: merged /usr).

    One dpkg-query call for all of them: each call reads every package's file list.
    """
    wanted: dict[str, list[str]] = {}
    for path in paths:
        candidates = [path, os.path.realpath(path)]
        candidates += ["/usr" + c for c in list(candidates) if not c.startswith("/usr/")]
        wanted[path] = list(dict.fromkeys(candidates))
    if not wanted:
        return []
    every = sorted({c for cs in wanted.values() for c in cs})
    proc = subprocess.run(["dpkg-query", "-S", *every], capture_output=True, text=True, check=False)
    owner: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("diversion") or ": " not in line:
            continue
        packages, _, owned = line.partition(": ")
        owner[owned.strip()] = packages.split(",")[0].split(":")[0].strip()
    found: set[str] = set()
    for path, candidates in wanted.items():
        hit = next((owner[c] for c in candidates if c in owner), None)
        if hit is None:
            raise ImageError(f"{path}: no installed Debian package owns it")
        found.add(hit)
    return sorted(found)


# --- docker-archive ----------------------------------------------------------------------------


@dataclass
class Image:
    """A one-layer image. `name` is the archive's file stem under the images directory."""

    name: str
    tags: list[str]
    layer: Layer
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: list[str] = field(default_factory=lambda: [PATH_ENV])
    workdir: str = "/"

    def config_body(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"Env": self.env, "WorkingDir": self.workdir}
        if self.entrypoint is not None:
            cfg["Entrypoint"] = self.entrypoint
        if self.cmd is not None:
            cfg["Cmd"] = self.cmd
        return cfg


@dataclass(frozen=True)
class Built:
    name: str
    path: Path
    tags: list[str]
    image_id: str  # sha256:<config digest>, what `ctr images ls` calls the config
    size: int
    cached: bool
    seconds: float


class _HashingWriter:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out, self.sha, self.size = out, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()


def _json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def write_archive(image: Image, out: Path, *, layer_out: Path | None = None) -> str:
    """Write `image` as a docker-archive tar at `out`; return its image id (sha256:...).

    Layout (what `docker save` wrote before OCI layouts, and what containerd's importer reads):
    manifest.json, <config-hex>.json, <diff-id-hex>/layer.tar. The layer is uncompressed: it is
    read once, on this machine, and compressing it would cost more time than the disk it saves.
    `layer_out` also keeps the layer tar itself (the Containerfile's rootfs tarball).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        layer_path = Path(tmp) / "layer.tar"
        with layer_path.open("wb") as f:
            w = _HashingWriter(f)
            image.layer.write_tar(w)  # type: ignore[arg-type]
        image_id = _write_archive_files(image, layer_path, w.sha.hexdigest(), out)
        if layer_out is not None:
            layer_out.parent.mkdir(parents=True, exist_ok=True)
            layer_path.replace(layer_out)
    return image_id


def write_archive_from_layer(image: Image, layer_tar: Path, out: Path) -> str:
    """Like `write_archive`, with a layer tar written before (`image.layer` is not used).

    Gives an existing root filesystem another tag without walking it again.
    """
    h = hashlib.sha256()
    with layer_tar.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    out.parent.mkdir(parents=True, exist_ok=True)
    return _write_archive_files(image, layer_tar, h.hexdigest(), out)


def _write_archive_files(image: Image, layer_path: Path, diff_id: str, out: Path) -> str:
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        config = _json({
            "architecture": "amd64",
            "os": "linux",
            "config": image.config_body(),
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
            "history": [{"created_by": "testbed.images", "comment": "one layer written by testbed/images.py"}],
        })
        config_id = hashlib.sha256(config).hexdigest()
        manifest = _json([{"Config": f"{config_id}.json", "RepoTags": image.tags,
                           "Layers": [f"{diff_id}/layer.tar"]}])
        partial = Path(tmp) / "image.tar"
        with partial.open("wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            def add(name: str, data: bytes | None = None, source: Path | None = None, directory: bool = False) -> None:
                info = tarfile.TarInfo(name)
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                if directory:
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                    return
                info.mode = 0o644
                if source is not None:
                    info.size = source.stat().st_size
                    with source.open("rb") as src:
                        tar.addfile(info, src)
                else:
                    info.size = len(data or b"")
                    tar.addfile(info, io.BytesIO(data or b""))

            add(f"{config_id}.json", config)
            add(diff_id, directory=True)
            add(f"{diff_id}/layer.tar", source=layer_path)
            add("manifest.json", manifest)
        partial.replace(out)
    return f"sha256:{config_id}"


def archive_info(path: Path) -> dict[str, Any]:
    """manifest entry, config and layer digest of an archive written by `write_archive`."""
    with tarfile.open(path) as tar:
        manifest = json.loads(_read_member(tar, "manifest.json"))
        if len(manifest) != 1:
            raise ImageError(f"{path}: expected one image in manifest.json, found {len(manifest)}")
        entry = manifest[0]
        config_bytes = _read_member(tar, entry["Config"])
        config = json.loads(config_bytes)
        layer = tar.extractfile(entry["Layers"][0])
        if layer is None:
            raise ImageError(f"{path}: layer {entry['Layers'][0]} is not a file")
        h = hashlib.sha256()
        while chunk := layer.read(1 << 20):
            h.update(chunk)
    return {"manifest": entry, "config": config, "config_digest": "sha256:" + hashlib.sha256(config_bytes).hexdigest(),
            "layer_digest": "sha256:" + h.hexdigest()}


def _read_member(tar: tarfile.TarFile, name: str) -> bytes:
    f = tar.extractfile(name)
    if f is None:
        raise ImageError(f"{tar.name}: {name} is not a file")
    return f.read()


# --- cache -----------------------------------------------------------------------------------


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def image_key(image: Image, hashes: HashCache) -> str:
    """What decides an archive's bytes: the writer (this module's source), the tags, the config, the files.

    The writer's own source, not a format number to bump by hand: an edit here that changes the
    output (the history line once named the old module path) must never reuse an old archive.
    """
    body = _json({"code": hashes.sha256(Path(__file__).resolve()), "tags": image.tags, "config": image.config_body(),
                  "layer": image.layer.fingerprint(hashes)})
    return hashlib.sha256(body).hexdigest()


def build_image(image: Image, out_dir: Path, hashes: HashCache, *, layer_out: Path | None = None) -> Built:
    """Write `out_dir/<name>.tar` unless the archive there was made from the same inputs."""
    start = time.monotonic()
    path = out_dir / f"{image.name}.tar"
    stamp = out_dir / ".keys" / f"{image.name}.json"
    key = image_key(image, hashes)
    try:
        recorded = json.loads(stamp.read_text())
    except (OSError, ValueError):
        recorded = {}
    if recorded.get("key") == key and path.exists() and path.stat().st_size == recorded.get("size") \
            and (layer_out is None or layer_out.exists()):
        return Built(image.name, path, image.tags, recorded["id"], recorded["size"], True, time.monotonic() - start)
    image_id = write_archive(image, path, layer_out=layer_out)
    size = path.stat().st_size
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"key": key, "id": image_id, "size": size, "tags": image.tags}))
    return Built(image.name, path, image.tags, image_id, size, False, time.monotonic() - start)


# --- the bed's images --------------------------------------------------------------------------


# What the images take from scripts/build-k8s.sh's bin dir.
K8S_BINARIES = ("pause", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy", "agnhost")


def _k8s_binary(k8s_bin: Path, name: str) -> Path:
    path = k8s_bin / name
    if not path.is_file():
        raise ImageError(f"{path}: missing; scripts/build-k8s.sh builds the Kubernetes {K8S_VERSION} binaries there")
    return path


def _with_program(k8s_bin: Path, name: str, *, dest_dir: str = "/usr/local/bin") -> Layer:
    layer = base_layer()
    layer.binary(_k8s_binary(k8s_bin, name), f"{dest_dir}/{name}")
    return layer


def _shell_layer() -> Layer:
    layer = base_layer()
    layer.binary("/usr/bin/dash")
    layer.symlink("/usr/bin/sh", "dash")
    return layer


_COREDNS_STUB = """#!/bin/sh
# zeroproxy's test bed: a placeholder for localhost/zp/coredns:1.7.0 (testbed/images.py).
# kubeadm's preflight insists that every image `kubeadm config images list` names exists, but
# the bed skips the addon/coredns phase and runs its own cluster DNS; Debian packages no CoreDNS.
echo "localhost/zp/coredns:1.7.0 is zeroproxy's test-bed placeholder, not CoreDNS:" >&2
echo "the bed skips kubeadm's addon/coredns phase and serves cluster DNS itself." >&2
exit 1
"""

# kube-proxy 1.20 in iptables mode runs these (pkg/util/iptables, pkg/util/conntrack): the
# nft-backed iptables of Debian, the same as the host's, chosen here explicitly rather than
# through the host's /etc/alternatives.
_IPTABLES_LINKS = {name: "xtables-nft-multi" for name in (
    "iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore",
    "iptables-nft", "iptables-nft-save", "iptables-nft-restore", "ip6tables-nft", "ip6tables-nft-save",
    "ip6tables-nft-restore")}

# What an e2e exec pod runs through `/bin/sh -c` (test/e2e/framework, test/e2e/network): curl and
# GNU wget (busybox's segfaults in such a root), nc with OpenBSD's -z, ss, nslookup for the
# ExternalName tests, and the coreutils/grep/sed their pipelines use.
AGNHOST_PACKAGES = ("dash", "bash", "coreutils", "grep", "sed", "mawk", "findutils", "procps", "hostname",
                    "iproute2", "curl", "wget", "netcat-openbsd", "bind9-dnsutils", "iputils-ping")


def node_images(k8s_bin: Path) -> list[Image]:
    """Every image `kubeadm config images list --image-repository localhost/zp` names for 1.20.2."""
    repo, v = NODE_REPOSITORY, f"v{K8S_VERSION}"
    images: list[Image] = []

    pause = base_layer()
    pause.file("/pause", source=_k8s_binary(k8s_bin, "pause"), mode=0o755)
    # e2e's GetPauseImageName() maps to the e2e repository: the same image under both names.
    images.append(Image("pause-3.2", [f"{repo}/pause:3.2", f"{E2E_REPOSITORY}/pause:3.2"], pause,
                        entrypoint=["/pause"]))

    # kubeadm's static pods run `kube-apiserver ...` as their command: on PATH, /usr/local/bin.
    for name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler"):
        images.append(Image(f"{name}-{v}", [f"{repo}/{name}:{v}"], _with_program(k8s_bin, name),
                            entrypoint=[f"/usr/local/bin/{name}"]))

    proxy = _with_program(k8s_bin, "kube-proxy")
    proxy.binary("/usr/sbin/xtables-nft-multi")
    for link, target in _IPTABLES_LINKS.items():
        proxy.symlink(f"/usr/sbin/{link}", target)
    proxy.shared_objects("/usr/lib/x86_64-linux-gnu/xtables")
    proxy.binary("/usr/sbin/conntrack")
    # iptables-nft reads protocol and service names; the shell is for `kubectl exec` debugging.
    for etc in ("/etc/protocols", "/etc/services", "/etc/ethertypes"):
        proxy.host_path(etc)
    proxy.binary("/usr/bin/dash")
    proxy.symlink("/usr/bin/sh", "dash")
    images.append(Image(f"kube-proxy-{v}", [f"{repo}/kube-proxy:{v}"], proxy,
                        entrypoint=["/usr/local/bin/kube-proxy"]))

    # Debian's etcd-server 3.4.23 under kubeadm's expected tag; kubeadm runs `etcd --...`.
    etcd = base_layer()
    etcd.binary("/usr/bin/etcd")
    images.append(Image("etcd-3.4.13-0", [f"{repo}/etcd:3.4.13-0"], etcd, entrypoint=["/usr/bin/etcd"]))

    coredns = _shell_layer()
    coredns.file("/coredns", data=_COREDNS_STUB, mode=0o755)
    images.append(Image("coredns-1.7.0", [f"{repo}/coredns:1.7.0"], coredns, entrypoint=["/coredns"]))
    return images


def e2e_images(k8s_bin: Path) -> list[Image]:
    """The images `[sig-network] Services` of e2e.test 1.20.2 runs: agnhost only.

    test/e2e/network/service.go and the framework it calls (pod, service jig, network utils)
    reference imageutils.Agnhost alone (exec pods, serve-hostname, netexec); pause is built with
    the node images under its e2e name too.
    """
    layer = base_layer()
    layer.file("/agnhost", source=_k8s_binary(k8s_bin, "agnhost"), mode=0o755)
    for package in AGNHOST_PACKAGES:
        layer.package_programs(package)
    layer.symlink("/usr/bin/sh", "dash")
    # The names Debian's alternatives would give them.
    layer.symlink("/usr/bin/nc", "nc.openbsd")
    layer.symlink("/usr/bin/awk", "mawk")
    layer.command("getent")
    for etc in ("/etc/protocols", "/etc/services"):
        layer.host_path(etc)
    return [Image("e2e-agnhost-2.21", [f"{E2E_REPOSITORY}/agnhost:2.21"], layer,
                  entrypoint=["/agnhost"], cmd=["pause"])]


# busybox httpd, the app issue 12's wake goal names (bench.shim_s2z --app busybox): Debian's
# static busybox (testbed/rootfs.py fetches it), nothing else; it serves /www.
APP_REPOSITORY = f"{NODE_REPOSITORY}/apps"
BUSYBOX_IMAGE = f"{APP_REPOSITORY}/busybox:1.35"
BUSYBOX_INDEX = "busybox httpd under zeroproxy\n"


def app_images() -> list[Image]:
    from testbed.rootfs import busybox_binary

    layer = base_layer()
    layer.file("/usr/bin/busybox", source=busybox_binary(), mode=0o755)
    for applet in ("sh", "httpd", "sleep", "cat", "ls", "wget"):
        layer.symlink(f"/usr/bin/{applet}", "busybox")
    layer.file("/www/index.html", data=BUSYBOX_INDEX, mode=0o644)
    return [Image("busybox-1.35", [BUSYBOX_IMAGE], layer, entrypoint=["/usr/bin/busybox"],
                  cmd=["httpd", "-f", "-p", "8080", "-h", "/www"])]


def all_images(k8s_bin: Path = K8S_BIN) -> list[Image]:
    return node_images(k8s_bin) + e2e_images(k8s_bin) + app_images()


def build_all(out_dir: Path = IMAGES_DIR, k8s_bin: Path = K8S_BIN, only: Sequence[str] = (),
              log: Callable[[str], None] | None = None) -> list[Built]:
    """Build (or reuse) every image of the bed into `out_dir`; one builder at a time."""
    start = time.monotonic()
    with _locked(out_dir / ".lock"):
        hashes = HashCache(out_dir / ".keys" / "file-hashes.json")
        quick = _quick_key(k8s_bin, only, hashes)
        stamp = out_dir / ".keys" / "all.json"
        try:
            recorded = json.loads(stamp.read_text())
        except (OSError, ValueError):
            recorded = {}
        if recorded.get("key") == quick and all(
                (out_dir / f"{b['name']}.tar").exists() and (out_dir / f"{b['name']}.tar").stat().st_size == b["size"]
                for b in recorded["built"]):
            hashes.save()
            return [Built(b["name"], out_dir / f"{b['name']}.tar", b["tags"], b["id"], b["size"], True,
                          time.monotonic() - start) for b in recorded["built"]]
        built: list[Built] = []
        try:
            for image in all_images(k8s_bin):
                if only and image.name not in only and not any(t.split("/")[-1].split(":")[0] in only
                                                               for t in image.tags):
                    continue
                b = build_image(image, out_dir, hashes)
                if log is not None and not b.cached:
                    log(f"built {b.path.name} ({b.size / 1e6:.1f} MB) in {b.seconds:.1f}s")
                built.append(b)
        finally:
            hashes.save()
        stamp.write_text(json.dumps({"key": quick, "built": [
            {"name": b.name, "tags": b.tags, "id": b.image_id, "size": b.size} for b in built]}))
        return built


def _quick_key(k8s_bin: Path, only: Sequence[str], hashes: HashCache) -> str:
    """Everything the images are made of, without resolving them file by file.

    Resolving the images (ldd and dpkg-query on a few hundred programs) takes seconds; their
    inputs are the Kubernetes binaries, the installed Debian packages (dpkg's status file changes
    with every install, upgrade or removal) and this module, which says what goes in.
    """
    parts: dict[str, Any] = {"only": sorted(only), "k8s_bin": str(k8s_bin),
                             "code": hashes.sha256(Path(__file__).resolve()),
                             "dpkg": hashes.sha256(Path("/var/lib/dpkg/status"))}
    from testbed.rootfs import busybox_binary

    parts["busybox"] = hashes.sha256(busybox_binary())  # downloaded, not installed: not in dpkg's status
    for name in K8S_BINARIES:
        path = k8s_bin / name
        parts[name] = hashes.sha256(path) if path.is_file() else None
    return hashlib.sha256(_json(parts)).hexdigest()


# --- e2e.test's registries -----------------------------------------------------------------------

# The yaml keys of RegistryList in test/utils/image/manifest.go of Kubernetes 1.20.2.
E2E_REGISTRY_KEYS = ("gcAuthenticatedRegistry", "dockerLibraryRegistry", "dockerGluster", "e2eRegistry",
                     "e2eVolumeRegistry", "promoterE2eRegistry", "buildImageRegistry", "invalidRegistry",
                     "gcRegistry", "sigStorageRegistry", "gcrReleaseRegistry", "privateRegistry",
                     "sampleRegistry")


def repo_list_yaml(registry: str = E2E_REPOSITORY) -> str:
    """KUBE_TEST_REPO_LIST contents that send every image e2e.test names to `registry`."""
    return "".join(f"{key}: {registry}\n" for key in E2E_REGISTRY_KEYS)


def write_repo_list(path: Path, registry: str = E2E_REPOSITORY) -> Path:
    """Write the file KUBE_TEST_REPO_LIST must name; returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(repo_list_yaml(registry))
    return path


# --- zeroproxy's own image (scripts/build-image.sh) -----------------------------------------------


def containerfile_lines(path: Path) -> list[str]:
    """The Containerfile's instructions, continuation lines joined and comments dropped."""
    out: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return out


def containerfile_config(path: Path) -> dict[str, Any]:
    """ENV, WORKDIR, ENTRYPOINT and CMD of the Containerfile: the one place they are written.

    scripts/build-image.sh writes its archive with exactly these, so the image the tests load and
    the one `podman build -f Containerfile` makes from the same rootfs cannot disagree.
    """
    env: dict[str, str] = {}
    out: dict[str, Any] = {"env": env, "workdir": "/", "entrypoint": None, "cmd": None}
    for line in containerfile_lines(path):
        word, _, rest = line.partition(" ")
        word, rest = word.upper(), rest.strip()
        if word == "ENV":
            m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(\S*)", rest)
            if m is None:
                raise ImageError(f"{path}: ENV {rest!r}: only the KEY=value form is understood")
            value = re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?",
                           lambda v: env.get(v.group(1), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
                                             if v.group(1) == "PATH" else ""), m.group(2))
            env[m.group(1)] = value
        elif word == "WORKDIR":
            out["workdir"] = rest
        elif word in ("ENTRYPOINT", "CMD"):
            try:
                value = json.loads(rest)
            except ValueError as e:
                raise ImageError(f"{path}: {word} must be in JSON (exec) form: {rest!r}") from e
            out[word.lower()] = value
    if "PATH" not in env:
        env["PATH"] = PATH_ENV.split("=", 1)[1]
    return out


def rootfs_image(rootfs: Path | None, tag: str, containerfile: Path, out: Path, layer_out: Path,
                 clamp_mtime: int) -> Built:
    """zeroproxy's image: the root filesystem `rootfs` (or, if None, the tar at `layer_out`
    written before) with the Containerfile's config; the layer tar is kept at `layer_out`."""
    start = time.monotonic()
    cfg = containerfile_config(containerfile)
    layer = Layer()
    image = Image(out.stem, [tag], layer, entrypoint=cfg["entrypoint"], cmd=cfg["cmd"],
                  env=[f"{k}={v}" for k, v in cfg["env"].items()], workdir=cfg["workdir"])
    if rootfs is None:
        image_id = write_archive_from_layer(image, layer_out, out)
    else:
        # The mount points stay, empty: the runtime mounts /dev, /proc and /sys over them.
        def exclude(rel: str) -> bool:
            return rel.split("/", 1)[0] in ("dev", "proc", "sys") and "/" in rel

        layer.host_tree(rootfs, clamp_mtime=clamp_mtime, exclude=exclude)
        image_id = write_archive(image, out, layer_out=layer_out)
    return Built(image.name, out, [tag], image_id, out.stat().st_size, False, time.monotonic() - start)


# --- CLI -----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.images", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[-1:]))
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or reuse) the node and e2e images")
    b.add_argument("--out", type=Path, default=IMAGES_DIR)
    b.add_argument("--k8s-bin", type=Path, default=K8S_BIN, help="scripts/build-k8s.sh's bin dir")
    b.add_argument("--only", action="append", default=[], help="image name (e.g. kube-proxy); repeatable")
    sub.add_parser("list", help="the image names and tags")
    r = sub.add_parser("repo-list", help="write the KUBE_TEST_REPO_LIST file")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--registry", default=E2E_REPOSITORY)
    f = sub.add_parser("rootfs-image", help="a root filesystem directory as a one-layer archive")
    f.add_argument("--rootfs", type=Path, help="the root directory; without it, retag the tar at --layer-out")
    f.add_argument("--tag", required=True)
    f.add_argument("--containerfile", type=Path, required=True)
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--layer-out", type=Path, required=True)
    f.add_argument("--clamp-mtime", type=int, default=int(os.environ.get("SOURCE_DATE_EPOCH", "0")))
    d = sub.add_parser("deb-packages", help="Debian packages owning a program's shared libraries")
    d.add_argument("programs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "build":
            for built in build_all(args.out, args.k8s_bin, args.only, log=lambda m: print(m, file=sys.stderr)):
                print(f"{built.path}\t{' '.join(built.tags)}\t{built.image_id}\t{built.size}")
        elif args.cmd == "list":
            for name in image_names():
                print(name)
        elif args.cmd == "repo-list":
            print(write_repo_list(args.out, args.registry))
        elif args.cmd == "rootfs-image":
            built = rootfs_image(args.rootfs, args.tag, args.containerfile, args.out, args.layer_out, args.clamp_mtime)
            print(f"{built.path}\t{args.tag}\t{built.image_id}\t{built.size}")
        elif args.cmd == "deb-packages":
            libs = [lib for p in args.programs for lib in shared_libraries(p)]
            print("\n".join(debian_packages_of(libs)))
    except ImageError as e:
        print(f"testbed.images: {e}", file=sys.stderr)
        return 1
    return 0


def image_names() -> list[str]:
    """Every tag `build` writes, without needing the binaries (for `list` and the bed)."""
    v = f"v{K8S_VERSION}"
    return [f"{NODE_REPOSITORY}/pause:3.2", f"{E2E_REPOSITORY}/pause:3.2"] + \
        [f"{NODE_REPOSITORY}/{n}:{v}" for n in ("kube-apiserver", "kube-controller-manager", "kube-scheduler",
                                                  "kube-proxy")] + \
        [f"{NODE_REPOSITORY}/etcd:3.4.13-0", f"{NODE_REPOSITORY}/coredns:1.7.0", f"{E2E_REPOSITORY}/agnhost:2.21",
         BUSYBOX_IMAGE]


if __name__ == "__main__":
    sys.exit(main())
