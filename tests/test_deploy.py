"""The manifests against a real kube-apiserver (RBAC mode), and the agent run the way the DaemonSet runs it.

1. Every object is checked against the API server's own OpenAPI schema (/openapi/v2), accepted by
   a server-side dry run and then created, and nothing in it is dropped on the way: a 1.20 API
   server silently prunes unknown fields, so a typo'd field would otherwise pass unnoticed.
2. The ServiceAccount's token, through a kubeconfig, can list and watch exactly what the agent's
   watchers request (their own paths and field selectors, from controlplane.kubesource), patch
   Pods and write Events; every other write is refused with 403, and a SelfSubjectAccessReview
   matrix shows the role grants nothing beyond that.
3. The real agent runs with the DaemonSet's identity (the ServiceAccount token as in-cluster
   credentials at the path a pod has them), the ConfigMap's config file, the cgroup mounted
   read-only as in the pod, and the DaemonSet's capability list as its bounding set: it syncs,
   serves the probes' endpoints, and programs the Service; restarted, it adopts its own pins.
   Without SYS_ADMIN that restart fails, which is why the DaemonSet asks for it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config
from test_manifests import AGENT_NEEDS, by_kind, embedded_config, manifest_objects, uninstall_objects

from controlplane.kubesource import resources
from dataplane.loader import cgroup2_mount, cleanup
from testbed.devcluster import DevCluster

# The first run on a fresh machine builds kube-apiserver inside the first fixture (minutes).
pytestmark = pytest.mark.timeout(1800)

REPO = Path(__file__).resolve().parent.parent
AGENT_TIMEOUT = 120.0  # bcc compiles two programs on a 2-core machine; generous on purpose
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")  # where a pod has its credentials

# (apiVersion, kind) -> (collection prefix, plural, namespaced)
COLLECTIONS = {
    ("v1", "Namespace"): ("/api/v1", "namespaces", False),
    ("v1", "ServiceAccount"): ("/api/v1", "serviceaccounts", True),
    ("v1", "ConfigMap"): ("/api/v1", "configmaps", True),
    ("v1", "Pod"): ("/api/v1", "pods", True),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): ("/apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"):
        ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
    ("apps/v1", "DaemonSet"): ("/apis/apps/v1", "daemonsets", True),
    ("node.k8s.io/v1", "RuntimeClass"): ("/apis/node.k8s.io/v1", "runtimeclasses", False),
}


def collection_path(obj: dict[str, Any]) -> str:
    prefix, plural, namespaced = COLLECTIONS[(obj["apiVersion"], obj["kind"])]
    if namespaced:
        return f"{prefix}/namespaces/{obj['metadata']['namespace']}/{plural}"
    return f"{prefix}/{plural}"


def request(cluster: DevCluster, method: str, path: str, body: Any = None, *, token: str | None = None,
            content_type: str = "application/json") -> tuple[int, Any]:
    """One raw API call (admin unless ``token``): the JSON exactly as the server returns it."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(cluster.url + path, data=data, method=method, headers={
        "Authorization": f"Bearer {token or cluster.admin_token}", "Content-Type": content_type,
        "Accept": "application/json"})
    context = ssl.create_default_context(cafile=str(cluster.ca_cert_path))
    try:
        with urllib.request.urlopen(req, timeout=30, context=context) as resp:
            return int(resp.status), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return int(e.code), json.loads(e.read() or b"null")


def dropped_fields(sent: Any, returned: Any, path: str = "") -> list[str]:
    """Fields of ``sent`` missing or changed in ``returned``; the server may only add (defaults)."""
    if isinstance(sent, dict):
        if not isinstance(returned, dict):
            return [f"{path}: sent a mapping, got {returned!r}"]
        out = []
        for key, value in sent.items():
            if key not in returned:
                out.append(f"{path}.{key}: dropped by the server")
            else:
                out += dropped_fields(value, returned[key], f"{path}.{key}")
        return out
    if isinstance(sent, list):
        if not isinstance(returned, list) or len(returned) != len(sent):
            return [f"{path}: list changed"]
        return [p for i, (s, r) in enumerate(zip(sent, returned, strict=True))
                for p in dropped_fields(s, r, f"{path}[{i}]")]
    return [] if sent == returned else [f"{path}: sent {sent!r}, stored {returned!r}"]


