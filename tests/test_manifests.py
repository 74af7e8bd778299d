"""The deployment files are consistent with each other and with the code, without a cluster.

A DaemonSet that mounts the cgroup at one path while the ConfigMap names another, a probe on a
port the health server does not use, a Containerfile that copies a file which is gone: each
of these would only show on a real node. Here they are cross-checked statically; the API
server's own verdict on the same files is in tests/test_deploy.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane import config as zpconfig
from testbed import images

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "manifests"
KUBEADM = MANIFESTS / "kubeadm"
CONTAINERFILE = REPO / "Containerfile"
IMAGE_ROOT = "/opt/zeroproxy"  # WORKDIR of the Containerfile; setup.sh puts the venv in $root/.venv


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifest_files() -> list[Path]:
    """The files kustomization.yaml installs, in its order."""
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    return [MANIFESTS / name for name in kustomization["resources"]]


def manifest_objects() -> list[dict[str, Any]]:
    return [doc for path in manifest_files() for doc in load_docs(path)]


def uninstall_objects() -> list[dict[str, Any]]:
    """The objects of manifests/uninstall, in its kustomization's order."""
    folder = MANIFESTS / "uninstall"
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in load_docs(folder / name)]


def by_kind(kind: str) -> dict[str, Any]:
    found = [o for o in manifest_objects() if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def daemonset_container() -> dict[str, Any]:
    containers = by_kind("DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def embedded_config() -> dict[str, Any]:
    return yaml.safe_load(by_kind("ConfigMap")["data"]["config.yaml"])


def mounts_by_path() -> dict[str, dict[str, Any]]:
    """container mountPath -> {mount, volume} for the DaemonSet's agent container."""
    volumes = {v["name"]: v for v in by_kind("DaemonSet")["spec"]["template"]["spec"]["volumes"]}
    return {m["mountPath"]: {"mount": m, "volume": volumes[m["name"]]} for m in daemonset_container()["volumeMounts"]}


# --- the manifest set ---------------------------------------------------------------------------


def test_kustomization_installs_every_manifest_once_namespace_first() -> None:
    listed = manifest_files()
    on_disk = sorted(p for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk, "kustomization.yaml and manifests/*.yaml disagree"
    assert listed == sorted(listed), "file names carry the apply order for `kubectl apply -f`; keep them sorted"
    first = load_docs(listed[0])
    assert [d["kind"] for d in first] == ["Namespace"], "the Namespace must be created before what lives in it"


def test_every_object_names_itself_and_lives_in_the_namespace() -> None:
    namespace = by_kind("Namespace")["metadata"]["name"]
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding", "RuntimeClass"}
    kinds = []
    for obj in manifest_objects():
        assert obj.get("apiVersion") and obj.get("kind") and obj["metadata"].get("name"), obj
        kinds.append(obj["kind"])
        if obj["kind"] in cluster_scoped:
            assert "namespace" not in obj["metadata"], f"{obj['kind']} is cluster-scoped"
        else:
            assert obj["metadata"].get("namespace") == namespace, f"{obj['kind']} {obj['metadata']['name']}"
    assert sorted(kinds) == sorted(["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                                    "ConfigMap", "DaemonSet", "RuntimeClass"])


def test_names_refer_to_each_other() -> None:
    """The binding names the role and the account; the DaemonSet names the account and ConfigMap."""
    sa = by_kind("ServiceAccount")["metadata"]
    role = by_kind("ClusterRole")["metadata"]["name"]
    binding = by_kind("ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}]
    pod = by_kind("DaemonSet")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["name"]
    config_volumes = [v for v in pod["volumes"] if "configMap" in v]
    assert [v["configMap"]["name"] for v in config_volumes] == [by_kind("ConfigMap")["metadata"]["name"]]


# --- RBAC ---------------------------------------------------------------------------------------

# What the agent does with the API (issue 7): its watchers list and watch Services,
# EndpointSlices, Nodes and Pods; scale to zero patches Pods; it records Events through either
# API. Written out here rather than derived from the manifest, so a wider role fails the test.
AGENT_NEEDS = {
    ("", "services"): {"get", "list", "watch"},
    ("discovery.k8s.io", "endpointslices"): {"get", "list", "watch"},
    ("", "nodes"): {"get", "list", "watch"},
    ("", "pods"): {"get", "list", "watch", "patch"},
    ("", "events"): {"create", "patch"},
    ("events.k8s.io", "events"): {"create", "patch"},
}


def test_cluster_role_grants_exactly_what_the_agent_needs() -> None:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in by_kind("ClusterRole")["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, f"no resourceNames/nonResourceURLs: {rule}"
        for verb in rule["verbs"]:
            assert verb != "*", rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert "*" not in (group, resource), rule
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == AGENT_NEEDS


# --- the agent's configuration ---------------------------------------------------------------


def test_configmap_config_loads_and_names_the_api_server() -> None:
    cfg = zpconfig.parse(embedded_config())
    assert cfg.source == "kubernetes"
    # No kube-proxy yet means no `kubernetes` Service VIP: the address must be explicit, and
    # not a name that would need cluster DNS.
    assert cfg.api_server.startswith("https://")
    host = re.match(r"https://\[?([^\]/]+?)\]?:\d+$", cfg.api_server)
    assert host is not None and re.fullmatch(r"[0-9.]+|[0-9a-fA-F:]+", host.group(1)), cfg.api_server
    assert cfg.watch_pods, "scale to zero reads this node's Pods"
    # Scale to zero over the shim, for pods of the RuntimeClass the manifests install.
    assert (cfg.scale_to_zero.enabled, cfg.scale_to_zero.runtime) == (True, "shim")
    assert by_kind("RuntimeClass")["handler"] == by_kind("RuntimeClass")["metadata"]["name"] == "zeroproxy"
    assert by_kind("DaemonSet")["spec"]["template"]["spec"]["hostPID"] is True


def test_configmap_config_through_the_real_command_line() -> None:
    """`zeroproxy agent --config FILE --print-config`: the code path the DaemonSet's args take."""
    container = daemonset_container()
    args = container["args"]
    assert args[:1] == ["agent"] and "--config" in args
    config_path = Path(args[args.index("--config") + 1])
    assert config_path.parent.as_posix() in mounts_by_path(), "the --config file must come from a mount"
    assert config_path.name in by_kind("ConfigMap")["data"]
    import tempfile

    with tempfile.TemporaryDirectory(prefix="zp-manifest-") as tmp:
        local = Path(tmp) / config_path.name
        local.write_text(by_kind("ConfigMap")["data"][config_path.name])
        proc = subprocess.run([sys.executable, "-m", "zeroproxy", "agent", "--config", str(local), "--print-config"],
                              cwd=REPO, capture_output=True, text=True, check=False,
                              env={"NODE_NAME": "node-7", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["apiServer"] == embedded_config()["apiServer"]
    assert printed["nodeName"] == "node-7", "the node name comes from $NODE_NAME, which the DaemonSet sets"


def test_config_paths_and_ports_match_the_daemonset() -> None:
    cfg = zpconfig.parse(embedded_config())
    mounts = mounts_by_path()
    cgroup = mounts[str(cfg.cgroup)]
    assert cgroup["volume"]["hostPath"]["path"] == "/sys/fs/cgroup", "the host's cgroup v2 root"
    bpffs_mount = next(p for p in mounts if Path(p) in cfg.bpffs.parents)
    assert mounts[bpffs_mount]["volume"]["hostPath"]["path"] == "/sys/fs/bpf"
    container = daemonset_container()
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    _, health_port = zpconfig.split_host_port(cfg.healthz_bind_address)
    _, metrics_port = zpconfig.split_host_port(cfg.metrics_bind_address)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"healthz": health_port, "metrics": metrics_port}
    probes = {name: container[name]["httpGet"] for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {name: (p["path"], p["port"]) for name, p in probes.items()} == {
        "startupProbe": ("/livez", health_port),
        "livenessProbe": ("/livez", health_port),
        "readinessProbe": ("/healthz", health_port),
    }


# --- the DaemonSet ----------------------------------------------------------------------------


def test_daemonset_runs_on_every_node_as_a_node_critical_host_network_pod() -> None:
    ds = by_kind("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    # Default (the node's resolver), not ClusterFirstWithHostNet: cluster DNS is itself a
    # Service, reachable only once a service proxy runs, and the agent must start without it.
    assert pod["dnsPolicy"] == "Default"
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    selector = ds["spec"]["selector"]["matchLabels"]
    assert selector.items() <= ds["spec"]["template"]["metadata"]["labels"].items()


def test_daemonset_uses_precise_capabilities_not_privileged() -> None:
    security = daemonset_container()["securityContext"]
    assert security.get("privileged") is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # No SYS_RESOURCE: runc refuses a capability the runtime lacks (this VM withholds it), and
    # kernels >= 5.11 do not charge BPF maps to RLIMIT_MEMLOCK (tests/test_cluster.py runs it).
    assert security["capabilities"]["add"] == ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE",
                                               "CHECKPOINT_RESTORE"]
    # Bidirectional propagation is only allowed for privileged containers (the API server
    # refuses it otherwise, see test_deploy.py): the mounts must do without it.
    for path, entry in mounts_by_path().items():
        assert entry["mount"].get("mountPropagation") in (None, "HostToContainer", "None"), path


def test_daemonset_host_mounts() -> None:
    mounts = mounts_by_path()
    host = {path: e["volume"]["hostPath"]["path"] for path, e in mounts.items() if "hostPath" in e["volume"]}
    assert host == {
        "/sys/fs/bpf": "/sys/fs/bpf",
        "/host/sys/fs/cgroup": "/sys/fs/cgroup",
        "/lib/modules": "/lib/modules",
        "/usr/src": "/usr/src",
        "/var/lib/zeroproxy": "/var/lib/zeroproxy",
        "/run/zeroproxy": "/run/zeroproxy",
    }
    # Pins must reach the host's bpffs; headers and the cgroup are only read.
    assert mounts["/sys/fs/bpf"]["mount"]["mountPropagation"] == "HostToContainer"
    for path in ("/lib/modules", "/usr/src", "/host/sys/fs/cgroup"):
        assert mounts[path]["mount"].get("readOnly") is True, path
    assert mounts["/sys/fs/bpf"]["mount"].get("readOnly") is not True


def test_daemonset_command_is_the_one_the_image_installs() -> None:
    container = daemonset_container()
    assert container["command"] == [f"{IMAGE_ROOT}/.venv/bin/zeroproxy"]
    entrypoint = containerfile_instructions("ENTRYPOINT")
    assert len(entrypoint) == 1 and yaml.safe_load(entrypoint[0]) == container["command"]
    # setup.sh's default venv is the repository's .venv, i.e. $WORKDIR/.venv in the image.
    assert 'venv=${ZP_VENV:-$here/.venv}' in (REPO / "scripts" / "setup.sh").read_text()
    assert containerfile_instructions("WORKDIR") == [IMAGE_ROOT]



def _host_mounts(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """container mountPath -> host path, for a container's hostPath mounts."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    return {m["mountPath"]: volumes[m["name"]]["hostPath"]["path"] for m in container["volumeMounts"]
            if "hostPath" in volumes[m["name"]]}


def _assert_reaches_node_install_paths(pod: dict[str, Any], container: dict[str, Any], verb: str,
                                       extra: tuple[str, ...] = ()) -> None:
    """The container runs `zeroproxy node <verb> --host-root /host` and sees, under /host, every
    host directory scaletozero/nodeinstall.py writes by default (and no other host path)."""
    from scaletozero import nodeinstall as ni

    assert container["command"] == [f"{IMAGE_ROOT}/.venv/bin/zeroproxy"]
    assert container["args"] == ["node", verb, "--host-root", "/host"]
    paths = ni.Paths()
    wanted = {ni.DEFAULT_PREFIX, str(Path(paths.containerd_config).parent), str(Path(paths.criu_config).parent),
              *extra}
    assert _host_mounts(pod, container) == {f"/host{p}": p for p in wanted}
    # It finds the containerd that reads the config through the host's /proc.
    assert pod["hostPID"] is True
    security = container["securityContext"]
    assert security.get("privileged") is False
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["SYS_PTRACE"]}


def test_daemonset_installs_the_shim_before_the_agent_starts() -> None:
    pod = by_kind("DaemonSet")["spec"]["template"]["spec"]
    [init] = pod["initContainers"]
    assert init["image"] == daemonset_container()["image"]
    _assert_reaches_node_install_paths(pod, init, "install")


def test_uninstall_manifests_undo_the_installer_on_every_node() -> None:
    """manifests/uninstall: its own namespace, no API access, the same host paths as the
    installer plus the shims' sockets (it refuses while a pod still runs on the shim)."""
    from scaletozero import nodeinstall as ni

    kustomization = yaml.safe_load((MANIFESTS / "uninstall" / "kustomization.yaml").read_text())
    objects = uninstall_objects()
    assert kustomization["images"] == yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())["images"]
    [ns] = [o for o in objects if o["kind"] == "Namespace"]
    [ds] = [o for o in objects if o["kind"] == "DaemonSet"]
    assert ds["metadata"]["namespace"] == ns["metadata"]["name"] != by_kind("Namespace")["metadata"]["name"]
    pod = ds["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["tolerations"] == [{"operator": "Exists"}]
    [init] = pod["initContainers"]
    _assert_reaches_node_install_paths(pod, init, "uninstall", extra=(str(Path(ni.Paths().socket_dir).parent),))
    [done] = pod["containers"]
    assert "volumeMounts" not in done and done["securityContext"]["capabilities"] == {"drop": ["ALL"]}


# --- kubeadm ------------------------------------------------------------------------------------
# Field names of the kubeadm.k8s.io types the configs use, from kubeadm's documented Go types
# (cmd/kubeadm/app/apis/kubeadm/{v1beta2,v1beta3,v1beta4}/types.go, the `json:` tags; the same lists
# are on kubernetes.io/docs/reference/config-api/kubeadm-config.v1beta3 and .v1beta4). A nested
# mapping is a struct; a string names a leaf type. A config with a misspelt or version-wrong
# field would be rejected by kubeadm's strict decoding; this catches it without kubeadm.

_TYPE_META = {"apiVersion": "string", "kind": "string"}
_TAINT = {"key": "string", "value": "string", "effect": "string", "timeAdded": "string"}
_API_ENDPOINT = {"advertiseAddress": "string", "bindPort": "int"}
_HOST_PATH_MOUNT = {"name": "string", "hostPath": "string", "mountPath": "string", "readOnly": "bool",
                    "pathType": "string"}
_PATCHES = {"directory": "string"}
_NETWORKING = {"serviceSubnet": "string", "podSubnet": "string", "dnsDomain": "string"}
_EXTERNAL_ETCD = {"endpoints": ["string"], "caFile": "string", "certFile": "string", "keyFile": "string"}
_BOOTSTRAP_TOKEN = {"token": "string", "description": "string", "ttl": "string", "expires": "string",
                    "usages": ["string"], "groups": ["string"]}


def _kubeadm_v1beta2() -> dict[str, dict[str, Any]]:
    """kubeadm 1.15-1.21. No skipPhases (phases are skipped on the command line); the real
    kubeadm 1.20 reads this file in the cluster tests (tests/test_cluster.py)."""
    component = {"extraArgs": {"*": "string"}, "extraVolumes": [_HOST_PATH_MOUNT]}
    image_meta = {"imageRepository": "string", "imageTag": "string"}
    node_registration = {"name": "string", "criSocket": "string", "taints": [_TAINT],
                         "kubeletExtraArgs": {"*": "string"}, "ignorePreflightErrors": ["string"]}
    return {
        "InitConfiguration": {**_TYPE_META, "bootstrapTokens": [_BOOTSTRAP_TOKEN],
                              "nodeRegistration": node_registration, "localAPIEndpoint": _API_ENDPOINT,
                              "certificateKey": "string"},
        "ClusterConfiguration": {
            **_TYPE_META,
            "etcd": {"local": {**image_meta, "dataDir": "string", "extraArgs": {"*": "string"},
                               "serverCertSANs": ["string"], "peerCertSANs": ["string"]},
                     "external": _EXTERNAL_ETCD},
            "networking": _NETWORKING, "kubernetesVersion": "string", "controlPlaneEndpoint": "string",
            "apiServer": {**component, "certSANs": ["string"], "timeoutForControlPlane": "string"},
            "controllerManager": component, "scheduler": component, "dns": {**image_meta, "type": "string"},
            "certificatesDir": "string", "imageRepository": "string", "useHyperKubeImage": "bool",
            "featureGates": {"*": "bool"}, "clusterName": "string",
        },
    }


def _kubeadm_v1beta3() -> dict[str, dict[str, Any]]:
    component = {"extraArgs": {"*": "string"}, "extraVolumes": [_HOST_PATH_MOUNT]}
    image_meta = {"imageRepository": "string", "imageTag": "string"}
    node_registration = {"name": "string", "criSocket": "string", "taints": [_TAINT],
                         "kubeletExtraArgs": {"*": "string"}, "ignorePreflightErrors": ["string"],
                         "imagePullPolicy": "string"}
    return {
        "InitConfiguration": {**_TYPE_META, "bootstrapTokens": [_BOOTSTRAP_TOKEN],
                              "nodeRegistration": node_registration, "localAPIEndpoint": _API_ENDPOINT,
                              "certificateKey": "string", "skipPhases": ["string"], "patches": _PATCHES},
        "ClusterConfiguration": {
            **_TYPE_META,
            "etcd": {"local": {**image_meta, "dataDir": "string", "extraArgs": {"*": "string"},
                               "serverCertSANs": ["string"], "peerCertSANs": ["string"]},
                     "external": _EXTERNAL_ETCD},
            "networking": _NETWORKING, "kubernetesVersion": "string", "controlPlaneEndpoint": "string",
            "apiServer": {**component, "certSANs": ["string"], "timeoutForControlPlane": "string"},
            "controllerManager": component, "scheduler": component, "dns": image_meta,
            "certificatesDir": "string", "imageRepository": "string", "featureGates": {"*": "bool"},
            "clusterName": "string",
        },
    }


def _kubeadm_v1beta4() -> dict[str, dict[str, Any]]:
    arg = {"name": "string", "value": "string"}
    env = {"name": "string", "value": "string", "valueFrom": {"*": "any"}}
    component = {"extraArgs": [arg], "extraVolumes": [_HOST_PATH_MOUNT], "extraEnvs": [env]}
    image_meta = {"imageRepository": "string", "imageTag": "string"}
    node_registration = {"name": "string", "criSocket": "string", "taints": [_TAINT], "kubeletExtraArgs": [arg],
                         "ignorePreflightErrors": ["string"], "imagePullPolicy": "string",
                         "imagePullSerial": "bool"}
    timeouts = {name: "string" for name in ("controlPlaneComponentHealthCheck", "kubeletHealthCheck",
                                            "kubernetesAPICall", "etcdAPICall", "tlsBootstrap", "discovery",
                                            "upgradeManifests")}
    return {
        "InitConfiguration": {**_TYPE_META, "bootstrapTokens": [_BOOTSTRAP_TOKEN], "dryRun": "bool",
                              "nodeRegistration": node_registration, "localAPIEndpoint": _API_ENDPOINT,
                              "certificateKey": "string", "skipPhases": ["string"], "patches": _PATCHES,
                              "timeouts": timeouts},
        "ClusterConfiguration": {
            **_TYPE_META,
            "etcd": {"local": {**image_meta, "dataDir": "string", "extraArgs": [arg], "extraEnvs": [env],
                               "serverCertSANs": ["string"], "peerCertSANs": ["string"]},
                     "external": _EXTERNAL_ETCD},
            "networking": _NETWORKING, "kubernetesVersion": "string", "controlPlaneEndpoint": "string",
            "apiServer": {**component, "certSANs": ["string"]},
            "controllerManager": component, "scheduler": component,
            "dns": {**image_meta, "disabled": "bool"}, "proxy": {"disabled": "bool"},
            "certificatesDir": "string", "imageRepository": "string", "featureGates": {"*": "bool"},
            "clusterName": "string", "encryptionAlgorithm": "string", "certificateValidityPeriod": "string",
            "caCertificateValidityPeriod": "string",
        },
    }


KUBEADM_SCHEMAS = {"kubeadm.k8s.io/v1beta2": _kubeadm_v1beta2(), "kubeadm.k8s.io/v1beta3": _kubeadm_v1beta3(),
                   "kubeadm.k8s.io/v1beta4": _kubeadm_v1beta4()}
_LEAF_TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "int": (int,), "bool": (bool,), "any": (object,)}


def kubeadm_problems(value: Any, schema: Any, path: str) -> list[str]:
    """Every field of ``value`` that ``schema`` does not have, or whose shape differs."""
    if isinstance(schema, str):
        ok = isinstance(value, _LEAF_TYPES[schema]) and not (schema == "int" and isinstance(value, bool))
        return [] if ok else [f"{path}: must be {schema}, got {type(value).__name__}"]
    if isinstance(schema, list):
        if not isinstance(value, list):
            return [f"{path}: must be a list"]
        return [p for i, item in enumerate(value) for p in kubeadm_problems(item, schema[0], f"{path}[{i}]")]
    if not isinstance(value, dict):
        return [f"{path}: must be a mapping"]
    problems = []
    for key, item in value.items():
        if "*" in schema:
            problems += kubeadm_problems(item, schema["*"], f"{path}.{key}")
        elif key not in schema:
            problems.append(f"{path}.{key}: unknown field")
        else:
            problems += kubeadm_problems(item, schema[key], f"{path}.{key}")
    return problems


def kubeadm_documents() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, doc) for path in sorted(KUBEADM.glob("*.yaml")) for doc in load_docs(path)]


def test_kubeadm_configs_exist_for_v1beta2_v1beta3_and_v1beta4() -> None:
    versions = {(doc["apiVersion"], doc["kind"]) for _, doc in kubeadm_documents()}
    assert versions == {(v, k) for v in KUBEADM_SCHEMAS for k in ("InitConfiguration", "ClusterConfiguration")}


@pytest.mark.parametrize("name, doc", kubeadm_documents(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_kubeadm_config_fields_match_the_documented_types(name: str, doc: dict[str, Any]) -> None:
    schema = KUBEADM_SCHEMAS[doc["apiVersion"]][doc["kind"]]
    assert kubeadm_problems(doc, schema, f"{name}:{doc['kind']}") == []


def test_kubeadm_configs_skip_the_kube_proxy_addon() -> None:
    for name, doc in kubeadm_documents():
        if doc["kind"] == "InitConfiguration" and doc["apiVersion"].endswith("v1beta2"):
            # No skipPhases field before v1beta3: the file must say to skip it on the command line.
            assert "--skip-phases=addon/kube-proxy" in (KUBEADM / name).read_text().splitlines()[0], name
        elif doc["kind"] == "InitConfiguration":
            assert "addon/kube-proxy" in doc["skipPhases"], name
        if doc["kind"] == "ClusterConfiguration":
            assert doc.get("controlPlaneEndpoint"), f"{name}: nodes need a stable API server address"
            if doc["apiVersion"].endswith("v1beta4"):
                assert doc["proxy"] == {"disabled": True}, name


def test_kubeadm_field_check_catches_wrong_fields() -> None:
    """The checker itself: a typo, a v1beta4-only field in v1beta3 and a v1beta3 map-style
    extraArgs in v1beta4 are all reported."""
    v3, v4 = KUBEADM_SCHEMAS["kubeadm.k8s.io/v1beta3"], KUBEADM_SCHEMAS["kubeadm.k8s.io/v1beta4"]
    assert kubeadm_problems({"skipPhase": ["addon/kube-proxy"]}, v3["InitConfiguration"], "i") == [
        "i.skipPhase: unknown field"]
    assert kubeadm_problems({"proxy": {"disabled": True}}, v3["ClusterConfiguration"], "c") == [
        "c.proxy: unknown field"]
    assert kubeadm_problems({"apiServer": {"extraArgs": {"v": "2"}}}, v4["ClusterConfiguration"], "c") == [
        "c.apiServer.extraArgs: must be a list"]


# --- Containerfile ------------------------------------------------------------------------------


def containerfile_lines() -> list[str]:
    """Instructions with continuation lines joined and comments dropped (the image build's reader)."""
    return images.containerfile_lines(CONTAINERFILE)


def containerfile_instructions(name: str) -> list[str]:
    return [line.split(None, 1)[1] for line in containerfile_lines() if line.split(None, 1)[0].upper() == name]


BUILD_IMAGE = REPO / "scripts" / "build-image.sh"
ROOTFS_TARBALL = "build/zeroproxy-rootfs.tar"  # what `scripts/build-image.sh --rootfs` is told to write


def test_containerfile_adds_only_the_rootfs_that_build_image_writes() -> None:
    """The Containerfile wraps scripts/build-image.sh's rootfs tarball and nothing else, so the
    image a user builds with podman holds the files of the image the tests load."""
    assert containerfile_instructions("COPY") == []
    assert containerfile_instructions("ADD") == [f"{ROOTFS_TARBALL} /"]
    assert f"scripts/build-image.sh --rootfs {ROOTFS_TARBALL}" in CONTAINERFILE.read_text()
    assert f"--rootfs {ROOTFS_TARBALL}" in BUILD_IMAGE.read_text()
    # The tarball is a build product: ignored by git, never committed.
    ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", ROOTFS_TARBALL], check=False)
    assert ignored.returncode == 0, f"{ROOTFS_TARBALL} must be git-ignored"


def test_image_installs_with_the_projects_own_scripts() -> None:
    """Nothing is pulled or installed by the container builder: build-image.sh bootstraps
    Debian 12 (what setup.sh targets) with setup.sh's own package list, runs setup.sh inside
    the root and adds build-criu.sh's CRIU."""
    assert containerfile_instructions("FROM") == ["scratch"]
    assert containerfile_instructions("RUN") == [], "installs go through scripts/build-image.sh"
    script = BUILD_IMAGE.read_text()
    assert "bash /opt/zeroproxy/scripts/setup.sh" in script and "ZP_IMAGE_BUILD=1" in script
    assert 'bash "$here/scripts/build-criu.sh"' in script
    assert "sed -n '/^pkgs=(/,/)$/p' scripts/setup.sh" in script, "the image installs setup.sh's package list"
    assert re.search(r"mmdebstrap .*\\\n(?:.*\\\n)*\s*bookworm ", script), "the base is Debian 12 (bookworm)"
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    assert "apt-get install" not in code and "pip install" not in code, "installs go through setup.sh"
    # What setup.sh's `pip install -e` needs from the tree is copied in, to the Containerfile's WORKDIR.
    assert '"$root/opt/zeroproxy"' in script and containerfile_instructions("WORKDIR") == [IMAGE_ROOT]
    sources = subprocess.run(["bash", str(BUILD_IMAGE), "--print-sources"], capture_output=True, text=True,
                             check=True).stdout.split()
    packages = set(re.findall(r'"([a-z]+)"', (REPO / "pyproject.toml").read_text().split("packages =", 1)[1]
                              .split("]", 1)[0]))
    for package in packages:
        assert f"{package}/__init__.py" in sources, f"setup.sh installs {package} from the tree"
    for needed in ("pyproject.toml", "scripts/setup.sh", "scripts/lib/apt.sh"):
        assert needed in sources, needed
    assert all((REPO / f).is_file() for f in sources)


# --- docs -----------------------------------------------------------------------------------------


def test_config_doc_lists_every_field_and_no_other() -> None:
    text = (REPO / "docs" / "config.md").read_text()
    documented = set(re.findall(r"^### `([A-Za-z.]+)`", text, flags=re.MULTILINE))
    assert documented == set(zpconfig.config_fields())


def test_install_doc_points_at_files_that_exist() -> None:
    text = (REPO / "docs" / "install.md").read_text()
    for ref in set(re.findall(r"\b((?:manifests|docs|scripts)/[\w./-]+\.(?:yaml|md|sh))\b", text)):
        assert (REPO / ref).exists(), f"docs/install.md names {ref}, which does not exist"
    for needed in ("--skip-phases=addon/kube-proxy", "kube-proxy --cleanup", "KUBE-", "zeroproxy service list",
                   "zeroproxy status", "kubectl apply -k manifests/"):
        assert needed in text, needed
