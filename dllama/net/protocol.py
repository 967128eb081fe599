"""The dllama wire protocol, sans-I/O: frames, messages, encode/decode. No sockets here.

Every integer is little-endian. A connection carries a sequence of frames:

    frame  = header meta payload
    header = struct "<BBHI" (8 bytes)
        type         u8   message type (table below)
        reserved     u8   must be 0
        meta_len     u16  length of meta (<= 65535)
        payload_len  u32  length of payload (<= MAX_PAYLOAD = 64 MiB; a larger frame is refused)

| type | name       | direction      | meta                                        | payload                     |
|------|------------|----------------|---------------------------------------------|-----------------------------|
| 1    | HELLO      | root -> worker | "<4sHHH32sBI" magic b"DLMA", version, node_index, n_nodes, root nonce, calibration qtype (255: none), calibration cols | - |
| 2    | HELLO_ACK  | worker -> root | "<HdQ32s" version, speed, free memory, report MAC | -                    |
| 3    | REFUSE     | either         | reason, UTF-8                               | -                           |
| 4    | CONFIG     | root -> worker | -                                           | JSON object, UTF-8 (below)  |
| 5    | WEIGHT     | root -> worker | "<QQBB" offset, total, qtype, ndim; ndim x "<I" shape; name UTF-8 | bytes [offset, offset+len) of the tensor |
| 6    | READY      | either         | -                                           | -                           |
| 7    | STEP       | root -> worker | "<IBHdI" n, logits, k, temperature, out_rows | n x int32 positions, n x int32 slots (logits 3: then out_rows x f64 temperature, out_rows x int32 k) |
| 8    | BUFFER     | either         | "<BBII" op, ftype, n, cols                  | n x cols activations        |
| 9    | BYE        | root -> worker | -                                           | -                           |
| 10   | PROBE      | anyone -> worker | "<4sH" magic, version                     | -                           |
| 11   | PROBE_INFO | worker -> prober | -                                         | JSON object, UTF-8          |
| 12   | CHALLENGE  | worker -> root | "<32s32s" worker nonce, worker proof; local slice JSON or nothing | - |
| 13   | AUTH       | root -> worker | "<32s" root proof                           | -                           |
| 14   | PING       | root -> worker | -                                           | -                           |
| 15   | RELEASE    | root -> worker | "<II" slot, keep                            | -                           |
| 16   | TIMES      | worker -> root | "<QQ" compute ns, network ns                | -                           |

A session: root HELLO; worker CHALLENGE (or REFUSE: wrong magic/version, busy); root AUTH; worker HELLO_ACK
(or REFUSE: authentication failed, busy); root CONFIG, WEIGHT... (none when the CONFIG says the worker
loads its local slice), READY (all weights sent); worker READY
(loaded, kernels warm) or REFUSE (could not load); then per forward pass root STEP and the BUFFER exchanges
of the model, RELEASE when a conversation slot's positions are dropped, and PING while the root is
idle; finally root BYE (or the connection closes) and the worker
waits for the next root. A PROBE is the first and only frame of its own short connection: the worker
answers PROBE_INFO and closes, whether or not it is serving a root.

CONFIG JSON: {"spec": ModelSpec fields, "node": NodeSlice.to_dict(), "seq_len": int, "max_batch": int,
"buffer_type": "f32" | "q80", "n_slots": int}, plus "weights": "local" when the root accepted the worker's
local slice (then no WEIGHT frames follow: the worker loads its slice file). Keys sorted, no spaces. The
worker keeps a KV cache of seq_len positions for each of n_slots conversation slots (1 when absent).

Local slice: a worker started with `--weights FILE` appends to its CHALLENGE's meta the JSON (keys sorted)
{"model_fingerprint", "plan_sha256", "node_index", "n_nodes", "payload_sha256", "payload_size"} of its file
(dllama/net/slicefile.py); both proofs cover those bytes.

Authentication: with the cluster key K (bytes; empty when none is configured) and the transcript
T = magic + version (u16) + node_index (u16) + n_nodes (u16) + calibration qtype (u8) + calibration cols (u32)
+ root nonce + worker nonce + the CHALLENGE's local slice bytes (empty when none), the worker proof is
HMAC-SHA256(K, b"dllama worker proof\0" + T) and the root proof HMAC-SHA256(K, b"dllama root proof\0" + T).
The HELLO_ACK's report MAC is HMAC-SHA256(K, b"dllama worker report\0" + T' + "<dQ" speed, free memory),
T' being T without the local slice bytes: a root plans `--split auto` on figures only the worker could have
sent.

Both nonces are 32 fresh random bytes, so a recorded AUTH is worthless on a new connection, and the
distinct labels keep a proof from being reflected back to the side that made it.

Calibration (for `--split auto`): a HELLO naming a qtype asks the worker to time its matmul kernel, with its
thread count, on a matrix of that type with `cols` columns; HELLO_ACK speed is the weight values it
multiplied per second (0: not asked), free memory the bytes it may still allocate (0: unknown).

qtype codes: 0 f32, 1 f16, 2 q40, 3 q41, 4 q80. BUFFER op: 1 broadcast (root -> workers: x, once a pass,
with its STEP), 2 reduce (worker -> root, its partial sums; with two nodes also root -> worker, and each adds
the two), 7 sum (root -> workers, three nodes or more: every node's partial sums added in node order),
3 gather (worker -> root, its slice of the logits), 4 top (worker -> root,
its top candidates: n = how many, cols = its vocabulary slice's size; payload "<dd" m, s, then n x u32
token ids, then n x f32 logits, best first), 5 full (root -> worker, n = cols = 0, no payload: send the
slice of the last logits, as a gather, after a top), 6 rows (worker -> root, the answer to a STEP of logits 3: n =
out_rows, cols = its vocabulary slice's size; payload n x "<ddI" m, s, c, then row after row either its c
candidates (c x u32 ids, then c x f32 logits, best first) or, when c is 0, its cols f32 logits). BUFFER ftype: 0 f32 (n*cols float32), 1 q80 (n*cols/32
blocks of f16 scale + 32 int8; cols a multiple of 32).

STEP logits: what the worker sends at the end of the forward pass: 0 nothing (the output layer is skipped),
1 its slice of the logits (gather) of the pass's last out_rows rows, 2 its k best tokens and partial
normaliser at `temperature` (top, out_rows 1; temperature 0: greedy, k = 1); see dllama/candidates.py;
3 each of the last out_rows rows as its own sampler needs (rows: meta k and temperature 0, the rows' own
after the slots: k 0 asks for that row's slice of the logits, k >= 1 for its k best at its temperature), answered
by one BUFFER op 6; a root that cannot sample a row from its candidates asks for the slices of every row (op 5).
STEP rows: row t is at position positions[t] of slot slots[t]'s cache and attends over that slot only, so
one pass can carry the next token of several conversations and prompt chunks of others.

RELEASE: the worker forgets slot `slot`'s positions from `keep` on and gives their memory back.

TIMES: sent in the same write as, and just before, every gather and top BUFFER: the worker's own clock since
it was loaded, in nanoseconds: compute is its time inside forward passes (from their STEP until it waits for
the next, or up to this gather for the current one) outside the exchanges, network its time in them (waiting for and receiving the broadcast and the
other nodes' sums, sending partial sums and logits). Cumulative, so the root takes differences and a pass without logits is counted
with the next report.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import numpy as np

from dllama import quants
from dllama.errors import DllamaError

PROTOCOL_VERSION = 7
MAGIC = b"DLMA"
HEADER = struct.Struct("<BBHI")
MAX_META = 0xFFFF
MAX_PAYLOAD = 64 << 20

(HELLO, HELLO_ACK, REFUSE, CONFIG, WEIGHT, READY, STEP, BUFFER, BYE, PROBE, PROBE_INFO, CHALLENGE, AUTH,
 PING, RELEASE, TIMES) = range(1, 17)
TYPE_NAMES = {1: "HELLO", 2: "HELLO_ACK", 3: "REFUSE", 4: "CONFIG", 5: "WEIGHT", 6: "READY", 7: "STEP",
              8: "BUFFER", 9: "BYE", 10: "PROBE", 11: "PROBE_INFO", 12: "CHALLENGE", 13: "AUTH", 14: "PING",
              15: "RELEASE", 16: "TIMES"}

QTYPES = quants.QTYPES

OP_BROADCAST, OP_REDUCE, OP_GATHER, OP_TOP, OP_FULL, OP_ROWS, OP_SUM = 1, 2, 3, 4, 5, 6, 7
LOGITS_NONE, LOGITS_FULL, LOGITS_TOP, LOGITS_ROWS = 0, 1, 2, 3
TOP_STATS = struct.Struct("<dd")
ROW_STATS = struct.Struct("<ddI")   # a row of an OP_ROWS answer: m, s, how many candidates (0: its full slice)
FTYPES = ("f32", "q80")

NONCE_SIZE = PROOF_SIZE = 32
_HELLO = struct.Struct("<4sHHH32sBI")
_VERSION = struct.Struct("<H")
NO_CALIBRATION = 255
_CHALLENGE = struct.Struct("<32s32s")
_AUTH = struct.Struct("<32s")
_HELLO_ACK = struct.Struct("<HdQ32s")
_WEIGHT = struct.Struct("<QQBB")
STEP_META = struct.Struct("<IBHdI")
RELEASE_META = struct.Struct("<II")
BUFFER_META = struct.Struct("<BBII")
TIMES_META = struct.Struct("<QQ")
_PROBE = struct.Struct("<4sH")


class ProtocolError(DllamaError):
    """Bytes that are not a valid dllama frame (garbage, wrong lengths, unknown type)."""


class ClosedMidFrame(ProtocolError):
    """The peer closed the connection in the middle of a frame."""


def tensor_nbytes(qtype: str, shape) -> int:
    """Bytes of a tensor of `qtype` and `shape` (each row a whole number of blocks)."""
    try:
        return quants.tensor_bytes(qtype, tuple(shape) or (1,))
    except DllamaError as exc:
        raise ProtocolError(f"a {qtype} tensor of shape {tuple(shape)}: {exc}") from None


def buffer_nbytes(ftype: str, n: int, cols: int) -> int:
    try:
        return n * quants.row_bytes(ftype, cols)
    except DllamaError as exc:
        raise ProtocolError(f"a {ftype} buffer of {cols} columns: {exc}") from None


# --- messages ---------------------------------------------------------------------------------------

@dataclass
class Hello:
    version: int
    node_index: int
    n_nodes: int
    nonce: bytes = bytes(NONCE_SIZE)
    calibrate: str | None = None   # a qtype: the worker times its matmul on it (--split auto)
    calibrate_cols: int = 0


@dataclass
class Challenge:
    nonce: bytes
    proof: bytes
    local: bytes = b""   # the worker's local slice (slicefile.SliceFile.announcement() as JSON), or empty


@dataclass
class Auth:
    proof: bytes


@dataclass
class Ping:
    pass


@dataclass
class HelloAck:
    version: int
    speed: float = 0.0             # weight values multiplied per second (0: not asked)
    free: int = 0                  # bytes the worker may still allocate (0: unknown)
    mac: bytes = bytes(PROOF_SIZE)


@dataclass
class Refuse:
    reason: str


@dataclass
class Config:
    config: dict


@dataclass
class Weight:
    name: str
    qtype: str
    shape: tuple
    offset: int
    total: int
    payload: object = b""   # bytes-like: a chunk of the tensor's raw bytes


@dataclass
class Ready:
    pass


@dataclass
class Step:
    positions: np.ndarray   # int32 (n,)
    logits: int = LOGITS_FULL
    k: int = 0
    temperature: float = 0.0
    slots: np.ndarray | None = None   # int32 (n,); None: all in slot 0
    out_rows: int = 1
    row_temperatures: np.ndarray | None = None   # f64 (out_rows,), logits LOGITS_ROWS only
    row_k: np.ndarray | None = None              # int32 (out_rows,): 0 the row's full slice, else its top k


@dataclass
class Release:
    slot: int
    keep: int = 0


@dataclass
class Buffer:
    op: int
    ftype: str
    n: int
    cols: int
    payload: object = b""


@dataclass
class Times:
    compute_ns: int
    network_ns: int


@dataclass
class Bye:
    pass


@dataclass
class Probe:
    version: int = PROTOCOL_VERSION


@dataclass
class ProbeInfo:
    info: dict = field(default_factory=dict)


def json_bytes(obj) -> bytes:
    """The protocol's JSON form: keys sorted, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def encode(msg) -> list:
    """The frame of `msg` as buffers to send in order: [header + meta] or [header + meta, payload].

    The payload is passed through without a copy (a memoryview of a numpy array is fine)."""
    meta, payload = b"", b""
    if isinstance(msg, Hello):
        t, meta = HELLO, _HELLO.pack(MAGIC, msg.version, msg.node_index, msg.n_nodes, msg.nonce,
                                     *calibration_fields(msg))
    elif isinstance(msg, Challenge):
        t, meta = CHALLENGE, _CHALLENGE.pack(msg.nonce, msg.proof) + msg.local
    elif isinstance(msg, Auth):
        t, meta = AUTH, _AUTH.pack(msg.proof)
    elif isinstance(msg, Ping):
        t = PING
    elif isinstance(msg, HelloAck):
        t, meta = HELLO_ACK, _HELLO_ACK.pack(msg.version, msg.speed, msg.free, msg.mac)
    elif isinstance(msg, Refuse):
        t, meta = REFUSE, msg.reason.encode()[:MAX_META]
    elif isinstance(msg, Config):
        t, payload = CONFIG, json_bytes(msg.config)
    elif isinstance(msg, Weight):
        t = WEIGHT
        meta = (_WEIGHT.pack(msg.offset, msg.total, quants.quant(msg.qtype).wire_code, len(msg.shape))
                + struct.pack(f"<{len(msg.shape)}I", *msg.shape) + msg.name.encode())
        payload = msg.payload
    elif isinstance(msg, Ready):
        t = READY
    elif isinstance(msg, Step):
        positions = np.ascontiguousarray(msg.positions, dtype="<i4")
        slots = np.zeros_like(positions) if msg.slots is None else msg.slots
        rows = np.concatenate([positions, np.ascontiguousarray(slots, dtype="<i4")])
        meta = STEP_META.pack(len(positions), msg.logits, msg.k, msg.temperature, msg.out_rows)
        t, payload = STEP, memoryview(rows).cast("B")
        if msg.logits == LOGITS_ROWS:
            payload = (rows.tobytes() + np.ascontiguousarray(msg.row_temperatures, "<f8").tobytes()
                       + np.ascontiguousarray(msg.row_k, "<i4").tobytes())
    elif isinstance(msg, Release):
        t, meta = RELEASE, RELEASE_META.pack(msg.slot, msg.keep)
    elif isinstance(msg, Buffer):
        t, meta, payload = BUFFER, BUFFER_META.pack(msg.op, FTYPES.index(msg.ftype), msg.n, msg.cols), msg.payload
    elif isinstance(msg, Times):
        t, meta = TIMES, TIMES_META.pack(msg.compute_ns, msg.network_ns)
    elif isinstance(msg, Bye):
        t = BYE
    elif isinstance(msg, Probe):
        t, meta = PROBE, _PROBE.pack(MAGIC, msg.version)
    elif isinstance(msg, ProbeInfo):
        t, payload = PROBE_INFO, json_bytes(msg.info)
    else:
        raise TypeError(f"not a protocol message: {msg!r}")
    payload_len = memoryview(payload).nbytes
    if payload_len > MAX_PAYLOAD:
        raise ProtocolError(f"{TYPE_NAMES[t]} payload of {payload_len} bytes is over the {MAX_PAYLOAD}-byte limit")
    head = HEADER.pack(t, 0, len(meta), payload_len) + meta
    return [head, payload] if payload_len else [head]


