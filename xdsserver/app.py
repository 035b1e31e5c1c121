"""Composition root: source -> model/index -> translate -> snapshot cache -> ADS + debug HTTP.

Only this module knows all stages. A change in the inputs is debounced (quiet period and a
maximum delay), rebuilt all-or-nothing, translated per node, and handed to the cache, which
works out per node and type what actually changed; the ADS server pushes only that. Invalid
input is logged and ignored: the last good configuration keeps being served.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .model import Flavor, MeshConfig
from .model.index import MeshIndex
from .pipeline import CaCerts
from .sources import SourceObject
from .sources.objects import InputErrors, ValidationMemo, build_model
from .sources.pod_status import ReadinessPatcher
from .incremental import IncrementalTranslator, ResourceSet, resource_delta
from .published import LazyNodes, State
from .translate import TranslationError
from .xds.cache import SnapshotCache, UnsafeSnapshot
from .xds.metrics import XdsMetrics
from .ordering import EndpointBarrier, new_endpoint_nodes
from .xds.server import AdsServer
from .xds.types import ENDPOINT

log = logging.getLogger(__name__)


@dataclass
class Debounce:
    quiet: float = 0.1  # istiod: 100 ms
    max_delay: float = 10.0  # istiod: 10 s


class ManifestSource:
    """The manifest files as a source: a content signature polled on a short interval.

    Polling (not inotify) works for files edited in place, replaced atomically, or mounted from a
    ConfigMap (symlink swaps), and needs no extra dependency; the signature is cheap (stat only)."""

    def __init__(self, path: Path, interval: float = 0.2) -> None:
        self.path = path
        self.interval = interval
        self._reader: Any = None  # sources.manifests.ManifestReader: re-parses changed files only

    def signature(self) -> tuple[Any, ...]:
        from .sources.manifests import signature

        return signature(self.path)

    def objects(self) -> list[SourceObject]:
        if self._reader is None:
            from .sources.manifests import ManifestReader

            self._reader = ManifestReader(self.path)
        return self._reader.objects()


class PublishedStateGc:
    """Keeps the cyclic garbage collector off the published state.

    At 100 nodes the published state is millions of objects; a full collection walks all of them
    (measured: over 1 s in the middle of a rebuild, most of an endpoint change's time). Published
    state lives until the next change replaces it, so after each publish everything alive is
    frozen (``gc.freeze()``: the collector ignores it). Objects frozen and later dropped are freed
    by reference counting as usual; only garbage *cycles* among them would stay, so every
    ``full_every`` publishes one full collection runs over everything (unfreeze, collect, freeze)."""

    def __init__(self, full_every: int = 50) -> None:
        self.full_every = full_every
        self.count = 0

    @contextlib.contextmanager
    def building(self) -> Iterator[None]:
        """No cyclic collection while a rebuild allocates: measured at 100 nodes from cold, 12
        full collections walking the growing heap took 2.3 s of a 19 s build. The rebuild's
        garbage is freed by reference counting; cycles wait for the periodic full collection."""
        was = gc.isenabled()
        gc.disable()
        try:
            yield
        finally:
            if was:
                gc.enable()

    def published(self) -> None:
        self.count += 1
        if self.count % self.full_every == 0:
            gc.unfreeze()
            gc.collect()
        gc.freeze()


class AppMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.translate_time = Histogram(
            "xdsserver_translate_seconds", "Time to rebuild the model and translate every node.", registry=registry,
            buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.input_errors = Counter("xdsserver_input_rejected", "Input states rejected as invalid (last good kept).", registry=registry)
        self.reloads = Counter("xdsserver_reloads", "Input states translated and published.", registry=registry)
        self.debounce_time = Histogram(
            "pilot_debounce_time", "Delay between the first change event and the push it caused.", registry=registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.nodes = Gauge("xdsserver_nodes", "Nodes with a snapshot.", registry=registry)
        self.unsafe = Counter("xdsserver_unsafe_snapshots_refused", "Snapshots refused because they would wipe a ztunnel.", registry=registry)


class ControlPlane:
    """Owns the pipeline state; the ADS server and debug HTTP read from it."""

    def __init__(
        self,
        *,
        load_objects: Callable[[], list[SourceObject]],
        certs: CaCerts,
        flavor: Flavor = Flavor.ENVOY,
        mesh: MeshConfig | None = None,
        strict: bool = True,
        registry: CollectorRegistry | None = None,
        delta_only: bool = False,
        authorize: Any = None,
        test_hooks: bool = False,
    ) -> None:
        self.load_objects = load_objects
        self.certs = certs
        self.flavor = flavor
        self.mesh = mesh
        self.strict = strict
        self.registry = registry or CollectorRegistry()
        self.xds_metrics = XdsMetrics(self.registry)
        self.metrics = AppMetrics(self.registry)
        self.cache = SnapshotCache(self.xds_metrics)
        # ordering.py: new endpoints reach clients after the destination ztunnel ACKed its chain
        self.barrier = EndpointBarrier(lambda node: self.server.acked(node))
        self.server = AdsServer(self.cache, metrics=self.xds_metrics, delta_only=delta_only, authorize=authorize)
        self.state = State()
        self.translator = IncrementalTranslator(flavor, certs)
        self.validation_memo = ValidationMemo()
        self.readiness = ReadinessPatcher()  # pod readiness changes patch the model (O(change))
        self.last_path = ""  # how the last published rebuild was computed: "full" or "readiness patch"
        self.timings: dict[str, float] = {}  # the last published rebuild's stages, seconds
        self.snaps: dict[str, ResourceSet] = {}  # every node's last good serialized resources
        self.test_hooks = test_hooks
        # test-only: node -> type_url -> name -> message, layered over the translation
        self.injected: dict[str, dict[str, dict[str, Message]]] = {}
        self._lock = asyncio.Lock()
        self.gc = PublishedStateGc()
        self._held: dict[str, set[str]] = {}  # node -> CLA names the endpoint barrier holds back

    @property
    def server(self) -> AdsServer:
        return self._server

    @server.setter
    def server(self, server: AdsServer) -> None:
        """The ADS server, and the barrier's ACK wake-ups with it: a replaced server (the bench
        times a subclass) must be the one the barrier asks, or every barrier waits its timeout."""
        self._server = server
        server.ack_listeners.append(self.barrier.acked)

    # -- pipeline -------------------------------------------------------------------------------
    def rebuild(self) -> bool:
        """Load, validate, translate and publish (see :meth:`_rebuild`), the cyclic GC off meanwhile."""
        with self.gc.building():
            return self._rebuild()

    def _rebuild(self) -> bool:
        """Load, validate, translate and publish. False (and nothing changed) on bad input.

        Translation is incremental: nodes whose inputs did not change are not translated and not
        handed to the cache; endpoint-only changes rebuild only the affected assignments. A change
        that is only pods' readiness skips the model build too: the last model and index are
        patched (:class:`~xdsserver.sources.pod_status.ReadinessPatcher`)."""
        t0 = time.perf_counter()
        try:
            objects = self.load_objects()
            t_source = time.perf_counter()
            patch = self._readiness_patch(objects)
            if patch is not None:
                model, index = patch.model, patch.index
                t_model = time.perf_counter()
                snaps = self.translator.patch_backends(index, self.state.index, patch.targets)  # type: ignore[arg-type]
                if snaps is None:
                    patch, snaps = None, self.translator.snapshots(index)
            else:
                model = build_model(objects, self.mesh, strict=self.strict, memo=self.validation_memo)
                index = MeshIndex(model, previous=self.state.index)
                t_model = time.perf_counter()
                snaps = self.translator.snapshots(index)
            t_translate = time.perf_counter()
        except InputErrors as exc:
            self._reject(f"input rejected, still serving the last good configuration:\n{exc}")
            return False
        except TranslationError as exc:
            self._reject(f"translation failed reference checks, still serving the last good configuration: {exc}")
            return False
        stats = self.translator.stats
        # per-node deltas: O(change) in the cache. Nodes translated from scratch (and test-hook
        # injections) are diffed against what the cache serves, which is the truth if an earlier
        # publish was refused.
        deltas = dict(stats.deltas)
        for n in {*stats.full, *self.injected}:
            if n in snaps:
                deltas[n] = resource_delta(self.cache.resource_set(n), self._with_injected(n, snaps[n]))
        # ordered pushes: a node that gains a new endpoint gets it only after the endpoint's node
        # ACKed its inbound chain; until then it keeps its previous endpoint bytes
        dest = patch.new_ready_nodes if patch is not None else new_endpoint_nodes(self.state.model, model)
        held: dict[str, set[str]] = {}
        if dest:
            deltas, held = self.barrier.split(deltas, self._served_endpoints, dest)
        t_deltas = time.perf_counter()
        try:
            changes = self.cache.apply_deltas(deltas)
        except UnsafeSnapshot as exc:
            for n in deltas:  # the cache kept the old state: translate these from scratch next time
                self.translator.forget(n)
            self.metrics.unsafe.inc()
            self._reject(f"refused: {exc}")
            return False
        for gone in stats.removed:
            self.cache.remove_node(gone)
        t_cache = time.perf_counter()
        self.snaps = snaps
        if patch is not None:
            self.readiness.advance(objects, patch)
        else:
            self.readiness.rebase(objects, model, index)
        self.last_path = "readiness patch" if patch is not None else "full"
        self.timings = {"source": t_source - t0, "model": t_model - t_source, "translate": t_translate - t_model,
                        "deltas": t_deltas - t_translate, "cache": t_cache - t_deltas}
        self.state = State(model, index, LazyNodes(snaps, self.flavor), time.time(), self.state.generation + 1, "")
        self.metrics.translate_time.observe(time.perf_counter() - t0)
        self.metrics.reloads.inc()
        self.metrics.nodes.set(len(snaps))
        changed = {n: sorted(c.types) for n, c in changes.items() if c}
        log.info("published generation %d (%s): %d nodes (%d translated, %d patched), changed %s (%.1f ms)",
                 self.state.generation, self.last_path, len(snaps), len(stats.full), len(stats.patched), changed or "nothing",
                 (time.perf_counter() - t0) * 1000)
        if not self.cache.ready:
            self.cache.mark_ready()
        if held:
            for n, names in held.items():
                self._held.setdefault(n, set()).update(names)
            self.barrier.release_later(dest, set(held), self._publish_latest)
        self.gc.published()
        return True

    def _readiness_patch(self, objects: list[SourceObject]) -> Any:
        """The model and index patched for a readiness-only change (sources/pod_status.py), or
        None: a full build then. Not while a certificate rotation is due (the patch path does
        not look at secrets) nor with test-hook injections."""
        if self.state.index is None or self.injected:
            return None
        ca = getattr(self.certs, "ca", None)
        if ca is not None and hasattr(ca, "rotate_due") and ca.rotate_due():
            return None
        return self.readiness.patch(objects, self.validation_memo)

    def _served_endpoints(self, node: str) -> Mapping[str, Any]:
        snap = self.cache.get(node)
        return snap.resources(ENDPOINT) if snap is not None else {}

    def _publish_latest(self, nodes: set[str]) -> None:
        """The endpoint barrier's release: the latest bytes of the CLAs held back on `nodes`."""
        deltas: dict[str, dict[str, dict[str, bytes | None]]] = {}
        for n in sorted(nodes):
            names = self._held.pop(n, set())
            if n not in self.snaps or not names:
                continue
            latest = dict(self._with_injected(n, self.snaps[n]).get(ENDPOINT, ()))
            deltas[n] = {ENDPOINT: {name: latest.get(name) for name in sorted(names)}}
        try:
            self.cache.apply_deltas(deltas)
        except UnsafeSnapshot as exc:
            log.error("endpoint barrier release refused: %s", exc)

    def _reject(self, message: str) -> None:
        self.metrics.input_errors.inc()
        self.state.last_error = message
        log.error("%s", message)

    def _with_injected(self, node: str, rs: ResourceSet) -> ResourceSet:
        injected = self.injected.get(node)
        if not injected:
            return rs
        out = {url: list(items) for url, items in rs.items()}
        for url, extra in injected.items():
            merged = dict(out.get(url, []))
            merged.update((n, m.SerializeToString(deterministic=True)) for n, m in extra.items())
            out[url] = list(merged.items())
        return out

    def republish(self) -> None:
        """Re-publish the current translation (after a test-hook injection changes)."""
        self.cache.set_snapshots({n: self._with_injected(n, rs) for n, rs in self.snaps.items()})

    # -- test hooks -----------------------------------------------------------------------------
    def inject(self, node: str, type_url: str, resource_json: dict[str, Any]) -> str:
        from google.protobuf import symbol_database

        cls = symbol_database.Default().GetSymbol(type_url.split("/", 1)[1])
        msg = json_format.ParseDict(resource_json, cls())
        name = getattr(msg, "name", "") or getattr(msg, "cluster_name", "")
        self.injected.setdefault(node, {}).setdefault(type_url, {})[name] = msg
        self.republish()
        return name

    def clear_injected(self) -> None:
        self.injected.clear()
        self.republish()

    # -- views for debug ------------------------------------------------------------------------
    def versions(self, node: str) -> dict[tuple[str, str], str]:
        snap = self.cache.get(node)
        if snap is None:
            return {}
        return {(t, name): r.version for t in snap.type_urls() for name, r in snap.resources(t).items()}


