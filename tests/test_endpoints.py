"""controlplane.endpoints on its own: a table of (endpoints, policy) -> chosen backends in order,
the cases translate relied on before the choice moved out of it, plus merge's "healthiest copy
wins" whatever order the slices come in."""

from __future__ import annotations

import ipaddress
import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest

from controlplane.endpoints import Endpoint, EndpointSet, choose, merge


def ep(addr: str, port: int = 8080, node: str = "node-a", *, ready: bool = True, serving: bool = True,
       terminating: bool = False, pod: str = "", zones: str = "", nodes: str = "") -> Endpoint:
    return Endpoint(ipaddress.ip_address(addr), port, node, ready, serving, terminating,
                    ("default", pod) if pod else ("", ""), frozenset(zones.split()), frozenset(nodes.split()))


ZONED = dict(topology="zone", zone="z1", node_name="node-a")


NOT_READY = {"ready": False, "serving": False}
DRAINING = {"ready": False, "serving": True, "terminating": True}  # serving while terminating
GONE = {"ready": False, "serving": False, "terminating": True}


@dataclass
class Case:
    endpoints: list[Endpoint]
    want: list[str]  # str(Backend) in order
    policy: dict[str, Any] = field(default_factory=dict)  # choose()'s keyword arguments


CASES: dict[str, Case] = {
    "ready-only": Case(
        [ep("10.0.0.1"), ep("10.0.0.2", **NOT_READY), ep("10.0.0.3")],
        ["10.0.0.1:8080", "10.0.0.3:8080"]),
    "ready-wins-over-draining": Case(
        [ep("10.0.0.1", **DRAINING), ep("10.0.0.2")],
        ["10.0.0.2:8080"]),
    "none-ready-falls-back-to-serving-terminating": Case(
        [ep("10.0.0.1", **DRAINING), ep("10.0.0.2", **GONE), ep("10.0.0.3", **NOT_READY)],
        ["10.0.0.1:8080"]),
    "not-serving-and-not-terminating-is-no-fallback": Case(
        [ep("10.0.0.1", ready=False, serving=True), ep("10.0.0.2", **NOT_READY)],
        []),
    "nothing-usable": Case([ep("10.0.0.1", **GONE)], []),
    "no-endpoints": Case([], []),
    "publish-not-ready-takes-all": Case(
        [ep("10.0.0.1", **GONE), ep("10.0.0.2", **NOT_READY), ep("10.0.0.3")],
        ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"], {"publish_not_ready": True}),
    "local-keeps-this-nodes": Case(
        [ep("10.0.0.1", node="node-a"), ep("10.0.0.2", node="node-b"), ep("10.0.0.3", node="")],
        ["10.0.0.1:8080"], {"local": True, "node_name": "node-a"}),
    "local-without-local-endpoints-is-empty": Case(
        [ep("10.0.0.2", node="node-b")], [], {"local": True, "node_name": "node-a"}),
    "local-falls-back-among-local-only": Case(  # a ready remote one does not stop the local fallback
        [ep("10.0.0.1", node="node-a", **DRAINING), ep("10.0.0.2", node="node-b")],
        ["10.0.0.1:8080"], {"local": True, "node_name": "node-a"}),
    "local-without-a-node-name-filters-nothing": Case(
        [ep("10.0.0.1", node="node-a"), ep("10.0.0.2", node="node-b")],
        ["10.0.0.1:8080", "10.0.0.2:8080"], {"local": True}),
    "cluster-policy-ignores-the-node": Case(
        [ep("10.0.0.1", node="node-a"), ep("10.0.0.2", node="node-b")],
        ["10.0.0.1:8080", "10.0.0.2:8080"], {"node_name": "node-a"}),
    "parked-pod-only-when-nothing-runs": Case(
        [ep("10.0.0.1", pod="a"), ep("10.0.0.2", pod="b"), ep("10.0.0.3")],
        ["10.0.0.2:8080", "10.0.0.3:8080"], {"states": {("default", "a"): "checkpointed"}}),
    "all-parked-keeps-them-all": Case(  # traffic then wakes one
        [ep("10.0.0.1", pod="a"), ep("10.0.0.2", pod="b")],
        ["10.0.0.1:8080", "10.0.0.2:8080"],
        {"states": {("default", "a"): "checkpointed", ("default", "b"): "restoring"}}),
    "unknown-state-counts-as-running": Case(
        [ep("10.0.0.1", pod="a"), ep("10.0.0.2", pod="b")],
        ["10.0.0.1:8080"], {"states": {("default", "a"): "napping", ("default", "b"): "failed"}}),
    "parked-choice-follows-readiness": Case(  # the running one is not ready: the parked ready one serves
        [ep("10.0.0.1", pod="a"), ep("10.0.0.2", pod="b", **NOT_READY)],
        ["10.0.0.1:8080"], {"states": {("default", "a"): "checkpointed"}}),
    # topology-aware routing (kube-proxy's canUseTopology), rule 2b
    "zone-hints-keep-this-zones": Case(
        [ep("10.0.0.1", zones="z1"), ep("10.0.0.2", zones="z2"), ep("10.0.0.3", zones="z1 z2")],
        ["10.0.0.1:8080", "10.0.0.3:8080"], ZONED),
    "zone-hints-unused-unless-asked": Case(
        [ep("10.0.0.1", zones="z1"), ep("10.0.0.2", zones="z2")],
        ["10.0.0.1:8080", "10.0.0.2:8080"], {"zone": "z1"}),
    "zone-any-endpoint-without-hints-means-all": Case(
        [ep("10.0.0.1", zones="z1"), ep("10.0.0.2")],
        ["10.0.0.1:8080", "10.0.0.2:8080"], ZONED),
    "zone-not-ready-without-hints-does-not-count": Case(
        [ep("10.0.0.1", zones="z1"), ep("10.0.0.2", zones="z2"), ep("10.0.0.3", **NOT_READY)],
        ["10.0.0.1:8080"], ZONED),
    "zone-none-for-this-zone-means-all": Case(
        [ep("10.0.0.1", zones="z2"), ep("10.0.0.2", zones="z3")],
        ["10.0.0.1:8080", "10.0.0.2:8080"], ZONED),
    "zone-node-without-a-zone-means-all": Case(
        [ep("10.0.0.1", zones="z1"), ep("10.0.0.2", zones="z2")],
        ["10.0.0.1:8080", "10.0.0.2:8080"], {**ZONED, "zone": ""}),
    "zone-local-policy-wins-over-hints": Case(
        [ep("10.0.0.1", node="node-a", zones="z2"), ep("10.0.0.2", node="node-b", zones="z1")],
        ["10.0.0.1:8080"], {**ZONED, "local": True}),
    "zone-not-over-the-terminating-fallback": Case(
        [ep("10.0.0.1", zones="z2", **DRAINING), ep("10.0.0.2", zones="z1", **DRAINING)],
        ["10.0.0.1:8080", "10.0.0.2:8080"], ZONED),
    "zone-publish-not-ready-counts-every-endpoint": Case(
        [ep("10.0.0.1", zones="z1", **NOT_READY), ep("10.0.0.2", zones="z2")],
        ["10.0.0.1:8080"], {**ZONED, "publish_not_ready": True}),
    "same-node-hints-first": Case(
        [ep("10.0.0.1", zones="z1", nodes="node-b"), ep("10.0.0.2", zones="z1", nodes="node-a"),
         ep("10.0.0.3", zones="z2", nodes="node-c")],
        ["10.0.0.2:8080"], {**ZONED, "topology": "node"}),
    "same-node-none-for-this-node-falls-back-to-zone": Case(
        [ep("10.0.0.1", zones="z1", nodes="node-b"), ep("10.0.0.2", zones="z2", nodes="node-c")],
        ["10.0.0.1:8080"], {**ZONED, "topology": "node"}),
    "ordered-by-family-address-port": Case(
        [ep("fd00::2"), ep("10.0.0.10", 81), ep("10.0.0.9", 82), ep("10.0.0.10", 80), ep("fd00::1")],
        ["10.0.0.9:82", "10.0.0.10:80", "10.0.0.10:81", "[fd00::1]:8080", "[fd00::2]:8080"]),
}


@pytest.mark.parametrize("name", CASES)
def test_choose(name: str) -> None:
    case = CASES[name]
    got = choose(case.endpoints, **case.policy)
    assert [str(b) for b in got] == case.want
    # the backends carry what the agent's health check and the inspect tools read
    by_addr = {(e.address, e.port): e for e in case.endpoints}
    for b in got:
        e = by_addr[(b.address, b.port)]
        assert (b.node_name, b.ready, b.serving, b.terminating) == (e.node_name, e.ready, e.serving, e.terminating)


def test_merge_keeps_the_healthiest_copy_in_any_order() -> None:
    copies = [ep("10.0.0.1", **GONE), ep("10.0.0.1", **DRAINING), ep("10.0.0.1"), ep("10.0.0.1", **NOT_READY)]
    for order in itertools.permutations(copies):
        bucket: EndpointSet = {}
        for e in order:
            merge(bucket, e)
        assert list(bucket.values()) == [copies[2]], order
    # a tie on health is broken by node name, so the winner still does not depend on the order
    a, b = ep("10.0.0.2", node="node-a"), ep("10.0.0.2", node="node-b")
    for order in ((a, b), (b, a)):
        bucket = {}
        for e in order:
            merge(bucket, e)
        assert bucket[(a.address, a.port)].node_name == "node-b"
    # other ports of the same address are other endpoints
    bucket = {}
    merge(bucket, ep("10.0.0.3", 80))
    merge(bucket, ep("10.0.0.3", 81))
    assert len(bucket) == 2
