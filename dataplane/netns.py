"""Network namespaces and the cgroup v2 mount: the few OS facts every part needs, in one place.

Threads enter a namespace with setns(CLONE_NEWNET) only (never `ip netns exec`, which also
makes a mount namespace: /sys is remounted, bpffs and cgroup2 vanish, and CRIU cannot dump a
process that lives in it). Python 3.11 has no os.setns, hence ctypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
from collections.abc import Iterator
from pathlib import Path

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")  # where `ip netns` and pyroute2 keep named namespaces

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.setns.restype = ctypes.c_int


def netns_path(netns: str | os.PathLike[str]) -> Path:
    """A name under /run/netns, or a path (e.g. /proc/PID/ns/net) as it is."""
    p = Path(netns)
    return p if p.is_absolute() else NETNS_DIR / p


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace fd refers to."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


def enter(netns: str | os.PathLike[str]) -> None:
    """Enter a namespace for good (a child's preexec_fn)."""
    fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def in_netns(netns: str | os.PathLike[str] | int) -> Iterator[None]:
    """Run the block with the calling thread in a network namespace, then return.

    For what acts on "the current netns" rather than taking one: /proc/sys/net, sockets made
    inside (they stay there afterwards), BPF_PROG_TEST_RUN's device, bpf_fib_lookup's routes.
    ``netns`` is a name under /run/netns, a path, or an open namespace fd.
    setns() moves only the calling thread; other threads are unaffected.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if isinstance(netns, int):
            setns(netns)  # an open namespace fd
        else:
            enter(netns)
        try:
            yield
        finally:
            setns(own)
    finally:
        os.close(own)


def cgroup2_mount(mountinfo: str | None = None) -> Path:
    """Where cgroup v2 is mounted: /sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    for line in mountinfo.splitlines():
        pre, sep, post = line.partition(" - ")
        if sep and post.split(" ", 1)[0] == "cgroup2":
            mount_point = pre.split(" ")[4]
            # mountinfo escapes space, tab, newline and backslash as \ooo octal
            return Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), mount_point))
    raise RuntimeError("no cgroup2 filesystem is mounted (see /proc/self/mountinfo)")


def _mount_points(mountinfo: str) -> list[str]:
    points = []
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) > 4:
            points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
    return points


def own_netns_name(netns_dir: Path = NETNS_DIR) -> str | None:
    """The /run/netns name of the namespace this process is in, if it has one."""
    try:
        own = os.stat("/proc/self/ns/net")
        entries = sorted(netns_dir.iterdir())
    except OSError:
        return None
    for entry in entries:
        try:
            st = os.stat(entry)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
            return entry.name
    return None


def sys_remounted(mountinfo: str | None = None) -> bool:
    """Whether /sys is a bare sysfs with nothing mounted beneath it, as `ip netns exec` leaves
    it: it mounts a fresh sysfs (one for its netns) in a mount namespace of its own, so the
    host's cgroup2 and bpffs under /sys are out of sight."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    points = _mount_points(mountinfo)
    return "/sys" in points and not any(p.startswith("/sys/") for p in points)


def hidden_mounts_hint(mountinfo: str | None = None, netns_dir: Path = NETNS_DIR) -> str:
    """What to tell a user whose bpffs or cgroup2 is missing because of `ip netns exec`
    ("" when that is not the cause)."""
    if not sys_remounted(mountinfo):
        return ""
    name = own_netns_name(netns_dir)
    where = f"`ip netns exec {name}`" if name else "`ip netns exec` (or something like it)"
    enter = f"nsenter --net={netns_dir / name}" if name else "nsenter --net=/run/netns/NAME"
    return (f"this process runs under {where}: it remounts /sys in a mount namespace of its own, so "
            f"the bpffs and cgroup2 mounted under /sys are out of sight. Enter only the network "
            f"namespace instead (`{enter} zeroproxy ...`), or pass --bpffs and --cgroup on "
            f"mounts outside /sys, which survive (a bpffs and a cgroup2 mounted under /run, say)")
