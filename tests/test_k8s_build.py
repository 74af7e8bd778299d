"""The Kubernetes binaries scripts/build-k8s.sh builds are there, run, and say they are 1.20.2.

kubeadm compares the kubelet's and the control plane's versions with its own, so a binary that
built but lost its version stamp would fail only deep inside `kubeadm init`; here it fails by
name. The crictl stand-in and pause are ours to get right, so their behaviour without a container
runtime (wrong calls, no socket, signals) is checked too. No runtime is started here: the
cluster test bed does that.
"""

from __future__ import annotations

import filecmp
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from testbed import devcluster

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "build-k8s.sh"
VERSION = "v1.20.2"
TREE = devcluster.CACHE_DIR / "k8s-src-1.20.2" / "gopath" / "src" / "k8s.io" / "kubernetes"

# Binary -> the arguments that make it print its version.
VERSION_ARGS: dict[str, list[str]] = {
    "kube-apiserver": ["--version"],
    "kube-controller-manager": ["--version"],
    "kube-scheduler": ["--version"],
    "kube-proxy": ["--version"],
    "kubelet": ["--version"],
    "kubeadm": ["version", "-o", "short"],
    "kubectl": ["version", "--client", "--short"],
    "e2e.test": ["--version"],
    "crictl": ["--version"],
}


@pytest.fixture(scope="session")
def bin_dir() -> Path:
    """The bin dir the script prints; it builds what is missing (minutes, once per machine)."""
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, check=False, timeout=3600,
                         env={**os.environ, "ZP_CACHE_DIR": str(devcluster.CACHE_DIR)})
    assert res.returncode == 0, f"{SCRIPT} failed:\n{res.stderr[-3000:]}"
    path = Path(res.stdout.strip().splitlines()[-1])
    assert path == devcluster.CACHE_DIR / "k8s-1.20.2" / "bin", res.stdout
    return path


def run(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False, timeout=timeout)


@pytest.mark.parametrize("name", sorted(VERSION_ARGS))
def test_binary_reports_release_version(bin_dir: Path, name: str) -> None:
    res = run(bin_dir / name, *VERSION_ARGS[name])
    assert res.returncode == 0, res.stderr
    assert VERSION in res.stdout, res.stdout


def test_agnhost_reports_its_own_version(bin_dir: Path) -> None:
    """agnhost is versioned as its image, not as the release: the tree's VERSION file says which."""
    res = run(bin_dir / "agnhost", "--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[-1] == (TREE / "test/images/agnhost/VERSION").read_text().strip(), res.stdout


def test_apiserver_is_the_one_devcluster_runs(bin_dir: Path) -> None:
    assert filecmp.cmp(bin_dir / "kube-apiserver", devcluster.ensure_apiserver(), shallow=False)


def test_crictl_without_a_runtime_says_why(bin_dir: Path, tmp_path: Path) -> None:
    """Each call kubeadm makes fails with the endpoint and the dial error, not a hang or a trace."""
    endpoint = f"unix://{tmp_path}/no-runtime.sock"
    for call in (["info"], ["pods", "-q"], ["stopp", "abc"], ["rmp", "abc"], ["inspecti", "pause"],
                 ["pull", "pause"]):
        res = run(bin_dir / "crictl", "-r", endpoint, *call)
        assert res.returncode == 1, (call, res.stdout, res.stderr)
        assert res.stdout == "", call
        assert "no-runtime.sock" in res.stderr and "no such file or directory" in res.stderr, (call, res.stderr)
        assert "goroutine" not in res.stderr, call


@pytest.mark.parametrize(("args", "message"), [
    (["frobnicate"], 'unknown command "frobnicate"'),
    (["pods", "--frob"], "unknown flag: --frob"),
    (["stopp"], "requires at least 1 arg(s)"),
    (["pull", "a", "b"], "accepts 1 arg(s), received 2"),
    (["-r", "http://x", "info"], 'protocol "http" not supported'),
])
def test_crictl_wrong_calls(bin_dir: Path, args: list[str], message: str) -> None:
    res = run(bin_dir / "crictl", *args)
    assert res.returncode == 1, res
    assert message in res.stderr, res.stderr


def test_crictl_help_lists_what_kubeadm_calls(bin_dir: Path) -> None:
    res = run(bin_dir / "crictl", "--help")
    assert res.returncode == 0, res.stderr
    for word in ("info", "pods", "stopp", "rmp", "inspecti", "pull", "--runtime-endpoint"):
        assert word in res.stdout, word


def test_pause_is_static_and_exits_on_sigterm(bin_dir: Path) -> None:
    pause = bin_dir / "pause"
    res = run("readelf", "-l", pause)
    assert res.returncode == 0, res.stderr
    assert "INTERP" not in res.stdout, "pause must be static: it runs in an image with no libc"
    assert run(pause, "-v").stdout.startswith("pause.c v")

    proc = subprocess.Popen([pause], stderr=subprocess.PIPE, text=True)
    try:
        # Signal only once the SIGTERM handler is installed (SigCgt bit 15), or the default action
        # would kill it and prove nothing.
        deadline = time.monotonic() + 10
        while not int(_status_field(proc.pid, "SigCgt"), 16) & (1 << (signal.SIGTERM - 1)):
            assert time.monotonic() < deadline, "pause never installed its SIGTERM handler"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Shutting down, got signal: Terminated" in err


def _status_field(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == field:
            return value.strip()
    raise AssertionError(f"/proc/{pid}/status has no {field}")
