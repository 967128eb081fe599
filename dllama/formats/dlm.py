"""Distributed Llama `.m` model files: read (the Oct 2024 and the 2025 key sets) and write (2025 set).

Layout (little-endian; docs/formats.md has the full story):

    int32 magic = 0x0A00ABCD
    int32 header_size            bytes from the start of the file to the first tensor (8 + 8 * n_pairs)
    int32 key, int32 value       n_pairs times (keys below)
    tensors, back to back, in `dlm_layout` order, with no per-tensor metadata

The two key sets share keys 0..18; 2025 adds 19..21 and reuses the arch-type values 0xABCD01/02
(Grok-1/Mixtral before, Qwen3/Qwen3-MoE now). `key_set` holds the rule that tells them apart.
"""

from __future__ import annotations

import contextlib
import os
import struct
from typing import Iterable

import numpy as np

from dllama import quants, schema
from dllama.errors import DllamaError, FormatError
from dllama.formats.loader import DLM_MAGIC, LoadedModel, Tensor
from dllama.formats.spec import ModelSpec

KEYS = {
    0: "version", 1: "arch_type", 2: "dim", 3: "hidden_dim", 4: "n_layers", 5: "n_heads", 6: "n_kv_heads",
    7: "n_experts", 8: "n_active_experts", 9: "vocab_size", 10: "seq_len", 11: "hidden_act",
    12: "rope_theta", 13: "weight_type", 14: "rope_scaling_factor", 15: "rope_scaling_low_freq_factor",
    16: "rope_scaling_high_freq_factor", 17: "rope_scaling_orig_max_seq_len", 18: "rope_type",
    19: "head_dim", 20: "norm_epsilon", 21: "moe_hidden_dim",
}
KEY_IDS = {name: key for key, name in KEYS.items()}
KEYS_2025_ONLY = {"head_dim", "norm_epsilon", "moe_hidden_dim"}
FLOAT_TYPES = quants.BY_DLM_CODE
HIDDEN_ACTS = {0: "gelu", 1: "silu"}
ROPE_TYPES = {0: "llama", 1: "falcon", 2: "llama3.1"}
NORM_EPSILONS = {5: 1e-5, 6: 1e-6}
ARCHS_2024 = {0xABCD00: "llama", 0xABCD01: "grok1", 0xABCD02: "mixtral"}
ARCHS_2025 = {0xABCD00: "llama", 0xABCD01: "qwen3", 0xABCD02: "qwen3_moe"}
ARCH_IDS_2024 = {"llama": 0xABCD00, "grok1": 0xABCD01, "mixtral": 0xABCD02}
ARCH_IDS_2025 = {"llama": 0xABCD00, "qwen3": 0xABCD01, "qwen3_moe": 0xABCD02}
PRE_2024_MAGICS = (0xABCD00, 0xABCD01)   # the first format: a fixed struct, rejected by every later reader


def _inverse(table: dict) -> dict:
    return {v: k for k, v in table.items()}


def key_set(kv: dict) -> str:
    """'2024' or '2025': which version of the reference wrote this header.

    A 2025 file is one with any of the keys only 2025 knows (head_dim, norm_epsilon, moe_hidden_dim:
    its converter writes head_dim and norm_epsilon for every Qwen3 model and moe_hidden_dim for every
    Qwen3-MoE one), or arch 0xABCD01 without experts (Qwen3; Grok-1 always has experts). Everything
    else reads as 2024. For arch 0xABCD00 (Llama, dense) both readings give the same model.
    """
    if KEYS_2025_ONLY & kv.keys():
        return "2025"
    if kv.get("arch_type") == 0xABCD01 and not kv.get("n_experts"):
        return "2025"
    return "2024"


