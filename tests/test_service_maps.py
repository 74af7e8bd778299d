"""ServiceMaps against real kernel maps (loaded, not attached): full and partial syncs leave the
maps exactly as the desired table says, and a partial sync touches only its scope."""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dataplane import inspect
from dataplane.loader import SockDatapath, cleanup
from dataplane.services import ServiceMaps
from dataplane.table import Backend, Frontend, FrontendKind, Protocol, ServiceEntry, ServicePortName


@pytest.fixture
def datapath() -> Iterator[SockDatapath]:
    pin = Path("/sys/fs/bpf") / f"zp-maps-{uuid.uuid4().hex[:8]}"
    dp = SockDatapath(Path("/nonexistent"), pin)  # never attached: only the maps are used
    try:
        dp.load()
        yield dp
    finally:
        dp.close()
        cleanup(None, pin)


def entry(i: int, backends: list[int], port: int = 80, v6: bool = False) -> ServiceEntry:
    if v6:
        fe = Frontend(ipaddress.ip_address(f"fd00:10:96::{i:x}"), port, Protocol.TCP)
        bes = tuple(Backend(ipaddress.ip_address(f"fd00:10:244::{b:x}"), 8080) for b in backends)
    else:
        fe = Frontend(ipaddress.ip_address(f"10.96.{i // 256}.{i % 256}"), port, Protocol.TCP)
        bes = tuple(Backend(ipaddress.ip_address(f"10.244.{b // 256}.{b % 256}"), 8080) for b in backends)
    return ServiceEntry(fe, ServicePortName("default", f"svc-{i}"), bes)


def kernel(pin: Path) -> dict[str, list[str]]:
    return {s.frontend: sorted(s.backends) for s in inspect.service_list(pin)}


def expected(entries: list[ServiceEntry]) -> dict[str, list[str]]:
    return {str(e.frontend): sorted(str(b) for b in e.backends) for e in entries}


def test_partial_sync_equals_full_sync_and_touches_only_its_scope(datapath: SockDatapath) -> None:
    maps = ServiceMaps(datapath)
    table = {i: entry(i, [i, i + 1, i + 2]) for i in range(1, 201)} | {
        1000 + i: entry(i, [i], v6=True) for i in range(1, 21)}
    maps.sync(table.values())
    assert kernel(datapath.pin_dir) == expected(list(table.values()))

    # change one service's backends, remove one, add one: scope is exactly those frontends
    changed = {5: entry(5, [5, 999]), 1007: entry(7, [7, 8], v6=True), 300: entry(300, [1, 2])}
    removed = table.pop(6).frontend
    scope = {e.frontend for e in changed.values()} | {removed, table[5].frontend, table[1007].frontend}
    table.update(changed)
    result = maps.sync(changed.values(), scope=scope)
    assert kernel(datapath.pin_dir) == expected(list(table.values()))
    assert (result.frontends_written, result.frontends_deleted) == (3, 1)
    # only 10.244.3.231 (999) is new: fd00:10:244::8 is svc-8's already, and every backend of the
    # removed svc-6 is still some neighbour's
    assert (result.backends_written, result.backends_deleted) == (1, 0)
    # a full sync of the same table finds nothing to do
    again = maps.sync(table.values())
    assert not again.changed, again


def test_backends_are_deleted_when_their_last_user_goes(datapath: SockDatapath) -> None:
    maps = ServiceMaps(datapath)
    a, b = entry(1, [1, 2]), entry(2, [2, 3])
    maps.sync([a, b])
    assert maps.backend_count == 3
    result = maps.sync([], scope={a.frontend})  # svc-1 goes; backend 2 is still svc-2's
    assert result.backends_deleted == 1 and maps.backend_count == 2
    result = maps.sync([], scope={b.frontend})
    assert result.backends_deleted == 2 and maps.backend_count == 0
    assert kernel(datapath.pin_dir) == {}


