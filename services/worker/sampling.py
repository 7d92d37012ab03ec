"""Choosing the next token where the logits are, so vocab-size logits never cross the network."""

from __future__ import annotations

import torch

from services.common.types import SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A per-session generator: seeded sessions replay the same tokens."""
    if params.greedy:
        return None
    generator = torch.Generator()
    if params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()
    return generator


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    position: int | None = None,
) -> int:
    """Picks one token id from a 1-D logits vector (greedy, temperature, top-k, top-p).

    With a seed and a position, the draw depends only on (seed, position): a generation resumed
    on another chain after a fault draws exactly the tokens it would have drawn.
    """
    if params.greedy:
        return int(torch.argmax(logits).item())
    if generator is not None and params.seed is not None and position is not None:
        generator.manual_seed((params.seed * 1_000_003 + position) % (2**63))
    # Shift before dividing: a tiny temperature must give -inf, never inf - inf = NaN.
    logits = logits.float()
    scores = (logits - logits.max()) / params.temperature
    if params.top_k > 0 and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        # Drop tokens once the mass before them already reaches top_p; the best always stays.
        drop = cumulative - torch.softmax(sorted_scores, dim=-1) >= params.top_p
        drop[0] = False
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())
