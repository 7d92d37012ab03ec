"""Per-model text handling on the router: tokenizer, chat template, stop tokens. Loaded once.

Built on the `tokenizers` library and Jinja alone, so the router never imports transformers (nor
torch through it). `load_tokenizer` applies the settings that transformers' `AutoTokenizer`
(v5, `TokenizersBackend`) applies on top of tokenizer.json: the special tokens of
tokenizer_config.json / special_tokens_map.json, the post-processor, no truncation or padding
baked in from the file. tests/unit/test_frontends.py proves the ids equal to transformers'.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import AddedToken, Tokenizer, processors

from services.common.errors import InvalidArgument, NotFound, quoted
from services.common.repository import ModelSpec, model_spec
from services.common.types import ModelKind
from services.router.chat import ChatTemplate, TemplateRejected, find_template

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
# transformers' SPECIAL_TOKENS_ATTRIBUTES, in its order.
NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Long texts are tokenized only up to this many characters per token they may keep (words are
# rarely a tenth as long), so a 32k-character text costs a fraction of its full tokenization.
CUT_CHARS_PER_TOKEN = 16
_ADDED_TOKEN_FIELDS = ("single_word", "lstrip", "rstrip", "normalized", "special")
log = logging.getLogger("tessera.router")


@dataclass(frozen=True)
class TokenizerSettings:
    """What tokenizer_config.json (and the legacy special_tokens_map.json) add to tokenizer.json."""

    special_tokens: dict[str, str]  # named (bos_token, ...) and model-specific (image_token, ...)
    to_add: list[AddedToken]  # added if tokenizer.json lacks them, in transformers' order
    clean_up_tokenization_spaces: bool
    clean_up_bpe_anyway: bool
    split_special_tokens: bool
    padding_side: str
    truncation_side: str
    config: dict[str, Any]


def _added_token(value: Any, *, special: bool | None) -> AddedToken | None:
    """A token as tokenizer_config.json writes it (a string or an AddedToken dict); `special`
    overrides the dict's own flag when given."""
    if isinstance(value, str):
        return AddedToken(value, special=bool(special))
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        fields = {k: bool(value[k]) for k in _ADDED_TOKEN_FIELDS if k in value}
        if special is not None:
            fields["special"] = special
        return AddedToken(value["content"], **fields)
    return None


def read_settings(path: Path, tokenizer: Tokenizer) -> TokenizerSettings:
    """The settings transformers' `from_pretrained` reads, resolved as it resolves them."""
    config_file = path / TOKENIZER_CONFIG_FILE
    config: dict[str, Any] = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if "added_tokens_decoder" not in config:
        # Legacy layout: special_tokens_map.json overrides tokenizer_config.json.
        map_file = path / SPECIAL_TOKENS_MAP_FILE
        if map_file.is_file():
            for key, value in json.loads(map_file.read_text()).items():
                if key in ("additional_special_tokens", "extra_special_tokens") and isinstance(
                    value, list
                ):
                    existing = list(config.get("extra_special_tokens") or [])
                    existing += [v for v in value if v not in existing]
                    config["extra_special_tokens"] = existing
                else:
                    config[key] = value
    if "additional_special_tokens" in config and not config.get("extra_special_tokens"):
        config["extra_special_tokens"] = config.pop("additional_special_tokens")
    extra = config.get("extra_special_tokens") or []
    named: dict[str, AddedToken] = {}
    keys = list(NAMED_SPECIAL_TOKENS)
    keys += [k for k in config if k.endswith("_token") and k not in NAMED_SPECIAL_TOKENS]
    if isinstance(extra, dict):  # a dict of extra tokens names them (model-specific tokens)
        keys += list(extra)
        config = {**config, **extra}
        extra = []
    for key in keys:
        token = _added_token(config.get(key), special=True)
        if token is not None:
            named[key] = token
    to_add: list[AddedToken] = []
    decoder = config.get("added_tokens_decoder") or {}
    named_contents = {t.content for t in named.values()}
    for index in sorted(decoder, key=int):
        value = decoder[index]
        is_named = isinstance(value, dict) and value.get("content") in named_contents
        token = _added_token(value, special=True if is_named else None)
        if token is not None:
            to_add.append(token)
    to_add += named.values()
    to_add += [t for t in (_added_token(v, special=True) for v in extra) if t is not None]
    truncation = tokenizer.truncation or {}
    padding = tokenizer.padding or {}
    return TokenizerSettings(
        special_tokens={key: token.content for key, token in named.items()},
        to_add=to_add,
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        clean_up_bpe_anyway=bool(
            config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")
        ),
        split_special_tokens=bool(config.get("split_special_tokens", False)),
        padding_side=config.get("padding_side") or padding.get("direction") or "right",
        truncation_side=config.get("truncation_side") or truncation.get("direction") or "right",
        config=config,
    )