# ---------------------------------------------------------------------------------------------
class Runner:
    """Debounced reload loop driven by a source's change signal."""

    def __init__(self, cp: ControlPlane, debounce: Debounce) -> None:
        self.cp = cp
        self.debounce = debounce
        self.changed = asyncio.Event()
        self.first_event: float | None = None

    def notify(self) -> None:
        if self.first_event is None:
            self.first_event = time.monotonic()
        self.changed.set()

    async def run(self) -> None:
        while True:
            await self.changed.wait()
            start = self.first_event or time.monotonic()
            # quiet period: wait until no new change for `quiet`, but never past `max_delay`
            while True:
                self.changed.clear()
                remaining = self.debounce.max_delay - (time.monotonic() - start)
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self.changed.wait(), timeout=min(self.debounce.quiet, remaining))
                except asyncio.TimeoutError:
                    break
            self.first_event = None
            self.changed.clear()
            self.cp.metrics.debounce_time.observe(time.monotonic() - start)
            self.cp.rebuild()


async def watch_manifests(src: ManifestSource, runner: Runner) -> None:
    last = src.signature()
    while True:
        await asyncio.sleep(src.interval)  # polling period of the watcher, not synchronization
        sig = src.signature()
        if sig != last:
            last = sig
            runner.notify()