def chosen_key_set(kv: dict, path: str, m_keys: str = "auto") -> str:
    """The key set to read the header `kv` with: detected (`key_set`) for "auto", else `m_keys` ('2024' or
    '2025') if the header can be of that set. Raises FormatError for a forced set the header contradicts."""
    if m_keys == "auto":
        return key_set(kv)
    if m_keys not in ("2024", "2025"):
        raise DllamaError(f"--m-keys {m_keys!r}: choose auto, 2024 or 2025")
    arch_id, experts = kv.get("arch_type", 0xABCD00), kv.get("n_experts", 0)
    why = None
    if m_keys == "2024" and KEYS_2025_ONLY & kv.keys():
        why = f"its header has {sorted(KEYS_2025_ONLY & kv.keys())[0]}, a key only the 2025 set has"
    elif m_keys == "2024" and arch_id == 0xABCD01 and not experts:
        why = "arch 0xabcd01 is Grok-1 there, which has experts, and this file has none"
    elif m_keys == "2025" and arch_id == 0xABCD01 and experts:
        why = f"arch 0xabcd01 is dense Qwen3 there, and this file has {experts} experts"
    elif m_keys == "2025" and arch_id == 0xABCD02 and not experts:
        why = "arch 0xabcd02 is Qwen3-MoE there, and this file has no experts"
    if why:
        raise FormatError(f"{path}: does not fit --m-keys {m_keys}: {why}")
    return m_keys


def parse_header(buf: bytes, path: str) -> tuple[int, dict]:
    """(header_size, {key name: int value}) from the first bytes of a `.m` file. Raises FormatError."""
    if len(buf) < 8:
        raise FormatError(f"{path}: truncated .m header ({len(buf)} bytes)")
    magic, header_size = struct.unpack_from("<ii", buf)
    if magic in PRE_2024_MAGICS:
        raise FormatError(f"{path}: pre-2024 .m format (magic {magic:#x}) is not supported; convert the model again")
    if magic != DLM_MAGIC:
        raise FormatError(f"{path}: wrong magic {magic & 0xFFFFFFFF:#010x} (expected {DLM_MAGIC:#010x})")
    if header_size < 8 or (header_size - 8) % 8:
        raise FormatError(f"{path}: bad .m header size {header_size} (expected 8 + 8 per key)")
    if len(buf) < header_size:
        raise FormatError(f"{path}: truncated (expected at least {header_size} header bytes, found {len(buf)})")
    ints = struct.unpack_from(f"<{(header_size - 8) // 4}i", buf, 8)
    kv = {}
    for key, value in zip(ints[0::2], ints[1::2]):
        if key not in KEYS:
            raise FormatError(f"{path}: unknown .m header key {key} (value {value})")
        kv[KEYS[key]] = value
    return header_size, kv


def _lookup(table: dict, value: int, what: str, path: str):
    if value not in table:
        shown = f"{value:#x}" if what == "arch type" else value
        raise FormatError(f"{path}: unsupported {what} {shown}")
    return table[value]


