"""The Kubernetes API as a source: list, then watch from the list's resourceVersion, per kind.

One watcher thread per resource (Services, EndpointSlices, this node's Node, optionally this
node's Pods and every node's Pods that carry the scale-to-zero state label) runs the informer
protocol of client-go's reflector:

0. for a resource with fallback versions (EndpointSlice: ``discovery.k8s.io/v1``, else
   ``v1beta1`` as kube-proxy up to 1.20 read it), ask API discovery (``GET /apis/<group>``)
   which one the server serves, before every list from scratch -- never guess from a 404;
1. **list** (paged, ``limit=500``) and hand the complete set to ``on_list`` -- the consumer
   replaces what it had for that kind, so a relist also catches deletions it never saw;
2. **watch** from the list's resourceVersion with ``allowWatchBookmarks``, handing each
   ADDED/MODIFIED/DELETED to ``on_event`` and moving the resourceVersion on with every event
   and BOOKMARK, so a watch that times out or breaks resumes where it stopped;
3. on **410 Gone** (the resourceVersion was compacted away, e.g. after the apiserver restarted)
   go back to 1 immediately -- once, not in a loop: the new list's version is current;
4. on any other failure (apiserver gone, connection refused, TLS, 5xx) wait with a capped
   exponential backoff plus jitter and retry the watch from the last version, or the list if
   none was completed yet. The dataplane keeps its last good state meanwhile; nothing here
   ever tells the consumer "everything is gone" because the apiserver is. A failure is logged
   as a warning when it starts and again at most every :data:`WARN_INTERVAL` while it lasts
   (naming resource, request path and error), and its end at info: a stuck agent never goes
   quiet in its log.

Watchers talk HTTP through the official client's ``ApiClient.call_api`` (auth, TLS, token
refresh for bound service-account tokens) but read the JSON themselves with
``_preload_content=False``: objects arrive as the camelCase dicts the translation takes, there
is no typed model to build and throw away, and Status objects the 1.20 apiserver returns that
newer typed clients cannot parse do no harm.

The callbacks run on the agent's asyncio loop (``loop.call_soon_threadsafe``): handlers stay
single-threaded like the rest of the control plane, the threads only do blocking I/O.

The one thing the agent writes is its scale-to-zero pods' state (:class:`PodStatePublisher`):
the ``zeroproxy.io/scale-state`` label on the Pod, which every agent's label-selected Pod watch
sees, and a core/v1 Event on the Pod for each checkpoint, restore and restore failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from controlplane import annotations
from controlplane.changes import SCALE_STATE_PODS

log = logging.getLogger("zeroproxy.kubesource")

LIST_PAGE_SIZE = 500
WATCH_TIMEOUT_RANGE = (300, 600)  # seconds, randomised like client-go so watches don't all renew at once
CONNECT_TIMEOUT = 10.0
READ_SLACK = 30.0  # a read may wait this much longer than the watch's own timeout before we give up
BACKOFF_INITIAL = 0.5
BACKOFF_CAP = 30.0
WARN_INTERVAL = 30.0  # a failure that goes on is logged at warning level again this often

OnList = Callable[[str, list[dict[str, Any]], float], None]  # kind, objects, received (wall time)
OnEvent = Callable[[str, str, dict[str, Any], float], None]  # kind, ADDED/MODIFIED/DELETED, object, received
OnStatus = Callable[[str, str, str], None]  # kind, what ("relist", "watch_error", ...), detail


@dataclass(frozen=True)
class Resource:
    """One collection to list and watch."""

    kind: str
    api_version: str
    path: str  # collection URL path, e.g. /api/v1/services
    field_selector: str = ""
    label_selector: str = ""
    store: str = ""  # what the consumer files the objects under; "" = kind (two Pod watches differ)
    # Older versions of api_version's group to use, in order, when API discovery says the
    # server does not serve api_version (a group API only; path must then be under it).
    fallback_versions: tuple[str, ...] = ()

    @property
    def plural(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def name(self) -> str:
        """The first argument of every callback: the store, or the kind when it has none."""
        return self.store or self.kind

    def at_version(self, version: str) -> tuple[str, str]:
        """(apiVersion, collection path) of this resource in another version of its group."""
        group, _, current = self.api_version.rpartition("/")
        return f"{group}/{version}", self.path.replace(f"/apis/{group}/{current}/", f"/apis/{group}/{version}/", 1)


def resources(node_name: str, *, watch_pods: bool = False, scale_states: bool = False) -> list[Resource]:
    """What the agent watches. Node and Pods are restricted to this node, as kube-proxy does:
    every node watching every Node would cost the apiserver O(nodes^2) for nothing.

    ``scale_states`` adds the Pods of every node that carry the scale-to-zero state label,
    selected by the apiserver (only pods of opted-in workloads, not all pods), under the
    store :data:`~controlplane.changes.SCALE_STATE_PODS`: translation needs every endpoint's
    state to send connections to running endpoints only."""
    out = [
        Resource("Service", "v1", "/api/v1/services"),
        # v1 since Kubernetes 1.21; 1.20's controller-manager writes and serves v1beta1 only.
        Resource("EndpointSlice", "discovery.k8s.io/v1", "/apis/discovery.k8s.io/v1/endpointslices",
                 fallback_versions=("v1beta1",)),
        Resource("Node", "v1", "/api/v1/nodes", f"metadata.name={node_name}"),
    ]
    if watch_pods:
        out.append(Resource("Pod", "v1", "/api/v1/pods", f"spec.nodeName={node_name}"))
    if scale_states:
        out.append(Resource("Pod", "v1", "/api/v1/pods", label_selector=annotations.STATE, store=SCALE_STATE_PODS))
    return out


def load_configuration(kubeconfig: str = "", api_server: str = "") -> Any:
    """A client ``Configuration``: in-cluster config inside a pod, else a kubeconfig.

    Order: an explicit ``kubeconfig``; in-cluster (a service-account token is mounted and
    ``KUBERNETES_SERVICE_HOST`` or ``api_server`` says where the apiserver is); then
    ``$KUBECONFIG`` / ``~/.kube/config``. ``api_server`` replaces the server address in every
    case: a kube-proxy replacement cannot reach the in-cluster ``kubernetes`` Service VIP
    before it runs itself, so the DaemonSet names the apiserver explicitly.
    """
    from kubernetes import client, config
    from kubernetes.config import incluster_config

    cfg = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg, persist_config=False)
    elif os.path.exists(incluster_config.SERVICE_TOKEN_FILENAME) and (
        os.environ.get(incluster_config.SERVICE_HOST_ENV_NAME) or api_server
    ):
        environ = dict(os.environ)
        if api_server:
            url = urllib.parse.urlsplit(api_server)
            environ[incluster_config.SERVICE_HOST_ENV_NAME] = url.hostname or ""
            environ[incluster_config.SERVICE_PORT_ENV_NAME] = str(url.port or 443)
        incluster_config.InClusterConfigLoader(
            token_filename=incluster_config.SERVICE_TOKEN_FILENAME,
            cert_filename=incluster_config.SERVICE_CERT_FILENAME,
            environ=environ,
        ).load_and_set(cfg)
    else:
        # Read $KUBECONFIG now: the client library captures it once, at import time.
        path = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        config.load_kube_config(config_file=path, client_configuration=cfg, persist_config=False)
    if api_server:
        host = cfg.host = api_server.rstrip("/")
        hook = cfg.refresh_api_key_hook
        if hook is not None:
            # The kubeconfig loader's token refresh copies the file's server back on every
            # request; the explicit address must win each time.
            def refresh(c: Any, _hook: Callable[[Any], None] = hook) -> None:
                _hook(c)
                c.host = host

            cfg.refresh_api_key_hook = refresh
    return cfg


class Gone(Exception):
    """410: the resourceVersion we hold is older than what the apiserver still has."""


class WatchError(Exception):
    """The apiserver answered, but not with something we can continue from."""


class Backoff:
    """Capped exponential backoff with full jitter, reset by a success."""

    def __init__(self, initial: float = BACKOFF_INITIAL, cap: float = BACKOFF_CAP) -> None:
        self.initial = initial
        self.cap = cap
        self.failures = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.initial * (2 ** self.failures))
        self.failures += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0


@dataclass
class WatcherStats:
    """Counters a test or /metrics can read; written by the watcher thread only."""

    lists: int = 0
    relists_gone: int = 0  # lists caused by 410 Gone
    watches: int = 0
    events: int = 0
    bookmarks: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    resource_version: str = ""


class Watcher:
    """List + watch one resource in a thread; see the module docstring for the protocol."""

    def __init__(self, resource: Resource, configuration: Any, loop: asyncio.AbstractEventLoop,
                 on_list: OnList, on_event: OnEvent, on_status: OnStatus | None = None, *,
                 backoff: Backoff | None = None, watch_timeout: tuple[int, int] = WATCH_TIMEOUT_RANGE) -> None:
        from kubernetes import client

        self.resource = resource
        # What is listed and watched; API discovery may move both to a fallback version.
        self.api_version = resource.api_version
        self.path = resource.path
        self.api = client.ApiClient(configuration)  # own connection pool: one stuck watch stalls nothing else
        self.loop = loop
        self.on_list = on_list
        self.on_event = on_event
        self.on_status = on_status
        self.backoff = backoff or Backoff()
        self.watch_timeout = watch_timeout
        self.stats = WatcherStats()
        self._stop = threading.Event()
        self._response: Any = None
        self._thread = threading.Thread(target=self._run, name=f"watch-{resource.name}", daemon=True)
        self.warn_interval = WARN_INTERVAL
        self._last_path = resource.path  # of the request in flight, for the failure log
        self._failing_since: float | None = None  # monotonic start of the current run of failures
        self._failures = 0  # failed attempts in it
        self._last_warning = float("-inf")

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread: wakes a backoff sleep and unblocks a read by shutting the socket down."""
        self._stop.set()
        resp = self._response
        if resp is not None:
            try:
                resp.shutdown()
            except Exception:
                pass
        self._thread.join(timeout)
        self.api.close()

    # ---- the loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        rv = ""
        while not self._stop.is_set():
            try:
                if not rv:
                    rv = self._list()
                rv = self._watch(rv)
            except Gone as e:
                self.stats.relists_gone += 1
                log.warning("%s: watch from resourceVersion %s: 410 Gone (%s); relisting",
                            self.resource.name, rv, e)
                self._status("relist", str(e))
                rv = ""
            except Exception as e:
                if self._stop.is_set():
                    break
                what = "list" if not rv else "watch"
                reason = _reason(e)
                self.stats.errors[reason] = self.stats.errors.get(reason, 0) + 1
                delay = self.backoff.next()
                self._log_failure(what, e, delay)
                self._status(f"{what}_error", reason)
                self._stop.wait(delay)

    def _log_failure(self, what: str, e: BaseException, delay: float) -> None:
        """A warning when failures start and at most every ``warn_interval`` while they go on,
        so that an agent stuck on, say, a 403 or 404 keeps saying so; the rest at debug."""
        now = time.monotonic()
        self._failures += 1
        if self._failing_since is None:
            self._failing_since = now
            self._last_warning = now
            log.warning("%s: %s GET %s failed: %s; retrying with backoff (next in %.1fs, at most %.0fs); "
                        "the dataplane keeps its last state", self.resource.name, what, self._last_path,
                        _short(e), delay, self.backoff.cap)
        elif now - self._last_warning >= self.warn_interval:
            self._last_warning = now
            log.warning("%s: %s GET %s still failing (%d attempts over %.0fs): %s; next try in %.1fs",
                        self.resource.name, what, self._last_path, self._failures, now - self._failing_since,
                        _short(e), delay)
        else:
            log.debug("%s: %s GET %s failed again: %s; next try in %.1fs", self.resource.name, what,
                      self._last_path, _short(e), delay)

    def _recovered(self) -> None:
        self.backoff.reset()
        if self._failing_since is not None:
            log.info("%s: GET %s works again, after %d failed attempts over %.0fs", self.resource.name,
                     self._last_path, self._failures, time.monotonic() - self._failing_since)
            self._failing_since = None
            self._failures = 0

    def _request(self, query: list[tuple[str, str]], read_timeout: float, path: str = "") -> Any:
        if not path:
            path = self.path
            if self.resource.field_selector:
                query.append(("fieldSelector", self.resource.field_selector))
            if self.resource.label_selector:
                query.append(("labelSelector", self.resource.label_selector))
        self._last_path = path
        return self.api.call_api(
            path, "GET", query_params=query,
            header_params={"Accept": "application/json"}, auth_settings=["BearerToken"],
            _preload_content=False, _return_http_data_only=True,
            _request_timeout=(CONNECT_TIMEOUT, read_timeout),
        )

    def _list(self) -> str:
        """A complete, paged list; returns its resourceVersion after handing the objects over."""
        from kubernetes.client import ApiException

        if self.resource.fallback_versions:
            self._discover()
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            query = [("limit", str(LIST_PAGE_SIZE))]
            if token:
                query.append(("continue", token))
            try:
                resp = self._request(query, 60.0)
            except ApiException as e:
                if e.status == 410 and token:
                    # The continue token expired mid-list: start over, it is not a watch 410.
                    items, token = [], ""
                    continue
                raise
            try:
                body = json.loads(resp.data)
            finally:
                resp.release_conn()
            for obj in body.get("items") or []:
                # List items come without kind/apiVersion; the translation needs kind.
                obj.setdefault("kind", self.resource.kind)
                obj.setdefault("apiVersion", self.api_version)
                _trim(obj)
                items.append(obj)
            meta = body.get("metadata") or {}
            token = meta.get("continue") or ""
            if not token:
                rv = str(meta.get("resourceVersion") or "")
                break
        if not rv:
            raise WatchError("list response has no resourceVersion")
        self.stats.lists += 1
        self.stats.resource_version = rv
        log.info("%s: listed %d at resourceVersion %s", self.resource.name, len(items), rv)
        self._deliver(self.on_list, self.resource.name, items, time.time())
        self._recovered()
        return rv

    def _discover(self) -> None:
        """Pick the newest version of the resource's group that the server serves (API
        discovery, ``GET /apis/<group>``) and list and watch that one from now on."""
        group, _, preferred = self.resource.api_version.rpartition("/")
        resp = self._request([], 30.0, path=f"/apis/{group}")
        try:
            body = json.loads(resp.data)
        finally:
            resp.release_conn()
        served = [str(v.get("version")) for v in body.get("versions") or [] if isinstance(v, dict)]
        wanted = (preferred, *self.resource.fallback_versions)
        version = next((v for v in wanted if v in served), None)
        if version is None:
            raise WatchError(f"API group {group} serves {', '.join(served) or 'no version'}; "
                             f"{self.resource.kind} needs one of {', '.join(wanted)}")
        api_version, path = self.resource.at_version(version)
        if api_version != self.api_version or not self.stats.lists:
            log.info("%s: using %s (the server serves %s of %s)", self.resource.name, api_version,
                     ", ".join(served), group)
        self.api_version, self.path = api_version, path

    def _watch(self, rv: str) -> str:
        """Watch until the server ends the stream; returns the resourceVersion to resume from."""
        timeout = random.randint(*self.watch_timeout)
        query = [("watch", "true"), ("resourceVersion", rv), ("allowWatchBookmarks", "true"),
                 ("timeoutSeconds", str(timeout))]
        from kubernetes.client import ApiException

        try:
            resp = self._request(query, timeout + READ_SLACK)
        except ApiException as e:
            if e.status == 410:
                raise Gone(f"HTTP 410: {_status_message(e.body)}") from None
            raise
        self._response = resp
        self.stats.watches += 1
        started = time.monotonic()
        got_any = False
        try:
            for line in _lines(resp):
                if self._stop.is_set():
                    break
                event = json.loads(line)
                kind = event.get("type")
                obj = event.get("object") or {}
                if kind == "ERROR":
                    code = obj.get("code")
                    if code == 410:
                        raise Gone(obj.get("message") or "too old resource version")
                    raise WatchError(f"watch error {code}: {obj.get('message')}")
                new_rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
                if kind == "BOOKMARK":
                    self.stats.bookmarks += 1
                elif kind in ("ADDED", "MODIFIED", "DELETED"):
                    obj.setdefault("kind", self.resource.kind)
                    obj.setdefault("apiVersion", self.api_version)
                    _trim(obj)
                    self.stats.events += 1
                    self._deliver(self.on_event, self.resource.name, kind, obj, time.time())
                else:
                    log.warning("%s: unknown watch event type %r ignored", self.resource.name, kind)
                    continue
                if new_rv:
                    rv = new_rv
                    self.stats.resource_version = rv
                if not got_any:
                    got_any = True
                    self._recovered()
        finally:
            self._response = None
            resp.release_conn()
        if not got_any and time.monotonic() - started < 1.0 and not self._stop.is_set():
            # A stream that ends at once without a byte is a server going away (or refusing to
            # serve us), not a watch timeout: back off instead of spinning.
            raise WatchError("watch stream closed immediately")
        if got_any or time.monotonic() - started >= 1.0:
            self._recovered()
        return rv

    def _deliver(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the agent is going away
            self._stop.set()

    def _status(self, what: str, detail: str) -> None:
        if self.on_status is not None:
            self._deliver(self.on_status, self.resource.name, what, detail)


class KubeSource:
    """All watchers of the agent, started and stopped together."""

    def __init__(self, configuration: Any, resources: list[Resource], on_list: OnList, on_event: OnEvent,
                 on_status: OnStatus | None = None, *, backoff_cap: float = BACKOFF_CAP) -> None:
        self.configuration = configuration
        self.resources = resources
        self.on_list = on_list
        self.on_event = on_event
        self.on_status = on_status
        self.backoff_cap = backoff_cap
        self.watchers: dict[str, Watcher] = {}
        self._stopped = asyncio.Event()

    async def run(self) -> None:
        """Start the watcher threads and wait for :meth:`stop` (the FileSource interface)."""
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        for res in self.resources:
            w = Watcher(res, self.configuration, loop, self.on_list, self.on_event, self.on_status,
                        backoff=Backoff(cap=self.backoff_cap))
            self.watchers[res.name] = w
            w.start()
        try:
            await self._stopped.wait()
        finally:
            await asyncio.gather(*(asyncio.to_thread(w.stop) for w in self.watchers.values()))

    def stop(self) -> None:
        self._stopped.set()


# ---- publishing scale-to-zero state ---------------------------------------------------------------

@dataclass(frozen=True)
class PodEvent:
    """One Kubernetes Event to report on a pod (reason like ``Checkpointed``, ``RestoreFailed``)."""

    reason: str
    message: str
    type: str = "Normal"  # or "Warning"


class PodStatePublisher:
    """Writes this node's scale-to-zero pods' state to the apiserver from a thread of its own.

    ``publish`` is called on the agent's loop and never blocks: it records the wanted label
    value (only the latest per pod matters; intermediate ones are skipped) and queues the Event.
    The thread patches the label (a JSON merge patch, ``null`` removes it when the scaler lets
    the pod go) and then creates the Event with the pod's uid from the patch's answer. A failed
    write is retried with backoff and does not stop the others; a pod that is gone (404) is
    dropped. Counters are for tests and logs.
    """

    def __init__(self, configuration: Any, node_name: str, *, component: str = "zeroproxy",
                 backoff_cap: float = BACKOFF_CAP) -> None:
        from kubernetes import client

        self.api = client.ApiClient(configuration)
        self.node_name = node_name
        self.component = component
        self.backoff = Backoff(cap=backoff_cap)
        self.labels_written = 0
        self.events_written = 0
        self.errors = 0
        self._labels: dict[tuple[str, str], str | None] = {}  # pod -> wanted label value (None: remove)
        self._events: list[tuple[tuple[str, str], PodEvent, float]] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="publish-pod-state", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def publish(self, namespace: str, name: str, state: str | None, event: PodEvent | None = None) -> None:
        """Set the pod's state label (None: remove it) and report ``event`` after the label."""
        with self._cond:
            self._labels[(namespace, name)] = state
            if event is not None:
                self._events.append(((namespace, name), event, time.time()))
            self._cond.notify()

    def idle(self) -> bool:
        """Nothing waiting to be written (tests wait for this)."""
        with self._cond:
            return not self._labels and not self._events

    def stop(self, timeout: float = 5.0) -> None:
        """Finish what is queued (within ``timeout``) and end the thread."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.api.close()

    def _run(self) -> None:
        uids: dict[tuple[str, str], str] = {}
        while True:
            with self._cond:
                while not self._labels and not self._events and not self._stop:
                    self._cond.wait()
                if self._stop and not self._labels and not self._events:
                    return
                labels, self._labels = self._labels, {}
                events, self._events = self._events, []
            failed_labels: dict[tuple[str, str], str | None] = {}
            failed_events = []
            for pod, state in labels.items():
                try:
                    uid = self._patch_label(pod, state)
                    if uid:
                        uids[pod] = uid
                    self.labels_written += 1
                except _PodGone:
                    uids.pop(pod, None)
                except Exception as e:
                    self.errors += 1
                    log.warning("pod %s/%s: setting label %s=%s failed: %s; will retry", pod[0], pod[1],
                                annotations.STATE, state, _short(e))
                    failed_labels[pod] = state
            for item in events:
                pod, event, when = item
                if pod in failed_labels:
                    failed_events.append(item)  # keep the order: label first, then its event
                    continue
                try:
                    self._create_event(pod, event, when, uids.get(pod, ""))
                    self.events_written += 1
                except _PodGone:
                    pass
                except Exception as e:
                    self.errors += 1
                    log.warning("pod %s/%s: event %s failed: %s; will retry", pod[0], pod[1], event.reason, _short(e))
                    failed_events.append(item)
            if not failed_labels and not failed_events:
                self.backoff.reset()
                continue
            with self._cond:
                for pod, state in failed_labels.items():
                    self._labels.setdefault(pod, state)  # a newer wish recorded meanwhile wins
                self._events[:0] = failed_events
                if self._stop:
                    return  # shutting down with the apiserver unreachable: give up
                self._cond.wait(self.backoff.next())

    def _call(self, method: str, path: str, body: Any, content_type: str = "application/json") -> dict[str, Any]:
        from kubernetes.client import ApiException

        try:
            resp = self.api.call_api(
                path, method, body=body,
                header_params={"Accept": "application/json", "Content-Type": content_type},
                auth_settings=["BearerToken"], _preload_content=False, _return_http_data_only=True,
                _request_timeout=(CONNECT_TIMEOUT, 30.0))
        except ApiException as e:
            if e.status == 404:
                raise _PodGone() from None
            raise
        try:
            return dict(json.loads(resp.data))
        finally:
            resp.release_conn()

    def _patch_label(self, pod: tuple[str, str], state: str | None) -> str:
        ns, name = pod
        body = {"metadata": {"labels": {annotations.STATE: state}}}
        out = self._call("PATCH", f"/api/v1/namespaces/{ns}/pods/{name}", body, "application/merge-patch+json")
        log.info("pod %s/%s: label %s=%s", ns, name, annotations.STATE, state if state is not None else "(removed)")
        return str((out.get("metadata") or {}).get("uid") or "")

    def _create_event(self, pod: tuple[str, str], event: PodEvent, when: float, uid: str) -> None:
        ns, name = pod
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
        ref = {"apiVersion": "v1", "kind": "Pod", "namespace": ns, "name": name}
        if uid:
            ref["uid"] = uid
        body = {
            "apiVersion": "v1", "kind": "Event",
            # kubelet's naming: <object>.<unique suffix>
            "metadata": {"name": f"{name}.{uuid.uuid4().hex[:16]}", "namespace": ns},
            "involvedObject": ref, "reason": event.reason, "message": event.message, "type": event.type,
            "source": {"component": self.component, "host": self.node_name},
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        }
        self._call("POST", f"/api/v1/namespaces/{ns}/events", body)


class _PodGone(Exception):
    """404: the pod (or its namespace) no longer exists; nothing to publish for it."""


# ---- helpers ------------------------------------------------------------------------------------

def _lines(resp: Any) -> Iterator[bytes]:
    """Split a chunked watch body into its newline-terminated JSON documents."""
    pending = b""
    for chunk in resp.stream(amt=65536, decode_content=True):
        pending += chunk
        while True:
            end = pending.find(b"\n")
            if end < 0:
                break
            line, pending = pending[:end], pending[end + 1:]
            if line.strip():
                yield line
    if pending.strip():
        yield pending


def _trim(obj: dict[str, Any]) -> None:
    """Drop managedFields: the largest part of most objects and of no use to a proxy."""
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        meta.pop("managedFields", None)


def _status_message(body: Any) -> str:
    try:
        return str(json.loads(body).get("message"))
    except (TypeError, ValueError, AttributeError):
        return str(body)[:200]


def _reason(e: BaseException) -> str:
    """A small fixed vocabulary for metrics labels: never an unbounded error text."""
    from kubernetes.client import ApiException

    if isinstance(e, ApiException):
        return f"http_{e.status}" if e.status else "tls"  # the client reports TLS failures as status 0
    if isinstance(e, WatchError):
        return "protocol"
    if isinstance(e, json.JSONDecodeError):
        return "decode"
    name = type(e).__name__
    if "Timeout" in name:
        return "timeout"
    if "SSL" in name:
        return "tls"
    return "connection"


def _short(e: BaseException) -> str:
    from kubernetes.client import ApiException

    if isinstance(e, ApiException):
        return f"HTTP {e.status}: {_status_message(e.body)}"
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}"
