"""API source cold start: agent start to "initial sync done" with N Services + EndpointSlices
served by a real kube-apiserver (testbed.devcluster: etcd + kube-apiserver 1.20, EndpointSlice
v1 through a CRD), next to the file source with the same N objects.

The objects are created before the agent starts (creation is not timed as part of the cold
start, but its rate is recorded: it says how fast this apiserver takes objects, which bounds how
big a test is affordable). Counts are cumulative: for N = 1000 then 10 000 the second step adds
9 000 services to the first 1 000.

The agent runs in the machine's network namespace, because DevCluster binds the apiserver to
127.0.0.1 there and a bed namespace has its own loopback; its health and metrics servers take
free loopback ports. It attaches to an empty cgroup of its own test bed and pins under its own
directory, both removed afterwards; its programs never see traffic.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import agentrun
from bench.services import NAMESPACE, Service, make_services

log = logging.getLogger(__name__)

NODE_NAME = "bench-node"
ENDPOINTS = [("10.244.1.10", 80), ("10.244.1.11", 80), ("10.244.1.12", 80)]  # never dialled
CREATE_WORKERS = 8


def _service_body(s: Service) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": s.name, "namespace": s.namespace},
            "spec": {"type": "ClusterIP", "clusterIP": s.vip,
                     "ports": [{"name": s.port_name, "port": s.port, "protocol": "TCP",
                                "targetPort": s.endpoints[0][1]}]}}


def _slice_body(s: Service) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"{s.name}-bench", "namespace": s.namespace,
                         "labels": {"kubernetes.io/service-name": s.name}},
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": NODE_NAME}
                          for ip, _ in s.endpoints],
            "ports": [{"name": s.port_name, "port": s.endpoints[0][1], "protocol": "TCP"}]}


def create(api_client: Any, services: Sequence[Service], workers: int = CREATE_WORKERS) -> dict[str, Any]:
    """Create the Services and their EndpointSlices (``workers`` parallel requests); timed."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    disc = client.DiscoveryV1Api(api_client)

    def one(s: Service) -> None:
        core.create_namespaced_service(s.namespace, _service_body(s), _preload_content=False).read()
        disc.create_namespaced_endpoint_slice(s.namespace, _slice_body(s), _preload_content=False).read()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(one, services):
            pass
    seconds = time.perf_counter() - t0
    objects = 2 * len(services)
    return {"objects": objects, "seconds": seconds, "objects_per_s": objects / seconds if seconds else None}


def run(counts: Sequence[int], *, step: Callable[[str], None] = lambda _: None) -> list[dict[str, Any]]:
    """For each N (ascending): make the apiserver hold N services, then time both agent sources."""
    from testbed.bed import TestBed
    from testbed.devcluster import DevCluster
    from testbed.sandbox import free_port

    out: list[dict[str, Any]] = []
    bed = TestBed(prefix="zpbapi")
    try:
        with DevCluster() as cluster, tempfile.TemporaryDirectory(prefix="zpbench-api-") as tmp:
            workdir = Path(tmp)
            api = cluster.api_client()
            from kubernetes import client

            client.CoreV1Api(api).create_namespace(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}, _preload_content=False)
            have = 0
            for count in sorted(counts):
                services = make_services(count, ENDPOINTS)
                created = create(api, services[have:])
                have = count
                common = dict(spawn=_spawn, workdir=workdir, cgroup=bed.cgroup_root / "agent", node_name=NODE_NAME,
                              timeout=1800.0)

                def ports() -> list[str]:
                    return ["--healthz-bind-address", f"127.0.0.1:{free_port()}",
                            "--metrics-bind-address", f"127.0.0.1:{free_port()}"]

                kube = agentrun.measure(services, pin_dir=Path("/sys/fs/bpf") / f"{bed.id}-api",
                                        source_args=["--source", "kubernetes", "--kubeconfig",
                                                     str(cluster.kubeconfig_path)],
                                        extra_args=ports(), **common)
                file = agentrun.measure(services, pin_dir=Path("/sys/fs/bpf") / f"{bed.id}-file",
                                        extra_args=ports(), **common)
                out.append({"services": count, "created": created, "kubernetes": kube, "file": file})
                step(f"API source N={count}")
                log.info("api source N=%d: %s", count, json.dumps(out[-1]))
    finally:
        bed.close()
    return out


def _spawn(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(list(argv), **kwargs)