def spec_from_header(kv: dict, path: str, m_keys: str = "auto") -> ModelSpec:
    """ModelSpec from parsed header values (weight_type may be None: see read_dlm). Raises FormatError."""
    kset = chosen_key_set(kv, path, m_keys)
    archs = ARCHS_2025 if kset == "2025" else ARCHS_2024
    arch = _lookup(archs, kv.get("arch_type", 0xABCD00), "arch type", path)
    n_experts = kv.get("n_experts", 0)
    if arch == "llama" and n_experts > 0:
        arch = "mixtral"
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim"):
        if kv.get(name, 0) <= 0:
            raise FormatError(f"{path}: .m header lacks a positive {name} (found {kv.get(name)})")
    dim, n_heads, n_kv_heads = kv["dim"], kv["n_heads"], kv["n_kv_heads"]
    head_dim = kv.get("head_dim") or dim // n_heads
    if n_heads % n_kv_heads or (not kv.get("head_dim") and dim % n_heads):
        raise FormatError(f"{path}: inconsistent heads in .m header "
                          f"(dim {dim}, {n_heads} heads, {n_kv_heads} kv heads)")
    if kset == "2025":
        rope_default = "llama"
    else:
        rope_default = "llama" if arch == "llama" else "falcon"
    rope_type = _lookup(ROPE_TYPES, kv["rope_type"], "rope type", path) if "rope_type" in kv else rope_default
    if arch in ("qwen3", "qwen3_moe"):
        rope_type = "falcon"   # the reference forces it whatever the header says
    # Grok-1 is a GELU model; its 2024 converter wrote no hidden_act, and the reader's silu default was wrong
    act_default = 1 if arch != "grok1" else 0
    weight_type = kv.get("weight_type")
    return ModelSpec(
        arch=arch, dim=dim, hidden_dim=kv["hidden_dim"], n_layers=kv["n_layers"], n_heads=n_heads,
        n_kv_heads=n_kv_heads, head_dim=head_dim, vocab_size=kv["vocab_size"], seq_len=kv.get("seq_len", 0),
        n_experts=n_experts, n_active_experts=kv.get("n_active_experts", 0),
        moe_hidden_dim=kv.get("moe_hidden_dim", 0),
        hidden_act=_lookup(HIDDEN_ACTS, kv.get("hidden_act", act_default), "hidden act", path),
        rope_type=rope_type, rope_theta=float(kv.get("rope_theta", 10000)),
        rope_scaling_factor=float(kv.get("rope_scaling_factor", 1)),
        rope_scaling_low_freq_factor=float(kv.get("rope_scaling_low_freq_factor", 0)),
        rope_scaling_high_freq_factor=float(kv.get("rope_scaling_high_freq_factor", 0)),
        rope_scaling_orig_max_seq_len=kv.get("rope_scaling_orig_max_seq_len", 0),
        norm_eps=_lookup(NORM_EPSILONS, kv.get("norm_epsilon", 5), "norm epsilon code", path),
        weight_type=None if weight_type is None else _lookup(FLOAT_TYPES, weight_type, "weight type", path),
        name=os.path.splitext(os.path.basename(path))[0],
        extra={"dlm_key_set": kset, "dlm_version": kv.get("version", 0)},
        **(schema.grok_dlm_scalings(head_dim) if arch == "grok1" else {}),
    )


def dlm_layout(spec: ModelSpec, kset: str = "2025") -> list[tuple[str, str, tuple]]:
    """[(internal name, qtype, shape)] in file order, as the reference's loader reads them."""
    return [t for layer in _layout_by_layer(spec, kset) for t in layer]


def _layout_by_layer(spec: ModelSpec, kset: str):
    """dlm_layout a group at a time (the embedding, a layer's tensors before and after its experts, an
    expert, the head), so that a reader can stop as soon as a header describes more than its file holds."""
    group, key = [], None
    for name, row, (layer, expert) in schema.entries(spec, schema.dlm_rows(spec, kset)):
        if group and (layer, expert) != key:
            yield group
            group = []
        key = (layer, expert)
        group.append((name, schema.dlm_type(row, spec, kset), row.shape(spec)))
    yield group


def layout_bytes(layout) -> int:
    return sum(quants.tensor_bytes(q, s) for _, q, s in layout)


def _described_bytes(spec: ModelSpec, kset: str, limit: int) -> int | None:
    """The bytes of tensors the header describes, or None once they pass `limit` (the file's size): a
    damaged header may describe 2^31 layers, whose layout alone would not fit in memory."""
    total = 0
    for i, group in enumerate(_layout_by_layer(spec, kset)):
        total += layout_bytes(group)   # raises for a width its block type cannot hold
        # one past: a file cut short by a byte still gets its exact expected size; three groups in: every
        # kind of tensor shape has been checked by then (embedding, attention, feed-forward or an expert)
        if total > limit + 1 and i >= 2:
            return None
    return total


def _infer_weight_type(spec: ModelSpec, kset: str, payload: int, path: str) -> str:
    # 2024 files written before the weight type was a header key: the one type whose size fits
    fits = []
    for wt in FLOAT_TYPES.values():
        spec.weight_type = wt
        with contextlib.suppress(DllamaError):   # a block type that cannot hold these widths
            if _described_bytes(spec, kset, payload) == payload:
                fits.append(wt)
    if len(fits) != 1:
        raise FormatError(f"{path}: .m header names no weight type and the file size does not tell it")
    return fits[0]


