"""A protocol-level STAND-IN for the Kubernetes API server, for tests.

No real Kubernetes API server can be run here, so this aiohttp app on 127.0.0.1 serves the
slice of the real HTTP API that xdsserver uses, closely enough that the official ``kubernetes``
client drives it unmodified (through a kubeconfig this module writes):

* list/watch, cluster-wide and namespaced, for Pods, Services, ServiceAccounts, Namespaces,
  Nodes (``/api/v1/...``) and EndpointSlices (``/apis/discovery.k8s.io/v1/...``):
  ``*List`` bodies with ``metadata.resourceVersion``, items without ``kind``/``apiVersion`` (as the
  real server sends them), ``limit``/``continue`` paging over a consistent snapshot;
* ``?watch=true&resourceVersion=N&allowWatchBookmarks=true&timeoutSeconds=T``: newline-delimited
  JSON events with chunked transfer encoding, replayed from history after ``N`` and then live;
  ``resourceVersion`` unset or ``"0"`` starts with synthetic ADDED events for current objects;
* one global, monotonically increasing resourceVersion; a compaction point below which a watch
  gets ``410 Gone`` -- by default as the real server does it (an ``ERROR`` event carrying a
  ``Status`` with ``code: 410, reason: Expired`` inside a 200 stream), or as an HTTP 410 with a
  ``Status`` body (``gone_as="http"``);
* ``POST /apis/authentication.k8s.io/v1/tokenreviews`` answering for tokens a test registers,
  with the ``authentication.kubernetes.io/pod-name``/``pod-uid``/``node-name``/``node-uid`` extras
  that bound service-account tokens carry;
* optional bearer-token authentication of every request (401 ``Status`` otherwise).

Test controls (all synchronous, so a test can make several changes with no event-loop switch in
between): :meth:`create`, :meth:`update`, :meth:`apply`, :meth:`delete`, :meth:`inject_malformed`,
:meth:`drop_watches`, :meth:`compact`, :meth:`send_bookmark`, :meth:`register_token`; every request
is recorded in :attr:`requests`.

``PATCH .../{name}`` with a JSON merge patch (``application/merge-patch+json``, how the
uninstall hook annotates pods) and ``labelSelector`` equality terms on list are served too.
``fieldSelector`` is modelled for equality terms (``spec.nodeName=NODE``, comma-separated, as the
node agent sends it) on list and watch; an object moving out of the selection is not turned into
a DELETED event (a pod's nodeName never changes).

Not modelled: admission/validation (objects are stored as given), label selectors, ``!=`` field terms,
resourceVersionMatch, sendInitialEvents, periodic bookmarks, namespace existence checks.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aiohttp import web


@dataclass(frozen=True, slots=True)
class Resource:
    kind: str
    api_version: str  # the storage version: objects are kept (and by default served) in it
    plural: str
    namespaced: bool
    also_served: tuple[str, ...] = ()  # further versions of a CRD, converted by apiVersion only

    @property
    def prefix(self) -> str:
        return api_prefix(self.api_version)


def api_prefix(api_version: str) -> str:
    return "/api/v1" if api_version == "v1" else f"/apis/{api_version}"


RESOURCES: dict[str, Resource] = {
    r.kind: r
    for r in (
        Resource("Pod", "v1", "pods", True),
        Resource("Service", "v1", "services", True),
        Resource("ServiceAccount", "v1", "serviceaccounts", True),
        Resource("Namespace", "v1", "namespaces", False),
        Resource("Node", "v1", "nodes", False),
        Resource("EndpointSlice", "discovery.k8s.io/v1", "endpointslices", True),
        # Istio's security CRDs (charts/xdsserver/crds): v1 storage, v1beta1 served too
        Resource("AuthorizationPolicy", "security.istio.io/v1", "authorizationpolicies", True, ("security.istio.io/v1beta1",)),
        Resource("PeerAuthentication", "security.istio.io/v1", "peerauthentications", True, ("security.istio.io/v1beta1",)),
    )
}

DEFAULT_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
_END, _ABORT = object(), object()


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    """A ``meta/v1 Status`` body as the real server returns it."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]

    @property
    def is_watch(self) -> bool:
        return self.query.get("watch", "").lower() in ("true", "1")


