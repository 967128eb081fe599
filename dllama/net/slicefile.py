"""Worker slice files: one worker's tensors in the exact byte form the root would stream it, so a worker
started with `--weights FILE` loads them from its own disk and a restart does not re-stream gigabytes.

    preamble  "<8sIIQ32s32s"  magic b"DLSLICE\\0", format version, header_len, payload_size,
                              sha256 of the payload, sha256 of the header
    payload   the node's tensors back to back, in the order the root streams them
    header    JSON, UTF-8 (keys sorted): {"model_fingerprint", "model_size", "plan_sha256", "plan": [NodeSlice
              dicts, every node], "spec": ModelSpec fields, "node_index", "n_nodes",
              "tensors": [[name, qtype, shape, offset, nbytes], ...]}

The header follows the payload so that a slice is cut and written in one pass. A slice is bound to the
model file by its fingerprint (`model_fingerprint`) and to the plan by `plan_sha256` (the spec and every node's ranges as the
partition gave them): the root compares both with its own before it lets a worker load locally.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile

import numpy as np

from dllama import quants
from dllama.errors import DllamaError
from dllama.net.protocol import json_bytes as _json

MAGIC = b"DLSLICE\0"
FORMAT_VERSION = 1
PREAMBLE = struct.Struct("<8sIIQ32s32s")
MAX_HEADER = 1 << 24
FP_WHOLE, FP_EDGE, FP_SPAN, FP_SAMPLES = 64 << 20, 1 << 20, 64 << 10, 256
_READ = 8 << 20


def plan_sha256(spec, plan) -> str:
    """What a slice was cut for besides the file: the model's spec and every node's ranges."""
    return hashlib.sha256(_json({"spec": spec.to_dict(), "plan": [n.to_dict() for n in plan]})).hexdigest()


def model_fingerprint(path: str) -> str:
    """The model file's identity for slices: sha256 of its size and of its bytes, all of them for a file
    up to FP_WHOLE, else its first and last MiB (header, tensor table) and FP_SAMPLES spans of 64 KiB spread
    evenly over it. Two model files of the same shape (fine-tunes, other quantizations) differ in every
    span; a root computes this at each start from about 18 MiB, where a whole-file sha256 of a multi-GB
    model would cost a Raspberry Pi's SD card minutes (the deployment checks files by their sha256)."""
    size = os.path.getsize(path)
    h = hashlib.sha256(b"dllama model fingerprint 1\0" + struct.pack("<Q", size))
    with open(path, "rb") as f:
        if size <= FP_WHOLE:
            spans = [(0, size)]
        else:
            step = (size - FP_SPAN) / (FP_SAMPLES - 1)
            spans = ([(0, FP_EDGE)] + [(int(k * step), FP_SPAN) for k in range(FP_SAMPLES)]
                     + [(size - FP_EDGE, FP_EDGE)])
        for offset, length in spans:
            f.seek(offset)
            while length:
                chunk = f.read(min(_READ, length))
                if not chunk:
                    raise OSError(f"{path} shrank while it was read")
                h.update(chunk)
                length -= len(chunk)
    return h.hexdigest()


def _write_atomically(path: str, fill) -> None:
    """`fill(file)` into a temporary file beside `path`, renamed over it only once complete: a failure
    (disk full, interrupt) leaves nothing half-written."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w+b") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def slice_name(index: int, n_nodes: int) -> str:
    return f"node{index}-of-{n_nodes}.dlslice"


def write_slice(path: str, loaded, plan, index: int, model_id: str) -> int:
    """Write node `index`'s slice of `loaded` (cut by `plan`, the partition's list of NodeSlice) to `path`,
    atomically. Returns the payload's size in bytes. Raises DllamaError naming the path on an OS error."""
    from dllama.model.partition import node_tensor_names, slice_tensor

    spec, node = loaded.spec, plan[index]

    def fill(f):
        f.write(bytes(PREAMBLE.size))
        h, table, offset = hashlib.sha256(), [], 0
        for name in node_tensor_names(spec, node):
            part = slice_tensor(loaded.tensors[name], name, spec, node)
            if part is None:
                continue
            qtype, shape, raw = part
            raw = np.ascontiguousarray(raw).reshape(-1)
            h.update(raw)
            f.write(memoryview(raw))
            table.append([name, qtype, list(shape), offset, int(raw.size)])
            offset += raw.size
        header = _json({"model_fingerprint": model_id, "model_size": os.path.getsize(loaded.path),
                        "plan_sha256": plan_sha256(spec, plan), "plan": [n.to_dict() for n in plan],
                        "spec": spec.to_dict(), "node_index": index, "n_nodes": len(plan), "tensors": table})
        f.write(header)
        f.seek(0)
        f.write(PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header), offset, h.digest(),
                              hashlib.sha256(header).digest()))
        return offset

    sizes = []
    try:
        _write_atomically(path, lambda f: sizes.append(fill(f)))
    except OSError as exc:
        raise DllamaError(f"cannot write slice {path}: {exc.strerror or exc}") from None
    return sizes[0]