def encode_bytes(msg) -> bytes:
    return b"".join(bytes(b) for b in encode(msg))


def parse_header(header) -> tuple[int, int, int]:
    """(type, meta_len, payload_len) of an 8-byte header; ProtocolError if it cannot be one of ours."""
    t, reserved, meta_len, payload_len = HEADER.unpack_from(header)
    if t not in TYPE_NAMES or reserved != 0:
        raise ProtocolError(f"not a dllama frame (header bytes {bytes(header[:HEADER.size]).hex()})")
    if payload_len > MAX_PAYLOAD:
        raise ProtocolError(f"{TYPE_NAMES[t]} frame of {payload_len} bytes is over the {MAX_PAYLOAD}-byte limit")
    return t, meta_len, payload_len


def parse_buffer_meta(meta) -> tuple[int, int, int, int]:
    """(op, ftype index, n, cols) of a BUFFER meta: the per-token path, so no message object."""
    if len(meta) != BUFFER_META.size:
        raise ProtocolError(f"BUFFER meta of {len(meta)} bytes, expected {BUFFER_META.size}")
    return BUFFER_META.unpack_from(meta)


def decode_frame(t: int, meta, payload):
    """The message of one frame whose header said type `t`. ProtocolError on inconsistent fields."""
    meta, payload = bytes(meta), memoryview(payload)
    try:
        return _DECODERS[t](meta, payload)
    except (struct.error, UnicodeDecodeError, ValueError, IndexError, KeyError) as exc:
        raise ProtocolError(f"malformed {TYPE_NAMES.get(t, t)} frame: {exc}") from None


