"""What the sync and async clients share: channel setup, request building, result decoding."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from tessera._pb.tessera.v1 import common_pb2, inference_pb2
from tessera.types import (
    ChainInfo,
    ChatMessage,
    ChunkResult,
    EmbedResult,
    ForwardResult,
    GenerateResult,
    ModelInfo,
    StageInfo,
    TesseraError,
)

SERVICE = "tessera.v1.Inference"
HEALTH_SERVICE = "grpc.health.v1.Health"
DEFAULT_ADDRESS = "localhost:50051"
DEFAULT_TIMEOUT_S = 60.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_ATTEMPTS_LIMIT = 5  # gRPC caps retryPolicy.maxAttempts at 5

Messages = Sequence[ChatMessage | tuple[str, str] | Mapping[str, str]]


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Default()  # "use the client's timeout"; None means no deadline at all


def service_config(retries: int, load_balancing: str | None = None) -> dict[str, Any]:
    """The gRPC service config: retries on UNAVAILABLE with exponential backoff.

    Every Tessera RPC is free of side effects, so a retried call is safe; gRPC only retries
    a stream before its first message arrives.
    """
    if not 0 <= retries < MAX_ATTEMPTS_LIMIT:
        raise ValueError(f"retries must be in [0, {MAX_ATTEMPTS_LIMIT - 1}], got {retries}")
    method: dict[str, Any] = {"name": [{"service": SERVICE}, {"service": HEALTH_SERVICE}]}
    if retries:
        method["retryPolicy"] = {
            "maxAttempts": retries + 1,
            "initialBackoff": "0.1s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    config: dict[str, Any] = {"methodConfig": [method]}
    if load_balancing:
        config["loadBalancingConfig"] = [{load_balancing: {}}]
    return config


def channel_options(
    retries: int, load_balancing: str | None, extra: Sequence[tuple[str, Any]] = ()
) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(service_config(retries, load_balancing))),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # Keepalive pings keep long generation streams open through meshes and balancers.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.primary_user_agent", "tessera-client"),
    ]
    names = {name for name, _ in extra}
    return [(k, v) for k, v in options if k not in names] + list(extra)


def _read(path: str | Path | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def credentials(
    tls: bool, ca: str | Path | None, cert: str | Path | None, key: str | Path | None
) -> grpc.ChannelCredentials | None:
    """TLS credentials (with a client certificate for mutual TLS), or None for plaintext."""
    if bool(cert) != bool(key):
        raise ValueError("a client certificate needs its key (and the other way round)")
    if not (tls or ca or cert):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca), private_key=_read(key), certificate_chain=_read(cert)
    )


def call_metadata(
    token: str | None, metadata: Sequence[tuple[str, str]]
) -> tuple[tuple[str, str], ...]:
    pairs = list(metadata)
    if token:
        pairs.append(("authorization", f"Bearer {token}"))
    return tuple(pairs)


def error(exc: grpc.RpcError, method: str) -> TesseraError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return TesseraError(code, details or code.name, method)


# -- requests --------------------------------------------------------------------------------


def _message(item: ChatMessage | tuple[str, str] | Mapping[str, str]) -> inference_pb2.ChatMessage:
    if isinstance(item, ChatMessage):
        return inference_pb2.ChatMessage(role=item.role, content=item.content)
    if isinstance(item, Mapping):
        return inference_pb2.ChatMessage(role=item["role"], content=item["content"])
    role, content = item
    return inference_pb2.ChatMessage(role=role, content=content)


def generate_request(
    model: str,
    prompt: str | None,
    messages: Messages | None,
    max_new_tokens: int | None,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    stop: str | Sequence[str],
) -> inference_pb2.GenerateRequest:
    if (prompt is None) == (messages is None):
        raise ValueError("pass either prompt or messages")
    request = inference_pb2.GenerateRequest(
        model=model,
        prompt=prompt or "",
        messages=[_message(m) for m in messages or ()],
        stop=[stop] if isinstance(stop, str) else list(stop),
    )
    for name, value in (
        ("max_new_tokens", max_new_tokens),
        ("temperature", temperature),
        ("top_k", top_k),
        ("top_p", top_p),
        ("seed", seed),
    ):
        if value is not None:
            setattr(request, name, value)
    return request


def embed_request(model: str, inputs: str | Sequence[str]) -> inference_pb2.EmbedRequest:
    # Packed: the vectors come back as one float32 block, cheaper to build and to parse than
    # a message per vector. A router that predates it ignores the flag and sends embeddings.
    return inference_pb2.EmbedRequest(
        model=model, inputs=[inputs] if isinstance(inputs, str) else inputs, packed=True
    )


_DTYPES = {"float32": "<f4", "float16": "<f2", "int64": "<i8", "int32": "<i4", "bool": "bool"}


def to_tensor(array: np.ndarray) -> common_pb2.Tensor:
    array = np.asarray(array)
    for name, dtype in _DTYPES.items():
        if array.dtype == np.dtype(dtype).newbyteorder("="):
            return common_pb2.Tensor(
                dtype=name,
                shape=list(array.shape),
                data=np.ascontiguousarray(array, dtype=dtype).tobytes(),
            )
    raise TypeError(
        f"no wire dtype for numpy {array.dtype}; use float32, float16, int64, int32 or bool"
    )


def from_tensor(tensor: common_pb2.Tensor) -> np.ndarray:
    shape = tuple(tensor.shape)
    if tensor.dtype == "bfloat16":  # no numpy dtype: widen the raw words to float32
        words = np.frombuffer(tensor.data, dtype="<u2").astype(np.uint32) << 16
        return words.view(np.float32).reshape(shape)
    if tensor.dtype not in _DTYPES:
        raise TesseraError(grpc.StatusCode.INTERNAL, f"unknown tensor dtype {tensor.dtype!r}")
    return np.frombuffer(tensor.data, dtype=_DTYPES[tensor.dtype]).reshape(shape)


def forward_request(
    model: str,
    start: int,
    end: int | None,
    text: str | None,
    hidden_states: np.ndarray | None,
    attention_mask: np.ndarray | None,
) -> inference_pb2.ForwardRequest:
    if (text is None) == (hidden_states is None):
        raise ValueError("pass either text or hidden_states")
    request = inference_pb2.ForwardRequest(model=model, start=start)
    if end is not None:
        request.end = end
    if text is not None:
        request.text = text
    else:
        request.hidden_states.CopyFrom(to_tensor(np.asarray(hidden_states)))
    if attention_mask is not None:
        request.attention_mask.CopyFrom(to_tensor(np.asarray(attention_mask)))
    return request


# -- results ---------------------------------------------------------------------------------


def generate_result(reply: inference_pb2.GenerateResponse) -> GenerateResult:
    return GenerateResult(
        text=reply.text,
        finish_reason=reply.finish_reason,
        prompt_tokens=reply.prompt_tokens,
        generated_tokens=reply.generated_tokens,
        cached=reply.cached,
        token_ids=tuple(reply.token_ids),
    )


def chunk_result(chunk: inference_pb2.GenerateChunk) -> ChunkResult:
    return ChunkResult(
        text=chunk.text,
        token_ids=tuple(chunk.token_ids),
        finish_reason=chunk.finish_reason or None,
        prompt_tokens=chunk.prompt_tokens,
        generated_tokens=chunk.generated_tokens,
        cached=chunk.cached,
    )


def embed_result(reply: inference_pb2.EmbedResponse) -> EmbedResult:
    if reply.vectors:
        if reply.dim <= 0 or len(reply.vectors) % (4 * reply.dim):
            raise TesseraError(grpc.StatusCode.INTERNAL, "packed vectors do not match dim")
        matrix = np.frombuffer(reply.vectors, dtype="<f4").reshape(-1, reply.dim)
        return EmbedResult(
            embeddings=tuple(map(tuple, matrix.tolist())),
            dim=reply.dim,
            cached_inputs=reply.cached_inputs,
            cached=reply.cached,
            _matrix=matrix.astype(np.float32),
        )
    return EmbedResult(
        embeddings=tuple(tuple(e.values) for e in reply.embeddings),
        dim=reply.dim,
        cached_inputs=reply.cached_inputs,
        cached=reply.cached,
    )


def forward_result(reply: inference_pb2.ForwardResponse) -> ForwardResult:
    return ForwardResult(
        hidden_states=from_tensor(reply.hidden_states),
        attention_mask=(
            from_tensor(reply.attention_mask) if reply.HasField("attention_mask") else None
        ),
        start=reply.span.start,
        end=reply.span.end,
        input_ids=tuple(reply.input_ids),
    )


def model_infos(reply: inference_pb2.ListModelsResponse) -> tuple[ModelInfo, ...]:
    return tuple(
        ModelInfo(
            name=m.name,
            version=m.version,
            fingerprint=m.fingerprint,
            num_layers=m.num_layers,
            kind=m.kind,
            healthy=m.healthy,
            chains=tuple(
                ChainInfo(
                    healthy=c.healthy,
                    stages=tuple(
                        StageInfo(
                            address=s.address,
                            start=s.span.start,
                            end=s.span.end,
                            healthy=s.healthy,
                            outstanding=s.outstanding,
                        )
                        for s in c.stages
                    ),
                )
                for c in m.chains
            ),
        )
        for m in reply.models
    )
