"""Hostile input against every public RPC and every worker RPC, with hypothesis (seeded).

Malformed and extreme requests (wrong dtypes, shapes that lie about their byte length, NaN/Inf,
negative or huge numbers in every numeric field, invalid UTF-8 in raw bytes, deeply nested or
empty messages, spans outside the model, batches that do not exist) must get exactly the status
the contract names for them, within a short deadline, never UNKNOWN or INTERNAL; they must never
crash a process, never leave rows held, and leave every server SERVING.

The oracle is per request: a model that is not in the repository is NOT_FOUND, a stored model
that no worker serves is UNAVAILABLE, a request built to be valid is OK, a request built with
one broken field is INVALID_ARGUMENT, a capacity refusal is RESOURCE_EXHAUSTED, a batch the
worker does not hold is ABORTED (the router re-prefills). Every call has CALL_TIMEOUT: a server
that hangs on an input is a finding, not a pass. Each test also counts the inputs that reached
the model (OK answers, and the workers' own tessera_worker_batch_rows metric) and fails if too
few did: a fuzzer that only exercises validation proves little.

The workers require a caller token (TESSERA_WORKER_CALLER_TOKENS), the router sends it, and the
worker fuzz calls them directly with it; without it, every call is UNAUTHENTICATED.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError, Message
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
from tests.mesh import Mesh, Proc, metric, metrics_address, scrape, wait_until
from tests.tiny_models import TINY_ARCHS, VOCAB

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

S = grpc.StatusCode
HIDDEN = 32
GREEDY = worker_pb2.Sampling(top_p=1.0)  # sampling every valid prefill row sends
POSITIONS = 256  # tiny-llama's max_position_embeddings
# Tiny models answer in milliseconds; a call this long is a hang.
CALL_TIMEOUT = 5.0
TOKEN = "fuzz-router-caller-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
MAX_ROWS = 4  # llama0's row cap
KV_MB = 1  # llama1's KV budget: 1 MiB / 256 bytes per token = 4096 token slots
KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 8 * 4  # keys + values x 2 layers x 2 kv heads x 8 x float32
BATCH_IDLE_S = 30.0
# Shorter than the idle timeout: rows left held are seen before expiry could free them.
LEAK_WAIT_S = 5.0
STORED = {f"tiny-{arch}" for arch in TINY_ARCHS}
SERVED = {"tiny-llama", "tiny-bert"}
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
OK = frozenset({S.OK})
IA = frozenset({S.INVALID_ARGUMENT})


def public_codes(model: str) -> frozenset[grpc.StatusCode]:
    """What a public RPC may answer for `model`, whatever the rest of the request holds."""
    if not model:
        return IA  # "model is required"
    if model not in STORED:
        return frozenset({S.NOT_FOUND})
    codes = {S.OK, S.INVALID_ARGUMENT}
    if model not in SERVED:
        codes.add(S.UNAVAILABLE)  # stored, but no chain serves it
    return frozenset(codes)


# -- the mesh ----------------------------------------------------------------------------------


@dataclass
class Target:
    mesh: Mesh
    llama0: Proc  # tiny-llama [0, 2): first stage, takes input_ids; MAX_ROWS rows
    llama1: Proc  # tiny-llama [2, 4): last stage, takes hidden states, samples; KV_MB budget
    bert: Proc  # tiny-bert replica
    metrics: dict[str, str] = field(default_factory=dict)  # worker name -> metrics host:port

    def channel(self, proc: Proc) -> grpc.Channel:
        return grpc.insecure_channel(proc.address)

    def workers(self) -> dict[str, Proc]:
        return {"llama0": self.llama0, "llama1": self.llama1, "bert": self.bert}


@pytest.fixture(scope="module")
def target(tiny_repo: Path) -> Iterator[Target]:
    node = MemcachedNode().start(port=free_port())
    env = {
        "TESSERA_ROUTER_MAX_NEW_TOKENS": "8",
        "TESSERA_ROUTER_DEFAULT_MAX_NEW_TOKENS": "4",
        "TESSERA_ROUTER_WORKER_CALL_TOKEN": TOKEN,
        "TESSERA_WORKER_CALLER_TOKENS": TOKEN,
        "TESSERA_WORKER_BATCH_IDLE_S": str(BATCH_IDLE_S),
        "TESSERA_WORKER_METRICS_PORT": "0",
    }
    try:
        with Mesh(tiny_repo, cache_nodes=[node.address], env=env) as mesh:
            mesh.start_router()
            llama0 = mesh.start_worker(
                "tiny-llama", "0:2", wait=False, env={"TESSERA_WORKER_MAX_ROWS": str(MAX_ROWS)}
            )
            llama1 = mesh.start_worker(
                "tiny-llama", "2:4", wait=False, env={"TESSERA_WORKER_MAX_KV_MB": str(KV_MB)}
            )
            bert = mesh.start_worker("tiny-bert", wait=False)
            for proc in mesh.workers:
                proc.wait_ready()
            mesh.wait_model("tiny-llama", timeout=60)
            mesh.wait_model("tiny-bert", timeout=60)
            found = Target(mesh, llama0, llama1, bert)
            found.metrics = {name: metrics_address(p) for name, p in found.workers().items()}
            yield found
    finally:
        node.stop()


class Findings:
    """Answers the contract forbids, deduplicated, each with the shortest request that produced
    it; a test reports all of them at once instead of the first. Also counts, per target, the
    calls answered OK: the inputs that got past validation to the model."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str, str], str] = {}
        self.calls: Counter[str] = Counter()
        self.reached: Counter[str] = Counter()

    def add(self, where: str, what: str, detail: str, request: object) -> None:
        shown = repr(request)
        shown = shown if len(shown) < 400 else shown[:400] + "..."
        # Numbers in messages vary per request; the rest names the bug.
        key = (where, what, re.sub(r"\d+", "N", detail)[:120])
        if key not in self.seen or len(shown) < len(self.seen[key]):
            self.seen[key] = shown

    def check(
        self,
        where: str,
        code: grpc.StatusCode,
        details: str | None,
        request: object,
        allowed: frozenset[grpc.StatusCode],
    ) -> None:
        CODES[(where, code.name)] += 1
        self.calls[where] += 1
        if code == S.OK:
            self.reached[where] += 1
        if code not in allowed:
            expected = "/".join(sorted(c.name for c in allowed))
            self.add(where, f"{code.name} (expected {expected})", details or "", request)
        elif "Traceback" in (details or ""):
            self.add(where, "traceback in details", details or "", request)

    def assert_none(self) -> None:
        assert not self.seen, "\n" + "\n".join(
            f"{where}: {what} {detail!r}\n    e.g. {request}"
            for (where, what, detail), request in sorted(self.seen.items())
        )

    def assert_reached(self, where: str, at_least: float) -> None:
        """At least this fraction of the calls to `where` got past validation (OK)."""
        calls, ok = self.calls[where], self.reached[where]
        print(f"\n{where}: {ok} of {calls} calls answered OK")
        assert calls and ok >= at_least * calls, f"{where}: only {ok} of {calls} calls were OK"


