"""The service table in the kernel: shadow copy, id allocation, ordered difference writes.

A frontend's backends sit in numbered slots (1..count) and its slot 0 holds the count. Writes
go in phases so that a concurrent connect() never sees a half-written service:

  1. new backends into the backend map
  2. backend slots 1..count
  3. slot 0 (the frontend itself: count, rev-NAT id) -- new and changed frontends become visible
  4. surplus slots of shrunk frontends; slot 0 then slots of removed frontends
  5. backends no longer referenced

Each phase is one batch write per map. The shadow copy mirrors what the maps hold, so a sync
writes only what differs; after a failed write it is re-read from the kernel.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from dataplane import maps
from dataplane.table import Backend, Frontend, FrontendKind, Protocol, ServiceEntry, ServicePortName

log = logging.getLogger(__name__)

# Frontend kinds the socket hooks serve: real addresses a local process can connect() to.
# NodePort frontends (0.0.0.0:port) are matched per node address; see the NodePort design.
SOCKET_KINDS = (FrontendKind.CLUSTER_IP, FrontendKind.EXTERNAL_IP, FrontendKind.LOAD_BALANCER)
# Every kind in conflict order: on a clash the earlier kind keeps the address. NodePort
# frontends are written once per node address that accepts NodePorts (set_node_port_addresses),
# so the socket hooks (nodeIP:nodePort, 127.0.0.1:nodePort) and the TC programs match them with
# one exact lookup.
ALL_KINDS = (*SOCKET_KINDS, FrontendKind.NODE_PORT)
EXTERNAL_KINDS = (FrontendKind.NODE_PORT, FrontendKind.EXTERNAL_IP, FrontendKind.LOAD_BALANCER)

MAX_REV_NAT_ID = 0xFFFF
MAX_BACKEND_ID = 0xFFFFFFFF
MAX_SLOTS = 0xFFFF


# (packed address, port, protocol): the identity of a backend in the maps.
AddrKey = tuple[bytes, int, int]
# (packed address, port, protocol, scope): one view of a frontend in the service map. Every
# frontend has a maps.SCOPE_INTERNAL view; eTP=Local external ones also a SCOPE_EXTERNAL view.
FeKey = tuple[bytes, int, int, int]
# (IP version, packed network address, prefix length): one loadBalancerSourceRanges CIDR.
SrcRange = tuple[int, bytes, int]


@dataclass
class FrontendState:
    rev_nat_id: int
    backend_ids: list[int] = field(default_factory=list)  # slot i+1 holds backend_ids[i]
    affinity: int = 0  # ClientIP affinity timeout in seconds, 0 = none (slot 0's backend_id)
    flags: int = 0  # slot 0's maps.SvcFlag bits (which frontends the TC programs serve, and how)


@dataclass
class SyncResult:
    frontends_written: int = 0
    frontends_deleted: int = 0
    backends_written: int = 0
    backends_deleted: int = 0
    conflicts: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any((self.frontends_written, self.frontends_deleted, self.backends_written, self.backends_deleted))


class _IdPool:
    """Smallest free id first, so ids stay dense and are reused after deletes."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.used: set[int] = set()
        self._next = 1

    def take(self) -> int:
        while self._next in self.used:
            self._next += 1
        if self._next > self.maximum:
            raise OverflowError(f"all {self.maximum} ids are in use")
        self.used.add(self._next)
        return self._next

    def give(self, ident: int) -> None:
        self.used.discard(ident)
        self._next = min(self._next, ident)

    def mark(self, ident: int) -> None:
        self.used.add(ident)


