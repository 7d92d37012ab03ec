"""Exactness anchor: chains of StageModels against the unsplit transformers model (no sockets).

Splitting must not change answers: hidden states, sub-ranges, greedy tokens through per-stage
KV caches and pooled embeddings all match the reference for every tiny architecture, with the
stages loaded span-only (services/worker/loading.py). Also the worker's sampler
(services/worker/sampling.py).

What is bitwise and what is within 1e-5 (fp32, rtol=0):
- bitwise (torch.equal): the hidden states after every stage of a chain against the unsplit
  model's, right- and left-padded; every sub-range view. Same operations on the same shapes.
- within 1e-5: logits of greedy generation through stage caches against `generate`'s (its head
  runs on a [1, 1, H] slice, ours on [1, H]: a different kernel shape, ~1e-7 apart here); cached
  one-token steps against one uncached pass over the whole sequence (different shapes); pooled
  embeddings against a float64 reference and against sentence-transformers; a text pooled alone
  against the same text in a padded batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import sentence_transformers
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from services.common.repository import ModelSpec, model_spec
from services.common.types import ModelKind, SamplingParams, Span
from services.worker.sampling import make_generator, sample
from services.worker.service import mean_pool
from services.worker.stage import StageModel

ARCHS = ("llama", "gpt2", "bert", "roberta")
CAUSAL = ("llama", "gpt2")
ENCODERS = ("bert", "roberta")
ATOL = 1e-5
TEXTS = [
    "the cat sat on the mat and the dog sat on it",
    "hello world",
    "what is the capital of france ?",
]
# Chains of 1, 2 and 3 stages over the 4 tiny layers, with uneven cuts.
CUTS: dict[int, tuple[tuple[int, ...], ...]] = {
    1: ((),),
    2: ((1,), (2,), (3,)),
    3: ((1, 2), (1, 3), (2, 3)),
}
GEN_PROMPTS = ["hello", "what is the capital of france ?"]
NEW_TOKENS = 16


# -- helpers ---------------------------------------------------------------------------------


def _spans(cuts: Sequence[int], num_layers: int) -> list[Span]:
    edges = [0, *cuts, num_layers]
    return [Span(a, b) for a, b in itertools.pairwise(edges)]


def _chain_params() -> list[tuple[str, tuple[int, ...]]]:
    return [(arch, cuts) for arch in ARCHS for n in (1, 2, 3) for cuts in CUTS[n]]


_stage_cache: dict[tuple[Path, Span], StageModel] = {}


def _stage(spec: ModelSpec, span: Span) -> StageModel:
    key = (spec.path, span)
    if key not in _stage_cache:
        _stage_cache[key] = StageModel(spec, span)
    return _stage_cache[key]


def _chain(spec: ModelSpec, cuts: Sequence[int]) -> list[StageModel]:
    return [_stage(spec, span) for span in _spans(cuts, spec.num_layers)]


@cache
def _reference(path: Path, causal: bool) -> torch.nn.Module:
    if causal:
        model = AutoModelForCausalLM.from_pretrained(path)
    else:
        model = AutoModel.from_pretrained(path, add_pooling_layer=False)
    return model.eval()


def _tokenizer(spec: ModelSpec, padding_side: str = "right") -> AutoTokenizer:
    tok = AutoTokenizer.from_pretrained(spec.path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def _batch(spec: ModelSpec, padding_side: str = "right") -> dict[str, torch.Tensor]:
    enc = _tokenizer(spec, padding_side)(TEXTS, padding=True, return_tensors="pt")
    # The batch really is padded: rows of different lengths.
    assert int(enc["attention_mask"].sum(1).min()) < enc["input_ids"].shape[1]
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _hf_hidden_states(spec: ModelSpec, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    model = _reference(spec.path, spec.kind is ModelKind.CAUSAL_LM)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    assert len(out.hidden_states) == spec.num_layers + 1
    return tuple(h.detach() for h in out.hidden_states)


def _run_chain(chain: Sequence[StageModel], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = None
    for stage in chain:
        if stage.is_first:
            hidden = stage.forward(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            )
        else:
            hidden = stage.forward(hidden_states=hidden, attention_mask=batch["attention_mask"])
    assert hidden is not None
    return hidden


def _spec(tiny_repo: Path, arch: str) -> ModelSpec:
    spec = model_spec(tiny_repo, f"tiny-{arch}")
    assert spec.model_type == arch
    assert spec.num_layers == 4
    return spec


# -- hidden states ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "cuts"),
    _chain_params(),
    ids=[
        f"{a}-{len(c) + 1}stages-{'-'.join(map(str, c)) or 'replica'}" for a, c in _chain_params()
    ],
)
def test_chain_hidden_states_equal_unsplit_model(
    tiny_repo: Path, arch: str, cuts: tuple[int, ...]
) -> None:
    spec = _spec(tiny_repo, arch)
    batch = _batch(spec)
    reference = _hf_hidden_states(spec, batch)
    chain = _chain(spec, cuts)
    hidden = None
    for stage in chain:
        if stage.is_first:
            hidden = stage.forward(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            )
        else:
            hidden = stage.forward(hidden_states=hidden, attention_mask=batch["attention_mask"])
        # Each stage boundary carries the reference's hidden state after that layer (the last
        # one is after the final norm, as transformers reports it), bit for bit.
        expected = reference[stage.span.end]
        assert hidden.shape == expected.shape
        assert hidden.dtype == expected.dtype == torch.float32
        diff = float((hidden - expected).abs().max())
        assert torch.equal(hidden, expected), f"{arch}: after stage {stage.span}, max diff {diff}"


@pytest.mark.parametrize("arch", CAUSAL)
def test_left_padded_batch_equals_unsplit_model(tiny_repo: Path, arch: str) -> None:
    """Generation-style left padding moves positions; a split chain must follow them too."""
    spec = _spec(tiny_repo, arch)
    batch = _batch(spec, padding_side="left")
    reference = _hf_hidden_states(spec, batch)
    hidden = _run_chain(_chain(spec, (1, 3)), batch)
    real = batch["attention_mask"].bool()
    assert torch.equal(hidden[real], reference[-1][real])


@pytest.mark.parametrize("arch", ARCHS)
def test_sub_range_equals_reference_layer(tiny_repo: Path, arch: str) -> None:
    """forward(sub=Span(a, b)) on a stage is the reference's hidden_states[b] (b < L: no norm)."""
    spec = _spec(tiny_repo, arch)
    batch = _batch(spec)
    reference = _hf_hidden_states(spec, batch)
    replica = _stage(spec, Span(0, spec.num_layers))
    later = _stage(spec, Span(1, spec.num_layers))
    checked = 0
    for a in range(spec.num_layers):
        for b in range(a + 1, spec.num_layers):
            if a == 0:
                out = replica.forward(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    sub=Span(0, b),
                )
            else:
                out = later.forward(
                    hidden_states=reference[a],
                    attention_mask=batch["attention_mask"],
                    sub=Span(a, b),
                )
            assert torch.equal(out, reference[b]), f"{arch}: sub-range {a}:{b}"
            checked += 1
    assert checked == 6
    # The sub-range views share the stage's weights and leave its full span untouched.
    full = replica.forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert torch.equal(full, reference[-1])


