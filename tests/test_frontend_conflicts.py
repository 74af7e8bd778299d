"""Who owns a contested address:port, with real traffic: a pod's connection is not hijacked.

CVE-2020-8554: anyone who may create a Service can name any address in ``spec.externalIPs``,
and a proxy that translates it intercepts the pods' traffic to that address. The rules (unit
tests in test_kube_changes.py): the first owner keeps a frontend, allocated addresses beat
user-set externalIPs, and ``allowedExternalIPCIDRs`` admits externalIPs only from its ranges.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

from controlplane.metrics import PREFIX
from testbed import nettools
from testbed.bed import TestBed
from testbed.k8sobjects import endpoint_slice, service
from testbed.sandbox import AgentProcess

PORT = 8080
VIP = "10.96.0.90"


def _answers(records: list[dict[str, Any]]) -> collections.Counter[str]:
    return collections.Counter(r["server_name"] if r["ok"] else f"FAIL {r.get('error')}" for r in records)


def _metric(agent: AgentProcess, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(agent.metrics_url, timeout=10) as r:
        text = r.read().decode()
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name} ")]
    assert values, (name, text[-2000:])
    return values[0]


def test_a_service_naming_an_outside_address_hijacks_it_only_where_allowed(testbed: TestBed,
                                                                           tmp_path: Path) -> None:
    node = testbed.add_node("m")
    client = testbed.add_pod(node, "client")
    web1, web2 = testbed.add_pod(node, "web-1"), testbed.add_pod(node, "web-2")
    for p in (web1, web2):
        p.serve(p.name, tcp=[PORT])
    outside = testbed.add_external("outside")  # a host beyond the node, on the underlay
    outside.serve("outside", tcp=[PORT])
    testbed.iproute(outside.netns).route("add", dst=str(node.pod_cidr4), gateway=node.ip4)  # back to the pods
    ports = [{"name": "http", "port": PORT, "protocol": "TCP", "targetPort": PORT}]
    slice_ports = [{"name": "http", "port": PORT, "protocol": "TCP"}]
    objects = [
        # allowed to serve VIP; names the outside host's address too
        service("web", [VIP], ports, externalIPs=[outside.ip4]),
        endpoint_slice("web", [web1.ip4], slice_ports),
        # created later, sorts first, names web's ClusterIP as an externalIP: must get nothing
        service("a-hijack", ["10.96.0.91"], ports, externalIPs=[VIP]),
        endpoint_slice("a-hijack", [web2.ip4], slice_ports),
    ]
    outside_target = nettools.format_target(outside.ip4, PORT)
    assert _answers(client.client(outside_target, count=3)) == {"outside": 3}  # before any proxy

    allowed = "203.0.113.0/24"  # neither the outside host nor web's VIP
    agent = AgentProcess(tmp_path / "agent", node.cgroup_path, node_name="m", name="agent-m",
                         extra_args=["--allowed-external-ip-cidrs", allowed])
    try:
        agent.write(objects)
        agent.start()
        assert _answers(client.client(outside_target, count=10)) == {"outside": 10}, agent.log_text()[-3000:]
        assert _answers(client.client(nettools.format_target(VIP, PORT), count=10)) == {"web-1": 10}
        log = agent.log_text()
        for name, ip in (("web", outside.ip4), ("a-hijack", VIP)):
            assert (f"Service default/{name} spec.externalIPs[0]: {ip} is outside the allowed externalIP "
                    f"CIDRs ({allowed}); address ignored") in log, log[-3000:]
        assert _metric(agent, f"{PREFIX}_invalid_input_problems") == 2
        agent.close()

        # Without the option every externalIP is admitted, as in kube-proxy: web now takes the
        # outside host's address (that is what the option is for), but a-hijack still cannot
        # take web's ClusterIP: the cluster allocated it.
        agent = AgentProcess(tmp_path / "agent2", node.cgroup_path, node_name="m", name="agent-m2")
        agent.write(objects)
        agent.start()
        assert _answers(client.client(outside_target, count=10)) == {"web-1": 10}
        assert _answers(client.client(nettools.format_target(VIP, PORT), count=10)) == {"web-1": 10}
        assert ("invalid input: Service default/a-hijack: frontend 10.96.0.90:8080/TCP (ExternalIP) is not "
                "programmed: the cluster allocated it to Service default/web (ClusterIP)") in agent.log_text()
        assert _metric(agent, f"{PREFIX}_frontend_conflicts") == 1
    finally:
        agent.close()
    assert _answers(client.client(outside_target, count=3)) == {"outside": 3}  # nothing left behind
