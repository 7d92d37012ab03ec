"""Raw tensors on the wire: services/common/tensors.py (numpy) and services/worker/tensors.py
(torch). Round trips for every dtype, and strict rejection of inconsistent or hostile input."""

from __future__ import annotations

import math
import tracemalloc

import grpc
import numpy as np
import pytest
import torch

from services.common.errors import InvalidArgument
from services.common.tensors import ITEMSIZE, MAX_TENSOR_BYTES, from_numpy, to_numpy, validate
from services.pb.tessera.v1 import common_pb2
from services.worker.tensors import FLOAT_WIRE, TORCH_DTYPES, from_torch, to_torch

NUMPY_WIRE = {
    "float32": np.float32,
    "float16": np.float16,
    "int64": np.int64,
    "int32": np.int32,
    "bool": np.bool_,
}
SHAPES = [(), (1,), (7,), (2, 3), (2, 3, 5), (1, 1, 1, 4)]


def _sample_numpy(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if dtype in ("int64", "int32"):
        info = np.iinfo(NUMPY_WIRE[dtype])
        return rng.integers(info.min, info.max, size=shape, dtype=NUMPY_WIRE[dtype], endpoint=True)
    return (rng.standard_normal(shape) * 100).astype(NUMPY_WIRE[dtype])


def _sample_torch(dtype: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    torch_dtype = TORCH_DTYPES[dtype]
    if dtype == "bool":
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype in ("int64", "int32"):
        info = torch.iinfo(torch_dtype)
        return torch.randint(info.min, info.max, shape, generator=gen, dtype=torch_dtype)
    return (torch.randn(shape, generator=gen) * 100).to(torch_dtype)


def _raises_invalid(fn, *args, match: str | None = None, **kwargs) -> InvalidArgument:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument, match=match) as info:
        fn(*args, **kwargs)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return info.value


# -- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", sorted(NUMPY_WIRE))
def test_numpy_round_trip(dtype: str, shape: tuple[int, ...]) -> None:
    array = _sample_numpy(dtype, shape)
    wire = from_numpy(array)
    assert wire.dtype == dtype
    assert tuple(wire.shape) == shape
    assert len(wire.data) == math.prod(shape) * ITEMSIZE[dtype]
    assert validate(wire, "x") == shape
    back = to_numpy(wire, "x")
    assert back.dtype == array.dtype and back.shape == shape
    np.testing.assert_array_equal(back, array)
    # Survives protobuf serialisation unchanged.
    again = common_pb2.Tensor.FromString(wire.SerializeToString())
    np.testing.assert_array_equal(to_numpy(again), array)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", sorted(TORCH_DTYPES))
def test_torch_round_trip(dtype: str, shape: tuple[int, ...]) -> None:
    value = _sample_torch(dtype, shape)
    wire = from_torch(value, dtype)
    assert wire.dtype == dtype and tuple(wire.shape) == shape
    assert len(wire.data) == value.numel() * value.element_size()
    back = to_torch(common_pb2.Tensor.FromString(wire.SerializeToString()), "x")
    assert back.dtype == value.dtype and tuple(back.shape) == shape
    assert torch.equal(back, value)


@pytest.mark.parametrize("dtype", sorted(NUMPY_WIRE))
def test_numpy_and_torch_agree_on_bytes(dtype: str) -> None:
    array = _sample_numpy(dtype, (3, 4), seed=5)
    from_np = from_numpy(array)
    from_pt = from_torch(torch.from_numpy(array.copy()), dtype)
    assert from_np == from_pt
    np.testing.assert_array_equal(to_torch(from_np, "x").numpy(), to_numpy(from_pt))


def test_bytes_are_little_endian_row_major() -> None:
    wire = from_numpy(np.array([[1, 2], [3, 256]], dtype=np.int32))
    assert wire.data == (b"\x01\x00\x00\x00\x02\x00\x00\x00\x03\x00\x00\x00\x00\x01\x00\x00")
    assert from_torch(torch.tensor([1.0]), "float32").data == np.float32(1.0).tobytes()
    # bfloat16 is the upper half of float32: 1.0 = 0x3f80.
    assert from_torch(torch.tensor([1.0]), "bfloat16").data == b"\x80\x3f"


def test_bfloat16_travels_as_raw_words() -> None:
    value = torch.tensor([[1.5, -2.0, 3.140625], [0.0, 65280.0, -1e-3]], dtype=torch.bfloat16)
    wire = from_torch(value, "bfloat16")
    assert validate(wire, "x", dtypes=FLOAT_WIRE) == (2, 3)
    assert torch.equal(to_torch(wire, "x"), value)
    # numpy has no bfloat16: decoding there is refused, never misread as float16.
    _raises_invalid(to_numpy, wire, "x", match="bfloat16")


def test_wire_dtype_converts_on_the_way_out() -> None:
    value = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    for wire_dtype, tol in (("float16", 1e-3), ("bfloat16", 1e-2), ("float32", 0.0)):
        back = to_torch(from_torch(value, wire_dtype), "x")
        assert back.dtype == TORCH_DTYPES[wire_dtype]
        torch.testing.assert_close(back.float(), value, rtol=tol, atol=tol)
    _raises_invalid(from_torch, value, "float64")


def test_non_contiguous_and_views_round_trip() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    for view in (base.transpose(0, 2), base[:, 1:, ::2], base.expand(2, 2, 3, 4)[1]):
        assert torch.equal(to_torch(from_torch(view), "x"), view)
    array = np.arange(24, dtype=np.int64).reshape(4, 6)[:, ::3].T
    np.testing.assert_array_equal(to_numpy(from_numpy(array)), array)


def test_decoded_tensors_do_not_alias_the_message() -> None:
    wire = from_torch(torch.ones(4))
    value = to_torch(wire, "x")
    value += 1  # writable, and the message is untouched
    assert torch.equal(to_torch(wire, "x"), torch.ones(4))
    assert not to_numpy(wire).flags.writeable


def test_from_numpy_rejects_unknown_dtypes() -> None:
    for array in (np.zeros(2, np.float64), np.zeros(2, np.uint8), np.zeros(2, np.complex64)):
        with pytest.raises(TypeError):
            from_numpy(array)


# -- empty tensors ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0,), (0, 4), (3, 0), (2, 0, 5)], ids=str)
@pytest.mark.parametrize("dtype", sorted(TORCH_DTYPES))
def test_empty_tensors(dtype: str, shape: tuple[int, ...]) -> None:
    wire = common_pb2.Tensor(dtype=dtype, shape=list(shape), data=b"")
    assert validate(wire, "x") == shape
    value = to_torch(wire, "x")
    assert tuple(value.shape) == shape and value.dtype == TORCH_DTYPES[dtype]
    again = from_torch(value, dtype)
    assert again.data == b"" and tuple(again.shape) == shape
    if dtype in NUMPY_WIRE:
        assert to_numpy(wire).shape == shape
        assert from_numpy(np.zeros(shape, NUMPY_WIRE[dtype])) == wire
    # An empty shape with bytes attached is a lie too.
    _raises_invalid(
        validate,
        common_pb2.Tensor(dtype=dtype, shape=list(shape), data=b"\0" * ITEMSIZE[dtype]),
        "x",
    )


# -- hostile or inconsistent input -----------------------------------------------------------

DECODERS = [
    pytest.param(lambda t: validate(t, "payload"), id="validate"),
    pytest.param(lambda t: to_numpy(t, "payload"), id="to_numpy"),
    pytest.param(lambda t: to_torch(t, "payload"), id="to_torch"),
]


@pytest.mark.parametrize("decode", DECODERS)
@pytest.mark.parametrize("delta", [-1, 1, -8, 8, -24])
def test_lying_byte_lengths_are_rejected(decode, delta: int) -> None:  # type: ignore[no-untyped-def]
    good = from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))
    data = good.data + b"\0" * delta if delta > 0 else good.data[:delta]
    error = _raises_invalid(decode, common_pb2.Tensor(dtype="float32", shape=[2, 3], data=data))
    assert "payload" in error.message and "24 bytes" in error.message


