"""Turn a results document into files: results.json, results.md and PNG plots.

Kept apart from the runner so that a stored results.json can be re-rendered
(``python -m bench --render results.json``) after the table layout changes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.topology import DIRECT, IPTABLES, KUBE_PROXY, MODES, NFTABLES, ZEROPROXY

AGENT = "zeroproxy-agent"  # "mode" of the programming/memory rows measured on the real agent process
ZPCTL_PROCESS = "bench.zpctl (datapath + ServiceMaps)"
ZP_FULL_SYNC = "zeroproxy-full-sync"  # endpoint_change rows: ServiceMaps.sync of the whole table

SCENARIO_TITLES = {
    "short": "Short connections (socket + connect + request + reply + close)",
    "keepalive": "Keep-alive requests (request -> full reply on an open connection)",
}
MODE_STYLE = {DIRECT: ("black", "o"), IPTABLES: ("tab:red", "s"), NFTABLES: ("tab:orange", "^"),
              ZEROPROXY: ("tab:blue", "D"), AGENT: ("tab:cyan", "v"), KUBE_PROXY: ("tab:purple", "P")}


def write_all(results: dict[str, Any], out: Path, *, plots: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "results.json", out / "results.md"]
    files[0].write_text(json.dumps(results, indent=1) + "\n")
    files[1].write_text(markdown(results))
    if plots:
        files += write_plots(results, out)
    return files


# --- markdown -----------------------------------------------------------------------------------


def _f(value: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _lookup(results: dict[str, Any]) -> dict[tuple[Any, ...], dict[str, Any]]:
    return {(s["services"], s["scenario"], s["mode"], s["position"]): s for s in results.get("summary", [])}


def _positions(results: dict[str, Any], count: int) -> list[str]:
    have = {s["position"] for s in results.get("summary", []) if s["services"] == count and s["position"]}
    return [p for p in ("first", "last") if p in have]


def markdown(results: dict[str, Any]) -> str:
    cfg = results["config"]
    m = results["machine"]
    by = _lookup(results)
    rat = {(r["services"], r["scenario"], r["position"]): r for r in results.get("ratios", [])}
    counts = sorted({s["services"] for s in results.get("summary", [])})
    lines = [
        f"# zeroproxy service latency benchmark ({'quick' if cfg.get('quick') else 'full'} run)",
        "",
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}{', virtualised' if m.get('virtualised') else ''}), "
        f"{m.get('mem_total_mb')} MB, {m.get('os')}, kernel {m['kernel']}; load average at start "
        f"{' '.join(m.get('loadavg_at_start', []))}. Run {results['started']} to {results.get('finished', '?')}.",
        "",
        f"Client: bench/client.c (closed loop), {cfg['threads']} thread(s) pinned to CPU {cfg['client_cpu']}; "
        f"3 nginx backends pinned to CPU {cfg['server_cpu']}; {cfg['endpoints_per_service']} endpoints per service; "
        f"{cfg['rounds']} interleaved rounds of {cfg['duration_s']} s (+{cfg['warmup_s']} s warm-up) per case; "
        "numbers are medians over rounds, ratios medians of the per-round ratios (cases of a round run back "
        "to back). `first`/`last` = first/last service in rule order.",
        "",
        f"IPVS: {results['notes'].get('ipvs', 'not measured')}.",
        "",
    ]
    # kube-proxy columns only where the real kube-proxy ran (older results render as they did)
    kp = any(s["mode"] == KUBE_PROXY for s in results.get("summary", []))
    modes = (IPTABLES, NFTABLES, ZEROPROXY, *((KUBE_PROXY,) if kp else ()))
    pairs = ("zeroproxy_vs_direct", "iptables_vs_zeroproxy", "nftables_vs_zeroproxy",
             *(("kube_proxy_vs_zeroproxy", "kube_proxy_vs_iptables") if kp else ()))
    header = ["services", "service", "direct", *modes, *(p.replace("_vs_", "/").replace("kube_proxy", KUBE_PROXY)
                                                       for p in pairs)]
    for scenario in [x for x in cfg["scenarios"] if x in SCENARIO_TITLES]:
        lines += [f"## {SCENARIO_TITLES.get(scenario, scenario)}", ""]
        rows_lat, rows_rate, rows_p99 = [], [], []
        for count in counts:
            d = by.get((count, scenario, DIRECT, None), {})
            for pos in _positions(results, count):
                cells = [by.get((count, scenario, mode, pos), {}) for mode in modes]
                r = rat.get((count, scenario, pos), {})
                rows_lat.append([f"{count:,}", pos, _f(d.get("p50_us")),
                                 *(f"{_f(c.get('p50_us'))} / {_f(c.get('p99_us'))}" for c in cells),
                                 *(_x(r.get(f"{p}_p50")) for p in pairs)])
                rows_rate.append([f"{count:,}", pos, _f(d.get("rate")), *(_f(c.get("rate")) for c in cells),
                                  *(_x(r.get(f"{p}_rate")) for p in pairs)])
                rows_p99.append([f"{count:,}", pos, _f(d.get("p99_us")), *(_f(c.get("p99_us")) for c in cells),
                                 *(_x(r.get(f"{p}_p99")) for p in pairs)])
        lines += ["Latency in µs (p50 / p99; direct: p50):", ""]
        lines += _table(header, rows_lat)
        if any(f"{p}_p99" in r for r in rat.values() for p in pairs):  # older results have no p99 ratios
            lines += ["", "p99 latency in µs; each ratio is the median of the per-round p99 ratios:", ""]
            lines += _table(header, rows_p99)
        lines += ["", "Requests per second:", ""]
        lines += _table(header, rows_rate)
        if kp:
            lines += ["", "kube-proxy: the real kube-proxy 1.20.2 (iptables mode); first/last = first/last service in "
                      "its own KUBE-SERVICES chain, which it writes in Go map order (so not the services the other "
                      "columns use), with two rules per service there (the masquerade mark, then the jump)."]
        lines.append("")
    errors = sum(s["errors"] for s in results.get("summary", []))
    lines += [f"Failed requests over all runs: {errors}.", ""]

    prog = results.get("programming", [])
    kp_prog = any(p["mode"] == KUBE_PROXY for p in prog)
    if prog:
        lines += ["## Control plane: time to program N services from empty", ""]
        rows = []
        for count in sorted({p["services"] for p in prog if p["services"]}):
            cell = {p["mode"]: p for p in prog if p["services"] == count}
            mem = {x["process"]: x for x in results.get("memory", []) if x["services"] == count}
            nft = cell.get(NFTABLES, {})
            nft_txt = _f(nft.get("seconds"), "{:.2f} s")
            if nft.get("chunk_s"):
                nft_txt += f" ({len(nft['chunk_s'])} x <={nft['chunk']} services)"
            agent = cell.get(AGENT, {})
            row = [f"{count:,}", _f(cell.get(IPTABLES, {}).get("seconds"), "{:.2f} s"), nft_txt,
                   _f(cell.get(ZEROPROXY, {}).get("seconds"), "{:.3f} s"),
                   _f(agent.get("seconds"), "{:.2f} s"),
                   _f(agent.get("rss_kb") and agent["rss_kb"] / 1024, "{:.0f} MB"),
                   _f(mem.get(ZPCTL_PROCESS, {}).get("rss_kb") and mem[ZPCTL_PROCESS]["rss_kb"] / 1024,
                      "{:.0f} MB")]
            if kp_prog:
                row += _kube_proxy_cells(cell.get(KUBE_PROXY, {}))
            rows.append(row)
        kp_header = ["kube-proxy restart to rules (its sync)", "kube-proxy POST to rules (new services)",
                     "kube-proxy RSS"] if kp_prog else []
        lines += _table(["services", "iptables-restore", "nft -f", "zeroproxy ServiceMaps.sync",
                         "zeroproxy agent start to synced", "agent RSS", "loader RSS", *kp_header], rows)
        lines += ["", "The agent column is a cold start of `zeroproxy agent --source file:` with N Services and "
                  "EndpointSlices (Python start, bcc compile, YAML parse, translation, first sync). Loader RSS is "
                  "bench.zpctl: datapath + ServiceMaps only."]
        if kp_prog:
            lines += ["", "kube-proxy (the real 1.20.2, iptables mode, min-sync-period 1 s): *restart* = kube-proxy "
                      "started with its rules removed and N Services + EndpointSlices in the kube-apiserver, until "
                      "the end of the sync whose rules hold all N (kube-proxy's sync_proxy_rules_last_timestamp); "
                      "in brackets its own sync_proxy_rules_duration for that one sync (rule build + "
                      "iptables-restore). *POST* = from the first POST of the services new at this N (8 parallel "
                      "requests; the earlier ones stay) until the running kube-proxy's rules hold all N; it "
                      "includes the API's own creation time (in brackets)."]
        boot = next((p for p in prog if p["services"] == 0), None)
        if boot:
            lines += ["", f"zeroproxy compile + attach (once): {boot['seconds']:.2f} s."]
        lines.append("")

    change = results.get("endpoint_change", [])
    if change:
        lines += ["## Control plane: one endpoint change at N services", "",
                  "Time until the new rule set / map entries are in the kernel (remove one endpoint of the last "
                  "service, then add it back; median of the two). Baselines include starting the tool, as "
                  "kube-proxy does on every sync.", ""]
        rows = []
        for count in sorted({c["services"] for c in change}):
            cell = {}
            modes = (IPTABLES, NFTABLES, ZEROPROXY, ZP_FULL_SYNC)
            for mode in modes:
                vals = [c["seconds"] for c in change if c["services"] == count and c["mode"] == mode]
                cell[mode] = sorted(vals)[len(vals) // 2] if vals else None
            rows.append([f"{count:,}", *(_f(cell[m] and cell[m] * 1000, "{:.1f} ms") for m in modes)])
        lines += _table(["services", "iptables-restore --noflush", "nft -f", "zeroproxy (partial sync)",
                         "zeroproxy full resync"], rows)
        lines.append("")

    stats = [s for s in results.get("bpf_stats", []) if s["run_cnt"]]
    if stats:
        lines += ["## eBPF program cost (kernel.bpf_stats_enabled=1, short connections to the last service)", ""]
        rows = [[f"{s['services']:,}", s["program"], f"{s['run_cnt']:,}", _f(s["ns_per_run"])] for s in stats]
        lines += _table(["services", "program", "runs", "ns per run"], rows)
        lines.append("")

    lines += nodeport_markdown(results)
    lines += s2z_markdown(results.get("scale_to_zero"))
    lines += apisource_markdown(results.get("api_source"))
    lines += ["## Versions", ""]
    lines += [f"- {k}: {v}" for k, v in results.get("tools", {}).items()]
    lines.append("")
    return "\n".join(lines)


def _kube_proxy_cells(row: dict[str, Any]) -> list[str]:
    if not row:
        return ["-", "-", "-"]
    restart, post = row.get("restart", {}), row.get("post", {})
    sync = restart.get("first_sync_s")
    created = post.get("created", {})
    return [_f(row.get("seconds"), "{:.2f} s") + (f" ({sync:.2f} s)" if sync is not None else ""),
            _f(post.get("seconds"), "{:.2f} s")
            + f" ({post.get('posted', 0):,} new; API {created.get('seconds', 0):.1f} s)",
            _f(row.get("rss_kb") and row["rss_kb"] / 1024, "{:.0f} MB")]


def nodeport_markdown(results: dict[str, Any]) -> list[str]:
    """External client -> node address:nodePort, remote and local backend, every mode."""
    np = results.get("nodeport")
    if not np or not np.get("summary"):
        return []
    by = {(s["services"], s["mode"], s["position"]): s for s in np["summary"]}
    rat = {(r["services"], r["position"]): r for r in np.get("ratios", [])}
    header = ["services", "backend", "direct", "iptables", "nftables", "zeroproxy", "zeroproxy/direct",
              "iptables/zeroproxy", "nftables/zeroproxy"]
    rows_lat, rows_rate = [], []
    for count in sorted({s["services"] for s in np["summary"]}):
        for pos in ("remote", "local"):
            d = by.get((count, DIRECT, pos), {})
            cells = [by.get((count, m, pos), {}) for m in (IPTABLES, NFTABLES, ZEROPROXY)]
            r = rat.get((count, pos), {})
            rows_lat.append([f"{count:,}", pos, f"{_f(d.get('p50_us'))} / {_f(d.get('p99_us'))}",
                             *(f"{_f(c.get('p50_us'))} / {_f(c.get('p99_us'))}" for c in cells),
                             _x(r.get("zeroproxy_vs_direct_p50")), _x(r.get("iptables_vs_zeroproxy_p50")),
                             _x(r.get("nftables_vs_zeroproxy_p50"))])
            rows_rate.append([f"{count:,}", pos, _f(d.get("rate")), *(_f(c.get("rate")) for c in cells),
                              _x(r.get("zeroproxy_vs_direct_rate")), _x(r.get("iptables_vs_zeroproxy_rate")),
                              _x(r.get("nftables_vs_zeroproxy_rate"))])
    errors = sum(s["errors"] for s in np["summary"])
    lines = ["## NodePort: external client -> node:nodePort (short connections)", "",
             "N NodePort services served by pods on another node plus one more, last in rule order, served by a "
             "pod on the node itself; `remote` = the last of the N (SNAT path: masquerade / zeroproxy's TC SNAT), "
             "`local` = the extra one. direct = the external host routes straight to the pod IPs through the same "
             "node (no translation; remote replies skip the node). Latency in µs (p50 / p99):", ""]
    lines += _table(header, rows_lat)
    lines += ["", "Requests per second:", ""]
    lines += _table(header, rows_rate)
    prog = np.get("programming", [])
    if prog:
        lines += ["", "Programming N NodePort services (+1 local) from empty:", ""]
        rows = []
        for count in sorted({p["services"] for p in prog}):
            cell = {p["mode"]: p for p in prog if p["services"] == count}
            rows.append([f"{count:,}", _f(cell.get(IPTABLES, {}).get("seconds"), "{:.2f} s"),
                         _f(cell.get(NFTABLES, {}).get("seconds"), "{:.2f} s"),
                         _f(cell.get(ZEROPROXY, {}).get("seconds"), "{:.3f} s")])
        lines += _table(["services", "iptables-restore", "nft -f (chunked)", "zeroproxy ServiceMaps.sync"], rows)
    lines += ["", f"Failed NodePort requests over all runs: {errors}.", ""]
    return lines


def s2z_markdown(s2z: dict[str, Any] | None) -> list[str]:
    """The wake next to raw CRIU, and the steady state after a wake next to a never-scaled pod."""
    if not s2z:
        return []
    names = [("raw_restore", "CRIU restore alone (runc restore)"),
             ("raw_checkpoint", "CRIU checkpoint alone (runc checkpoint)"),
             ("wake_first_byte", "wake: connect -> first byte, through the activation proxy"),
             ("scaler_restore", "  of which restore + wait for LISTEN (scaler)"),
             ("checkpoint", "scaler checkpoint after idle"),
             ("steady_state", "request after a wake (connect -> full reply)"),
             ("never_scaled", "request to a never-scaled pod (connect -> full reply)")]
    rows = []
    for key, label in names:
        x = s2z["summary"].get(key) or {}
        if x:
            rows.append([label, str(x["n"]), f"{x['min_ms']:.2f}", f"{x['median_ms']:.2f}", f"{x['p90_ms']:.2f}",
                         f"{x['max_ms']:.2f}"])
    lines = ["## Scale to zero (busybox httpd in runc, CRIU)", "",
             f"{s2z['cycles']} checkpoint/wake cycles; times in ms. `bench/scale_to_zero.py`.", ""]
    lines += _table(["what", "n", "min", "median", "p90", "max"], rows)
    lines += ["", f"Connections the activation proxy accepted: {s2z.get('proxy_accepted')} (= wakes + 1: the "
              "steady-state requests went straight to the app).", ""]
    return lines


def apisource_markdown(rows_in: list[dict[str, Any]] | None) -> list[str]:
    """Agent cold start from the real kube-apiserver next to the file source."""
    if not rows_in:
        return []
    rows = []
    for r in rows_in:
        k, f, c = r["kubernetes"], r["file"], r["created"]
        rows.append([f"{r['services']:,}", f"{k['seconds']:.2f} s", f"{f['seconds']:.2f} s",
                     _f(k.get("rss_kb") and k["rss_kb"] / 1024, "{:.0f} MB"),
                     _f(f.get("rss_kb") and f["rss_kb"] / 1024, "{:.0f} MB"),
                     str(k.get("frontends_programmed")),
                     f"{c['objects']:,} in {c['seconds']:.1f} s ({c['objects_per_s']:.0f}/s)"])
    lines = ["## Control plane: agent cold start, kube-apiserver source vs file source", "",
             "`zeroproxy agent --source kubernetes` against a real kube-apiserver 1.20 + etcd (DevCluster; "
             "EndpointSlice v1 via CRD) holding N Services + N EndpointSlices, from process start to "
             "\"initial sync done\"; the file column is the same agent with the same objects in a YAML file. "
             "Objects were created before the agent started (not timed in the cold start; the creation rate "
             "is shown, 8 parallel requests).", ""]
    lines += _table(["services", "kubernetes source", "file source", "RSS (kubernetes)", "RSS (file)",
                     "frontends programmed", "objects created"], rows)
    lines.append("")
    return lines


# --- plots --------------------------------------------------------------------------------------


def _series(results: dict[str, Any], scenario: str, mode: str, key: str) -> tuple[list[int], list[float]]:
    """One line per mode: the last service (first when N = 1 has only one) at each N."""
    by = _lookup(results)
    xs, ys = [], []
    for count in sorted({s["services"] for s in results.get("summary", [])}):
        if mode == DIRECT:
            s = by.get((count, scenario, DIRECT, None))
        else:
            s = by.get((count, scenario, mode, "last")) or by.get((count, scenario, mode, "first"))
        if s and s.get(key) is not None:
            xs.append(count)
            ys.append(s[key])
    return xs, ys


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on these machines
    import matplotlib.pyplot as plt

    scenarios = [x for x in results["config"]["scenarios"] if x in SCENARIO_TITLES]
    files = []
    for key, ylabel, name in (("p50_us", "p50 latency (µs)", "latency.png"),
                              ("rate", "requests per second", "throughput.png")) if scenarios else ():
        fig, axes = plt.subplots(1, len(scenarios), figsize=(6 * len(scenarios), 4.2), squeeze=False)
        for ax, scenario in zip(axes[0], scenarios, strict=True):
            for mode in MODES:
                xs, ys = _series(results, scenario, mode, key)
                if xs:
                    color, marker = MODE_STYLE[mode]
                    ax.plot(xs, ys, marker=marker, color=color, label=mode)
            ax.set_xscale("log")
            ax.set_xlabel("services (last service in rule order)")
            ax.set_ylabel(ylabel)
            ax.set_title(scenario)
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            ax.legend()
        fig.suptitle(f"zeroproxy bench — {results['machine']['cpus']} CPUs, kernel {results['machine']['kernel']}")
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)

    np_summary = (results.get("nodeport") or {}).get("summary") or []
    if np_summary:
        positions = ("remote", "local")
        fig, axes = plt.subplots(1, len(positions), figsize=(12, 4.2), squeeze=False)
        for ax, position in zip(axes[0], positions, strict=True):
            for mode in MODES:
                pts = sorted((s["services"], s["p50_us"]) for s in np_summary
                             if s["mode"] == mode and s["position"] == position and s.get("p50_us") is not None)
                if pts:
                    color, marker = MODE_STYLE[mode]
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=mode)
            ax.set_xscale("log")
            ax.set_xlabel("NodePort services (the last one in rule order is hit)")
            ax.set_ylabel("p50 latency (µs)")
            ax.set_title(f"NodePort from an external host, {position} backend")
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            ax.legend()
        fig.tight_layout()
        path = out / "nodeport.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)

    prog = [p for p in results.get("programming", []) if p["services"]]
    if prog:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for mode in (IPTABLES, NFTABLES, ZEROPROXY, AGENT, KUBE_PROXY):
            pts = sorted((p["services"], p["seconds"]) for p in prog if p["mode"] == mode)
            if pts:
                color, marker = MODE_STYLE[mode]
                label = {ZEROPROXY: "zeroproxy (ServiceMaps.sync)", AGENT: "zeroproxy agent cold start",
                         KUBE_PROXY: "kube-proxy 1.20 restart to rules"}.get(mode, mode)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("services")
        ax.set_ylabel("seconds to program from empty")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / "programming.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files
