"""The model repository that `make models` builds: both real models load and answer correctly.

Uses the shared repository ($TESSERA_MODEL_REPOSITORY or <repo>/model-repository) rather than a
temporary one: converting the GGUF file takes 15-30 s, and the mesh tests need it anyway.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from services.worker.prepare import MARKER, MINILM, MODELS, SMOLLM2, prepare_repository

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def repository() -> dict[str, Path]:
    root = Path(os.environ.get("TESSERA_MODEL_REPOSITORY") or REPO_ROOT / "model-repository")
    return prepare_repository(root)


def test_every_model_is_prepared(repository: dict[str, Path]) -> None:
    assert set(repository) == set(MODELS)
    for name, folder in repository.items():
        assert folder.name == name
        assert json.loads((folder / MARKER).read_text())["model"] == name
        assert (folder / "config.json").is_file()
        assert (folder / "model.safetensors").is_file()
        assert not list(folder.parent.glob(f".{name}.tmp-*"))


def test_prepare_again_is_a_fast_no_op(repository: dict[str, Path]) -> None:
    before = {name: (folder / MARKER).stat().st_mtime_ns for name, folder in repository.items()}
    root = next(iter(repository.values())).parent
    started = time.monotonic()
    again = prepare_repository(root)
    assert time.monotonic() - started < 2.0
    assert again == repository
    assert {name: (f / MARKER).stat().st_mtime_ns for name, f in again.items()} == before


def test_smollm2_is_plain_fp32_safetensors(repository: dict[str, Path]) -> None:
    from transformers import AutoConfig

    folder = repository[SMOLLM2]
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "llama"
    assert config.num_hidden_layers == 30
    assert getattr(config, "quantization_config", None) is None
    assert not list(folder.glob("*.gguf"))


def test_smollm2_answers_with_its_chat_template(repository: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = repository[SMOLLM2]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert next(model.parameters()).dtype == torch.float32

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    # The template already starts with <|im_start|>; adding special tokens again would double it.
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_minilm_loads_in_transformers_and_sentence_transformers(
    repository: dict[str, Path],
) -> None:
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    folder = repository[MINILM]
    texts = ["The capital of France is Paris.", "gRPC carries protobuf messages."]
    reference = torch.from_numpy(SentenceTransformer(str(folder), device="cpu").encode(texts))
    assert reference.shape == (2, 384)

    # The recipe the workers use: mean pooling over real tokens, then L2 normalisation.
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch.attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    ours = torch.nn.functional.normalize(pooled, p=2, dim=1)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