@pytest.mark.parametrize("arch", ARCHS)
def test_sub_range_outside_span_is_refused(tiny_repo: Path, arch: str) -> None:
    spec = _spec(tiny_repo, arch)
    stage = _stage(spec, Span(1, 3))
    hidden = torch.zeros(1, 3, spec.hidden_size)
    with pytest.raises(ValueError):
        stage.forward(hidden_states=hidden, sub=Span(0, 2))
    with pytest.raises(ValueError):
        stage.forward(hidden_states=hidden, sub=Span(2, 4))
    with pytest.raises(ValueError):
        stage.forward(input_ids=torch.ones(1, 3, dtype=torch.int64))  # layer 1 needs hidden


# -- greedy generation through per-stage KV caches -------------------------------------------


def _chain_generate_with_logits(
    chain: Sequence[StageModel], prompt: torch.Tensor, steps: int
) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding the way a session runs it: one KV cache per stage, one token per step."""
    caches = [stage.new_cache() for stage in chain]
    feed = prompt
    tokens: list[int] = []
    step_logits = []
    for _ in range(steps):
        hidden = None
        for stage, kv in zip(chain, caches, strict=True):
            if stage.is_first:
                hidden = stage.forward(input_ids=feed, cache=kv)
            else:
                hidden = stage.forward(hidden_states=hidden, cache=kv)
        assert hidden is not None
        logits = chain[-1].logits(hidden[:, -1])[0]
        step_logits.append(logits)
        token = int(torch.argmax(logits).item())
        tokens.append(token)
        feed = torch.tensor([[token]], dtype=torch.int64)
    # Each stage's cache holds exactly the tokens fed so far (prompt + all but the last).
    for kv in caches:
        assert kv.get_seq_length() == prompt.shape[1] + steps - 1
    return tokens, torch.stack(step_logits)


def _chain_generate(chain: Sequence[StageModel], prompt: torch.Tensor, steps: int) -> list[int]:
    return _chain_generate_with_logits(chain, prompt, steps)[0]


@cache
def _hf_generate_cached(
    path: Path, prompt: tuple[int, ...], steps: int
) -> tuple[tuple[int, ...], torch.Tensor]:
    model = _reference(path, causal=True)
    ids = torch.tensor([prompt], dtype=torch.int64)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=steps,
            min_new_tokens=steps,
            eos_token_id=None,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
        )
    generated = tuple(out.sequences[0, ids.shape[1] :].tolist())
    assert len(generated) == steps
    return generated, torch.stack([step[0] for step in out.logits])


def _hf_generate(spec: ModelSpec, prompt: torch.Tensor, steps: int) -> list[int]:
    return list(_hf_generate_cached(spec.path, tuple(prompt[0].tolist()), steps)[0])


@pytest.mark.parametrize("prompt_text", GEN_PROMPTS)
@pytest.mark.parametrize(
    ("arch", "cuts"), [(a, c) for a in CAUSAL for c in ((2,), (1,), (1, 3), (1, 2))]
)
def test_greedy_generation_through_stage_caches(
    tiny_repo: Path, arch: str, cuts: tuple[int, ...], prompt_text: str
) -> None:
    spec = _spec(tiny_repo, arch)
    prompt = _tokenizer(spec)(prompt_text, return_tensors="pt")["input_ids"]
    expected, expected_logits = _hf_generate_cached(
        spec.path, tuple(prompt[0].tolist()), NEW_TOKENS
    )
    tokens, logits = _chain_generate_with_logits(_chain(spec, cuts), prompt, NEW_TOKENS)
    assert tokens == list(expected)
    # Tokens alone are a weak check on a random tiny model (it likes repeating itself); the
    # logits of every step must match too.
    torch.testing.assert_close(logits, expected_logits.float(), rtol=0, atol=ATOL)


@pytest.mark.parametrize("arch", CAUSAL)
def test_sessions_do_not_leak_into_each_other(tiny_repo: Path, arch: str) -> None:
    """Fresh caches on the same stages replay the same tokens, after another prompt ran."""
    spec = _spec(tiny_repo, arch)
    chain = _chain(spec, (2,))
    tok = _tokenizer(spec)
    first = tok("the cat sat on", return_tensors="pt")["input_ids"]
    other = tok("hello world", return_tensors="pt")["input_ids"]
    expected = _hf_generate(spec, first, NEW_TOKENS)
    assert _chain_generate(chain, first, NEW_TOKENS) == expected
    assert _chain_generate(chain, other, 4) == _hf_generate(spec, other, 4)
    assert _chain_generate(chain, first, NEW_TOKENS) == expected


@pytest.mark.parametrize("arch", CAUSAL)
def test_cached_steps_equal_uncached_logits(tiny_repo: Path, arch: str) -> None:
    """The logits of each cached step equal the reference's logits over the whole sequence."""
    spec = _spec(tiny_repo, arch)
    ids = _tokenizer(spec)("the cat sat on the mat", return_tensors="pt")["input_ids"]
    model = _reference(spec.path, causal=True)
    with torch.no_grad():
        reference = model(ids).logits[0]
    chain = _chain(spec, (1, 3))
    caches = [stage.new_cache() for stage in chain]
    for position in range(ids.shape[1]):
        hidden = None
        for stage, kv in zip(chain, caches, strict=True):
            if stage.is_first:
                hidden = stage.forward(input_ids=ids[:, position : position + 1], cache=kv)
            else:
                hidden = stage.forward(hidden_states=hidden, cache=kv)
        logits = chain[-1].logits(hidden[:, -1])[0]
        torch.testing.assert_close(logits, reference[position], rtol=0, atol=ATOL)


