"""The in-process limits: the same models through plain `transformers` in this process, no gRPC.

- Embed: `AutoModel` (no pooler) on pre-tokenized, right-padded batches, then mean pooling and
  L2 normalisation, as the worker does; tokenizing happens before the clock starts (the direct
  path gets pre-tokenized ids too), so the limit is the model's own batched throughput. One text
  per request: batches of 32 texts of similar length (sorted, as sentence-transformers' encode()
  batches), the best a batcher could do with these texts; and batch 1 (one text per call), the
  latency a lone request is held to. Sixteen texts per request: each batch is exactly one
  request's 16 texts, padded to its longest, as the router sends them.
- Generate: `model.generate` (greedy) on a left-padded batch of N prompts at once; tokens count
  up to and including the first end-of-sequence token, as the router counts them. The time to
  first token is when the first step's logits reach a logits processor.

Both run with the worker's torch thread count (`torch.set_num_threads`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
)

from services.bench.load import Outcome


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * weights).sum(dim=1)
    return F.normalize(summed / weights.sum(dim=1).clamp(min=1e-9), p=2, dim=1)


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        mask[i, : len(row)] = 1
    return ids, mask


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.int64)
        mask[i, width - len(row) :] = 1
    return ids, mask


class EmbedLimit:
    def __init__(self, path: Path) -> None:
        self.model = AutoModel.from_pretrained(path, add_pooling_layer=False).eval()

    @torch.inference_mode()
    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return _mean_pool(hidden, mask)

    def measure(
        self,
        batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        *,
        seconds: float,
        min_calls: int = 3,
    ) -> Outcome:
        """Batched calls, cycling through `batches` (ids, mask), for `seconds`."""
        self.embed(*batches[0])  # warm-up
        outcome = Outcome()
        started = time.perf_counter()
        call = 0
        while call < min_calls or time.perf_counter() - started < seconds:
            ids, mask = batches[call % len(batches)]
            sent = time.perf_counter()
            vectors = self.embed(ids, mask)
            outcome.latencies_s.append(time.perf_counter() - sent)
            outcome.items += int(vectors.shape[0])
            call += 1
        outcome.wall_s = time.perf_counter() - started
        return outcome


def length_sorted_batches(
    token_rows: Sequence[Sequence[int]], batch: int, pad_id: int, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of similar length, as sentence-transformers' encode() makes them; the batches
    are then shuffled so any prefix of them has the pool's mix of lengths."""
    order = sorted(range(len(token_rows)), key=lambda i: len(token_rows[i]))
    batches = [
        right_pad([token_rows[i] for i in order[b : b + batch]], pad_id)
        for b in range(0, len(order) - batch + 1, batch)
    ]
    random.Random(seed).shuffle(batches)
    return batches


def single_rows(
    token_rows: Sequence[Sequence[int]], count: int, pad_id: int, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` texts drawn from the pool, one per batch: the pool's mix of lengths at batch 1."""
    picked = random.Random(seed).sample(range(len(token_rows)), min(count, len(token_rows)))
    return [right_pad([token_rows[i]], pad_id) for i in picked]


def grouped_batches(
    token_rows: Sequence[Sequence[int]], groups: Sequence[Sequence[int]], pad_id: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One batch per group of row indices (the exact texts of one multi-text request)."""
    return [right_pad([token_rows[i] for i in group], pad_id) for group in groups]


class _FirstStep(LogitsProcessor):
    """Notes when the first step's logits exist: the in-process time to first token."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.at is None:
            self.at = time.perf_counter()
        return scores


class GenerateLimit:
    def __init__(self, path: Path, eos_ids: frozenset[int], pad_id: int) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.eos_ids = eos_ids
        self.pad_id = pad_id

    def count_tokens(self, generated: torch.Tensor) -> int:
        """Tokens per row up to and including the first end-of-sequence token, summed."""
        total = 0
        for row in generated.tolist():
            n = len(row)
            for i, token in enumerate(row):
                if token in self.eos_ids:
                    n = i + 1
                    break
            total += n
        return total

    @torch.inference_mode()
    def generate(
        self, prompt_rows: Sequence[Sequence[int]], max_new_tokens: int
    ) -> tuple[int, float, float]:
        """One batched greedy generate; returns (tokens, seconds, seconds to first token)."""
        ids, mask = left_pad(prompt_rows, self.pad_id)
        first = _FirstStep()
        sent = time.perf_counter()
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=self.pad_id,
            logits_processor=LogitsProcessorList([first]),
        )
        done = time.perf_counter()
        tokens = self.count_tokens(out[:, ids.shape[1] :])
        return tokens, done - sent, (first.at or done) - sent

    def measure(
        self,
        prompt_rows: Sequence[Sequence[int]],
        *,
        batch: int,
        max_new_tokens: int,
        seconds: float,
        min_calls: int = 2,
    ) -> Outcome:
        """Batched generates of `batch` distinct prompts for `seconds` (at least min_calls)."""
        self.generate(prompt_rows[:batch], 2)  # warm-up
        outcome = Outcome()
        started = time.perf_counter()
        call = 0
        while call < min_calls or time.perf_counter() - started < seconds:
            rows = [prompt_rows[(call * batch + i) % len(prompt_rows)] for i in range(batch)]
            tokens, took, first = self.generate(rows, max_new_tokens)
            # Every prompt in the batch is one request that took the whole call.
            outcome.latencies_s += [took] * batch
            outcome.ttfts_s += [first] * batch
            outcome.items += tokens
            call += 1
        outcome.wall_s = time.perf_counter() - started
        return outcome
