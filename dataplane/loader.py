"""Compile, load, attach and pin the socket-level programs; remove them again.

Maps are pinned by the C code itself (BPF_TABLE_PINNED under ZP_PIN_DIR): a new agent compiles
the same source and bcc opens the existing pins instead of creating maps, so it adopts what the
previous agent left. Programs are attached with BPF_F_ALLOW_MULTI, new ones first and old ones
detached after, so there is no instant with no program attached: for that moment both run,
which is harmless (the second sees a backend address, not a service, and passes).
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
from pathlib import Path

from dataplane import bpfsys, netns
from dataplane.netns import cgroup2_mount  # noqa: F401  (re-exported: callers import it from here)

log = logging.getLogger(__name__)

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
PROG_PREFIX = "zp_sock"

# bcc's BPFAttachType values, repeated so this module imports without bcc (cleanup, status).
CGROUP_INET4_CONNECT = 10
CGROUP_INET6_CONNECT = 11
CGROUP_UDP4_SENDMSG = 14
CGROUP_UDP6_SENDMSG = 15
CGROUP_UDP4_RECVMSG = 19
CGROUP_UDP6_RECVMSG = 20
CGROUP_INET4_GETPEERNAME = 29
CGROUP_INET6_GETPEERNAME = 30
CGROUP_INET_EGRESS = 1
BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18
BPF_PROG_TYPE_CGROUP_SKB = 8

SOCK_HOOKS: tuple[tuple[str, int], ...] = (
    ("zp_sock4_connect", CGROUP_INET4_CONNECT),
    ("zp_sock4_sendmsg", CGROUP_UDP4_SENDMSG),
    ("zp_sock4_recvmsg", CGROUP_UDP4_RECVMSG),
    ("zp_sock4_getpeername", CGROUP_INET4_GETPEERNAME),
    ("zp_sock6_connect", CGROUP_INET6_CONNECT),
    ("zp_sock6_sendmsg", CGROUP_UDP6_SENDMSG),
    ("zp_sock6_recvmsg", CGROUP_UDP6_RECVMSG),
    ("zp_sock6_getpeername", CGROUP_INET6_GETPEERNAME),
    # loadBalancerSourceRanges: the first packet of a socket the connect/sendmsg hooks marked
    ("zp_sock_egress", CGROUP_INET_EGRESS),
)

_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$')


def inline_includes(path: Path, _seen: set[Path] | None = None) -> str:
    """Return path's source with its local "..." includes pasted in.

    bcc rewrites map operations (`m.lookup(&k)`) only in the main source text, not in included
    headers, so the headers that hold the shared logic are pasted into one text before compiling.
    """
    seen = set() if _seen is None else _seen
    out: list[str] = []
    for line in path.read_text().splitlines():
        m = _INCLUDE.match(line)
        if not m:
            out.append(line)
            continue
        inc = (path.parent / m.group(1)).resolve()
        if inc not in seen:
            seen.add(inc)
            out.append(f"/* ---- {inc.relative_to(BPF_DIR)} ---- */")
            out.append(inline_includes(inc, seen))
    return "\n".join(out)


BPF_FS_MAGIC = 0xCAFE4A11  # statfs f_type of a bpf filesystem (linux/magic.h)


class _Statfs(ctypes.Structure):
    # Only f_type is read: it is the first field on every 64-bit Linux ABI; the rest is room
    # for the kernel to write the remainder of struct statfs (120 bytes on x86_64).
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 256)]


_libc = ctypes.CDLL(None, use_errno=True)


CGROUP2_SUPER_MAGIC = 0x63677270


def _fs_type(p: Path) -> int:
    buf = _Statfs()
    if _libc.statfs(os.fsencode(p), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"statfs {p}: {os.strerror(err)}")
    return buf.f_type & 0xFFFFFFFF


def bpffs_mounted(path: Path) -> bool:
    """Whether ``path`` lies on a bpf filesystem; a path that does not exist yet (the agent
    creates its pin directory) is judged by the nearest directory above it that does.

    ``statfs`` answers for the filesystem that really holds the path, so the mount point
    itself (``--bpffs /sys/fs/bpf``) counts, and a bpffs shadowed by another mount does not.
    """
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return _fs_type(p) == BPF_FS_MAGIC


class SetupError(RuntimeError):
    """The machine is not as the agent needs it; the message says what to change."""


def check_paths(cgroup: Path | None, pin_dir: Path) -> None:
    """Fail before any compile when ``--bpffs`` is not on a bpffs or ``--cgroup`` is not a
    cgroup v2 directory, saying why when `ip netns exec` hid them."""
    problems = []
    if not bpffs_mounted(pin_dir):
        problems.append(f"--bpffs {pin_dir} is not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)")
    if cgroup is not None:
        if not Path(cgroup).is_dir():
            problems.append(f"--cgroup {cgroup}: no such directory (a cgroup v2 directory is needed)")
        elif _fs_type(Path(cgroup)) != CGROUP2_SUPER_MAGIC:
            problems.append(f"--cgroup {cgroup} is not a cgroup v2 directory (cgroup2 is mounted at "
                            f"{_cgroup2_or_none()})")
    if problems:
        hint = netns.hidden_mounts_hint()
        raise SetupError("; ".join(problems) + (f".\n{hint}" if hint else ""))


def _cgroup2_or_none() -> str:
    try:
        return str(netns.cgroup2_mount())
    except RuntimeError:
        return "no place in this mount namespace"


def sock_source(pin_dir: Path) -> tuple[str, list[str]]:
    """The C text and cflags for the socket programs pinned under pin_dir."""
    text = inline_includes(BPF_DIR / "sock.c")
    cflags = [f'-DZP_PIN_DIR="{pin_dir}/"', "-Wno-unused-function", "-Wno-macro-redefined"]
    return text, cflags


class SockDatapath:
    """The socket-level programs of one agent: one cgroup, one pin directory."""

    def __init__(self, cgroup: Path, pin_dir: Path) -> None:
        self.cgroup = Path(cgroup)
        self.pin_dir = Path(pin_dir)
        self.bpf = None  # bcc.BPF once loaded
        self._fns: dict[str, object] = {}

    def load(self) -> None:
        """Compile the programs; creates the pinned maps or opens the existing ones."""
        import bcc  # deferred: importing bcc costs ~0.3 s and CLI helpers don't need it

        check_paths(None, self.pin_dir)
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        (self.pin_dir / "progs").mkdir(exist_ok=True)
        text, cflags = sock_source(self.pin_dir)
        self.bpf = bcc.BPF(text=text.encode(), cflags=cflags)
        for name, attach_type in SOCK_HOOKS:
            if attach_type == CGROUP_INET_EGRESS:
                self._fns[name] = self.bpf.load_func(name.encode(), bcc.BPFProgType.CGROUP_SKB)
            else:
                self._fns[name] = self.bpf.load_func(
                    name.encode(), bcc.BPFProgType.CGROUP_SOCK_ADDR, attach_type=attach_type
                )

    def attach(self) -> None:
        """Attach every hook to the cgroup, replacing programs an earlier agent attached."""
        check_paths(self.cgroup, self.pin_dir)
        cg_fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name, attach_type in SOCK_HOOKS:
                fn = self._fns[name]
                old = [p for p in bpfsys.attached_progs(cg_fd, attach_type) if p.name.startswith(PROG_PREFIX)]
                bpfsys.prog_attach(fn.fd, cg_fd, attach_type)
                for prog in old:
                    _detach_id(prog.id, cg_fd, attach_type)
                bpfsys.obj_pin(fn.fd, self.pin_dir / "progs" / name)
        finally:
            os.close(cg_fd)
        log.info("attached %d socket programs to %s", len(SOCK_HOOKS), self.cgroup)

    def table(self, name: str):
        assert self.bpf is not None, "load() first"
        return self.bpf[name.encode()]

    def close(self) -> None:
        """Release this process's handles; attachments and pins stay (that's the point)."""
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None


def _detach_id(prog_id: int, cg_fd: int, attach_type: int) -> None:
    try:
        fd = bpfsys.prog_fd_by_id(prog_id)
    except bpfsys.BpfError:
        return
    try:
        bpfsys.prog_detach(fd, cg_fd, attach_type)
    except bpfsys.BpfError as e:
        log.warning("detach program %d: %s", prog_id, e)
    finally:
        os.close(fd)


def attached(cgroup: Path) -> list[tuple[int, bpfsys.Prog]]:
    """zeroproxy programs attached directly to cgroup, as (attach type, program)."""
    cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return [
            (attach_type, p)
            for _, attach_type in SOCK_HOOKS
            for p in bpfsys.attached_progs(cg_fd, attach_type)
            if p.name.startswith(PROG_PREFIX)
        ]
    finally:
        os.close(cg_fd)


def cleanup(cgroup: Path | None, pin_dir: Path) -> list[str]:
    """Detach zeroproxy's programs from cgroup and remove every pin under pin_dir.

    Returns what was removed, for the CLI to print. Safe to run twice.
    """
    done: list[str] = []
    if cgroup is not None and Path(cgroup).is_dir():
        cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for attach_type, prog in attached(Path(cgroup)):
                _detach_id(prog.id, cg_fd, attach_type)
                done.append(f"detached {prog.name} (id {prog.id}) from {cgroup}")
        finally:
            os.close(cg_fd)
    pin_dir = Path(pin_dir)
    if pin_dir.exists():
        # A bpf mount point as the pin directory (--bpffs /sys/fs/bpf) holds other programs' pins
        # too: remove only ours (zp_* maps, progs/) and leave the mount point itself.
        mount_point = os.path.ismount(pin_dir)
        ours = [p for p in pin_dir.iterdir() if not mount_point or p.name.startswith("zp_") or p.name == "progs"]
        for top in ours:
            for path in [*sorted(top.rglob("*"), reverse=True), top] if top.is_dir() else [top]:
                if path.is_dir():
                    path.rmdir()
                else:
                    path.unlink()
                done.append(f"removed {path}")
        if not mount_point:
            shutil.rmtree(pin_dir, ignore_errors=True)
            done.append(f"removed {pin_dir}")
    return done
