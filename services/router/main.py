"""`tessera router`: the public front door. Serves Inference + Registry, health per model."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from opentelemetry import trace

from services.cache.seal import Seal
from services.cache.store import CacheStore
from services.common.metrics import start_metrics_server
from services.common.security import (
    AuthInterceptor,
    BearerToken,
    TokenSet,
    channel_credentials,
    server_credentials,
)
from services.common.server import serve, text_message_bytes
from services.common.settings import RouterSettings
from services.pb.tessera.v1 import inference_pb2_grpc, worker_pb2_grpc
from services.router.admission import Admission
from services.router.frontends import Frontends
from services.router.kserve import KSERVE_NAME, KServeService
from services.router.pool import WorkerPool
from services.router.registry import RegistryLimits, RegistryService
from services.router.routing import RoutingTable
from services.router.service import InferenceService

log = logging.getLogger("tessera.router")
SERVICE_NAME = "tessera.v1.Inference"
REGISTRY_NAME = "tessera.v1.Registry"
USER_PREFIXES = ("/tessera.v1.Inference/", "/inference.GRPCInferenceService/")
REGISTRY_PREFIXES = ("/tessera.v1.Registry/",)


def auth_interceptors(settings: RouterSettings) -> list[AuthInterceptor]:
    """User tokens guard the public services; only worker tokens reach the Registry.

    With no token of either kind everything is open (local development), which is logged;
    with user tokens but no worker tokens the Registry is closed (only static workers serve).
    """
    users = TokenSet(settings.auth_tokens, settings.auth_token_file or None)
    workers = TokenSet(settings.worker_tokens, settings.worker_token_file or None)
    if users.shares_a_token_with(workers):
        raise ValueError("a token is both a user token and a worker token; use distinct ones")
    if not users.enabled and not workers.enabled:
        log.warning(
            "no auth_tokens or worker_tokens are set: anyone who reaches this router can "
            "call it and register workers (fine for local development only)"
        )
    elif not workers.enabled:
        log.warning(
            "no worker_tokens are set: the Registry refuses every registration, so only "
            "static workers serve"
        )
    return [
        AuthInterceptor(users, USER_PREFIXES),
        AuthInterceptor(
            workers,
            REGISTRY_PREFIXES,
            required=users.enabled or workers.enabled,
            refused=users,
            refused_message="a user token cannot register or deregister workers; "
            "workers send a worker token (the router's worker_tokens)",
        ),
    ]


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
    interceptors = auth_interceptors(settings)
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
        interceptors=[BearerToken(settings.worker_call_token)]
        if settings.worker_call_token
        else (),
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
    inference = InferenceService(settings, pool, frontends, cache)
    registry = RegistryService(
        pool,
        heartbeat_s=max(settings.worker_ttl_s / 3, 0.5),
        repository=Path(settings.repository),
        limits=RegistryLimits(
            total=settings.max_registrations,
            per_model=settings.max_registrations_per_model,
            per_version=settings.max_registrations_per_version,
        ),
    )
    served = await serve(
        [
            lambda s: inference_pb2_grpc.add_InferenceServicer_to_server(inference, s),
            lambda s: worker_pb2_grpc.add_RegistryServicer_to_server(registry, s),
            KServeService(inference).add_to_server,
        ],
        [SERVICE_NAME, REGISTRY_NAME, KSERVE_NAME],
        host=settings.host,
        port=settings.port,
        tracer_name="tessera.router",
        credentials=server_credentials(
            settings.tls_cert or None,
            settings.tls_key or None,
            settings.tls_client_ca or None,
            require_client_cert=True,
        ),
        interceptors=interceptors,
        known_models=lambda m: pool.table.knows(m) or (frontends.repository / m).is_dir(),
        max_message_bytes=max_message,
        max_concurrent_rpcs=settings.max_concurrent_rpcs,
        max_concurrent_streams=settings.max_concurrent_streams,
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
        if port_out is not None:
            port_out.append(served.port)
        print(f"tessera router ready on {settings.host}:{served.port}", flush=True)
        if ready is not None:
            ready.set()
        await stop.wait()
        inference.draining = True
        await served.health.enter_graceful_shutdown()
        deadline = loop.time() + settings.drain_s
        while inference.outstanding and loop.time() < deadline:
            await asyncio.sleep(0.05)
        return 0
    finally:
        await served.server.stop(grace=1.0)
        await inference.generations.close()
        await pool.close()
        cache.close()
        for task in pending:
            task.cancel()
