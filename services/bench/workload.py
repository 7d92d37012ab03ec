"""Deterministic, distinct inputs: sentences of realistic, varied length and generation prompts.

Every text is unique within a pool (a serial number rides along inside the sentence) so the
cache tier can never answer a request that is meant to be a miss.
"""

from __future__ import annotations

import random

_SUBJECTS = [
    "the engineer",
    "a small team",
    "our customer",
    "the new service",
    "the operator",
    "every replica",
    "the scheduler",
    "a curious student",
    "the city council",
    "the weather model",
    "my neighbour",
    "the research group",
    "the old library",
    "a travelling musician",
    "the support desk",
    "the farmer",
    "the museum",
]
_VERBS = [
    "measured",
    "rebuilt",
    "described",
    "questioned",
    "shipped",
    "reviewed",
    "explained",
    "compared",
    "repaired",
    "planned",
    "translated",
    "painted",
    "tested",
    "organised",
]
_OBJECTS = [
    "the latency of every request",
    "a bridge across the river",
    "the quarterly report",
    "an unusual pattern in the logs",
    "the history of the harbour",
    "a recipe for bread",
    "the cost of the storage tier",
    "two competing proposals",
    "the garden behind it",
    "a set of failing tests",
    "the schedule for next spring",
    "the rules of the game",
]
_TAILS = [
    "before the meeting started",
    "while it was raining outside",
    "with great care",
    "after a long and tiring week",
    "because nobody else had time",
    "in under an hour",
    "for the third time this month",
    "using only a notebook and a pencil",
    "so that the next release would be calmer",
    "and wrote down what surprised them",
    "although the numbers looked strange at first",
    "near the station",
]
_FILLER = [
    "quietly",
    "carefully",
    "again",
    "finally",
    "together",
    "slowly",
    "early",
    "almost",
    "perhaps",
    "still",
    "mostly",
    "really",
]
_TOPICS = [
    "a lighthouse keeper",
    "a lost robot",
    "a mountain village",
    "a river that talks",
    "an old clock",
    "a dragon who bakes",
    "a space station",
    "a detective cat",
    "a winter market",
    "a forgotten song",
    "an island library",
    "a paper airplane",
]


def sentence(rng: random.Random, serial: int, min_words: int = 8, max_words: int = 40) -> str:
    """One sentence of min_words..max_words words (roughly), unique by its serial number."""
    target = rng.randint(min_words, max_words)
    words = (
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
    ).split()
    while len(words) < target - 2:
        extra = rng.choice([_FILLER, _TAILS, _OBJECTS])
        words += rng.choice(extra).split()
    words = words[: max(target - 2, 4)]
    words += ["note", str(serial)]
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def texts(count: int, *, seed: int, start: int = 0) -> list[str]:
    """count distinct sentences; pools with different `start` never overlap."""
    rng = random.Random(seed)
    return [sentence(rng, start + i) for i in range(count)]


def prompts(count: int, *, seed: int, start: int = 0) -> list[str]:
    """count distinct user messages that ask for more text than a short generation allows."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        topic, other = rng.choice(_TOPICS), rng.choice(_TOPICS)
        out.append(
            f"Write a long, detailed story about {topic} and {other}. "
            f"Give it the title 'Story {start + i}'."
        )
    return out