def _call(
    method: Callable[..., Any], request: object, metadata: Sequence[tuple[str, str]] | None
) -> tuple[grpc.StatusCode, str | None, Any]:
    try:
        return S.OK, None, method(request, timeout=CALL_TIMEOUT, metadata=metadata)
    except grpc.RpcError as exc:
        return exc.code(), exc.details(), None


def _unary(
    found: Findings,
    where: str,
    method: Callable[..., Any],
    request: object,
    allowed: frozenset[grpc.StatusCode],
    metadata: Sequence[tuple[str, str]] | None = None,
) -> Any:
    code, details, reply = _call(method, request, metadata)
    found.check(where, code, details, request, allowed)
    return reply


def _stream(
    found: Findings,
    where: str,
    method: Callable[..., Any],
    request: object,
    allowed: frozenset[grpc.StatusCode],
) -> list[Any] | None:
    try:
        replies = list(method(request, timeout=CALL_TIMEOUT))
    except grpc.RpcError as exc:
        found.check(where, exc.code(), exc.details(), request, allowed)
        return None
    found.check(where, S.OK, None, request, allowed)
    return replies


def _rows_metric(target: Target, worker: str, kind: str) -> float:
    """Rows the worker ran through `kind` (prefill, decode, forward) since it started."""
    samples = scrape(target.metrics[worker])
    return metric(samples, "tessera_worker_batch_rows_sum", kind=kind)


def _info(proc: Proc) -> worker_pb2.WorkerInfo:
    with grpc.insecure_channel(proc.address) as channel:
        return worker_pb2_grpc.WorkerStub(channel).Info(
            worker_pb2.InfoRequest(), timeout=CALL_TIMEOUT, metadata=AUTH
        )


def _nothing_held(proc: Proc) -> bool:
    info = _info(proc)
    return info.live_sessions == 0 and info.kv_tokens == 0 and info.live_batches == 0


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


# -- requests built to be valid, or valid but for one field -----------------------------------
# Mostly-invalid random requests prove the validation, not the model: these reach it. Each
# strategy returns the request and the codes it may get.

Expected = frozenset[grpc.StatusCode]
SENTENCES = st.lists(st.sampled_from(WORDS), min_size=1, max_size=10).map(" ".join)


@st.composite
def valid_generate_requests(draw: st.DrawFn) -> tuple[inference_pb2.GenerateRequest, Expected]:
    request = inference_pb2.GenerateRequest(
        model="tiny-llama", max_new_tokens=draw(st.integers(1, 8))
    )
    if draw(st.booleans()):
        request.prompt = draw(SENTENCES)
    else:
        for role in draw(st.sampled_from([["user"], ["system", "user"], ["user", "assistant"]])):
            request.messages.add(role=role, content=draw(SENTENCES))
    if draw(st.booleans()):
        request.temperature = draw(st.sampled_from([0.0, 1e-30, 0.5, 1.0, 2.0, 100.0]))
        request.top_k = draw(st.sampled_from([0, 1, 5, len(VOCAB), 10**6]))
        request.top_p = draw(st.sampled_from([0.1, 0.5, 0.9, 1.0]))
    if draw(st.booleans()):
        request.seed = draw(I64)
    request.stop.extend(draw(st.lists(st.sampled_from(WORDS), max_size=2)))
    broken = draw(
        st.sampled_from(
            [None] * 6 + ["max_new", "temperature", "top_k", "top_p", "both", "stop", "role"]
        )
    )
    match broken:
        case "max_new":
            request.max_new_tokens = draw(st.sampled_from([0, -1, 9, I32_MAX]))
        case "temperature":
            request.temperature = draw(st.sampled_from([-0.5, 100.5, math.nan, math.inf]))
        case "top_k":
            request.top_k = draw(st.sampled_from([-1, I32_MIN]))
        case "top_p":
            request.top_p = draw(st.sampled_from([1.5, -0.1, math.nan]))
        case "both":
            request.prompt, request.messages.add().content = "hi", "hi"
        case "stop":
            request.stop.append("")
        case "role":
            request.messages.add(role="root", content="hi")
    return request, OK if broken is None else IA


def _hidden_tensor(rng: np.random.Generator, shape: list[int], dtype: str) -> common_pb2.Tensor:
    values = rng.standard_normal(math.prod(shape)).astype(np.float32)
    return common_pb2.Tensor(dtype=dtype, shape=shape, data=_encode(values, dtype))


def _ids_tensor(rng: np.random.Generator, shape: list[int], dtype: str) -> common_pb2.Tensor:
    values = rng.integers(7, len(VOCAB), size=math.prod(shape))
    return common_pb2.Tensor(dtype=dtype, shape=shape, data=_encode(values, dtype))


def _mask_tensor(rng: np.random.Generator, shape: list[int]) -> common_pb2.Tensor:
    values = rng.integers(0, 2, size=shape)
    values[:, 0] = 1
    return common_pb2.Tensor(dtype="int64", shape=shape, data=_encode(values.reshape(-1), "int64"))


FLOATS = ["float32", "float16", "bfloat16"]


@st.composite
def valid_forward_requests(draw: st.DrawFn) -> tuple[inference_pb2.ForwardRequest, Expected]:
    """A public Forward over layers of a served model: text from layer 0, hidden states later."""
    model = draw(st.sampled_from(sorted(SERVED)))
    start = draw(st.integers(0, 3))
    end = draw(st.integers(start + 1, 4))
    request = inference_pb2.ForwardRequest(model=model, start=start)
    if end != 4 or draw(st.booleans()):
        request.end = end
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if start == 0:
        request.text = draw(SENTENCES)
    else:
        shape = [draw(st.integers(1, 3)), draw(st.integers(1, 6)), HIDDEN]
        request.hidden_states.CopyFrom(_hidden_tensor(rng, shape, draw(st.sampled_from(FLOATS))))
        if draw(st.booleans()):
            request.attention_mask.CopyFrom(_mask_tensor(rng, shape[:2]))
    broken = draw(st.sampled_from([None] * 5 + ["end", "start", "input", "mask", "values"]))
    match broken:
        case "end":
            request.end = draw(st.sampled_from([start, 5, -1]))
        case "start":
            request.start = draw(st.sampled_from([-1, 4, 9]))
        case "input":  # the other kind of input for the first layer
            if start == 0:
                request.hidden_states.CopyFrom(_hidden_tensor(rng, [1, 2, HIDDEN], "float32"))
            else:
                request.text = "the cat"
        case "mask":
            if start == 0:
                request.text = ""
            else:
                request.attention_mask.CopyFrom(_mask_tensor(rng, [9, 9]))
        case "values":
            if start == 0:
                request.text = " " * 3
            else:
                _spoil_values(request.hidden_states, rng, ids=False)
    return request, OK if broken is None else IA


# (first layer, last layer + 1, layers of the model) each worker serves
WORKER_SPANS = {"llama0": (0, 2, 4), "llama1": (2, 4, 4), "bert": (0, 4, 4)}


