"""A router and stage workers of tiny models as real processes: exactness, cache, bad input."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from services.cache.launcher import MemcachedNode, free_port
from services.common.tensors import from_numpy, to_numpy
from services.pb.tessera.v1 import common_pb2, inference_pb2
from tests.mesh import Mesh

pytestmark = pytest.mark.slow  # starts meshes of real processes; not in the fast tier

PROMPTS = ["the cat sat on the mat", "hello world", "what is the capital of france ?"]


@pytest.fixture(scope="module")
def cache_node() -> Iterator[MemcachedNode]:
    node = MemcachedNode().start(port=free_port())
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def mesh(tiny_repo: Path, cache_node: MemcachedNode) -> Iterator[Mesh]:
    """tiny-llama as [0,1) [1,3) [3,4); tiny-gpt2 as [0,2) [2,4); tiny-bert as [0,2) [2,4);
    tiny-roberta as a replica."""
    with Mesh(tiny_repo, cache_nodes=[cache_node.address]) as m:
        m.start_router()
        for model, layers in [
            ("tiny-llama", "0:1"),
            ("tiny-llama", "1:3"),
            ("tiny-llama", "3:4"),
            ("tiny-gpt2", "0:2"),
            ("tiny-gpt2", "2:4"),
            ("tiny-bert", "0:2"),
            ("tiny-bert", "2:4"),
            ("tiny-roberta", None),
        ]:
            m.start_worker(model, layers, wait=False)
        for proc in m.workers:
            proc.wait_ready()
        for model in ("tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-roberta"):
            m.wait_model(model)
        yield m


def _reference_greedy(path: Path, prompt: str, max_new: int) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = model.generate(
        ids, max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_chain_generates_the_unsplit_greedy_tokens(mesh: Mesh, tiny_repo: Path, model: str) -> None:
    stub = mesh.stub()
    for prompt in PROMPTS:
        got = stub.Generate(
            inference_pb2.GenerateRequest(model=model, prompt=prompt, max_new_tokens=12), timeout=60
        )
        want = _reference_greedy(tiny_repo / model, prompt, 12)
        # A generation that samples the EOS token stops there (and includes it).
        assert got.token_ids and list(got.token_ids) == want[: len(got.token_ids)]
        assert got.finish_reason in ("length", "eos")
        if got.finish_reason == "length":
            assert len(got.token_ids) == 12
        else:
            assert got.token_ids[-1] == 6  # tiny models' </s>


def test_stream_is_the_unsplit_greedy_and_runs_the_chain(mesh: Mesh, tiny_repo: Path) -> None:
    """Streamed first (nothing cached yet): every chunk comes from the chain, one per token."""
    stub = mesh.stub()
    request = inference_pb2.GenerateRequest(model="tiny-llama", prompt="a b c", max_new_tokens=10)
    chunks = list(stub.GenerateStream(request, timeout=60))
    tokens = [t for c in chunks for t in c.token_ids]
    assert not any(c.cached for c in chunks)
    assert len(chunks) >= len(tokens) > 0
    assert tokens == _reference_greedy(tiny_repo / "tiny-llama", "a b c", 10)[: len(tokens)]
    tokenizer = AutoTokenizer.from_pretrained(tiny_repo / "tiny-llama")
    assert "".join(c.text for c in chunks) == tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-roberta"])
def test_embeddings_match_reference(mesh: Mesh, tiny_repo: Path, model: str) -> None:
    texts = ["the cat sat on the mat", "hello", "paris is the capital of france"]
    got = mesh.stub().Embed(inference_pb2.EmbedRequest(model=model, inputs=texts), timeout=60)
    tokenizer = AutoTokenizer.from_pretrained(tiny_repo / model)
    ref = AutoModel.from_pretrained(tiny_repo / model).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = ref(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()
    assert got.dim == want.shape[1]
    values = np.array([e.values for e in got.embeddings], dtype=np.float32)
    np.testing.assert_allclose(values, want, rtol=0, atol=1e-5)


def test_forward_runs_only_the_named_layers(mesh: Mesh, tiny_repo: Path) -> None:
    ref = AutoModelForCausalLM.from_pretrained(tiny_repo / "tiny-llama").eval()
    stub = mesh.stub()
    first = stub.Forward(
        inference_pb2.ForwardRequest(model="tiny-llama", start=0, end=2, text="the cat sat"),
        timeout=60,
    )
    ids = torch.tensor([list(first.input_ids)])
    with torch.no_grad():
        states = ref(input_ids=ids, output_hidden_states=True).hidden_states
    np.testing.assert_allclose(to_numpy(first.hidden_states), states[2].numpy(), atol=1e-5, rtol=0)
    # Continue from those hidden states through the rest: equals the unsplit last hidden state.
    rest = stub.Forward(
        inference_pb2.ForwardRequest(
            model="tiny-llama", start=2, hidden_states=first.hidden_states
        ),
        timeout=60,
    )
    np.testing.assert_allclose(to_numpy(rest.hidden_states), states[-1].numpy(), atol=1e-5, rtol=0)
    assert (rest.span.start, rest.span.end) == (2, 4)


def test_list_models_shows_chains(mesh: Mesh) -> None:
    listed = mesh.stub().ListModels(inference_pb2.ListModelsRequest(), timeout=10)
    by_name = {m.name: m for m in listed.models}
    llama = by_name["tiny-llama"]
    assert llama.healthy and llama.num_layers == 4 and llama.kind == "causal-lm"
    spans = [[(s.span.start, s.span.end) for s in c.stages] for c in llama.chains]
    assert spans == [[(0, 1), (1, 3), (3, 4)]]
    assert len(llama.fingerprint) == 64
    assert by_name["tiny-roberta"].kind == "encoder"


def test_deterministic_generate_is_cached(mesh: Mesh) -> None:
    stub = mesh.stub()
    request = inference_pb2.GenerateRequest(
        model="tiny-llama", prompt="the dog sat", max_new_tokens=9
    )
    first = stub.Generate(request, timeout=60)
    second = stub.Generate(request, timeout=60)
    assert not first.cached and second.cached
    assert (second.text, list(second.token_ids)) == (first.text, list(first.token_ids))
    seeded = inference_pb2.GenerateRequest(
        model="tiny-llama", prompt="the dog sat", max_new_tokens=9, temperature=1.0, seed=3
    )
    assert not stub.Generate(seeded, timeout=60).cached
    assert stub.Generate(seeded, timeout=60).cached
    unseeded = inference_pb2.GenerateRequest(
        model="tiny-llama", prompt="the dog sat", max_new_tokens=9, temperature=1.0
    )
    assert not stub.Generate(unseeded, timeout=60).cached
    assert not stub.Generate(unseeded, timeout=60).cached


def test_embed_caches_per_text(mesh: Mesh) -> None:
    stub = mesh.stub()
    first = stub.Embed(
        inference_pb2.EmbedRequest(model="tiny-bert", inputs=["a b c", "d e f"]), timeout=60
    )
    assert first.cached_inputs == 0
    mixed = stub.Embed(
        inference_pb2.EmbedRequest(model="tiny-bert", inputs=["d e f", "g h i", "a b c"]),
        timeout=60,
    )
    assert mixed.cached_inputs == 2 and not mixed.cached
    np.testing.assert_array_equal(mixed.embeddings[0].values, first.embeddings[1].values)
    again = stub.Embed(inference_pb2.EmbedRequest(model="tiny-bert", inputs=["g h i"]), timeout=60)
    assert again.cached


BAD_REQUESTS = [
    (
        "Generate",
        inference_pb2.GenerateRequest(model="no-such-model", prompt="hi"),
        grpc.StatusCode.NOT_FOUND,
    ),
    (
        "Generate",
        inference_pb2.GenerateRequest(model="tiny-llama", prompt=""),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "Generate",
        inference_pb2.GenerateRequest(model="tiny-llama", prompt="the " * 300, max_new_tokens=4),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "Generate",
        inference_pb2.GenerateRequest(model="tiny-llama", prompt="hi", max_new_tokens=0),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "Generate",
        inference_pb2.GenerateRequest(model="tiny-llama", prompt="hi", max_new_tokens=10**6),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "Generate",
        inference_pb2.GenerateRequest(model="tiny-llama", prompt="hi", temperature=-1),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "Generate",
        inference_pb2.GenerateRequest(model="tiny-llama", prompt="hi", top_p=0),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "Generate",
        inference_pb2.GenerateRequest(model="tiny-llama", prompt="hi", top_p=1.01),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "Generate",
        inference_pb2.GenerateRequest(model="tiny-bert", prompt="hi"),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    ("Embed", inference_pb2.EmbedRequest(model="tiny-bert"), grpc.StatusCode.INVALID_ARGUMENT),
    ("Embed", inference_pb2.EmbedRequest(model="nope", inputs=["x"]), grpc.StatusCode.NOT_FOUND),
    (
        "Forward",
        inference_pb2.ForwardRequest(
            model="tiny-llama",
            start=1,
            hidden_states=common_pb2.Tensor(dtype="float32", shape=[1, 2, 32], data=b"\0" * 12),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "Forward",
        inference_pb2.ForwardRequest(
            model="tiny-llama",
            start=1,
            hidden_states=common_pb2.Tensor(dtype="complex", shape=[1, 1, 32], data=b"\0" * 256),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "Forward",
        inference_pb2.ForwardRequest(
            model="tiny-llama",
            start=1,
            hidden_states=from_numpy(np.full((1, 2, 32), np.nan, dtype=np.float32)),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "Forward",
        inference_pb2.ForwardRequest(model="tiny-llama", start=3, end=9, text="hi"),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "Forward",
        inference_pb2.ForwardRequest(model="tiny-llama", start=1, text="hi"),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
]


@pytest.mark.parametrize(
    "method,request_,code",
    BAD_REQUESTS,
    ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(BAD_REQUESTS)],
)
def test_bad_input_gets_its_status_and_servers_keep_serving(
    mesh: Mesh, method: str, request_: object, code: grpc.StatusCode
) -> None:
    stub = mesh.stub()
    with pytest.raises(grpc.RpcError) as caught:
        getattr(stub, method)(request_, timeout=30)
    assert caught.value.code() == code, caught.value.details()
    assert caught.value.details() and "Traceback" not in caught.value.details()
    ok = stub.Generate(
        inference_pb2.GenerateRequest(model="tiny-llama", prompt="hi", max_new_tokens=2), timeout=30
    )
    assert ok.generated_tokens >= 1


def test_requests_succeed_when_memcached_dies(tiny_repo: Path) -> None:
    node = MemcachedNode().start(port=free_port())
    try:
        with Mesh(tiny_repo, cache_nodes=[node.address]) as m:
            m.start_router()
            m.start_worker("tiny-bert")
            m.wait_model("tiny-bert")
            stub = m.stub()
            request = inference_pb2.EmbedRequest(model="tiny-bert", inputs=["x y z"])
            stub.Embed(request, timeout=30)
            assert stub.Embed(request, timeout=30).cached
            node.kill()
            for _ in range(5):
                reply = stub.Embed(request, timeout=30)
                assert not reply.cached and reply.dim == 32
    finally:
        node.stop()
