"""torch <-> wire Tensor, on top of the shared validation in services.common.tensors."""

from __future__ import annotations

import torch

from services.common.errors import InvalidArgument
from services.common.tensors import validate
from services.pb.tessera.v1 import common_pb2

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
WIRE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
FLOAT_WIRE = ("float32", "float16", "bfloat16")


def to_torch(
    tensor: common_pb2.Tensor,
    name: str,
    *,
    ndim: int | None = None,
    dtypes: tuple[str, ...] | None = None,
) -> torch.Tensor:
    """Decodes and validates; float tensors must be finite. Raises InvalidArgument."""
    shape = validate(tensor, name, ndim=ndim, dtypes=dtypes)
    dtype = TORCH_DTYPES[tensor.dtype]
    if not tensor.data:
        return torch.empty(shape, dtype=dtype)
    result = torch.frombuffer(bytearray(tensor.data), dtype=dtype).reshape(shape)
    if result.is_floating_point() and not bool(torch.isfinite(result).all()):
        raise InvalidArgument(f"{name}: contains NaN or Inf")
    return result


def from_torch(value: torch.Tensor, wire_dtype: str = "float32") -> common_pb2.Tensor:
    if wire_dtype not in TORCH_DTYPES:
        raise InvalidArgument(f"unsupported dtype {wire_dtype!r}")
    value = value.detach().to(TORCH_DTYPES[wire_dtype]).contiguous()
    data = value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b""
    return common_pb2.Tensor(dtype=wire_dtype, shape=list(value.shape), data=data)