@st.composite
def valid_stage_forward_requests(
    draw: st.DrawFn, which: str
) -> tuple[worker_pb2.StageForwardRequest, Expected]:
    """A Worker.Forward inside `which`'s span; with `pool` only when it reaches the last layer."""
    first, last, layers = WORKER_SPANS[which]
    start = draw(st.integers(first, last - 1))
    end = draw(st.integers(start + 1, last))
    request = worker_pb2.StageForwardRequest(hidden_dtype=draw(st.sampled_from(["", *FLOATS])))
    if (start, end) != (first, last) or draw(st.booleans()):
        request.span.CopyFrom(common_pb2.Span(start=start, end=end))
    request.pool = end == layers and draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = [draw(st.integers(1, 3)), draw(st.integers(1, 6))]
    if start == 0:
        request.input_ids.CopyFrom(
            _ids_tensor(rng, shape, draw(st.sampled_from(["int64", "int32"])))
        )
    else:
        request.hidden_states.CopyFrom(
            _hidden_tensor(rng, [*shape, HIDDEN], draw(st.sampled_from(FLOATS)))
        )
    if draw(st.booleans()):
        request.attention_mask.CopyFrom(_mask_tensor(rng, shape))
    broken = draw(
        st.sampled_from([None] * 5 + ["span", "pool", "input", "mask", "values", "wire", "shape"])
    )
    tensor = request.input_ids if start == 0 else request.hidden_states
    match broken:
        case "span":
            request.span.CopyFrom(common_pb2.Span(start=first, end=last + 1))
        case "pool":
            if end == layers:
                request.hidden_dtype = "int64"
            else:
                request.pool = True
        case "input":
            request.ClearField("input_ids" if start == 0 else "hidden_states")
        case "mask":
            request.attention_mask.CopyFrom(_mask_tensor(rng, [shape[0] + 1, shape[1]]))
        case "values":
            if start == 0:
                values = np.frombuffer(tensor.data, dtype=f"<i{ITEMSIZE[tensor.dtype]}").copy()
                values[0] = len(VOCAB)
                tensor.data = values.tobytes()
            else:
                _spoil_values(tensor, rng, ids=False)
        case "wire":
            request.hidden_dtype = "complex64"
        case "shape":
            tensor.CopyFrom(
                common_pb2.Tensor(dtype=tensor.dtype, shape=[0, 2**62, HIDDEN][: len(tensor.shape)])
            )
    return request, OK if broken is None else IA


# -- generation batches: Prefill / Decode / Filter / Clear scenarios ---------------------------

SLOTS = 3  # batch ids an example names: "<example>-0" .. "<example>-2"
PREFILL_BREAKS = [
    "dup_ids",
    "length_zero",
    "length_negative",
    "length_over_width",
    "max_below_length",
    "max_over_positions",
    "max_huge",
    "temperature",
    "top_k",
    "top_p",
    "rows_mismatch",
    "no_rows",
    "no_tensor",
    "wrong_input",
    "bad_values",
    "bad_dtype",
    "lying_bytes",
    "huge_empty_shape",
    "zero_width",
    "width_over_positions",
    "batch_id_empty",
    "batch_id_long",
    "wire",
]
DECODE_BREAKS = [
    "count_plus",
    "count_zero",
    "bad_values",
    "bad_dtype",
    "bad_rank",
    "no_tensor",
    "repeat_id",
    "no_ids",
    "long_id",
]
FILTER_BREAKS = ["unknown_request", "batch_id_empty", "batch_id_long"]
BAD_TEMPERATURES = [math.nan, math.inf, -1.0, 100.5, 1e9]


@dataclass(frozen=True)
class Op:
    """One call of a scenario; requests are built at run time from the batches' state."""

    kind: str  # prefill | decode | filter | clear | wild
    slots: tuple[int, ...]
    broken: str | None  # the one field made invalid; None = built to be valid
    seed: int
    n: int = 1  # prefill: rows
    width: int = 1  # prefill: columns
    keep: str = "all"  # filter: all | some | none | dup


@st.composite
def ops(draw: st.DrawFn) -> Op:
    kind = draw(
        st.sampled_from(["prefill"] * 3 + ["decode"] * 4 + ["filter"] * 2 + ["clear", "wild"])
    )
    seed = draw(st.integers(0, 2**32 - 1))
    valid = draw(st.integers(0, 9)) < 6
    # Mostly the batches a scenario's first prefill made: steps of batches that exist.
    slot = st.sampled_from([0, 0, 0, 1, 1, 2])
    if kind == "prefill":
        return Op(
            kind,
            (draw(slot),),
            None if valid else draw(st.sampled_from(PREFILL_BREAKS)),
            seed,
            n=draw(st.integers(1, 3)),
            width=draw(st.integers(1, 6)),
        )
    if kind == "decode":
        slots = draw(st.sampled_from([(0,), (0,), (0,), (1,), (0, 1), (1, 0), (2,), (0, 2)]))
        return Op(kind, slots, None if valid else draw(st.sampled_from(DECODE_BREAKS)), seed)
    if kind == "filter":
        return Op(
            kind,
            (draw(slot),),
            None if valid else draw(st.sampled_from(FILTER_BREAKS)),
            seed,
            keep=draw(st.sampled_from(["all", "some", "some", "none", "dup"])),
        )
    slots = draw(st.lists(st.integers(0, SLOTS), min_size=0, max_size=3))
    return Op(kind, tuple(slots), None, seed)


@st.composite
def scenarios(draw: st.DrawFn) -> list[Op]:
    """Most scenarios start with two valid prefills (slots 0 and 1), then up to 7 steps."""
    steps = []
    if draw(st.integers(0, 9)) < 8:
        for slot in (0, 1):
            steps.append(
                Op(
                    "prefill",
                    (slot,),
                    None,
                    draw(st.integers(0, 2**32 - 1)),
                    n=draw(st.integers(1, 2)),
                    width=draw(st.integers(1, 6)),
                )
            )
    return steps + draw(st.lists(ops(), min_size=1, max_size=7))


@dataclass
class Batch:
    """What the fuzzer knows about one of its batch ids on the worker."""

    state: str = "never"  # never | live | gone | unknown (a failed merge may have taken it)
    rows: list[int] = field(default_factory=list)  # request ids, in batch order


