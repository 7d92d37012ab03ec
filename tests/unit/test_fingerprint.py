"""The fingerprint covers every file that changes a model's outputs, and the precision.

Each case edits one file of a tmp copy of a tiny model (or adds one) and checks the fingerprint
moves; an unrelated file (README.md) leaves it alone. A change the fingerprint missed would keep
serving cache entries computed from the old files.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from services.common.repository import PRECISIONS, fingerprint, version_of


@pytest.fixture
def bert_copy(tiny_repo: Path, tmp_path: Path) -> Path:
    """A tiny BERT laid out as sentence-transformers saves one (modules + pooling config)."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_repo / "tiny-bert", folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
        {
            "idx": 2,
            "name": "2",
            "path": "2_Normalize",
            "type": "sentence_transformers.models.Normalize",
        },
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True})
    )
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "[PAD]"}))
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    (folder / "README.md").write_text("# tiny bert\n")
    return folder


@pytest.fixture
def llama_copy(tiny_repo: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "llama"
    shutil.copytree(tiny_repo / "tiny-llama", folder)
    return folder


def _edit_json(path: Path, key: str, value: object) -> None:
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


BERT_EDITS: dict[str, Callable[[Path], None]] = {
    "config.json": lambda f: _edit_json(f / "config.json", "layer_norm_eps", 1e-6),
    "weights": lambda f: _flip_last_byte(f / "model.safetensors"),
    "tokenizer.json": lambda f: _edit_json(f / "tokenizer.json", "truncation", {"max_length": 8}),
    "tokenizer_config.json": lambda f: _edit_json(
        f / "tokenizer_config.json", "model_max_length", 16
    ),
    "special_tokens_map.json": lambda f: _edit_json(
        f / "special_tokens_map.json", "pad_token", "[UNK]"
    ),
    "vocab.txt": lambda f: (f / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n"),
    "modules.json": lambda f: (f / "modules.json").write_text(
        json.dumps(json.loads((f / "modules.json").read_text())[:2])
    ),
    "1_Pooling/config.json": lambda f: _edit_json(
        f / "1_Pooling" / "config.json", "pooling_mode_cls_token", True
    ),
    "sentence_bert_config.json max_seq_length": lambda f: _edit_json(
        f / "sentence_bert_config.json", "max_seq_length", 128
    ),
    "new config_sentence_transformers.json": lambda f: (
        f / "config_sentence_transformers.json"
    ).write_text(json.dumps({"prompts": {"query": "query: "}})),
    "new file in a module folder": lambda f: (f / "1_Pooling" / "extra.json").write_text("{}"),
}

LLAMA_EDITS: dict[str, Callable[[Path], None]] = {
    "generation_config.json": lambda f: _edit_json(
        f / "generation_config.json", "repetition_penalty", 1.3
    ),
    "chat_template.jinja": lambda f: (f / "chat_template.jinja").write_text(
        (f / "chat_template.jinja").read_text() + "{{ '' }}"
    ),
    "chat template in tokenizer_config.json": lambda f: _edit_json(
        f / "tokenizer_config.json", "chat_template", "{{ messages[0]['content'] }}"
    ),
    "weights": lambda f: _flip_last_byte(f / "model.safetensors"),
}


@pytest.mark.parametrize("edit", list(BERT_EDITS), ids=list(BERT_EDITS))
def test_every_output_file_of_an_encoder_changes_the_fingerprint(
    bert_copy: Path, edit: str
) -> None:
    before = fingerprint(bert_copy)
    BERT_EDITS[edit](bert_copy)
    assert fingerprint(bert_copy) != before


@pytest.mark.parametrize("edit", list(LLAMA_EDITS), ids=list(LLAMA_EDITS))
def test_every_output_file_of_a_causal_lm_changes_the_fingerprint(
    llama_copy: Path, edit: str
) -> None:
    assert (llama_copy / "chat_template.jinja").is_file()
    before = fingerprint(llama_copy)
    LLAMA_EDITS[edit](llama_copy)
    assert fingerprint(llama_copy) != before


def test_unrelated_files_leave_the_fingerprint_alone(bert_copy: Path) -> None:
    before = fingerprint(bert_copy)
    (bert_copy / "README.md").write_text("# rewritten\n")
    (bert_copy / "NOTES.txt").write_text("anything")
    (bert_copy / ".prepared").write_text("{}")
    (bert_copy / "VERSION").write_text("v7\n")  # a label, not an output: see version_of
    assert fingerprint(bert_copy) == before


def test_moving_bytes_between_files_changes_the_fingerprint(bert_copy: Path) -> None:
    """Names and sizes are hashed with contents: the same bytes split differently differ."""
    (bert_copy / "vocab.txt").write_text("ab")
    (bert_copy / "special_tokens_map.json").write_text("{}")
    before = fingerprint(bert_copy)
    (bert_copy / "vocab.txt").write_text("a")
    (bert_copy / "special_tokens_map.json").write_text("b{}")
    assert fingerprint(bert_copy) != before


def test_the_precision_is_part_of_the_fingerprint_and_the_version(bert_copy: Path) -> None:
    prints = {p: fingerprint(bert_copy, p) for p in PRECISIONS}
    assert len(set(prints.values())) == len(PRECISIONS)
    assert fingerprint(bert_copy) == prints["float32"]  # the default is float32
    versions = {p: version_of(bert_copy, prints[p], p) for p in PRECISIONS}
    assert len(set(versions.values())) == len(PRECISIONS)
    (bert_copy / "VERSION").write_text("v3\n")
    assert version_of(bert_copy, prints["float32"]) == "v3"
    assert version_of(bert_copy, prints["bfloat16"], "bfloat16") == "v3+bfloat16"
    with pytest.raises(ValueError, match="precision"):
        fingerprint(bert_copy, "float16")
