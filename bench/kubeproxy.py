"""The real kube-proxy 1.20.2 as a bench mode: iptables mode, in the ``kp`` node's namespace only.

The kube-proxy-shaped rule sets (bench/rules.py) say what a rule walk costs; this mode says
what the real program does with the same N services: which rules it writes (1.20 puts the
masquerade rule of every service into KUBE-SERVICES too, so a miss costs two rules per
service), and how long it takes from Services + EndpointSlices in the API to rules in the kernel.

Set-up, all of it owned by the bench and removed after the run:

- the real kube-apiserver 1.20.2 + etcd of the API-source scenario (``testbed.devcluster``),
  with ``endpointslice_api="v1beta1"``: kube-proxy 1.20 reads EndpointSlices through its
  v1beta1 informer (EndpointSliceProxying is on by default in 1.20), never Endpoints;
- kube-proxy as a plain process in the kp node's netns (setns, as every bed process; never
  ``ip netns exec``), with a KubeProxyConfiguration: ``mode: iptables``, ``conntrack.maxPerCore: 0``
  (nf_conntrack_max is global and read-only outside the root netns), ``bindAddress`` = the node's
  address (so it needs no Node object), healthz and metrics on addresses inside the netns;
- the apiserver listens on the machine's loopback, which a bed namespace cannot see: a relay
  listens on 127.0.0.1 *inside* the kp netns and dials the apiserver from the orchestrator's
  namespace (a socket keeps the namespace it was made in), so no address or route is added
  to the machine's namespace;
- ``iptables.syncPeriod: 1h``: kube-proxy 1.20 writes KUBE-SERVICES in Go map order, which
  changes with every sync; without periodic resyncs the order read after programming (which
  service is first and last in rule order) holds for the client runs. It is read again after
  them and the result says whether it held.

Teardown: SIGTERM, ``kube-proxy --cleanup`` in the netns (what it leaves -- 1.20 keeps
KUBE-MARK-*, the canary chains -- is recorded), then the bench empties the tables it touched.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from bench.services import NAMESPACE, Service
from dataplane.netns import in_netns
from testbed.bed import Node, TestBed
from testbed.relay import TCPRelay

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
VERSION = "1.20.2"
CACHE_DIR = Path(os.environ.get("ZP_CACHE_DIR", "/var/tmp/zeroproxy"))
BINARY = CACHE_DIR / f"k8s-{VERSION}" / "bin" / "kube-proxy"
BUILD_SCRIPT = REPO / "scripts" / "build-k8s.sh"
METRICS_PORT = 10249
HEALTHZ_PORT = 10256
CREATE_WORKERS = 8
SYNC_PERIOD = "1h"
MIN_SYNC_PERIOD = "1s"  # kube-proxy 1.20's default, written down so the results say it
SETTLE_S = 2.5  # quiet for longer than minSyncPeriod: no sync is pending
TABLES = ("nat", "filter", "mangle")
LAST_SYNC = "kubeproxy_sync_proxy_rules_last_timestamp_seconds"  # the end of the last successful sync
LAST_QUEUED = "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds"  # the last change that asked for one
_SVC_RULE = re.compile(r"^-A KUBE-SERVICES -d (\d+\.\d+\.\d+\.\d+)/32 .* -j KUBE-SVC-")


def ensure_binary() -> Path:
    """The cached kube-proxy; built by ``scripts/build-k8s.sh kube-proxy`` (idempotent) if absent."""
    if not os.access(BINARY, os.X_OK):
        log.warning("kube-proxy %s missing: running %s kube-proxy", BINARY, BUILD_SCRIPT)
        proc = subprocess.run(["bash", str(BUILD_SCRIPT), "kube-proxy"], capture_output=True, text=True)
        if proc.returncode != 0 or not os.access(BINARY, os.X_OK):
            raise RuntimeError(f"{BUILD_SCRIPT} kube-proxy failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return BINARY


def version() -> str:
    try:
        out = subprocess.run([str(BINARY), "--version"], capture_output=True, text=True, timeout=10).stdout
    except OSError as exc:
        return f"unavailable ({exc})"
    return out.strip() or "unknown"


# --- API objects ---------------------------------------------------------------------------------


def service_body(s: Service) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": s.name, "namespace": s.namespace},
            "spec": {"type": "ClusterIP", "clusterIP": s.vip,
                     "ports": [{"name": s.port_name, "port": s.port, "protocol": "TCP",
                                "targetPort": s.endpoints[0][1]}]}}


def slice_body(s: Service, node_name: str, api: str) -> dict[str, Any]:
    """An EndpointSlice in ``api`` (v1 or v1beta1); v1beta1 names the node in ``topology``, as
    1.20's controller writes it (its ``nodeName`` is alpha there and dropped on write)."""
    where = ({"topology": {"kubernetes.io/hostname": node_name}} if api == "v1beta1" else {"nodeName": node_name})
    return {"apiVersion": f"discovery.k8s.io/{api}", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"{s.name}-bench", "namespace": s.namespace,
                         "labels": {"kubernetes.io/service-name": s.name}},
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, **where} for ip, _ in s.endpoints],
            "ports": [{"name": s.port_name, "port": s.endpoints[0][1], "protocol": "TCP"}]}


