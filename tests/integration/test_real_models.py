"""The two real models end to end through real processes: SmolLM2 split in two stages, MiniLM
as a replica, a memcached node. Exact against the unsplit `transformers` / sentence-transformers
references (the correctness anchor)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from services.cache.launcher import MemcachedNode, free_port
from services.pb.tessera.v1 import inference_pb2, inference_pb2_grpc
from tests.mesh import Mesh

LLM = "smollm2-135m-instruct"
ENCODER = "all-minilm-l6-v2"
RPC_TIMEOUT_S = 120

# The first test also pays for the mesh start (three model loads on a small machine).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

PROMPTS = ["The capital of France is", "Once upon a time, there was a", "def fibonacci(n):"]
CHATS = [
    [("user", "What is 2 + 2?")],
    [("system", "You are a terse assistant."), ("user", "Name three colours.")],
]
LONG_TEXT = " ".join(f"token{i} and some filler words" for i in range(120))  # > 256 tokens
TEXTS = [
    "hello",
    "The cat sat on the mat.",
    "Paris is the capital and largest city of France, with two million residents.",
    LONG_TEXT,
    "¿Qué tal? 日本語",
]


@pytest.fixture(scope="module")
def cache_node() -> Iterator[MemcachedNode]:
    node = MemcachedNode().start(port=free_port())
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def mesh(real_repo: Path, cache_node: MemcachedNode) -> Iterator[Mesh]:
    """Router + SmolLM2 as stages [0,15) [15,30) + MiniLM as a replica."""
    with Mesh(real_repo, cache_nodes=[cache_node.address]) as m:
        m.start_router()
        for model, layers in [(LLM, "0:15"), (LLM, "15:30"), (ENCODER, None)]:
            m.start_worker(model, layers, wait=False)
        for proc in m.workers:
            proc.wait_ready(timeout=240)
        m.wait_model(LLM, timeout=120)
        m.wait_model(ENCODER, timeout=120)
        yield m


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The references run in this process next to four servers on a small machine: more than
    one intra-op thread here makes OpenMP spin against them (20 tokens took 20+ s, not 1 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def llm_tokenizer(real_repo: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(real_repo / LLM)


@pytest.fixture(scope="module")
def llm_reference(real_repo: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(real_repo / LLM).eval()


def _reference_greedy(model: torch.nn.Module, prompt_ids: list[int], max_new: int) -> list[int]:
    """Greedy ids of the unsplit model, up to and including the first EOS (where the router
    stops too)."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new
        )
    new = out[0, ids.shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    for i, token in enumerate(new):
        if token in eos_ids:
            return new[: i + 1]
    return new


def _chat_request(
    messages: list[tuple[str, str]], max_new: int, seed: int | None = None
) -> inference_pb2.GenerateRequest:
    request = inference_pb2.GenerateRequest(
        model=LLM,
        max_new_tokens=max_new,
        messages=[inference_pb2.ChatMessage(role=r, content=c) for r, c in messages],
    )
    if seed is not None:
        request.seed = seed  # greedy still (temperature 0); the seed only varies the cache key
    return request


def _assert_same_greedy(got: inference_pb2.GenerateResponse, want: list[int], max_new: int) -> None:
    assert list(got.token_ids) == want
    assert got.generated_tokens == len(want)
    if len(want) == max_new and got.finish_reason == "length":
        return
    assert got.finish_reason == "eos" and len(want) <= max_new


def test_minilm_embeddings_match_sentence_transformers(mesh: Mesh, real_repo: Path) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(real_repo / ENCODER), device="cpu")
    assert len(reference.tokenizer(LONG_TEXT)["input_ids"]) > 256  # really truncated
    want = reference.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    got = mesh.stub().Embed(
        inference_pb2.EmbedRequest(model=ENCODER, inputs=TEXTS), timeout=RPC_TIMEOUT_S
    )
    values = np.array([e.values for e in got.embeddings], dtype=np.float32)
    assert got.dim == 384 and values.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(values, axis=1), 1.0, rtol=0, atol=1e-5)
    np.testing.assert_allclose(values, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_two_stage_smollm2_prompt_is_the_unsplit_greedy(
    mesh: Mesh, llm_tokenizer: PreTrainedTokenizerBase, llm_reference: torch.nn.Module, prompt: str
) -> None:
    max_new = 16
    got = mesh.stub().Generate(
        inference_pb2.GenerateRequest(model=LLM, prompt=prompt, max_new_tokens=max_new),
        timeout=RPC_TIMEOUT_S,
    )
    prompt_ids = llm_tokenizer(prompt)["input_ids"]
    assert got.prompt_tokens == len(prompt_ids)
    _assert_same_greedy(got, _reference_greedy(llm_reference, prompt_ids, max_new), max_new)


@pytest.mark.parametrize("messages", CHATS, ids=["one-turn", "with-system"])
def test_two_stage_smollm2_chat_is_the_unsplit_greedy(
    mesh: Mesh,
    llm_tokenizer: PreTrainedTokenizerBase,
    llm_reference: torch.nn.Module,
    messages: list[tuple[str, str]],
) -> None:
    max_new = 20
    got = mesh.stub().Generate(_chat_request(messages, max_new), timeout=RPC_TIMEOUT_S)
    text = llm_tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in messages], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = llm_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert got.prompt_tokens == len(prompt_ids)
    _assert_same_greedy(got, _reference_greedy(llm_reference, prompt_ids, max_new), max_new)
    assert got.text == llm_tokenizer.decode(list(got.token_ids), skip_special_tokens=True)


