"""Scheduling generations on one chain: pure policy and the only writer of their state.

No sockets, no asyncio. vLLM's shape: the driver (`engine.py`) asks for a `Plan`, executes it
on the workers, and reports each result back (`prefilled`, `decoded`, `refused`, `lost`, ...);
only these methods change a request or a slot, and each returns the `Output`s (tokens, ends,
errors) the driver hands to the requests' streams.

A chain runs its generations as a few micro-batches (`Slot`). Each slot is one batch on every
stage of the chain; the driver steps each slot in its own loop, so with two stages one slot's
step runs on stage 0 while the other's runs on stage 1. Between steps a slot drops rows that
finished or left, and prefills waiting requests that merge into it at the next decode (TGI's
continuous batching).

Admission is by KV token slots, counted the way the workers allocate: a batch of n rows holds
n x (longest row + longest remaining generation) slots, padding included. The driver passes the
`Room` this chain may use now: the smallest stage's budget less what the router's other chains
hold on that stage, so chains that share a stage share its budget. A request waits while it
does not fit; only a full wait queue refuses one.

Order in the wait queue: effective priority first (the request's priority, rising in proportion
to its wait until it is the highest at `aging_share` of its time to its deadline, so nothing
starves), then the tenant with the smallest share (rows running now plus recent admissions,
decaying; the table is bounded and forgets idle tenants), then arrival.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.common.errors import DeadlineExceeded, ResourceExhausted, ServiceError, Unavailable
from services.common.settings import RouterSettings
from services.common.types import SamplingParams

MIN_PRIORITY, MAX_PRIORITY = -100, 100


@dataclass(eq=False)
class Request:
    """One generation as the scheduler sees it; only the scheduler changes it."""

    request_id: int
    prompt: list[int]
    max_new: int
    sampling: SamplingParams
    eos: frozenset[int]
    arrived: float
    deadline: float
    priority: int = 0
    tenant: str = ""
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False  # the client left or a stop string ended it
    retries: int = 0  # prefills run again after a fault (a moved chain, a lost batch)
    admitted_at: float | None = None  # when its first prefill was planned

    @property
    def max_tokens(self) -> int:
        """Tokens this request may hold in the KV cache: prompt + max_new_tokens."""
        return len(self.prompt) + self.max_new

    @property
    def feed(self) -> list[int]:
        """What a prefill runs: the prompt and every token already generated (after a fault)."""
        return self.prompt + self.generated

    @property
    def kv_length(self) -> int:
        """Tokens in the KV cache while running: the last sampled token is not fed yet."""
        return len(self.prompt) + len(self.generated) - 1

    @property
    def done(self) -> bool:
        return len(self.generated) >= self.max_new or bool(
            self.generated and self.generated[-1] in self.eos
        )

    @property
    def finish_reason(self) -> str:
        return "eos" if self.generated and self.generated[-1] in self.eos else "length"


@dataclass(frozen=True, slots=True)
class Output:
    """What one request's stream receives: a token, its end, or the error that ended it."""

    request_id: int
    token: int | None = None
    finished: str = ""  # "eos" or "length"
    error: ServiceError | None = None
    logprob: Any = None  # the token's TokenLogprob, when its request asked


def kv_cost(lengths: Sequence[int], limits: Sequence[int]) -> int:
    """Token slots a batch of rows with these KV lengths and max_tokens is allocated."""
    if not lengths:
        return 0
    longest = max(lengths)
    remaining = max(limit - length for length, limit in zip(lengths, limits, strict=True))
    return len(lengths) * (longest + max(0, remaining))


@dataclass(eq=False)
class Slot:
    """One micro-batch: the rows of its batch on the workers, in row order."""

    index: int
    batch_id: str | None = None
    rows: list[Request] = field(default_factory=list)
    pending: list[Request] = field(default_factory=list)  # prefilled, merged at the next decode
    pending_batch_id: str | None = None
    steps_since_prefill: int = 0

    def cost(self) -> int:
        # Pending rows count with their whole feed: at most one slot more than they will hold.
        lengths = [r.kv_length for r in self.rows] + [len(r.feed) for r in self.pending]
        limits = [r.max_tokens for r in (*self.rows, *self.pending)]
        return kv_cost(lengths, limits)

    @property
    def size(self) -> int:
        return len(self.rows) + len(self.pending)

    def batch_ids(self) -> list[str]:
        return [b for b in (self.batch_id, self.pending_batch_id) if b]


