"""Builders for the Kubernetes objects the demo, tests and bench feed to zeroproxy.

They produce the camelCase dicts `kubectl get -o yaml` prints, so the same objects can be
written to a file source or created through the API.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import yaml

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def service(name: str, cluster_ips: Sequence[str], ports: Iterable[dict[str, Any]], *,
            namespace: str = "default", type: str = "ClusterIP", **spec: Any) -> dict[str, Any]:
    """A v1 Service; ports are {"name", "port", "protocol", ...} dicts."""
    families = ["IPv6" if ":" in ip else "IPv4" for ip in cluster_ips]  # tolerant: tests feed bad IPs
    body: dict[str, Any] = {
        "type": type,
        "clusterIP": cluster_ips[0] if cluster_ips else "None",
        "clusterIPs": list(cluster_ips) or ["None"],
        "ipFamilies": families,
        "ports": [dict(p) for p in ports],
    }
    body.update(spec)
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": body}


def endpoint_slice(service_name: str, addresses: Iterable[str], ports: Iterable[dict[str, Any]], *,
                   namespace: str = "default", name: str | None = None, address_type: str = "IPv4",
                   node_name: str | None = None, ready: bool = True, **conditions: bool) -> dict[str, Any]:
    """A discovery.k8s.io/v1 EndpointSlice with one endpoint per address."""
    eps = []
    for addr in addresses:
        ep: dict[str, Any] = {"addresses": [addr], "conditions": {"ready": ready, **conditions}}
        if node_name:
            ep["nodeName"] = node_name
        eps.append(ep)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name or f"{service_name}-{address_type.lower()}",
            "namespace": namespace,
            "labels": {SERVICE_NAME_LABEL: service_name},
        },
        "addressType": address_type,
        "endpoints": eps,
        "ports": [dict(p) for p in ports],
    }


def pod(name: str, node_name: str, ips: Sequence[str], *, namespace: str = "default",
        annotations: dict[str, str] | None = None, labels: dict[str, str] | None = None,
        phase: str = "Running") -> dict[str, Any]:
    """A v1 Pod as the kubelet reports it: scheduled to ``node_name``, ``ips`` its podIPs (first = podIP)."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "annotations": dict(annotations or {})}
    if labels:
        meta["labels"] = dict(labels)
    status: dict[str, Any] = {"phase": phase, "podIPs": [{"ip": ip} for ip in ips]}
    if ips:
        status["podIP"] = ips[0]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {"nodeName": node_name}, "status": status}


def node(name: str, internal_ips: Sequence[str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": a} for a in internal_ips]}}


def dump(objects: Iterable[dict[str, Any]]) -> str:
    """Multi-document YAML, as `kubectl get -o yaml` would print each object."""
    return yaml.safe_dump_all(list(objects), sort_keys=False)
