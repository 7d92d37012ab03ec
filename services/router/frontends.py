"""Per-model text handling on the router: tokenizer, chat template, stop tokens. Loaded once."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from services.common.errors import InvalidArgument, NotFound
from services.common.repository import ModelSpec, model_spec
from services.common.types import ModelKind


class ModelFrontend:
    """Turns text into token ids and back for one model."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(spec.path)
        config = json.loads(spec.config_path.read_text())
        eos: set[int] = set()
        for source in (config, self._generation_config()):
            value = source.get("eos_token_id")
            if isinstance(value, int):
                eos.add(value)
            elif isinstance(value, list):
                eos.update(int(v) for v in value)
        if self.tokenizer.eos_token_id is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        self.eos_token_ids = frozenset(eos)
        self.max_length = spec.max_positions
        st_config = spec.path / "sentence_bert_config.json"
        if st_config.is_file():
            self.max_length = min(
                self.max_length,
                int(json.loads(st_config.read_text()).get("max_seq_length", self.max_length)),
            )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _generation_config(self) -> dict:
        path = self.spec.path / "generation_config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    @property
    def kind(self) -> ModelKind:
        return self.spec.kind

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def encode_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        if not self.tokenizer.chat_template:
            raise InvalidArgument(f"model {self.spec.name} has no chat template; send a prompt")
        text = self.tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in messages],
            add_generation_prompt=True,
            tokenize=False,
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_batch(self, texts: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
        """Pads to the longest text and truncates at the model's length, as encoders expect."""
        encoded = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length
        )
        return encoded["input_ids"], encoded["attention_mask"]

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, truncated at the model's length, unpadded."""
        return list(
            self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        )

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id or 0)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class Frontends:
    """Loads each model's frontend from the repository on first use."""

    def __init__(self, repository: Path) -> None:
        self.repository = repository
        self._frontends: dict[str, ModelFrontend] = {}
        self._lock = threading.Lock()

    def get(self, model: str) -> ModelFrontend:
        frontend = self._frontends.get(model)
        if frontend is not None:
            return frontend
        if not _NAME.fullmatch(model):
            raise NotFound(f"unknown model {model[:200]!r}")
        with self._lock:
            if model not in self._frontends:
                try:
                    self._frontends[model] = ModelFrontend(model_spec(self.repository, model))
                except OSError:
                    raise NotFound(f"unknown model {model!r}") from None
            return self._frontends[model]
