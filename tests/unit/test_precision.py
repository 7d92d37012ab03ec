"""Worker precision: bfloat16 and int8 stages, against float32 references (no sockets).

Fast tier (tiny models): a reduced precision swaps the Linear layers only, hidden states stay
float32 in and out, and a chain at a reduced precision gives exactly what the unsplit model at
that precision gives (the chain stays exact; only the arithmetic inside a layer changed).

Slow tier (the real models), accuracy against independent float32 references:
- MiniLM: cosine to sentence-transformers' float32 embeddings, per text: >= 0.9999 for bfloat16;
  int8's is printed and held to a bound set for the per-tensor int8 it replaced (0.91 min on
  these texts; per-row int8 measured 0.997 at worst on 16 other texts).
- SmolLM2: greedy tokens against transformers' float32 `generate`, printed per prompt for both
  precisions, and teacher-forced top-1 agreement along the float32 continuation (bfloat16: equal
  for the first 10+ tokens of every prompt, 0.99 teacher-forced; int8: diverges within 0-5
  tokens, 0.47 teacher-forced).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from services.common.repository import model_spec
from services.common.types import Span
from services.worker.precision import Bf16Linear, Int8Linear
from services.worker.service import mean_pool
from services.worker.stage import StageModel

ARCHS = ("llama", "gpt2", "bert", "roberta")
REDUCED = ("bfloat16", "int8")


def _linears(stage: StageModel) -> list[torch.nn.Module]:
    modules = [*stage._base.modules(), *([stage.lm_head] if stage.lm_head is not None else [])]
    return [m for m in modules if isinstance(m, (torch.nn.Linear, Conv1D))]


def _run(chain: list[StageModel], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    hidden = chain[0].forward(input_ids=ids, attention_mask=mask)
    for stage in chain[1:]:
        assert hidden.dtype == torch.float32  # the wire between stages stays float32
        hidden = stage.forward(hidden_states=hidden, attention_mask=mask)
    return hidden


@pytest.mark.parametrize("precision", REDUCED)
@pytest.mark.parametrize("arch", ARCHS)
def test_a_reduced_precision_chain_equals_its_unsplit_model(
    tiny_repo: Path, arch: str, precision: str
) -> None:
    spec = model_spec(tiny_repo, f"tiny-{arch}")
    ids = torch.tensor([[2, 7, 8, 9, 10, 3], [2, 11, 12, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    replica = StageModel(spec, Span(0, 4), precision=precision)
    chain = [StageModel(spec, s, precision=precision) for s in (Span(0, 1), Span(1, 3), Span(3, 4))]
    whole = _run([replica], ids, mask)
    assert whole.dtype == torch.float32
    assert torch.equal(_run(chain, ids, mask), whole)
    exact = _run([StageModel(spec, Span(0, 4))], ids, mask)
    assert not torch.equal(whole, exact)  # the precision really changed the arithmetic
    cosine = torch.nn.functional.cosine_similarity(whole[mask.bool()], exact[mask.bool()], dim=-1)
    assert float(cosine.min()) > 0.99, f"{arch} {precision}: cosine {float(cosine.min())}"


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_holds_bf16_linear_weights_and_nothing_else_in_bf16(
    tiny_repo: Path, arch: str
) -> None:
    spec = model_spec(tiny_repo, f"tiny-{arch}")
    stage = StageModel(spec, Span(0, 4), precision="bfloat16")
    assert _linears(stage) == []  # every Linear (and GPT-2 Conv1D) was swapped
    swapped = [m for m in stage._base.modules() if isinstance(m, Bf16Linear)]
    assert swapped and all(m.weight.dtype == torch.bfloat16 for m in swapped)
    others = [
        p
        for m in stage._base.modules()
        if not isinstance(m, Bf16Linear)
        for p in m.parameters(recurse=False)
    ]
    assert others and all(p.dtype == torch.float32 for p in others)
    assert stage.kv_bytes_per_token == StageModel(spec, Span(0, 4)).kv_bytes_per_token


# Linear layers per tiny layer: Llama q, k, v, o + 3 MLP; GPT-2 c_attn, c_proj + 2 MLP (Conv1D);
# BERT/RoBERTa q, k, v, attention output + intermediate + output.
LINEARS_PER_LAYER = {"llama": 7, "gpt2": 4, "bert": 6, "roberta": 6}


@pytest.mark.parametrize("arch", ARCHS)
def test_int8_quantizes_every_linear(tiny_repo: Path, arch: str) -> None:
    stage = StageModel(model_spec(tiny_repo, f"tiny-{arch}"), Span(0, 4), precision="int8")
    assert _linears(stage) == []
    quantized = [m for m in stage._base.modules() if isinstance(m, Int8Linear)]
    assert len(quantized) == 4 * LINEARS_PER_LAYER[arch]
    assert all(m.qweight_t.dtype == torch.int8 for m in quantized)
    if stage.lm_head is not None:
        assert isinstance(stage.lm_head, Int8Linear)
        logits = stage.logits(torch.zeros(1, stage.spec.hidden_size))
        assert logits.dtype == torch.float32


# -- against transformers' own model, cast the same way ------------------------------------------


def _bf16_linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    weight, bias = _weight_and_bias(module)
    out = torch.nn.functional.linear(x.to(torch.bfloat16), weight.to(torch.bfloat16)).float()
    return out if bias is None else out + bias


def _int8_linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-output-channel int8 weights, per-row int8 inputs, products summed in float64 (exact
    for these sizes): written from the definition, not from the worker's code."""
    weight, bias = _weight_and_bias(module)
    w_scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
    w = (weight / w_scale[:, None]).round().clamp(-127, 127).double()
    rows = x.reshape(-1, weight.shape[1])
    x_scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    q = (rows / x_scale).round().clamp(-127, 127).double()
    out = ((q @ w.t()).float() * x_scale * w_scale).reshape(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


def _weight_and_bias(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(module, Conv1D):  # GPT-2 keeps its weight as [in, out]
        return module.weight.t(), module.bias
    return module.weight, module.bias


def _cast_like(model: torch.nn.Module, linear: object) -> torch.nn.Module:
    """transformers' model with every Linear (and Conv1D) computing through `linear`."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            module.forward = linear.__get__(module)  # type: ignore[attr-defined, method-assign]
    return model


@pytest.mark.parametrize("precision", REDUCED)
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_a_reduced_precision_equals_transformers_cast_the_same_way(
    tiny_repo: Path, arch: str, precision: str
) -> None:
    from transformers import AutoModel

    spec = model_spec(tiny_repo, f"tiny-{arch}")
    ids = torch.tensor([[2, 7, 8, 9, 10, 3], [2, 11, 12, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    loader = AutoModelForCausalLM if arch == "llama" else AutoModel
    model = loader.from_pretrained(spec.path, dtype=torch.float32).eval()
    base = model.base_model if arch == "llama" else model
    _cast_like(base, _bf16_linear if precision == "bfloat16" else _int8_linear)
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=mask).last_hidden_state
    got = _run([StageModel(spec, Span(0, 4), precision=precision)], ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-4)


# -- an answer does not depend on the batch ------------------------------------------------------

BATCH_TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-3, "int8": 1e-3}


@pytest.mark.parametrize("precision", ["float32", *REDUCED])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_a_rows_answer_does_not_depend_on_the_rows_beside_it(
    tiny_repo: Path, arch: str, precision: str
) -> None:
    """One text alone, then beside 15 others of its length in one pass: its answer holds
    (float32 1e-5, reduced precision 1e-3)."""
    spec = model_spec(tiny_repo, f"tiny-{arch}")
    stage = StageModel(spec, Span(0, 4), precision=precision)
    generator = torch.Generator().manual_seed(7)
    batch = torch.randint(7, 40, (16, 9), generator=generator)
    mask = torch.ones_like(batch)
    alone = stage.forward(input_ids=batch[:1], attention_mask=mask[:1])
    together = stage.forward(input_ids=batch, attention_mask=mask)
    torch.testing.assert_close(together[:1], alone, rtol=0, atol=BATCH_TOLERANCE[precision])


def test_an_unknown_precision_is_refused(tiny_repo: Path) -> None:
    with pytest.raises(ValueError, match="precision"):
        StageModel(model_spec(tiny_repo, "tiny-llama"), Span(0, 4), precision="float16")


# -- real models (slow) ----------------------------------------------------------------------

EMBED_TEXTS = [
    "the cat sat on the mat",
    "hello world",
    "What is the capital of France?",
    "A man is playing a guitar on stage.",
    "Quantum field theory unifies special relativity and quantum mechanics.",
    "naïve café résumé — ünïcödé ✓ 東京",
    "!!!",
    "",
    "word " * 300,  # past max_seq_length: truncated
    *[
        f"sentence number {i} about the weather, cats, {'long ' * (i % 20)}and embeddings"
        for i in range(8)
    ],
]
GEN_PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "List three primary colors:",
]
NEW_TOKENS = 24
INT8_COSINE_BOUND = 0.89  # measured min 0.913 (per-channel qint8, this CPU)


@pytest.fixture(scope="module")
def minilm_reference(real_repo: Path) -> np.ndarray:
    import sentence_transformers

    encoder = sentence_transformers.SentenceTransformer(
        str(real_repo / "all-minilm-l6-v2"), device="cpu"
    )
    return encoder.encode(EMBED_TEXTS, normalize_embeddings=True, convert_to_numpy=True)


def _embed(real_repo: Path, precision: str) -> np.ndarray:
    spec = model_spec(real_repo, "all-minilm-l6-v2")
    tok = AutoTokenizer.from_pretrained(spec.path)
    enc = tok(EMBED_TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    # Two stages, so the reduced precision is checked across a chain too.
    chain = [StageModel(spec, s, precision=precision) for s in (Span(0, 3), Span(3, 6))]
    return mean_pool(_run(chain, enc["input_ids"], enc["attention_mask"]), enc["attention_mask"])


def _cosines(vectors: torch.Tensor, reference: np.ndarray) -> np.ndarray:
    v = vectors.double().numpy()
    r = reference.astype(np.float64)
    return (v * r).sum(1) / (np.linalg.norm(v, axis=1) * np.linalg.norm(r, axis=1))


@pytest.mark.slow
def test_minilm_float32_equals_sentence_transformers(
    real_repo: Path, minilm_reference: np.ndarray
) -> None:
    vectors = _embed(real_repo, "float32")
    np.testing.assert_allclose(vectors.numpy(), minilm_reference, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_minilm_bfloat16_cosine_to_float32_on_every_text(
    real_repo: Path, minilm_reference: np.ndarray
) -> None:
    cosines = _cosines(_embed(real_repo, "bfloat16"), minilm_reference)
    print(f"\nMiniLM bfloat16 cosine to float32: min {cosines.min():.6f} mean {cosines.mean():.6f}")
    assert cosines.min() >= 0.9999, dict(zip(EMBED_TEXTS, cosines.round(6), strict=True))


@pytest.mark.slow
def test_minilm_int8_cosine_to_float32(real_repo: Path, minilm_reference: np.ndarray) -> None:
    cosines = _cosines(_embed(real_repo, "int8"), minilm_reference)
    print(f"\nMiniLM int8 cosine to float32: min {cosines.min():.6f} mean {cosines.mean():.6f}")
    assert cosines.min() >= INT8_COSINE_BOUND


@pytest.fixture(scope="module")
def smollm2(real_repo: Path) -> tuple[Path, AutoTokenizer, dict[str, list[int]], torch.nn.Module]:
    path = real_repo / "smollm2-135m-instruct"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    expected = {}
    for prompt in GEN_PROMPTS:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                # No end of sequence: generate would mask it out until min_new_tokens, while the
                # chain below takes the argmax as it is.
                eos_token_id=None,
                pad_token_id=tok.eos_token_id,
            )
        expected[prompt] = out[0, ids.shape[1] :].tolist()
    return path, tok, expected, model


def _greedy(chain: list[StageModel], ids: torch.Tensor, steps: int) -> list[int]:
    caches = [stage.new_cache() for stage in chain]
    feed, tokens = ids, []
    for _ in range(steps):
        hidden = chain[0].forward(input_ids=feed, cache=caches[0])
        for stage, kv in zip(chain[1:], caches[1:], strict=True):
            hidden = stage.forward(hidden_states=hidden, cache=kv)
        tokens.append(int(chain[-1].logits(hidden[:, -1]).argmax(-1)))
        feed = torch.tensor([[tokens[-1]]])
    return tokens


def _teacher_forced(chain: list[StageModel], ids: torch.Tensor, continuation: list[int]) -> float:
    """Share of positions where the chain's top-1 is float32's next token, fed float32's text."""
    full = torch.cat([ids, torch.tensor([continuation[:-1]])], dim=1)
    hidden = chain[0].forward(input_ids=full)
    for stage in chain[1:]:
        hidden = stage.forward(hidden_states=hidden)
    top = chain[-1].logits(hidden[0, ids.shape[1] - 1 :]).argmax(-1).tolist()
    return sum(a == b for a, b in zip(top, continuation, strict=True)) / len(continuation)


def _agreement(real_repo: Path, smollm2: tuple, precision: str) -> tuple[list[int], list[float]]:
    path, tok, expected, _ = smollm2
    spec = model_spec(real_repo, "smollm2-135m-instruct")
    chain = [StageModel(spec, s, precision=precision) for s in (Span(0, 15), Span(15, 30))]
    first_divergence, forced = [], []
    for prompt in GEN_PROMPTS:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        got = _greedy(chain, ids, NEW_TOKENS)
        want = expected[prompt]
        first_divergence.append(
            next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), NEW_TOKENS)
        )
        forced.append(_teacher_forced(chain, ids, want))
    print(
        f"\nSmolLM2 {precision}: greedy tokens equal to float32 before the first difference "
        f"(of {NEW_TOKENS}): {first_divergence}; teacher-forced top-1 agreement: "
        f"{[round(f, 3) for f in forced]} (mean {sum(forced) / len(forced):.3f})"
    )
    return first_divergence, forced


