"""The load generator: closed-loop grpc.aio callers in this one process and its one event loop.

`closed_loop` keeps `concurrency` requests in flight until `seconds` have passed (and at least
`min_requests` were sent); requests already sent then finish and count. Request factories build
their messages before the clock starts, so the loop itself only sends, awaits and checks.
"""

from __future__ import annotations

import asyncio
import collections
import resource
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.pb.tessera.v1 import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc

# A call takes the global request index and returns (items done, time to first item or None).
Call = Callable[[int], Awaitable[tuple[int, float | None]]]

RPC_TIMEOUT_S = 300.0
MAX_ERRORS = 200  # a line that keeps failing stops early rather than spinning


class BadResponse(Exception):
    """The server answered, but not what the bench asked for (wrong count, not cached, ...)."""


@dataclass
class Outcome:
    latencies_s: list[float] = field(default_factory=list)
    ttfts_s: list[float] = field(default_factory=list)
    items: int = 0
    errors: int = 0
    error_kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    wall_s: float = 0.0
    cpu_s: float = 0.0

    def cpu_share(self, cores: int) -> float | None:
        """This process's CPU time over the line as a share of the machine (wall x cores)."""
        if self.wall_s <= 0 or cores <= 0:
            return None
        return self.cpu_s / (self.wall_s * cores)


def _cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def closed_loop(
    call: Call,
    *,
    concurrency: int,
    seconds: float,
    min_requests: int = 0,
    max_requests: int | None = None,
    start_index: int = 0,
) -> Outcome:
    outcome = Outcome()
    counter = iter(range(start_index, start_index + 10**12))
    issued = 0
    started = time.perf_counter()
    deadline = started + seconds
    cpu_before = _cpu_now()
    last_done = started

    async def one_caller() -> None:
        nonlocal issued, last_done
        while True:
            now = time.perf_counter()
            if now >= deadline and issued >= min_requests:
                return
            if max_requests is not None and issued >= max_requests:
                return
            if outcome.errors >= MAX_ERRORS:
                return
            issued += 1
            index = next(counter)
            sent = time.perf_counter()
            try:
                items, first = await call(index)
            except aio.AioRpcError as error:
                outcome.errors += 1
                outcome.error_kinds[error.code().name] += 1
                continue
            except BadResponse as error:
                outcome.errors += 1
                outcome.error_kinds[str(error)] += 1
                continue
            done = time.perf_counter()
            last_done = max(last_done, done)
            outcome.latencies_s.append(done - sent)
            if first is not None:
                outcome.ttfts_s.append(first - sent)
            outcome.items += items

    await asyncio.gather(*(one_caller() for _ in range(concurrency)))
    outcome.cpu_s = _cpu_now() - cpu_before
    outcome.wall_s = (last_done if outcome.latencies_s else time.perf_counter()) - started
    return outcome


# -- calls ----------------------------------------------------------------------------------


def health_call(channel: aio.Channel, service: str = "") -> Call:
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service=service)

    async def call(index: int) -> tuple[int, float | None]:
        reply = await stub.Check(request, timeout=RPC_TIMEOUT_S)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise BadResponse("not SERVING")
        return 1, None

    return call


def embed_call(
    channel: aio.Channel,
    requests: Sequence[inference_pb2.EmbedRequest],
    *,
    expect_cached: bool = False,
) -> Call:
    """Router Embed; request i is requests[i % len]; checks the vector count (and cache hits)."""
    stub = inference_pb2_grpc.InferenceStub(channel)

    async def call(index: int) -> tuple[int, float | None]:
        request = requests[index % len(requests)]
        reply = await stub.Embed(request, timeout=RPC_TIMEOUT_S)
        count = len(reply.vectors) // (4 * reply.dim) if reply.vectors else len(reply.embeddings)
        if count != len(request.inputs):
            raise BadResponse("wrong vector count")
        if expect_cached and not reply.cached:
            raise BadResponse("not a cache hit")
        return len(request.inputs), None

    return call


def kserve_call(
    address: str, model: str, texts: Sequence[str]
) -> tuple[Call, Callable[[], Awaitable[None]]]:
    """The unmodified tritonclient (grpc.aio) calling ModelInfer with one text per request;
    returns the call and the client's close. Raises ImportError without tritonclient."""
    import numpy as np
    import tritonclient.grpc.aio as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(address)
    inputs = []
    for text in texts:
        tensor = triton.InferInput("text", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([text.encode()], dtype=object))
        inputs.append(tensor)
    outputs = [triton.InferRequestedOutput("embeddings")]

    async def call(index: int) -> tuple[int, float | None]:
        try:
            result = await client.infer(
                model, [inputs[index % len(inputs)]], outputs=outputs, client_timeout=RPC_TIMEOUT_S
            )
        except InferenceServerException as error:
            raise BadResponse(f"ModelInfer {error.status()}") from None
        vectors = result.as_numpy("embeddings")
        if vectors is None or vectors.shape[0] != 1:
            raise BadResponse("wrong vector count")
        return 1, None

    return call, client.close


def forward_call(
    channel: aio.Channel, requests: Sequence[tuple[worker_pb2.StageForwardRequest, int]]
) -> Call:
    """Worker Forward with pool=True, straight to the worker; requests are (message, rows)."""
    stub = worker_pb2_grpc.WorkerStub(channel)

    async def call(index: int) -> tuple[int, float | None]:
        request, rows = requests[index % len(requests)]
        reply = await stub.Forward(request, timeout=RPC_TIMEOUT_S)
        shape = list(reply.hidden_states.shape)
        if len(shape) != 2 or shape[0] != rows:
            raise BadResponse("wrong pooled shape")
        return rows, None

    return call


def generate_stream_call(
    channel: aio.Channel,
    requests: Sequence[inference_pb2.GenerateRequest],
    *,
    expect_cached: bool = False,
) -> Call:
    """Router GenerateStream; items are generated tokens; the first chunk with tokens is TTFT."""
    stub = inference_pb2_grpc.InferenceStub(channel)

    async def call(index: int) -> tuple[int, float | None]:
        request = requests[index % len(requests)]
        tokens = 0
        first: float | None = None
        cached = False
        async for chunk in stub.GenerateStream(request, timeout=RPC_TIMEOUT_S):
            if chunk.token_ids:
                if first is None:
                    first = time.perf_counter()
                tokens += len(chunk.token_ids)
            cached = cached or chunk.cached
        if tokens == 0:
            raise BadResponse("no tokens")
        if expect_cached and not cached:
            raise BadResponse("not a cache hit")
        return tokens, first

    return call
