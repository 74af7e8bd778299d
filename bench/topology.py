"""The benchmark's cluster: shared nginx backends, and one node + client pod per mode.

Layout (all built with the test bed, so it is torn down even when a run fails)::

    client-direct  -> node direct --+
    client-ipt     -> node ipt    --+-- underlay bridge -- node be -- be-0, be-1, be-2 (nginx)
    client-nft     -> node nft    --+
    client-zp      -> node zp     --+
    client-kp      -> node kp     --+   (the real kube-proxy 1.20.2, bench/kubeproxy.py)

Every mode takes the same path (pod -> its node -> underlay -> backend node -> backend pod),
like a ClusterIP whose endpoints run on another node. Each mode gets its own client node so
its datapath is installed once per service count and modes can be interleaved run by run
without reloading anything: kube-proxy-shaped rules sit in the ``ipt`` / ``nft`` node's
namespace (where kube-proxy puts them, hooked at PREROUTING), zeroproxy's socket programs on the
``zp`` node's cgroup (where its agent attaches), the real kube-proxy's rules in the ``kp``
node's namespace (written by kube-proxy itself from a real apiserver), and the ``direct`` node has neither, which also
keeps conntrack off its path.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import rules, zpctl
from bench.services import Service
from testbed.bed import Node, Pod, TestBed

log = logging.getLogger(__name__)

DIRECT, IPTABLES, NFTABLES, ZEROPROXY = "direct", "iptables", "nftables", "zeroproxy"
KUBE_PROXY = "kube-proxy"  # the real kube-proxy 1.20.2, iptables mode (bench/kubeproxy.py)
MODES = (DIRECT, IPTABLES, NFTABLES, ZEROPROXY, KUBE_PROXY)
NODE_NAMES = {DIRECT: "direct", IPTABLES: "ipt", NFTABLES: "nft", ZEROPROXY: "zp", KUBE_PROXY: "kp"}
BACKEND_PORT = 80
CLUSTER_CIDR = "10.244.0.0/16"  # every node's pod CIDR (10.244.N.0/24) lies inside it
REPO = Path(__file__).resolve().parent.parent

BACKEND_SYSCTLS = {
    # The server closes short connections first, so TIME_WAIT lands on the backend; when a
    # client address reaches the same backend again through another VIP within 60 s, PAWS drops
    # the SYN and each connection waits out a 1 s retransmit. Not keeping TIME_WAIT avoids it.
    "net.ipv4.tcp_max_tw_buckets": "0",
    "net.core.somaxconn": "4096",
    "net.ipv4.tcp_max_syn_backlog": "4096",
}
CLIENT_SYSCTLS = {
    "net.ipv4.ip_local_port_range": "1024 65000",  # fewer port reuses within conntrack's memory
}

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    default_type text/plain;
    server {{
        listen {port} backlog=4096;
        location / {{ return 200 "{name}\\n"; }}
    }}
}}
"""


def set_sysctls(bed: TestBed, netns: str, values: dict[str, str]) -> None:
    """Set namespace-local sysctls (sysctl(8) writes /proc/sys/net of the netns it runs in)."""
    bed.run_in_netns(netns, ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in values.items())])


def timed(bed: TestBed, netns: str, argv: Sequence[str], timeout: float = 1800.0) -> float:
    """Run a command in a bed namespace and return its wall time in seconds."""
    t0 = time.perf_counter()
    bed.run_in_netns(netns, argv, timeout=timeout)
    return time.perf_counter() - t0


