"""Topology-aware routing through the file source, with real traffic: what kube-apiserver 1.20
drops (spec.trafficDistribution, endpoint hints; tests/test_kube_agent.py proves it) is covered
here, since a file carries every field."""

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
VIP = "10.96.0.70"
ZONE_LABEL = "topology.kubernetes.io/zone"


def _objects(zones: dict[str, str | None], node_zone: str | None, pods: dict[str, str],
             **spec: Any) -> list[dict[str, Any]]:
    svc = service("near", [VIP], [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": PORT}], **spec)
    slc = endpoint_slice("near", list(pods.values()), [{"name": "http", "port": PORT, "protocol": "TCP"}])
    for endpoint, name in zip(slc["endpoints"], pods, strict=True):
        if zones.get(name):
            endpoint["hints"] = {"forZones": [{"name": zones[name]}]}
    node = {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "m", "labels": {ZONE_LABEL: node_zone} if node_zone else {}}}
    return [svc, slc, node]


def test_prefer_close_keeps_this_zone_and_falls_back_like_kube_proxy(testbed: TestBed, tmp_path: Path) -> None:
    node = testbed.add_node("m")
    client = testbed.add_pod(node, "client")
    web = {name: testbed.add_pod(node, name) for name in ("web-1", "web-2", "web-3")}
    for p in web.values():
        p.serve(p.name, tcp=[PORT])
    pods = {name: p.ip4 for name, p in web.items()}
    target = nettools.format_target(VIP, 80)
    hinted = {"web-1": "z1", "web-2": "z2", "web-3": "z1"}

    def answers() -> collections.Counter[str]:
        records = client.client(target, count=60, concurrency=4)
        return collections.Counter(r["server_name"] if r["ok"] else "FAIL" for r in records)

    def program(objects: list[dict[str, Any]], want: list[str]) -> None:
        """Write the file, then wait for the maps to hold exactly these backends."""
        agent.write(objects)
        wanted = sorted(f"{pods[n]}:{PORT}" for n in want)
        have: Any = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            have = {s.frontend: sorted(s.backends) for s in inspect.service_list(agent.pin_dir)}.get(f"{VIP}:80/TCP")
            if have == wanted:
                return
            time.sleep(0.05)
        raise AssertionError(f"want {wanted}, have {have}\n{agent.log_text()[-3000:]}")

    agent = AgentProcess(tmp_path / "agent", node.cgroup_path, node_name="m", name="agent-m")
    with agent:
        agent.write(_objects(hinted, "z1", pods, trafficDistribution="PreferClose"))
        agent.start()
        program(_objects(hinted, "z1", pods, trafficDistribution="PreferClose"), ["web-1", "web-3"])
        got = answers()
        assert set(got) == {"web-1", "web-3"}, got  # 60 random picks of 2: both show
        # the node moves to z2
        program(_objects(hinted, "z2", pods, trafficDistribution="PreferClose"), ["web-2"])
        assert answers() == {"web-2": 60}
        # kube-proxy's fallbacks, each to all three: an endpoint without hints, no endpoint for
        # this zone, a node without a zone label
        everyone = ["web-1", "web-2", "web-3"]
        program(_objects({**hinted, "web-3": None}, "z2", pods, trafficDistribution="PreferClose"), everyone)
        assert set(answers()) == set(everyone)
        program(_objects(hinted, "z9", pods, trafficDistribution="PreferClose"), everyone)
        program(_objects(hinted, None, pods, trafficDistribution="PreferClose"), everyone)
        # the older annotation asks for the same; without either, hints are not followed
        annotated = _objects(hinted, "z2", pods)
        annotated[0]["metadata"]["annotations"] = {"service.kubernetes.io/topology-aware-hints": "Auto"}
        program(annotated, ["web-2"])
        program(_objects(hinted, "z2", pods), everyone)
        assert set(answers()) == set(everyone)
