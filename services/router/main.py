"""`tessera router`: the public front door. Serves Inference + Registry, health per model."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from opentelemetry import trace

from services.cache.seal import Seal
from services.cache.store import CacheStore
from services.common.doors import BodyLimits, DoorLimits, OpenDoors
from services.common.metrics import start_metrics_server
from services.common.repository import VERSIONS_DIR
from services.common.security import (
    CALL,
    AnyOf,
    AuthInterceptor,
    Caller,
    Tokens,
    TokenSet,
    channel_credentials,
    derive_token,
    looks_derived,
    server_credentials,
)
from services.common.server import serve, text_message_bytes
from services.common.settings import RouterSettings
from services.pb.tessera.v1 import inference_pb2_grpc, models_pb2_grpc, worker_pb2_grpc
from services.router.admission import Admission
from services.router.autoscale import ScalePolicy, VersionSignals
from services.router.callers import Callers
from services.router.frontends import Frontends
from services.router.kserve import KSERVE_NAME, KServeService
from services.router.models_api import SERVICE_NAME as MODELS_NAME
from services.router.models_api import ModelsService
from services.router.openai.app import OpenAIFront, serve_http
from services.router.pool import WorkerPool
from services.router.registry import RegistryLimits, RegistryService
from services.router.routing import RoutingTable
from services.router.service import InferenceService
from services.router.versions import VersionBook

log = logging.getLogger("tessera.router")
SERVICE_NAME = "tessera.v1.Inference"
REGISTRY_NAME = "tessera.v1.Registry"
USER_PREFIXES = ("/tessera.v1.Inference/", "/inference.GRPCInferenceService/")
REGISTRY_PREFIXES = ("/tessera.v1.Registry/",)
ADMIN_PREFIXES = ("/tessera.v1.Models/",)


class _DerivedShape:
    """Lets credentials derived from the mesh secret through to the Registry's servicer, which
    checks each against the address it registers (the interceptor cannot see the address)."""

    enabled = True

    def caller(self, token: str) -> Caller | None:
        return Caller("worker") if looks_derived(token) else None

    def accepts(self, token: str) -> bool:
        return self.caller(token) is not None


@dataclass
class RouterTokens:
    """Every credential the router accepts: users and admins on the public services, workers
    (listed, or derived from the mesh secret per address) on the Registry."""

    users: TokenSet
    admins: TokenSet
    workers: TokenSet
    mesh_secret: str

    @classmethod
    def from_settings(cls, settings: RouterSettings) -> RouterTokens:
        tokens = cls(
            TokenSet(settings.auth_tokens, settings.auth_token_file or None),
            TokenSet(
                settings.admin_tokens,
                settings.admin_token_file or None,
                default=lambda _: Caller("admin", admin=True),
            ),
            TokenSet(settings.worker_tokens, settings.worker_token_file or None),
            settings.mesh_secret,
        )
        if tokens.users.shares_a_token_with(tokens.workers) or tokens.admins.shares_a_token_with(
            tokens.workers
        ):
            raise ValueError("a token is both a user or admin token and a worker token")
        return tokens

    @property
    def registry_open(self) -> bool:
        return not (self.users.enabled or self.admins.enabled or self.registrants.enabled)

    @property
    def registrants(self) -> Tokens:
        return AnyOf(self.workers, _DerivedShape()) if self.mesh_secret else self.workers

    def trusted(self, token: str) -> bool:
        """Whether a token is one of ours (its open-door calls are not counted as a
        stranger's)."""
        return AnyOf(self.users, self.admins, self.workers).accepts(token) or (
            bool(self.mesh_secret) and looks_derived(token)
        )

    def interceptors(self) -> list[AuthInterceptor]:
        """User (or admin) tokens guard the public services; only worker credentials reach the
        Registry. With no token of any kind everything is open (local development), which is
        logged; with user tokens but no worker credentials the Registry is closed."""
        users = AnyOf(self.admins, self.users)
        if self.registry_open:
            log.warning(
                "no auth_tokens, worker_tokens or mesh_secret are set: anyone who reaches "
                "this router can call it and register workers (fine for local development only)"
            )
        elif not self.registrants.enabled:
            log.warning(
                "no worker_tokens or mesh_secret are set: the Registry refuses every "
                "registration, so only static workers serve"
            )
        return [
            AuthInterceptor(users, USER_PREFIXES),
            # Model control: admin tokens only; a user token is refused by name.
            AuthInterceptor(
                self.admins,
                ADMIN_PREFIXES,
                required=users.enabled,
                refused=self.users,
                refused_message="tessera.v1.Models needs an admin token, not a user token",
            ),
            AuthInterceptor(
                self.registrants,
                REGISTRY_PREFIXES,
                required=not self.registry_open,
                refused=self.users,
                refused_message="a user token cannot register or deregister workers; "
                "workers send a worker credential (the router's worker_tokens or mesh_secret)",
            ),
        ]


def call_tokens(settings: RouterSettings) -> Callable[[str], str]:
    """The bearer token the router calls each worker with: the one derived for its address
    from the mesh secret (so a registrant learns only its own), else worker_call_token."""
    if settings.mesh_secret:
        return lambda address: derive_token(settings.mesh_secret, CALL, address)
    return lambda _: settings.worker_call_token


def body_limits(settings: RouterSettings) -> dict[str, tuple[int, str]]:
    """The largest Generate request the settings allow, by method (checked before parsing)."""
    generate = (
        4 * (settings.max_chat_chars + settings.max_input_chars)
        + 64 * settings.max_chat_messages
        + 64 * 1024
    )
    why = "max_chat_chars, max_chat_messages, max_input_chars"
    return {
        f"/{SERVICE_NAME}/{method}": (generate, why) for method in ("Generate", "GenerateStream")
    }


def refuse_anonymous_exposure(settings: RouterSettings, tokens: RouterTokens) -> None:
    """A router bound beyond loopback without user tokens would serve anyone who reaches it."""
    if is_loopback(settings.host) or tokens.users.enabled or tokens.admins.enabled:
        return
    if settings.allow_anonymous:
        log.warning("serving %s without user tokens (allow_anonymous is set)", settings.host)
        return
    raise SystemExit(
        f"tessera router: refusing to serve on {settings.host} without user tokens: anyone who "
        f"reaches it could use it. Set auth_tokens or auth_token_file, bind 127.0.0.1, or set "
        f"allow_anonymous: true (TESSERA_ROUTER_ALLOW_ANONYMOUS=1) to serve anonymously"
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def version_state_path(settings: RouterSettings) -> Path:
    """Where the models' traffic weights and loaded versions are kept."""
    if settings.version_state:
        return Path(settings.version_state)
    return Path(settings.repository) / VERSIONS_DIR / "state.json"


async def _follow_versions(book: VersionBook, every_s: float = 1.0) -> None:
    """Re-reads the version state when another router (sharing the file) changed it."""
    while True:
        await asyncio.sleep(every_s)
        try:
            if book.reload():
                log.info("model traffic changed on disk; following it")
        except Exception:  # noqa: BLE001 - never let a bad file stop the router
            log.exception("cannot re-read the version state")


async def _signal_versions(
    inference: InferenceService, signals: VersionSignals, every_s: float = 1.0
) -> None:
    """Every second: each admitted version's load, chains and desired chains as gauges."""
    loop = asyncio.get_running_loop()
    while True:
        table = inference.pool.table
        versions: dict[tuple[str, str], dict[str, float]] = {}
        for model in table.models():
            chains = table.chains(model)
            for _, label in table.versions(model, healthy_only=False):
                queued, running, kv = inference.generations.load_of(model, label)
                versions[(model, label)] = {
                    "in_flight": inference.versions.running(model, label),
                    "queued": queued,
                    "running": running,
                    "kv": kv,
                    "chains": sum(1 for c in chains if c.version == label),
                }
        signals.publish(loop.time(), versions)
        await asyncio.sleep(every_s)


async def run_router(
    settings: RouterSettings,
    *,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
    port_out: list[int] | None = None,
) -> int:
    """Serves until SIGINT/SIGTERM (or `stop`), then drains and exits 0."""
    stop = stop or asyncio.Event()
    max_message = settings.max_message_mb * 1024 * 1024 or text_message_bytes(
        settings.max_embed_inputs, settings.max_input_chars
    )
    tokens = RouterTokens.from_settings(settings)
    refuse_anonymous_exposure(settings, tokens)
    pool = WorkerPool(
        list(settings.workers),
        admission=Admission(
            Path(settings.repository),
            frozenset(settings.allowed_fingerprints),
            settings.admission_timeout_s,
        ),
        probe_interval_s=settings.health_interval_s,
        ttl_s=settings.worker_ttl_s,
        recheck_s=settings.recheck_s,
        credentials=channel_credentials(
            settings.worker_ca or None, settings.client_cert or None, settings.client_key or None
        ),
        max_message_bytes=max_message,
        call_token=call_tokens(settings),
    )
    if settings.cache_nodes and not settings.cache_secret:
        log.warning(
            "no cache_secret is set: cached values are sealed with a key of this process "
            "alone, so other routers (and this one after a restart) cannot use them"
        )
    cache = CacheStore(
        settings.cache_nodes,
        timeout_s=settings.cache_timeout_s,
        expire_s=settings.cache_ttl_s,
        tracer=trace.get_tracer("tessera.cache"),
        seal=Seal(settings.cache_secret or None),
        max_value_bytes=settings.cache_max_value_kb * 1024,
    )
    frontends = Frontends(Path(settings.repository))
    callers = Callers(tokens.users, tokens.admins)
    book = VersionBook(version_state_path(settings))
    inference = InferenceService(settings, pool, frontends, cache, callers, book)
    models = ModelsService(settings, pool, book, callers)
    registry = RegistryService(
        pool,
        heartbeat_s=max(settings.worker_ttl_s / 3, 0.5),
        repository=Path(settings.repository),
        limits=RegistryLimits(
            total=settings.max_registrations,
            per_model=settings.max_registrations_per_model,
            per_version=settings.max_registrations_per_version,
        ),
        listed=tokens.workers,
        mesh_secret=settings.mesh_secret,
    )
    served = await serve(
        [
            lambda s: inference_pb2_grpc.add_InferenceServicer_to_server(inference, s),
            lambda s: worker_pb2_grpc.add_RegistryServicer_to_server(registry, s),
            KServeService(inference).add_to_server,
            lambda s: models_pb2_grpc.add_ModelsServicer_to_server(models, s),
        ],
        [SERVICE_NAME, REGISTRY_NAME, KSERVE_NAME, MODELS_NAME],
        host=settings.host,
        port=settings.port,
        tracer_name="tessera.router",
        credentials=server_credentials(
            settings.tls_cert or None,
            settings.tls_key or None,
            settings.tls_client_ca or None,
            require_client_cert=True,
        ),
        interceptors=[*tokens.interceptors(), BodyLimits(body_limits(settings))],
        doors=OpenDoors(DoorLimits.from_settings(settings), tokens.trusted),
        known_models=lambda m: pool.table.knows(m) or (frontends.repository / m).is_dir(),
        max_message_bytes=max_message,
        max_concurrent_rpcs=settings.max_concurrent_rpcs,
        max_concurrent_streams=settings.max_concurrent_streams,
        longest_call_s=settings.request_timeout_s,
    )
    if settings.metrics_port >= 0:
        metrics_port = start_metrics_server(settings.metrics_port, settings.host)
        print(f"tessera router metrics on {settings.host}:{metrics_port}", flush=True)
    health_names: set[str] = set()
    pending: list[asyncio.Task[None]] = []

    health_lock = asyncio.Lock()

    def publish_health(_: RoutingTable) -> None:
        async def update() -> None:
            # Serialised, and always from the newest table: an older update finishing late
            # must not overwrite a newer answer.
            async with health_lock:
                for model in set(pool.table.models()) - health_names:
                    # Load the tokenizer now, not on the model's first request.
                    try:
                        await asyncio.to_thread(frontends.get, model)
                    except Exception:  # noqa: BLE001 - the request path reports it properly
                        log.warning("cannot load the frontend of %s", model, exc_info=True)
                    health_names.add(model)
                table = pool.table
                for model in health_names:
                    await served.set_status(model, bool(table.chains(model)))

        pending[:] = [task for task in pending if not task.done()]
        pending.append(asyncio.ensure_future(update()))

    pool.on_change(publish_health)
    http: web.AppRunner | None = None
    reloading: asyncio.Future[None] | None = None
    signalling: asyncio.Future[None] | None = None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        await pool.start()
        await served.set_status("", True)
        await served.set_status(SERVICE_NAME, True)
        await served.set_status(REGISTRY_NAME, True)
        await served.set_status(KSERVE_NAME, True)
        await served.set_status(MODELS_NAME, True)
        reloading = asyncio.ensure_future(_follow_versions(book))
        signalling = asyncio.ensure_future(
            _signal_versions(inference, VersionSignals(ScalePolicy.from_settings(settings)))
        )
        if port_out is not None:
            port_out.append(served.port)
        if settings.http_port is not None and settings.http_port >= 0:
            front = OpenAIFront(inference, metrics=settings.metrics_port >= 0)
            http, http_port = await serve_http(
                front, settings.host, settings.http_port, max_message
            )
            print(f"tessera router http on {settings.host}:{http_port}", flush=True)
        print(f"tessera router ready on {settings.host}:{served.port}", flush=True)
        if ready is not None:
            ready.set()
        await stop.wait()
        inference.draining = True
        await served.drain()
        deadline = loop.time() + settings.drain_s
        while inference.outstanding and loop.time() < deadline:
            await asyncio.sleep(0.05)
        return 0
    finally:
        for task in (reloading, signalling):
            if task is not None:
                task.cancel()
        await models.close()
        if http is not None:
            await http.cleanup()
        await served.server.stop(grace=1.0)
        await inference.generations.close()
        await pool.close()
        cache.close()
        for task in pending:
            task.cancel()
