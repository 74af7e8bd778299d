"""python -m bench: run the service latency benchmark and write results.json/.md and plots."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from bench import report
from bench.topology import MODES

REPO = Path(__file__).resolve().parent.parent
QUICK = {"services": [1, 1000, 10000], "rounds": 5, "duration": 0.6, "warmup": 0.15,
         "nodeport": [1, 1000], "apisource": [1000], "s2z_cycles": 5, "s2z_steady": 30}
FULL = {"services": [1, 1000, 10000, 30000], "rounds": 7, "duration": 2.0, "warmup": 0.3,
        "nodeport": [1, 1000, 10000], "apisource": [1000, 10000], "s2z_cycles": 10, "s2z_steady": 50}
SCENARIOS = ("short", "keepalive", "nodeport", "s2z", "apisource")

EPILOG = """\
examples:
  python -m bench --quick                  a few minutes on 2 cores: N = 1, 1000, 10000
  python -m bench                          full run: N = 1, 1000, 10000, 30000, 5 rounds
  python -m bench --services 1,100 --rounds 1 --duration 0.5 --out /tmp/b
  python -m bench --modes direct,zeroproxy --scenarios short
  python -m bench --modes direct,iptables,kube-proxy,zeroproxy --scenarios short --services 1,1000
  python -m bench --scenarios nodeport --nodeport-services 1,1000
  python -m bench --scenarios s2z,apisource --apisource-services 1000
  python -m bench --render bench-results/X/results.json   re-write the .md and plots

