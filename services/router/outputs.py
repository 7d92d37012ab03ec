"""The output processor: a generation's tokens become the client's chunks, and finished answers
go to the cache tier (vLLM's `OutputProcessor`). The servicer only delegates here.

Detokenizing is incremental and stop strings cut at their earliest match (`detokenize.py`).
Every cache call runs on the cache's own thread, never on the event loop; a cache failure is a
miss, never a failed request.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping

import numpy as np
from prometheus_client import Counter

from services.cache.codec import decode_vector
from services.cache.keys import embed_key, generate_key
from services.cache.store import CacheStore
from services.common.metrics import (
    CACHE_REQUESTS,
    GENERATED_TOKENS,
    INTER_TOKEN_SECONDS,
    TIME_TO_FIRST_TOKEN,
)
from services.pb.tessera.v1 import common_pb2, inference_pb2
from services.router.detokenize import TextAssembler
from services.router.engine import Finished, Generation
from services.router.inputs import GenerateInput


class OutputProcessor:
    """Detokenization, stop strings, generation metrics and cache reads and writes."""

    def __init__(self, cache: CacheStore, hidden_dtype: str = "float32") -> None:
        self.cache = cache
        self.hidden_dtype = hidden_dtype  # changes answers, so it is in every key
        self._counters: dict[tuple[str, str], Counter] = {}

    # -- the cache tier ----------------------------------------------------------------------

    def generate_key(self, job: GenerateInput, fingerprint: str) -> str | None:
        """The cache key of a deterministic generation (None: not cacheable, or no cache)."""
        if not (job.sampling.deterministic and self.cache.enabled):
            return None
        sampling = job.sampling
        return generate_key(
            job.model,
            fingerprint,
            job.prompt_ids,
            {
                "max_new_tokens": job.max_new,
                "temperature": sampling.temperature,
                "top_k": sampling.top_k,
                "top_p": sampling.top_p,
                "seed": sampling.seed,
                "stop": job.stop,
                "hidden_dtype": self.hidden_dtype,
                "logprobs": sampling.logprobs,
                "top_logprobs": sampling.top_logprobs,
                "json_schema": sampling.json_schema,
            },
        )

    def embed_key(self, model: str, fingerprint: str, text: str, *, ids: bool = False) -> str:
        """A text's key; with `ids`, `text` names a token array a client sent (never a text's)."""
        return embed_key(model, fingerprint, text, hidden_dtype=self.hidden_dtype, ids=ids)

    async def cached_generation(
        self, key: str | None, job: GenerateInput
    ) -> inference_pb2.GenerateChunk | None:
        """A cached answer as one chunk; a miss, a failure, a value whose seal does not hold or
        one that cannot be this request's answer is None (the answer computed overwrites it)."""
        if key is None:
            return None
        errors, rejected = self.cache.errors, self.cache.rejected
        raw = await self.cache.get_async(key)
        cached = _generation_answer(raw, job) if raw is not None else None
        if raw is not None and cached is None or self.cache.rejected > rejected:
            self._counter("generate", "rejected").inc()
        else:
            self._count("generate", cached is not None, self.cache.errors > errors)
        if cached is None:
            return None
        return inference_pb2.GenerateChunk(
            text=cached.text,
            token_ids=cached.token_ids,
            finish_reason=cached.finish_reason,
            prompt_tokens=cached.prompt_tokens,
            generated_tokens=cached.generated_tokens,
            cached=True,
            logprobs=cached.logprobs,
        )

    async def cached_vectors(self, keys: list[str], dim: int) -> dict[str, np.ndarray]:
        """One get_many on the cache's thread: the unit vectors of `dim` found under `keys`.
        Failures are misses; a value whose seal does not hold, or that is no unit vector of
        `dim` finite numbers, is a miss counted as rejected (the answer computed overwrites it)."""
        errors, rejected = self.cache.errors, self.cache.rejected
        found = await self.cache.get_many_async(keys)
        vectors = {}
        for key, raw in found.items():
            vector = decode_vector(raw)
            if vector is not None and _unit_vector(vector, dim):
                vectors[key] = vector
        refused = self.cache.rejected - rejected + len(found) - len(vectors)
        if self.cache.errors > errors:
            self._counter("embed", "error").inc()
        if refused:
            self._counter("embed", "rejected").inc(refused)
        if vectors:
            self._counter("embed", "hit").inc(len(vectors))
        if len(vectors) < len(keys):
            self._counter("embed", "miss").inc(len(keys) - len(vectors))
        return vectors

    async def store(self, items: Mapping[str, bytes]) -> None:
        """One set_many on the cache's thread; failures are ignored."""
        await self.cache.set_many_async(items)

    def _count(self, tier: str, hit: bool, failed: bool) -> None:
        self._counter(tier, "error" if failed else "hit" if hit else "miss").inc()

    def _counter(self, tier: str, result: str) -> Counter:
        counter = self._counters.get((tier, result))
        if counter is None:
            counter = self._counters[(tier, result)] = CACHE_REQUESTS.labels(tier, result)
        return counter

    # -- a generation's stream ---------------------------------------------------------------

    async def stream(
        self,
        generation: Generation,
        job: GenerateInput,
        remaining: Callable[[], float],
        key: str | None,
        started: float,
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        """The generation's chunks until it ends; the answer is cached once it ends normally.

        Raises the error that ended the generation (its deadline, a fault it could not escape).
        """
        model = job.model
        prompt_tokens = len(job.prompt_ids)
        assembler = TextAssembler(job.frontend, job.stop)
        last_token_at: float | None = None
        finish = ""
        sent = 0
        logprobs: list[common_pb2.TokenLogprob] = []
        while not finish:
            event = await generation.next(remaining())
            if isinstance(event, Finished):
                finish = event.reason
                break
            token = event.token
            assert token is not None
            if event.logprob is not None:
                logprobs.append(event.logprob)
            now = time.perf_counter()
            if last_token_at is None:
                TIME_TO_FIRST_TOKEN.labels(model).observe(now - started)
            else:
                INTER_TOKEN_SECONDS.labels(model).observe(now - last_token_at)
            last_token_at = now
            GENERATED_TOKENS.labels(model).inc()
            if token in job.frontend.eos_token_ids:
                assembler.token_ids.append(token)
                continue
            assembler.add(token)
            if assembler.stopped:
                finish = "stop"
                break
            piece = assembler.take(final=False)
            yield inference_pb2.GenerateChunk(
                text=piece,
                token_ids=assembler.token_ids[sent:],
                prompt_tokens=prompt_tokens,
                generated_tokens=len(assembler.token_ids),
                logprobs=logprobs[sent:],
            )
            sent = len(assembler.token_ids)
        yield inference_pb2.GenerateChunk(
            text=assembler.take(final=True),
            token_ids=assembler.token_ids[sent:],
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            generated_tokens=len(assembler.token_ids),
            logprobs=logprobs[sent:],
        )
        if key is not None:
            answer = inference_pb2.GenerateResponse(
                text=assembler.text,
                finish_reason=finish,
                prompt_tokens=prompt_tokens,
                generated_tokens=len(assembler.token_ids),
                token_ids=assembler.token_ids,
                logprobs=logprobs,
            )
            await self.cache.set_async(key, answer.SerializeToString())


FINISH_REASONS = frozenset({"eos", "length", "stop"})


def _generation_answer(raw: bytes, job: GenerateInput) -> inference_pb2.GenerateResponse | None:
    """A cached generation, if it can be this request's answer (the seal already held: this
    catches a value written by another version of Tessera or a bug, never a forgery)."""
    cached = inference_pb2.GenerateResponse()
    try:
        cached.ParseFromString(raw)
    except Exception:  # noqa: BLE001 - a corrupt entry is a miss
        return None
    if (
        cached.finish_reason not in FINISH_REASONS
        or cached.generated_tokens != len(cached.token_ids)
        or not 0 < cached.generated_tokens <= job.max_new
        or cached.prompt_tokens != len(job.prompt_ids)
    ):
        return None
    return cached


def _unit_vector(vector: np.ndarray, dim: int) -> bool:
    if vector.shape != (dim,) or not bool(np.isfinite(vector).all()):
        return False
    return abs(float(np.dot(vector, vector)) - 1.0) < 1e-3