@dataclass(frozen=True)
class SchedulerConfig:
    """One chain's scheduling: its capacity (from its workers) and the router's settings
    (declared in RouterSettings; `from_settings` copies them)."""

    budget_tokens: int  # the chain's KV budget in token slots (the smallest stage's)
    max_rows: int  # rows the chain holds at once (the smallest stage's)
    slots: int  # micro-batches
    balanced: bool  # pipelined chains: slots share the rows; else slot 0 first
    max_waiting: int
    max_prefill_tokens: int
    prefill_chunk_tokens: int
    waiting_served_ratio: float
    max_waiting_steps: int
    aging_share: float
    max_retries: int
    max_tenants: int
    prefix_reuse: bool = False  # prefills start after the prompt blocks the chain holds
    prefill_chunk_steps: float = 0.0  # a chunk costs about this many decode steps (0: off)
    share_half_life_s: float = 10.0  # how fast a tenant's recent share is forgotten
    batch_prefix: str = "b"  # batch ids are `<prefix>-<n>`, unique per router and chain

    @classmethod
    def from_settings(
        cls,
        settings: RouterSettings,
        *,
        budget_tokens: int,
        max_rows: int,
        stages: int,
        **more: Any,
    ) -> SchedulerConfig:
        """The config of a chain of `stages` stages with this capacity; `more` overrides."""
        values: dict[str, Any] = {
            "budget_tokens": budget_tokens,
            "max_rows": max_rows,
            "slots": max(2, settings.micro_batches),
            "balanced": stages > 1,
            "max_waiting": settings.max_waiting,
            "max_prefill_tokens": settings.max_prefill_tokens,
            "prefill_chunk_tokens": settings.prefill_chunk_tokens,
            "waiting_served_ratio": settings.waiting_served_ratio,
            "max_waiting_steps": settings.max_waiting_steps,
            "aging_share": settings.aging_share,
            "max_retries": settings.retries,
            "max_tenants": settings.max_tenants,
            "prefix_reuse": settings.prefix_reuse,
            "prefill_chunk_steps": settings.prefill_chunk_steps,
        }
        return cls(**{**values, **more})


@dataclass(frozen=True, slots=True)
class Room:
    """What this chain may hold now over all its slots (its share of shared stages)."""

    tokens: int
    rows: int


@dataclass(frozen=True)
class Drop:
    """Rows leave a batch: keep these request ids in row order (none: the batch is cleared)."""

    batch_id: str
    keep: list[int]


@dataclass(frozen=True)
class Prefill:
    """Waiting requests prefilled as a new batch, merged into `merge_into` at the next decode."""

    batch_id: str
    requests: list[Request]
    merge_into: str
    # The first column it runs: the columns before it come from the stages' cached prompt
    # blocks (every row whose prompt starts before it reuses that part; 0: nothing reused).
    start: int = 0

    @property
    def width(self) -> int:
        """Columns of its left-padded input: the longest feed."""
        return max(len(r.feed) for r in self.requests)

    def wanted(self, now: float) -> bool:
        """Whether some row still wants its answer (not cancelled, not past its deadline)."""
        return any(not r.cancelled and now < r.deadline for r in self.requests)


@dataclass(frozen=True)
class Decode:
    """One step of every row: the batches named (merged, in order, into the first)."""

    batch_ids: list[str]
    tokens: list[int]  # each row's last sampled token, in row order


@dataclass
class Plan:
    """What a slot does before its next decode step."""

    outputs: list[Output]  # rows that left the batch (finished, cancelled, past deadline)
    drop: Drop | None
    prefill: Prefill | None


