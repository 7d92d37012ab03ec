"""The model repository: one folder per model name holding config, safetensors and tokenizer."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import NotFound
from services.common.types import ModelKind

ENCODER_TYPES = {"bert", "roberta"}
CAUSAL_TYPES = {"llama", "gpt2"}
_CHUNK = 8 * 1024 * 1024


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


def model_spec(repository: Path, name: str) -> ModelSpec:
    path = repository / name
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


def fingerprint(path: Path) -> str:
    """sha256 over config.json and every weights file, in name order."""
    digest = hashlib.sha256()
    files = [path / "config.json", *sorted(path.glob("*.safetensors"))]
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def version_of(path: Path, fingerprint_hex: str) -> str:
    """The version label: VERSION file if the repository has one, else the fingerprint's head."""
    version_file = path / "VERSION"
    if version_file.is_file():
        return version_file.read_text().strip()
    return fingerprint_hex[:12]
