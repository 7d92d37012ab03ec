"""Worker precision: what loading reads each weight as, and what it turns each layer into.

- float32: the checkpoint as it is; exact (split = unsplit, bit for bit).
- bfloat16: `Bf16Linear` holds each Linear's weight in bf16 (read as bf16 straight from the file)
  and runs the matmul in bf16 with float32 input and output. This is autocast's arithmetic for a
  Linear with the weight cast once instead of on every call (autocast re-casts parameters that
  need no grad in each forward, which made SmolLM2 decoding 2x slower than float32 here), while
  embeddings, norms, the residual stream, attention and the KV cache stay float32 (all-bf16
  weights lost accuracy there: MiniLM cosine 0.99987 against 0.99995 on the test texts).
- int8: `torch.ao.quantization.quantize_dynamic` with per-channel qint8 weights (per-tensor
  scales lost far more: MiniLM cosine 0.88 against 0.91-0.95); GPT-2's Conv1D layers become
  Linear layers first. The float32 weights are read into transient memory, layer by layer.
"""

from __future__ import annotations

import warnings
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


def _linear_of_conv1d(conv: Conv1D) -> nn.Linear:
    linear = nn.Linear(conv.weight.shape[0], conv.weight.shape[1], device="meta")
    linear.weight = nn.Parameter(conv.weight.detach().t().contiguous(), requires_grad=False)
    linear.bias = nn.Parameter(conv.bias.detach(), requires_grad=False)
    return linear


def quantize_int8(root: nn.Module) -> nn.Module:
    """Dynamic int8 quantization of the Linear layers (GPT-2's Conv1D too) under root, in place."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    for module in list(root.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                setattr(module, name, _linear_of_conv1d(child))
    floats = [m for m in root.modules() if isinstance(m, nn.Linear)]
    with warnings.catch_warnings():
        # torch.ao.quantization warns it is deprecated in favour of torchao (not a dependency);
        # it still works, and one warning per layer would flood the worker's log.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        quantized = quantize_dynamic(
            root, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True
        )
    # The float modules swapped out linger in reference cycles until a full garbage collection;
    # let go of their float32 weights now, layer by layer.
    for module in floats:
        module._parameters.clear()
    return quantized
