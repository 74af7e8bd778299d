"""The agent under `ip netns exec`, which remounts /sys in a mount namespace of its own: the
error names the cause and the fix (nsenter), and paths on mounts outside /sys work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dataplane import inspect, netns
from testbed import nettools
from testbed.bed import TestBed
from testbed.k8sobjects import endpoint_slice, service
from testbed.sandbox import AgentProcess

PORT = 8080

HOST_MOUNTINFO = """\
22 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
27 22 0:24 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
28 27 0:25 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
35 22 0:30 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:14 - bpf bpf rw,mode=700
"""
# What `ip netns exec` leaves: the same tree without /sys's submounts, and a fresh sysfs.
NETNS_EXEC_MOUNTINFO = """\
40 39 0:5 / / rw,relatime master:1 - ext4 /dev/vda rw
41 40 0:40 / /tmp/x\\040y rw,relatime master:2 - tmpfs tmpfs rw
120 40 0:60 / /sys rw,relatime - sysfs zp-node rw
"""


def test_sys_remounted_reads_mountinfo() -> None:
    assert not netns.sys_remounted(HOST_MOUNTINFO)
    assert netns.sys_remounted(NETNS_EXEC_MOUNTINFO)
    assert netns.hidden_mounts_hint(HOST_MOUNTINFO) == ""
    hint = netns.hidden_mounts_hint(NETNS_EXEC_MOUNTINFO, netns_dir=Path("/nonexistent"))
    assert "`ip netns exec`" in hint and "nsenter --net=/run/netns/NAME" in hint, hint


def _agent(*args: str, wrap: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*wrap, sys.executable, "-m", "zeroproxy", "agent", "--source", "file:/dev/null",
                           "--healthz-bind-address", "", "--metrics-bind-address", "", *args],
                          capture_output=True, text=True, timeout=120)


def test_agent_under_ip_netns_exec_says_to_use_nsenter(testbed: TestBed, tmp_path: Path) -> None:
    node = testbed.add_node("m")
    pins = Path("/sys/fs/bpf") / f"zp-hint-{testbed.id}"
    r = _agent("--bpffs", str(pins), "--cgroup", str(node.cgroup_path), wrap=["ip", "netns", "exec", node.netns])
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    err = r.stderr
    assert "Traceback" not in err, err
    assert f"--bpffs {pins} is not on a bpf filesystem" in err, err
    assert f"--cgroup {node.cgroup_path}: no such directory" in err, err
    assert f"`ip netns exec {node.netns}`" in err, err
    assert f"nsenter --net=/run/netns/{node.netns} zeroproxy ..." in err, err
    assert not pins.exists()  # failed before creating anything
    listed = subprocess.run(["ip", "netns", "exec", node.netns, sys.executable, "-m", "zeroproxy", "service", "list",
                             "--bpffs", str(pins)], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 1 and f"nsenter --net=/run/netns/{node.netns} zeroproxy ..." in listed.stderr, \
        (listed.returncode, listed.stderr)

    # The same agent entered with nsenter sees /sys as the host mounts it: no hint, since the
    # cause is elsewhere (here: a directory that is not a cgroup v2 one).
    plain = tmp_path / "not-a-cgroup"
    plain.mkdir()
    r = _agent("--bpffs", str(pins), "--cgroup", str(plain), wrap=["nsenter", f"--net=/run/netns/{node.netns}"])
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert f"--cgroup {plain} is not a cgroup v2 directory (cgroup2 is mounted at {netns.cgroup2_mount()})" \
        in r.stderr, r.stderr
    assert "ip netns exec" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not pins.exists()


class _IpNetnsExecAgent(AgentProcess):
    def argv(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns_name, *super().argv()]

    netns_name = ""


def test_agent_under_ip_netns_exec_works_on_mounts_outside_sys(testbed: TestBed, tmp_path: Path) -> None:
    """The second way out the error names: a bpffs and a cgroup2 mounted outside /sys survive
    `ip netns exec`, and the agent runs there as anywhere."""
    node = testbed.add_node("m")
    client = testbed.add_pod(node, "client")
    web = testbed.add_pod(node, "web-1")
    web.serve(web.name, tcp=[PORT])
    bpf, cg = tmp_path / "bpf", tmp_path / "cgroup2"
    bpf.mkdir()
    cg.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(bpf)], check=True)
    try:
        subprocess.run(["mount", "-t", "cgroup2", "cgroup2", str(cg)], check=True)
        try:
            node_cgroup = cg / node.cgroup_path.relative_to(netns.cgroup2_mount())
            assert node_cgroup.is_dir()  # the same hierarchy, seen from a second mount
            agent = _IpNetnsExecAgent(tmp_path / "agent", node_cgroup, node_name="m", name="agent-m")
            agent.netns_name = node.netns
            agent.pin_dir = bpf
            try:
                agent.write([
                    service("web", ["10.96.0.81"], [{"name": "http", "port": 80, "protocol": "TCP",
                                                    "targetPort": PORT}]),
                    endpoint_slice("web", [web.ip4], [{"name": "http", "port": PORT, "protocol": "TCP"}]),
                ])
                agent.start()
                assert agent.argv()[:4] == ["ip", "netns", "exec", node.netns]
                have = {s.frontend: s.backends for s in inspect.service_list(bpf)}
                assert have == {"10.96.0.81:80/TCP": [f"{web.ip4}:{PORT}"]}, agent.log_text()
                records = client.client(nettools.format_target("10.96.0.81", 80), count=10)
                assert [r["server_name"] for r in records if r["ok"]] == ["web-1"] * 10, records[:3]
            finally:
                agent.close()
        finally:
            subprocess.run(["umount", str(cg)], check=True)
    finally:
        subprocess.run(["umount", str(bpf)], check=True)
