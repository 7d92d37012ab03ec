"""StageModel: the layers [start, end) of a Hugging Face model, run through transformers' own code.

A stage keeps transformers' model classes and calls their own forward, so splitting changes no
arithmetic: for a span [s, e) it keeps layers s..e-1 (re-indexed 0..e-s-1 so KV caches index
them), replaces the input embeddings with a pass-through when s > 0 (hidden states arrive as
`inputs_embeds`), and the final norm with an identity when e < num_layers.

A stage holds only its span: the model is built as a skeleton without weights, the parts outside
the span are dropped, and only the remaining tensors are read from the safetensors files
(services/worker/loading.py) -- the embeddings on the first stage, the final norm and LM head on
the last (a tied head is the embedding matrix, so a tied last stage reads that matrix too).

Precision (services/common/repository.py PRECISIONS): float32 is exact; bfloat16 holds the
Linear weights in bf16 and runs their matmuls in bf16; int8 dynamically quantizes them (qint8
weights, per output channel). Everything else (embeddings, norms, residual stream, attention,
KV cache) stays float32 (services/worker/precision.py says why), so hidden states enter and leave a
stage as float32 whatever the precision (`dtype`), stages of one chain exchange the same tensors,
and pooling runs in float32.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache

from services.common.repository import ModelSpec, check_precision
from services.common.types import ModelKind, Span
from services.worker.loading import materialize, parameter_names, skeleton
from services.worker.precision import precision_transform, read_plan
from services.worker.tensorfiles import TensorFiles

_M = TypeVar("_M", bound=nn.Module)


class _PassThroughEmbeddings(nn.Module):
    """Stands in for BERT-style embeddings on stages that receive hidden states."""

    def forward(self, inputs_embeds: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        assert inputs_embeds is not None
        return inputs_embeds


class _NoEmbeddings(nn.Module):
    """Stands in for a token embedding table a later stage does not hold."""

    def forward(self, *_: Any, **__: Any) -> torch.Tensor:
        raise ValueError("this stage holds no embeddings: send hidden states")


class _ZeroPositions(nn.Module):
    """Stands in for GPT-2's position table on later stages: adding 0.0 is exact."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*position_ids.shape, self.dim)


@dataclass(frozen=True)
class _Layout:
    """Where one architecture keeps its parts, as attribute paths on its base model."""

    layers: str
    final_norm: str | None
    embeddings: str
    position_table: str | None = None


_LAYOUTS = {
    "llama": _Layout(layers="layers", final_norm="norm", embeddings="embed_tokens"),
    "gpt2": _Layout(layers="h", final_norm="ln_f", embeddings="wte", position_table="wpe"),
    "bert": _Layout(layers="encoder.layer", final_norm=None, embeddings="embeddings"),
    "roberta": _Layout(layers="encoder.layer", final_norm=None, embeddings="embeddings"),
}


