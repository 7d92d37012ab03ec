"""Embedding vectors as memcached values: a small header, then little-endian float32.

Decoding never raises: a truncated, foreign or corrupt value is a cache miss (``None``).
"""

from __future__ import annotations

import struct

import numpy as np
import numpy.typing as npt

_MAGIC = b"TV"
_VERSION = 1
# magic, format version, padding, element count
_HEADER = struct.Struct("<2sBxI")
_FLOAT32_LE = np.dtype("<f4")


def encode_vector(values: npt.ArrayLike) -> bytes:
    """Encode a 1-D float vector as header + little-endian float32 bytes."""
    array = np.asarray(values, dtype=_FLOAT32_LE)
    if array.ndim != 1:
        raise ValueError(f"expected a 1-D vector, got shape {array.shape}")
    return _HEADER.pack(_MAGIC, _VERSION, array.shape[0]) + array.tobytes()


def decode_vector(data: bytes) -> npt.NDArray[np.float32] | None:
    """Decode a value made by :func:`encode_vector`; ``None`` if it is malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return None
    view = memoryview(data)
    if view.nbytes < _HEADER.size:
        return None
    magic, version, count = _HEADER.unpack_from(view)
    if magic != _MAGIC or version != _VERSION:
        return None
    if view.nbytes != _HEADER.size + count * _FLOAT32_LE.itemsize:
        return None
    body = np.frombuffer(view, dtype=_FLOAT32_LE, count=count, offset=_HEADER.size)
    # astype copies: the result is writable, native-endian and does not pin the cached buffer.
    return body.astype(np.float32)