def _empty(cls):
    def dec(meta, payload):
        if meta or len(payload):
            raise ProtocolError(f"{cls.__name__.upper()} carries no data, got {len(meta) + len(payload)} bytes")
        return cls()
    return dec


def _dec_hello(meta, payload):
    if meta[:4] != MAGIC:
        raise ProtocolError(f"not a dllama peer (magic {meta[:4]!r})")
    (version,) = _VERSION.unpack_from(meta, 4)
    if version != PROTOCOL_VERSION:
        # a root of another version: its HELLO may have another length, and the version is all we need
        return Hello(version, 0, 0)
    _, version, index, n_nodes, nonce, code, cols = _HELLO.unpack(meta)
    if code == NO_CALIBRATION:
        return Hello(version, index, n_nodes, nonce)
    if code not in quants.BY_WIRE_CODE:
        raise ProtocolError(f"HELLO asks for calibration on unknown qtype code {code}")
    return Hello(version, index, n_nodes, nonce, quants.BY_WIRE_CODE[code], cols)


def calibration_fields(hello: Hello) -> tuple[int, int]:
    """(qtype code, cols) of a HELLO as the wire and the transcript carry them."""
    if hello.calibrate is None:
        return NO_CALIBRATION, 0
    return quants.quant(hello.calibrate).wire_code, hello.calibrate_cols


