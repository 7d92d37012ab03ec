"""The public Inference servicer and the internal Registry servicer on the router.

A request reads top to bottom: validate -> cache key -> cache.get -> route -> hops -> cache.set.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from grpc import aio
from opentelemetry import trace
from prometheus_client import Counter

from services.cache.codec import decode_vector, encode_vector
from services.cache.keys import embed_key, generate_key
from services.cache.store import CacheStore
from services.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from services.common.metrics import (
    CACHE_REQUESTS,
    GENERATED_TOKENS,
    INTER_TOKEN_SECONDS,
    TIME_TO_FIRST_TOKEN,
)
from services.common.settings import RouterSettings
from services.common.tensors import from_numpy, to_numpy, validate
from services.common.types import ModelKind, SamplingParams, Span
from services.pb.tessera.v1 import (
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
)
from services.router import routing
from services.router.batcher import Finished, Generation, Generations
from services.router.coalescer import BatchedEncoder, Coalescer, CoalescerConfig, VersionGone
from services.router.frontends import Frontends, ModelFrontend
from services.router.generation import TextAssembler
from services.router.pool import WorkerPool
from services.router.routing import Chain, RoutingTable
from services.router.scheduler import MAX_PRIORITY, MIN_PRIORITY, SchedulerConfig

log = logging.getLogger(__name__)
tracer = trace.get_tracer("tessera.router")

ROLES = frozenset({"system", "user", "assistant", "tool"})
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
RETRY_BUDGET = 2  # extra chains tried after a transport failure
VERSION_ATTEMPTS = 3  # versions one Embed or Forward may start over on when its version goes
TENANT_KEY = "x-tessera-tenant"
MAX_TENANT_CHARS = 64


def _tenant(context: aio.ServicerContext) -> str:
    """The tenant a request is scheduled for fairly against others (metadata; default none)."""
    for key, value in context.invocation_metadata() or ():
        if key == TENANT_KEY and isinstance(value, str):
            return value[:MAX_TENANT_CHARS]
    return ""


class Deadline:
    def __init__(self, context: aio.ServicerContext, default_s: float) -> None:
        remaining = context.time_remaining()
        loop = asyncio.get_running_loop()
        self._at = loop.time() + (remaining if remaining is not None else default_s)

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
    """Validates, caches, routes and drives requests for every model."""

    def __init__(
        self, settings: RouterSettings, pool: WorkerPool, frontends: Frontends, cache: CacheStore
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.generations = Generations(pool, self._scheduler_config, settings.hidden_dtype)
        self.frontends = frontends
        self.cache = cache
        self.coalescer = Coalescer(
            pool,
            CoalescerConfig(
                max_rows=max(1, settings.embed_segment_size),
                max_tokens=max(1, settings.coalesce_max_tokens),
                in_flight=max(1, settings.coalesce_in_flight),
                retries=RETRY_BUDGET,
                hidden_dtype=settings.hidden_dtype,
            ),
        )
        # Tokenizing runs here, batched, off the event loop (one thread: batches queue up).
        self._tokenize_thread = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self._encoders: dict[ModelFrontend, BatchedEncoder] = {}
        self._cache_counters: dict[tuple[str, str], Counter] = {}
        self._fingerprints: tuple[RoutingTable | None, dict[str, tuple[str, ...]]] = (None, {})
        self.outstanding = 0
        self.draining = False
        self._streams: dict[str, int] = {}  # open GenerateStream calls per client connection

    def _scheduler_config(self, chain: Chain) -> SchedulerConfig:
        s = self.settings
        stages = len(chain.workers)
        return SchedulerConfig(
            budget_tokens=min(w.kv_token_budget for w in chain.workers),
            max_rows=min(w.capacity for w in chain.workers),
            slots=max(2, s.micro_batches),
            balanced=stages > 1,
            max_waiting=s.max_waiting,
            max_prefill_tokens=s.max_prefill_tokens,
            waiting_served_ratio=s.waiting_served_ratio,
            max_waiting_steps=s.max_waiting_steps,
            aging_s=s.aging_s,
        )

    # -- shared steps -----------------------------------------------------------------------

    def _admit(self) -> None:
        if self.draining:
            raise Unavailable("router is shutting down")
        if self.outstanding >= self.settings.max_outstanding:
            raise ResourceExhausted(
                f"router is at capacity ({self.settings.max_outstanding} "
                f"requests in flight, max_outstanding)"
            )
        self.outstanding += 1

    def _frontend(self, model: str, kind: ModelKind | None = None) -> ModelFrontend:
        if not model:
            raise InvalidArgument("model is required")
        if not self.pool.table.knows(model):
            try:
                frontend = self.frontends.get(model)
            except NotFound:
                raise NotFound(
                    f"unknown model {model!r}; ListModels shows what is served"
                ) from None
        else:
            frontend = self.frontends.get(model)
        if kind is not None and frontend.kind is not kind:
            what = "generation" if kind is ModelKind.CAUSAL_LM else "embeddings"
            raise InvalidArgument(
                f"model {model!r} is a {frontend.kind.value} model and does not serve {what}"
            )
        return frontend

    def _cache_get(self, tier: str, key: str) -> bytes | None:
        errors = self.cache.stats.errors
        value = self.cache.get(key)
        failed = self.cache.stats.errors > errors
        CACHE_REQUESTS.labels(
            tier, "error" if failed else "hit" if value is not None else "miss"
        ).inc()
        return value

    async def _cache_lookup(self, tier: str, keys: list[str]) -> dict[str, bytes]:
        """One get_many on the cache's thread (the event loop goes on); failures are misses."""
        errors = self.cache.errors
        found = await self.cache.get_many_async(keys)
        if self.cache.errors > errors:
            self._cache_counter(tier, "error").inc()
        if found:
            self._cache_counter(tier, "hit").inc(len(found))
        if len(found) < len(keys):
            self._cache_counter(tier, "miss").inc(len(keys) - len(found))
        return found

    def _cache_counter(self, tier: str, result: str) -> Counter:
        counter = self._cache_counters.get((tier, result))
        if counter is None:
            counter = self._cache_counters[(tier, result)] = CACHE_REQUESTS.labels(tier, result)
        return counter

    async def _cache_store(self, items: Mapping[str, bytes]) -> None:
        """One set_many on the cache's thread (the event loop goes on); failures are ignored."""
        await self.cache.set_many_async(items)

    async def close(self) -> None:
        """Ends calls in flight and the tokenizer's thread."""
        await self.coalescer.close()
        self._tokenize_thread.shutdown(wait=False, cancel_futures=True)

    # -- Generate ---------------------------------------------------------------------------

    def _generate_inputs(
        self, request: inference_pb2.GenerateRequest
    ) -> tuple[ModelFrontend, list[int], int, SamplingParams, list[str]]:
        frontend = self._frontend(request.model, ModelKind.CAUSAL_LM)
        limits = self.settings
        if request.prompt and request.messages:
            raise InvalidArgument("send either prompt or messages, not both")
        if request.messages:
            for index, message in enumerate(request.messages):
                if message.role not in ROLES:
                    raise InvalidArgument(
                        f"messages[{index}].role must be one of "
                        f"{', '.join(sorted(ROLES))}, got {message.role!r}"
                    )
                if len(message.content) > limits.max_input_chars:
                    raise InvalidArgument(
                        f"messages[{index}] is over {limits.max_input_chars} "
                        f"characters (max_input_chars)"
                    )
            if not any(m.content.strip() for m in request.messages):
                raise InvalidArgument("messages are all empty")
            prompt_ids = frontend.encode_chat([(m.role, m.content) for m in request.messages])
        else:
            if not request.prompt.strip():
                raise InvalidArgument("prompt is empty")
            if len(request.prompt) > limits.max_input_chars:
                raise InvalidArgument(
                    f"prompt is over {limits.max_input_chars} characters (max_input_chars)"
                )
            prompt_ids = frontend.encode_prompt(request.prompt)
        if not prompt_ids:
            raise InvalidArgument("prompt encodes to no tokens")
        max_new = (
            request.max_new_tokens
            if request.HasField("max_new_tokens")
            else min(limits.default_max_new_tokens, limits.max_new_tokens)
        )
        if not 1 <= max_new <= limits.max_new_tokens:
            raise InvalidArgument(
                f"max_new_tokens must be in [1, {limits.max_new_tokens}], got {max_new}"
            )
        if len(prompt_ids) > limits.max_prompt_tokens:
            raise InvalidArgument(
                f"prompt is {len(prompt_ids)} tokens, over the "
                f"{limits.max_prompt_tokens} limit (max_prompt_tokens)"
            )
        if len(prompt_ids) + max_new > frontend.max_length:
            raise InvalidArgument(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens "
                f"({max_new}) is over the model's {frontend.max_length} "
                f"positions"
            )
        temperature = request.temperature if request.HasField("temperature") else 0.0
        top_p = request.top_p if request.HasField("top_p") else 1.0
        top_k = request.top_k if request.HasField("top_k") else 0
        if not math.isfinite(temperature) or temperature < 0 or temperature > 100:
            raise InvalidArgument(f"temperature must be in [0, 100], got {temperature}")
        if not math.isfinite(top_p) or not 0 < top_p <= 1:
            raise InvalidArgument(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0, got {top_k}")
        stop = list(request.stop)
        if len(stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in stop):
            raise InvalidArgument(
                f"stop takes at most {MAX_STOP_STRINGS} non-empty strings of "
                f"at most {MAX_STOP_CHARS} characters"
            )
        seed = request.seed if request.HasField("seed") else None
        sampling = SamplingParams(
            temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), seed=seed
        )
        return frontend, prompt_ids, max_new, sampling, stop

    async def _generate(
        self, request: inference_pb2.GenerateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        """The one generation path; Generate gathers it, GenerateStream forwards it."""
        started = time.perf_counter()
        deadline = Deadline(context, self.settings.request_timeout_s)
        frontend, prompt_ids, max_new, sampling, stop = self._generate_inputs(request)
        priority = request.priority if request.HasField("priority") else 0
        if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
            raise InvalidArgument(
                f"priority must be in [{MIN_PRIORITY}, {MAX_PRIORITY}], got {priority}"
            )
        model = request.model
        # The version is chosen once: the cache key and every step use the same fingerprint.
        fingerprint = self.pool.table.route(model, self.pool.load).fingerprint
        key = None
        if sampling.deterministic and self.cache.enabled:
            key = generate_key(
                model,
                fingerprint,
                prompt_ids,
                {
                    "max_new_tokens": max_new,
                    "temperature": sampling.temperature,
                    "top_k": sampling.top_k,
                    "top_p": sampling.top_p,
                    "seed": sampling.seed,
                    "stop": stop,
                },
            )
            hit = self._cache_get("generate", key)
            if hit is not None:
                cached = inference_pb2.GenerateResponse()
                try:
                    cached.ParseFromString(hit)
                except Exception:  # noqa: BLE001 - a corrupt entry is a miss
                    pass
                else:
                    yield inference_pb2.GenerateChunk(
                        text=cached.text,
                        token_ids=cached.token_ids,
                        finish_reason=cached.finish_reason,
                        prompt_tokens=cached.prompt_tokens,
                        generated_tokens=cached.generated_tokens,
                        cached=True,
                    )
                    return
        with tracer.start_as_current_span(
            "generate",
            attributes={"tessera.model": model, "tessera.prompt_tokens": len(prompt_ids)},
        ) as span:
            loop = asyncio.get_running_loop()
            generation = Generation(
                model,
                request_id=self.generations.new_id(),
                prompt=prompt_ids,
                max_new=max_new,
                sampling=sampling,
                eos=frontend.eos_token_ids,
                arrived=loop.time(),
                deadline=loop.time() + deadline.remaining(),
                priority=priority,
                tenant=_tenant(context),
            )
            self.generations.submit(generation, fingerprint=fingerprint)
            if generation.chain is not None:
                span.add_event("route", {"tessera.route": generation.chain.describe()})
            assembler = TextAssembler(frontend, stop)
            last_token_at: float | None = None
            finish = ""
            sent_ids = 0
            try:
                while not finish:
                    event = await generation.next(deadline.remaining())
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
                    if event in frontend.eos_token_ids:
                        assembler.token_ids.append(event)
                        continue
                    assembler.add(event)
                    if assembler.stopped:
                        finish = "stop"
                        break
                    piece = assembler.take(final=False)
                    new_ids = assembler.token_ids[sent_ids:]
                    sent_ids = len(assembler.token_ids)
                    yield inference_pb2.GenerateChunk(
                        text=piece,
                        token_ids=new_ids,
                        prompt_tokens=len(prompt_ids),
                        generated_tokens=len(assembler.token_ids),
                    )
            finally:
                # A stop string, a client that left or an error: the row leaves at the next step.
                if finish != "eos" and finish != "length":
                    generation.cancel()
        piece = assembler.take(final=True)
        yield inference_pb2.GenerateChunk(
            text=piece,
            token_ids=assembler.token_ids[sent_ids:],
            finish_reason=finish,
            prompt_tokens=len(prompt_ids),
            generated_tokens=len(assembler.token_ids),
        )
        if key is not None:
            self.cache.set(
                key,
                inference_pb2.GenerateResponse(
                    text=assembler.text,
                    finish_reason=finish,
                    prompt_tokens=len(prompt_ids),
                    generated_tokens=len(assembler.token_ids),
                    token_ids=assembler.token_ids,
                ).SerializeToString(),
            )

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: aio.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        self._admit()
        try:
            response = inference_pb2.GenerateResponse()
            parts: list[str] = []
            async for chunk in self._generate(request, context):
                parts.append(chunk.text)
                response.token_ids.extend(chunk.token_ids)
                response.prompt_tokens = chunk.prompt_tokens
                response.generated_tokens = chunk.generated_tokens
                response.finish_reason = chunk.finish_reason or response.finish_reason
                response.cached = chunk.cached
            response.text = "".join(parts)
            return response
        finally:
            self.outstanding -= 1

    async def GenerateStream(
        self, request: inference_pb2.GenerateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        peer = context.peer() or ""
        limit = self.settings.max_streams_per_connection
        if self._streams.get(peer, 0) >= limit:
            raise ResourceExhausted(
                f"this connection already has {limit} streams open (max_streams_per_connection)"
            )
        self._admit()
        self._streams[peer] = self._streams.get(peer, 0) + 1
        try:
            async for chunk in self._generate(request, context):
                if chunk.text or chunk.finish_reason or chunk.token_ids:
                    yield chunk
        finally:
            self.outstanding -= 1
            self._streams[peer] -= 1
            if not self._streams[peer]:
                del self._streams[peer]

    # -- Embed ------------------------------------------------------------------------------

    async def Embed(
        self, request: inference_pb2.EmbedRequest, context: aio.ServicerContext
    ) -> inference_pb2.EmbedResponse:
        matrix, cached = await self.embed_matrix(request.model, request.inputs, context)
        count = int(matrix.shape[0])
        response = inference_pb2.EmbedResponse(
            dim=int(matrix.shape[1]), cached_inputs=cached, cached=cached == count
        )
        if request.packed:
            response.vectors = matrix.astype("<f4", copy=False).tobytes()
        else:
            response.embeddings.extend(
                inference_pb2.Embedding(values=row) for row in matrix.tolist()
            )
        return response

    async def embed_matrix(
        self, model: str, inputs: Sequence[str], context: aio.ServicerContext
    ) -> tuple[np.ndarray, int]:
        """Embed's work (admission, validation, cache, coalesced calls): the vectors as float32
        [len(inputs), dim] in input order, and how many inputs came from the cache tier."""
        self._admit()
        try:
            deadline = Deadline(context, self.settings.request_timeout_s)
            frontend = self._frontend(model, ModelKind.ENCODER)
            texts = list(inputs)
            self._check_texts(texts)
            # Every vector of one answer comes from one version: the fingerprint is chosen once,
            # keys and calls use it, and if its chains vanish mid-way the answer starts over on
            # another version (cache hits included).
            tried: set[str] = set()
            for _ in range(VERSION_ATTEMPTS):
                fingerprint = self._pick_version(model, tried)
                try:
                    return await self._embed_version(model, fingerprint, frontend, texts, deadline)
                except VersionGone as gone:
                    log.warning("%s; starting the answer again on another version", gone)
                    tried.add(fingerprint)
            raise Unavailable(f"model {model!r}: versions kept going away mid-request")
        finally:
            self.outstanding -= 1

    def _check_texts(self, texts: list[str]) -> None:
        limits = self.settings
        if not texts:
            raise InvalidArgument("inputs is empty")
        if len(texts) > limits.max_embed_inputs:
            raise InvalidArgument(
                f"{len(texts)} inputs is over the {limits.max_embed_inputs} "
                f"limit (max_embed_inputs)"
            )
        for index, text in enumerate(texts):
            if len(text) > limits.max_input_chars:
                raise InvalidArgument(
                    f"inputs[{index}] is over {limits.max_input_chars} characters (max_input_chars)"
                )
            if not text.strip():
                raise InvalidArgument(f"inputs[{index}] is empty")

    def _pick_version(self, model: str, tried: set[str]) -> str:
        """The fingerprint of the least-loaded chain (honouring a pinned version label),
        avoiding versions that already went away during this request."""
        table = self.pool.table
        pinned = getattr(routing, "pinned_version", None)
        label = pinned.get() if pinned is not None else None
        if label is None and not tried:
            # One version serving (the usual case): no need to weigh chains to know it.
            only = self._served_fingerprints(table, model)
            if len(only) == 1:
                return only[0]
        chain = table.route(model, self.pool.load)
        if chain.fingerprint not in tried:
            return chain.fingerprint
        for other in table.chains(model):
            if other.fingerprint not in tried and label in (None, other.version):
                return other.fingerprint
        raise Unavailable(f"model {model!r}: no version is left to answer on")

    def _served_fingerprints(self, table: RoutingTable, model: str) -> tuple[str, ...]:
        """Fingerprints with a healthy chain, computed once per routing table."""
        cached_table, prints = self._fingerprints
        if cached_table is not table:
            prints = {}
            self._fingerprints = (table, prints)
        found = prints.get(model)
        if found is None:
            found = prints[model] = tuple(dict.fromkeys(c.fingerprint for c in table.chains(model)))
        return found

    async def _embed_version(
        self,
        model: str,
        fingerprint: str,
        frontend: ModelFrontend,
        texts: list[str],
        deadline: Deadline,
    ) -> tuple[np.ndarray, int]:
        unique = list(dict.fromkeys(texts)) if len(texts) > 1 else texts
        found: dict[str, np.ndarray] = {}
        keys: list[str] = []
        if self.cache.enabled:
            keys = [embed_key(model, fingerprint, text) for text in unique]
            hits = await self._cache_lookup("embed", keys)
            for text, key in zip(unique, keys):
                raw = hits.get(key)
                vector = decode_vector(raw) if raw is not None else None
                if vector is not None:
                    found[text] = vector
        missing = [i for i, text in enumerate(unique) if text not in found]
        computed: np.ndarray | None = None
        if missing:
            ids = await self._encoder(frontend).encode([unique[i] for i in missing])
            computed = await self.coalescer.embed(
                model, fingerprint, ids, pad_id=frontend.pad_id, deadline=deadline.at
            )
            if keys:
                await self._cache_store(
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

    def _encoder(self, frontend: ModelFrontend) -> BatchedEncoder:
        encoder = self._encoders.get(frontend)
        if encoder is None:
            encoder = self._encoders[frontend] = BatchedEncoder(
                frontend.encode_texts, self._tokenize_thread
            )
        return encoder

    # -- Forward ----------------------------------------------------------------------------

    async def Forward(
        self, request: inference_pb2.ForwardRequest, context: aio.ServicerContext
    ) -> inference_pb2.ForwardResponse:
        self._admit()
        try:
            return await self._forward(request, context)
        finally:
            self.outstanding -= 1

    async def _forward(
        self, request: inference_pb2.ForwardRequest, context: aio.ServicerContext
    ) -> inference_pb2.ForwardResponse:
        deadline = Deadline(context, self.settings.request_timeout_s)
        frontend = self._frontend(request.model)
        num_layers = frontend.spec.num_layers
        end = request.end if request.HasField("end") else num_layers
        if not 0 <= request.start < end <= num_layers:
            raise InvalidArgument(
                f"layers [{request.start}, {end}) must satisfy 0 <= start < end <= {num_layers}"
            )
        span = Span(request.start, end)
        which = request.WhichOneof("input")
        ids: np.ndarray | None = None
        hidden = mask_pb = None
        mask: np.ndarray | None = None
        ids_list: list[int] = []
        if which == "text":
            if span.start != 0:
                raise InvalidArgument("text input needs start = 0; later layers take hidden_states")
            if not request.text.strip():
                raise InvalidArgument("text is empty")
            if len(request.text) > self.settings.max_input_chars:
                raise InvalidArgument(
                    f"text is over {self.settings.max_input_chars} characters (max_input_chars)"
                )
            ids_list = (await self._encoder(frontend).encode([request.text]))[0]
            ids = np.asarray([ids_list], dtype=np.int64)
            mask_pb = from_numpy(np.ones_like(ids))
        elif which == "hidden_states":
            if span.start == 0:
                raise InvalidArgument("hidden_states input needs start > 0; layer 0 takes text")
            shape = validate(
                request.hidden_states,
                "hidden_states",
                ndim=3,
                dtypes=("float32", "float16", "bfloat16"),
            )
            if shape[2] != frontend.spec.hidden_size:
                raise InvalidArgument(
                    f"hidden_states: last dimension must be the hidden size "
                    f"{frontend.spec.hidden_size}, got {shape[2]}"
                )
            if shape[0] == 0 or shape[1] == 0:
                raise InvalidArgument("hidden_states is empty")
            _check_finite(request.hidden_states)
            hidden = request.hidden_states
            if request.HasField("attention_mask"):
                mask_shape = validate(
                    request.attention_mask,
                    "attention_mask",
                    ndim=2,
                    dtypes=("int64", "int32", "bool"),
                )
                if mask_shape != shape[:2]:
                    raise InvalidArgument(
                        f"attention_mask shape {list(mask_shape)} does not "
                        f"match hidden_states {list(shape[:2])}"
                    )
                mask = to_numpy(request.attention_mask, "attention_mask").astype(np.int64)
                if mask.size and (int(mask.min()) < 0 or int(mask.max()) > 1):
                    raise InvalidArgument("attention_mask values must be 0 or 1")
                mask_pb = request.attention_mask
        else:
            raise InvalidArgument("send text or hidden_states")

        tried: set[str] = set()
        for _ in range(VERSION_ATTEMPTS):
            fingerprint = self._pick_version(request.model, tried)
            try:
                out = await self.coalescer.forward(
                    request.model,
                    fingerprint,
                    span,
                    ids=ids,
                    hidden=hidden,
                    mask=mask,
                    pad_id=frontend.pad_id,
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
            span=common_pb2.Span(start=span.start, end=span.end),
            input_ids=ids_list,
        )
        if mask_pb is not None:
            response.attention_mask.CopyFrom(mask_pb)
        return response

    # -- ListModels -------------------------------------------------------------------------

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        table = self.pool.table
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
                        address=worker.address,
                        healthy=worker.address in table.healthy,
                        outstanding=self.pool.load.get(worker.address, 0),
                        span=common_pb2.Span(start=worker.span.start, end=worker.span.end),
                    )
            response.models.append(status)
        return response


def _check_finite(tensor: common_pb2.Tensor) -> None:
    """Hidden states must be finite (the worker checks too, but one bad input must not cost
    the work it would be coalesced with a second try)."""
    if tensor.dtype == "bfloat16":
        words = np.frombuffer(tensor.data, dtype="<u2")
        bad = bool(np.any((words & 0x7F80) == 0x7F80))
    else:
        bad = not bool(np.isfinite(to_numpy(tensor, "hidden_states")).all())
    if bad:
        raise InvalidArgument("hidden_states: contains NaN or Inf")
