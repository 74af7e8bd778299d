"""Kubernetes objects -> service table: semantics, validation messages, and robustness.

Pure Python: the translation is a pure function, so its cases are tables of objects and the
frontends/backends (or the error line) they must give.
"""

from __future__ import annotations

import copy
import ipaddress
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.objects import ObjectError, Severity
from controlplane.translate import (
    DEFAULT_AFFINITY_TIMEOUT_SECONDS,
    HEADLESS_LABEL,
    SERVICE_NAME_LABEL,
    SERVICE_PROXY_NAME_LABEL,
    Translation,
    translate,
)
from dataplane.table import Backend, Frontend, FrontendKind, Protocol, ServicePortName

DATA = Path(__file__).parent / "data"
ip = ipaddress.ip_address
TCP, UDP, SCTP = Protocol.TCP, Protocol.UDP, Protocol.SCTP
CIP, NP, EIP, LB = (
    FrontendKind.CLUSTER_IP,
    FrontendKind.NODE_PORT,
    FrontendKind.EXTERNAL_IP,
    FrontendKind.LOAD_BALANCER,
)


# --- builders --------------------------------------------------------------------------------


def service(
    name: str = "web", ns: str = "default", labels: dict | None = None, status: Any = None, **spec: Any
):
    spec.setdefault("clusterIP", "10.96.0.1")
    spec.setdefault("ports", [{"name": "http", "port": 80}])
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }
    if labels is not None:
        obj["metadata"]["labels"] = labels
    if status is not None:
        obj["status"] = status
    return obj


def ep(address: str, node: str = "", **conditions: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"addresses": [address]}
    if conditions:
        out["conditions"] = conditions
    if node:
        out["nodeName"] = node
    return out


def eslice(
    name: str = "web-abc",
    svc: str = "web",
    ns: str = "default",
    family: str = "IPv4",
    ports: list | None = None,
    endpoints: list | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {SERVICE_NAME_LABEL: svc}},
        "addressType": family,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}] if ports is None else ports,
        "endpoints": [ep("10.244.0.1")] if endpoints is None else endpoints,
    }


def fe(address: str, port: int, protocol: Protocol = TCP, kind: FrontendKind = CIP) -> Frontend:
    return Frontend(ip(address), port, protocol, kind)


def backends(t: Translation, frontend: Frontend) -> list[str]:
    return [str(b) for b in t.table[frontend].backends]


def errors(t: Translation, severity: Severity | None = Severity.ERROR) -> list[str]:
    return [str(e) for e in t.errors if severity is None or e.severity is severity]


def clean(t: Translation) -> Translation:
    """Assert a translation reported nothing at all, then hand it back."""
    assert errors(t, None) == []
    return t


# --- the sample cluster ----------------------------------------------------------------------


def load_sample() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((DATA / "cluster.yaml").read_text()))


def test_sample_cluster_gives_every_frontend_with_its_backends():
    t = clean(translate(load_sample(), node_name="node-a"))
    web = ["10.244.1.11:8080", "10.244.1.12:8080", "10.244.2.13:8080"]
    dns = ["10.244.1.21:5353", "10.244.2.22:5353", "10.244.2.23:5353"]
    echo4 = ["10.244.1.31:7007", "10.244.2.32:7007", "10.244.2.33:7007"]
    echo6 = ["[fd00:10:244:1::31]:7007", "[fd00:10:244:2::32]:7007", "[fd00:10:244:2::33]:7007"]
    expected = {
        fe("10.96.10.10", 80): ("shop/web:http", web),
        fe("10.96.0.10", 53, UDP): ("kube-system/kube-dns:dns", dns),
        fe("10.96.0.10", 53, TCP): ("kube-system/kube-dns:dns-tcp", dns),
        fe("10.96.20.20", 7): ("shop/echo:echo", echo4),
        fe("fd00:10:96::20", 7): ("shop/echo:echo", echo6),
        fe("0.0.0.0", 30007, TCP, NP): ("shop/echo:echo", echo4),
        fe("::", 30007, TCP, NP): ("shop/echo:echo", echo6),
    }
    got = {k: (str(v.service), backends(t, k)) for k, v in t.table.items()}
    assert got == expected
    for frontend, entry in t.table.items():
        assert entry.frontend == frontend
    echo = t.table[fe("10.96.20.20", 7)]
    assert (echo.affinity_timeout, echo.local_only, echo.health_check_node_port) == (600, False, 0)
    b = t.table[fe("10.96.10.10", 80)].backends[2]
    assert (b.node_name, b.ready, b.serving, b.terminating) == ("node-b", True, True, False)


def test_sample_cluster_nodes():
    t = translate(load_sample())
    assert sorted(t.nodes) == ["node-a", "node-b"]
    a = t.nodes["node-a"]
    assert a.internal_ips == (ip("192.168.100.10"), ip("fd00:192:168:100::10"))
    assert a.external_ips == (ip("203.0.113.10"),)
    assert a.pod_cidrs == (ipaddress.ip_network("10.244.1.0/24"), ipaddress.ip_network("fd00:10:244:1::/64"))
    assert dict(a.labels)["kubernetes.io/hostname"] == "node-a"
    assert t.nodes["node-b"].external_ips == ()


def test_same_objects_in_any_order_give_the_same_table():
    objs = load_sample()
    base = translate(objs)
    rnd = random.Random(7)
    for _ in range(10):
        shuffled = objs[:]
        rnd.shuffle(shuffled)
        again = translate(shuffled)
        assert again.table == base.table
        assert again.nodes == base.nodes


def test_kind_list_nested_lists_and_api_list_items_without_kind_or_version():
    objs = load_sample()
    as_list = [{"apiVersion": "v1", "kind": "List", "items": [objs[0], {"kind": "List", "items": objs[1:]}]}]
    assert clean(translate(as_list)).table == translate(objs).table
    # Items of an API list response carry no apiVersion; the source adds kind, nothing else.
    stripped = copy.deepcopy(objs)
    for o in stripped:
        del o["apiVersion"]
    assert clean(translate(stripped)).table == translate(objs).table


# --- frontends -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param({}, [fe("10.96.0.1", 80)], id="defaults-to-TCP"),
        pytest.param(
            {
                "ports": [
                    {"name": "a", "port": 53, "protocol": "UDP"},
                    {"name": "b", "port": 9, "protocol": "SCTP"},
                ]
            },
            [fe("10.96.0.1", 53, UDP), fe("10.96.0.1", 9, SCTP)],
            id="udp-and-sctp",
        ),
        pytest.param(
            {"clusterIPs": ["fd00::1", "10.96.0.1"], "clusterIP": "fd00::1"},
            [fe("fd00::1", 80), fe("10.96.0.1", 80)],
            id="dual-stack-ipv6-primary",
        ),
        pytest.param(
            {
                "clusterIP": "10.96.0.1",
                "clusterIPs": ["10.96.0.1", "fd00::1"],
                "type": "NodePort",
                "ports": [{"name": "http", "port": 80, "nodePort": 30080}],
            },
            [fe("10.96.0.1", 80), fe("fd00::1", 80), fe("0.0.0.0", 30080, TCP, NP), fe("::", 30080, TCP, NP)],
            id="dual-stack-nodeport-one-per-family",
        ),
        pytest.param(
            {"type": "ClusterIP", "ports": [{"name": "http", "port": 80, "nodePort": 30080}]},
            [fe("10.96.0.1", 80)],
            id="nodeport-ignored-on-ClusterIP-type",
        ),
        pytest.param(
            {"externalIPs": ["198.51.100.7", "2001:db8::7"]},
            [fe("10.96.0.1", 80), fe("198.51.100.7", 80, TCP, EIP), fe("2001:db8::7", 80, TCP, EIP)],
            id="external-ips-on-service-port",
        ),
        pytest.param(
            {
                "clusterIP": "",
                "ipFamilies": ["IPv6"],
                "type": "NodePort",
                "ports": [{"name": "http", "port": 80, "nodePort": 31000}],
            },
            [fe("::", 31000, TCP, NP)],
            id="no-cluster-ip-nodeport-family-from-ipFamilies",
        ),
    ],
)
def test_frontends(spec: dict, expected: list[Frontend]):
    t = translate([service(**spec)])
    assert sorted(t.table, key=str) == sorted(expected, key=str)
    assert all(e.service == ServicePortName("default", "web", e.service.port) for e in t.table.values())


