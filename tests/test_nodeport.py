"""NodePort, ExternalIP, LoadBalancer IP and externalTrafficPolicy, end to end in a two-node bed.

An external host on the underlay talks to node A; backends run in pods on A and on B. Each node
has its own "agent": the socket programs on its cgroup subtree, the TC programs on its eth0, its
own pin directory, and its service maps programmed from the same Kubernetes objects through
the real translation with its own node name, as the agent process will do it.
"""

from __future__ import annotations

import collections
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from controlplane.translate import translate
from dataplane import loader, maps, tc
from dataplane.conntrack import read_flows, read_reverse
from dataplane.inspect import service_list
from dataplane.loader import SockDatapath
from dataplane.services import ServiceMaps
from dataplane.table import ServicePortName
from testbed.bed import External, Node, Pod, TestBed, pin_root
from testbed.k8sobjects import endpoint_slice, node, service

WEB_PORT, DNS_PORT, ECHO_PORT, WEB6_PORT = 8080, 5353, 9000, 8086
NP_WEB, NP_DNS, NP_LOCAL, NP_ECHO, NP_SELF, NP_WEB6 = 30080, 30053, 30081, 30090, 30085, 30086
EXT_IP, LB_IP = "192.168.200.10", "192.168.200.20"
EXT_IP6, LB_IP6 = "fd00:200::10", "fd00:200::20"
SELF_VIP = "10.96.1.30"


@dataclass
class NodeAgent:
    """What the agent does for one node, run in the test process."""

    node: Node
    pin_dir: Path
    sock: SockDatapath
    tc: tc.NodeDatapath
    maps: ServiceMaps

    def apply(self, objects: list[dict[str, Any]]) -> None:
        table = translate(objects, self.node.name).table
        result = self.maps.sync(table.values())
        assert not result.conflicts, result.conflicts


class Cluster:
    def __init__(self, bed: TestBed) -> None:
        self.bed = bed
        self.a: Node = bed.add_node("a")
        self.b: Node = bed.add_node("b")
        self.a1: Pod = bed.add_pod(self.a, "a1")
        self.b1: Pod = bed.add_pod(self.b, "b1")
        self.echo: Pod = bed.add_pod(self.b, "echo")
        self.client: External = bed.add_external("client")
        for ip in (EXT_IP, LB_IP):  # the "load balancer" / upstream router sends these to node A
            self.client.add_route(f"{ip}/32", via=self.a.ip4)
        for ip in (EXT_IP6, LB_IP6):
            self.client.add_route(f"{ip}/128", via=self.a.ip6)
        for pod in (self.a1, self.b1):
            pod.serve(pod.name, tcp=[WEB_PORT], udp=[DNS_PORT], family="4")
            pod.serve(pod.name, tcp=[WEB6_PORT], family="6")
        self.echo.serve("echo", tcp=[ECHO_PORT], echo=True, family="4")
        self.agents: dict[str, NodeAgent] = {}

    def start_agent(self, n: Node) -> NodeAgent:
        pin_dir = pin_root(self.bed.id) / n.name
        sock = SockDatapath(n.cgroup_path, pin_dir)
        self.agents[n.name] = None  # type: ignore[assignment]  # cleanup knows the pin dir from here
        sock.load()
        sock.attach()
        datapath = tc.NodeDatapath(pin_dir, ["eth0"], netns=n.netns)
        datapath.load()
        datapath.attach()
        maps = ServiceMaps(sock)
        maps.set_node_port_addresses(tc.node_port_addresses([], tc.local_addresses(n.netns)))
        agent = NodeAgent(n, pin_dir, sock, datapath, maps)
        self.agents[n.name] = agent
        agent.apply(self.objects())
        return agent

    def objects(self) -> list[dict[str, Any]]:
        web_ports = [
            {"name": "http", "port": 80, "targetPort": WEB_PORT, "protocol": "TCP", "nodePort": NP_WEB},
            {"name": "dns", "port": 53, "targetPort": DNS_PORT, "protocol": "UDP", "nodePort": NP_DNS},
        ]
        http = [{"name": "http", "port": WEB_PORT, "protocol": "TCP"}]
        dns = [{"name": "dns", "port": DNS_PORT, "protocol": "UDP"}]
        return [
            node("a", [self.a.ip4]),
            node("b", [self.b.ip4]),
            {**service("web", ["10.96.1.10"], web_ports, type="LoadBalancer", externalIPs=[EXT_IP]),
             "status": {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}},
            endpoint_slice("web", [self.a1.ip4], http + dns, name="web-a", node_name="a"),
            endpoint_slice("web", [self.b1.ip4], http + dns, name="web-b", node_name="b"),
            service("local", ["10.96.1.20"], [{"name": "http", "port": 80, "targetPort": WEB_PORT,
                                               "protocol": "TCP", "nodePort": NP_LOCAL}],
                    type="NodePort", externalTrafficPolicy="Local"),
            endpoint_slice("local", [self.b1.ip4], http, node_name="b"),
            service("echo", ["10.96.1.40"], [{"name": "echo", "port": 80, "targetPort": ECHO_PORT,
                                              "protocol": "TCP", "nodePort": NP_ECHO}], type="NodePort"),
            endpoint_slice("echo", [self.echo.ip4], [{"name": "echo", "port": ECHO_PORT, "protocol": "TCP"}],
                           node_name="b"),
            service("self", [SELF_VIP], [{"name": "http", "port": 80, "targetPort": WEB_PORT,
                                          "protocol": "TCP", "nodePort": NP_SELF}], type="NodePort"),
            endpoint_slice("self", [self.a1.ip4], http, node_name="a"),
            {**service("web6", ["fd00:10:96::1:60"], [{"name": "http", "port": 80, "targetPort": WEB6_PORT,
                                                      "protocol": "TCP", "nodePort": NP_WEB6}],
                       type="LoadBalancer", ipFamilies=["IPv6"], externalIPs=[EXT_IP6]),
             "status": {"loadBalancer": {"ingress": [{"ip": LB_IP6}]}}},
            *[endpoint_slice("web6", [p.ip6], [{"name": "http", "port": WEB6_PORT, "protocol": "TCP"}],
                             name=f"web6-{p.node.name}", address_type="IPv6", node_name=p.node.name)
              for p in (self.a1, self.b1)],
        ]

    def close(self) -> None:
        for name, agent in self.agents.items():
            n = self.bed.nodes[name]
            if agent is not None:
                agent.tc.detach()
                agent.tc.close()
                agent.sock.close()
            loader.cleanup(n.cgroup_path, pin_root(self.bed.id) / name)
        loader.cleanup(None, pin_root(self.bed.id))