class Scenario:
    """Runs ops against one worker and judges each answer from the batches' known state."""

    ids = itertools.count()

    def __init__(self, found: Findings, name: str, stub: worker_pb2_grpc.WorkerStub) -> None:
        self.found = found
        self.name = name
        self.stub = stub
        self.first = name == "llama0"
        self.causal = name != "bert"
        self.max_rows = MAX_ROWS if name == "llama0" else 64
        self.prefix = f"fz{next(self.ids)}"
        self.batches = [Batch() for _ in range(SLOTS + 1)]  # the last slot is never prefilled

    def batch_id(self, slot: int) -> str:
        return f"{self.prefix}-{slot}"

    def _held(self, *states: str) -> int:
        return sum(len(b.rows) for b in self.batches if b.state in states)

    def _judge(
        self,
        what: str,
        code: grpc.StatusCode,
        details: str | None,
        request: object,
        allowed: frozenset[grpc.StatusCode],
    ) -> None:
        self.found.check(f"Worker.{what}@{self.name}", code, details, request, allowed)

    # -- requests ---------------------------------------------------------------------------

    def _ids(
        self, rng: np.random.Generator, shape: list[int], dtype: str = "int64"
    ) -> common_pb2.Tensor:
        values = rng.integers(0, len(VOCAB), size=math.prod(shape))
        return common_pb2.Tensor(dtype=dtype, shape=shape, data=_encode(values, dtype))

    def _hidden(
        self, rng: np.random.Generator, shape: list[int], dtype: str = "float32"
    ) -> common_pb2.Tensor:
        values = rng.standard_normal(math.prod(shape)).astype(np.float32)
        return common_pb2.Tensor(dtype=dtype, shape=shape, data=_encode(values, dtype))

    def _sampling(self, rng: np.random.Generator) -> worker_pb2.Sampling:
        sampling = worker_pb2.Sampling(
            temperature=float(rng.choice([0.0, 0.0, 1e-30, 0.5, 1.0, 7.5, 100.0])),
            top_k=int(rng.choice([0, 1, 5, len(VOCAB), 10**6, 2**31 - 1])),
            top_p=float(rng.choice([1e-7, 0.5, 0.9, 1.0])),
        )
        if rng.integers(2):
            sampling.seed = int(rng.integers(-(2**63), 2**63 - 1, dtype=np.int64))
        return sampling

    def prefill_request(self, op: Op) -> worker_pb2.PrefillRequest:
        rng = np.random.default_rng(op.seed)
        n, width = op.n, op.width
        if op.broken == "zero_width":
            width = 0
        elif op.broken == "width_over_positions":
            width = POSITIONS + 1
        rows = []
        for i in range(n):
            length = int(rng.integers(1, width + 1)) if width else 1
            rows.append(
                worker_pb2.PrefillRow(
                    request_id=int(rng.integers(0, 2**63, dtype=np.uint64))
                    if i == 0
                    else rows[0].request_id + i,
                    length=length,
                    # Room for every decode a scenario runs: a valid batch never fills up.
                    max_tokens=length + int(rng.integers(8, 16)),
                    sampling=self._sampling(rng),
                )
            )
        request = worker_pb2.PrefillRequest(
            batch_id=self.batch_id(op.slots[0]),
            rows=rows,
            hidden_dtype=str(rng.choice(["", "float32", "float16", "bfloat16"])),
        )
        shape = [n + (op.broken == "rows_mismatch"), width]
        if self.first:
            request.input_ids.CopyFrom(self._ids(rng, shape))
        else:
            request.hidden_states.CopyFrom(self._hidden(rng, [*shape, HIDDEN]))
        tensor = request.input_ids if self.first else request.hidden_states
        row = request.rows[0]
        match op.broken:
            case "dup_ids":
                request.rows.add().CopyFrom(row)
            case "length_zero":
                row.length = 0
            case "length_negative":
                row.length = -5
            case "length_over_width":
                row.length = width + 1
            case "max_below_length":
                row.max_tokens = row.length - 1
            case "max_over_positions":
                row.max_tokens = POSITIONS + 1
            case "max_huge":
                row.max_tokens = 2**31 - 1
            case "temperature":
                row.sampling.temperature = float(rng.choice(BAD_TEMPERATURES))
            case "top_k":
                row.sampling.top_k = int(rng.choice([-1, -(2**31)]))
            case "top_p":
                row.sampling.top_p = float(rng.choice([0.0, 1.5, math.nan, math.inf]))
            case "no_rows":
                del request.rows[:]
            case "no_tensor":
                request.ClearField("input_ids" if self.first else "hidden_states")
            case "wrong_input":  # the other stage's kind of input
                request.ClearField("input_ids" if self.first else "hidden_states")
                if self.first:
                    request.hidden_states.CopyFrom(self._hidden(rng, [*shape, HIDDEN]))
                else:
                    request.input_ids.CopyFrom(self._ids(rng, shape))
            case "bad_values":
                _spoil_values(tensor, rng, self.first)
            case "bad_dtype":
                tensor.CopyFrom(
                    self._hidden(rng, shape) if self.first else self._ids(rng, [*shape, HIDDEN])
                )
            case "lying_bytes":
                tensor.data = tensor.data[: -int(rng.integers(1, 4))] or b"\0" * 3
            case "huge_empty_shape":  # no element, but strides that overflow int64
                tensor.CopyFrom(
                    common_pb2.Tensor(
                        dtype=tensor.dtype,
                        shape=[0, 2**62] if self.first else [0, 2**62, HIDDEN],
                        data=b"",
                    )
                )
            case "batch_id_empty":
                request.batch_id = ""
            case "batch_id_long":
                request.batch_id = "b" * 129
            case "wire":
                request.hidden_dtype = str(rng.choice(["complex64", "int64", "float32 ", "\x00"]))
        return request

    def decode_request(self, op: Op) -> worker_pb2.DecodeRequest:
        rng = np.random.default_rng(op.seed)
        ids = [self.batch_id(s) for s in op.slots]
        rows = sum(len(self.batches[s].rows) for s in op.slots) or 1
        match op.broken:
            case "repeat_id":
                ids = [ids[0], *ids]
            case "no_ids":
                ids = []
            case "long_id":
                ids[0] = "d" * 129
            case "count_plus":
                rows += 1
            case "count_zero":
                rows = 0
        request = worker_pb2.DecodeRequest(
            batch_ids=ids, hidden_dtype=str(rng.choice(["", "float32", "bfloat16"]))
        )
        if self.first:
            tensor = request.input_ids
            tensor.CopyFrom(self._ids(rng, [rows, 1] if op.broken == "bad_rank" else [rows]))
        else:
            tensor = request.hidden_states
            width = 2 if op.broken == "bad_rank" else 1
            tensor.CopyFrom(self._hidden(rng, [rows, width, HIDDEN]))
        if op.broken == "bad_values":
            _spoil_values(tensor, rng, self.first)
        elif op.broken == "bad_dtype":
            tensor.CopyFrom(
                self._hidden(rng, list(tensor.shape))
                if self.first
                else self._ids(rng, list(tensor.shape))
            )
        elif op.broken == "no_tensor":
            request.ClearField("input_ids" if self.first else "hidden_states")
        return request

    def filter_request(self, op: Op) -> worker_pb2.FilterRequest:
        rng = np.random.default_rng(op.seed)
        rows = self.batches[op.slots[0]].rows
        keep = {
            "all": list(rows),
            "some": [r for r in rows if rng.integers(2)],
            "none": [],
            "dup": list(rows[:1]) * 2,
        }[op.keep]
        request = worker_pb2.FilterRequest(batch_id=self.batch_id(op.slots[0]), keep=keep)
        if op.broken == "unknown_request":
            request.keep.append(max(rows, default=0) + 10**6)
        elif op.broken == "batch_id_empty":
            request.batch_id = ""
        elif op.broken == "batch_id_long":
            request.batch_id = "f" * 129
        return request

    # -- running and judging ----------------------------------------------------------------

    def run(self, op: Op) -> None:
        getattr(self, f"_{op.kind}")(op)

    def _prefill(self, op: Op) -> None:
        request = self.prefill_request(op)
        code, details, reply = _call(self.stub.Prefill, request, AUTH)
        batch = self.batches[op.slots[0]]
        if not self.causal or op.broken is not None:
            allowed = IA
        elif batch.state == "live":
            allowed = IA  # the id is taken: the router's bug, not a capacity matter
        elif batch.state == "unknown":
            allowed = frozenset({S.OK, S.INVALID_ARGUMENT, S.RESOURCE_EXHAUSTED})
        elif self._held("live") + op.n > self.max_rows:
            allowed = frozenset({S.RESOURCE_EXHAUSTED})
        elif self._held("live", "unknown") + op.n <= self.max_rows:
            allowed = OK
        else:
            allowed = frozenset({S.OK, S.RESOURCE_EXHAUSTED})
        self._judge("Prefill", code, details, request, allowed)
        if code == S.OK:
            batch.state, batch.rows = "live", [r.request_id for r in request.rows]
            expected = op.n if self.name == "llama1" else None
            if expected is not None and len(reply.token_ids) != expected:
                self.found.add(
                    f"Worker.Prefill@{self.name}", "bad reply", str(reply)[:200], request
                )

    def _decode(self, op: Op) -> None:
        request = self.decode_request(op)
        code, details, reply = _call(self.stub.Decode, request, AUTH)
        states = {self.batches[s].state for s in op.slots}
        input_broken = op.broken in (
            "count_zero",
            "bad_values",
            "bad_dtype",
            "bad_rank",
            "no_tensor",
        )
        # Refused before the worker looks the batches up (and merges them).
        refused_early = (
            not self.causal or op.broken in ("repeat_id", "no_ids", "long_id") or input_broken
        )
        if refused_early:
            allowed = IA
        elif "unknown" in states:
            allowed = frozenset({S.OK, S.INVALID_ARGUMENT, S.ABORTED})
        elif states - {"live"}:
            allowed = frozenset({S.ABORTED})  # a batch this worker does not hold
        elif op.broken == "count_plus":
            allowed = IA
        else:
            allowed = OK
        self._judge("Decode", code, details, request, allowed)
        named = [self.batches[s] for s in op.slots]
        if code == S.OK:
            merged = [r for b in named for r in b.rows]
            for b in named[1:]:
                b.state, b.rows = "gone", []
            named[0].state, named[0].rows = "live", merged
            if self.name == "llama1" and len(reply.token_ids) != len(merged):
                self.found.add("Worker.Decode@llama1", "bad reply", str(reply)[:200], request)
        elif len(named) > 1 and not refused_early and code != S.ABORTED:
            # Past the input checks, the worker may have merged the batches before refusing
            # the step (e.g. a row count that does not match the merged batch).
            for b in named:
                if b.state == "live":
                    b.state, b.rows = (
                        "unknown",
                        b.rows + [r for o in named if o is not b for r in o.rows],
                    )

    def _filter(self, op: Op) -> None:
        request = self.filter_request(op)
        code, details, _ = _call(self.stub.Filter, request, AUTH)
        batch = self.batches[op.slots[0]]
        if not self.causal or op.broken in ("batch_id_empty", "batch_id_long"):
            allowed = IA
        elif batch.state == "unknown":
            allowed = frozenset({S.OK, S.INVALID_ARGUMENT, S.ABORTED})
        elif batch.state != "live":
            allowed = frozenset({S.ABORTED})
        elif op.broken == "unknown_request":
            allowed = IA
        else:
            allowed = OK
        self._judge("Filter", code, details, request, allowed)
        if code == S.OK:
            kept = set(request.keep)
            batch.rows = [r for r in batch.rows if r in kept]
            batch.state = "live" if batch.rows else "gone"

    def _clear(self, op: Op) -> None:
        request = worker_pb2.ClearRequest(batch_ids=[self.batch_id(s) for s in op.slots])
        code, details, _ = _call(self.stub.Clear, request, AUTH)
        self._judge("Clear", code, details, request, OK)
        if code == S.OK:
            for s in op.slots:
                self.batches[s].state, self.batches[s].rows = "gone", []

    def _wild(self, op: Op) -> None:
        """Random bytes in every field of a prefill: no oracle but the contract's codes."""
        rng = np.random.default_rng(op.seed)
        data = rng.bytes(int(rng.integers(0, 64)))
        tensor = common_pb2.Tensor(
            dtype=str(rng.choice(DTYPES + BAD_DTYPES)),
            shape=[int(d) for d in rng.integers(-3, 2**40, size=int(rng.integers(0, 4)))],
            data=data,
        )
        request = worker_pb2.PrefillRequest(
            batch_id=self.batch_id(SLOTS),  # never prefilled otherwise: it cannot collide
            rows=[
                worker_pb2.PrefillRow(
                    request_id=int(rng.integers(0, 100)),
                    length=int(rng.integers(-2, 8)),
                    max_tokens=int(rng.integers(-2, 300)),
                )
                for _ in range(int(rng.integers(0, 4)))
            ],
        )
        (request.input_ids if rng.integers(2) else request.hidden_states).CopyFrom(tensor)
        code, details, _ = _call(self.stub.Prefill, request, AUTH)
        allowed = (
            IA if not self.causal else frozenset({S.OK, S.INVALID_ARGUMENT, S.RESOURCE_EXHAUSTED})
        )
        self._judge("Prefill(wild)", code, details, request, allowed)
        if code == S.OK:
            self.batches[SLOTS].state, self.batches[SLOTS].rows = (
                "live",
                [r.request_id for r in request.rows],
            )

    def clear_all(self) -> None:
        request = worker_pb2.ClearRequest(batch_ids=[self.batch_id(s) for s in range(SLOTS + 1)])
        self.stub.Clear(request, timeout=CALL_TIMEOUT, metadata=AUTH)


