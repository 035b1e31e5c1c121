"""Debug HTTP (aiohttp, same event loop as the ADS server): what would be sent, what was sent and
ACKed, why a connection goes where it goes, and Prometheus metrics.

Endpoints: ``/ready``, ``/healthz``, ``/metrics``, ``/debug/config_dump?node=``, ``/debug/syncz``,
``/debug/nackz``, ``/debug/connections``, ``/debug/registryz``, ``/debug/explain?node=&src=&dst=``,
``/debug/nodes``; with ``--test-hooks`` also ``POST/DELETE /debug/test/inject``. The web console:
``/ui/`` (static, vendored, no external asset) and its JSON under ``/ui/api/`` (``console.py``),
live updates as server-sent events on ``/ui/api/events``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..dump import build_config_dump, to_dict
from ..explain import explain
from . import console

if TYPE_CHECKING:
    from .source import DebugSource

CP_KEY = web.AppKey("control_plane", object)
STOP_KEY = web.AppKey("stop_streams", asyncio.Event)
UI_DIR = Path(__file__).with_name("ui")
UI_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
# Everything the console loads comes from this server: a CDN or inline script would be refused.
UI_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
EVENT_TICK_S = 0.2  # how often an event stream looks at the state (in-process, cheap)
EVENT_REFRESH_S = 5.0  # an unchanged overview is re-sent this often (ages, liveness)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, indent=2, sort_keys=True, default=_default) + "\n", status=status, content_type="application/json")


def _default(o: Any) -> Any:
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)  # type: ignore[arg-type]
    if isinstance(o, enum.Enum):
        return o.value
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    return str(o)


def _cp(request: web.Request) -> "DebugSource":
    return request.app[CP_KEY]  # type: ignore[return-value]


async def ready(request: web.Request) -> web.Response:
    cp = _cp(request)
    if cp.cache.ready:
        return web.Response(text="ready\n")
    return web.Response(text="not ready: initial configuration not loaded\n", status=503)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(_cp(request).registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _node_or_error(request: web.Request) -> tuple[str | None, web.Response | None]:
    cp = _cp(request)
    node = request.query.get("node", "")
    if not node:
        return None, _json({"error": "query parameter 'node' is required", "nodes": sorted(cp.state.nodes)}, 400)
    if node not in cp.state.nodes:
        return None, _json({"error": f"unknown node {node!r}", "nodes": sorted(cp.state.nodes)}, 404)
    return node, None


async def config_dump(request: web.Request) -> web.Response:
    node, err = _node_or_error(request)
    if err:
        return err
    cp = _cp(request)
    assert node is not None
    return _json(to_dict(build_config_dump(cp.state.nodes[node], cp.versions(node))))


async def syncz(request: web.Request) -> web.Response:
    return _json(_cp(request).server.sync_status())


async def nackz(request: web.Request) -> web.Response:
    return _json(_cp(request).server.nacks())


async def connections(request: web.Request) -> web.Response:
    return _json(_cp(request).server.connections())


async def pushz(request: web.Request) -> web.Response:
    """Responses sent by type and reason, resources sent, and protocol events (ACK, NACK, stale...)."""
    srv = _cp(request).server
    return _json(
        {
            "responses": {f"{t}/{r}": n for (t, r), n in sorted(srv.counters.items())},
            "resources": {f"{t}/{m}": n for (t, m), n in sorted(getattr(srv, "resources_sent", {}).items())},
            "events": dict(sorted(srv.events.items())),
        }
    )


async def nodes(request: web.Request) -> web.Response:
    cp = _cp(request)
    out = []
    for n in sorted(cp.state.nodes):
        res = cp.state.nodes[n]
        out.append({"node": n, "listeners": len(res.listeners), "clusters": len(res.clusters),
                    "endpoints": len(res.endpoints), "secrets": len(res.secrets)})
    return _json(out)


async def registryz(request: web.Request) -> web.Response:
    cp = _cp(request)
    st = cp.state
    if st.model is None:
        return _json({"error": "no model loaded", "last_error": st.last_error}, 503)
    idx = st.index
    assert idx is not None
    return _json(
        {
            "generation": st.generation,
            "loaded_at": st.loaded_at,
            "last_error": st.last_error,
            "sources": st.model.sources,
            "mesh": st.model.mesh,
            "authorization_policies": [dataclasses.asdict(p) for p in st.model.authorization_policies],
            "peer_authentications": [dataclasses.asdict(p) for p in st.model.peer_authentications],
            "policy_warnings": st.model.policy_warnings,
            "nodes": [dataclasses.asdict(n) for n in st.model.nodes] or list(idx.node_names),
            "namespaces": [{"name": ns.name, "labels": dict(ns.labels), "enrolled": idx.namespace_enrolled(ns.name)} for ns in st.model.namespaces],
            "pods": [
                {"key": p.key, "node": p.node_name, "ips": p.ips, "service_account": p.service_account, "ready": p.ready,
                 "enrolled": idx.pod_enrolled(p), "identity": idx.identity_of(p).spiffe if idx.pod_enrolled(p) else None}
                for p in st.model.pods
            ],
            "services": [
                {"key": s.key, "cluster_ips": s.cluster_ips, "headless": s.headless,
                 "ports": [dataclasses.asdict(p) for p in s.ports], "selector": dict(s.selector) if s.selector else None}
                for s in st.model.services
            ],
            "endpoints": {f"{k[0]}:{k[1]}": [dataclasses.asdict(e) for e in v] for k, v in st.model.endpoints},
        }
    )


async def explain_handler(request: web.Request) -> web.Response:
    node, err = _node_or_error(request)
    if err:
        return err
    src, dst = request.query.get("src", ""), request.query.get("dst", "")
    if not src or not dst:
        return _json({"error": "query parameters 'src' (IP) and 'dst' (IP:PORT) are required"}, 400)
    try:
        ex = explain(_cp(request).state.nodes, node, src, dst)  # type: ignore[arg-type]
    except ValueError as exc:
        return _json({"error": str(exc)}, 400)
    if request.query.get("format") == "text":
        return web.Response(text=ex.text() + "\n")
    return _json(ex.to_dict())


async def inject(request: web.Request) -> web.Response:
    """Test-only: layer a raw resource over one node's translation (to provoke a NACK)."""
    cp = _cp(request)
    body = await request.json()
    try:
        name = cp.inject(body["node"], body["type_url"], body["resource"])
    except (KeyError, ValueError) as exc:
        return _json({"error": str(exc)}, 400)
    return _json({"injected": name})


