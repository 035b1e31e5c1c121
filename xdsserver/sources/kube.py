"""Kubernetes API source: list + watch the kinds the model needs into an informer-style cache.

This is the only module that imports ``kubernetes``. It keeps, per kind, the raw objects exactly
as the API serves them (JSON dicts, camelCase) and hands them out as :class:`SourceObject` values,
so the API path and the manifest path share one model builder.

Protocol, per kind (the client-go reflector's rules):

* **list** (paged, ``limit``/``continue``) and remember the list's ``resourceVersion``;
* **watch** from it with ``allowWatchBookmarks=true`` and a server-side ``timeoutSeconds``; every
  event, BOOKMARK included, advances the remembered resourceVersion;
* a watch that ends or breaks is re-opened **from the last resourceVersion** (bounded exponential
  backoff after errors), so nothing is lost and nothing is replayed twice;
* ``410 Gone`` -- as an HTTP status or, as the real server does, an ``ERROR`` event carrying a
  ``Status`` with ``code: 410`` inside a 200 stream -- means the history we need was compacted:
  **relist** and diff the result against the cache, so an object deleted in the gap is removed;
* a client-side deadline slightly past ``timeoutSeconds`` recycles a connection gone silent.

Why raw calls instead of ``kubernetes.aio.watch.Watch``: the helper deserialises every event into
typed models (we want the API's own JSON), silently re-watches once on 410 from the *same*
resourceVersion when no timeout is given, and hides the HTTP status. The generated
``*_without_preload_content`` list methods still give us the real client's URL building,
authentication and TLS; we only read the body ourselves.

Malformed objects: each ADDED/MODIFIED object (and each listed item) is checked with
``validate_object``. A bad one is logged (kind, namespace, name, field) and skipped; **if an
earlier good version of the same object is cached, that version is kept** ("bad input changes
nothing"), until the object is deleted or a good version arrives. DELETED events are applied
without validation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes.aio import client as kclient
from kubernetes.aio import config as kconfig

from xdsserver.sources import SourceObject

log = logging.getLogger(__name__)

Validator = Callable[[SourceObject], Sequence[Any]]
OnChange = Callable[[], Awaitable[None] | None]

EVENT_TYPES = ("ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR")


@dataclass(frozen=True, slots=True)
class KindSpec:
    """One watched kind and the generated client method that lists/watches it cluster-wide."""

    kind: str
    api_version: str
    api_class: str  # name in kubernetes.aio.client, e.g. "CoreV1Api"
    list_method: str  # generated method name, without the "_without_preload_content" suffix
    namespaced: bool
    args: tuple[str, ...] = ()  # leading positional arguments (custom objects: group, version, plural)
    # custom objects: older versions to watch when the API does not serve this one (404)
    fallback_versions: tuple[str, ...] = ()
    field_selector: str = ""  # e.g. "spec.nodeName=NODE" (the node agent); sent with every list and watch

    def fallback(self) -> KindSpec:
        """The same kind at its next older version (custom objects only)."""
        group, _, plural = self.args
        version, *rest = self.fallback_versions
        return dataclasses.replace(self, api_version=f"{group}/{version}", args=(group, version, plural), fallback_versions=tuple(rest))


POD = KindSpec("Pod", "v1", "CoreV1Api", "list_pod_for_all_namespaces", True)
SERVICE = KindSpec("Service", "v1", "CoreV1Api", "list_service_for_all_namespaces", True)
ENDPOINT_SLICE = KindSpec(
    "EndpointSlice", "discovery.k8s.io/v1", "DiscoveryV1Api",
    "list_endpoint_slice_for_all_namespaces", True,
)
NAMESPACE = KindSpec("Namespace", "v1", "CoreV1Api", "list_namespace", False)
SERVICE_ACCOUNT = KindSpec(
    "ServiceAccount", "v1", "CoreV1Api", "list_service_account_for_all_namespaces", True
)
NODE = KindSpec("Node", "v1", "CoreV1Api", "list_node", False)

# Istio's security kinds (CRDs: the chart's crds/ or an Istio installation): v1, or v1beta1 on
# clusters whose Istio CRDs predate v1 (Istio < 1.22)
AUTHORIZATION_POLICY = KindSpec("AuthorizationPolicy", "security.istio.io/v1", "CustomObjectsApi", "list_cluster_custom_object", True,
                                ("security.istio.io", "v1", "authorizationpolicies"), ("v1beta1",))
PEER_AUTHENTICATION = KindSpec("PeerAuthentication", "security.istio.io/v1", "CustomObjectsApi", "list_cluster_custom_object", True,
                               ("security.istio.io", "v1", "peerauthentications"), ("v1beta1",))

DEFAULT_KINDS: tuple[KindSpec, ...] = (POD, SERVICE, ENDPOINT_SLICE, NAMESPACE, SERVICE_ACCOUNT, NODE,
                                       AUTHORIZATION_POLICY, PEER_AUTHENTICATION)

# Errors after which we retry (list) or re-watch; anything else is a bug and propagates.
_RETRYABLE = (aiohttp.ClientError, OSError, TimeoutError, ValueError, kclient.ApiException)


class ApiStatusError(Exception):
    """The API answered with a non-success ``Status`` (HTTP error or watch ERROR event)."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code, self.reason, self.message = code, reason, message

    @classmethod
    def from_status(cls, status: Any, http_status: int | None = None) -> ApiStatusError:
        st = status if isinstance(status, dict) else {}
        code = st.get("code", http_status)
        return cls(
            int(code) if isinstance(code, int) else (http_status or 0),
            str(st.get("reason", "")),
            str(st.get("message", status if not st else "")),
        )


