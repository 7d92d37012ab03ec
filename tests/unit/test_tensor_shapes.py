"""Shapes with no element but absurd dimensions (issue 12: [0, 2**62, 576] with empty data
surfaced as INTERNAL from a stride overflow in torch): INVALID_ARGUMENT before any decoding."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument
from services.common.tensors import MAX_TENSOR_BYTES, validate
from services.pb.tessera.v1 import common_pb2
from services.worker.tensors import to_torch


@pytest.mark.parametrize(
    "shape", [[0, 2**62, 576], [2**62, 0, 576], [0, 2**62], [0, MAX_TENSOR_BYTES // 4 + 1]], ids=str
)
def test_empty_tensors_with_absurd_dimensions_are_invalid(shape: list[int]) -> None:
    tensor = common_pb2.Tensor(dtype="float32", shape=shape, data=b"")
    for decode in (lambda t: validate(t, "x"), lambda t: to_torch(t, "x")):
        with pytest.raises(InvalidArgument, match="limit"):
            decode(tensor)


@pytest.mark.parametrize("shape", [[0, 5, 32], [2, 0], [0], [0, 0, 0]], ids=str)
def test_empty_tensors_of_sane_shape_still_decode(shape: list[int]) -> None:
    tensor = common_pb2.Tensor(dtype="float32", shape=shape, data=b"")
    assert validate(tensor, "x") == tuple(shape)
    assert list(to_torch(tensor, "x").shape) == shape