# --- the API server's OpenAPI schema ----------------------------------------------------------


def schema_problems(value: Any, schema: dict[str, Any], defs: dict[str, Any], path: str) -> list[str]:
    """Check ``value`` against an OpenAPI v2 schema: every field known, every type right, every
    required field present."""
    while "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
    kind = schema.get("type")
    fmt = schema.get("format")
    if fmt == "int-or-string":
        return [] if isinstance(value, int | str) and not isinstance(value, bool) else [f"{path}: int or string"]
    if kind == "string":
        return [] if isinstance(value, str) else [f"{path}: must be a string, got {value!r}"]
    if kind == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
        return [] if ok else [f"{path}: must be an integer, got {value!r}"]
    if kind == "number":
        return [] if isinstance(value, int | float) and not isinstance(value, bool) else [f"{path}: number"]
    if kind == "boolean":
        return [] if isinstance(value, bool) else [f"{path}: must be a boolean, got {value!r}"]
    if kind == "array":
        if not isinstance(value, list):
            return [f"{path}: must be a list"]
        return [p for i, item in enumerate(value) for p in schema_problems(item, schema["items"], defs, f"{path}[{i}]")]
    if "properties" in schema or kind == "object":
        if not isinstance(value, dict):
            return [f"{path}: must be a mapping"]
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        out = [f"{path}.{name}: required" for name in schema.get("required", []) if name not in value]
        for key, item in value.items():
            if key in props:
                out += schema_problems(item, props[key], defs, f"{path}.{key}")
            elif isinstance(extra, dict):
                out += schema_problems(item, extra, defs, f"{path}.{key}")
            else:
                out.append(f"{path}.{key}: unknown field")
        return out
    return []  # untyped (e.g. RawExtension): anything goes


def definition_for(openapi: dict[str, Any], api_version: str, kind: str) -> dict[str, Any]:
    group, _, version = api_version.rpartition("/")
    for definition in openapi["definitions"].values():
        for gvk in definition.get("x-kubernetes-group-version-kind", []):
            if (gvk["group"], gvk["version"], gvk["kind"]) == (group, version, kind):
                return definition
    raise AssertionError(f"the API server has no schema for {api_version} {kind}")


# --- fixtures -----------------------------------------------------------------------------------


@dataclass
class Installed:
    obj: dict[str, Any]
    dry_run: tuple[int, Any]
    created: tuple[int, Any]


@pytest.fixture(scope="module")
def cluster() -> Iterator[DevCluster]:
    with DevCluster(authorization_mode="RBAC") as c:
        yield c


@pytest.fixture(scope="module")
def installed(cluster: DevCluster) -> Iterator[list[Installed]]:
    """`kubectl apply -k manifests/` done by hand: each object dry-run first, then created;
    the manifests' namespace (and what is in it) deleted afterwards."""
    out = []
    for obj in manifest_objects():
        path = collection_path(obj)
        dry = request(cluster, "POST", path + "?dryRun=All", obj)
        created = request(cluster, "POST", path, obj)
        out.append(Installed(obj, dry, created))
    # On 1.20 the controller-manager's token controller would now give the ServiceAccount a
    # token Secret, which the ServiceAccount admission plugin insists on before admitting a
    # Pod that uses it. No controller-manager runs here, so do its part.
    sa = by_kind("ServiceAccount")["metadata"]
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/service-account-token",
              "metadata": {"name": f"{sa['name']}-token", "namespace": sa["namespace"],
                           "annotations": {"kubernetes.io/service-account.name": sa["name"]}}}
    status, body = request(cluster, "POST", f"/api/v1/namespaces/{sa['namespace']}/secrets", secret)
    assert status == 201, body
    status, body = request(cluster, "PATCH", f"/api/v1/namespaces/{sa['namespace']}/serviceaccounts/{sa['name']}",
                           {"secrets": [{"name": secret["metadata"]["name"]}]},
                           content_type="application/merge-patch+json")
    assert status == 200, body
    try:
        yield out
    finally:
        cluster.delete_namespace(by_kind("Namespace")["metadata"]["name"])


