"""bench/: the rule-set generators against the real iptables/nft tools, and a tiny end-to-end run.

No timing assertions: speed is what bench/ reports, not what tests check. The smoke run checks
that every mode really carried traffic (requests > 0, no failures), that every part of the results
document is filled in, and that nothing the benchmark created outlives it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import rules
from bench.services import make_services, service_entries, vip
from testbed.bed import NETNS_DIR, TestBed, find_cgroup2_mount

REPO = Path(__file__).resolve().parent.parent
ENDPOINTS = [("10.244.1.10", 80), ("10.244.1.11", 80), ("10.244.1.12", 80)]
CLUSTER_CIDR = "10.244.0.0/16"


@pytest.fixture(scope="session")
def bench_tools() -> None:
    """nginx, gcc and the bench extra; the set-up script is idempotent and fast once done."""
    subprocess.run(["bash", str(REPO / "scripts" / "setup-bench.sh")], check=True)


# --- pure functions ------------------------------------------------------------------------------


def test_services_are_deterministic_and_ordered() -> None:
    svcs = make_services(3, ENDPOINTS)
    assert [s.vip for s in svcs] == [vip(0), vip(1), vip(2)] == ["10.96.0.10", "10.96.0.11", "10.96.0.12"]
    assert [s.index for s in svcs] == [0, 1, 2]
    entries = service_entries(svcs)
    assert [str(e.frontend) for e in entries] == ["10.96.0.10:80/TCP", "10.96.0.11:80/TCP", "10.96.0.12:80/TCP"]
    assert [str(b) for b in entries[0].backends] == ["10.244.1.10:80", "10.244.1.11:80", "10.244.1.12:80"]
    with pytest.raises(ValueError):
        make_services(0, ENDPOINTS)


def test_p99_ratios_are_medians_of_per_round_ratios() -> None:
    """A shared machine drifts between rounds: each round's pair is divided first, then the
    median taken, for p99 as for p50 (the ratio of the two medians would say 2.0 here)."""
    from bench.runner import ratios

    def run(mode: str, position: str | None, rnd: int, p50: float, p99: float) -> dict:
        return {"services": 5, "scenario": "short", "mode": mode, "position": position, "round": rnd,
                "rate": 100.0, "latency_us": {"p50": p50, "p99": p99}}

    zp_p99, direct_p99 = (100, 400, 900), (90, 300, 200)  # per round: 1.11, 1.33, 4.5
    runs = [run("direct", None, i, 10, d) for i, d in enumerate(direct_p99)]
    runs += [run("zeroproxy", "first", i, 11, z) for i, z in enumerate(zp_p99)]
    row = ratios(runs)[0]
    assert row["zeroproxy_vs_direct_p99"] == pytest.approx(400 / 300)
    assert row["zeroproxy_vs_direct_p50"] == pytest.approx(1.1)
    runs[4]["latency_us"]["p99"] = 700  # round 1 now 2.33, still the middle one
    assert ratios(runs)[0]["zeroproxy_vs_direct_p99"] == pytest.approx(700 / 300)
    assert ratios(runs)[0]["iptables_vs_zeroproxy_p99"] is None  # no iptables case ran


def test_iptables_text_has_kube_proxy_shape() -> None:
    svcs = make_services(2, ENDPOINTS)
    text = rules.iptables_restore(svcs, CLUSTER_CIDR)
    nat = text[text.index("*nat"):]
    svc_jumps = [line for line in nat.splitlines() if line.startswith("-A KUBE-SERVICES")]
    # one rule per service in index order, then the NodePort rule last
    assert [rules.svc_chain(s) in svc_jumps[i] for i, s in enumerate(svcs)] == [True, True]
    assert "KUBE-NODEPORTS" in svc_jumps[-1]
    chain = rules.svc_chain(svcs[0])
    picks = [line for line in nat.splitlines() if line.startswith(f"-A {chain} ") and "KUBE-SEP-" in line]
    assert len(picks) == 3
    assert "--probability 0.33333333333" in picks[0]
    assert "--probability 0.50000000000" in picks[1]
    assert "statistic" not in picks[2]  # the last endpoint takes the rest
    assert nat.count("-j DNAT --to-destination 10.244.1.10:80") == 2
    assert len(chain) == len("KUBE-SVC-") + 16


# --- the generated rules against the real tools, in a bed namespace ------------------------------


def _ruleset(bed: TestBed, netns: str) -> str:
    return (bed.run_in_netns(netns, ["iptables-save"]).stdout
            + bed.run_in_netns(netns, ["nft", "list", "ruleset"]).stdout)


def test_rule_sets_load_update_and_unload(testbed: TestBed, tmp_path: Path) -> None:
    node = testbed.add_node("ipt")
    svcs = make_services(5, ENDPOINTS)
    last = svcs[-1]
    shrunk = type(last)(last.index, last.vip, last.port, last.endpoints[:-1])

    def load(argv: list[str], text: str) -> None:
        path = tmp_path / "rules"
        path.write_text(text)
        testbed.run_in_netns(node.netns, [*argv, str(path)])

    load(["iptables-restore"], rules.iptables_restore(svcs, CLUSTER_CIDR))
    saved = testbed.run_in_netns(node.netns, ["iptables-save", "-t", "nat"]).stdout
    assert saved.count("-j DNAT") == 15
    assert f":{rules.sep_chain(last, *last.endpoints[-1])}" in saved
    load(["iptables-restore", "--noflush"], rules.iptables_partial(svcs, last, shrunk, CLUSTER_CIDR))
    saved = testbed.run_in_netns(node.netns, ["iptables-save", "-t", "nat"]).stdout
    assert saved.count("-j DNAT") == 14
    assert rules.sep_chain(last, *last.endpoints[-1]) not in saved
    assert saved.count("-A KUBE-SERVICES") == 6  # KUBE-SERVICES rewritten, not appended to

    load(["nft", "-f"], rules.nft_base(CLUSTER_CIDR))
    load(["nft", "-f"], rules.nft_services(svcs[:3], CLUSTER_CIDR))
    load(["nft", "-f"], rules.nft_services(svcs[3:], CLUSTER_CIDR))  # chunks add to the same maps
    table = testbed.run_in_netns(node.netns, ["nft", "list", "table", "ip", rules.NFT_TABLE]).stdout
    assert table.count("dnat to") == 15
    assert f"{last.vip} . tcp . 80 : goto {rules.nft_service_chain(last)}" in table
    load(["nft", "-f"], rules.nft_update_service(last, shrunk, CLUSTER_CIDR))
    table = testbed.run_in_netns(node.netns, ["nft", "list", "table", "ip", rules.NFT_TABLE]).stdout
    assert table.count("dnat to") == 14
    assert "numgen random mod 2" in table

    load(["iptables-restore"], rules.iptables_flush())
    load(["nft", "-f"], rules.nft_delete())
    left = _ruleset(testbed, node.netns)
    assert "KUBE" not in left and rules.NFT_TABLE not in left


# --- a tiny end-to-end run -----------------------------------------------------------------------


def test_smoke_run_produces_results_and_cleans_up(bench_tools: None, stale_beds_removed: list[str],
                                                  tmp_path: Path) -> None:
    bpf_stats_before = Path("/proc/sys/kernel/bpf_stats_enabled").read_text()
    out = tmp_path / "results"
    argv = [sys.executable, "-m", "bench", "--services", "1,20", "--rounds", "2", "--duration", "0.3",
            "--warmup", "0.05", "--threads", "2", "--nft-chunk", "8", "--out", str(out), "--no-progress",
            "--no-setup", "--scenarios", "short,keepalive,nodeport", "--nodeport-services", "1,9"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == "zeroproxy-bench/1"
    assert results["config"]["services"] == [1, 20]
    assert "IPVS" in results["notes"]["ipvs"] or "ip_vs" in results["notes"]["ipvs"]
    assert all(results["tools"][k] for k in ("nginx", "iptables", "nft", "client", "kernel"))

    # every case ran twice per scenario and carried traffic without a single failure
    runs = results["runs"]
    cases_n1 = 5  # direct + first service of four service modes (the real kube-proxy included)
    cases_n20 = 9  # direct + first and last of four service modes
    assert len(runs) == (cases_n1 + cases_n20) * 2 * 2
    for r in runs:
        assert r["requests"] > 0, r
        assert r["errors"] == 0, r
        assert 0 < r["latency_us"]["p50"] <= r["latency_us"]["p99"]
    by_mode = {(r["services"], r["mode"], r["position"]) for r in runs}
    assert (20, "direct", None) in by_mode
    assert {(20, m, p) for m in ("iptables", "nftables", "zeroproxy", "kube-proxy") for p in ("first", "last")} \
        <= by_mode
    # the service modes really went through a ClusterIP, direct through the backend addresses
    assert {t for r in runs if r["mode"] == "zeroproxy" and r["position"] == "last" for t in r["targets"]} \
        == {f"{vip(19)}:80"}
    assert all(t.startswith("10.244.") for r in runs if r["mode"] == "direct" for t in r["targets"])

    assert all(x is not None for r in results["ratios"] for x in r.values())
    assert {r["scenario"] for r in results["summary"]} == {"short", "keepalive"}

    programming = {(p["services"], p["mode"]) for p in results["programming"]}
    assert {(n, m) for n in (1, 20) for m in ("iptables", "nftables", "zeroproxy", "zeroproxy-agent", "kube-proxy")} \
        <= programming
    _check_kube_proxy(results)
    nft20 = next(p for p in results["programming"] if p["services"] == 20 and p["mode"] == "nftables")
    assert len(nft20["chunk_s"]) == 3  # 20 services in chunks of 8
    agent20 = next(p for p in results["programming"] if p["services"] == 20 and p["mode"] == "zeroproxy-agent")
    assert agent20["frontends_programmed"] == 20
    assert all(m["rss_kb"] > 0 for m in results["memory"])
    connect = [s for s in results["bpf_stats"] if s["program"] == "zp_sock4_connect"]
    assert [s["services"] for s in connect] == [1, 20]
    assert all(s["run_cnt"] >= s["client_requests"] > 0 for s in connect)
    changes = results["endpoint_change"]
    assert len(changes) == 2 * 4 * 2  # N x (3 modes + zeroproxy full resync) x (remove, add)
    assert all(c["seconds"] > 0 for c in changes)

    # NodePort: every mode x (remote, local) carried traffic from the external host, to node:nodePort
    np = results["nodeport"]
    assert len(np["runs"]) == 2 * 4 * 2 * 2  # N x modes x backends x rounds
    for r in np["runs"]:
        assert r["requests"] > 0 and r["errors"] == 0, r
    # zeroproxy's TC counters were read around each of its runs: every flow new, none dropped
    for r in np["runs"]:
        if r["mode"] == "zeroproxy":
            drops = {k: v for k, v in r["tc_counters"].items() if k not in ("new_flow", "fwd", "reply")}
            assert r["tc_counters"]["new_flow"] >= r["requests"] and not drops, r
    zp9 = {r["position"]: r["targets"] for r in np["runs"] if r["services"] == 9 and r["mode"] == "zeroproxy"}
    assert zp9["remote"][0].endswith(":20008") and zp9["local"][0].endswith(":20009")
    assert all(t.startswith("10.244.") for r in np["runs"] if r["mode"] == "direct" for t in r["targets"])
    assert all(x is not None for r in np["ratios"] for x in r.values())
    assert {(p["services"], p["mode"]) for p in np["programming"]} == {
        (n, m) for n in (1, 9) for m in ("iptables", "nftables", "zeroproxy")}
    assert not Path(cleanup_np := results["cleanup"]["nodeport_pin_dir"]).exists(), cleanup_np

    md = (out / "results.md").read_text()
    assert "zeroproxy/direct" in md and "| 20 | last |" in md and "| 9 | remote |" in md
    assert "kube-proxy/zeroproxy" in md and "kube-proxy restart to rules" in md
    for png in ("latency.png", "throughput.png", "programming.png", "nodeport.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # nothing left behind: namespaces, cgroups, pins, processes, rules, the bpf_stats sysctl
    cleanup = results["cleanup"]
    assert cleanup["datapath_errors"] == [] and cleanup["leftover_rules"] == {} and cleanup["bed_closed"]
    bed_id = cleanup["bed_id"]
    assert not list(NETNS_DIR.glob(f"{bed_id}-*"))
    assert not (find_cgroup2_mount() / f"zeroproxy-bed-{bed_id}").exists()
    assert not Path(cleanup["pin_dir"]).exists()
    assert not list(Path("/sys/fs/bpf").glob(f"{bed_id}-*"))
    assert not Path(cleanup["workdir"]).exists()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        assert cleanup["workdir"] not in cmdline, f"pid {pid} survived: {cmdline!r}"  # kube-proxy too
        assert results["kube_proxy"]["apiserver_dir"] not in cmdline, f"pid {pid} survived: {cmdline!r}"
    assert Path("/proc/sys/kernel/bpf_stats_enabled").read_text() == bpf_stats_before
    root_rules = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
    assert rules.NFT_TABLE not in root_rules and "KUBE-" not in root_rules


def _check_kube_proxy(results: dict) -> None:
    """The real kube-proxy wrote its rules into the kp node's netns, from the API, and they went."""
    kp = {p["services"]: p for p in results["programming"] if p["mode"] == "kube-proxy"}
    for n in (1, 20):
        restart, post = kp[n]["restart"], kp[n]["post"]
        # 1.20 writes two KUBE-SERVICES rules per service (masquerade mark + jump), then the NodePort one
        assert restart["kube_services_rules"] == post["kube_services_rules"] == 2 * n + 1, kp[n]
        assert restart["nat_rules"] > 6 * n and restart["syncs"] >= 1
        assert kp[n]["seconds"] > 0 and post["seconds"] > 0 and kp[n]["rss_kb"] > 0
        # the client runs hit what was read as first / last (during_runs: the syncs kube-proxy ran meanwhile)
        assert kp[n]["order_unchanged"] is True, kp[n]["during_runs"]
    assert (kp[1]["post"]["posted"], kp[20]["post"]["posted"], kp[20]["post"]["already"]) == (1, 19, 1)
    assert kp[20]["post"]["created"]["objects"] == 38
    # first / last in kube-proxy's own rule order, which is its Go map order, not the index
    for n in (1, 20):
        hits = {r["position"]: r["targets"] for r in results["runs"]
                if r["mode"] == "kube-proxy" and r["services"] == n}
        assert hits["first"] == [f"{vip(kp[n]['first_service'])}:80"]
        if n > 1:
            assert hits["last"] == [f"{vip(kp[n]['last_service'])}:80"]
    assert results["kube_proxy"]["config"]["conntrack"] == {"maxPerCore": 0}
    assert results["tools"]["kube-proxy"] == "Kubernetes v1.20.2"
    # torn down: --cleanup ran in the netns (what it keeps is recorded and removed), the machine's
    # own namespace never saw a KUBE- rule; leftover_rules (checked by the caller) covers the kp node
    cleanup = results["cleanup"]
    assert cleanup["kube_proxy"]["final"]["seconds"] > 0
    assert cleanup["host_rules_unchanged"] is True
    assert not Path(results["kube_proxy"]["apiserver_dir"]).exists()