@pytest.mark.slow
def test_smollm2_float32_chain_gives_generates_tokens(real_repo: Path, smollm2: tuple) -> None:
    first, forced = _agreement(real_repo, smollm2, "float32")
    assert first == [NEW_TOKENS] * len(GEN_PROMPTS) and forced == [1.0] * len(GEN_PROMPTS)


@pytest.mark.slow
def test_smollm2_bfloat16_greedy_agreement(real_repo: Path, smollm2: tuple) -> None:
    # Measured on this CPU: first differences [24, 10, 24, 16, 24]; teacher-forced top-1
    # agreement [1.0, 1.0, 1.0, 0.958, 1.0].
    first, forced = _agreement(real_repo, smollm2, "bfloat16")
    assert min(first) >= 8
    assert sum(forced) / len(forced) >= 0.9


@pytest.mark.slow
def test_smollm2_int8_greedy_agreement(real_repo: Path, smollm2: tuple) -> None:
    # Dynamic int8 (per-channel qint8 weights, 7-bit activations on x86) drifts within a few
    # tokens: measured first differences [5, 2, 0, 3, 0], teacher-forced top-1 agreement
    # 0.29-0.63 per prompt (mean 0.47). The bound holds int8 to what was measured, with margin.
    _, forced = _agreement(real_repo, smollm2, "int8")
    assert sum(forced) / len(forced) >= 0.35
