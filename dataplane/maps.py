"""ctypes mirrors of the BPF map keys and values in bpf/lib/maps.h, and of the inner result
codes and counter reasons in bpf/lib/common.h.

One structure per key/value; tests compare each one's size with bcc's generated type, so a
change on one side that is not made on the other fails loudly instead of corrupting maps. The
two enums are compared with common.h itself (names and values) by tests/test_bpf_codes.py.
(Scale to zero's map structs are mirrored in scaletozero/sklookup.py, next to their only user.)
"""

from __future__ import annotations

import ctypes
import enum
import errno
import ipaddress
import socket

# Map names as the C code declares them, and the pin file names (the _vN suffix is the layout
# version: a layout change gets a new name instead of being applied under running programs).
MAP_PINS: dict[str, str] = {
    "zp_lb4_svc": "zp_lb4_svc_v1",
    "zp_lb6_svc": "zp_lb6_svc_v1",
    "zp_lb4_be": "zp_lb4_be_v1",
    "zp_lb6_be": "zp_lb6_be_v1",
    "zp_rnat4": "zp_rnat4_v1",
    "zp_rnat6": "zp_rnat6_v1",
    "zp_lb_affinity": "zp_lb_affinity_v1",
    "zp_lb4_src": "zp_lb4_src_v1",
    "zp_lb6_src": "zp_lb6_src_v1",
    "zp_stats": "zp_stats_v2",  # v1 had 8 entries
}


class Code(enum.IntEnum):
    """Inner result codes of every BPF program (ZP_OK, ZP_E*); mirrors common.h, one meaning each."""

    OK = 0
    ENOTSVC = -errno.ENXIO  # not ours: not a frontend / not a port of an opted-in pod
    ENOBACKEND = -errno.ENOENT  # the service has no backend
    ESTALE = -errno.ESTALE  # a slot or backend vanished between two lookups
    EMAPWRITE = -errno.ENOSPC  # a map update failed
    EREWRITE = -errno.EFAULT  # a packet store or checksum helper failed
    EFIB = -errno.EHOSTUNREACH  # no route to the new destination
    ECTMISS = -errno.ENOTCONN  # mid-stream TCP packet of an untracked flow
    ECTGONE = -errno.EPIPE  # tracked TCP flow whose backend was deleted
    ECTSTALE = -errno.ETIMEDOUT  # reply of an expired or replaced flow
    ENOSNATPORT = -errno.EADDRNOTAVAIL  # every SNAT port tried was in use
    EREFUSE = -errno.ECONNREFUSED  # no backend behind a node address
    EDIRECT = -errno.EAGAIN  # opted-in pod's port with redirect off
    ENOLISTENER = -errno.ENOTSOCK  # redirect on but no proxy listener
    EASSIGN = -errno.EINVAL  # bpf_sk_assign refused the listener
    ESRCRANGE = -errno.EACCES  # the source is outside a LoadBalancer frontend's source ranges


class Reason(enum.IntEnum):
    """Why a datapath counter moved; mirrors enum zp_reason in common.h (names without ZP_REASON_).

    The value is the index in zp_stats (socket hooks) and zp_np_stats (TC path); scale to zero
    keeps the S2Z_* ones per pod as fields of sklookup.StatsValue (lower-case names, no prefix).
    """

    XLATE_OK = 0
    NO_BACKEND = 1
    STALE_BACKEND = 2
    RNAT_WRITE = 3
    RNAT_HIT = 4
    UNKNOWN = 5
    NEW_FLOW = 6
    FWD = 7
    REPLY = 8
    SNAT_EXHAUSTED = 9
    BACKEND_GONE = 10
    CT_MISS = 11
    FIB_FAIL = 12
    REWRITE_FAIL = 13
    MAP_WRITE = 14
    STALE_REPLY = 15
    S2Z_LOOKUPS = 16
    S2Z_ASSIGNED = 17
    S2Z_NO_LISTENER = 18
    S2Z_ASSIGN_FAIL = 19
    S2Z_FROM_NODE = 20
    SRC_RANGE = 21


