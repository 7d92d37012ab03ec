"""The OpenAI-compatible HTTP front, in the router's process and on its event loop.

aiohttp serves `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/models`
(and `/health`, `/ready`, `/metrics`). Every request goes through the same `InferenceService`
the gRPC API uses (admission, the input processor, the version choice, the cache, the generation
engine or the coalescer, the output processor): there is no second engine. A bearer token is
checked against the router's user and admin tokens before the body is read; errors come back
as OpenAI's error object with the matching HTTP status; `traceparent` continues the caller's
trace; a client that closes an SSE stream frees its rows on every stage at the next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.common.errors import InvalidArgument, ServiceError
from services.common.metrics import REQUESTS
from services.common.security import bearer_token
from services.common.types import ModelKind
from services.pb.tessera.v1 import inference_pb2
from services.router.callers import TENANT_KEY
from services.router.openai import schema
from services.router.service import InferenceService

log = logging.getLogger(__name__)
tracer = trace.get_tracer("tessera.router")

STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})


class HttpContext:
    """What the Inference servicer reads of a gRPC call, from an HTTP request: the bearer token
    (and the tenant, without tokens) as metadata; no deadline of its own (request_timeout_s)."""

    def __init__(self, request: web.Request, user: str = "") -> None:
        metadata = []
        if "Authorization" in request.headers:
            metadata.append(("authorization", request.headers["Authorization"]))
        tenant = request.headers.get(TENANT_KEY) or user
        if tenant:
            metadata.append((TENANT_KEY, tenant))
        self._metadata = tuple(metadata)
        self._peer = f"ipv4:{request.remote}:0"

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None

    def peer(self) -> str:
        return self._peer


def error_response(status: int, kind: str, message: str, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return web.json_response(body, status=status)


def _failure(error: ServiceError) -> web.Response:
    status, kind = STATUS.get(error.code, (500, "internal_error"))
    return error_response(status, kind, error.message, getattr(error, "param", None))


class OpenAIFront:
    """The routes, on the same InferenceService as the gRPC API."""

    def __init__(self, inference: InferenceService, *, metrics: bool) -> None:
        self.inference = inference
        self.metrics = metrics

    def app(self, max_body_bytes: int) -> web.Application:
        app = web.Application(
            client_max_size=max_body_bytes, middlewares=[self._errors, self._auth, self._traced]
        )
        app.add_routes(
            [
                web.post("/v1/chat/completions", self.chat_completions),
                web.post("/v1/completions", self.completions),
                web.post("/v1/embeddings", self.embeddings),
                web.get("/v1/models", self.models),
                web.get("/health", self.health),
                web.get("/ready", self.ready),
                web.get("/metrics", self.prometheus),
            ]
        )
        return app

    # -- middlewares --------------------------------------------------------------------------

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        code = "OK"
        try:
            return await handler(request)
        except ServiceError as error:
            code = error.code.name
            return _failure(error)
        except web.HTTPRequestEntityTooLarge as too_large:
            code = "INVALID_ARGUMENT"
            return error_response(413, "invalid_request_error", too_large.text or "too large")
        except web.HTTPException as http:
            if http.status < 400:
                raise
            code = "NOT_FOUND" if http.status in (404, 405) else "INVALID_ARGUMENT"
            kind = "not_found_error" if code == "NOT_FOUND" else "invalid_request_error"
            return error_response(http.status, kind, f"{request.method} {http.reason}")
        except (asyncio.CancelledError, ConnectionResetError):
            code = "CANCELLED"
            raise
        except Exception:  # noqa: BLE001 - never a traceback to the client
            code = "INTERNAL"
            log.exception("unexpected error in %s %s", request.method, request.path)
            return error_response(500, "internal_error", "internal error; see router logs")
        finally:
            # The route's own path, never the request's: a label per made-up path would grow
            # the registry without bound.
            route = request.match_info.route.resource
            path = route.canonical if route is not None else "unknown"
            if path.startswith("/v1/") or path == "unknown":
                REQUESTS.labels("openai", path, "", code).inc()

    @web.middleware
    async def _auth(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """The router's user (or admin) tokens, checked before the body is read."""
        tokens = self.inference.callers.tokens
        if request.path not in OPEN_PATHS and tokens.enabled:
            _, token = bearer_token((("authorization", request.headers.get("Authorization", "")),))
            if not (token and tokens.accepts(token)):
                message = (
                    "invalid API key"
                    if token
                    else "missing API key: send Authorization: Bearer <token>"
                )
                return error_response(401, "authentication_error", message)
        return await handler(request)

    @web.middleware
    async def _traced(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """A server span, continuing the caller's `traceparent`."""
        if request.path in OPEN_PATHS:
            return await handler(request)
        parent = propagate.extract(dict(request.headers))
        token = otel_context.attach(parent)
        try:
            with tracer.start_as_current_span(
                f"{request.method} {request.path}", kind=trace.SpanKind.SERVER
            ):
                return await handler(request)
        finally:
            otel_context.detach(token)

    # -- generation ---------------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        job = schema.parse_generation(await _json(request), chat=chat)
        context = HttpContext(request, job.user)
        frontend = self.inference.inputs.frontend(job.model, ModelKind.CAUSAL_LM)
        text_of = _token_text(frontend)
        if job.stream:
            return await self._stream(request, job, context, text_of)
        answers = await asyncio.gather(*(self.inference.generate(r, context) for r in job.requests))
        choices = [
            self._choice(index, answer, job, text_of) for index, answer in enumerate(answers)
        ]
        completion = sum(a.generated_tokens for a in answers)
        return web.json_response(
            {
                "id": job.id,
                "object": "chat.completion" if chat else "text_completion",
                "created": job.created,
                "model": job.model,
                "system_fingerprint": answers[0].version,  # the version label that answered
                "choices": choices,
                "usage": _usage(answers[0].prompt_tokens, completion),
            }
        )

    def _choice(
        self,
        index: int,
        answer: inference_pb2.GenerateResponse,
        job: schema.Generation,
        text_of: Any,
    ) -> dict[str, Any]:
        finish = schema.FINISH.get(answer.finish_reason, answer.finish_reason)
        if job.chat:
            return {
                "index": index,
                "message": {"role": "assistant", "content": answer.text},
                "logprobs": {
                    "content": schema.logprobs_content(answer.logprobs, text_of, job.top_logprobs)
                }
                if job.logprobs
                else None,
                "finish_reason": finish,
            }
        return {
            "index": index,
            "text": answer.text,
            "logprobs": schema.completion_logprobs(answer.logprobs, text_of, job.top_logprobs)
            if job.logprobs
            else None,
            "finish_reason": finish,
        }

    async def _stream(
        self, request: web.Request, job: schema.Generation, context: HttpContext, text_of: Any
    ) -> web.StreamResponse:
        """Server-sent events: a chunk per piece of text of each choice, then (optionally) a
        usage chunk, then `data: [DONE]`. A client that goes away ends every choice's row."""
        chunks: asyncio.Queue[tuple[int, inference_pb2.GenerateChunk | BaseException | None]]
        chunks = asyncio.Queue()

        async def run(index: int, generate: inference_pb2.GenerateRequest) -> None:
            try:
                async for chunk in self.inference.stream(generate, context):
                    chunks.put_nowait((index, chunk))
                chunks.put_nowait((index, None))
            except BaseException as error:  # noqa: BLE001 - handed to the writer
                chunks.put_nowait((index, error))
                if isinstance(error, asyncio.CancelledError):
                    raise

        tasks = [asyncio.create_task(run(i, r)) for i, r in enumerate(job.requests)]
        response: web.StreamResponse | None = None
        try:
            first, prompt_tokens, completion = True, 0, 0
            open_choices = len(tasks)
            while open_choices:
                index, item = await chunks.get()
                if isinstance(item, BaseException):
                    if response is None and isinstance(item, ServiceError):
                        raise item  # nothing sent yet: an ordinary error response
                    raise item
                if response is None:
                    response = await _start_sse(request)
                if item is None:
                    open_choices -= 1
                    continue
                prompt_tokens = item.prompt_tokens
                completion += len(item.token_ids)
                job.version = item.version or job.version
                await _event(response, self._chunk(job, index, item, first, text_of))
                first = False
            if response is None:
                response = await _start_sse(request)
            if job.include_usage:
                usage = {
                    **self._envelope(job),
                    "choices": [],
                    "usage": _usage(prompt_tokens, completion),
                }
                await _event(response, usage)
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        except ServiceError as error:
            if response is None:
                raise
            await _event(response, json.loads(_failure(error).text or "{}"))
            await response.write_eof()
            return response
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _envelope(self, job: schema.Generation) -> dict[str, Any]:
        return {
            "id": job.id,
            "object": "chat.completion.chunk" if job.chat else "text_completion",
            "created": job.created,
            "model": job.model,
            "system_fingerprint": job.version or None,  # the version label that answers
        }

    def _chunk(
        self,
        job: schema.Generation,
        index: int,
        chunk: inference_pb2.GenerateChunk,
        first: bool,
        text_of: Any,
    ) -> dict[str, Any]:
        finish = schema.FINISH.get(chunk.finish_reason, chunk.finish_reason) or None
        choice: dict[str, Any] = {"index": index, "finish_reason": finish}
        if job.chat:
            delta: dict[str, Any] = {"content": chunk.text}
            if first:
                delta["role"] = "assistant"
            choice["delta"] = delta
            choice["logprobs"] = (
                {"content": schema.logprobs_content(chunk.logprobs, text_of, job.top_logprobs)}
                if job.logprobs
                else None
            )
        else:
            choice["text"] = chunk.text
            choice["logprobs"] = (
                schema.completion_logprobs(chunk.logprobs, text_of, job.top_logprobs)
                if job.logprobs
                else None
            )
        return {**self._envelope(job), "choices": [choice]}

    # -- embeddings ---------------------------------------------------------------------------

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        job = schema.parse_embeddings(await _json(request))
        context = HttpContext(request, job.user)
        frontend = self.inference.inputs.frontend(job.model, ModelKind.ENCODER)
        if job.ids is not None:
            limit = frontend.max_length
            vocab = frontend.tokenizer.get_vocab_size()
            for row in job.ids:
                if len(row) > limit or min(row) < 0 or max(row) >= vocab:
                    raise schema.bad(
                        f"a token array must hold 1 to {limit} ids in [0, {vocab})", "input"
                    )
            ids, names, token_inputs = job.ids, [",".join(map(str, row)) for row in job.ids], True
        else:
            assert job.texts is not None
            names = self.inference.inputs.texts(job.texts)
            ids = await self.inference.inputs.encoder(frontend).encode(names)
            token_inputs = False
        matrix, _, _ = await self.inference.embed_matrix(
            job.model, names, context, ids=ids, token_inputs=token_inputs
        )
        tokens = sum(len(row) for row in ids)
        return web.json_response(
            {
                "object": "list",
                "data": schema.embedding_data(matrix, job.base64),
                "model": job.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    # -- models, health -----------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.StreamResponse:
        table = self.inference.pool.table
        data = []
        for model in table.models():
            ready = {f for f, _ in table.versions(model)}
            versions = [
                {"version": label, "fingerprint": fingerprint, "ready": fingerprint in ready}
                for fingerprint, label in table.versions(model, healthy_only=False)
            ]
            data.append(
                {
                    "id": model,
                    "object": "model",
                    "created": 0,
                    "owned_by": "tessera",
                    "versions": versions,
                }
            )
        return web.json_response({"object": "list", "data": data})

    async def health(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.StreamResponse:
        """Ready when a full healthy chain of some model exists (and not draining)."""
        table = self.inference.pool.table
        models = {m: bool(table.chains(m)) for m in table.models()}
        ok = any(models.values()) and not self.inference.draining
        return web.json_response({"ready": ok, "models": models}, status=200 if ok else 503)

    async def prometheus(self, request: web.Request) -> web.StreamResponse:
        if not self.metrics:
            return error_response(404, "not_found_error", "metrics are off (metrics_port -1)")
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _json(request: web.Request) -> Any:
    try:
        return await request.json()
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"the body is not JSON: {exc.msg}") from None
    except UnicodeDecodeError:
        raise InvalidArgument("the body is not UTF-8 JSON") from None


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _token_text(frontend: Any) -> Callable[[int], str]:
    cache: dict[int, str] = {}

    def text_of(token: int) -> str:
        text = cache.get(token)
        if text is None:
            text = cache[token] = frontend.decode([token])
        return text

    return text_of


async def _start_sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    return response


async def _event(response: web.StreamResponse, body: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n")


async def serve_http(
    front: OpenAIFront, host: str, port: int, max_body_bytes: int
) -> tuple[web.AppRunner, int]:
    """Starts the front on the running loop; returns its runner and the bound port."""
    runner = web.AppRunner(front.app(max_body_bytes), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    sockets = getattr(site._server, "sockets", None)  # noqa: SLF001 - the port bound for 0
    bound = int(sockets[0].getsockname()[1]) if sockets else port
    return runner, bound
