"""python -m bench.scale_to_zero: what a wake costs, next to what CRIU alone costs.

Three series on one pod (busybox httpd in a runc container, CRIU 4.2.1) in a throw-away test bed,
with a client pod on the same node:

- raw_restore_s: `RuncRuntime.restore` alone (runc restore -> `running`), no proxy involved;
- wake_first_byte_s: a client connects to the checkpointed pod's IP and times connect() ->
  first byte of the response, through sk_lookup, the activation proxy, the restore, the wait
  for LISTEN, the flip and the relay; next to it scaler_restore_s (restore + wait for LISTEN as
  the scaler saw it) and checkpoint_s;
- steady_state_s: after a wake, sequential requests (connect -> full response) that go straight
  to the app (the proxy is out of the path), and the same requests with the pod never opted
  in, for comparison.

Nothing here is asserted; results go to a JSON file (and a short summary on stdout). Run as root
after scripts/setup.sh; builds CRIU with scripts/build-criu.sh if needed. Everything created
(netns, cgroups, containers, BPF links) is removed at the end, also after a failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from scaletozero.runc import RuncRuntime
from scaletozero.runtime import ContainerSpec
from scaletozero.scaler import ScaledPod, ScalerThread
from testbed import rootfs
from testbed.bed import CGROUP_DIR_PREFIX, Pod, TestBed, built, wait_until
from testbed.nettools import TIMED_GETS

PORT = 8080


def timed_gets(client: Pod, host: str, count: int) -> list[dict[str, Any]]:
    out = client.check_output([sys.executable, "-c", TIMED_GETS, host, str(PORT), str(count)], timeout=120 + count)
    results = json.loads(out)
    if not all(r["ok"] for r in results):
        raise RuntimeError(f"a request failed: {results}")
    return results


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {
        "n": len(values),
        "min_ms": ordered[0] * 1000,
        "median_ms": statistics.median(ordered) * 1000,
        "p90_ms": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] * 1000,
        "max_ms": ordered[-1] * 1000,
    }


def print_summary(result: dict[str, Any]) -> None:
    for name, s in result["summary"].items():
        if s:
            print(f"{name:<18} n={s['n']:<3} min {s['min_ms']:7.1f} ms  median {s['median_ms']:7.1f} ms  "
                  f"p90 {s['p90_ms']:7.1f} ms  max {s['max_ms']:7.1f} ms")


def run(cycles: int, steady: int, workdir: Path) -> dict[str, Any]:
    criu = built("build-criu.sh")
    if criu is None:
        raise RuntimeError("scripts/build-criu.sh printed no path")
    bed = TestBed(prefix="zps2zbench")
    runtime = None
    scaler = None
    try:
        node = bed.add_node("n")
        pod = bed.add_pod(node, "web")
        client = bed.add_pod(node, "client")
        runtime = RuncRuntime(workdir / "rt", criu,
                              cgroup_parent=f"/{CGROUP_DIR_PREFIX}{bed.id}/node-n/runc-{uuid.uuid4().hex[:6]}")
        fs = rootfs.build_busybox_rootfs(workdir / "rootfs", {"/www/index.html": "hello\n" * 100})
        runtime.run(ContainerSpec(id="web", rootfs=fs.path, args=rootfs.httpd_command(PORT), netns=pod.netns_path,
                                  rootfs_mounts=fs.mounts))
        wait_until(lambda: f":{PORT} " in bed.run_in_netns(pod.netns, ["ss", "-Htln"]).stdout, "httpd listens",
                   interval=0.005, error=TimeoutError)

        baseline = [r["total"] for r in timed_gets(client, pod.ip4, steady)]

        raw_restore, raw_checkpoint = [], []
        for _ in range(cycles):
            runtime.checkpoint("web")
            runtime.restore("web")
            ops = {r.op: r.seconds for r in runtime.history[-2:]}
            raw_checkpoint.append(ops["checkpoint"])
            raw_restore.append(ops["restore"])

        scaler = ScalerThread(runtime, poll_interval=0.05)
        scaler.call(scaler.scaler.add, ScaledPod("bench/web", "web", pod.netns_path, (pod.ip4,), idle_timeout=1.0))
        first_byte, scaler_restore, checkpoint = [], [], []
        for _ in range(cycles):
            wait_until(lambda: scaler.status()["bench/web"].state == "checkpointed", "checkpointed",
                       interval=0.005, error=TimeoutError)
            first_byte.append(timed_gets(client, pod.ip4, 1)[0]["first_byte"])
            st = scaler.status()["bench/web"]
            scaler_restore.append(st.last_restore_seconds or 0.0)
            checkpoint.append(st.last_checkpoint_seconds or 0.0)
        # steady state right after a wake (idle timeout is 1 s: the sequential requests keep it awake)
        wait_until(lambda: scaler.status()["bench/web"].state == "checkpointed", "checkpointed",
                   interval=0.005, error=TimeoutError)
        after_wake = [r["total"] for r in timed_gets(client, pod.ip4, steady + 1)[1:]]
        proxied = scaler.status()["bench/web"].accepted
        return {
            "cycles": cycles,
            "raw_checkpoint_s": raw_checkpoint,
            "raw_restore_s": raw_restore,
            "checkpoint_s": checkpoint,
            "scaler_restore_s": scaler_restore,
            "wake_first_byte_s": first_byte,
            "steady_state_s": after_wake,
            "never_scaled_s": baseline,
            "proxy_accepted": proxied,  # = cycles + 1: every steady-state request bypassed the proxy
            "summary": {
                "raw_checkpoint": summary(raw_checkpoint),
                "raw_restore": summary(raw_restore),
                "checkpoint": summary(checkpoint),
                "scaler_restore": summary(scaler_restore),
                "wake_first_byte": summary(first_byte),
                "steady_state": summary(after_wake),
                "never_scaled": summary(baseline),
            },
        }
    finally:
        if scaler is not None:
            scaler.close()
        if runtime is not None:
            runtime.delete_all()
        bed.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.scale_to_zero",
        description=__doc__.split("\n\n")[0],
        epilog="example:\n  python -m bench.scale_to_zero --cycles 10 --out bench-results/scale_to_zero.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cycles", type=int, default=10, help="checkpoint/wake cycles per series (default %(default)s)")
    p.add_argument("--steady", type=int, default=50,
                   help="sequential requests for the steady state (default %(default)s)")
    p.add_argument("--out", type=Path, default=Path("bench-results/scale_to_zero.json"), help="JSON output file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="zp-bench-s2z-") as tmp:
        result = run(args.cycles, args.steady, Path(tmp))
    result["kernel"] = Path("/proc/sys/kernel/osrelease").read_text().strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print_summary(result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
