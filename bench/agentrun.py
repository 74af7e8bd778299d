"""Control plane from cold through the real agent: ``zeroproxy agent --source file:PATH``.

ServiceMaps.sync alone (bench.zpctl) times the map writes; this times what an operator waits
for after starting an agent on a node with N services: Python start, bcc compile, reading and
translating the YAML, and the first sync, up to the agent's "initial sync done" log line. The
agent's resident memory is read right after that line, with the whole table in its shadow.

The agent attaches to a cgroup of its own, empty, inside the bench's test bed: it replaces any
zeroproxy programs on its cgroup, so sharing the zp node's cgroup with bench.zpctl would detach
the programs the latency runs measure. It runs inside a bed namespace, because it opens health
and metrics ports that must not collide with anything on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.services import Service

REPO = Path(__file__).resolve().parent.parent
READY = "initial sync done"


def cluster_yaml(services: Sequence[Service], node_name: str) -> str:
    """Services and EndpointSlices as ``kubectl get -o yaml`` prints them (one document each)."""
    docs = []
    for s in services:
        docs.append(
            "apiVersion: v1\nkind: Service\n"
            f"metadata:\n  name: {s.name}\n  namespace: {s.namespace}\n"
            f"spec:\n  type: ClusterIP\n  clusterIP: {s.vip}\n  clusterIPs:\n  - {s.vip}\n"
            f"  ports:\n  - name: {s.port_name}\n    port: {s.port}\n    protocol: TCP\n"
            f"    targetPort: {s.endpoints[0][1]}\n"
        )
        eps = "".join(
            f"- addresses:\n  - {ip}\n  conditions:\n    ready: true\n  nodeName: {node_name}\n"
            for ip, _port in s.endpoints
        )
        docs.append(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n"
            f"metadata:\n  name: {s.name}-bench\n  namespace: {s.namespace}\n"
            f"  labels:\n    kubernetes.io/service-name: {s.name}\n"
            f"endpoints:\n{eps}"
            f"ports:\n- name: {s.port_name}\n  port: {s.endpoints[0][1]}\n  protocol: TCP\n"
        )
    return "---\n".join(docs)


def _rss_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return {"rss_kb": out.get("VmRSS", 0), "hwm_kb": out.get("VmHWM", 0)}


Spawn = Callable[..., "subprocess.Popen[str]"]


def measure(services: Sequence[Service], *, spawn: Spawn, workdir: Path, cgroup: Path, pin_dir: Path,
            node_name: str, timeout: float = 900.0, source_args: Sequence[str] | None = None,
            extra_args: Sequence[str] = ()) -> dict[str, Any]:
    """Start an agent on a fresh pin dir, wait for its first full sync, stop it, clean up.

    ``spawn(argv, **popen_kwargs)`` starts the agent where it should run (a bed namespace).
    Without ``source_args`` the agent reads ``services`` from a file source written here; with
    them (``--source kubernetes --kubeconfig ...``) the objects are already in the apiserver.
    """
    from dataplane import loader

    path = workdir / "cluster.yaml"
    if source_args is None:
        path.write_text(cluster_yaml(services, node_name))
        source_args = ["--source", f"file:{path}"]
    cgroup.mkdir(exist_ok=True)
    loader.cleanup(cgroup, pin_dir)  # from cold: no maps an earlier agent could be adopted from
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    argv = [sys.executable, "-m", "zeroproxy", "--log-level", "info", "agent", *source_args,
            "--cgroup", str(cgroup), "--bpffs", str(pin_dir), "--node-name", node_name, *extra_args]
    t0 = time.perf_counter()
    proc = spawn(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                 stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        ready = _wait_for(proc, READY, timeout, lines)
        seconds = time.perf_counter() - t0
        if not ready:
            raise RuntimeError(f"agent did not sync {len(services)} services within {timeout} s: {lines[-5:]}")
        mem = _rss_kb(proc.pid)
        programmed = _frontends(pin_dir, env)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
        loader.cleanup(cgroup, pin_dir)
        path.unlink(missing_ok=True)
    return {"seconds": seconds, **mem, **_breakdown(lines), "frontends_programmed": programmed}


def _frontends(pin_dir: Path, env: dict[str, str]) -> int | None:
    """Frontends in the agent's pinned maps, read by ``zeroproxy status`` (checks the sync was real)."""
    proc = subprocess.run([sys.executable, "-m", "zeroproxy", "status", "--bpffs", str(pin_dir)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    try:
        return int(json.loads(proc.stdout)["frontends"])
    except (ValueError, KeyError, TypeError):
        return None


def _wait_for(proc: subprocess.Popen[str], text: str, timeout: float, lines: list[str]) -> bool:
    """Read the agent's stderr until ``text`` appears; raw reads, because a buffered readline()
    can pull several lines out of the pipe at once and leave select() waiting for data it has."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    deadline = time.monotonic() + timeout
    pending = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(max(0.0, deadline - time.monotonic())):
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                return False
            *done, pending = (pending + chunk).split(b"\n")
            for raw in done:
                line = raw.decode(errors="replace")
                lines.append(line)
                if text in line:
                    return True
    return False


def _breakdown(lines: Sequence[str]) -> dict[str, Any]:
    """The agent's own timings from its log: translation and the first map sync."""
    out: dict[str, Any] = {}
    for line in lines:
        # The log's wording is the agent's to change: anything not found is simply left out.
        if m := re.search(r"source: (\d+) objects", line):
            out["objects"] = int(m.group(1))
        elif (m := re.search(r"\bsync\b.*\bnow (\d+) frontends.*\(([\d.]+) ms\)", line)) and "sync_ms" not in out:
            out.update(frontends=int(m.group(1)), sync_ms=float(m.group(2)))
    return out
