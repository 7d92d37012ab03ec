"""Stateless span runs (Embed, Forward) that arrive together run as few forward passes.

Pooled work (Embed) is planned row by row (`PooledRows`): every row of every queued item is
trimmed to its own length (its mask), the rows are sorted by length and cut into passes where
the padding a pass would carry costs more than starting another pass (`plan_rows`, priced by
`PassCost`, which learns what a pass costs on this CPU), and one pass runs at a time, re-planned
with whatever arrived meanwhile; each row's vector goes back to its item. A router's coalesced
calls of mixed lengths thus run as length-homogeneous passes drawn from all the rows queued.

Unpooled work (Forward) keeps every item whole (its hidden states are returned for every
position it sent): items with the same layer range and input kind are padded on the right into
one batch, grouped by length first so short inputs don't pay for long ones.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from services.common.types import Span
from services.worker.stage import StageModel

MAX_PADDING_WASTE = 0.25  # share of padded tokens an unpooled group may carry before it splits
# What one more forward pass costs beyond its tokens, in tokens, until PassCost has learnt it:
# the fixed part of a pass (Python and dispatch overhead, small-matrix inefficiency). MiniLM on
# the 2-core bench machine, T(rows, width) ~ a + b x rows x width: 70-120 tokens.
PASS_COST_TOKENS = 96

Pool = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_ARRIVALS = itertools.count()  # the order rows arrived in, over every queue


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


class PassCost:
    """What one more forward pass costs, in tokens, learnt from the passes this worker runs.

    Fits seconds = fixed + per_token x padded_tokens over recent passes (exponentially weighted
    least squares) and prices a pass at fixed / per_token tokens: the padding worth avoiding by
    starting another pass. It depends on the CPU, the model and the precision, so it is measured
    rather than set; until enough varied passes are seen it is PASS_COST_TOKENS.
    """

    def __init__(
        self,
        prior: float = PASS_COST_TOKENS,
        decay: float = 0.99,
        bounds: tuple[float, float] = (16, 512),
    ) -> None:
        self.prior = prior
        self.decay = decay
        self.bounds = bounds
        self._n = self._x = self._y = self._xx = self._xy = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        d = self.decay
        self._n = self._n * d + 1
        self._x = self._x * d + tokens
        self._y = self._y * d + seconds
        self._xx = self._xx * d + tokens * tokens
        self._xy = self._xy * d + tokens * seconds

    @property
    def tokens(self) -> float:
        n = self._n
        if n < 16:
            return self.prior
        mean_x, mean_y = self._x / n, self._y / n
        var = self._xx / n - mean_x * mean_x
        if var <= (0.25 * mean_x) ** 2:  # passes all alike: no slope to learn from
            return self.prior
        slope = (self._xy / n - mean_x * mean_y) / var
        fixed = mean_y - slope * mean_x
        if slope <= 0:
            return self.prior
        low, high = self.bounds
        return min(max(fixed / slope, low), high)


@dataclass(eq=False)
class _Row:
    item: ForwardItem
    index: int  # the row within its item
    length: int  # up to its last real token
    order: int  # arrival order: the oldest row is always in the next pass


@dataclass
class Pass:
    """Rows of pooled items to run together, trimmed to the longest of them."""

    rows: list[_Row]
    width: int

    @property
    def tokens(self) -> int:
        return len(self.rows) * self.width


class PooledRows:
    """Rows of pooled work (Embed) waiting for the model, one pass at a time.

    Every row is trimmed to its own length (its mask). Each pass is planned over every row
    waiting (`plan_rows`) and is the planned group holding the oldest row, so nothing waits
    forever, and rows that arrive during a pass are planned with the rest for the next one:
    a worker fed by coalesced calls keeps choosing length-homogeneous passes from everything
    it holds instead of running each call alone.
    """

    def __init__(self) -> None:
        self._rows: list[_Row] = []
        self._results: dict[int, torch.Tensor | None] = {}
        self._left: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def oldest(self) -> int:
        """Arrival order of the oldest row waiting (queues compete by it)."""
        return min((r.order for r in self._rows), default=-1)

    def add(self, item: ForwardItem) -> None:
        rows, width = item.rows, item.width
        if item.mask is None:
            lengths = [width] * rows
        else:
            positions = torch.arange(1, width + 1, dtype=torch.int64)
            lengths = (item.mask * positions).amax(dim=1).clamp(min=1).tolist()
        for index, length in enumerate(lengths):
            self._rows.append(_Row(item, index, int(length), next(_ARRIVALS)))
        self._results[id(item)] = None
        self._left[id(item)] = rows

    def next_pass(self, max_rows: int, max_tokens: int, pass_cost: float) -> Pass | None:
        live = [r for r in self._rows if not r.item.future.done()]
        for gone in {id(r.item) for r in self._rows if r.item.future.done()}:
            self._results.pop(gone, None)
            self._left.pop(gone, None)
        if not live:
            self._rows = []
            return None
        live.sort(key=lambda r: (r.length, r.order))
        oldest = min(live, key=lambda r: r.order)
        plan = plan_rows([r.length for r in live], max_rows, max_tokens, round(pass_cost))
        at = live.index(oldest)
        start, end = next((s, e) for s, e in plan if s <= at < e)
        chosen = live[start:end]
        taken = set(map(id, chosen))
        self._rows = [r for r in live if id(r) not in taken]
        return Pass(chosen, chosen[-1].length)

    def finish(self, done: Pass, vectors: torch.Tensor) -> list[tuple[ForwardItem, torch.Tensor]]:
        """Files a pass's vectors under their items; returns the items now complete."""
        complete: list[tuple[ForwardItem, torch.Tensor]] = []
        for row, vector in zip(done.rows, vectors, strict=True):
            key = id(row.item)
            if key not in self._left:
                continue  # its item left (cancelled) meanwhile
            result = self._results[key]
            if result is None:
                result = self._results[key] = vectors.new_empty(row.item.rows, vectors.shape[1])
            result[row.index] = vector
            self._left[key] -= 1
            if not self._left[key]:
                del self._left[key]
                self._results.pop(key)
                complete.append((row.item, result))
        return complete

    def fail(self, done: Pass) -> list[ForwardItem]:
        """The items a failed pass touched; their other rows are dropped too."""
        items = list({id(r.item): r.item for r in done.rows}.values())
        keys = {id(i) for i in items}
        self._rows = [r for r in self._rows if id(r.item) not in keys]
        for key in keys:
            self._results.pop(key, None)
            self._left.pop(key, None)
        return items


def run_pass(stage: StageModel, work: Pass, pool_fn: Pool) -> torch.Tensor:
    """Runs one pass (on the model thread): the rows trimmed to the pass's width, padded on the
    right where shorter, then pooled. Returns [rows, dim]."""
    first = work.rows[0].item
    width = work.width
    sample = first.source
    batch = sample.new_zeros((len(work.rows), width, *sample.shape[2:]))
    mask = torch.zeros(len(work.rows), width, dtype=torch.int64)
    for row, r in enumerate(work.rows):
        batch[row, : r.length] = r.item.source[r.index, : r.length]
        if r.item.mask is None:
            mask[row, : r.length] = 1
        else:
            mask[row, : r.length] = r.item.mask[r.index, : r.length]
    full = bool(mask.all())
    hidden = stage.run(batch, attention_mask=None if full else mask, sub=first.sub)
    return pool_fn(hidden, mask)


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
