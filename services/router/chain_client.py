"""Driving one chain's generation batches over gRPC: prefill, decode, filter, clear.

One unary call per stage per step, each carrying the whole batch; the router relays hidden
states from stage to stage and the last stage's sampled tokens back to stage 0. Worker errors
become what the router acts on (`pipeline.translate`): HopFailed after a transport failure or
an answer of the wrong shape (that worker is dropped too), so the batch fails over;
ResourceExhausted when a worker's KV budget is full (wait); ServiceError otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
from grpc import aio

from services.common.telemetry import outgoing_metadata
from services.common.tensors import from_numpy
from services.common.types import SamplingParams
from services.pb.tessera.v1 import common_pb2, worker_pb2
from services.router.pipeline import malformed, misbehaved, translate
from services.router.pool import WorkerPool
from services.router.routing import Chain

FILTER_TIMEOUT_S = 10.0


def sampling_pb(params: SamplingParams) -> worker_pb2.Sampling:
    sampling = worker_pb2.Sampling(
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p
    )
    if params.seed is not None:
        sampling.seed = params.seed
    return sampling


def left_padded(feeds: Sequence[Sequence[int]], pad_id: int = 0) -> common_pb2.Tensor:
    width = max(len(f) for f in feeds)
    ids = np.full((len(feeds), width), pad_id, dtype=np.int64)
    for row, feed in enumerate(feeds):
        ids[row, width - len(feed) :] = feed
    return from_numpy(ids)


class ChainClient:
    """The stages of one chain, called in order for each step of a batch."""

    def __init__(self, pool: WorkerPool, chain: Chain, hidden_dtype: str = "float32") -> None:
        self.pool = pool
        self.chain = chain
        self.hidden_dtype = hidden_dtype
        self.addresses = chain.addresses

    async def _call(self, address: str, method: str, request: object, timeout: float) -> object:
        stub = self.pool.stub(address)
        try:
            return await getattr(stub, method)(
                request, timeout=timeout, metadata=outgoing_metadata()
            )
        except aio.AioRpcError as error:
            raise translate(error, address, self.pool) from None

    def _hidden(self, address: str, result: worker_pb2.StepResult, rows: int, width: int) -> None:
        problem = malformed(result.hidden_states, rows, width, self.hidden_dtype)
        if problem:
            raise misbehaved(self.pool, address, f"its hidden states answer {problem}")

    def _tokens(self, address: str, result: worker_pb2.StepResult, rows: int) -> list[int]:
        tokens = list(result.token_ids)
        if len(tokens) != rows or any(t < 0 for t in tokens):
            raise misbehaved(
                self.pool,
                address,
                f"it returned {len(tokens)} token ids (or a negative one) for {rows} rows",
            )
        return tokens

    async def prefill(
        self,
        batch_id: str,
        request_ids: Sequence[int],
        feeds: Sequence[Sequence[int]],
        max_tokens: Sequence[int],
        sampling: Sequence[SamplingParams],
        timeout: float,
    ) -> list[int]:
        """Runs left-padded prompts through every stage; returns each row's first token."""
        rows = [
            worker_pb2.PrefillRow(
                request_id=rid, length=len(feed), max_tokens=limit, sampling=sampling_pb(params)
            )
            for rid, feed, limit, params in zip(
                request_ids, feeds, max_tokens, sampling, strict=True
            )
        ]
        hidden: common_pb2.Tensor | None = None
        result = worker_pb2.StepResult()
        for index, address in enumerate(self.addresses):
            request = worker_pb2.PrefillRequest(
                batch_id=batch_id, rows=rows, hidden_dtype=self.hidden_dtype
            )
            if index == 0:
                request.input_ids.CopyFrom(left_padded(feeds))
            else:
                assert hidden is not None
                request.hidden_states.CopyFrom(hidden)
            result = await self._call(address, "Prefill", request, timeout)  # type: ignore[assignment]
            if index < len(self.addresses) - 1:
                self._hidden(address, result, len(rows), max(len(f) for f in feeds))
            hidden = result.hidden_states
        return self._tokens(self.addresses[-1], result, len(rows))

    async def decode(
        self, batch_ids: Sequence[str], tokens: Sequence[int], timeout: float
    ) -> list[int]:
        """One step: the tokens sampled last step in, the next tokens out (merging batch_ids)."""
        hidden: common_pb2.Tensor | None = None
        result = worker_pb2.StepResult()
        for index, address in enumerate(self.addresses):
            request = worker_pb2.DecodeRequest(batch_ids=batch_ids, hidden_dtype=self.hidden_dtype)
            if index == 0:
                request.input_ids.CopyFrom(from_numpy(np.asarray(tokens, dtype=np.int64)))
            else:
                assert hidden is not None
                request.hidden_states.CopyFrom(hidden)
            result = await self._call(address, "Decode", request, timeout)  # type: ignore[assignment]
            if index < len(self.addresses) - 1:
                self._hidden(address, result, len(tokens), 1)
            hidden = result.hidden_states
        return self._tokens(self.addresses[-1], result, len(tokens))

    async def filter(self, batch_id: str, keep: Sequence[int]) -> None:
        request = worker_pb2.FilterRequest(batch_id=batch_id, keep=keep)
        await asyncio.gather(
            *(self._call(a, "Filter", request, FILTER_TIMEOUT_S) for a in self.addresses)
        )

    async def clear(self, batch_ids: Sequence[str]) -> None:
        """Frees batches on every stage that still answers; failures are left to expiry."""
        request = worker_pb2.ClearRequest(batch_ids=batch_ids)

        async def one(address: str) -> None:
            try:
                await self.pool.stub(address).Clear(
                    request, timeout=FILTER_TIMEOUT_S, metadata=outgoing_metadata()
                )
            except aio.AioRpcError:
                pass

        await asyncio.gather(*(one(a) for a in self.addresses))