@pytest.fixture(scope="module")
def cluster(stale_beds_removed: list[str]) -> Iterator[Cluster]:
    bed = TestBed(prefix="zp")
    c = None
    try:
        c = Cluster(bed)
        c.start_agent(c.a)
        c.start_agent(c.b)
        yield c
    finally:
        if c is not None:
            c.close()
        bed.close()


def _served(results: list[dict[str, Any]]) -> collections.Counter[str]:
    return collections.Counter(r["server_name"] for r in results)


def _failures(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in results if not r["ok"]]


def test_nodeport_tcp_local_and_remote_backends(cluster: Cluster) -> None:
    """300 connections to node A's NodePort reach both backends; A's backend sees the client,
    B's backend sees node A (SNAT); the conntrack reader shows the SNATed flows."""
    c = cluster
    before = c.agents["a"].tc.stats()
    results = c.client.client(f"{c.a.ip4}:{NP_WEB}", count=300, concurrency=10)
    assert _failures(results) == []
    after = c.agents["a"].tc.stats()
    assert after[maps.Reason.NEW_FLOW] - before[maps.Reason.NEW_FLOW] == 300  # each one went through TC
    served = _served(results)
    assert set(served) == {"a1", "b1"} and min(served.values()) >= 60, served
    peers = {(r["server_name"], r["peer_seen_by_server"][0]) for r in results}
    assert peers == {("a1", c.client.ip4), ("b1", c.a.ip4)}
    # the servers answered on their own address: the translation happened on the way in
    assert {tuple(r["server_local"]) for r in results} == {(c.a1.ip4, WEB_PORT), (c.b1.ip4, WEB_PORT)}

    flows = [f for f in read_flows(c.agents["a"].pin_dir) if f.frontend == f"{c.a.ip4}:{NP_WEB}"]
    assert {f.backend for f in flows} == {f"{c.a1.ip4}:{WEB_PORT}", f"{c.b1.ip4}:{WEB_PORT}"}
    assert all(f.client.startswith(c.client.ip4 + ":") for f in flows)
    assert {f.snat is not None for f in flows if f.backend.startswith(c.b1.ip4 + ":")} == {True}
    assert {f.snat for f in flows if f.backend.startswith(c.a1.ip4 + ":")} == {None}
    assert {f.state for f in flows} <= {"CLOSING", "ESTABLISHED"}
    snat = [e for e in read_reverse(c.agents["a"].pin_dir) if e.snat]
    assert snat and all(e.reply_to.startswith(c.a.ip4 + ":") for e in snat)


