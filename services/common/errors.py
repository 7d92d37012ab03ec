"""Service errors carrying their gRPC status code, and the interceptor that maps them."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error the client should see, with its status code and a human message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class MissingSpanError(Unavailable):
    """No healthy chain covers a model's layers."""

    def __init__(self, model: str, missing: str) -> None:
        super().__init__(f"no healthy chain for model {model!r}: nothing serves layers {missing}")
        self.model = model


async def _abort_for(exc: BaseException, context: aio.ServicerContext, method: str) -> None:
    if isinstance(exc, ServiceError):
        await context.abort(exc.code, exc.message)
    if isinstance(exc, aio.AioRpcError):
        # A downstream call failed in a way the handler did not translate: keep its code when
        # it is one the client may act on, never pass INVALID_ARGUMENT (that would be our bug).
        code = exc.code()
        if code in (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.CANCELLED,
        ):
            await context.abort(code, exc.details() or code.name)
    log.exception("unexpected error in %s", method)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see server logs")


_UNDECODABLE = object()
_UNDECODABLE_MESSAGE = "request is not a valid protobuf message (bad wire format or invalid UTF-8)"


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A deserializer that hands the handler a marker instead of failing inside gRPC (UNKNOWN)."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - any decoding failure is the client's bad input
            return _UNDECODABLE

    return deserialize


async def _checked(request_iterator: Any) -> Any:
    async for request in request_iterator:
        if request is _UNDECODABLE:
            raise InvalidArgument(_UNDECODABLE_MESSAGE)
        yield request


class ErrorInterceptor(aio.ServerInterceptor):
    """Maps ServiceError to its status; anything unexpected to INTERNAL with a logged traceback."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: aio.ServicerContext) -> Any:
                try:
                    if request is _UNDECODABLE:
                        raise InvalidArgument(_UNDECODABLE_MESSAGE)
                    return await inner_uu(request, context)
                except (aio.AbortError, aio.UsageError):
                    raise
                except Exception as exc:  # noqa: BLE001 - the boundary that maps every error
                    await _abort_for(exc, context, method)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, _safe(handler.request_deserializer), handler.response_serializer
            )
        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: aio.ServicerContext) -> Any:
                try:
                    if request is _UNDECODABLE:
                        raise InvalidArgument(_UNDECODABLE_MESSAGE)
                    async for item in inner_us(request, context):
                        yield item
                except (aio.AbortError, aio.UsageError):
                    raise
                except Exception as exc:  # noqa: BLE001
                    await _abort_for(exc, context, method)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, _safe(handler.request_deserializer), handler.response_serializer
            )
        if handler.stream_stream:
            inner_ss = handler.stream_stream

            async def stream_stream(request_iterator: Any, context: aio.ServicerContext) -> Any:
                try:
                    async for item in inner_ss(_checked(request_iterator), context):
                        yield item
                except (aio.AbortError, aio.UsageError):
                    raise
                except Exception as exc:  # noqa: BLE001
                    await _abort_for(exc, context, method)

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, _safe(handler.request_deserializer), handler.response_serializer
            )
        return handler