def read_dlm(path: str, m_keys: str = "auto") -> LoadedModel:
    """Maps a `.m` file read-only; tensors are views of the map. Raises FormatError naming the file.

    m_keys: "auto", or the key set ("2024", "2025") to read the header with, whatever it looks like."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) == 8:
                head += f.read(max(0, min(struct.unpack("<i", head[4:])[0], 1 << 20) - 8))
    except OSError as exc:
        raise FormatError(f"cannot read model file {path}: {exc.strerror or exc}") from None
    header_size, kv = parse_header(head, path)
    spec = spec_from_header(kv, path, m_keys)
    try:
        tensors, mm = _map_tensors(path, spec, size, header_size)
    except FormatError as exc:
        if m_keys == "auto":
            raise
        # a forced key set that names another architecture: its tensors do not add up to the file
        raise FormatError(f"{path}: does not fit --m-keys {m_keys} (read as a {m_keys} {spec.arch} file: "
                          f"{str(exc).removeprefix(path + ': ')})") from None
    return LoadedModel(spec=spec, tensors=tensors, path=path, kind="dlm", _owner=mm)


def _map_tensors(path: str, spec: ModelSpec, size: int, header_size: int):
    """({name: Tensor}, the map) of a `.m` file whose header gave `spec`. Raises FormatError."""
    kset = spec.extra["dlm_key_set"]
    if spec.weight_type is None:
        spec.weight_type = _infer_weight_type(spec, kset, size - header_size, path)
    try:
        payload = _described_bytes(spec, kset, size - header_size)
    except DllamaError as exc:   # e.g. q40 weights of a width that is no multiple of 32
        raise FormatError(f"{path}: {exc}") from None
    if payload is None:
        raise FormatError(f"{path}: truncated or damaged: its header ({spec.n_layers} layers, dim {spec.dim}, "
                          f"vocabulary {spec.vocab_size}, {spec.n_experts} experts) describes more than the "
                          f"file's {size} bytes")
    expected = header_size + payload
    if size < expected:
        raise FormatError(f"{path}: truncated (expected {expected} bytes, found {size})")
    if size > expected:
        raise FormatError(f"{path}: {size - expected} unexpected bytes after the last tensor "
                          f"(expected {expected} bytes, found {size})")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    tensors, offset = {}, header_size
    for name, qtype, shape in dlm_layout(spec, kset):
        n = quants.tensor_bytes(qtype, shape)
        tensors[name] = Tensor(name, qtype, shape, mm[offset:offset + n])
        offset += n
    return tensors, mm


def _exact_int(spec: ModelSpec, field: str, value) -> int:
    if float(value) != int(value):
        raise DllamaError(f"cannot store {field}={value} in a .m header: it holds integers only")
    return int(value)


def write_key_set(spec: ModelSpec) -> str:
    """The key set `write_dlm` uses: '2024' for Mixtral-style and Grok-1 models, '2025' otherwise.

    The 2025 reference runs experts for Qwen3-MoE only (a llama-arch file with experts fails to
    build its network), so llama-family MoE models are written as the Oct 2024 reference read them.
    """
    if spec.arch in ("mixtral", "grok1") or (spec.arch == "llama" and spec.n_experts):
        return "2024"
    return "2025"


def _check_2024(spec: ModelSpec) -> None:
    if spec.arch == "grok1" and not spec.n_experts:
        raise DllamaError("cannot write a grok1 model without experts (it would read back as Qwen3)")
    if spec.arch == "grok1":
        want = schema.grok_dlm_scalings(spec.head_dim)
        off = [f"{f} {getattr(spec, f):g} (a .m file means {v:g})" for f, v in want.items()
               if abs(getattr(spec, f) - v) > 1e-6 * abs(v)]
        if off:
            raise DllamaError(f"cannot write this grok1 model as .m: its header cannot hold {', '.join(off)}")
    # what the Oct 2024 header cannot say, it assumes: head_dim = dim / n_heads, epsilon 1e-5
    if spec.head_dim * spec.n_heads != spec.dim or abs(spec.norm_eps - 1e-5) > 1e-9 or spec.moe_hidden_dim:
        raise DllamaError(f"cannot write this {spec.arch} model as .m: the Oct 2024 header (the only one with "
                          "this arch) needs head_dim = dim / n_heads, norm epsilon 1e-5 and no moe_hidden_dim")


def header_items(spec: ModelSpec) -> list[tuple[str, int]]:
    """The (key, value) pairs `write_dlm` stores, in the reference converter's order. Raises DllamaError."""
    kset = write_key_set(spec)
    arch_ids = ARCH_IDS_2024 if kset == "2024" else ARCH_IDS_2025
    if spec.arch not in arch_ids:
        raise DllamaError(f"cannot write a {spec.arch} model as .m (the format has no such arch type)")
    arch_id = ARCH_IDS_2024["mixtral"] if spec.arch == "llama" and kset == "2024" else arch_ids[spec.arch]
    eps_code = next((c for c, e in NORM_EPSILONS.items() if abs(spec.norm_eps - e) <= e * 1e-4), None)
    if eps_code is None:
        raise DllamaError(f"cannot store norm epsilon {spec.norm_eps} in a .m header (only 1e-5 and 1e-6)")
    if spec.weight_type not in _inverse(FLOAT_TYPES):
        raise DllamaError(f"cannot write {spec.weight_type!r} weights to a .m file (f32, f16, q40 or q80)")
    if kset == "2024":
        _check_2024(spec)
    items = [
        ("version", 0), ("arch_type", arch_id), ("hidden_act", _inverse(HIDDEN_ACTS)[spec.hidden_act]),
        ("dim", spec.dim), ("hidden_dim", spec.hidden_dim), ("n_layers", spec.n_layers), ("n_heads", spec.n_heads),
        ("n_kv_heads", spec.n_kv_heads), ("weight_type", _inverse(FLOAT_TYPES)[spec.weight_type]),
        ("seq_len", spec.seq_len), ("vocab_size", spec.vocab_size), ("n_experts", spec.n_experts),
        ("n_active_experts", spec.n_active_experts), ("rope_theta", _exact_int(spec, "rope_theta", spec.rope_theta)),
        ("rope_type", _inverse(ROPE_TYPES)[spec.rope_type]),
    ]
    if spec.rope_type == "llama3.1":
        for f in ("rope_scaling_factor", "rope_scaling_low_freq_factor", "rope_scaling_high_freq_factor",
                  "rope_scaling_orig_max_seq_len"):
            items.append((f, _exact_int(spec, f, getattr(spec, f))))
    if kset == "2024":
        return items
    # keys 19-21 only when they say something: without them the Oct 2024 reference reads the file too.
    # Qwen3-MoE always gets one, or it would read back as Mixtral (see key_set).
    if spec.head_dim * spec.n_heads != spec.dim or spec.arch == "qwen3_moe":
        items.append(("head_dim", spec.head_dim))
    if eps_code != 5:
        items.append(("norm_epsilon", eps_code))
    if spec.moe_hidden_dim:
        items.append(("moe_hidden_dim", spec.moe_hidden_dim))
    return items


