"""The test bed's container images: valid, deterministic, and runnable by a real containerd.

Each archive is read back as containerd's importer would (manifest, config digest, layer
digest), built twice to the same digest, imported into a containerd this module starts under
its own temporary root (stopped and removed afterwards, mounts and cgroups included), and run
with runc: the e2e exec pods' tools, kube-proxy's iptables and conntrack, every node binary's
--version, and zeroproxy's own entry point.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from testbed import images

REPO = Path(__file__).resolve().parent.parent
CTR_TIMEOUT = 120


# --- inputs -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s_bin() -> Path:
    """scripts/build-k8s.sh's bin dir (./zp test builds it before pytest; instant when cached)."""
    out = subprocess.run(["bash", str(REPO / "scripts" / "build-k8s.sh")], capture_output=True, text=True,
                         check=False, timeout=3600)
    assert out.returncode == 0, out.stderr
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def built(k8s_bin: Path) -> list[images.Built]:
    """The node and e2e images, in the shared cache (what the bed loads)."""
    return images.build_all(images.IMAGES_DIR, k8s_bin)


@pytest.fixture(scope="module")
def zeroproxy_archive() -> Iterator[Path]:
    """scripts/build-image.sh's archive, hardlinked aside for this module: a build of newer
    sources (the tree is edited while tests run) may retire the cache's copy halfway through."""
    out = subprocess.run(["bash", str(REPO / "scripts" / "build-image.sh")], capture_output=True, text=True,
                         check=False, timeout=3600)
    assert out.returncode == 0, out.stderr
    archive = Path(out.stdout.strip().splitlines()[-1])
    aside = Path(tempfile.mkdtemp(prefix="zp-images-test-", dir=archive.parent.parent))
    kept = aside / archive.name
    os.link(archive, kept)
    try:
        yield kept
    finally:
        shutil.rmtree(aside)


# --- the archives --------------------------------------------------------------------------------


def check_archive(path: Path) -> dict[str, object]:
    """What containerd's importer relies on, checked member by member."""
    info = images.archive_info(path)
    manifest, config = info["manifest"], info["config"]
    assert manifest["Config"] == info["config_digest"].removeprefix("sha256:") + ".json"
    assert config["rootfs"] == {"type": "layers", "diff_ids": [info["layer_digest"]]}
    assert manifest["Layers"] == [info["layer_digest"].removeprefix("sha256:") + "/layer.tar"]
    assert config["os"] == "linux" and config["architecture"] == "amd64"
    assert manifest["RepoTags"] and all(re.fullmatch(r"localhost/[a-z0-9/._-]+:[A-Za-z0-9._-]+", t)
                                        for t in manifest["RepoTags"])
    with tarfile.open(path) as outer:
        layer_file = outer.extractfile(manifest["Layers"][0])
        assert layer_file is not None
        with tarfile.open(fileobj=layer_file, mode="r|") as layer:
            names: list[str] = []
            kinds: dict[str, str] = {}
            for m in layer:
                assert not m.name.startswith("/") and ".." not in m.name.split("/"), m.name
                assert m.uname == "" and m.gname == "", m.name
                names.append(m.name)
                kinds[m.name] = "dir" if m.isdir() else "link" if m.issym() else "other"
                parent = os.path.dirname(m.name)
                assert not parent or kinds.get(parent) == "dir", f"{m.name}: parent not a directory before it"
    assert names == sorted(names)
    return info


def test_every_image_is_a_valid_archive_with_the_expected_tags(built: list[images.Built]) -> None:
    tags = [t for b in built for t in b.tags]
    assert sorted(tags) == sorted(images.image_names())
    for b in built:
        info = check_archive(b.path)
        assert info["config_digest"] == b.image_id
        assert info["manifest"]["RepoTags"] == b.tags
        with tarfile.open(b.path) as outer:
            layer_file = outer.extractfile(info["manifest"]["Layers"][0])
            assert layer_file is not None
            with tarfile.open(fileobj=layer_file, mode="r|") as layer:
                for m in layer:
                    assert (m.uid, m.gid, m.mtime) == (0, 0, 0), f"{b.name}: {m.name}"


