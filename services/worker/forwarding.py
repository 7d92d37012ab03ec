"""Stateless span runs (Embed, Forward) that arrive together run as few forward passes.

Pooled work (Embed) is planned row by row: every row of every queued item is trimmed to its own
length (its mask), the rows are sorted by length and cut into passes where the padding a pass
would carry costs more than starting another pass (`plan_rows`, a cost model measured on this
CPU), then each row's vector goes back to its item. A router's coalesced call of 32 texts of
mixed length thus runs as a few length-homogeneous passes instead of one padded to the longest.

Unpooled work (Forward) keeps every item whole (its hidden states are returned for every
position it sent): items with the same layer range and input kind are padded on the right into
one batch, grouped by length first so short inputs don't pay for long ones.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from services.common.types import Span
from services.worker.stage import StageModel

MAX_PADDING_WASTE = 0.25  # share of padded tokens an unpooled group may carry before it splits
# What one more forward pass costs beyond its tokens, in tokens: the fixed part of a pass
# (Python and kernel launch overhead, small-matrix inefficiency). Measured for MiniLM on the
# 2-core bench machine (services/bench: T(rows, width) ~ a + b x rows x width): about 120 tokens.
PASS_COST_TOKENS = 120

Pool = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ForwardItem:
    sub: Span
    input_ids: torch.Tensor | None  # [b, t]
    hidden: torch.Tensor | None  # [b, t, h]
    mask: torch.Tensor | None  # [b, t]
    pool: bool
    future: asyncio.Future[torch.Tensor]
    enqueued: float = field(default_factory=time.perf_counter)
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    batch_rows: int = 0

    @property
    def source(self) -> torch.Tensor:
        source = self.input_ids if self.input_ids is not None else self.hidden
        assert source is not None
        return source

    @property
    def rows(self) -> int:
        return int(self.source.shape[0])

    @property
    def width(self) -> int:
        return int(self.source.shape[1])

    def key(self) -> tuple[Span, bool, bool]:
        return (self.sub, self.input_ids is not None, self.pool)


def group_forward_items(
    items: Sequence[ForwardItem], max_rows: int, max_tokens: int
) -> list[list[ForwardItem]]:
    """Groups compatible items by length so padding stays under MAX_PADDING_WASTE."""
    by_key: dict[tuple[Span, bool, bool], list[ForwardItem]] = {}
    for item in items:
        by_key.setdefault(item.key(), []).append(item)
    groups: list[list[ForwardItem]] = []
    for members in by_key.values():
        members.sort(key=lambda i: i.width)
        current: list[ForwardItem] = []
        rows = tokens = 0
        for item in members:
            new_rows = rows + item.rows
            new_tokens = tokens + item.rows * item.width
            padded = new_rows * item.width  # sorted: this item is the widest so far
            if current and (
                new_rows > max_rows
                or padded > max_tokens
                or padded - new_tokens > MAX_PADDING_WASTE * padded
            ):
                groups.append(current)
                current, rows, tokens = [], 0, 0
                new_rows, new_tokens = item.rows, item.rows * item.width
            current.append(item)
            rows, tokens = new_rows, new_tokens
        if current:
            groups.append(current)
    return groups


def plan_rows(
    lengths: Sequence[int], max_rows: int, max_tokens: int, pass_cost: int = PASS_COST_TOKENS
) -> list[tuple[int, int]]:
    """Cuts rows sorted by length into passes [start, end) of least estimated cost.

    A pass of n rows whose longest is w costs pass_cost + n x w (padding included); at most
    max_rows rows and max_tokens padded tokens each (a row longer than that runs alone).
    Dynamic programming over the cut points: O(rows x max_rows).
    """
    count = len(lengths)
    best = [0.0] + [float("inf")] * count
    cut = [0] * (count + 1)
    for end in range(1, count + 1):
        width = lengths[end - 1]
        start = end - 1
        lowest = max(0, end - max_rows)
        while start >= lowest:
            rows = end - start
            if rows > 1 and rows * width > max_tokens:
                break
            cost = best[start] + pass_cost + rows * width
            if cost < best[end]:
                best[end], cut[end] = cost, start
            start -= 1
    passes: list[tuple[int, int]] = []
    end = count
    while end > 0:
        passes.append((cut[end], end))
        end = cut[end]
    passes.reverse()
    return passes


def _row_lengths(mask: torch.Tensor | None, rows: int, width: int) -> list[int]:
    """Each row's length up to its last real token (right padding after it is dropped)."""
    if mask is None:
        return [width] * rows
    positions = torch.arange(1, width + 1, dtype=torch.int64)
    return (mask.to(torch.int64) * positions).amax(dim=1).clamp(min=1).tolist()


