"""The public Inference servicer: a thin front door.

A request reads top to bottom: admit -> inputs (validate, render, tokenize) -> version (chosen
once) -> cache -> route (once) -> engine or coalescer -> outputs (detokenize, cache). Each step
is another module's job; this one only delegates.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
from grpc import aio
from opentelemetry import trace

from services.cache.codec import encode_vector
from services.cache.store import CacheStore
from services.common.errors import (
    DeadlineExceeded,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from services.common.metrics import VERSION_CACHE
from services.common.security import Caller, TokenSet
from services.common.settings import RouterSettings
from services.common.types import ModelKind
from services.pb.tessera.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from services.router.callers import Callers
from services.router.coalescer import Coalescer, CoalescerConfig, VersionGone
from services.router.engine import Generation, Generations
from services.router.frontends import Frontends, ModelFrontend
from services.router.inputs import GenerateInput, InputProcessor
from services.router.outputs import OutputProcessor
from services.router.pool import WorkerPool
from services.router.relay import StepTimes, StuckPolicy
from services.router.routing import Chain, VersionChoice
from services.router.scheduler import Request, SchedulerConfig
from services.router.versions import VersionBook, unknown_version

log = logging.getLogger(__name__)
tracer = trace.get_tracer("tessera.router")

VERSION_ATTEMPTS = 3  # versions one Embed or Forward may start over on when its version goes


class Deadline:
    """A request's deadline: the client's, capped at `longest_s` (the default when it sets
    none), so no request can hold the router's resources longer than its settings allow."""

    def __init__(self, context: aio.ServicerContext, longest_s: float) -> None:
        remaining = context.time_remaining()
        loop = asyncio.get_running_loop()
        self._at = loop.time() + min(remaining if remaining is not None else longest_s, longest_s)

    def remaining(self) -> float:
        left = self._at - asyncio.get_running_loop().time()
        if left <= 0:
            raise DeadlineExceeded("deadline passed before the work was done")
        return left

    @property
    def at(self) -> float:
        """The deadline in event-loop time."""
        return self._at


