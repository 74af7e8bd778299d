"""Kubernetes' own e2e tests (``e2e.test``, built from the same 1.20.2 tree) against the bed's cluster.

``run()`` lists the specs the focus selects (a dry run), drops the ones this machine cannot run
(``DROPPED``: each with its reason, e.g. a cloud load balancer), splits the rest into shards and
runs one ``e2e.test`` per shard side by side. e2e.test runs on the control-plane node: in its
netns and cgroup, with the node's admin kubeconfig, so it reaches node, pod and Service addresses
the way the tests expect of a machine in the cluster. The JUnit reports become one table, a
``{spec name: passed|failed|skipped}`` map, written as JSON so two proxies' runs compare on the
same list of names.

``./zp e2e --proxy kube-proxy`` is the anchor run (real kube-proxy 1.20.2, iptables mode);
``--proxy zeroproxy`` is what ``./zp test`` runs (tests/test_e2e_services.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed import kubecluster as kc

log = logging.getLogger(__name__)

SERVICES_FOCUS = r"\[sig-network\] Services"
RESULTS_DIR = kc.ROOT / "docs" / "e2e"
E2E_REGISTRY = f"{kc.IMAGE_REPOSITORY}/e2e"
SHARD_TIMEOUT_S = 1800.0

# Specs left out on this machine, by a regex on the spec name, each with its reason. Only what
# needs a cloud provider's load balancer: everything else runs, or skips itself and says why.
DROPPED: dict[str, str] = {
    r"[Ll]oad ?[Bb]alancer|ESIPP|LB health check|change the type and ports of a service":
        "needs a cloud provider's load balancer (this machine has no cloud)",
}
# Specs that restart or reconfigure what the others use: run alone, after the parallel shards.
SERIAL = r"\[Disruptive\]|\[Serial\]"


@dataclass
class Result:
    name: str
    status: str  # passed | failed | skipped
    seconds: float
    message: str = ""


def repo_list(path: Path) -> Path:
    """KUBE_TEST_REPO_LIST: every registry e2e 1.20's image manifest knows, mapped to the bed's."""
    keys = ("gcAuthenticatedRegistry", "e2eRegistry", "e2eVolumeRegistry", "promoterE2eRegistry",
            "buildImageRegistry", "invalidRegistry", "gcEtcdRegistry", "gcRegistry", "sigStorageRegistry",
            "privateRegistry", "sampleRegistry", "dockerLibraryRegistry", "dockerGluster", "microsoftRegistry")
    path.write_text("".join(f"{k}: {E2E_REGISTRY}\n" for k in keys))
    return path


def go_regex_escape(text: str) -> str:
    """Escape a spec name for a Go (RE2) regexp: every ASCII punctuation character."""
    return re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\1", text)


def dropped_reason(name: str) -> str | None:
    for pattern, reason in DROPPED.items():
        if re.search(pattern, name):
            return reason
    return None


def _e2e_argv(cluster: kc.KubeCluster, report_dir: Path, focus: str, *, dry_run: bool = False) -> list[str]:
    argv = [str(kc.BIN_DIR / "e2e.test"), "--kubeconfig=/etc/kubernetes/admin.conf", "--provider=local",
            f"--num-nodes={len(cluster.nodes)}", f"--report-dir={report_dir}", f"--ginkgo.focus={focus}",
            "--ginkgo.noColor", "--disable-log-dump", "--dump-logs-on-failure=false",
            f"--repo-root={kc.ROOT}"]
    if dry_run:
        argv.append("--ginkgo.dryRun")
    return argv


def parse_junit(path: Path) -> list[Result]:
    results = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "")
        seconds = float(case.get("time") or 0)
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        if failure is not None:
            results.append(Result(name, "failed", seconds, (failure.get("message") or failure.text or "")[:500]))
        elif case.find("skipped") is not None:
            results.append(Result(name, "skipped", seconds, (case.find("skipped").get("message") or "")[:200]))
        else:
            results.append(Result(name, "passed", seconds))
    return results


def list_specs(cluster: kc.KubeCluster, focus: str, work: Path) -> list[str]:
    """The spec names ``focus`` selects, from a dry run's JUnit report."""
    report = work / "dry-run"
    report.mkdir(parents=True, exist_ok=True)
    node = cluster.control_plane
    env = {"KUBE_TEST_REPO_LIST": str(repo_list(work / "repo-list.yaml"))}
    node.run(_e2e_argv(cluster, report, focus, dry_run=True), timeout=300, env=env)
    names = sorted({r.name for junit in report.glob("junit*.xml") for r in parse_junit(junit)
                    if re.search(focus, r.name) and r.status != "skipped"})
    if not names:
        raise kc.ClusterError(f"the e2e dry run selected no spec for focus {focus!r}")
    return names


def run(cluster: kc.KubeCluster, proxy: str, work: Path, *, focus: str = SERVICES_FOCUS,
        shards: int = 3) -> dict[str, Any]:
    """Run the focused e2e specs on ``cluster``; returns the table (see ``RESULTS_DIR``)."""
    start = time.monotonic()
    names = list_specs(cluster, focus, work)
    dropped = {n: r for n in names if (r := dropped_reason(n))}
    runnable = [n for n in names if n not in dropped]
    parallel = [n for n in runnable if not re.search(SERIAL, n)]
    serial = [n for n in runnable if re.search(SERIAL, n)]
    env = {"KUBE_TEST_REPO_LIST": str(repo_list(work / "repo-list.yaml"))}
    reports = _run_shards(cluster, work, [parallel[i::shards] for i in range(shards)], "shard", env)
    reports += _run_shards(cluster, work, [serial], "serial", env)
    return make_table(proxy, focus, len(cluster.nodes), runnable, dropped, reports, time.monotonic() - start)


