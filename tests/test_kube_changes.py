"""The change tracker on its own (pure Python): what handlers record, what a sync plans.

The end-to-end behaviour (real apiserver, kernel maps, traffic) is in test_kube_agent.py; here
the rules are pinned down one by one, the way kube-proxy's change tracker tests do.
"""

from __future__ import annotations

import copy
import ipaddress

from controlplane.changes import TRIGGER_TIME_ANNOTATION, ChangeTracker
from controlplane.translate import translate
from testbed.k8sobjects import endpoint_slice, node, service

HTTP = [{"name": "http", "port": 8080, "protocol": "TCP"}]


def svc(name: str, vip: str, ns: str = "default", **spec: object) -> dict:
    return service(name, [vip], [{"name": "http", "port": 80, "protocol": "TCP"}], namespace=ns, **spec)


def eps(name: str, ips: list[str], ns: str = "default", slice_name: str | None = None, **kw: object) -> dict:
    return endpoint_slice(name, ips, HTTP, namespace=ns, name=slice_name, **kw)


def synced_tracker(*objects: dict) -> ChangeTracker:
    t = ChangeTracker("node-a")
    t.replace("Service", [o for o in objects if o["kind"] == "Service"])
    t.replace("EndpointSlice", [o for o in objects if o["kind"] == "EndpointSlice"])
    t.apply(t.plan(full=True))
    t.mark_programmed()
    return t


def backends(t: ChangeTracker, vip: str) -> list[str]:
    for fe, entry in t.table.items():
        if str(fe.address) == vip:
            return [str(b) for b in entry.backends]
    raise KeyError(vip)


def test_nothing_is_synced_before_every_required_kind_was_listed() -> None:
    t = ChangeTracker("node-a", required_kinds=("Service", "EndpointSlice", "Node"))
    assert t.queued_since is not None  # the initial sync is pending from the start
    t.replace("Service", [svc("a", "10.96.0.1")])
    t.replace("EndpointSlice", [])
    assert not t.synced
    t.replace("Node", [node("node-a", ["192.168.1.1"])])
    assert t.synced
    assert "node-a" in t.nodes


def test_noop_updates_are_dropped() -> None:
    s = svc("a", "10.96.0.1")
    t = synced_tracker(s, eps("a", ["10.0.0.1"]))
    again = copy.deepcopy(s)
    again["metadata"]["resourceVersion"] = "999"
    again["metadata"]["managedFields"] = [{"manager": "kubectl"}]
    assert t.upsert("Service", again) is False
    assert not t.pending
    slice_again = eps("a", ["10.0.0.1"])
    slice_again["metadata"]["annotations"] = {TRIGGER_TIME_ANNOTATION: "2024-01-01T00:00:00Z"}
    assert t.upsert("EndpointSlice", slice_again) is False


def test_a_change_plans_only_its_service() -> None:
    t = synced_tracker(*(o for i in range(20) for o in (svc(f"s{i}", f"10.96.0.{i + 1}"),
                                                        eps(f"s{i}", [f"10.0.0.{i + 1}"]))))
    assert len(t.table) == 20
    assert t.upsert("EndpointSlice", eps("s7", ["10.0.0.200"]))
    plan = t.plan()
    assert list(plan.changes) == [("default", "s7")] and plan.keys == [("default", "s7")]
    change = plan.changes[("default", "s7")]
    assert [str(b) for e in change.previous.values() for b in e.backends] == ["10.0.0.8:8080"]
    assert [str(b) for e in change.current.values() for b in e.backends] == ["10.0.0.200:8080"]
    t.apply(plan)
    assert backends(t, "10.96.0.8") == ["10.0.0.200:8080"]
    assert not t.pending


def test_relist_with_the_same_objects_plans_nothing_and_catches_missed_deletes() -> None:
    objects = [svc("a", "10.96.0.1"), eps("a", ["10.0.0.1"]), svc("b", "10.96.0.2"), eps("b", ["10.0.0.2"])]
    t = synced_tracker(*objects)
    assert t.replace("Service", copy.deepcopy(objects[0::2])) == 0
    assert t.replace("EndpointSlice", copy.deepcopy(objects[1::2])) == 0
    assert t.plan().changes == {}
    # b was deleted while the watch was down: the relist is the only way to learn it
    assert t.replace("Service", [objects[0]]) == 1
    assert t.replace("EndpointSlice", [objects[1]]) == 1
    plan = t.plan()
    assert list(plan.changes) == [("default", "b")] and plan.changes[("default", "b")].current == {}
    t.apply(plan)
    assert {str(fe.address) for fe in t.table} == {"10.96.0.1"}


def test_slice_moving_between_services_marks_both() -> None:
    t = synced_tracker(svc("a", "10.96.0.1"), svc("b", "10.96.0.2"), eps("a", ["10.0.0.1"], slice_name="s"))
    moved = eps("b", ["10.0.0.1"], slice_name="s")
    t.upsert("EndpointSlice", moved)
    plan = t.plan()
    assert set(plan.changes) == {("default", "a"), ("default", "b")}
    t.apply(plan)
    assert backends(t, "10.96.0.1") == [] and backends(t, "10.96.0.2") == ["10.0.0.1:8080"]


