"""NodePort through real agent processes: one `zeroproxy agent --devices eth0` per node, each in
its node's netns with its own cgroup subtree and pin directory, all fed the same YAML. The TC
datapath itself is covered in depth by test_nodeport.py and test_tc_unit.py; this proves the
agent wires it up (programs on the devices, node addresses from the Node objects and the netns,
conntrack settings) and removes it again."""

from __future__ import annotations

import collections
import ctypes
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dataplane import conntrack, inspect, tc
from dataplane.netns import in_netns
from testbed import nettools
from testbed.bed import TestBed
from testbed.k8sobjects import endpoint_slice, node, service
from testbed.sandbox import AgentProcess

WEB_PORT, NODE_PORT = 8080, 30080
SNAT_PORTS = "40000-40999"  # the agents' --snat-port-range, narrower than the default to see it used


class TwoNodes:
    def __init__(self, bed: TestBed, tmp: Path) -> None:
        self.bed = bed
        self.a, self.b = bed.add_node("a"), bed.add_node("b")
        self.a1, self.b1 = bed.add_pod(self.a, "a1"), bed.add_pod(self.b, "b1")
        self.client = bed.add_external("client")
        for pod in (self.a1, self.b1):
            pod.serve(pod.name, tcp=[WEB_PORT], family="4")
        self.agents = {
            n.name: AgentProcess(tmp / n.name, n.cgroup_path, node_name=n.name, name=f"np-{n.name}",
                                 netns=n.netns, devices=["eth0"], extra_args=["--snat-port-range", SNAT_PORTS])
            for n in (self.a, self.b)
        }

    def objects(self, backends: list[Any] | None = None) -> list[dict[str, Any]]:
        backends = [self.a1, self.b1] if backends is None else backends
        http = [{"name": "http", "port": WEB_PORT, "protocol": "TCP"}]
        return [
            node("a", [self.a.ip4]),
            node("b", [self.b.ip4]),
            service("web", ["10.96.2.10"], [{"name": "http", "port": 80, "targetPort": WEB_PORT, "protocol": "TCP",
                                             "nodePort": NODE_PORT}], type="NodePort"),
            *[endpoint_slice("web", [p.ip4], http, name=f"web-{p.name}", node_name=p.node.name) for p in backends],
        ]

    def start(self) -> None:
        for agent in self.agents.values():
            agent.write(self.objects())
            agent.start()

    def close(self) -> None:
        for agent in self.agents.values():
            agent.close()


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory, stale_beds_removed: list[str]) -> Iterator[TwoNodes]:
    bed = TestBed(prefix="zp")
    try:
        c = TwoNodes(bed, tmp_path_factory.mktemp("np-agent"))
        try:
            c.start()
            yield c
        finally:
            c.close()
    finally:
        bed.close()


def served_by(records: list[dict[str, Any]]) -> dict[str, set[str]]:
    """backend name -> the client addresses it saw"""
    out: dict[str, set[str]] = collections.defaultdict(set)
    for r in records:
        assert r["ok"], r
        out[r["server_name"]].add(r["peer_seen_by_server"][0])
    return out


def test_external_client_reaches_local_and_remote_backends(nodes: TwoNodes) -> None:
    for agent in nodes.agents.values():
        log = agent.log_text()
        assert "NodePort/ExternalIP/LoadBalancer programs on eth0" in log, log[-2000:]
    assert set(tc.attached(["eth0"], nodes.a.netns)["eth0"]) == {"ingress:zp_np4_ingress", "egress:zp_np4_egress"}
    # the agent wrote the NodePort frontend for node A's own addresses (from its netns), not the host's
    programmed = {s.frontend for s in inspect.service_list(nodes.agents["a"].pin_dir)}
    assert f"{nodes.a.ip4}:{NODE_PORT}/TCP" in programmed and f"127.0.0.1:{NODE_PORT}/TCP" in programmed

    records = nodes.client.client(nettools.format_target(nodes.a.ip4, NODE_PORT), count=300, concurrency=4)
    seen = served_by(records)
    assert set(seen) == {"a1", "b1"}
    assert seen["a1"] == {nodes.client.ip4}  # local backend: the client's own address
    assert seen["b1"] == {nodes.a.ip4}  # remote backend: SNAT to node A
    # ... from the configured SNAT port range
    snat_ports = {int(f.snat.rsplit(":", 1)[1]) for f in conntrack.read_flows(nodes.agents["a"].pin_dir) if f.snat}
    lo, hi = map(int, SNAT_PORTS.split("-"))
    assert snat_ports and all(lo <= p <= hi for p in snat_ports), sorted(snat_ports)


def test_node_itself_reaches_the_node_port_through_the_socket_hooks(nodes: TwoNodes) -> None:
    for target in ("127.0.0.1", nodes.a.ip4):
        argv = nettools.client_argv(nettools.format_target(target, NODE_PORT), count=40)
        out = nodes.a.check_output(argv, timeout=60)  # a process in node A's host cgroup
        assert set(served_by(nettools.parse_results(out))) == {"a1", "b1"}


