"""The output processor: a generation's tokens become the client's chunks, and finished answers
go to the cache tier (vLLM's `OutputProcessor`). The servicer only delegates here.

Detokenizing is incremental and stop strings cut at their earliest match (`detokenize.py`).
Every cache call runs on the cache's own thread, never on the event loop; a cache failure is a
miss, never a failed request.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping

from prometheus_client import Counter

from services.cache.keys import generate_key
from services.cache.store import CacheStore
from services.common.metrics import (
    CACHE_REQUESTS,
    GENERATED_TOKENS,
    INTER_TOKEN_SECONDS,
    TIME_TO_FIRST_TOKEN,
)
from services.pb.tessera.v1 import inference_pb2
from services.router.detokenize import TextAssembler
from services.router.engine import Finished, Generation
from services.router.inputs import GenerateInput


class OutputProcessor:
    """Detokenization, stop strings, generation metrics and cache reads and writes."""

    def __init__(self, cache: CacheStore) -> None:
        self.cache = cache
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
            },
        )

    async def cached_generation(self, key: str | None) -> inference_pb2.GenerateChunk | None:
        """A cached answer as one chunk; a miss, a failure or a corrupt entry is None."""
        if key is None:
            return None
        errors = self.cache.errors
        raw = await self.cache.get_async(key)
        self._count("generate", raw is not None, self.cache.errors > errors)
        if raw is None:
            return None
        cached = inference_pb2.GenerateResponse()
        try:
            cached.ParseFromString(raw)
        except Exception:  # noqa: BLE001 - a corrupt entry is a miss
            return None
        return inference_pb2.GenerateChunk(
            text=cached.text,
            token_ids=cached.token_ids,
            finish_reason=cached.finish_reason,
            prompt_tokens=cached.prompt_tokens,
            generated_tokens=cached.generated_tokens,
            cached=True,
        )

    async def lookup(self, tier: str, keys: list[str]) -> dict[str, bytes]:
        """One get_many on the cache's thread; failures are misses."""
        errors = self.cache.errors
        found = await self.cache.get_many_async(keys)
        if self.cache.errors > errors:
            self._counter(tier, "error").inc()
        if found:
            self._counter(tier, "hit").inc(len(found))
        if len(found) < len(keys):
            self._counter(tier, "miss").inc(len(keys) - len(found))
        return found

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
        while not finish:
            event = await generation.next(remaining())
            if isinstance(event, Finished):
                finish = event.reason
                break
            now = time.perf_counter()
            if last_token_at is None:
                TIME_TO_FIRST_TOKEN.labels(model).observe(now - started)
            else:
                INTER_TOKEN_SECONDS.labels(model).observe(now - last_token_at)
            last_token_at = now
            GENERATED_TOKENS.labels(model).inc()
            if event in job.frontend.eos_token_ids:
                assembler.token_ids.append(event)
                continue
            assembler.add(event)
            if assembler.stopped:
                finish = "stop"
                break
            piece = assembler.take(final=False)
            yield inference_pb2.GenerateChunk(
                text=piece,
                token_ids=assembler.token_ids[sent:],
                prompt_tokens=prompt_tokens,
                generated_tokens=len(assembler.token_ids),
            )
            sent = len(assembler.token_ids)
        yield inference_pb2.GenerateChunk(
            text=assembler.take(final=True),
            token_ids=assembler.token_ids[sent:],
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            generated_tokens=len(assembler.token_ids),
        )
        if key is not None:
            answer = inference_pb2.GenerateResponse(
                text=assembler.text,
                finish_reason=finish,
                prompt_tokens=prompt_tokens,
                generated_tokens=len(assembler.token_ids),
                token_ids=assembler.token_ids,
            )
            await self.cache.set_async(key, answer.SerializeToString())
