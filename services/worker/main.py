"""`tessera worker`: load a span, warm it up, serve it, register with routers, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal

import grpc
import torch
from grpc import aio

from services.common.doors import DoorLimits, OpenDoors
from services.common.metrics import start_metrics_server
from services.common.repository import fingerprint, model_spec, version_of
from services.common.security import (
    CALL,
    REGISTER,
    AnyOf,
    AuthInterceptor,
    Caller,
    TokenSet,
    channel_credentials,
    derive_token,
    open_channel,
    server_credentials,
)
from services.common.server import (
    CHANNEL_OPTIONS,
    ROUTED_POSITIONS,
    hidden_message_bytes,
    serve,
)
from services.common.settings import WorkerSettings
from services.common.types import ModelKind, Span, WorkerDescriptor
from services.pb.tessera.v1 import worker_pb2, worker_pb2_grpc
from services.worker.prefix_tier import PrefixTier
from services.worker.service import WorkerLimits, WorkerService
from services.worker.stage import StageModel

log = logging.getLogger("tessera.worker")
SERVICE_NAME = "tessera.v1.Worker"


def build_service(settings: WorkerSettings, address: str) -> WorkerService:
    """Loads the model span named by settings and wraps it in a servicer (blocking)."""
    from pathlib import Path

    spec = model_spec(Path(settings.repository), settings.model, settings.version)
    if settings.version and spec.path == Path(settings.repository) / settings.model:
        raise ValueError(f"model {settings.model!r} has no published version {settings.version!r}")
    span = (
        Span.parse(settings.layers, spec.num_layers)
        if settings.layers
        else Span(0, spec.num_layers)
    )
    # The precision is part of the fingerprint: chains and cache keys never mix precisions.
    digest = fingerprint(spec.path, settings.precision)
    stage = StageModel(
        spec, span, precision=settings.precision, attn_implementation=settings.attention
    )
    descriptor = WorkerDescriptor(
        address=address,
        model=spec.name,
        version=version_of(spec.path, digest, settings.precision),
        fingerprint=digest,
        span=span,
        num_layers=spec.num_layers,
        kind=spec.kind,
        capacity=settings.max_rows
        if spec.kind is ModelKind.CAUSAL_LM
        else settings.max_outstanding,
        hidden_size=spec.hidden_size,
        precision=settings.precision,
    )
    tier = (
        PrefixTier(
            settings.prefix_nodes,
            settings.prefix_secret,
            layers=len(span),
            kv_bytes_per_token=stage.kv_bytes_per_token,
            timeout_s=settings.prefix_timeout_s,
        )
        if settings.prefix_nodes and spec.kind is ModelKind.CAUSAL_LM
        else None
    )
    service = WorkerService(stage, descriptor, WorkerLimits.from_settings(settings), tier)
    warm_up(stage)
    return service


def _hidden_size(settings: WorkerSettings) -> int:
    """The served model's hidden size, from its config alone (before the weights load)."""
    from pathlib import Path

    return model_spec(Path(settings.repository), settings.model, settings.version).hidden_size


def warm_up(stage: StageModel) -> None:
    """One small pass so the first request does not pay for lazy initialisation."""
    ids = torch.ones(1, 4, dtype=torch.int64)
    hidden = torch.zeros(1, 4, stage.spec.hidden_size, dtype=stage.dtype)
    out = stage.forward(
        input_ids=ids if stage.is_first else None, hidden_states=None if stage.is_first else hidden
    )
    if stage.is_last and stage.lm_head is not None:
        stage.logits(out[:, -1, :])


async def _register_loop(
    service: WorkerService, settings: WorkerSettings, stop: asyncio.Event
) -> None:
    routers, interval = settings.routers, settings.heartbeat_s
    credentials = channel_credentials(
        settings.router_ca or None, settings.client_cert or None, settings.client_key or None
    )
    metadata = (
        [("authorization", f"Bearer {settings.router_token}")] if settings.router_token else []
    )
    channels = {r: open_channel(r, credentials, CHANNEL_OPTIONS) for r in routers}
    warned: set[str] = set()
    try:
        while not stop.is_set():
            wait = interval
            for router, channel in channels.items():
                try:
                    reply = await worker_pb2_grpc.RegistryStub(channel).Register(
                        worker_pb2.RegisterRequest(worker=service.info()),
                        timeout=2.0,
                        metadata=metadata,
                    )
                    # The router says how often it needs renewals to keep us registered.
                    if reply.heartbeat_seconds > 0:
                        wait = min(wait, reply.heartbeat_seconds)
                    warned.discard(router)
                except grpc.RpcError as exc:
                    if router not in warned:
                        # The router says which credential it wants (router_token must be one
                        # of its worker_tokens; a user token is PERMISSION_DENIED).
                        log.warning(
                            "cannot register with router %s: %s %s",
                            router,
                            exc.code(),
                            exc.details() if isinstance(exc, grpc.Call) else "",
                        )
                        warned.add(router)
            try:
                await asyncio.wait_for(stop.wait(), timeout=wait)
            except TimeoutError:
                pass
        for channel in channels.values():
            try:
                await worker_pb2_grpc.RegistryStub(channel).Deregister(
                    worker_pb2.DeregisterRequest(address=service.descriptor.address),
                    timeout=2.0,
                    metadata=metadata,
                )
            except grpc.RpcError:
                pass
    finally:
        for channel in channels.values():
            await channel.close()