class Topology:
    """Builds the layout above inside ``bed`` and owns the per-mode datapaths."""

    def __init__(self, bed: TestBed, workdir: Path, *, modes: Sequence[str] = MODES, backends: int = 3,
                 server_cpu: int | None = None, nft_chunk: int = 2000) -> None:
        self.bed = bed
        self.workdir = workdir
        self.modes = tuple(modes)
        self.backend_count = backends
        self.server_cpu = server_cpu
        self.nft_chunk = nft_chunk
        self.backend_node: Node | None = None
        self.backends: list[Pod] = []
        self.nodes: dict[str, Node] = {}
        self.clients: dict[str, Pod] = {}
        self.pin_dir = Path("/sys/fs/bpf") / f"{bed.id}-bench"
        self.agent_pin_dir = Path("/sys/fs/bpf") / f"{bed.id}-agent"
        self.agent_cgroup = bed.cgroup_root / "agent"  # empty: the agent attaches here, nothing runs here
        self.zpctl: subprocess.Popen[str] | None = None
        self.nft_loaded = False
        self.ipt_loaded = False
        self.kube_proxy: Any = None  # bench.kubeproxy.KubeProxy once started
        self.kube_proxy_order: list[int] = []  # service indices in kube-proxy's KUBE-SERVICES order
        self.kube_proxy_marks: tuple[float, float] = (0.0, 0.0)  # its sync count and last sync then
        self.kube_proxy_cleanup: dict[str, Any] = {}

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [(p.ip4, BACKEND_PORT) for p in self.backends]

    # -- building --------------------------------------------------------------------------------

    def build(self) -> None:
        self.backend_node = self.bed.add_node("be")
        for i in range(self.backend_count):
            pod = self.bed.add_pod(self.backend_node, f"be-{i}")
            set_sysctls(self.bed, pod.netns, BACKEND_SYSCTLS)
            self._start_nginx(pod)
            self.backends.append(pod)
        for mode in self.modes:
            node = self.bed.add_node(NODE_NAMES[mode])
            pod = self.bed.add_pod(node, f"client-{NODE_NAMES[mode]}")
            set_sysctls(self.bed, pod.netns, CLIENT_SYSCTLS)
            self.nodes[mode] = node
            self.clients[mode] = pod
        for pod in self.backends:
            self._wait_listening(pod)

    def _start_nginx(self, pod: Pod) -> None:
        d = self.workdir / f"nginx-{pod.name}"
        d.mkdir()
        conf = d / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=d, port=BACKEND_PORT, name=pod.name))
        argv = ["nginx", "-e", str(d / "error.log"), "-p", str(d), "-c", str(conf)]
        if self.server_cpu is not None:
            argv = ["taskset", "-c", str(self.server_cpu), *argv]
        pod.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _wait_listening(self, pod: Pod, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.bed.run_in_netns(pod.netns, ["ss", "-Hltn", f"sport = :{BACKEND_PORT}"]).stdout
            if out.strip():
                return
            time.sleep(0.05)
        err = (self.workdir / f"nginx-{pod.name}" / "error.log")
        raise RuntimeError(f"nginx in {pod.name} did not listen within {timeout} s: "
                           f"{err.read_text() if err.exists() else 'no error log'}")

    # -- iptables --------------------------------------------------------------------------------

    def load_iptables(self, services: Sequence[Service]) -> dict[str, Any]:
        """Replace the ipt node's rules with ``services`` (one iptables-restore, timed)."""
        node = self.nodes[IPTABLES]
        path = self.workdir / "iptables.rules"
        path.write_text(rules.iptables_restore(services, CLUSTER_CIDR))
        self.ipt_loaded = True  # set first: a failed load may still have left rules to remove
        seconds = timed(self.bed, node.netns, ["iptables-restore", str(path)])
        path.unlink()
        return {"seconds": seconds, "rules": rules.iptables_rule_count(services)}

    def unload_iptables(self) -> float:
        if not self.ipt_loaded:
            return 0.0
        path = self.workdir / "iptables.flush"
        path.write_text(rules.iptables_flush())
        seconds = timed(self.bed, self.nodes[IPTABLES].netns, ["iptables-restore", str(path)])
        self.ipt_loaded = False
        return seconds

    # -- nftables --------------------------------------------------------------------------------

    def load_nftables(self, services: Sequence[Service]) -> dict[str, Any]:
        """Replace the nft node's table with ``services``, ``nft_chunk`` services per transaction.

        One transaction for all services grows far worse than linearly (30 000 services took
        279 s with nftables 1.0.6; 10 000 took 69 s here), while chunks of a few thousand keep
        each ``nft -f`` short. The chunk times are returned so the report shows what was done.
        """
        self.unload_nftables()
        node = self.nodes[NFTABLES]
        path = self.workdir / "nft.rules"
        self.nft_loaded = True
        path.write_text(rules.nft_base(CLUSTER_CIDR))
        base = timed(self.bed, node.netns, ["nft", "-f", str(path)])
        chunks = []
        for i in range(0, len(services), self.nft_chunk):
            path.write_text(rules.nft_services(services[i:i + self.nft_chunk], CLUSTER_CIDR))
            chunks.append(timed(self.bed, node.netns, ["nft", "-f", str(path)]))
        path.unlink()
        return {"seconds": base + sum(chunks), "base_s": base, "chunk_s": chunks, "chunk": self.nft_chunk,
                "chains": rules.nft_chain_count(services)}

    def unload_nftables(self) -> float:
        if not self.nft_loaded:
            return 0.0
        seconds = timed(self.bed, self.nodes[NFTABLES].netns, ["nft", "delete", "table", "ip", rules.NFT_TABLE])
        self.nft_loaded = False
        return seconds

    # -- zeroproxy -------------------------------------------------------------------------------

    def _zp(self, **cmd: Any) -> dict[str, Any]:
        return zpctl.request(self.zpctl, "bench.zpctl", **cmd)

    def start_zeroproxy(self) -> dict[str, Any]:
        """Start the loader process and attach the programs to the zp node's cgroup."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        self.zpctl = subprocess.Popen([sys.executable, "-m", "bench.zpctl"], cwd=REPO, env=env, text=True,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        return self._zp(op="load", cgroup=str(self.nodes[ZEROPROXY].cgroup_path), pin_dir=str(self.pin_dir))

    def load_zeroproxy(self, count: int) -> dict[str, Any]:
        return self._zp(op="sync", count=count, endpoints=self.endpoints)

    def change_zeroproxy(self, index: int, endpoints: Sequence[tuple[str, int]]) -> dict[str, Any]:
        return self._zp(op="change", index=index, endpoints=list(endpoints))

    def measure_agent(self, services: Sequence[Service]) -> dict[str, Any]:
        """Cold start of the real agent with ``services`` in its file source (see bench.agentrun)."""
        from bench import agentrun

        netns = self.nodes[ZEROPROXY].netns
        return agentrun.measure(
            services, spawn=lambda argv, **kw: self.bed.spawn(netns, argv, **kw), workdir=self.workdir,
            cgroup=self.agent_cgroup, pin_dir=self.agent_pin_dir, node_name="be",
        )

    def prog_stats(self) -> dict[str, tuple[int, int]]:
        """(run_time_ns, run_cnt) of each pinned zeroproxy program (needs bpf_stats_enabled)."""
        from dataplane import bpfsys

        out = {}
        progs = self.pin_dir / "progs"
        for pin in sorted(progs.iterdir()) if progs.is_dir() else []:
            fd = bpfsys.obj_get(pin)
            try:
                info = bpfsys.prog_info(fd)
            finally:
                os.close(fd)
            out[pin.name] = (info.run_time_ns, info.run_cnt)
        return out

    def stop_zeroproxy(self) -> list[str]:
        """Stop the loader, detach the programs and remove the pins."""
        from dataplane import loader

        if self.zpctl is not None:
            zpctl.stop(self.zpctl)
            self.zpctl = None
        cgroup = self.nodes[ZEROPROXY].cgroup_path if ZEROPROXY in self.nodes else None
        done = loader.cleanup(cgroup, self.pin_dir)
        agent_cgroup = self.agent_cgroup if self.agent_cgroup.is_dir() else None
        return done + loader.cleanup(agent_cgroup, self.agent_pin_dir)

    # -- the real kube-proxy ----------------------------------------------------------------------

    def start_kube_proxy(self) -> dict[str, Any]:
        """The apiserver kube-proxy reads and its config; kube-proxy itself starts with the first N."""
        from bench.kubeproxy import KubeProxy

        self.kube_proxy = KubeProxy(self.bed, self.nodes[KUBE_PROXY], self.workdir, CLUSTER_CIDR)
        info = self.kube_proxy.start_api()
        return {**info, "config": self.kube_proxy.config()}

    def load_kube_proxy(self, services: Sequence[Service]) -> dict[str, Any]:
        """Post the services kube-proxy does not have yet, then time its restart (bench.kubeproxy)."""
        info = self.kube_proxy.program(services)
        self.kube_proxy_order = info.pop("order")
        self.kube_proxy_marks = self.kube_proxy.sync_marks()
        return {**info, "first_service": self.kube_proxy_order[0], "last_service": self.kube_proxy_order[-1]}

    def kube_proxy_service(self, services: Sequence[Service], position: str) -> Service:
        """The first or last service in kube-proxy's KUBE-SERVICES (Go map order, not index order)."""
        index = self.kube_proxy_order[0] if position == "first" else self.kube_proxy_order[-1]
        return services[index]

    def kube_proxy_order_now(self, services: Sequence[Service]) -> list[int]:
        return self.kube_proxy.rule_order(services)

    def kube_proxy_syncs_since_load(self) -> dict[str, Any]:
        """The syncs kube-proxy ran since load_kube_proxy read its order (its own metrics)."""
        count, last = self.kube_proxy.sync_marks()
        count0, last0 = self.kube_proxy_marks
        return {"syncs": count - count0, "last_sync_after_s": last - last0 if last > last0 else None}

    def stop_kube_proxy(self) -> None:
        if self.kube_proxy is not None:
            self.kube_proxy_cleanup = self.kube_proxy.close()
            self.kube_proxy = None
            if errors := self.kube_proxy_cleanup.get("errors"):
                raise RuntimeError("; ".join(errors))

    # -- teardown --------------------------------------------------------------------------------

    def teardown(self) -> list[str]:
        """Remove the baselines' rules and zeroproxy's programs; the bed removes the rest.

        Each step runs even if an earlier one failed; the errors are returned for the report.
        """
        errors: list[str] = []
        steps = [("iptables", self.unload_iptables), ("nftables", self.unload_nftables),
                 ("zeroproxy", self.stop_zeroproxy), (KUBE_PROXY, self.stop_kube_proxy)]
        for name, step in steps:
            if name == ZEROPROXY or name in self.nodes:
                try:
                    step()
                except Exception as exc:
                    log.warning("removing the %s datapath failed: %s", name, exc)
                    errors.append(f"{name}: {exc}")
        return errors

    def leftover_rules(self) -> dict[str, str]:
        """What iptables-save / nft list ruleset still show in the client nodes (should be empty)."""
        out = {}
        for mode, node in self.nodes.items():
            nft = self.bed.run_in_netns(node.netns, ["nft", "list", "ruleset"]).stdout
            ipt = self.bed.run_in_netns(node.netns, ["iptables-save"]).stdout
            kube = [line for line in (nft + ipt).splitlines() if "KUBE" in line or rules.NFT_TABLE in line]
            if kube:
                out[mode] = "\n".join(kube[:5])
        return out
