"""`load_model(path)`: any model file (reference `.m` or GGUF) as a ModelSpec plus zero-copy tensors."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from dllama import quants
from dllama.errors import FormatError
from dllama.formats.spec import ModelSpec

DLM_MAGIC = 0xA00ABCD
GGUF_MAGIC = b"GGUF"


@dataclass(eq=False)
class Tensor:
    name: str            # internal name (docs/architecture.md)
    qtype: str           # a `quants.QUANTS` name: "f32", "f16", "q40", "q41", "q80", or a GGUF-only one ("q4k", ...)
    shape: tuple         # (rows, cols) for matrices (rows = output features), (n,) for vectors
    data: np.ndarray     # raw bytes, uint8, 1-D, read-only, usually a view of a memory map

    @property
    def rows(self) -> int:
        return self.shape[0] if len(self.shape) > 1 else 1

    @property
    def cols(self) -> int:
        return self.shape[-1]

    def row_bytes(self) -> int:
        return quants.row_bytes(self.qtype, self.cols)

    def to_f32(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows start..stop dequantized to f32 (rows, cols); the whole vector for a 1-D tensor."""
        stop = self.rows if stop is None else stop
        rb = self.row_bytes()
        out = quants.dequantize(self.qtype, self.data[start * rb:stop * rb], stop - start, self.cols)
        return out.reshape(self.shape) if len(self.shape) == 1 else out


@dataclass(eq=False)
class LoadedModel:
    spec: ModelSpec
    tensors: dict
    path: str
    kind: str            # "dlm" | "gguf"
    _owner: object = field(default=None, repr=False)   # what keeps the memory map alive

    def close(self) -> None:
        """Drops this object's references to the map; the OS unmaps it once no view is left.

        Closing the mmap explicitly would turn any view still held elsewhere into a dangling pointer.
        """
        self.tensors = {}
        self._owner = None

    def release(self) -> None:
        """Same as close(): for callers that have copied what they need out of the map."""
        self.close()

    @property
    def gguf_reader(self):
        """The header reader (`gguf_reader.GGUFFile`) of a GGUF model (so its vocabulary is not parsed twice), else None."""
        return self._owner if self.kind == "gguf" else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def detect_kind(path: str) -> str:
    """'dlm' or 'gguf' from the first bytes. Raises FormatError naming the file when neither."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise FormatError(f"model file not found: {path}") from None
    except IsADirectoryError:
        raise FormatError(f"model path is a directory, not a file: {path}") from None
    except OSError as exc:
        raise FormatError(f"cannot read model file {path}: {exc.strerror or exc}") from None
    if head == GGUF_MAGIC:
        return "gguf"
    if len(head) == 4 and int.from_bytes(head, "little") in (DLM_MAGIC, 0xABCD00, 0xABCD01):
        return "dlm"
    if len(head) < 4:
        raise FormatError(f"{path}: too short to be a model file ({len(head)} bytes)")
    raise FormatError(f"{path}: not a model file (starts with {head.hex()}; expected a .m or GGUF file)")


def load_model(path: str | os.PathLike, m_keys: str = "auto") -> LoadedModel:
    """Maps a `.m` or GGUF model read-only. Raises FormatError (missing, unreadable, unknown, malformed).

    m_keys: for a `.m` file, the reference key set it was written with ("2024", "2025"), or "auto"."""
    path = os.fspath(path)
    kind = detect_kind(path)
    if kind == "gguf":
        from dllama.formats.gguf_model import read_gguf

        return read_gguf(path)
    from dllama.formats.dlm import read_dlm

    return read_dlm(path, m_keys)