def test_load_balancer_ingress_ips_nodeports_and_what_is_skipped():
    status = {
        "loadBalancer": {
            "ingress": [
                {"ip": "203.0.113.5"},
                {"hostname": "lb.example.com"},  # DNS-only ingress: nothing to capture
                {"ip": "203.0.113.6", "ipMode": "Proxy"},  # the LB proxies itself
                {"ip": "203.0.113.7", "ipMode": "VIP"},
            ]
        }
    }
    t = clean(
        translate(
            [
                service(
                    type="LoadBalancer",
                    ports=[{"name": "http", "port": 80, "nodePort": 31080}],
                    status=status,
                )
            ]
        )
    )
    assert set(t.table) == {
        fe("10.96.0.1", 80),
        fe("0.0.0.0", 31080, TCP, NP),
        fe("203.0.113.5", 80, TCP, LB),
        fe("203.0.113.7", 80, TCP, LB),
    }
    # The same status on a ClusterIP service is stale and must not capture anything.
    t = clean(translate([service(status=status)]))
    assert set(t.table) == {fe("10.96.0.1", 80)}


@pytest.mark.parametrize(
    ("svc", "proxy_name"),
    [
        pytest.param(service(clusterIP="None"), "", id="headless-clusterIP-None"),
        pytest.param(service(clusterIP="None", clusterIPs=["None"]), "", id="headless-clusterIPs-None"),
        pytest.param(service(labels={HEADLESS_LABEL: ""}), "", id="headless-label"),
        pytest.param(
            service(type="ExternalName", externalName="db.example.com", clusterIP=None), "", id="ExternalName"
        ),
        pytest.param(service(labels={SERVICE_PROXY_NAME_LABEL: "other-proxy"}), "", id="other-proxy"),
        pytest.param(
            service(labels={SERVICE_PROXY_NAME_LABEL: "other-proxy"}), "zeroproxy", id="other-proxy-named"
        ),
    ],
)
def test_services_that_are_not_ours_give_no_frontends_and_no_errors(svc: dict, proxy_name: str):
    # Their slices are expected and must not be reported as dangling either.
    t = clean(translate([svc, eslice()], proxy_name=proxy_name))
    assert t.table == {}


def test_service_naming_us_as_its_proxy_is_programmed():
    t = clean(
        translate([service(labels={SERVICE_PROXY_NAME_LABEL: "zeroproxy"}), eslice()], proxy_name="zeroproxy")
    )
    assert backends(t, fe("10.96.0.1", 80)) == ["10.244.0.1:8080"]


def test_entries_carry_affinity_local_and_health_port_typed():
    t = clean(
        translate(
            [
                service("a"),
                service("b", clusterIP="10.96.0.2", sessionAffinity="ClientIP"),
                service(
                    "c",
                    clusterIP="10.96.0.3",
                    type="LoadBalancer",
                    externalTrafficPolicy="Local",
                    internalTrafficPolicy="Local",
                    healthCheckNodePort=32100,
                    sessionAffinity="ClientIP",
                    sessionAffinityConfig={"clientIP": {"timeoutSeconds": 30}},
                ),
            ]
        )
    )
    def typed(e):
        return e.affinity_timeout, e.local_only, e.health_check_node_port

    a, b, c = (t.table[fe(f"10.96.0.{i}", 80)] for i in (1, 2, 3))
    assert typed(a) == (0, False, 0)
    assert typed(b) == (DEFAULT_AFFINITY_TIMEOUT_SECONDS, False, 0) and DEFAULT_AFFINITY_TIMEOUT_SECONDS == 10800
    # eTP Local makes only the external frontends local-only; the ClusterIP one serves everyone
    assert typed(c) == (30, False, 32100)
    hash(c)  # entries stay hashable: the dataplane diffs them


def test_local_only_marks_the_external_frontends_of_an_etp_local_service():
    svc = service(
        "lb", clusterIP="10.96.0.4", type="LoadBalancer", externalTrafficPolicy="Local",
        healthCheckNodePort=32101, externalIPs=["192.0.2.4"],
        ports=[{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30444}],
        status={"loadBalancer": {"ingress": [{"ip": "198.51.100.4"}]}},
    )
    t = clean(translate([svc], node_name="node-a"))
    got = {(e.frontend.kind.value, e.local_only, e.health_check_node_port) for e in t.table.values()}
    assert got == {("ClusterIP", False, 32101), ("NodePort", True, 32101), ("ExternalIP", True, 32101),
                   ("LoadBalancer", True, 32101)}


def test_a_health_check_node_port_without_etp_local_is_not_carried():
    svc = service("np", clusterIP="10.96.0.5", type="NodePort", healthCheckNodePort=32102,
                  ports=[{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30445}])
    t = clean(translate([svc]))
    assert {e.health_check_node_port for e in t.table.values()} == {0}


# --- endpoints -------------------------------------------------------------------------------


def test_ports_match_by_name_and_protocol_and_numbers_come_from_the_slice():
    svc = service(
        ports=[
            {"name": "http", "port": 80},
            {"name": "metrics", "port": 9090},
            {"name": "dns", "port": 53, "protocol": "UDP"},
        ]
    )
    sl = eslice(
        ports=[
            {"name": "metrics", "port": 19090},
            {"name": "http", "port": 8080},
            {"name": "dns", "port": 5353, "protocol": "TCP"},  # same name, other protocol: no match
        ],
        endpoints=[ep("10.244.0.1"), ep("10.244.0.2")],
    )
    t = clean(translate([svc, sl]))
    assert backends(t, fe("10.96.0.1", 80)) == ["10.244.0.1:8080", "10.244.0.2:8080"]
    assert backends(t, fe("10.96.0.1", 9090)) == ["10.244.0.1:19090", "10.244.0.2:19090"]
    assert backends(t, fe("10.96.0.1", 53, UDP)) == []


@pytest.mark.parametrize("slice_port_name", [None, ""], ids=["name-missing", "name-empty"])
def test_unnamed_port_matches_unnamed_slice_port(slice_port_name: str | None):
    port: dict[str, Any] = {"port": 8080}
    if slice_port_name is not None:
        port["name"] = slice_port_name
    t = clean(translate([service(ports=[{"port": 80}]), eslice(ports=[port])]))
    assert backends(t, fe("10.96.0.1", 80)) == ["10.244.0.1:8080"]
    assert t.table[fe("10.96.0.1", 80)].service == ServicePortName("default", "web", "")


def test_slices_merge_duplicates_appear_once_and_backends_are_sorted():
    t = clean(
        translate(
            [
                service(),
                eslice("web-1", endpoints=[ep("10.244.0.30"), ep("10.244.0.4")]),
                eslice("web-2", endpoints=[ep("10.244.0.4"), ep("10.244.0.1")]),
            ]
        )
    )
    assert backends(t, fe("10.96.0.1", 80)) == ["10.244.0.1:8080", "10.244.0.4:8080", "10.244.0.30:8080"]


def test_duplicate_address_keeps_the_healthiest_copy():
    t = clean(
        translate(
            [
                service(),
                eslice("web-1", endpoints=[ep("10.244.0.1", ready=False), ep("10.244.0.2")]),
                eslice("web-2", endpoints=[ep("10.244.0.1", ready=True)]),
            ]
        )
    )
    assert backends(t, fe("10.96.0.1", 80)) == ["10.244.0.1:8080", "10.244.0.2:8080"]


