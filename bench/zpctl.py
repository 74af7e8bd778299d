"""The zeroproxy side of the benchmark, in its own process: load, attach, program services.

It runs apart from the orchestrator so that its resident memory is what an agent holding the
datapath and the service table would use (bcc and LLVM included), not the orchestrator's
matplotlib and bookkeeping. The orchestrator talks to it with one JSON object per line on
stdin/stdout; every reply carries the process's current and peak RSS.

Commands (``op``):
  load    {"cgroup", "pin_dir"}      compile, attach to the cgroup, pin under pin_dir; with
          "devices", "netns", "node_port_range" (and "snat_ports") also the TC NodePort programs on those devices
          of that node namespace, with the node's addresses accepting NodePorts
  sync    {"count", "endpoints"}     cold-program ``count`` services (maps emptied first, untimed)
  change  {"index", "endpoints"}     replace one service's endpoints (partial sync), then time a full one
  program {"services"}               cold-program exactly these services (bench.services.Service
                                     fields as lists; NodePort ones get their NodePort frontend)
  np_stats                           the TC programs' outcome and drop counters so far
  quit
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def request(proc: subprocess.Popen[str] | None, who: str, **cmd: Any) -> dict[str, Any]:
    """Send one command to a zpctl child and return its reply; ``who`` names the child in errors."""
    assert proc is not None and proc.stdin and proc.stdout
    proc.stdin.write(json.dumps(cmd) + "\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{who} exited ({proc.wait()}) during {cmd['op']}")
    reply = json.loads(line)
    if not reply.get("ok"):
        raise RuntimeError(f"{who} {cmd['op']} failed: {reply.get('error')}")
    return reply


def stop(proc: subprocess.Popen[str]) -> None:
    """Ask a zpctl child to quit (it releases its bcc handles; pins stay for the caller's
    cleanup), kill it if it does not within 10 s, and close its pipes."""
    with contextlib.suppress(Exception):
        assert proc.stdin is not None
        proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
        proc.stdin.close()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    with contextlib.suppress(Exception):
        assert proc.stdout is not None
        proc.stdout.close()


def _rss_kb() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return {"rss_kb": out.get("VmRSS", 0), "hwm_kb": out.get("VmHWM", 0)}


class Controller:
    """Holds one SockDatapath and its ServiceMaps, like an agent would."""

    def __init__(self) -> None:
        self.datapath: Any = None
        self.tc: Any = None
        self.maps: Any = None
        self.services: list[Any] = []

    def load(self, cgroup: str, pin_dir: str, devices: list[str] | None = None, netns: str | None = None,
             node_port_range: list[int] | None = None, snat_ports: list[int] | None = None) -> dict[str, Any]:
        from dataplane import tc
        from dataplane.loader import SockDatapath
        from dataplane.services import ServiceMaps
        from dataplane.table import DEFAULT_NODE_PORT_RANGE, DEFAULT_SNAT_PORTS

        t0 = time.perf_counter()
        self.datapath = SockDatapath(Path(cgroup), Path(pin_dir))
        self.datapath.load()
        if devices:
            lo, hi = node_port_range or DEFAULT_NODE_PORT_RANGE
            s_lo, s_hi = snat_ports or DEFAULT_SNAT_PORTS
            self.tc = tc.NodeDatapath(Path(pin_dir), devices, netns=netns, node_port_range=(lo, hi),
                                      snat_ports=(s_lo, s_hi))
            self.tc.load()
        t1 = time.perf_counter()
        self.datapath.attach()
        if self.tc is not None:
            self.tc.attach()
        t2 = time.perf_counter()
        self.maps = ServiceMaps(self.datapath)
        if self.tc is not None:
            self.maps.set_node_port_addresses(tc.node_port_addresses([], tc.local_addresses(netns)))
        return {"load_s": t1 - t0, "attach_s": t2 - t1}

    def np_stats(self) -> dict[str, Any]:
        """The TC path's outcome and drop counters so far (summed over CPUs), by name."""
        return {"stats": {reason.name.lower(): n for reason, n in self.tc.stats().items()}}

    def program(self, services: list[list[Any]]) -> dict[str, Any]:
        from bench.services import Service, service_entries

        self.maps.sync([])
        self.services = [Service(i, vip, port, tuple(tuple(e) for e in eps), node_port)
                         for i, vip, port, eps, node_port in services]
        entries = service_entries(self.services)
        t0 = time.perf_counter()
        result = self.maps.sync(entries)
        elapsed = time.perf_counter() - t0
        return {"sync_s": elapsed, "frontends": self.maps.frontend_count,
                "frontends_written": result.frontends_written, "backends": self.maps.backend_count}

    def sync(self, count: int, endpoints: list[list[Any]]) -> dict[str, Any]:
        from bench.services import make_services, service_entries

        self.maps.sync([])  # cold start: nothing programmed, as when iptables-restore starts empty
        self.services = make_services(count, [tuple(e) for e in endpoints])
        entries = service_entries(self.services)
        t0 = time.perf_counter()
        result = self.maps.sync(entries)
        elapsed = time.perf_counter() - t0
        return {"sync_s": elapsed, "frontends": self.maps.frontend_count,
                "frontends_written": result.frontends_written, "backends": self.maps.backend_count}

    def change(self, index: int, endpoints: list[list[Any]]) -> dict[str, Any]:
        """One endpoint change among N services: what an agent does on an EndpointSlice update.

        Timed twice: the partial sync the agent runs for a change (scope = the changed frontend),
        then a full sync of the same table, which writes nothing but diffs every frontend (the
        agent's periodic and after-failure reconcile).
        """
        from bench.services import Service, service_entries

        old = self.services[index]
        self.services[index] = Service(old.index, old.vip, old.port, tuple(tuple(e) for e in endpoints))
        changed = service_entries([self.services[index]])
        t0 = time.perf_counter()
        result = self.maps.sync(changed, scope=[changed[0].frontend])
        partial = time.perf_counter() - t0
        entries = service_entries(self.services)  # the agent keeps its translated table; not timed
        t0 = time.perf_counter()
        self.maps.sync(entries)
        full = time.perf_counter() - t0
        return {"sync_s": partial, "full_sync_s": full, "frontends_written": result.frontends_written}


def main() -> None:
    # The protocol gets its own copy of stdout; fd 1 then points at stderr, so anything bcc or
    # clang prints cannot corrupt a reply line.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    ctl = Controller()
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            if op == "quit":
                break
            reply: dict[str, Any] = getattr(ctl, op)(**cmd)
            reply["ok"] = True
        except Exception as exc:  # reported to the orchestrator, which stops the run
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        reply.update(_rss_kb())
        proto.write(json.dumps(reply) + "\n")
    if ctl.tc is not None:
        ctl.tc.close()
    if ctl.datapath is not None:
        ctl.datapath.close()  # handles only: attachments and pins stay until cleanup()


if __name__ == "__main__":
    main()
