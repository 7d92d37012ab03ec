"""Span-only loading: a stage holds, and reads, exactly its span's tensors (no sockets).

The reference is the unsplit model loaded by transformers' own `from_pretrained`: every tensor a
stage holds must equal the reference's tensor of the same (original) name, bit for bit, and the
stage must hold nothing else. Buffers a weightless skeleton would leave uninitialised (rotary
`inv_freq`, BERT/RoBERTa `position_ids`, `token_type_ids`) must equal the reference's too.
"""

from __future__ import annotations

import json
import re
import shutil
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM

from services.common.repository import ModelSpec, model_spec
from services.common.types import ModelKind, Span
from services.worker import tensorfiles
from services.worker.stage import StageModel
from services.worker.tensorfiles import TensorFiles

ARCHS = ("llama", "gpt2", "bert", "roberta")
SPANS = (Span(0, 4), Span(0, 2), Span(1, 3), Span(2, 4), Span(3, 4))
# The attribute path of the layer list in each reference model's state dict.
LAYER_KEY = {
    "llama": r"^model\.layers\.(\d+)\.",
    "gpt2": r"^transformer\.h\.(\d+)\.",
    "bert": r"^encoder\.layer\.(\d+)\.",
    "roberta": r"^encoder\.layer\.(\d+)\.",
}


@cache
def _reference(path: Path, causal: bool) -> torch.nn.Module:
    if causal:
        return AutoModelForCausalLM.from_pretrained(path).eval()
    return AutoModel.from_pretrained(path, add_pooling_layer=False).eval()


def _spec(repo: Path, arch: str) -> ModelSpec:
    return model_spec(repo, f"tiny-{arch}")


def _expected_tensors(spec: ModelSpec, span: Span) -> dict[str, torch.Tensor]:
    """The reference's parameters a stage of `span` needs, by their original names."""
    reference = _reference(spec.path, spec.kind is ModelKind.CAUSAL_LM)
    pattern = re.compile(LAYER_KEY[spec.model_type])
    first, last = span.start == 0, span.end == spec.num_layers
    wanted = {}
    for name, param in reference.named_parameters(remove_duplicate=False):
        match = pattern.match(name)
        if match:
            keep = span.start <= int(match.group(1)) < span.end
        elif name.startswith("lm_head."):
            keep = last
        elif re.search(r"(^|\.)(norm|ln_f)\.", name):
            keep = last
        else:  # embeddings (token, position, type tables and their LayerNorm)
            keep = first
        if keep:
            wanted[name] = param.detach()
    return wanted


def _held(stage: StageModel) -> list[torch.Tensor]:
    modules = [stage._base, *([stage.lm_head] if stage.lm_head is not None else [])]
    return [p for m in modules for p in m.parameters()]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("span", SPANS, ids=str)
def test_a_stage_holds_exactly_its_spans_tensors(tiny_repo: Path, arch: str, span: Span) -> None:
    spec = _spec(tiny_repo, arch)
    stage = StageModel(spec, span)
    held = _held(stage)
    assert all(p.device.type == "cpu" for p in held)
    expected = _expected_tensors(spec, span)
    # Every expected tensor is held (as itself: same values bit for bit)...
    unmatched = list(held)
    for name, tensor in expected.items():
        index = next(
            (
                i
                for i, p in enumerate(unmatched)
                if p.shape == tensor.shape and torch.equal(p, tensor)
            ),
            None,
        )
        if index is None:
            # A tied head is the embedding matrix already matched under its other name.
            assert any(p.shape == tensor.shape and torch.equal(p, tensor) for p in held), name
            continue
        unmatched.pop(index)
    # ... and nothing else is.
    assert unmatched == [], f"{arch} {span}: holds {len(unmatched)} tensors outside its span"
    held_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in held}.values())
    unique = {id(t): t for t in expected.values()}
    assert held_bytes <= sum(t.numel() * t.element_size() for t in unique.values())


@pytest.mark.parametrize("arch", ARCHS)
def test_buffers_equal_the_reference(tiny_repo: Path, arch: str) -> None:
    spec = _spec(tiny_repo, arch)
    reference = dict(_reference(spec.path, spec.kind is ModelKind.CAUSAL_LM).named_buffers())
    stage = StageModel(spec, Span(0, 4))
    buffers = dict(stage._base.named_buffers())
    prefix = "model." if arch == "llama" else "transformer." if arch == "gpt2" else ""
    for name, buffer in buffers.items():
        assert buffer.device.type == "cpu", name
        assert torch.equal(buffer, reference[prefix + name]), name
    if arch == "llama":
        assert "rotary_emb.inv_freq" in buffers
    if arch in ("bert", "roberta"):
        assert {"embeddings.position_ids", "embeddings.token_type_ids"} <= set(buffers)


