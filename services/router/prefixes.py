"""PrefixIndex: which prompt blocks each chain's stages hold, as far as this router knows.

Every stage of a chain keeps the KV blocks of the prompts it prefilled (services/worker/prefix.py)
while its budget has room. The router records the block hashes of each prompt a chain finished
prefilling, and plans a later prefill that starts with recorded blocks to begin after them; the
stages check that they still hold them (a stage that evicted them or restarted answers
PrefixMissing, and the router forgets that prompt on that chain and prefills from the start).
The index is a hint, never an answer: a wrong entry costs one refused prefill, not a token. So it
is kept when a stage fails: the stage that replaces it at the same address reads the blocks back
from the shared prefix tier (services/worker/prefix_tier.py) when there is one, and otherwise
refuses once per prompt.

It also gives prefix affinity: of chains with close loads, a request goes where most of its
prompt is held, so a multi-turn chat lands where its history is.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from services.common.prefix import BLOCK_TOKENS, block_hashes, reusable_blocks

# At most 32 x 8,192 entries (~30 MB): 262,144 prompt tokens per chain, more than a stage's
# whole KV budget holds of a small model (SmolLM2's half: ~90,000 tokens in 2 GiB).
MAX_BLOCKS_PER_CHAIN = 8192
MAX_CHAINS = 32


class PrefixIndex:
    """Block hashes per chain (by its workers' addresses), least recently used first."""

    def __init__(
        self, max_blocks: int = MAX_BLOCKS_PER_CHAIN, max_chains: int = MAX_CHAINS
    ) -> None:
        self.max_blocks = max_blocks
        self.max_chains = max_chains
        self._chains: OrderedDict[tuple[str, ...], OrderedDict[bytes, None]] = OrderedDict()

    def matched(self, chain: tuple[str, ...], feed: Sequence[int]) -> int:
        """Tokens at the start of `feed` the chain holds as whole blocks (never its last)."""
        held = self._chains.get(chain)
        if not held:
            return 0
        count = 0
        for block in block_hashes(feed, reusable_blocks(len(feed)) * BLOCK_TOKENS):
            if block not in held:
                break
            held.move_to_end(block)
            count += 1
        return count * BLOCK_TOKENS

    def add(self, chain: tuple[str, ...], feed: Sequence[int]) -> None:
        """Every stage of `chain` finished prefilling `feed`: they keep its whole blocks."""
        blocks = block_hashes(feed)
        if not blocks:
            return
        held = self._chains.get(chain)
        if held is None:
            held = self._chains[chain] = OrderedDict()
            while len(self._chains) > self.max_chains:
                self._chains.popitem(last=False)
        self._chains.move_to_end(chain)
        for block in blocks:
            held[block] = None
            held.move_to_end(block)
        while len(held) > self.max_blocks:
            held.popitem(last=False)

    def forget(self, chain: tuple[str, ...], feed: Sequence[int]) -> None:
        """A stage of `chain` no longer holds (some of) `feed`'s blocks."""
        held = self._chains.get(chain)
        if held is not None:
            for block in block_hashes(feed):
                held.pop(block, None)
