"""ctypes mirrors of the BPF map keys and values in bpf/lib/maps.h.

One structure per key/value; tests compare each one's size with bcc's generated type, so a
change on one side that is not made on the other fails loudly instead of corrupting maps.
"""

from __future__ import annotations

import ctypes
import enum
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
    "zp_stats": "zp_stats_v1",
}


class Stat(enum.IntEnum):
    """Indexes of zp_stats; mirrors enum zp_stat in bpf/lib/common.h."""

    XLATE_OK = 0
    NO_BACKEND = 1
    STALE_BACKEND = 2
    RNAT_WRITE = 3
    RNAT_HIT = 4


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


class LbService(ctypes.Structure):
    _fields_ = (
        ("backend_id", ctypes.c_uint32),
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


# (map name) -> (key type, value type); the value of zp_stats is per CPU, checked separately.
MAP_TYPES: dict[str, tuple[type[ctypes.Structure] | type, type[ctypes.Structure] | type]] = {
    "zp_lb4_svc": (Lb4Key, LbService),
    "zp_lb6_svc": (Lb6Key, LbService),
    "zp_lb4_be": (ctypes.c_uint32, Lb4Backend),
    "zp_lb6_be": (ctypes.c_uint32, Lb6Backend),
    "zp_rnat4": (Rnat4Key, Rnat4Value),
    "zp_rnat6": (Rnat6Key, Rnat6Value),
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