def make_table(proxy: str, focus: str, nodes: int, runnable: list[str], dropped: dict[str, str],
               reports: list[Path], seconds: float) -> dict[str, Any]:
    """The run's table from its JUnit reports. Every report lists every spec, the ones another
    shard ran as skipped: a skip never overrides a result another report has."""
    results: dict[str, Result] = {}
    for report in reports:
        for junit in report.glob("junit*.xml"):
            for r in parse_junit(junit):
                if r.name in runnable and (r.name not in results or r.status != "skipped"):
                    results[r.name] = r
    work = reports[0].parent if reports else Path(".")
    if not any(r.status in ("passed", "failed") for r in results.values()):
        raise kc.ClusterError(f"no e2e spec ran ({len(results)} reported, all skipped): see the shard logs in {work}")
    table = {
        "schema": "zeroproxy-e2e/1", "proxy": proxy, "focus": focus,
        "kubernetes": f"v{kc.K8S_VERSION}", "nodes": nodes,
        "seconds": round(seconds, 1),
        "specs": {n: (results[n].status if n in results else "failed") for n in runnable},
        "messages": {n: results[n].message if n in results else "no result: the shard died or timed out"
                     for n in runnable if n not in results or results[n].status != "passed"},
        "dropped": dropped,
    }
    return table


def _run_shards(cluster: kc.KubeCluster, work: Path, groups: list[list[str]], prefix: str,
                env: dict[str, str]) -> list[Path]:
    """One e2e.test per non-empty group, side by side; waits for all; returns their report dirs."""
    procs = []
    for i, group in enumerate(g for g in groups if g):
        report = work / f"{prefix}-{i}"
        report.mkdir(parents=True, exist_ok=True)
        # Anchored at the end only: ginkgo matches against a text with a prefix before the name.
        focus = "(?:" + "|".join(go_regex_escape(n) for n in group) + ")$"
        procs.append((report, cluster.control_plane.spawn(_e2e_argv(cluster, report, focus), env=env,
                                                          log_to=work / f"{prefix}-{i}.log")))
        log.info("e2e %s %d: %d specs", prefix, i, len(group))
    deadline = time.monotonic() + SHARD_TIMEOUT_S
    for _, proc in procs:
        try:
            proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return [report for report, _ in procs]


def summary(table: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for status in table["specs"].values():
        counts[status] = counts.get(status, 0) + 1
    return (f"{table['proxy']}: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("passed", "failed", "skipped"))
            + f", {len(table['dropped'])} dropped, in {table['seconds']:.0f}s")


def markdown(tables: Sequence[dict[str, Any]]) -> str:
    """Spec names x proxies, the dropped specs with their reasons."""
    proxies = [t["proxy"] for t in tables]
    names = sorted({n for t in tables for n in t["specs"]})
    lines = [f"# Kubernetes e2e `{tables[0]['focus'] if tables else ''}`: " + " vs ".join(proxies), "",
             f"Kubernetes {tables[0]['kubernetes'] if tables else ''}, the same {tables[0]['nodes'] if tables else ''}"
             "-node kubeadm bed and DNS for every column, the same spec list "
             "(`./zp e2e --proxy kube-proxy|zeroproxy`; `./zp test` reruns zeroproxy's and fails on any spec "
             "kube-proxy passes and zeroproxy does not, except the named exceptions in tests/test_cluster.py).", "",
             "| spec | " + " | ".join(proxies) + " |", "|---|" + "---|" * len(proxies)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(t["specs"].get(n, "-") for t in tables) + " |")
    dropped = {n: r for t in tables for n, r in t["dropped"].items()}
    lines += ["", "Dropped (not run by either proxy):", ""]
    lines += [f"- {n}: {r}" for n, r in sorted(dropped.items())]
    lines += ["", *[f"- {summary(t)}" for t in tables]]
    return "\n".join(lines) + "\n"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "e2e", help="Kubernetes' e2e Services specs on a 2-node bed cluster (zeroproxy or real kube-proxy)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  ./zp e2e --proxy kube-proxy   # the anchor run: docs/e2e/services-kube-proxy.json\n"
               "  ./zp e2e --proxy zeroproxy\n")
    p.add_argument("--proxy", choices=("zeroproxy", "kube-proxy"), required=True)
    p.add_argument("--focus", default=SERVICES_FOCUS, help="ginkgo focus regex (default %(default)s)")
    p.add_argument("--shards", type=int, default=3, help="e2e.test processes side by side (default 3)")
    p.add_argument("--out", type=Path, default=None, help="JSON table path (default docs/e2e/services-PROXY.json)")
    p.set_defaults(func=cmd_e2e)


def write_results(table: dict[str, Any], out: Path) -> None:
    """The run's JSON table, and docs/e2e/services.md from every committed table."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    tables = [json.loads(p.read_text()) for p in sorted(RESULTS_DIR.glob("services-*.json"))]
    if tables:
        (RESULTS_DIR / "services.md").write_text(markdown(tables))


def cmd_e2e(args: argparse.Namespace) -> int:
    # The work dir (shard logs, JUnit reports) outlives the cluster, for reading after a run.
    work = kc.CACHE_DIR / "e2e-last" / args.proxy
    shutil.rmtree(work, ignore_errors=True)
    with kc.cluster(2, proxy=args.proxy) as cluster:
        table = run(cluster, args.proxy, work, focus=args.focus, shards=args.shards)
    write_results(table, args.out or RESULTS_DIR / f"services-{args.proxy}.json")
    print(summary(table))
    return 0
