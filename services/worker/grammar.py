"""Structured output on the last stage: a JSON schema masks the logits before each token is
picked, so the answer always parses and fits the schema.

llguidance (a small Rust wheel) turns a schema into a matcher over the model's tokenizer and
computes the allowed tokens of each step as a bitmask in tens of microseconds; we apply the mask
ourselves (numpy unpacks the bits: its own torch helper is far slower on the CPU). Tokenizers are
built once per worker; compiled grammars are kept per schema (LRU). A row's matcher consumes the
tokens it generates; after a fault, the prefill replays what the row already generated.
"""

from __future__ import annotations

import collections
import threading

import llguidance
import numpy as np
import torch

from services.common.grammar import check_schema
from services.common.repository import ModelSpec

MAX_SCHEMAS = 64  # compiled grammars kept per worker


class GrammarRefused(ValueError):
    """The schema is not one llguidance can compile (the router checks before it sends)."""


class Grammars:
    """The tokenizer's view llguidance needs, and matchers for the schemas rows ask for."""

    def __init__(self, spec: ModelSpec, vocab_size: int) -> None:
        self._spec = spec
        self._vocab = vocab_size
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._grammars: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            from services.router.frontends import ModelFrontend

            frontend = ModelFrontend(self._spec)
            self._tokenizer = llguidance.LLTokenizer(
                frontend.tokenizer.to_str(),
                n_vocab=self._vocab,
                eos_token=sorted(frontend.eos_token_ids),
            )
        return self._tokenizer

    def matcher(self, schema: str, replay: list[int]) -> llguidance.LLMatcher:
        """A matcher for `schema` that has consumed `replay` (tokens generated before)."""
        with self._lock:
            grammar = self._grammars.get(schema)
            if grammar is None:
                problem = check_schema(schema)
                if problem:
                    raise GrammarRefused(problem)
                grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
                self._grammars[schema] = grammar
                while len(self._grammars) > MAX_SCHEMAS:
                    self._grammars.popitem(last=False)
            else:
                self._grammars.move_to_end(schema)
        matcher = llguidance.LLMatcher(self._llg_tokenizer(), grammar)
        if replay:
            matcher.consume_tokens(replay)
        return matcher


def allowed(matcher: llguidance.LLMatcher, vocab_size: int) -> torch.Tensor:
    """The tokens the matcher allows next, as a bool tensor of `vocab_size`."""
    words = (vocab_size + 31) // 32
    mask = np.zeros(words, dtype=np.int32)
    matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab_size]
    return torch.from_numpy(bits.astype(bool))
