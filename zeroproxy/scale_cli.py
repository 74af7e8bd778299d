"""`zeroproxy scale ...`: run scale to zero for a node's pods, and show what it is doing.

    zeroproxy scale status [--state-file F] [-o table|json]
    zeroproxy scale run --source file:cluster.yaml --node-name a --runtime-dir D [--metrics-port 9464]

`run` is the scale-to-zero half of a node agent for the file source, as a process of its own: it
reads Pods (with the annotations of controlplane/annotations.py) from the same YAML the agent
reads, and manages the opted-in pods of its node whose containers live in a RuncRuntime
directory under the id `<namespace>.<pod name>`. The pod's netns comes from the container's own
bundle. `zeroproxy agent --scale-to-zero` runs the same inside the agent
(controlplane.scaling.NodeScaler, which also publishes the state on the Pods with the API
source); `run` is for a node whose service proxy is not zeroproxy. Both find their pods with
controlplane.scaling.node_pods. `status` reads the JSON state file the scaler rewrites on every
state change, so it works from any process, for either.

Hooked into zeroproxy/cli.py with `scale_cli.add_parser(sub)`; `main` below also runs it
standalone (`python -m zeroproxy.scale_cli status`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_STATE_FILE = "/run/zeroproxy/scale-to-zero.json"
DEFAULT_RUNTIME_DIR = "/var/lib/zeroproxy/runtime"

log = logging.getLogger("zeroproxy.scale")


# --- status ----------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    path = Path(args.state_file)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        print(f"no scale-to-zero state at {path} (is `zeroproxy agent --scale-to-zero` or `zeroproxy scale run` "
              "running?)", file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps(doc, indent=2))
        return 0
    age = time.time() - doc.get("written", 0)
    print(f"scaler pid {doc.get('pid')}, state written {age:.1f} s ago")
    print(f"{'POD':<32} {'STATE':<13} {'PORTS':<12} {'IDLE':>8} {'CKPT':>5} {'RESTORE':>7} {'FAIL':>4} "
          f"{'HELD':>4} {'PROXIED':>7}  LAST RESTORE / REASON")
    for p in doc.get("pods", []):
        ports = ",".join(str(x) for x in p["ports"]) or "-"
        last = f"{p['last_restore_seconds'] * 1000:.0f} ms" if p.get("last_restore_seconds") else "-"
        tail = p["reason"] or last
        print(f"{p['name']:<32} {p['state']:<13} {ports:<12} {p['idle_for']:>7.1f}s {p['checkpoints']:>5} "
              f"{p['restores']:>7} {p['failures']:>4} {p['held']:>4} {p['accepted']:>7}  {tail}")
    return 0


# --- run -------------------------------------------------------------------------------------


async def _run(args: argparse.Namespace) -> None:
    from prometheus_client import start_http_server

    from controlplane.filesource import FileSource
    from controlplane.scaling import node_pods
    from controlplane.translate import translate
    from scaletozero.runc import RuncRuntime
    from scaletozero.scaler import Scaler

    kind, _, path = args.source.partition(":")
    if kind != "file" or not path:
        raise SystemExit(f"--source {args.source!r}: expected file:PATH")
    runtime = RuncRuntime(Path(args.runtime_dir), Path(args.criu), cgroup_parent=args.cgroup_parent)
    scaler = Scaler(runtime, state_file=Path(args.state_file), restore_timeout=args.restore_timeout)
    await scaler.start()
    if args.metrics_port:
        start_http_server(args.metrics_port, args.metrics_address, registry=scaler.metrics.registry)
    changed = asyncio.Event()
    latest: list[list[dict[str, Any]]] = []

    def on_change(objects: list[dict[str, Any]]) -> None:
        latest[:] = [objects]
        changed.set()

    async def reconcile(objects: list[dict[str, Any]]) -> None:
        pods = translate(objects, args.node_name).pods.values()
        want, problems = node_pods(pods, args.node_name, runtime)
        for p in problems:
            log.error("invalid input: %s", p)
        await scaler.reconcile(want)

    source = FileSource(path, on_change)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    source_task = asyncio.create_task(source.run())
    stop_task = asyncio.create_task(stop.wait())
    try:
        while not stop.is_set():
            change_task = asyncio.create_task(changed.wait())
            await asyncio.wait({change_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            change_task.cancel()
            if changed.is_set():
                changed.clear()
                await reconcile(latest[0])
    finally:
        source.stop()
        source_task.cancel()
        stop_task.cancel()
        await asyncio.gather(source_task, stop_task, return_exceptions=True)
        log.info("stopping: links and listeners go away; containers stay as they are")
        await scaler.close()
        runtime.close()


def cmd_run(args: argparse.Namespace) -> int:
    import uvloop

    uvloop.run(_run(args))
    return 0


# --- argparse ----------------------------------------------------------------------------------


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add `scale` with its subcommands to an argparse subparsers object."""
    p = sub.add_parser(
        "scale", help="scale to zero: run it for this node's opted-in pods, or show its state",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  zeroproxy scale run --source file:cluster.yaml --node-name a --runtime-dir /var/lib/zp/rt\n"
               "  zeroproxy scale status\n"
               "  zeroproxy scale status -o json\n",
    )
    ss = p.add_subparsers(dest="scale_command", required=True)
    st = ss.add_parser("status", help="state, counters and last durations of every opted-in pod")
    st.add_argument("--state-file", default=DEFAULT_STATE_FILE, help="the scaler's state file (default %(default)s)")
    st.add_argument("-o", "--output", choices=["table", "json"], default="table")
    st.set_defaults(func=cmd_status)

    r = ss.add_parser("run", help="manage the opted-in pods of this node (Pod annotations in the source)")
    r.add_argument("--source", required=True, help="file:PATH, the same Kubernetes YAML the agent reads")
    r.add_argument("--node-name", default=socket.gethostname(), help="this node's name (default %(default)s)")
    r.add_argument("--runtime-dir", default=DEFAULT_RUNTIME_DIR,
                   help="RuncRuntime base directory holding the pods' containers, id <namespace>.<pod>")
    r.add_argument("--criu", default="/var/tmp/zeroproxy/criu-4.2.1/criu",
                   help="CRIU >= 4.2.1 binary (scripts/build-criu.sh prints its path)")
    r.add_argument("--cgroup-parent", default="/zeroproxy", help="cgroup parent of the containers")
    r.add_argument("--state-file", default=DEFAULT_STATE_FILE, help="where `scale status` reads from")
    r.add_argument("--restore-timeout", type=float, default=30.0,
                   help="default seconds held clients wait for a restore (per pod: zeroproxy.io/restore-timeout)")
    r.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port (0 = off)")
    r.add_argument("--metrics-address", default="127.0.0.1", help="address for the metrics server")
    r.set_defaults(func=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zeroproxy")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
