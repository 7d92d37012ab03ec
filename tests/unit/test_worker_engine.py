"""The worker's GenerationEngine: its KV budget, and the merge memory a prefill reserves.

A prefill that names the running batch it will merge into (`merge_into`) reserves the merged
batch's memory at once, so the merge at the next decode is never refused: several routers (or
chains) may fill a worker, and a refusal must come where the router can put the new rows back
in the queue (the prefill), never where it would have to stop a running batch (the merge).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.repository import model_spec
from services.common.types import Span
from services.worker.batch import Row, capacity_for
from services.worker.engine import GenerationEngine
from services.worker.stage import StageModel

MAX_NEW = 4


def rows(ids: list[int], length: int) -> list[Row]:
    return [Row(i, length, length + MAX_NEW) for i in ids]


def ids(count: int, width: int) -> torch.Tensor:
    return torch.arange(7, 7 + count * width, dtype=torch.int64).reshape(count, width) % 40 + 7


@pytest.fixture(scope="module")
def stage(tiny_repo: Path) -> StageModel:
    spec = model_spec(tiny_repo, "tiny-llama")
    return StageModel(spec, Span(0, spec.num_layers))


def test_a_prefill_reserves_its_merge_so_the_merge_is_never_refused(stage: StageModel) -> None:
    running = rows([1, 2], 3)  # two short rows: 2 x (3 + 4) slots
    joining = rows([3], 9)  # one long row: alone 1 x (9 + 4); merged, all three are as long
    alone = 2 * capacity_for(running, 3) + 1 * capacity_for(joining, 9)
    merged = 3 * capacity_for([*running, *joining], 9)
    assert merged > alone

    # A budget between the two: without a reservation the prefill fits, the merge would not.
    engine = GenerationEngine(stage, budget_tokens=alone, max_rows=8, idle_s=60)
    engine.prefill("run", rows([1, 2], 3), ids(2, 3))
    engine.prefill("new", rows([3], 9), ids(1, 9))  # no merge named: accepted ...
    with pytest.raises(ResourceExhausted, match="KV budget"):
        engine.decode(["run", "new"], torch.tensor([5, 6, 7]))  # ... and its merge refused
    engine.clear(["new"])

    # Naming the merge: refused at the prefill (rows wait in the router's queue) instead.
    with pytest.raises(ResourceExhausted, match="KV budget"):
        engine.prefill("new2", rows([3], 9), ids(1, 9), merge_into="run")
    assert set(engine.batches) == {"run"} and engine.reserved == {}

    # With room for the merge, the prefill holds it until the merge, which then never fails.
    roomy = GenerationEngine(stage, budget_tokens=merged, max_rows=8, idle_s=60)
    roomy.prefill("run", rows([1, 2], 3), ids(2, 3))
    roomy.prefill("new", rows([3], 9), ids(1, 9), merge_into="run")
    assert roomy.kv_tokens == merged  # own slots + the reservation: the merged batch's size
    with pytest.raises(ResourceExhausted):  # nothing else fits in the reserved room meanwhile
        roomy.prefill("late", rows([9], 3), ids(1, 3))
    out = roomy.decode(["run", "new"], torch.tensor([5, 6, 7]))
    assert out.tokens is not None and len(out.tokens) == 3
    assert roomy.reserved == {} and roomy.kv_tokens == merged


def test_a_cleared_batch_gives_back_its_reservation(stage: StageModel) -> None:
    engine = GenerationEngine(stage, budget_tokens=10_000, max_rows=8, idle_s=60)
    engine.prefill("run", rows([1, 2], 3), ids(2, 3))
    engine.prefill("new", rows([3], 9), ids(1, 9), merge_into="run")
    assert engine.reserved["new"] > 0
    engine.clear(["new"])
    assert engine.reserved == {}
    assert engine.kv_tokens == engine.batches["run"].kv_tokens


def test_a_merge_stays_reserved_while_the_running_batch_takes_a_few_steps(
    stage: StageModel,
) -> None:
    """On a chain, the running batch may decode on this stage between the new rows' prefill and
    their merge (steps already in flight): each step widens the merged batch, and the
    reservation covers them, so the merge is still not refused on a stage that is full."""
    engine = GenerationEngine(stage, budget_tokens=10_000, max_rows=8, idle_s=60)
    engine.prefill("run", rows([1, 2], 9), ids(2, 9))
    engine.prefill("new", rows([3], 3), ids(1, 3), merge_into="run")
    # Nothing more fits: the budget is exactly what the two batches and the reservation hold.
    engine.budget_tokens = engine.kv_tokens
    for token in (5, 6):  # two steps of the running batch before the merge
        engine.decode(["run"], torch.tensor([token, token]))
    out = engine.decode(["run", "new"], torch.tensor([5, 6, 7]))
    assert out.tokens is not None and len(out.tokens) == 3
    assert engine.kv_tokens <= engine.budget_tokens


# -- chunked prefill ------------------------------------------------------------------------------

PROMPTS = [[5, 9, 12, 7, 30, 8, 11, 21, 14, 6, 19], [8, 3, 17, 25], [33, 4, 9, 10, 2, 28, 15]]


def _greedy(stages: list[StageModel], chunk: int, steps: int) -> list[list[int]]:
    """Each prompt's greedy tokens through a chain of engines, its prompts prefilled `chunk`
    columns at a time (one pass when chunk is 0)."""
    engines = [GenerationEngine(s, budget_tokens=10_000, max_rows=8, idle_s=60) for s in stages]
    width = max(len(p) for p in PROMPTS)
    padded = torch.zeros(len(PROMPTS), width, dtype=torch.int64)
    for index, prompt in enumerate(PROMPTS):
        padded[index, width - len(prompt) :] = torch.tensor(prompt)
    starts = range(0, width, chunk) if chunk else [0]
    for start in starts:
        end = min(start + chunk, width) if chunk else width
        x: torch.Tensor | None = padded[:, start:end]
        for engine in engines:
            mine = [Row(i, len(p), len(p) + steps + 1) for i, p in enumerate(PROMPTS)]
            assert x is not None
            out = engine.prefill("b", mine, x, start=start, width=width, more=end < width)
            x = out.hidden
    assert out.tokens is not None
    tokens, found = out.tokens, [[t] for t in out.tokens]
    for _ in range(steps):
        x = torch.tensor(tokens)
        for engine in engines:
            assert x is not None
            out = engine.decode(["b"], x)
            x = out.hidden
        assert out.tokens is not None
        tokens = out.tokens
        for row, token in zip(found, tokens, strict=True):
            row.append(token)
    return found


def test_a_chunked_prefill_gives_transformers_greedy_tokens(tiny_repo: Path) -> None:
    from transformers import AutoModelForCausalLM

    spec = model_spec(tiny_repo, "tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=torch.float32).eval()
    want = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            out = model.generate(ids, max_new_tokens=7, do_sample=False, pad_token_id=0)
            want.append(out[0, len(prompt) :].tolist())
    chain = [StageModel(spec, Span(0, 1)), StageModel(spec, Span(1, 4))]
    for chunk in (0, 3, 4, 10):  # one pass; chunks that split rows' prompts in different places
        assert _greedy(chain, chunk, 6) == want, chunk


def test_a_chunked_batch_cannot_decode_or_skip_columns_before_its_last_chunk(
    stage: StageModel,
) -> None:
    engine = GenerationEngine(stage, budget_tokens=10_000, max_rows=8, idle_s=60)
    engine.prefill("b", rows([1, 2], 9), ids(2, 9)[:, :4], width=9, more=True)
    with pytest.raises(InvalidArgument, match="unfinished"):
        engine.decode(["b"], torch.tensor([5, 6]))
    with pytest.raises(InvalidArgument, match="does not continue"):
        engine.prefill("b", rows([1, 2], 9), ids(2, 9)[:, 5:], start=5, width=9)
    with pytest.raises(InvalidArgument, match="does not continue"):
        engine.prefill("b", rows([2, 1], 9), ids(2, 9)[:, 4:], start=4, width=9)
    with pytest.raises(InvalidArgument, match="does not fit"):
        engine.prefill("b", rows([1, 2], 9), ids(2, 9)[:, 4:], start=4, width=9, more=True)
    with pytest.raises(InvalidArgument, match="does not fit"):  # short of the width, yet last
        engine.prefill("b", rows([1, 2], 9), ids(2, 9)[:, 4:6], start=4, width=9)
    last = engine.prefill("b", rows([1, 2], 9), ids(2, 9)[:, 4:], start=4, width=9)
    assert last.tokens is not None and len(last.tokens) == 2
    assert engine.decode(["b"], torch.tensor(last.tokens)).tokens is not None
    # A chunk never extends a batch that is already decoding.
    with pytest.raises(InvalidArgument, match="does not continue"):
        engine.prefill("b", rows([1, 2], 9), ids(2, 9)[:, :1], start=10, width=11)