def _spoil_values(tensor: common_pb2.Tensor, rng: np.random.Generator, ids: bool) -> None:
    """Makes a valid tensor's values invalid: a token id out of the vocabulary, or NaN/Inf."""
    if not tensor.data:
        return
    if ids:
        values = np.frombuffer(tensor.data, dtype="<i8").copy()
        values[int(rng.integers(values.size))] = rng.choice([-1, len(VOCAB), 2**40])
        tensor.data = values.tobytes()
        return
    itemsize = ITEMSIZE[tensor.dtype]
    count = len(tensor.data) // itemsize
    spot = int(rng.integers(count)) * itemsize
    bad = {
        "float32": np.array([np.nan], "<f4").tobytes(),
        "float16": np.array([np.inf], "<f2").tobytes(),
        "bfloat16": b"\xc0\x7f",  # NaN
    }[tensor.dtype]
    tensor.data = tensor.data[:spot] + bad + tensor.data[spot + itemsize :]


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


@dataclass(frozen=True)
class RawMethod:
    path: str
    kind: str  # uu: unary; us: server stream
    where: str  # router or a worker
    strings: list[tuple[int, ...]]  # string fields by path (field, [nested field])
    request: type[Message]


RAW_METHODS = [
    RawMethod(
        "/tessera.v1.Inference/Generate",
        "uu",
        "router",
        [(1,), (2,), (3, 1), (3, 2), (9,)],
        inference_pb2.GenerateRequest,
    ),
    RawMethod(
        "/tessera.v1.Inference/GenerateStream",
        "us",
        "router",
        [(1,), (2,), (3, 2), (9,)],
        inference_pb2.GenerateRequest,
    ),
    RawMethod(
        "/tessera.v1.Inference/Embed", "uu", "router", [(1,), (2,)], inference_pb2.EmbedRequest
    ),
    RawMethod(
        "/tessera.v1.Inference/Forward",
        "uu",
        "router",
        [(1,), (4,), (5, 1)],
        inference_pb2.ForwardRequest,
    ),
    RawMethod(
        "/tessera.v1.Inference/ListModels", "uu", "router", [(1,)], inference_pb2.ListModelsRequest
    ),
    RawMethod(
        "/tessera.v1.Worker/Forward",
        "uu",
        "llama0",
        [(1, 1), (2, 1), (5,)],
        worker_pb2.StageForwardRequest,
    ),
    RawMethod(
        "/tessera.v1.Worker/Forward", "uu", "bert", [(1, 1), (5,)], worker_pb2.StageForwardRequest
    ),
    RawMethod(
        "/tessera.v1.Worker/Prefill",
        "uu",
        "llama1",
        [(1,), (4, 1), (5,)],
        worker_pb2.PrefillRequest,
    ),
    RawMethod(
        "/tessera.v1.Worker/Decode", "uu", "llama0", [(1,), (2, 1), (4,)], worker_pb2.DecodeRequest
    ),
    RawMethod("/tessera.v1.Worker/Filter", "uu", "llama1", [(1,)], worker_pb2.FilterRequest),
    RawMethod("/tessera.v1.Worker/Clear", "uu", "llama0", [(1,)], worker_pb2.ClearRequest),
    RawMethod("/tessera.v1.Worker/Info", "uu", "bert", [(1,)], worker_pb2.InfoRequest),
]
_RAW_HIDDEN = np.zeros((1, 2, HIDDEN), "<f4")
VALID_PREFIX: dict[str, Message] = {
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
    "/tessera.v1.Worker/Prefill": worker_pb2.PrefillRequest(
        batch_id="raw-prefill",
        rows=[worker_pb2.PrefillRow(request_id=1, length=2, max_tokens=4, sampling=GREEDY)],
        hidden_states=common_pb2.Tensor(
            dtype="float32", shape=[1, 2, HIDDEN], data=_RAW_HIDDEN.tobytes()
        ),
    ),
}