def test_the_same_inputs_give_the_same_archives(k8s_bin: Path, built: list[images.Built], tmp_path: Path) -> None:
    """Built twice from scratch (no cache), byte for byte equal to each other and to the cache's."""
    first = images.build_all(tmp_path / "a", k8s_bin)
    second = images.build_all(tmp_path / "b", k8s_bin)
    assert not any(b.cached for b in first + second)
    for a, b, c in zip(first, second, built, strict=True):
        assert a.image_id == b.image_id == c.image_id, a.name
        assert sha256(a.path) == sha256(b.path) == sha256(c.path), a.name
    # A second call finds everything cached, and says the same.
    again = images.build_all(tmp_path / "a", k8s_bin)
    assert all(b.cached for b in again)
    assert [b.image_id for b in again] == [b.image_id for b in first]


def test_node_images_are_the_ones_kubeadm_lists(k8s_bin: Path) -> None:
    out = subprocess.run([str(k8s_bin / "kubeadm"), "config", "images", "list", "--kubernetes-version",
                          f"v{images.K8S_VERSION}", "--image-repository", images.NODE_REPOSITORY],
                         capture_output=True, text=True, check=True, timeout=60)
    listed = set(out.stdout.split())
    ours = {t for t in images.image_names()
            if not t.startswith((images.E2E_REPOSITORY + "/", images.APP_REPOSITORY + "/"))}
    assert listed == ours