def test_adoption_then_partial_sync(datapath: SockDatapath) -> None:
    first = ServiceMaps(datapath)
    entries = [entry(i, [i, i + 1]) for i in range(1, 11)]
    first.sync(entries)
    second = ServiceMaps(datapath)  # a restarted agent: shadow rebuilt from the kernel
    assert second.frontend_count == 10 and second.backend_count == 11
    assert not second.sync(entries).changed
    result = second.sync([entry(3, [50])], scope={entries[2].frontend})
    assert result.frontends_written == 1 and result.backends_deleted == 0  # 3 and 4 stay in use
    assert kernel(datapath.pin_dir)["10.96.0.3:80/TCP"] == ["10.244.0.50:8080"]


def test_nodeport_frontends_expand_to_node_addresses(datapath: SockDatapath) -> None:
    maps = ServiceMaps(datapath)
    np = ServiceEntry(Frontend(ipaddress.ip_address("0.0.0.0"), 30080, Protocol.TCP, FrontendKind.NODE_PORT),
                      ServicePortName("default", "np"), (Backend(ipaddress.ip_address("10.244.0.9"), 80),))
    maps.sync([np])
    assert kernel(datapath.pin_dir) == {}  # no node addresses yet: nothing to match
    assert maps.set_node_port_addresses([ipaddress.ip_address("192.168.1.5"), ipaddress.ip_address("127.0.0.1")])
    maps.sync([np])
    assert set(kernel(datapath.pin_dir)) == {"127.0.0.1:30080/TCP", "192.168.1.5:30080/TCP"}
    maps.sync([], scope={np.frontend})
    assert kernel(datapath.pin_dir) == {}


def test_local_policy_frontend_has_two_views_written_and_removed_in_order(datapath: SockDatapath) -> None:
    """An eTP=Local external frontend gets an internal view (the socket hooks' backends, flagged
    SCOPED) and an external one (local backends, LOCAL); a restarted agent adopts both; turning
    the policy off or deleting the frontend leaves no view behind."""
    from dataplane import maps as m

    def lb(policy: str, local: list[str], internal: list[str] | None) -> ServiceEntry:
        return ServiceEntry(
            Frontend(ipaddress.ip_address("192.0.2.7"), 80, Protocol.TCP, FrontendKind.LOAD_BALANCER),
            ServicePortName("default", "lb"), tuple(Backend(ipaddress.ip_address(b), 80) for b in local),
            None if internal is None else tuple(Backend(ipaddress.ip_address(b), 80) for b in internal),
            local_only=policy == "Local")

    def views() -> dict[str, list[str]]:
        return {s.view: sorted(s.backends) for s in inspect.service_list(datapath.pin_dir)}

    def flags() -> dict[int, int]:
        table = datapath.table("zp_lb4_svc")
        return {k.scope: v.flags for k, v in ((m.Lb4Key.from_buffer_copy(bytes(k)), v) for k, v in table.items())
                if k.slot == 0}

    sm = ServiceMaps(datapath)
    sm.sync([lb("Local", ["10.244.0.1"], ["10.244.0.1", "10.244.1.1"])])
    assert views() == {"internal": ["10.244.0.1:80", "10.244.1.1:80"], "external": ["10.244.0.1:80"]}
    assert flags() == {m.SCOPE_INTERNAL: m.SvcFlag.EXTERNAL | m.SvcFlag.SCOPED,
                       m.SCOPE_EXTERNAL: m.SvcFlag.EXTERNAL | m.SvcFlag.LOCAL}
    assert sm.frontend_count == 1 and sm.has_local_endpoints(ServicePortName("default", "lb")) is True

    restarted = ServiceMaps(datapath)
    assert restarted.frontend_count == 1
    assert not restarted.sync([lb("Local", ["10.244.0.1"], ["10.244.0.1", "10.244.1.1"])]).changed
    # no local endpoint left: outside traffic finds none, the node's own clients still do
    restarted.sync([lb("Local", [], ["10.244.1.1"])], scope=set())
    assert views() == {"internal": ["10.244.1.1:80"], "external": []}
    assert restarted.has_local_endpoints(ServicePortName("default", "lb")) is False

    restarted.sync([lb("Cluster", ["10.244.0.1", "10.244.1.1"], None)])
    assert views() == {"internal": ["10.244.0.1:80", "10.244.1.1:80"]}
    assert flags() == {m.SCOPE_INTERNAL: m.SvcFlag.EXTERNAL}
    restarted.sync([lb("Local", ["10.244.0.1"], ["10.244.1.1"])])
    restarted.sync([])
    assert views() == {} and len(datapath.table("zp_lb4_svc")) == 0 and len(datapath.table("zp_lb4_be")) == 0