def load_tokenizer(path: Path) -> tuple[Tokenizer, TokenizerSettings]:
    """tokenizer.json with transformers' settings applied; no truncation or padding of its own
    (transformers turns the file's off unless a call asks for them)."""
    tokenizer_file = path / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{tokenizer_file} is missing (`tessera prepare` writes it)")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    settings = read_settings(path, tokenizer)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    present = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    missing: list[AddedToken] = []
    for token in settings.to_add:
        if token.content and token.content not in present:
            present.add(token.content)
            missing.append(token)
    if missing:
        tokenizer.add_tokens(missing)
    if tokenizer.post_processor is None:
        # transformers' update_post_processor with add_bos/eos off: it ignores those settings
        # of tokenizer_config.json whenever tokenizer.json exists.
        tokenizer.post_processor = processors.TemplateProcessing(
            single="$A:0", pair="$A:0 $B:1", special_tokens=[]
        )
    tokenizer.encode_special_tokens = settings.split_special_tokens
    return tokenizer, settings


def clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization (spaces before punctuation and contractions)."""
    return (
        text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


class ModelFrontend:
    """Turns text into token ids and back for one model."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.tokenizer, self.settings = load_tokenizer(spec.path)
        special = dict(self.settings.special_tokens)
        if "pad_token" not in special and "eos_token" in special:
            special["pad_token"] = special["eos_token"]  # pad with eos, as generate() does
        self.special_tokens: Mapping[str, str] = special
        unk = self._token_id(special.get("unk_token"), None)
        self.eos_token_id = self._token_id(special.get("eos_token"), unk)
        self.pad_token_id = self._token_id(special.get("pad_token"), unk)
        config = json.loads(spec.config_path.read_text())
        eos: set[int] = set()
        for source in (config, self._generation_config()):
            value = source.get("eos_token_id")
            if isinstance(value, int):
                eos.add(value)
            elif isinstance(value, list):
                eos.update(int(v) for v in value)
        if self.eos_token_id is not None:
            eos.add(self.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.max_length = spec.max_positions
        st_config = spec.path / "sentence_bert_config.json"
        if st_config.is_file():
            self.max_length = min(
                self.max_length,
                int(json.loads(st_config.read_text()).get("max_seq_length", self.max_length)),
            )
        self._specials_added = self.tokenizer.num_special_tokens_to_add(False)
        self._clean_up = self.settings.clean_up_tokenization_spaces and (
            type(self.tokenizer.model).__name__ != "BPE" or self.settings.clean_up_bpe_anyway
        )
        self.chat_template: ChatTemplate | None = None
        self._no_chat = f"model {spec.name} has no chat template; send a prompt"
        source = find_template(spec.path, self.settings.config)
        if source:
            try:
                self.chat_template = ChatTemplate(source, special)
            except jinja2.TemplateSyntaxError as exc:
                log.warning("model %s: chat template does not compile: %s", spec.name, exc)
                self._no_chat = f"model {spec.name}'s chat template does not compile: {exc}"

    def _token_id(self, token: str | None, fallback: int | None) -> int | None:
        if token is None:
            return None
        found = self.tokenizer.token_to_id(token)
        return fallback if found is None else found

    def _generation_config(self) -> dict:
        path = self.spec.path / "generation_config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    @property
    def kind(self) -> ModelKind:
        return self.spec.kind

    def encode_prompt(self, prompt: str, at_most: int | None = None) -> list[int]:
        """The prompt's ids. With `at_most`, a long prompt is tokenized up to a whitespace
        near CUT_CHARS_PER_TOKEN x at_most characters first: if that prefix is already over
        `at_most` tokens the prompt is too long whatever follows, and its (partial) ids say so."""
        if at_most is not None:
            prefix = self._prefix(prompt, at_most)
            if prefix is not prompt:
                ids = self.tokenizer.encode(prefix).ids
                if len(ids) > at_most:
                    return ids
        return self.tokenizer.encode(prompt).ids

    def encode_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        if self.chat_template is None:
            raise InvalidArgument(self._no_chat)
        try:
            text = self.chat_template.render(messages, add_generation_prompt=True)
        except TemplateRejected as exc:
            raise InvalidArgument(f"model {self.spec.name}'s chat template: {exc}") from None
        except jinja2.TemplateError as exc:
            raise InvalidArgument(
                f"model {self.spec.name}'s chat template cannot render these messages: {exc}"
            ) from None
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _truncated(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids per text, cut at max_length as transformers' truncation=True cuts them: the text
        is cut before the post-processor adds its special tokens, so they stay.

        A long text is tokenized only up to a whitespace near CUT_CHARS_PER_TOKEN x max_length
        characters: when that prefix already holds more tokens than are kept, the kept ones are
        the whole text's (every word before the cut tokenizes alone); else the whole text is
        tokenized after all."""
        keeps_start = self.settings.truncation_side == "right"
        sources = [self._prefix(t, self.max_length, keeps_start=keeps_start) for t in texts]
        if len(texts) == 1:  # encode skips the batch machinery: faster for one text
            encodings = [self.tokenizer.encode(sources[0])]
        else:
            encodings = self.tokenizer.encode_batch_fast(sources)
        rows: list[list[int]] = []
        for text, source, encoding in zip(texts, sources, encodings, strict=True):
            if len(encoding.ids) <= self.max_length and source is not text:
                source, encoding = text, self.tokenizer.encode(text)
            if len(encoding.ids) > self.max_length:
                plain = self.tokenizer.encode(source, add_special_tokens=False)
                plain.truncate(
                    max(self.max_length - self._specials_added, 0),
                    direction=self.settings.truncation_side,
                )
                encoding = self.tokenizer.post_process(plain, None, True)
            rows.append(encoding.ids)
        return rows

    def _prefix(self, text: str, tokens: int, *, keeps_start: bool = True) -> str:
        """`text` up to its last whitespace before CUT_CHARS_PER_TOKEN x `tokens` characters
        (the text itself when shorter, or when what is kept is not its start)."""
        limit = tokens * CUT_CHARS_PER_TOKEN
        if len(text) <= limit or not keeps_start:
            return text
        cut = max(text.rfind(" ", 0, limit), text.rfind("\n", 0, limit))
        return text[:cut] if cut > 0 else text

    def encode_batch(self, texts: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
        """Pads to the longest text and truncates at the model's length, as encoders expect."""
        rows = self._truncated(texts)
        width = max((len(row) for row in rows), default=0)
        pad = self.pad_id
        left = self.settings.padding_side == "left"
        ids: list[list[int]] = []
        masks: list[list[int]] = []
        for row in rows:
            fill = width - len(row)
            if left:
                ids.append([pad] * fill + row)
                masks.append([0] * fill + [1] * len(row))
            else:
                ids.append(row + [pad] * fill)
                masks.append([1] * len(row) + [0] * fill)
        return ids, masks

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, truncated at the model's length, unpadded."""
        return self._truncated(texts)

    @property
    def pad_id(self) -> int:
        return int(self.pad_token_id or 0)

    def decode(self, ids: Sequence[int]) -> str:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=True)
        return clean_up_tokenization(text) if self._clean_up else text


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
            raise NotFound(f"unknown model {quoted(model)}")
        with self._lock:
            if model not in self._frontends:
                try:
                    self._frontends[model] = ModelFrontend(model_spec(self.repository, model))
                except OSError:
                    raise NotFound(f"unknown model {quoted(model)}") from None
            return self._frontends[model]
