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

from services.common.errors import ResourceExhausted
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
