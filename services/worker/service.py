"""The Worker servicer: wire messages -> StageModel calls on one model thread -> wire messages."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from grpc import aio
from opentelemetry import trace

from services.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from services.common.metrics import BATCH_ROWS, KV_CACHE_BYTES, LIVE_SESSIONS, QUEUE_DEPTH
from services.common.types import ModelKind, SamplingParams, Span, WorkerDescriptor
from services.pb.tessera.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.worker.batch import (
    ForwardItem,
    StepItem,
    batched_decode,
    group_forward_items,
    run_forward_group,
)
from services.worker.sampling import make_generator, sample
from services.worker.sessions import Session, SessionTable
from services.worker.stage import StageModel
from services.worker.tensors import FLOAT_WIRE, from_torch, to_torch

log = logging.getLogger(__name__)
tracer = trace.get_tracer("tessera.worker")
T = TypeVar("T")

MAX_TOKENS_PER_CALL = 128 * 1024


@dataclass(frozen=True)
class WorkerLimits:
    max_outstanding: int = 64  # requests in flight or queued before RESOURCE_EXHAUSTED
    max_sessions: int = 64  # live generation sessions
    max_kv_bytes: int = 2 * 1024**3  # bytes of KV cache over all sessions
    session_idle_s: float = 60.0  # a session with no step for this long is ended
    max_batch: int = 32  # rows (texts or sessions) in one forward pass
    max_wait_s: float = 0.001  # wait this long for more work before a batch runs


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens, then L2 normalisation, as sentence-transformers does."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * weights).sum(dim=1)
    counts = weights.sum(dim=1).clamp(min=1e-9)
    return F.normalize(summed / counts, p=2, dim=1)


class WorkerService(worker_pb2_grpc.WorkerServicer):
    """Serves one span of one model version. Model work runs on a single dedicated thread."""

    def __init__(
        self, stage: StageModel, descriptor: WorkerDescriptor, limits: WorkerLimits = WorkerLimits()
    ) -> None:
        self.stage = stage
        self.descriptor = descriptor
        self.limits = limits
        self.sessions = SessionTable(limits.max_sessions, limits.max_kv_bytes)
        self.outstanding = 0
        self.draining = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="model")
        self._queue: list[Any] = []
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task[None] | None = None
        self._labels = (descriptor.model, str(descriptor.span))
        self._queue_gauge = QUEUE_DEPTH.labels(*self._labels)
        self._vocab = int(stage.vocab_size)

    # -- plumbing ---------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs fn on the model thread, carrying the trace context along."""
        ctx = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, ctx.run, fn, *args)

    def _admit(self, *, new_work: bool = True) -> None:
        """Counts a request in; refuses new work while draining (UNAVAILABLE: try elsewhere)."""
        if new_work and self.draining:
            raise Unavailable("worker is draining and takes no new work")
        if self.outstanding >= self.limits.max_outstanding:
            raise ResourceExhausted(
                f"worker queue is full ({self.outstanding} requests, max_outstanding)"
            )
        self.outstanding += 1

    def info(self) -> worker_pb2.WorkerInfo:
        d = self.descriptor
        return worker_pb2.WorkerInfo(
            model=d.model,
            version=d.version,
            fingerprint=d.fingerprint,
            span=common_pb2.Span(start=d.span.start, end=d.span.end),
            num_layers=d.num_layers,
            kind=d.kind.value,
            capacity=d.capacity,
            outstanding=self.outstanding,
            live_sessions=len(self.sessions),
            hidden_size=d.hidden_size,
            address=d.address,
        )

    def _sub_span(self, span: common_pb2.Span | None) -> Span:
        if span is None or (span.start == 0 and span.end == 0):
            return self.stage.span
        try:
            sub = Span(span.start, span.end)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if not self.stage.span.contains(sub):
            raise InvalidArgument(f"layers {sub} are outside this worker's span {self.stage.span}")
        return sub

    def _input_ids(self, tensor: common_pb2.Tensor, name: str) -> torch.Tensor:
        ids = to_torch(tensor, name, ndim=2, dtypes=("int64", "int32")).to(torch.int64)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self._vocab):
            raise InvalidArgument(f"{name}: token ids must be in [0, {self._vocab})")
        return ids

    def _hidden(self, tensor: common_pb2.Tensor, name: str) -> torch.Tensor:
        hidden = to_torch(tensor, name, ndim=3, dtypes=FLOAT_WIRE)
        if hidden.shape[-1] != self.descriptor.hidden_size:
            raise InvalidArgument(
                f"{name}: last dimension must be the hidden size "
                f"{self.descriptor.hidden_size}, got {hidden.shape[-1]}"
            )
        return hidden.to(self.stage.dtype)

    def _check_length(self, batch: int, length: int) -> None:
        if length == 0 or batch == 0:
            raise InvalidArgument("inputs are empty")
        if length > self.stage.spec.max_positions:
            raise InvalidArgument(
                f"{length} tokens is over the model's {self.stage.spec.max_positions} positions"
            )
        if batch * length > MAX_TOKENS_PER_CALL:
            raise InvalidArgument(f"{batch}x{length} tokens is over {MAX_TOKENS_PER_CALL} per call")

    # -- stateless forward ------------------------------------------------------------------

    async def Info(
        self, request: worker_pb2.InfoRequest, context: aio.ServicerContext
    ) -> worker_pb2.WorkerInfo:
        return self.info()

    async def Forward(
        self, request: worker_pb2.StageForwardRequest, context: aio.ServicerContext
    ) -> worker_pb2.StageForwardResponse:
        self._admit()
        try:
            sub = self._sub_span(request.span if request.HasField("span") else None)
            if sub.start == 0:
                if not request.HasField("input_ids"):
                    raise InvalidArgument("layer 0 needs input_ids")
                inputs = {"input_ids": self._input_ids(request.input_ids, "input_ids")}
            else:
                if not request.HasField("hidden_states"):
                    raise InvalidArgument(f"layer {sub.start} needs hidden_states")
                inputs = {"hidden_states": self._hidden(request.hidden_states, "hidden_states")}
            first = next(iter(inputs.values()))
            batch, length = int(first.shape[0]), int(first.shape[1])
            self._check_length(batch, length)
            mask = None
            if request.HasField("attention_mask"):
                mask = to_torch(
                    request.attention_mask,
                    "attention_mask",
                    ndim=2,
                    dtypes=("int64", "int32", "bool"),
                ).to(torch.int64)
                if tuple(mask.shape) != (batch, length):
                    raise InvalidArgument(
                        f"attention_mask shape {list(mask.shape)} does not "
                        f"match inputs [{batch}, {length}]"
                    )
                if mask.numel() and (int(mask.min()) < 0 or int(mask.max()) > 1):
                    raise InvalidArgument("attention_mask values must be 0 or 1")
            pool = request.pool
            if pool and sub.end != self.descriptor.num_layers:
                raise InvalidArgument("pooling needs the last layer in the range")
            wire = request.hidden_dtype or "float32"
            if wire not in FLOAT_WIRE:
                raise InvalidArgument(f"hidden_dtype must be one of {', '.join(FLOAT_WIRE)}")
            item = ForwardItem(
                sub=sub,
                input_ids=inputs.get("input_ids"),
                hidden=inputs.get("hidden_states"),
                mask=mask,
                pool=pool,
                future=asyncio.get_running_loop().create_future(),
            )
            with tracer.start_as_current_span("stage.forward") as span:
                span.set_attribute("tessera.span", str(sub))
                span.set_attribute("tessera.rows", batch)
                hidden = await self._submit(item)
                span.set_attribute("tessera.batch_rows", item.batch_rows)
                span.set_attribute("tessera.queue_ms", item.queue_ms)
                span.set_attribute("tessera.compute_ms", item.compute_ms)
            return worker_pb2.StageForwardResponse(hidden_states=from_torch(hidden, wire))
        finally:
            self.outstanding -= 1

    # -- generation sessions ----------------------------------------------------------------

    async def Session(
        self, request_iterator: AsyncIterator[worker_pb2.StepRequest], context: aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.StepResponse]:
        if self.descriptor.kind is not ModelKind.CAUSAL_LM:
            raise InvalidArgument(f"model {self.descriptor.model} is not a causal LM")
        session: Session | None = None
        iterator = aiter(request_iterator)
        try:
            while True:
                try:
                    request = await asyncio.wait_for(
                        anext(iterator), timeout=self.limits.session_idle_s
                    )
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"session idle for {self.limits.session_idle_s:.0f} s; ended"
                    ) from None
                if request.end:
                    return
                if session is None:
                    if self.draining:
                        raise Unavailable("worker is draining and takes no new sessions")
                    session = self._open_session(request)
                self.sessions.check_memory()
                self._admit(new_work=False)
                try:
                    response = await self._step(session, request)
                finally:
                    self.outstanding -= 1
                session.last_used = time.monotonic()
                yield response
        finally:
            if session is not None:
                self.sessions.close(session.session_id)
                LIVE_SESSIONS.labels(*self._labels).set(len(self.sessions))
                KV_CACHE_BYTES.labels(*self._labels).set(self.sessions.kv_bytes())

    def _open_session(self, request: worker_pb2.StepRequest) -> Session:
        s = request.sampling
        params = SamplingParams(
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p if s.top_p > 0 else 1.0,
            seed=s.seed if s.HasField("seed") else None,
        )
        if params.temperature < 0 or params.top_k < 0 or not 0 < params.top_p <= 1:
            raise InvalidArgument("sampling parameters out of range")
        # The table key is ours: a client reusing an id must not slip past max_sessions.
        session = Session(
            f"{request.session_id[:64]}#{uuid.uuid4().hex}",
            self.stage.new_cache(),
            params,
            make_generator(params),
        )
        self.sessions.open(session)
        return session

    async def _step(
        self, session: Session, request: worker_pb2.StepRequest
    ) -> worker_pb2.StepResponse:
        """Validates one step on the loop thread, then queues it for the next batch."""
        if self.stage.is_first:
            if not request.HasField("input_ids"):
                raise InvalidArgument("the first stage needs input_ids")
            tokens = self._input_ids(request.input_ids, "input_ids")
        else:
            if not request.HasField("hidden_states"):
                raise InvalidArgument("a later stage needs hidden_states")
            tokens = self._hidden(request.hidden_states, "hidden_states")
        if tokens.shape[0] != 1:
            raise InvalidArgument("a session step carries one sequence")
        self._check_length(1, session.cached_tokens() + int(tokens.shape[1]))
        wire = request.hidden_dtype or "float32"
        if wire not in FLOAT_WIRE:
            raise InvalidArgument(f"hidden_dtype must be one of {', '.join(FLOAT_WIRE)}")
        item = StepItem(
            session=session,
            tokens=tokens,
            wire=wire,
            future=asyncio.get_running_loop().create_future(),
        )
        with tracer.start_as_current_span("stage.step") as span:
            span.set_attribute("tessera.span", str(self.stage.span))
            span.set_attribute("tessera.tokens", int(tokens.shape[1]))
            response = await self._submit(item)
            span.set_attribute("tessera.batch_rows", item.batch_rows)
            span.set_attribute("tessera.queue_ms", item.queue_ms)
            span.set_attribute("tessera.compute_ms", item.compute_ms)
        return response

    # -- the batch loop ---------------------------------------------------------------------

    async def _submit(self, item: Any) -> Any:
        self._queue.append(item)
        self._wake.set()
        if self._scheduler is None or self._scheduler.done():
            # A fresh context: the loop must not keep the first request's trace forever.
            self._scheduler = asyncio.create_task(self._schedule(), context=contextvars.Context())
        return await item.future

    async def _schedule(self) -> None:
        """Takes everything queued, groups it into batches, runs them on the model thread."""
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
            if self.limits.max_wait_s > 0 and len(self._queue) < self.limits.max_batch:
                await asyncio.sleep(self.limits.max_wait_s)
            items = [i for i in self._queue if not i.future.done()]
            self._queue.clear()
            self._queue_gauge.set(len(items))
            steps = [i for i in items if isinstance(i, StepItem)]
            forwards = [i for i in items if isinstance(i, ForwardItem)]
            # A decode step adds one token to a session that already has a cache; a first step
            # (a prefill, even of a one-token prompt) has no cache to pad and runs on its own.
            decodes = [i for i in steps if i.tokens.shape[1] == 1 and i.session.cached_tokens() > 0]
            prefills = [i for i in steps if not any(i is d for d in decodes)]
            groups: list[list[Any]] = [
                decodes[i : i + self.limits.max_batch]
                for i in range(0, len(decodes), self.limits.max_batch)
            ]
            groups += [[i] for i in prefills]
            groups += group_forward_items(forwards, self.limits.max_batch, MAX_TOKENS_PER_CALL)
            for group in groups:
                started = time.perf_counter()
                try:
                    if isinstance(group[0], StepItem):
                        results = await self._run(self._execute_steps, group)
                    else:
                        results = await self._run(run_forward_group, self.stage, group, mean_pool)
                except Exception as exc:  # noqa: BLE001 - handed to every waiting handler
                    for item in group:
                        if not item.future.done():
                            item.future.set_exception(exc)
                    continue
                finished = time.perf_counter()
                rows = sum(getattr(i, "rows", 1) for i in group)
                kind = "step" if isinstance(group[0], StepItem) else "forward"
                BATCH_ROWS.labels(*self._labels, kind).observe(rows)
                for item, result in zip(group, results):
                    item.queue_ms = (started - item.enqueued) * 1e3
                    item.compute_ms = (finished - started) * 1e3
                    item.batch_rows = rows
                    if not item.future.done():
                        item.future.set_result(result)
            self._queue_gauge.set(len(self._queue))
            if steps:
                LIVE_SESSIONS.labels(*self._labels).set(len(self.sessions))
                KV_CACHE_BYTES.labels(*self._labels).set(self.sessions.kv_bytes())

    def _execute_steps(self, group: list[StepItem]) -> list[worker_pb2.StepResponse]:
        """One forward for a group of session steps (on the model thread)."""
        if len(group) == 1:
            item = group[0]
            kwargs = (
                {"input_ids": item.tokens}
                if self.stage.is_first
                else {"hidden_states": item.tokens}
            )
            hidden = self.stage.forward(cache=item.session.cache, **kwargs)
        else:
            hidden, grown = batched_decode(
                self.stage, [i.session.cache for i in group], [i.tokens for i in group]
            )
            for item, cache in zip(group, grown):
                item.session.cache = cache
        responses = []
        if self.stage.is_last:
            logits = self.stage.logits(hidden[:, -1, :])
            for row, item in enumerate(group):
                cached = item.session.cached_tokens()
                token = sample(
                    logits[row], item.session.sampling, item.session.generator, position=cached
                )
                responses.append(worker_pb2.StepResponse(token_id=token, cached_tokens=cached))
            return responses
        for row, item in enumerate(group):
            responses.append(
                worker_pb2.StepResponse(
                    hidden_states=from_torch(hidden[row : row + 1], item.wire),
                    cached_tokens=item.session.cached_tokens(),
                )
            )
        return responses

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