def _get(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _set(module: nn.Module, path: str, value: nn.Module) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        module = getattr(module, part)
    setattr(module, leaf, value)


def _shallow_module_copy(module: _M) -> _M:
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    return clone


def _replace(root: nn.Module, path: str, value: nn.Module) -> None:
    """Sets root.<path> = value, copying the modules on the path so the original keeps its own."""
    *parents, leaf = path.split(".")
    module = root
    for part in parents:
        child = _shallow_module_copy(getattr(module, part))
        setattr(module, part, child)
        module = child
    setattr(module, leaf, value)


class StageModel:
    """Runs the span [start, end) of a model: embeddings if start == 0, head if end == L."""

    def __init__(
        self,
        spec: ModelSpec,
        span: Span,
        *,
        precision: str = "float32",
        attn_implementation: str | None = None,
    ) -> None:
        if span.end > spec.num_layers:
            raise ValueError(f"span {span} is outside the {spec.num_layers} layers of {spec.name}")
        self.spec = spec
        self.span = span
        self.precision = check_precision(precision)
        self.dtype = torch.float32  # hidden states in and out, whatever the precision
        self.layout = _LAYOUTS[spec.model_type]

        model = skeleton(spec, attn_implementation=attn_implementation)
        names = parameter_names(model)  # the checkpoint's names, before layers are re-indexed
        causal = spec.kind is ModelKind.CAUSAL_LM
        base = cast(PreTrainedModel, model.base_model) if causal else model
        head = model.get_output_embeddings() if causal and self.is_last else None
        all_layers = _get(base, self.layout.layers)
        self._layers: list[nn.Module] = [all_layers[i] for i in range(span.start, span.end)]
        # The layers outside the span are dropped; the layers kept are re-indexed from 0 so a
        # per-stage KV cache holds exactly this stage's layers.
        _set(base, self.layout.layers, nn.ModuleList(self._layers))
        for index, layer in enumerate(self._layers):
            for sub in layer.modules():
                if hasattr(sub, "layer_idx"):
                    sub.layer_idx = index  # type: ignore[assignment]
        if not self.is_first:
            self._drop_embeddings(base)
        if not self.is_last and self.layout.final_norm:
            _set(base, self.layout.final_norm, nn.Identity())
        holder = nn.ModuleDict({"base": base, **({"head": head} if head is not None else {})})
        transform = precision_transform(precision)
        materialize(
            holder,
            TensorFiles(spec.path),
            names,
            prefix=str(model.base_model_prefix or ""),
            plan=read_plan(precision),
            # Each layer is transformed as soon as it is read, so loading never holds the
            # float32 copies of more than one layer beside the final weights.
            units=[*self._layers, holder] if transform else (),
            finish=transform,
        )
        del model, names
        head = holder["head"] if head is not None else None
        del holder
        self.lm_head: nn.Module | None = head
        base.eval()
        self._base = base
        self.vocab_size = int(getattr(base.config, "vocab_size", 0))
        self._views: dict[Span, PreTrainedModel] = {}
        self.main = self.view(span)

    def _drop_embeddings(self, base: nn.Module) -> None:
        """A later stage receives hidden states: it holds no token (or position) tables."""
        if self.spec.kind is ModelKind.ENCODER:
            _set(base, self.layout.embeddings, _PassThroughEmbeddings())
            return
        _set(base, self.layout.embeddings, _NoEmbeddings())
        if self.layout.position_table:
            _set(base, self.layout.position_table, _ZeroPositions(self.spec.hidden_size))

    @property
    def is_first(self) -> bool:
        return self.span.start == 0

    @property
    def is_last(self) -> bool:
        return self.span.end == self.spec.num_layers

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes one token of one row takes in this stage's KV cache (keys + values)."""
        config = self._base.config
        heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 1))
        kv_heads = int(getattr(config, "num_key_value_heads", 0) or heads)
        head_dim = int(getattr(config, "head_dim", 0) or self.spec.hidden_size // heads)
        itemsize = torch.empty((), dtype=torch.float32).element_size()  # KV stays float32
        return 2 * len(self.span) * kv_heads * head_dim * itemsize

    def view(self, sub: Span) -> PreTrainedModel:
        """A base model that runs only layers sub ⊆ span, sharing this stage's weights."""
        if sub in self._views:
            return self._views[sub]
        if not self.span.contains(sub):
            raise ValueError(f"{sub} is not inside this stage's span {self.span}")
        view = _shallow_module_copy(self._base)
        first, last = sub.start - self.span.start, sub.end - self.span.start
        layers = nn.ModuleList(self._layers[first:last])
        _replace(view, self.layout.layers, layers)
        config = copy.deepcopy(self._base.config)
        config.num_hidden_layers = len(sub)
        if getattr(config, "layer_types", None):
            config.layer_types = list(config.layer_types[sub.start : sub.end])
        view.config = config
        if sub.start > 0:
            if self.layout.position_table:
                _replace(view, self.layout.position_table, _ZeroPositions(self.spec.hidden_size))
            if self.spec.kind is ModelKind.ENCODER:
                _replace(view, self.layout.embeddings, _PassThroughEmbeddings())
        if sub.end < self.spec.num_layers and self.layout.final_norm:
            _replace(view, self.layout.final_norm, nn.Identity())
        self._views[sub] = view
        return view

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.main.config)

    @torch.inference_mode()
    def forward(
        self,
        *,
        input_ids: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        sub: Span | None = None,
        cache: Cache | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Runs layers `sub` (default: the whole span) and returns the hidden states after them.

        The first layer takes input_ids; any other takes hidden_states. With a cache, the step
        continues a session: positions follow on from the tokens already cached.
        """
        sub = sub or self.span
        view = self.main if sub == self.span else self.view(sub)
        if sub.start == 0:
            if input_ids is None:
                raise ValueError("the first layer needs input_ids")
            kwargs: dict[str, Any] = {"input_ids": input_ids}
        else:
            if hidden_states is None:
                raise ValueError(f"layer {sub.start} needs hidden_states")
            kwargs = {"inputs_embeds": hidden_states}
        if position_ids is not None:
            # A batched step: the caller's mask already covers the cached tokens (left padding).
            kwargs["position_ids"] = position_ids
        if cache is not None:
            kwargs["cache"] = cache
            kwargs["use_cache"] = True
            if position_ids is not None:
                kwargs["attention_mask"] = attention_mask
            elif attention_mask is not None:
                # A session's mask covers the cached tokens too.
                past = cache.get_seq_length()
                kwargs["attention_mask"] = (
                    torch.cat(
                        [
                            torch.ones(attention_mask.shape[0], past, dtype=attention_mask.dtype),
                            attention_mask,
                        ],
                        dim=1,
                    )
                    if past
                    else attention_mask
                )
        elif attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if self.spec.kind is ModelKind.CAUSAL_LM and cache is None:
            kwargs["use_cache"] = False
        out = view(**kwargs)
        return out.last_hidden_state

    def run(
        self,
        tokens: torch.Tensor,
        *,
        sub: Span | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """forward() with `tokens` as ids when the range starts at layer 0, else hidden states."""
        first = (sub or self.span).start == 0
        return self.forward(
            input_ids=tokens if first else None,
            hidden_states=None if first else tokens,
            attention_mask=attention_mask,
            sub=sub,
            cache=cache,
            position_ids=position_ids,
        )

    @torch.inference_mode()
    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Next-token logits from the last stage's (already normed) hidden states."""
        if self.lm_head is None or not self.is_last:
            raise ValueError("only the last stage of a causal LM has a head")
        return self.lm_head(hidden_states).float()