STAT_MAX, NP_STAT_MAX = 32, 32  # entries of zp_stats / zp_np_stats (ZP_STAT_MAX, ZP_NP_STAT_MAX)
# What each counter array counts, in index order.
SOCK_REASONS: tuple[Reason, ...] = (*(r for r in Reason if r <= Reason.UNKNOWN), Reason.SRC_RANGE)
NP_REASONS: tuple[Reason, ...] = (Reason.NO_BACKEND, Reason.STALE_BACKEND, Reason.UNKNOWN,
                                  *(r for r in Reason if Reason.NEW_FLOW <= r <= Reason.STALE_REPLY),
                                  Reason.SRC_RANGE)
S2Z_REASONS: tuple[Reason, ...] = tuple(r for r in Reason if r.name.startswith("S2Z_"))


class Lb4Key(ctypes.Structure):
    _fields_ = (
        ("address", ctypes.c_uint8 * 4),
        ("dport", ctypes.c_uint16),  # network byte order
        ("slot", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("scope", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
    )


class Lb6Key(ctypes.Structure):
    _fields_ = (
        ("address", ctypes.c_uint8 * 16),
        ("dport", ctypes.c_uint16),  # network byte order
        ("slot", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("scope", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
    )


class _BackendOrTimeout(ctypes.Union):
    _fields_ = (
        ("backend_id", ctypes.c_uint32),  # slot > 0
        ("affinity_timeout", ctypes.c_uint32),  # slot 0: seconds, 0 = no affinity
    )


class LbService(ctypes.Structure):
    """struct lb_service; the union is the four bytes of v1's plain backend_id (pins stay valid)."""

    _anonymous_ = ("u",)
    _fields_ = (
        ("u", _BackendOrTimeout),
        ("count", ctypes.c_uint16),
        ("rev_nat_id", ctypes.c_uint16),
        ("flags", ctypes.c_uint32),
    )


class Lb4Backend(ctypes.Structure):
    _fields_ = (
        ("address", ctypes.c_uint8 * 4),
        ("port", ctypes.c_uint16),  # network byte order
        ("proto", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
    )


class Lb6Backend(ctypes.Structure):
    _fields_ = (
        ("address", ctypes.c_uint8 * 16),
        ("port", ctypes.c_uint16),  # network byte order
        ("proto", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
    )


class Rnat4Key(ctypes.Structure):
    _fields_ = (
        ("cookie", ctypes.c_uint64),
        ("address", ctypes.c_uint8 * 4),
        ("port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
    )


class Rnat6Key(ctypes.Structure):
    _fields_ = (
        ("cookie", ctypes.c_uint64),
        ("address", ctypes.c_uint8 * 16),
        ("port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16 * 3),
    )


class Rnat4Value(ctypes.Structure):
    _fields_ = (
        ("address", ctypes.c_uint8 * 4),
        ("port", ctypes.c_uint16),
        ("rev_nat_id", ctypes.c_uint16),
    )


class Rnat6Value(ctypes.Structure):
    _fields_ = (
        ("address", ctypes.c_uint8 * 16),
        ("port", ctypes.c_uint16),
        ("rev_nat_id", ctypes.c_uint16),
    )


AFFINITY_CLIENT_IP4 = 1 << 63  # netns_cookie of a TC-path client: this bit + its IPv4 address
AFFINITY_TC_CLIENT = 0x80000000  # AffinityKey.tc_client (ZP_AFFINITY_TC_CLIENT): that bit, in the high half


class _AffinityTcClient(ctypes.LittleEndianStructure):
    _fields_ = (
        ("client_ip4", ctypes.c_uint8 * 4),  # network byte order
        ("tc_client", ctypes.c_uint32),  # AFFINITY_TC_CLIENT
    )


class _AffinityClient(ctypes.Union):
    _anonymous_ = ("tc",)
    _fields_ = (
        ("netns_cookie", ctypes.c_uint64),  # socket hooks: bpf_get_netns_cookie()
        ("tc", _AffinityTcClient),
    )


class AffinityKey(ctypes.Structure):
    """struct lb_affinity_key; the union has v1's byte layout (pins stay valid)."""

    _anonymous_ = ("client",)
    _fields_ = (
        ("client", _AffinityClient),
        ("rev_nat_id", ctypes.c_uint16),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 5),
    )


class AffinityValue(ctypes.Structure):
    _fields_ = (
        ("last_used_ns", ctypes.c_uint64),
        ("backend_id", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    )


SRC_RANGE_PREFIX = 32  # ZP_SRC_RANGE_PREFIX: rev_nat_id and pad, matched in full before the CIDR


class Lb4SrcKey(ctypes.Structure):
    """struct lb4_src_key: (service port, IPv4 CIDR) of loadBalancerSourceRanges."""

    _fields_ = (
        ("prefixlen", ctypes.c_uint32),
        ("rev_nat_id", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("address", ctypes.c_uint8 * 4),
    )


class Lb6SrcKey(ctypes.Structure):
    """struct lb6_src_key: (service port, IPv6 CIDR) of loadBalancerSourceRanges."""

    _fields_ = (
        ("prefixlen", ctypes.c_uint32),
        ("rev_nat_id", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("address", ctypes.c_uint8 * 16),
    )


# (map name) -> (key type, value type); the value of zp_stats is per CPU, checked separately.
MAP_TYPES: dict[str, tuple[type[ctypes.Structure] | type, type[ctypes.Structure] | type]] = {
    "zp_lb4_svc": (Lb4Key, LbService),
    "zp_lb6_svc": (Lb6Key, LbService),
    "zp_lb4_be": (ctypes.c_uint32, Lb4Backend),
    "zp_lb6_be": (ctypes.c_uint32, Lb6Backend),
    "zp_rnat4": (Rnat4Key, Rnat4Value),
    "zp_rnat6": (Rnat6Key, Rnat6Value),
    "zp_lb_affinity": (AffinityKey, AffinityValue),
    "zp_lb4_src": (Lb4SrcKey, ctypes.c_uint8),
    "zp_lb6_src": (Lb6SrcKey, ctypes.c_uint8),
}


def htons(port: int) -> int:
    return socket.htons(port)


def ntohs(port: int) -> int:
    return socket.ntohs(port)


def addr_bytes(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    return addr.packed


def addr_from(raw: ctypes.Array, version: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    data = bytes(raw)
    return ipaddress.IPv4Address(data) if version == 4 else ipaddress.IPv6Address(data)


# ---- TC path (bpf/lib/maps.h, ZP_MAPS_NODEPORT) ----------------------------------------------

MAP_PINS.update({
    "zp_ct4": "zp_ct4_v1",
    "zp_snat4": "zp_snat4_v1",
    "zp_np_cfg": "zp_np_cfg_v1",
    "zp_np_dev4": "zp_np_dev4_v1",
    "zp_np_stats": "zp_np_stats_v3",  # v1 had indexes of its own, v2 16 entries
    "zp_maglev": "zp_maglev_v1",
})


class MaglevKey(ctypes.Structure):
    """struct maglev_key: one Maglev table per service port and view."""

    _fields_ = (
        ("rev_nat_id", ctypes.c_uint16),
        ("scope", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    )


class SvcFlag(enum.IntFlag):
    """lb_service.flags of a frontend's slot 0; mirrors ZP_SVC_F_* in bpf/lib/maps.h."""

    EXTERNAL = 0x1  # served by the TC programs (NodePort, ExternalIP, LoadBalancer IP)
    LOCAL = 0x2  # externalTrafficPolicy: Local (local backends only, never SNAT)
    NODEPORT = 0x4  # the frontend address is a node address
    SCOPED = 0x8  # eTP=Local external frontend: this (internal) entry serves the socket hooks,
    # the TC programs use the frontend's SCOPE_EXTERNAL entry (local backends)
    SRC_RANGE = 0x10  # LoadBalancer frontend with loadBalancerSourceRanges (zp_lb4_src / zp_lb6_src)
    MAGLEV = 0x20  # external frontend whose new flows use the Maglev table of (rev_nat_id, scope)


SCOPE_INTERNAL, SCOPE_EXTERNAL = 0, 1  # lb4_key.scope / lb6_key.scope; ZP_SCOPE_* in bpf/lib/maps.h


class CtState(enum.IntEnum):
    """ct4_entry.state; mirrors enum zp_ct_state in bpf/lib/maps.h."""

    SYN = 1
    ESTABLISHED = 2
    CLOSING = 3
    UDP = 4


class CtFlag(enum.IntFlag):
    """ct4_entry.flags; mirrors ZP_CT_F_* in bpf/lib/maps.h."""

    SNAT = 0x01
    FIN_FWD = 0x02
    FIN_REV = 0x04


NAT_F_SNAT = 0x01  # nat4_entry.flags: the key's destination is a node address and SNAT port


class Tuple4(ctypes.Structure):
    _fields_ = (
        ("saddr", ctypes.c_uint8 * 4),
        ("daddr", ctypes.c_uint8 * 4),
        ("sport", ctypes.c_uint16),  # network byte order
        ("dport", ctypes.c_uint16),  # network byte order
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    )


class Ct4Entry(ctypes.Structure):
    _fields_ = (
        ("expires", ctypes.c_uint64),  # CLOCK_MONOTONIC ns
        ("backend_addr", ctypes.c_uint8 * 4),
        ("snat_addr", ctypes.c_uint8 * 4),
        ("backend_id", ctypes.c_uint32),
        ("backend_port", ctypes.c_uint16),  # network byte order
        ("snat_port", ctypes.c_uint16),  # network byte order
        ("rev_nat_id", ctypes.c_uint16),
        ("state", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint32),
    )


class Nat4Entry(ctypes.Structure):
    _fields_ = (
        ("client_addr", ctypes.c_uint8 * 4),
        ("frontend_addr", ctypes.c_uint8 * 4),
        ("client_port", ctypes.c_uint16),  # network byte order
        ("frontend_port", ctypes.c_uint16),  # network byte order
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    )


class NpConfig(ctypes.Structure):
    _fields_ = (
        ("snat_port_min", ctypes.c_uint16),  # host byte order
        ("snat_port_max", ctypes.c_uint16),
        ("syn_timeout", ctypes.c_uint32),  # seconds
        ("est_timeout", ctypes.c_uint32),
        ("close_timeout", ctypes.c_uint32),
        ("udp_timeout", ctypes.c_uint32),
    )


class NpDev4(ctypes.Structure):
    _fields_ = (
        ("addr", ctypes.c_uint8 * 4),
        ("flags", ctypes.c_uint32),
    )


class Tuple6(ctypes.Structure):
    _fields_ = (
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
        ("sport", ctypes.c_uint16),  # network byte order
        ("dport", ctypes.c_uint16),  # network byte order
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    )


class Ct6Entry(ctypes.Structure):
    _fields_ = (
        ("expires", ctypes.c_uint64),
        ("backend_addr", ctypes.c_uint8 * 16),
        ("snat_addr", ctypes.c_uint8 * 16),
        ("backend_id", ctypes.c_uint32),
        ("backend_port", ctypes.c_uint16),
        ("snat_port", ctypes.c_uint16),
        ("rev_nat_id", ctypes.c_uint16),
        ("state", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint32),
    )


class Nat6Entry(ctypes.Structure):
    _fields_ = (
        ("client_addr", ctypes.c_uint8 * 16),
        ("frontend_addr", ctypes.c_uint8 * 16),
        ("client_port", ctypes.c_uint16),
        ("frontend_port", ctypes.c_uint16),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    )


class NpDev6(ctypes.Structure):
    _fields_ = (
        ("addr", ctypes.c_uint8 * 16),
        ("flags", ctypes.c_uint32),
    )


MAP_PINS.update({
    "zp_ct6": "zp_ct6_v1",
    "zp_snat6": "zp_snat6_v1",
    "zp_np_dev6": "zp_np_dev6_v1",
})

MAP_TYPES.update({
    "zp_ct6": (Tuple6, Ct6Entry),
    "zp_snat6": (Tuple6, Nat6Entry),
    "zp_np_dev6": (ctypes.c_uint32, NpDev6),
    "zp_ct4": (Tuple4, Ct4Entry),
    "zp_snat4": (Tuple4, Nat4Entry),
    "zp_np_cfg": (ctypes.c_uint32, NpConfig),
    "zp_np_dev4": (ctypes.c_uint32, NpDev4),
})