def create_objects(api_client: Any, services: Sequence[Service], *, node_name: str, endpointslice_api: str,
                   workers: int = CREATE_WORKERS) -> dict[str, Any]:
    """POST each Service and its EndpointSlice (``workers`` in parallel); timed.

    Raw requests for the slice: the typed client has no discovery.k8s.io/v1beta1 any more.
    """
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    headers = {"Accept": "application/json", "Content-Type": "application/json"}

    def one(s: Service) -> None:
        core.create_namespaced_service(s.namespace, service_body(s), _preload_content=False).read()
        path = f"/apis/discovery.k8s.io/{endpointslice_api}/namespaces/{s.namespace}/endpointslices"
        api_client.call_api(path, "POST", body=slice_body(s, node_name, endpointslice_api), header_params=headers,
                            auth_settings=["BearerToken"], _preload_content=False,
                            _return_http_data_only=True).read()

    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for _ in pool.map(one, services):
            pass
    finally:
        pool.shutdown(cancel_futures=True)  # a run stopped half-way does not post the rest first
    seconds = time.perf_counter() - t0
    objects = 2 * len(services)
    return {"objects": objects, "seconds": seconds, "objects_per_s": objects / seconds if seconds else None}


# --- the relay from the node's loopback to the apiserver -----------------------------------------


# --- kube-proxy ----------------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format, unlabelled samples and histogram _sum/_count (what is read here)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        if "{" in name:
            continue
        with contextlib.suppress(ValueError):
            out[name] = float(value)
    return out


def kube_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "KUBE-" in line]