def test_nodeport_udp(cluster: Cluster) -> None:
    """UDP NodePort; a connected client only accepts replies from node A's NodePort, so every
    success proves the reverse translation."""
    c = cluster
    results = c.client.client(f"{c.a.ip4}:{NP_DNS}", proto="udp-connected", count=100, concurrency=4)
    assert _failures(results) == []
    served = _served(results)
    assert set(served) == {"a1", "b1"}, served
    peers = {(r["server_name"], r["peer_seen_by_server"][0]) for r in results}
    assert peers == {("a1", c.client.ip4), ("b1", c.a.ip4)}
    unconnected = c.client.client(f"{c.a.ip4}:{NP_DNS}", proto="udp-unconnected", count=20)
    assert _failures(unconnected) == []
    assert {tuple(r["reply_source"]) for r in unconnected} == {(c.a.ip4, NP_DNS)}


@pytest.mark.parametrize("address", [EXT_IP, LB_IP], ids=["external-ip", "lb-ip"])
def test_external_and_load_balancer_ips(cluster: Cluster, address: str) -> None:
    """ExternalIPs and LB ingress IPs behave like a NodePort, on the service port."""
    c = cluster
    results = c.client.client(f"{address}:80", count=60, concurrency=4)
    assert _failures(results) == []
    assert set(_served(results)) == {"a1", "b1"}
    peers = {(r["server_name"], r["peer_seen_by_server"][0]) for r in results}
    assert peers == {("a1", c.client.ip4), ("b1", c.a.ip4)}
    udp = c.client.client(f"{address}:53", proto="udp-connected", count=20)
    assert _failures(udp) == []


def test_external_traffic_policy_local(cluster: Cluster) -> None:
    """eTP=Local: node B (local endpoint) serves with the client's IP preserved; node A (none)
    refuses external clients but not its own processes and pods; the dataplane tells which node
    has local endpoints (for healthCheckNodePort)."""
    c = cluster
    on_b = c.client.client(f"{c.b.ip4}:{NP_LOCAL}", count=30, concurrency=3)
    assert _failures(on_b) == []
    assert {(r["server_name"], r["peer_seen_by_server"][0]) for r in on_b} == {("b1", c.client.ip4)}
    on_a = c.client.client(f"{c.a.ip4}:{NP_LOCAL}", count=10)
    assert {r["error"] for r in on_a} == {"ECONNREFUSED"}
    # ... but the node's own processes and its pods are in-cluster clients: as with kube-proxy they
    # reach the service through node A's address anyway (the internal policy's endpoints)
    for who in (c.a, c.a1):
        inside = who.client(f"{c.a.ip4}:{NP_LOCAL}", count=10)
        assert _failures(inside) == [] and set(_served(inside)) == {"b1"}, who.name
    views = {(s.frontend, s.view): s.backends for s in service_list(c.agents["a"].pin_dir)}
    assert views[(f"{c.a.ip4}:{NP_LOCAL}/TCP", "internal")] == [f"{c.b1.ip4}:{WEB_PORT}"]
    assert views[(f"{c.a.ip4}:{NP_LOCAL}/TCP", "external")] == []
    name = ServicePortName("default", "local", "http")
    assert c.agents["a"].maps.has_local_endpoints(name) is False
    assert c.agents["b"].maps.has_local_endpoints(name) is True
    assert c.agents["a"].maps.has_local_endpoints(ServicePortName("default", "web", "http")) is None