def _dec_weight(meta, payload):
    offset, total, qcode, ndim = _WEIGHT.unpack_from(meta)
    shape = struct.unpack_from(f"<{ndim}I", meta, _WEIGHT.size)
    name = meta[_WEIGHT.size + 4 * ndim:].decode()
    qtype = quants.BY_WIRE_CODE.get(qcode)
    if qtype is None:
        raise ProtocolError(f"WEIGHT {name}: unknown tensor type code {qcode}")
    if total != tensor_nbytes(qtype, shape) or offset + len(payload) > total:
        raise ProtocolError(f"WEIGHT {name}: bytes [{offset}, {offset + len(payload)}) do not fit "
                            f"a {qtype} tensor of shape {shape}")
    return Weight(name, qtype, shape, offset, total, payload)


def _dec_step(meta, payload):
    n, logits, k, temperature, out_rows = STEP_META.unpack(meta)
    if len(payload) != step_nbytes(n, logits, out_rows):
        raise ProtocolError(f"STEP of {n} positions carries {len(payload)} bytes")
    check_step(n, logits, k, temperature, out_rows)
    rows = np.frombuffer(payload, dtype="<i4", count=2 * n)
    if logits != LOGITS_ROWS:
        return Step(rows[:n].copy(), logits, k, temperature, rows[n:].copy(), out_rows)
    temps = np.frombuffer(payload, "<f8", out_rows, 8 * n).copy()
    ks = np.frombuffer(payload, "<i4", out_rows, 8 * n + 8 * out_rows).copy()
    check_rows(temps, ks)
    return Step(rows[:n].copy(), logits, k, temperature, rows[n:].copy(), out_rows, temps, ks)