def run_pooled(
    stage: StageModel,
    items: Sequence[ForwardItem],
    pool_fn: Pool,
    max_rows: int,
    max_tokens: int,
    observe: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """Pooled vectors for items of one layer range and input kind, planned row by row;
    `observe(rows)` is told each pass's row count."""
    lengths: list[int] = []
    sources: list[torch.Tensor] = []
    masks: list[torch.Tensor | None] = []
    for item in items:
        lengths += _row_lengths(item.mask, item.rows, item.width)
        sources.append(item.source)
        masks.append(item.mask)
    width = max(item.width for item in items)
    if len(items) == 1:
        batch, mask = sources[0], masks[0]
    else:
        batch = torch.cat([_pad(s, width) for s in sources], dim=0)
        if all(m is None for m in masks) and all(i.width == width for i in items):
            mask = None
        else:
            filled = [
                m if m is not None else torch.ones(i.rows, i.width, dtype=torch.int64)
                for m, i in zip(masks, items)
            ]
            mask = torch.cat([_pad(m, width) for m in filled], dim=0)
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    sorted_lengths = [lengths[i] for i in order]
    out: torch.Tensor | None = None
    sub = items[0].sub
    for start, end in plan_rows(sorted_lengths, max_rows, max_tokens):
        rows = order[start:end]
        pass_width = sorted_lengths[end - 1]
        index = torch.tensor(rows, dtype=torch.int64)
        part = batch.index_select(0, index)[:, :pass_width]
        part_mask = None if mask is None else mask.index_select(0, index)[:, :pass_width]
        full = part_mask is None or bool(part_mask.all())
        hidden = stage.run(part, attention_mask=None if full else part_mask, sub=sub)
        if part_mask is None:
            part_mask = torch.ones(len(rows), pass_width, dtype=torch.int64)
        vectors = pool_fn(hidden, part_mask)
        if out is None:
            out = torch.empty(len(lengths), vectors.shape[1], dtype=vectors.dtype)
        out[index] = vectors
        if observe is not None:
            observe(len(rows))
    assert out is not None
    results: list[torch.Tensor] = []
    row = 0
    for item in items:
        results.append(out[row : row + item.rows])
        row += item.rows
    return results


def _pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pads dimension 1 with zeros to `width`."""
    pad = width - int(tensor.shape[1])
    if not pad:
        return tensor
    fill = torch.zeros(tensor.shape[0], pad, *tensor.shape[2:], dtype=tensor.dtype)
    return torch.cat([tensor, fill], dim=1)


def run_forward_group(
    stage: StageModel, group: Sequence[ForwardItem], pool_fn: Pool
) -> list[torch.Tensor]:
    """Pads a group into one batch, runs it, and hands each item its rows back (unpadded)."""
    width = max(item.width for item in group)
    parts_in: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    for item in group:
        mask = (
            item.mask
            if item.mask is not None
            else torch.ones(item.rows, item.width, dtype=torch.int64)
        )
        parts_in.append(_pad(item.source, width))
        masks.append(_pad(mask, width))
    batch = torch.cat(parts_in, dim=0)
    mask = torch.cat(masks, dim=0)
    first = group[0]
    padded = len(group) > 1 and any(item.width != width for item in group)
    use_mask = padded or any(item.mask is not None for item in group)
    hidden = stage.run(batch, attention_mask=mask if use_mask else None, sub=first.sub)
    if first.pool:
        hidden = pool_fn(hidden, mask)
    results: list[torch.Tensor] = []
    row = 0
    for item in group:
        part = hidden[row : row + item.rows]
        results.append(part if first.pool else part[:, : item.width])
        row += item.rows
    return results
