"""msgpack encoding of what crosses the watch side / map side boundary.

The agent runs both sides in one process today; they meet at ``ServiceMaps.sync(entries,
scope)``. This module is the wire form of exactly that call, so the watch side (API watchers,
translation, change tracking) can move into a process of its own — for instance one per
cluster feeding several map writers — without changing either side: the sender encodes a
sync, the receiver decodes it and calls ``sync`` with the result.

The encoding is positional and versioned (``WIRE_VERSION``): a receiver refuses a message of
another version rather than misreading it. Addresses travel as packed bytes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from dataplane.table import Backend, Frontend, FrontendKind, Protocol, ServiceEntry, ServicePortName

# 2: ServiceEntry.internal_backends; 3: typed affinity_timeout, local_only, health_check_node_port in
# place of the string pairs of ServiceEntry.extra (a v2 peer is refused, not half-read);
# 4: ServiceEntry.source_ranges (loadBalancerSourceRanges)
WIRE_VERSION = 4

_KINDS = {k.value: k for k in FrontendKind}


class WireError(ValueError):
    """A message that is not a sync of this wire version."""


@dataclass(frozen=True)
class SyncMessage:
    entries: tuple[ServiceEntry, ...]
    scope: tuple[Frontend, ...] | None  # None: a full sync (the entries are the whole table)


def _addr(raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.IPv4Address(raw) if len(raw) == 4 else ipaddress.IPv6Address(raw)


def _frontend(f: Frontend) -> list[Any]:
    return [f.address.packed, f.port, int(f.protocol), f.kind.value]


def _unfrontend(v: list[Any]) -> Frontend:
    return Frontend(_addr(v[0]), v[1], Protocol(v[2]), _KINDS[v[3]])


def _backends(bes: Iterable[Backend]) -> list[Any]:
    return [[b.address.packed, b.port, b.node_name, b.ready, b.serving, b.terminating] for b in bes]


def _unbackends(v: list[Any]) -> tuple[Backend, ...]:
    return tuple(Backend(_addr(a), port, node, ready, serving, term) for a, port, node, ready, serving, term in v)


def _entry(e: ServiceEntry) -> list[Any]:
    return [
        _frontend(e.frontend),
        [e.service.namespace, e.service.name, e.service.port],
        _backends(e.backends),
        None if e.internal_backends is None else _backends(e.internal_backends),
        e.affinity_timeout,
        e.local_only,
        e.health_check_node_port,
        [[n.network_address.packed, n.prefixlen] for n in e.source_ranges],
    ]


def _unentry(v: list[Any]) -> ServiceEntry:
    fe, svc, backends, internal, affinity, local_only, health_port, ranges = v
    if not isinstance(affinity, int) or not isinstance(local_only, bool) or not isinstance(health_port, int):
        raise TypeError(f"affinity/local/health fields of the wrong type: {affinity!r}, {local_only!r}, "
                        f"{health_port!r}")
    return ServiceEntry(
        _unfrontend(fe),
        ServicePortName(*svc),
        _unbackends(backends),
        None if internal is None else _unbackends(internal),
        affinity_timeout=affinity,
        local_only=local_only,
        health_check_node_port=health_port,
        source_ranges=tuple(ipaddress.ip_network((_addr(a), plen)) for a, plen in ranges),
    )


def encode_sync(entries: Iterable[ServiceEntry], scope: Iterable[Frontend] | None = None) -> bytes:
    """One ``ServiceMaps.sync`` call as bytes."""
    return msgpack.packb([
        WIRE_VERSION,
        [_entry(e) for e in entries],
        None if scope is None else [_frontend(f) for f in scope],
    ], use_bin_type=True)


def decode_sync(data: bytes) -> SyncMessage:
    try:
        version, entries, scope = msgpack.unpackb(data, raw=False)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise WireError(f"not a sync message: {e}") from e
    if version != WIRE_VERSION:
        raise WireError(f"wire version {version}, this side speaks {WIRE_VERSION}")
    try:
        return SyncMessage(
            tuple(_unentry(v) for v in entries),
            None if scope is None else tuple(_unfrontend(v) for v in scope),
        )
    except (ValueError, TypeError, KeyError) as e:
        raise WireError(f"malformed sync message: {e}") from e