def step_nbytes(n: int, logits: int, out_rows: int) -> int:
    """A STEP's payload size: positions and slots, and each output row's temperature and k for LOGITS_ROWS."""
    return 8 * n + (12 * out_rows if logits == LOGITS_ROWS else 0)


def check_rows(temperatures: np.ndarray, ks: np.ndarray) -> None:
    """ProtocolError unless a LOGITS_ROWS STEP's rows ask for something a worker can send."""
    if not (np.all(temperatures >= 0) and np.all(np.isfinite(temperatures)) and np.all(ks >= 0)):
        raise ProtocolError(f"STEP rows ask for k {ks.tolist()} at temperatures {temperatures.tolist()}")


def rows_nbytes(ks, cols: int) -> int:
    """The payload of an OP_ROWS BUFFER answering rows that ask for `ks` from a slice of `cols` logits."""
    return sum(ROW_STATS.size + (8 * min(int(k), cols) if k else 4 * cols) for k in ks)


def check_step(n: int, logits: int, k: int, temperature: float, out_rows: int = 1) -> None:
    """ProtocolError unless a STEP's fields are consistent (positions and slots are checked against
    max_batch and n_slots by the worker)."""
    if logits not in (LOGITS_NONE, LOGITS_FULL, LOGITS_TOP, LOGITS_ROWS) or not temperature >= 0 or temperature == float("inf"):
        raise ProtocolError(f"STEP asks for logits {logits} at temperature {temperature}")
    if logits == LOGITS_TOP and k < 1:
        raise ProtocolError("STEP asks for the top 0 candidates")
    if logits == LOGITS_ROWS and (k or temperature):
        raise ProtocolError("STEP of rows carries its k and temperatures per row, not in its meta")
    if not 1 <= out_rows <= n or (logits == LOGITS_TOP and out_rows != 1):
        raise ProtocolError(f"STEP of {n} rows asks for the logits of {out_rows} rows ({logits})")


