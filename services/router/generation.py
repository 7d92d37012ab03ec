"""Turning a stream of sampled tokens into text: incremental detokenizing and stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from services.router.frontends import ModelFrontend


@dataclass
class TextAssembler:
    """Decodes generated tokens, holds back text that may still become a stop string."""

    frontend: ModelFrontend
    stop: Sequence[str]
    token_ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of text handed out so far
    text: str = ""
    stopped: bool = False

    def add(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.text = self.frontend.decode(self.token_ids)
        # Cut once, at the earliest stop string, whatever order the stops were given in.
        cuts = [
            at
            for stop in self.stop
            if (at := self.text.find(stop, max(0, self.emitted - len(stop)))) != -1
        ]
        if cuts:
            self.text = self.text[: min(cuts)]
            self.stopped = True

    def take(self, final: bool) -> str:
        """The text that is safe to hand out now (all of it when final)."""
        end = len(self.text)
        if not final:
            # An incomplete UTF-8 sequence decodes to U+FFFD until its last byte arrives.
            while end > self.emitted and self.text[end - 1] == "\ufffd":
                end -= 1
            if self.stop:
                end = max(self.emitted, end - (max(len(s) for s in self.stop) - 1))
        piece = self.text[self.emitted : end]
        self.emitted = end
        return piece
