"""Lazy, validated access to one ``.safetensors`` file.

The header is parsed and checked *before* any tensor is read: its size is bounded, every
entry's dtype and shape must agree with its byte span, and no span may leave the file. Tensors
are then read one at a time with plain positioned reads into a fresh tensor (no memory map: a
mapped file's touched pages count in the process's resident memory until it is unmapped, so
reading a 10 GB shard through a map grows RSS by up to 10 GB), so holding a ``TensorFile``
costs only its header and a read tensor is freed as soon as its last reference goes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from crosslora.errors import CrossLoraError
from crosslora.io.files import open_regular

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit is 100 MB
MAX_TENSOR_BYTES = 1 << 40  # 1 TiB: anything larger is a lying header, not a model

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip

TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: dtype name (safetensors spelling), shape, byte span in the data block."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate the header of ``path``: ``(tensors by name, metadata)``.

    Raises ``CrossLoraError`` naming the file for anything malformed: a short file, an
    oversized or non-JSON header, unknown dtypes, shapes that disagree with byte spans, spans
    that overlap or run past the end of the file.
    """
    try:
        with open_regular(path) as f:  # not a FIFO or a device: they would block or never end
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CrossLoraError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise CrossLoraError(
                    f"{path}: corrupt safetensors header (declares {n} header bytes, "
                    f"file has {size})"
                )
            raw = f.read(n)
    except OSError as err:
        raise CrossLoraError(f"{path}: cannot read: {err.strerror or err}") from err
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # bad UTF-8 or JSON, absurd nesting or numbers
        raise CrossLoraError(f"{path}: corrupt safetensors header (not JSON: {err})") from err
    if not isinstance(header, dict):
        raise CrossLoraError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CrossLoraError(f"{path}: corrupt safetensors header (bad __metadata__)")
    data_size = size - 8 - n
    tensors = {name: _check_entry(path, name, entry, data_size) for name, entry in header.items()}
    spans = sorted((t.start, t.end, name) for name, t in tensors.items() if t.end > t.start)
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise CrossLoraError(f"{path}: corrupt safetensors header ({a} overlaps {b})")
    return tensors, metadata


def _check_entry(path: Path, name: str, entry: object, data_size: int) -> TensorInfo:
    def bad(why: str) -> CrossLoraError:
        return CrossLoraError(f"{path}: corrupt safetensors header: tensor {name!r} {why}")

    if not isinstance(entry, dict):
        raise bad("is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise bad(f"has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"has invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
    ):
        raise bad(f"has invalid data_offsets {offsets!r}")
    start, end = offsets
    nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
    if nbytes > MAX_TENSOR_BYTES:
        raise bad(f"declares {nbytes} bytes")
    if not 0 <= start <= end <= data_size:
        raise bad(f"lies outside the file (bytes {start}..{end} of {data_size})")
    if end - start != nbytes:
        raise bad(f"has {end - start} bytes for shape {shape} of {dtype}")
    return TensorInfo(dtype, tuple(shape), start, end)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of ``tensor`` (moved to the CPU, made contiguous), without a copy there."""
    t = tensor.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def read_into(fd: int, out: torch.Tensor, offset: int) -> None:
    """Fill the CPU tensor ``out`` with the bytes of file ``fd`` from ``offset`` (positioned
    reads, no memory map); ``CrossLoraError`` if the file ends first."""
    view, done = tensor_bytes(out), 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise CrossLoraError(f"file ends after {done} of {len(view)} bytes")
        done += got


class TensorFile:
    """A validated safetensors file whose tensors are read on demand, one at a time."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.tensors, self.metadata = read_header(self.path)
        self._data_start: int | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a fresh CPU tensor in its stored dtype), by positioned reads."""
        if name not in self.tensors:
            raise CrossLoraError(f"{self.path}: no tensor named {name!r}")
        info = self.tensors[name]
        size = info.end - info.start
        buf = torch.empty(size, dtype=torch.uint8)
        try:
            with open_regular(self.path) as f:
                if self._data_start is None:
                    self._data_start = 8 + int.from_bytes(f.read(8), "little")
                read_into(f.fileno(), buf, self._data_start + info.start)
        except OSError as err:
            msg = f"{self.path}: cannot read tensor {name!r}: {err.strerror or err}"
            raise CrossLoraError(msg) from err
        except CrossLoraError as err:
            raise CrossLoraError(f"{self.path}: cannot read tensor {name!r}: {err}") from err
        return buf.view(TORCH_DTYPES[info.dtype]).reshape(info.shape)

    def close(self) -> None:
        """Nothing is held open between reads; kept for callers that close files."""


SAFETENSORS_DTYPES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``tensors`` (name, CPU tensor) as a safetensors file, one tensor in memory at a time.

    ``safetensors.torch.save_file`` serialises a dict it holds whole; here each tensor's bytes go
    to a data file beside ``path`` as they come, and the header (names, dtypes, shapes, offsets,
    the 8-byte-aligned JSON the format defines) is written in front once all are known. The
    result reads back with ``safetensors`` and PEFT unchanged.
    """
    path = Path(path)
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    data = path.with_name(f".{path.name}.data")
    try:
        with open(data, "w+b") as body:
            offset = 0
            for name, tensor in tensors:
                if name in header:
                    raise ValueError(f"tensor {name!r} written twice")
                raw = tensor_bytes(tensor)
                body.write(raw)
                header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype],
                                "shape": list(tensor.shape),
                                "data_offsets": [offset, offset + len(raw)]}  # fmt: skip
                offset += len(raw)
            raw_header = json.dumps(header, separators=(",", ":")).encode()
            raw_header += b" " * (-len(raw_header) % 8)
            body.seek(0)
            with open(path, "wb") as out:
                out.write(len(raw_header).to_bytes(8, "little"))
                out.write(raw_header)
                shutil.copyfileobj(body, out, 16 << 20)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        data.unlink(missing_ok=True)
