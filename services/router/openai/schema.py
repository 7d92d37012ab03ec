"""OpenAI request bodies to Tessera's requests, and Tessera's answers to OpenAI's objects.

Every field OpenAI defines is either supported (mapped onto `GenerateRequest` /
`EmbedRequest`), accepted at its neutral value (`presence_penalty: 0`, `n: 1`, ...), or refused
with a 400 that names it: never silently ignored. docs/openai.md lists them.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.common.errors import InvalidArgument
from services.pb.tessera.v1 import common_pb2, inference_pb2

MAX_N = 16  # choices per request (rows of one batch)
MAX_STOP = 4  # OpenAI's own bound on stop sequences
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}

# Fields read by the generation endpoints; anything else that is not neutral is refused.
CHAT_FIELDS = {
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "user",
    "response_format",
    "top_k",  # an extension vLLM and llama.cpp accept too
    "priority",  # Tessera's scheduling priority (its tokens cap it)
}
COMPLETION_FIELDS = (CHAT_FIELDS - {"messages", "max_completion_tokens", "top_logprobs"}) | {
    "prompt"
}
# Fields accepted only at the value that changes nothing.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "parallel_tool_calls": (None,),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "metadata": (None, {}),
    "modalities": (None, ["text"]),
}


def bad(message: str, param: str | None = None) -> InvalidArgument:
    error = InvalidArgument(message)
    error.param = param  # type: ignore[attr-defined]
    return error


def refuse_unknown(body: Mapping[str, Any], supported: set[str]) -> None:
    """A 400 naming every field Tessera does not support (at a value that would matter)."""
    refused = sorted(
        key
        for key, value in body.items()
        if key not in supported and not (key in NEUTRAL and _neutral(value, NEUTRAL[key]))
    )
    if refused:
        raise bad(f"unsupported parameter(s): {', '.join(refused)}", refused[0])


def _neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    return any(value == n for n in neutral)


def _number(body: Mapping[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad(f"{name} must be a number", name)
    if kind is int and not float(value).is_integer():
        raise bad(f"{name} must be an integer", name)
    return kind(value)


def _stop(body: Mapping[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop must be a string or an array of strings", "stop")
    if len(stops) > MAX_STOP:
        raise bad(f"stop takes at most {MAX_STOP} sequences", "stop")
    return stops


@dataclass
class Generation:
    """A chat or completion request, parsed: the GenerateRequest of each choice and how the
    answer is shaped."""

    model: str
    requests: list[inference_pb2.GenerateRequest]
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    user: str = ""
    chat: bool = True
    version: str = ""  # the version label that answers (from the first chunk)
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")


def parse_generation(body: Any, *, chat: bool) -> Generation:
    """A /v1/chat/completions (chat) or /v1/completions body, validated."""
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    refuse_unknown(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model is required", "model")
    base = inference_pb2.GenerateRequest(model=model)
    if chat:
        _messages(body.get("messages"), base)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise bad("prompt must be a string (one prompt per request)", "prompt")
        base.prompt = prompt
    limit = _number(body, "max_completion_tokens", int) if chat else None
    limit = limit if limit is not None else _number(body, "max_tokens", int)
    if limit is not None:
        base.max_new_tokens = limit
    for name in ("temperature", "top_p"):
        value = _number(body, name, float)
        if value is not None:
            setattr(base, name, value)
    top_k = _number(body, "top_k", int)
    if top_k is not None and top_k >= 0:
        base.top_k = top_k
    seed = _number(body, "seed", int)
    if seed is not None:
        base.seed = seed
    priority = _number(body, "priority", int)
    if priority is not None:
        base.priority = priority
    base.stop.extend(_stop(body))
    logprobs, top = _logprobs(body, chat)
    base.logprobs = logprobs
    if top:
        base.top_logprobs = top
    _response_format(body.get("response_format"), base)
    n = _number(body, "n", int)
    n = 1 if n is None else n
    if not 1 <= n <= MAX_N:
        raise bad(f"n must be in [1, {MAX_N}]", "n")
    stream = body.get("stream") or False
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise bad("stream must be a boolean and stream_options an object", "stream")
    if set(options) - {"include_usage"}:
        raise bad("stream_options supports include_usage only", "stream_options")
    if options and not stream:
        raise bad("stream_options needs stream: true", "stream_options")
    user = body.get("user") or ""
    if not isinstance(user, str):
        raise bad("user must be a string", "user")
    return Generation(
        model=model,
        requests=_choices(base, n),
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        logprobs=logprobs,
        top_logprobs=top,
        user=user[:64],
        chat=chat,
        id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
    )


def _choices(base: inference_pb2.GenerateRequest, n: int) -> list[inference_pb2.GenerateRequest]:
    """n rows of one batch. Seeded sampled choices draw with seed, seed + 1, ... so they differ
    and each can be replayed; greedy ones are alike, as the same prompt must be."""
    requests = []
    for index in range(n):
        request = inference_pb2.GenerateRequest()
        request.CopyFrom(base)
        if index and request.HasField("seed") and request.temperature > 0:
            request.seed = (request.seed + index) % 2**63
        requests.append(request)
    return requests


def _messages(messages: Any, request: inference_pb2.GenerateRequest) -> None:
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty array", "messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad(f"messages[{index}] must be an object", "messages")
        unknown = set(message) - {"role", "content", "name"}
        if unknown:
            raise bad(f"messages[{index}] has unsupported fields {sorted(unknown)}", "messages")
        role = message.get("role")
        role = "system" if role == "developer" else role
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise bad(f"messages[{index}]: only text content parts are supported", "messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(role, str) or not isinstance(content, str):
            raise bad(f"messages[{index}] needs a role and a text content", "messages")
        request.messages.add(role=role, content=content)


def _logprobs(body: Mapping[str, Any], chat: bool) -> tuple[bool, int]:
    value = body.get("logprobs")
    if chat:
        top = _number(body, "top_logprobs", int) or 0
        if value is not None and not isinstance(value, bool):
            raise bad("logprobs must be a boolean", "logprobs")
        if top and not value:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")
        return bool(value), top
    if value is None or value is False:  # legacy completions: an integer of alternatives
        return False, 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise bad("logprobs must be an integer in [0, 5]", "logprobs")
    return True, int(value)


def _response_format(value: Any, request: inference_pb2.GenerateRequest) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise bad("response_format must be an object with a type", "response_format")
    kind = value["type"]
    request.response_format.type = kind
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise bad("response_format.json_schema needs a schema object", "response_format")
        request.response_format.json_schema = json.dumps(spec["schema"])
    elif kind not in ("text", "json_object"):
        raise bad(
            "response_format.type must be text, json_object or json_schema", "response_format"
        )


# -- answers --------------------------------------------------------------------------------


def logprobs_content(
    entries: Sequence[common_pb2.TokenLogprob], text_of: Any, top: int
) -> list[dict[str, Any]]:
    """OpenAI's chat `logprobs.content`: per token its text, bytes, logprob and alternatives."""
    content = []
    for entry in entries:
        token = text_of(entry.token_id)
        content.append(
            {
                "token": token,
                "logprob": entry.logprob,
                "bytes": list(token.encode()),
                "top_logprobs": [
                    {"token": text_of(t), "logprob": lp, "bytes": list(text_of(t).encode())}
                    for t, lp in list(zip(entry.top_ids, entry.top_logprobs, strict=True))[:top]
                ],
            }
        )
    return content


