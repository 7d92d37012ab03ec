"""The model repository: one folder per model name holding config, safetensors and tokenizer.

A model's own folder is its first version. Versions published later (`tessera models publish`)
live beside it, one immutable folder each: `<repository>/.versions/<model>/<label>/`, with a
VERSION file holding the label.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import NotFound
from services.common.types import PRECISIONS, ModelKind

ENCODER_TYPES = {"bert", "roberta"}
CAUSAL_TYPES = {"llama", "gpt2"}
_CHUNK = 8 * 1024 * 1024
VERSIONS_DIR = ".versions"  # published versions: <repository>/.versions/<model>/<label>/
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a version label (no "+", "/" or "@")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model version in the repository."""

    name: str
    path: Path
    model_type: str
    kind: ModelKind
    num_layers: int
    hidden_size: int
    max_positions: int

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"


def model_path(repository: Path, name: str, version: str = "") -> Path:
    """The folder of `name`'s version `version` (a label, maybe with its "+precision"): the
    published folder of that label, else (and for "") the model's own folder."""
    label = version.split("+", 1)[0]
    if label and LABEL.fullmatch(label):
        published = repository / VERSIONS_DIR / name / label
        if published.is_dir():
            return published
    return repository / name


def published_versions(repository: Path, name: str) -> list[Path]:
    """The folders of `name`'s published versions, in label order."""
    root = repository / VERSIONS_DIR / name
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and LABEL.fullmatch(p.name))


def model_spec(repository: Path, name: str, version: str = "") -> ModelSpec:
    path = model_path(repository, name, version)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise NotFound(f"model {name!r} is not in the model repository {repository}")
    config = json.loads(config_path.read_text())
    model_type = config.get("model_type", "")
    if model_type in ENCODER_TYPES:
        kind = ModelKind.ENCODER
    elif model_type in CAUSAL_TYPES:
        kind = ModelKind.CAUSAL_LM
    else:
        raise ValueError(
            f"model {name!r}: architecture {model_type!r} is not supported "
            f"(supported: {', '.join(sorted(ENCODER_TYPES | CAUSAL_TYPES))})"
        )
    num_layers = int(config.get("num_hidden_layers", config.get("n_layer", 0)))
    hidden = int(config.get("hidden_size", config.get("n_embd", 0)))
    max_positions = int(config.get("max_position_embeddings", config.get("n_positions", 2048)))
    if model_type == "roberta":
        # RoBERTa's positions start after the padding index.
        max_positions -= int(config.get("pad_token_id", 1)) + 1
    return ModelSpec(name, path, model_type, kind, num_layers, hidden, max_positions)


# Files whose content changes what a model answers, besides the weights: the architecture, the
# tokenizer (vocabulary, normalisation, special tokens, chat template), generation defaults and
# sentence-transformers' pipeline (module list, pooling, max_seq_length).
OUTPUT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)
_OUTPUT_GLOBS = ("*.safetensors", "*.safetensors.index.json", "additional_chat_templates/*")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def fingerprinted_files(path: Path) -> list[Path]:
    """Every file of a model folder that changes its outputs, in a stable order."""
    files = {path / name for name in OUTPUT_FILES if (path / name).is_file()}
    for pattern in _OUTPUT_GLOBS:
        files.update(f for f in path.glob(pattern) if f.is_file())
    modules = path / "modules.json"
    if modules.is_file():
        # sentence-transformers modules (pooling, dense, normalize) keep their files in folders.
        for module in json.loads(modules.read_text()):
            folder = path / str(module.get("path") or "")
            if folder != path and folder.is_dir():
                files.update(f for f in folder.rglob("*") if f.is_file())
    return sorted(files, key=lambda f: f.relative_to(path).as_posix())


def fingerprint(path: Path, precision: str = "float32") -> str:
    """sha256 over every file that changes outputs (name and content), then the precision.

    Workers of one model that differ in any of these never join one chain or share cache keys.
    """
    check_precision(precision)
    digest = hashlib.sha256()
    for file in fingerprinted_files(path):
        name = file.relative_to(path).as_posix().encode()
        digest.update(name + b"\0" + str(file.stat().st_size).encode() + b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    digest.update(b"precision\0" + precision.encode())
    return digest.hexdigest()


def version_of(path: Path, fingerprint_hex: str, precision: str = "float32") -> str:
    """The version label: VERSION file if the repository has one, else the fingerprint's head.

    A reduced precision is a version of its own (`v3+bfloat16`), so pinning a version never
    mixes precisions even where the VERSION file is shared.
    """
    version_file = path / "VERSION"
    label = version_file.read_text().strip() if version_file.is_file() else fingerprint_hex[:12]
    return label if precision == "float32" else f"{label}+{check_precision(precision)}"