def test_sigterm_mid_run_still_cleans_up(bench_tools: None, stale_beds_removed: list[str], tmp_path: Path) -> None:
    """A benchmark stopped half-way (SIGTERM while clients run) leaves nothing behind."""
    bpf_stats_before = Path("/proc/sys/kernel/bpf_stats_enabled").read_text()
    argv = [sys.executable, "-m", "bench", "--services", "5", "--rounds", "1000", "--duration", "0.3",
            "--scenarios", "short,keepalive", "--warmup", "0", "--out", str(tmp_path / "results"), "--no-progress",
            "--no-setup"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        bed_id = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            states = [json.loads(p.read_text()) for p in Path("/run/zeroproxy-testbed").glob("zpbench-*.json")]
            bed_id = next((s["id"] for s in states if s["pid"] == proc.pid), None)
            # running clients: the zeroproxy pins exist once the datapath is programmed
            if bed_id and (Path("/sys/fs/bpf") / f"{bed_id}-bench" / "progs").is_dir():
                break
            time.sleep(0.2)
        assert bed_id and proc.poll() is None, "the benchmark did not get to its runs"
        time.sleep(2)  # well into the client runs
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert not list(NETNS_DIR.glob(f"{bed_id}-*")), err[-2000:]
    assert not (find_cgroup2_mount() / f"zeroproxy-bed-{bed_id}").exists()
    assert not list(Path("/sys/fs/bpf").glob(f"{bed_id}-*"))
    assert not (Path("/run/zeroproxy-testbed") / f"{bed_id}.json").exists()
    assert Path("/proc/sys/kernel/bpf_stats_enabled").read_text() == bpf_stats_before


def test_s2z_and_api_source_scenarios_smoke(bench_tools: None, stale_beds_removed: list[str],
                                            tmp_path: Path) -> None:
    """Scale to zero (1 cycle) and the API-source cold start (3 services) through python -m bench."""
    out = tmp_path / "results"
    argv = [sys.executable, "-m", "bench", "--services", "1", "--modes", "direct", "--scenarios", "s2z,apisource",
            "--s2z-cycles", "1", "--apisource-services", "3", "--rounds", "1", "--duration", "0.1", "--warmup", "0",
            "--no-bpf-stats", "--no-endpoint-change", "--no-plots", "--out", str(out), "--no-progress", "--no-setup"]
    # Popen, not run: the bed state files it may leave are recognised by the bench's pid.
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    s2z = results["scale_to_zero"]
    assert s2z["cycles"] == 1 and len(s2z["wake_first_byte_s"]) == 1 and len(s2z["raw_restore_s"]) == 1
    assert s2z["proxy_accepted"] == 2  # the wake and the first request after the last checkpoint
    api = results["api_source"]
    assert [r["services"] for r in api] == [3]
    assert api[0]["created"]["objects"] == 6
    # the apiserver adds its own default/kubernetes Service
    assert api[0]["kubernetes"]["frontends_programmed"] == api[0]["file"]["frontends_programmed"] + 1 == 4
    md = (out / "results.md").read_text()
    assert "Scale to zero" in md and "kubernetes source" in md
    assert not list(Path("/sys/fs/bpf").glob("zpbapi*"))
    assert not list(NETNS_DIR.glob("zpbapi*")) and not list(NETNS_DIR.glob("zps2zbench*"))
    assert not [p for p in Path("/run/zeroproxy-testbed").glob("zp*.json")
                if json.loads(p.read_text()).get("pid") == proc.pid]
