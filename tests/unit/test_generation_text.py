"""TextAssembler: incremental detokenizing and stop strings, with the tiny llama tokenizer.

The stream must never hand out text that a stop string later cuts away, and the pieces it hands
out must add up to the final text.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.common.repository import model_spec
from services.router.detokenize import TextAssembler
from services.router.frontends import ModelFrontend
from tests.tiny_models import VOCAB

WORDS = [t for t in VOCAB if t.isalpha() and len(t) > 1]
LETTERS = [t for t in VOCAB if len(t) == 1 and t.isalpha()]


@pytest.fixture(scope="module")
def frontend(tiny_repo: Path) -> ModelFrontend:
    return ModelFrontend(model_spec(tiny_repo, "tiny-llama"))


@dataclass
class Streamed:
    pieces: list[str]
    final: str
    stopped: bool
    tokens_used: int
    assembler: TextAssembler


def stream(frontend: ModelFrontend, ids: Sequence[int], stop: Sequence[str]) -> Streamed:
    """Drives an assembler the way the router's generation loop does, checking as it goes."""
    assembler = TextAssembler(frontend, list(stop))
    pieces: list[str] = []
    used = 0
    for token in ids:
        used += 1
        assembler.add(token)
        if assembler.stopped:
            break
        piece = assembler.take(final=False)
        pieces.append(piece)
        # What has been handed out is exactly the start of the current text.
        assert assembler.text.startswith("".join(pieces))
    pieces.append(assembler.take(final=True))
    return Streamed(pieces, assembler.text, assembler.stopped, used, assembler)


def reference(
    frontend: ModelFrontend, ids: Sequence[int], stop: Sequence[str]
) -> tuple[str, bool, int]:
    """Stops at the first token after which any stop string appears; cuts at its first match."""
    for used in range(1, len(ids) + 1):
        text = frontend.decode(ids[:used])
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            return text[: min(hits)], True, used
    return frontend.decode(ids), False, len(ids)


def ids_of(frontend: ModelFrontend, text: str) -> list[int]:
    ids = frontend.encode_prompt(text)
    assert frontend.decode(ids) == text  # the tiny tokenizer round-trips plain words
    return ids


# -- fixed cases -----------------------------------------------------------------------------


def test_without_stop_strings_text_streams_as_it_comes(frontend: ModelFrontend) -> None:
    text = "the cat sat on the mat and the dog sat in it"
    ids = ids_of(frontend, text)
    result = stream(frontend, ids, [])
    assert not result.stopped and result.tokens_used == len(ids)
    assert "".join(result.pieces) == result.final == text
    # Nothing is held back: each step hands out what its token added.
    for used, piece in enumerate(result.pieces[:-1], start=1):
        before = frontend.decode(ids[: used - 1]) if used > 1 else ""
        assert piece == frontend.decode(ids[:used])[len(before) :]
    assert result.pieces[-1] == ""


def test_stop_string_truncates_the_text(frontend: ModelFrontend) -> None:
    ids = ids_of(frontend, "the cat sat on the mat")
    result = stream(frontend, ids, ["sat on"])
    assert result.stopped
    assert result.final == "the cat "
    assert "".join(result.pieces) == "the cat "
    assert result.tokens_used == 4  # stopped at "on", never saw "the mat"


def test_stop_string_inside_a_token(frontend: ModelFrontend) -> None:
    ids = ids_of(frontend, "hello world and paris")
    result = stream(frontend, ids, ["orl"])
    assert result.final == "hello w" and "".join(result.pieces) == "hello w"
    assert result.tokens_used == 2


def test_stop_string_at_the_very_start(frontend: ModelFrontend) -> None:
    result = stream(frontend, ids_of(frontend, "the cat sat"), ["the"])
    assert result.stopped and result.final == "" and result.pieces == [""]


def test_earliest_stop_wins(frontend: ModelFrontend) -> None:
    ids = ids_of(frontend, "what is the capital of france")
    result = stream(frontend, ids, ["france", "capital", "is the"])
    assert result.final == "what " and result.tokens_used == 3
    assert "".join(result.pieces) == "what "


def test_held_back_text_is_released_when_no_stop_comes(frontend: ModelFrontend) -> None:
    text = "the cat sat on the mat"
    ids = ids_of(frontend, text)
    result = stream(frontend, ids, ["the dog sat"])
    assert not result.stopped
    assert "".join(result.pieces) == result.final == text
    # The stream holds back at most len(stop) - 1 characters before the final take.
    assert len(result.pieces[-1]) <= len("the dog sat") - 1
    # A stop string that starts to match and then does not never truncates anything.
    assert "".join(stream(frontend, ids, ["the mattress"]).pieces) == text