def k8s_tree() -> Path:
    out = subprocess.run(["bash", "-c", f". {REPO}/scripts/lib/k8s-src.sh && echo $zp_k8s_tree"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def test_repo_list_maps_every_registry_of_the_e2e_manifest(tmp_path: Path, k8s_tree_path: Path) -> None:
    """Against test/utils/image/manifest.go of the tree e2e.test is built from."""
    manifest = (k8s_tree_path / "test" / "utils" / "image" / "manifest.go").read_text()
    struct = manifest.split("type RegistryList struct {", 1)[1].split("}", 1)[0]
    keys = re.findall(r'`yaml:"([A-Za-z0-9]+)"`', struct)
    assert keys and sorted(keys) == sorted(images.E2E_REGISTRY_KEYS)
    path = images.write_repo_list(tmp_path / "repo-list.yaml")
    assert yaml.safe_load(path.read_text()) == dict.fromkeys(keys, images.E2E_REPOSITORY)
    # The tags we build are the ones that file makes e2e.test ask for.
    for const, name in (("Agnhost", "agnhost"), ("Pause", "pause")):
        m = re.search(rf'configs\[{const}\] = Config\{{\w+, "{name}", "([^"]+)"\}}', manifest)
        assert m is not None, const
        assert f"{images.E2E_REPOSITORY}/{name}:{m.group(1)}" in images.image_names()


@pytest.fixture(scope="module")
def k8s_tree_path(k8s_bin: Path) -> Path:
    return k8s_tree()


# --- a real containerd -------------------------------------------------------------------------------


@dataclass
class Containerd:
    address: str
    cgroup: str  # cgroup parent (relative to every hierarchy's root) for the containers' cgroups

    def ctr(self, *args: str, timeout: float = CTR_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ctr", "--address", self.address, "-n", "k8s.io", *args],
                              capture_output=True, text=True, check=False, timeout=timeout)

    def run(self, image: str, *argv: str) -> subprocess.CompletedProcess[str]:
        """`ctr run --rm` with runc, in a network namespace of its own, no host network."""
        name = f"zp-{uuid.uuid4().hex[:8]}"
        return self.ctr("run", "--rm", "--runtime", "io.containerd.runc.v2",
                        "--cgroup", f"{self.cgroup}/{name}", image, name, *argv)


def _mounts_under(path: str) -> list[str]:
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mountpoint = line.split()[4].replace("\\040", " ")
            if mountpoint == path or mountpoint.startswith(path + "/"):
                found.append(mountpoint)
    return found


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line names our temporary directory: containerd and its shims."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry))
    return pids


RUN_CONTAINERD = "/run/containerd"


def _tree(top: str) -> list[str]:
    """top and everything below it ([] if it does not exist)."""
    if not os.path.exists(top):
        return []
    return [top] + [os.path.join(d, n) for d, dirs, files in os.walk(top) for n in dirs + files]


@pytest.fixture(scope="module")
def containerd() -> Iterator[Containerd]:
    """containerd 1.6 with its own root, state, socket and cgroup parent; all removed afterwards."""
    images.debian_package_files("containerd")  # a clear error if Debian's containerd is missing
    tmp = tempfile.mkdtemp(prefix="zp-images-ctrd-", dir="/var/tmp")
    cgroup = f"/{os.path.basename(tmp)}"
    # containerd 1.6 puts shim sockets, FIFOs and runc's root under /run/containerd whatever its
    # config says: what it adds there goes again afterwards.
    run_before = set(_tree(RUN_CONTAINERD))
    config = Path(tmp) / "config.toml"
    # CRI is off: this containerd serves ctr only, and CRI would want CNI and a pause image.
    config.write_text(f"""version = 2
root = "{tmp}/root"
state = "{tmp}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.internal.v1.opt"]
[grpc]
  address = "{tmp}/containerd.sock"
[ttrpc]
  address = "{tmp}/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
""")
    log = open(Path(tmp) / "containerd.log", "wb")  # closed in the finally below
    proc = subprocess.Popen(["containerd", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        sock = Path(tmp) / "containerd.sock"
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"containerd exited: {(Path(tmp) / 'containerd.log').read_text()[-2000:]}")
            if sock.exists() and subprocess.run(["ctr", "--address", str(sock), "version"], capture_output=True,
                                                check=False, timeout=10).returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail("containerd did not answer on its socket within 30 s")
            time.sleep(0.1)
        yield Containerd(str(sock), cgroup)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        for pid in _pids_mentioning(tmp):  # shims of containers a failed test left running
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for mountpoint in sorted(_mounts_under(tmp), key=len, reverse=True):
            subprocess.run(["umount", "-l", mountpoint], check=False)
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            leftover = hierarchy / cgroup.lstrip("/")
            if leftover.is_dir():
                for child in sorted((p for p in leftover.rglob("*") if p.is_dir()), key=lambda p: len(p.parts),
                                    reverse=True):
                    child.rmdir()
                leftover.rmdir()
        shutil.rmtree(tmp)
        for path in sorted(set(_tree(RUN_CONTAINERD)) - run_before, key=len, reverse=True):
            with contextlib.suppress(OSError):
                if os.path.isdir(path):
                    os.rmdir(path)
                else:
                    os.unlink(path)
        # The teardown checks itself: no process, mount, cgroup or file of this containerd is left.
        left = {"processes": _pids_mentioning(tmp), "mounts": _mounts_under(tmp),
                "run": sorted(set(_tree(RUN_CONTAINERD)) - run_before),
                "cgroups": [str(h / cgroup.lstrip("/")) for h in Path("/sys/fs/cgroup").iterdir()
                            if (h / cgroup.lstrip("/")).exists()],
                "files": [tmp] if os.path.exists(tmp) else []}
        assert not any(left.values()), f"containerd fixture left {left}"


@pytest.fixture(scope="module")
def imported(containerd: Containerd, built: list[images.Built]) -> Containerd:
    for b in built:
        out = containerd.ctr("images", "import", str(b.path), timeout=600)
        assert out.returncode == 0, f"{b.path}: {out.stderr}"
    listed = set(containerd.ctr("images", "ls", "-q").stdout.split())
    assert set(images.image_names()) <= listed
    return containerd


def test_agnhost_has_the_tools_the_e2e_exec_pods_run(imported: Containerd) -> None:
    script = ("set -e; curl --version; wget --version; nc -h 2>&1 | grep -q -- -z; ss -h 2>&1 | grep -q Usage; "
              "nslookup -version; ss -ant46 | tail -n +2 | grep -c LISTEN || true; "
              "echo hostName | nc -w 1 -u 127.0.0.1 9 || true; nc -zv -t -w 1 127.0.0.1 1 || echo refused; "
              "getent passwd root; sed --version | head -1; awk 'BEGIN { print \"awk ok\" }'; hostname; echo done")
    out = imported.run(f"{images.E2E_REPOSITORY}/agnhost:2.21", "/bin/sh", "-c", script)
    assert out.returncode == 0, out.stdout + out.stderr
    for needed in ("curl 7.", "GNU Wget", "nslookup 9.", "refused", "root:x:0:0", "GNU sed", "awk ok", "done"):
        assert needed in out.stdout + out.stderr, needed
    # The image's own entry point: agnhost and its subcommands.
    out = imported.run(f"{images.E2E_REPOSITORY}/agnhost:2.21", "/agnhost", "--help")
    assert out.returncode == 0 and "serve-hostname" in out.stdout + out.stderr, out.stdout + out.stderr


def test_node_images_run_their_binaries(imported: Containerd) -> None:
    repo, v = images.NODE_REPOSITORY, f"v{images.K8S_VERSION}"
    for name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy"):
        # On PATH, as kubeadm's static pod and DaemonSet commands expect.
        out = imported.run(f"{repo}/{name}:{v}", name, "--version")
        assert out.returncode == 0 and v in out.stdout, f"{name}: {out.stdout}{out.stderr}"
    out = imported.run(f"{repo}/etcd:3.4.13-0", "etcd", "--version")
    assert out.returncode == 0 and "etcd Version: 3.4" in out.stdout, out.stdout + out.stderr
    out = imported.run(f"{repo}/pause:3.2", "/pause", "-v")
    assert out.returncode == 0 and "pause.c" in out.stdout, out.stdout + out.stderr
    out = imported.run(f"{repo}/coredns:1.7.0")
    assert out.returncode == 1 and "placeholder" in out.stdout + out.stderr, out.stdout + out.stderr



def test_busybox_image_serves_its_page_with_httpd(imported: Containerd) -> None:
    """bench.shim_s2z's app: the image's default command serves /www on 8080 (here on another
    port, in the container's own network namespace, fetched with busybox's own wget)."""
    script = ("httpd -p 127.0.0.1:18080 -h /www && for i in 1 2 3 4 5 6 7 8 9 10; do "
              "wget -q -O - http://127.0.0.1:18080/ && exit 0; sleep 0.2; done; exit 1")
    out = imported.run(images.BUSYBOX_IMAGE, "/usr/bin/busybox", "sh", "-c", script)
    assert out.returncode == 0 and out.stdout == images.BUSYBOX_INDEX, out.stdout + out.stderr


def test_kube_proxy_image_has_what_kube_proxy_execs(imported: Containerd) -> None:
    """pkg/util/iptables and pkg/util/conntrack of 1.20 run these; --version reads no rules."""
    script = ("set -e; for t in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; "
              "do $t --version; done; conntrack --version; "
              # The extensions kube-proxy's iptables rules use load (xtables modules and their
              # libraries): `-h` prints each one's options and touches no table.
              # The image has no grep: dash's `case` matches.
              "for m in comment conntrack statistic recent mark addrtype tcp udp sctp; do "
              "case \"$(iptables -m $m -h)\" in *'atch options'*) ;; *) echo no match $m; exit 1;; esac; done; "
              "for j in DNAT SNAT MASQUERADE MARK REJECT; do "
              "case \"$(iptables -j $j -h)\" in *\"$j target options\"*) ;; *) echo no target $j; exit 1;; esac; "
              "done; echo extensions ok")
    out = imported.run(f"{images.NODE_REPOSITORY}/kube-proxy:v{images.K8S_VERSION}", "/bin/sh", "-c", script)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("(nf_tables)") == 6 and "conntrack v1." in out.stdout, out.stdout
    assert "extensions ok" in out.stdout, out.stdout


# --- zeroproxy's own image -------------------------------------------------------------------------


def test_zeroproxy_image_carries_the_containerfile_config(zeroproxy_archive: Path) -> None:
    info = check_archive(zeroproxy_archive)
    tag = zeroproxy_archive.name.removeprefix("zeroproxy-").removesuffix(".tar")
    assert info["manifest"]["RepoTags"] == [f"localhost/zeroproxy:{tag}"]
    # The default tag is the version and a hash of the contents.
    version = re.search(r'^version = "([^"]+)"$', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert version is not None and re.fullmatch(rf"{re.escape(version.group(1))}-[0-9a-f]{{12}}", tag), tag
    declared = images.containerfile_config(REPO / "Containerfile")
    cfg = info["config"]["config"]
    assert cfg["Entrypoint"] == declared["entrypoint"] == ["/opt/zeroproxy/.venv/bin/zeroproxy"]
    assert cfg["Cmd"] == declared["cmd"]
    assert cfg["WorkingDir"] == declared["workdir"]
    assert cfg["Env"] == [f"{k}={v}" for k, v in declared["env"].items()]


def test_zeroproxy_image_under_another_tag_is_the_same_root(zeroproxy_archive: Path) -> None:
    """What the DaemonSet rolling-update test does: a new tag, the same layer."""
    tag = f"test-{uuid.uuid4().hex[:8]}"
    script = ["bash", str(REPO / "scripts" / "build-image.sh")]

    def default_tag() -> str:
        return subprocess.run([*script, "--print-tag"], capture_output=True, text=True, check=True).stdout.strip()

    # The working tree may be edited between the two builds (engineers share it): then the two
    # are of different sources, and the pair is built again.
    for _ in range(5):
        before = default_tag()
        default = subprocess.run(script, capture_output=True, text=True, check=False, timeout=3600)
        out = subprocess.run([*script, "--tag", tag], capture_output=True, text=True, check=False, timeout=3600)
        assert default.returncode == 0 and out.returncode == 0, default.stderr + out.stderr
        if default_tag() == before and default.stdout.strip().endswith(f"zeroproxy-{before}.tar"):
            break
    else:
        pytest.fail("the sources changed during each of 5 pairs of builds")
    other = Path(out.stdout.strip().splitlines()[-1])
    try:
        a, b = images.archive_info(Path(default.stdout.strip().splitlines()[-1])), images.archive_info(other)
        assert b["manifest"]["RepoTags"] == [f"localhost/zeroproxy:{tag}"]
        assert a["layer_digest"] == b["layer_digest"]
        assert a["config"] == b["config"]
    finally:
        other.unlink()
        (images.CACHE_DIR / "zeroproxy-image" / "tags" / tag).unlink()


def test_zeroproxy_image_runs_in_containerd(containerd: Containerd, zeroproxy_archive: Path) -> None:
    out = containerd.ctr("images", "import", str(zeroproxy_archive), timeout=900)
    assert out.returncode == 0, out.stderr
    ref = images.archive_info(zeroproxy_archive)["manifest"]["RepoTags"][0]
    # The image's own entry point, as the DaemonSet runs it.
    out = containerd.run(ref, "/opt/zeroproxy/.venv/bin/zeroproxy", "--help")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "agent" in out.stdout, out.stdout
    out = containerd.run(ref, "/bin/sh", "-c", "set -e; zeroproxy --help >/dev/null; criu --version; runc --version; "
                         "containerd-shim-zeroproxy-v2 -v; python -c 'import bcc; print(\"bcc\", bcc.__file__)'")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Version: 4.2" in out.stdout and "runc version" in out.stdout and "bcc " in out.stdout, out.stdout
    assert "containerd-shim-zeroproxy-v2:" in out.stdout and "Version:  1.6.20" in out.stdout, out.stdout


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_build_images_script_prints_the_images_dir(built: list[images.Built], zeroproxy_archive: Path) -> None:
    out = subprocess.run(["bash", str(REPO / "scripts" / "build-images.sh")], capture_output=True, text=True,
                         check=False, timeout=3600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(images.IMAGES_DIR)
    names = {p.name for p in images.IMAGES_DIR.glob("*.tar")}
    assert {b.path.name for b in built} <= names
    # zeroproxy's image of the current sources, under the tag --print-tag derives from them.
    tag = subprocess.run(["bash", str(REPO / "scripts" / "build-image.sh"), "--print-tag"], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert f"zeroproxy-{tag}.tar" in names
    json.loads((images.IMAGES_DIR / ".keys" / "all.json").read_text())