def test_only_the_last_causal_stage_has_a_head(tiny_repo: Path) -> None:
    spec = _spec(tiny_repo, "llama")
    with pytest.raises(ValueError):
        _stage(spec, Span(0, 2)).logits(torch.zeros(1, spec.hidden_size))
    encoder = _stage(_spec(tiny_repo, "bert"), Span(0, 4))
    with pytest.raises(ValueError):
        encoder.logits(torch.zeros(1, 32))


# -- pooled embeddings -----------------------------------------------------------------------


def _reference_pool(hidden: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """Mean over real tokens then L2 normalisation, in float64 numpy."""
    h = hidden.double().numpy()
    m = mask.double().numpy()[..., None]
    mean = (h * m).sum(axis=1) / m.sum(axis=1)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


@pytest.mark.parametrize(("arch", "cuts"), [(a, c) for a in ARCHS for c in ((), (2,), (1, 3))])
def test_pooled_embeddings_equal_reference(
    tiny_repo: Path, arch: str, cuts: tuple[int, ...]
) -> None:
    spec = _spec(tiny_repo, arch)
    batch = _batch(spec)
    reference = _reference_pool(_hf_hidden_states(spec, batch)[-1], batch["attention_mask"])
    pooled = mean_pool(_run_chain(_chain(spec, cuts), batch), batch["attention_mask"])
    assert pooled.shape == (len(TEXTS), spec.hidden_size)
    np.testing.assert_allclose(pooled.numpy(), reference, rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.linalg.norm(pooled.numpy(), axis=1), 1.0, atol=1e-6)
    # Padding does not count: each row pooled alone gives the same vector.
    for row, text in enumerate(TEXTS):
        alone = _tokenizer(spec)([text], return_tensors="pt")
        single = mean_pool(_run_chain(_chain(spec, cuts), dict(alone)), alone["attention_mask"])
        np.testing.assert_allclose(single[0].numpy(), pooled[row].numpy(), rtol=0, atol=ATOL)


@pytest.mark.parametrize("arch", ENCODERS)
def test_pooled_embeddings_equal_sentence_transformers(tiny_repo: Path, arch: str) -> None:
    spec = _spec(tiny_repo, arch)
    encoder = sentence_transformers.SentenceTransformer(str(spec.path), device="cpu")
    names = [type(m).__name__ for m in encoder]
    assert "Pooling" in names
    expected = encoder.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    batch = _batch(spec)
    pooled = mean_pool(_run_chain(_chain(spec, (2,)), batch), batch["attention_mask"])
    np.testing.assert_allclose(pooled.numpy(), expected, rtol=0, atol=ATOL)


# -- sampling --------------------------------------------------------------------------------


def _draws(logits: torch.Tensor, params: SamplingParams, n: int) -> list[int]:
    generator = make_generator(params)
    return [sample(logits, params, generator) for _ in range(n)]


def _logits(seed: int, size: int = 64) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_and_needs_no_generator() -> None:
    params = SamplingParams()
    assert params.greedy and make_generator(params) is None
    for seed in range(20):
        logits = _logits(seed)
        assert sample(logits, params, None) == int(torch.argmax(logits))


def test_seeded_sampling_is_reproducible() -> None:
    logits = torch.zeros(50)
    for params in (
        SamplingParams(temperature=1.0, seed=7),
        SamplingParams(temperature=0.8, top_k=20, seed=7),
        SamplingParams(temperature=1.3, top_p=0.9, seed=123),
    ):
        first = _draws(logits, params, 40)
        assert first == _draws(logits, params, 40)
        assert len(set(first)) > 5  # really sampled, not collapsed to one token


@pytest.mark.parametrize("seed", range(10))
def test_top_k_one_is_greedy(seed: int) -> None:
    logits = _logits(seed)
    params = SamplingParams(temperature=2.0, top_k=1, seed=seed)
    assert set(_draws(logits, params, 30)) == {int(torch.argmax(logits))}


@pytest.mark.parametrize("seed", range(10))
def test_tiny_top_p_is_greedy(seed: int) -> None:
    logits = _logits(seed)
    params = SamplingParams(temperature=2.0, top_p=1e-6, seed=seed)
    assert set(_draws(logits, params, 30)) == {int(torch.argmax(logits))}


def test_top_k_and_top_p_keep_only_their_tokens() -> None:
    logits = _logits(3)
    top5 = set(torch.topk(logits, 5).indices.tolist())
    assert set(_draws(logits, SamplingParams(temperature=5.0, top_k=5, seed=1), 300)) <= top5
    probs = torch.softmax(logits, dim=-1)
    order = torch.argsort(probs, descending=True)
    # The smallest prefix of the sorted distribution whose mass reaches 0.5.
    mass = torch.cumsum(probs[order], 0)
    nucleus = set(order[: int((mass < 0.5).sum()) + 1].tolist())
    drawn = set(_draws(logits, SamplingParams(temperature=1.0, top_p=0.5, seed=2), 400))
    assert drawn <= nucleus
    assert len(drawn) >= min(2, len(nucleus))


def test_different_seeds_vary_over_a_flat_distribution() -> None:
    logits = torch.zeros(1000)
    runs = {tuple(_draws(logits, SamplingParams(temperature=1.0, seed=s), 10)) for s in range(8)}
    assert len(runs) == 8
    unseeded = {tuple(_draws(logits, SamplingParams(temperature=1.0), 10)) for _ in range(4)}
    assert len(unseeded) == 4


def test_sampling_follows_the_distribution() -> None:
    """Two tokens with probabilities 0.8 / 0.2: the empirical frequency is close."""
    logits = torch.full((10,), -1e9)
    logits[3], logits[7] = float(np.log(0.8)), float(np.log(0.2))
    draws = _draws(logits, SamplingParams(temperature=1.0, seed=0), 2000)
    assert set(draws) == {3, 7}
    assert abs(draws.count(3) / len(draws) - 0.8) < 0.04


def test_seeded_draw_depends_only_on_seed_and_position() -> None:
    """A generation resumed elsewhere (fresh generator) draws what it would have drawn."""
    logits = torch.zeros(1000)
    params = SamplingParams(temperature=1.0, seed=42)
    generator = make_generator(params)
    in_order = [sample(logits, params, generator, position=p) for p in range(20)]
    resumed = [sample(logits, params, make_generator(params), position=p) for p in range(10, 20)]
    assert resumed == in_order[10:]
    assert len(set(in_order)) > 10  # positions do not all draw the same token
    other = SamplingParams(temperature=1.0, seed=43)
    assert [sample(logits, other, make_generator(other), position=p) for p in range(20)] != in_order