def raw_codes(method: RawMethod, decoded: Message | None) -> frozenset[grpc.StatusCode]:
    """The contract's answer to these bytes: INVALID_ARGUMENT if they are no valid message
    (judged by the same protobuf library the servers use), else what the method may answer."""
    if decoded is None:
        return IA
    name = method.path.rsplit("/", 1)[1]
    if method.where == "router":
        return OK if name == "ListModels" else public_codes(decoded.model)  # type: ignore[attr-defined]
    return {
        "Forward": frozenset({S.OK, S.INVALID_ARGUMENT}),
        "Prefill": frozenset({S.OK, S.INVALID_ARGUMENT, S.RESOURCE_EXHAUSTED}),
        # No batch the fuzz names is held: the raw prefills are cleared at once.
        "Decode": frozenset({S.INVALID_ARGUMENT, S.ABORTED}),
        "Filter": frozenset({S.INVALID_ARGUMENT, S.ABORTED}),
        "Clear": OK,
        "Info": OK,
    }[name]


def _decoded(method: RawMethod, data: bytes) -> Message | None:
    try:
        return method.request.FromString(data)
    except DecodeError:
        return None


@st.composite
def raw_payloads(draw: st.DrawFn) -> tuple[int, bytes]:
    index = draw(st.integers(0, len(RAW_METHODS) - 1))
    method = RAW_METHODS[index]
    prefix = VALID_PREFIX.get(method.path)
    base = prefix.SerializeToString() if prefix is not None else b""
    how = draw(
        st.sampled_from(["utf8", "utf8", "garbage", "truncated", "nested", "length", "empty"])
    )
    if how == "utf8":
        path = draw(st.sampled_from(method.strings))
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
        # 101 or 2000 nested groups of an unknown field: beyond protobuf's recursion limit (100).
        depth = draw(st.sampled_from([101, 2000]))
        return index, base + b"\xfb\x07" * depth + b"\xfc\x07" * depth
    if how == "length":
        # A length prefix that claims far more bytes than follow.
        return index, base + _varint((1 << 3) | 2) + _varint(2**31) + b"abc"
    return index, b""


# -- the public service ------------------------------------------------------------------------

FINISH_REASONS = ("length", "eos", "stop")


def test_fuzz_generate(target: Target) -> None:
    found = Findings()
    stub = target.mesh.stub()

    @settings(FUZZ, max_examples=300)
    @given(
        case=st.one_of(
            valid_generate_requests(), generate_requests().map(lambda r: (r, public_codes(r.model)))
        )
    )
    def run(case: tuple[inference_pb2.GenerateRequest, Expected]) -> None:
        request, allowed = case
        reply = _unary(found, "Generate", stub.Generate, request, allowed)
        if reply is not None and not (
            reply.finish_reason in FINISH_REASONS and 0 <= reply.generated_tokens <= 8
        ):
            found.add("Generate", "bad reply", str(reply), request)
        chunks = _stream(found, "GenerateStream", stub.GenerateStream, request, allowed)
        if chunks and chunks[-1].finish_reason not in FINISH_REASONS:
            found.add("GenerateStream", "bad last chunk", str(chunks[-1]), request)

    run()
    found.assert_none()
    found.assert_reached("Generate", 0.3)
    found.assert_reached("GenerateStream", 0.3)


def test_fuzz_embed(target: Target) -> None:
    found = Findings()
    stub = target.mesh.stub()

    @settings(FUZZ, max_examples=300)
    @given(model=models("tiny-bert", "tiny-bert", "tiny-llama"), inputs=st.lists(TEXT, max_size=6))
    def run(model: str, inputs: list[str]) -> None:
        request = inference_pb2.EmbedRequest(model=model, inputs=inputs)
        reply = _unary(found, "Embed", stub.Embed, request, public_codes(model))
        if reply is not None and (
            len(reply.embeddings) != len(inputs)
            or reply.dim != HIDDEN
            or not all(math.isfinite(v) for e in reply.embeddings for v in e.values)
        ):
            found.add("Embed", "bad reply", f"{len(reply.embeddings)} x {reply.dim}", request)

    run()
    found.assert_none()
    found.assert_reached("Embed", 0.2)


def test_fuzz_forward(target: Target) -> None:
    found = Findings()
    stub = target.mesh.stub()

    @settings(FUZZ, max_examples=500)
    @given(
        case=st.one_of(
            valid_forward_requests(), forward_requests().map(lambda r: (r, public_codes(r.model)))
        )
    )
    def run(case: tuple[inference_pb2.ForwardRequest, Expected]) -> None:
        request, allowed = case
        reply = _unary(found, "Forward", stub.Forward, request, allowed)
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
    found.assert_reached("Forward", 0.3)