def field_match(obj: Any, selector: str) -> bool:
    """``a.b=v,c=w`` equality terms against the object's dotted paths (missing path: "")."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        path, _, want = term.partition("=")
        cur: Any = obj
        for part in path.lstrip("=").split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        if str(cur if cur is not None else "") != want.lstrip("="):
            return False
    return True


def label_match(obj: Any, selector: str) -> bool:
    """``k=v,k2=v2`` equality terms against ``metadata.labels``."""
    labels = ((obj.get("metadata") or {}).get("labels") or {}) if isinstance(obj, dict) else {}
    return all(labels.get(k) == v for k, _, v in (t.partition("=") for t in selector.split(",") if t))


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = target if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge(out.get(k), v)
    return out


@dataclass(eq=False)
class _Watcher:
    res: Resource
    namespace: str | None
    bookmarks: bool
    fields: str = ""
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)

    def wants(self, res: Resource, obj: dict[str, Any]) -> bool:
        if res is not self.res or not field_match(obj, self.fields):
            return False
        return self.namespace is None or (obj.get("metadata") or {}).get("namespace") == self.namespace


@dataclass(frozen=True, slots=True)
class _Token:
    username: str
    uid: str
    groups: tuple[str, ...]
    extra: dict[str, list[str]]
    audiences: tuple[str, ...]


class KubeAPIStandIn:
    """Stand-in Kubernetes API server (see module docstring). Use as an async context manager."""

    def __init__(
        self,
        *,
        token: str | None = "standin-admin-token",
        gone_as: Literal["event", "http"] = "event",
        start_rv: int = 1000,
        served: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.token = token
        # kind -> the API versions it is served at (default: storage version + also_served);
        # e.g. {"AuthorizationPolicy": ("security.istio.io/v1beta1",)} is an Istio < 1.22 cluster
        self.served = {r.kind: (r.api_version, *r.also_served) for r in RESOURCES.values()} | (served or {})
        self.gone_as = gone_as
        self.hang_watches = False  # ignore timeoutSeconds: a watch that just goes silent
        self.rv = start_rv
        self.compacted_rv = start_rv
        self.requests: list[RecordedRequest] = []
        self.gone_sent = 0  # watches answered with 410 (either form)
        self.token_reviews: list[dict[str, Any]] = []
        self._objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._history: list[tuple[int, Resource, dict[str, Any]]] = []
        self._watchers: set[_Watcher] = set()
        self._snapshots: dict[str, tuple[int, list[dict[str, Any]]]] = {}
        self._tokens: dict[str, _Token] = {}
        self._runner: web.AppRunner | None = None
        self.url = ""

    # ---- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> KubeAPIStandIn:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> str:
        app = web.Application(middlewares=[self._record_and_auth])
        for res in RESOURCES.values():
            for version in self.served[res.kind]:
                prefix = api_prefix(version)
                app.router.add_get(f"{prefix}/{res.plural}", self._make_handler(res, version))
                if res.namespaced:
                    app.router.add_get(f"{prefix}/namespaces/{{namespace}}/{res.plural}", self._make_handler(res, version))
                    app.router.add_patch(f"{prefix}/namespaces/{{namespace}}/{res.plural}/{{name}}", self._make_patch(res))
        app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", self._token_review)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self.url

    async def stop(self) -> None:
        self.drop_watches(mode="end")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def write_kubeconfig(self, path: Path, *, token: str | None = None) -> Path:
        """A kubeconfig pointing the real client at this stand-in (token defaults to ours)."""
        user: dict[str, Any] = {}
        if token or self.token:
            user["token"] = token or self.token
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "standin", "user": user}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin"}}],
            "current-context": "standin",
        }
        path.write_text(json.dumps(cfg, indent=2))  # JSON is YAML
        return path

    # ---- test controls: objects ----------------------------------------------------------

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        """The stored object as a watch event would carry it (with kind/apiVersion)."""
        return copy.deepcopy(self._objects[(kind, namespace or "", name)])

    def all(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [copy.deepcopy(o) for k, o in sorted(self._objects.items()) if kind in (None, k[0])]

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        res, key = self._resource_and_key(obj)
        if key in self._objects:
            raise KeyError(f"{key} already exists")
        return self._write(res, key, "ADDED", obj)

    def update(self, obj: dict[str, Any]) -> dict[str, Any]:
        res, key = self._resource_and_key(obj)
        if key not in self._objects:
            raise KeyError(f"{key} does not exist")
        return self._write(res, key, "MODIFIED", obj)

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        _, key = self._resource_and_key(obj)
        return self.update(obj) if key in self._objects else self.create(obj)

    def delete(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        res = RESOURCES[kind]
        key = (kind, (namespace or "default") if res.namespaced else "", name)
        obj = self._objects.pop(key)
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self._emit(res, "DELETED", obj)
        return copy.deepcopy(obj)

    def inject_malformed(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Store and announce ``obj`` exactly as given (no defaults, no checks) -- the kind of
        object a client's own validation must reject. Only ``metadata.resourceVersion`` is set,
        and only if ``metadata`` is a mapping."""
        res = RESOURCES[kind]
        obj = copy.deepcopy(obj)
        self.rv += 1
        meta = obj.get("metadata")
        name = ns = ""
        if isinstance(meta, dict):
            meta["resourceVersion"] = str(self.rv)
            name, ns = str(meta.get("name", "")), str(meta.get("namespace", "") or "")
        key = (kind, ns, name or f"malformed-{self.rv}")
        typ = "MODIFIED" if key in self._objects else "ADDED"
        self._objects[key] = obj
        self._emit(res, typ, obj)
        return copy.deepcopy(obj)

    # ---- test controls: the watch machinery ----------------------------------------------

    def drop_watches(self, mode: Literal["abort", "end"] = "abort") -> int:
        """Break every open watch: ``abort`` resets the TCP connection mid-stream (the client
        sees a truncated chunked body); ``end`` finishes the response cleanly. Events already
        queued for a watch are lost with it, as on a real broken connection."""
        watchers, self._watchers = self._watchers, set()
        for w in watchers:
            w.queue.put_nowait(_ABORT if mode == "abort" else _END)
        return len(watchers)

    def compact(self) -> int:
        """Forget history: a watch from an older resourceVersion now gets 410 Gone."""
        self.compacted_rv = self.rv
        self._history.clear()
        self._snapshots.clear()
        return self.compacted_rv

    def send_bookmark(self, kind: str | None = None) -> int:
        """Send a BOOKMARK at the current resourceVersion to watches that allowed bookmarks."""
        n = 0
        for w in self._watchers:
            if w.bookmarks and kind in (None, w.res.kind):
                w.queue.put_nowait({
                    "type": "BOOKMARK",
                    "object": {
                        "kind": w.res.kind,
                        "apiVersion": w.res.api_version,
                        "metadata": {"resourceVersion": str(self.rv)},
                    },
                })
                n += 1
        return n

    def open_watches(self, kind: str | None = None) -> int:
        return sum(1 for w in self._watchers if kind in (None, w.res.kind))

    def watch_requests(self, kind: str) -> list[RecordedRequest]:
        res = RESOURCES[kind]
        return [r for r in self.requests if r.is_watch and r.path.endswith(f"/{res.plural}")
                and r.path.startswith(res.prefix)]

    def list_requests(self, kind: str) -> list[RecordedRequest]:
        res = RESOURCES[kind]
        return [r for r in self.requests if not r.is_watch and r.method == "GET"
                and r.path.endswith(f"/{res.plural}") and r.path.startswith(res.prefix)]

    # ---- test controls: authentication ---------------------------------------------------

    def register_token(
        self,
        token: str,
        *,
        namespace: str,
        service_account: str,
        pod_name: str | None = None,
        pod_uid: str | None = None,
        node_name: str | None = None,
        node_uid: str | None = None,
        audiences: tuple[str, ...] = (DEFAULT_AUDIENCE,),
    ) -> None:
        """Make ``token`` a valid (optionally pod- and node-bound) service-account token."""
        extra: dict[str, list[str]] = {}
        for k, v in (("pod-name", pod_name), ("pod-uid", pod_uid),
                     ("node-name", node_name), ("node-uid", node_uid)):
            if v is not None:
                extra[f"authentication.kubernetes.io/{k}"] = [v]
        self._tokens[token] = _Token(
            username=f"system:serviceaccount:{namespace}:{service_account}",
            uid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"sa/{namespace}/{service_account}")),
            groups=("system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"),
            extra=extra,
            audiences=audiences,
        )

    # ---- internals: store ----------------------------------------------------------------

    def _resource_and_key(self, obj: dict[str, Any]) -> tuple[Resource, tuple[str, str, str]]:
        res = RESOURCES[obj["kind"]]
        meta = obj.get("metadata") or {}
        ns = (meta.get("namespace") or "default") if res.namespaced else ""
        return res, (res.kind, ns, meta["name"])

    def _write(self, res: Resource, key: tuple[str, str, str], typ: str, obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        obj["kind"], obj["apiVersion"] = res.kind, res.api_version
        meta = obj.setdefault("metadata", {})
        old_meta = (self._objects.get(key) or {}).get("metadata") or {}
        self.rv += 1
        if res.namespaced:
            meta["namespace"] = key[1]
        meta["uid"] = old_meta.get("uid") or str(uuid.uuid5(uuid.NAMESPACE_URL, f"{key}/{self.rv}"))
        meta["creationTimestamp"] = old_meta.get("creationTimestamp") or datetime.datetime.now(
            datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        meta["resourceVersion"] = str(self.rv)
        self._objects[key] = obj
        self._emit(res, typ, obj)
        return copy.deepcopy(obj)

    def _emit(self, res: Resource, typ: str, obj: dict[str, Any]) -> None:
        event = {"type": typ, "object": copy.deepcopy(obj)}
        self._history.append((self.rv, res, event))
        for w in self._watchers:
            if w.wants(res, obj):
                w.queue.put_nowait(event)

    # ---- internals: HTTP -----------------------------------------------------------------

    @web.middleware
    async def _record_and_auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append(RecordedRequest(request.method, request.path, dict(request.query)))
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response(status(401, "Unauthorized", "Unauthorized"), status=401)
        return await handler(request)

    def _make_handler(self, res: Resource, version: str) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            ns = request.match_info.get("namespace")
            if request.query.get("watch", "").lower() in ("true", "1"):
                return await self._watch(request, res, ns, version)
            return self._list(request, res, ns, version)
        return handler

    def _make_patch(self, res: Resource) -> Any:
        async def handler(request: web.Request) -> web.Response:
            ns, name = request.match_info["namespace"], request.match_info["name"]
            if "merge-patch" not in request.headers.get("Content-Type", ""):
                return web.json_response(status(415, "UnsupportedMediaType", "only merge patches are modelled"), status=415)
            key = (res.kind, ns, name)
            if key not in self._objects:
                return web.json_response(status(404, "NotFound", f'{res.plural} "{name}" not found'), status=404)
            obj = _merge(copy.deepcopy(self._objects[key]), await request.json())
            return web.json_response(self._write(res, key, "MODIFIED", obj))
        return handler

    def _list(self, request: web.Request, res: Resource, ns: str | None, version: str) -> web.Response:
        q = request.query
        if "continue" in q:
            snap = self._snapshots.get(q["continue"].split(":", 1)[0])
            if snap is None:
                return web.json_response(
                    status(410, "Expired", "The provided continue parameter is too old to display a "
                           "consistent list result. You can start a new list without the continue parameter."),
                    status=410)
            rv, items = snap
            start = int(q["continue"].split(":", 1)[1])
        else:
            rv, start = self.rv, 0
            items = []
            for (kind, ons, _name), obj in sorted(self._objects.items()):
                if kind == res.kind and ns in (None, ons) and field_match(obj, q.get("fieldSelector", "")) \
                        and label_match(obj, q.get("labelSelector", "")):
                    item = copy.deepcopy(obj)
                    if isinstance(item, dict):  # the real server omits these on list items
                        item.pop("kind", None)
                        item.pop("apiVersion", None)
                    items.append(item)
        limit = int(q.get("limit") or 0) or len(items) - start
        page = items[start:start + limit]
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if start + limit < len(items):
            snap_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            self._snapshots[snap_id] = (rv, items)
            meta["continue"] = f"{snap_id}:{start + limit}"
            meta["remainingItemCount"] = len(items) - start - limit
        return web.json_response({
            "kind": f"{res.kind}List",
            "apiVersion": version,
            "metadata": meta,
            "items": page,
        })

    async def _watch(self, request: web.Request, res: Resource, ns: str | None, version: str) -> web.StreamResponse:
        q = request.query
        rv_param = q.get("resourceVersion", "")
        bookmarks = q.get("allowWatchBookmarks", "").lower() in ("true", "1")
        timeout = float(q.get("timeoutSeconds") or 0) or None
        w = _Watcher(res, ns, bookmarks, q.get("fieldSelector", ""))
        # Everything up to registering the watcher happens without yielding to the loop, so
        # no event can fall between the replayed history and the live stream.
        gone = False
        if rv_param in ("", "0"):
            for (kind, ons, _n), obj in sorted(self._objects.items()):
                if kind == res.kind and ns in (None, ons) and field_match(obj, w.fields):
                    w.queue.put_nowait({"type": "ADDED", "object": copy.deepcopy(obj)})
        else:
            try:
                since = int(rv_param)
            except ValueError:
                return web.json_response(status(400, "BadRequest", f"invalid resourceVersion {rv_param!r}"),
                                         status=400)
            if since < self.compacted_rv:
                gone = True
            else:
                for ev_rv, ev_res, event in self._history:
                    if ev_rv > since and w.wants(ev_res, event["object"]):
                        w.queue.put_nowait(event)
        gone_status = status(410, "Expired", f"too old resource version: {rv_param} ({self.compacted_rv})")
        if gone:
            self.gone_sent += 1
            if self.gone_as == "http":
                return web.json_response(gone_status, status=410)
            w.queue.put_nowait({"type": "ERROR", "object": gone_status})
            w.queue.put_nowait(_END)
        else:
            self._watchers.add(w)

        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        loop = asyncio.get_running_loop()
        deadline = None if (timeout is None or self.hang_watches) else loop.time() + timeout
        try:
            await resp.prepare(request)
            while True:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(w.queue.get(), remaining)
                except TimeoutError:
                    break
                if item is _END:
                    break
                if item is _ABORT:
                    if request.transport is not None:
                        request.transport.abort()
                    return resp
                obj = item.get("object") if isinstance(item, dict) else None
                if version != res.api_version and isinstance(obj, dict) and obj.get("apiVersion") == res.api_version:
                    item = {**item, "object": {**obj, "apiVersion": version}}  # CRD conversion "None"
                await resp.write(json.dumps(item).encode() + b"\n")
            await resp.write_eof()
        except ConnectionError:
            pass  # the client went away
        finally:
            self._watchers.discard(w)
        return resp

    async def _token_review(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.token_reviews.append(body)
        spec = body.get("spec") or {}
        requested = tuple(spec.get("audiences") or ())
        review = {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
        }
        tok = self._tokens.get(spec.get("token", ""))
        if tok is None:
            review["status"] = {"user": {}, "error": "[invalid bearer token, token lookup failed]"}
            return web.json_response(review, status=201)
        want = requested or (DEFAULT_AUDIENCE,)
        matched = [a for a in want if a in tok.audiences]
        if not matched:
            review["status"] = {"user": {}, "error": "[invalid bearer token, token audiences "
                                f"{list(tok.audiences)} is invalid for the target audiences {list(want)}]"}
            return web.json_response(review, status=201)
        review["status"] = {
            "authenticated": True,
            "user": {"username": tok.username, "uid": tok.uid, "groups": list(tok.groups), "extra": tok.extra},
            "audiences": matched,
        }
        return web.json_response(review, status=201)
