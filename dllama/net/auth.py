"""The cluster key: reading it, and the two proofs of the handshake (docs/protocol.md, "Trust model").

Each side proves it holds the key by an HMAC-SHA256 over both sides' fresh nonces, so nothing recorded
from an earlier connection is accepted on a new one, and each proof carries its direction's label, so a
proof sent by one side cannot be reflected back to it. The key itself never crosses the wire.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import stat
import struct

from dllama.errors import DllamaError
from dllama.net import protocol as P

KEY_ENV = "DLLAMA_CLUSTER_KEY_FILE"
_ROOT_LABEL = b"dllama root proof\0"
_WORKER_LABEL = b"dllama worker proof\0"
_REPORT_LABEL = b"dllama worker report\0"


def key_from_args(args) -> bytes | None:
    """The key named by --cluster-key-file, else by $DLLAMA_CLUSTER_KEY_FILE, else None (no key)."""
    flag = getattr(args, "cluster_key_file", None)
    path = flag or os.environ.get(KEY_ENV) or None
    return None if path is None else read_key_file(path, "--cluster-key-file" if flag else KEY_ENV)


def read_key_file(path: str, what: str = "--cluster-key-file") -> bytes:
    """The secret in `path` without trailing whitespace. Refuses (DllamaError) a file that cannot be read,
    is empty, or that every user may read: a key anyone on the host can read keeps no one out."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise DllamaError(f"{what} {path}: not a regular file")
            key = f.read(1 << 16).rstrip()
    except OSError as exc:
        raise DllamaError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None
    if not key:
        raise DllamaError(f"{what} {path}: the file is empty")
    if mode & stat.S_IROTH:
        raise DllamaError(f"{what} {path}: readable by every user; restrict it (chmod o-r {path})")
    return key


def is_loopback(host: str) -> bool:
    """Whether `host` (a listening address) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def nonce() -> bytes:
    return secrets.token_bytes(P.NONCE_SIZE)


def _transcript(hello: P.Hello, worker_nonce: bytes, local: bytes = b"") -> bytes:
    # the worker's local-slice announcement is bound in: a peer between the two cannot make a root skip
    # streaming (or stream) to a worker against what that worker said
    return (P.MAGIC + struct.pack("<HHHBI", hello.version, hello.node_index, hello.n_nodes,
                                  *P.calibration_fields(hello))
            + hello.nonce + worker_nonce + local)


def report_mac(key: bytes | None, hello: P.Hello, worker_nonce: bytes, speed: float, free: int) -> bytes:
    """The MAC of a worker's calibration report (HELLO_ACK speed and free memory) in this session."""
    return hmac.new(key or b"", _REPORT_LABEL + _transcript(hello, worker_nonce) + struct.pack("<dQ", speed, free),
                    hashlib.sha256).digest()


def worker_proof(key: bytes | None, hello: P.Hello, worker_nonce: bytes, local: bytes = b"") -> bytes:
    return hmac.new(key or b"", _WORKER_LABEL + _transcript(hello, worker_nonce, local), hashlib.sha256).digest()


def root_proof(key: bytes | None, hello: P.Hello, worker_nonce: bytes, local: bytes = b"") -> bytes:
    return hmac.new(key or b"", _ROOT_LABEL + _transcript(hello, worker_nonce, local), hashlib.sha256).digest()


def check(expected: bytes, got: bytes) -> bool:
    return hmac.compare_digest(expected, got)