def test_slices_join_only_in_their_own_namespace_and_family():
    t = translate(
        [
            service(clusterIPs=["10.96.0.1", "fd00::1"]),
            eslice("v4"),
            eslice("v6", family="IPv6", endpoints=[ep("fd00:244::1")]),
            eslice("fqdn", family="FQDN", endpoints=[ep("web.example.com")]),
            eslice("elsewhere", ns="other", endpoints=[ep("10.244.9.9")]),
        ]
    )
    assert backends(t, fe("10.96.0.1", 80)) == ["10.244.0.1:8080"]
    assert backends(t, fe("fd00::1", 80)) == ["[fd00:244::1]:8080"]
    assert errors(t, Severity.WARNING) == [
        'EndpointSlice other/elsewhere metadata.labels["kubernetes.io/service-name"]: '
        "Service other/web not found; slice ignored"
    ]
    assert errors(t) == []


def test_service_without_endpoints_keeps_its_frontends_with_no_backends():
    t = clean(translate([service(ports=[{"name": "a", "port": 1}, {"name": "b", "port": 2}])]))
    assert {k: v.backends for k, v in t.table.items()} == {fe("10.96.0.1", 1): (), fe("10.96.0.1", 2): ()}
    # A slice listing the endpoints but no ports gives no backends either.
    t = clean(translate([service(), eslice(ports=[])]))
    assert t.table[fe("10.96.0.1", 80)].backends == ()


# (conditions of each endpoint, publishNotReadyAddresses) -> the endpoints used
CONDITION_CASES = [
    pytest.param([{}], False, [0], id="missing-conditions-mean-ready"),
    pytest.param([{"ready": None, "serving": None, "terminating": None}], False, [0], id="null-means-ready"),
    pytest.param([{"ready": True}, {"ready": False}], False, [0], id="not-ready-excluded"),
    pytest.param(
        [{"ready": True}, {"ready": False, "serving": True, "terminating": True}],
        False,
        [0],
        id="terminating-unused-while-one-is-ready",
    ),
    pytest.param(
        [
            {"ready": False, "serving": True, "terminating": True},
            {"ready": False, "serving": False, "terminating": True},
            {"ready": False, "serving": True, "terminating": False},
            {"ready": False, "terminating": True},  # serving nil = true
        ],
        False,
        [0, 3],
        id="fallback-to-serving-terminating",
    ),
    pytest.param([{"ready": False, "serving": False}], False, [], id="nothing-usable"),
    pytest.param(
        [{"ready": False, "serving": False}, {"ready": True}, {"ready": False, "terminating": True}],
        True,
        [0, 1, 2],
        id="publishNotReadyAddresses-uses-all",
    ),
]


@pytest.mark.parametrize(("conditions", "publish", "used"), CONDITION_CASES)
def test_endpoint_conditions(conditions: list[dict], publish: bool, used: list[int]):
    endpoints = [{"addresses": [f"10.244.0.{i + 1}"], "conditions": c} for i, c in enumerate(conditions)]
    t = clean(translate([service(publishNotReadyAddresses=publish), eslice(endpoints=endpoints)]))
    assert backends(t, fe("10.96.0.1", 80)) == [f"10.244.0.{i + 1}:8080" for i in used]


def test_backends_record_node_and_conditions():
    t = clean(
        translate(
            [
                service(),
                eslice(endpoints=[ep("10.244.0.1", "n1", ready=False, serving=True, terminating=True)]),
            ]
        )
    )
    assert t.table[fe("10.96.0.1", 80)].backends == (
        Backend(ip("10.244.0.1"), 8080, node_name="n1", ready=False, serving=True, terminating=True),
    )


def traffic_policy_objects(**spec: Any) -> list[dict[str, Any]]:
    status = {"loadBalancer": {"ingress": [{"ip": "203.0.113.5"}]}}
    return [
        service(
            type="LoadBalancer",
            ports=[{"name": "http", "port": 80, "nodePort": 30080}],
            status=status,
            **spec,
        ),
        eslice(
            endpoints=[
                ep("10.244.1.1", "n1"),
                ep("10.244.1.2", "n1", ready=False, serving=True, terminating=True),
                ep("10.244.2.1", "n2"),
                ep("10.244.3.1", "n3", ready=False, serving=True, terminating=True),
            ]
        ),
    ]


@pytest.mark.parametrize(
    ("spec", "node", "cluster_ip", "external"),
    [
        pytest.param({}, "n1", ["10.244.1.1", "10.244.2.1"], ["10.244.1.1", "10.244.2.1"], id="Cluster"),
        pytest.param(
            {"internalTrafficPolicy": "Local"},
            "n1",
            ["10.244.1.1"],
            ["10.244.1.1", "10.244.2.1"],
            id="iTP-Local",
        ),
        pytest.param(
            {"externalTrafficPolicy": "Local"},
            "n2",
            ["10.244.1.1", "10.244.2.1"],
            ["10.244.2.1"],
            id="eTP-Local",
        ),
        # This node's endpoint is only terminating: local fallback, as kube-proxy does.
        pytest.param(
            {"externalTrafficPolicy": "Local"},
            "n3",
            ["10.244.1.1", "10.244.2.1"],
            ["10.244.3.1"],
            id="eTP-Local-terminating-fallback",
        ),
        pytest.param(
            {"externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local"},
            "n4",
            [],
            [],
            id="no-local-endpoints",
        ),
        pytest.param(
            {"externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local"},
            "",
            ["10.244.1.1", "10.244.2.1"],
            ["10.244.1.1", "10.244.2.1"],
            id="node-unknown",
        ),
    ],
)
def test_traffic_policies_choose_local_endpoints(
    spec: dict, node: str, cluster_ip: list[str], external: list[str]
):
    t = clean(translate(traffic_policy_objects(**spec), node_name=node))
    to_str = [f"{a}:8080" for a in cluster_ip]
    assert backends(t, fe("10.96.0.1", 80)) == to_str
    for frontend in (fe("0.0.0.0", 30080, TCP, NP), fe("203.0.113.5", 80, TCP, LB)):
        assert backends(t, frontend) == [f"{a}:8080" for a in external]
        # with eTP=Local, the node's own processes and pods use the internal policy's endpoints
        internal = t.table[frontend].internal_backends
        if spec.get("externalTrafficPolicy") == "Local" and node:
            assert internal is not None and [f"{b.address}:{b.port}" for b in internal] == to_str
        else:
            assert internal is None
    assert t.table[fe("10.96.0.1", 80)].internal_backends is None


# --- discovery.k8s.io/v1beta1 (Kubernetes 1.20) ------------------------------------------------


def v1beta1(obj: dict[str, Any]) -> dict[str, Any]:
    """A v1 slice from :func:`eslice` in the shape 1.20 serves: nodeName (a gated alpha field
    there) moved into topology, next to the zone and region keys the controller also writes."""
    out = copy.deepcopy(obj)
    out["apiVersion"] = "discovery.k8s.io/v1beta1"
    for e in out["endpoints"]:
        node = e.pop("nodeName", None)
        if node is not None:
            e["topology"] = {"kubernetes.io/hostname": node, "topology.kubernetes.io/zone": "z1",
                             "topology.kubernetes.io/region": "r1"}
    return out


def test_v1beta1_topology_hostname_is_the_node_and_gives_the_same_table_as_v1():
    for spec in ({}, {"internalTrafficPolicy": "Local"}, {"externalTrafficPolicy": "Local"}):
        v1_objects = traffic_policy_objects(**spec)
        beta_objects = [v1_objects[0], v1beta1(v1_objects[1])]
        assert "nodeName" not in str(beta_objects[1]) and "topology" in str(beta_objects[1])
        for node in ("n1", "n2", "n3", ""):
            assert clean(translate(beta_objects, node_name=node)).table == translate(v1_objects, node_name=node).table


