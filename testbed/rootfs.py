"""Tiny container root filesystems for scale-to-zero backends.

Two flavours, both serving the files under /www over HTTP so tests and benchmarks can treat them
alike:

- busybox (default): Debian's `busybox-static` binary plus a few symlinks, no libraries, ~2 MB.
  Its httpd has been measured to checkpoint and restore cleanly with CRIU 4.2.1 under runc, and
  a static binary cannot be broken by the host's libraries changing between dump and restore.
  busybox's own sockets always set SO_REUSEADDR.
- python: an empty skeleton whose /usr is the host's /usr bind-mounted read-only, running a
  small `http.server` script. It exists for what busybox cannot do: a listener *without*
  SO_REUSEADDR (the activation proxy must cope with that case) and responses the test fully
  controls. Its cost is a dependency on the host's Python staying the same across a restore.

The busybox binary comes from Debian's package (verified by apt against the signed index) and is
cached under /var/tmp/zeroproxy, so a rootfs costs one file copy.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CACHE_DIR = Path(os.environ.get("ZP_CACHE", "/var/tmp/zeroproxy"))
BUSYBOX_PACKAGE = "busybox-static"
DOCROOT = "/www"

# Applets linked into /bin: the shell for debugging with `runc exec`, httpd to serve.
_APPLETS = ("sh", "httpd", "ls", "cat", "sleep")

# Mount points every OCI container of ours mounts something on (see scaletozero.runtime).
_SKELETON_DIRS = ("bin", "dev", "etc", "proc", "sys", "tmp", "www")

_PASSWD = "root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
_GROUP = "root:x:0:\nnogroup:x:65534:\n"

# The python flavour's server. Quiet on purpose: a log line written to a stdio pipe whose reader
# has gone would fail the request, and the requests are not what these backends are for.
_PY_SERVER = '''\
"""HTTP server for zeroproxy backends: serves /www, SO_REUSEADDR only when asked."""
import argparse
import functools
import http.server
import socket


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--reuseaddr", action="store_true")
    a = p.parse_args()
    Server.allow_reuse_address = a.reuseaddr
    Server.address_family = socket.AF_INET
    handler = functools.partial(Handler, directory="/www")
    with Server(("0.0.0.0", a.port), handler) as srv:
        srv.serve_forever()


main()
'''


class RootfsError(Exception):
    """The rootfs could not be built; the message says what to install or fix."""


@dataclass(frozen=True)
class Rootfs:
    """A prepared root filesystem and what the container needs to use it.

    `mounts` are extra OCI mount entries the tree depends on (host /usr for python), so the
    runtime never has to know which flavour it runs.
    """

    path: Path
    mounts: tuple[Mapping[str, Any], ...] = field(default=())


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on path: parallel test workers share one cache entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(args: list[str], cwd: Path | None = None) -> str:
    res = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RootfsError(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.strip()[-800:]}")
    return res.stdout


def busybox_binary(cache_dir: Path = CACHE_DIR) -> Path:
    """Return the cached static busybox binary, downloading Debian's package the first time.

    `apt-get download` fetches the .deb without installing it (the host's busybox, if any, is
    left alone) and apt checks it against the signed package index.
    """
    version = _run(["apt-cache", "policy", BUSYBOX_PACKAGE])
    cand = next((ln.split()[1] for ln in version.splitlines() if ln.strip().startswith("Candidate:")), "")
    if not cand or cand == "(none)":
        raise RootfsError(
            f"apt knows no {BUSYBOX_PACKAGE}; run `apt-get update` (scripts/setup.sh does on a fresh machine)"
        )
    safe = cand.replace(":", "_")
    out = cache_dir / f"busybox-{safe}" / "busybox"
    if out.exists():
        return out
    with _locked(cache_dir / "busybox.lock"):
        if out.exists():
            return out
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix="busybox-dl.") as tmp:
            tmpdir = Path(tmp)
            _run(["apt-get", "download", "-qq", f"{BUSYBOX_PACKAGE}={cand}"], cwd=tmpdir)
            debs = list(tmpdir.glob("*.deb"))
            if len(debs) != 1:
                raise RootfsError(f"apt-get download left {debs!r} in {tmpdir}")
            _run(["dpkg-deb", "-x", str(debs[0]), str(tmpdir / "x")])
            binary = tmpdir / "x" / "bin" / "busybox"
            if not binary.is_file():
                raise RootfsError(f"{debs[0].name} has no bin/busybox")
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(binary, out.with_suffix(".new"))
            out.with_suffix(".new").rename(out)
    return out


def _skeleton(dest: Path, files: Mapping[str, bytes | str]) -> None:
    """Create dest with the mount points, account files and the caller's files (paths absolute)."""
    if dest.exists() and any(dest.iterdir()):
        raise RootfsError(f"{dest} exists and is not empty")
    for d in _SKELETON_DIRS:
        (dest / d).mkdir(parents=True, exist_ok=True)
    (dest / "tmp").chmod(0o1777)
    (dest / "etc/passwd").write_text(_PASSWD)
    (dest / "etc/group").write_text(_GROUP)
    for name, content in files.items():
        if not name.startswith("/") or ".." in Path(name).parts:
            raise RootfsError(f"rootfs file names must be absolute and stay inside: {name!r}")
        target = dest / name.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            target.write_text(content)
        else:
            target.write_bytes(content)


def build_busybox_rootfs(
    dest: Path, files: Mapping[str, bytes | str] | None = None, cache_dir: Path = CACHE_DIR
) -> Rootfs:
    """Build a busybox rootfs at dest (created; must not hold anything yet).

    files maps absolute in-container paths to contents, e.g. {"/www/index.html": "hello"}.
    """
    binary = busybox_binary(cache_dir)
    _skeleton(dest, files or {})
    shutil.copy2(binary, dest / "bin" / "busybox")
    for applet in _APPLETS:
        (dest / "bin" / applet).symlink_to("busybox")
    return Rootfs(path=dest)


def build_python_rootfs(dest: Path, files: Mapping[str, bytes | str] | None = None) -> Rootfs:
    """Build a skeleton whose /usr is the host's, bind-mounted read-only, plus the server script.

    Debian 12 is usr-merged, so /bin, /lib and /lib64 are symlinks into /usr exactly like on the
    host, and the host's python3 and its libraries resolve unchanged.
    """
    python = Path("/usr/bin/python3")
    if not python.exists():
        raise RootfsError("the python rootfs needs the host's /usr/bin/python3")
    _skeleton(dest, {**(files or {}), "/app/server.py": _PY_SERVER})
    (dest / "bin").rmdir()
    (dest / "usr").mkdir()
    for link in ("bin", "sbin", "lib", "lib64"):
        if not (dest / link).exists():
            (dest / link).symlink_to(f"usr/{link}")
    usr = {
        "destination": "/usr",
        "type": "bind",
        "source": "/usr",
        "options": ["rbind", "ro", "nosuid", "nodev"],
    }
    return Rootfs(path=dest, mounts=(usr,))


def httpd_command(port: int, docroot: str = DOCROOT) -> list[str]:
    """busybox httpd in the foreground (it must stay the container's process, not daemonize)."""
    return ["/bin/busybox", "httpd", "-f", "-p", str(port), "-h", docroot]


def python_server_command(port: int, *, reuseaddr: bool = False) -> list[str]:
    """The python flavour's server; without reuseaddr its listener lacks SO_REUSEADDR."""
    cmd = ["/usr/bin/python3", "-I", "-B", "/app/server.py", "--port", str(port)]
    if reuseaddr:
        cmd.append("--reuseaddr")
    return cmd
