"""The Worker servicer: wire messages -> StageModel calls on one model thread -> wire messages."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from grpc import aio
from opentelemetry import trace

from services.common.errors import Draining, InvalidArgument, ResourceExhausted
from services.common.metrics import (
    BATCH_ROWS,
    KV_CACHE_BYTES,
    LIVE_SESSIONS,
    QUEUE_DEPTH,
    STEP_SECONDS,
    VLLM_KV,
    VLLM_RUNNING,
    WORKER_KV,
)
from services.common.settings import WorkerSettings
from services.common.types import ModelKind, SamplingParams, Span, WorkerDescriptor
from services.pb.tessera.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.worker.batch import Row
from services.worker.engine import GenerationEngine, StepOutput
from services.worker.forwarding import (
    ForwardItem,
    PassCost,
    PooledRows,
    group_forward_items,
    run_forward_group,
    run_pass,
)
from services.worker.prefix import PrefixStore
from services.worker.prefix_tier import PrefixTier
from services.worker.stage import StageModel
from services.worker.tensors import FLOAT_WIRE, from_torch, to_torch

log = logging.getLogger(__name__)
tracer = trace.get_tracer("tessera.worker")
T = TypeVar("T")

MAX_TOKENS_PER_CALL = 128 * 1024
MAX_BATCH_ID_CHARS = 128
EXPIRE_EVERY_S = 1.0


@dataclass(frozen=True)
class WorkerLimits:
    """The worker settings its servicer enforces (their declarations: WorkerSettings)."""

    max_outstanding: int
    max_rows: int
    max_kv_bytes: int
    batch_idle_s: float
    max_batch: int

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> WorkerLimits:
        return cls(
            max_outstanding=settings.max_outstanding,
            max_rows=settings.max_rows,
            max_kv_bytes=settings.max_kv_mb * 1024 * 1024,
            batch_idle_s=settings.batch_idle_s,
            max_batch=settings.max_batch,
        )


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens, then L2 normalisation, as sentence-transformers does."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * weights).sum(dim=1)
    counts = weights.sum(dim=1).clamp(min=1e-9)
    return F.normalize(summed / counts, p=2, dim=1)


class WorkerService(worker_pb2_grpc.WorkerServicer):
    """Serves one span of one model version. Model work runs on a single dedicated thread."""

    def __init__(
        self,
        stage: StageModel,
        descriptor: WorkerDescriptor,
        limits: WorkerLimits | None = None,
        tier: PrefixTier | None = None,
    ) -> None:
        limits = limits or WorkerLimits.from_settings(WorkerSettings())
        self.stage = stage
        self.descriptor = descriptor
        self.limits = limits
        self.engine = GenerationEngine(
            stage,
            budget_tokens=limits.max_kv_bytes // stage.kv_bytes_per_token,
            max_rows=limits.max_rows,
            idle_s=limits.batch_idle_s,
            prefixes=PrefixStore(
                f"{descriptor.fingerprint}|{descriptor.span}|{descriptor.precision}"
            ),
        )
        self.tier = tier  # prompts' KV blocks shared through memcached
        self.engine.shared = tier is not None
        self._expired_at = time.monotonic()
        self.outstanding = 0
        self.draining = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="model")
        self._queue: list[ForwardItem] = []
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task[None] | None = None
        self._labels = (descriptor.model, str(descriptor.span))
        self._queue_gauge = QUEUE_DEPTH.labels(*self._labels)
        self._rows_histogram = BATCH_ROWS.labels(*self._labels, "forward")
        self._pass_cost = PassCost()
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
            raise Draining("worker is draining and takes no new work")
        if self.outstanding >= self.limits.max_outstanding:
            raise ResourceExhausted(
                f"worker queue is full ({self.outstanding} requests, max_outstanding)"
            )
        self.outstanding += 1

    def info(self) -> worker_pb2.WorkerInfo:
        info = self.descriptor.to_pb()
        info.kv_token_budget = self.engine.budget_tokens
        info.outstanding = self.outstanding
        info.live_sessions = self.engine.rows
        info.kv_tokens = self.engine.kv_tokens
        info.live_batches = len(self.engine.batches)
        return info

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
        return self._input_ids_checked(ids, name)

    def _input_ids_checked(self, ids: torch.Tensor, name: str) -> torch.Tensor:
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

    # -- generation batches -----------------------------------------------------------------

    def _generation(self) -> None:
        if self.descriptor.kind is not ModelKind.CAUSAL_LM:
            raise InvalidArgument(f"model {self.descriptor.model} is not a causal LM")

    def _batch_id(self, batch_id: str) -> str:
        if not batch_id or len(batch_id) > MAX_BATCH_ID_CHARS:
            raise InvalidArgument(f"batch ids are 1 to {MAX_BATCH_ID_CHARS} characters")
        return batch_id

    def _wire(self, hidden_dtype: str) -> str:
        wire = hidden_dtype or "float32"
        if wire not in FLOAT_WIRE:
            raise InvalidArgument(f"hidden_dtype must be one of {', '.join(FLOAT_WIRE)}")
        return wire

    def _rows(self, request: worker_pb2.PrefillRequest) -> list[Row]:
        if not request.rows:
            raise InvalidArgument("a prefill needs rows")
        if len({r.request_id for r in request.rows}) != len(request.rows):
            raise InvalidArgument("request ids repeat within the batch")
        return [
            Row(
                int(r.request_id),
                int(r.length),
                int(r.max_tokens),
                SamplingParams.from_pb(r.sampling),
                replay=list(r.generated),
                tokens=list(r.tokens),
            )
            for r in request.rows
        ]

    def _result(self, out: StepOutput, wire: str) -> worker_pb2.StepResult:
        result = worker_pb2.StepResult(batch_id=out.batch_id, kv_tokens=out.kv_tokens)
        if out.tokens is not None:
            result.token_ids.extend(out.tokens)
        if out.logprobs is not None:
            for found in out.logprobs:
                entry = result.logprobs.add()
                if found is not None:
                    entry.token_id, entry.logprob = found.token_id, found.logprob
                    entry.top_ids.extend(found.top_ids)
                    entry.top_logprobs.extend(found.top_logprobs)
        if out.hidden is not None:
            result.hidden_states.CopyFrom(from_torch(out.hidden, wire))
        return result

    async def _step(self, name: str, fn: Callable[..., StepOutput], *args: Any) -> StepOutput:
        """Runs one generation step on the model thread, traced, counted and with metrics."""
        if name == "prefill":
            self._admit()
        else:
            # A running batch's step is never refused: its rows already hold their KV.
            self.outstanding += 1
        try:
            with tracer.start_as_current_span(f"stage.{name}") as span:
                span.set_attribute("tessera.span", str(self.stage.span))
                submitted = time.perf_counter()
                began: list[float] = []

                def timed() -> StepOutput:
                    began.append(time.perf_counter())
                    return fn(*args)

                out = await self._run(timed)
                done = time.perf_counter()
                span.set_attribute("tessera.queue_ms", (began[0] - submitted) * 1e3)
                span.set_attribute("tessera.compute_ms", (done - began[0]) * 1e3)
                rows = (
                    len(out.tokens)
                    if out.tokens is not None
                    else (int(out.hidden.shape[0]) if out.hidden is not None else 0)
                )
                span.set_attribute("tessera.batch_rows", rows)
            BATCH_ROWS.labels(*self._labels, name).observe(rows)
            STEP_SECONDS.labels(*self._labels, name, "queue").observe(began[0] - submitted)
            STEP_SECONDS.labels(*self._labels, name, "compute").observe(done - began[0])
            return out
        finally:
            self.outstanding -= 1
            self._observe_generation()

    def _observe_generation(self) -> None:
        engine = self.engine
        LIVE_SESSIONS.labels(*self._labels).set(engine.rows)
        KV_CACHE_BYTES.labels(*self._labels).set(engine.kv_bytes())
        usage = engine.kv_tokens / engine.budget_tokens if engine.budget_tokens else 0.0
        WORKER_KV.labels(*self._labels).set(usage)
        VLLM_KV.labels(self._labels[0]).set(usage)
        VLLM_RUNNING.labels(self._labels[0]).set(engine.rows)
        now = time.monotonic()
        if now - self._expired_at > EXPIRE_EVERY_S and self.engine.batches:
            self._expired_at = now
            asyncio.get_running_loop().run_in_executor(self._executor, self._expire)

    def _expire(self) -> None:
        for batch_id in self.engine.expire():
            log.warning("freed batch %s: no step for %.0f s", batch_id, self.engine.idle_s)

    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: aio.ServicerContext
    ) -> worker_pb2.StepResult:
        self._generation()
        batch_id = self._batch_id(request.batch_id)
        rows = self._rows(request)
        wire = self._wire(request.hidden_dtype)
        if self.stage.is_first:
            if not request.HasField("input_ids"):
                raise InvalidArgument("the first stage needs input_ids")
            inputs = self._input_ids(request.input_ids, "input_ids")
        else:
            if not request.HasField("hidden_states"):
                raise InvalidArgument("a later stage needs hidden_states")
            inputs = self._hidden(request.hidden_states, "hidden_states")
        if int(inputs.shape[0]) != len(rows):
            raise InvalidArgument(f"{int(inputs.shape[0])} input rows for {len(rows)} rows")
        self._check_length(len(rows), int(inputs.shape[1]))
        start, width = int(request.chunk_start), int(request.width)
        if width:
            self._check_length(len(rows), width)
        merge_into = request.merge_into[:MAX_BATCH_ID_CHARS]
        input_dtype = "ids" if self.stage.is_first else request.hidden_states.dtype
        if request.from_prefix and self.tier is not None:
            await self._fetch_prefixes(rows, start, width, input_dtype)
        prefill = functools.partial(
            self.engine.prefill,
            start=start,
            width=width,
            more=request.more,
            from_prefix=request.from_prefix,
            input_dtype=input_dtype,
        )
        # A later chunk continues a batch this worker holds: like a decode step, never refused.
        name = "chunk" if start and not request.from_prefix else "prefill"
        out = await self._step(name, prefill, batch_id, rows, inputs, merge_into)
        if self.tier is not None and not request.more:
            self.tier.write(await self._run(self.engine.take_fresh))
        return self._result(out, wire)

    async def _fetch_prefixes(self, rows: list[Row], start: int, width: int, dtype: str) -> None:
        """The cached blocks a prefill needs that this stage lacks, read from the shared tier
        (what it does not find, the prefill refuses as PrefixMissing)."""
        assert self.tier is not None
        missing = await self._run(self.engine.missing, rows, start, width, dtype)
        if missing:
            with tracer.start_as_current_span("stage.prefix_fetch") as span:
                found = await self.tier.fetch(missing)
                kept = await self._run(self.engine.adopt, found)
                span.set_attribute("tessera.blocks_missing", len(missing))
                span.set_attribute("tessera.blocks_fetched", kept)

    async def Decode(
        self, request: worker_pb2.DecodeRequest, context: aio.ServicerContext
    ) -> worker_pb2.StepResult:
        self._generation()
        if not request.batch_ids:
            raise InvalidArgument("a decode names at least one batch")
        batch_ids = [self._batch_id(b) for b in request.batch_ids]
        wire = self._wire(request.hidden_dtype)
        if self.stage.is_first:
            if not request.HasField("input_ids"):
                raise InvalidArgument("the first stage needs input_ids")
            ids = to_torch(request.input_ids, "input_ids", ndim=1, dtypes=("int64", "int32"))
            inputs = self._input_ids_checked(ids.to(torch.int64), "input_ids")
        else:
            if not request.HasField("hidden_states"):
                raise InvalidArgument("a later stage needs hidden_states")
            inputs = self._hidden(request.hidden_states, "hidden_states")
            if int(inputs.shape[1]) != 1:
                raise InvalidArgument("a decode step carries one position per row")
        if int(inputs.shape[0]) == 0:
            raise InvalidArgument("inputs are empty")
        out = await self._step("decode", self.engine.decode, batch_ids, inputs)
        return self._result(out, wire)

    async def Filter(
        self, request: worker_pb2.FilterRequest, context: aio.ServicerContext
    ) -> worker_pb2.FilterResponse:
        self._generation()
        batch_id = self._batch_id(request.batch_id)
        held = await self._run(self.engine.filter, batch_id, list(request.keep))
        self._observe_generation()
        return worker_pb2.FilterResponse(kv_tokens=held)

    async def Clear(
        self, request: worker_pb2.ClearRequest, context: aio.ServicerContext
    ) -> worker_pb2.ClearResponse:
        batch_ids = [b for b in request.batch_ids if 0 < len(b) <= MAX_BATCH_ID_CHARS]
        await self._run(self.engine.clear, batch_ids)
        self._observe_generation()
        return worker_pb2.ClearResponse()

    # -- the batch loop ---------------------------------------------------------------------

    async def _submit(self, item: ForwardItem) -> torch.Tensor:
        self._queue.append(item)
        self._wake.set()
        if self._scheduler is None or self._scheduler.done():
            # A fresh context: the loop must not keep the first request's trace forever.
            self._scheduler = asyncio.create_task(self._schedule(), context=contextvars.Context())
        return await item.future

    async def _schedule(self) -> None:
        """Runs queued Forward work on the model thread, one pass at a time.

        Work that arrives while the model is idle runs at once (no timer). Pooled work (Embed)
        is re-planned before every pass with whatever arrived during the last one; unpooled
        work (Forward) runs in length-grouped batches of whole items."""
        pooled: dict[tuple[Span, bool, bool], PooledRows] = {}
        while True:
            if not self._queue and not any(pooled.values()):
                self._wake.clear()
                await self._wake.wait()
            unpooled: list[ForwardItem] = []
            for item in self._queue:
                if item.future.done():
                    continue
                if item.pool:
                    pooled.setdefault(item.key(), PooledRows()).add(item)
                else:
                    unpooled.append(item)
            self._queue.clear()
            self._queue_gauge.set(len(unpooled) + sum(map(len, pooled.values())))
            for group in group_forward_items(unpooled, self.limits.max_batch, MAX_TOKENS_PER_CALL):
                await self._run_group(group)
            waiting = [rows for rows in pooled.values() if rows]
            if waiting:
                await self._run_pass(min(waiting, key=lambda rows: rows.oldest))
            for key in [k for k, rows in pooled.items() if not rows]:
                del pooled[key]

    async def _run_pass(self, rows: PooledRows) -> None:
        work = rows.next_pass(self.limits.max_batch, MAX_TOKENS_PER_CALL, self._pass_cost.tokens)
        if work is None:
            return
        started = time.perf_counter()
        try:
            vectors = await self._run(run_pass, self.stage, work, mean_pool)
        except Exception as exc:  # noqa: BLE001 - handed to every waiting handler
            for item in rows.fail(work):
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        finished = time.perf_counter()
        self._pass_cost.observe(work.tokens, finished - started)
        self._rows_histogram.observe(len(work.rows))
        for item in {id(r.item): r.item for r in work.rows}.values():
            if not item.queue_ms:
                item.queue_ms = (started - item.enqueued) * 1e3
            item.batch_rows = len(work.rows)
        for item, result in rows.finish(work, vectors):
            item.compute_ms = (finished - item.enqueued) * 1e3 - item.queue_ms
            if not item.future.done():
                item.future.set_result(result)

    async def _run_group(self, group: list[ForwardItem]) -> None:
        started = time.perf_counter()
        try:
            results = await self._run(run_forward_group, self.stage, group, mean_pool)
        except Exception as exc:  # noqa: BLE001 - handed to every waiting handler
            for item in group:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        finished = time.perf_counter()
        rows = sum(i.rows for i in group)
        self._rows_histogram.observe(rows)
        for item, result in zip(group, results, strict=True):
            item.queue_ms = (started - item.enqueued) * 1e3
            item.compute_ms = (finished - started) * 1e3
            item.batch_rows = rows
            if not item.future.done():
                item.future.set_result(result)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self.tier is not None:
            self.tier.close()