@pytest.fixture(scope="module")
def sa_token(cluster: DevCluster, installed: list[Installed]) -> str:
    sa = by_kind("ServiceAccount")["metadata"]
    return cluster.service_account_token(sa["namespace"], sa["name"])


@pytest.fixture(scope="module")
def sa_api(cluster: DevCluster, sa_token: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """An ApiClient built from a kubeconfig holding the ServiceAccount's token."""
    kubeconfig = cluster.write_kubeconfig(tmp_path_factory.mktemp("sa") / "kubeconfig", sa_token, "zeroproxy")
    with config.new_client_from_config(config_file=str(kubeconfig)) as api:
        yield api


@pytest.fixture(scope="module")
def world(cluster: DevCluster, installed: list[Installed]) -> Iterator[dict[str, Any]]:
    """What the agent will see: a node, a pod on it, a Service with one ready endpoint; its
    namespace and node are deleted afterwards."""
    ns, node = f"zp-apps-{uuid.uuid4().hex[:6]}", f"zp-node-{uuid.uuid4().hex[:6]}"
    calls = [
        ("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        ("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}),
        (f"/api/v1/namespaces/{ns}/serviceaccounts",
         {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}}),
        (f"/api/v1/namespaces/{ns}/pods", {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-0", "labels": {"app": "web"}},
            "spec": {"nodeName": node, "automountServiceAccountToken": False,
                     "containers": [{"name": "web", "image": "example.invalid/web:1"}]}}),
        (f"/api/v1/namespaces/{ns}/services", {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
    ]
    created: dict[str, Any] = {}
    try:
        for path, body in calls:
            status, result = request(cluster, "POST", path, body)
            assert status == 201, (path, result)
            created[body["kind"]] = result
        cluster_ip = created["Service"]["spec"]["clusterIP"]
        endpoint = "10.244.1.5"
        status, result = request(cluster, "POST", f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [endpoint], "conditions": {"ready": True}, "nodeName": node}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
        assert status == 201, result
        yield {"namespace": ns, "node": node, "cluster_ip": cluster_ip, "endpoint": endpoint}
    finally:
        cluster.delete_namespace(ns)
        if "Node" in created:
            request(cluster, "DELETE", f"/api/v1/nodes/{node}")


# --- 1. the objects -----------------------------------------------------------------------------


def test_every_object_matches_the_api_servers_openapi_schema(cluster: DevCluster) -> None:
    status, openapi = request(cluster, "GET", "/openapi/v2")
    assert status == 200
    defs = openapi["definitions"]
    for obj in [*manifest_objects(), *uninstall_objects()]:
        schema = definition_for(openapi, obj["apiVersion"], obj["kind"])
        assert schema_problems(obj, schema, defs, f"{obj['kind']}/{obj['metadata']['name']}") == []


def test_schema_check_and_round_trip_catch_a_misspelt_field(cluster: DevCluster) -> None:
    """Why both checks exist: the 1.20 API server accepts an unknown field and drops it."""
    status, openapi = request(cluster, "GET", "/openapi/v2")
    assert status == 200
    ds = copy.deepcopy(by_kind("DaemonSet"))
    ds["metadata"]["name"] = "zeroproxy-typo"
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilites"] = {"add": ["NET_ADMIN"]}
    problems = schema_problems(ds, definition_for(openapi, "apps/v1", "DaemonSet"), openapi["definitions"], "ds")
    assert problems == ["ds.spec.template.spec.containers[0].securityContext.capabilites: unknown field"]
    ns_status, _ = request(cluster, "POST", "/api/v1/namespaces",
                           {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "zp-typo"}})
    try:
        assert ns_status == 201
        ds["metadata"]["namespace"] = "zp-typo"
        status, body = request(cluster, "POST", collection_path(ds) + "?dryRun=All", ds)
    finally:
        cluster.delete_namespace("zp-typo")
    assert status == 201, "the server accepts it"
    assert dropped_fields(ds, body) == [".spec.template.spec.containers[0].securityContext.capabilites: dropped by "
                                        "the server"]


