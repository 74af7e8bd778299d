"""Run every scenario at every service count and collect the results document.

Order of work per service count N: program every mode with the same N services (timing each
load: that is the control-plane scenario), record the loader's memory, then run the client
against each case -- direct, and first / last service of every service mode -- for each
scenario, ``rounds`` times, rotating the case order every round so that slow drifts of a shared
machine hit every mode alike (A B C D, B C D A, ...). After that: one zeroproxy run with
``kernel.bpf_stats_enabled=1`` for per-program cost, and one endpoint change per mode.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import platform
import re
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import SCHEMA, client, nodeport, rules
from bench.report import AGENT, ZP_FULL_SYNC, ZPCTL_PROCESS
from bench.services import Service, make_services
from bench.topology import CLUSTER_CIDR, DIRECT, IPTABLES, KUBE_PROXY, MODES, NFTABLES, ZEROPROXY, Topology, timed
from testbed.bed import NETNS_DIR, TestBed, cleanup_stale

log = logging.getLogger(__name__)

BED_PREFIX = "zpbench"
BPF_STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")
FIRST, LAST = "first", "last"
SERVICE_MODES = (IPTABLES, NFTABLES, ZEROPROXY, KUBE_PROXY)
NODEPORT, S2Z, APISOURCE = "nodeport", "s2z", "apisource"
SCENARIOS = (*client.SCENARIOS, NODEPORT, S2Z, APISOURCE)


@dataclass
class Config:
    """Everything that shapes a run; stored verbatim in the results so runs can be compared."""

    services: list[int]
    scenarios: list[str] = field(default_factory=lambda: list(client.SCENARIOS))
    modes: list[str] = field(default_factory=lambda: list(MODES))
    rounds: int = 3
    duration_s: float = 2.0
    warmup_s: float = 0.3
    threads: int = 1
    endpoints_per_service: int = 3
    client_cpu: int | None = None
    server_cpu: int | None = None
    nft_chunk: int = 2000
    bpf_stats: bool = True
    endpoint_change: bool = True
    agent: bool = True
    quick: bool = False
    nodeport_services: list[int] = field(default_factory=lambda: [1, 1000])
    apisource_services: list[int] = field(default_factory=lambda: [1000])
    s2z_cycles: int = 10
    s2z_steady: int = 50
    # The real kube-proxy runs only at N up to this (see KUBE_PROXY_CAP_NOTE); 0 = no cap.
    kube_proxy_max_services: int = 1000

    def kube_proxy_at(self, count: int) -> bool:
        """Whether the real kube-proxy mode runs at ``count`` services."""
        return KUBE_PROXY in self.modes and (not self.kube_proxy_max_services or count <= self.kube_proxy_max_services)

    @property
    def client_scenarios(self) -> list[str]:
        """The ClusterIP client scenarios among ``scenarios`` (the others are separate phases)."""
        return [s for s in self.scenarios if s in client.SCENARIOS]


@dataclass
class Case:
    """One thing the client is pointed at: a mode and, for service modes, which service."""

    mode: str
    position: str | None  # FIRST / LAST; None for direct

    @property
    def label(self) -> str:
        return self.mode if self.position is None else f"{self.mode}/{self.position}"


def default_cpus() -> tuple[int | None, int | None]:
    """Client on the last CPU, servers on the first; no pinning on a one-CPU machine."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return cpus[-1], cpus[0]


def cases_for(count: int, modes: Sequence[str], kube_proxy_max: int = 0) -> list[Case]:
    out = [Case(DIRECT, None)] if DIRECT in modes else []
    positions = [FIRST] if count == 1 else [FIRST, LAST]  # with one service they are the same
    skip = {KUBE_PROXY} if kube_proxy_max and count > kube_proxy_max else set()
    out += [Case(m, p) for m in SERVICE_MODES if m in modes and m not in skip for p in positions]
    return out