def test_v1beta1_endpoint_fields():
    endpoints = [
        # 1.20 with the EndpointSliceNodeName gate on: nodeName wins over topology
        {"addresses": ["10.244.0.1"], "nodeName": "n1", "topology": {"kubernetes.io/hostname": "other"}},
        # the gate off: topology only; conditions as 1.20 writes them without the
        # EndpointSliceTerminatingCondition gate: ready alone (nil serving = true, nil terminating = false)
        {"addresses": ["10.244.0.2"], "topology": {"kubernetes.io/hostname": "n2"}, "conditions": {"ready": False}},
        {"addresses": ["10.244.0.3"], "topology": {"topology.kubernetes.io/zone": "z1"}},  # no hostname key
        {"addresses": ["10.244.0.4"], "conditions": {"ready": False, "serving": True, "terminating": True}},
    ]
    t = clean(translate([service(publishNotReadyAddresses=True),
                         v1beta1(eslice(endpoints=endpoints))]))
    assert t.table[fe("10.96.0.1", 80)].backends == (
        Backend(ip("10.244.0.1"), 8080, node_name="n1"),
        Backend(ip("10.244.0.2"), 8080, node_name="n2", ready=False),
        Backend(ip("10.244.0.3"), 8080),
        Backend(ip("10.244.0.4"), 8080, ready=False, serving=True, terminating=True),
    )


def test_v1beta1_bad_topology_names_the_field_and_v1_ignores_topology():
    bad = v1beta1(eslice(endpoints=[{"addresses": ["10.244.0.1"], "topology": {"kubernetes.io/hostname": 7}},
                                    ep("10.244.0.2")]))
    t = translate([service(), bad])
    assert errors(t) == [
        'EndpointSlice default/web-abc endpoints[0].topology["kubernetes.io/hostname"]: must be a string, got 7',
        "EndpointSlice default/web-abc endpoints[0]: endpoint ignored because of the errors above",
    ]
    assert backends(t, fe("10.96.0.1", 80)) == ["10.244.0.2:8080"]
    # v1 has no topology field (its deprecatedTopology is not read by kube-proxy either)
    v1 = eslice(endpoints=[{"addresses": ["10.244.0.1"], "topology": {"kubernetes.io/hostname": "n1"}}])
    assert clean(translate([service(), v1])).table[fe("10.96.0.1", 80)].backends[0].node_name == ""


# --- Nodes and Pods --------------------------------------------------------------------------


def test_pods_are_kept_with_annotations_ips_and_node():
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "web-0",
            "namespace": "shop",
            "annotations": {"zeroproxy.io/scale-to-zero": "true", "zeroproxy.io/idle-after": "30s"},
            "labels": {"app": "web"},
        },
        "spec": {"nodeName": "node-a"},
        "status": {
            "phase": "Running",
            "podIP": "10.244.1.11",
            "podIPs": [{"ip": "10.244.1.11"}, {"ip": "fd00::b"}],
        },
    }
    terminating = copy.deepcopy(pod)
    terminating["metadata"].update(name="web-1", deletionTimestamp="2026-01-01T00:00:00Z")
    t = clean(translate([pod, terminating]))
    p = t.pods[("shop", "web-0")]
    assert (p.namespace, p.name, p.node_name, p.phase, p.terminating) == (
        "shop",
        "web-0",
        "node-a",
        "Running",
        False,
    )
    assert p.ips == (ip("10.244.1.11"), ip("fd00::b"))
    assert p.annotation("zeroproxy.io/scale-to-zero") == "true"
    assert p.annotation("missing", "x") == "x"
    assert dict(p.labels) == {"app": "web"}
    assert t.pods[("shop", "web-1")].terminating is True
    assert t.table == {}


# --- scale to zero: parked endpoints only when nothing runs -----------------------------------


def pod_ref(address: str, pod: str, node: str = "", ns: str | None = None, **conditions: Any) -> dict[str, Any]:
    out = ep(address, node, **conditions)
    out["targetRef"] = {"kind": "Pod", "name": pod, **({"namespace": ns} if ns else {})}
    return out


def state_pod(name: str, state: str | None, ns: str = "default") -> dict[str, Any]:
    labels = {"zeroproxy.io/scale-state": state} if state is not None else {}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels}}


S2Z_ENDPOINTS = [pod_ref("10.244.1.1", "a", "n1"), pod_ref("10.244.2.1", "b", "n2", ns="default"),
                 pod_ref("10.244.3.1", "c", "n3")]


@pytest.mark.parametrize(
    ("states", "used"),
    [
        pytest.param({}, ["a", "b", "c"], id="no-labels"),
        pytest.param({"a": "running", "b": "running", "c": "running"}, ["a", "b", "c"], id="all-running"),
        pytest.param({"a": "checkpointed"}, ["b", "c"], id="one-checkpointed"),
        pytest.param({"a": "checkpointed", "b": "restoring", "c": "failed"}, ["a", "b", "c"], id="all-parked"),
        pytest.param({"a": "checkpointed", "b": "restoring"}, ["c"], id="one-running"),
        pytest.param({"a": "checkpointed", "b": "checkpointed", "c": "something-new"}, ["c"],
                     id="unknown-value-counts-as-running"),
    ],
)
def test_parked_endpoints_are_used_only_when_none_runs(states: dict[str, str], used: list[str]):
    addr = {"a": "10.244.1.1", "b": "10.244.2.1", "c": "10.244.3.1"}
    objects = [service(), eslice(endpoints=S2Z_ENDPOINTS), *(state_pod(n, s) for n, s in states.items())]
    t = clean(translate(objects))
    assert backends(t, fe("10.96.0.1", 80)) == [f"{addr[n]}:8080" for n in used]
    # the same, with the states given by the caller (the change tracker) instead of Pod objects
    given = {("default", n): s for n, s in states.items()}
    t = clean(translate([service(), eslice(endpoints=S2Z_ENDPOINTS)], scale_states=given))
    assert backends(t, fe("10.96.0.1", 80)) == [f"{addr[n]}:8080" for n in used]


def test_caller_states_win_over_labels_and_only_the_pods_namespace_counts():
    objects = [service(), eslice(endpoints=S2Z_ENDPOINTS[:2]), state_pod("a", "checkpointed"),
               state_pod("b", "checkpointed", ns="other")]  # another namespace's "b": not ours
    t = clean(translate(objects))
    assert backends(t, fe("10.96.0.1", 80)) == ["10.244.2.1:8080"]
    t = clean(translate(objects, scale_states={("default", "a"): "running", ("default", "b"): "restoring"}))
    assert backends(t, fe("10.96.0.1", 80)) == ["10.244.1.1:8080"]


def test_parked_choice_follows_readiness_and_local_policy():
    """Readiness and traffic policy choose first; "running only" applies among what they chose."""
    endpoints = [pod_ref("10.244.1.1", "a", "n1"), pod_ref("10.244.1.2", "b", "n1", ready=False),
                 pod_ref("10.244.2.1", "c", "n2")]
    objects = [service(internalTrafficPolicy="Local"), eslice(endpoints=endpoints),
               state_pod("a", "checkpointed")]
    # on n1 the only ready local endpoint is parked: it is used (a connection wakes it); the
    # running but unready b is not a candidate
    assert backends(clean(translate(objects, node_name="n1")), fe("10.96.0.1", 80)) == ["10.244.1.1:8080"]
    assert backends(clean(translate(objects, node_name="n2")), fe("10.96.0.1", 80)) == ["10.244.2.1:8080"]
    objects[0] = service()
    assert backends(clean(translate(objects, node_name="n1")), fe("10.96.0.1", 80)) == ["10.244.2.1:8080"]