async def clear_inject(request: web.Request) -> web.Response:
    _cp(request).clear_injected()
    return _json({"cleared": True})


async def ui_redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/ui/")


async def ui_file(request: web.Request) -> web.Response:
    name = request.match_info.get("name") or "index.html"
    if name not in UI_FILES:  # a fixed set: no path from the request reaches the file system
        raise web.HTTPNotFound()
    return web.Response(body=(UI_DIR / name).read_bytes(), content_type=UI_FILES[name], charset="utf-8", headers=UI_HEADERS)


async def ui_overview(request: web.Request) -> web.Response:
    return _json(console.overview(_cp(request)))


async def ui_node(request: web.Request) -> web.Response:
    node, err = _node_or_error(request)
    if err:
        return err
    assert node is not None
    return _json(console.node_page(_cp(request), node))


async def ui_targets(request: web.Request) -> web.Response:
    return _json(console.targets(_cp(request)))


async def ui_path(request: web.Request) -> web.Response:
    cp = _cp(request)
    src, dst = request.query.get("src", ""), request.query.get("dst", "")
    if not src or not dst:
        return _json({"error": "query parameters 'src' (pod or IP) and 'dst' (Service:port, pod:port or IP:port) are required"}, 400)
    if cp.state.model is None:
        return _json({"error": "no model loaded"}, 503)
    try:
        return _json(console.path(cp, src, dst, request.query.get("node", "")))
    except ValueError as exc:
        return _json({"error": str(exc)}, 400)


async def ui_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the overview whenever it changes (a push, an ACK, a NACK, a reload)."""
    cp, stop = _cp(request), request.app[STOP_KEY]
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    last, sent_at = "", 0.0
    loop = asyncio.get_running_loop()
    try:
        while not stop.is_set():
            data = console.overview(cp)
            digest = json.dumps(_stable(data), sort_keys=True, default=_default)
            if digest != last or loop.time() - sent_at >= EVENT_REFRESH_S:
                body = json.dumps(data, sort_keys=True, default=_default)
                await resp.write(f"event: overview\ndata: {body}\n\n".encode())
                last, sent_at = digest, loop.time()
            try:
                await asyncio.wait_for(stop.wait(), EVENT_TICK_S)
            except asyncio.TimeoutError:
                pass
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    return resp


def _stable(data: Any) -> Any:
    """The overview without the fields that change with the clock alone."""
    if isinstance(data, dict):
        return {k: _stable(v) for k, v in data.items() if k not in ("server_time", "since_send", "age")}
    if isinstance(data, list):
        return [_stable(v) for v in data]
    return data


async def _stop_streams(app: web.Application) -> None:
    app[STOP_KEY].set()


def make_app(cp: "DebugSource") -> web.Application:
    app = web.Application()
    app[CP_KEY] = cp
    app[STOP_KEY] = asyncio.Event()
    app.on_shutdown.append(_stop_streams)  # open event streams end before the runner waits for handlers
    app.router.add_get("/ui", ui_redirect)
    app.router.add_get("/ui/", ui_file)
    app.router.add_get("/ui/api/overview", ui_overview)
    app.router.add_get("/ui/api/node", ui_node)
    app.router.add_get("/ui/api/targets", ui_targets)
    app.router.add_get("/ui/api/path", ui_path)
    app.router.add_get("/ui/api/events", ui_events)
    app.router.add_get("/ui/{name}", ui_file)
    app.router.add_get("/ready", ready)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/debug/config_dump", config_dump)
    app.router.add_get("/debug/syncz", syncz)
    app.router.add_get("/debug/nackz", nackz)
    app.router.add_get("/debug/connections", connections)
    app.router.add_get("/debug/nodes", nodes)
    app.router.add_get("/debug/pushz", pushz)
    app.router.add_get("/debug/registryz", registryz)
    app.router.add_get("/debug/explain", explain_handler)
    if cp.test_hooks:
        app.router.add_post("/debug/test/inject", inject)
        app.router.add_delete("/debug/test/inject", clear_inject)
    return app


async def start_debug(cp: "DebugSource", address: str) -> web.AppRunner:
    host, _, port = address.rpartition(":")
    runner = web.AppRunner(make_app(cp), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host.strip("[]") or "127.0.0.1", int(port))
    await site.start()
    return runner