class _Family:
    """Shadow and writers for one address family's service and backend maps."""

    def __init__(self, version: int, svc_table, be_table) -> None:
        self.version = version
        self.svc = svc_table
        self.be = be_table
        self.KeyT = maps.Lb4Key if version == 4 else maps.Lb6Key
        self.BackendT = maps.Lb4Backend if version == 4 else maps.Lb6Backend
        self.frontends: dict[FeKey, FrontendState] = {}
        self.backends: dict[AddrKey, int] = {}  # backend -> id
        self.backend_keys: dict[int, AddrKey] = {}  # id -> backend
        self.refs: Counter[int] = Counter()  # backend id -> slots (over all frontends) holding it

    # ---- ctypes conversion --------------------------------------------------------------
    def svc_key(self, fe: FeKey, slot: int):
        k = self.KeyT()
        ctypes.memmove(k.address, fe[0], len(fe[0]))
        k.dport = maps.htons(fe[1])
        k.slot = slot
        k.proto = fe[2]
        k.scope = fe[3]
        return k

    def backend_value(self, be: AddrKey):
        v = self.BackendT()
        ctypes.memmove(v.address, be[0], len(be[0]))
        v.port = maps.htons(be[1])
        v.proto = be[2]
        return v

    # ---- adoption -----------------------------------------------------------------------
    def read_kernel(self) -> None:
        """Rebuild the shadow from the maps (start-up adoption, or after a failed write)."""
        self.frontends.clear()
        self.backends.clear()
        self.backend_keys.clear()
        self.refs.clear()
        # bcc's generated types render __be32 as an integer; view every entry through ours.
        for k, v in self.be.items():
            v = self.BackendT.from_buffer_copy(bytes(v))
            be = (bytes(v.address), maps.ntohs(v.port), v.proto)
            self.backends[be] = k.value
            self.backend_keys[k.value] = be
        slots: dict[FeKey, dict[int, int]] = {}
        heads: dict[FeKey, tuple[int, int, int, int]] = {}
        for k, v in self.svc.items():
            k = self.KeyT.from_buffer_copy(bytes(k))
            v = maps.LbService.from_buffer_copy(bytes(v))
            fe = (bytes(k.address), maps.ntohs(k.dport), k.proto, k.scope)
            if k.slot == 0:
                heads[fe] = (v.count, v.rev_nat_id, v.backend_id, v.flags)
            else:
                slots.setdefault(fe, {})[k.slot] = v.backend_id
        for fe, (count, rev_nat_id, affinity, flags) in heads.items():
            have = slots.pop(fe, {})
            # Slots past count are leftovers of an interrupted write; a missing slot reads as
            # backend id 0. Either way the next sync sees a difference and rewrites it.
            width = max(count, max(have, default=0))
            self.frontends[fe] = FrontendState(rev_nat_id, [have.get(i, 0) for i in range(1, width + 1)], affinity,
                                               flags)
        for fe, have in slots.items():  # slots without a head: an interrupted delete
            self.frontends[fe] = FrontendState(0, [0] * max(have))
        self.refs = Counter(i for st in self.frontends.values() for i in st.backend_ids)


