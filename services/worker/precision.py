"""Worker precision: what loading reads each weight as, and what it turns each layer into.

- float32: the checkpoint as it is; exact (split = unsplit, bit for bit).
- bfloat16: `Bf16Linear` holds each Linear's weight in bf16 (read as bf16 straight from the file)
  and runs the matmul in bf16 with float32 input and output. This is autocast's arithmetic for a
  Linear with the weight cast once instead of on every call (autocast re-casts parameters that
  need no grad in each forward, which made SmolLM2 decoding 2x slower than float32 here), while
  embeddings, norms, the residual stream, attention and the KV cache stay float32 (all-bf16
  weights lost accuracy there: MiniLM cosine 0.99987 against 0.99995 on the test texts).
- int8: `Int8Linear` holds each Linear's weight as int8 with a scale per output channel and
  quantizes its input with a scale per row (per token), then multiplies in integers
  (`torch._int_mm`, exact) and scales back to float32. Per-row scales make a row's answer
  depend on that row alone, so an answer never depends on which other requests share the
  batch (torch's dynamic quantization scales the whole input tensor at once: one text's int8
  vector moved by 4e-2 when 15 strangers joined its batch). The float32 weights are read into
  transient memory, layer by layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from services.common.repository import check_precision


def read_plan(precision: str) -> Callable[[nn.Module, str], tuple[torch.dtype, bool]]:
    """For a parameter (its module and name): the dtype to read it in, and whether it is
    transient (only read to be transformed, so loading keeps it out of the heap)."""
    check_precision(precision)

    def plan(module: nn.Module, leaf: str) -> tuple[torch.dtype, bool]:
        linear = isinstance(module, (nn.Linear, Conv1D))
        if precision == "bfloat16" and linear and leaf == "weight":
            return torch.bfloat16, False
        return torch.float32, precision == "int8" and linear

    return plan


def precision_transform(precision: str) -> Callable[[nn.Module], nn.Module] | None:
    """What loading applies to each unit (a layer, then the rest) once read; None for float32."""
    return {"bfloat16": to_bf16_linears, "int8": quantize_int8}.get(check_precision(precision))


class Bf16Linear(nn.Module):
    """A Linear (or GPT-2 Conv1D) whose weight is bf16: bf16 matmul, float32 in and out."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight = weight.detach().to(torch.bfloat16).contiguous()
        self.weight = nn.Parameter(weight, requires_grad=False)
        # The bias is added in float32, after the product is widened back.
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def of(cls, layer: nn.Module) -> Bf16Linear:
        if isinstance(layer, Conv1D):  # GPT-2 keeps its weight as [in, out]
            return cls(layer.weight.t(), layer.bias)
        assert isinstance(layer, nn.Linear)
        return cls(layer.weight, layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)
        return out if self.bias is None else out + self.bias


def to_bf16_linears(root: nn.Module) -> nn.Module:
    """Swaps every Linear / Conv1D under root (root itself excluded) for a Bf16Linear."""
    for module in list(root.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (nn.Linear, Conv1D)):
                setattr(module, name, Bf16Linear.of(child))
    return root


class Int8Linear(nn.Module):
    """A Linear (or GPT-2 Conv1D) in int8: weights per output channel, inputs per row."""

    qweight_t: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.detach().to(torch.float32)
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        quantized = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("qweight_t", quantized.t().contiguous())  # [in, out] for _int_mm
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def of(cls, layer: nn.Module) -> Int8Linear:
        if isinstance(layer, Conv1D):
            return cls(layer.weight.t(), layer.bias)
        assert isinstance(layer, nn.Linear)
        return cls(layer.weight, layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.float32)
        scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
        quantized = torch.round(rows / scale).clamp(-127, 127).to(torch.int8)
        products = torch._int_mm(quantized, self.qweight_t)  # int32, exact
        out = products.to(torch.float32) * scale * self.weight_scale
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def quantize_int8(root: nn.Module) -> nn.Module:
    """Swaps every Linear / Conv1D under root (root itself excluded) for an Int8Linear, letting
    go of the float32 weights layer by layer."""
    for module in list(root.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (nn.Linear, Conv1D)):
                setattr(module, name, Int8Linear.of(child))
                child._parameters.clear()
    return root