def _dec_buffer(meta, payload):
    op, fcode, n, cols = parse_buffer_meta(meta)
    ftype = FTYPES[fcode]
    if op == OP_ROWS:
        counts = [ROW_STATS.unpack_from(payload, ROW_STATS.size * r)[2] for r in range(n)
                  if ROW_STATS.size * (r + 1) <= len(payload)]
        size = rows_nbytes(counts, cols) if len(counts) == n and max(counts, default=0) <= cols else -1
    else:
        size = (TOP_STATS.size + 8 * n if op == OP_TOP else 0 if op == OP_FULL else buffer_nbytes(ftype, n, cols))
    if op not in (OP_BROADCAST, OP_REDUCE, OP_GATHER, OP_TOP, OP_FULL, OP_ROWS, OP_SUM) or len(payload) != size:
        raise ProtocolError(f"BUFFER op {op} of {n}x{cols} {ftype} carries {len(payload)} bytes")
    return Buffer(op, ftype, n, cols, payload)


def _dec_times(meta, payload):
    if len(payload):
        raise ProtocolError(f"TIMES carries no payload, got {len(payload)} bytes")
    return Times(*TIMES_META.unpack(meta))


def _dec_probe(meta, payload):
    magic, version = _PROBE.unpack(meta)
    if magic != MAGIC:
        raise ProtocolError(f"not a dllama peer (magic {magic!r})")
    return Probe(version)


_DECODERS = {
    HELLO: _dec_hello,
    HELLO_ACK: lambda meta, payload: HelloAck(*_HELLO_ACK.unpack(meta)),
    REFUSE: lambda meta, payload: Refuse(meta.decode()),
    CONFIG: lambda meta, payload: Config(json.loads(bytes(payload))),
    WEIGHT: _dec_weight,
    READY: _empty(Ready),
    STEP: _dec_step,
    BUFFER: _dec_buffer,
    BYE: _empty(Bye),
    PROBE: _dec_probe,
    PROBE_INFO: lambda meta, payload: ProbeInfo(json.loads(bytes(payload))),
    CHALLENGE: lambda meta, payload: Challenge(*_CHALLENGE.unpack_from(meta), meta[_CHALLENGE.size:]),
    AUTH: lambda meta, payload: Auth(*_AUTH.unpack(meta)),
    PING: _empty(Ping),
    RELEASE: lambda meta, payload: Release(*RELEASE_META.unpack(meta)),
    TIMES: _dec_times,
}


class Decoder:
    """Turns received bytes into messages: `feed(data)` returns the complete ones, `close()` says
    whether the stream ended between frames (fine) or inside one (ClosedMidFrame)."""

    def __init__(self):
        self._buf = bytearray()

    def feed(self, data) -> list:
        self._buf += data
        out = []
        while len(self._buf) >= HEADER.size:
            t, meta_len, payload_len = parse_header(self._buf)
            end = HEADER.size + meta_len + payload_len
            if len(self._buf) < end:
                break
            meta = self._buf[HEADER.size:HEADER.size + meta_len]
            out.append(decode_frame(t, meta, bytes(self._buf[HEADER.size + meta_len:end])))
            del self._buf[:end]
        return out

    def close(self) -> None:
        if self._buf:
            raise ClosedMidFrame(f"connection closed in the middle of a frame ({len(self._buf)} bytes pending)")


def decode(data):
    """The one message in `data`, a complete frame."""
    dec = Decoder()
    msgs = dec.feed(data)
    dec.close()
    if len(msgs) != 1:
        raise ProtocolError(f"expected one frame, got {len(msgs)}")
    return msgs[0]
