"""Socket-level ClusterIP, end to end: a real agent process, real eBPF in the kernel, real
traffic between network namespaces. One node, a client pod, three backend pods."""

from __future__ import annotations

import collections
import ctypes
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from controlplane.translate import translate
from dataplane import inspect, maps
from dataplane.loader import SOCK_HOOKS, attached
from dataplane.table import FrontendKind
from testbed import nettools
from testbed.bed import Node, Pod, TestBed
from testbed.k8sobjects import endpoint_slice, node, service
from testbed.sandbox import AgentProcess

VIP4 = "10.96.0.10"
VIP6 = "fd00:10:96::10"
DNS4 = "10.96.0.53"
EMPTY4 = "10.96.0.99"
EMPTY6 = "fd00:10:96::99"
TCP_PORT, UDP_PORT = 8080, 5353


class Cluster:
    def __init__(self, bed: TestBed, tmp: Path) -> None:
        self.bed = bed
        self.node: Node = bed.add_node("a")
        self.client: Pod = bed.add_pod(self.node, "client")
        self.backends: list[Pod] = [bed.add_pod(self.node, f"web-{i}") for i in range(1, 5)]
        for p in self.backends:
            p.serve(p.name, tcp=[TCP_PORT], udp=[UDP_PORT])
        self.agent = AgentProcess(tmp, self.node.cgroup_path, node_name="a")

    def objects(self, web: list[Pod] | None = None, web_port: int = 80, extra: list[dict] | None = None,
                dns: list[Pod] | None = None) -> list[dict[str, Any]]:
        web = self.backends[:3] if web is None else web
        dns = self.backends[:2] if dns is None else dns
        tcp = [{"name": "http", "port": TCP_PORT, "protocol": "TCP"}]
        udp = [{"name": "dns", "port": UDP_PORT, "protocol": "UDP"}]
        return [
            node("a", [self.node.ip4]),
            service("web", [VIP4, VIP6], [{"name": "http", "port": web_port, "protocol": "TCP",
                                            "targetPort": TCP_PORT}], ipFamilyPolicy="RequireDualStack"),
            endpoint_slice("web", [p.ip4 for p in web], tcp, node_name="a"),
            endpoint_slice("web", [p.ip6 for p in web], tcp, address_type="IPv6", node_name="a"),
            service("dns", [DNS4], [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": UDP_PORT}]),
            endpoint_slice("dns", [p.ip4 for p in dns], udp, node_name="a"),
            service("empty", [EMPTY4, EMPTY6], [{"name": "http", "port": 80, "protocol": "TCP"}]),
            *(extra or []),
        ]

    def apply(self, objects: list[dict[str, Any]], timeout: float = 15.0) -> None:
        """Write the YAML and wait until the kernel maps hold exactly its translation."""
        self.agent.write(objects)
        want = expected_programmed(objects)
        deadline = time.monotonic() + timeout
        have: Any = None
        while time.monotonic() < deadline:
            have = {s.frontend: sorted(s.backends) for s in inspect.service_list(self.agent.pin_dir)}
            if have == want:
                return
            time.sleep(0.05)
        raise AssertionError(f"maps never matched the file:\nwant {want}\nhave {have}\n"
                             f"{self.agent.log_text()[-2000:]}")


def expected_programmed(objects: list[dict[str, Any]]) -> dict[str, list[str]]:
    out = {}
    for fe, entry in translate(objects, "a").table.items():
        if fe.kind != FrontendKind.CLUSTER_IP:
            continue
        out[str(fe)] = sorted(str(b) for b in entry.backends)
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, stale_beds_removed: list[str]) -> Iterator[Cluster]:
    bed = TestBed(prefix="zp")
    try:
        c = Cluster(bed, tmp_path_factory.mktemp("clusterip"))
        try:
            c.agent.write(c.objects())
            c.agent.start()
            yield c
        finally:
            c.agent.close()
    finally:
        bed.close()


@pytest.fixture
def fresh(cluster: Cluster) -> Cluster:
    """The cluster with the default objects programmed (tests may change them)."""
    if cluster.agent.proc is None or cluster.agent.proc.poll() is not None:
        cluster.agent.start()
    cluster.apply(cluster.objects())
    return cluster


def names(records: list[dict[str, Any]]) -> collections.Counter[str]:
    return collections.Counter(r["server_name"] for r in records if r["ok"])


def assert_all_ok(records: list[dict[str, Any]]) -> None:
    bad = [r for r in records if not r["ok"]]
    assert not bad, f"{len(bad)} of {len(records)} attempts failed, first: {bad[:3]}"


# ---- translation at the socket ------------------------------------------------------------------

UDP_VIP4, UDP_VIP6 = "10.96.0.11", "fd00:10:96::11"
DNS6 = "fd00:10:96::53"
EMPTY_UDP4 = "10.96.0.98"


def table_objects(c: Cluster) -> list[dict[str, Any]]:
    """The default objects plus the Services only the socket table needs."""
    udp = [{"name": "dns", "port": UDP_PORT, "protocol": "UDP"}]
    dns = [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": UDP_PORT}]
    return c.objects(extra=[
        service("web-udp", [UDP_VIP4, UDP_VIP6], dns),
        endpoint_slice("web-udp", [p.ip4 for p in c.backends[:3]], udp),
        endpoint_slice("web-udp", [p.ip6 for p in c.backends[:3]], udp, address_type="IPv6"),
        service("dns6", [DNS6], dns),
        endpoint_slice("dns6", [p.ip6 for p in c.backends[:3]], udp, address_type="IPv6"),
        service("empty-udp", [EMPTY_UDP4], dns),
    ])


@dataclass(frozen=True)
class SockCase:
    """One call through the socket hooks from the client pod, and what it must give.

    ``address`` is the destination as the client writes it: a Service address (kind ClusterIP),
    or ``"pod"`` for the first backend's own address (no Service: nothing is translated).
    ``family`` 46 is an IPv4 Service reached from an AF_INET6 socket as ::ffff:a.b.c.d.
    ``peer`` is what getpeername() (recvfrom()'s source for unconnected UDP) must show, and
    ``servers`` who may answer; or ``errno`` the call fails with. ``counts`` is the zp_stats
    reasons that move by one per attempt, and nothing else moves.
    """

    id: str
    address: str
    family: int
    proto: str
    endpoints: str  # the Service's endpoints: "ready" or "none"
    port: int
    servers: frozenset[str] = frozenset()
    errno: str | None = None
    counts: tuple[maps.Reason, ...] = (maps.Reason.XLATE_OK, maps.Reason.RNAT_HIT)

    def host(self, c: Cluster) -> str:
        host = c.backends[0].ip4 if self.address == "pod" else self.address
        return f"::ffff:{host}" if self.family == 46 else host

    def target(self, c: Cluster) -> str:
        return nettools.format_target(self.host(c), self.port)

    def peer(self, c: Cluster) -> list[Any]:
        return [self.host(c), self.port]


WEB = frozenset({"web-1", "web-2", "web-3"})
REFUSED: dict[str, Any] = {"errno": "ECONNREFUSED", "counts": (maps.Reason.NO_BACKEND,)}
SOCK_CASES = [
    SockCase("tcp4", VIP4, 4, "tcp", "ready", 80, WEB),
    SockCase("tcp6", VIP6, 6, "tcp", "ready", 80, WEB),
    SockCase("tcp4-in-6", VIP4, 46, "tcp", "ready", 80, WEB),
    SockCase("udp4-connected", UDP_VIP4, 4, "udp-connected", "ready", 53, WEB),
    SockCase("udp6-connected", UDP_VIP6, 6, "udp-connected", "ready", 53, WEB),
    SockCase("udp4-unconnected", DNS4, 4, "udp-unconnected", "ready", 53, frozenset({"web-1", "web-2"})),
    SockCase("udp6-unconnected", DNS6, 6, "udp-unconnected", "ready", 53, WEB),
    SockCase("tcp4-no-endpoints", EMPTY4, 4, "tcp", "none", 80, **REFUSED),
    SockCase("tcp6-no-endpoints", EMPTY6, 6, "tcp", "none", 80, **REFUSED),
    SockCase("tcp4-in-6-no-endpoints", EMPTY4, 46, "tcp", "none", 80, **REFUSED),
    SockCase("udp4-connected-no-endpoints", EMPTY_UDP4, 4, "udp-connected", "none", 53, **REFUSED),
    SockCase("udp4-unconnected-no-endpoints", EMPTY_UDP4, 4, "udp-unconnected", "none", 53, **REFUSED),
    SockCase("tcp4-pod-address", "pod", 4, "tcp", "ready", TCP_PORT, frozenset({"web-1"}), counts=()),
]


@pytest.mark.parametrize("case", SOCK_CASES, ids=[c.id for c in SOCK_CASES])
def test_socket_hooks(fresh: Cluster, case: SockCase) -> None:
    fresh.apply(table_objects(fresh))
    count = 20
    before = inspect.stats(fresh.agent.pin_dir)
    records = fresh.client.client(case.target(fresh), proto=case.proto, count=count, timeout=5)
    after = inspect.stats(fresh.agent.pin_dir)
    if case.errno:
        assert [r["error"] for r in records] == [case.errno] * count, records[:3]
    else:
        assert_all_ok(records)
        seen = "reply_source" if case.proto == "udp-unconnected" else "getpeername"
        assert all(r[seen] == case.peer(fresh) for r in records), records[:3]
        assert set(names(records)) <= case.servers, names(records)
        # the backend saw the client pod's own address: no SNAT on the socket path
        client = fresh.client.ip6 if case.family == 6 else fresh.client.ip4
        assert all(r["peer_seen_by_server"][0] == client for r in records), records[:3]
    moved = {name: after[name] - before[name] for name in after if after[name] != before[name]}
    assert moved == {r.name.lower(): count for r in case.counts}


def test_spread_over_three_backends(fresh: Cluster) -> None:
    records = fresh.client.client(nettools.format_target(VIP4, 80), count=600, concurrency=4)
    assert_all_ok(records)
    spread = names(records)
    assert set(spread) == {"web-1", "web-2", "web-3"}
    for name, n in spread.items():
        assert n >= 0.20 * 600, f"{name} got only {n} of 600: {spread}"


# ---- following the file --------------------------------------------------------------------------

def test_yaml_edits_apply_to_new_connections(fresh: Cluster) -> None:
    web1, web2, web3, web4 = fresh.backends
    target = nettools.format_target(VIP4, 80)

    fresh.apply(fresh.objects(web=[web1, web2, web3, web4]))  # add a backend
    assert set(names(fresh.client.client(target, count=120, concurrency=4))) == {"web-1", "web-2", "web-3",
                                                                                 "web-4"}
    fresh.apply(fresh.objects(web=[web1, web4]))  # remove two
    got = names(fresh.client.client(target, count=100, concurrency=4))
    assert set(got) == {"web-1", "web-4"}, got

    fresh.apply(fresh.objects(web_port=8000))  # change the service port
    assert_all_ok(fresh.client.client(nettools.format_target(VIP4, 8000), count=10))
    old = fresh.client.client(target, count=3, timeout=1)
    assert not any(r["ok"] for r in old), "the old service port still reaches a backend"

    extra = [service("extra", ["10.96.0.77"], [{"name": "http", "port": 81, "protocol": "TCP"}]),
             endpoint_slice("extra", [web2.ip4], [{"name": "http", "port": TCP_PORT, "protocol": "TCP"}])]
    fresh.apply(fresh.objects(extra=extra))  # add a service
    assert names(fresh.client.client(nettools.format_target("10.96.0.77", 81), count=5)) == {"web-2": 5}
    fresh.apply(fresh.objects())  # remove it again
    gone = fresh.client.client(nettools.format_target("10.96.0.77", 81), count=3, timeout=1)
    assert not any(r["ok"] for r in gone)


def test_agent_sigkill_and_restart_loses_no_request(fresh: Cluster, tmp_path: Path) -> None:
    stop = tmp_path / "stop"
    argv = nettools.client_argv(nettools.format_target(VIP4, 80), count=0, interval=0.005, timeout=2,
                                until_file=str(stop))
    loop = fresh.client.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        fresh.agent.kill()  # SIGKILL: no chance to clean anything up
        time.sleep(1.0)  # traffic keeps flowing with no agent at all
        fresh.agent.start()  # adopts the pinned maps, re-attaches, resyncs
        log = fresh.agent.log_text()
        assert "adopted" in log and "initial sync done" in log
        time.sleep(1.0)
    finally:
        stop.touch()
        out, err = loop.communicate(timeout=60)
    records = nettools.parse_results(out)
    assert len(records) > 100, (len(records), err[-500:])
    assert_all_ok(records)
    # the restarted agent found every entry in place: its first sync rewrote nothing
    assert "frontends written" not in fresh.agent.log_text()
    # exactly one set of programs is attached: the old ones were replaced, not stacked
    progs = attached(fresh.node.cgroup_path)
    assert len(progs) == len(SOCK_HOOKS), progs


# ---- isolation and hygiene -----------------------------------------------------------------------

def test_process_outside_the_cgroup_is_not_translated(fresh: Cluster) -> None:
    inside = fresh.client.client(nettools.format_target(VIP4, 80), count=3)
    assert_all_ok(inside)
    argv = nettools.client_argv(nettools.format_target(VIP4, 80), count=3, timeout=1)
    proc = fresh.client.run(argv, in_cgroup=False, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    outside = nettools.parse_results(out)
    assert len(outside) == 3 and not any(r["ok"] for r in outside), outside
    # ...while the same process reaches a backend's own address: networking itself works
    argv = nettools.client_argv(nettools.format_target(fresh.backends[0].ip4, TCP_PORT), count=2)
    proc = fresh.client.run(argv, in_cgroup=False, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    assert_all_ok(nettools.parse_results(out))


def test_bad_input_is_reported_and_the_rest_keeps_working(fresh: Cluster) -> None:
    bad = [
        service("bad-ip", ["10.96.300.1"], [{"name": "http", "port": 80, "protocol": "TCP"}]),
        service("bad-port", ["10.96.0.81"], [{"name": "http", "port": 70000, "protocol": "TCP"}]),
        endpoint_slice("no-such-service", ["10.244.1.200"], [{"name": "http", "port": 80, "protocol": "TCP"}],
                       name="orphan-slice"),
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "odd", "namespace": "default"}},
    ]
    fresh.apply(fresh.objects(extra=bad))
    log = fresh.agent.wait_log("ConfigMap default/odd")
    assert "Service default/bad-ip spec.clusterIP" in log or "Service default/bad-ip spec.clusterIPs" in log, log
    assert "Service default/bad-port spec.ports[0].port" in log, log
    assert "EndpointSlice default/orphan-slice" in log and "no-such-service" in log, log
    assert_all_ok(fresh.client.client(nettools.format_target(VIP4, 80), count=10))

    # a file that is not YAML at all: logged, and the last good state stays in force
    fresh.agent.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n")
    fresh.agent.wait_log("invalid YAML")
    assert_all_ok(fresh.client.client(nettools.format_target(VIP4, 80), count=10))
    assert fresh.agent.proc is not None and fresh.agent.proc.poll() is None, "the agent died"


def test_no_netfilter_rule_anywhere(fresh: Cluster) -> None:
    for netns in [None, fresh.node.netns, fresh.client.netns]:
        prefix = [] if netns is None else ["ip", "netns", "exec", netns]
        nft = subprocess.run([*prefix, "nft", "list", "ruleset"], capture_output=True, text=True, check=True)
        if netns is not None:
            assert nft.stdout.strip() == "", f"nftables rules in {netns}: {nft.stdout}"
        for tool in ("iptables-save", "ip6tables-save"):
            out = subprocess.run([*prefix, tool], capture_output=True, text=True, check=True).stdout
            rules = [ln for ln in out.splitlines() if ln.startswith("-A")]
            ours = [ln for ln in rules if "10.96." in ln or "fd00:10:96" in ln or "zeroproxy" in ln.lower()]
            assert not ours, ours
            if netns is not None:
                assert not rules, f"{tool} rules in {netns}: {rules}"


def test_cli_service_list_and_status(fresh: Cluster) -> None:
    out = subprocess.run([*_zp(), "service", "list", "--bpffs", str(fresh.agent.pin_dir)],
                         capture_output=True, text=True, check=True).stdout
    assert f"{VIP4}:80/TCP" in out and f"[{VIP6}]:80/TCP" in out
    assert f"{fresh.backends[0].ip4}:{TCP_PORT}" in out
    assert "connect() is refused" in out  # the empty service


def _zp() -> list[str]:
    import sys
    return [sys.executable, "-m", "zeroproxy"]


# ---- structure checks ----------------------------------------------------------------------------

def test_ctypes_mirrors_match_bcc_structs(tmp_path: Path) -> None:
    import bcc

    from dataplane.loader import sock_source

    pin = Path("/sys/fs/bpf") / f"zp-sizes-{tmp_path.name[-8:]}"
    pin.mkdir()
    b = None
    try:
        text, cflags = sock_source(pin)
        b = bcc.BPF(text=text.encode(), cflags=cflags)
        sock_maps = {n: kv for n, kv in maps.MAP_TYPES.items() if n.startswith(("zp_lb", "zp_rnat"))}
        assert len(sock_maps) == 9  # with the two loadBalancerSourceRanges tries
        for name, (key_t, value_t) in sock_maps.items():
            t = b[name.encode()]
            assert ctypes.sizeof(key_t) == ctypes.sizeof(t.Key), name
            assert ctypes.sizeof(value_t) == ctypes.sizeof(t.Leaf), name
            # every field at the same offset, union members (lb_service, lb_affinity_key) included
            assert _field_offsets(key_t) == _field_offsets(t.Key), name
            assert _field_offsets(value_t) == _field_offsets(t.Leaf), name
        # exactly the socket path's maps: maps.h defines the TC path's only for nodeport.c
        assert {maps.MAP_PINS[n] for n in [*sock_maps, "zp_stats"]} == {p.name for p in pin.iterdir()} - {"progs"}
    finally:
        if b is not None:
            b.cleanup()
        from dataplane.loader import cleanup
        cleanup(None, pin)


def _field_offsets(cls: Any, base: int = 0) -> dict[str, int]:
    """Field name -> byte offset, with anonymous unions/structs flattened (bcc names them __anonN,
    the mirrors by their purpose; the members are what must agree)."""
    if not hasattr(cls, "_fields_"):
        return {}
    out: dict[str, int] = {}
    anonymous = set(getattr(cls, "_anonymous_", ()))
    for field, ftype in cls._fields_:
        offset = base + getattr(cls, field).offset
        if field in anonymous:
            out.update(_field_offsets(ftype, offset))
        else:
            out[field] = offset
    return out


# ---- session affinity ----------------------------------------------------------------------------

def _affinity_objects(c: Cluster, timeout: int, web: list[Pod] | None = None) -> list[dict[str, Any]]:
    web = c.backends[:3] if web is None else web
    http = [{"name": "http", "port": TCP_PORT, "protocol": "TCP"}]
    return c.objects(extra=[
        service("sticky", ["10.96.0.20"], [{"name": "http", "port": 80, "protocol": "TCP"}],
                sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": timeout}}),
        endpoint_slice("sticky", [p.ip4 for p in web], http),
    ])


def test_session_affinity_keeps_a_client_on_one_backend(fresh: Cluster) -> None:
    fresh.apply(_affinity_objects(fresh, 300))
    target = nettools.format_target("10.96.0.20", 80)
    first = names(fresh.client.client(target, count=30))
    assert len(first) == 1 and sum(first.values()) == 30, first
    # the sticky backend leaves the service: the client moves on and sticks to a new one
    (gone,) = first
    rest = [p for p in fresh.backends[:3] if p.name != gone]
    fresh.apply(_affinity_objects(fresh, 300, web=rest))
    second = names(fresh.client.client(target, count=30))
    assert len(second) == 1 and gone not in second, second


def test_session_affinity_expires_after_the_timeout(fresh: Cluster) -> None:
    fresh.apply(_affinity_objects(fresh, 1))
    target = nettools.format_target("10.96.0.20", 80)
    chosen = []
    for _ in range(12):
        burst = names(fresh.client.client(target, count=5))
        assert len(burst) == 1, burst  # sticky within the timeout
        chosen.append(next(iter(burst)))
        time.sleep(1.3)  # idle longer than timeoutSeconds: the next connect chooses afresh
    # 12 fresh random choices among 3 backends all equal has probability 3^-11
    assert len(set(chosen)) > 1, chosen


def test_bpf_mount_point_itself_as_bpffs_and_v1beta1_slices_from_a_file(testbed: TestBed, tmp_path: Path) -> None:
    """``--bpffs`` naming a bpf mount point (a fresh bpffs on a temp dir) is "a directory on a
    bpf filesystem" as ``--help`` says; the file source reads 1.20's v1beta1 slices (the node
    in ``topology``) as well. Cleanup then removes zeroproxy's pins, not the mount or others' pins."""
    mnt = tmp_path / "bpffs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(mnt)], check=True)
    try:
        (mnt / "someone-elses").mkdir()  # another tool's pin directory on the same bpffs
        before = sorted(p.name for p in mnt.iterdir())  # with the kernel's own maps.debug, progs.debug
        node_m = testbed.add_node("m")
        client_m = testbed.add_pod(node_m, "client")
        web = [testbed.add_pod(node_m, f"web-{i}") for i in (1, 2)]
        for p in web:
            p.serve(p.name, tcp=[TCP_PORT])
        beta = endpoint_slice("beta", [], [{"name": "http", "port": TCP_PORT, "protocol": "TCP"}])
        beta["apiVersion"] = "discovery.k8s.io/v1beta1"
        beta["endpoints"] = [{"addresses": [p.ip4], "conditions": {"ready": True},
                              "topology": {"kubernetes.io/hostname": "m"}} for p in web]
        objects = [service("beta", ["10.96.0.77"], [{"name": "http", "port": 80, "protocol": "TCP",
                                                     "targetPort": TCP_PORT}], internalTrafficPolicy="Local"),
                   beta]
        agent = AgentProcess(tmp_path / "agent", node_m.cgroup_path, node_name="m", name="agent-m")
        agent.pin_dir = mnt
        try:
            agent.write(objects)
            agent.start()
            assert ["--bpffs", str(mnt)] == agent.argv()[agent.argv().index("--bpffs"):][:2]
            # iTP=Local keeps both: topology says they run on this node
            have = {s.frontend: sorted(s.backends) for s in inspect.service_list(mnt)}
            assert have == {"10.96.0.77:80/TCP": sorted(f"{p.ip4}:{TCP_PORT}" for p in web)}, agent.log_text()
            records = client_m.client(nettools.format_target("10.96.0.77", 80), count=40, concurrency=4)
            assert_all_ok(records)
            assert set(names(records)) == {"web-1", "web-2"}
        finally:
            agent.close()
        assert sorted(p.name for p in mnt.iterdir()) == before
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert not any(mnt.iterdir())
