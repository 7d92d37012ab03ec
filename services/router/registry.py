"""The Registry servicer on the router: workers announce themselves and renew by heartbeat."""

from __future__ import annotations

from grpc import aio

from services.common.errors import InvalidArgument
from services.common.types import ModelKind
from services.pb.tessera.v1 import worker_pb2, worker_pb2_grpc
from services.router.pool import WorkerPool

MAX_LAYERS = 4096


class RegistryService(worker_pb2_grpc.RegistryServicer):
    """Workers announce themselves here and renew by heartbeat."""

    def __init__(self, pool: WorkerPool, heartbeat_s: float) -> None:
        self.pool = pool
        self.heartbeat_s = heartbeat_s

    async def Register(
        self, request: worker_pb2.RegisterRequest, context: aio.ServicerContext
    ) -> worker_pb2.RegisterResponse:
        info = request.worker
        if not info.address or not info.model or len(info.model) > 128:
            raise InvalidArgument("a registration needs an address and a model name")
        if (
            not 0 < info.num_layers <= MAX_LAYERS
            or not 0 <= info.span.start < info.span.end <= info.num_layers
        ):
            raise InvalidArgument(
                f"span [{info.span.start}, {info.span.end}) must lie inside "
                f"[0, num_layers] with 0 < num_layers <= {MAX_LAYERS}"
            )
        if info.hidden_size <= 0:
            raise InvalidArgument("hidden_size must be positive")
        try:
            ModelKind(info.kind)
        except ValueError:
            raise InvalidArgument(f"unknown model kind {info.kind!r}") from None
        self.pool.register(info)
        return worker_pb2.RegisterResponse(heartbeat_seconds=self.heartbeat_s)

    async def Deregister(
        self, request: worker_pb2.DeregisterRequest, context: aio.ServicerContext
    ) -> worker_pb2.DeregisterResponse:
        self.pool.deregister(request.address)
        return worker_pb2.DeregisterResponse()