class ServiceMaps:
    """The kernel's service table for the socket hooks (and later the TC programs)."""

    def __init__(self, datapath) -> None:
        self.v4 = _Family(4, datapath.table("zp_lb4_svc"), datapath.table("zp_lb4_be"))
        self.v6 = _Family(6, datapath.table("zp_lb6_svc"), datapath.table("zp_lb6_be"))
        self.stats_table = datapath.table("zp_stats")
        self.affinity_table = datapath.table("zp_lb_affinity")
        self.src_tables = {4: datapath.table("zp_lb4_src"), 6: datapath.table("zp_lb6_src")}
        self.rev_nat_ids: dict[ServicePortName, int] = {}
        self.node_port_addresses: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()
        self.maglev = False  # mark external frontends for the TC path's Maglev tables (dataplane/maglev.py)
        self.adopt()

    def set_node_port_addresses(self, addresses: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> bool:
        """The node addresses that accept NodePort traffic (see dataplane.tc.node_port_addresses).

        Takes effect at the next full sync(); with none (the default) NodePort frontends are not
        programmed at all. Returns whether the set changed (then the caller owes a full sync).
        """
        new = tuple(sorted(set(addresses), key=lambda a: (a.version, a)))
        changed = new != self.node_port_addresses
        self.node_port_addresses = new
        return changed

    def has_local_endpoints(self, service: ServicePortName) -> bool | None:
        """Whether this node has endpoints for an externalTrafficPolicy: Local service port.

        What healthCheckNodePort reports. None when the service port has no Local frontend here.
        """
        rev = self.rev_nat_ids.get(service)
        local = [st for f in (self.v4, self.v6) for st in f.frontends.values()
                 if rev is not None and st.rev_nat_id == rev and st.flags & maps.SvcFlag.LOCAL]
        if not local:
            return None
        return any(st.backend_ids for st in local)

    def _fam(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> _Family:
        return self.v4 if addr.version == 4 else self.v6

    def adopt(self) -> None:
        """Load the shadow from what the kernel maps hold (an earlier agent's work)."""
        self._rev_pool = _IdPool(MAX_REV_NAT_ID)
        self._be_pool = _IdPool(MAX_BACKEND_ID)
        self._rev_refs: Counter[int] = Counter()  # rev-NAT id -> frontends (both families) using it
        for fam in (self.v4, self.v6):
            fam.read_kernel()
            for ident in fam.backend_keys:
                self._be_pool.mark(ident)
            for st in fam.frontends.values():
                if st.rev_nat_id:
                    self._rev_pool.mark(st.rev_nat_id)
                self._rev_refs[st.rev_nat_id] += 1
        # loadBalancerSourceRanges per service port: rev id -> {(version, packed address, prefix)}
        self.src_ranges: dict[int, set[SrcRange]] = {}
        for version, table in self.src_tables.items():
            KeyT = maps.Lb4SrcKey if version == 4 else maps.Lb6SrcKey
            for k, _ in table.items():
                k = KeyT.from_buffer_copy(bytes(k))
                self.src_ranges.setdefault(k.rev_nat_id, set()).add(
                    (version, bytes(k.address), k.prefixlen - maps.SRC_RANGE_PREFIX))
        # names are not in the kernel: rev_nat_ids is rebuilt from the frontends at the next sync
        self.rev_nat_ids = {}
        self._rev_names: dict[int, ServicePortName] = {}

    @property
    def frontend_count(self) -> int:
        """Frontends programmed (a frontend with an internal and an external view counts once)."""
        return sum(1 for fam in (self.v4, self.v6) for fe in fam.frontends if fe[3] == maps.SCOPE_INTERNAL)

    @property
    def backend_count(self) -> int:
        return len(self.v4.backends) + len(self.v6.backends)

    def stats(self) -> dict[maps.Reason, int]:
        out = {}
        for stat in maps.SOCK_REASONS:
            per_cpu = self.stats_table[ctypes.c_uint32(stat)]
            out[stat] = sum(per_cpu)
        return out

    # ---- the one write path -------------------------------------------------------------
    def sync(self, entries: Iterable[ServiceEntry], scope: Iterable[Frontend] | None = None) -> SyncResult:
        """Make the maps hold these entries; write only differences.

        Without ``scope`` the entries are the whole table: every other frontend is removed.
        With ``scope`` (a partial sync) only the map entries of those frontends are considered:
        ``entries`` are what the table now holds for them (a frontend of ``scope`` with no entry
        is removed) and nothing else is read or written, so the cost follows the change, not the
        table. Frontends of the NodePort kind stand for one map entry per node address.
        """
        result = SyncResult()
        desired: dict[tuple[int, FeKey], tuple[ServiceEntry, list[AddrKey], int]] = {}
        wanted = [e for e in entries if e.frontend.kind in ALL_KINDS]
        # ClusterIP first: when a ClusterIP and an external address collide, the ClusterIP wins.
        for e in sorted(wanted, key=lambda e: (ALL_KINDS.index(e.frontend.kind), e.frontend.sort_key)):
            views = _views(e, self.maglev)
            for addr in self._frontend_addresses(e.frontend):
                key = (addr.version, _fe_key(addr, e.frontend.port, e.frontend.protocol, maps.SCOPE_INTERNAL))
                if key in desired:
                    result.conflicts.append(
                        f"frontend {e.frontend} ({addr}) of {e.service} is already used by "
                        f"{desired[key][0].service}; ignored"
                    )
                    continue
                for view_scope, backends, flags in views:
                    bes = [
                        _addr_key(b.address, b.port, e.frontend.protocol)
                        for b in backends
                        if b.address.version == addr.version
                    ][:MAX_SLOTS]
                    fe = _fe_key(addr, e.frontend.port, e.frontend.protocol, view_scope)
                    desired[(addr.version, fe)] = (e, bes, flags)
        keys: set[tuple[int, FeKey]] | None = None
        if scope is not None:
            keys = set(desired)
            for f in scope:
                if f.kind in ALL_KINDS:
                    keys.update((a.version, _fe_key(a, f.port, f.protocol, view))
                                for a in self._frontend_addresses(f)
                                for view in (maps.SCOPE_INTERNAL, maps.SCOPE_EXTERNAL))
        try:
            ranges = self._add_src_ranges(desired)  # before any head that needs them is visible
            self._apply(desired, result, keys)
            self._drop_src_ranges(ranges)  # after the heads that needed them are gone
        except Exception:
            log.exception("service map write failed; re-reading the kernel maps")
            self.adopt()
            raise
        return result

    def _add_src_ranges(self, desired: dict[tuple[int, FeKey], tuple[ServiceEntry, list[AddrKey], int]]
                        ) -> dict[int, set[SrcRange]]:
        """Write the source ranges the desired LoadBalancer frontends need; returns what each
        touched service port should hold, for :meth:`_drop_src_ranges` to finish with."""
        want: dict[int, set[SrcRange]] = {}
        for (version, fe), (entry, _, _) in desired.items():
            if entry.source_ranges and entry.frontend.kind is FrontendKind.LOAD_BALANCER:
                rev = self._rev_nat_id(entry, self._fam_of(version).frontends.get(fe))
                want.setdefault(rev, set()).update(
                    (n.version, n.network_address.packed, n.prefixlen) for n in entry.source_ranges)
            elif entry.service in self.rev_nat_ids:
                want.setdefault(self.rev_nat_ids[entry.service], set())
        for rev, nets in want.items():
            have = self.src_ranges.setdefault(rev, set())
            for item in sorted(nets - have):
                self.src_tables[item[0]][self._src_key(rev, item)] = ctypes.c_uint8(1)
                have.add(item)
        return want

    def _drop_src_ranges(self, want: dict[int, set[SrcRange]]) -> None:
        for rev in list(self.src_ranges):
            if rev in self._rev_refs:  # a live service port: only what this sync touched
                if rev not in want:
                    continue
                keep = want[rev]
            else:
                keep = set()  # its last frontend went
            have = self.src_ranges[rev]
            for item in sorted(have - keep):
                try:
                    del self.src_tables[item[0]][self._src_key(rev, item)]
                except KeyError:
                    pass
                have.discard(item)
            if not have:
                del self.src_ranges[rev]

    @staticmethod
    def _src_key(rev: int, item: SrcRange):
        version, packed, prefix = item
        k = (maps.Lb4SrcKey if version == 4 else maps.Lb6SrcKey)()
        k.prefixlen = maps.SRC_RANGE_PREFIX + prefix
        k.rev_nat_id = rev
        ctypes.memmove(k.address, packed, len(packed))
        return k

    def _fam_of(self, version: int) -> _Family:
        return self.v4 if version == 4 else self.v6

    def _rev_nat_id(self, entry: ServiceEntry, current: FrontendState | None) -> int:
        name = entry.service
        if name in self.rev_nat_ids:
            return self.rev_nat_ids[name]
        if current is not None and current.rev_nat_id:
            ident = current.rev_nat_id
        else:
            ident = self._rev_pool.take()
        self.rev_nat_ids[name] = ident
        self._rev_names[ident] = name
        return ident

    def _frontend_addresses(self, frontend: Frontend) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        """The map addresses of a frontend: its own, or for NodePort each node address of its family."""
        if frontend.kind is not FrontendKind.NODE_PORT:
            return [frontend.address]
        return [a for a in self.node_port_addresses if a.version == frontend.address.version]

    def _apply(self, desired: dict[tuple[int, FeKey], tuple[ServiceEntry, list[AddrKey], int]],
               result: SyncResult, scope: set[tuple[int, FeKey]] | None) -> None:
        for fam in (self.v4, self.v6):
            want = {fe: v for (ver, fe), v in desired.items() if ver == fam.version}
            if scope is None:
                gone = [fe for fe in fam.frontends if fe not in want]
            else:
                gone = [fe for ver, fe in scope if ver == fam.version and fe in fam.frontends and fe not in want]
            be_new: list[tuple[int, AddrKey]] = []
            slot_writes: list[tuple[FeKey, int, int, int]] = []  # fe, slot, backend id, rev id
            head_writes: list[tuple[FeKey, int, int, int, int]] = []  # fe, count, rev id, affinity, flags
            left: set[tuple[int, int]] = set()  # (rev id, backend id) pairs that stopped serving
            deletes: list = []  # ctypes keys, in order
            new_state: dict[FeKey, FrontendState] = {}

            for fe, (entry, bes, flags) in want.items():
                cur = fam.frontends.get(fe)
                rev = self._rev_nat_id(entry, cur)
                ids = []
                for be in bes:
                    ident = fam.backends.get(be)
                    if ident is None:
                        ident = self._be_pool.take()
                        fam.backends[be] = ident
                        fam.backend_keys[ident] = be
                        be_new.append((ident, be))
                    ids.append(ident)
                old_ids = cur.backend_ids if cur else []
                rev_changed = cur is None or cur.rev_nat_id != rev
                for i, ident in enumerate(ids):
                    if rev_changed or i >= len(old_ids) or old_ids[i] != ident:
                        slot_writes.append((fe, i + 1, ident, rev))
                aff = entry.affinity_timeout
                head_changed = rev_changed or aff != cur.affinity or flags != cur.flags
                if head_changed or len(ids) != len(old_ids) or old_ids[: len(ids)] != ids:
                    head_writes.append((fe, len(ids), rev, aff, flags))
                    result.frontends_written += 1
                if cur is not None and cur.affinity:
                    left.update((cur.rev_nat_id, i) for i in set(old_ids) - set(ids))
                for slot in range(len(ids) + 1, len(old_ids) + 1):
                    deletes.append(fam.svc_key(fe, slot))
                new_state[fe] = FrontendState(rev, ids, aff, flags)

            # An internal view that gains SCOPED must find its external view already complete,
            # and loses it before that view is deleted: external heads first, deletes after.
            head_writes.sort(key=lambda w: w[0][3] != maps.SCOPE_EXTERNAL)
            for fe in sorted(gone, key=lambda fe: fe[3]):  # internal view (what lookups start from) first
                cur = fam.frontends[fe]
                deletes.append(fam.svc_key(fe, 0))
                deletes.extend(fam.svc_key(fe, s) for s in range(1, len(cur.backend_ids) + 1))
                result.frontends_deleted += 1

            # phase 1: backends
            if be_new:
                _update_batch(fam.be, [ctypes.c_uint32(i) for i, _ in be_new],
                              [fam.backend_value(be) for _, be in be_new])
                result.backends_written += len(be_new)
            # phase 2: slots
            if slot_writes:
                _update_batch(fam.svc, [fam.svc_key(fe, s) for fe, s, _, _ in slot_writes],
                              [maps.LbService(backend_id=b, count=0, rev_nat_id=r) for _, _, b, r in slot_writes])
            # phase 3: heads
            if head_writes:  # applied in list order (the kernel walks a batch front to back)
                _update_batch(fam.svc, [fam.svc_key(fe, 0) for fe, *_ in head_writes],
                              [maps.LbService(backend_id=a, count=c, rev_nat_id=r, flags=f)
                               for _, c, r, a, f in head_writes])
            # phase 4: surplus slots and removed frontends (head before its slots)
            if deletes:
                _delete_batch(fam.svc, deletes)
            # clients stuck to a backend that left the service choose again on their next connect
            if left:
                self._forget_affinity(fam.version, left)

            # the shadow follows the kernel; reference counts tell what nothing uses any more
            released_backends: set[int] = set()
            released_revs: set[int] = set()
            for fe in [*gone, *new_state]:
                old = fam.frontends.pop(fe, None)
                if old is not None:
                    for i in old.backend_ids:
                        fam.refs[i] -= 1
                        released_backends.add(i)
                    self._rev_refs[old.rev_nat_id] -= 1
                    released_revs.add(old.rev_nat_id)
                new = new_state.get(fe)
                if new is not None:
                    fam.frontends[fe] = new
                    for i in new.backend_ids:
                        fam.refs[i] += 1
                    self._rev_refs[new.rev_nat_id] += 1
            if scope is None:  # a full sync also collects what an interrupted run left behind
                released_backends.update(fam.backend_keys)
            # phase 5: unreferenced backends
            stale = [i for i in released_backends if fam.refs[i] <= 0 and i in fam.backend_keys]
            if stale:
                _delete_batch(fam.be, [ctypes.c_uint32(i) for i in stale])
                for i in stale:
                    del fam.backends[fam.backend_keys.pop(i)]
                    del fam.refs[i]
                    self._be_pool.give(i)
                result.backends_deleted += len(stale)
            for rev in released_revs:
                if rev and self._rev_refs[rev] <= 0:
                    del self._rev_refs[rev]
                    self._rev_pool.give(rev)
                    name = self._rev_names.pop(rev, None)
                    if name is not None and self.rev_nat_ids.get(name) == rev:
                        del self.rev_nat_ids[name]

    def maglev_tables(self, entries: Iterable[ServiceEntry]) -> dict[tuple[int, int], list[tuple[str, int]]]:
        """What the Maglev tables of these (external, IPv4) entries must spread over, after a
        sync wrote them: (rev-NAT id, scope) -> [(backend "address:port", backend id)]. The name
        is what every node hashes alike; the id is this node's key of that backend."""
        out: dict[tuple[int, int], list[tuple[str, int]]] = {}
        for e in entries:
            if e.frontend.kind not in EXTERNAL_KINDS or e.frontend.address.version != 4:
                continue
            rev = self.rev_nat_ids.get(e.service)
            if rev is None:
                continue  # not programmed (a conflict lost it)
            for scope, backends, _ in _views(e, True):
                picked = []
                for b in backends:
                    if b.address.version != 4:
                        continue
                    ident = self.v4.backends.get(_addr_key(b.address, b.port, e.frontend.protocol))
                    if ident is not None:
                        picked.append((f"{b.address}:{b.port}", ident))
                out[(rev, scope)] = sorted(set(picked))
        return out

    def live_rev_nat_ids(self) -> set[int]:
        return {r for r, n in self._rev_refs.items() if r and n > 0}

    def _forget_affinity(self, family: int, pairs: set[tuple[int, int]]) -> None:
        stale = []
        for k, v in self.affinity_table.items():
            k = maps.AffinityKey.from_buffer_copy(bytes(k))
            v = maps.AffinityValue.from_buffer_copy(bytes(v))
            if k.family == family and (k.rev_nat_id, v.backend_id) in pairs:
                stale.append(k)
        _delete_batch(self.affinity_table, stale)


def _views(entry: ServiceEntry, maglev: bool = False) -> list[tuple[int, tuple[Backend, ...], int]]:
    """(scope, backends, slot 0 flags) of each map view of an entry's frontend."""
    flags = _frontend_flags(entry, maglev)
    if entry.internal_backends is None or entry.frontend.kind not in EXTERNAL_KINDS:
        return [(maps.SCOPE_INTERNAL, entry.backends, flags)]
    internal = (flags & ~maps.SvcFlag.LOCAL) | maps.SvcFlag.SCOPED
    return [(maps.SCOPE_INTERNAL, entry.internal_backends, int(internal)),
            (maps.SCOPE_EXTERNAL, entry.backends, flags)]


def _frontend_flags(entry: ServiceEntry, maglev: bool = False) -> int:
    """slot 0's flags: which frontends the TC programs serve, and how."""
    kind = entry.frontend.kind
    if kind not in EXTERNAL_KINDS:
        return 0
    flags = maps.SvcFlag.EXTERNAL
    if maglev:
        flags |= maps.SvcFlag.MAGLEV
    if kind is FrontendKind.NODE_PORT:
        flags |= maps.SvcFlag.NODEPORT
    if entry.local_only:
        flags |= maps.SvcFlag.LOCAL
    if entry.source_ranges and kind is FrontendKind.LOAD_BALANCER:
        flags |= maps.SvcFlag.SRC_RANGE
    return int(flags)


def _addr_key(addr, port: int, proto: Protocol | int) -> AddrKey:
    return (addr.packed, int(port), int(proto))


def _fe_key(addr, port: int, proto: Protocol | int, scope: int) -> FeKey:
    return (addr.packed, int(port), int(proto), scope)


def _update_batch(table, keys: list, values: list) -> None:
    """Write entries in order; batches keep a large initial load fast."""
    if len(keys) == 1:
        table[keys[0]] = values[0]
        return
    ktype, vtype = type(keys[0]), type(values[0])
    table.items_update_batch((ktype * len(keys))(*keys), (vtype * len(values))(*values))


def _delete_batch(table, keys: list) -> None:
    # Deleting one by one keeps the head-before-slots order and tolerates entries that are
    # already gone (a batch delete stops at the first missing key).
    for k in keys:
        try:
            del table[k]
        except KeyError:
            pass