def header_bytes(spec: ModelSpec) -> bytes:
    items = header_items(spec)
    body = b"".join(struct.pack("<ii", KEY_IDS[k], v) for k, v in items)
    return struct.pack("<ii", DLM_MAGIC, 8 + len(body)) + body


@contextlib.contextmanager
def atomic_paths(paths: list[str]):
    """Yields one temporary path per output; renames them all into place only if the block completes.

    Missing folders of the outputs are created (`--output-model models/x.m` in a fresh clone). On any
    exception, Ctrl-C included, the temporaries and the folders made here are removed and no output is
    touched; an OSError (no space, no permission, a folder in the way) becomes a DllamaError naming the output.
    """
    temps, made = [], []
    try:
        for p in paths:
            d, base = os.path.split(os.path.abspath(p))
            _make_folders(d, p, made)
            temps.append(os.path.join(d, f".{base}.{os.getpid()}.tmp"))
        yield temps
        for t, p in zip(temps, paths):
            os.replace(t, p)
    except BaseException as exc:
        for t in temps:
            with contextlib.suppress(OSError):
                os.unlink(t)
        for d in reversed(made):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        if isinstance(exc, OSError) and exc.errno is not None:
            raise DllamaError(_os_error_message(exc, temps, paths)) from None
        raise