def test_table_equals_whole_translation_including_conflicts() -> None:
    """Two services claiming one VIP:port: the namespace/name sorting first wins, as in translate()."""
    objects = [svc("z", "10.96.0.9"), eps("z", ["10.0.0.9"]), svc("a", "10.96.0.9"), eps("a", ["10.0.0.1"]),
               svc("m", "10.96.0.5", ns="other"), eps("m", ["10.0.0.5"], ns="other")]
    t = synced_tracker(*objects)
    assert t.table == translate(objects, "node-a").table
    t.delete("Service", objects[2])  # the winner goes: the other claimant takes the frontend
    t.apply(t.plan())
    assert backends(t, "10.96.0.9") == ["10.0.0.9:8080"]
    assert t.table == translate([o for o in objects if o is not objects[2]], "node-a").table


def _owner(t: ChangeTracker, address: str) -> str:
    [entry] = [e for fe, e in t.table.items() if str(fe.address) == address]
    return entry.service.name


def _created(obj: dict, when: str) -> dict:
    obj["metadata"]["creationTimestamp"] = when
    return obj


def test_a_new_service_cannot_take_an_address_in_use(caplog: object) -> None:
    """CVE-2020-8554's hijack through a name that sorts first: "z" holds the externalIP, "a"
    arriving later names it too and gets nothing; the loser is logged once and counted."""
    import logging

    t = synced_tracker(svc("z", "10.96.0.9", externalIPs=["198.51.100.7"]), eps("z", ["10.0.0.9"]))
    with caplog.at_level(logging.ERROR):  # type: ignore[attr-defined]
        t.upsert("Service", svc("a", "10.96.0.1", externalIPs=["198.51.100.7"]))
        t.upsert("EndpointSlice", eps("a", ["10.0.0.1"]))
        t.apply(t.plan())
        t.upsert("EndpointSlice", eps("a", ["10.0.0.2"]))  # a's own changes do not log it again
        t.apply(t.plan())
    assert _owner(t, "198.51.100.7") == "z" and backends(t, "198.51.100.7") == ["10.0.0.9:8080"]
    assert backends(t, "10.96.0.1") == ["10.0.0.2:8080"]  # a keeps what is its own
    lines = [r.getMessage() for r in caplog.records]  # type: ignore[attr-defined]
    assert lines == ["invalid input: Service default/a: frontend 198.51.100.7:80/TCP (ExternalIP) is not "
                     "programmed: it was in use first by Service default/z (ExternalIP)"], lines
    assert t.conflict_count == 1
    t.upsert("EndpointSlice", eps("z", ["10.0.0.8"]))  # z changing its backends keeps its claim
    t.apply(t.plan())
    assert _owner(t, "198.51.100.7") == "z"
    t.delete("Service", svc("z", "10.96.0.9"))  # the first owner goes: the next in line takes it
    t.apply(t.plan())
    assert _owner(t, "198.51.100.7") == "a" and t.conflict_count == 0


def test_an_allocated_address_beats_an_external_ip_that_was_there_first() -> None:
    """A user-set externalIP naming another Service's ClusterIP (or one the apiserver allocates
    later) never wins over the allocation, whoever came first."""
    t = synced_tracker(svc("a", "10.96.0.1", externalIPs=["10.96.0.50"]), eps("a", ["10.0.0.1"]))
    assert _owner(t, "10.96.0.50") == "a"
    t.upsert("Service", svc("z", "10.96.0.50"))
    t.upsert("EndpointSlice", eps("z", ["10.0.0.9"]))
    t.apply(t.plan())
    assert _owner(t, "10.96.0.50") == "z" and backends(t, "10.96.0.50") == ["10.0.0.9:8080"]
    assert [fe.kind.value for fe in t.table if str(fe.address) == "10.96.0.50"] == ["ClusterIP"]
    assert t.conflict_count == 1


def test_in_one_list_the_older_service_owns_a_duplicate_address() -> None:
    """No history in an initial list (or a file): the older Service counts as the first owner,
    then the name; translate() on the same objects agrees."""
    objects = [_created(svc("a", "10.96.0.9"), "2026-02-01T00:00:00Z"), eps("a", ["10.0.0.1"]),
               _created(svc("z", "10.96.0.9"), "2026-01-01T00:00:00Z"), eps("z", ["10.0.0.9"]),
               svc("b", "10.96.0.9"), eps("b", ["10.0.0.2"])]  # no timestamp (a file): after both
    t = synced_tracker(*objects)
    assert _owner(t, "10.96.0.9") == "z" and t.conflict_count == 2
    assert t.table == translate(objects, "node-a").table
    t.delete("Service", objects[2])
    t.apply(t.plan())
    assert _owner(t, "10.96.0.9") == "a"