def test_every_object_is_accepted_server_side(cluster: DevCluster, installed: list[Installed]) -> None:
    assert [i.obj["kind"] for i in installed] == [o["kind"] for o in manifest_objects()]
    for item in installed:
        name = f"{item.obj['kind']} {item.obj['metadata']['name']}"
        status, body = item.dry_run
        assert status == 201, f"{name} dry run: {body}"
        assert dropped_fields(item.obj, body) == [], name
        status, body = item.created
        assert status == 201, f"{name}: {body}"
        assert dropped_fields(item.obj, body) == [], name
        status, stored = request(cluster, "GET", f"{collection_path(item.obj)}/{item.obj['metadata']['name']}")
        assert status == 200 and stored["metadata"]["uid"] == body["metadata"]["uid"], name


def test_the_daemonsets_pod_is_admitted(cluster: DevCluster, installed: list[Installed]) -> None:
    """Pod validation and admission (priority class, ServiceAccount) on the template, as the
    DaemonSet controller would create it on a node."""
    ds = by_kind("DaemonSet")
    template = ds["spec"]["template"]
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {**copy.deepcopy(template["metadata"]), "name": "zeroproxy-abcde",
                        "namespace": ds["metadata"]["namespace"]},
           "spec": {**copy.deepcopy(template["spec"]), "nodeName": "node-1"}}
    status, body = request(cluster, "POST", collection_path(pod) + "?dryRun=All", pod)
    assert status == 201, body
    status, priority = request(cluster, "GET", "/apis/scheduling.k8s.io/v1/priorityclasses/system-node-critical")
    assert status == 200
    assert body["spec"]["priority"] == priority["value"]
    assert dropped_fields(pod["spec"]["containers"][0]["securityContext"],
                          body["spec"]["containers"][0]["securityContext"]) == []


def test_bidirectional_mount_propagation_would_need_privileged(cluster: DevCluster,
                                                               installed: list[Installed]) -> None:
    """Why the bpffs mount is HostToContainer: Bidirectional is refused for a pod that is not
    privileged, and privileged is what the capability list avoids."""
    ds = copy.deepcopy(by_kind("DaemonSet"))
    ds["metadata"]["name"] = "zeroproxy-bidirectional"
    mounts = ds["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    next(m for m in mounts if m["mountPath"] == "/sys/fs/bpf")["mountPropagation"] = "Bidirectional"
    status, body = request(cluster, "POST", collection_path(ds) + "?dryRun=All", ds)
    assert status == 422, body
    assert "Bidirectional mount propagation is available only to privileged containers" in body["message"]


# --- 2. RBAC --------------------------------------------------------------------------------------


def sa_call(api: Any, method: str, path: str, *, query: list[tuple[str, str]] = (),  # type: ignore[assignment]
            body: Any = None, content_type: str = "application/json") -> tuple[int, bytes]:
    """A call as the ServiceAccount (kubeconfig credentials); (status, raw body)."""
    try:
        resp = api.call_api(path, method, query_params=list(query), body=body,
                            header_params={"Accept": "application/json", "Content-Type": content_type},
                            auth_settings=["BearerToken"], _preload_content=False, _return_http_data_only=True,
                            _request_timeout=30)
        return int(resp.status), resp.data
    except client.ApiException as e:
        return int(e.status), (e.body or b"") if isinstance(e.body, bytes) else str(e.body).encode()


def test_service_account_can_list_and_watch_what_the_watchers_request(sa_api: Any, world: dict[str, Any]) -> None:
    """The exact requests of the agent's watchers (paths, field selectors), as the ServiceAccount."""
    watched = resources(world["node"], watch_pods=True)
    assert {r.kind for r in watched} == {"Service", "EndpointSlice", "Node", "Pod"}
    for resource in watched:
        selector = [("fieldSelector", resource.field_selector)] if resource.field_selector else []
        status, data = sa_call(sa_api, "GET", resource.path, query=[*selector, ("limit", "500")])
        assert status == 200, f"list {resource.kind}: {data[:300]!r}"
        items = json.loads(data)["items"]
        assert len(items) >= 1, f"{resource.kind}: the test world has one of each"
        status, data = sa_call(sa_api, "GET", resource.path, query=[
            *selector, ("watch", "true"), ("allowWatchBookmarks", "true"), ("timeoutSeconds", "1"),
            ("resourceVersion", json.loads(sa_call(sa_api, "GET", resource.path, query=selector)[1])["metadata"]
             ["resourceVersion"])])
        assert status == 200, f"watch {resource.kind}: {data[:300]!r}"


def test_service_account_can_patch_pods_and_write_events(sa_api: Any, world: dict[str, Any]) -> None:
    ns = world["namespace"]
    status, data = sa_call(sa_api, "PATCH", f"/api/v1/namespaces/{ns}/pods/web-0",
                           body={"metadata": {"annotations": {"zeroproxy.io/scale-to-zero": "true"}}},
                           content_type="application/merge-patch+json")
    assert status == 200, data
    assert json.loads(data)["metadata"]["annotations"]["zeroproxy.io/scale-to-zero"] == "true"
    ref = {"apiVersion": "v1", "kind": "Pod", "namespace": ns, "name": "web-0"}
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    core_event = {"apiVersion": "v1", "kind": "Event", "metadata": {"name": "web-0.zp1", "namespace": ns},
                  "involvedObject": ref, "reason": "ScaledToZero", "message": "checkpointed after 5m idle",
                  "type": "Normal", "source": {"component": "zeroproxy"}, "firstTimestamp": now,
                  "lastTimestamp": now, "count": 1}
    status, data = sa_call(sa_api, "POST", f"/api/v1/namespaces/{ns}/events", body=core_event)
    assert status == 201, data
    status, data = sa_call(sa_api, "PATCH", f"/api/v1/namespaces/{ns}/events/web-0.zp1", body={"count": 2},
                           content_type="application/merge-patch+json")
    assert status == 200, data
    new_event = {"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "web-0.zp2", "namespace": ns},
                 "regarding": ref, "reason": "Restored", "action": "Restore", "note": "restored on first connection",
                 "type": "Normal", "reportingController": "zeroproxy.io/agent", "reportingInstance": "zeroproxy-node-1",
                 "eventTime": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())}
    status, data = sa_call(sa_api, "POST", f"/apis/events.k8s.io/v1/namespaces/{ns}/events", body=new_event)
    assert status == 201, data
    status, data = sa_call(sa_api, "PATCH", f"/apis/events.k8s.io/v1/namespaces/{ns}/events/web-0.zp2",
                           body={"note": "restored again"}, content_type="application/merge-patch+json")
    assert status == 200, data


