"""StageBatch (a generation batch held on stages) against the unsplit transformers model.

Rows of different lengths are prefilled together (left-padded), stepped, merged with a batch
prefilled later and filtered; at every step each row's logits must equal the unsplit model's
logits for that row's whole sequence (fp32, within 1e-5), for one stage and for two.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.common.repository import model_spec
from services.common.types import Span
from services.worker.batch import Row, StageBatch
from services.worker.stage import StageModel

FIRST = [[7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18, 19, 20]]
LATER = [[21, 22, 23], [24]]
STEPS = 6


def left_pad(rows: list[list[int]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.zeros(len(rows), width, dtype=torch.int64)
    for i, row in enumerate(rows):
        out[i, width - len(row) :] = torch.tensor(row)
    return out


class Chain:
    """The stages of one split and a batch on each, stepped together."""

    def __init__(self, stages: list[StageModel]) -> None:
        self.stages = stages

    def prefill(self, batch_id: str, sequences: list[list[int]], ids: list[int]) -> tuple:
        hidden = left_pad(sequences)
        batches = []
        for stage in self.stages:
            rows = [Row(i, len(s), len(s) + STEPS + 4) for i, s in zip(ids, sequences)]
            batch, hidden = StageBatch.prefill(stage, batch_id, rows, hidden)
            batches.append(batch)
        return batches, self.stages[-1].logits(hidden[:, -1])

    def decode(self, batches: list[StageBatch], tokens: list[int]) -> torch.Tensor:
        hidden = torch.tensor(tokens)
        for stage, batch in zip(self.stages, batches, strict=True):
            hidden = batch.decode(stage, hidden)
        return self.stages[-1].logits(hidden[:, -1])


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("cuts", [[], [2], [1, 3]])
def test_batched_steps_equal_the_unsplit_model(
    tiny_repo: Path, model: str, cuts: list[int]
) -> None:
    spec = model_spec(tiny_repo, model)
    bounds = [0, *cuts, spec.num_layers]
    chain = Chain([StageModel(spec, Span(a, b)) for a, b in zip(bounds, bounds[1:])])
    reference = AutoModelForCausalLM.from_pretrained(spec.path).eval()

    def expected(sequence: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return reference(torch.tensor([sequence])).logits[0, -1]

    sequences = {i: list(s) for i, s in enumerate(FIRST)}
    batches, logits = chain.prefill("a", [sequences[i] for i in range(3)], [0, 1, 2])
    order = [0, 1, 2]
    for step in range(STEPS):
        for row, rid in enumerate(order):
            torch.testing.assert_close(logits[row], expected(sequences[rid]), rtol=0, atol=1e-5)
        tokens = [int(torch.argmax(logits[row])) for row in range(len(order))]
        for rid, token in zip(order, tokens, strict=True):
            sequences[rid].append(token)
        if step == 2:
            # A later batch joins: prefilled alone, merged into the running one at this step.
            for j, s in enumerate(LATER):
                sequences[10 + j] = list(s)
            later, first_logits = chain.prefill("b", LATER, [10, 11])
            for j in range(len(LATER)):
                torch.testing.assert_close(first_logits[j], expected(LATER[j]), rtol=0, atol=1e-5)
                sequences[10 + j].append(int(torch.argmax(first_logits[j])))
            batches = [StageBatch.concatenate([a, b]) for a, b in zip(batches, later, strict=True)]
            order += [10, 11]
            tokens += [sequences[10][-1], sequences[11][-1]]
        if step == 4:
            # Rows 1 (short) and 2 (the longest) leave: the cache is re-laid without them.
            keep = [0, 10, 11]
            kept_tokens = [tokens[order.index(r)] for r in keep]
            batches = [b.filter(keep) for b in batches]
            order, tokens = keep, kept_tokens
            assert all(b.cache.length == max(len(sequences[r]) for r in keep) - 1 for b in batches)
        logits = chain.decode(batches, tokens)
        assert all(b.kv_tokens == len(order) * b.cache.capacity for b in batches)
