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
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane import annotations
from dataplane import inspect
from scaletozero.runc import RuncRuntime
from scaletozero.runtime import ContainerSpec
from scaletozero.state import ContainerState
from testbed import k8sobjects, rootfs
from testbed.bed import CGROUP_DIR_PREFIX, TestBed, wait_until
from testbed.k8sobjects import endpoint_slice, service
from testbed.sandbox import AgentProcess

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

    def objects(web2_state: str, web1_idle: str = "1s") -> list[dict[str, Any]]:
        body = endpoint_slice("web", [p.ip4 for p in web.values()], [{"name": "http", "port": PORT,
                                                                       "protocol": "TCP"}], node_name="a")
        for ep, name in zip(body["endpoints"], web, strict=True):
            ep["targetRef"] = {"kind": "Pod", "namespace": "default", "name": name}
        return [service("web", [VIP], [{"name": "http", "port": 80, "targetPort": PORT, "protocol": "TCP"}]), body,
                # web-1: this node's opted-in pod, no label (the file source has no publisher)
                k8sobjects.pod("web-1", "a", [web["web-1"].ip4, web["web-1"].ip6],
                               annotations=annotations.annotate(idle_timeout=web1_idle)),
                # web-2: "another node's" pod whose scaler published a state (nodeName b)
                k8sobjects.pod("web-2", "b", [web["web-2"].ip4, web["web-2"].ip6],
                               labels={annotations.STATE: web2_state} if web2_state else None)]

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
        # web-1 opted in but far from idle, web-2 labelled checkpointed: only web-1 is programmed
        agent.write(objects("checkpointed", web1_idle="1h"))
        agent.start()
        wait_until(lambda: status().get("state") == "running", "web-1 managed", detail=agent.log_text)
        assert programmed() == [ip["web-1"]], agent.log_text()[-3000:]
        # web-1's idle timeout drops to 1 s (the scaler re-adds it) and it is checkpointed
        agent.write(objects("checkpointed"))
        wait_until(lambda: status().get("idle_timeout") == 1.0, "web-1 re-added with 1s", detail=agent.log_text)
        wait_until(lambda: status().get("state") == "checkpointed", "web-1 checkpointed", detail=agent.log_text)
        assert runtime.state("default.web-1") == ContainerState.CHECKPOINTED
        # both parked now (web-1 by the agent's own state, web-2 by its label): both programmed
        wait_until(lambda: programmed() == sorted(ip.values()), "both programmed", detail=agent.log_text)

        # web-2 runs again (its label says so): only web-2, and nothing wakes web-1
        agent.write(objects("running"))
        wait_until(lambda: programmed() == [ip["web-2"]], "only web-2 programmed", detail=agent.log_text)
        bodies = {client.check_output([sys.executable, "-c", GET, VIP, "80"], timeout=90) for _ in range(10)}
        assert bodies == {"hello from web-2\n"}
        st = status()
        assert (st["state"], st["restores"], st["accepted"]) == ("checkpointed", 0, 0)
        assert runtime.state("default.web-1") == ContainerState.CHECKPOINTED
    finally:
        try:
            agent.close()
        finally:
            runtime.delete_all()