class Scheduler:
    """The wait queue and the slots of one chain."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: list[Request] = []
        self.slots = [Slot(i) for i in range(max(1, config.slots))]
        self._prefilling: dict[int, Prefill] = {}  # slot index -> its prefill in flight
        self._shares: dict[str, tuple[float, float]] = {}  # tenant -> (share, as of time)
        self._batches = 0

    # -- the wait queue ----------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise ResourceExhausted(
                f"the generation queue is full ({len(self.waiting)} waiting, max_waiting)"
            )
        self.waiting.append(request)

    def fits_alone(self, request: Request) -> bool:
        """Whether the request could ever run here (alone on an idle chain)."""
        return kv_cost([len(request.feed)], [request.max_tokens]) <= self.config.budget_tokens

    def cancel(self, request_id: int) -> None:
        """The client left or a stop string ended it: it leaves at its slot's next turn."""
        for request in self.requests():
            if request.request_id == request_id:
                request.cancelled = True

    def share(self, tenant: str, now: float) -> float:
        value, at = self._shares.get(tenant, (0.0, now))
        return value * 0.5 ** ((now - at) / self.config.share_half_life_s)

    def _charge(self, tenant: str, now: float) -> None:
        self._shares[tenant] = (self.share(tenant, now) + 1.0, now)
        if len(self._shares) > self.config.max_tenants:
            self._forget_idle(now)

    def _forget_idle(self, now: float) -> None:
        """Keeps the share table bounded: the smallest (most idle) quarter is forgotten (a
        forgotten tenant counts 0, as a new one does)."""
        keep = self.config.max_tenants * 3 // 4
        ranked = sorted(self._shares, key=lambda t: self.share(t, now), reverse=True)
        for tenant in ranked[keep:]:
            del self._shares[tenant]

    def effective_priority(self, request: Request, now: float, ceiling: int) -> float:
        """Priority rising in proportion to the wait: from the request's own at arrival to the
        highest (MAX_PRIORITY) once it has waited `aging_share` of its time to its deadline,
        and never above the highest priority waiting.

        At that ceiling it ties with the best and is ordered by tenant share and arrival, so
        it is served before the requests that came after it: none starves before its deadline.
        """
        span = self.config.aging_share * (request.deadline - request.arrived)
        waited = min(1.0, (now - request.arrived) / span) if span > 0 else 1.0
        aged = request.priority + (MAX_PRIORITY - request.priority) * waited
        return max(request.priority, min(aged, ceiling))

    def _running_by_tenant(self) -> dict[str, int]:
        running: dict[str, int] = {}
        for row in self._placed():
            running[row.tenant] = running.get(row.tenant, 0) + 1
        return running

    def _next(self, candidates: list[Request], running: dict[str, int], now: float) -> Request:
        """The request to admit next: priority (with aging), then the least-served tenant."""
        ceiling = max(r.priority for r in candidates)
        return min(
            candidates,
            key=lambda r: (
                -self.effective_priority(r, now, ceiling),
                running.get(r.tenant, 0) + self.share(r.tenant, now),
                r.arrived,
            ),
        )

    def expire(self, now: float) -> list[Output]:
        """Waiting requests that were cancelled or ran out of time leave the queue."""
        gone = [r for r in self.waiting if r.cancelled or now >= r.deadline]
        if not gone:
            return []
        self.waiting = [r for r in self.waiting if not (r.cancelled or now >= r.deadline)]
        return [_left(r, now) for r in gone]

    # -- planning ----------------------------------------------------------------------------

    def plan(
        self,
        slot: Slot,
        now: float,
        room: Room,
        matched: Callable[[Request], int] | None = None,
    ) -> Plan:
        """Rows leave `slot` (done, cancelled, late) and waiting requests are admitted to it.

        The leaving rows are out of the slot when this returns; the admitted requests are the
        slot's prefill in flight until `prefilled` or a fault reports back. `matched` says how
        many leading tokens of a request's feed the chain holds cached."""
        leaving = [r for r in slot.rows if r.done or r.cancelled or now >= r.deadline]
        drop: Drop | None = None
        if leaving:
            slot.rows = [r for r in slot.rows if not any(r is g for g in leaving)]
            if slot.batch_id is not None:
                drop = Drop(slot.batch_id, [r.request_id for r in slot.rows])
                if not slot.rows:
                    slot.batch_id = None
        if matched is not None:
            matched = _memo(matched)  # each request's blocks are hashed once per plan
        picked = self._admit(slot, now, room, matched)
        prefill = None
        if picked:
            self._batches += 1
            prefill = Prefill(
                f"{self.config.batch_prefix}-{self._batches}",
                picked,
                slot.batch_id or "",
                _first_column(picked, matched) if matched is not None else 0,
            )
            self._prefilling[slot.index] = prefill
            for request in picked:
                if request.admitted_at is None:
                    request.admitted_at = now
        return Plan([_left(r, now) for r in leaving], drop, prefill)

    def _placed(self) -> Iterable[Request]:
        """Every request in a slot or in a prefill in flight."""
        for slot in self.slots:
            yield from slot.rows
            yield from slot.pending
        for prefill in self._prefilling.values():
            yield from prefill.requests

    def _slot_cost(self, slot: Slot) -> int:
        prefill = self._prefilling.get(slot.index)
        if prefill is None:
            return slot.cost()
        lengths = [r.kv_length for r in slot.rows]
        lengths += [len(r.feed) for r in (*slot.pending, *prefill.requests)]
        limits = [r.max_tokens for r in (*slot.rows, *slot.pending, *prefill.requests)]
        return kv_cost(lengths, limits)

    def cost(self) -> int:
        """Token slots this chain's batches hold (or will at their next merge)."""
        return sum(self._slot_cost(s) for s in self.slots)

    def rows(self) -> int:
        """Rows this chain holds on its workers (or is prefilling)."""
        return sum(1 for _ in self._placed())

    def _fits(
        self, slot: Slot, picked: list[Request], others_cost: int, others_rows: int, room: Room
    ) -> bool:
        lengths = [r.kv_length for r in slot.rows] + [len(r.feed) for r in picked]
        limits = [r.max_tokens for r in slot.rows] + [r.max_tokens for r in picked]
        if others_cost + kv_cost(lengths, limits) > room.tokens:
            return False
        if others_rows + len(slot.rows) + len(picked) > room.rows:
            return False
        width = max(len(r.feed) for r in picked)
        return len(picked) * width <= self.config.max_prefill_tokens or len(picked) == 1

    def _admit(
        self,
        slot: Slot,
        now: float,
        room: Room,
        matched: Callable[[Request], int] | None = None,
    ) -> list[Request]:
        cfg = self.config
        if not self.waiting or slot.index in self._prefilling or slot.pending:
            return []
        others = [s for s in self.slots if s is not slot]
        others_cost = sum(self._slot_cost(s) for s in others)
        others_rows = sum(s.size + len(self._prefill_of(s)) for s in others)
        staying = slot.rows
        if cfg.balanced:
            total = others_rows + len(staying) + len(self.waiting)
            quota = math.ceil(total / len(self.slots)) - len(staying)
        else:
            quota = cfg.max_rows
            head = self._next(self.waiting, self._running_by_tenant(), now)
            if slot.index > 0 and not staying and self._primary_takes(head, room):
                return []  # slot 0 takes it at its next step; this slot is for overflow
        if quota <= 0:
            return []
        if (
            staying
            and len(self.waiting) < cfg.waiting_served_ratio * len(staying)
            and slot.steps_since_prefill < cfg.max_waiting_steps
        ):
            return []
        picked: list[Request] = []
        candidates = list(self.waiting)
        running = self._running_by_tenant()
        while candidates and len(picked) < quota:
            request = self._next(candidates, running, now)
            if not self._fits(slot, [*picked, request], others_cost, others_rows, room):
                break  # strict order: a big request is not overtaken by smaller ones
            if picked and matched is not None and _apart_is_cheaper(picked, request, matched):
                break  # it goes in the next prefill, which reuses its own cached blocks
            picked.append(request)
            candidates.remove(request)
            running[request.tenant] = running.get(request.tenant, 0) + 1
        for request in picked:
            self.waiting.remove(request)
            self._charge(request.tenant, now)
        return picked

    def _prefill_of(self, slot: Slot) -> list[Request]:
        prefill = self._prefilling.get(slot.index)
        return prefill.requests if prefill is not None else []

    def _primary_takes(self, head: Request, room: Room) -> bool:
        primary = self.slots[0]
        if primary.index in self._prefilling or primary.pending:
            return False
        others = [s for s in self.slots if s is not primary]
        return self._fits(
            primary,
            [head],
            sum(self._slot_cost(s) for s in others),
            sum(s.size + len(self._prefill_of(s)) for s in others),
            room,
        )

    # -- results the driver reports ----------------------------------------------------------

    def prefilled(
        self,
        slot: Slot,
        prefill: Prefill,
        tokens: Sequence[int],
        now: float,
        logprobs: Sequence[Any] | None = None,
    ) -> tuple[list[Output], Drop | None]:
        """A prefill's first tokens: delivered; rows done at once never join the batch (the
        Drop filters them out of the new batch)."""
        del self._prefilling[slot.index]
        outputs = _delivered(prefill.requests, tokens, logprobs)
        staying = [r for r in prefill.requests if not (r.done or r.cancelled)]
        outputs += [_left(r, now) for r in prefill.requests if r.done or r.cancelled]
        slot.steps_since_prefill = 0
        drop = None
        if len(staying) < len(prefill.requests):
            drop = Drop(prefill.batch_id, [r.request_id for r in staying])
        if staying:
            slot.pending, slot.pending_batch_id = staying, prefill.batch_id
        return outputs, drop

    def decode(self, slot: Slot) -> Decode | None:
        """The slot's next step, merging its pending batch; None when it holds no rows."""
        rows = [*slot.rows, *slot.pending]
        if not rows:
            return None
        return Decode(slot.batch_ids(), [r.generated[-1] for r in rows])

    def decoded(
        self, slot: Slot, tokens: Sequence[int], logprobs: Sequence[Any] | None = None
    ) -> list[Output]:
        """A step's tokens, one per row in row order; the pending batch is now merged."""
        rows = [*slot.rows, *slot.pending]
        slot.batch_id = slot.batch_id or slot.pending_batch_id
        slot.rows, slot.pending, slot.pending_batch_id = rows, [], None
        slot.steps_since_prefill += 1
        return _delivered(rows, tokens, logprobs)

    def refused(self, slot: Slot, prefill: Prefill) -> list[str]:
        """A stage refused the prefill (its memory, or it is draining): the requests wait again
        in their places. Returns the batch to clear on the stages that took it."""
        del self._prefilling[slot.index]
        self.waiting[:0] = prefill.requests
        return [prefill.batch_id]

    def merge_refused(self, slot: Slot) -> list[str]:
        """The first stage refused to merge the pending batch (its memory): the pending rows
        wait again (their first tokens are kept and prefilled with the prompt next time) and
        the running batch goes on. Returns the batch to clear."""
        cleared = [slot.pending_batch_id] if slot.pending_batch_id else []
        self.waiting[:0] = slot.pending
        slot.pending, slot.pending_batch_id = [], None
        return cleared

    def lost(
        self, slot: Slot, error: ServiceError, now: float, *, retry: bool = True
    ) -> tuple[list[Output], list[str]]:
        """A stage lost the slot's batches (or failed inside a step): every row of the slot is
        prefilled again here with what it generated so far; a row out of retries fails with
        `error`. `retry` False: a stage had no room (nothing failed), so the rows wait again
        without spending a retry. Returns the outputs and the batches to clear on every stage."""
        prefill = self._prefilling.pop(slot.index, None)
        requests = [*slot.rows, *slot.pending, *(prefill.requests if prefill else ())]
        cleared = slot.batch_ids() + ([prefill.batch_id] if prefill else [])
        slot.rows, slot.pending = [], []
        slot.batch_id = slot.pending_batch_id = None
        outputs: list[Output] = []
        again: list[Request] = []
        for request in requests:
            if request.done or request.cancelled or now >= request.deadline:
                outputs.append(_left(request, now))
            elif retry and request.retries >= self.config.max_retries:
                outputs.append(Output(request.request_id, error=error))
            else:
                request.retries += retry
                again.append(request)
        self.waiting[:0] = again
        return outputs, cleared

    def prefill_failed(
        self, slot: Slot, prefill: Prefill, error: ServiceError
    ) -> tuple[list[Output], list[str]]:
        """The prefill's own rows fail with `error` (the running batch goes on). Returns the
        batch to clear."""
        del self._prefilling[slot.index]
        return [Output(r.request_id, error=error) for r in prefill.requests], [prefill.batch_id]

    def failed(self, slot: Slot, error: ServiceError) -> tuple[list[Output], list[str]]:
        """The slot's rows fail with `error` (a step the workers refused as invalid: the
        router's own bug, never another request's). Returns the batches to clear."""
        prefill = self._prefilling.pop(slot.index, None)
        requests = [*slot.rows, *slot.pending, *(prefill.requests if prefill else ())]
        cleared = slot.batch_ids() + ([prefill.batch_id] if prefill else [])
        slot.rows, slot.pending = [], []
        slot.batch_id = slot.pending_batch_id = None
        return [Output(r.request_id, error=error) for r in requests], cleared

    def take_waiting(self) -> list[Request]:
        """The waiting requests, for another chain (a stage of this one is draining)."""
        waiting, self.waiting = self.waiting, []
        return waiting

    def take_all(self) -> tuple[list[Request], list[str]]:
        """Everything this chain holds, for another chain (a stage failed), and the batches to
        clear on the stages that survive; the chain is left empty."""
        requests = [*self.waiting, *self._placed()]
        cleared = [b for s in self.slots for b in s.batch_ids()]
        cleared += [p.batch_id for p in self._prefilling.values()]
        self.waiting = []
        self._prefilling.clear()
        for slot in self.slots:
            slot.rows, slot.pending = [], []
            slot.batch_id = slot.pending_batch_id = None
        return requests, cleared

    # -- views -------------------------------------------------------------------------------

    def requests(self) -> list[Request]:
        return [*self.waiting, *self._placed()]

    def prefilling(self, slot: Slot) -> Prefill | None:
        """The slot's prefill in flight, if any."""
        return self._prefilling.get(slot.index)

    def busy(self, slot: Slot) -> bool:
        """Whether the slot holds rows or a prefill in flight."""
        return bool(slot.rows or slot.pending or slot.index in self._prefilling)

    def queue_depths(self, bucket: Callable[[int], str]) -> dict[str, int]:
        depths: dict[str, int] = {}
        for request in self.waiting:
            key = bucket(request.priority)
            depths[key] = depths.get(key, 0) + 1
        return depths


