"""The test bed and nettools, exercised with real namespaces, cgroups, processes and traffic.

Every later datapath test trusts this plumbing, so it is checked on its own first: if pods cannot
talk here, no eBPF test result means anything.
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
from pyroute2 import netns as pr_netns

from testbed import nettools
from testbed.bed import (
    CGROUP_DIR_PREFIX,
    STATE_DIR,
    Host,
    TestBed,
    cleanup_stale,
    find_cgroup2_mount,
    pin_root,
)

PROTOS = ["tcp", "udp-connected", "udp-unconnected"]
TCP_PORT = 8080
UDP_PORT = 5353


def _port(proto: str) -> int:
    return TCP_PORT if proto == "tcp" else UDP_PORT


def _cgroup_of(pid: int) -> str:
    """The cgroup v2 path of ``pid`` relative to the cgroup2 mount (the ``0::`` line)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise AssertionError(f"pid {pid} has no cgroup v2 line")


def _relative_cgroup(path: Path) -> str:
    return "/" + str(path.relative_to(find_cgroup2_mount()))


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie awaiting its reaper counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _leftovers(bed_id: str) -> list[str]:
    netns = [n for n in pr_netns.listnetns() if n.startswith(f"{bed_id}-")]
    cgroup = find_cgroup2_mount() / f"{CGROUP_DIR_PREFIX}{bed_id}"
    state = STATE_DIR / f"{bed_id}.json"
    return netns + [str(p) for p in (cgroup, state, pin_root(bed_id)) if p.exists()]


def _assert_reply(result: dict, proto: str, server: Host, client_ip: str, version: int) -> None:
    """One attempt reached ``server`` directly: no NAT anywhere, so both ends see real addresses."""
    target = [server.ip(version), _port(proto)]
    assert result["ok"], result
    assert result["error"] is None
    assert result["server_name"] == server.name
    assert result["peer_seen_by_server"][0] == client_ip
    assert result["server_local"] == target
    if proto == "udp-unconnected":
        assert result["reply_source"] == target
        assert result["getpeername"] is None
    else:
        assert result["getpeername"] == target


# --- traffic through the bed -----------------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("placement", ["same-node", "other-node"])
def test_pod_to_pod(testbed: TestBed, placement: str, version: int) -> None:
    n1 = testbed.add_node("n1")
    client = testbed.add_pod(n1, "client")
    # the second node comes after the first node's pod: routes must reach nodes added later too
    n2 = testbed.add_node("n2")
    server = testbed.add_pod(n1 if placement == "same-node" else n2, "server")
    server.serve(tcp=[TCP_PORT], udp=[UDP_PORT])
    for proto in PROTOS:
        results = client.client(nettools.format_target(server.ip(version), _port(proto)),
                                proto=proto, count=3)
        assert len(results) == 3
        for result in results:
            _assert_reply(result, proto, server, client.ip(version), version)


@pytest.mark.parametrize("version", [4, 6])
def test_pod_to_node_and_node_to_pod(testbed: TestBed, version: int) -> None:
    n1, n2 = testbed.add_node("n1"), testbed.add_node("n2")
    pod = testbed.add_pod(n1, "pod")
    pod.serve(tcp=[TCP_PORT], udp=[UDP_PORT])
    for node in (n1, n2):
        node.serve(tcp=[TCP_PORT], udp=[UDP_PORT])
        [to_node] = pod.client(nettools.format_target(node.ip(version), TCP_PORT))
        _assert_reply(to_node, "tcp", node, pod.ip(version), version)
        [to_pod] = node.client(nettools.format_target(pod.ip(version), TCP_PORT))
        assert to_pod["ok"], to_pod
        assert to_pod["server_name"] == pod.name
    # the pod's gateway address on its own node answers as well
    [to_router] = pod.client(nettools.format_target(
        n1.router_ip4 if version == 4 else n1.router_ip6, UDP_PORT), proto="udp-unconnected")
    assert to_router["ok"], to_router
    assert to_router["server_name"] == n1.name


