"""Read the TC path's conntrack and SNAT maps from their pins, for the CLI (zeroproxy/ct_cli.py) and tests.

Works without bcc and without the agent: it opens the pinned maps under the agent's bpffs
directory read-only, so an operator can look at live flows while the agent runs (or after it
died). Entries are shown with their remaining lifetime; expired ones are still listed (the
LRU keeps them until it needs the room) but marked, because the kernel ignores them.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from dataplane import maps

_libbpf = ctypes.CDLL("libbpf.so.1", use_errno=True)
_libbpf.bpf_obj_get.argtypes = (ctypes.c_char_p,)
_libbpf.bpf_map_get_next_key.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_libbpf.bpf_map_lookup_elem.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)

PROTO_NAMES = {socket.IPPROTO_TCP: "TCP", socket.IPPROTO_UDP: "UDP"}


@dataclass(frozen=True)
class Flow:
    """One conntrack entry: a client's flow to a frontend and what it was translated to."""

    proto: str
    client: str  # "addr:port"
    frontend: str
    backend: str
    snat: str | None  # the node address:port the backend sees, None for local backends
    state: str
    expires_in_s: float  # negative = expired
    rev_nat_id: int
    backend_id: int


@dataclass(frozen=True)
class ReverseEntry:
    """One SNAT-map entry: the tuple a reply comes back with, and what it is restored to."""

    proto: str
    reply_from: str  # the backend
    reply_to: str  # the node's SNAT address:port, or the client for a local backend
    client: str
    frontend: str
    snat: bool


def _check(ret: int, what: str) -> int:
    if ret < 0:
        code = -ret if ret != -1 else ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return ret


def iter_pinned(path: Path, key_type: type[ctypes.Structure],
                value_type: type[ctypes.Structure]) -> Iterator[tuple[ctypes.Structure, ctypes.Structure]]:
    """Every (key, value) of a pinned hash map; entries deleted meanwhile are skipped."""
    fd = _check(_libbpf.bpf_obj_get(str(path).encode()), f"open {path}")
    try:
        key = key_type()
        nxt = key_type()
        value = value_type()
        prev = None
        while _libbpf.bpf_map_get_next_key(fd, prev, ctypes.byref(nxt)) == 0:
            ctypes.memmove(ctypes.byref(key), ctypes.byref(nxt), ctypes.sizeof(key))
            prev = ctypes.byref(key)
            if _libbpf.bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value)) == 0:
                yield key_type.from_buffer_copy(key), value_type.from_buffer_copy(value)
    finally:
        os.close(fd)


def _ep(raw: ctypes.Array, port_be: int) -> str:
    data = bytes(raw)
    if len(data) == 16:
        return f"[{ipaddress.IPv6Address(data)}]:{socket.ntohs(port_be)}"
    return f"{ipaddress.IPv4Address(data)}:{socket.ntohs(port_be)}"


def _pins(pin_dir: Path, v4: str, v6: str, types4: tuple, types6: tuple) -> Iterator[tuple]:
    """Entries of the IPv4 map and then of its IPv6 twin (absent when an older agent made the pins)."""
    yield from iter_pinned(Path(pin_dir) / maps.MAP_PINS[v4], *types4)
    path6 = Path(pin_dir) / maps.MAP_PINS[v6]
    if path6.exists():
        yield from iter_pinned(path6, *types6)


def read_flows(pin_dir: Path, now_ns: int | None = None) -> list[Flow]:
    """The conntrack entries under pin_dir, oldest expiry first."""
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) if now_ns is None else now_ns
    flows = []
    for k, v in _pins(pin_dir, "zp_ct4", "zp_ct6", (maps.Tuple4, maps.Ct4Entry), (maps.Tuple6, maps.Ct6Entry)):
        snat = _ep(v.snat_addr, v.snat_port) if v.flags & maps.CtFlag.SNAT else None
        try:
            state = maps.CtState(v.state).name
        except ValueError:
            state = str(v.state)
        flows.append(Flow(
            proto=PROTO_NAMES.get(k.proto, str(k.proto)),
            client=_ep(k.saddr, k.sport),
            frontend=_ep(k.daddr, k.dport),
            backend=_ep(v.backend_addr, v.backend_port),
            snat=snat,
            state=state,
            expires_in_s=round((v.expires - now) / 1e9, 3),
            rev_nat_id=v.rev_nat_id,
            backend_id=v.backend_id,
        ))
    return sorted(flows, key=lambda f: f.expires_in_s)


def read_reverse(pin_dir: Path) -> list[ReverseEntry]:
    """The SNAT / reverse-NAT entries under pin_dir."""
    out = []
    for k, v in _pins(pin_dir, "zp_snat4", "zp_snat6", (maps.Tuple4, maps.Nat4Entry), (maps.Tuple6, maps.Nat6Entry)):
        out.append(ReverseEntry(
            proto=PROTO_NAMES.get(k.proto, str(k.proto)),
            reply_from=_ep(k.saddr, k.sport),
            reply_to=_ep(k.daddr, k.dport),
            client=_ep(v.client_addr, v.client_port),
            frontend=_ep(v.frontend_addr, v.frontend_port),
            snat=bool(v.flags & maps.NAT_F_SNAT),
        ))
    return sorted(out, key=lambda e: (e.reply_to, e.reply_from))


def format_flows(flows: Sequence[Flow]) -> str:
    """A table like `conntrack -L`, one line per flow."""
    lines = [f"{'PROTO':5} {'CLIENT':21} {'FRONTEND':21} {'BACKEND':21} {'SNAT':21} {'STATE':11} EXPIRES"]
    for f in flows:
        expires = f"{f.expires_in_s:.0f}s" if f.expires_in_s > 0 else "expired"
        lines.append(f"{f.proto:5} {f.client:21} {f.frontend:21} {f.backend:21} {f.snat or '-':21} "
                     f"{f.state:11} {expires}")
    return "\n".join(lines)
