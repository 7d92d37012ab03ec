"""Scheduling generations on one chain: pure policy, no sockets, no asyncio.

A chain runs its generations as a few micro-batches (``Slot``). Each slot is one batch on every
stage of the chain; the driver (``batcher.py``) steps each slot in its own loop, so with two
stages one slot's step runs on stage 0 while the other's runs on stage 1. Between steps a slot
asks the scheduler what to do: drop rows that finished or left, and prefill waiting requests
that then merge into it at the next step (TGI's continuous batching).

Admission is by the chain's KV budget in token slots, counted the way the workers allocate:
a batch of n rows holds n x (longest row + longest remaining generation) slots, padding included.
A request waits while it does not fit; only a full wait queue refuses one.

Order in the wait queue: effective priority first (the request's priority plus one level per
``aging_s`` waited, up to the highest priority waiting, so nothing starves), then the tenant
with the smallest share (rows running now plus recent admissions, decaying), then arrival.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from services.common.errors import ResourceExhausted
from services.common.types import SamplingParams

MIN_PRIORITY, MAX_PRIORITY = -100, 100


@dataclass(eq=False)
class Request:
    """One generation as the scheduler sees it. The driver appends tokens to `generated`."""

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
    failovers: int = 0

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
    pending: list[Request] = field(default_factory=list)  # prefilled, merged at the next step
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


@dataclass(frozen=True)
class SchedulerConfig:
    budget_tokens: int  # the chain's KV budget in token slots (the smallest stage's)
    max_rows: int  # rows the chain holds at once (the smallest stage's)
    slots: int = 1  # micro-batches
    balanced: bool = False  # pipelined chains: slots share the rows; else slot 0 first
    max_waiting: int = 256  # waiting requests before RESOURCE_EXHAUSTED
    max_prefill_tokens: int = 8192  # rows x width of one prefill
    waiting_served_ratio: float = 1.2  # TGI: prefill early only for this many per running row
    max_waiting_steps: int = 20  # TGI's max_waiting_tokens: or after this many decode steps
    aging_s: float = 2.0  # one priority level gained per this many seconds waited
    share_half_life_s: float = 10.0  # how fast a tenant's recent share is forgotten


@dataclass
class Plan:
    """What a slot does before its next decode step."""

    drop: list[Request]  # rows leaving the batch (finished, cancelled, past deadline)
    prefill: list[Request]  # waiting requests to prefill into a new batch, merged next step


class Scheduler:
    """The wait queue and the slots of one chain."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: list[Request] = []
        self.slots = [Slot(i) for i in range(max(1, config.slots))]
        self._shares: dict[str, tuple[float, float]] = {}  # tenant -> (share, as of time)

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

    def share(self, tenant: str, now: float) -> float:
        value, at = self._shares.get(tenant, (0.0, now))
        return value * 0.5 ** ((now - at) / self.config.share_half_life_s)

    def _charge(self, tenant: str, now: float) -> None:
        self._shares[tenant] = (self.share(tenant, now) + 1.0, now)

    def effective_priority(self, request: Request, now: float, ceiling: int) -> int:
        """Priority plus one level per aging_s waited, up to the highest priority waiting.

        At the ceiling a request ties with the best and is ordered by tenant share and arrival,
        so it is served after the requests that were there before it: it cannot starve.
        """
        aged = request.priority + math.floor((now - request.arrived) / self.config.aging_s)
        return max(request.priority, min(aged, ceiling))

    def _running_by_tenant(self) -> dict[str, int]:
        running: dict[str, int] = {}
        for slot in self.slots:
            for row in (*slot.rows, *slot.pending):
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

    def expired(self, now: float) -> list[Request]:
        """Waiting requests that were cancelled or ran out of time: out of the queue."""
        gone = [r for r in self.waiting if r.cancelled or now >= r.deadline]
        if gone:
            self.waiting = [r for r in self.waiting if not (r.cancelled or now >= r.deadline)]
        return gone

    # -- planning ----------------------------------------------------------------------------

    def leaving(self, slot: Slot, now: float) -> list[Request]:
        return [r for r in slot.rows if r.done or r.cancelled or now >= r.deadline]

    def plan(self, slot: Slot, now: float) -> Plan:
        """Rows to drop from `slot` and requests to prefill into it, before its next step."""
        drop = self.leaving(slot, now)
        staying = [r for r in slot.rows if not any(r is d for d in drop)]
        return Plan(drop, self._admit(slot, staying, now))

    def _others_cost(self, slot: Slot) -> int:
        return sum(s.cost() for s in self.slots if s is not slot)

    def _others_rows(self, slot: Slot) -> int:
        return sum(s.size for s in self.slots if s is not slot)

    def _fits(
        self, slot_rows: list[Request], picked: list[Request], others_cost: int, others_rows: int
    ) -> bool:
        cfg = self.config
        lengths = [r.kv_length for r in slot_rows] + [len(r.feed) for r in picked]
        limits = [r.max_tokens for r in slot_rows] + [r.max_tokens for r in picked]
        if others_cost + kv_cost(lengths, limits) > cfg.budget_tokens:
            return False
        if others_rows + len(slot_rows) + len(picked) > cfg.max_rows:
            return False
        width = max(len(r.feed) for r in picked)
        return len(picked) * width <= cfg.max_prefill_tokens or len(picked) == 1

    def _admit(self, slot: Slot, staying: list[Request], now: float) -> list[Request]:
        cfg = self.config
        if not self.waiting:
            return []
        others_cost, others_rows = self._others_cost(slot), self._others_rows(slot)
        if cfg.balanced:
            total = others_rows + len(staying) + len(self.waiting)
            quota = math.ceil(total / len(self.slots)) - len(staying)
        else:
            quota = cfg.max_rows
            head = self._next(self.waiting, self._running_by_tenant(), now)
            if slot.index > 0 and not staying and self._primary_takes(head):
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
            if not self._fits(staying, [*picked, request], others_cost, others_rows):
                break  # strict order: a big request is not overtaken by smaller ones
            picked.append(request)
            candidates.remove(request)
            running[request.tenant] = running.get(request.tenant, 0) + 1
        for request in picked:
            self.waiting.remove(request)
            self._charge(request.tenant, now)
        return picked

    def _primary_takes(self, head: Request) -> bool:
        primary = self.slots[0]
        staying = [r for r in (*primary.rows, *primary.pending) if not (r.done or r.cancelled)]
        return self._fits(staying, [head], self._others_cost(primary), self._others_rows(primary))

    # -- bookkeeping the driver reports ------------------------------------------------------

    def requeue(self, requests: Iterable[Request]) -> None:
        """Puts requests back (a worker refused the prefill for memory): they keep their place."""
        self.waiting.extend(requests)

    def all_requests(self) -> list[Request]:
        return [*self.waiting, *(r for s in self.slots for r in (*s.rows, *s.pending))]

    def take_all(self) -> list[Request]:
        """Everything this chain holds, for failover elsewhere; the chain is left empty."""
        requests = self.all_requests()
        self.waiting = []
        for slot in self.slots:
            slot.rows, slot.pending = [], []
            slot.batch_id = slot.pending_batch_id = None
        return requests

    def queue_depths(self, bucket: Callable[[int], str]) -> dict[str, int]:
        depths: dict[str, int] = {}
        for request in self.waiting:
            key = bucket(request.priority)
            depths[key] = depths.get(key, 0) + 1
        return depths
