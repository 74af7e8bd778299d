"""loadBalancerSourceRanges with real traffic, at the socket (pods connecting to a LoadBalancer
IP) and on the TC path (an outside host), through the file source's agent.

The socket hooks mark the socket at connect()/sendmsg(); the cgroup egress program checks the
first packet's real source address (often unknown before the route lookup) against the
ranges. kube-proxy applies the ranges to in-cluster clients too (its rules see the pod's
address); so do we. The table-level cases are in test_tc_unit.py and test_service_maps.py.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any

from dataplane import inspect
from testbed import nettools
from testbed.bed import TestBed
from testbed.k8sobjects import endpoint_slice, service
from testbed.sandbox import AgentProcess

PORT = 8080
LB4, LB6 = "192.0.2.50", "2001:db8::50"
VIP4, VIP6 = "10.96.0.60", "fd00:10:96::60"


def _answers(records: list[dict[str, Any]]) -> collections.Counter[str]:
    return collections.Counter(r["server_name"] if r["ok"] else f"FAIL {r['error']}" for r in records)


def _objects(ranges: list[str] | None, web: Any) -> list[dict[str, Any]]:
    ports = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": PORT},
             {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": PORT}]
    svc = service("lb", [VIP4, VIP6], ports, type="LoadBalancer", ipFamilyPolicy="RequireDualStack")
    if ranges is not None:
        svc["spec"]["loadBalancerSourceRanges"] = ranges
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": LB4}, {"ip": LB6}]}}
    slice_ports = [{"name": "http", "port": PORT, "protocol": "TCP"}, {"name": "dns", "port": PORT, "protocol": "UDP"}]
    return [svc, endpoint_slice("lb", [web.ip4], slice_ports, name="lb-4"),
            endpoint_slice("lb", [web.ip6], slice_ports, name="lb-6", address_type="IPv6")]


def _wait_flagged(agent: AgentProcess, frontend: str, flagged: bool) -> None:
    """Until the maps hold the frontend with (or without) the source-range flag."""
    from dataplane import maps

    deadline = time.monotonic() + 20
    have: Any = None
    while time.monotonic() < deadline:
        have = {s.frontend: s.flags for s in inspect.service_list(agent.pin_dir)}.get(frontend)
        if have is not None and bool(have & maps.SvcFlag.SRC_RANGE) == flagged:
            return
        time.sleep(0.05)
    raise AssertionError(f"{frontend}: flags {have}, want SRC_RANGE={flagged}\n{agent.log_text()[-3000:]}")


def test_pods_outside_the_ranges_get_nothing_from_the_lb_ip(testbed: TestBed, tmp_path: Path) -> None:
    node = testbed.add_node("m")
    inside = testbed.add_pod(node, "inside")
    outside = testbed.add_pod(node, "outside")
    web = testbed.add_pod(node, "web")
    web.serve("web", tcp=[PORT], udp=[PORT])
    ranges = [f"{inside.ip4}/32", f"{inside.ip6}/128", "203.0.113.0/24"]
    with AgentProcess(tmp_path / "agent", node.cgroup_path, node_name="m", name="agent-m") as agent:
        agent.write(_objects(ranges, web))
        agent.start()
        for lb in (LB4, LB6):
            _wait_flagged(agent, nettools.format_target(lb, 80) + "/TCP", True)
        before = inspect.stats(agent.pin_dir)["src_range"]
        for lb in (LB4, LB6):
            tcp, udp = nettools.format_target(lb, 80), nettools.format_target(lb, 53)
            assert _answers(inside.client(tcp, count=5)) == {"web": 5}, agent.log_text()[-3000:]
            # outside the ranges: the SYN never leaves (the connect times out); a datagram's send fails
            assert _answers(outside.client(tcp, count=2, timeout=1)) == {"FAIL ETIMEDOUT": 2}
            for proto in ("udp-connected", "udp-unconnected"):
                assert _answers(inside.client(udp, proto=proto, count=5)) == {"web": 5}, proto
                assert _answers(outside.client(udp, proto=proto, count=2, timeout=1)) == {"FAIL EPERM": 2}, proto
            # the ClusterIP of the same service has no ranges (kube-proxy: LB IPs only)
            vip = VIP4 if lb == LB4 else VIP6
            assert _answers(outside.client(nettools.format_target(vip, 80), count=3)) == {"web": 3}
        assert inspect.stats(agent.pin_dir)["src_range"] - before >= 12  # every dropped packet counted

        # the ranges go: everyone again
        agent.write(_objects(None, web))
        _wait_flagged(agent, f"{LB4}:80/TCP", False)
        assert _answers(outside.client(nettools.format_target(LB4, 80), count=3)) == {"web": 3}
        assert _answers(outside.client(nettools.format_target(LB6, 53), proto="udp-unconnected", count=3)) == {
            "web": 3}
