"""DevCluster gives the control-plane tests a real etcd + kube-apiserver; check the parts they rely on.

The agent watches Services and discovery.k8s.io/v1 EndpointSlices with the typed client, must
survive the apiserver going away, must relist on 410 Gone and must run under RBAC with a
ServiceAccount token. Each of those behaviours is exercised here against the real processes.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client, watch

from testbed.devcluster import APISERVER_VERSION, DevCluster, DevClusterError, endpointslice_crd

# The first run on a fresh machine builds kube-apiserver inside the first fixture (minutes).
pytestmark = pytest.mark.timeout(1800)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


@pytest.fixture(scope="module")
def cluster() -> Iterator[DevCluster]:
    with DevCluster() as c:
        yield c


@pytest.fixture
def namespace(cluster: DevCluster) -> Iterator[str]:
    """A fresh namespace per test, deleted with everything in it afterwards (pass or fail)."""
    name = f"zp-{uuid.uuid4().hex[:8]}"
    with cluster.api_client() as api:
        client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        cluster.delete_namespace(name)


def test_delete_namespace_removes_it_and_its_objects(cluster: DevCluster) -> None:
    """No controller-manager runs, so DevCluster.delete_namespace does the namespace controller's
    work: afterwards neither the namespace nor anything in it is served, pods included."""
    name = f"zp-{uuid.uuid4().hex[:8]}"
    with cluster.api_client() as api:
        core, disc = client.CoreV1Api(api), client.DiscoveryV1Api(api)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        sa = client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="default"))
        core.create_namespaced_service_account(name, sa)
        core.create_namespaced_service(name, make_service("web"))
        disc.create_namespaced_endpoint_slice(name, make_slice("web", ["10.1.0.1"]))
        core.create_namespaced_pod(name, client.V1Pod(
            metadata=client.V1ObjectMeta(name="p"),
            spec=client.V1PodSpec(node_name="a", automount_service_account_token=False,
                                  containers=[client.V1Container(name="c", image="x")])))
        cluster.delete_namespace(name)
        assert name not in {n.metadata.name for n in core.list_namespace().items}
        for listed in (core.list_service_for_all_namespaces(), disc.list_endpoint_slice_for_all_namespaces(),
                       core.list_pod_for_all_namespaces(), core.list_service_account_for_all_namespaces()):
            assert [o.metadata.name for o in listed.items if o.metadata.namespace == name] == []
        cluster.delete_namespace(name)  # already gone: fine


def make_service(name: str, port: int = 80) -> client.V1Service:
    return client.V1Service(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1ServiceSpec(selector={"app": name},
                                  ports=[client.V1ServicePort(name="http", port=port, target_port=8080)]),
    )


def make_slice(service: str, addresses: list[str], ready: bool = True) -> client.V1EndpointSlice:
    # create needs apiVersion/kind: the CRD handler does not fill them in like a built-in type.
    return client.V1EndpointSlice(
        api_version="discovery.k8s.io/v1",
        kind="EndpointSlice",
        metadata=client.V1ObjectMeta(name=f"{service}-abc", labels={SERVICE_NAME_LABEL: service}),
        address_type="IPv4",
        endpoints=[client.V1Endpoint(addresses=[a], conditions=client.V1EndpointConditions(
            ready=ready, serving=True, terminating=False)) for a in addresses],
        ports=[client.DiscoveryV1EndpointPort(name="http", port=8080, protocol="TCP")],
    )


def delete_service(core: client.CoreV1Api, name: str, namespace: str) -> None:
    # 1.20 answers a Service delete with a Status that newer clients fail to deserialize.
    resp = core.delete_namespaced_service(name, namespace, _preload_content=False)
    assert resp.status == 200
    resp.release_conn()


def test_cluster_serves_real_api(cluster: DevCluster) -> None:
    with cluster.api_client() as api:
        assert client.VersionApi(api).get_code().git_version == f"v{APISERVER_VERSION}"
        # The apiserver's own bootstrap ran: system namespaces and default/kubernetes exist.
        names = {ns.metadata.name for ns in client.CoreV1Api(api).list_namespace().items}
        assert {"default", "kube-system"} <= names
        kubernetes_svc = client.CoreV1Api(api).read_namespaced_service("kubernetes", "default")
        assert kubernetes_svc.spec.cluster_ip == "10.96.0.1"
        groups = {g.name: [v.version for v in g.versions] for g in client.ApisApi(api).get_api_versions().groups}
    # EndpointSlice is only v1 (the CRD); the built-in v1beta1 is switched off.
    assert groups["discovery.k8s.io"] == ["v1"]
    assert cluster.url.startswith("https://127.0.0.1:")
    assert cluster.kubeconfig_path.is_file()


def test_service_and_endpointslice_v1_lifecycle(cluster: DevCluster, namespace: str) -> None:
    with cluster.api_client() as api:
        core, disc = client.CoreV1Api(api), client.DiscoveryV1Api(api)
        svc = core.create_namespaced_service(namespace, make_service("web"))
        assert svc.spec.cluster_ip.startswith("10.")
        created = disc.create_namespaced_endpoint_slice(namespace, make_slice("web", ["10.1.0.1", "10.1.0.2"]))
        assert isinstance(created, client.V1EndpointSlice)

        listed = disc.list_namespaced_endpoint_slice(namespace, label_selector=f"{SERVICE_NAME_LABEL}=web")
        assert [s.metadata.name for s in listed.items] == ["web-abc"]
        got = listed.items[0]
        assert [e.addresses for e in got.endpoints] == [["10.1.0.1"], ["10.1.0.2"]]
        assert got.endpoints[0].conditions.ready is True
        assert got.ports[0].port == 8080 and got.ports[0].name == "http"
        list_rv = listed.metadata.resource_version

        # Replace (the CRD refuses strategic merge patch; replace and JSON patch work).
        got.endpoints = [client.V1Endpoint(addresses=["10.1.0.3"],
                                           conditions=client.V1EndpointConditions(ready=False, serving=True,
                                                                                  terminating=True))]
        replaced = disc.replace_namespaced_endpoint_slice("web-abc", namespace, got)
        assert replaced.endpoints[0].conditions.terminating is True
        patched = disc.patch_namespaced_endpoint_slice(
            "web-abc", namespace, [{"op": "replace", "path": "/endpoints/0/addresses/0", "value": "10.1.0.4"}])
        assert patched.endpoints[0].addresses == ["10.1.0.4"]

        # Watch from the list's resourceVersion replays both updates in order.
        seen: list[tuple[str, list[str]]] = []
        w = watch.Watch()
        for event in w.stream(disc.list_namespaced_endpoint_slice, namespace, resource_version=list_rv,
                              timeout_seconds=30):
            obj = event["object"]
            assert isinstance(obj, client.V1EndpointSlice)
            seen.append((event["type"], obj.endpoints[0].addresses))
            if len(seen) == 2:
                w.stop()
        assert seen == [("MODIFIED", ["10.1.0.3"]), ("MODIFIED", ["10.1.0.4"])]

        delete_service(core, "web", namespace)
        with pytest.raises(client.ApiException) as err:
            core.read_namespaced_service("web", namespace)
        assert err.value.status == 404
        # No controller-manager: the slice outlives its Service until someone deletes it.
        assert len(disc.list_namespaced_endpoint_slice(namespace).items) == 1
        disc.delete_namespaced_endpoint_slice("web-abc", namespace)
        assert disc.list_namespaced_endpoint_slice(namespace).items == []


def test_endpointslice_schema_rejects_invalid_objects(cluster: DevCluster, namespace: str) -> None:
    bad = make_slice("bad", ["10.1.0.1"])
    bad.address_type = "IPv5"
    with cluster.api_client() as api, pytest.raises(client.ApiException) as err:
        client.DiscoveryV1Api(api).create_namespaced_endpoint_slice(namespace, bad)
    assert err.value.status == 422
    assert "addressType" in err.value.body


def _watch_in_thread(cluster: DevCluster, namespace: str, resource_version: str
                     ) -> tuple[threading.Thread, list[Any], threading.Event]:
    """Watch Services until the watch ends; returns (thread, [events..., exception or 'ended'], started)."""
    outcome: list[Any] = []
    started = threading.Event()

    def run() -> None:
        api = cluster.api_client()
        try:
            w = watch.Watch()
            stream = w.stream(client.CoreV1Api(api).list_namespaced_service, namespace,
                              resource_version=resource_version, timeout_seconds=300)
            started.set()
            for event in stream:
                outcome.append((event["type"], event["object"].metadata.name))
            outcome.append("ended")
        except Exception as e:
            outcome.append(e)
        finally:
            started.set()
            api.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, outcome, started


@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
def test_apiserver_restart_breaks_watch_then_relist_works(cluster: DevCluster, namespace: str,
                                                          kill: bool) -> None:
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespaced_service(namespace, make_service("before"))
        rv = core.list_namespaced_service(namespace).metadata.resource_version

    thread, outcome, started = _watch_in_thread(cluster, namespace, rv)
    assert started.wait(60)
    with cluster.api_client() as api:
        client.CoreV1Api(api).create_namespaced_service(namespace, make_service("during"))
    # The event proves the watch is established before the apiserver goes away.
    while not outcome:
        thread.join(0.1)
        assert thread.is_alive() or outcome
    assert outcome[0] == ("ADDED", "during")

    cluster.stop_apiserver(kill=kill)
    assert not cluster.apiserver_running
    thread.join(120)
    assert not thread.is_alive()
    # The client reconnects once on a closed stream; with the server gone that raises.
    assert isinstance(outcome[-1], Exception), outcome
    with cluster.api_client() as api, pytest.raises(Exception) as err:
        client.CoreV1Api(api).list_namespaced_service(namespace)
    assert not isinstance(err.value, client.ApiException), "no HTTP answer expected while stopped"

    cluster.start_apiserver()
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        relist = core.list_namespaced_service(namespace)
        assert sorted(s.metadata.name for s in relist.items) == ["before", "during"]
        # A new watch from the relist's resourceVersion sees new changes.
        core.create_namespaced_service(namespace, make_service("after"))
        w = watch.Watch()
        for event in w.stream(core.list_namespaced_service, namespace,
                              resource_version=relist.metadata.resource_version, timeout_seconds=60):
            assert (event["type"], event["object"].metadata.name) == ("ADDED", "after")
            w.stop()
        assert w.resource_version is not None
        assert int(w.resource_version) > int(relist.metadata.resource_version)


def test_compaction_makes_old_resource_version_gone(cluster: DevCluster, namespace: str) -> None:
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        svc = core.create_namespaced_service(namespace, make_service("old"))
        old_rv = svc.metadata.resource_version
        for i in range(3):
            svc = core.read_namespaced_service("old", namespace)
            svc.metadata.labels = {"generation": str(i)}
            core.replace_namespaced_service("old", namespace, svc)

        # Before compaction etcd still has the old revision.
        exact = core.list_namespaced_service(namespace, resource_version=old_rv, resource_version_match="Exact")
        assert [s.metadata.labels for s in exact.items] == [None]

        revision = cluster.compact_etcd()
        assert revision >= int(core.read_namespaced_service("old", namespace).metadata.resource_version)
        with pytest.raises(client.ApiException) as err:
            core.list_namespaced_service(namespace, resource_version=old_rv, resource_version_match="Exact")
        assert err.value.status == 410

    # After a restart the watch cache starts at the compacted revision: old watches get 410 too.
    cluster.restart_apiserver()
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        with pytest.raises(client.ApiException) as err:
            for _ in watch.Watch().stream(core.list_namespaced_service, namespace, resource_version=old_rv,
                                          timeout_seconds=30):
                pytest.fail("a watch from a compacted resourceVersion must not deliver events")
        assert err.value.status == 410
        # The recovery the agent performs: relist, then watch from the relist's version.
        relist = core.list_namespaced_service(namespace)
        assert [s.metadata.labels for s in relist.items] == [{"generation": "2"}]
        delete_service(core, "old", namespace)
        w = watch.Watch()
        for event in w.stream(core.list_namespaced_service, namespace,
                              resource_version=relist.metadata.resource_version, timeout_seconds=60):
            assert (event["type"], event["object"].metadata.name) == ("DELETED", "old")
            w.stop()


def test_rbac_mode_refuses_unprivileged_tokens(tmp_path: Any) -> None:
    with DevCluster(authorization_mode="RBAC") as rbac:
        with rbac.api_client() as api:  # admin: system:masters
            core, authz = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
            core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="zp-system")))
            token = rbac.service_account_token("zp-system", "zeroproxy")

        with rbac.api_client(token) as sa_api:
            with pytest.raises(client.ApiException) as err:
                client.CoreV1Api(sa_api).list_service_for_all_namespaces()
            assert err.value.status == 403
            assert "system:serviceaccount:zp-system:zeroproxy" in err.value.body

        with rbac.api_client("not-a-valid-token") as bad_api, pytest.raises(client.ApiException) as err:
            client.CoreV1Api(bad_api).list_service_for_all_namespaces()
        assert err.value.status == 401

        with rbac.api_client() as api:
            authz = client.RbacAuthorizationV1Api(api)
            authz.create_cluster_role(client.V1ClusterRole(
                metadata=client.V1ObjectMeta(name="zeroproxy"),
                rules=[client.V1PolicyRule(api_groups=[""], resources=["services"], verbs=["list", "watch"]),
                       client.V1PolicyRule(api_groups=["discovery.k8s.io"], resources=["endpointslices"],
                                           verbs=["list", "watch"])]))
            authz.create_cluster_role_binding(client.V1ClusterRoleBinding(
                metadata=client.V1ObjectMeta(name="zeroproxy"),
                role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="ClusterRole",
                                          name="zeroproxy"),
                subjects=[client.RbacV1Subject(kind="ServiceAccount", name="zeroproxy",
                                               namespace="zp-system")]))

        # The same token, through a kubeconfig file as the agent would use it outside a pod.
        kubeconfig = rbac.write_kubeconfig(tmp_path / "sa.kubeconfig", token, user="zeroproxy")
        from kubernetes import config
        with config.new_client_from_config(config_file=str(kubeconfig)) as sa_api:
            core, disc = client.CoreV1Api(sa_api), client.DiscoveryV1Api(sa_api)
            # The authorizer's informer picks the binding up asynchronously; poll, bounded by timeout.
            while True:
                try:
                    services = core.list_service_for_all_namespaces()
                    break
                except client.ApiException as e:
                    assert e.status == 403
                    threading.Event().wait(0.1)
            assert "kubernetes" in {s.metadata.name for s in services.items}
            assert disc.list_endpoint_slice_for_all_namespaces().items == []
            # Still only what the role grants.
            with pytest.raises(client.ApiException) as err:
                core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="nope")))
            assert err.value.status == 403


def test_v1beta1_mode_serves_1_20s_own_endpointslices(tmp_path: Any) -> None:
    """endpointslice_api="v1beta1": the API as kubeadm 1.20 serves it, no CRD, no v1."""
    with DevCluster(endpointslice_api="v1beta1", tmp_parent=tmp_path) as c, c.api_client() as api:
        groups = {g.name: [v.version for v in g.versions] for g in client.ApisApi(api).get_api_versions().groups}
        assert groups["discovery.k8s.io"] == ["v1beta1"]
        assert c.endpointslice_path == "/apis/discovery.k8s.io/v1beta1/endpointslices"
        assert c._get("/apis/discovery.k8s.io/v1/endpointslices")[0] == 404
        crds = client.ApiextensionsV1Api(api).list_custom_resource_definition().items
        assert not crds
        body = {"apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
                "metadata": {"name": "s", "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
                "endpoints": [{"addresses": ["10.244.0.1"], "nodeName": "a",
                               "topology": {"kubernetes.io/hostname": "a"},
                               "conditions": {"ready": True, "serving": True, "terminating": False}}]}
        resp = api.call_api("/apis/discovery.k8s.io/v1beta1/namespaces/default/endpointslices", "POST",
                            body=body, header_params={"Accept": "application/json",
                                                      "Content-Type": "application/json"},
                            auth_settings=["BearerToken"], _preload_content=False, _return_http_data_only=True)
        stored = json.loads(resp.data)
        resp.release_conn()
    # What a 1.20 apiserver keeps with default feature gates: topology and ready; nodeName
    # (EndpointSliceNodeName) and serving/terminating (EndpointSliceTerminatingCondition) are
    # alpha there and dropped on write. The agent reads what is left.
    endpoint = stored["endpoints"][0]
    assert endpoint["topology"] == {"kubernetes.io/hostname": "a"}
    assert "nodeName" not in endpoint and endpoint["conditions"] == {"ready": True}


def test_close_stops_processes_and_removes_files() -> None:
    c = DevCluster().start()
    workdir = c.workdir
    assert workdir is not None and workdir.is_dir()
    pids = [p.pid for p in (c._procs.etcd, c._procs.apiserver) if p is not None]
    assert len(pids) == 2
    c.close()
    c.close()  # idempotent
    assert not workdir.exists()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_startup_failure_reports_log_tail_and_cleans_up(tmp_path: Any) -> None:
    c = DevCluster(extra_apiserver_args=["--no-such-flag=1"], tmp_parent=tmp_path)
    with pytest.raises(DevClusterError) as err:
        c.start()
    assert "unknown flag: --no-such-flag" in str(err.value)
    assert list(tmp_path.iterdir()) == []
    pid = c._procs.etcd.pid if c._procs.etcd else None
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_endpointslice_crd_is_structural() -> None:
    """Every schema node has a type, which apiextensions v1 requires (structural schema)."""
    def check(node: dict[str, Any], path: str) -> None:
        assert "type" in node, path
        for name, child in node.get("properties", {}).items():
            check(child, f"{path}.{name}")
        if "items" in node:
            check(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            check(node["additionalProperties"], f"{path}{{}}")

    crd = endpointslice_crd()
    assert crd["spec"]["group"] == "discovery.k8s.io"
    check(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"], "$")