def test_external_ips_outside_the_allowed_cidrs_are_refused_by_field() -> None:
    objects = [svc("a", "10.96.0.1", externalIPs=["192.0.2.10", "198.51.100.7"]), eps("a", ["10.0.0.1"])]
    t = ChangeTracker("node-a", external_ip_cidrs=["198.51.100.0/24"])
    t.replace("Service", objects[:1])
    t.replace("EndpointSlice", objects[1:])
    t.apply(t.plan(full=True))
    assert sorted(str(fe.address) for fe in t.table) == ["10.96.0.1", "198.51.100.7"]
    assert t.problem_count == 1
    tr = translate(objects, "node-a", external_ip_cidrs=[ipaddress.ip_network("198.51.100.0/24")])
    assert [str(e) for e in tr.errors] == [
        "Service default/a spec.externalIPs[0]: 192.0.2.10 is outside the allowed externalIP CIDRs "
        "(198.51.100.0/24); address ignored"]
    none = translate(objects, "node-a", external_ip_cidrs=[])
    assert sorted(str(fe.address) for fe in none.table) == ["10.96.0.1"] and len(none.errors) == 2
    assert sorted(str(fe.address) for fe in translate(objects, "node-a").table) == [
        "10.96.0.1", "192.0.2.10", "198.51.100.7"]  # without the option: every address, as kube-proxy


def test_full_plan_retranslates_everything_but_changes_nothing_when_in_sync() -> None:
    t = synced_tracker(svc("a", "10.96.0.1"), eps("a", ["10.0.0.1"]))
    plan = t.plan(full=True)
    assert plan.keys == [("default", "a")] and plan.changes == {} and plan.unchanged == 1


def test_trigger_time_comes_from_the_annotation() -> None:
    t = synced_tracker(svc("a", "10.96.0.1"))
    s = eps("a", ["10.0.0.1"])
    s["metadata"]["annotations"] = {TRIGGER_TIME_ANNOTATION: "2030-01-02T03:04:05Z"}
    t.upsert("EndpointSlice", s, received=1.0)
    plan = t.plan()
    assert plan.trigger_times[("default", "a")] == 1893553445.0


def test_file_source_replace_all_reports_unknown_kinds_once(caplog: object) -> None:
    import logging

    t = ChangeTracker("node-a")
    objects = [svc("a", "10.96.0.1"), {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}},
               {"kind": "List", "apiVersion": "v1", "items": [eps("a", ["10.0.0.1"])]}]
    with caplog.at_level(logging.WARNING):  # type: ignore[attr-defined]
        t.replace_all(objects)
        t.replace_all(copy.deepcopy(objects))
    lines = [r.getMessage() for r in caplog.records if "ConfigMap" in r.getMessage()]  # type: ignore[attr-defined]
    assert len(lines) == 1 and "ConfigMap x kind: unknown kind" in lines[0]
    assert t.synced
    t.apply(t.plan(full=True))
    assert backends(t, "10.96.0.1") == ["10.0.0.1:8080"]


def test_internal_traffic_policy_local_keeps_this_nodes_endpoints() -> None:
    t = synced_tracker(svc("a", "10.96.0.1", internalTrafficPolicy="Local"),
                       eps("a", ["10.0.0.1"], slice_name="here", node_name="node-a"),
                       eps("a", ["10.0.0.2"], slice_name="there", node_name="node-b"))
    assert backends(t, "10.96.0.1") == ["10.0.0.1:8080"]
    assert all(fe.address == ipaddress.ip_address("10.96.0.1") for fe in t.table)


def test_this_nodes_zone_label_decides_topology_aware_services_and_its_change_replans() -> None:
    def zoned(zone: str | None) -> dict:
        n = node("node-a", ["192.168.1.1"])
        if zone is not None:
            n["metadata"]["labels"] = {"topology.kubernetes.io/zone": zone}
        return n

    s = eps("a", ["10.0.0.1", "10.0.0.2"])
    for e, zone in zip(s["endpoints"], ("z1", "z2"), strict=True):
        e["hints"] = {"forZones": [{"name": zone}]}
    t = ChangeTracker("node-a", required_kinds=("Service", "EndpointSlice", "Node"))
    t.replace("Service", [svc("a", "10.96.0.1", trafficDistribution="PreferClose"), svc("b", "10.96.0.2")])
    t.replace("EndpointSlice", [s, eps("b", ["10.0.0.3"])])
    t.replace("Node", [zoned("z1")])
    t.apply(t.plan(full=True))
    assert backends(t, "10.96.0.1") == ["10.0.0.1:8080"]
    assert t.upsert("Node", zoned("z2"))
    plan = t.plan()
    assert list(plan.changes) == [("default", "a")]  # b asked for nothing: planned, unchanged
    t.apply(plan)
    assert backends(t, "10.96.0.1") == ["10.0.0.2:8080"]
    t.upsert("Node", zoned(None))  # no zone label: every endpoint, as kube-proxy
    t.apply(t.plan())
    assert backends(t, "10.96.0.1") == ["10.0.0.1:8080", "10.0.0.2:8080"]
    assert t.zone == ""