class GoneError(ApiStatusError):
    """410: the resourceVersion (or continue token) is older than the server's history."""


def _status_error(status: Any, http_status: int | None = None) -> ApiStatusError:
    err = ApiStatusError.from_status(status, http_status)
    if err.code == 410:
        return GoneError(err.code, err.reason, err.message)
    return err


class _Backoff:
    """Bounded exponential backoff: initial, doubled per failure, capped at maximum."""

    def __init__(self, initial: float, maximum: float) -> None:
        self._initial, self._max = initial, maximum
        self._next = initial

    def reset(self) -> None:
        self._next = self._initial

    async def wait(self) -> None:
        delay, self._next = self._next, min(self._max, self._next * 2)
        await asyncio.sleep(delay)


def _origin(kind: str, namespace: str, name: str) -> str:
    """``kubernetes:<Kind>/<ns>/<name>``; cluster-scoped objects have no ``<ns>/`` part."""
    return f"kubernetes:{kind}/{namespace}/{name}" if namespace else f"kubernetes:{kind}/{name}"


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


async def _lines(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """Newline-delimited records of a watch body, without aiohttp's readline size limit."""
    buf = b""
    async for chunk in content.iter_any():
        buf += chunk
        while (i := buf.find(b"\n")) >= 0:
            line, buf = buf[:i], buf[i + 1:]
            if line.strip():
                yield line
    if buf.strip():
        # A body that ends mid-record was cut off: report it like a dropped connection.
        raise aiohttp.ClientPayloadError("watch stream ended inside a record")


def _default_validator() -> Validator:
    # Imported lazily: objects.py is the shared validator and must not be needed to import us.
    from xdsserver.sources.objects import validate_object

    return validate_object


class KubeSource:
    """Informer-style cache of the API objects the model is built from.

    ``on_change`` is called once when every kind has been listed (``synced`` is then set) and
    afterwards whenever events changed the cache; calls are coalesced -- while one runs, any
    number of further changes produce at most one more call.
    """

    def __init__(
        self,
        api: kclient.ApiClient,
        *,
        on_change: OnChange,
        validate: Validator | None = None,
        kinds: Iterable[KindSpec] = DEFAULT_KINDS,
        watch_timeout_s: float = 300,
        backoff: tuple[float, float] = (0.1, 5.0),
        page_size: int = 500,
        list_timeout_s: float = 60.0,
    ) -> None:
        self._api = api
        self._on_change = on_change
        self._validate = validate if validate is not None else _default_validator()
        self._kinds = tuple(kinds)
        if len({k.kind for k in self._kinds}) != len(self._kinds):
            raise ValueError("each kind may be watched once")
        self._watch_timeout = max(1, int(watch_timeout_s))
        # The server ends a watch at timeoutSeconds; past this deadline the connection is silent.
        self._watch_deadline = self._watch_timeout + max(1.0, 0.1 * self._watch_timeout)
        self._backoff = backoff
        self._page_size = page_size
        self._list_timeout = float(list_timeout_s)
        self._cache: dict[str, dict[tuple[str, str], SourceObject]] = {k.kind: {} for k in self._kinds}
        self._rv: dict[str, str] = {}
        self._listed: set[str] = set()
        self._dirty = asyncio.Event()
        self.synced = asyncio.Event()
        self.stats: dict[str, Any] = {
            "lists": 0,  # completed list operations (all pages), initial ones included
            "relists": 0,  # lists caused by 410 Gone
            "relist_deletes": 0,  # objects removed because a relist no longer had them
            "watch_starts": 0,
            "watch_restarts": 0,  # watches opened after the first one of a kind
            "watch_errors": 0,  # watches that ended with an error (not a clean end)
            "list_errors": 0,
            "events": {t: 0 for t in EVENT_TYPES},
            "skipped_malformed": 0,
            "resource_versions": self._rv,
        }

    # ---- public -------------------------------------------------------------------------

    def objects(self) -> list[SourceObject]:
        """Current cache, ordered by kind, namespace, name. Callers must not mutate the dicts."""
        out: list[SourceObject] = []
        for kind in sorted(self._cache):
            objs = self._cache[kind]
            out.extend(objs[k] for k in sorted(objs))
        return out

    async def run(self) -> None:
        """List every kind, set :attr:`synced`, then keep watching until cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._notifier(), name="kube-source-notify")
            for spec in self._kinds:
                tg.create_task(self._run_kind(spec), name=f"kube-source-{spec.kind}")

    # ---- per-kind loop ------------------------------------------------------------------

    def _list_fn(self, spec: KindSpec) -> Callable[..., Awaitable[aiohttp.ClientResponse]]:
        fn = getattr(getattr(kclient, spec.api_class)(self._api), f"{spec.list_method}_without_preload_content")
        if spec.args:
            fn = functools.partial(fn, *spec.args)
        if spec.field_selector:
            fn = functools.partial(fn, field_selector=spec.field_selector)
        return fn

    async def _run_kind(self, spec: KindSpec) -> None:
        fn = self._list_fn(spec)
        backoff = _Backoff(*self._backoff)
        need_list, watched = True, False
        while True:
            if need_list:
                try:
                    await self._relist(spec, fn)
                except _RETRYABLE + (ApiStatusError,) as e:
                    if isinstance(e, ApiStatusError) and e.code == 404 and spec.fallback_versions and not watched:
                        older = spec.fallback()  # e.g. Istio < 1.22 serves security.istio.io only at v1beta1
                        log.info("kubernetes: %s is not served (%s); watching %s", spec.api_version, e, older.api_version)
                        self.stats.setdefault("api_versions", {})[spec.kind] = older.api_version
                        spec, fn = older, self._list_fn(older)
                        continue
                    self.stats["list_errors"] += 1
                    log.warning("kubernetes: listing %s failed: %s; retrying", spec.kind, _describe(e))
                    await backoff.wait()
                    continue
                need_list = False
                backoff.reset()
                self._mark_listed(spec.kind)
            if watched:
                self.stats["watch_restarts"] += 1
            watched = True
            self.stats["watch_starts"] += 1
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                events = await self._watch(spec, fn)
            except GoneError as e:
                self.stats["relists"] += 1
                log.info("kubernetes: %s watch from resourceVersion %s expired (%s); relisting",
                         spec.kind, self._rv.get(spec.kind), e)
                need_list = True
                continue
            except _RETRYABLE + (ApiStatusError,) as e:
                self.stats["watch_errors"] += 1
                log.warning("kubernetes: %s watch failed: %s; re-watching from resourceVersion %s",
                            spec.kind, _describe(e), self._rv.get(spec.kind))
                await backoff.wait()
                continue
            # Clean end (timeoutSeconds reached, or the server closed the stream). Re-watch at
            # once unless the server keeps closing immediately without telling us anything.
            if events or loop.time() - started >= 1.0:
                backoff.reset()
            else:
                await backoff.wait()

    async def _relist(self, spec: KindSpec, fn: Callable[..., Awaitable[aiohttp.ClientResponse]]) -> None:
        """List all pages, then make the cache for this kind equal to the list (a diff)."""
        items: list[Any] = []
        cont: str | None = None
        rv = ""
        for _page in range(100_000):  # bounded; 100k pages of 500 is far beyond any cluster
            resp = await fn(limit=self._page_size, _continue=cont, _request_timeout=self._list_timeout)
            try:
                body = await _read_json(resp)
            finally:
                resp.release()
            meta = _meta(body)
            page = body.get("items")
            items.extend(page if isinstance(page, list) else [])
            cont = meta.get("continue") or None
            rv = str(meta.get("resourceVersion") or "")
            if not cont:
                break
        else:
            raise ApiStatusError(0, "TooManyPages", f"{spec.kind} list did not finish")
        cache = self._cache[spec.kind]
        seen: set[tuple[str, str]] = set()
        changed = False
        for item in items:
            key, item_changed = self._apply_upsert(spec, item)
            if key is not None:
                seen.add(key)
            changed |= item_changed
        for key in sorted(set(cache) - seen):
            del cache[key]
            self.stats["relist_deletes"] += 1
            changed = True
            log.info("kubernetes: %s %s is gone after relist", spec.kind, "/".join(filter(None, key)))
        self._set_rv(spec.kind, rv)
        self.stats["lists"] += 1
        if changed:
            self._notify()

    async def _watch(self, spec: KindSpec, fn: Callable[..., Awaitable[aiohttp.ClientResponse]]) -> int:
        """One watch request from the remembered resourceVersion; returns the events seen."""
        count = 0
        async with asyncio.timeout(self._watch_deadline):
            resp = await fn(
                watch=True,
                resource_version=self._rv.get(spec.kind) or None,
                allow_watch_bookmarks=True,
                timeout_seconds=self._watch_timeout,
                _request_timeout=float(self._watch_deadline + 1),
            )
            try:
                if resp.status != 200:
                    raise _status_error(await _read_status(resp), resp.status)
                async for line in _lines(resp.content):
                    count += 1
                    self._handle_event(spec, json.loads(line))
            finally:
                resp.close()  # never hand a half-read stream back to the pool
        return count

    def _handle_event(self, spec: KindSpec, event: Any) -> None:
        if not isinstance(event, dict):
            raise ValueError(f"watch event is not an object: {event!r:.200}")
        typ, obj = event.get("type"), event.get("object")
        if typ in self.stats["events"]:
            self.stats["events"][typ] += 1
        if typ == "ERROR":
            raise _status_error(obj)
        if not isinstance(obj, dict):
            log.warning("kubernetes: %s %s event without an object; ignored", spec.kind, typ)
            return
        rv = _meta(obj).get("resourceVersion")
        changed = False
        if typ in ("ADDED", "MODIFIED"):
            _key, changed = self._apply_upsert(spec, obj)
        elif typ == "DELETED":
            changed = self._apply_delete(spec, obj)
        elif typ != "BOOKMARK":
            log.warning("kubernetes: %s watch sent unknown event type %r; ignored", spec.kind, typ)
            return
        if isinstance(rv, str) and rv:
            self._set_rv(spec.kind, rv)
        if changed:
            self._notify()

    # ---- cache --------------------------------------------------------------------------

    def _apply_upsert(self, spec: KindSpec, obj: Any) -> tuple[tuple[str, str] | None, bool]:
        """Validate and store one object: (its key if it is cached afterwards, whether the
        cache changed). A malformed object leaves the cache as it was."""
        if not isinstance(obj, dict):
            self._skip(spec, None, "", "", [f"object is a {type(obj).__name__}, not a mapping"])
            return None, False
        if "kind" not in obj or "apiVersion" not in obj:
            # List items carry no kind/apiVersion; put them back so the dict is self-describing.
            obj = {"apiVersion": spec.api_version, "kind": spec.kind, **obj}
        meta = _meta(obj)
        name, ns = meta.get("name"), meta.get("namespace") or ""
        if not isinstance(name, str) or not name or not isinstance(ns, str):
            self._skip(spec, None, str(ns), str(name), ["field metadata.name: missing or not a string"])
            return None, False
        if spec.namespaced and not ns:
            self._skip(spec, None, ns, name, ["field metadata.namespace: required for a namespaced kind"])
            return None, False
        key = (ns, name) if spec.namespaced else ("", name)
        so = SourceObject(origin=_origin(spec.kind, key[0], name), obj=obj)
        try:
            errors = list(self._validate(so))
        except Exception as e:  # a validator crash on odd input is still "malformed", not fatal
            errors = [f"validator failed: {e!r}"]
        cache = self._cache[spec.kind]
        if errors:
            self._skip(spec, cache.get(key), key[0], name, errors)
            return (key if key in cache else None), False
        old = cache.get(key)
        if old is not None and old.obj == obj:
            return key, False
        cache[key] = so
        return key, True

    def _apply_delete(self, spec: KindSpec, obj: dict[str, Any]) -> bool:
        meta = _meta(obj)
        ns = (meta.get("namespace") or "") if spec.namespaced else ""
        return self._cache[spec.kind].pop((str(ns), str(meta.get("name"))), None) is not None

    def _skip(self, spec: KindSpec, kept: SourceObject | None, ns: str, name: str, errors: list[Any]) -> None:
        self.stats["skipped_malformed"] += 1
        where = f"{spec.kind} {ns}/{name}" if ns else f"{spec.kind} {name}"
        kept_note = (
            f"; keeping the previous version (resourceVersion {_meta(kept.obj).get('resourceVersion')})"
            if kept is not None else ""
        )
        for err in errors:
            field = getattr(err, "field", None)
            message = getattr(err, "message", None) or str(err)
            detail = f"field {field}: {message}" if field else message
            log.warning("kubernetes: skipping malformed %s: %s%s", where, detail, kept_note)

    def _set_rv(self, kind: str, rv: str) -> None:
        if rv:
            self._rv[kind] = rv

    # ---- sync and notification ----------------------------------------------------------

    def _mark_listed(self, kind: str) -> None:
        if kind in self._listed:
            return
        self._listed.add(kind)
        if len(self._listed) == len(self._kinds):
            log.info("kubernetes: initial list of %d kinds complete", len(self._kinds))
            self.synced.set()
            self._dirty.set()

    def _notify(self) -> None:
        if self.synced.is_set():
            self._dirty.set()

    async def _notifier(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                result = self._on_change()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("kubernetes: on_change callback failed")


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


async def _read_json(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    if resp.status != 200:
        raise _status_error(await _read_status(resp), resp.status)
    body = json.loads(await resp.read())
    if not isinstance(body, dict):
        raise ValueError("list response is not a JSON object")
    return body


async def _read_status(resp: aiohttp.ClientResponse) -> Any:
    raw = await resp.read()
    try:
        return json.loads(raw)
    except ValueError:
        return {"code": resp.status, "reason": resp.reason or "", "message": raw[:200].decode(errors="replace")}


async def api_client_from_env(kubeconfig: str | None = None) -> kclient.ApiClient:
    """An ApiClient for the cluster we run in (in-cluster service account), else a kubeconfig.

    An explicit ``kubeconfig`` path wins; otherwise the in-cluster config is tried first and the
    default kubeconfig (``$KUBECONFIG`` or ``~/.kube/config``) is the fallback.
    """
    cfg = kclient.Configuration()
    if kubeconfig is None:
        try:
            kconfig.load_incluster_config(client_configuration=cfg)
            return kclient.ApiClient(configuration=cfg)
        except kconfig.ConfigException as e:
            log.info("kubernetes: not in a cluster (%s); using kubeconfig", e)
            kubeconfig = os.environ.get("KUBECONFIG") or None
    await kconfig.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    return kclient.ApiClient(configuration=cfg)


async def annotate_pods(api: kclient.ApiClient, namespace: str, selector: str, annotations: dict[str, str]) -> list[tuple[str, str]]:
    """Merge ``annotations`` into every pod matching ``selector``; returns (name, node) of each.
    The node agent's uninstall hook (``xdsserver node-agent-uninstall``) is the only writer."""
    core = kclient.CoreV1Api(api)
    pods = (await core.list_namespaced_pod(namespace, label_selector=selector)).items
    for p in pods:
        await core.patch_namespaced_pod(p.metadata.name, namespace, {"metadata": {"annotations": annotations}},
                                        _content_type="application/merge-patch+json")
    return [(p.metadata.name, p.spec.node_name or "") for p in pods]


async def ready_pods(api: kclient.ApiClient, namespace: str, selector: str) -> list[str]:
    """Names of the pods matching ``selector`` whose Ready condition is True, sorted."""
    pods = (await kclient.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=selector)).items
    return sorted(p.metadata.name for p in pods
                  if any(c.type == "Ready" and c.status == "True" for c in ((p.status.conditions if p.status else None) or [])))
