"""StageBatch: the rows of one generation batch on one stage, and their KV cache.

TGI's Batch, for a span of layers: made by a prefill, stepped one token per row at a time,
merged with other batches (``concatenate``) and shrunk when rows leave (``filter``). Rows are
left-padded to a shared write column (see ``kv.py``), so positions and the padding mask are
derived from each row's length; nothing here knows protobuf.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from services.common.types import SamplingParams
from services.worker.grammar import allowed
from services.worker.kv import SlotCache
from services.worker.sampling import make_generator, sample
from services.worker.stage import StageModel


@dataclass(frozen=True)
class TokenLogprobs:
    """A sampled token's log-probability under the model and the most likely alternatives."""

    token_id: int
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class Row:
    """One request in a batch: how many tokens it holds and may hold, and how it samples."""

    request_id: int
    length: int  # tokens in the KV cache (after the step that made or last grew it)
    max_tokens: int  # tokens it may hold at most: prompt + max_new_tokens
    sampling: SamplingParams = field(default_factory=SamplingParams)
    generator: torch.Generator | None = None
    replay: list[int] = field(default_factory=list)  # tokens generated before (a re-prefill)
    tokens: list[int] = field(default_factory=list)  # its whole prompt, for prefix blocks
    matcher: Any = None  # its grammar's state (last stage, structured output)

    @property
    def remaining(self) -> int:
        return max(0, self.max_tokens - self.length)


def capacity_for(rows: Sequence[Row], length: int) -> int:
    """Columns a batch needs: the shared write column plus the longest remaining generation."""
    return length + max((r.remaining for r in rows), default=0)


