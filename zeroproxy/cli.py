"""The zeroproxy command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from dataclasses import asdict
from pathlib import Path

DEFAULT_BPFFS = "/sys/fs/bpf/zeroproxy"

EPILOG = """\
examples:
  zeroproxy demo                                   # a sandbox on this machine: pods, services, traffic
  zeroproxy agent --source file:cluster.yaml --cgroup /sys/fs/cgroup/kubepods
  zeroproxy service list                           # what this node has programmed
  zeroproxy status                                 # attachments and datapath counters
  zeroproxy cleanup --cgroup /sys/fs/cgroup/kubepods
  zeroproxy print-bpf                              # the C text handed to bcc
"""


def _default_cgroup() -> str:
    from dataplane.loader import cgroup2_mount

    try:
        return str(cgroup2_mount())
    except RuntimeError:
        return "/sys/fs/cgroup"


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def cmd_agent(args: argparse.Namespace) -> int:
    import uvloop

    from zeroproxy.agent import Agent, AgentConfig

    cfg = AgentConfig(
        source=args.source,
        cgroup=Path(args.cgroup),
        bpffs_dir=Path(args.bpffs),
        node_name=args.node_name,
        devices=tuple(d for d in args.devices.split(",") if d),
        min_sync_interval=args.min_sync_period,
        max_sync_interval=args.sync_period,
    )
    if not cfg.source.startswith("file:"):
        print(f"zeroproxy agent: --source {cfg.source!r}: expected file:PATH", file=sys.stderr)
        return 2
    agent = Agent(cfg)
    uvloop.run(agent.run())
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from dataplane.loader import cleanup

    for line in cleanup(Path(args.cgroup) if args.cgroup else None, Path(args.bpffs)):
        print(line)
    return 0


def cmd_service_list(args: argparse.Namespace) -> int:
    from dataplane.inspect import service_list

    if not Path(args.bpffs).exists():
        print(f"nothing programmed: {args.bpffs} does not exist", file=sys.stderr)
        return 1
    services = service_list(Path(args.bpffs))
    if args.output == "json":
        print(json.dumps([asdict(s) for s in services], indent=2))
        return 0
    print(f"{'ID':>5}  {'FRONTEND':<44} BACKENDS")
    for s in services:
        backends = ", ".join(s.backends) if s.backends else "(none: connect() is refused)"
        print(f"{s.rev_nat_id:>5}  {s.frontend:<44} {backends}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from dataplane.inspect import service_list, stats
    from dataplane.loader import attached

    pin = Path(args.bpffs)
    out: dict = {"bpffs": str(pin), "pinned": pin.exists()}
    if pin.exists():
        svcs = service_list(pin)
        out["frontends"] = len(svcs)
        out["backend_slots"] = sum(len(s.backends) for s in svcs)
        out["counters"] = stats(pin)
    if args.cgroup:
        out["cgroup"] = args.cgroup
        out["attached"] = sorted(p.name for _, p in attached(Path(args.cgroup)))
    print(json.dumps(out, indent=2))
    return 0


def cmd_print_bpf(args: argparse.Namespace) -> int:
    from dataplane.loader import sock_source

    text, cflags = sock_source(Path(args.bpffs))
    print(f"/* cflags: {' '.join(cflags)} */")
    print(text)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from zeroproxy.demo import run_demo

    return run_demo(requests=args.requests, keep_going=args.keep)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zeroproxy",
        description="kube-proxy replacement in eBPF: services at the socket, no iptables/nftables/IPVS",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--log-level", default=os.environ.get("ZP_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)

    def bpffs_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--bpffs", default=DEFAULT_BPFFS,
                        help="directory on a bpf filesystem for pinned maps and programs (default %(default)s)")

    a = sub.add_parser("agent", help="run the node agent", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  zeroproxy agent --source file:cluster.yaml --cgroup "
                              "/sys/fs/cgroup/unified/kubepods --bpffs /sys/fs/bpf/zeroproxy")
    a.add_argument("--source", required=True,
                   help="where Services/EndpointSlices/Nodes come from: file:PATH (multi-document Kubernetes "
                        "YAML, re-read when it changes)")
    a.add_argument("--cgroup", default=_default_cgroup(),
                   help="cgroup v2 directory whose processes (and descendants) get service translation at the "
                        "socket (default: the cgroup2 root, %(default)s)")
    bpffs_arg(a)
    a.add_argument("--node-name", default=os.environ.get("NODE_NAME", socket.gethostname()),
                   help="this node's name as in Node objects and EndpointSlice nodeName (default: $NODE_NAME or "
                        "the hostname, %(default)s)")
    a.add_argument("--devices", default="",
                   help="comma-separated node devices for NodePort/ExternalIP programs (TC); empty = none")
    a.add_argument("--min-sync-period", type=float, default=0.1,
                   help="minimum seconds between two syncs; bursts of changes coalesce (default %(default)s)")
    a.add_argument("--sync-period", type=float, default=60.0,
                   help="maximum seconds between two syncs: periodic reconcile (default %(default)s)")
    a.set_defaults(func=cmd_agent)

    c = sub.add_parser("cleanup", help="detach zeroproxy's programs and remove its pins")
    c.add_argument("--cgroup", default=_default_cgroup(), help="cgroup to detach from (default %(default)s)")
    bpffs_arg(c)
    c.set_defaults(func=cmd_cleanup)

    s = sub.add_parser("service", help="inspect programmed services")
    ssub = s.add_subparsers(dest="service_command", required=True)
    sl = ssub.add_parser("list", help="frontends and their backends, read from the pinned maps")
    bpffs_arg(sl)
    sl.add_argument("-o", "--output", choices=["table", "json"], default="table")
    sl.set_defaults(func=cmd_service_list)

    st = sub.add_parser("status", help="attachments and datapath counters")
    bpffs_arg(st)
    st.add_argument("--cgroup", default=None, help="also list programs attached to this cgroup")
    st.set_defaults(func=cmd_status)

    pb = sub.add_parser("print-bpf", help="print the generated C text handed to bcc")
    bpffs_arg(pb)
    pb.set_defaults(func=cmd_print_bpf)

    d = sub.add_parser("demo", help="build a sandbox on this machine, run the agent, send traffic, clean up")
    d.add_argument("--requests", type=int, default=30, help="requests per service (default %(default)s)")
    d.add_argument("--keep", action="store_true", help="keep the sandbox until Enter is pressed")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        sys.exit(args.func(args))
    except KeyboardInterrupt:
        sys.exit(130)