def test_source_ranges_are_written_with_their_flag_adopted_and_removed(datapath: SockDatapath) -> None:
    """loadBalancerSourceRanges: a range set per service port in the two tries, the LB
    frontends flagged (not the ClusterIP), ranges added before and removed after the heads,
    a restarted writer adopts them, partial syncs touch only their service's, and nothing is
    left once the service goes."""
    from dataplane import maps as m

    def lb(name: str, ip: str, ranges: list[str]) -> list[ServiceEntry]:
        spn = ServicePortName("default", name)
        be = (Backend(ipaddress.ip_address("10.244.0.1"), 80),)
        return [ServiceEntry(Frontend(ipaddress.ip_address(ip), 80, Protocol.TCP, FrontendKind.LOAD_BALANCER),
                             spn, be, source_ranges=tuple(ipaddress.ip_network(r) for r in ranges)),
                ServiceEntry(Frontend(ipaddress.ip_address(f"10.96.0.{ip.rsplit('.', 1)[1]}"), 80, Protocol.TCP),
                             spn, be)]

    def tries() -> set[tuple[int, str]]:
        out = set()
        for version, name in ((4, "zp_lb4_src"), (6, "zp_lb6_src")):
            key_t = m.Lb4SrcKey if version == 4 else m.Lb6SrcKey
            for k, _ in datapath.table(name).items():
                k = key_t.from_buffer_copy(bytes(k))
                net = ipaddress.ip_network((bytes(k.address), k.prefixlen - m.SRC_RANGE_PREFIX))
                out.add((k.rev_nat_id, str(net)))
        return out

    def flags() -> dict[str, int]:
        table = datapath.table("zp_lb4_svc")
        return {str(ipaddress.ip_address(bytes(k.address))): v.flags
                for k, v in ((m.Lb4Key.from_buffer_copy(bytes(k)), v) for k, v in table.items()) if k.slot == 0}

    sm = ServiceMaps(datapath)
    sm.sync([*lb("a", "192.0.2.1", ["203.0.113.0/24", "fd00::/8"]), *lb("b", "192.0.2.2", [])])
    rev_a = sm.rev_nat_ids[ServicePortName("default", "a")]
    assert tries() == {(rev_a, "203.0.113.0/24"), (rev_a, "fd00::/8")}
    assert flags() == {"192.0.2.1": m.SvcFlag.EXTERNAL | m.SvcFlag.SRC_RANGE, "10.96.0.1": 0,
                       "192.0.2.2": m.SvcFlag.EXTERNAL, "10.96.0.2": 0}

    restarted = ServiceMaps(datapath)
    assert restarted.src_ranges == {rev_a: {(4, bytes([203, 0, 113, 0]), 24), (6, bytes([0xfd] + [0] * 15), 8)}}
    assert not restarted.sync([*lb("a", "192.0.2.1", ["203.0.113.0/24", "fd00::/8"]),
                               *lb("b", "192.0.2.2", [])]).changed
    # a partial sync of b gives it ranges and leaves a's alone
    b = lb("b", "192.0.2.2", ["198.51.100.7/32"])
    restarted.sync(b, scope=[e.frontend for e in b])
    rev_b = restarted.rev_nat_ids[ServicePortName("default", "b")]
    assert tries() == {(rev_a, "203.0.113.0/24"), (rev_a, "fd00::/8"), (rev_b, "198.51.100.7/32")}
    # a narrows its list, then drops it: the flag goes too
    a = lb("a", "192.0.2.1", ["203.0.113.0/25"])
    restarted.sync(a, scope=[e.frontend for e in a])
    assert tries() == {(rev_a, "203.0.113.0/25"), (rev_b, "198.51.100.7/32")}
    a = lb("a", "192.0.2.1", [])
    restarted.sync(a, scope=[e.frontend for e in a])
    assert tries() == {(rev_b, "198.51.100.7/32")} and flags()["192.0.2.1"] == m.SvcFlag.EXTERNAL
    restarted.sync([])
    assert tries() == set() and restarted.src_ranges == {}
