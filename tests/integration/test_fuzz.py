"""Hostile input against every public RPC and the worker service, with hypothesis (seeded).

Malformed and extreme requests (wrong dtypes, shapes that lie about their byte length, NaN/Inf,
negative or huge numbers in every numeric field, invalid UTF-8 in raw bytes, deeply nested or
empty messages, spans outside the model) must never crash a process, never get UNKNOWN or
INTERNAL, never leak a session, and leave every server SERVING.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.cache.keys import embed_key, generate_key
from services.cache.launcher import MemcachedNode, free_port
from services.pb.tessera.v1 import (
    common_pb2,
    inference_pb2,
    worker_pb2,
    worker_pb2_grpc,
)
from tests.mesh import Mesh, Proc, wait_until
from tests.tiny_models import VOCAB

pytestmark = pytest.mark.timeout(420)

S = grpc.StatusCode
ALLOWED = frozenset(
    {
        S.OK,
        S.INVALID_ARGUMENT,
        S.NOT_FOUND,
        S.RESOURCE_EXHAUSTED,
        S.UNAVAILABLE,
        S.DEADLINE_EXCEEDED,
        S.FAILED_PRECONDITION,
        S.OUT_OF_RANGE,
        S.CANCELLED,
    }
)
HIDDEN = 32
CALL_TIMEOUT = 20.0
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)
CODES: Counter[tuple[str, str]] = Counter()  # (target, code) -> calls, for the summary


# -- the mesh ----------------------------------------------------------------------------------


@dataclass
class Target:
    mesh: Mesh
    llama0: Proc  # tiny-llama [0, 2): first stage, takes input_ids
    llama1: Proc  # tiny-llama [2, 4): last stage, takes hidden states, samples
    bert: Proc  # tiny-bert replica

    def channel(self, proc: Proc) -> grpc.Channel:
        return grpc.insecure_channel(proc.address)


MAX_SESSIONS = 4


@pytest.fixture(scope="module")
def target(tiny_repo: Path) -> Iterator[Target]:
    node = MemcachedNode().start(port=free_port())
    env = {"TESSERA_ROUTER_MAX_NEW_TOKENS": "8", "TESSERA_ROUTER_DEFAULT_MAX_NEW_TOKENS": "4"}
    stage_env = {
        "TESSERA_WORKER_MAX_SESSIONS": str(MAX_SESSIONS),
        "TESSERA_WORKER_SESSION_IDLE_S": "20",
    }
    try:
        with Mesh(tiny_repo, cache_nodes=[node.address], env=env) as mesh:
            mesh.start_router()
            llama0 = mesh.start_worker("tiny-llama", "0:2", wait=False, env=stage_env)
            llama1 = mesh.start_worker("tiny-llama", "2:4", wait=False, env=stage_env)
            bert = mesh.start_worker("tiny-bert", wait=False)
            for proc in mesh.workers:
                proc.wait_ready()
            mesh.wait_model("tiny-llama", timeout=60)
            mesh.wait_model("tiny-bert", timeout=60)
            yield Target(mesh, llama0, llama1, bert)
    finally:
        node.stop()


class Findings:
    """Status codes and answers the contract forbids, deduplicated, each with the shortest
    request that produced it; a test reports all of them at once instead of the first."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str, str], str] = {}

    def add(self, where: str, what: str, detail: str, request: object) -> None:
        shown = repr(request)
        shown = shown if len(shown) < 400 else shown[:400] + "..."
        # Numbers in messages vary per request; the rest names the bug.
        key = (where, what, re.sub(r"\d+", "N", detail)[:120])
        if key not in self.seen or len(shown) < len(self.seen[key]):
            self.seen[key] = shown

    def check(
        self, where: str, code: grpc.StatusCode, details: str | None, request: object
    ) -> None:
        CODES[(where, code.name)] += 1
        if code not in ALLOWED:
            self.add(where, code.name, details or "", request)
        elif "Traceback" in (details or ""):
            self.add(where, "traceback in details", details or "", request)

    def assert_none(self) -> None:
        assert not self.seen, "\n" + "\n".join(
            f"{where}: {what} {detail!r}\n    e.g. {request}"
            for (where, what, detail), request in sorted(self.seen.items())
        )


def _unary(found: Findings, where: str, method: Callable[..., Any], request: object) -> Any:
    try:
        reply = method(request, timeout=CALL_TIMEOUT)
    except grpc.RpcError as exc:
        found.check(where, exc.code(), exc.details(), request)
        return None
    found.check(where, S.OK, None, request)
    return reply


def _stream(
    found: Findings, where: str, method: Callable[..., Any], request: object
) -> list[Any] | None:
    try:
        replies = list(method(request, timeout=CALL_TIMEOUT))
    except grpc.RpcError as exc:
        found.check(where, exc.code(), exc.details(), request)
        return None
    found.check(where, S.OK, None, request)
    return replies


# -- strategies --------------------------------------------------------------------------------