@dataclass
class StageBatch:
    """A batch held on one stage between steps."""

    batch_id: str
    rows: list[Row]
    cache: SlotCache
    prefill_width: int = 0  # the prompts' whole left-padded width (chunks fill it in)
    input_dtype: str = ""  # what its prefill input arrived as (part of its prefix blocks' key)
    last_used: float = field(default_factory=time.monotonic)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def kv_tokens(self) -> int:
        """Token slots allocated, padding included: rows x capacity."""
        return len(self.rows) * self.cache.capacity

    def _lengths(self) -> torch.Tensor:
        return torch.tensor([r.length for r in self.rows], dtype=torch.int64)

    @classmethod
    def prefill(
        cls,
        stage: StageModel,
        batch_id: str,
        rows: list[Row],
        inputs: torch.Tensor,
        width: int | None = None,
        start: int = 0,
        cached: Sequence[tuple[int, int, torch.Tensor]] = (),
    ) -> tuple[StageBatch, torch.Tensor]:
        """Runs left-padded prompts ([rows, width] ids or [rows, width, hidden]), or the first
        chunk of them when `width` (the whole padded width) is wider than the input.

        With `start`, the columns before it come from cached KV blocks (`cached`: row, first
        column, blocks) and the input begins at column `start`.
        Returns the batch and the hidden states of every position run, [rows, chunk, hidden].
        """
        width = int(inputs.shape[1]) + start if width is None else width
        cache = SlotCache(len(stage.span), capacity_for(rows, width))
        if start:
            cache.preload(len(rows), cached, start)
        for row in rows:
            if stage.is_last and row.generator is None:
                row.generator = make_generator(row.sampling)
        batch = cls(batch_id, rows, cache, prefill_width=width)
        return batch, batch.extend(stage, inputs)

    def extend(self, stage: StageModel, inputs: torch.Tensor) -> torch.Tensor:
        """Runs the next columns of the left-padded prompts (chunked prefill): the mask covers
        every column so far, and positions are counted from each row's first real column."""
        start, chunk = self.cache.length, int(inputs.shape[1])
        pads = (self.prefill_width - self._lengths()).unsqueeze(1)
        columns = torch.arange(start + chunk, dtype=torch.int64)
        mask = (columns.unsqueeze(0) >= pads).to(torch.int64)
        # Padding columns get position 0 (any valid position; they are masked out).
        positions = (columns[start:].unsqueeze(0) - pads).clamp(min=0)
        hidden = stage.run(inputs, cache=self.cache, attention_mask=mask, position_ids=positions)
        self.last_used = time.monotonic()
        return hidden

    def first_column(self, index: int) -> int:
        """The column row `index`'s first prompt token sits at (while its prefill runs)."""
        return self.prefill_width - self.rows[index].length

    @property
    def prefilling(self) -> bool:
        """Whether chunks of its prefill are still to come."""
        return self.cache.length < self.prefill_width

    def decode(self, stage: StageModel, inputs: torch.Tensor) -> torch.Tensor:
        """One step: [rows] token ids (first stage) or [rows, 1, hidden]. Returns [rows, 1, h]."""
        length = self.cache.length
        lengths = self._lengths()
        columns = torch.arange(length + 1, dtype=torch.int64)
        mask = (columns.unsqueeze(0) >= (length - lengths).unsqueeze(1)).to(torch.int64)
        tokens = inputs.reshape(-1, 1) if stage.is_first else inputs
        hidden = stage.run(
            tokens, cache=self.cache, attention_mask=mask, position_ids=lengths.unsqueeze(1)
        )
        for row in self.rows:
            row.length += 1
        self.last_used = time.monotonic()
        return hidden

    def sample(
        self, stage: StageModel, hidden: torch.Tensor
    ) -> tuple[list[int], list[TokenLogprobs | None] | None]:
        """The next token of every row from the last position's hidden states (last stage),
        and, for rows that asked, its log-probability and alternatives (from the raw logits)."""
        raw = stage.logits(hidden[:, -1, :])
        logits = self._constrained(raw)
        greedy = torch.argmax(logits, dim=-1).tolist()
        tokens: list[int] = []
        for index, row in enumerate(self.rows):
            if row.sampling.greedy:
                tokens.append(int(greedy[index]))
            else:
                tokens.append(
                    sample(logits[index], row.sampling, row.generator, position=row.length)
                )
            if row.matcher is not None:
                row.matcher.consume_token(tokens[-1])
        return tokens, self._logprobs(raw, tokens)

    def _constrained(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits with every token a row's grammar forbids masked out."""
        rows = [i for i, row in enumerate(self.rows) if row.matcher is not None]
        if not rows:
            return logits
        logits = logits.clone()
        width = int(logits.shape[-1])
        for index in rows:
            allow = allowed(self.rows[index].matcher, width)
            logits[index].masked_fill_(~allow, float("-inf"))
        return logits

    def _logprobs(self, raw: torch.Tensor, tokens: list[int]) -> list[TokenLogprobs | None] | None:
        wanting = [i for i, row in enumerate(self.rows) if row.sampling.wants_logprobs]
        if not wanting:
            return None
        found: list[TokenLogprobs | None] = [None] * len(self.rows)
        scores = torch.log_softmax(raw[wanting].float(), dim=-1)
        for place, index in enumerate(wanting):
            k = self.rows[index].sampling.top_logprobs
            top = torch.topk(scores[place], k) if k else None
            found[index] = TokenLogprobs(
                tokens[index],
                float(scores[place, tokens[index]]),
                top.indices.tolist() if top is not None else [],
                top.values.tolist() if top is not None else [],
            )
        return found

    @classmethod
    def concatenate(cls, batches: Sequence[StageBatch]) -> StageBatch:
        """Every row of `batches`, in order, in one batch under the first one's id."""
        length = max(b.cache.length for b in batches)
        rows = [row for b in batches for row in b.rows]
        starts = [length - b.cache.length for b in batches]
        cache = SlotCache.concatenate(
            [b.cache for b in batches], starts, capacity_for(rows, length)
        )
        return cls(batches[0].batch_id, rows, cache)

    def filter(self, keep: Sequence[int]) -> StageBatch:
        """Only the rows whose request ids are in `keep`, in their batch order."""
        wanted = set(keep)
        indices = [i for i, row in enumerate(self.rows) if row.request_id in wanted]
        rows = [self.rows[i] for i in indices]
        longest = max((r.length for r in rows), default=0)
        first_column = self.cache.length - longest
        cache = self.cache.select(
            torch.tensor(indices, dtype=torch.int64), first_column, capacity_for(rows, longest)
        )
        return StageBatch(self.batch_id, rows, cache)
