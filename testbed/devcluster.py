"""A real etcd + kube-apiserver on loopback, for tests, the demo and benchmarks.

zeroproxy's control plane must be tested against the real Kubernetes API (watch semantics,
resourceVersions, 410 Gone, RBAC), not a mock. No registry we can reach ships a kube-apiserver,
so ``scripts/build-apiserver.sh`` builds 1.20.2 from Debian's source package once and caches it;
``DevCluster`` runs that binary with Debian's etcd, both bound to 127.0.0.1 on free ports.

Kubernetes 1.20 serves EndpointSlices as ``discovery.k8s.io/v1beta1`` only; v1 came in 1.21.
By default (``endpointslice_api="v1"``) DevCluster turns the built-in v1beta1 off and serves v1
through a CRD with v1's schema, so the tests see the version current clusters serve. With
``endpointslice_api="v1beta1"`` it is the plain 1.20 API, as a kubeadm 1.20 cluster serves it:
the agent must find that by API discovery and fall back. No controller-manager runs: nothing
creates EndpointSlices, Endpoints or default ServiceAccounts, so callers create what they need
themselves.

Typical use::

    with DevCluster() as cluster:
        core = kubernetes.client.CoreV1Api(cluster.api_client())
        ...
        cluster.stop_apiserver()     # watches break, the agent must cope
        cluster.start_apiserver()    # same etcd, same URL, same credentials
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

APISERVER_VERSION = "1.20.2"
REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-apiserver.sh"
CACHE_DIR = Path(os.environ.get("ZP_CACHE_DIR", "/var/tmp/zeroproxy"))
APISERVER_BINARY = CACHE_DIR / f"kube-apiserver-{APISERVER_VERSION}" / "kube-apiserver"

ADMIN_USER = "zeroproxy-admin"
# DevCluster's EndpointSlice versions: "v1" from a CRD (the default) or 1.20's own "v1beta1".
ENDPOINTSLICE_APIS = ("v1", "v1beta1")
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"

_LOG_TAIL_LINES = 40
_PR_SET_PDEATHSIG = 1
# Looked up once here: dlopen/dlsym between fork and exec could deadlock on a lock that another
# thread held at fork time.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


class DevClusterError(RuntimeError):
    """etcd or kube-apiserver could not be built, started or reached; the message has log tails."""


_ensure_lock = threading.Lock()
_ensured: dict[str, Path] = {}


def ensure_apiserver() -> Path:
    """Return the cached kube-apiserver binary, building it (minutes, once per machine) if absent.

    The build script also installs etcd, so one call makes everything DevCluster runs present.
    Tests call this instead of skipping: a missing binary is built, a failed build fails loudly.
    """
    with _ensure_lock:
        if "apiserver" in _ensured:
            return _ensured["apiserver"]
        if not APISERVER_BINARY.exists():
            print(f"devcluster: building kube-apiserver {APISERVER_VERSION} with {BUILD_SCRIPT}; "
                  "the first build takes several minutes", file=sys.stderr)
        proc = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, check=False,
                              env={**os.environ, "ZP_CACHE_DIR": str(CACHE_DIR)})
        if proc.returncode != 0:
            raise DevClusterError(f"{BUILD_SCRIPT} failed (exit {proc.returncode}):\n"
                                  + _tail(proc.stderr.splitlines()))
        lines = proc.stdout.strip().splitlines()
        binary = Path(lines[-1]) if lines else APISERVER_BINARY
        if not os.access(binary, os.X_OK):
            raise DevClusterError(f"{BUILD_SCRIPT} printed {binary!r}, which is not an executable")
        for tool in ("etcd", "etcdctl", "openssl"):
            if shutil.which(tool) is None:
                raise DevClusterError(f"{tool} is not on PATH after {BUILD_SCRIPT} ran")
        _ensured["apiserver"] = binary
        return binary


def endpointslice_crd() -> dict[str, Any]:
    """The CRD that serves discovery.k8s.io/v1 EndpointSlices on a 1.20 apiserver.

    The schema follows the v1 API type so that objects round-trip through the typed client
    without pruning; validation is the structural part only (types, required fields, enums).
    """
    string: dict[str, Any] = {"type": "string"}
    boolean: dict[str, Any] = {"type": "boolean"}
    object_reference = {
        "type": "object",
        "properties": {name: string for name in
                       ("apiVersion", "fieldPath", "kind", "name", "namespace", "resourceVersion", "uid")},
    }
    endpoint = {
        "type": "object",
        "required": ["addresses"],
        "properties": {
            "addresses": {"type": "array", "minItems": 1, "maxItems": 100, "items": string},
            "conditions": {"type": "object",
                           "properties": {"ready": boolean, "serving": boolean, "terminating": boolean}},
            "hostname": string,
            "targetRef": object_reference,
            "deprecatedTopology": {"type": "object", "additionalProperties": string},
            "nodeName": string,
            "zone": string,
            "hints": {"type": "object", "properties": {hint: {
                "type": "array",
                "items": {"type": "object", "required": ["name"], "properties": {"name": string}}}
                for hint in ("forZones", "forNodes")}},
        },
    }
    port = {
        "type": "object",
        "properties": {
            "name": string,
            "protocol": {"type": "string", "enum": ["TCP", "UDP", "SCTP"]},
            "port": {"type": "integer", "format": "int32"},
            "appProtocol": string,
        },
    }
    schema = {
        "type": "object",
        "required": ["addressType", "endpoints"],
        "properties": {
            "apiVersion": string,
            "kind": string,
            "metadata": {"type": "object"},
            "addressType": {"type": "string", "enum": ["IPv4", "IPv6", "FQDN"]},
            "endpoints": {"type": "array", "maxItems": 1000, "items": endpoint},
            "ports": {"type": "array", "maxItems": 100, "items": port},
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": "endpointslices.discovery.k8s.io",
            # Groups under k8s.io are protected; the apiserver refuses the CRD without this.
            "annotations": {"api-approved.kubernetes.io": "unapproved, zeroproxy test stand-in for 1.21+"},
        },
        "spec": {
            "group": "discovery.k8s.io",
            "scope": "Namespaced",
            "names": {"plural": "endpointslices", "singular": "endpointslice",
                      "kind": "EndpointSlice", "listKind": "EndpointSliceList"},
            "versions": [{"name": "v1", "served": True, "storage": True,
                          "schema": {"openAPIV3Schema": schema}}],
        },
    }


def _tail(lines: Sequence[str], n: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(lines[-n:])


def _file_tail(path: Path, n: int = _LOG_TAIL_LINES) -> str:
    try:
        return _tail(path.read_text(errors="replace").splitlines(), n)
    except FileNotFoundError:
        return "(no log)"


def _free_port() -> int:
    """A port that was free a moment ago; callers retry if something grabs it first."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it if the process that started it dies.

    A test runner killed with SIGKILL never runs ``close()``; without this, etcd and the
    apiserver would outlive it. The kernel ties this to the forking *thread*, so start
    DevCluster from a thread that lives as long as the cluster (normally the main thread).
    """
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _stop_process(proc: subprocess.Popen[bytes] | None, *, kill: bool, timeout: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    if not kill:
        proc.terminate()
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    proc.wait()


def _run(cmd: Sequence[str], what: str) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DevClusterError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                              + _tail((proc.stdout + proc.stderr).splitlines()))
    return proc.stdout


class _Processes:
    """The cluster's child processes, kept apart from DevCluster so a finalizer can own them."""

    __slots__ = ("apiserver", "etcd")

    def __init__(self) -> None:
        self.etcd: subprocess.Popen[bytes] | None = None
        self.apiserver: subprocess.Popen[bytes] | None = None

    @staticmethod
    def cleanup(procs: _Processes, workdir: Path) -> None:
        _stop_process(procs.apiserver, kill=True)
        _stop_process(procs.etcd, kill=True)
        shutil.rmtree(workdir, ignore_errors=True)