def test_fuzz_list_models(target: Target) -> None:
    found = Findings()
    stub = target.mesh.stub()
    raw = target.mesh.channel().unary_unary("/tessera.v1.Inference/ListModels")

    @settings(FUZZ, max_examples=10)
    @given(junk=st.binary(max_size=16))
    def run(junk: bytes) -> None:
        reply = _unary(found, "ListModels", stub.ListModels, inference_pb2.ListModelsRequest(), OK)
        assert reply is not None and SERVED <= {m.name for m in reply.models}
        # Unknown fields are legal protobuf: they are skipped, not an error.
        _unary(found, "ListModels(unknown field)", raw, _field(15, junk), OK)

    run()
    found.assert_none()


def test_fuzz_sampling_extremes_are_served(target: Target) -> None:
    """Valid but extreme sampling parameters must generate (OK), not fail inside sampling."""
    found = Findings()
    stub = target.mesh.stub()

    @settings(FUZZ, max_examples=120)
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
            _unary(found, where, method, request, OK)

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
    "../tiny-llama",
    "tiny-llama/.",
]


@pytest.mark.parametrize("rpc", ["Generate", "Embed", "Forward"])
def test_odd_model_names_are_not_found(target: Target, rpc: str) -> None:
    """Any name that is not a stored model is NOT_FOUND, even when it is no file name at all
    or a path that leads to one."""
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
        code, _, _ = _call(getattr(stub, rpc), request, None)
        if code != S.NOT_FOUND:
            wrong.append((name[:20], code.name))
    assert not wrong, wrong


# -- the worker service, called directly with the router's credential --------------------------


def test_fuzz_worker_forward(target: Target) -> None:
    found = Findings()
    channels = {name: target.channel(p) for name, p in target.workers().items()}
    before = {name: _rows_metric(target, name, "forward") for name in channels}

    anything = frozenset({S.OK, S.INVALID_ARGUMENT})

    @settings(FUZZ, max_examples=500)
    @given(
        case=st.sampled_from(sorted(channels)).flatmap(
            lambda which: st.tuples(
                st.just(which),
                st.one_of(  # two thirds start from a valid request
                    valid_stage_forward_requests(which),
                    valid_stage_forward_requests(which),
                    stage_forward_requests().map(lambda r: (r, anything)),
                ),
            )
        )
    )
    def run(case: tuple[str, tuple[worker_pb2.StageForwardRequest, Expected]]) -> None:
        which, (request, allowed) = case
        where = f"Worker.Forward@{which}"
        stub = worker_pb2_grpc.WorkerStub(channels[which])
        reply = _unary(found, where, stub.Forward, request, allowed, AUTH)
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
    reached = {name: _rows_metric(target, name, "forward") - before[name] for name in channels}
    print(f"\nrows the workers' Forward ran on: {reached}")
    for name in channels:
        found.assert_reached(f"Worker.Forward@{name}", 0.2)
        assert reached[name] > 0, reached


def test_fuzz_worker_generation(target: Target) -> None:
    """Prefill / Decode / Filter / Clear scenarios on each stage (and on an encoder, which has
    no generation): each answer judged from the batches the worker must hold; after each
    scenario its batches are cleared and the worker must hold nothing at all."""
    found = Findings()
    procs = target.workers()
    for name, proc in procs.items():
        wait_until(lambda p=proc: _nothing_held(p), LEAK_WAIT_S, f"{name} holds nothing before")
    channels = {name: target.channel(p) for name, p in procs.items()}
    kinds = ("prefill", "decode")
    before = {(n, k): _rows_metric(target, n, k) for n in ("llama0", "llama1") for k in kinds}

    @settings(FUZZ, max_examples=300)
    @given(
        which=st.sampled_from(["llama0", "llama0", "llama1", "llama1", "bert"]),
        steps=scenarios(),
    )
    def run(which: str, steps: list[Op]) -> None:
        scenario = Scenario(found, which, worker_pb2_grpc.WorkerStub(channels[which]))
        try:
            for op in steps:
                scenario.run(op)
        finally:
            scenario.clear_all()
        info = _info(procs[which])
        if info.live_sessions or info.kv_tokens or info.live_batches:
            found.add(
                f"Worker@{which}",
                "rows left held after Clear",
                f"{info.live_sessions} rows, {info.kv_tokens} slots, {info.live_batches} batches",
                steps,
            )

    try:
        run()
    finally:
        for channel in channels.values():
            channel.close()
    found.assert_none()
    for where in ("Prefill", "Decode", "Filter"):
        for name in ("llama0", "llama1"):
            found.assert_reached(f"Worker.{where}@{name}", 0.1)
    reached = {key: _rows_metric(target, *key) - value for key, value in before.items()}
    print(f"\nrows the stages ran through the model: {reached}")
    assert all(rows > 0 for rows in reached.values()), reached


def test_fuzz_raw_bytes(target: Target) -> None:
    """Bytes no stub would send: invalid UTF-8 in string fields, garbage, truncation, deep
    nesting, lying length prefixes. Bytes that are no valid message get INVALID_ARGUMENT;
    bytes that happen to decode get what that message would get."""
    found = Findings()
    channels = {name: target.channel(p) for name, p in target.workers().items()}
    channels["router"] = target.mesh.channel()

    @settings(FUZZ, max_examples=600)
    @given(payload=raw_payloads())
    def run(payload: tuple[int, bytes]) -> None:
        index, data = payload
        method = RAW_METHODS[index]
        channel = channels[method.where]
        metadata = None if method.where == "router" else AUTH
        decoded = _decoded(method, data)
        try:
            if method.kind == "uu":
                channel.unary_unary(method.path)(data, timeout=CALL_TIMEOUT, metadata=metadata)
            else:
                list(channel.unary_stream(method.path)(data, timeout=CALL_TIMEOUT))
            code, details = S.OK, None
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
        found.check(
            f"raw {method.path}@{method.where}", code, details, data, raw_codes(method, decoded)
        )
        if isinstance(decoded, worker_pb2.PrefillRequest) and decoded.batch_id:
            worker_pb2_grpc.WorkerStub(channel).Clear(
                worker_pb2.ClearRequest(batch_ids=[decoded.batch_id]),
                timeout=CALL_TIMEOUT,
                metadata=AUTH,
            )

    try:
        run()
    finally:
        for name, channel in channels.items():
            if name != "router":
                channel.close()
    found.assert_none()
    decoded_ok = sum(
        n for (where, code), n in CODES.items() if where.startswith("raw ") and code == "OK"
    )
    print(f"\nraw payloads answered OK (they decoded to a valid request): {decoded_ok}")