async def run_worker(
    settings: WorkerSettings,
    *,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Serves until SIGINT/SIGTERM (or `stop`), then drains and exits 0."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    stop = stop or asyncio.Event()
    holder: dict[str, WorkerService] = {}

    def add(server: aio.Server) -> None:
        worker_pb2_grpc.add_WorkerServicer_to_server(_Late(holder), server)

    credentials = server_credentials(
        settings.tls_cert or None,
        settings.tls_key or None,
        settings.tls_client_ca or None,
        require_client_cert=True,
    )
    own = _OwnCallToken()  # derived from the mesh secret once the address is known
    callers = TokenSet(settings.caller_tokens, settings.caller_token_file or None)
    accepted = AnyOf(callers, own) if settings.mesh_secret else callers
    served = await serve(
        [add],
        [SERVICE_NAME],
        host=settings.host,
        port=settings.port,
        tracer_name="tessera.worker",
        credentials=credentials,
        interceptors=[AuthInterceptor(accepted, [f"/{SERVICE_NAME}/"])],
        doors=OpenDoors(DoorLimits.from_settings(settings), accepted.accepts),
        known_models=lambda m: m == settings.model,
        max_message_bytes=settings.max_message_mb * 1024 * 1024
        or hidden_message_bytes(ROUTED_POSITIONS, _hidden_size(settings)),
        max_concurrent_rpcs=settings.max_concurrent_rpcs,
        max_concurrent_streams=settings.max_concurrent_streams,
    )
    if settings.metrics_port >= 0:
        metrics_port = start_metrics_server(settings.metrics_port, settings.host)
        print(f"tessera worker metrics on {settings.host}:{metrics_port}", flush=True)
    address = settings.advertise or f"{settings.host}:{served.port}"
    if settings.mesh_secret:
        own.token = derive_token(settings.mesh_secret, CALL, address)
        settings.router_token = settings.router_token or derive_token(
            settings.mesh_secret, REGISTER, address
        )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        service = await asyncio.to_thread(build_service, settings, address)
        holder["service"] = service
        await served.set_status("", True)
        await served.set_status(SERVICE_NAME, True)
        log.info(
            "worker ready: %s %s layers %s on %s",
            service.descriptor.model,
            service.descriptor.version,
            service.descriptor.span,
            address,
        )
        print(
            f"tessera worker ready: {settings.model} layers {service.descriptor.span} on {address}",
            flush=True,
        )
        if ready is not None:
            ready.set()
        registration = asyncio.create_task(_register_loop(service, settings, stop))
        await stop.wait()
        # Drain: say NOT_SERVING, refuse new work, let what is in flight finish, deregister.
        service.draining = True
        await served.drain()
        await registration
        deadline = loop.time() + settings.drain_s
        while (service.outstanding or service.engine.rows) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        service.shutdown()
        return 0
    finally:
        await served.server.stop(grace=1.0)


class _OwnCallToken:
    """The caller token derived for this worker's own address (set once the port is bound)."""

    enabled = True
    token = ""

    def caller(self, token: str) -> Caller | None:
        if self.token and hmac.compare_digest(self.token.encode(), token.encode()):
            return Caller("router")
        return None

    def accepts(self, token: str) -> bool:
        return self.caller(token) is not None


class _Late(worker_pb2_grpc.WorkerServicer):
    """Answers UNAVAILABLE until the model is loaded, then delegates to the real servicer."""

    def __init__(self, holder: dict[str, WorkerService]) -> None:
        self._holder = holder

    def _service(self) -> WorkerService:
        from services.common.errors import Unavailable

        service = self._holder.get("service")
        if service is None:
            raise Unavailable("worker is still loading its model")
        return service

    async def Info(
        self, request: worker_pb2.InfoRequest, context: aio.ServicerContext
    ) -> worker_pb2.WorkerInfo:
        return await self._service().Info(request, context)

    async def Forward(
        self, request: worker_pb2.StageForwardRequest, context: aio.ServicerContext
    ) -> worker_pb2.StageForwardResponse:
        return await self._service().Forward(request, context)

    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: aio.ServicerContext
    ) -> worker_pb2.StepResult:
        return await self._service().Prefill(request, context)

    async def Decode(
        self, request: worker_pb2.DecodeRequest, context: aio.ServicerContext
    ) -> worker_pb2.StepResult:
        return await self._service().Decode(request, context)

    async def Filter(
        self, request: worker_pb2.FilterRequest, context: aio.ServicerContext
    ) -> worker_pb2.FilterResponse:
        return await self._service().Filter(request, context)

    async def Clear(
        self, request: worker_pb2.ClearRequest, context: aio.ServicerContext
    ) -> worker_pb2.ClearResponse:
        return await self._service().Clear(request, context)