@pytest.mark.parametrize("version", [4, 6])
def test_external_reaches_node_ips_but_not_pods(testbed: TestBed, version: int) -> None:
    node = testbed.add_node("n1")
    pod = testbed.add_pod(node, "pod")
    ext = testbed.add_external("client")
    node.serve(tcp=[TCP_PORT], udp=[UDP_PORT])
    pod.serve(tcp=[TCP_PORT])

    for proto in PROTOS:
        [result] = ext.client(nettools.format_target(node.ip(version), _port(proto)), proto=proto)
        _assert_reply(result, proto, node, ext.ip(version), version)

    # outside the cluster, pod CIDRs are unknown: NodePort tests must go through node addresses
    [direct] = ext.client(nettools.format_target(pod.ip(version), TCP_PORT), timeout=0.5)
    assert direct["error"] == "ENETUNREACH", direct

    # the node forwards for the underlay, and the pod's reply finds its way back through it
    cidr = node.pod_cidr4 if version == 4 else node.pod_cidr6
    ext.add_route(str(cidr), via=node.ip(version))
    [routed] = ext.client(nettools.format_target(pod.ip(version), TCP_PORT))
    _assert_reply(routed, "tcp", pod, ext.ip(version), version)


@pytest.mark.parametrize("version", [4, 6])
def test_unconnected_udp_reply_comes_from_the_address_queried(testbed: TestBed, version: int) -> None:
    # A node has two addresses a pod can reach (underlay and router). Replying from the routed
    # default source would be wrong for one of them; DNS-style clients would drop that reply.
    node = testbed.add_node("n1")
    pod = testbed.add_pod(node, "pod")
    node.serve(udp=[UDP_PORT])
    router = node.router_ip4 if version == 4 else node.router_ip6
    for address in (node.ip(version), router):
        [result] = pod.client(nettools.format_target(address, UDP_PORT), proto="udp-unconnected")
        assert result["ok"], result
        assert result["reply_source"] == [address, UDP_PORT]
        assert result["server_local"] == [address, UDP_PORT]
        assert result["sockname"][1] == result["peer_seen_by_server"][1]


@pytest.mark.parametrize("proto", ["tcp", "udp-connected"])
@pytest.mark.parametrize("version", [4, 6])
def test_client_reports_econnrefused_for_closed_port(testbed: TestBed, version: int, proto: str) -> None:
    node = testbed.add_node("n1")
    client = testbed.add_pod(node, "client")
    server = testbed.add_pod(node, "server")  # nothing listens there
    results = client.client(nettools.format_target(server.ip(version), 9), proto=proto, count=2,
                            timeout=5.0)
    assert [r["error"] for r in results] == ["ECONNREFUSED", "ECONNREFUSED"]
    assert not any(r["ok"] for r in results)
    # a refusal, not a timeout: far below the 5 s socket timeout (generous, not a speed test)
    assert all(r["total_ms"] < 1000 for r in results), results


def test_tcp_echo_64k(testbed: TestBed) -> None:
    node = testbed.add_node("n1")
    client, server = testbed.add_pod(node, "client"), testbed.add_pod(node, "server")
    server.serve(tcp=[TCP_PORT], echo=True)
    results = client.client(nettools.format_target(server.ip6, TCP_PORT), echo_bytes=65536, count=3)
    assert [r["ok"] for r in results] == [True, True, True], results


