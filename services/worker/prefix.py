"""PrefixStore: the KV blocks of prompts this stage prefilled, for prompts that start alike.

One block is BLOCK_TOKENS tokens of one prompt on every layer of the stage's span, keys and values
as one float32 tensor [2, layers, kv_heads, BLOCK_TOKENS, head_dim]. Its key covers the block's
hash chain (services/common/prefix.py) and everything else its values depend on: the model's
fingerprint, the span, the precision, and the dtype the stage's input arrived in (a later stage's
KV differs when the hidden states between stages travel as bfloat16). So a block is only ever
read by the weights and the wire that made it; a new version never reads another's.

The store lives inside the worker's KV budget: it keeps what the batches leave free and gives it
back (least recently used first) whenever a batch needs room. A batch copies the blocks it reuses
into its own buffers, so nothing a batch holds is shared and a block can go at any time.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import torch

from services.common.prefix import BLOCK_TOKENS


class PrefixStore:
    """Blocks by key, least recently used first."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace.encode()
        self._blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    @property
    def tokens(self) -> int:
        return len(self._blocks) * BLOCK_TOKENS

    def keys(self, input_dtype: str, hashes: Sequence[bytes]) -> list[bytes]:
        """The store's keys of a prompt's block hashes for input arriving as `input_dtype`."""
        salt = hashlib.blake2b(self.namespace + b"|" + input_dtype.encode(), digest_size=16)
        return [hashlib.blake2b(salt.digest() + h, digest_size=16).digest() for h in hashes]

    def held(self, keys: Sequence[bytes]) -> int:
        """How many of the leading `keys` are held (those become the most recently used)."""
        count = 0
        for key in keys:
            if key not in self._blocks:
                break
            self._blocks.move_to_end(key)
            count += 1
        return count

    def get(self, keys: Sequence[bytes]) -> list[torch.Tensor]:
        return [self._blocks[key] for key in keys]

    def put(self, key: bytes, block: torch.Tensor) -> None:
        self._blocks[key] = block
        self._blocks.move_to_end(key)

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    def evict(self, tokens: int, keep: frozenset[bytes] = frozenset()) -> int:
        """Frees at least `tokens` token slots, least recently used first, sparing `keep` (or
        everything else there is); returns the slots freed."""
        doomed: list[bytes] = []
        for key in self._blocks:
            if len(doomed) * BLOCK_TOKENS >= tokens:
                break
            if key not in keep:
                doomed.append(key)
        for key in doomed:
            del self._blocks[key]
        return len(doomed) * BLOCK_TOKENS

    def clear(self) -> None:
        self._blocks.clear()
