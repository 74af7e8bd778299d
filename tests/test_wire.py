"""The watch side / map side boundary in its wire form: msgpack round trips of real translations,
and a real ServiceMaps driven only by decoded messages ends up where a direct call would."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import yaml

from controlplane.translate import translate
from controlplane.wire import WIRE_VERSION, WireError, decode_sync, encode_sync
from dataplane import inspect
from dataplane.loader import SockDatapath, cleanup
from dataplane.services import ServiceMaps

SAMPLE = Path(__file__).parent / "data" / "cluster.yaml"


def table():
    return translate(list(yaml.safe_load_all(SAMPLE.read_text())), "node-a").table


def test_round_trip_of_a_real_translation_is_exact() -> None:
    t = table()
    assert len(t) > 5
    msg = decode_sync(encode_sync(t.values()))
    assert msg.scope is None
    assert {e.frontend: e for e in msg.entries} == t
    scope = list(t)[:3]
    partial = decode_sync(encode_sync([t[f] for f in scope], scope=scope))
    assert partial.scope == tuple(scope)
    # loadBalancerSourceRanges of both families travel too
    import dataclasses
    import ipaddress

    from dataplane.table import FrontendKind

    some = next(iter(t.values()))
    lb = dataclasses.replace(some.frontend, address=ipaddress.ip_address("192.0.2.1"), kind=FrontendKind.LOAD_BALANCER)
    ranged = dataclasses.replace(some, frontend=lb, source_ranges=(ipaddress.ip_network("203.0.113.0/24"),
                                                                   ipaddress.ip_network("2001:db8::/32")))
    assert decode_sync(encode_sync([ranged])).entries == (ranged,)


def test_other_versions_and_garbage_are_refused() -> None:
    with pytest.raises(WireError, match="wire version"):
        decode_sync(msgpack.packb([WIRE_VERSION + 1, [], None]))
    with pytest.raises(WireError):
        decode_sync(b"\xc1 not msgpack")
    with pytest.raises(WireError, match="malformed"):
        decode_sync(msgpack.packb([WIRE_VERSION, [[["x"], [], [], []]], None]))
    # version 2 carried a string bag where 3 has typed fields: refused, never half-read
    v2_entry = [[bytes(4), 80, 6, "ClusterIP"], ["default", "web", ""], [], [["sessionAffinity", "None"]], None]
    with pytest.raises(WireError, match="wire version 2"):
        decode_sync(msgpack.packb([2, [v2_entry], None], use_bin_type=True))
    entry = [[bytes(4), 80, 6, "ClusterIP"], ["default", "web", ""], [], None]
    for bad in ([*entry, 86401, False, 0], [*entry, 0, "yes", 0], [*entry, "600", False, 0],
                [*entry, 0, False, 70000]):
        with pytest.raises(WireError, match="malformed"):
            decode_sync(msgpack.packb([WIRE_VERSION, [bad], None], use_bin_type=True))


def test_typed_fields_survive_the_wire() -> None:
    from testbed.k8sobjects import service

    objects = [service("sticky", ["10.96.5.6"], [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30556}],
                       type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=32000,
                       sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 77}})]
    t = translate(objects, "node-a").table
    got = {(e.frontend.kind.value, e.affinity_timeout, e.local_only, e.health_check_node_port)
           for e in decode_sync(encode_sync(t.values())).entries}
    assert got == {("ClusterIP", 77, False, 32000), ("NodePort", 77, True, 32000)}


@pytest.fixture
def datapath() -> Iterator[SockDatapath]:
    pin = Path("/sys/fs/bpf") / f"zp-wire-{uuid.uuid4().hex[:8]}"
    dp = SockDatapath(Path("/nonexistent"), pin)
    try:
        dp.load()
        yield dp
    finally:
        dp.close()
        cleanup(None, pin)


def test_maps_fed_through_the_wire_match_a_direct_sync(datapath: SockDatapath) -> None:
    t = table()
    maps = ServiceMaps(datapath)
    msg = decode_sync(encode_sync(t.values()))
    maps.sync(msg.entries, scope=msg.scope)
    via_wire = {s.frontend: s.backends for s in inspect.service_list(datapath.pin_dir)}
    assert via_wire  # something was programmed
    assert not maps.sync(t.values()).changed  # a direct call finds the maps already right


def test_internal_backends_of_a_local_policy_frontend_survive_the_wire() -> None:
    from testbed.k8sobjects import endpoint_slice, service

    objects = [
        service("lb", ["10.96.5.5"], [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30555}],
                type="NodePort", externalTrafficPolicy="Local"),
        endpoint_slice("lb", ["10.244.1.5"], [{"name": "http", "port": 8080, "protocol": "TCP"}], name="lb-a",
                       node_name="node-a"),
        endpoint_slice("lb", ["10.244.2.5"], [{"name": "http", "port": 8080, "protocol": "TCP"}], name="lb-b",
                       node_name="node-b"),
    ]
    t = translate(objects, "node-a").table
    scoped = [e for e in t.values() if e.internal_backends is not None]
    assert len(scoped) == 1 and len(scoped[0].backends) == 1 and len(scoped[0].internal_backends) == 2
    assert {e.frontend: e for e in decode_sync(encode_sync(t.values())).entries} == t