def test_client_count_and_concurrency(testbed: TestBed) -> None:
    node = testbed.add_node("n1")
    client, server = testbed.add_pod(node, "client"), testbed.add_pod(node, "server")
    server.serve(tcp=[TCP_PORT])
    proc = client.run(nettools.client_argv(nettools.format_target(server.ip4, TCP_PORT), count=40,
                                           concurrency=4), stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    results = nettools.parse_results(out)
    assert sorted(r["seq"] for r in results) == list(range(40))
    assert all(r["ok"] for r in results)
    assert len({tuple(r["sockname"]) for r in results}) == 40  # every attempt was its own connection
    summary = nettools.parse_summary(out)
    assert summary is not None
    assert (summary["attempts"], summary["ok"], summary["servers"]) == (40, 40, {"server": 40})


def test_client_loops_until_file_appears(testbed: TestBed, tmp_path: Path) -> None:
    node = testbed.add_node("n1")
    client, server = testbed.add_pod(node, "client"), testbed.add_pod(node, "server")
    server.serve(udp=[UDP_PORT])
    stop = tmp_path / "stop"
    proc = client.run(nettools.client_argv(nettools.format_target(server.ip4, UDP_PORT),
                                           proto="udp-connected", count=0, interval=0.01,
                                           until_file=str(stop)),
                      stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = [proc.stdout.readline() for _ in range(5)]  # it is running and answering
    stop.touch()
    rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    results = nettools.parse_results("".join(first) + rest)
    assert len(results) >= 5
    assert all(r["ok"] for r in results)
    summary = nettools.parse_summary(rest)
    assert summary is not None and summary["attempts"] == len(results)


# --- processes, cgroups, namespaces ----------------------------------------------------------------


def test_run_places_process_in_cgroup_and_netns(testbed: TestBed) -> None:
    node = testbed.add_node("n1")
    pod = testbed.add_pod(node, "pod")
    ext = testbed.add_external("ext")
    own_mnt = os.stat("/proc/self/ns/mnt").st_ino
    cases = [(pod, pod.cgroup_path), (node, node.cgroup_path / "host"), (ext, ext.cgroup_path)]
    for host, cgroup in cases:
        proc = host.run(["sleep", "60"])
        try:
            assert _cgroup_of(proc.pid) == _relative_cgroup(cgroup)
            assert os.stat(f"/proc/{proc.pid}/ns/net").st_ino == host.netns_inode
            # only the network namespace changes: CRIU cannot dump an `ip netns exec` mount ns
            assert os.stat(f"/proc/{proc.pid}/ns/mnt").st_ino == own_mnt
        finally:
            proc.kill()
            proc.wait()
    # the pod cgroup sits under the node cgroup, where the node's agent attaches its programs
    assert pod.cgroup_path.parent == node.cgroup_path
    assert node.cgroup_path.parent == testbed.cgroup_root
    outside = pod.run(["sleep", "60"], in_cgroup=False)
    try:
        assert _cgroup_of(outside.pid) == _cgroup_of(os.getpid())
        assert os.stat(f"/proc/{outside.pid}/ns/net").st_ino == pod.netns_inode
    finally:
        outside.kill()
        outside.wait()


def test_node_settings_and_interfaces(testbed: TestBed) -> None:
    node = testbed.add_node("n1")
    pod = testbed.add_pod(node, "pod")
    for key in ("ipv4/ip_forward", "ipv6/conf/all/forwarding"):
        assert node.check_output(["cat", f"/proc/sys/net/{key}"]).strip() == "1"
        assert pod.check_output(["cat", f"/proc/sys/net/{key}"]).strip() == "0"
    links = json.loads(testbed.run_in_netns(node.netns, ["ip", "-j", "link", "show"]).stdout)
    by_name = {link["ifname"]: link["ifindex"] for link in links}
    assert node.ifindex("eth0") == by_name["eth0"]
    assert pod.host_ifindex == by_name[pod.host_ifname]
    with pytest.raises(KeyError):
        node.ifindex("nonexistent0")
    with pytest.raises(subprocess.CalledProcessError, match="stderr"):
        pod.check_output(["sh", "-c", "echo problem >&2; exit 3"])


def test_two_beds_with_the_same_names_do_not_collide(testbed: TestBed) -> None:
    with TestBed(prefix="zp") as other:
        beds = [testbed, other]
        for bed in beds:
            node = bed.add_node("n1")
            bed.add_pod(node, "a").serve(tcp=[TCP_PORT])
            bed.add_pod(node, "b")
        assert testbed.id != other.id
        for bed in beds:
            [result] = bed.pods["b"].client(nettools.format_target(bed.pods["a"].ip4, TCP_PORT))
            assert result["ok"] and result["server_name"] == "a", result
        assert set(testbed.pods["a"].netns_path.parent.iterdir()) >= {
            bed.pods[name].netns_path for bed in beds for name in ("a", "b")}
    assert _leftovers(other.id) == []
    assert testbed.pods["a"].netns_path.exists()  # closing one bed left the other alone


def test_remove_pod(testbed: TestBed) -> None:
    node = testbed.add_node("n1")
    gone, kept = testbed.add_pod(node, "gone"), testbed.add_pod(node, "kept")
    proc = gone.run(["sleep", "60"])
    testbed.remove_pod(gone)
    assert proc.poll() is not None
    assert not gone.netns_path.exists() and not gone.cgroup_path.exists()
    assert "gone" not in testbed.pods and "gone" not in node.pods
    routes = testbed.run_in_netns(node.netns, ["ip", "route"]).stdout
    assert gone.ip4 not in routes and kept.ip4 in routes
    again = testbed.add_pod(node, "gone")  # the name and the address are free again
    assert again.ip4 == gone.ip4


def test_bad_arguments_are_refused(testbed: TestBed) -> None:
    node = testbed.add_node("n1")
    with pytest.raises(ValueError, match="already used"):
        testbed.add_node("n1")
    with pytest.raises(ValueError, match="bad name"):
        testbed.add_pod(node, "Not_A_Name")
    with pytest.raises(ValueError, match="outside"):
        testbed.add_pod(node, "elsewhere", ip4="10.99.0.5")
    with pytest.raises(ValueError, match="underlay"):
        testbed.add_external("ext", ip4="10.0.0.1")


# --- teardown ---------------------------------------------------------------------------------------


def test_teardown_after_exception_removes_everything(stale_beds_removed: list[str]) -> None:
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="test body failed"), TestBed(prefix="zp") as bed:
        node = bed.add_node("n1")
        pod = bed.add_pod(node, "pod")
        ext = bed.add_external("ext")
        pids.append(pod.serve(tcp=[TCP_PORT]).pid)
        # a grandchild the bed never saw, in the pod cgroup
        forked = pod.run(["sh", "-c", "sleep 600 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
        assert forked.stdout is not None
        pids += [forked.pid, int(forked.stdout.readline())]
        pids.append(ext.run(["sleep", "600"]).pid)
        pids.append(node.run(["sleep", "600"], in_cgroup=False).pid)  # only the netns holds it
        assert len(_leftovers(bed.id)) == 6  # 4 namespaces + cgroup + state file; not yet gone
        raise RuntimeError("test body failed")
    assert _leftovers(bed.id) == []
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)  # the grandchild is reaped by init, not by us
    assert [pid for pid in pids if _alive(pid)] == []
    bed.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        bed.add_node("n2")


CRASHING_CREATOR = """
import os, signal, subprocess
from testbed.bed import TestBed
bed = TestBed(prefix="zpcrash")
pod = bed.add_pod(bed.add_node("n1"), "pod")
proc = pod.run(["sleep", "600"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
pins = bed.pin_root / "a"  # what a test pins for the bed (its own cleanup never ran)
pins.mkdir(parents=True)
print(bed.id, proc.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit: what a crashed run leaves
"""


def test_cleanup_stale_removes_crashed_runs_only(testbed: TestBed) -> None:
    run = subprocess.run([sys.executable, "-c", CRASHING_CREATOR], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == -signal.SIGKILL, run.stderr
    bed_id, pid = run.stdout.split()
    assert len(_leftovers(bed_id)) == 6  # underlay, node and pod namespaces + cgroup + state file + pins
    assert _alive(int(pid))

    live = TestBed(prefix="zpcrash")  # a run in progress with the same prefix must survive
    try:
        live.add_node("n1")
        assert cleanup_stale("zpcrash") == [bed_id]
        assert _leftovers(bed_id) == []
        deadline = time.monotonic() + 5
        while _alive(int(pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(int(pid))
        assert len(_leftovers(live.id)) == 4  # underlay + node namespaces, cgroup, state file
        assert cleanup_stale("zpcrash") == []
    finally:
        live.close()
    assert _leftovers(live.id) == []


# --- pure Python helpers -----------------------------------------------------------------------------


def test_find_cgroup2_mount_parses_hybrid_and_escaped_mountinfo() -> None:
    mountinfo = (
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
        "41 31 0:38 / /sys/fs/cgroup/my\\040unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n"
    )
    assert find_cgroup2_mount(mountinfo) == Path("/sys/fs/cgroup/my unified")
    with pytest.raises(RuntimeError, match="cgroup2"):
        find_cgroup2_mount(mountinfo.splitlines()[0])
    assert (find_cgroup2_mount() / "cgroup.procs").exists()


def test_target_formatting_round_trips() -> None:
    assert nettools.format_target("10.0.0.1", 80) == "10.0.0.1:80"
    assert nettools.format_target("fd00::1", 53) == "[fd00::1]:53"
    assert nettools.parse_target("[fd00::1]:53")[:2] == ("fd00::1", 53)
    assert nettools.parse_target("10.0.0.1:80")[:2] == ("10.0.0.1", 80)
    for bad in ("fd00::1:53", "10.0.0.1", "[fd00::1]53", "host:80"):
        with pytest.raises(ValueError):
            nettools.parse_target(bad)


def test_parse_results_separates_summary_and_rejects_garbage() -> None:
    out = '{"seq": 0, "ok": true}\n\n{"seq": 1, "ok": false}\n{"summary": true, "attempts": 2}\n'
    assert nettools.parse_results(out) == [{"seq": 0, "ok": True}, {"seq": 1, "ok": False}]
    assert nettools.parse_summary(out) == {"summary": True, "attempts": 2}
    assert nettools.parse_summary('{"seq": 0, "ok": true}\n') is None
    with pytest.raises(ValueError):
        nettools.parse_results("Traceback (most recent call last):\n")
