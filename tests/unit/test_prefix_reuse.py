"""Prefix reuse on the worker: a prompt that starts like one prefilled before takes the KV blocks of
that start from the stage's PrefixStore and runs only the rest, on every stage of a chain.

Measured against transformers' own greedy `generate` on each prompt alone (never against
Tessera's path without reuse), and each stage must really have reused (its counter rises).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from services.common.errors import InvalidArgument, PrefixMissing
from services.common.prefix import BLOCK_TOKENS, block_hashes, reusable_blocks
from services.common.repository import model_spec
from services.common.types import Span
from services.worker.batch import Row
from services.worker.engine import GenerationEngine, StepOutput
from services.worker.prefix import PrefixStore
from services.worker.stage import StageModel

STEPS = 5
VOCAB_LOW, VOCAB_HIGH = 7, 40


def _prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(length)]


def _reference(path: Path, prompts: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    found = []
    with torch.no_grad():
        for prompt in prompts:
            out = model.generate(
                torch.tensor([prompt]), max_new_tokens=STEPS + 1, do_sample=False, pad_token_id=0
            )
            found.append(out[0, len(prompt) :].tolist())
    return found


def _engines(stages: list[StageModel], budget: int = 100_000) -> list[GenerationEngine]:
    return [
        GenerationEngine(
            s,
            budget_tokens=budget,
            max_rows=8,
            idle_s=60,
            prefixes=PrefixStore(f"fp|{s.span}|float32"),
        )
        for s in stages
    ]


def _run(
    engines: list[GenerationEngine], batch_id: str, prompts: list[list[int]], start: int = 0
) -> list[list[int]]:
    """Greedy tokens of a batch through the chain: a prefill (from cached prefixes when
    `start` > 0, its input only the columns from `start`), then STEPS decode steps."""
    width = max(len(p) for p in prompts)
    padded = torch.zeros(len(prompts), width, dtype=torch.int64)
    for index, prompt in enumerate(prompts):
        padded[index, width - len(prompt) :] = torch.tensor(prompt)
    x: torch.Tensor | None = padded[:, start:]
    out: StepOutput | None = None
    for engine in engines:
        rows = [Row(i, len(p), len(p) + STEPS + 1, tokens=list(p)) for i, p in enumerate(prompts)]
        assert x is not None
        out = engine.prefill(
            batch_id,
            rows,
            x,
            start=start,
            width=width if start else 0,
            from_prefix=bool(start),
            input_dtype="ids" if engine.stage.is_first else "float32",
        )
        x = out.hidden
    assert out is not None and out.tokens is not None
    tokens, found = out.tokens, [[t] for t in out.tokens]
    for _ in range(STEPS):
        x = torch.tensor(tokens)
        for engine in engines:
            out = engine.decode([batch_id], x)
            x = out.hidden
        assert out.tokens is not None
        tokens = out.tokens
        for row, token in zip(found, tokens, strict=True):
            row.append(token)
    for engine in engines:
        engine.clear([batch_id])
    return found


def _start(prompts: list[list[int]], matched: list[int]) -> int:
    """The first column every row can start from, given each row's matched cached tokens."""
    width = max(len(p) for p in prompts)
    return min(width - len(p) + m for p, m in zip(prompts, matched, strict=True))


@pytest.mark.parametrize(
    ("model", "cuts"),
    [("tiny-llama", [4]), ("tiny-llama", [1, 4]), ("tiny-llama", [1, 2, 4]), ("tiny-gpt2", [2, 4])],
    ids=["llama-1-stage", "llama-2-stages", "llama-3-stages", "gpt2-2-stages"],
)
def test_a_prompt_that_starts_like_an_earlier_one_reuses_its_blocks_and_answers_the_same(
    tiny_repo: Path, model: str, cuts: list[int]
) -> None:
    spec = model_spec(tiny_repo, model)
    stages = [StageModel(spec, Span(a, b)) for a, b in zip([0, *cuts[:-1]], cuts, strict=True)]
    rng = random.Random(7)
    system = _prompt(rng, 2 * BLOCK_TOKENS + 5)  # two whole blocks and a few tokens more
    first = system + _prompt(rng, 9)
    second = system + _prompt(rng, 13)  # shares 69 tokens with `first`: two whole blocks
    stranger = _prompt(rng, 20)  # nothing in common, shorter than the shared part
    want = _reference(spec.path, [first, second, stranger])

    engines = _engines(stages)
    assert _run(engines, "turn-1", [first]) == want[:1]
    assert all(e.reused_tokens == 0 for e in engines)
    assert all(e.prefixes.tokens == 2 * BLOCK_TOKENS for e in engines)

    # Alone: the second prompt runs only its columns after the two cached blocks.
    alone = _start([second], [2 * BLOCK_TOKENS])
    assert alone == 2 * BLOCK_TOKENS
    assert _run(engines, "turn-2", [second], alone) == [want[1]]
    assert all(e.reused_tokens == 2 * BLOCK_TOKENS for e in engines)

    # Beside a stranger whose prompt starts later: the batch starts where the stranger's
    # prompt does, and the second prompt reuses everything before that column.
    start = _start([second, stranger], [2 * BLOCK_TOKENS, 0])
    reused = start  # the second prompt is the widest: its first token sits at column 0
    assert 0 < start < 2 * BLOCK_TOKENS
    assert _run(engines, "turn-3", [second, stranger], start) == [want[1], want[2]]
    assert all(e.reused_tokens == 2 * BLOCK_TOKENS + reused for e in engines)