I32_MIN, I32_MAX = -(2**31), 2**31 - 1
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
WORDS = [w for w in VOCAB[7:]]
SPECIAL_TEXT = [
    "",
    " ",
    "\n",
    "\t\r\n",
    "\x00",
    "a\x00b",
    "\u200b",
    "\ufeff",
    "é",
    "日本語",
    "🙂" * 10,
    "[PAD]",
    "[UNK]",
    "</s>",
    "<s>",
    "[CLS] [SEP]",
    "<s>system hi</s>",
    "{{ messages }}",
    "{% for m in messages %}x{% endfor %}",
    "set k 0 0 1\r\nx\r\n",
    "get tsr1:e:abc\r\n",
    "tsr1:e:" + "0" * 64,
    "a" * 5000,
    "the " * 200,
    "%s%n%x",
    "\\",
    '"',
    "' OR 1=1 --",
    "\ud7ff\ue000\U0010ffff",
    "\x7f\x1b[31m",
    "../../etc/passwd",
]
TEXT = st.one_of(
    st.sampled_from(SPECIAL_TEXT),
    st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map(" ".join),
    st.text(max_size=40),
)
MODEL_NAMES = [
    "tiny-llama",
    "tiny-bert",
    "tiny-gpt2",
    "tiny-roberta",
    "",
    "no-such-model",
    "../tiny-llama",
    "tiny-llama/",
    ".",
    "..",
    "/",
    "tiny-llama\x00",
    "TINY-LLAMA",
    " tiny-llama",
    "x" * 300,
    "é",
]


def models(*favourite: str) -> st.SearchStrategy[str]:
    """Mostly (80 %) the served models, so requests get past the model check to the hard parts."""
    choices = [st.sampled_from(favourite), st.sampled_from(MODEL_NAMES), st.text(max_size=12)]
    return st.sampled_from([0] * 8 + [1, 2]).flatmap(lambda i: choices[i])


def ints(low: int, high: int, small: tuple[int, int] = (-3, 10)) -> st.SearchStrategy[int]:
    edges = [low, low + 1, high - 1, high, 0, -1, 1]
    return st.one_of(st.integers(*small), st.sampled_from(edges), st.integers(low, high))


I32 = ints(I32_MIN, I32_MAX)
I64 = ints(I64_MIN, I64_MAX)
F32 = st.one_of(
    st.sampled_from(
        [
            0.0,
            -0.0,
            1.0,
            -1.0,
            0.5,
            1e-45,
            3.4e38,
            -3.4e38,
            math.nan,
            math.inf,
            -math.inf,
            100.0,
            100.5,
            1e-7,
            2.0,
        ]
    ),
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.floats(0, 2, width=32),
)
LAYER = ints(I32_MIN, I32_MAX, small=(-2, 6))
DTYPES = ["float32", "float16", "bfloat16", "int64", "int32", "bool"]
BAD_DTYPES = ["", "complex64", "float64", "FLOAT32", "uint8", "float32 ", "int8", "\x00"]
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "bool": 1}


def _encode(values: np.ndarray, dtype: str) -> bytes:
    with np.errstate(over="ignore", invalid="ignore"):  # huge values become inf on purpose
        return _encode_raw(values, dtype)


def _encode_raw(values: np.ndarray, dtype: str) -> bytes:
    if dtype == "bfloat16":
        words = values.astype("<f4").view("<u4") >> 16
        return words.astype("<u2").tobytes()
    if dtype == "bool":
        return (values != 0).astype(np.bool_).tobytes()
    if dtype in ("int64", "int32"):
        return values.astype("<i8" if dtype == "int64" else "<i4").tobytes()
    return values.astype("<f4" if dtype == "float32" else "<f2").tobytes()