def _os_error_message(exc: OSError, temps: list[str], paths: list[str]) -> str:
    # A temporary (or a writer's own temporary beside it) stands for its output; a failed write() names
    # no file, and a file that is none of ours is named as it is.
    name = os.fspath(exc.filename) if exc.filename is not None else ""
    ours = next((p for t, p in zip(temps, paths) if name and name.startswith(t)), None)
    if name and ours is None and name not in paths:
        return f"{name}: {exc.strerror}"
    return f"cannot write {ours or name or ', '.join(paths)}: {exc.strerror}"


def _make_folders(folder: str, output: str, made: list) -> None:
    """Creates `folder` and any missing parents, appending each one made to `made` (outermost first)."""
    missing = []
    while not os.path.isdir(folder) and folder not in missing:
        missing.append(folder)
        folder = os.path.dirname(folder)
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except OSError as exc:
            raise DllamaError(f"cannot create the folder {d} for {output}: {exc.strerror}") from None
        made.append(d)


def _row_chunks(source, qtype: str, shape: tuple):
    """Yields uint8 chunks of the tensor `source` stored as qtype, a bounded number of rows at a time."""
    rows = shape[0] if len(shape) > 1 else 1
    cols = shape[-1]
    step = max(1, (1 << 22) // cols)     # ~16 MB of f32 per chunk
    if isinstance(source, Tensor):
        if source.qtype == qtype:
            rb = source.row_bytes()
            for r in range(0, rows, step):
                yield source.data[r * rb:min(rows, r + step) * rb]
        else:
            for r in range(0, rows, step):
                yield quants.quantize(qtype, source.to_f32(r, min(rows, r + step)))
    elif isinstance(source, np.ndarray):
        x = source.reshape(rows, cols)
        for r in range(0, rows, step):
            yield quants.quantize(qtype, x[r:r + step])
    else:   # an iterable of f32 row chunks
        for chunk in source:
            yield quants.quantize(qtype, np.asarray(chunk).reshape(-1, cols))


def write_dlm_to(f, spec: ModelSpec, tensors: Iterable) -> int:
    """Writes header and tensors to the open binary file f; returns the bytes written.

    `tensors` yields (internal name, source) in `dlm_layout(spec, write_key_set(spec))` order, where
    source is a Tensor (copied raw when its type already matches, else re-quantized), an f32 array,
    or an iterable of f32 row chunks. Only one chunk is in memory at a time. Raises DllamaError on a
    mismatch.
    """
    header = header_bytes(spec)
    f.write(header)
    total = len(header)
    items = iter(tensors)
    for name, qtype, shape in dlm_layout(spec, write_key_set(spec)):
        got = next(items, None)
        if got is None or got[0] != name:
            raise DllamaError(f"writing .m: expected tensor {name}, got {None if got is None else got[0]}")
        n = 0
        try:
            for chunk in _row_chunks(got[1], qtype, shape):
                f.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
                n += chunk.nbytes
        except DllamaError as exc:   # e.g. a width that is no multiple of 32: say which tensor
            raise DllamaError(f"writing .m tensor {name} {shape} as {qtype}: {exc}") from None
        want = quants.tensor_bytes(qtype, shape)
        if n != want:
            raise DllamaError(f"writing .m: tensor {name} {shape} gave {n} bytes, expected {want}")
        total += n
    if next(items, None) is not None:
        raise DllamaError("writing .m: more tensors than the model's layout holds")
    return total


def write_dlm(path: str, spec: ModelSpec, tensors: Iterable) -> int:
    """Writes a `.m` file atomically (temporary name, renamed when complete). See write_dlm_to."""
    with atomic_paths([path]) as (tmp,):
        with open(tmp, "wb") as f:
            n = write_dlm_to(f, spec, tensors)
    return n
