"""Read ranges of tensors from .safetensors files with plain positioned reads, no memory map.

On the project's machines a page fault per 4 KiB page made reading through safetensors' memory map
5× slower than `pread` into a reused buffer (2.6 s vs 0.5 s for three 1 GB checkpoints), and a
mapped tensor stays resident until it is dropped. Reading element ranges also bounds memory by the
chunk, not by the largest tensor. The format is the documented one: an 8-byte little-endian header
length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw little-endian data.
"""

import json
import os
import struct
import sys
from dataclasses import dataclass
from typing import Dict, Tuple

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 1024 * 1024  # what safetensors itself accepts


class TensorFileError(ValueError):
    """A file is not a readable safetensors file; the message names it."""


@dataclass(frozen=True)
class TensorLocation:
    file: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    offset: int  # absolute byte offset of the first element

    @property
    def numel(self) -> int:
        return torch.Size(self.shape).numel()


def read_header(path: str) -> Dict[str, TensorLocation]:
    """name -> location, from the header alone (no tensor data is read)."""
    if sys.byteorder != "little":
        raise TensorFileError("safetensors data is little-endian; this reader needs a little-endian machine")
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < size <= _MAX_HEADER:
            raise TensorFileError(f"{path} is not a safetensors file (bad header length)")
        try:
            header = json.loads(handle.read(size))
        except ValueError as error:
            raise TensorFileError(f"{path} has a corrupt safetensors header ({error})") from error
    file_size = os.path.getsize(path)
    locations = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise TensorFileError(f"{path}: tensor {name} has dtype {info.get('dtype')}, which finmerge cannot read")
        dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
        start, stop = info["data_offsets"]
        location = TensorLocation(path, dtype, shape, 8 + size + start)
        if stop - start != location.numel * dtype.itemsize or 8 + size + stop > file_size:
            raise TensorFileError(f"{path}: tensor {name} has data offsets that do not match its shape (truncated file?)")
        locations[name] = location
    return locations


class RangeReader:
    """Reads element ranges of tensors into one reused buffer per reader (one per input model)."""

    def __init__(self, max_bytes: int):
        self._buffer = bytearray(max_bytes)
        self._bytes = torch.frombuffer(self._buffer, dtype=torch.uint8) if max_bytes else torch.empty(0, dtype=torch.uint8)
        self._files: Dict[str, int] = {}

    def read(self, location: TensorLocation, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor; valid until the next read."""
        size = location.dtype.itemsize
        nbytes = (stop - start) * size
        if nbytes > len(self._buffer):
            raise ValueError(f"range of {nbytes} bytes exceeds the reader's buffer of {len(self._buffer)}")
        fd = self._fd(location.file)
        view, done, offset = memoryview(self._buffer), 0, location.offset + start * size
        while done < nbytes:
            got = os.preadv(fd, [view[done:nbytes]], offset + done)
            if got <= 0:
                raise TensorFileError(f"{location.file} ended early (truncated file?)")
            done += got
        return self._bytes[:nbytes].view(location.dtype)

    def _fd(self, path: str) -> int:
        if path not in self._files:
            self._files[path] = os.open(path, os.O_RDONLY)
        return self._files[path]

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def __enter__(self) -> "RangeReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
