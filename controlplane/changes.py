"""Change tracking after kube-proxy's ServiceChangeTracker / EndpointsChangeTracker.

Sources (the API watchers, the YAML file) only *record* here: an object was added, updated,
deleted, or a kind was (re)listed. Recording is cheap and never touches the kernel: it stores
the object, drops updates that change nothing the proxy reads (a new resourceVersion, managed
fields, the trigger-time annotation) and marks the service the object belongs to as changed.

The sync loop then asks for a :class:`SyncPlan`: for every changed service it translates the
Service and its EndpointSlices (the same pure :func:`translate` the file source uses) and
compares the result with what was last programmed for that service -- kube-proxy's
``{previous, current}`` pair. Services whose translation did not change are dropped there, so
a relist after an apiserver outage that brings back the same objects plans nothing at all.
``full=True`` re-translates every service instead, for the first sync and after a failure.

The tracker also assembles the complete desired :data:`ServiceTable` incrementally (only the
changed services' frontends are touched), resolving a frontend claimed by two services the way
a whole-table translation does: the service whose namespace/name sorts first keeps it.

Scale to zero makes a Pod's state part of its services' translation: an endpoint whose pod is
checkpointed is used only while no other runs. The tracker keeps each pod's effective state --
the node's own scaler (:meth:`ChangeTracker.set_local_state`, freshest), else the
``zeroproxy.io/scale-state`` label from the pods of every node watched by that label
(:data:`SCALE_STATE_PODS`), else the label on a Pod of this node's watch or the file -- and the
EndpointSlices that point at each pod (``targetRef``), so that a state change marks exactly the
services of those slices as changed. Other Pod updates (status, conditions) change nothing there.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from controlplane import annotations
from controlplane.objects import ObjectKey, Severity
from controlplane.translate import (
    API_VERSIONS,
    CLUSTER_SCOPED,
    DEFAULT_NODE_PORT_RANGE,
    SERVICE_NAME_LABEL,
    NodeInfo,
    PodInfo,
    created,
    node_zone,
    translate,
)
from dataplane.table import Frontend, FrontendKind, IPAddress, Protocol, ServiceEntry, ServiceTable

log = logging.getLogger("zeroproxy.changes")

TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
SERVICE_KINDS = ("Service", "EndpointSlice")  # the kinds that make up the service table
# The store for Pods of every node that carry the scale-state label (a second Pod watch, with a
# label selector); kept apart from "Pod" (this node's pods): the two watches list and delete
# independently, and a pod whose label is removed leaves only this one.
SCALE_STATE_PODS = "Pod:scale-state"
# Metadata that changes on every write without changing anything a proxy reads.
VOLATILE_METADATA = ("resourceVersion", "managedFields", "generation")

ServiceKey = tuple[str, str]  # (namespace, name) of a Service (name may be "" for unlabelled slices)
Slot = tuple[IPAddress, int, Protocol]  # what the datapath keys a frontend by


@dataclass
class ServiceChange:
    """kube-proxy's serviceChange: what was programmed for one service and what is wanted now."""

    previous: dict[Frontend, ServiceEntry]
    current: dict[Frontend, ServiceEntry]


@dataclass
class SyncPlan:
    """What one sync has to do, computed from the recorded changes."""

    full: bool
    changes: dict[ServiceKey, ServiceChange] = field(default_factory=dict)
    keys: list[ServiceKey] = field(default_factory=list)  # services translated for this plan
    unchanged: int = 0  # of those, how many translated to what was already programmed
    trigger_times: dict[ServiceKey, float] = field(default_factory=dict)  # wall time of the first change


@dataclass
class _Stored:
    body: dict[str, Any]  # the object without volatile metadata: what translation reads
    service: ServiceKey | None  # the service it belongs to (Services and EndpointSlices)
    trigger: float | None  # when the change that produced this version happened (wall time)


def object_key(kind: str, obj: Mapping[str, Any]) -> ObjectKey | None:
    """(namespace, name) as translation will see it, or None when the object has no usable name."""
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        return None
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        return None
    if kind in CLUSTER_SCOPED:
        return ("", name)  # (SCALE_STATE_PODS is a Pod store: namespaced)
    namespace = meta.get("namespace")
    if namespace is not None and not isinstance(namespace, str):
        return None
    return (namespace or "default", name)


