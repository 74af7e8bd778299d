"""Build and drive the native load client (bench/client.c).

The binary is compiled at run time into a cache directory keyed by the source's hash, so an
edited client.c is rebuilt automatically and no binary is ever committed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).resolve().parent / "client.c"
CACHE_DIR = Path(os.environ.get("ZP_BENCH_CACHE", "/var/tmp/zeroproxy/bench-cache"))
CFLAGS = ("-O2", "-Wall", "-Wextra", "-pthread")
SCENARIOS = ("short", "keepalive")


def build(cache_dir: Path = CACHE_DIR) -> Path:
    """Return the path of a client binary built from the current source, compiling if needed."""
    if shutil.which("gcc") is None:
        raise RuntimeError("gcc is missing: run scripts/setup-bench.sh")
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:16]
    binary = cache_dir / f"zpbench-client-{digest}"
    if binary.exists():
        return binary
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_name(f"{binary.name}.{os.getpid()}.tmp")
    proc = subprocess.run(["gcc", *CFLAGS, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True)
    if proc.returncode:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"compiling {SOURCE} failed:\n{proc.stderr}")
    tmp.rename(binary)  # atomic: a concurrent run sees a complete binary or none
    return binary


def argv(binary: Path, targets: Sequence[str], *, scenario: str, threads: int, duration: float,
         warmup: float, cpu: int | None, timeout_ms: int = 2000) -> list[str]:
    """The client's command line; one place, so the runner and the docs agree."""
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {SCENARIOS}, not {scenario!r}")
    out = [str(binary), "--mode", scenario, "--threads", str(threads), "--duration", f"{duration:g}",
           "--warmup", f"{warmup:g}", "--timeout-ms", str(timeout_ms)]
    for t in targets:
        out += ["--target", t]
    if cpu is not None:
        out += ["--cpu", str(cpu)]
    return out


def parse(stdout: str) -> dict[str, Any]:
    """The client's single JSON object; a missing or torn object is an error, not zeros."""
    line = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    result = json.loads(line)
    if not isinstance(result, dict) or "latency_us" not in result:
        raise ValueError(f"unexpected client output: {stdout[-500:]!r}")
    return result


def version() -> str:
    proc = subprocess.run(["gcc", "--version"], capture_output=True, text=True)
    first = proc.stdout.splitlines()[0] if proc.stdout else "unknown"
    return f"bench/client.c sha256:{hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]} built with {first}"