def test_capital_of_france_is_paris_then_cached(mesh: Mesh) -> None:
    stub = mesh.stub()
    request = _chat_request([("user", "What is the capital of France?")], 24)
    first = stub.Generate(request, timeout=RPC_TIMEOUT_S)
    assert "Paris" in first.text, first.text
    assert not first.cached
    second = stub.Generate(request, timeout=RPC_TIMEOUT_S)
    assert second.cached
    assert (second.text, list(second.token_ids), second.finish_reason) == (
        first.text,
        list(first.token_ids),
        first.finish_reason,
    )


def test_concurrent_streams_are_the_unsplit_greedy(
    mesh: Mesh, llm_tokenizer: PreTrainedTokenizerBase, llm_reference: torch.nn.Module
) -> None:
    """Chats streamed together through the two-stage chain (one batch), each against the
    unsplit model; the streams run the chain (never the cache) and their text is the decode."""
    import asyncio

    from grpc import aio

    chats = [
        [("user", "Write one sentence about the sea.")],
        [("user", "What is the capital of France?")],
        [("system", "You are a terse assistant."), ("user", "Name three colours.")],
        [("user", "Count from one to five.")],
    ]
    max_new = 24

    async def run() -> list[list[inference_pb2.GenerateChunk]]:
        async with aio.insecure_channel(mesh.address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)

            async def one(messages: list[tuple[str, str]]) -> list[inference_pb2.GenerateChunk]:
                call = stub.GenerateStream(
                    _chat_request(messages, max_new, seed=len(messages)), timeout=RPC_TIMEOUT_S
                )
                return [chunk async for chunk in call]

            return await asyncio.gather(*(one(m) for m in chats))

    for messages, chunks in zip(chats, asyncio.run(run()), strict=True):
        text = llm_tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in messages],
            add_generation_prompt=True,
            tokenize=False,
        )
        prompt_ids = llm_tokenizer(text, add_special_tokens=False)["input_ids"]
        want = _reference_greedy(llm_reference, prompt_ids, max_new)
        tokens = [t for c in chunks for t in c.token_ids]
        assert not any(c.cached for c in chunks) and len(chunks) > 1
        assert tokens == want
        assert chunks[-1].finish_reason == ("length" if len(want) == max_new else "eos")
        streamed = "".join(c.text for c in chunks)
        assert streamed == llm_tokenizer.decode(tokens, skip_special_tokens=True) and streamed
