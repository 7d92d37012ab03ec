"""The asyncio Tessera client (grpc.aio)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Self

import grpc
import numpy as np
from grpc import aio

from tessera import _wire
from tessera._health import health_pb2, health_pb2_grpc
from tessera._pb.tessera.v1 import inference_pb2, inference_pb2_grpc
from tessera._wire import DEFAULT, DEFAULT_ADDRESS, DEFAULT_TIMEOUT_S, Messages
from tessera.types import (
    ChunkResult,
    EmbedResult,
    ForwardResult,
    GenerateResult,
    ModelInfo,
)


class AsyncClient:
    """The asyncio twin of Client: same arguments, awaitable methods, `stream` is an async
    iterator. Create it inside a running event loop; `async with` or `await close()`.

        async with AsyncClient("localhost:50051") as client:
            async for chunk in client.stream("smollm2-135m-instruct", "Once upon a time"):
                print(chunk.text, end="")
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        retries: int = 3,
        tls: bool = False,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        token: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        load_balancing: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.options = _wire.channel_options(retries, load_balancing, options)
        creds = _wire.credentials(tls, ca, cert, key)
        self._channel = (
            aio.secure_channel(address, creds, options=self.options)
            if creds
            else aio.insecure_channel(address, options=self.options)
        )
        self._metadata = _wire.call_metadata(token, metadata)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is DEFAULT else timeout

    async def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        try:
            return await getattr(self._stub, method)(
                request, timeout=self._deadline(timeout), metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise _wire.error(exc, method) from None

    async def generate(
        self,
        model: str,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        timeout: float | None = DEFAULT,
    ) -> GenerateResult:
        """Generates a completion for a prompt or a chat (messages), returned whole."""
        request = _wire.generate_request(
            model, prompt, messages, max_new_tokens, temperature, top_k, top_p, seed, stop
        )
        return _wire.generate_result(await self._call("Generate", request, timeout))

    def stream(
        self,
        model: str,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        timeout: float | None = DEFAULT,
    ) -> AsyncIterator[ChunkResult]:
        """Generates a completion chunk by chunk; leaving the loop early cancels the call."""
        request = _wire.generate_request(
            model, prompt, messages, max_new_tokens, temperature, top_k, top_p, seed, stop
        )
        return self._stream(request, timeout)

    async def _stream(
        self, request: inference_pb2.GenerateRequest, timeout: float | None
    ) -> AsyncIterator[ChunkResult]:
        call = self._stub.GenerateStream(
            request, timeout=self._deadline(timeout), metadata=self._metadata
        )
        try:
            async for chunk in call:
                yield _wire.chunk_result(chunk)
        except grpc.RpcError as exc:
            raise _wire.error(exc, "GenerateStream") from None
        finally:
            call.cancel()

    async def embed(
        self, model: str, inputs: str | Sequence[str], *, timeout: float | None = DEFAULT
    ) -> EmbedResult:
        """Embeds texts with an encoder model (mean pooling + L2 normalisation)."""
        return _wire.embed_result(
            await self._call("Embed", _wire.embed_request(model, inputs), timeout)
        )

    async def forward(
        self,
        model: str,
        *,
        text: str | None = None,
        hidden_states: np.ndarray | None = None,
        start: int = 0,
        end: int | None = None,
        attention_mask: np.ndarray | None = None,
        timeout: float | None = DEFAULT,
    ) -> ForwardResult:
        """Runs layers [start, end) on text (start = 0) or hidden states (start > 0)."""
        request = _wire.forward_request(model, start, end, text, hidden_states, attention_mask)
        return _wire.forward_result(await self._call("Forward", request, timeout))

    async def list_models(self, *, timeout: float | None = DEFAULT) -> tuple[ModelInfo, ...]:
        """The models served, their versions, chains and health."""
        return _wire.model_infos(
            await self._call("ListModels", inference_pb2.ListModelsRequest(), timeout)
        )

    async def ready(self, model: str = "", *, timeout: float | None = DEFAULT) -> bool:
        """grpc.health.v1: whether the router (or one model, by name) is SERVING."""
        try:
            reply = await self._health.Check(
                health_pb2.HealthCheckRequest(service=model),
                timeout=self._deadline(timeout),
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                return False
            raise _wire.error(exc, "Check") from None
        return reply.status == health_pb2.HealthCheckResponse.SERVING