def test_malformed_target_ref_warns_and_keeps_the_endpoint():
    bad = ep("10.244.1.1")
    bad["targetRef"] = "pod/a"
    nameless = ep("10.244.2.1")
    nameless["targetRef"] = {"kind": "Pod"}
    node_ref = ep("10.244.3.1")
    node_ref["targetRef"] = {"kind": "Node", "name": "n3"}  # not a pod: no state, no warning
    t = translate([service(), eslice(endpoints=[bad, nameless, node_ref])])
    assert errors(t) == []
    assert errors(t, Severity.WARNING) == [
        "EndpointSlice default/web-abc endpoints[0].targetRef: must be a mapping, got 'pod/a'; "
        "no pod state for this endpoint",
        "EndpointSlice default/web-abc endpoints[1].targetRef: a Pod reference needs a name (and a string "
        "namespace); no pod state for this endpoint",
    ]
    assert backends(t, fe("10.96.0.1", 80)) == ["10.244.1.1:8080", "10.244.2.1:8080", "10.244.3.1:8080"]


def test_pod_scale_state_reads_the_label():
    t = clean(translate([state_pod("a", "checkpointed"), state_pod("b", None)]))
    assert t.pods[("default", "a")].scale_state == "checkpointed"
    assert t.pods[("default", "b")].scale_state == ""


# --- validation: every bad input names the object and the field -----------------------------

OK_SLICE = eslice("web-ok")

# (objects, the one error line expected, frontends that must still exist)
ERROR_CASES = [
    pytest.param(
        [service(clusterIP="10.96.0.300")],
        "Service default/web spec.clusterIP: is not a valid IP address: '10.96.0.300'; service ignored",
        [],
        id="invalid-clusterIP",
    ),
    pytest.param(
        [service(clusterIP="10.96.0.1", clusterIPs=["10.96.0.1", "fd00::zz"])],
        "Service default/web spec.clusterIPs[1]: is not a valid IP address: 'fd00::zz'; service ignored",
        [],
        id="invalid-clusterIPs-entry",
    ),
    pytest.param(
        [service(clusterIP="10.96.0.1", clusterIPs=["10.96.0.1", "10.96.0.2"])],
        "Service default/web spec.clusterIPs[1]: a second IPv4 address; service ignored",
        [],
        id="two-clusterIPs-same-family",
    ),
    pytest.param(
        [service(clusterIP="10.96.0.9", clusterIPs=["10.96.0.1"])],
        "Service default/web spec.clusterIP: must equal spec.clusterIPs[0] (10.96.0.1), got '10.96.0.9'; "
        "service ignored",
        [],
        id="clusterIP-disagrees-with-clusterIPs",
    ),
    pytest.param(
        [service(clusterIP="0.0.0.0")],
        "Service default/web spec.clusterIP: must not be the unspecified address (0.0.0.0 / ::); "
        "service ignored",
        [],
        id="unspecified-clusterIP",
    ),
    pytest.param(
        [service(clusterIP=1234)],
        "Service default/web spec.clusterIP: must be an IP address string, got 1234; service ignored",
        [],
        id="clusterIP-not-a-string",
    ),
    pytest.param(
        [service(ports=[{"name": "a", "port": 70000}, {"name": "b", "port": 81}])],
        "Service default/web spec.ports[0].port: must be in 1..65535, got 70000",
        [fe("10.96.0.1", 81)],
        id="port-out-of-range",
    ),
    pytest.param(
        [service(ports=[{"name": "b", "port": 81}, {"name": "a", "port": "80"}])],
        "Service default/web spec.ports[1].port: must be an integer in 1..65535, got '80'",
        [fe("10.96.0.1", 81)],
        id="port-as-string",
    ),
    pytest.param(
        [service(ports=[{"name": "a", "port": 0}, {"name": "b", "port": 81}])],
        "Service default/web spec.ports[0].port: must be in 1..65535, got 0",
        [fe("10.96.0.1", 81)],
        id="port-zero",
    ),
    pytest.param(
        [service(ports=[{"name": "a"}, {"name": "b", "port": 81}])],
        "Service default/web spec.ports[0].port: missing",
        [fe("10.96.0.1", 81)],
        id="port-missing",
    ),
    pytest.param(
        [service(ports=[{"name": "a", "port": 80, "protocol": "ICMP"}, {"name": "b", "port": 81}])],
        "Service default/web spec.ports[0].protocol: must be TCP, UDP or SCTP, got 'ICMP'",
        [fe("10.96.0.1", 81)],
        id="unknown-protocol",
    ),
    pytest.param(
        [service(ports=[{"name": "a", "port": 80, "protocol": "tcp"}, {"name": "b", "port": 81}])],
        "Service default/web spec.ports[0].protocol: must be TCP, UDP or SCTP, got 'tcp'",
        [fe("10.96.0.1", 81)],
        id="lowercase-protocol",
    ),
    pytest.param(
        [
            service(
                type="NodePort",
                ports=[{"name": "a", "port": 80, "nodePort": 8080}, {"name": "b", "port": 81}],
            )
        ],
        "Service default/web spec.ports[0].nodePort: must be in 30000..32767, got 8080",
        [fe("10.96.0.1", 81)],
        id="nodePort-out-of-range",
    ),
    pytest.param(
        [service(ports=[{"name": "a", "port": 80}, {"name": "a", "port": 81}])],
        "Service default/web spec.ports[1].name: name 'a' again (as spec.ports[0]); port ignored",
        [fe("10.96.0.1", 80)],
        id="duplicate-port-name",
    ),
    pytest.param(
        [service(ports=[{"name": "a", "port": 80}, {"name": "b", "port": 80}])],
        "Service default/web spec.ports[1].port: 80/TCP again (as spec.ports[0]); port ignored",
        [fe("10.96.0.1", 80)],
        id="duplicate-port-number",
    ),
    pytest.param(
        [service(ports=[{"name": "a", "port": 80}, ["not", "a", "port"]])],
        "Service default/web spec.ports[1]: must be a mapping, got a list",
        [fe("10.96.0.1", 80)],
        id="port-not-a-mapping",
    ),
    pytest.param(
        [service(ports=[])],
        "Service default/web spec.ports: no ports: the service has no frontends",
        [],
        id="no-ports",
    ),
    pytest.param(
        [service(externalIPs=["198.51.100.1", "bogus"])],
        "Service default/web spec.externalIPs[1]: is not a valid IP address: 'bogus'; address ignored",
        [fe("10.96.0.1", 80), fe("198.51.100.1", 80, TCP, EIP)],
        id="invalid-externalIP",
    ),
    pytest.param(
        [service(type="LoadBalancer", status={"loadBalancer": {"ingress": [{"ip": "203.0.113.999"}]}})],
        "Service default/web status.loadBalancer.ingress[0].ip: is not a valid IP address: '203.0.113.999'; "
        "address ignored",
        [fe("10.96.0.1", 80)],
        id="invalid-lb-ip",
    ),
    pytest.param(
        [service(type="Weird")],
        "Service default/web spec.type: unknown service type 'Weird'; service ignored",
        [],
        id="unknown-type",
    ),
    pytest.param(
        [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": ["x"]}],
        "Service default/web spec: must be a mapping, got a list; service ignored",
        [],
        id="spec-not-a-mapping",
    ),
    pytest.param(
        [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}}],
        "Service default/web spec: must be a mapping, got null; service ignored",
        [],
        id="spec-missing",
    ),
    pytest.param(
        [{"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "shop"}, "spec": {}}],
        "Service <unnamed at #0> in namespace shop metadata.name: must be a non-empty string, got null",
        [],
        id="missing-name",
    ),
    pytest.param(
        [{"apiVersion": "v1", "kind": "Service", "metadata": "web", "spec": {}}],
        "Service <unnamed at #0> metadata: must be a mapping, got 'web'",
        [],
        id="metadata-not-a-mapping",
    ),
    pytest.param(
        [
            service(),
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "x"}},
        ],
        "Deployment x/web kind: unknown kind 'Deployment' (known: EndpointSlice, List, Node, Pod, Service); "
        "object ignored",
        [fe("10.96.0.1", 80)],
        id="unknown-kind",
    ),
    pytest.param(
        [service(), {"metadata": {"name": "x"}}],
        "object x kind: must be a non-empty string, got null",
        [fe("10.96.0.1", 80)],
        id="missing-kind",
    ),
    pytest.param(
        [service(), "just a string", None],
        "object <unnamed at #1>: must be a mapping, got 'just a string'",
        [fe("10.96.0.1", 80)],
        id="document-not-a-mapping",
    ),
    pytest.param(
        [service(), {"apiVersion": "v1", "kind": "EndpointSlice", "metadata": {"name": "s"}}],
        "EndpointSlice s apiVersion: must be discovery.k8s.io/v1 or discovery.k8s.io/v1beta1 for kind EndpointSlice, "
        "got 'v1'",
        [fe("10.96.0.1", 80)],
        id="wrong-apiVersion",
    ),
    pytest.param(
        [service(externalTrafficPolicy="Locale")],
        "Service default/web spec.externalTrafficPolicy: must be Cluster or Local, got 'Locale'",
        [],
        id="bad-eTP",
    ),
    pytest.param(
        [service(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 0}})],
        "Service default/web spec.sessionAffinityConfig.clientIP.timeoutSeconds: must be in 1..86400, got 0",
        [],
        id="bad-affinity-timeout",
    ),
    pytest.param(
        [service(publishNotReadyAddresses="yes")],
        "Service default/web spec.publishNotReadyAddresses: must be true or false, got 'yes'",
        [],
        id="bad-publishNotReadyAddresses",
    ),
    pytest.param(
        [service(), eslice(endpoints=[ep("10.244.0.1"), ep("10.244.0.2.7"), ep("10.244.0.3")])],
        "EndpointSlice default/web-abc endpoints[1].addresses[0]: is not a valid IP address: '10.244.0.2.7'; "
        "endpoint ignored",
        [fe("10.96.0.1", 80)],
        id="invalid-endpoint-address",
    ),
    pytest.param(
        [service(), eslice(endpoints=[ep("10.244.0.1"), ep("fd00::2")])],
        "EndpointSlice default/web-abc endpoints[1].addresses[0]: "
        "fd00::2 is not an IPv4 address (addressType IPv4); endpoint ignored",
        [fe("10.96.0.1", 80)],
        id="endpoint-address-wrong-family",
    ),
    pytest.param(
        [service(), eslice(endpoints=[ep("10.244.0.1"), ep("127.0.0.1")])],
        "EndpointSlice default/web-abc endpoints[1].addresses[0]: "
        "must not be a loopback address; endpoint ignored",
        [fe("10.96.0.1", 80)],
        id="endpoint-address-loopback",
    ),
    pytest.param(
        [service(), eslice(endpoints=[ep("10.244.0.1"), {"addresses": []}])],
        "EndpointSlice default/web-abc endpoints[1].addresses: missing or empty; endpoint ignored",
        [fe("10.96.0.1", 80)],
        id="endpoint-without-addresses",
    ),
    pytest.param(
        [service(), eslice(family="IPv5")],
        "EndpointSlice default/web-abc addressType: must be IPv4, IPv6 or FQDN, got 'IPv5'; slice ignored",
        [fe("10.96.0.1", 80)],
        id="bad-addressType",
    ),
    pytest.param(
        [service(), eslice(ports=[{"name": "http", "port": 99999}])],
        "EndpointSlice default/web-abc ports[0].port: must be in 1..65535, got 99999",
        [fe("10.96.0.1", 80)],
        id="bad-slice-port",
    ),
    pytest.param(
        [
            service(),
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {"name": "orphan"},
                "addressType": "IPv4",
                "endpoints": [],
            },
        ],
        'EndpointSlice default/orphan metadata.labels["kubernetes.io/service-name"]: '
        "missing: the slice belongs to no service; slice ignored",
        [fe("10.96.0.1", 80)],
        id="slice-without-service-label",
    ),
    pytest.param(
        [
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": "n1"},
                "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.300"}]},
            }
        ],
        "Node n1 status.addresses[0].address: is not a valid IP address: '192.168.1.300'",
        [],
        id="bad-node-address",
    ),
    pytest.param(
        [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "p", "annotations": {"zeroproxy.io/x": True}},
            }
        ],
        'Pod default/p metadata.annotations["zeroproxy.io/x"]: must be a string, got true',
        [],
        id="non-string-annotation",
    ),
]