@pytest.mark.parametrize(
    ("arch", "span"),
    [("llama", Span(1, 3)), ("gpt2", Span(2, 4)), ("bert", Span(0, 2)), ("roberta", Span(3, 4))],
    ids=str,
)
def test_only_the_spans_tensors_are_read(
    tiny_repo: Path, arch: str, span: Span, monkeypatch: pytest.MonkeyPatch
) -> None:
    read: list[str] = []
    original = TensorFiles.read

    def spy(self: TensorFiles, key: str, dtype: torch.dtype, **kwargs: bool) -> torch.Tensor:
        read.append(key)
        return original(self, key, dtype, **kwargs)

    monkeypatch.setattr(TensorFiles, "read", spy)
    spec = _spec(tiny_repo, arch)
    StageModel(spec, span)
    pattern = re.compile(LAYER_KEY[arch].replace("^", "^(?:bert\\.|roberta\\.)?"))
    layers = {int(m.group(1)) for k in read if (m := pattern.match(k))}
    assert layers == set(range(span.start, span.end))
    assert len(read) == len(set(read))  # each tensor once (a tied head is not read twice)
    tables = {k for k in read if re.search(r"embed|wte|wpe", k)}
    if span.start == 0:
        assert tables
    elif arch == "gpt2" and span.end == spec.num_layers:
        assert tables == {"transformer.wte.weight"}  # the tied head, not the embedding
    else:
        assert tables == set()


def test_a_tied_last_stage_reads_the_embedding_matrix_as_its_head(tiny_repo: Path) -> None:
    spec = _spec(tiny_repo, "gpt2")
    reference = _reference(spec.path, causal=True)
    assert reference.lm_head.weight is reference.transformer.wte.weight  # tied
    last = StageModel(spec, Span(2, 4))
    assert last.lm_head is not None
    assert torch.equal(last.lm_head.weight, reference.transformer.wte.weight)
    hidden = torch.randn(2, spec.hidden_size)
    with torch.no_grad():
        assert torch.equal(last.logits(hidden), reference.lm_head(hidden))


def _hidden_after(spec: ModelSpec, span: Span, ids: torch.Tensor) -> torch.Tensor:
    return StageModel(spec, span).forward(input_ids=ids)


def test_a_sharded_checkpoint_loads_the_same(tiny_repo: Path, tmp_path: Path) -> None:
    """model.safetensors.index.json + shards, as save_pretrained writes large models."""
    source = tiny_repo / "tiny-llama"
    folder = tmp_path / "tiny-llama"
    shutil.copytree(source, folder)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ids = torch.tensor([[7, 8, 9, 10]])
    expected = _hidden_after(_spec(tiny_repo, "llama"), Span(0, 2), ids)
    assert torch.equal(_hidden_after(model_spec(tmp_path, "tiny-llama"), Span(0, 2), ids), expected)


def test_a_checkpoint_with_the_base_prefix_loads_the_same(tiny_repo: Path, tmp_path: Path) -> None:
    """BERT checkpoints saved from a task model name their tensors `bert.…`."""
    folder = tmp_path / "tiny-bert"
    shutil.copytree(tiny_repo / "tiny-bert", folder)
    tensors = load_file(folder / "model.safetensors")
    save_file({f"bert.{k}": v for k, v in tensors.items()}, folder / "model.safetensors")
    ids = torch.tensor([[2, 7, 8, 3]])
    expected = _hidden_after(_spec(tiny_repo, "bert"), Span(0, 4), ids)
    assert torch.equal(_hidden_after(model_spec(tmp_path, "tiny-bert"), Span(0, 4), ids), expected)


def test_a_missing_tensor_is_an_error(tiny_repo: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tiny-llama"
    shutil.copytree(tiny_repo / "tiny-llama", folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    spec = model_spec(tmp_path, "tiny-llama")
    StageModel(spec, Span(2, 4))  # the missing tensor is outside this span: never read
    with pytest.raises(KeyError, match="layers.1.mlp.up_proj"):
        StageModel(spec, Span(0, 2))


@pytest.mark.parametrize("arch", ARCHS)
def test_tensor_files_read_what_safetensors_reads(
    tiny_repo: Path, arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every tensor, as stored, converted to bf16 (through a staging buffer smaller than most
    tensors, so conversions run in many chunks) and into transient memory."""
    monkeypatch.setattr(tensorfiles, "STAGING_BYTES", 1000)
    path = tiny_repo / f"tiny-{arch}"
    reference = load_file(path / "model.safetensors")
    files = TensorFiles(path)
    with files.opened():
        for key, tensor in reference.items():
            assert key in files and files.shape(key) == tuple(tensor.shape)
            same = files.read(key, tensor.dtype)
            assert same.dtype == tensor.dtype and torch.equal(same, tensor), key
            if tensor.is_floating_point():
                assert torch.equal(files.read(key, torch.bfloat16), tensor.to(torch.bfloat16))
                assert torch.equal(files.read(key, torch.float32, transient=True), tensor)
            else:  # integers keep their dtype
                assert files.read(key, torch.bfloat16).dtype == tensor.dtype
