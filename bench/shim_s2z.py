"""python -m bench.shim_s2z: what a wake costs on a real kubeadm node, through the containerd shim.

One kubeadm node of the test bed (``testbed.kubecluster``) with zeroproxy deployed from
``manifests/``; a Deployment ``sleepy`` (busybox httpd, or agnhost netexec with ``--app agnhost``;
``runtimeClassName: zeroproxy``, idle timeout 2 s) behind a NodePort, and ``plain``, the same app
never opted in. An external host on the underlay times connect() -> first byte of ``GET /`` to the NodePort:

- wake_first_byte_s: each request to the checkpointed pod, through sk_lookup, the activation
  proxy, the agent's ShimRuntime, the shim's restore and the relay;
- shim_restore_s: the restore as the shim timed it for that wake (``runc.NewContainer`` + Start,
  i.e. ``runc restore`` with CRIU), shim_restore_total_s the whole verb in the shim (unmount,
  options, bookkeeping), and shim_checkpoint_s the dump before it;
- agent_restore_s: the same wake as the agent's scaler timed it (ShimRuntime.restore, the
  control-socket round trips, until the app's ports listen), from its state file; what is left
  of wake_first_byte_s after it is the client's connect, the activation proxy and the relay;
- steady_state_s: sequential requests right after a wake (the proxy is out of the path) and
  never_scaled_s the same against ``plain``.

Nothing is asserted; results go to a JSON file and a summary to stdout. Run as root on a quiet
machine; the cluster is removed at the end, also after a failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from bench.scale_to_zero import print_summary, summary
from controlplane import annotations
from controlplane.config import DEFAULT_S2Z_STATE_FILE
from scaletozero.shimruntime import CRI_CONTAINER_TYPE, CRI_POD_NAME
from testbed import kubecluster as kc
from testbed.images import BUSYBOX_IMAGE
from testbed.nettools import TIMED_GETS

IDLE = "2s"
PORT = 8080


# The app under test: its image and arguments, serving GET / on PORT.
APPS = {
    "agnhost": (kc.AGNHOST_IMAGE, ["netexec", f"--http-port={PORT}"], "agnhost netexec"),
    "busybox": (BUSYBOX_IMAGE, ["httpd", "-f", "-p", str(PORT), "-h", "/www"], "busybox httpd"),
}


def _app(name: str, opted_in: bool, app: str) -> list[dict[str, Any]]:
    image, args, _ = APPS[app]
    template: dict[str, Any] = {
        "metadata": {"labels": {"app": name}},
        "spec": {"nodeName": "node1", "terminationGracePeriodSeconds": 1, "containers": [{
            "name": "app", "image": image, "imagePullPolicy": "Never",
            "args": args, "ports": [{"containerPort": PORT}]}]},
    }
    if opted_in:
        template["metadata"]["annotations"] = annotations.annotate(idle_timeout=IDLE)
        template["spec"]["runtimeClassName"] = kc.SHIM_HANDLER
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
         "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}}, "template": template}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
         "spec": {"type": "NodePort", "selector": {"app": name}, "ports": [{"port": 80, "targetPort": PORT}]}},
    ]


def run(cycles: int, steady: int, app: str = "busybox") -> dict[str, Any]:
    with kc.cluster(1) as cluster:
        kc.deploy_zeroproxy(cluster, cluster.image_tag)
        ns = "bench"
        kc.apply(cluster, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        kc.poll(lambda: cluster.kubectl("-n", ns, "get", "serviceaccount", "default", check=False).returncode == 0,
                "serviceaccount default", timeout=60)
        kc.apply(cluster, *_app("sleepy", True, app), *_app("plain", False, app), namespace=ns)
        pod = kc.wait_ready(cluster, ns, "app=sleepy", 1)[0]["metadata"]["name"]
        kc.wait_ready(cluster, ns, "app=plain", 1)
        ext = cluster.bed.add_external("benchext")
        node = cluster.node("node1")
        shim = node.shim()

        def gets(service: str, count: int) -> list[dict[str, Any]]:
            port = kc.get(cluster, "service", service, namespace=ns)["spec"]["ports"][0]["nodePort"]
            return json.loads(ext.check_output([sys.executable, "-c", TIMED_GETS, node.ip, str(port), str(count)],
                                               timeout=120 + count))

        def container() -> str:
            return next(cid for cid in shim.container_ids()
                        if shim.state(cid).annotations.get(CRI_POD_NAME) == pod
                        and shim.state(cid).annotations.get(CRI_CONTAINER_TYPE) == "container")

        def checkpointed() -> bool:
            labels = kc.get(cluster, "pod", pod, namespace=ns)["metadata"].get("labels", {})
            return labels.get(annotations.STATE) == "checkpointed"

        def answering(service: str) -> bool:
            try:
                return gets(service, 1)[0]["ok"]
            except Exception:
                return False

        # Ready pods reach the agents' maps a moment after the EndpointSlice: wait for that first.
        kc.poll(lambda: answering("plain"), "plain answering on its NodePort", timeout=60, interval=0.5)
        baseline = [r["total"] for r in gets("plain", steady)]
        cid = container()
        state_file = node.host_path(str(DEFAULT_S2Z_STATE_FILE))

        def agent_restore() -> float:
            pods = json.loads(state_file.read_text())["pods"]
            return next(p["last_restore_seconds"] or 0.0 for p in pods if p["name"] == f"{ns}/{pod}")

        first_byte, restore, restore_total, agent, checkpoint, failed = [], [], [], [], [], 0
        for _ in range(cycles):
            kc.poll(checkpointed, "sleepy checkpointed", timeout=120, interval=0.1)
            checkpoint.append(shim.state(cid).last.timings_ms["total"] / 1000)
            r = gets("sleepy", 1)[0]
            failed += not r["ok"]
            first_byte.append(r["first_byte"])
            last = shim.state(cid).last
            restore.append(last.timings_ms.get("restore", 0.0) / 1000 if last is not None else 0.0)
            restore_total.append(last.timings_ms.get("total", 0.0) / 1000 if last is not None else 0.0)
            agent.append(agent_restore())
        kc.poll(checkpointed, "sleepy checkpointed", timeout=120, interval=0.1)
        after = gets("sleepy", steady + 1)
        failed += sum(not r["ok"] for r in after)
        after_wake = [r["total"] for r in after[1:]]
        return {
            "app": f"{APPS[app][2]} ({APPS[app][0]}) under containerd-shim-zeroproxy-v2, idle {IDLE}",
            "cycles": cycles, "failed_requests": failed,
            "wake_first_byte_s": first_byte, "shim_restore_s": restore, "shim_restore_total_s": restore_total,
            "agent_restore_s": agent, "shim_checkpoint_s": checkpoint,
            "steady_state_s": after_wake, "never_scaled_s": baseline,
            "summary": {"wake_first_byte": summary(first_byte), "agent_restore": summary(agent),
                        "shim_restore_total": summary(restore_total), "shim_restore": summary(restore),
                        "shim_checkpoint": summary(checkpoint), "steady_state": summary(after_wake),
                        "never_scaled": summary(baseline)},
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.shim_s2z", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cycles", type=int, default=10, help="checkpoint/wake cycles (default %(default)s)")
    p.add_argument("--steady", type=int, default=50, help="sequential requests for the steady state")
    p.add_argument("--app", choices=sorted(APPS), default="busybox",
                   help="the app scaled to zero (default %(default)s, the one issue 12's goal names)")
    p.add_argument("--out", type=Path, default=Path("bench-results/shim_s2z.json"), help="JSON output file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = run(args.cycles, args.steady, args.app)
    result["kernel"] = Path("/proc/sys/kernel/osrelease").read_text().strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print_summary(result)
    print(f"failed requests: {result['failed_requests']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