MIN_CHUNK = 16
# A prefill of its own costs a pass and a turn: splitting must save more token columns than this.
APART_SLACK_COLUMNS = 64


def chunk_columns(steps: float, decode_s: float, column_s: float, ceiling: int) -> int:
    """Columns of a prefill chunk that costs about `steps` decode steps of `decode_s` each, at
    `column_s` per column, within [MIN_CHUNK, ceiling] (never above `ceiling`)."""
    wanted = int(steps * decode_s / column_s) if column_s > 0 else ceiling
    return max(min(MIN_CHUNK, ceiling), min(ceiling, wanted))


def _first_column(requests: Sequence[Request], matched: Callable[[Request], int]) -> int:
    """The first column a batch of these requests must run: every row's cached tokens end at or
    after it (rows are right-aligned, so a short row's prompt may start after it)."""
    width = max(len(r.feed) for r in requests)
    return max(0, min(width - len(r.feed) + matched(r) for r in requests))


def _memo(matched: Callable[[Request], int]) -> Callable[[Request], int]:
    found: dict[int, int] = {}

    def once(request: Request) -> int:
        if request.request_id not in found:
            found[request.request_id] = matched(request)
        return found[request.request_id]

    return once


def _apart_is_cheaper(
    picked: Sequence[Request], request: Request, matched: Callable[[Request], int]
) -> bool:
    """Whether prefilling `request` in a prefill of its own computes fewer token columns than
    adding it to `picked`'s, where cached prompt blocks are at stake: one batch starts at the
    first column any of its rows needs (`_first_column`), so a cold row beside warm ones makes
    them all recompute what they hold, and a warm row beside cold ones reuses nothing."""
    before = _first_column(picked, matched)
    own = matched(request)
    if before == 0 and own == 0:
        return False  # nothing cached on either side: batching as usual
    width = max(len(r.feed) for r in picked)
    together = [*picked, request]
    wider = max(width, len(request.feed))
    joint = (len(picked) + 1) * (wider - _first_column(together, matched))
    apart = len(picked) * (width - before) + len(request.feed) - own
    return joint > apart + APART_SLACK_COLUMNS


def _left(request: Request, now: float) -> Output:
    """The output of a request that leaves: finished, past its deadline, or cancelled."""
    if request.done:
        return Output(request.request_id, finished=request.finish_reason)
    if now >= request.deadline and not request.cancelled:
        return Output(
            request.request_id, error=DeadlineExceeded("deadline passed while generating")
        )
    return Output(request.request_id, error=Unavailable("generation cancelled"))


def _delivered(
    requests: Sequence[Request], tokens: Sequence[int], logprobs: Sequence[Any] | None
) -> list[Output]:
    """Each row's new token appended to its request, and its Output (with its logprob when the
    request asked); rows cancelled meanwhile get nothing."""
    outputs: list[Output] = []
    for index, (request, token) in enumerate(zip(requests, tokens, strict=True)):
        if request.cancelled:
            continue
        request.generated.append(token)
        logprob = logprobs[index] if logprobs and request.sampling.wants_logprobs else None
        outputs.append(Output(request.request_id, token=token, logprob=logprob))
    return outputs
