"""The few bpf() operations bcc 0.26 does not wrap, through libbpf.so.1 (ctypes).

bcc loads and attaches; this module pins, opens pins, queries and detaches cgroup programs
and reads program statistics, so that one agent can adopt or remove what another left.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from dataclasses import dataclass
from pathlib import Path

_libbpf = ctypes.CDLL("libbpf.so.1", use_errno=True)

_libbpf.bpf_obj_pin.argtypes = (ctypes.c_int, ctypes.c_char_p)
_libbpf.bpf_obj_get.argtypes = (ctypes.c_char_p,)
_libbpf.bpf_prog_detach2.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int)
_libbpf.bpf_prog_attach.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_uint)
_libbpf.bpf_prog_get_fd_by_id.argtypes = (ctypes.c_uint32,)
_libbpf.bpf_obj_get_info_by_fd.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32))
_libbpf.bpf_prog_query.argtypes = (
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_uint32,
    ctypes.POINTER(ctypes.c_uint32),
    ctypes.POINTER(ctypes.c_uint32),
    ctypes.POINTER(ctypes.c_uint32),
)

_libbpf.bpf_map_create.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32,
                                   ctypes.c_uint32, ctypes.c_void_p)
_libbpf.bpf_map_update_batch.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                         ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p)

BPF_F_ALLOW_MULTI = 1 << 1
BPF_MAP_TYPE_ARRAY = 2


class BpfError(OSError):
    """A failed bpf() operation, with errno and what was being done."""


def _check(ret: int, what: str) -> int:
    if ret < 0:
        # libbpf 1.x returns -errno and also sets errno.
        code = -ret if ret != -1 else ctypes.get_errno()
        raise BpfError(code, f"{what}: {os.strerror(code)}")
    return ret


def obj_pin(fd: int, path: Path) -> None:
    """Pin fd at path, replacing an existing pin atomically (bpffs supports rename)."""
    tmp = path.with_name(path.name + "_new")  # bpffs refuses names with a dot
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    _check(_libbpf.bpf_obj_pin(fd, str(tmp).encode()), f"pin {tmp}")
    os.rename(tmp, path)


def u32_array(name: str, values: list[int]) -> int:
    """A new BPF array of __u32 holding ``values`` (index i = values[i]), unpinned: for an inner
    map, which lives as long as an outer map holds it. The caller closes the returned fd."""
    n = len(values)
    fd = _check(_libbpf.bpf_map_create(BPF_MAP_TYPE_ARRAY, name.encode()[:15], 4, 4, n, None), f"create map {name}")
    try:
        keys = (ctypes.c_uint32 * n)(*range(n))
        vals = (ctypes.c_uint32 * n)(*values)
        count = ctypes.c_uint32(n)
        _check(_libbpf.bpf_map_update_batch(fd, keys, vals, ctypes.byref(count), None), f"fill map {name}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def obj_get(path: Path) -> int:
    """Open a pinned object; the caller closes the returned fd."""
    return _check(_libbpf.bpf_obj_get(str(path).encode()), f"open pin {path}")


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int = BPF_F_ALLOW_MULTI) -> None:
    _check(_libbpf.bpf_prog_attach(prog_fd, target_fd, attach_type, flags), "attach program")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    _check(_libbpf.bpf_prog_detach2(prog_fd, target_fd, attach_type), "detach program")


class ProgInfo(ctypes.Structure):
    """Leading part of struct bpf_prog_info (uapi/linux/bpf.h); the kernel fills what fits."""

    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32),
        ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64),
        ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32),
        ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64),
    )


@dataclass(frozen=True)
class Prog:
    id: int
    name: str
    run_time_ns: int
    run_cnt: int


def prog_info(fd: int) -> Prog:
    info = ProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_libbpf.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "program info")
    return Prog(info.id, info.name.decode(errors="replace"), info.run_time_ns, info.run_cnt)


def prog_fd_by_id(prog_id: int) -> int:
    return _check(_libbpf.bpf_prog_get_fd_by_id(prog_id), f"open program id {prog_id}")


def prog_query(target_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached to a cgroup (directly, not inherited) for one hook."""
    ids = (ctypes.c_uint32 * 64)()
    count = ctypes.c_uint32(len(ids))
    flags = ctypes.c_uint32(0)
    ret = _libbpf.bpf_prog_query(target_fd, attach_type, 0, ctypes.byref(flags), ids, ctypes.byref(count))
    if ret < 0 and (-ret if ret != -1 else ctypes.get_errno()) == errno.ENOENT:
        return []
    _check(ret, "query attached programs")
    return list(ids[: count.value])


def attached_progs(target_fd: int, attach_type: int) -> list[Prog]:
    out = []
    for prog_id in prog_query(target_fd, attach_type):
        try:
            fd = prog_fd_by_id(prog_id)
        except BpfError:
            continue  # detached meanwhile
        try:
            out.append(prog_info(fd))
        finally:
            os.close(fd)
    return out


_libbpf.bpf_map_get_next_key.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_libbpf.bpf_map_lookup_elem.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_libbpf.libbpf_num_possible_cpus.argtypes = ()


def possible_cpus() -> int:
    return _check(_libbpf.libbpf_num_possible_cpus(), "count possible CPUs")


class PinnedMap:
    """Read-only view of a pinned map, without bcc (for the CLI and for tests)."""

    def __init__(self, path: Path, key_type: type, value_type: type, per_cpu: bool = False) -> None:
        self.path = Path(path)
        self.key_type = key_type
        self.value_type = value_type
        self.per_cpu = per_cpu
        self.fd = obj_get(self.path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PinnedMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _value_buf(self):
        if self.per_cpu:
            return (self.value_type * possible_cpus())()
        return self.value_type()

    def keys(self) -> list:
        out = []
        prev = None
        while True:
            nxt = self.key_type()
            ret = _libbpf.bpf_map_get_next_key(
                self.fd, None if prev is None else ctypes.byref(prev), ctypes.byref(nxt)
            )
            if ret < 0:
                break  # ENOENT: the end (a key deleted under us restarts nothing; good enough for reads)
            out.append(nxt)
            prev = nxt
        return out

    def get(self, key):
        val = self._value_buf()
        if _libbpf.bpf_map_lookup_elem(self.fd, ctypes.byref(key), ctypes.byref(val)) < 0:
            return None
        return val

    def items(self) -> list[tuple]:
        out = []
        for k in self.keys():
            v = self.get(k)
            if v is not None:
                out.append((k, v))
        return out


_libbpf.bpf_link_create.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p)


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """BPF_LINK_CREATE without options (sk_lookup into a netns, for one): returns the link fd.

    The attachment lives as long as the link fd (or a pin of it); closing it detaches. bcc 0.26
    has no helper for link-based attach types.
    """
    return _check(_libbpf.bpf_link_create(prog_fd, target_fd, attach_type, None), "create link")