def _service_of(kind: str, key: ObjectKey, body: Mapping[str, Any]) -> ServiceKey | None:
    if kind == "Service":
        return key
    if kind == "EndpointSlice":
        meta = body.get("metadata")
        labels = meta.get("labels") if isinstance(meta, Mapping) else None
        label = labels.get(SERVICE_NAME_LABEL) if isinstance(labels, Mapping) else None
        return (key[0], label if isinstance(label, str) else "")
    return None


def _slice_pods(key: ObjectKey, body: Mapping[str, Any]) -> frozenset[ObjectKey]:
    """The pods an EndpointSlice's endpoints point at (targetRef kind Pod), as translation reads them."""
    out = set()
    endpoints = body.get("endpoints")
    for ep in endpoints if isinstance(endpoints, list) else ():
        ref = ep.get("targetRef") if isinstance(ep, Mapping) else None
        if isinstance(ref, Mapping) and ref.get("kind") == "Pod" and isinstance(ref.get("name"), str):
            ns = ref.get("namespace")
            out.add((ns if isinstance(ns, str) and ns else key[0], ref["name"]))
    return frozenset(out)


def _label_state(body: Mapping[str, Any] | None) -> str:
    meta = body.get("metadata") if isinstance(body, Mapping) else None
    labels = meta.get("labels") if isinstance(meta, Mapping) else None
    value = labels.get(annotations.STATE) if isinstance(labels, Mapping) else None
    return value if isinstance(value, str) else ""


