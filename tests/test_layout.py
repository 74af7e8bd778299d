"""The folder tree keeps its plan: who may import whom, and the docs that describe the tree.

The rules are the ones docs/architecture.md states. Every import counts, the ones inside
functions included (the code defers many imports to keep start-up fast, and a deferred import is
still a dependency).
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Top-level Python packages, what each may import of the others, and third-party modules it must not.
PRODUCT = ("dataplane", "controlplane", "scaletozero", "zeroproxy")
ALLOWED: dict[str, set[str]] = {
    # The packet path: maps, programs, the service table's types. Knows no Kubernetes and no pods.
    "dataplane": {"dataplane"},
    # Scale to zero: scaler, activation proxy, runtimes. Drives the dataplane's sk_lookup and TC
    # helpers; learns of pods only through its own types, never from the API.
    "scaletozero": {"scaletozero", "dataplane"},
    # Kubernetes in, the service table (and scale-to-zero backends) out.
    "controlplane": {"controlplane", "dataplane", "scaletozero"},
    # The agent and CLI put the three together.
    "zeroproxy": {"zeroproxy", "controlplane", "dataplane", "scaletozero"},
    # Development tools: they may use the product, never the other way round.
    "testbed": {"testbed", *PRODUCT},
    "bench": {"bench", "testbed", *PRODUCT},
}
# Only the control plane talks to the API server.
FORBIDDEN_THIRD_PARTY: dict[str, set[str]] = {
    "dataplane": {"kubernetes"},
    "scaletozero": {"kubernetes"},
    "zeroproxy": {"kubernetes"},
}
OWN = set(ALLOWED) | {"tests", "bpf"}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every import in ``path``, relative imports resolved to the package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.append((node.lineno, path.relative_to(REPO).parts[0]))
            elif node.module:
                found.append((node.lineno, node.module.split(".")[0]))
    return found


def package_files() -> dict[str, list[Path]]:
    return {pkg: sorted((REPO / pkg).rglob("*.py")) for pkg in ALLOWED}


def test_every_python_file_belongs_to_a_package_with_rules() -> None:
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    tops = {Path(f).parts[0] for f in tracked if len(Path(f).parts) > 1}
    assert tops <= OWN | {"scripts"}, f"a Python folder without import rules: {sorted(tops - OWN - {'scripts'})}"
    assert all(files for files in package_files().values())


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_follow_the_layers(package: str) -> None:
    bad: list[str] = []
    for path in package_files()[package]:
        for line, top in imported_modules(path):
            where = f"{path.relative_to(REPO)}:{line} imports {top}"
            if top in OWN and top not in ALLOWED[package]:
                bad.append(where)
            if top in FORBIDDEN_THIRD_PARTY.get(package, set()):
                bad.append(where)
    assert not bad, f"{package} may import only {sorted(ALLOWED[package])}:\n" + "\n".join(bad)


def test_the_rule_checker_sees_deferred_and_relative_imports(tmp_path: Path) -> None:
    """The checker itself: an import inside a function is found, a relative one names its package."""
    probe = REPO / "dataplane" / "_layout_probe.py"
    probe.write_text("def f():\n    from controlplane import config\n    from . import maps\n")
    try:
        assert imported_modules(probe) == [(2, "controlplane"), (3, "dataplane")]
    finally:
        probe.unlink()


def test_product_wheel_holds_only_the_product() -> None:
    text = (REPO / "pyproject.toml").read_text()
    packages = re.search(r"^packages = \[(.*)\]$", text, flags=re.MULTILINE)
    assert packages, "pyproject.toml: no [tool.setuptools] packages line"
    listed = set(re.findall(r'"([a-z]+)"', packages.group(1)))
    assert listed == {*PRODUCT, "bpf"}


def _top_level_folders() -> set[str]:
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return {Path(f).parts[0] for f in tracked.split() if len(Path(f).parts) > 1 and not f.startswith(".")}


def test_readme_layout_table_matches_the_tree() -> None:
    text = (REPO / "README.md").read_text()
    section = text.split("## Layout", 1)
    assert len(section) == 2, "README.md has no '## Layout' section"
    rows = re.findall(r"^\| `([\w.-]+)/` \|", section[1].split("\n## ", 1)[0], flags=re.MULTILINE)
    assert set(rows) == _top_level_folders(), "README's layout table and the tracked folders differ"


def test_architecture_doc_names_every_folder_and_file() -> None:
    """docs/architecture.md has one line per folder and names every module a change could touch."""
    text = (REPO / "docs" / "architecture.md").read_text()
    for folder in _top_level_folders():
        assert re.search(rf"^\s*{re.escape(folder)}/\s", text, flags=re.MULTILINE), f"{folder}/ not in the tree"
    for package in (*PRODUCT, "testbed"):
        for path in (REPO / package).glob("*.py"):
            if path.name != "__init__.py":
                assert path.name in text, f"docs/architecture.md does not name {package}/{path.name}"
    for path_name in ("packet path", "control path", "scale-to-zero path"):
        assert path_name in text.lower(), path_name
