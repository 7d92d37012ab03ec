"""The hop loop for stateless work (Embed, Forward): one gRPC call per stage, in order.

Also how a worker's status becomes what the router does with it (`translate`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import grpc
from grpc import aio
from opentelemetry import trace

from services.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    ServiceError,
)
from services.common.telemetry import outgoing_metadata
from services.common.tensors import validate
from services.common.types import Hop
from services.pb.tessera.v1 import common_pb2, worker_pb2
from services.router.pool import WorkerPool

tracer = trace.get_tracer("tessera.router")

CLOSE_TIMEOUT_S = 2.0  # a finished session's streams get this long to close cleanly

# Codes after which the same work may be tried on another chain.
RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED}
)
# Codes no admitted worker may answer: the worker is dropped (admitted again only after it
# passes admission) and the work is retried elsewhere, so the client never sees them.
MISBEHAVING = frozenset({grpc.StatusCode.UNIMPLEMENTED})


class HopFailed(Exception):
    """A worker failed at the transport; the work may be retried on another chain."""

    def __init__(self, address: str, detail: str) -> None:
        super().__init__(f"worker {address} failed: {detail}")
        self.address = address


def misbehaved(pool: WorkerPool, address: str, problem: str) -> HopFailed:
    """An admitted worker answered what no honest one would: it is dropped (until it passes
    admission again) and the work is retried on another chain."""
    pool.reject(address, problem)
    return HopFailed(address, problem)


def translate(error: aio.AioRpcError, address: str, pool: WorkerPool) -> Exception:
    """Maps a worker's status to what the router does with it."""
    code = error.code()
    if code in RETRYABLE:
        pool.mark_failed(address)
        return HopFailed(address, f"{code.name}: {error.details()}")
    if code in MISBEHAVING:
        pool.reject(address, f"a call was answered {code.name}")
        return HopFailed(address, f"{code.name}: {error.details()}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"deadline passed while worker {address} was working")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(error.details() or f"worker {address} is at capacity")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return _ForwardedInvalid(error.details() or "invalid input")
    return ServiceError(f"worker {address} failed with {code.name}: {error.details()}")


class _ForwardedInvalid(ServiceError):
    """A worker rejected input; the caller decides whether the client or the router is at fault."""

    code = grpc.StatusCode.INVALID_ARGUMENT


@contextmanager
def _counted(pool: WorkerPool, address: str) -> Iterator[None]:
    pool.load[address] = pool.load.get(address, 0) + 1
    try:
        yield
    finally:
        pool.load[address] -= 1


def ids_tensor(rows: Sequence[Sequence[int]]) -> common_pb2.Tensor:
    import numpy as np

    from services.common.tensors import from_numpy

    return from_numpy(np.asarray(rows, dtype=np.int64).reshape(len(rows), -1))


async def run_forward(
    pool: WorkerPool,
    hops: Sequence[Hop],
    *,
    input_ids: common_pb2.Tensor | None,
    hidden_states: common_pb2.Tensor | None,
    attention_mask: common_pb2.Tensor | None,
    pool_output: bool,
    timeout: float,
    hidden_dtype: str = "float32",
    output_dtype: str = "float32",
) -> common_pb2.Tensor:
    """Runs hops in order; the first takes input_ids or hidden_states, each next one the last's.

    Hidden states travel between stages as `hidden_dtype`; the last hop answers in
    `output_dtype` (pooled vectors are float32 whatever travels between stages)."""
    current = hidden_states
    first = input_ids if input_ids is not None else hidden_states
    assert first is not None
    rows, width = int(first.shape[0]), int(first.shape[1])
    last = len(hops) - 1
    for index, hop in enumerate(hops):
        request = worker_pb2.StageForwardRequest(
            span=common_pb2.Span(start=hop.span.start, end=hop.span.end),
            pool=pool_output and index == last,
            hidden_dtype=output_dtype if index == last else hidden_dtype,
        )
        if index == 0 and input_ids is not None:
            request.input_ids.CopyFrom(input_ids)
        else:
            assert current is not None
            request.hidden_states.CopyFrom(current)
        if attention_mask is not None:
            request.attention_mask.CopyFrom(attention_mask)
        with (
            _counted(pool, hop.address),
            tracer.start_as_current_span(
                f"hop {hop.span}",
                attributes={"tessera.worker": hop.address, "tessera.span": str(hop.span)},
            ),
        ):
            try:
                response = await pool.stub(hop.address).Forward(
                    request, timeout=timeout, metadata=outgoing_metadata()
                )
            except aio.AioRpcError as error:
                raise translate(error, hop.address, pool) from None
        current = response.hidden_states
        pooled = request.pool
        problem = malformed(current, rows, None if pooled else width, request.hidden_dtype)
        if problem:
            raise misbehaved(pool, hop.address, f"its Forward answer {problem}")
    assert current is not None
    return current


def malformed(tensor: common_pb2.Tensor, rows: int, width: int | None, dtype: str) -> str:
    """What is wrong with a Forward answer for `rows` x `width` inputs ('' if nothing):
    pooled answers (width None) are [rows, H], others [rows, width, H], all in `dtype`."""
    try:
        shape = validate(tensor, "hidden_states", dtypes=(dtype,))
    except InvalidArgument as exc:
        return exc.message[:200]
    want = (rows,) if width is None else (rows, width)
    if len(shape) != len(want) + 1 or shape[: len(want)] != want or shape[-1] <= 0:
        wanted = [*want, "H"]
        return f"has shape {list(shape)[:8]}, not {wanted}"
    return ""