def test_a_partial_stop_prefix_is_never_streamed(frontend: ModelFrontend) -> None:
    ids = ids_of(frontend, "the cat sat on the mat")
    assembler = TextAssembler(frontend, ["cat sat"])
    assembler.add(ids[0])
    assembler.add(ids[1])  # "the cat": "cat" may become "cat sat"
    streamed = assembler.take(final=False)
    # Everything but the last len("cat sat") - 1 characters may go out.
    assert streamed == "the cat"[: len("the cat") - (len("cat sat") - 1)]
    assert not any(streamed.endswith("cat sat"[:n]) for n in range(1, len("cat sat")))
    assembler.add(ids[2])
    assert assembler.stopped and assembler.text == "the "
    assert streamed + assembler.take(final=True) == "the "


# -- randomised ------------------------------------------------------------------------------


def _random_case(rng: random.Random, frontend: ModelFrontend) -> tuple[list[int], list[str]]:
    pool = WORDS + LETTERS
    words = [rng.choice(pool) for _ in range(rng.randint(1, 14))]
    ids = ids_of(frontend, " ".join(words))
    full = frontend.decode(ids)
    stops: list[str] = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.random()
        if kind < 0.6 and full:
            start = rng.randrange(len(full))
            stops.append(full[start : start + rng.randint(1, 12)])
        elif kind < 0.8:
            stops.append(rng.choice(["xyz", "the dog ran", "zz", "?!"]))
        else:
            stops.append(" " + rng.choice(pool))
    return ids, [s for s in stops if s]


def _check_against_reference(frontend: ModelFrontend, ids: list[int], stops: list[str]) -> None:
    expected, stopped, used = reference(frontend, ids, stops)
    result = stream(frontend, ids, stops)
    context = f"ids={ids} stop={stops!r} text={frontend.decode(ids)!r}"
    assert result.final == expected, context
    assert "".join(result.pieces) == expected, context
    assert result.stopped == stopped and result.tokens_used == used, context
    for stop in stops:
        assert stop not in result.final, context
    # No piece streamed before the end reaches into the text a stop string removed.
    streamed = ""
    for piece in result.pieces:
        streamed += piece
        assert expected.startswith(streamed), context
    assert result.assembler.token_ids == list(ids[:used])


@pytest.mark.parametrize("seed", range(300))
def test_streams_agree_with_the_reference(frontend: ModelFrontend, seed: int) -> None:
    """One stop string per case (several are below)."""
    rng = random.Random(seed)
    ids, stops = _random_case(rng, frontend)
    _check_against_reference(frontend, ids, stops[:1])


@pytest.mark.parametrize("seed", range(100))
def test_several_stop_strings_that_do_not_overlap(frontend: ModelFrontend, seed: int) -> None:
    rng = random.Random(seed)
    ids, stops = _random_case(rng, frontend)
    text = frontend.decode(ids)
    # Keep stop strings whose first matches do not overlap another's
    # (the order-independence test covers overlaps).
    spans = []
    kept = []
    for stop in stops:
        at = text.find(stop)
        span = (at, at + len(stop)) if at >= 0 else None
        if span is None or all(s is None or span[1] <= s[0] or s[1] <= span[0] for s in spans):
            spans.append(span)
            kept.append(stop)
    _check_against_reference(frontend, ids, kept)


def test_stop_strings_are_order_independent(frontend: ModelFrontend) -> None:
    ids = ids_of(frontend, "the cat sat in it")
    for stops, expected in (
        (["n", "in"], "the cat sat "),
        (["in", "n"], "the cat sat "),
        (["t in", "n i"], "the cat sa"),
        (["n i", "t in"], "the cat sa"),
    ):
        assert reference(frontend, ids, stops)[0] == expected
        result = stream(frontend, ids, stops)
        assert result.final == expected, stops
        assert "".join(result.pieces) == expected, stops
    # And over random multi-stop cases.
    for seed in range(300):
        ids, stops = _random_case(random.Random(seed), frontend)
        assert stream(frontend, ids, stops).final == reference(frontend, ids, stops)[0]


# -- multi-byte characters -------------------------------------------------------------------


class _ByteFrontend:
    """A byte-level stand-in: one token per UTF-8 byte, as byte-fallback tokenizers behave."""

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("stop", [[], ["ü"], ["🙂 fin"], ["zzz"]])
def test_incomplete_utf8_is_never_streamed(stop: list[str]) -> None:
    text = "naïve café 🙂 déjà vu — fin"
    ids = list(text.encode("utf-8"))
    result = stream(_ByteFrontend(), ids, stop)  # type: ignore[arg-type]
    joined = "".join(result.pieces)
    assert "\ufffd" not in joined
    cut = min((text.find(s) for s in stop if s in text), default=len(text))
    assert joined == result.final == text[:cut]