@pytest.mark.parametrize("target", ["loopback", "node-ip"])
def test_nodeport_from_the_node_itself(cluster: Cluster, target: str) -> None:
    """127.0.0.1:<nodePort> and <nodeIP>:<nodePort> from a process on the node (socket hooks)."""
    c = cluster
    addr = "127.0.0.1" if target == "loopback" else c.a.ip4
    results = c.a.client(f"{addr}:{NP_WEB}", count=40, concurrency=2)
    assert _failures(results) == []
    assert set(_served(results)) == {"a1", "b1"}
    udp = c.a.client(f"{addr}:{NP_DNS}", proto="udp-connected", count=20)
    assert _failures(udp) == []


def test_ipv6_node_port_from_outside_local_and_remote(cluster: Cluster) -> None:
    """[nodeIPv6]:<nodePort> from an outside host, on the TC path: the local backend sees the
    client's own address, the remote one node A's (SNAT to its IPv6), both answer; either node."""
    c = cluster
    for n in (c.a, c.b):
        results = c.client.client(f"[{n.ip6}]:{NP_WEB6}", count=200, concurrency=4)
        assert _failures(results) == [], (n.name, _failures(results)[:3])
        seen: dict[str, set[str]] = collections.defaultdict(set)
        for r in results:
            seen[r["server_name"]].add(r["peer_seen_by_server"][0])
        local, remote = (c.a1, c.b1) if n is c.a else (c.b1, c.a1)
        assert seen == {local.name: {c.client.ip6}, remote.name: {n.ip6}}, (n.name, dict(seen))
    for ip in (EXT_IP6, LB_IP6):  # routed to node A by the client's "router"
        results = c.client.client(f"[{ip}]:80", count=100, concurrency=4)
        assert _failures(results) == [] and set(_served(results)) == {"a1", "b1"}, ip


def test_ipv6_node_port_from_the_node_and_its_pods(cluster: Cluster) -> None:
    """[nodeIPv6]:<nodePort> from node A and from a pod on it reaches both IPv6 backends through the
    socket hooks."""
    c = cluster
    for who in (c.a, c.a1):
        results = who.client(f"[{c.a.ip6}]:{NP_WEB6}", count=40, concurrency=2)
        assert _failures(results) == [], who.name
        assert set(_served(results)) == {"a1", "b1"}, who.name


@pytest.mark.parametrize("target", ["cluster-ip", "node-port"])
def test_hairpin(cluster: Cluster, target: str) -> None:
    """A pod reaching its own Service lands on itself and gets its reply."""
    c = cluster
    addr, port = (SELF_VIP, 80) if target == "cluster-ip" else (c.a.ip4, NP_SELF)
    results = c.a1.client(f"{addr}:{port}", count=20)
    assert _failures(results) == []
    assert set(_served(results)) == {"a1"}
    assert {tuple(r["getpeername"]) for r in results} == {(addr, port)}


def test_thousand_concurrent_echo_connections_remote_backend(cluster: Cluster) -> None:
    """1000 concurrent TCP connections through node A to a backend on B, 64 KiB echoed on each."""
    c = cluster
    before = c.agents["a"].tc.stats()
    results = c.client.client(f"{c.a.ip4}:{NP_ECHO}", count=1000, concurrency=1000, echo_bytes=65536,
                              timeout=60.0)
    assert len(results) == 1000
    assert _failures(results) == []
    after = c.agents["a"].tc.stats()
    moved = {s: after[s] - before[s] for s in maps.NP_REASONS if after[s] != before[s]}
    assert moved[maps.Reason.NEW_FLOW] == 1000 and maps.Reason.SNAT_EXHAUSTED not in moved, moved
    ports = {f.snat for f in read_flows(c.agents["a"].pin_dir) if f.backend == f"{c.echo.ip4}:{ECHO_PORT}"}
    assert len(ports) >= 1000  # every flow got its own SNAT port


# A client that keeps one connection open and echoes 100 bytes each time it reads a line.
_STEP_CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
def echo():
    data = b"x" * 100
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionResetError("closed")
        got += chunk
    return got == data
for _ in sys.stdin:
    try:
        print("ok" if echo() else "bad", flush=True)
    except OSError as e:
        print("error " + type(e).__name__, flush=True)