def test_forbidden_writes_are_refused(cluster: DevCluster, sa_api: Any, world: dict[str, Any]) -> None:
    ns, node = world["namespace"], world["node"]
    attempts = [
        ("POST", f"/api/v1/namespaces/{ns}/services",
         {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "sneaky"}, "spec": {"ports": [{"port": 1}]}},
         "application/json"),
        ("DELETE", f"/api/v1/nodes/{node}", None, "application/json"),
        ("PATCH", f"/api/v1/nodes/{node}", {"metadata": {"labels": {"owned": "yes"}}},
         "application/merge-patch+json"),
        ("PATCH", f"/api/v1/namespaces/{ns}/services/web", {"spec": {"ports": [{"port": 81}]}},
         "application/merge-patch+json"),
        ("POST", f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices",
         {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "x"},
          "addressType": "IPv4", "endpoints": []}, "application/json"),
        ("DELETE", f"/api/v1/namespaces/{ns}/pods/web-0", None, "application/json"),
        ("POST", f"/api/v1/namespaces/{ns}/pods",
         {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
          "spec": {"containers": [{"name": "c", "image": "i"}]}}, "application/json"),
        ("GET", f"/api/v1/namespaces/{ns}/secrets", None, "application/json"),
        ("GET", "/api/v1/configmaps", None, "application/json"),
    ]
    for method, path, body, content_type in attempts:
        status, data = sa_call(sa_api, method, path, body=body, content_type=content_type)
        assert status == 403, f"{method} {path} as the ServiceAccount: {status} {data[:200]!r}"
        assert json.loads(data)["reason"] == "Forbidden"
    # ...and nothing happened.
    status, node_obj = request(cluster, "GET", f"/api/v1/nodes/{node}")
    assert status == 200 and "owned" not in (node_obj["metadata"].get("labels") or {})
    assert request(cluster, "GET", f"/api/v1/namespaces/{ns}/services/sneaky")[0] == 404
    status, svc = request(cluster, "GET", f"/api/v1/namespaces/{ns}/services/web")
    assert [p["port"] for p in svc["spec"]["ports"]] == [80]


