"""A connected UDP socket whose backend leaves the service fails visibly; its next socket finds a
live backend (dataplane/udp.py). The client is DNS-style: one connected socket, kept as long as
it works, a new one only after an error."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from dataplane import inspect
from testbed.bed import TestBed
from testbed.k8sobjects import endpoint_slice, service
from testbed.sandbox import AgentProcess

DNS_PORT = 5353
VIP = "10.96.0.53"

# Asks "who are you" every 50 ms on one connected socket; on any error prints it and opens a
# new socket. One JSON line per attempt; stops when the stop file exists.
CLIENT = textwrap.dedent("""
    import json, os, socket, sys, time
    target, stop = (sys.argv[1], int(sys.argv[2])), sys.argv[3]
    sock = None
    while not os.path.exists(stop):
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.settimeout(0.5)
            sock.connect(target)
        try:
            sock.send(b"zeroproxy-request\\n")
            name = json.loads(sock.recv(65535))["server_name"]
            print(json.dumps({"name": name, "fd": sock.fileno()}), flush=True)
        except OSError as e:
            import errno
            print(json.dumps({"error": errno.errorcode.get(e.errno, "timeout")}), flush=True)
            sock.close()
            sock = None
        time.sleep(0.05)
""")


def _objects(backends: list[Any]) -> list[dict[str, Any]]:
    ports = [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": DNS_PORT}]
    return [service("dns", [VIP], ports),
            endpoint_slice("dns", [p.ip4 for p in backends], [{"name": "dns", "port": DNS_PORT, "protocol": "UDP"}])]


def _wait_backends(agent: AgentProcess, want: list[Any]) -> None:
    wanted = sorted(f"{p.ip4}:{DNS_PORT}" for p in want)
    deadline = time.monotonic() + 20
    while {s.frontend: sorted(s.backends) for s in inspect.service_list(agent.pin_dir)}.get(f"{VIP}:53/UDP") != wanted:
        assert time.monotonic() < deadline, agent.log_text()[-3000:]
        time.sleep(0.05)


def _lines(proc: subprocess.Popen[str], until: Any, timeout: float = 30) -> list[dict[str, Any]]:
    """Read the client's lines until ``until(lines)`` holds."""
    assert proc.stdout is not None
    lines: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while not until(lines):
        assert time.monotonic() < deadline, lines[-20:]
        line = proc.stdout.readline()
        assert line, f"client exited: {proc.stderr.read() if proc.stderr else ''}"
        lines.append(json.loads(line))
    return lines


def test_connected_udp_socket_to_a_removed_backend_is_aborted(testbed: TestBed, tmp_path: Path) -> None:
    node = testbed.add_node("m")
    client = testbed.add_pod(node, "client")
    direct = testbed.add_pod(node, "direct")  # talks to dns-1's own address: must be left alone
    dns1, dns2 = testbed.add_pod(node, "dns-1"), testbed.add_pod(node, "dns-2")
    for p in (dns1, dns2):
        p.serve(p.name, udp=[DNS_PORT])
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    stop = tmp_path / "stop"
    with AgentProcess(tmp_path / "agent", node.cgroup_path, node_name="m", name="agent-m") as agent:
        agent.write(_objects([dns1]))
        agent.start()
        _wait_backends(agent, [dns1])
        via_service = client.run([sys.executable, str(script), VIP, "53", str(stop)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        to_pod = direct.run([sys.executable, str(script), dns1.ip4, str(DNS_PORT), str(stop)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            before = _lines(via_service, lambda ls: len(ls) >= 5)
            assert {ln.get("name") for ln in before} == {"dns-1"}, before
            _lines(to_pod, lambda ls: len(ls) >= 3)

            agent.write(_objects([dns2]))  # dns-1 leaves the service (it still answers, directly)
            _wait_backends(agent, [dns2])
            after = _lines(via_service, lambda ls: sum(ln.get("name") == "dns-2" for ln in ls) >= 5)
            names = [ln.get("name") or ln["error"] for ln in after]
            # the kept socket fails with an error of its own (aborted while waiting, or no
            # destination any more when it sends next), not a silent timeout; then dns-2 only
            first_error = next(i for i, n in enumerate(names) if not n.startswith("dns-"))
            assert names[first_error] in ("ECONNABORTED", "EDESTADDRREQ"), names
            assert set(names[first_error + 1:]) == {"dns-2"}, names
            assert set(names[:first_error]) <= {"dns-1"}, names  # at most what was in flight
            direct_lines = _lines(to_pod, lambda ls: len(ls) >= 10)
            assert {ln.get("name") for ln in direct_lines} == {"dns-1"}, direct_lines  # never aborted
            log = agent.log_text()
            assert f"destroyed a connected UDP socket {client.ip4}:" in log and f"-> {dns1.ip4}:{DNS_PORT}: its " \
                   f"backend left {VIP}:53" in log, log[-3000:]
            assert log.count("destroyed a connected UDP socket") == 1, log[-3000:]
        finally:
            stop.touch()
            for proc in (via_service, to_pod):
                proc.communicate(timeout=30)