KUBE_PROXY_CAP_NOTE = (
    "measured here: at 10 000 services the real kube-proxy 1.20.2's first iptables-restore (Debian's iptables-nft "
    "1.8.9) ran more than 9 minutes on one core, and its --cleanup as long again, so a run with it at 10 000 took "
    "over 25 minutes; above --kube-proxy-max-services it is stopped and the other modes run without it")


def rotated(items: Sequence[Case], k: int) -> list[Case]:
    k %= max(len(items), 1)
    return [*items[k:], *items[:k]]


# --- machine and tool description ---------------------------------------------------------------


def _cmd_version(argv: Sequence[str]) -> str:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (proc.stdout or proc.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def _dpkg_version(package: str) -> str:
    return _cmd_version(["dpkg-query", "-W", "-f=${Version}", package])


def tool_versions() -> dict[str, str]:
    repo = Path(__file__).resolve().parent.parent
    commit = _cmd_version(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    dirty = _cmd_version(["git", "-C", str(repo), "status", "--porcelain", "--", "bench", "bpf", "dataplane"])
    return {
        "zeroproxy": commit + (" (bench/bpf/dataplane modified)" if dirty not in ("", "unknown") else ""),
        "client": client.version(),
        "nginx": _cmd_version(["nginx", "-v"]),
        "iptables": _cmd_version(["iptables-restore", "--version"]),
        "nft": _cmd_version(["nft", "--version"]),
        "bcc": "python3-bpfcc " + _dpkg_version("python3-bpfcc"),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def ipvs_status() -> str:
    """Whether IPVS could be a column; the answer goes into the results instead of a column."""
    config = Path("/proc/config.gz")
    if Path("/proc/net/ip_vs").exists():
        return "available in this kernel but not measured"
    if config.exists():
        import gzip

        text = gzip.decompress(config.read_bytes()).decode(errors="replace")
        if re.search(r"^CONFIG_IP_VS=[ym]", text, re.M):
            return "built as a module in this kernel but not loaded; not measured"
        return "not measured: this kernel is built without IPVS (CONFIG_IP_VS is not set)"
    return "not measured: /proc/net/ip_vs is absent"


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    mem = re.search(r"^MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text(), re.M)
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": model.group(1).strip() if model else "unknown",
        "virtualised": bool(re.search(r"^flags\s*:.*\bhypervisor\b", cpuinfo, re.M)),
        "mem_total_mb": int(mem.group(1)) // 1024 if mem else None,
        "os": _os_release(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def _os_release() -> str:
    with contextlib.suppress(OSError):
        m = re.search(r'^PRETTY_NAME="?([^"\n]+)', Path("/etc/os-release").read_text(), re.M)
        if m:
            return m.group(1)
    return "unknown"


# --- bpf_stats ----------------------------------------------------------------------------------


@contextlib.contextmanager
def bpf_stats_enabled() -> Iterator[None]:
    """kernel.bpf_stats_enabled=1 for the block, then the previous value (it costs a few ns a run)."""
    old = BPF_STATS_SYSCTL.read_text().strip()
    BPF_STATS_SYSCTL.write_text("1")
    try:
        yield
    finally:
        BPF_STATS_SYSCTL.write_text(old)


# --- the run ------------------------------------------------------------------------------------


class Progress:
    """tqdm when it is installed and wanted; a no-op otherwise (the smoke test runs quietly)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar: Any = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)

    def step(self, text: str, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.set_description_str(text[:60])
            self.bar.update(n)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(text[:60])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def total_steps(cfg: Config) -> int:
    runs = (sum(len(cases_for(n, cfg.modes, cfg.kube_proxy_max_services)) for n in cfg.services)
            * len(cfg.client_scenarios) * cfg.rounds)
    extra = len(cfg.services) * (1 + int(cfg.bpf_stats) + int(cfg.endpoint_change))
    if NODEPORT in cfg.scenarios:
        extra += len(cfg.nodeport_services) * (1 + len(nodeport.cases(cfg.modes)) * cfg.rounds)
    extra += len(cfg.apisource_services) * int(APISOURCE in cfg.scenarios) + int(S2Z in cfg.scenarios)
    return runs + extra


def run(cfg: Config, *, progress: bool = True, keep_workdir: bool = False) -> dict[str, Any]:
    """Build the topology, run everything, tear it all down; return the results document."""
    if os.geteuid() != 0:
        raise SystemExit("the benchmark builds network namespaces and cgroups: run it as root")
    if cfg.client_cpu is None and cfg.server_cpu is None:
        cfg.client_cpu, cfg.server_cpu = default_cpus()
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "started": _now(),
        "machine": machine(),
        "tools": tool_versions(),
        "config": asdict(cfg),
        "notes": {
            "ipvs": ipvs_status(),
            "topology": "client pod -> its own node -> underlay bridge -> backend node -> nginx pod; one client "
                        "node per mode (rules / programs installed there), shared backends",
            "iptables": f"kube-proxy-shaped rules via {_cmd_version(['iptables-restore', '--version'])}, "
                        "in the ipt node's netns only",
            "nftables": f"kube-proxy-shaped table 'ip {rules.NFT_TABLE}' via nft -f in chunks of {cfg.nft_chunk} "
                        "services per transaction, in the nft node's netns only",
            "zeroproxy": "cgroup sock_addr programs attached to the zp node's cgroup; services written by "
                         "dataplane.ServiceMaps from a separate process (bench.zpctl)",
        },
        "runs": [],
        "programming": [],
        "endpoint_change": [],
        "memory": [],
        "bpf_stats": [],
        "cleanup": {},
    }
    if KUBE_PROXY in cfg.modes:
        from bench import kubeproxy

        results["tools"]["kube-proxy"] = kubeproxy.version()
        results["notes"]["kube-proxy"] = (
            "the real kube-proxy 1.20.2, iptables mode, as a process in the kp node's netns, reading Services and "
            "discovery.k8s.io/v1beta1 EndpointSlices from a real kube-apiserver 1.20.2 (DevCluster); first/last = "
            "first/last service in its KUBE-SERVICES chain (Go map order), read after programming")
    if NODEPORT in cfg.scenarios:
        results["nodeport"] = {"runs": [], "programming": []}
        results["notes"]["nodeport"] = nodeport.__doc__.split("\n\n")[0].replace("\n", " ")
    binary = client.build()
    cleanup_stale(BED_PREFIX)
    bar = Progress(total_steps(cfg), progress)
    workdir = Path(tempfile.mkdtemp(prefix="zpbench-"))
    bed = TestBed(prefix=BED_PREFIX)
    topo = Topology(bed, workdir, modes=cfg.modes, server_cpu=cfg.server_cpu, nft_chunk=cfg.nft_chunk)
    results["cleanup"].update(bed_id=bed.id, pin_dir=str(topo.pin_dir), workdir=str(workdir))
    np_topo = None
    if NODEPORT in cfg.scenarios:
        np_topo = nodeport.NodePortTopology(topo, nodeport_modes(cfg.modes), max(cfg.nodeport_services))
        results["cleanup"]["nodeport_pin_dir"] = str(np_topo.pin_dir)
    try:
        bar.note("building the topology")
        topo.build()
        if cfg.endpoints_per_service != len(topo.endpoints):
            raise ValueError("endpoints_per_service must equal the number of backend pods")
        if ZEROPROXY in cfg.modes:
            info = topo.start_zeroproxy()
            results["programming"].append({"services": 0, "mode": ZEROPROXY, "what": "compile+attach",
                                           "seconds": info["load_s"] + info["attach_s"], **_pick(info)})
        if KUBE_PROXY in cfg.modes:
            bar.note("starting kube-apiserver for kube-proxy")
            results["kube_proxy"] = topo.start_kube_proxy()
        if np_topo is not None:
            np_topo.build()
        for count in cfg.services:
            _run_count(cfg, topo, binary, count, results, bar)
        if np_topo is not None:
            for count in cfg.nodeport_services:
                nodeport.run_count(np_topo, count, binary=binary, rounds=cfg.rounds, threads=cfg.threads,
                                   duration=cfg.duration_s, warmup=cfg.warmup_s, cpu=cfg.client_cpu,
                                   nft_chunk=cfg.nft_chunk, results=results["nodeport"], step=bar.step)
    finally:
        bar.close()
        errors = np_topo.teardown() if np_topo is not None else []
        results["cleanup"]["datapath_errors"] = errors + topo.teardown()
        if KUBE_PROXY in cfg.modes:
            kp = topo.kube_proxy_cleanup
            results["cleanup"]["kube_proxy"] = kp
            # the machine's own namespace: nothing of kube-proxy's may appear there
            results["cleanup"]["host_rules_unchanged"] = (
                kp.get("host_kube_lines_after") == kp.get("host_kube_lines_before") if kp else None)
        try:
            results["cleanup"]["leftover_rules"] = topo.leftover_rules()
            if np_topo is not None:
                results["cleanup"]["leftover_rules"].update(np_topo.leftover_rules())
        except Exception as exc:
            results["cleanup"]["leftover_rules"] = {"error": str(exc)}
        bed.close()
        results["cleanup"]["bed_closed"] = bed_removed(bed)
        if not keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if S2Z in cfg.scenarios:
        bar.note("scale to zero")
        results["scale_to_zero"] = run_scale_to_zero(cfg)
        bar.step("scale to zero")
    if APISOURCE in cfg.scenarios:
        from bench import apisource

        results["api_source"] = apisource.run(cfg.apisource_services, step=bar.step)
    results["finished"] = _now()
    derive(results)
    return results


def derive(results: dict[str, Any]) -> None:
    """Summaries and ratios: derived from the raw runs, so --render recomputes them."""
    results["summary"] = summarise(results["runs"])
    results["ratios"] = ratios(results["runs"])
    if "nodeport" in results:
        np = results["nodeport"]
        np["summary"] = summarise(np["runs"])
        np["ratios"] = ratios(np["runs"], direct_by_position=True, pairs=BASE_PAIRS)


def nodeport_modes(modes: Sequence[str]) -> list[str]:
    """The NodePort scenario has no kube-proxy column (yet): the real kube-proxy is ClusterIP only."""
    return [m for m in modes if m != KUBE_PROXY]


def run_scale_to_zero(cfg: Config) -> dict[str, Any]:
    """bench.scale_to_zero in a temporary directory; its raw series plus summaries in ms."""
    from bench import scale_to_zero

    with tempfile.TemporaryDirectory(prefix="zpbench-s2z-") as tmp:
        return scale_to_zero.run(cfg.s2z_cycles, cfg.s2z_steady, Path(tmp))


def bed_removed(bed: TestBed) -> bool:
    """True when none of the bed's namespaces or cgroups is left."""
    netns = [p for p in NETNS_DIR.glob(f"{bed.id}-*")]
    return not netns and not bed.cgroup_root.exists()


def _run_count(cfg: Config, topo: Topology, binary: Path, count: int, results: dict[str, Any],
               bar: Progress) -> None:
    services = make_services(count, topo.endpoints)
    bar.note(f"N={count}: programming")
    _program(cfg, topo, services, results)
    bar.step(f"N={count}: programmed")
    if KUBE_PROXY in cfg.modes and not cfg.kube_proxy_at(count):
        # Stopped, not idle: kube-proxy resyncs every 30 s, and its CPU would load the other modes' runs.
        topo.stop_kube_proxy()
        results["notes"]["kube-proxy-cap"] = KUBE_PROXY_CAP_NOTE
    cases = cases_for(count, cfg.modes, cfg.kube_proxy_max_services)
    kp_row = next((p for p in results["programming"] if p["mode"] == KUBE_PROXY and p["services"] == count), None)
    for scenario in cfg.client_scenarios:
        for rnd in range(cfg.rounds):
            for case in rotated(cases, rnd):
                bar.note(f"N={count} {scenario} r{rnd + 1} {case.label}")
                rec = run_case(cfg, topo, binary, services, case, scenario)
                rec.update(services=count, round=rnd)
                results["runs"].append(rec)
                bar.step(f"N={count} {scenario} r{rnd + 1} {case.label}")
    if kp_row is not None:
        # kube-proxy rewrites KUBE-SERVICES in a new order on every sync: say whether none came
        kp_row["order_unchanged"] = topo.kube_proxy_order_now(services) == topo.kube_proxy_order
        kp_row["during_runs"] = topo.kube_proxy_syncs_since_load()
    if cfg.bpf_stats and ZEROPROXY in cfg.modes:
        bar.note(f"N={count}: bpf_stats")
        results["bpf_stats"].extend(measure_bpf_stats(cfg, topo, binary, services))
        bar.step(f"N={count}: bpf_stats")
    if cfg.endpoint_change:
        bar.note(f"N={count}: endpoint change")
        results["endpoint_change"].extend(measure_endpoint_change(cfg, topo, services))
        bar.step(f"N={count}: endpoint change")


def _program(cfg: Config, topo: Topology, services: list[Service], results: dict[str, Any]) -> None:
    count = len(services)
    if IPTABLES in cfg.modes:
        info = topo.load_iptables(services)
        results["programming"].append({"services": count, "mode": IPTABLES, "what": "iptables-restore", **info})
    if NFTABLES in cfg.modes:
        info = topo.load_nftables(services)
        results["programming"].append({"services": count, "mode": NFTABLES, "what": "nft -f (chunked)", **info})
    if ZEROPROXY in cfg.modes:
        info = topo.load_zeroproxy(count)
        results["programming"].append({"services": count, "mode": ZEROPROXY, "what": "ServiceMaps.sync",
                                       "seconds": info["sync_s"], **_pick(info)})
        results["memory"].append({"services": count, "process": ZPCTL_PROCESS,
                                  "rss_kb": info["rss_kb"], "hwm_kb": info["hwm_kb"]})
    if ZEROPROXY in cfg.modes and cfg.agent:
        info = topo.measure_agent(services)
        results["programming"].append({"services": count, "mode": AGENT, "what": "zeroproxy agent --source file: "
                                       "start to 'initial sync done'", **info})
        results["memory"].append({"services": count, "process": "zeroproxy agent", "rss_kb": info["rss_kb"],
                                  "hwm_kb": info["hwm_kb"]})
    if cfg.kube_proxy_at(count):
        info = topo.load_kube_proxy(services)
        results["programming"].append({"services": count, "mode": KUBE_PROXY, "what": KUBE_PROXY_WHAT, **info})
        results["memory"].append({"services": count, "process": "kube-proxy", "rss_kb": info["rss_kb"],
                                  "hwm_kb": info["hwm_kb"]})


KUBE_PROXY_WHAT = ("kube-proxy restarted (rules removed by --cleanup) with N Services + EndpointSlices in the API, "
                   "until its rules hold all N; 'post': from POSTing the new services to the API until the running "
                   "kube-proxy's rules hold all N")


def target_of(case: Case, services: Sequence[Service], endpoints: Sequence[tuple[str, int]],
              topo: Topology | None = None) -> list[str]:
    if case.position is None:
        return [f"{ip}:{port}" for ip, port in endpoints]
    if case.mode == KUBE_PROXY and topo is not None:
        return [topo.kube_proxy_service(services, case.position).target]
    svc = services[0] if case.position == FIRST else services[-1]
    return [svc.target]


def run_case(cfg: Config, topo: Topology, binary: Path, services: Sequence[Service], case: Case,
             scenario: str) -> dict[str, Any]:
    """One client run; returns the client's JSON plus what was measured."""
    targets = target_of(case, services, topo.endpoints, topo)
    argv = client.argv(binary, targets, scenario=scenario, threads=cfg.threads, duration=cfg.duration_s,
                       warmup=cfg.warmup_s, cpu=cfg.client_cpu)
    pod = topo.clients[case.mode]
    out = pod.check_output(argv, timeout=cfg.duration_s + cfg.warmup_s + 60)
    result = client.parse(out)
    result.update(mode=case.mode, position=case.position, scenario=scenario, targets=targets)
    return result


def measure_bpf_stats(cfg: Config, topo: Topology, binary: Path,
                      services: Sequence[Service]) -> list[dict[str, Any]]:
    """Average run time per call of each zeroproxy program under short-connection load."""
    case = Case(ZEROPROXY, LAST if len(services) > 1 else FIRST)
    with bpf_stats_enabled():
        before = topo.prog_stats()
        rec = run_case(cfg, topo, binary, services, case, "short")
        after = topo.prog_stats()
    out = []
    for name, (ns1, cnt1) in after.items():
        ns0, cnt0 = before.get(name, (0, 0))
        runs = cnt1 - cnt0
        out.append({"services": len(services), "program": name, "run_cnt": runs, "run_time_ns": ns1 - ns0,
                    "ns_per_run": (ns1 - ns0) / runs if runs else None, "client_requests": rec["requests"]})
    return out


def measure_endpoint_change(cfg: Config, topo: Topology, services: list[Service]) -> list[dict[str, Any]]:
    """Time to apply "the last service lost one endpoint", and to put it back, per mode.

    zeroproxy: ServiceMaps.sync scoped to the changed frontend, as the agent does (in process),
    plus a full resync for comparison (mode ZP_FULL_SYNC). iptables: what
    kube-proxy's partial sync restores (KUBE-SERVICES in full plus the changed chains, --noflush).
    nftables: one small transaction on the changed chains. Both baselines include starting the
    tool, as kube-proxy does each sync. Once each call returns, new connections use the change.
    """
    svc = services[-1]
    shrunk = Service(svc.index, svc.vip, svc.port, svc.endpoints[:-1])
    out: list[dict[str, Any]] = []
    steps: list[tuple[str, str, Callable[[], float]]] = []
    full_syncs: list[float] = []

    def zp_change(endpoints: tuple[tuple[str, int], ...]) -> float:
        reply = topo.change_zeroproxy(svc.index, endpoints)
        full_syncs.append(reply["full_sync_s"])
        return reply["sync_s"]

    if ZEROPROXY in cfg.modes:
        steps += [
            (ZEROPROXY, "remove", lambda: zp_change(shrunk.endpoints)),
            (ZEROPROXY, "add", lambda: zp_change(svc.endpoints)),
        ]
    if IPTABLES in cfg.modes:
        steps += [
            (IPTABLES, "remove", lambda: _ipt_partial(topo, services, svc, shrunk)),
            (IPTABLES, "add", lambda: _ipt_partial(topo, services, shrunk, svc)),
        ]
    if NFTABLES in cfg.modes:
        steps += [
            (NFTABLES, "remove", lambda: _nft_partial(topo, svc, shrunk)),
            (NFTABLES, "add", lambda: _nft_partial(topo, shrunk, svc)),
        ]
    for mode, what, fn in steps:
        out.append({"services": len(services), "mode": mode, "change": f"{what} one endpoint of the last service",
                    "seconds": fn()})
    out += [{"services": len(services), "mode": ZP_FULL_SYNC, "change": "full resync of the table (no difference)",
             "seconds": s} for s in full_syncs]
    return out


def _ipt_partial(topo: Topology, services: list[Service], old: Service, new: Service) -> float:
    path = topo.workdir / "iptables.partial"
    current = [new if s.index == new.index else s for s in services]
    path.write_text(rules.iptables_partial(current, old, new, CLUSTER_CIDR))
    return timed(topo.bed, topo.nodes[IPTABLES].netns, ["iptables-restore", "--noflush", str(path)])


def _nft_partial(topo: Topology, old: Service, new: Service) -> float:
    path = topo.workdir / "nft.partial"
    path.write_text(rules.nft_update_service(old, new, CLUSTER_CIDR))
    return timed(topo.bed, topo.nodes[NFTABLES].netns, ["nft", "-f", str(path)])


# --- summaries ----------------------------------------------------------------------------------


def _pick(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if k not in ("ok",)}


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians over rounds per (N, scenario, mode, position)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["services"], r["scenario"], r["mode"], r["position"]), []).append(r)
    out = []
    for (count, scenario, mode, position), rs in sorted(groups.items(), key=lambda kv: _group_order(kv[0])):
        lat = [r["latency_us"] for r in rs]
        conn = [r["connect_us"] for r in rs]
        out.append({
            "services": count, "scenario": scenario, "mode": mode, "position": position, "rounds": len(rs),
            "p50_us": _median([x.get("p50") for x in lat]),
            "p90_us": _median([x.get("p90") for x in lat]),
            "p99_us": _median([x.get("p99") for x in lat]),
            "mean_us": _median([x.get("mean") for x in lat]),
            "connect_p50_us": _median([x.get("p50") for x in conn]),
            "rate": _median([r["rate"] for r in rs]),
            "requests": sum(r["requests"] for r in rs),
            "errors": sum(r["errors"] for r in rs),
        })
    return out


def _group_order(key: tuple[Any, ...]) -> tuple[Any, ...]:
    count, scenario, mode, position = key
    return (count, client.SCENARIOS.index(scenario) if scenario in client.SCENARIOS else 9,
            MODES.index(mode) if mode in MODES else 9, position or "")


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


BASE_PAIRS = {"zeroproxy_vs_direct": (ZEROPROXY, DIRECT), "iptables_vs_zeroproxy": (IPTABLES, ZEROPROXY),
              "nftables_vs_zeroproxy": (NFTABLES, ZEROPROXY)}
PAIRS = {**BASE_PAIRS, "kube_proxy_vs_zeroproxy": (KUBE_PROXY, ZEROPROXY),
         "kube_proxy_vs_iptables": (KUBE_PROXY, IPTABLES)}


def ratios(runs: list[dict[str, Any]], *, direct_by_position: bool = False,
           pairs: dict[str, tuple[str, str]] = PAIRS) -> list[dict[str, Any]]:
    """zeroproxy/direct, iptables/zeroproxy, nftables/zeroproxy, kube-proxy/zeroproxy and
    kube-proxy/iptables (the real program against its shape) for p50, p99 and rate.

    Each ratio, p99 too, is the median over rounds of the ratio *within* a round: the cases of one round
    run back to back, so pairing them cancels most of a shared machine's drift. With
    ``direct_by_position`` (NodePort: remote / local) direct has a case per position too.
    """
    by: dict[tuple[Any, ...], dict[str, Any]] = {
        (r["services"], r["scenario"], r["mode"], r["position"], r["round"]): r for r in runs}
    keys = sorted({(r["services"], r["scenario"], r["position"]) for r in runs if r["position"]},
                  key=lambda k: (k[0], client.SCENARIOS.index(k[1]) if k[1] in client.SCENARIOS else 9, k[2]))
    rounds = sorted({r["round"] for r in runs})
    out = []
    for count, scenario, position in keys:
        row: dict[str, Any] = {"services": count, "scenario": scenario, "position": position}
        for name, (a, b) in pairs.items():
            for metric in ("p50", "p99", "rate"):
                values = []
                for rnd in rounds:
                    pa = position if a != DIRECT or direct_by_position else None
                    pb = position if b != DIRECT or direct_by_position else None
                    ra = by.get((count, scenario, a, pa, rnd))
                    rb = by.get((count, scenario, b, pb, rnd))
                    if ra and rb:
                        va = ra["rate"] if metric == "rate" else ra["latency_us"].get(metric)
                        vb = rb["rate"] if metric == "rate" else rb["latency_us"].get(metric)
                        if (q := _ratio(va, vb)) is not None:
                            values.append(q)
                row[f"{name}_{metric}"] = _median(values)
        out.append(row)
    return out
