"""Driving one chain's generation batches over gRPC: prefill, decode, filter, clear.

One unary call per stage per step, each carrying the whole batch, through the hop relay
(`relay.py`): hidden states go from stage to stage and the last stage's sampled tokens come
back. A failed call raises its `Fault` (faults.py); nothing here decides who pays for it.

A step that is overdue (`StepTimes`, learnt from the steps each worker answered) has its worker's
health checked; a client's deadline never bounds a step: one request's short deadline must not
fail a healthy stage.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from grpc import aio

from services.common.metrics import STAGE_CALL_SECONDS
from services.common.telemetry import outgoing_metadata
from services.common.tensors import from_numpy
from services.pb.tessera.v1 import common_pb2, worker_pb2
from services.router.pool import WorkerPool
from services.router.relay import StepTimes, malformed, relay
from services.router.routing import Chain
from services.router.scheduler import Decode, Drop, Prefill

CLEAR_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Sampled:
    """What the last stage sampled: a token per row and, when some row asked, a TokenLogprob
    per row in row order (meaningful for the rows that asked)."""

    tokens: list[int]
    logprobs: list[common_pb2.TokenLogprob] | None = None


def _sampled(result: worker_pb2.StepResult) -> Sampled:
    return Sampled(list(result.token_ids), list(result.logprobs) or None)


def left_padded(
    feeds: Sequence[Sequence[int]], pad_id: int = 0, columns: slice = slice(None)
) -> common_pb2.Tensor:
    """The feeds right-aligned in one [rows, width] array (`columns` of it)."""
    width = max(len(f) for f in feeds)
    ids = np.full((len(feeds), width), pad_id, dtype=np.int64)
    for row, feed in enumerate(feeds):
        ids[row, width - len(feed) :] = feed
    return from_numpy(np.ascontiguousarray(ids[:, columns]))


class ChainClient:
    """The stages of one chain, called in order for each step of a batch."""

    def __init__(
        self, pool: WorkerPool, chain: Chain, times: StepTimes, hidden_dtype: str = "float32"
    ) -> None:
        self.pool = pool
        self.chain = chain
        self.times = times
        self.hidden_dtype = hidden_dtype
        self.addresses = chain.addresses
        self._last = len(self.addresses) - 1

    async def _relay(
        self,
        method: str,
        kind: str,
        work: int,
        rows: int,
        width: int,
        build: Any,
        wanted: Callable[[], bool] | None = None,
        sampled: bool = True,
    ) -> worker_pb2.StepResult:
        def check(index: int, answer: worker_pb2.StepResult) -> str:
            if index < self._last:
                problem = malformed(answer.hidden_states, rows, width, self.hidden_dtype)
                return f"its hidden states answer {problem}" if problem else ""
            tokens = answer.token_ids
            if not sampled:  # a chunk that is not the last: nothing is sampled yet
                return f"it sampled {len(tokens)} tokens before the last chunk" if tokens else ""
            if len(tokens) != rows or any(t < 0 for t in tokens):
                return f"it returned {len(tokens)} token ids (or a negative one) for {rows} rows"
            if answer.logprobs and len(answer.logprobs) != rows:
                return f"it returned {len(answer.logprobs)} logprobs for {rows} rows"
            return ""

        result: worker_pb2.StepResult = await relay(
            self.pool,
            self.addresses,
            method,
            build,
            check,
            timeout=lambda _: self.times.policy.max_s,
            timeout_is_stuck=True,
            stuck_after=lambda address: self.times.overdue(address, kind, work),
            observe=lambda address, seconds: self._observe(address, kind, work, seconds),
            wanted=wanted,
        )
        return result

    def _observe(self, address: str, kind: str, work: int, seconds: float) -> None:
        self.times.observe(address, kind, work, seconds)
        STAGE_CALL_SECONDS.labels(address, kind).observe(seconds)

    async def prefill(self, prefill: Prefill, start: int = 0, end: int = 0) -> Sampled:
        """Runs left-padded prompts through every stage; returns each row's first token.

        With `end` short of the prompts' width, only columns [start, end) run (a chunk of a
        chunked prefill): the stages append them to the batch and nothing is sampled. At
        `prefill.start` > 0 the stages make the batch from their cached prompt blocks first."""
        requests = prefill.requests
        feeds = [r.feed for r in requests]
        width = prefill.width
        end = end or width
        more = end < width
        rows = [
            worker_pb2.PrefillRow(
                request_id=r.request_id,
                length=len(r.feed),
                max_tokens=r.max_tokens,
                sampling=r.sampling.to_pb(),
                # A row under a grammar that resumes after a fault: the last stage replays it.
                generated=r.generated if r.sampling.json_schema else (),
                tokens=r.feed,
            )
            for r in requests
        ]
        chunked = (start, width, more) if (start or more) else (0, 0, False)
        from_prefix = 0 < start == prefill.start

        def build(index: int, hidden: common_pb2.Tensor | None) -> worker_pb2.PrefillRequest:
            request = worker_pb2.PrefillRequest(
                batch_id=prefill.batch_id,
                rows=rows,
                hidden_dtype=self.hidden_dtype,
                merge_into=prefill.merge_into,
                chunk_start=chunked[0],
                width=chunked[1],
                more=chunked[2],
                from_prefix=from_prefix,
            )
            if index == 0:
                request.input_ids.CopyFrom(left_padded(feeds, columns=slice(start, end)))
            else:
                assert hidden is not None
                request.hidden_states.CopyFrom(hidden)
            return request

        def wanted() -> bool:
            """A later stage prefills only while some row still wants its answer."""
            return prefill.wanted(asyncio.get_running_loop().time())

        work = len(rows) * (end - start)
        result = await self._relay(
            "Prefill", "prefill", work, len(rows), end - start, build, wanted, sampled=not more
        )
        return _sampled(result)

    async def decode(self, step: Decode) -> Sampled:
        """One step: the tokens sampled last step in, the next tokens out (merging batches)."""
        count = len(step.tokens)

        def build(index: int, hidden: common_pb2.Tensor | None) -> worker_pb2.DecodeRequest:
            request = worker_pb2.DecodeRequest(
                batch_ids=step.batch_ids, hidden_dtype=self.hidden_dtype
            )
            if index == 0:
                request.input_ids.CopyFrom(from_numpy(np.asarray(step.tokens, dtype=np.int64)))
            else:
                assert hidden is not None
                request.hidden_states.CopyFrom(hidden)
            return request

        result = await self._relay("Decode", "decode", count, count, 1, build)
        return _sampled(result)

    async def filter(self, drop: Drop) -> None:
        """Rows leave the batch on every stage at once (an empty keep clears it)."""
        if not drop.keep:
            await self.clear([drop.batch_id])
            return
        request = worker_pb2.FilterRequest(batch_id=drop.batch_id, keep=drop.keep)
        work = len(drop.keep)

        async def one(address: str) -> None:
            await relay(
                self.pool,
                [address],
                "Filter",
                lambda _index, _hidden: request,
                lambda _index, _answer: "",
                timeout=lambda _: self.times.policy.max_s,
                timeout_is_stuck=True,
                stuck_after=lambda a: self.times.overdue(a, "filter", work),
                observe=lambda a, seconds: self.times.observe(a, "filter", work, seconds),
            )

        await asyncio.gather(*(one(a) for a in self.addresses))

    async def clear(self, batch_ids: Sequence[str]) -> None:
        """Frees batches on every stage that still answers; failures are left to expiry."""
        if not batch_ids:
            return
        request = worker_pb2.ClearRequest(batch_ids=batch_ids)

        async def one(address: str) -> None:
            try:
                await self.pool.stub(address).Clear(
                    request, timeout=CLEAR_TIMEOUT_S, metadata=outgoing_metadata()
                )
            except aio.AioRpcError:
                pass

        await asyncio.gather(*(one(a) for a in self.addresses))