@pytest.mark.parametrize("decode", DECODERS)
@pytest.mark.parametrize("shape", [[-1, 6], [2, -3], [-2, -3], [-1]], ids=str)
def test_negative_dimensions_are_rejected(decode, shape: list[int]) -> None:  # type: ignore[no-untyped-def]
    # [-2, -3] has a positive product: the byte count alone would not catch it.
    data = b"\0" * abs(math.prod(shape)) * 4
    error = _raises_invalid(decode, common_pb2.Tensor(dtype="float32", shape=shape, data=data))
    assert "negative" in error.message


@pytest.mark.parametrize("decode", DECODERS)
@pytest.mark.parametrize("dtype", ["float64", "uint8", "", "Float32", "torch.float32", "pickle"])
def test_unknown_dtypes_are_rejected(decode, dtype: str) -> None:  # type: ignore[no-untyped-def]
    error = _raises_invalid(decode, common_pb2.Tensor(dtype=dtype, shape=[2], data=b"\0" * 8))
    assert "dtype" in error.message


@pytest.mark.parametrize("decode", DECODERS)
@pytest.mark.parametrize(
    "shape",
    [[2**40, 2**40], [2**62, 4], [MAX_TENSOR_BYTES // 4 + 1], [1 << 20, 1 << 20, 0, 1 << 20]],
    ids=str,
)
def test_oversized_declared_shapes_allocate_nothing(decode, shape: list[int]) -> None:  # type: ignore[no-untyped-def]
    wire = common_pb2.Tensor(dtype="float32", shape=shape, data=b"\0" * 16)
    tracemalloc.start()
    try:
        if math.prod(shape) == 0:
            _raises_invalid(decode, wire)  # zero elements but 16 bytes: a length mismatch
        else:
            error = _raises_invalid(decode, wire)
            assert "limit" in error.message
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


def test_size_limit_is_inclusive_of_exactly_the_limit() -> None:
    # A tensor of exactly MAX_TENSOR_BYTES is allowed by the limit; its byte count then decides.
    shape = [MAX_TENSOR_BYTES // 4]
    error = _raises_invalid(
        validate, common_pb2.Tensor(dtype="float32", shape=shape, data=b""), "x"
    )
    assert "limit" not in error.message and "needs" in error.message


def test_shape_and_dtype_constraints() -> None:
    wire = from_numpy(np.zeros((2, 3), np.float32))
    assert validate(wire, "x", ndim=2, dtypes=("float32",)) == (2, 3)
    _raises_invalid(validate, wire, "x", ndim=3, match="3 dimensions")
    _raises_invalid(validate, wire, "x", dtypes=("int64",), match="int64")
    _raises_invalid(to_torch, wire, "x", ndim=1)
    _raises_invalid(to_torch, wire, "x", dtypes=("float16", "bfloat16"))


@pytest.mark.parametrize("dtype", FLOAT_WIRE)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_are_rejected(dtype: str, bad: float) -> None:
    value = torch.zeros(2, 3, dtype=TORCH_DTYPES[dtype])
    value[1, 2] = bad
    error = _raises_invalid(to_torch, from_torch(value, dtype), "hidden_states")
    assert "NaN or Inf" in error.message and "hidden_states" in error.message


def test_float16_overflow_on_the_way_out_is_caught_on_the_way_in() -> None:
    # 1e6 does not fit float16: it becomes inf on the wire, and the receiver refuses it.
    wire = from_torch(torch.tensor([1e6]), "float16")
    _raises_invalid(to_torch, wire, "x", match="NaN or Inf")


def test_integer_and_bool_tensors_skip_the_finite_check() -> None:
    ids = torch.tensor([[0, -1, 2**62]], dtype=torch.int64)
    assert torch.equal(to_torch(from_torch(ids, "int64"), "ids"), ids)
    mask = torch.tensor([True, False])
    assert torch.equal(to_torch(from_torch(mask, "bool"), "mask"), mask)
