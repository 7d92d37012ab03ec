"""Stateless span runs (Embed, Forward) that arrive together run as one forward pass.

Items with the same layer range and input kind are padded (on the right) into one batch; items
are grouped by length first so short inputs don't pay for long ones.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from services.common.types import Span
from services.worker.stage import StageModel

MAX_PADDING_WASTE = 0.25  # share of padded tokens a group may carry before it is split


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
    def rows(self) -> int:
        source = self.input_ids if self.input_ids is not None else self.hidden
        assert source is not None
        return int(source.shape[0])

    @property
    def width(self) -> int:
        source = self.input_ids if self.input_ids is not None else self.hidden
        assert source is not None
        return int(source.shape[1])

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


def run_forward_group(
    stage: StageModel, group: Sequence[ForwardItem], pool_fn: object
) -> list[torch.Tensor]:
    """Pads a group into one batch, runs it, and hands each item its rows back (unpadded)."""
    width = max(item.width for item in group)
    parts_in: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    for item in group:
        source = item.input_ids if item.input_ids is not None else item.hidden
        assert source is not None
        mask = (
            item.mask
            if item.mask is not None
            else torch.ones(item.rows, item.width, dtype=torch.int64)
        )
        pad = width - item.width
        if pad:
            fill = torch.zeros(item.rows, pad, *source.shape[2:], dtype=source.dtype)
            source = torch.cat([source, fill], dim=1)
            mask = torch.cat([mask, torch.zeros(item.rows, pad, dtype=mask.dtype)], dim=1)
        parts_in.append(source)
        masks.append(mask)
    batch = torch.cat(parts_in, dim=0)
    mask = torch.cat(masks, dim=0)
    first = group[0]
    padded = len(group) > 1 and any(item.width != width for item in group)
    use_mask = padded or any(item.mask is not None for item in group)
    hidden = stage.run(batch, attention_mask=mask if use_mask else None, sub=first.sub)
    if first.pool:
        hidden = pool_fn(hidden, mask)  # type: ignore[operator]
    results: list[torch.Tensor] = []
    row = 0
    for item in group:
        part = hidden[row : row + item.rows]
        results.append(part if first.pool else part[:, : item.width])
        row += item.rows
    return results
