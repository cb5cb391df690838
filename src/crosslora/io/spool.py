"""Finished modules' factors parked on disk until the adapter is written.

Held in memory, a transfer's results grow with depth: at 7B shapes with rank 16 on all seven
modules, 5 MB of float32 factors per layer (170 MB for 32 layers, 1.8 GB for a 70B model's 80).
Parked in an anonymous temporary file (unlinked from the start, so even a killed run leaves
nothing behind) and read back one module at a time with positioned reads, not a memory map (whose
touched pages would count in resident memory), they add nothing to peak memory that grows with
the number of layers.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from crosslora.errors import CrossLoraError
from crosslora.io.safetensors_file import read_into, tensor_bytes
from crosslora.lora import LoraFactors


@dataclass(frozen=True)
class Parked:
    """Where one tensor lies in the spool: byte offset, shape, dtype."""

    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


@dataclass(frozen=True)
class ParkedFactors:
    A: Parked
    B: Parked
    scale: float


class Spool:
    """An append-only anonymous file of tensors in ``folder`` (the output's, so the space needed
    is where the adapter goes anyway). A failed write (a full disk) raises ``CrossLoraError``
    naming ``label`` (the output). Use as a context manager, or ``close()``."""

    def __init__(self, folder: str | os.PathLike[str] | None = None, label: str = "") -> None:
        self.folder, self.label = folder, label or str(folder or tempfile.gettempdir())
        try:
            self._file = tempfile.TemporaryFile(prefix=".crosslora-spool-", dir=folder)
        except OSError as err:
            raise self._error(err) from err
        self._end = 0

    @classmethod
    def at(cls, path: Path, write: bool) -> Spool:
        """A spool in the named file ``path``: a new one to write, or one written before to
        read (its tensors found again through the ``Parked`` its writer kept)."""
        spool = cls.__new__(cls)
        spool.folder, spool.label = path.parent, str(path)
        try:
            spool._file = open(path, "x+b" if write else "rb")  # noqa: SIM115 (closed by close)
        except OSError as err:
            raise spool._error(err) from err
        spool._end = 0 if write else path.stat().st_size
        return spool

    def _error(self, err: OSError) -> CrossLoraError:
        return CrossLoraError(f"cannot write {self.label}: {err.strerror or err}")

    @property
    def size(self) -> int:
        """Bytes parked so far."""
        return self._end

    def put(self, tensor: torch.Tensor) -> Parked:
        raw = tensor_bytes(tensor)
        fd, done = self._file.fileno(), 0
        try:
            while done < len(raw):
                done += os.pwrite(fd, raw[done:], self._end + done)
        except OSError as err:
            raise self._error(err) from err
        parked = Parked(self._end, tuple(tensor.shape), tensor.dtype)
        self._end += len(raw)
        return parked

    def get(self, parked: Parked, out: torch.Tensor | None = None) -> torch.Tensor:
        """The parked contents, in ``out`` (a contiguous CPU tensor of its size and dtype) or in
        a fresh tensor."""
        out = torch.empty(parked.shape, dtype=parked.dtype) if out is None else out
        read_into(self._file.fileno(), out, parked.offset)
        return out

    def park(self, factors: LoraFactors) -> ParkedFactors:
        return ParkedFactors(self.put(factors.A), self.put(factors.B), factors.scale)

    def load(self, parked: ParkedFactors) -> LoraFactors:
        return LoraFactors(self.get(parked.A), self.get(parked.B), parked.scale)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