class InferenceService(inference_pb2_grpc.InferenceServicer):
    """Admits requests and hands them to the input processor, the engine or the coalescer,
    and the output processor."""

    def __init__(
        self,
        settings: RouterSettings,
        pool: WorkerPool,
        frontends: Frontends,
        cache: CacheStore,
        callers: Callers | None = None,
        versions: VersionBook | None = None,
    ) -> None:
        self.settings = settings
        self.versions = versions or VersionBook(None)
        self.callers = callers or Callers(TokenSet(), TokenSet())
        self.pool = pool
        self.inputs = InputProcessor(settings, frontends, lambda: pool.table)
        self.outputs = OutputProcessor(cache, settings.hidden_dtype)
        times = StepTimes(
            StuckPolicy(settings.stuck_step_min_s, settings.stuck_factor, settings.stuck_step_max_s)
        )
        self.generations = Generations(pool, self._scheduler_config, settings.hidden_dtype, times)
        self.coalescer = Coalescer(pool, CoalescerConfig.from_settings(settings), times)
        self.cache = cache
        self.outstanding = 0
        self._in_flight: dict[str, int] = {}  # requests in flight per tenant
        self.draining = False
        self._streams: dict[str, int] = {}  # open GenerateStream calls per client connection

    def _scheduler_config(self, chain: Chain) -> SchedulerConfig:
        return SchedulerConfig.from_settings(
            self.settings,
            budget_tokens=min(w.kv_token_budget for w in chain.workers),
            max_rows=min(w.capacity for w in chain.workers),
            stages=len(chain.workers),
        )

    @contextmanager
    def _admitted(self, context: aio.ServicerContext) -> Iterator[Caller]:
        """One request in flight on the router (and for its caller's tenant), refused while
        draining or at either capacity; yields who the caller is."""
        caller = self.callers.identify(tuple(context.invocation_metadata() or ()))
        if self.draining:
            raise Unavailable("router is shutting down")
        if self.outstanding >= self.settings.max_outstanding:
            raise ResourceExhausted(
                f"router is at capacity ({self.settings.max_outstanding} "
                f"requests in flight, max_outstanding)"
            )
        tenant = caller.tenant
        limit = caller.max_in_flight or self.settings.max_tenant_in_flight
        if self._in_flight.get(tenant, 0) >= limit:
            raise ResourceExhausted(
                f"this tenant has {limit} requests in flight (max_tenant_in_flight)"
            )
        self.outstanding += 1
        self._in_flight[tenant] = self._in_flight.get(tenant, 0) + 1
        try:
            yield caller
        finally:
            self.outstanding -= 1
            self._in_flight[tenant] -= 1
            if not self._in_flight[tenant]:
                del self._in_flight[tenant]

    def _pick(
        self, model: str, pinned: str | None, avoid: frozenset[str] = frozenset()
    ) -> tuple[VersionChoice, str]:
        """The version a request runs on, chosen once: `pinned` (a label or a fingerprint),
        else the model's traffic weights' draw, else any ready version. Returns the choice and
        its label; a pin the model does not know is NOT_FOUND."""
        table = self.pool.table
        known = table.versions(model, healthy_only=False)
        label_of = dict(known)
        book = self.versions
        if pinned:
            label = label_of.get(pinned, pinned)
            if label not in label_of.values():
                if table.knows(model) or book.aliases.get(model):
                    raise unknown_version(model, pinned)
                table.pick_version(model, self.pool.load)  # NOT_FOUND for an unknown model
                raise unknown_version(model, pinned)
            if label in book.excluded(model):
                raise Unavailable(f"version {label!r} of model {model!r} is being unloaded")
            choice = table.pick_version(model, self.pool.load, version=label, avoid=avoid)
            return choice, label
        skip = book.excluded(model)
        ready = [
            label for f, label in table.versions(model) if f not in avoid and label not in skip
        ]
        drawn = book.choose(model, ready)
        if drawn is not None:
            choice = table.pick_version(model, self.pool.load, version=drawn, avoid=avoid)
        else:  # no weights: any ready version but those being unloaded (while others are ready)
            skipped = frozenset(skip) if ready else frozenset()
            choice = table.pick_version(model, self.pool.load, avoid=avoid, skip=skipped)
        return choice, label_of.get(choice.fingerprint, "")

    async def close(self) -> None:
        """Ends calls in flight and the tokenizer's thread."""
        await self.coalescer.close()
        self.inputs.close()

    # -- Generate ---------------------------------------------------------------------------

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: aio.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        return await self.generate(request, context)

    async def generate(
        self,
        request: inference_pb2.GenerateRequest,
        context: aio.ServicerContext,
        version: str | None = None,
    ) -> inference_pb2.GenerateResponse:
        """Generate's answer, on `version` (a label) when one is pinned (KServe)."""
        with self._admitted(context) as caller:
            response = inference_pb2.GenerateResponse()
            parts: list[str] = []
            async for chunk in self._generate(request, context, caller, version):
                parts.append(chunk.text)
                response.token_ids.extend(chunk.token_ids)
                response.logprobs.extend(chunk.logprobs)
                response.prompt_tokens = chunk.prompt_tokens
                response.generated_tokens = chunk.generated_tokens
                response.finish_reason = chunk.finish_reason or response.finish_reason
                response.cached = chunk.cached
                response.version = chunk.version or response.version
            response.text = "".join(parts)
            return response

    async def GenerateStream(
        self, request: inference_pb2.GenerateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        peer = context.peer() or ""
        limit = self.settings.max_streams_per_connection
        if self._streams.get(peer, 0) >= limit:
            raise ResourceExhausted(
                f"this connection already has {limit} streams open (max_streams_per_connection)"
            )
        self._streams[peer] = self._streams.get(peer, 0) + 1
        try:
            async for chunk in self.stream(request, context):
                yield chunk
        finally:
            self._streams[peer] -= 1
            if not self._streams[peer]:
                del self._streams[peer]

    async def stream(
        self, request: inference_pb2.GenerateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        """GenerateStream's chunks (the HTTP front streams these too)."""
        with self._admitted(context) as caller:
            async for chunk in self._generate(request, context, caller, None):
                if chunk.text or chunk.finish_reason or chunk.token_ids:
                    yield chunk

    async def _generate(
        self,
        request: inference_pb2.GenerateRequest,
        context: aio.ServicerContext,
        caller: Caller,
        version: str | None,
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        """The one generation path; Generate gathers it, GenerateStream forwards it."""
        started = time.perf_counter()
        deadline = Deadline(context, self.settings.request_timeout_s)
        job = await self.inputs.generate(request)
        if job.priority > caller.max_priority:
            raise PermissionDenied(
                f"priority {job.priority} is over this caller's highest ({caller.max_priority})"
            )
        table = self.pool.table
        choice, label = self._pick(job.model, version or request.version)
        with self.versions.answering(job.model, label):
            key = self.outputs.generate_key(job, choice.fingerprint)
            cached = await self.outputs.cached_generation(key, job)
            if key is not None and label:
                hit = "hit" if cached is not None else "miss"
                VERSION_CACHE.labels(job.model, label, hit).inc()
            if cached is not None:
                cached.version = label
                yield cached
                return
            chain = choice.chain or table.route(
                job.model, self.pool.load, fingerprint=choice.fingerprint
            )
            if self.settings.prefix_reuse:
                chain = self.generations.prefer(chain, table.chains(job.model), job.prompt_ids)
            with tracer.start_as_current_span(
                "generate",
                attributes={
                    "tessera.model": job.model,
                    "tessera.version": label,
                    "tessera.prompt_tokens": len(job.prompt_ids),
                },
            ) as span:
                generation = self._start(job, chain, deadline, caller.tenant)
                span.add_event("route", {"tessera.route": chain.describe()})
                first = True
                try:
                    async for chunk in self.outputs.stream(
                        generation, job, deadline.remaining, key, started
                    ):
                        if first:
                            chunk.version, first = label, False
                        yield chunk
                finally:
                    # A stop string, a client that left or its deadline: the row leaves at the
                    # next step.
                    if not generation.closed:
                        self.generations.cancel(generation)

    def _start(
        self, job: GenerateInput, chain: Chain, deadline: Deadline, tenant: str
    ) -> Generation:
        now = asyncio.get_running_loop().time()
        request = Request(
            request_id=self.generations.new_id(),
            prompt=job.prompt_ids,
            max_new=job.max_new,
            sampling=job.sampling,
            eos=job.frontend.eos_token_ids,
            arrived=now,
            deadline=now + deadline.remaining(),
            priority=job.priority,
            tenant=tenant,
        )
        generation = Generation(job.model, request)
        self.generations.submit(generation, chain)
        return generation

    # -- Embed ------------------------------------------------------------------------------

    async def Embed(
        self, request: inference_pb2.EmbedRequest, context: aio.ServicerContext
    ) -> inference_pb2.EmbedResponse:
        matrix, cached, label = await self.embed_matrix(
            request.model, request.inputs, context, request.version or None
        )
        count = int(matrix.shape[0])
        response = inference_pb2.EmbedResponse(
            dim=int(matrix.shape[1]), cached_inputs=cached, cached=cached == count, version=label
        )
        if request.packed:
            response.vectors = matrix.astype("<f4", copy=False).tobytes()
        else:
            response.embeddings.extend(
                inference_pb2.Embedding(values=row) for row in matrix.tolist()
            )
        return response

    async def embed_matrix(
        self,
        model: str,
        inputs: Sequence[str],
        context: aio.ServicerContext,
        version: str | None = None,
        *,
        ids: Sequence[list[int]] | None = None,
        token_inputs: bool = False,
    ) -> tuple[np.ndarray, int, str]:
        """Embed's work (admission, validation, cache, coalesced calls): the vectors as float32
        [len(inputs), dim] in input order, how many inputs came from the cache tier, and the
        label of the version that answered.

        `ids` (aligned with `inputs`) are token ids already known, so nothing is tokenized again
        (the HTTP front counts tokens for its usage; a client may send token arrays, whose
        `inputs` are then only their cache identities: `token_inputs`)."""
        with self._admitted(context):
            deadline = Deadline(context, self.settings.request_timeout_s)
            frontend = self.inputs.frontend(model, ModelKind.ENCODER)
            texts = self.inputs.texts(inputs)
            known = dict(zip(texts, ids, strict=True)) if ids is not None else None
            # Every vector of one answer comes from one version: the fingerprint is chosen once,
            # keys and calls use it, and if its chains vanish mid-way the answer starts over on
            # another version (cache hits included).
            tried: set[str] = set()
            for _ in range(VERSION_ATTEMPTS):
                fingerprint, label = self._version(model, version, tried)
                try:
                    with self.versions.answering(model, label):
                        matrix, cached = await self._embed_version(
                            model, fingerprint, frontend, texts, deadline, known, token_inputs
                        )
                    if self.cache.enabled and label:
                        VERSION_CACHE.labels(model, label, "hit").inc(cached)
                        VERSION_CACHE.labels(model, label, "miss").inc(len(texts) - cached)
                    return matrix, cached, label
                except VersionGone as gone:
                    log.warning("%s; starting the answer again on another version", gone)
                    tried.add(fingerprint)
            raise Unavailable(f"model {model!r}: versions kept going away mid-request")

    def _version(self, model: str, version: str | None, tried: set[str]) -> tuple[str, str]:
        choice, label = self._pick(model, version, frozenset(tried))
        if choice.fingerprint in tried:
            raise Unavailable(f"model {model!r}: no version is left to answer on")
        return choice.fingerprint, label

    async def _embed_version(
        self,
        model: str,
        fingerprint: str,
        frontend: ModelFrontend,
        texts: list[str],
        deadline: Deadline,
        known: dict[str, list[int]] | None = None,
        token_inputs: bool = False,
    ) -> tuple[np.ndarray, int]:
        unique = list(dict.fromkeys(texts)) if len(texts) > 1 else texts
        found: dict[str, np.ndarray] = {}
        keys: list[str] = []
        if self.cache.enabled:
            keys = [
                self.outputs.embed_key(model, fingerprint, text, ids=token_inputs)
                for text in unique
            ]
            hits = await self.outputs.cached_vectors(keys, frontend.spec.hidden_size)
            for text, key in zip(unique, keys):
                if key in hits:
                    found[text] = hits[key]
        missing = [i for i, text in enumerate(unique) if text not in found]
        computed: np.ndarray | None = None
        if missing:
            if known is not None:
                ids = [known[unique[i]] for i in missing]
            else:
                ids = await self.inputs.encoder(frontend).encode([unique[i] for i in missing])
            computed = await self.coalescer.embed(
                model, fingerprint, ids, pad_id=frontend.pad_id, deadline=deadline.at
            )
            if keys:
                await self.outputs.store(
                    {keys[i]: encode_vector(computed[row]) for row, i in enumerate(missing)}
                )
        cached = sum(text in found for text in texts) if found else 0
        if computed is not None and not found and unique is texts:
            return computed, 0  # the common case: one copy of the vectors, the worker's
        dim = int(computed.shape[1]) if computed is not None else len(next(iter(found.values())))
        if computed is not None:
            for row, i in enumerate(missing):
                found[unique[i]] = computed[row]
        matrix = np.empty((len(texts), dim), dtype=np.float32)
        for row, text in enumerate(texts):
            matrix[row] = found[text]
        return matrix, cached

    # -- Forward ----------------------------------------------------------------------------

    async def Forward(
        self, request: inference_pb2.ForwardRequest, context: aio.ServicerContext
    ) -> inference_pb2.ForwardResponse:
        with self._admitted(context):
            deadline = Deadline(context, self.settings.request_timeout_s)
            job = await self.inputs.forward(request)
            tried: set[str] = set()
            for _ in range(VERSION_ATTEMPTS):
                fingerprint, label = self._version(request.model, request.version or None, tried)
                try:
                    with self.versions.answering(request.model, label):
                        out = await self.coalescer.forward(
                            request.model,
                            fingerprint,
                            job.span,
                            ids=job.ids,
                            hidden=job.hidden,
                            mask=job.mask,
                            pad_id=job.frontend.pad_id,
                            deadline=deadline.at,
                        )
                    break
                except VersionGone as gone:
                    log.warning("%s; running the Forward on another version", gone)
                    tried.add(fingerprint)
            else:
                raise Unavailable(f"model {request.model!r}: versions kept going away mid-request")
            response = inference_pb2.ForwardResponse(
                hidden_states=out,
                span=common_pb2.Span(start=job.span.start, end=job.span.end),
                input_ids=job.ids_list,
                version=label,
            )
            if job.mask_pb is not None:
                response.attention_mask.CopyFrom(job.mask_pb)
            return response

    # -- ListModels -------------------------------------------------------------------------

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        table = self.pool.table
        # Worker addresses are the mesh's inside: only operators see them.
        admin = self.callers.identify(tuple(context.invocation_metadata() or ())).admin
        response = inference_pb2.ListModelsResponse()
        for model in table.models():
            members = table.by_model[model]
            healthy_chains = table.chains(model)
            newest = healthy_chains[0] if healthy_chains else None
            status = inference_pb2.ModelStatus(
                name=model,
                num_layers=members[0].num_layers,
                kind=members[0].kind.value,
                version=(newest or members[0]).version,
                fingerprint=newest.fingerprint if newest else members[0].fingerprint,
                healthy=bool(healthy_chains),
                precision=(newest.workers[0] if newest else members[0]).precision,
            )
            for chain in table.all_chains(model):
                entry = status.chains.add(healthy=all(a in table.healthy for a in chain.addresses))
                for worker in chain.workers:
                    entry.stages.add(
                        address=worker.address if admin else "",
                        healthy=worker.address in table.healthy,
                        outstanding=self.pool.load.get(worker.address, 0),
                        span=common_pb2.Span(start=worker.span.start, end=worker.span.end),
                    )
            response.models.append(status)
        return response