def test_workers_refuse_fuzz_without_the_token(target: Target) -> None:
    """The same requests without the caller token: UNAUTHENTICATED for every one, decodable or
    not: a call without a token is refused from its metadata before its body is read."""
    found = Findings()
    channels = {name: target.channel(p) for name, p in target.workers().items()}

    @settings(FUZZ, max_examples=150)
    @given(
        which=st.sampled_from(sorted(channels)),
        request=stage_forward_requests(),
        payload=raw_payloads(),
        wrong=st.sampled_from([None, "Bearer nope", TOKEN, "Bearer "]),
    )
    def run(
        which: str,
        request: worker_pb2.StageForwardRequest,
        payload: tuple[int, bytes],
        wrong: str | None,
    ) -> None:
        metadata = None if wrong is None else (("authorization", wrong),)
        stub = worker_pb2_grpc.WorkerStub(channels[which])
        _unary(
            found,
            f"Worker.Forward@{which} (no token)",
            stub.Forward,
            request,
            frozenset({S.UNAUTHENTICATED}),
            metadata,
        )
        method = RAW_METHODS[payload[0]]
        if method.where == "router":
            return
        code, details, _ = _call(
            channels[method.where].unary_unary(method.path), payload[1], metadata
        )
        allowed = frozenset({S.UNAUTHENTICATED})
        found.check(
            f"raw {method.path}@{method.where} (no token)", code, details, payload[1], allowed
        )

    try:
        run()
    finally:
        for channel in channels.values():
            channel.close()
    found.assert_none()


# -- focused cases -----------------------------------------------------------------------------


def _prefill_rows(
    stub: worker_pb2_grpc.WorkerStub, batch_id: str, rows: int, *, first: bool, max_tokens: int
) -> grpc.StatusCode:
    """A valid one-column prefill of `rows` rows, each allowed `max_tokens` tokens."""
    request = worker_pb2.PrefillRequest(
        batch_id=batch_id,
        rows=[
            worker_pb2.PrefillRow(request_id=i, length=1, max_tokens=max_tokens, sampling=GREEDY)
            for i in range(rows)
        ],
    )
    if first:
        ids = np.full((rows, 1), 7, dtype="<i8")
        request.input_ids.CopyFrom(
            common_pb2.Tensor(dtype="int64", shape=[rows, 1], data=ids.tobytes())
        )
    else:
        hidden = np.zeros((rows, 1, HIDDEN), dtype="<f4")
        request.hidden_states.CopyFrom(
            common_pb2.Tensor(dtype="float32", shape=[rows, 1, HIDDEN], data=hidden.tobytes())
        )
    code, _, _ = _call(stub.Prefill, request, AUTH)
    return code


def test_row_cap_refuses_with_resource_exhausted(target: Target) -> None:
    """llama0 holds at most MAX_ROWS rows over all its batches: one more row, alone or in a
    bigger batch, is RESOURCE_EXHAUSTED; a taken batch id is the caller's bug (INVALID_ARGUMENT)
    and takes nothing; freeing rows makes room again."""
    wait_until(lambda: _nothing_held(target.llama0), LEAK_WAIT_S, "nothing held before")
    with target.channel(target.llama0) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        ids = [f"cap-{i}" for i in range(MAX_ROWS + 1)]
        try:
            for batch_id in ids[:MAX_ROWS]:
                assert _prefill_rows(stub, batch_id, 1, first=True, max_tokens=8) == S.OK
            assert _info(target.llama0).live_sessions == MAX_ROWS
            assert _prefill_rows(stub, ids[-1], 1, first=True, max_tokens=8) == S.RESOURCE_EXHAUSTED
            assert _prefill_rows(stub, ids[0], 1, first=True, max_tokens=8) == S.INVALID_ARGUMENT
            assert _info(target.llama0).live_sessions == MAX_ROWS  # the refusals took nothing
            stub.Clear(
                worker_pb2.ClearRequest(batch_ids=ids[:2]), timeout=CALL_TIMEOUT, metadata=AUTH
            )
            assert _prefill_rows(stub, ids[-1], 3, first=True, max_tokens=8) == S.RESOURCE_EXHAUSTED
            assert _prefill_rows(stub, ids[-1], 2, first=True, max_tokens=8) == S.OK
            assert _info(target.llama0).live_sessions == MAX_ROWS
        finally:
            stub.Clear(worker_pb2.ClearRequest(batch_ids=ids), timeout=CALL_TIMEOUT, metadata=AUTH)
    assert _nothing_held(target.llama0)


def test_kv_budget_refuses_with_resource_exhausted(target: Target) -> None:
    """llama1's KV budget is KV_MB MiB: rows x their whole generation's slots are reserved at
    prefill, and a prefill that would go over it is RESOURCE_EXHAUSTED before anything is
    allocated; freeing a batch makes room again."""
    budget = KV_MB * 1024 * 1024 // KV_BYTES_PER_TOKEN  # token slots
    assert _info(target.llama1).kv_token_budget == budget
    wait_until(lambda: _nothing_held(target.llama1), LEAK_WAIT_S, "nothing held before")
    per_row = POSITIONS  # a row that may reach the model's every position
    fit = budget // per_row
    with target.channel(target.llama1) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        try:
            assert _prefill_rows(stub, "kv-a", fit, first=False, max_tokens=per_row) == S.OK
            assert _info(target.llama1).kv_tokens == fit * per_row == budget
            assert _prefill_rows(stub, "kv-b", 1, first=False, max_tokens=2) == S.RESOURCE_EXHAUSTED
            stub.Clear(
                worker_pb2.ClearRequest(batch_ids=["kv-a"]), timeout=CALL_TIMEOUT, metadata=AUTH
            )
            assert _prefill_rows(stub, "kv-b", 1, first=False, max_tokens=2) == S.OK
        finally:
            stub.Clear(
                worker_pb2.ClearRequest(batch_ids=["kv-a", "kv-b"]),
                timeout=CALL_TIMEOUT,
                metadata=AUTH,
            )
    assert _nothing_held(target.llama1)


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
                registry.Register(worker_pb2.RegisterRequest(worker=info), timeout=CALL_TIMEOUT)
                wrong.append((str(fields).replace("\n", " "), "OK"))
            except grpc.RpcError as exc:
                if exc.code() != S.INVALID_ARGUMENT:
                    wrong.append((str(fields).replace("\n", " "), exc.code().name))
        assert not wrong, wrong
        listed = target.mesh.stub().ListModels(inference_pb2.ListModelsRequest(), timeout=10)
        assert "fuzz-registered" not in {m.name for m in listed.models}
    finally:
        registry.Deregister(worker_pb2.DeregisterRequest(address="127.0.0.1:9"), timeout=10)


def test_servers_healthy_and_nothing_held_after_the_fuzz(target: Target) -> None:
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
        wait_until(lambda p=proc: _nothing_held(p), LEAK_WAIT_S, f"{proc.address} holds nothing")
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
        assert not list(_unexpected(proc)), [_last_line(e) for e in _unexpected(proc)][:5]
    total = sum(CODES.values())
    print(f"\nfuzz calls: {total}; by target and code: {dict(sorted(CODES.items()))}")


def _unexpected(proc: Proc) -> Iterator[dict[str, Any]]:
    """The servers' own log of every error they mapped to INTERNAL."""
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