class SliceFile:
    """An opened slice file whose preamble and header are checked (sizes, header sha256); the payload's
    sha256 is checked as it is loaded, so opening one costs no read of the weights."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                pre = f.read(PREAMBLE.size)
                if len(pre) < PREAMBLE.size:
                    raise self._error(f"truncated: {size} bytes, shorter than its preamble")
                magic, version, header_len, payload_size, payload_sha, header_sha = PREAMBLE.unpack(pre)
                if magic != MAGIC:
                    raise self._error("not a dllama slice file (run `dllama slice` to make one)")
                if version != FORMAT_VERSION:
                    raise self._error(f"slice format {version}; this dllama reads format {FORMAT_VERSION}")
                expected = PREAMBLE.size + payload_size + header_len
                if header_len > MAX_HEADER or size != expected:
                    raise self._error(f"{size} bytes where its preamble says {expected}: truncated or damaged")
                f.seek(PREAMBLE.size + payload_size)
                header = f.read(header_len)
        except OSError as exc:
            raise DllamaError(f"--weights {path}: cannot read it ({exc.strerror or exc})") from None
        if hashlib.sha256(header).digest() != header_sha:
            raise self._error("its header does not match its sha256: the file is damaged")
        self.payload_size, self.payload_sha256 = payload_size, payload_sha.hex()
        try:
            self.header = json.loads(header)
            self._check_table()
        except (ValueError, KeyError, TypeError, IndexError):
            raise self._error("its header is not a slice header") from None

    def _error(self, what: str) -> DllamaError:
        return DllamaError(f"--weights {self.path}: {what}")

    def _check_table(self) -> None:
        end = 0
        for name, qtype, shape, offset, nbytes in self.header["tensors"]:
            try:
                fits = nbytes == quants.tensor_bytes(qtype, tuple(shape))
            except DllamaError:
                fits = False
            if offset != end or not fits:
                raise self._error(f"tensor {name} at {offset}: its table is inconsistent")
            end = offset + nbytes
        if end != self.payload_size:
            raise self._error(f"its tensors take {end} bytes of a {self.payload_size}-byte payload")

    def announcement(self) -> dict:
        """What the worker tells a root about this slice at the handshake."""
        h = self.header
        return {"model_fingerprint": h["model_fingerprint"], "plan_sha256": h["plan_sha256"], "node_index": h["node_index"],
                "n_nodes": h["n_nodes"], "payload_sha256": self.payload_sha256, "payload_size": self.payload_size}

    def load_into(self, model, spec, node) -> int:
        """Hand `model` every tensor (as the root would stream them) after checking that this slice is for
        `node` of `spec`; the payload's sha256 is checked when the last byte is read. Returns bytes loaded.
        Raises DllamaError naming the file when it is not this slice or its bytes are damaged."""
        again = SliceFile(self.path)
        if again.announcement() != self.announcement():
            raise self._error("the file changed since the worker started; restart the worker")
        h = self.header
        if ((h["node_index"], h["n_nodes"]) != (node.index, node.n_nodes) or h["spec"] != spec.to_dict()
                or h["plan"][node.index] != node.to_dict()):
            raise self._error(f"not node {node.index}'s slice of the model the root loaded")
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            f.seek(PREAMBLE.size)
            for name, qtype, shape, offset, nbytes in h["tensors"]:
                raw = np.empty(nbytes, np.uint8)
                if f.readinto(memoryview(raw)) != nbytes:
                    raise self._error(f"truncated inside tensor {name}")
                # the bytes now live in the model: the page cache need not hold a second copy
                os.posix_fadvise(f.fileno(), PREAMBLE.size + offset, nbytes, os.POSIX_FADV_DONTNEED)
                digest.update(raw)
                model.load(name, qtype, tuple(shape), raw)
        if digest.hexdigest() != self.payload_sha256:
            raise self._error("its weights do not match their sha256: the file is damaged; cut it again "
                              "with `dllama slice`")
        return self.payload_size



def mismatch(announced: bytes, model_id: str | None, plan_digest: str, index: int, n_nodes: int) -> str | None:
    """Why a worker's announced slice (its CHALLENGE's local bytes) is not the one the root would stream it
    as node `index` of `n_nodes`, or None when it is."""
    try:
        a = json.loads(announced)
        model, plan, node = a["model_fingerprint"], a["plan_sha256"], (a["node_index"], a["n_nodes"])
    except (ValueError, TypeError, KeyError):
        return "its slice announcement is malformed"
    if model_id is None or model != model_id:
        return (f"its slice is of another model file (fingerprint {str(model)[:12]}..., "
                f"the root's {str(model_id)[:12]}...)")
    if node != (index, n_nodes):
        return f"its slice is node {node[0]} of {node[1]}, it joins as node {index} of {n_nodes}"
    if plan != plan_digest:
        return "its slice was cut by another partition plan"
    return None
