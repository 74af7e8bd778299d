"""Running endpoints only, with the file source: a real `zeroproxy agent --scale-to-zero` process,
real runc + CRIU backends in test-bed pod netns, the socket programs' maps read back.

- the ``zeroproxy.io/scale-state`` label on a Pod in the YAML is honoured (as if another node's
  scaler had published it): a labelled-checkpointed endpoint is not programmed while another runs;
- the agent's own scaler state is applied without any label (the file source has none): when
  its pod is checkpointed and the other is labelled checkpointed too, both are programmed;
- while the other endpoint runs, connections go to it and the checkpointed pod is not woken.

The API source (label and Events through a real apiserver, a wake when all are checkpointed) is
in tests/test_scale_agent.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane import annotations
from dataplane import inspect
from dataplane.runtime import ContainerSpec, RuncRuntime, State
from zeroproxy import rootfs
from zeroproxy.k8sobjects import endpoint_slice, service
from zeroproxy.sandbox import AgentProcess
from zeroproxy.testbed import CGROUP_DIR_PREFIX, Pod, TestBed

REPO = Path(__file__).resolve().parent.parent
PORT = 8080
VIP = "10.96.7.10"

GET = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
s.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
print(data.partition(b"\r\n\r\n")[2].decode(), end="")
"""


@pytest.fixture(scope="module")
def criu() -> Path:
    """CRIU 4.2.1 from scripts/build-criu.sh (cached after the first build; installs runc)."""
    res = subprocess.run(["bash", str(REPO / "scripts/build-criu.sh")], capture_output=True, text=True,
                         check=False, timeout=900)
    assert res.returncode == 0, f"build-criu.sh failed:\n{res.stderr[-3000:]}"
    return Path(res.stdout.strip().splitlines()[-1])


def wait_until(cond: Callable[[], Any], what: str, log: Callable[[], str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}\n{log()[-4000:]}")
        time.sleep(0.05)


def pod_object(pod: Pod, node: str, annotations_: dict[str, str], state: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": pod.name, "namespace": "default", "annotations": annotations_}
    if state is not None:
        meta["labels"] = {annotations.STATE: state}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {"nodeName": node},
            "status": {"phase": "Running", "podIP": pod.ip4, "podIPs": [{"ip": pod.ip4}, {"ip": pod.ip6}]}}


@pytest.fixture
def bed(stale_beds_removed: list[str]) -> Iterator[TestBed]:
    b = TestBed(prefix="zp")
    try:
        yield b
    finally:
        b.close()


def test_file_source_label_and_local_state_choose_running_endpoints(criu: Path, bed: TestBed,
                                                                    tmp_path: Path) -> None:
    node = bed.add_node("a")
    web = {name: bed.add_pod(node, name) for name in ("web-1", "web-2")}
    client = bed.add_pod(node, "client")
    rt_dir = tmp_path / "rt"
    parent = f"/{CGROUP_DIR_PREFIX}{bed.id}/node-a/runc"
    runtime = RuncRuntime(rt_dir, criu, cgroup_parent=parent)
    state_file = tmp_path / "s2z.json"
    agent = AgentProcess(tmp_path, node.cgroup_path, node_name="a",
                         extra_args=["--scale-to-zero", "--runtime-dir", str(rt_dir), "--criu", str(criu),
                                     "--s2z-cgroup-parent", parent, "--scale-state-file", str(state_file)])
    ip = {name: f"{pod.ip4}:{PORT}" for name, pod in web.items()}

    def objects(web2_state: str) -> list[dict[str, Any]]:
        body = endpoint_slice("web", [p.ip4 for p in web.values()], [{"name": "http", "port": PORT,
                                                                       "protocol": "TCP"}], node_name="a")
        for ep, name in zip(body["endpoints"], web, strict=True):
            ep["targetRef"] = {"kind": "Pod", "namespace": "default", "name": name}
        return [service("web", [VIP], [{"name": "http", "port": 80, "targetPort": PORT, "protocol": "TCP"}]), body,
                # web-1: this node's opted-in pod, no label (the file source has no publisher)
                pod_object(web["web-1"], "a", annotations.annotate(idle_timeout="1s"), None),
                # web-2: "another node's" pod whose scaler published a state (nodeName b)
                pod_object(web["web-2"], "b", {}, web2_state)]

    def programmed() -> list[str] | None:
        return {s.frontend: sorted(s.backends) for s in inspect.service_list(agent.pin_dir)}.get(f"{VIP}:80/TCP")

    def status() -> dict[str, Any]:
        try:
            return json.loads(state_file.read_text())["pods"][0]
        except (FileNotFoundError, ValueError, IndexError):
            return {}

    try:
        for name, pod in web.items():
            fs = rootfs.build_busybox_rootfs(tmp_path / f"rootfs-{name}", {"/www/index.html": f"hello from {name}\n"})
            runtime.run(ContainerSpec(id=f"default.{name}", rootfs=fs.path, args=rootfs.httpd_command(PORT),
                                      netns=pod.netns_path, rootfs_mounts=fs.mounts))
        agent.write(objects("checkpointed"))
        agent.start()
        # web-2 labelled checkpointed, web-1 running: only web-1 (until it goes idle itself)
        assert programmed() in ([ip["web-1"]], sorted(ip.values())), agent.log_text()[-3000:]
        wait_until(lambda: status().get("state") == "checkpointed", "web-1 checkpointed", agent.log_text)
        assert runtime.state("default.web-1") == State.CHECKPOINTED
        # both parked now (web-1 by the agent's own state, web-2 by its label): both programmed
        wait_until(lambda: programmed() == sorted(ip.values()), "both programmed", agent.log_text)

        # web-2 runs again (its label says so): only web-2, and nothing wakes web-1
        agent.write(objects("running"))
        wait_until(lambda: programmed() == [ip["web-2"]], "only web-2 programmed", agent.log_text)
        bodies = {client.check_output([sys.executable, "-c", GET, VIP, "80"], timeout=90) for _ in range(10)}
        assert bodies == {"hello from web-2\n"}
        st = status()
        assert (st["state"], st["restores"], st["accepted"]) == ("checkpointed", 0, 0)
        assert runtime.state("default.web-1") == State.CHECKPOINTED
    finally:
        try:
            agent.close()
        finally:
            runtime.delete_all()
