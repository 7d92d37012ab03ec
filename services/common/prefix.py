"""Prefix blocks: a prompt's tokens cut into blocks, each named by a hash of everything before it.

vLLM's automatic prefix caching, for a span of layers: block i's hash covers the hash of block
i-1 and block i's token ids, so equal hashes mean equal prompts up to the end of that block, and
a prompt's cached prefix is the run of its leading block hashes a store holds. The router (which
blocks a chain holds) and each worker (its own KV blocks) compute them with this one function.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

BLOCK_TOKENS = 32


def block_hashes(tokens: Sequence[int], limit: int | None = None) -> list[bytes]:
    """The hashes of the whole blocks among the first `limit` tokens (default: all of them)."""
    count = len(tokens) if limit is None else min(limit, len(tokens))
    ids = np.asarray(tokens[: count - count % BLOCK_TOKENS], dtype="<i8")
    hashes: list[bytes] = []
    parent = b""
    for start in range(0, int(ids.size), BLOCK_TOKENS):
        parent = hashlib.blake2b(
            parent + ids[start : start + BLOCK_TOKENS].tobytes(), digest_size=16
        ).digest()
        hashes.append(parent)
    return hashes


def reusable_blocks(length: int) -> int:
    """Whole blocks a prompt of `length` tokens may take from a cache: its last token is always
    run again (its hidden state is what the next stage or the sampler needs)."""
    return max(0, length - 1) // BLOCK_TOKENS
