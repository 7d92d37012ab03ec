"""Turning a stream of sampled tokens into text: incremental detokenizing and stop strings.

Detokenizing is incremental, with TGI's two offsets: only the tokens from `prefix` on are
decoded per step (a few tokens of context, so byte-level and SentencePiece merges decode as they
would in the whole text), and text is taken once it grows and no longer ends in an incomplete
UTF-8 sequence (U+FFFD). Stop strings cut at their earliest match; text that may still become a
stop string is held back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass
class TextAssembler:
    """Decodes generated tokens, holds back text that may still become a stop string."""

    frontend: Decoder
    stop: Sequence[str]
    token_ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of text handed out so far
    text: str = ""  # the text decoded so far
    stopped: bool = False
    _prefix: int = 0  # tokens before this are decoded for good
    _read: int = 0  # tokens before this are in `text`

    def add(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        ids = self.token_ids
        before = self.frontend.decode(ids[self._prefix : self._read])
        after = self.frontend.decode(ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._extend(after[len(before) :])
            self._prefix, self._read = self._read, len(ids)

    def _extend(self, piece: str) -> None:
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += piece
        # Cut once, at the earliest stop string, whatever order the stops were given in.
        cuts = [at for stop in self.stop if (at := self.text.find(stop, start)) != -1]
        if cuts:
            self.text = self.text[: min(cuts)]
            self.stopped = True

    def flush(self) -> None:
        """Takes what is still undecoded (an incomplete sequence at the very end, say)."""
        if self.stopped or self._read == len(self.token_ids):
            return
        before = self.frontend.decode(self.token_ids[self._prefix : self._read])
        after = self.frontend.decode(self.token_ids[self._prefix :])
        if len(after) > len(before):
            self._extend(after[len(before) :])
        self._prefix = self._read = len(self.token_ids)

    def take(self, final: bool) -> str:
        """The text that is safe to hand out now (all of it when final)."""
        if final:
            self.flush()
        end = len(self.text)
        if not final and self.stop:
            end = max(self.emitted, end - (max(len(s) for s in self.stop) - 1))
        piece = self.text[self.emitted : end]
        self.emitted = end
        return piece
