"""A real HTTP server on 127.0.0.1 for the downloader's tests (this module holds no tests itself).

Threaded `http.server` with Range / If-Range support as RFC 9110 describes it, and knobs to misbehave:
drop the connection after some bytes of the body, answer with a status, ignore Range, change a file's
content (and ETag) between requests, or frame bodies without Content-Length (chunked, or ended by closing
the connection). Every request is recorded, so tests can check what was asked for.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Served:
    data: bytes
    drop_after: list[int] = field(default_factory=list)   # per GET, in order: close after this many body bytes
    statuses: list[int] = field(default_factory=list)     # per request, in order: answer with this status
    ranges: bool = True                                   # honour Range
    etag: bool = True
    head_length: int | None = None                        # Content-Length a HEAD claims (default: the real one)
    stall_after: list[int] = field(default_factory=list)  # per GET: send this many bytes, then hang
    framing: str = "length"                               # GET bodies: "length" | "chunked" | "close"
    head_size: bool = True                                # HEAD tells the length at all

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class Seen:
    method: str
    path: str
    range: str | None
    if_range: str | None


class FileServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, Served] = {}
        self.redirects: dict[str, str] = {}   # path -> where a 302 sends it (as Hugging Face sends to its CDN)
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self.release = threading.Event()  # set to let stalled answers end
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def add(self, path: str, data: bytes, **knobs) -> Served:
        self.files[path] = Served(data, **knobs)
        return self.files[path]

    def gets(self, path: str | None = None) -> list[Seen]:
        return [s for s in self.seen if s.method == "GET" and (path is None or s.path == path)]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FileServer

    def log_message(self, *args):  # keep test output clean
        pass

    def _lookup(self):
        path = self.path.split("?", 1)[0]
        with self.server.lock:
            self.server.seen.append(Seen(self.command, path, self.headers.get("Range"),
                                         self.headers.get("If-Range")))
            served = self.server.files.get(path)
            status = served.statuses.pop(0) if served and served.statuses else None
            drop = served.drop_after.pop(0) if served and served.drop_after and self.command == "GET" else None
            stall = served.stall_after.pop(0) if served and served.stall_after and self.command == "GET" else None
        return served, status, drop, stall

    def _status_only(self, code: int, extra: dict | None = None):
        body = f"status {code}\n".encode() if self.command == "GET" else b""
        self.send_response(code)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirected(self) -> bool:
        to = self.server.redirects.get(self.path.split("?", 1)[0])
        if to is not None:
            with self.server.lock:
                self.server.seen.append(Seen(self.command, self.path.split("?", 1)[0], None, None))
            self._status_only(302, {"Location": to})
        return to is not None

    def do_HEAD(self):
        if self._redirected():
            return
        served, status, _, _ = self._lookup()
        if served is None or status:
            return self._status_only(status or 404)
        self.send_response(200)
        if served.head_size:
            self.send_header("Content-Length", str(served.head_length if served.head_length is not None
                                                   else len(served.data)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self):
        if self._redirected():
            return
        served, status, drop, stall = self._lookup()
        if served is None or status:
            return self._status_only(status or 404)
        data, etag = served.data, f'"{served.sha256[:16]}"'
        start, code = 0, 200
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if_range = self.headers.get("If-Range")
        if m and served.ranges and (if_range is None or if_range == etag):
            start = int(m.group(1))
            if start >= len(data):
                return self._status_only(416, {"Content-Range": f"bytes */{len(data)}"})
            code = 206
        body = data[start:]
        self.send_response(code)
        if served.framing == "length":
            self.send_header("Content-Length", str(len(body)))
        elif served.framing == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        if served.etag:
            self.send_header("ETag", etag)
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        cut = drop if drop is not None else stall
        self._send_body(served.framing, body if cut is None else body[:cut], complete=cut is None)
        if stall is not None:
            self.server.release.wait(60)
        if cut is not None:
            self.close_connection = True

    def _send_body(self, framing: str, body: bytes, complete: bool):
        if framing != "chunked":
            self.wfile.write(body)
        else:
            for i in range(0, len(body), 65536):
                piece = body[i:i + 65536]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            if complete:  # the last chunk: without it the body ends cut short
                self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
