"""The sk_lookup program of scale to zero: load it once, link it into each opted-in pod's netns.

A checkpointed pod keeps its network namespace and IP, so every path that reaches the pod —
ClusterIP (the socket programs still pick the pod IP), NodePort, direct pod-IP traffic — ends in
that namespace. Linking `bpf/sk_lookup.c` there lets the activation proxy take over the SYNs for
the app's ports without any port rewrite and without touching the service maps; clearing one
flag gives the next SYN back to the restored app. See docs/scale-to-zero.md.

Slots: each pod gets a small integer (its index into the per-pod maps). The program, its maps and
the links belong to this process (not pinned): the proxy's listening sockets die with the process
anyway, and the kernel then removes everything by itself.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dataplane import bpfsys
from dataplane.loader import BPF_DIR, inline_includes

log = logging.getLogger(__name__)

BPF_PROG_TYPE_SK_LOOKUP = 30  # bcc 0.26's BPFProgType lacks it; the kernel number works
BPF_SK_LOOKUP = 36  # attach type
PROG_NAME = "zp_s2z_lookup"
MAX_PODS = 1024
MAX_PORTS = 8192

_libbpf = ctypes.CDLL("libbpf.so.1", use_errno=True)
_libbpf.bpf_map_update_elem.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64)
_libbpf.bpf_map_delete_elem.argtypes = (ctypes.c_int, ctypes.c_void_p)
_libbpf.bpf_map_lookup_elem.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_libbpf.bpf_map_get_next_key.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


# --- ctypes mirrors of scale to zero's structs in bpf/lib/maps.h (sizes checked against bcc in tests) ---


class PortKey(ctypes.Structure):
    """struct s2z_port_key."""

    _fields_ = (
        ("address", ctypes.c_uint8 * 16),
        ("port", ctypes.c_uint16),
        ("family", ctypes.c_uint8),
        ("proto", ctypes.c_uint8),
    )


class PortValue(ctypes.Structure):
    """struct s2z_port_value."""

    _fields_ = (("pod", ctypes.c_uint32), ("pad", ctypes.c_uint32))


class PodValue(ctypes.Structure):
    """struct s2z_pod."""

    _fields_ = (("redirect", ctypes.c_uint32), ("pad", ctypes.c_uint32))


class StatsValue(ctypes.Structure):
    """struct s2z_stats (one CPU's share): one field per dataplane.maps.S2Z_REASONS reason,
    named in lower case without the S2Z_ prefix (a test holds the two together)."""

    _fields_ = (
        ("lookups", ctypes.c_uint64),
        ("assigned", ctypes.c_uint64),
        ("no_listener", ctypes.c_uint64),
        ("assign_fail", ctypes.c_uint64),
        ("from_node", ctypes.c_uint64),
    )


class AddrKey(ctypes.Structure):
    """struct s2z_addr_key."""

    _fields_ = (("address", ctypes.c_uint8 * 16), ("family", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3))


@dataclass(frozen=True)
class LookupStats:
    """Counters of one pod slot, summed over CPUs."""

    lookups: int = 0  # connection attempts to an app port, redirected or not
    assigned: int = 0  # handed to the activation proxy
    no_listener: int = 0  # redirect on but the proxy had no listener (kernel answered RST)
    assign_fail: int = 0  # bpf_sk_assign refused the listener
    from_node: int = 0  # of lookups, those from the node's own addresses (kubelet probes)


def port_key(address: str, port: int) -> PortKey:
    """The map key for one (address, port); IPv4 in the first four bytes as the program writes it."""
    ip = ipaddress.ip_address(address)
    key = PortKey()
    raw = ip.packed
    ctypes.memmove(key.address, raw, len(raw))
    key.port = port
    key.family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    key.proto = socket.IPPROTO_TCP
    return key


def sockmap_index(slot: int, family: socket.AddressFamily) -> int:
    """Where the program looks for the proxy's listener of one family."""
    return 2 * slot + (1 if family == socket.AF_INET6 else 0)


def _check(ret: int, what: str) -> None:
    if ret < 0:
        code = -ret if ret != -1 else ctypes.get_errno()
        raise bpfsys.BpfError(code, f"{what}: {os.strerror(code)}")


class NetnsLink:
    """The program linked into one network namespace; close() detaches it."""

    def __init__(self, netns: Path, fd: int) -> None:
        self.netns = Path(netns)
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def attached(self) -> bool:
        return self.fd >= 0


class SkLookup:
    """The loaded program and its maps, shared by every opted-in pod of one node.

    Userspace owns every write: per-pod slots, the (address, port) -> slot entries, the redirect
    flag, and the proxy's listeners in the sockmap. A shadow copy of the port entries per slot
    means only differences are written.
    """

    def __init__(self, max_pods: int = MAX_PODS, max_ports: int = MAX_PORTS) -> None:
        self.max_pods = max_pods
        self.max_ports = max_ports
        self.bpf = None  # bcc.BPF once loaded
        self.prog_fd = -1
        self._fds: dict[str, int] = {}
        self._free = list(range(max_pods - 1, -1, -1))
        self._ports: dict[int, set[tuple[str, int]]] = {}

    def source(self) -> tuple[str, list[str]]:
        """The C text and cflags handed to bcc (for `print-bpf`-style inspection too)."""
        text = inline_includes(BPF_DIR / "sk_lookup.c")
        cflags = [
            f"-DZP_S2Z_MAX_PODS={self.max_pods}",
            f"-DZP_S2Z_MAX_PORTS={self.max_ports}",
            "-Wno-unused-function",
            "-Wno-macro-redefined",
        ]
        return text, cflags

    def load(self) -> None:
        import bcc  # deferred: importing bcc costs ~0.3 s

        text, cflags = self.source()
        self.bpf = bcc.BPF(text=text.encode(), cflags=cflags)
        fn = self.bpf.load_func(PROG_NAME.encode(), BPF_PROG_TYPE_SK_LOOKUP, attach_type=BPF_SK_LOOKUP)
        self.prog_fd = fn.fd
        for name in ("zp_s2z_ports", "zp_s2z_pods", "zp_s2z_stats", "zp_s2z_socks", "zp_s2z_nodes"):
            # bcc's Table refuses sockmaps; the raw fd works for all four.
            self._fds[name] = bcc.lib.bpf_table_fd(self.bpf.module, name.encode())

    def close(self) -> None:
        """Release the program and maps (links already made keep the program until closed)."""
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
            self.prog_fd = -1
            self._fds = {}

    # --- attachment -------------------------------------------------------------------------

    def attach(self, netns: Path) -> NetnsLink:
        """Link the program into the namespace at netns (e.g. /run/netns/<pod>)."""
        if self.prog_fd < 0:
            raise RuntimeError("load() first")
        ns_fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fd = bpfsys.link_create(self.prog_fd, ns_fd, BPF_SK_LOOKUP)
        finally:
            os.close(ns_fd)
        os.set_inheritable(fd, False)
        return NetnsLink(netns, fd)

    # --- slots --------------------------------------------------------------------------------

    def alloc_slot(self) -> int:
        if not self._free:
            raise RuntimeError(f"all {self.max_pods} scale-to-zero slots are in use")
        slot = self._free.pop()
        self._reset_slot(slot)
        self._ports[slot] = set()
        return slot

    def free_slot(self, slot: int) -> None:
        """Forget a pod: its port entries go first, so the program stops seeing it at once."""
        self.set_ports(slot, [], [])
        self.set_redirect(slot, False)
        for family in (socket.AF_INET, socket.AF_INET6):
            self.clear_listener(slot, family)
        self._ports.pop(slot, None)
        self._free.append(slot)

    def _reset_slot(self, slot: int) -> None:
        self.set_redirect(slot, False)
        zero = (StatsValue * bpfsys.possible_cpus())()
        key = ctypes.c_uint32(slot)
        _check(_libbpf.bpf_map_update_elem(self._fds["zp_s2z_stats"], ctypes.byref(key), zero, 0), "reset stats")

    # --- writes -------------------------------------------------------------------------------

    def set_ports(self, slot: int, addresses: Iterable[str], ports: Iterable[int]) -> None:
        """Make (address x port) the pod's app endpoints; only differences are written."""
        want = {(str(ipaddress.ip_address(a)), int(p)) for a in addresses for p in ports}
        have = self._ports.setdefault(slot, set())
        fd = self._fds["zp_s2z_ports"]
        value = PortValue(pod=slot)
        for addr, port in sorted(want - have):
            key = port_key(addr, port)
            _check(_libbpf.bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), 0), f"add {addr}:{port}")
            have.add((addr, port))
        for addr, port in sorted(have - want):
            key = port_key(addr, port)
            ret = _libbpf.bpf_map_delete_elem(fd, ctypes.byref(key))
            if ret < 0 and ctypes.get_errno() != 2:
                _check(ret, f"delete {addr}:{port}")
            have.discard((addr, port))

    def ports(self, slot: int) -> set[tuple[str, int]]:
        return set(self._ports.get(slot, ()))

    def set_redirect(self, slot: int, on: bool) -> None:
        """The flip: on = new SYNs go to the proxy; off = they reach the app."""
        key = ctypes.c_uint32(slot)
        value = PodValue(redirect=1 if on else 0)
        _check(
            _libbpf.bpf_map_update_elem(self._fds["zp_s2z_pods"], ctypes.byref(key), ctypes.byref(value), 0),
            "set redirect",
        )

    def redirect(self, slot: int) -> bool:
        key = ctypes.c_uint32(slot)
        value = PodValue()
        _check(
            _libbpf.bpf_map_lookup_elem(self._fds["zp_s2z_pods"], ctypes.byref(key), ctypes.byref(value)),
            "read redirect",
        )
        return bool(value.redirect)

    def set_listener(self, slot: int, family: socket.AddressFamily, fd: int) -> None:
        """Put the proxy's listener (a TCP socket listening in the pod's netns) in the sockmap."""
        key = ctypes.c_uint32(sockmap_index(slot, family))
        value = ctypes.c_uint32(fd)
        _check(
            _libbpf.bpf_map_update_elem(self._fds["zp_s2z_socks"], ctypes.byref(key), ctypes.byref(value), 0),
            "add listener to sockmap",
        )

    def clear_listener(self, slot: int, family: socket.AddressFamily) -> None:
        key = ctypes.c_uint32(sockmap_index(slot, family))
        _libbpf.bpf_map_delete_elem(self._fds["zp_s2z_socks"], ctypes.byref(key))  # absent is fine

    # --- reads --------------------------------------------------------------------------------

    def stats(self, slot: int) -> LookupStats:
        ncpu = bpfsys.possible_cpus()
        values = (StatsValue * ncpu)()
        key = ctypes.c_uint32(slot)
        _check(_libbpf.bpf_map_lookup_elem(self._fds["zp_s2z_stats"], ctypes.byref(key), values), "read stats")
        return LookupStats(
            lookups=sum(v.lookups for v in values),
            assigned=sum(v.assigned for v in values),
            no_listener=sum(v.no_listener for v in values),
            assign_fail=sum(v.assign_fail for v in values),
            from_node=sum(v.from_node for v in values),
        )

    def set_node_addresses(self, addresses: Iterable[str]) -> None:
        """The node's own addresses: SYNs from them are counted apart (kubelet probes)."""
        fd = self._fds["zp_s2z_nodes"]
        want = {}
        for a in addresses:
            ip = ipaddress.ip_address(str(a))
            key = AddrKey()
            ctypes.memmove(key.address, ip.packed, len(ip.packed))
            key.family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            want[bytes(key)] = key
        one = ctypes.c_uint8(1)
        for key in want.values():
            _check(_libbpf.bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(one), 0), "add node address")
        prev, nxt = None, AddrKey()
        stale = []
        while _libbpf.bpf_map_get_next_key(fd, None if prev is None else ctypes.byref(prev), ctypes.byref(nxt)) == 0:
            if bytes(nxt) not in want:
                stale.append(AddrKey.from_buffer_copy(bytes(nxt)))
            prev, nxt = AddrKey.from_buffer_copy(bytes(nxt)), AddrKey()
        for key in stale:
            _libbpf.bpf_map_delete_elem(fd, ctypes.byref(key))
