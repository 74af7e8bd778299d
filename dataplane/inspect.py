"""What a node has programmed, read straight from the pinned maps (no bcc, no agent needed).

Used by `zeroproxy service list` / `zeroproxy status` (also from `kubectl exec` into the
DaemonSet pod) and by tests that check the kernel state rather than the agent's opinion of it.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path

from dataplane import bpfsys, maps

PROTO_NAMES = {socket.IPPROTO_TCP: "TCP", socket.IPPROTO_UDP: "UDP", 132: "SCTP"}


@dataclass
class ProgrammedService:
    frontend: str  # "10.96.0.10:80/TCP"
    rev_nat_id: int
    count: int
    backends: list[str] = field(default_factory=list)  # slot order; "?" for a missing slot
    # "internal": what the socket hooks (and the TC path, for most frontends) use; "external": the
    # TC path's own view of an externalTrafficPolicy: Local frontend (its local backends)
    view: str = "internal"
    flags: int = 0  # slot 0's maps.SvcFlag bits
    source_ranges: list[str] = field(default_factory=list)  # loadBalancerSourceRanges (SRC_RANGE frontends)


def _fmt(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, proto: int | None = None) -> str:
    host = f"[{addr}]" if addr.version == 6 else str(addr)
    return f"{host}:{port}" + (f"/{PROTO_NAMES.get(proto, proto)}" if proto is not None else "")


def source_ranges(pin_dir: Path) -> dict[int, list[str]]:
    """loadBalancerSourceRanges by service-port id, from the two pinned tries."""
    out: dict[int, list[str]] = {}
    for name, key_t in (("zp_lb4_src", maps.Lb4SrcKey), ("zp_lb6_src", maps.Lb6SrcKey)):
        path = Path(pin_dir) / maps.MAP_PINS[name]
        if not path.exists():
            continue
        with bpfsys.PinnedMap(path, key_t, ctypes.c_uint8) as trie:
            for k, _ in trie.items():
                net = ipaddress.ip_network((bytes(k.address), k.prefixlen - maps.SRC_RANGE_PREFIX))
                out.setdefault(k.rev_nat_id, []).append(str(net))
    return {rev: sorted(nets) for rev, nets in out.items()}


def service_list(pin_dir: Path) -> list[ProgrammedService]:
    out: list[ProgrammedService] = []
    ranges = source_ranges(pin_dir)
    for version, svc_name, be_name, key_t, be_t in (
        (4, "zp_lb4_svc", "zp_lb4_be", maps.Lb4Key, maps.Lb4Backend),
        (6, "zp_lb6_svc", "zp_lb6_be", maps.Lb6Key, maps.Lb6Backend),
    ):
        svc_path = Path(pin_dir) / maps.MAP_PINS[svc_name]
        be_path = Path(pin_dir) / maps.MAP_PINS[be_name]
        if not svc_path.exists():
            continue
        with bpfsys.PinnedMap(svc_path, key_t, maps.LbService) as svc, bpfsys.PinnedMap(
            be_path, ctypes.c_uint32, be_t
        ) as be:
            backends = {k.value: v for k, v in be.items()}
            entries = svc.items()
            slots = {}
            heads = []
            for k, v in entries:
                fe = (bytes(k.address), k.dport, k.proto, k.scope)
                if k.slot == 0:
                    heads.append((k, v))
                else:
                    slots[(fe, k.slot)] = v.backend_id
            for k, v in heads:
                fe = (bytes(k.address), k.dport, k.proto, k.scope)
                addr = maps.addr_from(k.address, version)
                view = "external" if k.scope == maps.SCOPE_EXTERNAL else "internal"
                ps = ProgrammedService(_fmt(addr, maps.ntohs(k.dport), k.proto), v.rev_nat_id, v.count, view=view,
                                       flags=v.flags,
                                       source_ranges=ranges.get(v.rev_nat_id, []) if v.flags & maps.SvcFlag.SRC_RANGE
                                       else [])
                for slot in range(1, v.count + 1):
                    bid = slots.get((fe, slot))
                    b = backends.get(bid) if bid is not None else None
                    ps.backends.append(
                        _fmt(maps.addr_from(b.address, version), maps.ntohs(b.port)) if b is not None else "?"
                    )
                out.append(ps)
    out.sort(key=lambda s: (s.frontend, s.view))
    return out


def stats(pin_dir: Path) -> dict[str, int]:
    """The socket hooks' counters (zp_stats), by lower-case reason name, summed over CPUs."""
    path = Path(pin_dir) / maps.MAP_PINS["zp_stats"]
    out: dict[str, int] = {}
    with bpfsys.PinnedMap(path, ctypes.c_uint32, ctypes.c_uint64, per_cpu=True) as m:
        for stat in maps.SOCK_REASONS:
            vals = m.get(ctypes.c_uint32(stat))
            out[stat.name.lower()] = sum(vals) if vals is not None else 0
    return out


def np_stats(pin_dir: Path) -> dict[str, int]:
    """The TC path's counters (zp_np_stats), by lower-case reason name; {} without the TC path."""
    path = Path(pin_dir) / maps.MAP_PINS["zp_np_stats"]
    out: dict[str, int] = {}
    if not path.exists():
        return out
    with bpfsys.PinnedMap(path, ctypes.c_uint32, ctypes.c_uint64, per_cpu=True) as m:
        for stat in maps.NP_REASONS:
            vals = m.get(ctypes.c_uint32(stat))
            out[stat.name.lower()] = sum(vals) if vals is not None else 0
    return out