class DevCluster:
    """etcd + kube-apiserver on 127.0.0.1 in a private temp dir, torn down by ``close()``.

    Everything the apiserver needs is generated fresh per cluster: a CA and serving cert, an
    admin bearer token (user ``zeroproxy-admin`` in ``system:masters``, so it is allowed
    everything under RBAC too) and service-account signing keys so the TokenRequest API and
    ServiceAccount tokens work. ``authorization_mode="RBAC"`` makes unprivileged tokens really
    be refused, which the deployment tests rely on.
    """

    def __init__(
        self,
        *,
        authorization_mode: str = "AlwaysAllow",
        service_cluster_ip_range: str = "10.96.0.0/12",
        extra_apiserver_args: Sequence[str] = (),
        startup_timeout: float = 90.0,
        tmp_parent: str | os.PathLike[str] | None = None,
        endpointslice_api: str = "v1",
    ) -> None:
        if authorization_mode not in ("AlwaysAllow", "RBAC"):
            raise ValueError(f"authorization_mode must be AlwaysAllow or RBAC, not {authorization_mode!r}")
        if endpointslice_api not in ENDPOINTSLICE_APIS:
            raise ValueError(f"endpointslice_api must be one of {', '.join(ENDPOINTSLICE_APIS)}, "
                             f"not {endpointslice_api!r}")
        self.authorization_mode = authorization_mode
        self.endpointslice_api = endpointslice_api
        self.service_cluster_ip_range = service_cluster_ip_range
        self.extra_apiserver_args = list(extra_apiserver_args)
        self.startup_timeout = startup_timeout
        self._tmp_parent = tmp_parent
        self.workdir: Path | None = None
        self.admin_token = secrets.token_hex(24)
        self.apiserver_port = 0
        self.etcd_client_port = 0
        self._procs = _Processes()
        self._apiserver_binary: Path | None = None
        self._apiserver_starts = 0
        self._finalizer: weakref.finalize[Any, DevCluster] | None = None

    # --- paths and addresses ----------------------------------------------------------------

    def _dir(self) -> Path:
        if self.workdir is None:
            raise DevClusterError("DevCluster is not started")
        return self.workdir

    @property
    def url(self) -> str:
        """The apiserver's HTTPS URL; it stays the same across stop/start_apiserver."""
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def endpointslice_api_version(self) -> str:
        """The apiVersion EndpointSlices are written with on this cluster."""
        return f"discovery.k8s.io/{self.endpointslice_api}"

    @property
    def endpointslice_path(self) -> str:
        """The cluster-wide EndpointSlice collection; ``/namespaces/<ns>`` goes before the plural."""
        return f"/apis/{self.endpointslice_api_version}/endpointslices"

    @property
    def etcd_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.etcd_client_port}"

    @property
    def kubeconfig_path(self) -> Path:
        """A kubeconfig for the admin user, usable by any process on this machine."""
        return self._dir() / "kubeconfig"

    @property
    def ca_cert_path(self) -> Path:
        return self._dir() / "pki" / "ca.crt"

    @property
    def apiserver_log(self) -> Path:
        return self._dir() / "apiserver.log"

    @property
    def etcd_log(self) -> Path:
        return self._dir() / "etcd.log"

    @property
    def apiserver_running(self) -> bool:
        return self._procs.apiserver is not None and self._procs.apiserver.poll() is None

    # --- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> DevCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> DevCluster:
        """Start etcd and the apiserver and wait until EndpointSlices are served."""
        if self.workdir is not None:
            raise DevClusterError("DevCluster already started")
        self._apiserver_binary = ensure_apiserver()
        self.workdir = Path(tempfile.mkdtemp(prefix="zp-devcluster-", dir=self._tmp_parent))
        # Kills and deletes everything at interpreter exit or garbage collection if the caller
        # never reaches close(); it holds the processes, not self, so self can be collected.
        self._finalizer = weakref.finalize(self, _Processes.cleanup, self._procs, self.workdir)
        try:
            self._write_pki()
            self._start_etcd()
            self._first_start_apiserver()
            if self.endpointslice_api == "v1":
                self._install_endpointslice_crd()
            else:
                self._wait_endpointslice_served()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Kill the apiserver and etcd and delete the temp dir; safe to call more than once.

        SIGKILL rather than a graceful stop: all state goes away with the temp dir anyway.
        """
        _stop_process(self._procs.apiserver, kill=True)
        _stop_process(self._procs.etcd, kill=True)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self._finalizer is not None:
            self._finalizer.detach()

    # --- credentials ------------------------------------------------------------------------

    def _write_pki(self) -> None:
        pki = self._dir() / "pki"
        pki.mkdir(mode=0o700)
        ca_key, ca_crt = pki / "ca.key", pki / "ca.crt"
        key, csr, crt, ext = pki / "apiserver.key", pki / "apiserver.csr", pki / "apiserver.crt", pki / "ext.cnf"
        _run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
              "-subj", "/CN=zeroproxy-devcluster-ca", "-keyout", str(ca_key), "-out", str(ca_crt)],
             "creating the CA")
        _run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=kube-apiserver",
              "-keyout", str(key), "-out", str(csr)], "creating the serving key")
        ext.write_text("basicConstraints=CA:FALSE\n"
                       "keyUsage=digitalSignature,keyEncipherment\n"
                       "extendedKeyUsage=serverAuth\n"
                       "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,"
                       "DNS:kubernetes.default,DNS:kubernetes.default.svc\n")
        _run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
              "-CAcreateserial", "-days", "3650", "-extfile", str(ext), "-out", str(crt)],
             "signing the serving cert")
        _run(["openssl", "genrsa", "-out", str(pki / "sa.key"), "2048"], "creating the service-account key")
        _run(["openssl", "rsa", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub")],
             "extracting the service-account public key")
        (pki / "tokens.csv").write_text(f'{self.admin_token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n')

    def _write_kubeconfig(self, path: Path, token: str, user: str) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "devcluster",
                          "cluster": {"server": self.url, "certificate-authority": str(self.ca_cert_path)}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "devcluster", "context": {"cluster": "devcluster", "user": user}}],
            "current-context": "devcluster",
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)

    def write_kubeconfig(self, path: str | os.PathLike[str], token: str, user: str = "user") -> Path:
        """Write a kubeconfig for another identity (e.g. a ServiceAccount token under RBAC)."""
        out = Path(path)
        self._write_kubeconfig(out, token, user)
        return out

    def api_client(self, token: str | None = None) -> Any:
        """A ``kubernetes.client.ApiClient`` for this cluster, as admin unless ``token`` is given."""
        from kubernetes import client, config

        if token is None:
            return config.new_client_from_config(config_file=str(self.kubeconfig_path))
        cfg = client.Configuration()
        cfg.host = self.url
        cfg.ssl_ca_cert = str(self.ca_cert_path)
        cfg.api_key = {"authorization": token}
        cfg.api_key_prefix = {"authorization": "Bearer"}
        return client.ApiClient(cfg)

    def service_account_token(self, namespace: str, name: str, expiration_seconds: int = 3600) -> str:
        """Create the ServiceAccount if needed and return a token for it (TokenRequest API).

        No controller-manager runs, so there are no auto-created token Secrets; TokenRequest is
        the one way to get a token here, as in a real cluster with bound tokens.
        """
        from kubernetes import client

        with self.api_client() as api:
            core = client.CoreV1Api(api)
            try:
                core.create_namespaced_service_account(
                    namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name)))
            except client.ApiException as e:
                if e.status != 409:
                    raise
            request = client.AuthenticationV1TokenRequest(
                spec=client.V1TokenRequestSpec(audiences=[SERVICE_ACCOUNT_ISSUER],
                                               expiration_seconds=expiration_seconds))
            response = core.create_namespaced_service_account_token(name, namespace, request)
            return str(response.status.token)

    def delete_namespace(self, name: str) -> None:
        """Delete a namespace and everything in it, now, as the namespace controller would.

        No controller-manager runs here, so a plain DELETE would leave the namespace Terminating
        for good, its objects still served and still seen by an agent's watch. So: mark it
        deleted, delete every namespaced object of every kind discovery lists (pods with no grace
        period: no kubelet will ever confirm them), then clear its finalizer. A namespace already gone is
        fine: fixtures call this in teardown whatever the test did.
        """
        from kubernetes import client

        with self.api_client() as api:
            def call(method: str, path: str, body: Any = None) -> Any:
                response = api.call_api(path, method, body=body, auth_settings=["BearerToken"],
                                        header_params={"Accept": "application/json",
                                                       "Content-Type": "application/json"},
                                        _preload_content=False, _return_http_data_only=True)
                return json.loads(response.data or b"{}")

            try:
                call("DELETE", f"/api/v1/namespaces/{name}")
            except client.ApiException as e:
                if e.status == 404:
                    return
                raise
            versions = ["/api/v1"] + [f"/apis/{v['groupVersion']}" for g in call("GET", "/apis")["groups"]
                                      for v in g["versions"]]
            for prefix in versions:
                for res in call("GET", prefix)["resources"]:
                    if not res["namespaced"] or "/" in res["name"] or not {"delete", "list"} <= set(res["verbs"]):
                        continue
                    collection = f"{prefix}/namespaces/{name}/{res['name']}"
                    # 1.20's Services have no deletecollection: those go one by one
                    paths = ([collection] if "deletecollection" in res["verbs"] else
                             [f"{collection}/{o['metadata']['name']}" for o in call("GET", collection)["items"]])
                    for path in paths:
                        try:
                            call("DELETE", f"{path}?gracePeriodSeconds=0")
                        except client.ApiException as e:
                            if e.status != 404:
                                raise
            ns = call("GET", f"/api/v1/namespaces/{name}")
            ns["spec"]["finalizers"] = []
            call("PUT", f"/api/v1/namespaces/{name}/finalize", ns)

    # --- etcd -------------------------------------------------------------------------------

    def _start_etcd(self) -> None:
        for attempt in range(3):
            self.etcd_client_port, peer_port = _free_port(), _free_port()
            client_url = self.etcd_endpoint
            peer_url = f"http://127.0.0.1:{peer_port}"
            cmd = ["etcd", "--name", "devcluster", "--data-dir", str(self._dir() / "etcd"),
                   "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
                   "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                   "--initial-cluster", f"devcluster={peer_url}", "--initial-cluster-state", "new",
                   "--log-outputs", "stderr", "--logger", "zap"]
            with open(self.etcd_log, "ab") as log:
                self._procs.etcd = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                              preexec_fn=_die_with_parent, start_new_session=True)
            try:
                self._wait(lambda: self._etcd_healthy(), self._procs.etcd, self.etcd_log, "etcd /health")
                return
            except DevClusterError:
                _stop_process(self._procs.etcd, kill=True)
                if attempt == 2 or "address already in use" not in _file_tail(self.etcd_log):
                    raise
                shutil.rmtree(self._dir() / "etcd", ignore_errors=True)

    def _etcd_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.etcd_endpoint}/health", timeout=2) as r:
                return bool(json.load(r).get("health") == "true")
        except (OSError, ValueError):
            return False

    def _etcdctl(self, *args: str) -> str:
        return _run(["etcdctl", f"--endpoints={self.etcd_endpoint}", *args], f"etcdctl {args[0]}")

    def etcd_revision(self) -> int:
        status = json.loads(self._etcdctl("endpoint", "status", "--write-out=json"))
        return int(status[0]["Status"]["header"]["revision"])

    def compact_etcd(self) -> int:
        """Compact etcd up to its current revision and return that revision.

        Afterwards any read of an older resourceVersion that reaches etcd fails with 410 Gone,
        e.g. a list with ``resource_version_match="Exact"``. Watches are served from the
        apiserver's watch cache, which still covers recent history; to make an old
        resourceVersion fail for a watch as well, restart the apiserver after compacting
        (its cache then starts at the current revision).
        """
        revision = self.etcd_revision()
        self._etcdctl("compact", str(revision), "--physical")
        return revision

    # --- apiserver --------------------------------------------------------------------------

    def _apiserver_args(self) -> list[str]:
        pki = self._dir() / "pki"
        return [
            f"--etcd-servers={self.etcd_endpoint}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.apiserver_port}",
            # 1.20 still opens an unauthenticated port 8080 by default; never on our machines.
            "--insecure-port=0",
            f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--token-auth-file={pki / 'tokens.csv'}",
            f"--authorization-mode={self.authorization_mode}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--api-audiences={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={self.service_cluster_ip_range}",
            # The reconciler would publish 127.0.0.1 as the endpoint of default/kubernetes, which
            # the API rejects (loopback) every 10 s; the Service itself is still created.
            "--endpoint-reconciler-type=none",
            # EndpointSlice v1 comes from our CRD; the built-in v1beta1 would own the group.
            *(["--runtime-config=discovery.k8s.io/v1beta1=false"] if self.endpointslice_api == "v1" else []),
            "--profiling=false",
            "--logtostderr=true",
            "--v=1",
            *self.extra_apiserver_args,
        ]

    def _first_start_apiserver(self) -> None:
        """Pick the apiserver's port; it is kept for restarts so kubeconfigs stay valid."""
        for attempt in range(3):
            self.apiserver_port = _free_port()
            self._write_kubeconfig(self.kubeconfig_path, self.admin_token, ADMIN_USER)
            try:
                self.start_apiserver()
                return
            except DevClusterError:
                self.stop_apiserver(kill=True)
                if attempt == 2 or "address already in use" not in _file_tail(self.apiserver_log):
                    raise

    def start_apiserver(self) -> None:
        """(Re)start the apiserver on the same port and etcd; returns once /readyz is ok and
        EndpointSlices (after the first start) are served again."""
        if self.apiserver_running:
            raise DevClusterError("the apiserver is already running")
        assert self._apiserver_binary is not None
        self._apiserver_starts += 1
        with open(self.apiserver_log, "ab") as log:
            log.write(f"\n===== devcluster: apiserver start #{self._apiserver_starts} =====\n".encode())
            log.flush()
            self._procs.apiserver = subprocess.Popen([str(self._apiserver_binary), *self._apiserver_args()],
                                               stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                               preexec_fn=_die_with_parent, start_new_session=True)
        self._wait(lambda: self._get("/readyz")[0] == 200, self._procs.apiserver, self.apiserver_log,
                   "kube-apiserver /readyz")
        if self._apiserver_starts > 1:
            self._wait_endpointslice_served()

    def stop_apiserver(self, *, kill: bool = False) -> None:
        """Stop the apiserver (SIGTERM, or SIGKILL with ``kill=True``); etcd keeps its data."""
        _stop_process(self._procs.apiserver, kill=kill)

    def restart_apiserver(self, *, kill: bool = False) -> None:
        self.stop_apiserver(kill=kill)
        self.start_apiserver()

    def _ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_cert_path))

    def _get(self, path: str) -> tuple[int, bytes]:
        """GET as admin; (0, b"") when the apiserver cannot be reached at all."""
        request = urllib.request.Request(self.url + path,
                                         headers={"Authorization": f"Bearer {self.admin_token}"})
        try:
            with urllib.request.urlopen(request, timeout=5, context=self._ssl_context()) as r:
                return int(r.status), r.read()
        except urllib.error.HTTPError as e:
            return int(e.code), e.read()
        except (OSError, ssl.SSLError):
            return 0, b""

    def _wait(self, ready: Any, proc: subprocess.Popen[bytes] | None, log: Path, what: str) -> None:
        """Poll ``ready()`` until true; fail fast with the log tail if the process exits."""
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if ready():
                return
            if proc is not None and proc.poll() is not None:
                raise DevClusterError(f"{what}: process exited with {proc.returncode}; {log}:\n"
                                      + _file_tail(log))
            if time.monotonic() > deadline:
                raise DevClusterError(f"{what} not ready after {self.startup_timeout:.0f}s; {log}:\n"
                                      + _file_tail(log))
            time.sleep(0.1)

    def _install_endpointslice_crd(self) -> None:
        from kubernetes import client

        with self.api_client() as api:
            ext = client.ApiextensionsV1Api(api)
            try:
                ext.create_custom_resource_definition(endpointslice_crd())
            except client.ApiException as e:
                if e.status != 409:
                    raise

            def established() -> bool:
                crd = ext.read_custom_resource_definition("endpointslices.discovery.k8s.io")
                return any(c.type == "Established" and c.status == "True"
                           for c in (crd.status.conditions or []))

            self._wait(established, self._procs.apiserver, self.apiserver_log, "EndpointSlice CRD Established")
        self._wait_endpointslice_served()

    def _wait_endpointslice_served(self) -> None:
        """Established is not enough: discovery and the handler come up a moment later."""
        self._wait(lambda: self._get(f"{self.endpointslice_path}?limit=1")[0] == 200,
                   self._procs.apiserver, self.apiserver_log, self.endpointslice_path)


