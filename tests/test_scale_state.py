"""Scale-to-zero state in the control plane, pure Python: the change tracker maps a pod's state to
the services whose slices point at it, and plans exactly those when the state changes.

The kernel and the apiserver parts are in tests/test_scale_running_only.py and
tests/test_scale_agent.py.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from controlplane import annotations
from controlplane.changes import SCALE_STATE_PODS, ChangeTracker
from controlplane.scaling import publication
from scaletozero.state import LABELS, ScaleState
from testbed.k8sobjects import endpoint_slice, service

PORTS = [{"name": "http", "port": 8080, "protocol": "TCP"}]


def slice_for(svc: str, pods: dict[str, str], name: str | None = None) -> dict[str, Any]:
    """An EndpointSlice of svc whose endpoints point at pods {name: ip}."""
    body = endpoint_slice(svc, list(pods.values()), PORTS, name=name or f"{svc}-1")
    for ep, pod in zip(body["endpoints"], pods, strict=True):
        ep["targetRef"] = {"kind": "Pod", "namespace": "default", "name": pod}
    return body


def pod(name: str, state: str | None = None, **status: Any) -> dict[str, Any]:
    labels = {annotations.STATE: state} if state else {}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default",
                                                               "labels": labels}, "status": status}


def backends_of(tracker: ChangeTracker, vip: str) -> list[str]:
    return sorted(str(b) for fe, e in tracker.table.items() if str(fe.address) == vip for b in e.backends)


def sync(tracker: ChangeTracker) -> set[tuple[str, str]]:
    plan = tracker.plan()
    tracker.apply(plan)
    return set(plan.changes)


def world() -> ChangeTracker:
    t = ChangeTracker("n1")
    t.replace("Service", [service("web", ["10.96.0.1"], [{"name": "http", "port": 80}]),
                          service("api", ["10.96.0.2"], [{"name": "http", "port": 80}])])
    t.replace("EndpointSlice", [slice_for("web", {"a": "10.244.0.1", "b": "10.244.0.2"}),
                                slice_for("api", {"c": "10.244.0.3"})])
    t.replace("Pod", [])
    t.replace(SCALE_STATE_PODS, [])
    sync(t)
    return t


def test_a_label_change_replans_only_the_services_of_that_pod() -> None:
    t = world()
    assert backends_of(t, "10.96.0.1") == ["10.244.0.1:8080", "10.244.0.2:8080"]
    assert t.upsert(SCALE_STATE_PODS, pod("a", "checkpointed"))
    assert sync(t) == {("default", "web")}
    assert backends_of(t, "10.96.0.1") == ["10.244.0.2:8080"]
    assert t.upsert(SCALE_STATE_PODS, pod("b", "checkpointed"))
    assert sync(t) == {("default", "web")}
    assert backends_of(t, "10.96.0.1") == ["10.244.0.1:8080", "10.244.0.2:8080"]  # all parked: all used
    # parked -> parked (a restore starts) and a status update change no choice: nothing planned
    assert t.upsert(SCALE_STATE_PODS, pod("b", "restoring"))
    assert t.upsert(SCALE_STATE_PODS, pod("b", "restoring", phase="Running"))
    assert not t.pending
    assert t.upsert(SCALE_STATE_PODS, pod("b", "running"))
    assert sync(t) == {("default", "web")}
    assert backends_of(t, "10.96.0.1") == ["10.244.0.2:8080"]
    # the label watch drops a pod (label removed or pod deleted): it counts as running again
    assert t.delete(SCALE_STATE_PODS, pod("a"))
    assert sync(t) == {("default", "web")}
    assert backends_of(t, "10.96.0.1") == ["10.244.0.1:8080", "10.244.0.2:8080"]
    assert backends_of(t, "10.96.0.2") == ["10.244.0.3:8080"]


def test_the_local_scaler_wins_over_the_label_and_slices_follow_their_pods() -> None:
    t = world()
    t.upsert("Pod", pod("a", "checkpointed"))  # this node's watch (or the file) carries the label
    assert sync(t) == {("default", "web")}
    assert backends_of(t, "10.96.0.1") == ["10.244.0.2:8080"]
    assert t.set_local_state("default", "a", ScaleState.RUNNING.label)  # restored; label not back yet
    assert sync(t) == {("default", "web")}
    assert backends_of(t, "10.96.0.1") == ["10.244.0.1:8080", "10.244.0.2:8080"]
    assert not t.set_local_state("default", "a", ScaleState.RUNNING.label)  # no change, nothing to do
    assert t.set_local_state("default", "a", None)  # the scaler let go: the label counts again
    assert sync(t) == {("default", "web")}
    assert backends_of(t, "10.96.0.1") == ["10.244.0.2:8080"]
    # the slice moves pod a to service api: a's state now replans api, and no longer web
    t.replace("EndpointSlice", [slice_for("web", {"b": "10.244.0.2"}),
                                slice_for("api", {"c": "10.244.0.3", "a": "10.244.0.1"})])
    sync(t)
    assert backends_of(t, "10.96.0.2") == ["10.244.0.3:8080"]
    t.upsert("Pod", pod("a"))
    assert sync(t) == {("default", "api")}
    assert backends_of(t, "10.96.0.2") == ["10.244.0.1:8080", "10.244.0.3:8080"]
    assert t.slices_of_pod == {("default", "a"): {("default", "api-1")}, ("default", "b"): {("default", "web-1")},
                               ("default", "c"): {("default", "api-1")}}


def test_two_pod_watches_are_kept_apart() -> None:
    """The label watch's relist must not delete this node's pods, and the other way round."""
    t = world()
    a = pod("a", "checkpointed")
    t.replace("Pod", [a])
    t.replace(SCALE_STATE_PODS, [a])
    sync(t)
    assert backends_of(t, "10.96.0.1") == ["10.244.0.2:8080"]
    t.replace("Pod", [])  # a moved off this node's watch (say, a relist), still labelled elsewhere
    assert not t.pending and ("default", "a") in t.objects[SCALE_STATE_PODS]
    t.replace(SCALE_STATE_PODS, [])
    assert sync(t) == {("default", "web")}
    assert backends_of(t, "10.96.0.1") == ["10.244.0.1:8080", "10.244.0.2:8080"]


def test_file_source_objects_with_the_label() -> None:
    """The file source hands over everything at once; the label on a Pod in the YAML is honoured."""
    t = ChangeTracker("n1")
    objects = [service("web", ["10.96.0.1"], [{"name": "http", "port": 80}]),
               slice_for("web", {"a": "10.244.0.1", "b": "10.244.0.2"}), pod("a", "checkpointed"), pod("b")]
    t.replace_all(objects)
    sync(t)
    assert backends_of(t, "10.96.0.1") == ["10.244.0.2:8080"]
    later = copy.deepcopy(objects)
    later[3] = pod("b", "checkpointed")
    t.replace_all(later)
    assert sync(t) == {("default", "web")}
    assert backends_of(t, "10.96.0.1") == ["10.244.0.1:8080", "10.244.0.2:8080"]


def test_publication_of_state_changes() -> None:
    assert publication(ScaleState.RUNNING, ScaleState.CHECKPOINTING) == ("running", None)
    label, event = publication(ScaleState.CHECKPOINTING, ScaleState.CHECKPOINTED, seconds=0.2)
    assert label == "checkpointed" and event is not None and event[0] == "Checkpointed" and "0.200 s" in event[1]
    assert publication(ScaleState.CHECKPOINTING, ScaleState.RUNNING) == ("running", None)  # dump refused: not idle
    assert publication(ScaleState.CHECKPOINTED, ScaleState.RESTORING) == ("restoring", None)
    label, event = publication(ScaleState.RESTORING, ScaleState.RUNNING, seconds=0.1)
    assert label == "running" and event is not None and event[0] == "Restored"
    assert publication(ScaleState.RESTORING, ScaleState.FAILED, "no checkpoint images") == (
        "failed", ("RestoreFailed", "restore failed: no checkpoint images; held connections were reset, the next "
                   "connection tries again", "Warning"))
    assert publication(ScaleState.RUNNING, None) == (None, None)  # opted out: the label goes
    assert [publication(None, s)[0] for s in ScaleState] == ["running", "running", "checkpointed", "restoring",
                                                             "failed"]
    assert LABELS == ("running", "checkpointed", "restoring", "failed")


def test_parked_label_values() -> None:
    """The translation's reading of the label: the parked states, and anything unknown is running."""
    assert [v for v in LABELS if annotations.parked(v)] == ["checkpointed", "restoring", "failed"]
    assert not any(annotations.parked(v) for v in (None, "", "running", "checkpointing", "Checkpointed", "x"))