def test_endpoint_changes_reach_the_tc_path(nodes: TwoNodes) -> None:
    try:
        for agent in nodes.agents.values():
            agent.write(nodes.objects(backends=[nodes.b1]))
        want = [f"{nodes.b1.ip4}:{WEB_PORT}"]
        for name, agent in nodes.agents.items():  # wait until each node's maps hold only b1
            frontend = f"{nodes.bed.nodes[name].ip4}:{NODE_PORT}/TCP"
            deadline = time.monotonic() + 30
            while {s.frontend: s.backends for s in inspect.service_list(agent.pin_dir)}.get(frontend) != want:
                assert time.monotonic() < deadline, agent.log_text()[-2000:]
                time.sleep(0.05)
        records = nodes.client.client(nettools.format_target(nodes.a.ip4, NODE_PORT), count=50)
        assert set(served_by(records)) == {"b1"}
    finally:
        for agent in nodes.agents.values():
            agent.write(nodes.objects())


def test_load_balancer_source_ranges_from_outside(nodes: TwoNodes) -> None:
    """An outside host reaches a LoadBalancer IP only while its address is in the Service's
    loadBalancerSourceRanges; a refused SYN is dropped and counted (src_range) on the TC path."""
    lb_ip = "192.0.2.80"
    nodes.bed.iproute(nodes.client.netns).route("add", dst=f"{lb_ip}/32", gateway=nodes.a.ip4)
    agent = nodes.agents["a"]
    target = nettools.format_target(lb_ip, 80)

    def program(ranges: list[str]) -> None:
        svc = service("lb", ["10.96.2.20"], [{"name": "http", "port": 80, "targetPort": WEB_PORT, "protocol": "TCP"}],
                      type="LoadBalancer", loadBalancerSourceRanges=ranges)
        svc["status"] = {"loadBalancer": {"ingress": [{"ip": lb_ip}]}}
        http = [{"name": "http", "port": WEB_PORT, "protocol": "TCP"}]
        for a in nodes.agents.values():
            a.write([*nodes.objects(), svc, endpoint_slice("lb", [nodes.a1.ip4], http, node_name="a")])
        want = sorted(ranges)
        deadline = time.monotonic() + 30
        while {s.frontend: s.source_ranges for s in inspect.service_list(agent.pin_dir)}.get(f"{target}/TCP") != want:
            assert time.monotonic() < deadline, agent.log_text()[-2000:]
            time.sleep(0.05)

    try:
        program([f"{nodes.client.ip4}/32", "203.0.113.0/24"])
        assert set(served_by(nodes.client.client(target, count=20))) == {"a1"}
        program(["203.0.113.0/24"])
        before = inspect.np_stats(agent.pin_dir)["src_range"]
        records = nodes.client.client(target, count=3, timeout=1)
        assert [r["error"] for r in records] == ["ETIMEDOUT"] * 3, records
        assert inspect.np_stats(agent.pin_dir)["src_range"] - before >= 3
        with in_netns(nodes.a.netns), urllib.request.urlopen(agent.metrics_url, timeout=10) as r:
            metrics = r.read().decode()  # the agent listens on the node's loopback
        drops = [float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith('zeroproxy_datapath_drops_total{reason="src_range"}')]
        assert drops and drops[0] >= 3, metrics[-3000:]
    finally:
        for a in nodes.agents.values():
            a.write(nodes.objects())


def test_lb_algorithm_maglev_wires_the_tables_into_the_tc_path(nodes: TwoNodes) -> None:
    """--lb-algorithm maglev: the agent writes one Maglev table per external service port and
    view into the pinned outer map, flags the frontends, and traffic from outside flows through
    them (the per-flow agreement between nodes is measured in tests/test_maglev.py)."""
    from dataplane import bpfsys, maps

    agent = nodes.agents["a"]
    agent.kill()
    agent.extra_args += ["--lb-algorithm", "maglev"]
    try:
        agent.start()
        frontend = f"{nodes.a.ip4}:{NODE_PORT}/TCP"
        flags = {s.frontend: s.flags for s in inspect.service_list(agent.pin_dir)}
        assert flags[frontend] & maps.SvcFlag.MAGLEV, flags
        with bpfsys.PinnedMap(agent.pin_dir / maps.MAP_PINS["zp_maglev"], maps.MaglevKey, ctypes.c_uint32) as outer:
            tables = outer.keys()
        assert len(tables) == 1 and tables[0].scope == maps.SCOPE_INTERNAL, tables  # web's one port
        records = nodes.client.client(nettools.format_target(nodes.a.ip4, NODE_PORT), count=100, concurrency=4)
        assert set(served_by(records)) == {"a1", "b1"}  # 100 flows (other ports) over both backends
    finally:
        agent.kill()
        agent.extra_args = agent.extra_args[:-2]
        agent.start()
    flags = {s.frontend: s.flags for s in inspect.service_list(agent.pin_dir)}
    assert not flags[f"{nodes.a.ip4}:{NODE_PORT}/TCP"] & maps.SvcFlag.MAGLEV  # back to random


def test_cleanup_command_removes_programs_from_devices(nodes: TwoNodes, tmp_path: Path) -> None:
    agent = nodes.agents["b"]
    agent.kill()
    argv = [sys.executable, "-m", "zeroproxy", "cleanup", "--devices", "eth0", "--cgroup", str(agent.cgroup),
            "--bpffs", str(agent.pin_dir)]
    nodes.b.check_output(argv, in_cgroup=False, timeout=60)
    assert not any(tc.attached(["eth0"], nodes.b.netns).values())
    assert not agent.pin_dir.exists()
    for netns in (nodes.a.netns, nodes.b.netns):
        rules = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "ruleset"], capture_output=True,
                               text=True, check=True).stdout
        assert rules.strip() == ""
