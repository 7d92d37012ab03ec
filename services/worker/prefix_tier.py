"""PrefixTier: the stages' prompt KV blocks shared through memcached, so a restarted or new stage
starts warm.

Each block a stage keeps is also written to memcached under its PrefixStore key (which covers the
fingerprint, span, precision, input dtype and the prompt's hash chain, so only a stage of the same
weights, span and wire ever reads it), sealed with the mesh's cache secret like every cached
value (services/cache/seal.py): a value that anything else wrote or changed is a miss. A prefill
that starts from cached blocks this stage lacks fetches them first. memcached's failures only
cost speed: a miss is a refused reuse, and the router prefills the rows from their first token.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Sequence

import numpy as np
import torch

from services.cache.seal import Seal
from services.cache.store import CacheStore
from services.common.prefix import BLOCK_TOKENS

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<5I")  # the block's shape: [2, layers, kv_heads, tokens, head_dim]
MAX_PENDING_BYTES = 256 << 20  # writes waiting for memcached beyond this are dropped
MAX_VALUE_BYTES = 4 << 20  # `tessera up` starts memcached with -I 4m


def encode(block: torch.Tensor) -> bytes:
    array = block.detach().to(torch.float32).contiguous().numpy()
    return _HEADER.pack(*array.shape) + array.astype("<f4", copy=False).tobytes()


def decode(value: bytes, layers: int, values_per_token: int) -> torch.Tensor | None:
    """A block of this stage's shape, or None when the value is anything else."""
    if len(value) < _HEADER.size:
        return None
    shape = _HEADER.unpack_from(value)
    count = int(np.prod(shape))
    if (
        shape[0] != 2
        or shape[1] != layers
        or shape[3] != BLOCK_TOKENS
        or count != values_per_token * BLOCK_TOKENS
        or len(value) != _HEADER.size + 4 * count
    ):
        return None
    array = np.frombuffer(value, dtype="<f4", offset=_HEADER.size).reshape(shape)
    return torch.from_numpy(array.astype(np.float32, copy=True))


class PrefixTier:
    """Reads and writes one stage's blocks in memcached."""

    def __init__(
        self,
        nodes: Sequence[str],
        secret: str,
        *,
        layers: int,
        kv_bytes_per_token: int,
        timeout_s: float = 1.0,
        ttl_s: int = 86_400,
    ) -> None:
        self.store = CacheStore(
            nodes,
            timeout_s=timeout_s,
            expire_s=ttl_s,
            seal=Seal(secret),
            max_value_bytes=MAX_VALUE_BYTES,
        )
        self.layers = layers
        self.values_per_token = kv_bytes_per_token // 4
        self.pending = 0  # bytes handed to writes not finished yet
        self.written = 0  # blocks written, ever
        self.fetched = 0  # blocks read back, ever
        self._writes: set[asyncio.Task[None]] = set()

    @staticmethod
    def _name(key: bytes) -> str:
        return "tp:" + key.hex()

    async def fetch(self, keys: Sequence[bytes]) -> dict[bytes, torch.Tensor]:
        """The blocks memcached holds of `keys` (a miss or a failure is simply absent)."""
        names = {self._name(k): k for k in keys}
        found = await self.store.get_many_async(list(names))
        blocks = {}
        for name, value in found.items():
            block = decode(value, self.layers, self.values_per_token)
            if block is not None:
                blocks[names[name]] = block
        self.fetched += len(blocks)
        return blocks

    def write(self, blocks: Sequence[tuple[bytes, torch.Tensor]]) -> None:
        """Writes blocks in the background; dropped when memcached is too far behind."""
        if not blocks:
            return
        items = {self._name(k): encode(b) for k, b in blocks}
        size = sum(len(v) for v in items.values())
        if self.pending + size > MAX_PENDING_BYTES:
            return
        self.pending += size

        async def run() -> None:
            try:
                await self.store.set_many_async(items)
                self.written += len(items)
            finally:
                self.pending -= size

        task = asyncio.get_running_loop().create_task(run())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    def close(self) -> None:
        self.store.close()