async def rotate_certificates(cp: ControlPlane, runner: Runner, check_every: float = 60.0) -> None:
    ca = cp.certs.ca
    while True:
        await asyncio.sleep(check_every)
        if ca.rotate_due():
            log.info("workload certificates past half-life: re-issuing")
            runner.notify()


def _parse_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def make_certs(args: Any, trust_domain: str) -> CaCerts:
    from .ca import CertificateAuthority

    if getattr(args, "ca_secret_dir", None):
        d = Path(args.ca_secret_dir)
        ca = CertificateAuthority.from_pem(
            (d / "root-cert.pem").read_text(), (d / "root-key.pem").read_text(), trust_domain=trust_domain,
        )
    else:
        ca = CertificateAuthority.load_or_create(getattr(args, "ca_dir", None), trust_domain=trust_domain)
    return CaCerts(ca)


async def serve(args: Any, *, started: Callable[[ControlPlane], None] | None = None) -> None:
    from .bundled import bundled_example
    from .debug.http import start_debug
    from .sources.manifests import load_mesh_config
    from .xds.limits import limits_from_args
    from .xds.server import start_server

    mesh = load_mesh_config(args.mesh_config) if getattr(args, "mesh_config", None) else None
    registry = CollectorRegistry()
    tasks: list[asyncio.Task[Any]] = []
    kube_source = None
    if getattr(args, "source", "manifests") == "kubernetes":
        from .sources.kube import KubeSource, api_client_from_env

        api = await api_client_from_env(getattr(args, "kubeconfig", None))
        holder: dict[str, Any] = {}
        kube_source = KubeSource(api, on_change=lambda: holder["runner"].notify())
        load: Callable[[], list[SourceObject]] = kube_source.objects
        strict = False
    else:
        path = Path(args.manifests) if getattr(args, "manifests", None) else bundled_example()
        msrc = ManifestSource(path)
        load, strict = msrc.objects, True
    certs = make_certs(args, (mesh or MeshConfig()).trust_domain)
    # -- node authentication (nodeauth.py): TLS streams must prove their node ------------------
    authorize = None
    if getattr(args, "xds_tls_address", None):
        from .nodeauth import make_authorizer

        authorize = make_authorizer(certs.ca, args)
    cp = ControlPlane(
        load_objects=load, certs=certs, flavor=Flavor(getattr(args, "flavor", "envoy")), mesh=mesh, strict=strict,
        registry=registry, delta_only=getattr(args, "delta_only", False), test_hooks=getattr(args, "test_hooks", False),
        authorize=authorize,
    )
    cp.server.limits = limits_from_args(args)  # xds/limits.py: per-node/total streams, request size, shedding
    barrier_timeout = getattr(args, "endpoint_barrier_timeout", None)
    if barrier_timeout is not None:  # ordering.py; 0 pushes endpoints without waiting
        cp.barrier.timeout, cp.barrier.enabled = barrier_timeout, barrier_timeout > 0
    runner = Runner(cp, Debounce(getattr(args, "debounce_quiet", 0.1), getattr(args, "debounce_max", 10.0)))

    # Servers first: streams are refused (UNAVAILABLE) and /ready is 503 until the first good
    # load, but /healthz answers while informers sync, so a liveness probe does not kill us.
    xds_address = getattr(args, "xds_address", None)
    xds_uds = getattr(args, "xds_uds", None)
    if not xds_address and not xds_uds:
        xds_address = "127.0.0.1:15010"
    if xds_uds and os.path.exists(xds_uds):
        os.unlink(xds_uds)  # a stale socket from a crashed run
    grpc_server = await start_server(cp.server, address=xds_address, uds=xds_uds)
    tls_xds = None
    if getattr(args, "xds_tls_address", None):  # node authentication (nodeauth.py)
        from .nodeauth import start_tls_xds

        tls_xds = await start_tls_xds(cp, args)
    debug_address = getattr(args, "debug_address", "127.0.0.1:15014")
    debug_runner = await start_debug(cp, debug_address)
    log.info("xDS on %s, debug HTTP on %s", xds_uds or xds_address, debug_address)

    async def initial_load() -> None:
        if kube_source is not None:
            holder["runner"] = runner
            tasks.append(asyncio.create_task(kube_source.run(), name="kube-source"))
            await kube_source.synced.wait()
            cp.rebuild()
        else:
            if not cp.rebuild():
                log.error("initial input is invalid; streams are refused (UNAVAILABLE) until it is fixed")
            tasks.append(asyncio.create_task(watch_manifests(msrc, runner), name="manifest-watch"))
        tasks.append(asyncio.create_task(runner.run(), name="debounce"))
        tasks.append(asyncio.create_task(rotate_certificates(cp, runner), name="cert-rotation"))
        if started:
            started(cp)

    tasks.append(asyncio.create_task(initial_load(), name="initial-load"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await grpc_server.stop(grace=1.0)
        if tls_xds is not None:
            await tls_xds.stop(grace=1.0)
        await debug_runner.cleanup()
        if kube_source is not None:
            await api.close()
        if xds_uds and os.path.exists(xds_uds):
            os.unlink(xds_uds)


def run_serve(args: Any) -> int:
    try:
        asyncio.run(serve(args))
    except InputErrors as exc:
        log.error("%s", exc)
        return 2
    return 0