@st.composite
def tensors(draw: st.DrawFn, kind: str) -> common_pb2.Tensor:
    """kind: "hidden" [b, s, 32] floats, "ids" [b, s] token ids, "mask" [b, s] 0/1."""
    mode = draw(st.sampled_from(["valid", "valid", "special", "lying", "wild", "empty"]))
    if mode == "empty":
        return common_pb2.Tensor()
    if mode == "wild":
        return common_pb2.Tensor(
            dtype=draw(st.sampled_from(DTYPES + BAD_DTYPES)),
            shape=draw(st.lists(ints(I64_MIN, I64_MAX, small=(-2, 40)), max_size=5)),
            data=draw(st.binary(max_size=80)),
        )
    batch = draw(st.integers(0, 3) if mode != "valid" else st.integers(1, 2))
    seq = draw(st.integers(0, 6) if mode != "valid" else st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "hidden":
        dtype = draw(st.sampled_from(["float32", "float32", "float16", "bfloat16"]))
        width = HIDDEN if mode == "valid" else draw(st.sampled_from([HIDDEN, HIDDEN, 0, 16, 33]))
        shape = [batch, seq, width]
        values = rng.standard_normal(math.prod(shape)).astype(np.float32)
        if mode == "special" and values.size:
            special = draw(st.sampled_from([math.nan, math.inf, -math.inf, 3.0e38, 7e4, -1e30]))
            values[rng.integers(0, values.size, size=max(1, values.size // 7))] = special
    elif kind == "ids":
        dtype = draw(
            st.sampled_from(["int64", "int64", "int32"])
            if mode == "valid"
            else st.sampled_from(DTYPES)
        )
        shape = [batch, seq]
        high = len(VOCAB) if mode == "valid" else len(VOCAB) + 5
        values = rng.integers(0 if mode == "valid" else -5, high, size=batch * seq)
        if mode == "special" and values.size:
            values[0] = draw(st.sampled_from([I32_MIN, I32_MAX, -1, 10**12, len(VOCAB)]))
    else:
        dtype = draw(
            st.sampled_from(["int64", "int32", "bool"])
            if mode == "valid"
            else st.sampled_from(DTYPES)
        )
        shape = [batch, seq]
        values = rng.integers(0, 2 if mode == "valid" else 4, size=batch * seq) - (
            0 if mode == "valid" else 1
        )
        if mode == "valid" and values.size:
            values[..., 0] = 1
    data = _encode(np.asarray(values), dtype)
    if mode == "lying":
        cut = draw(st.integers(-9, 9).filter(lambda n: n != 0))
        data = data[:cut] if cut < 0 else data + b"\x00" * cut
        if draw(st.booleans()):
            shape = [draw(st.sampled_from([-1, 2**40, 2**62, 0])), *shape[1:]]
    return common_pb2.Tensor(dtype=dtype, shape=shape, data=data)


@st.composite
def generate_requests(draw: st.DrawFn) -> inference_pb2.GenerateRequest:
    request = inference_pb2.GenerateRequest(model=draw(models("tiny-llama", "tiny-llama")))
    how = draw(
        st.sampled_from(["prompt", "prompt", "prompt", "messages", "messages", "both", "neither"])
    )
    if how in ("prompt", "both"):
        request.prompt = draw(TEXT)
    if how in ("messages", "both"):
        for _ in range(draw(st.integers(0, 3))):
            request.messages.add(
                role=draw(
                    st.one_of(
                        st.sampled_from(["user", "system", "assistant", "tool"]),
                        st.sampled_from(["", "USER", "root", "user\x00"]),
                    )
                ),
                content=draw(TEXT),
            )
    if draw(st.booleans()):
        request.max_new_tokens = draw(
            st.one_of(st.integers(1, 8), st.integers(1, 8), ints(I32_MIN, I32_MAX, small=(-1, 9)))
        )
    if draw(st.booleans()):
        request.temperature = draw(F32)
    if draw(st.booleans()):
        request.top_k = draw(I32)
    if draw(st.booleans()):
        request.top_p = draw(F32)
    if draw(st.booleans()):
        request.seed = draw(I64)
    request.stop.extend(draw(st.lists(TEXT, max_size=3)))
    return request


@st.composite
def forward_requests(draw: st.DrawFn) -> inference_pb2.ForwardRequest:
    request = inference_pb2.ForwardRequest(
        model=draw(models("tiny-llama", "tiny-bert")), start=draw(LAYER)
    )
    if draw(st.booleans()):
        request.end = draw(LAYER)
    which = draw(st.sampled_from(["text", "hidden", "hidden", "none"]))
    if which == "text":
        request.text = draw(TEXT)
    elif which == "hidden":
        request.hidden_states.CopyFrom(draw(tensors("hidden")))
    if draw(st.booleans()):
        request.attention_mask.CopyFrom(draw(tensors("mask")))
    return request


WIRE_NAMES = st.one_of(
    st.sampled_from(
        ["", "float32", "float16", "bfloat16", "int64", "bool", "complex64", "float32\x00"]
    ),
    st.text(max_size=8),
)


@st.composite
def spans(draw: st.DrawFn) -> common_pb2.Span:
    return common_pb2.Span(start=draw(LAYER), end=draw(LAYER))


@st.composite
def stage_forward_requests(draw: st.DrawFn) -> worker_pb2.StageForwardRequest:
    request = worker_pb2.StageForwardRequest(
        pool=draw(st.booleans()), hidden_dtype=draw(WIRE_NAMES)
    )
    if draw(st.booleans()):
        request.input_ids.CopyFrom(draw(tensors("ids")))
    if draw(st.booleans()):
        request.hidden_states.CopyFrom(draw(tensors("hidden")))
    if draw(st.booleans()):
        request.attention_mask.CopyFrom(draw(tensors("mask")))
    if draw(st.booleans()):
        request.span.CopyFrom(draw(spans()))
    return request


@st.composite
def step_requests(draw: st.DrawFn) -> list[worker_pb2.StepRequest]:
    session_id = draw(st.one_of(st.sampled_from(["", "s", "fuzz-session"]), st.text(max_size=8)))
    steps = []
    for index in range(draw(st.integers(0, 4))):
        step = worker_pb2.StepRequest(
            session_id=session_id,
            hidden_dtype=draw(WIRE_NAMES),
            end=draw(st.booleans()) and index > 0,
        )
        kind = draw(st.sampled_from(["ids", "hidden", "both", "none"]))
        if kind in ("ids", "both"):
            step.input_ids.CopyFrom(draw(tensors("ids")))
        if kind in ("hidden", "both"):
            step.hidden_states.CopyFrom(draw(tensors("hidden")))
        if draw(st.booleans()):
            step.sampling.temperature = draw(F32)
            step.sampling.top_k = draw(I32)
            step.sampling.top_p = draw(F32)
            if draw(st.booleans()):
                step.sampling.seed = draw(I64)
        steps.append(step)
    return steps


# -- raw bytes: invalid UTF-8, truncation, nesting ---------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits, value = value & 0x7F, value >> 7
        out.append(bits | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


INVALID_UTF8 = [
    b"\xff",
    b"\xc3\x28",
    b"\xed\xa0\x80",
    b"\xf8\x88\x80\x80\x80",
    b"a\x80b",
    b"\xc0\xaf",
    b"\xe2\x82",
    b"\xf4\x90\x80\x80",
]
# (method, kind, where it is served, string fields by path: (field, [nested field]))
RAW_METHODS = [
    ("/tessera.v1.Inference/Generate", "uu", "router", [(1,), (2,), (3, 1), (3, 2), (9,)]),
    ("/tessera.v1.Inference/GenerateStream", "us", "router", [(1,), (2,), (3, 2), (9,)]),
    ("/tessera.v1.Inference/Embed", "uu", "router", [(1,), (2,)]),
    ("/tessera.v1.Inference/Forward", "uu", "router", [(1,), (4,), (5, 1)]),
    ("/tessera.v1.Inference/ListModels", "uu", "router", [(1,)]),
    ("/tessera.v1.Registry/Register", "uu", "router", [(1, 1), (1, 11)]),
    ("/tessera.v1.Worker/Forward", "uu", "llama0", [(1, 1), (2, 1), (5,)]),
    ("/tessera.v1.Worker/Forward", "uu", "bert", [(1, 1), (5,)]),
    ("/tessera.v1.Worker/Session", "ss", "llama1", [(1,), (3, 1), (6,)]),
    ("/tessera.v1.Worker/Info", "uu", "bert", [(1,)]),
]
VALID_PREFIX = {
    "/tessera.v1.Inference/Generate": inference_pb2.GenerateRequest(
        model="tiny-llama", prompt="hello world", max_new_tokens=2
    ),
    "/tessera.v1.Inference/GenerateStream": inference_pb2.GenerateRequest(
        model="tiny-llama", prompt="hello world", max_new_tokens=2
    ),
    "/tessera.v1.Inference/Embed": inference_pb2.EmbedRequest(model="tiny-bert", inputs=["hi"]),
    "/tessera.v1.Inference/Forward": inference_pb2.ForwardRequest(
        model="tiny-bert", start=0, text="hi"
    ),
}


@st.composite
def raw_payloads(draw: st.DrawFn) -> tuple[int, bytes]:
    index = draw(st.integers(0, len(RAW_METHODS) - 1))
    method, _kind, _where, fields = RAW_METHODS[index]
    prefix = VALID_PREFIX.get(method)
    base = prefix.SerializeToString() if prefix is not None else b""
    how = draw(
        st.sampled_from(["utf8", "utf8", "garbage", "truncated", "nested", "length", "empty"])
    )
    if how == "utf8":
        path = draw(st.sampled_from(fields))
        bad = draw(st.sampled_from(INVALID_UTF8)) + draw(st.binary(max_size=4))
        payload = _field(path[-1], bad)
        for number in reversed(path[:-1]):
            payload = _field(number, payload)
        return index, base + payload
    if how == "garbage":
        return index, draw(st.binary(min_size=1, max_size=64))
    if how == "truncated":
        cut = draw(st.integers(1, max(1, len(base) - 1)))
        return index, base[:cut] if base else b"\x0a\x05ab"
    if how == "nested":
        # 2000 nested groups of an unknown field: far beyond any recursion limit.
        depth = draw(st.sampled_from([101, 2000]))
        return index, base + b"\xfb\x07" * depth + b"\xfc\x07" * depth
    if how == "length":
        # A length prefix that claims far more bytes than follow.
        return index, base + _varint((1 << 3) | 2) + _varint(2**31) + b"abc"
    return index, b""


# -- the public service ------------------------------------------------------------------------


def test_fuzz_generate(target: Target) -> None:
    found = Findings()
    stub = target.mesh.stub()

    @settings(FUZZ, max_examples=400)
    @given(request=generate_requests())
    def run(request: inference_pb2.GenerateRequest) -> None:
        reply = _unary(found, "Generate", stub.Generate, request)
        if reply is not None and not (
            reply.finish_reason in ("length", "eos", "stop") and 0 <= reply.generated_tokens <= 8
        ):
            found.add("Generate", "bad reply", str(reply), request)
        chunks = _stream(found, "GenerateStream", stub.GenerateStream, request)
        if chunks and chunks[-1].finish_reason not in ("length", "eos", "stop"):
            found.add("GenerateStream", "bad last chunk", str(chunks[-1]), request)

    run()
    found.assert_none()


def test_fuzz_embed(target: Target) -> None:
    found = Findings()
    stub = target.mesh.stub()

    @settings(FUZZ, max_examples=400)
    @given(model=models("tiny-bert", "tiny-bert", "tiny-llama"), inputs=st.lists(TEXT, max_size=6))
    def run(model: str, inputs: list[str]) -> None:
        request = inference_pb2.EmbedRequest(model=model, inputs=inputs)
        reply = _unary(found, "Embed", stub.Embed, request)
        if reply is not None and (
            len(reply.embeddings) != len(inputs)
            or reply.dim != HIDDEN
            or not all(math.isfinite(v) for e in reply.embeddings for v in e.values)
        ):
            found.add("Embed", "bad reply", f"{len(reply.embeddings)} x {reply.dim}", request)

    run()
    found.assert_none()


def test_fuzz_forward(target: Target) -> None:
    found = Findings()
    stub = target.mesh.stub()

    @settings(FUZZ, max_examples=600)
    @given(request=forward_requests())
    def run(request: inference_pb2.ForwardRequest) -> None:
        reply = _unary(found, "Forward", stub.Forward, request)
        if reply is not None:
            shape = list(reply.hidden_states.shape)
            if not (
                len(shape) == 3
                and shape[-1] == HIDDEN
                and len(reply.hidden_states.data)
                == math.prod(shape) * ITEMSIZE[reply.hidden_states.dtype]
            ):
                found.add("Forward", "bad reply", str(shape), request)

    run()
    found.assert_none()


def test_fuzz_list_models(target: Target) -> None:
    found = Findings()
    stub = target.mesh.stub()
    raw = target.mesh.channel().unary_unary("/tessera.v1.Inference/ListModels")

    @settings(FUZZ, max_examples=10)
    @given(junk=st.binary(max_size=16))
    def run(junk: bytes) -> None:
        reply = _unary(found, "ListModels", stub.ListModels, inference_pb2.ListModelsRequest())
        assert reply is not None and {"tiny-llama", "tiny-bert"} <= {m.name for m in reply.models}
        # Unknown fields are legal protobuf: they are skipped, not an error.
        _unary(found, "ListModels(unknown field)", raw, _field(15, junk))

    run()
    found.assert_none()


def test_fuzz_sampling_extremes_are_served(target: Target) -> None:
    """Valid but extreme sampling parameters must generate (OK), not fail inside sampling."""
    found = Findings()
    stub = target.mesh.stub()

    @settings(FUZZ, max_examples=150)
    @given(
        prompt=st.lists(st.sampled_from(WORDS), min_size=1, max_size=8).map(" ".join),
        max_new=st.integers(1, 4),
        temperature=st.sampled_from([0.0, 1e-45, 1e-30, 1e-7, 0.01, 1.0, 7.5, 99.99, 100.0]),
        top_k=st.sampled_from(
            [0, 1, 2, len(VOCAB) - 1, len(VOCAB), len(VOCAB) + 1, 10**6, I32_MAX]
        ),
        top_p=st.sampled_from([1e-45, 1e-7, 0.01, 0.5, 0.999, 1.0]),
        seed=st.one_of(st.none(), I64),
        stop=st.lists(st.sampled_from(WORDS + ["é", "?!"]), max_size=2),
    )
    def run(
        prompt: str,
        max_new: int,
        temperature: float,
        top_k: int,
        top_p: float,
        seed: int | None,
        stop: list[str],
    ) -> None:
        request = inference_pb2.GenerateRequest(
            model="tiny-llama",
            prompt=prompt,
            max_new_tokens=max_new,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop=stop,
        )
        if seed is not None:
            request.seed = seed

        def stream(r: object, **kw: Any) -> list[Any]:
            return list(stub.GenerateStream(r, **kw))

        for where, method in (("Generate", stub.Generate), ("GenerateStream", stream)):
            try:
                method(request, timeout=CALL_TIMEOUT)
                found.check(where, S.OK, None, request)
            except grpc.RpcError as exc:
                found.check(where, exc.code(), exc.details(), request)
                if exc.code() in ALLOWED:
                    found.add(
                        where,
                        f"{exc.code().name} for a valid request",
                        exc.details() or "",
                        request,
                    )

    run()
    found.assert_none()


ODD_MODEL_NAMES = [
    "x" * 300,
    "é" * 200,
    "tiny-llama\x00",
    "\x00",
    "tiny-llama\n",
    "~",
    "$HOME",
    "con",
    "-",
    "tiny-llama" * 40,
]


@pytest.mark.parametrize("rpc", ["Generate", "Embed", "Forward"])
def test_odd_model_names_are_not_found(target: Target, rpc: str) -> None:
    """Any name that is not a served or stored model is NOT_FOUND (or INVALID_ARGUMENT), even
    when it is no valid file name at all."""
    stub = target.mesh.stub()
    wrong = []
    for name in ODD_MODEL_NAMES:
        request: object
        if rpc == "Generate":
            request = inference_pb2.GenerateRequest(model=name, prompt="hi", max_new_tokens=1)
        elif rpc == "Embed":
            request = inference_pb2.EmbedRequest(model=name, inputs=["hi"])
        else:
            request = inference_pb2.ForwardRequest(model=name, start=0, text="hi")
        try:
            getattr(stub, rpc)(request, timeout=CALL_TIMEOUT)
            wrong.append((name[:20], "OK"))
        except grpc.RpcError as exc:
            if exc.code() not in (S.NOT_FOUND, S.INVALID_ARGUMENT):
                wrong.append((name[:20], exc.code().name))
    assert not wrong, wrong


# -- the worker service ------------------------------------------------------------------------


def _worker_channels(target: Target) -> dict[str, grpc.Channel]:
    return {name: target.channel(getattr(target, name)) for name in ("llama0", "llama1", "bert")}


def test_fuzz_worker_forward(target: Target) -> None:
    found = Findings()
    channels = _worker_channels(target)

    @settings(FUZZ, max_examples=600)
    @given(which=st.sampled_from(sorted(channels)), request=stage_forward_requests())
    def run(which: str, request: worker_pb2.StageForwardRequest) -> None:
        where = f"Worker.Forward@{which}"
        reply = _unary(found, where, worker_pb2_grpc.WorkerStub(channels[which]).Forward, request)
        if reply is not None:
            tensor = reply.hidden_states
            if len(tensor.data) != math.prod(tensor.shape) * ITEMSIZE.get(tensor.dtype, 0):
                found.add(where, "bad reply", f"{tensor.dtype} {list(tensor.shape)}", request)

    try:
        run()
    finally:
        for channel in channels.values():
            channel.close()
    found.assert_none()


def test_fuzz_worker_session(target: Target) -> None:
    found = Findings()
    channels = _worker_channels(target)

    @settings(FUZZ, max_examples=400)
    @given(
        which=st.sampled_from(["llama0", "llama1", "llama1", "bert"]),
        steps=step_requests(),
        abandon=st.booleans(),
    )
    def run(which: str, steps: list[worker_pb2.StepRequest], abandon: bool) -> None:
        where = f"Worker.Session@{which}"
        call = worker_pb2_grpc.WorkerStub(channels[which]).Session(
            iter(steps), timeout=CALL_TIMEOUT
        )
        try:
            for _ in call:
                if abandon:
                    call.cancel()  # the client walks away mid-session
                    return
        except grpc.RpcError as exc:
            found.check(where, exc.code(), exc.details(), steps)
            return
        found.check(where, call.code(), call.details(), steps)

    try:
        run()
    finally:
        for channel in channels.values():
            channel.close()
    found.assert_none()


def test_fuzz_raw_bytes(target: Target) -> None:
    """Bytes no stub would send: invalid UTF-8 in string fields, garbage, truncation, deep
    nesting, lying length prefixes. Undecodable requests must be refused with a code the
    contract allows (INVALID_ARGUMENT), never UNKNOWN or INTERNAL."""
    found = Findings()
    channels = _worker_channels(target)
    channels["router"] = target.mesh.channel()

    @settings(FUZZ, max_examples=800)
    @given(payload=raw_payloads())
    def run(payload: tuple[int, bytes]) -> None:
        index, data = payload
        method, kind, where, _ = RAW_METHODS[index]
        channel = channels[where]
        try:
            if kind == "uu":
                channel.unary_unary(method)(data, timeout=CALL_TIMEOUT)
            elif kind == "us":
                list(channel.unary_stream(method)(data, timeout=CALL_TIMEOUT))
            else:
                list(channel.stream_stream(method)(iter([data]), timeout=CALL_TIMEOUT))
            code, details = S.OK, None
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
        found.check(f"raw {method}@{where}", code, details, data)

    try:
        run()
    finally:
        for name, channel in channels.items():
            if name != "router":
                channel.close()
    found.assert_none()


# -- focused cases -----------------------------------------------------------------------------


def _live_sessions(proc: Proc) -> int:
    with grpc.insecure_channel(proc.address) as channel:
        return (
            worker_pb2_grpc.WorkerStub(channel)
            .Info(worker_pb2.InfoRequest(), timeout=10)
            .live_sessions
        )


def _valid_step(session_id: str) -> worker_pb2.StepRequest:
    ids = np.array([[7, 8, 9]], dtype="<i8")
    return worker_pb2.StepRequest(
        session_id=session_id,
        input_ids=common_pb2.Tensor(dtype="int64", shape=[1, 3], data=ids.tobytes()),
    )


def _hold_sessions(target: Target, session_ids: list[str]) -> list[object]:
    """Opens one Session per id on the first llama stage, each with one step, all held open
    at once; returns each one's first reply (a StepResponse) or its error."""
    release = threading.Event()
    results: list[object] = [None] * len(session_ids)
    calls: list[Any] = []
    channel = grpc.insecure_channel(target.llama0.address)

    def requests(session_id: str) -> Iterator[worker_pb2.StepRequest]:
        yield _valid_step(session_id)
        release.wait(30)

    try:
        stub = worker_pb2_grpc.WorkerStub(channel)
        for index, session_id in enumerate(session_ids):
            call = stub.Session(requests(session_id), timeout=60)
            calls.append(call)
            try:
                results[index] = next(call)
            except grpc.RpcError as exc:
                results[index] = exc
    finally:
        release.set()
        for call in calls:
            call.cancel()
        channel.close()
    return results


def test_max_sessions_holds_with_distinct_and_with_repeated_session_ids(target: Target) -> None:
    wait_until(lambda: _live_sessions(target.llama0) == 0, 30, "no live sessions before")
    for label, ids in (
        ("distinct ids", [f"held-{i}" for i in range(MAX_SESSIONS + 1)]),
        ("one repeated id", ["same-id"] * (MAX_SESSIONS + 1)),
    ):
        results = _hold_sessions(target, ids)
        opened = [r for r in results if isinstance(r, worker_pb2.StepResponse)]
        refused = [r for r in results if isinstance(r, grpc.RpcError)]
        assert len(opened) == MAX_SESSIONS, (label, results)
        assert len(refused) == 1, (label, results)
        assert refused[0].code() in (
            S.RESOURCE_EXHAUSTED,
            S.INVALID_ARGUMENT,
            S.ALREADY_EXISTS,
            S.FAILED_PRECONDITION,
        ), label
        wait_until(lambda: _live_sessions(target.llama0) == 0, 30, f"sessions freed after {label}")


def test_registry_refuses_nonsense_registrations(target: Target) -> None:
    """A registration that cannot describe a real span is INVALID_ARGUMENT, never INTERNAL,
    and never enters the routing table."""
    registry = worker_pb2_grpc.RegistryStub(target.mesh.channel())
    bad = [
        dict(span=common_pb2.Span(start=-1, end=2), num_layers=4),
        dict(span=common_pb2.Span(start=0, end=9), num_layers=4),
        dict(span=common_pb2.Span(start=0, end=4), num_layers=0),
        dict(span=common_pb2.Span(start=0, end=4), num_layers=-4),
        dict(span=common_pb2.Span(start=0, end=I32_MAX), num_layers=I32_MAX),
        dict(span=common_pb2.Span(start=I32_MIN, end=I32_MAX), num_layers=4),
    ]
    wrong = []
    try:
        for fields in bad:
            info = worker_pb2.WorkerInfo(
                address="127.0.0.1:9",
                model="fuzz-registered",
                kind="causal-lm",
                hidden_size=HIDDEN,
                capacity=1,
                **fields,
            )
            try:
                registry.Register(worker_pb2.RegisterRequest(worker=info), timeout=10)
                wrong.append((str(fields).replace("\n", " "), "OK"))
            except grpc.RpcError as exc:
                if exc.code() != S.INVALID_ARGUMENT:
                    wrong.append((str(fields).replace("\n", " "), exc.code().name))
        assert not wrong, wrong
        listed = target.mesh.stub().ListModels(inference_pb2.ListModelsRequest(), timeout=10)
        assert "fuzz-registered" not in {m.name for m in listed.models}
    finally:
        registry.Deregister(worker_pb2.DeregisterRequest(address="127.0.0.1:9"), timeout=10)


def test_servers_healthy_and_no_session_leaked_after_the_fuzz(target: Target) -> None:
    """Runs after the fuzz tests in this module (file order)."""
    procs = [target.mesh.router, target.llama0, target.llama1, target.bert]
    for proc in procs:
        assert proc is not None and proc.popen.poll() is None, (
            f"{proc.args[:3] if proc else None} died:\n" + (proc.output()[-3000:] if proc else "")
        )
        with grpc.insecure_channel(proc.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    for proc in (target.llama0, target.llama1, target.bert):
        wait_until(lambda p=proc: _live_sessions(p) == 0, 30, f"{proc.address} sessions freed")
    target.mesh.wait_model("tiny-llama", timeout=30)
    stub = target.mesh.stub()
    reply = stub.Generate(
        inference_pb2.GenerateRequest(
            model="tiny-llama", prompt="the cat sat", max_new_tokens=3, temperature=0.7, seed=1
        ),
        timeout=30,
    )
    assert reply.generated_tokens >= 1
    assert (
        stub.Embed(
            inference_pb2.EmbedRequest(model="tiny-bert", inputs=["the cat"]), timeout=30
        ).dim
        == HIDDEN
    )
    for proc in procs:
        assert proc is not None and "Segmentation fault" not in proc.output()
    total = sum(CODES.values())
    print(f"\nfuzz calls: {total}; by target and code: {dict(sorted(CODES.items()))}")
    # Diagnostics for any INTERNAL above: the distinct exceptions the servers logged.
    for proc in procs:
        assert proc is not None
        causes = Counter(_last_line(entry) for entry in _unexpected(proc))
        for cause, count in causes.most_common():
            print(f"{proc.args[0]} {proc.address}: {count} x {cause}")


def _unexpected(proc: Proc) -> Iterator[dict[str, Any]]:
    for line in proc.lines:
        if "unexpected error" in line:
            try:
                yield json.loads(line)
            except ValueError:
                continue


def _last_line(entry: dict[str, Any]) -> str:
    exc = str(entry.get("exc", "")).strip().splitlines()
    where = [line.strip() for line in exc if line.strip().startswith("File ")]
    return f"{entry.get('msg')}: {exc[-1] if exc else '?'} (at {where[-1] if where else '?'})"


# -- cache keys are hashes ---------------------------------------------------------------------

KEY = re.compile(r"tsr1:[eg]:[0-9a-f]{64}")
TRICKY = [
    "a",
    "a:b",
    "a:b:c",
    "tsr1:e:a",
    '"',
    '","text":"',
    "\\",
    '\\"',
    "a\x00b",
    "a b",
    "a\r\nset x 0 0 1\r\n",
    "",
    " ",
    "ab",
    "a" * 300,
    '{"v":1}',
    "é",
    "e\u0301",
]


def test_cache_keys_are_hashes_that_cannot_collide_on_purpose() -> None:
    keys: dict[str, tuple[object, ...]] = {}

    def add(key: str, *origin: object) -> None:
        assert KEY.fullmatch(key), key
        assert key not in keys, f"{origin} collides with {keys[key]}"
        keys[key] = origin

    for model in ("m", "m:f", 'm","fingerprint":"f'):
        for fingerprint in ("f", "", "f:x"):
            for text in TRICKY:
                add(embed_key(model, fingerprint, text), "e", model, fingerprint, text)
    # Splitting the same characters differently between fields gives different keys.
    add(embed_key("ab", "c", "d"), "e", "ab", "c", "d")
    add(embed_key("a", "bc", "d"), "e", "a", "bc", "d")
    add(embed_key("a", "b", "cd"), "e", "a", "b", "cd")
    for ids in ([], [1], [1, 2], [12], [1, 2, 3], [123]):
        for stop in ([], ["a,b"], ["a", "b"], ['a","b']):
            add(generate_key("m", "f", ids, {"max_new_tokens": 4, "stop": stop}), "g", ids, stop)
    # A generation and an embedding never share a key, even over the same words.
    assert embed_key("m", "f", "[1, 2]") != generate_key("m", "f", [1, 2], {})
    # No raw user text survives into a key.
    for key, origin in keys.items():
        for part in origin[1:]:
            if isinstance(part, str) and len(part) > 3 and not key.startswith(part):
                assert part not in key


@settings(derandomize=True, database=None, max_examples=300, deadline=None)
@given(
    a=st.tuples(st.text(max_size=8), st.text(max_size=8), st.text(max_size=30)),
    b=st.tuples(st.text(max_size=8), st.text(max_size=8), st.text(max_size=30)),
)
def test_cache_keys_differ_whenever_inputs_differ(
    a: tuple[str, str, str], b: tuple[str, str, str]
) -> None:
    ka, kb = embed_key(*a), embed_key(*b)
    assert KEY.fullmatch(ka) and KEY.fullmatch(kb)
    assert (ka == kb) == (a == b)
    assert len(ka) == 71 and ka.isascii() and " " not in ka


def test_cache_tier_keeps_tricky_texts_apart(target: Target) -> None:
    """Texts that look like memcached commands or keys are cached under their own hash: each
    one's cached vector is the one it computed, never another text's."""
    stub = target.mesh.stub()
    texts = ["the cat", "the cat\r\nset x 0 0 1", "tsr1:e:" + "0" * 64, "the  cat", "dog"]
    first = {
        t: list(
            stub.Embed(inference_pb2.EmbedRequest(model="tiny-bert", inputs=[t]), timeout=30)
            .embeddings[0]
            .values
        )
        for t in texts
    }
    for text in texts:
        again = stub.Embed(inference_pb2.EmbedRequest(model="tiny-bert", inputs=[text]), timeout=30)
        assert again.cached, text
        assert list(again.embeddings[0].values) == first[text], text
    assert first["dog"] != first["the cat"]
