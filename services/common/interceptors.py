"""One way to wrap gRPC server handlers: an interceptor says what happens around a call.

grpc.aio hands an interceptor a method handler of one of four kinds (unary or streaming
request, unary or streaming response); wrapping each kind by hand is easy to get subtly wrong
(a forgotten kind, a dropped deserializer). `AroundInterceptor` does the wrapping once: a
subclass implements `around(call)`, an async context manager entered before the handler runs
and exited when it returns, raises or is cancelled (for streams: when the last response is sent).

The hook sees the handler's exception as it is: interceptors installed inside the error
interceptor see a `ServiceError` or any other exception, not yet the status the client gets
(`services.common.errors.outcome` says which status that will be).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

Deserializer = Callable[[bytes], Any]
Metadata = tuple[tuple[str, str | bytes], ...]


@dataclass(frozen=True, slots=True)
class Call:
    """One RPC as a hook sees it. `request` is None when the client streams its requests."""

    method: str
    metadata: Metadata
    request: Any
    context: aio.ServicerContext


class AroundInterceptor(aio.ServerInterceptor):
    """A server interceptor made of one per-call hook, applied to every kind of handler.

    `around` may raise (or abort the context) before yielding to refuse the call; it must not
    swallow the handler's exception, only let it through or replace it with another. Streaming
    handlers may be async generators or coroutines that write with `context.write`.
    """

    def intercepts(self, method: str) -> bool:
        """Whether calls to `method` go through `around` at all."""
        return True

    def around(self, call: Call) -> AbstractAsyncContextManager[object]:
        raise NotImplementedError

    def request_deserializer(self, deserializer: Deserializer | None) -> Deserializer | None:
        """The deserializer gRPC should use instead of the handler's (the same by default)."""
        return deserializer

    def requests(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """What a streaming handler reads instead of the client's stream (the same by default)."""
        return requests

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self.intercepts(method):
            return handler
        metadata = tuple(handler_call_details.invocation_metadata or ())
        return wrap_handler(handler, self, method, metadata)


def wrap_handler(
    handler: grpc.RpcMethodHandler, interceptor: AroundInterceptor, method: str, metadata: Metadata
) -> grpc.RpcMethodHandler:
    """`handler` with `interceptor.around` around each call, whatever the handler's kind."""
    around = interceptor.around
    deserializer = interceptor.request_deserializer(handler.request_deserializer)
    serializer = handler.response_serializer

    if handler.unary_unary:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: aio.ServicerContext) -> Any:
            async with around(Call(method, metadata, request, context)):
                return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, deserializer, serializer)
    if handler.unary_stream:
        inner_us = handler.unary_stream
        if not inspect.isasyncgenfunction(inner_us):
            # A streaming handler that writes with context.write (grpc's health Watch).
            async def unary_stream_writer(request: Any, context: aio.ServicerContext) -> Any:
                async with around(Call(method, metadata, request, context)):
                    return await inner_us(request, context)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream_writer, deserializer, serializer
            )

        async def unary_stream(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            async with around(Call(method, metadata, request, context)):
                async for response in inner_us(request, context):
                    yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream, deserializer, serializer)
    if handler.stream_unary:
        inner_su = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: aio.ServicerContext) -> Any:
            async with around(Call(method, metadata, None, context)):
                return await inner_su(interceptor.requests(requests), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, deserializer, serializer)
    if handler.stream_stream:
        inner_ss = handler.stream_stream

        async def stream_stream(
            requests: AsyncIterator[Any], context: aio.ServicerContext
        ) -> AsyncIterator[Any]:
            async with around(Call(method, metadata, None, context)):
                async for response in inner_ss(interceptor.requests(requests), context):
                    yield response

        return grpc.stream_stream_rpc_method_handler(stream_stream, deserializer, serializer)
    return handler
