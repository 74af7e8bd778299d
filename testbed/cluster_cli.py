"""``./zp cluster up|down|status`` (``python -m testbed cluster``): a kubeadm cluster with zeroproxy on it.

``up`` starts a supervisor process that owns the cluster (``testbed.kubecluster``): it builds
the nodes, deploys zeroproxy from ``manifests/`` as a user would, writes a kubeconfig for the host
and then waits. ``down`` asks it to tear everything down and waits until it has. One owner means
one teardown path, the same one the tests use; a supervisor that was killed is cleaned up by
``down`` all the same (``kubecluster.cleanup_stale``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

from testbed import kubecluster

CURRENT = kubecluster.STATE_DIR / "current.json"
UP_TIMEOUT_S = 900.0
DOWN_TIMEOUT_S = 180.0

log = logging.getLogger(__name__)


def _current() -> dict[str, Any] | None:
    try:
        return json.loads(CURRENT.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def serve(nodes: int, proxy: str, ready_fd: int) -> int:
    """The supervisor: bring the cluster up, report on ``ready_fd``, hold it until SIGTERM."""
    stop = False
    up = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True
        if not up:  # still bringing it up: abort that; the teardown below still runs
            raise SystemExit(143)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    report = os.fdopen(ready_fd, "w")
    c = kubecluster.KubeCluster(nodes, proxy=proxy)
    try:
        c.up()
        up = True
        CURRENT.write_text(json.dumps({"pid": os.getpid(), "id": c.id, "kubeconfig": str(c.admin_kubeconfig),
                                       "nodes": [{"name": n.name, "ip": n.ip, "netns": n.netns}
                                                 for n in c.nodes], "proxy": proxy}))
        report.write(json.dumps({"ok": True, "id": c.id, "kubeconfig": str(c.admin_kubeconfig)}) + "\n")
        report.close()
        while not stop:
            time.sleep(0.5)
        return 0
    except BaseException as exc:
        with contextlib.suppress(OSError, ValueError):
            report.write(json.dumps({"ok": False, "error": str(exc)}) + "\n")
            report.close()
        raise
    finally:
        c.close()
        with contextlib.suppress(FileNotFoundError):
            CURRENT.unlink()


def cmd_up(args: argparse.Namespace) -> int:
    current = _current()
    if current and _alive(current["pid"]):
        print(f"cluster {current['id']} is already up; kubeconfig: {current['kubeconfig']}", file=sys.stderr)
        return 1
    kubecluster.STATE_DIR.mkdir(parents=True, exist_ok=True)
    log_path = kubecluster.STATE_DIR / "supervisor.log"
    read_fd, write_fd = os.pipe()
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "testbed", "cluster", "_serve", "--nodes", str(args.nodes),
             "--proxy", args.proxy, "--ready-fd", str(write_fd)],
            pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=kubecluster.ROOT)
    os.close(write_fd)
    print(f"bringing up a {args.nodes}-node cluster (log: {log_path}) ...", file=sys.stderr)
    with os.fdopen(read_fd) as ready:
        line = ready.readline()
    if not line:
        print(f"the cluster supervisor exited (code {proc.wait()}); see {log_path}", file=sys.stderr)
        return 1
    result = json.loads(line)
    if not result["ok"]:
        proc.wait(DOWN_TIMEOUT_S)
        print(f"cluster bring-up failed: {result['error']}\n(see {log_path}; everything was removed)",
              file=sys.stderr)
        return 1
    print(f"cluster {result['id']} is up\n  export KUBECONFIG={result['kubeconfig']}\n"
          f"  {kubecluster.BIN_DIR}/kubectl get nodes,pods -A\n  ./zp cluster down   # removes all of it")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    current = _current()
    if current and _alive(current["pid"]):
        os.kill(current["pid"], signal.SIGTERM)
        deadline = time.monotonic() + DOWN_TIMEOUT_S
        while _alive(current["pid"]) and time.monotonic() < deadline:
            time.sleep(0.5)
        if _alive(current["pid"]):
            print(f"the supervisor (pid {current['pid']}) did not finish in {DOWN_TIMEOUT_S:.0f}s", file=sys.stderr)
            return 1
    removed = kubecluster.cleanup_stale()
    with contextlib.suppress(FileNotFoundError):
        CURRENT.unlink()
    what = current["id"] if current else ", ".join(removed) or "nothing was up"
    print(f"cluster down: {what}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    current = _current()
    if not current or not _alive(current["pid"]):
        print("no cluster is up")
        return 1
    print(json.dumps(current, indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(args.nodes, args.proxy, args.ready_fd)


def add_parser(sub: Any) -> None:
    c = sub.add_parser("cluster", help="a kubeadm cluster on this machine (netns nodes) with zeroproxy deployed",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  ./zp cluster up --nodes 2\n  ./zp cluster status\n"
                              "  ./zp cluster down\n")
    csub = c.add_subparsers(dest="cluster_cmd", required=True)
    up = csub.add_parser("up", help="build the cluster and deploy zeroproxy; prints the kubeconfig")
    up.add_argument("--nodes", type=int, default=2, choices=range(1, 5), help="number of nodes (default 2)")
    up.add_argument("--proxy", choices=("zeroproxy", "none"), default="zeroproxy",
                    help="service proxy to deploy (default zeroproxy)")
    up.set_defaults(func=cmd_up)
    down = csub.add_parser("down", help="tear the cluster down completely")
    down.set_defaults(func=cmd_down)
    st = csub.add_parser("status", help="the running cluster, if any")
    st.set_defaults(func=cmd_status)
    sv = csub.add_parser("_serve", help=argparse.SUPPRESS)
    sv.add_argument("--nodes", type=int, required=True)
    sv.add_argument("--proxy", required=True)
    sv.add_argument("--ready-fd", type=int, required=True)
    sv.set_defaults(func=cmd_serve)

