"""GenerationEngine: the batches a stage holds, stepped on the model thread. No protobuf here.

Every method runs on the worker's one model thread, so the batch table needs no lock. Memory is
counted the way it is allocated: a batch holds rows x capacity token slots (padding included),
and a prefill or merge that would take the worker over its budget is refused before anything is
allocated (RESOURCE_EXHAUSTED: the router keeps the rows waiting and tries again later).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import torch

from services.common.errors import InvalidArgument, PrefixMissing, ResourceExhausted, ServiceError
from services.common.prefix import BLOCK_TOKENS, block_hashes
from services.worker.batch import Row, StageBatch, TokenLogprobs, capacity_for
from services.worker.grammar import GrammarRefused, Grammars
from services.worker.prefix import PrefixStore
from services.worker.stage import StageModel


class UnknownBatch(ServiceError):
    """A batch this worker does not hold (expired, cleared, or the worker restarted).

    ABORTED: the router re-runs the rows' prefill rather than failing the requests.
    """

    code = grpc.StatusCode.ABORTED


@dataclass(frozen=True)
class StepOutput:
    """What one prefill or decode gives the next stage: hidden states, or sampled tokens."""

    batch_id: str
    hidden: torch.Tensor | None
    tokens: list[int] | None
    kv_tokens: int
    logprobs: list[TokenLogprobs | None] | None = None


MERGE_SLACK = 4  # decode steps a running batch may take between a merge's prefill and the merge


class GenerationEngine:
    """The generation batches held by one stage."""

    def __init__(
        self,
        stage: StageModel,
        *,
        budget_tokens: int,
        max_rows: int,
        idle_s: float,
        prefixes: PrefixStore | None = None,
    ) -> None:
        self.stage = stage
        # Prompts' KV blocks, kept in whatever the batches leave of the budget.
        self.prefixes = prefixes if prefixes is not None else PrefixStore("")
        self.reused_tokens = 0  # prompt tokens taken from the prefix store, ever
        self.shared = False  # a shared tier takes the blocks the store keeps (take_fresh)
        self.fresh: list[tuple[bytes, torch.Tensor]] = []  # blocks kept since take_fresh()
        self.budget_tokens = budget_tokens
        self.max_rows = max_rows
        self.idle_s = idle_s
        self.batches: dict[str, StageBatch] = {}
        self.grammars: Grammars | None = None  # built at the first structured-output row
        # Token slots set aside for a batch's merge into a running one (prefill's merge_into):
        # held until the merge happens or the batch goes, so the merge is never refused.
        self.reserved: dict[str, int] = {}

    # -- accounting --------------------------------------------------------------------------

    @property
    def kv_tokens(self) -> int:
        return sum(b.kv_tokens for b in self.batches.values()) + sum(self.reserved.values())

    @property
    def rows(self) -> int:
        return sum(len(b) for b in self.batches.values())

    def kv_bytes(self) -> int:
        return self.kv_tokens * self.stage.kv_bytes_per_token

    def _reserve(self, extra_tokens: int, extra_rows: int) -> None:
        over = self.kv_tokens + self.prefixes.tokens + extra_tokens - self.budget_tokens
        if over > 0:
            self.prefixes.evict(over)  # cached prefixes give way to live batches
        if self.kv_tokens + extra_tokens > self.budget_tokens:
            raise ResourceExhausted(
                f"KV budget: {self.kv_tokens} + {extra_tokens} token slots is over this "
                f"worker's {self.budget_tokens} (max_kv_mb)"
            )
        if self.rows + extra_rows > self.max_rows:
            raise ResourceExhausted(
                f"worker holds {self.rows} generation rows; {extra_rows} more is over its "
                f"{self.max_rows} (max_rows)"
            )

    def _take(self, batch_id: str) -> StageBatch:
        batch = self.batches.get(batch_id)
        if batch is None:
            raise UnknownBatch(f"batch {batch_id[:80]!r} is not held by this worker")
        return batch

    # -- steps -------------------------------------------------------------------------------

    def prefill(
        self,
        batch_id: str,
        rows: list[Row],
        inputs: torch.Tensor,
        merge_into: str = "",
        *,
        start: int = 0,
        width: int = 0,
        more: bool = False,
        from_prefix: bool = False,
        input_dtype: str = "",
    ) -> StepOutput:
        """A new batch's prompts, or one chunk of them: `start` is the column the input begins
        at (0: a new batch), `width` the whole left-padded width (0: the input's), `more` that
        chunks follow (nothing is sampled and the merge is not reserved until the last).

        `from_prefix`: a new batch whose columns before `start` come from the prefix store (each
        row's cached blocks, keyed by its `tokens`; PrefixMissing when one is not held).
        `input_dtype` is what the input arrived as: part of the key of the blocks it stores."""
        chunk = int(inputs.shape[1])
        width = width or chunk
        if start + chunk > width or more != (start + chunk < width):
            raise InvalidArgument(
                f"a chunk of columns [{start}, {start + chunk}) does not fit a prefill of width "
                f"{width} with more={more}"
            )
        if start and not from_prefix:
            return self._next_chunk(batch_id, rows, inputs, merge_into, start, width, more)
        if from_prefix and not start:
            raise InvalidArgument("a prefill from cached prefixes starts after column 0")
        if batch_id in self.batches:
            raise InvalidArgument(f"batch {batch_id[:80]!r} already exists")
        if any(not 0 < r.length <= width for r in rows):
            raise InvalidArgument(f"row lengths must be in [1, {width}] (the input width)")
        if any(r.max_tokens < r.length for r in rows):
            raise InvalidArgument("a row's max_tokens is below its length")
        longest = max(r.max_tokens for r in rows)
        if longest > self.stage.spec.max_positions:
            raise InvalidArgument(
                f"a row may reach {longest} tokens, over the model's "
                f"{self.stage.spec.max_positions} positions"
            )
        if any(r.tokens and len(r.tokens) != r.length for r in rows):
            raise InvalidArgument("a row's tokens are not its length")
        cached = self._cached(rows, start, width, input_dtype) if from_prefix else []
        own = len(rows) * capacity_for(rows, width)
        extra = 0 if more else self._merge_extra(merge_into, rows, width, own)
        self._reserve(own + extra, len(rows))
        self._with_grammars(rows)
        batch, hidden = StageBatch.prefill(self.stage, batch_id, rows, inputs, width, start, cached)
        batch.input_dtype = input_dtype
        self.reused_tokens += sum(int(kv.shape[3]) for _, _, kv in cached)
        self.batches[batch_id] = batch
        if extra:
            self.reserved[batch_id] = extra
        if not more:
            self._remember(batch)
        return self._chunk_output(batch, hidden, more)

    def _needed(
        self, rows: list[Row], start: int, width: int, input_dtype: str
    ) -> list[tuple[int, int, int, list[bytes]]]:
        """(row index, first column, tokens reused, block keys) of each row that has columns
        before `start`: what a prefill from cached prefixes takes from the store."""
        needed = []
        for index, row in enumerate(rows):
            first = width - row.length
            reused = start - first
            if reused <= 0:
                continue  # its prompt starts at or after `start`: nothing to reuse
            if reused >= row.length or not row.tokens:
                raise InvalidArgument(
                    f"row {row.request_id} would reuse {reused} of its {row.length} tokens "
                    "(at most all but the last, and only with its tokens sent)"
                )
            if len(row.tokens) != row.length:
                raise InvalidArgument("a row's tokens are not its length")
            blocks = -(-reused // BLOCK_TOKENS)
            keys = self.prefixes.keys(input_dtype, block_hashes(row.tokens, blocks * BLOCK_TOKENS))
            if len(keys) < blocks:
                raise InvalidArgument(f"row {row.request_id} has no {blocks} whole blocks")
            needed.append((index, first, reused, keys))
        if not needed:
            raise InvalidArgument(f"no row has cached columns before column {start}")
        return needed

    def missing(self, rows: list[Row], start: int, width: int, input_dtype: str) -> list[bytes]:
        """The block keys a prefill from cached prefixes needs that the store does not hold."""
        return [
            key
            for *_, keys in self._needed(rows, start, width, input_dtype)
            for key in keys
            if key not in self.prefixes
        ]

    def adopt(self, blocks: dict[bytes, torch.Tensor]) -> int:
        """Takes blocks fetched from the shared tier into the store, in what the batches leave
        of the budget; returns how many it kept."""
        kept = 0
        fetched = frozenset(blocks)
        for key, block in blocks.items():
            if not self._room_for_block(fetched):
                break
            self.prefixes.put(key, block)
            kept += 1
        return kept

    def _room_for_block(self, keep: frozenset[bytes]) -> bool:
        """Makes room for one more block (pushing out others' blocks, never `keep`)."""
        free = self.budget_tokens - self.kv_tokens - self.prefixes.tokens
        if free < BLOCK_TOKENS:
            self.prefixes.evict(BLOCK_TOKENS - free, keep=keep)
        return self.budget_tokens - self.kv_tokens - self.prefixes.tokens >= BLOCK_TOKENS

    def _cached(
        self, rows: list[Row], start: int, width: int, input_dtype: str
    ) -> list[tuple[int, int, torch.Tensor]]:
        """Each row's KV for the columns before `start`, from the prefix store."""
        runs = []
        for index, first, reused, keys in self._needed(rows, start, width, input_dtype):
            if self.prefixes.held(keys) < len(keys):
                raise PrefixMissing(
                    f"row {rows[index].request_id}: {reused} cached prompt tokens are not held here"
                )
            kv = torch.cat(self.prefixes.get(keys), dim=3)[:, :, :, :reused]
            runs.append((index, first, kv))
        return runs

    def take_fresh(self) -> list[tuple[bytes, torch.Tensor]]:
        """The blocks the store kept since the last call (for the shared tier to write)."""
        fresh, self.fresh = self.fresh, []
        return fresh

    def _remember(self, batch: StageBatch) -> None:
        """Keeps the whole blocks of the batch's prompts (those not held yet) in what the batches
        leave of the budget."""
        for index, row in enumerate(batch.rows):
            if not row.tokens:
                continue
            keys = self.prefixes.keys(batch.input_dtype, block_hashes(row.tokens))
            mine = frozenset(keys)  # a prompt's blocks never push out its own earlier ones
            first = batch.first_column(index)
            for number, key in enumerate(keys):
                if key in self.prefixes:
                    self.prefixes.held([key])
                    continue
                if not self._room_for_block(mine):
                    return  # the batches hold (nearly) the whole budget
                column = first + number * BLOCK_TOKENS
                block = batch.cache.block(index, column, BLOCK_TOKENS)
                self.prefixes.put(key, block)
                if self.shared:
                    self.fresh.append((key, block))

    def _next_chunk(
        self,
        batch_id: str,
        rows: list[Row],
        inputs: torch.Tensor,
        merge_into: str,
        start: int,
        width: int,
        more: bool,
    ) -> StepOutput:
        batch = self._take(batch_id)
        if (
            not batch.prefilling
            or batch.cache.length != start
            or batch.prefill_width != width
            or [r.request_id for r in rows] != [r.request_id for r in batch.rows]
        ):
            raise InvalidArgument(
                f"batch {batch_id[:80]!r} does not continue at column {start} of width {width} "
                "with these rows"
            )
        if int(inputs.shape[0]) != len(batch):
            raise InvalidArgument(f"{int(inputs.shape[0])} inputs for a batch of {len(batch)} rows")
        if not more:
            extra = self._merge_extra(merge_into, batch.rows, width, batch.kv_tokens)
            self._reserve(extra, 0)
            if extra:
                self.reserved[batch_id] = extra
        hidden = batch.extend(self.stage, inputs)
        if not more:
            self._remember(batch)
        return self._chunk_output(batch, hidden, more)

    def _chunk_output(self, batch: StageBatch, hidden: torch.Tensor, more: bool) -> StepOutput:
        if more and self.stage.is_last:
            return StepOutput(batch.batch_id, None, [], batch.kv_tokens)  # nothing sampled yet
        return self._output(batch, hidden)

    def _merge_extra(self, merge_into: str, rows: list[Row], width: int, own: int) -> int:
        """Slots the merge of a new batch into `merge_into` takes beyond both batches' own."""
        target = self.batches.get(merge_into) if merge_into else None
        if target is None:
            return 0
        merged = [*target.rows, *rows]
        # The running batch may take a few decode steps before the merge reaches this stage
        # (the steps already in flight on the chain), and each one widens the merged batch by
        # a column: the reservation covers MERGE_SLACK of them.
        length = max(target.cache.length + MERGE_SLACK, width)
        return max(0, len(merged) * capacity_for(merged, length) - target.kv_tokens - own)

    def decode(self, batch_ids: Sequence[str], inputs: torch.Tensor) -> StepOutput:
        if len(set(batch_ids)) != len(batch_ids):
            raise InvalidArgument("batch_ids repeat a batch")
        parts = [self._take(b) for b in batch_ids]
        if any(p.prefilling for p in parts):
            raise InvalidArgument("a batch whose chunked prefill is unfinished cannot decode")
        if len(parts) > 1:
            held = sum(p.kv_tokens + self.reserved.get(p.batch_id, 0) for p in parts)
            rows = [r for p in parts for r in p.rows]
            length = max(p.cache.length for p in parts)
            self._reserve(len(rows) * capacity_for(rows, length) - held, 0)
            merged = StageBatch.concatenate(parts)
            for part in parts:
                del self.batches[part.batch_id]
                self.reserved.pop(part.batch_id, None)
            self.batches[merged.batch_id] = merged
            parts = [merged]
        batch = parts[0]
        if int(inputs.shape[0]) != len(batch):
            raise InvalidArgument(f"{int(inputs.shape[0])} inputs for a batch of {len(batch)} rows")
        if batch.cache.length + 1 > batch.cache.capacity:
            raise InvalidArgument(
                f"batch {batch.batch_id[:80]!r} is full: its rows reached their max_tokens"
            )
        hidden = batch.decode(self.stage, inputs)
        return self._output(batch, hidden)

    def _output(self, batch: StageBatch, hidden: torch.Tensor) -> StepOutput:
        if self.stage.is_last:
            tokens, logprobs = batch.sample(self.stage, hidden)
            return StepOutput(batch.batch_id, None, tokens, batch.kv_tokens, logprobs)
        return StepOutput(batch.batch_id, hidden, None, batch.kv_tokens)

    def _with_grammars(self, rows: list[Row]) -> None:
        """Rows that must answer JSON get their grammar's matcher (the last stage samples)."""
        if not self.stage.is_last:
            return
        for row in rows:
            if row.sampling.json_schema:
                if self.grammars is None:
                    self.grammars = Grammars(self.stage.spec, int(self.stage.vocab_size))
                try:
                    row.matcher = self.grammars.matcher(row.sampling.json_schema, row.replay)
                except GrammarRefused as refused:
                    raise InvalidArgument(f"json_schema: {refused}") from None

    def filter(self, batch_id: str, keep: Sequence[int]) -> int:
        """Keeps the rows named by request id; an empty keep frees the batch. Returns slots held."""
        batch = self._take(batch_id)
        known = {r.request_id for r in batch.rows}
        if not set(keep) <= known:
            raise InvalidArgument("keep names request ids that are not in the batch")
        if not keep:
            del self.batches[batch_id]
            self.reserved.pop(batch_id, None)
            return 0
        if len(set(keep)) == len(batch):
            batch.last_used = time.monotonic()
            return batch.kv_tokens
        self.batches[batch_id] = batch = batch.filter(keep)
        return batch.kv_tokens

    def clear(self, batch_ids: Sequence[str]) -> None:
        for batch_id in batch_ids:
            self.batches.pop(batch_id, None)
            self.reserved.pop(batch_id, None)

    def expire(self, now: float | None = None) -> list[str]:
        """Frees batches no router has touched for idle_s (a router that died or forgot)."""
        now = time.monotonic() if now is None else now
        stale = [b for b, batch in self.batches.items() if now - batch.last_used > self.idle_s]
        self.clear(stale)
        return stale
