"""A batch's KV cache in buffers allocated once: rows left-aligned to a shared write column.

Every row of a batch writes its next token at the same column (``length``), so one decode step
is one forward pass over the whole batch and one in-place write per layer. Rows that hold fewer
tokens start further right; the columns before them are padding, masked out of attention and
filled with zeros (never garbage: 0 x NaN would poison the masked sum). Buffers are sized for the
longest row's whole generation when the batch is made, so they are re-laid only when batches
merge or shrink (``concatenate``/``select``), never per token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values: ``[rows, heads, capacity, head_dim]`` buffers."""

    is_sliding = False
    is_compileable = False

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0  # columns written so far (the same for every row)
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, heads, _, dim = key_states.shape
        shape = (rows, heads, self.capacity, dim)
        self.key_buffer = key_states.new_zeros(shape)
        self.value_buffer = value_states.new_zeros(shape)
        self.is_initialized = True

    def allocate(self, rows: int, heads: int, dim: int, dtype: torch.dtype) -> None:
        """Zeroed buffers made before the first update (a prefill that starts from cached KV)."""
        shape = (rows, heads, self.capacity, dim)
        self.adopt(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype), 0)

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """Takes buffers laid out elsewhere (a merge or a filter), `length` columns written."""
        self.key_buffer, self.value_buffer = keys, values
        self.capacity = int(keys.shape[2])
        self.length = length
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.key_buffer is not None and self.value_buffer is not None
        end = self.length + int(key_states.shape[2])
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} columns in a batch sized for {self.capacity}")
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys = self.key_buffer[:, :, :end]
        self.values = self.value_buffer[:, :, :end]
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity


class SlotCache(Cache):
    """The KV cache of one batch on one stage: a SlotLayer per layer of the stage's span."""

    def __init__(self, num_layers: int, capacity: int) -> None:
        super().__init__(layers=[SlotLayer(capacity) for _ in range(num_layers)])

    @property
    def slot_layers(self) -> list[SlotLayer]:
        return self.layers  # type: ignore[return-value]

    @property
    def length(self) -> int:
        return self.slot_layers[0].length

    @property
    def capacity(self) -> int:
        return self.slot_layers[0].capacity

    def preload(
        self, rows: int, runs: Sequence[tuple[int, int, torch.Tensor]], length: int
    ) -> None:
        """Fills columns from cached blocks before a prefill that starts at column `length`.

        Each run is (row, first column, blocks [2, layers, heads, tokens, dim]); columns not
        filled stay zero (padding) and every layer's write column becomes `length`."""
        _, _, heads, _, dim = runs[0][2].shape
        for index, layer in enumerate(self.slot_layers):
            layer.allocate(rows, int(heads), int(dim), runs[0][2].dtype)
            assert layer.key_buffer is not None and layer.value_buffer is not None
            for row, first, kv in runs:
                cols = slice(first, first + int(kv.shape[3]))
                layer.key_buffer[row, :, cols] = kv[0, index]
                layer.value_buffer[row, :, cols] = kv[1, index]
            layer.length = length
            layer.keys = layer.key_buffer[:, :, :length]
            layer.values = layer.value_buffer[:, :, :length]

    def block(self, row: int, first: int, tokens: int) -> torch.Tensor:
        """Columns [first, first + tokens) of one row on every layer: [2, layers, heads, t, dim]."""
        parts = []
        for layer in self.slot_layers:
            assert layer.key_buffer is not None and layer.value_buffer is not None
            cols = slice(first, first + tokens)
            parts.append(
                torch.stack((layer.key_buffer[row, :, cols], layer.value_buffer[row, :, cols]))
            )
        return torch.stack(parts, dim=1).contiguous()

    def nbytes(self) -> int:
        """Bytes allocated, padding included (what the budget counts)."""
        total = 0
        for layer in self.slot_layers:
            for buffer in (layer.key_buffer, layer.value_buffer):
                if buffer is not None:
                    total += buffer.numel() * buffer.element_size()
        return total

    @classmethod
    def concatenate(
        cls, caches: Sequence[SlotCache], starts: Sequence[int], capacity: int
    ) -> SlotCache:
        """One cache holding every row of `caches` in order, right-aligned at the longest length.

        `starts[i]` is the column where cache i's first column lands; capacity is the new size.
        """
        length = max(c.length for c in caches)
        merged = cls(len(caches[0].layers), capacity)
        for index, layer in enumerate(merged.slot_layers):
            parts = [c.slot_layers[index] for c in caches]
            ref = next((p.key_buffer for p in parts if p.key_buffer is not None), None)
            if ref is None:
                continue
            rows = sum(int(p.key_buffer.shape[0]) for p in parts if p.key_buffer is not None)
            shape = (rows, ref.shape[1], capacity, ref.shape[3])
            keys, values = ref.new_zeros(shape), ref.new_zeros(shape)
            row = 0
            for part, start in zip(parts, starts, strict=True):
                assert part.key_buffer is not None and part.value_buffer is not None
                n = int(part.key_buffer.shape[0])
                cols = slice(start, start + part.length)
                keys[row : row + n, :, cols] = part.key_buffer[:, :, : part.length]
                values[row : row + n, :, cols] = part.value_buffer[:, :, : part.length]
                row += n
            layer.adopt(keys, values, length)
        return merged

    def select(self, rows: torch.Tensor, first_column: int, capacity: int) -> SlotCache:
        """A cache of only `rows`, dropping the leading columns no kept row uses."""
        kept = SlotCache(len(self.layers), capacity)
        length = self.length - first_column
        for layer, source in zip(kept.slot_layers, self.slot_layers, strict=True):
            if source.key_buffer is None or source.value_buffer is None:
                continue
            shape = (
                int(rows.numel()),
                source.key_buffer.shape[1],
                capacity,
                source.key_buffer.shape[3],
            )
            keys = source.key_buffer.new_zeros(shape)
            values = source.value_buffer.new_zeros(shape)
            keys[:, :, :length] = source.key_buffer[rows, :, first_column : source.length]
            values[:, :, :length] = source.value_buffer[rows, :, first_column : source.length]
            layer.adopt(keys, values, length)
        return kept
