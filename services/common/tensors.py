"""Typed raw tensors (dtype + shape + little-endian bytes) <-> numpy, with strict validation."""

from __future__ import annotations

import math
import sys

import numpy as np

from services.common.errors import InvalidArgument
from services.pb.tessera.v1 import common_pb2

assert sys.byteorder == "little", "tensor bytes are little-endian; big-endian hosts need a swap"

# bfloat16 has no numpy dtype: it travels as raw 2-byte words and is decoded with torch.
ITEMSIZE: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "bool": 1,
}
NUMPY_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "bool": np.dtype("bool"),
}
MAX_TENSOR_BYTES = 256 * 1024 * 1024


def validate(
    tensor: common_pb2.Tensor,
    name: str,
    *,
    ndim: int | None = None,
    dtypes: tuple[str, ...] | None = None,
) -> tuple[int, ...]:
    """Checks that a Tensor is self-consistent; returns its shape. Raises InvalidArgument."""
    if tensor.dtype not in ITEMSIZE:
        raise InvalidArgument(
            f"{name}: unsupported dtype {tensor.dtype!r}; use one of {', '.join(ITEMSIZE)}"
        )
    if dtypes is not None and tensor.dtype not in dtypes:
        raise InvalidArgument(
            f"{name}: dtype must be one of {', '.join(dtypes)}, got {tensor.dtype}"
        )
    shape = tuple(int(d) for d in tensor.shape)
    if ndim is not None and len(shape) != ndim:
        raise InvalidArgument(f"{name}: expected {ndim} dimensions, got shape {list(shape)}")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{name}: negative dimension in shape {list(shape)}")
    expected = math.prod(shape) * ITEMSIZE[tensor.dtype]
    # The non-zero dimensions too: [0, 2**62, 576] holds no element, but its strides overflow.
    spanned = math.prod(d for d in shape if d) * ITEMSIZE[tensor.dtype]
    if max(expected, spanned) > MAX_TENSOR_BYTES:
        raise InvalidArgument(
            f"{name}: shape {list(shape)[:8]} of {tensor.dtype} is over the "
            f"{MAX_TENSOR_BYTES}-byte limit"
        )
    if len(tensor.data) != expected:
        raise InvalidArgument(
            f"{name}: shape {list(shape)} of {tensor.dtype} needs "
            f"{expected} bytes, got {len(tensor.data)}"
        )
    return shape


def to_numpy(tensor: common_pb2.Tensor, name: str = "tensor") -> np.ndarray:
    """Decodes a validated Tensor into a read-only numpy array (not for bfloat16)."""
    shape = validate(tensor, name)
    if tensor.dtype not in NUMPY_DTYPES:
        raise InvalidArgument(f"{name}: dtype {tensor.dtype} cannot be decoded here")
    return np.frombuffer(tensor.data, dtype=NUMPY_DTYPES[tensor.dtype]).reshape(shape)


def from_numpy(array: np.ndarray) -> common_pb2.Tensor:
    for name, dtype in NUMPY_DTYPES.items():
        if array.dtype == dtype or array.dtype == dtype.newbyteorder("="):
            data = np.ascontiguousarray(array, dtype=dtype).tobytes()
            return common_pb2.Tensor(dtype=name, shape=list(array.shape), data=data)
    raise TypeError(f"no wire dtype for numpy {array.dtype}")