class KubeProxy:
    """kube-proxy + its apiserver for the bench's ``kp`` node; see the module docstring."""

    def __init__(self, bed: TestBed, node: Node, workdir: Path, cluster_cidr: str) -> None:
        self.bed = bed
        self.node = node
        self.workdir = workdir
        self.cluster_cidr = cluster_cidr
        self.cluster: Any = None
        self.api: Any = None
        self.relay: TCPRelay | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.config_path = workdir / "kube-proxy.yaml"
        self.kubeconfig_path = workdir / "kube-proxy.kubeconfig"
        self.log_path = workdir / "kube-proxy.log"
        self.posted = 0  # services[:posted] are in the API
        self.rules_touched = False
        self.cleanup: dict[str, Any] = {}

    # -- set-up ----------------------------------------------------------------------------------

    def start_api(self) -> dict[str, Any]:
        """apiserver + etcd, the bench namespace, the relay and kube-proxy's two config files."""
        from kubernetes import client

        from testbed.devcluster import DevCluster

        ensure_binary()
        self.cleanup["host_kube_lines_before"] = self.host_kube_lines()
        t0 = time.perf_counter()
        self.cluster = DevCluster(endpointslice_api="v1beta1").start()
        self.api = self.cluster.api_client()
        client.CoreV1Api(self.api).create_namespace(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}, _preload_content=False).read()
        self.relay = TCPRelay(("127.0.0.1", self.cluster.apiserver_port), listen_netns=self.node.netns,
                              name=f"kube-proxy-relay-{self.node.netns}")
        self.kubeconfig_path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "bench", "cluster": {"server": f"https://127.0.0.1:{self.relay.port}",
                                                       "certificate-authority": str(self.cluster.ca_cert_path)}}],
            "users": [{"name": "kube-proxy", "user": {"token": self.cluster.admin_token}}],
            "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "kube-proxy"}}],
            "current-context": "bench",
        }, sort_keys=False))
        self.kubeconfig_path.chmod(0o600)
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        api_s = time.perf_counter() - t0
        # Running and synced before the first services are posted, so that 'post' times the
        # watch -> rules path only, as on a node whose kube-proxy has been up for a while.
        t1 = time.time()
        self.start()
        first = self.wait_programmed([], t1, 300.0)
        return {"apiserver_start_s": api_s, "apiserver_dir": str(self.cluster.workdir),
                "kube_proxy_first_sync_s": first["seconds"],
                "kube_proxy_first_rules": first["nat_rules"]}

    def config(self) -> dict[str, Any]:
        return {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "mode": "iptables",
            "clientConnection": {"kubeconfig": str(self.kubeconfig_path)},
            "hostnameOverride": self.node.name,
            "bindAddress": self.node.ip4,
            "clusterCIDR": self.cluster_cidr,
            "healthzBindAddress": f"{self.node.ip4}:{HEALTHZ_PORT}",
            "metricsBindAddress": f"127.0.0.1:{METRICS_PORT}",
            "conntrack": {"maxPerCore": 0},
            "iptables": {"syncPeriod": SYNC_PERIOD, "minSyncPeriod": MIN_SYNC_PERIOD},
            "oomScoreAdj": 0,  # a bench process on a shared machine, not a node daemon to protect
        }

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("kube-proxy already runs")
        self.rules_touched = True
        with open(self.log_path, "ab") as logf:
            self.proc = self.node.run([str(BINARY), "--config", str(self.config_path), "--v=1"],
                                      stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- observing -------------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """kube-proxy's /metrics, fetched over a socket made inside the node's netns; {} if down."""
        try:
            with in_netns(self.node.netns):
                conn = http.client.HTTPConnection("127.0.0.1", METRICS_PORT, timeout=10)
                conn.connect()
            try:
                conn.request("GET", "/metrics")
                resp = conn.getresponse()
                body = resp.read().decode(errors="replace")
            finally:
                conn.close()
        except OSError:
            return {}
        return parse_metrics(body)

    def sync_marks(self) -> tuple[float, float]:
        """kube-proxy's sync count and the end of its last sync (its own metrics); (0, 0) if down."""
        m = self.metrics()
        return m.get("kubeproxy_sync_proxy_rules_duration_seconds_count", 0.0), m.get(LAST_SYNC, 0.0)

    def save(self, table: str = "nat") -> str:
        return self.bed.run_in_netns(self.node.netns, ["iptables-save", "-t", table], timeout=600).stdout

    def rule_order(self, services: Sequence[Service], nat: str | None = None) -> list[int]:
        """Indices of ``services`` in the order of their KUBE-SERVICES jumps to KUBE-SVC chains."""
        by_vip = {s.vip: s.index for s in services}
        out = []
        for line in (self.save() if nat is None else nat).splitlines():
            if (m := _SVC_RULE.match(line)) and m.group(1) in by_vip:
                out.append(by_vip[m.group(1)])
        return out

    def wait_programmed(self, services: Sequence[Service], since_wall: float, timeout: float) -> dict[str, Any]:
        """Until the rules hold all of ``services``; returns the time of the sync that did it.

        Polls kube-proxy's sync_proxy_rules_last_timestamp_seconds and reads the nat table only
        when a sync ended; ``seconds`` is that sync's end (kube-proxy's own timestamp) minus
        ``since_wall``, ``seen_s`` when the poll saw it.
        """
        want = len(services)
        deadline = time.monotonic() + timeout
        checked = 0.0
        polls = 0
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"kube-proxy exited ({self.proc and self.proc.returncode}): {self.log_tail()}")
            m = self.metrics()
            ts = m.get(LAST_SYNC, 0.0)
            if ts > checked:
                checked = ts
                polls += 1
                nat = self.save()
                order = self.rule_order(services, nat)
                if len(order) == want:
                    seen = time.time() - since_wall
                    # The sync that wrote them has ended by now: its end is the last sync
                    # timestamp (kube-proxy's clock is this machine's).
                    ts_end = self.metrics().get(LAST_SYNC, ts)
                    # Events still queued (the list's adds, as the informers deliver them) can
                    # bring one more sync a minSyncPeriod later, with KUBE-SERVICES in a new Go map
                    # order: the order the client runs rely on is the one of the rules in force
                    # once kube-proxy has been quiet for longer than that.
                    nat, after = self._settled(nat, deadline)
                    order = self.rule_order(services, nat)
                    lines = nat.splitlines()
                    return {"seconds": max(0.0, ts_end - since_wall), "seen_s": seen, "order": order,
                            "table_reads": polls,
                            "syncs": after.get("kubeproxy_sync_proxy_rules_duration_seconds_count"),
                            "sync_sum_s": after.get("kubeproxy_sync_proxy_rules_duration_seconds_sum"),
                            "kube_services_rules": sum(1 for x in lines if x.startswith("-A KUBE-SERVICES ")),
                            "nat_rules": sum(1 for x in lines if x.startswith("-A "))}
            time.sleep(0.05)
        raise RuntimeError(f"kube-proxy did not program {want} services within {timeout:.0f} s: {self.log_tail()}")

    def _settled(self, nat: str, deadline: float) -> tuple[str, dict[str, float]]:
        """The nat table and metrics once kube-proxy is quiet: no sync queued since the last one
        ended, and none ended for SETTLE_S (the table is re-read after each one).

        The quiet time alone is not enough: an informer event delivered during a long sync
        (1 000 services: seconds) queues the next one, which ends long after SETTLE_S of quiet.
        kube-proxy stamps every queued sync (sync_proxy_rules_last_queued_timestamp_seconds),
        so a queue stamp later than the last sync's end means one is pending or running.
        """
        m = self.metrics()
        last = m.get(LAST_SYNC, 0.0)
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < SETTLE_S or m.get(LAST_QUEUED, 0.0) > last:
            if time.monotonic() > deadline:
                raise RuntimeError(f"kube-proxy never stopped syncing: {self.log_tail()}")
            time.sleep(0.1)
            m = self.metrics()
            ts = m.get(LAST_SYNC, last)
            if ts != last:
                last, quiet_since = ts, time.monotonic()
                nat = self.save()
        return nat, m

    def rss_kb(self) -> dict[str, int]:
        out = {"rss_kb": 0, "hwm_kb": 0}
        if self.proc is None:
            return out
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key == "VmRSS":
                    out["rss_kb"] = int(value.split()[0])
                elif key == "VmHWM":
                    out["hwm_kb"] = int(value.split()[0])
        return out

    # -- the measurements ------------------------------------------------------------------------

    def program(self, services: Sequence[Service], timeout: float = 3600.0) -> dict[str, Any]:
        """Bring the API to ``services`` (posting the ones not there yet) and time two things.

        ``post``: from the first POST of the new services until kube-proxy's rules hold all N
        (kube-proxy runs and follows the watch; at the first N the API was empty).
        ``restart``: kube-proxy stopped, its rules removed (``--cleanup``, then emptied), started
        again with the N services in the API, until the rules hold all N -- from empty, like the
        other columns of the programming table.
        """
        if self.proc is None:
            raise RuntimeError("kube-proxy is not running: start_api() first")
        new = list(services[self.posted:])
        t0 = time.time()
        created = create_objects(self.api, new, node_name="be", endpointslice_api="v1beta1")
        self.posted = len(services)
        post = self.wait_programmed(services, t0, timeout)
        post.pop("order")
        post.update(posted=len(new), already=len(services) - len(new), created=created)

        self.stop()
        cleaned = self.run_cleanup()
        t0 = time.time()
        self.start()
        restart = self.wait_programmed(services, t0, timeout)
        order = restart.pop("order")
        syncs = restart.get("syncs") or 0
        restart["first_sync_s"] = restart.get("sync_sum_s") if syncs == 1 else None
        return {"seconds": restart["seconds"], "post": post, "restart": restart, "cleanup_between": cleaned,
                "order": order, **self.rss_kb()}

    def run_cleanup(self) -> dict[str, Any]:
        """``kube-proxy --cleanup`` in the node's netns, then empty what it leaves (recorded)."""
        t0 = time.perf_counter()
        proc = self.bed.run_in_netns(self.node.netns, [str(BINARY), "--cleanup", "--cleanup-ipvs=false", "--config",
                                                       str(self.config_path),
                                                       "--v=1"], check=False, timeout=600)
        seconds = time.perf_counter() - t0
        left = []
        for table in TABLES:
            left += [f"{table}: {line}" for line in kube_lines(self.save(table))]
        if left:  # 1.20's --cleanup keeps KUBE-MARK-DROP/-MASQ and the canary chains
            path = self.workdir / "kube-proxy.flush"
            path.write_text("".join(f"*{t}\nCOMMIT\n" for t in TABLES))
            self.bed.run_in_netns(self.node.netns, ["iptables-restore", str(path)], timeout=600)
            path.unlink()
        return {"exit": proc.returncode, "seconds": seconds, "left_by_cleanup": left,
                "stderr_tail": proc.stderr.strip().splitlines()[-3:] if proc.returncode else []}

    # -- teardown --------------------------------------------------------------------------------

    def close(self) -> dict[str, Any]:
        """Stop kube-proxy, remove its rules, stop the relay and the apiserver; what happened."""
        errors = []
        try:
            self.stop()
            if self.rules_touched:
                self.cleanup["final"] = self.run_cleanup()
                self.rules_touched = False
        except Exception as exc:
            errors.append(f"kube-proxy cleanup: {exc}")
        if self.relay is not None:
            self.relay.close()
            self.relay = None
        if self.api is not None:
            with contextlib.suppress(Exception):
                self.api.close()
            self.api = None
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None
        self.cleanup["host_kube_lines_after"] = self.host_kube_lines()
        if errors:
            self.cleanup["errors"] = errors
        return self.cleanup

    @staticmethod
    def host_kube_lines() -> list[str]:
        """KUBE- lines in the machine's own namespace (read only; must stay as they were)."""
        out = []
        for argv in (["iptables-save"], ["nft", "list", "ruleset"]):
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                out += kube_lines(subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout)
        return out