Run as root. Everything the run creates (namespaces, cgroups, nginx processes, rule sets inside
its own namespaces, BPF programs and pins, the kube-apiserver and kube-proxy of the kube-proxy
mode) is removed at the end, also after a failure.
"""


def _csv(kind: type, allowed: tuple[str, ...] | None = None):
    def parse(text: str) -> list:
        items = [kind(x.strip()) for x in text.split(",") if x.strip()]
        if allowed is not None and (bad := [x for x in items if x not in allowed]):
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(allowed)}")
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        return items
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"short run: {QUICK}")
    p.add_argument("--services", type=_csv(int), help="service counts N, comma-separated")
    p.add_argument("--rounds", type=int, help="interleaved rounds per case (medians are over these)")
    p.add_argument("--duration", type=float, help="seconds each client run measures")
    p.add_argument("--warmup", type=float, help="seconds each client run discards first")
    p.add_argument("--threads", type=int, default=1,
                   help="client threads (default 1: latency without queueing in the client; the shared "
                        "2-CPU machines gave the steadiest numbers so; use 8 for a throughput-bound run)")
    p.add_argument("--modes", type=_csv(str, MODES), default=list(MODES), help="subset of " + ",".join(MODES))
    p.add_argument("--scenarios", type=_csv(str, SCENARIOS), default=list(SCENARIOS),
                   help="subset of " + ",".join(SCENARIOS) + " (short/keepalive: ClusterIP client runs; nodeport: "
                        "external client to a NodePort; s2z: scale-to-zero wake; apisource: agent cold start from "
                        "a real kube-apiserver)")
    p.add_argument("--nodeport-services", type=_csv(int), help="NodePort service counts N")
    p.add_argument("--apisource-services", type=_csv(int), help="service counts N for the API-source cold start")
    p.add_argument("--s2z-cycles", type=int, help="scale-to-zero checkpoint/wake cycles")
    p.add_argument("--nft-chunk", type=int, default=2000, help="services per nft -f transaction (default 2000)")
    p.add_argument("--kube-proxy-max-services", type=int, default=1000,
                   help="run the real kube-proxy only at N up to this (default %(default)s; 0 = every N): its "
                        "iptables-restore of 10 000 services takes minutes here")
    p.add_argument("--client-cpu", type=int, help="CPU for the client (default: the last one)")
    p.add_argument("--server-cpu", type=int, help="CPU for the nginx backends (default: the first one)")
    p.add_argument("--no-bpf-stats", action="store_true", help="skip the kernel.bpf_stats_enabled run")
    p.add_argument("--no-endpoint-change", action="store_true", help="skip the endpoint-change timing")
    p.add_argument("--out", type=Path, help="output directory (default bench-results/<UTC time>)")
    p.add_argument("--no-plots", action="store_true", help="write JSON and markdown only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-setup", action="store_true", help="do not run scripts/setup-bench.sh when tools are missing")
    p.add_argument("--keep-workdir", action="store_true", help="keep the temporary nginx/rules directory")
    p.add_argument("--render", type=Path, metavar="RESULTS_JSON", help="only re-render an existing results.json")
    return p


def _missing_tools() -> list[str]:
    missing = [t for t in ("nginx", "gcc", "iptables-restore", "nft", "taskset") if shutil.which(t) is None]
    missing += [m for m in ("matplotlib", "tqdm", "bcc") if importlib.util.find_spec(m) is None]
    return missing


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.render:
        import json

        from bench.runner import derive

        results = json.loads(args.render.read_text())
        derive(results)  # derived data: recomputed with today's code
        for path in report.write_all(results, args.render.parent, plots=not args.no_plots):
            print(path)
        return 0

    missing = _missing_tools()
    if missing and not args.no_setup:
        print(f"bench: missing {', '.join(missing)}; running scripts/setup-bench.sh", file=sys.stderr)
        subprocess.run(["bash", str(REPO / "scripts" / "setup-bench.sh")], check=True)
        if (still := _missing_tools()) and any(m in ("matplotlib", "tqdm", "bcc") for m in still):
            # the venv gained packages after this interpreter started: start over in it
            return subprocess.call([sys.executable, "-m", "bench", "--no-setup", *(argv or sys.argv[1:])], cwd=REPO)

    from bench.runner import Config, run

    preset = QUICK if args.quick else FULL
    cfg = Config(
        services=args.services or preset["services"],
        scenarios=args.scenarios,
        modes=args.modes,
        rounds=args.rounds or preset["rounds"],
        duration_s=args.duration or preset["duration"],
        warmup_s=args.warmup if args.warmup is not None else preset["warmup"],
        threads=args.threads,
        client_cpu=args.client_cpu,
        server_cpu=args.server_cpu,
        nft_chunk=args.nft_chunk,
        bpf_stats=not args.no_bpf_stats,
        endpoint_change=not args.no_endpoint_change,
        quick=args.quick,
        nodeport_services=args.nodeport_services or preset["nodeport"],
        apisource_services=args.apisource_services or preset["apisource"],
        s2z_cycles=args.s2z_cycles or preset["s2z_cycles"],
        s2z_steady=preset["s2z_steady"],
        kube_proxy_max_services=args.kube_proxy_max_services,
    )
    out = args.out or Path("bench-results") / dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    # SIGTERM unwinds like Ctrl-C, so the finally blocks remove namespaces, rules and programs.
    # Only in this process: pyroute2 forks helpers that inherit the handler and are stopped with
    # SIGTERM, and a helper unwinding a copy of our stack would tear down the live test bed.
    main_pid = os.getpid()

    def on_sigterm(*_: object) -> None:
        if os.getpid() != main_pid:
            os._exit(143)
        sys.exit(143)

    signal.signal(signal.SIGTERM, on_sigterm)
    results = run(cfg, progress=not args.no_progress, keep_workdir=args.keep_workdir)
    files = report.write_all(results, out, plots=not args.no_plots)
    print((out / "results.md").read_text())
    for path in files:
        print(f"wrote {path}")
    problems = (results["cleanup"].get("datapath_errors") or results["cleanup"].get("leftover_rules")
                or results["cleanup"].get("host_rules_unchanged") is False)
    if problems or not results["cleanup"].get("bed_closed"):
        print(f"bench: cleanup problems: {results['cleanup']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
