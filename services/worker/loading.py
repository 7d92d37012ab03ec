"""Span-only weights: a model skeleton without storage, filled with only the tensors a stage keeps.

`skeleton()` builds transformers' own model classes with every parameter on the meta device
(accelerate's `init_empty_weights`: no storage), while buffers are built for real by the model's
own code, exactly as `from_pretrained` computes them (rotary `inv_freq`, BERT `position_ids` /
`token_type_ids`). The caller drops the modules its span does not need; `materialize()` then reads
from the safetensors files (services/worker/tensorfiles.py) only the tensors of the parameters
still present, one at a time, straight into their final dtype, so no full-size allocation ever
happens; a precision's transform (services/worker/precision.py) runs on each layer as soon as it
is read.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel

from services.common.repository import ModelSpec
from services.common.types import ModelKind
from services.worker.tensorfiles import TensorFiles

ReadPlan = Callable[[nn.Module, str], tuple[torch.dtype, bool]]


def _float32(module: nn.Module, leaf: str) -> tuple[torch.dtype, bool]:
    return torch.float32, False


def skeleton(spec: ModelSpec, *, attn_implementation: str | None = None) -> PreTrainedModel:
    """The model for spec with parameters on the meta device and real buffers."""
    config = AutoConfig.from_pretrained(spec.path)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with init_empty_weights(include_buffers=False):
        if spec.kind is ModelKind.CAUSAL_LM:
            model = AutoModelForCausalLM.from_config(config, **kwargs)
        else:
            model = AutoModel.from_config(config, **kwargs)
    # accelerate re-creates each parameter it registers on meta, which unties tied weights
    # (a tied LM head is the embedding matrix): tie them again outside its context.
    model.tie_weights()
    if getattr(model, "pooler", None) is not None:
        # Embeddings pool the last hidden states themselves; BERT's pooler is never run.
        model.pooler = None
    return model.eval()


def parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name each parameter has (tied weights have several), keyed by the parameter's id.

    Taken before the caller re-indexes layers: these are the names the checkpoint uses.
    """
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return names


def _checkpoint_key(names: list[str], files: TensorFiles, prefix: str) -> str:
    """The checkpoint's key for a parameter: its own name, with or without the base prefix.

    Tied parameters have several names (a tied LM head is the embedding matrix); any one found
    in the files will do.
    """
    for name in names:
        candidates = [name, f"{prefix}.{name}"]
        if prefix and name.startswith(prefix + "."):
            candidates.append(name[len(prefix) + 1 :])
        for key in candidates:
            if key in files:
                return key
    raise KeyError(f"no tensor for {names[0]} in the checkpoint (also tried its tied names)")


def materialize(
    model: nn.Module,
    files: TensorFiles,
    names: dict[int, list[str]],
    *,
    prefix: str,
    plan: ReadPlan = _float32,
    units: Iterable[nn.Module] = (),
    finish: Callable[[nn.Module], object] | None = None,
) -> int:
    """Replaces every meta parameter still in `model` with its tensor read from `files`.

    `names` are the parameters' checkpoint names (parameter_names() of the whole skeleton);
    `prefix` is the base model's prefix ("model", "bert"), which checkpoints may or may not use.
    `plan(module, name)` gives the dtype a parameter is read in and whether it is transient
    (precision.read_plan); a tied parameter is read once, as the first module holding it says.
    `units` are loaded first, one after another, each followed by `finish(unit)` (e.g. dynamic
    quantization), so a transformation never holds more than one unit in both forms. Returns
    the bytes read.
    """
    # Tied weights read so far, keyed by the meta parameter's id; holding the meta parameter too
    # keeps that id from being reused by a new object while loading runs. Nothing else is held,
    # so a weight a transform replaces is freed as soon as its layer is done.
    loaded: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}
    total = 0

    def fill(root: nn.Module) -> None:
        nonlocal total
        for module in root.modules():
            for leaf, param in list(module._parameters.items()):
                if param is None or param.device.type != "meta":
                    continue
                if id(param) in loaded:  # a tied weight already read under another name
                    module._parameters[leaf] = loaded[id(param)][1]
                    continue
                key = _checkpoint_key(names[id(param)], files, prefix)
                dtype, transient = plan(module, leaf)
                tensor = files.read(key, dtype, transient=transient)
                if tuple(tensor.shape) != tuple(param.shape):
                    raise ValueError(
                        f"{key}: checkpoint shape {tuple(tensor.shape)}, "
                        f"model shape {tuple(param.shape)}"
                    )
                fresh = nn.Parameter(tensor, requires_grad=False)
                if len(names[id(param)]) > 1:  # only tied weights are met again
                    loaded[id(param)] = (param, fresh)
                module._parameters[leaf] = fresh
                total += tensor.numel() * tensor.element_size()

    with files.opened():
        for unit in units:
            fill(unit)
            if finish is not None:
                finish(unit)
        fill(model)
    if finish is not None:
        gc.collect()  # modules the transforms swapped out, and the weights they still hold
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise ValueError(f"parameters left without weights: {left[:5]}")
    return total