def completion_logprobs(
    entries: Sequence[common_pb2.TokenLogprob], text_of: Any, top: int
) -> dict[str, Any]:
    """The legacy completions `logprobs` object."""
    tokens = [text_of(e.token_id) for e in entries]
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [
            {text_of(t): lp for t, lp in list(zip(e.top_ids, e.top_logprobs, strict=True))[:top]}
            for e in entries
        ],
        "text_offset": [],
    }


@dataclass
class Embeddings:
    model: str
    texts: list[str] | None  # text inputs
    ids: list[list[int]] | None  # token-array inputs
    base64: bool
    user: str


def parse_embeddings(body: Any) -> Embeddings:
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    refuse_unknown(body, {"model", "input", "encoding_format", "user", "dimensions"})
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model is required", "model")
    if body.get("dimensions") is not None:
        raise bad(
            "dimensions is not supported (the model's own dimension is returned)", "dimensions"
        )
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise bad("encoding_format must be float or base64", "encoding_format")
    value = body.get("input")
    texts: list[str] | None = None
    ids: list[list[int]] | None = None
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        texts = list(value)
    elif isinstance(value, list) and value and all(_is_ids(v) for v in value):
        ids = [list(v) for v in value]
    elif isinstance(value, list) and _is_ids(value):
        ids = [list(value)]
    else:
        raise bad(
            "input must be a string, an array of strings, an array of token ids or an array "
            "of such arrays",
            "input",
        )
    user = body.get("user") or ""
    return Embeddings(model, texts, ids, encoding == "base64", str(user)[:64])


def _is_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def embedding_data(matrix: np.ndarray, as_base64: bool) -> list[dict[str, Any]]:
    data = []
    for index, row in enumerate(matrix):
        vector: Any = (
            base64.b64encode(row.astype("<f4").tobytes()).decode() if as_base64 else row.tolist()
        )
        data.append({"object": "embedding", "index": index, "embedding": vector})
    return data