@pytest.mark.parametrize(("objects", "line", "remaining"), ERROR_CASES)
def test_bad_input_gives_one_line_naming_object_and_field(
    objects: list, line: str, remaining: list[Frontend]
):
    t = translate(objects)
    # The first error is the precise one; a summary line ("... ignored because of the errors above")
    # may follow it, and it must name the same object.
    assert errors(t)[0] == line
    first = t.problems[0]
    assert all(e.ref == first.ref for e in t.problems)
    assert "\n" not in line
    assert sorted(t.table, key=str) == sorted(remaining, key=str)


def test_error_fields_are_separately_available():
    t = translate([service(ports=[{"name": "a", "port": 80}, {"name": "b", "port": -1}])])
    (err,) = t.problems[:1]
    assert isinstance(err, ObjectError)
    assert (err.kind, err.namespace, err.name, err.field) == (
        "Service",
        "default",
        "web",
        "spec.ports[1].port",
    )
    assert err.severity is Severity.ERROR


def test_a_bad_service_does_not_disturb_the_others():
    good = load_sample()
    bad = service("broken", ns="shop", clusterIP="not-an-ip")
    t = translate([*good, bad, eslice("broken-1", svc="broken", ns="shop")])
    assert t.table == translate(good).table
    assert errors(t) == [
        "Service shop/broken spec.clusterIP: is not a valid IP address: 'not-an-ip'; service ignored"
    ]


def test_endpointslice_for_unknown_service_is_a_warning_naming_slice_and_label():
    t = translate([service(), eslice("ghost-1", svc="ghost")])
    assert errors(t, Severity.WARNING) == [
        'EndpointSlice default/ghost-1 metadata.labels["kubernetes.io/service-name"]: '
        "Service default/ghost not found; slice ignored"
    ]
    assert t.table[fe("10.96.0.1", 80)].backends == ()


def test_duplicate_objects_last_wins_with_a_warning():
    first = service(clusterIP="10.96.0.1")
    second = service(clusterIP="10.96.0.2")
    t = translate([first, second])
    assert set(t.table) == {fe("10.96.0.2", 80)}
    assert errors(t, Severity.WARNING) == [
        "Service default/web: defined more than once (first at #0); the last one is used"
    ]
    assert errors(t) == []


def test_two_services_on_one_frontend_first_by_name_keeps_it():
    t = translate(
        [
            service("b", externalIPs=["198.51.100.1"], clusterIP="10.96.0.2"),
            service("a", externalIPs=["198.51.100.1"], clusterIP="10.96.0.1"),
        ]
    )
    assert t.table[fe("198.51.100.1", 80, TCP, EIP)].service == ServicePortName("default", "a", "http")
    assert fe("10.96.0.2", 80) in t.table
    assert errors(t) == [
        "Service default/b spec.externalIPs[0]: frontend 198.51.100.1:80/TCP (ExternalIP) is already used by "
        "Service default/a:http; frontend ignored"
    ]