"""


def test_flow_keeps_backend_and_is_not_moved_when_it_goes(cluster: Cluster) -> None:
    """One long TCP connection through node A: it survives a backend being added (it stays on
    its own backend), and when its backend is deleted its packets are dropped rather than sent
    to the other backend mid-stream."""
    c = cluster
    # backends of this service only (a backend address:port shared with another service stays,
    # and so would the flow: it would not be sent elsewhere either)
    first = c.bed.add_pod(c.b, "sticky1")
    echo2 = c.bed.add_pod(c.a, "sticky2")
    for pod in (first, echo2):
        pod.serve(pod.name, tcp=[ECHO_PORT], echo=True, family="4")
    port = [{"name": "echo", "port": 80, "targetPort": ECHO_PORT, "protocol": "TCP", "nodePort": 30095}]
    ep_port = [{"name": "echo", "port": ECHO_PORT, "protocol": "TCP"}]

    def apply(pods: list[Pod]) -> None:
        objs = [service("sticky", ["10.96.1.50"], port, type="NodePort"),
                *(endpoint_slice("sticky", [p.ip4], ep_port, name=f"sticky-{p.name}", node_name=p.node.name)
                  for p in pods)]
        for agent in c.agents.values():
            agent.apply(c.objects() + objs)

    apply([first])
    proc = c.client.run([sys.executable, "-c", _STEP_CLIENT, c.a.ip4, "30095"], stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None

    def step() -> str:
        proc.stdin.write("go\n")
        proc.stdin.flush()
        return proc.stdout.readline().strip()

    try:
        assert step() == "ok"
        apply([first, echo2])  # another backend appears: the flow stays where it is
        assert [step() for _ in range(5)] == ["ok"] * 5
        before = c.agents["a"].tc.stats()
        apply([echo2])  # the flow's backend is deleted
        assert step().startswith("error")
        moved = c.agents["a"].tc.stats()[maps.Reason.BACKEND_GONE] - before[maps.Reason.BACKEND_GONE]
        assert moved == 1
        # new connections go to the backend that is left
        assert _failures(c.client.client(f"{c.a.ip4}:30095", count=5, echo_bytes=1000)) == []
    finally:
        proc.kill()
        proc.communicate()
        for agent in c.agents.values():
            agent.apply(c.objects())


def test_restarted_agent_adopts_flows_and_replaces_filters(cluster: Cluster) -> None:
    """A new agent compiles again, adopts the pinned conntrack and replaces the filters in place:
    flows survive, exactly one program per hook stays, and traffic keeps working."""
    c = cluster
    old = c.agents["a"]
    # expired entries are listed too (only a packet or the LRU removes them), so nothing can
    # disappear between the two reads except by the restart itself
    flows_before = {(f.client, f.frontend, f.backend, f.snat) for f in read_flows(old.pin_dir)}
    assert flows_before
    new = tc.NodeDatapath(old.pin_dir, ["eth0"], netns=c.a.netns)
    new.load()
    new.attach()
    old.tc.close()
    old.tc = new
    flows_after = {(f.client, f.frontend, f.backend, f.snat) for f in read_flows(old.pin_dir)}
    assert flows_before == flows_after
    assert tc.attached(["eth0"], c.a.netns) == {"eth0": ["ingress:zp_np4_ingress", "egress:zp_np4_egress"]}
    results = c.client.client(f"{c.a.ip4}:{NP_WEB}", count=40, concurrency=4)
    assert _failures(results) == []
    assert set(_served(results)) == {"a1", "b1"}


def _run(host: Node | External, argv: list[str]) -> str:
    return host.check_output(argv, in_cgroup=False)


def test_no_netfilter_rules_and_clean_detach(cluster: Cluster) -> None:
    """Nothing went through netfilter; detaching leaves no program on the devices."""
    c = cluster
    for n in (c.a, c.b):
        assert _run(n, ["nft", "list", "ruleset"]).strip() == ""
        assert [line for line in _run(n, ["iptables-save"]).splitlines() if line.startswith("-A")] == []
    host = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout
    assert str(NP_WEB) not in host and c.a.ip4 not in host
    for n in (c.a, c.b):
        assert tc.attached(["eth0"], n.netns) == {"eth0": ["ingress:zp_np4_ingress", "egress:zp_np4_egress"]}
    agent = c.agents["b"]
    agent.tc.detach()
    assert tc.attached(["eth0"], c.b.netns) == {"eth0": []}