def test_role_grants_nothing_beyond_what_the_agent_needs(cluster: DevCluster, sa_token: str,
                                                         installed: list[Installed]) -> None:
    """SelfSubjectAccessReview for every verb on the agent's resources and on neighbours it must
    not touch: allowed exactly where AGENT_NEEDS says."""
    verbs = ["get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"]
    resources_to_check = [*AGENT_NEEDS, ("", "endpoints"), ("", "secrets"), ("", "configmaps"),
                          ("", "namespaces"), ("", "serviceaccounts"), ("", "pods/exec"), ("", "nodes/proxy"),
                          ("apps", "daemonsets"), ("rbac.authorization.k8s.io", "clusterroles")]
    wrong = []
    for group, resource in resources_to_check:
        name, _, sub = resource.partition("/")
        for verb in verbs:
            attrs = {"group": group, "resource": name, "verb": verb, "namespace": "default"}
            if sub:
                attrs["subresource"] = sub
            review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                      "spec": {"resourceAttributes": attrs}}
            status, body = request(cluster, "POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                                   review, token=sa_token)
            assert status == 201, body
            expected = verb in AGENT_NEEDS.get((group, resource), set())
            if body["status"]["allowed"] != expected:
                wrong.append(f"{verb} {group or 'core'}/{resource}: allowed={body['status']['allowed']}")
    assert wrong == []


# --- 3. the agent as the DaemonSet runs it ------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _capabilities() -> list[str]:
    return [c.lower() for c in by_kind("DaemonSet")["spec"]["template"]["spec"]["containers"][0]["securityContext"]
            ["capabilities"]["add"]]


class PodLikeAgent:
    """The agent in a private mount namespace that looks like the DaemonSet's pod.

    - the ServiceAccount token and CA at /var/run/secrets/kubernetes.io/serviceaccount (a tmpfs
      over /run, only in that namespace), so the agent takes its in-cluster path;
    - the ConfigMap's config.yaml as --config, with only apiServer pointed at the test server;
    - the test cgroup bind-mounted read-only onto itself, as the pod mounts the host's;
    - capability bounding set = the DaemonSet's `capabilities.add`; no_new_privs is not set,
      as in a pod with SYS_ADMIN (allowPrivilegeEscalation cannot be false then).

    Flags give what differs from a pod: the cgroup and pin paths (unique per test, never the
    machine's root cgroup) and free health and metrics ports.
    """

    def __init__(self, workdir: Path, cluster: DevCluster, token: str, node: str) -> None:
        self.workdir = workdir
        self.cgroup = cgroup2_mount() / f"zp-deploy-{uuid.uuid4().hex[:8]}"
        self.pin_dir = Path("/sys/fs/bpf") / f"zp-deploy-{uuid.uuid4().hex[:8]}"
        self.health_port = _free_port()
        self.metrics_port = _free_port()
        self.node = node
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "agent.log"
        secrets = workdir / "serviceaccount"
        secrets.mkdir()
        (secrets / "token").write_text(token)
        shutil.copy(cluster.ca_cert_path, secrets / "ca.crt")
        (secrets / "namespace").write_text(by_kind("ServiceAccount")["metadata"]["namespace"])
        text = by_kind("ConfigMap")["data"]["config.yaml"]
        placeholder = f"apiServer: {embedded_config()['apiServer']}"
        assert text.count(placeholder) == 1
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(text.replace(placeholder, f"apiServer: {cluster.url}"))
        self.cgroup.mkdir()

    def start(self, capabilities: list[str]) -> None:
        setpriv = ["setpriv", "--bounding-set=-all" + "".join(f",+{c}" for c in capabilities), "--inh-caps=-all"]
        agent = [sys.executable, "-m", "zeroproxy", "agent", "--config", str(self.config_path),
                 "--cgroup", str(self.cgroup), "--bpffs", str(self.pin_dir),
                 "--healthz-bind-address", f"127.0.0.1:{self.health_port}",
                 "--metrics-bind-address", f"127.0.0.1:{self.metrics_port}"]
        script = " && ".join([
            "mount -t tmpfs -o mode=0755 zp-run /run",
            f"mkdir -p {SA_DIR}",
            f"cp {self.workdir}/serviceaccount/token {self.workdir}/serviceaccount/ca.crt "
            f"{self.workdir}/serviceaccount/namespace {SA_DIR}/",
            f"mount --bind {self.cgroup} {self.cgroup}",
            f"mount -o remount,bind,ro {self.cgroup}",
            "exec " + shlex.join(setpriv + agent),
        ])
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "NODE_NAME": self.node,
               "HOME": str(self.workdir), "ZP_LOG_LEVEL": "info"}
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                         cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    def log(self) -> str:
        return self.log_path.read_bytes()[self.log_offset:].decode(errors="replace")

    def wait_for(self, text: str, timeout: float = AGENT_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode} before {text!r}:\n{log[-4000:]}")
            time.sleep(0.1)
        raise AssertionError(f"no {text!r} in the agent's log after {timeout}s:\n{self.log()[-4000:]}")

    def wait_exit(self, timeout: float = AGENT_TIMEOUT) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the agent kept running:\n{self.log()[-4000:]}") from None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}{path}", timeout=10) as resp:
                return int(resp.status), json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as e:
            return int(e.code), {}

    def api_errors(self) -> dict[str, float]:
        """The agent's failed lists and watches so far, from /metrics (a 403 is one of them)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        return {kind: float(value) for kind, value in
                re.findall(r'^zeroproxy_errors_total\{kind="(list|watch)"\} (\S+)$', text, re.M)}

    def close(self) -> None:
        try:
            self.stop()
        finally:
            cleanup(self.cgroup, self.pin_dir)
            with contextlib.suppress(FileNotFoundError):
                self.cgroup.rmdir()


def service_list(pin_dir: Path) -> list[dict[str, Any]]:
    """`zeroproxy service list -o json`, the command docs/install.md runs through kubectl exec."""
    proc = subprocess.run([sys.executable, "-m", "zeroproxy", "service", "list", "--bpffs", str(pin_dir), "-o", "json"],
                          cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout))


def test_agent_syncs_with_the_daemonsets_identity_config_and_capabilities(
        cluster: DevCluster, sa_token: str, world: dict[str, Any], tmp_path: Path) -> None:
    agent = PodLikeAgent(tmp_path, cluster, sa_token, world["node"])
    try:
        agent.start(_capabilities())
        log = agent.wait_for("initial sync done")
        # The ServiceAccount is granted all the agent asks for: no list or watch failed.
        assert agent.api_errors() == {"list": 0, "watch": 0}, log[-3000:]
        assert f"watching the Kubernetes API at {cluster.url}" in log, "apiServer from the ConfigMap's file"
        # The probes' endpoints.
        assert agent.get("/livez")[0] == 200
        status, health = agent.get("/healthz")
        assert status == 200 and health["lastUpdated"], health
        # What `kubectl exec ... zeroproxy service list` would show on this node.
        # Two Services exist: the test's, and default/kubernetes, which has no endpoints here
        # (the dev cluster runs no endpoint reconciler).
        status, kubernetes_svc = request(cluster, "GET", "/api/v1/namespaces/default/services/kubernetes")
        assert status == 200
        expected = {f"{world['cluster_ip']}:80/TCP": [f"{world['endpoint']}:8080"],
                    f"{kubernetes_svc['spec']['clusterIP']}:443/TCP": []}
        assert {s["frontend"]: s["backends"] for s in service_list(agent.pin_dir)} == expected
        assert agent.api_errors() == {"list": 0, "watch": 0}, agent.log()[-3000:]  # the watches too, by now

        # An upgrade / restart: the new agent adopts the pinned maps (BPF_MAP_GET_FD_BY_ID).
        agent.stop()
        agent.start(_capabilities())
        log = agent.wait_for("initial sync done")
        assert f"adopted {len(expected)} frontends, 1 backends" in log, log[-3000:]
        assert {s["frontend"]: s["backends"] for s in service_list(agent.pin_dir)} == expected

        # The same restart without SYS_ADMIN fails: that capability is not decoration.
        agent.stop()
        agent.start([c for c in _capabilities() if c != "sys_admin"])
        assert agent.wait_exit() != 0
        assert "Operation not permitted" in agent.log(), agent.log()[-3000:]
    finally:
        agent.close()
    assert not agent.cgroup.exists() and not agent.pin_dir.exists()