def test_an_external_ip_never_takes_an_allocated_address_and_the_older_service_wins():
    hijack = service("a", externalIPs=["10.96.0.9"], clusterIP="10.96.0.1")
    owner = service("z", clusterIP="10.96.0.9")
    t = translate([hijack, owner])
    assert t.table[fe("10.96.0.9", 80)].service.name == "z"
    assert fe("10.96.0.9", 80, TCP, EIP) not in t.table
    assert errors(t) == [
        "Service default/a spec.externalIPs[0]: frontend 10.96.0.9:80/TCP (ExternalIP) is already used by "
        "Service default/z:http; frontend ignored"
    ]
    old, new = service("z", clusterIP="10.96.0.5"), service("a", clusterIP="10.96.0.5")
    old["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    new["metadata"]["creationTimestamp"] = "2026-03-01T00:00:00Z"
    assert translate([new, old]).table[fe("10.96.0.5", 80)].service.name == "z"  # first owner, not first name


def test_two_services_on_one_node_port():
    np_spec = {"type": "NodePort", "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}
    t = translate([service("a", **np_spec), service("b", clusterIP="10.96.0.2", **np_spec)])
    assert t.table[fe("0.0.0.0", 30080, TCP, NP)].service.name == "a"
    assert errors(t) == [
        "Service default/b spec.ports[0].nodePort: frontend 0.0.0.0:30080/TCP (NodePort) is already used by "
        "Service default/a:http; frontend ignored"
    ]


def test_node_port_range_is_a_parameter():
    svc = service(type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 8080}])
    t = clean(translate([svc], node_port_range=(8000, 9000)))
    assert fe("0.0.0.0", 8080, TCP, NP) in t.table


# --- robustness: never raise, whatever the shape ---------------------------------------------

WEIRD = [
    None,
    [],
    {},
    "",
    "x",
    -1,
    0,
    70000,
    True,
    1.5,
    "80",
    [1, 2],
    {"a": 1},
    "None",
    "::",
    "0.0.0.0",
    "198.51.100.99",
    "IPv6",
    "TCP",
    [None],
    [{}],
    [[]],
    {"ip": 3},
    float("nan"),
    2**70,
]


def mutate(rnd: random.Random, obj: Any, depth: int = 0) -> Any:
    """Replace, delete or duplicate one randomly chosen node somewhere inside obj."""
    if isinstance(obj, dict) and obj and (depth < 1 or rnd.random() < 0.7):
        key = rnd.choice(list(obj))
        action = rnd.random()
        if action < 0.15:
            del obj[key]
        elif action < 0.5 or not isinstance(obj[key], dict | list):
            obj[key] = copy.deepcopy(rnd.choice(WEIRD))
        else:
            mutate(rnd, obj[key], depth + 1)
        return obj
    if isinstance(obj, list) and obj:
        i = rnd.randrange(len(obj))
        action = rnd.random()
        if action < 0.2:
            obj.append(copy.deepcopy(obj[i]))
        elif action < 0.5 or not isinstance(obj[i], dict | list):
            obj[i] = copy.deepcopy(rnd.choice(WEIRD))
        else:
            mutate(rnd, obj[i], depth + 1)
        return obj
    return copy.deepcopy(rnd.choice(WEIRD))


def owner(obj: dict) -> tuple[str, str]:
    """The service whose frontends an object may change."""
    meta = obj["metadata"]
    if obj["kind"] == "Service":
        return meta["namespace"], meta["name"]
    if obj["kind"] == "EndpointSlice":
        return meta["namespace"], meta["labels"][SERVICE_NAME_LABEL]
    return "", ""


def name_of(obj: dict) -> str:
    """How error lines must start for this (well-identified) object."""
    meta = obj["metadata"]
    if obj["kind"] == "Node":
        return f"Node {meta['name']}"
    return f"{obj['kind']} {meta['namespace']}/{meta['name']}"


def test_fuzzed_objects_never_raise_and_only_hurt_their_own_service():
    sample = load_sample()
    base = translate(sample)
    rnd = random.Random(20260105)
    for _ in range(3000):
        objs = copy.deepcopy(sample)
        i = rnd.randrange(len(objs))
        victim = owner(objs[i])
        # Mutate below the identity fields, so that the object stays the one it was.
        part = rnd.choice([k for k in objs[i] if k not in ("kind", "apiVersion", "metadata")])
        objs[i][part] = mutate(rnd, objs[i][part])
        t = translate(objs)
        assert not [e for e in t.errors if "internal error" in e.message], [str(e) for e in t.errors]
        for err in t.errors:
            assert str(err).startswith(name_of(objs[i]))
        for frontend, entry in t.table.items():
            assert entry.frontend == frontend
            assert 1 <= frontend.port <= 65535
            assert list(entry.backends) == sorted(
                entry.backends, key=lambda b: (b.address.version, b.address, b.port)
            )
            if (entry.service.namespace, entry.service.name) != victim:
                assert base.table[frontend] == entry
        for frontend, entry in base.table.items():
            if (entry.service.namespace, entry.service.name) != victim:
                assert t.table[frontend] == entry


@pytest.mark.parametrize(
    "objects",
    [
        None,
        [],
        [None],
        [[]],
        [{"kind": None}],
        [{"kind": ["Service"]}],
        [{"kind": "Service", "metadata": {"name": ["x"]}}],
        [{"kind": "Service", "metadata": {"name": "x", "namespace": 5}}],
        [{"kind": "Service", "metadata": {"name": "x", "labels": [1]}, "spec": {"ports": "80"}}],
        [
            {
                "kind": "Service",
                "metadata": {"name": "x", "labels": {1: 2}},
                "spec": {"clusterIPs": "10.0.0.1"},
            }
        ],
        [{"kind": "List", "items": {"a": 1}}],
        [{"kind": "List", "items": [None, 3, {"kind": "List"}]}],
        [{"kind": "EndpointSlice", "metadata": {"name": "s", "labels": {SERVICE_NAME_LABEL: 7}}}],
        [
            service(),
            {
                "kind": "EndpointSlice",
                "metadata": {"name": "s", "labels": {SERVICE_NAME_LABEL: "web"}},
                "addressType": "IPv4",
                "endpoints": "x",
                "ports": [{"port": 1, "protocol": 6}],
            },
        ],
        [
            service(),
            eslice(
                endpoints=[
                    {"addresses": "10.0.0.1"},
                    {"addresses": [None]},
                    {"addresses": ["10.244.0.1"], "conditions": {"ready": "true"}},
                    {"addresses": ["10.244.0.2"], "conditions": [1], "nodeName": 3},
                ]
            ),
        ],
        [
            {
                "kind": "Node",
                "metadata": {"name": "n"},
                "spec": {"podCIDRs": "x", "podCIDR": 3},
                "status": {
                    "addresses": [None, {"type": "InternalIP"}, {"type": "ExternalIP", "address": "::1%lo"}]
                },
            }
        ],
        [{"kind": "Pod", "metadata": {"name": "p"}, "status": {"podIPs": [3, {"ip": None}], "podIP": []}}],
        [
            {
                "kind": "Service",
                "metadata": {"name": "x"},
                "spec": {"clusterIPs": [None], "sessionAffinityConfig": 1},
            }
        ],
        [
            {
                "kind": "Service",
                "metadata": {"name": "x"},
                "spec": {"type": None, "clusterIP": "::ffff:10.0.0.1"},
            }
        ],
    ],
)
def test_weird_shapes_are_reported_not_raised(objects: Any):
    t = translate(objects)
    assert not [e for e in t.errors if "internal error" in e.message]
    for err in t.errors:
        assert str(err) and "\n" not in str(err)
    if objects and objects not in ([None],):
        # Every one of these is wrong somewhere (or not ours); none can program a full service.
        assert t.errors or not t.table
    assert isinstance(t.table, dict)


def test_deeply_nested_lists_are_bounded():
    obj: dict[str, Any] = service()
    for _ in range(50):
        obj = {"kind": "List", "items": [obj]}
    t = translate([obj])
    assert t.table == {}
    assert errors(t) == [
        "List <unnamed at #0.items[0].items[0].items[0].items[0].items[0].items[0].items[0].items[0]> "
        "items: Lists nested deeper than 8 levels are ignored"
    ]


# --- topology-aware routing ------------------------------------------------------------------


