"""Batching on a worker: what arrives together runs as one forward pass.

Two kinds of work share the model thread:
- ForwardItem: stateless span runs (Embed, Forward). Items with the same layer range and input
  kind are padded (on the right) into one batch; items are grouped by length first so short
  inputs don't pay for long ones.
- StepItem: one step of a generation session. Decode steps (one new token each) of different
  sessions run as one batch over left-padded KV caches (continuous batching: sessions join and
  leave between steps); a prefill runs on its own and its session joins the decode batch next.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from services.common.types import Span
from services.worker.sessions import Session
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


@dataclass
class StepItem:
    session: Session
    tokens: torch.Tensor  # [1, n] ids (first stage) or [1, n, h] hidden states
    wire: str  # dtype of hidden states sent back
    future: asyncio.Future[Any]
    enqueued: float = field(default_factory=time.perf_counter)
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    batch_rows: int = 0


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
    kwargs = {"input_ids": batch} if first.input_ids is not None else {"hidden_states": batch}
    hidden = stage.forward(attention_mask=mask if use_mask else None, sub=first.sub, **kwargs)
    if first.pool:
        hidden = pool_fn(hidden, mask)  # type: ignore[operator]
    results: list[torch.Tensor] = []
    row = 0
    for item in group:
        part = hidden[row : row + item.rows]
        results.append(part if first.pool else part[:, : item.width])
        row += item.rows
    return results


def batched_decode(
    stage: StageModel, caches: Sequence[DynamicCache], inputs: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, list[DynamicCache]]:
    """One decode step for several sessions: left-pads their KV caches into one batch.

    inputs are [1, 1] token ids (first stage) or [1, 1, h] hidden states. Returns the new hidden
    states [n, 1, h] and each session's cache grown by its one token.
    """
    lengths = [int(c.get_seq_length()) for c in caches]
    longest = max(lengths)
    layers: list[tuple[torch.Tensor, torch.Tensor]] = []
    for index in range(len(caches[0].layers)):
        keys, values = [], []
        for cache, length in zip(caches, lengths):
            k, v = cache.layers[index].keys, cache.layers[index].values
            if length < longest:
                shape = (k.shape[0], k.shape[1], longest - length, k.shape[3])
                k = torch.cat([k.new_zeros(shape), k], dim=2)
                v = torch.cat([v.new_zeros(shape), v], dim=2)
            keys.append(k)
            values.append(v)
        layers.append((torch.cat(keys), torch.cat(values)))
    batch_cache = DynamicCache(ddp_cache_data=layers, config=stage.main.config)
    mask = torch.zeros(len(caches), longest + 1, dtype=torch.int64)
    for row, length in enumerate(lengths):
        mask[row, longest - length :] = 1
    positions = torch.tensor(lengths, dtype=torch.int64).unsqueeze(1)
    batch = torch.cat(list(inputs), dim=0)
    kwargs = {"input_ids": batch} if stage.is_first else {"hidden_states": batch}
    hidden = stage.forward(attention_mask=mask, cache=batch_cache, position_ids=positions, **kwargs)
    grown: list[DynamicCache] = []
    for row, length in enumerate(lengths):
        start = longest - length
        data = [
            (layer.keys[row : row + 1, :, start:], layer.values[row : row + 1, :, start:])
            for layer in batch_cache.layers
        ]
        grown.append(DynamicCache(ddp_cache_data=data, config=stage.main.config))
    return hidden, grown
