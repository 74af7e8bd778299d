"""Golden files for translation: each directory under tests/data/translate/ holds the objects a
cluster would show (``objects.yaml``, the shape ``kubectl get -o yaml`` prints) and the table
translate makes of them (``expected.yaml``: one readable entry per frontend, then the errors and
warnings). A change in behaviour shows up as a diff of a file a reviewer can read.

Every case is translated as node ``node-a`` sees it (that only matters for ``Local`` traffic
policies). After an intended change, regenerate and review the diff:

    ZP_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_translate_golden.py
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.objects import Severity
from controlplane.translate import Translation, translate
from controlplane.wire import decode_sync, encode_sync
from dataplane.table import Backend, FrontendKind, ServiceEntry

CASES_DIR = Path(__file__).parent / "data" / "translate"
CASES = sorted(p.name for p in CASES_DIR.iterdir() if (p / "objects.yaml").is_file())
NODE = "node-a"
UPDATE = os.environ.get("ZP_UPDATE_GOLDEN") == "1"
HEADER = (
    "# What controlplane.translate makes of objects.yaml, as node {node} sees it.\n"
    "# Generated: ZP_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_translate_golden.py (review the diff).\n"
)


def backend(b: Backend) -> str:
    """One backend on one line: address:port, its node, and any condition that is not the usual."""
    words = [str(b), b.node_name or "(no node)"]
    words += [w for w, on in (("not-ready", not b.ready), ("not-serving", not b.serving),
                              ("terminating", b.terminating)) if on]
    return " ".join(words)


def entry(e: ServiceEntry) -> dict[str, Any]:
    out: dict[str, Any] = {
        "frontend": str(e.frontend),
        "kind": e.frontend.kind.value,
        "service": str(e.service),
        "backends": [backend(b) for b in e.backends],
        "affinity": e.affinity_timeout,
        "local": e.local_only,
    }
    if e.internal_backends is not None:
        out["internal_backends"] = [backend(b) for b in e.internal_backends]
    if e.health_check_node_port:
        out["health_check_node_port"] = e.health_check_node_port
    if e.source_ranges:
        out["source_ranges"] = [str(n) for n in e.source_ranges]
    return out


def render(t: Translation) -> dict[str, Any]:
    # a service's frontends together, ClusterIP first (the order FrontendKind lists the kinds)
    kinds = list(FrontendKind)
    entries = sorted(t.table.values(), key=lambda e: (e.service.namespace, e.service.name,
                                                      kinds.index(e.frontend.kind), e.frontend.sort_key))
    return {
        "frontends": [entry(e) for e in entries],
        "errors": [str(e) for e in t.errors if e.severity is Severity.ERROR],
        "warnings": [str(e) for e in t.errors if e.severity is Severity.WARNING],
    }


def dump(data: dict[str, Any]) -> str:
    return HEADER.format(node=NODE) + yaml.safe_dump(data, sort_keys=False, width=200, allow_unicode=True)


def test_there_are_cases() -> None:
    assert len(CASES) >= 8, CASES


@pytest.mark.parametrize("case", CASES)
def test_translation_matches_the_golden_file(case: str) -> None:
    folder = CASES_DIR / case
    objects = list(yaml.safe_load_all((folder / "objects.yaml").read_text()))
    t = translate(objects, NODE)
    got = render(t)
    expected_file = folder / "expected.yaml"
    if UPDATE:
        expected_file.write_text(dump(got))
    assert expected_file.is_file(), f"{expected_file} missing: run with ZP_UPDATE_GOLDEN=1 to write it"
    want = yaml.safe_load(expected_file.read_text())
    if got != want:
        diff = "".join(difflib.unified_diff(
            dump(want).splitlines(keepends=True), dump(got).splitlines(keepends=True),
            f"{case}/expected.yaml", "translate() now"))
        pytest.fail(f"translation of {case}/objects.yaml differs from its golden file "
                    f"(ZP_UPDATE_GOLDEN=1 rewrites it after an intended change):\n{diff}")
    # what the golden file shows is also what reaches a map writer in another process
    assert {e.frontend: e for e in decode_sync(encode_sync(t.table.values())).entries} == t.table
