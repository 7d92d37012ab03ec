"""TensorFiles: read single tensors of a model's safetensors files straight into their memory.

The safetensors format is an 8-byte little-endian header length, a JSON header (per tensor: dtype,
shape, byte offsets) and the raw little-endian bytes. Each tensor is read with `pread` into the
tensor that keeps it -- no mapping of the file (whose touched pages would count against the
worker and change under it if the file were rewritten in place) and no intermediate copy. A
tensor wanted in another dtype is converted through one small staging buffer reused for every
read, so a conversion never holds a full-size temporary (safetensors' own `pread` backend reads
a whole tensor even to slice it). Tensors that are only read to be transformed (quantized) can be
read into anonymous mappings: freeing them gives the memory straight back to the system instead
of leaving holes in the heap under the transformed weights.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

STAGING_BYTES = 16 * 1024 * 1024

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True, slots=True)
class _Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def _header(file: Path) -> dict[str, _Entry]:
    with file.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{file.name}: tensor {key} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        entries[key] = _Entry(
            file, DTYPES[info["dtype"]], tuple(info["shape"]), 8 + length + start, end - start
        )
    return entries


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    return tensor.reshape(-1).view(torch.uint8).numpy().data


def _pread_into(fd: int, target: memoryview, offset: int) -> None:
    while len(target):
        count = os.preadv(fd, [target], offset)
        if count <= 0:
            raise EOFError("safetensors file is shorter than its header says")
        target, offset = target[count:], offset + count


class TensorFiles:
    """The tensors of a model folder: one safetensors file or an index of shards."""

    def __init__(self, folder: Path) -> None:
        if sys.byteorder != "little":
            raise RuntimeError("safetensors data is little-endian; this machine is not")
        index = folder / "model.safetensors.index.json"
        files = (
            sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
            if index.is_file()
            else sorted(folder.glob("*.safetensors"))
        )
        self._entries: dict[str, _Entry] = {}
        for file in files:
            self._entries.update(_header(file))
        if not self._entries:
            raise FileNotFoundError(f"{folder} holds no safetensors weights")
        self._fds: dict[Path, int] = {}
        self._staging: torch.Tensor | None = None

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key].shape

    @contextmanager
    def opened(self) -> Iterator[TensorFiles]:
        """Keeps the files open and the staging buffer allocated while tensors are read."""
        try:
            yield self
        finally:
            for fd in self._fds.values():
                os.close(fd)
            self._fds = {}
            self._staging = None

    def _fd(self, entry: _Entry) -> int:
        if entry.file not in self._fds:
            self._fds[entry.file] = os.open(entry.file, os.O_RDONLY)
        return self._fds[entry.file]

    def read(self, key: str, dtype: torch.dtype, *, transient: bool = False) -> torch.Tensor:
        """One tensor, in `dtype` if it is floating (other tensors keep their own dtype).

        `transient`: the tensor lives in its own anonymous mapping, for tensors dropped soon.
        """
        entry = self._entries[key]
        if not (entry.dtype.is_floating_point and dtype.is_floating_point):
            dtype = entry.dtype
        out = _allocate(entry.shape, dtype, transient)
        if out.numel() == 0:
            return out
        fd = self._fd(entry)
        if dtype == entry.dtype:
            _pread_into(fd, _bytes_of(out), entry.offset)
            return out
        if self._staging is None:
            self._staging = torch.empty(STAGING_BYTES, dtype=torch.uint8)
        size = torch.empty((), dtype=entry.dtype).element_size()
        step = STAGING_BYTES // size
        flat = out.view(-1)
        for start in range(0, flat.numel(), step):
            stop = min(start + step, flat.numel())
            chunk = self._staging[: (stop - start) * size]
            _pread_into(fd, _bytes_of(chunk), entry.offset + start * size)
            flat[start:stop].copy_(chunk.view(entry.dtype))
        return out


def _allocate(shape: tuple[int, ...], dtype: torch.dtype, transient: bool) -> torch.Tensor:
    count = 1
    for dim in shape:
        count *= dim
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    if not transient or nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    # The tensor keeps the mapping alive; dropping the tensor unmaps it.
    area = mmap.mmap(-1, nbytes)
    return torch.frombuffer(area, dtype=dtype, count=count).view(shape)