def _strip(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Copy without the metadata that changes on every write; keeps equality meaningful."""
    body = dict(obj)
    meta = body.get("metadata")
    if isinstance(meta, Mapping):
        meta = {k: v for k, v in meta.items() if k not in VOLATILE_METADATA}
        annotations = meta.get("annotations")
        if isinstance(annotations, Mapping) and TRIGGER_TIME_ANNOTATION in annotations:
            rest = {k: v for k, v in annotations.items() if k != TRIGGER_TIME_ANNOTATION}
            if rest:
                meta["annotations"] = rest
            else:
                del meta["annotations"]
        body["metadata"] = meta
    return body


def _trigger_time(obj: Mapping[str, Any], received: float) -> float:
    """The EndpointSlice controller's trigger-time annotation when present, else the arrival time.

    The annotation is when the *cause* (a pod became ready) happened, so latency measured from it
    is the whole network-programming latency, as kube-proxy reports it.
    """
    meta = obj.get("metadata")
    annotations = meta.get("annotations") if isinstance(meta, Mapping) else None
    value = annotations.get(TRIGGER_TIME_ANNOTATION) if isinstance(annotations, Mapping) else None
    if isinstance(value, str):
        try:
            return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    return received


class ChangeTracker:
    """The object store, the set of changed services, and the programmed {previous} state."""

    def __init__(self, node_name: str, *, proxy_name: str = "",
                 required_kinds: Iterable[str] = ("Service", "EndpointSlice"),
                 node_port_range: tuple[int, int] = DEFAULT_NODE_PORT_RANGE,
                 external_ip_cidrs: Iterable[str] | None = None) -> None:
        self.node_name = node_name
        self.external_ip_cidrs = None if external_ip_cidrs is None else tuple(
            ipaddress.ip_network(c, strict=False) for c in external_ip_cidrs)
        self.proxy_name = proxy_name
        self.node_port_range = node_port_range
        self.required_kinds = frozenset(required_kinds)
        self.listed_kinds: set[str] = set()
        self.objects: dict[str, dict[ObjectKey, _Stored]] = {k: {} for k in API_VERSIONS if k != "List"}
        self.objects[SCALE_STATE_PODS] = {}
        self.slices_of: dict[ServiceKey, set[ObjectKey]] = {}
        self.pods_of_slice: dict[ObjectKey, frozenset[ObjectKey]] = {}  # slice -> pods of its targetRefs
        self.slices_of_pod: dict[ObjectKey, set[ObjectKey]] = {}  # the reverse
        self.local_states: dict[ObjectKey, str] = {}  # from this node's scaler
        self.scale_states: dict[ObjectKey, str] = {}  # effective state of every pod that has one
        self.dirty: dict[ServiceKey, float] = {}  # changed service -> wall time of its oldest change
        # Monotonic time of the oldest change not yet in the kernel; the initial sync counts as
        # one from the start, so health reports a start-up that never gets its lists as stuck.
        self.queued_since: float | None = time.monotonic()
        self.state: dict[ServiceKey, dict[Frontend, ServiceEntry]] = {}  # "previous" per service
        self.table: ServiceTable = {}  # the desired table, all services, conflicts resolved
        self.nodes: dict[str, NodeInfo] = {}
        self.pods: dict[ObjectKey, PodInfo] = {}
        self.node_deleting = False  # this node's Node has a deletionTimestamp
        self._claims: dict[Slot, dict[ServiceKey, Frontend]] = {}
        self._claim_order: dict[Slot, dict[ServiceKey, int]] = {}  # when each claim was first seen
        self._claim_seq = 0
        self._winner: dict[Slot, tuple[ServiceKey, Frontend]] = {}
        self._losers: dict[Slot, set[ServiceKey]] = {}  # claims not programmed (logged once each)
        self._errors: dict[Any, set[str]] = {}  # what was logged per service/object, to log news once
        self._invalid_errors: set[str] = set()

    # ---- recording (handlers) -------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        """True once every required kind was listed: before that nothing may be programmed."""
        return self.required_kinds <= self.listed_kinds

    @property
    def pending(self) -> bool:
        return bool(self.dirty)

    def upsert(self, kind: str, obj: Mapping[str, Any], received: float | None = None) -> bool:
        """An object was added or updated; returns False for a no-op update (dropped)."""
        key = object_key(kind, obj)
        if kind not in self.objects or key is None:
            self._report_invalid([obj])
            return False
        received = time.time() if received is None else received
        body = _strip(obj)
        old = self.objects[kind].get(key)
        if old is not None and old.body == body:
            return False
        stored = _Stored(body, _service_of(kind, key, body), _trigger_time(obj, received))
        self.objects[kind][key] = stored
        self._changed(kind, key, old, stored)
        return True

    def delete(self, kind: str, obj: Mapping[str, Any], received: float | None = None) -> bool:
        key = object_key(kind, obj)
        if kind not in self.objects or key is None:
            return False
        old = self.objects[kind].pop(key, None)
        if old is None:
            return False
        received = time.time() if received is None else received
        self._changed(kind, key, old, None, received)
        return True

    def replace(self, kind: str, objects: Iterable[Mapping[str, Any]], received: float | None = None) -> int:
        """A (re)list of one kind: the given objects are all there is. Returns how many changed.

        Unchanged objects are no-ops, so a relist after a watch outage costs a comparison per
        object and plans only what really changed meanwhile.
        """
        received = time.time() if received is None else received
        seen: set[ObjectKey] = set()
        changed = 0
        invalid = []
        for obj in objects:
            key = object_key(kind, obj)
            if key is None:
                invalid.append(obj)
                continue
            seen.add(key)
            changed += self.upsert(kind, obj, received)
        for key in [k for k in self.objects.get(kind, {}) if k not in seen]:
            old = self.objects[kind].pop(key)
            self._changed(kind, key, old, None, received)
            changed += 1
        if invalid:
            self._report_invalid(invalid)
        self.listed_kinds.add(kind)
        return changed

    def replace_all(self, objects: Iterable[Any], received: float | None = None) -> int:
        """A source that always hands over everything (the YAML file): replace every kind.

        Objects of unknown kinds or without a name cannot be stored; they are translated on
        their own so that their problems are logged like any other.
        """
        by_kind: dict[str, list[Mapping[str, Any]]] = {k: [] for k in self.objects}
        invalid: list[Any] = []
        for obj in _flatten(objects):
            kind = obj.get("kind") if isinstance(obj, Mapping) else None
            if kind in by_kind and kind != SCALE_STATE_PODS and object_key(kind, obj) is not None:
                by_kind[kind].append(obj)
            else:
                invalid.append(obj)
        changed = sum(self.replace(kind, objs, received) for kind, objs in by_kind.items())
        self._report_invalid(invalid, replace=True)
        return changed

    def _changed(self, kind: str, key: ObjectKey, old: _Stored | None, new: _Stored | None,
                 received: float | None = None) -> None:
        if kind == "EndpointSlice":
            self._slice_pods_changed(key, new)
        if kind in SERVICE_KINDS:
            for stored in (old, new):
                if stored is None or stored.service is None:
                    continue
                if kind == "EndpointSlice":
                    members = self.slices_of.setdefault(stored.service, set())
                    if stored is new:
                        members.add(key)
                    else:
                        members.discard(key)
                        if not members:
                            del self.slices_of[stored.service]
                when = stored.trigger if stored is new and stored.trigger is not None else (
                    received if received is not None else time.time())
                self.dirty[stored.service] = min(self.dirty.get(stored.service, when), when)
            if self.queued_since is None:
                self.queued_since = time.monotonic()
        elif kind == "Node":
            self._node_changed(key[1], new)
        elif kind == "Pod":
            self._pod_changed(key, new)
            self._refresh_state(key, received)
        elif kind == SCALE_STATE_PODS:
            self._refresh_state(key, received)

    @property
    def zone(self) -> str:
        """This node's topology.kubernetes.io/zone ("" until its Node is known, or without one)."""
        mine = self.nodes.get(self.node_name)
        return node_zone(mine) if mine is not None else ""

    def _node_changed(self, name: str, new: _Stored | None) -> None:
        zone = self.zone
        if new is None:
            self.nodes.pop(name, None)
            if name == self.node_name:
                self.node_deleting = False
        else:
            tr = translate([new.body], self.node_name, node_port_range=self.node_port_range)
            self._log_errors(("Node", name), tr.errors)
            if name in tr.nodes:
                self.nodes[name] = tr.nodes[name]
            meta = new.body.get("metadata")
            if name == self.node_name:
                self.node_deleting = isinstance(meta, Mapping) and meta.get("deletionTimestamp") is not None
        if self.zone != zone:  # topology-aware services choose again (rare: zones seldom change)
            when = time.time()
            for svc in self.all_services():
                self.dirty[svc] = min(self.dirty.get(svc, when), when)
            if self.queued_since is None:
                self.queued_since = time.monotonic()

    def _pod_changed(self, key: ObjectKey, new: _Stored | None) -> None:
        if new is None:
            self.pods.pop(key, None)
            return
        tr = translate([new.body], self.node_name, node_port_range=self.node_port_range)
        self._log_errors(("Pod", key), tr.errors)
        if key in tr.pods:
            self.pods[key] = tr.pods[key]

    # ---- scale-to-zero state of pods ----------------------------------------------------------

    def set_local_state(self, namespace: str, name: str, state: str | None) -> bool:
        """This node's scaler reports a pod's state (None: it no longer manages the pod).

        It wins over the published label: the label is the same information after a round trip
        through the apiserver (or absent, with the file source). Returns True when the pod's
        services must be synced again.
        """
        key = (namespace, name)
        if state is None:
            self.local_states.pop(key, None)
        else:
            self.local_states[key] = state
        return self._refresh_state(key)

    def _effective_state(self, key: ObjectKey) -> str:
        if key in self.local_states:
            return self.local_states[key]
        for store in (SCALE_STATE_PODS, "Pod"):
            stored = self.objects[store].get(key)
            if stored is not None and (state := _label_state(stored.body)):
                return state
        return ""

    def _refresh_state(self, key: ObjectKey, received: float | None = None) -> bool:
        """Recompute one pod's state; mark the services of the slices pointing at it if it changed
        whether the pod counts as parked (a change between two parked states changes no choice)."""
        state = self._effective_state(key)
        before = self.scale_states.get(key, "")
        if state == before:
            return False
        if state:
            self.scale_states[key] = state
        else:
            self.scale_states.pop(key, None)
        if annotations.parked(state) == annotations.parked(before):
            return False
        when = time.time() if received is None else received
        services = {self.objects["EndpointSlice"][s].service for s in self.slices_of_pod.get(key, ())
                    if s in self.objects["EndpointSlice"]}
        for svc in services:
            if svc is not None:
                self.dirty[svc] = min(self.dirty.get(svc, when), when)
        if services and self.queued_since is None:
            self.queued_since = time.monotonic()
        return bool(services)

    def _slice_pods_changed(self, key: ObjectKey, new: _Stored | None) -> None:
        old_pods = self.pods_of_slice.pop(key, frozenset())
        new_pods = _slice_pods(key, new.body) if new is not None else frozenset()
        if new_pods:
            self.pods_of_slice[key] = new_pods
        for pod in old_pods - new_pods:
            members = self.slices_of_pod.get(pod)
            if members is not None:
                members.discard(key)
                if not members:
                    del self.slices_of_pod[pod]
        for pod in new_pods - old_pods:
            self.slices_of_pod.setdefault(pod, set()).add(key)

    # ---- planning and committing (the sync loop) ------------------------------------------------

    def all_services(self) -> set[ServiceKey]:
        return set(self.objects["Service"]) | set(self.slices_of) | set(self.state)

    def plan(self, full: bool = False) -> SyncPlan:
        """Translate the changed services (all of them when ``full``) and keep the real changes."""
        plan = SyncPlan(full=full)
        keys = self.all_services() if full else set(self.dirty)
        for key in sorted(keys):
            plan.keys.append(key)
            current = self._translate_service(key)
            previous = self.state.get(key, {})
            if current == previous:
                plan.unchanged += 1
                continue
            plan.changes[key] = ServiceChange(previous, current)
            if key in self.dirty:
                plan.trigger_times[key] = self.dirty[key]
        return plan

    def apply(self, plan: SyncPlan) -> None:
        """Make ``plan`` the tracker's state: its services' entries enter :attr:`table`.

        Called before the dataplane is written: the table is the desired state, and a failed
        write is repaired by the next (full) sync writing the whole table again.
        """
        touched: set[Slot] = set()
        for key, change in plan.changes.items():
            for fe in change.previous:
                slot = (fe.address, fe.port, fe.protocol)
                claims = self._claims.get(slot)
                if claims is not None:
                    claims.pop(key, None)
                touched.add(slot)
            for fe in change.current:
                slot = (fe.address, fe.port, fe.protocol)
                self._claims.setdefault(slot, {})[key] = fe
                touched.add(slot)
            if change.current:
                self.state[key] = change.current
            else:
                self.state.pop(key, None)
        self._order_new_claims(touched)
        for slot in touched:
            self._resolve(slot)
        if plan.full:
            self.dirty.clear()
        else:
            for key in plan.keys:
                self.dirty.pop(key, None)

    def entries_at(self, frontends: Iterable[Frontend]) -> list[ServiceEntry]:
        """The table's entries for the datapath slots of these frontends (for a partial sync)."""
        out = {}
        for fe in frontends:
            won = self._winner.get((fe.address, fe.port, fe.protocol))
            if won is not None:
                out[won[1]] = self.table[won[1]]
        return list(out.values())

    def mark_programmed(self) -> None:
        """The table was written to the kernel: nothing recorded so far is waiting any more."""
        if not self.dirty:
            self.queued_since = None

    def _created(self, key: ServiceKey) -> str:
        stored = self.objects["Service"].get(key)
        return created(stored.body) if stored is not None else "~"

    def _order_new_claims(self, slots: Iterable[Slot]) -> None:
        """Number the claims that appeared in this batch, forget those that went; one batch (an
        initial list, a file) is ordered by the Services' age, then name: the older one is first."""
        new = []
        for slot in slots:
            holders = self._claims.get(slot, {})
            order = self._claim_order.setdefault(slot, {})
            for key in [k for k in order if k not in holders]:
                del order[key]
            for key in holders:
                if key not in order:
                    new.append((self._created(key), key, slot))
            if not order and not holders:
                del self._claim_order[slot]
        for _, key, slot in sorted(new, key=lambda n: (n[0], n[1])):
            self._claim_seq += 1
            self._claim_order[slot][key] = self._claim_seq

    def _resolve(self, slot: Slot) -> None:
        """Put the rightful owner of one datapath slot into the table and log the losers.

        The owner is the claimant that had the slot first (so a new Service naming an address
        in use cannot take it over), except that an address the cluster allocated (a ClusterIP,
        a NodePort, an LB ingress IP) always beats a user-set externalIP (CVE-2020-8554).
        """
        old = self._winner.pop(slot, None)
        if old is not None:
            self.table.pop(old[1], None)
        holders = self._claims.get(slot)
        if not holders:
            self._claims.pop(slot, None)
            self._losers.pop(slot, None)
            return
        order = self._claim_order.get(slot, {})

        def rank(key: ServiceKey) -> tuple[int, int, ServiceKey]:
            user_set = holders[key].kind is FrontendKind.EXTERNAL_IP
            return (int(user_set), order.get(key, 0), key)

        winner = min(holders, key=rank)
        fe = holders[winner]
        self.table[fe] = self.state[winner][fe]
        self._winner[slot] = (winner, fe)
        logged = self._losers.setdefault(slot, set())
        logged &= set(holders)
        logged.discard(winner)
        for loser, lfe in sorted(holders.items()):
            if loser == winner or loser in logged:
                continue
            logged.add(loser)
            why = ("the cluster allocated it to" if fe.kind is not FrontendKind.EXTERNAL_IP
                   and lfe.kind is FrontendKind.EXTERNAL_IP else "it was in use first by")
            log.error("invalid input: Service %s/%s: frontend %s (%s) is not programmed: %s Service %s/%s (%s)",
                      loser[0], loser[1], lfe, lfe.kind.value, why, winner[0], winner[1], fe.kind.value)
        if not logged:
            self._losers.pop(slot, None)

    @property
    def conflict_count(self) -> int:
        """Frontends that a Service claims and another Service holds (not programmed for it)."""
        return sum(len(v) for v in self._losers.values())

    def _translate_service(self, key: ServiceKey) -> dict[Frontend, ServiceEntry]:
        objects = []
        svc = self.objects["Service"].get(key)
        if svc is not None:
            objects.append(svc.body)
        for slice_key in sorted(self.slices_of.get(key, ())):
            stored = self.objects["EndpointSlice"].get(slice_key)
            if stored is not None:
                objects.append(stored.body)
        if not objects:
            self._log_errors(key, [])
            return {}
        tr = translate(objects, self.node_name, proxy_name=self.proxy_name, scale_states=self.scale_states,
                       node_port_range=self.node_port_range, external_ip_cidrs=self.external_ip_cidrs,
                       node_zone=self.zone)
        self._log_errors(key, tr.errors)
        return tr.table

    # ---- problem reporting ----------------------------------------------------------------------

    def _log_errors(self, key: Any, errors: Iterable[Any]) -> None:
        """Log each problem once when it appears, not at every sync that still sees it."""
        now = {str(e): e for e in errors}
        before = self._errors.get(key, set())
        for text in sorted(now.keys() - before):
            error = now[text]
            (log.error if error.severity is Severity.ERROR else log.warning)("invalid input: %s", text)
        if now:
            self._errors[key] = set(now)
        else:
            self._errors.pop(key, None)

    def _report_invalid(self, objects: list[Any], replace: bool = False) -> None:
        """Objects that cannot be stored (unknown kind, no name): translation says why."""
        errors = translate(objects, self.node_name).errors if objects else []
        texts = {str(e): e for e in errors}
        for text in sorted(texts.keys() - self._invalid_errors):
            e = texts[text]
            (log.error if e.severity is Severity.ERROR else log.warning)("invalid input: %s", text)
        self._invalid_errors = set(texts) if replace else self._invalid_errors | set(texts)

    @property
    def problem_count(self) -> int:
        return sum(len(v) for v in self._errors.values()) + len(self._invalid_errors)


def _flatten(objects: Iterable[Any], depth: int = 0) -> Iterable[Any]:
    """Expand ``kind: List`` documents so their items are stored like top-level objects."""
    for obj in objects:
        if isinstance(obj, Mapping) and obj.get("kind") == "List" and depth < 8:
            items = obj.get("items")
            if isinstance(items, list):
                yield from _flatten(items, depth + 1)
                continue
        if obj is not None:
            yield obj
