"""A fast GGUF header reader with the parts of `gguf.GGUFReader`'s interface that dllama uses.

`gguf.GGUFReader` builds several numpy views per array element while parsing, so a vocabulary of 50k
tokens and 50k merges takes seconds to open (4+ s for SmolLM2 on a busy 2-core machine) — longer than
everything else in start-up together. This reader parses the same header with `struct` and `np.frombuffer`
(string arrays in one pass over a bytes object) in tens of milliseconds, and maps the tensor data read-only.
The `gguf` package still supplies the format's constants (types, block sizes) and writes GGUF files.

Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64 key/value count;
key/values (string key, u32 value type, value); tensor infos (string name, u32 n_dims, u64 dims fastest
first, u32 ggml type, u64 offset from the data start); padding to `general.alignment` (32); tensor data.
"""

from __future__ import annotations

import math
import mmap
import struct

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from dllama.errors import FormatError

_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_DTYPES = {t: np.dtype(f) for t, f in _SCALARS.items()}

# What a header may declare. Counts are checked against the bytes left in the file before anything is
# read, so a damaged or hostile header fails at once instead of after minutes of parsing.
MAX_DEPTH = 4                 # arrays of arrays: no writer nests deeper than 2
MAX_STRINGS = 1 << 22         # strings in one array: vocabularies and merge lists hold a few 100k
MAX_DIMS = 4                  # ggml's GGML_MAX_DIMS
MAX_ALIGNMENT = 1 << 20
_MIN_BYTES = {GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}   # a length; an element type and a count
_MIN_KV_BYTES = 8 + 4 + 1          # key length, value type, the smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8   # name length, n_dims, type, offset


class Field:
    __slots__ = ("name", "types", "value")

    def __init__(self, name: str, types: list, value):
        self.name, self.types, self.value = name, types, value

    def contents(self):
        return self.value.tolist() if isinstance(self.value, np.ndarray) else self.value

    def __len__(self):
        return len(self.value) if isinstance(self.value, (list, np.ndarray)) else 1


class TensorInfo:
    __slots__ = ("name", "tensor_type", "shape", "n_elements", "n_bytes", "data_offset", "data")

    def __init__(self, name, tensor_type, shape, n_elements, n_bytes, data_offset, data):
        self.name, self.tensor_type, self.shape = name, tensor_type, shape
        self.n_elements, self.n_bytes, self.data_offset, self.data = n_elements, n_bytes, data_offset, data


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str):
        v = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v[0] if len(v) == 1 else v

    def count(self, n: int, item_bytes: int, what: str) -> int:
        """`n`, once it is clear that n items of at least `item_bytes` each fit in what is left."""
        left = len(self.buf) - self.pos
        if n * item_bytes > left:
            raise ValueError(f"it declares {n} {what}, more than the {left} bytes left in the file can hold")
        return n

    def string(self) -> str:
        n = self.unpack("<Q")
        s = bytes(self.buf[self.pos:self.pos + n])
        if len(s) != n:
            raise EOFError
        self.pos += n
        return s.decode("utf-8", errors="replace")

    def value(self, vtype: int, depth: int = 0):
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            if depth == MAX_DEPTH:
                raise ValueError(f"arrays nested more than {MAX_DEPTH} deep")
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if etype in _DTYPES:
                dt = _DTYPES[GGUFValueType(etype)]
                self.count(count, dt.itemsize, "array elements")
                arr = np.frombuffer(self.buf, dt, count, self.pos)
                self.pos += dt.itemsize * count
                return arr
            if etype not in _MIN_BYTES:
                raise ValueError(f"unknown value type {etype}")
            self.count(count, _MIN_BYTES[etype], "array elements")
            if etype == GGUFValueType.STRING:
                if count > MAX_STRINGS:
                    raise ValueError(f"an array of {count} strings (at most {MAX_STRINGS} are supported)")
                return [self.string() for _ in range(count)]
            return [self.value(etype, depth + 1) for _ in range(count)]
        return self.unpack(_SCALARS[GGUFValueType(vtype)])


class GGUFFile:
    """`.fields` (name -> Field with `.contents()`), `.tensors` (TensorInfo with `.data` a read-only view).

    Raises FormatError naming the file when it is not GGUF, truncated or damaged.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise FormatError(f"cannot read model file {path}: {getattr(exc, 'strerror', None) or exc}") from None
        self.data = np.frombuffer(self._mm, np.uint8)
        try:
            self._parse()
        except (EOFError, struct.error) as exc:
            why = str(exc) if isinstance(exc, EOFError) and str(exc) else "it ends early"
            raise FormatError(f"{path}: not a readable GGUF file ({why}); truncated or damaged?") from None
        except (ValueError, KeyError) as exc:
            raise FormatError(f"{path}: not a readable GGUF file ({exc}); truncated or damaged?") from None

    def _parse(self) -> None:
        c = _Cursor(self._mm)
        if bytes(self._mm[:4]) != b"GGUF":
            raise ValueError("bad magic")
        c.pos = 4
        version, n_tensors, n_kv = c.unpack("<I"), c.unpack("<Q"), c.unpack("<Q")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported")
        self.fields: dict[str, Field] = {    # the pseudo-fields GGUFReader also lists
            "GGUF.version": Field("GGUF.version", [GGUFValueType.UINT32], version),
            "GGUF.tensor_count": Field("GGUF.tensor_count", [GGUFValueType.UINT64], n_tensors),
            "GGUF.kv_count": Field("GGUF.kv_count", [GGUFValueType.UINT64], n_kv),
        }
        for _ in range(c.count(n_kv, _MIN_KV_BYTES, "key/value pairs")):
            key, vtype = c.string(), c.unpack("<I")
            self.fields[key] = Field(key, [vtype], c.value(vtype))
        infos = []
        for _ in range(c.count(n_tensors, _MIN_TENSOR_INFO_BYTES, "tensors")):
            name, n_dims = c.string(), c.unpack("<I")
            if not 1 <= n_dims <= MAX_DIMS:
                raise ValueError(f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} are possible)")
            dims = [c.unpack("<Q") for _ in range(n_dims)]
            infos.append((name, dims, c.unpack("<I"), c.unpack("<Q")))
        align = self._alignment()
        start = -(-c.pos // align) * align
        self.tensors: list[TensorInfo] = []
        for name, dims, gtype, offset in infos:
            try:
                qtype = GGMLQuantizationType(gtype)
            except ValueError:
                raise ValueError(f"tensor {name} has unknown ggml type {gtype}") from None
            n_el = math.prod(dims)   # Python ints: a hostile shape must not wrap around
            block, size = GGML_QUANT_SIZES[qtype]
            n_bytes = n_el // block * size
            a = start + offset
            if a + n_bytes > self.data.size:
                raise EOFError(f"tensor {name} ends past the end of the file")
            self.tensors.append(TensorInfo(name, qtype, np.array(dims, np.uint64), n_el, n_bytes, a,
                                           self.data[a:a + n_bytes]))

    def _alignment(self) -> int:
        field = self.fields.get("general.alignment")
        if field is None:
            return 32
        align = field.value
        if not isinstance(align, int) or not 0 < align <= MAX_ALIGNMENT or align & (align - 1):
            raise ValueError(f"general.alignment {align!r} is not a power of two up to {MAX_ALIGNMENT}")
        return align