def test_blocks_are_keyed_by_what_made_them(tiny_repo: Path) -> None:
    """A block is read only by the same weights, span, precision and input wire: a later stage
    whose input arrives as bfloat16 does not read what float32 input made, and another
    version's store (another fingerprint) shares no key."""
    spec = model_spec(tiny_repo, "tiny-llama")
    rng = random.Random(3)
    prompt = _prompt(rng, BLOCK_TOKENS + 3)
    store = PrefixStore("fp-a|0:4|float32")
    hashes = block_hashes(prompt)
    assert store.keys("float32", hashes) != store.keys("bfloat16", hashes)
    assert store.keys("float32", hashes) != PrefixStore("fp-b|0:4|float32").keys("float32", hashes)
    assert len(hashes) == 1 and reusable_blocks(len(prompt)) == 1
    assert reusable_blocks(BLOCK_TOKENS) == 0  # the last token always runs: no whole block left

    engines = _engines([StageModel(spec, Span(0, 2)), StageModel(spec, Span(2, 4))])
    _run(engines, "a", [prompt])
    later = engines[1]
    hidden = torch.zeros(1, 3, spec.hidden_size)
    row = [Row(1, len(prompt), len(prompt) + 2, tokens=prompt)]
    with pytest.raises(PrefixMissing):
        later.prefill(
            "b",
            row,
            hidden,
            start=BLOCK_TOKENS,
            width=len(prompt),
            from_prefix=True,
            input_dtype="bfloat16",
        )
    assert "b" not in later.batches


def test_a_missing_or_malformed_prefix_is_refused_before_anything_is_held(
    tiny_repo: Path,
) -> None:
    spec = model_spec(tiny_repo, "tiny-llama")
    engine = _engines([StageModel(spec, Span(0, 4))])[0]
    rng = random.Random(5)
    prompt = _prompt(rng, 2 * BLOCK_TOKENS + 1)
    ids = torch.tensor([prompt])
    row = [Row(1, len(prompt), len(prompt) + 2, tokens=prompt)]
    with pytest.raises(PrefixMissing, match="not held"):  # nothing prefilled yet
        engine.prefill("x", row, ids[:, 32:], start=32, width=len(prompt), from_prefix=True)
    engine.prefill("a", row, ids)
    engine.clear(["a"])
    with pytest.raises(InvalidArgument, match="all but the last"):  # the last token must run
        engine.prefill(
            "x",
            row,
            ids[:, len(prompt) :],
            start=len(prompt),
            width=len(prompt),
            from_prefix=True,
        )
    tokenless = [Row(1, len(prompt), len(prompt) + 2)]
    with pytest.raises(InvalidArgument, match="tokens"):
        engine.prefill("x", tokenless, ids[:, 32:], start=32, width=len(prompt), from_prefix=True)
    wrong = [Row(1, len(prompt), len(prompt) + 2, tokens=prompt[:-1])]
    with pytest.raises(InvalidArgument, match="tokens"):
        engine.prefill("x", wrong, ids[:, 32:], start=32, width=len(prompt), from_prefix=True)
    assert engine.batches == {} and engine.kv_tokens == 0
    assert engine.prefill("y", row, ids[:, 32:], start=32, width=len(prompt), from_prefix=True)


def test_cached_prefixes_give_way_to_live_batches(tiny_repo: Path) -> None:
    """The store keeps only what the batches leave of the budget: a batch that needs the room
    evicts it (least recently used first) instead of being refused, and a prompt's new blocks
    push out older prompts' blocks, never its own."""
    spec = model_spec(tiny_repo, "tiny-llama")
    rng = random.Random(11)
    first, second = _prompt(rng, 3 * BLOCK_TOKENS), _prompt(rng, 4 * BLOCK_TOKENS)
    budget = 3 * BLOCK_TOKENS + STEPS + 1 + 2 * BLOCK_TOKENS  # the first batch and two blocks
    engine = _engines([StageModel(spec, Span(0, 4))], budget)[0]
    _run([engine], "a", [first])
    first_keys = engine.prefixes.keys("ids", block_hashes(first))
    assert engine.prefixes.tokens == 2 * BLOCK_TOKENS  # what the batch left: 2 of its 3 blocks
    assert engine.prefixes.held(first_keys) == 2
    # The second batch needs one block more than the batches leave: accepted, and the oldest
    # cached block goes (the first prompt's first block, so none of it is reusable now).
    _run([engine], "b", [second])
    assert engine.kv_tokens == 0
    assert engine.prefixes.held(first_keys) == 0
    second_keys = engine.prefixes.keys("ids", block_hashes(second))
    assert engine.prefixes.held(second_keys) == 1  # its own first block, in the room left
    assert engine.prefixes.tokens == BLOCK_TOKENS