def _zoned(address: str, *zones: str, **extra: Any) -> dict[str, Any]:
    out = ep(address)
    out["hints"] = {"forZones": [{"name": z} for z in zones], **extra}
    return out


def _zone_node(zone: str | None) -> dict[str, Any]:
    labels = {"topology.kubernetes.io/zone": zone} if zone is not None else {}
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "labels": labels}}


@pytest.mark.parametrize("ask", [
    {"metadata": {"annotations": {"service.kubernetes.io/topology-mode": "Auto"}}},
    {"metadata": {"annotations": {"service.kubernetes.io/topology-aware-hints": "auto"}}},
    {"spec": {"trafficDistribution": "PreferClose"}},
    {"spec": {"trafficDistribution": "PreferSameZone"}},
])
def test_topology_hints_for_this_nodes_zone(ask: dict[str, Any]) -> None:
    svc = service()
    svc["metadata"].update(ask.get("metadata", {}))
    svc["spec"].update(ask.get("spec", {}))
    slc = eslice(endpoints=[_zoned("10.244.0.1", "z1"), _zoned("10.244.0.2", "z2")])
    t = clean(translate([svc, slc, _zone_node("z1")], "node-a"))
    assert backends(t, fe("10.96.0.1", 80)) == ["10.244.0.1:8080"]
    # the zone can also be given (the change tracker knows the Node apart from the service)
    assert backends(translate([svc, slc], "node-a", node_zone="z2"), fe("10.96.0.1", 80)) == ["10.244.0.2:8080"]
    # fallbacks: the node has no zone label; no endpoint for its zone
    for node, zone in ((_zone_node(None), None), (_zone_node("z3"), None), (_zone_node("z1"), "")):
        t = translate([svc, slc, node], "node-a", node_zone=zone)
        assert backends(t, fe("10.96.0.1", 80)) == ["10.244.0.1:8080", "10.244.0.2:8080"]


def test_topology_is_used_only_when_asked_and_bad_values_say_so() -> None:
    slc = eslice(endpoints=[_zoned("10.244.0.1", "z1"), _zoned("10.244.0.2", "z2")])
    both = ["10.244.0.1:8080", "10.244.0.2:8080"]
    plain = service()
    assert backends(clean(translate([plain, slc, _zone_node("z1")], "node-a")), fe("10.96.0.1", 80)) == both
    off = service()
    off["metadata"]["annotations"] = {"service.kubernetes.io/topology-mode": "Disabled",
                                      "service.kubernetes.io/topology-aware-hints": "Auto"}
    assert backends(clean(translate([off, slc, _zone_node("z1")], "node-a")), fe("10.96.0.1", 80)) == both
    odd = service(trafficDistribution="Nearby")
    odd["metadata"]["annotations"] = {"service.kubernetes.io/topology-mode": "Sometimes"}
    t = translate([odd, slc, _zone_node("z1")], "node-a")
    assert backends(t, fe("10.96.0.1", 80)) == both
    assert errors(t, Severity.WARNING) == [
        "Service default/web spec.trafficDistribution: must be one of PreferClose, PreferSameZone, PreferSameNode, "
        "got 'Nearby'; all endpoints are used",
        "Service default/web metadata.annotations[service.kubernetes.io/topology-mode]: must be Auto or Disabled, "
        "got 'Sometimes'; all endpoints are used",
    ]


def test_prefer_same_node_uses_node_hints_then_zone_hints() -> None:
    svc = service(trafficDistribution="PreferSameNode")
    slc = eslice(endpoints=[_zoned("10.244.0.1", "z1", forNodes=[{"name": "node-b"}]),
                            _zoned("10.244.0.2", "z1", forNodes=[{"name": "node-a"}]),
                            _zoned("10.244.0.3", "z2", forNodes=[{"name": "node-c"}])])
    t = clean(translate([svc, slc, _zone_node("z1")], "node-a"))
    assert backends(t, fe("10.96.0.1", 80)) == ["10.244.0.2:8080"]
    t = clean(translate([svc, slc], "node-x", node_zone="z1"))  # no node hint for node-x: its zone's
    assert backends(t, fe("10.96.0.1", 80)) == ["10.244.0.1:8080", "10.244.0.2:8080"]


def test_malformed_hints_are_warnings_and_count_as_none() -> None:
    svc = service(trafficDistribution="PreferClose")
    bad = _zoned("10.244.0.2", "z2")
    bad["hints"]["forZones"].append({"zone": "z1"})
    slc = eslice(endpoints=[_zoned("10.244.0.1", "z1"), bad, {**ep("10.244.0.3"), "hints": "z1"}])
    t = translate([svc, slc, _zone_node("z1")], "node-a")
    assert backends(t, fe("10.96.0.1", 80)) == ["10.244.0.1:8080", "10.244.0.2:8080", "10.244.0.3:8080"]
    assert errors(t, Severity.WARNING) == [
        "EndpointSlice default/web-abc endpoints[1].hints.forZones[1]: needs a name; hints ignored",
        "EndpointSlice default/web-abc endpoints[2].hints: must be a mapping, got 'z1'; hints ignored",
    ]
    assert errors(t) == []


# --- loadBalancerSourceRanges ------------------------------------------------------------------


def _lb_service(**spec: Any) -> dict[str, Any]:
    ingress = [{"ip": "192.0.2.1"}, {"ip": "2001:db8::1"}]
    return service(type="LoadBalancer", status={"loadBalancer": {"ingress": ingress}},
                   clusterIPs=["10.96.0.1", "fd00:10:96::1"], ipFamilies=["IPv4", "IPv6"], **spec)


def test_source_ranges_apply_to_load_balancer_ips_only() -> None:
    t = translate([_lb_service(loadBalancerSourceRanges=[" 203.0.113.0/24 ", "2001:db8:1::/48", "203.0.113.7/24"]),
                   eslice()])
    nets = (ipaddress.ip_network("203.0.113.0/24"), ipaddress.ip_network("2001:db8:1::/48"))
    lb = [e for e in t.table.values() if e.frontend.kind is LB]
    assert len(lb) == 2 and all(e.source_ranges == nets for e in lb)
    assert all(e.source_ranges == () for e in t.table.values() if e.frontend.kind is not LB)
    assert errors(t, None) == []
    # no field, or not a LoadBalancer: nothing restricted
    assert all(not e.source_ranges for e in translate([_lb_service(), eslice()]).table.values())
    assert all(not e.source_ranges for e in clean(translate(
        [service(loadBalancerSourceRanges=["203.0.113.0/24"]), eslice()])).table.values())


def test_bad_source_ranges_are_errors_that_never_open_the_service() -> None:
    t = translate([_lb_service(loadBalancerSourceRanges=["203.0.113.0/24", "nonsense", 7]), eslice()])
    assert errors(t) == [
        "Service default/web spec.loadBalancerSourceRanges[1]: is not a CIDR (like 203.0.113.0/24): 'nonsense'; "
        "range ignored",
        "Service default/web spec.loadBalancerSourceRanges[2]: is not a CIDR (like 203.0.113.0/24): 7; range ignored",
    ]
    assert errors(t, Severity.WARNING) == [
        "Service default/web status.loadBalancer.ingress[1].ip: no IPv6 range in spec.loadBalancerSourceRanges: "
        "every IPv6 source is refused"]
    assert {e.source_ranges for e in t.table.values() if e.frontend.kind is LB} == {
        (ipaddress.ip_network("203.0.113.0/24"),)}
    t = translate([_lb_service(loadBalancerSourceRanges=["nonsense"]), eslice()])
    assert "Service default/web spec.loadBalancerSourceRanges: no valid range: the LoadBalancer IPs refuse every " \
           "source" in errors(t)
    closed = {e.source_ranges for e in t.table.values() if e.frontend.kind is LB}
    assert closed == {(ipaddress.ip_network("0.0.0.0/32"), ipaddress.ip_network("::/128"))}