def test_scale_to_zero_config_fields_and_flags(tmp_path: Any) -> None:
    from controlplane import config
    from zeroproxy.cli import agent_config, build_parser

    doc = {"apiVersion": config.API_VERSION, "kind": config.KIND,
           "scaleToZero": {"enabled": True, "runtimeDir": "/rt", "restoreTimeout": "45s", "pollInterval": "250ms"}}
    cfg = config.parse(doc)
    sz = cfg.scale_to_zero
    assert (sz.enabled, str(sz.runtime_dir), sz.restore_timeout, sz.poll_interval) == (True, "/rt", 45.0, 0.25)
    assert str(sz.criu) == str(config.DEFAULT_S2Z_CRIU)  # unset fields keep their defaults
    assert (sz.runtime, sz.shim_socket_dir) == ("runc", config.DEFAULT_S2Z_SHIM_SOCKET_DIR)
    shim = config.parse({**doc, "scaleToZero": {"enabled": True, "runtime": "shim", "shimSocketDir": "/s"}})
    assert (shim.scale_to_zero.runtime, str(shim.scale_to_zero.shim_socket_dir)) == ("shim", "/s")
    assert config.parse(config.dump(cfg)) == cfg  # --print-config round trip
    with pytest.raises(config.ConfigError) as e:
        config.parse({**doc, "scaleToZero": {"enabled": "yes", "restoreTimeout": "1h", "cgroupParent": "rel",
                                             "runtime": "crio", "typo": 1}})
    assert e.value.problems == [
        "scaleToZero.enabled: must be true or false, got the string 'yes'",
        "scaleToZero.restoreTimeout: must be between 1s and 600s, got '1h'",
        "scaleToZero.cgroupParent: must be an absolute cgroup path like /zeroproxy, got 'rel'",
        "scaleToZero.runtime: must be one of runc, shim, got 'crio'",
        "scaleToZero.typo: unknown field (known: enabled, runtime, runtimeDir, shimSocketDir, criu, cgroupParent, "
        "restoreTimeout, stateFile, pollInterval)",
    ]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    args = build_parser().parse_args(["agent", "--config", str(path), "--source", "file:/x", "--criu", "/c",
                                      "--restore-timeout", "20s", "--s2z-runtime", "shim"])
    sz = agent_config(args).scale_to_zero
    assert (sz.enabled, str(sz.runtime_dir), str(sz.criu), sz.restore_timeout, sz.runtime) == (
        True, "/rt", "/c", 20.0, "shim")
