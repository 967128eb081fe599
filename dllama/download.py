"""Resumable, verified downloads with the stdlib (urllib): what `launch.py` fetches models with.

A file is written as `<dest>.part`; beside it `<dest>.part.json` records which of the file's parts is being
fetched, where that part starts in the file and the server's validator (ETag / Last-Modified) for it. The
length of `.part` is the truth about how much has arrived, so a run killed at any moment resumes with an
HTTP Range request for the rest of the current part (`If-Range` makes a changed file come back whole).
`<dest>` itself appears only by a rename once every part is in and the size and sha256 (where known)
match, so a file under the final name is always complete. A part is in only when its length is known
(Content-Length, Content-Range, a chunked body's last chunk, else HEAD) and met, or the sha256 will tell.

Failures come in three kinds: transient ones (a reset, a timeout, 5xx, a body cut short) are retried with
back-off; a server that cannot be reached at all (no DNS answer, refused, no route) and a disk that is
full fail at once, since waiting would not change the answer.

Stdlib only: `launch.py` imports this before any dependency is installed.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import HTTPRedirectHandler, Request, build_opener, urlopen

from dllama import __version__
from dllama.errors import DllamaError
from dllama.progress import Progress, hsize

CHUNK = 1 << 20
USER_AGENT = f"dllama/{__version__} (launch.py)"


@dataclass(frozen=True)
class Retry:
    attempts: int = 8              # consecutive failures without progress before giving up
    backoff: float = 1.0           # first delay in seconds, doubled after each failure
    max_delay: float = 60.0
    timeout: float = 30.0          # socket timeout of one request


@dataclass(frozen=True)
class Target:
    """A file to fetch: the parts in order, concatenated into `dest`."""

    urls: tuple[str, ...]
    dest: Path
    size: int | None = None        # exact bytes, where known
    sha256: str | None = None


class _Transient(Exception):
    """A failure worth retrying: network error, 5xx, a body cut short."""


def partial_paths(dest: Path) -> tuple[Path, Path]:
    """The temporary file and its JSON sidecar for `dest`."""
    return dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.json")


# ------------------------------------------------------------------------------------------ HTTP helpers

def _request(url: str, headers: dict | None = None, method: str = "GET") -> Request:
    return Request(url, headers={"User-Agent": USER_AGENT, **(headers or {})}, method=method)


def _http_error(url: str, exc: HTTPError) -> Exception:
    if exc.code >= 500 or exc.code in (408, 429):
        return _Transient(f"HTTP {exc.code} {exc.reason}")
    return DllamaError(f"HTTP {exc.code} {exc.reason} for {url}")


# A server that cannot be reached at all: retrying for minutes would only delay the same answer.
_UNREACHABLE = {errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN}


def _unreachable(url: str, exc: BaseException) -> DllamaError | None:
    """The one-line error for a name that does not resolve, a refused connection or no route; else None."""
    reason = getattr(exc, "reason", exc)   # URLError wraps the socket's error
    host = urlsplit(url).netloc
    if isinstance(reason, socket.gaierror):
        why = f"cannot resolve {urlsplit(url).hostname} ({reason.strerror})"
    elif isinstance(reason, OSError) and reason.errno in _UNREACHABLE:
        why = f"cannot reach {host} ({reason.strerror})"
    else:
        return None
    return DllamaError(f"could not download {url}: {why}; check the network connection (or HF_ENDPOINT)")


class _KeepHead(HTTPRedirectHandler):
    """Follow a redirect with HEAD again (urllib before 3.13 turns it into a GET of the whole file)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and req.get_method() == "HEAD":
            new.method = "HEAD"
        return new


_head_opener = build_opener(_KeepHead)


def remote_size(url: str, retry: Retry = Retry()) -> int | None:
    """The size a HEAD request reports, or None when the server will not say.

    Raises DllamaError for a 4xx answer (a wrong URL is worth knowing before anything is written) and for
    a server that cannot be reached at all (no DNS answer, refused, no route).
    """
    try:
        with _head_opener.open(_request(url, method="HEAD"), timeout=retry.timeout) as resp:
            length = resp.headers.get("Content-Length")
            return int(length) if length and length.isdigit() else None
    except HTTPError as exc:
        err = _http_error(url, exc)
        if isinstance(err, DllamaError) and exc.code not in (405, 501):
            raise err from None
        return None
    except (URLError, OSError, http.client.HTTPException, ValueError) as exc:
        unreachable = _unreachable(url, exc)
        if unreachable is not None:
            raise unreachable from None
        return None  # the GET that follows retries and reports


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


# ---------------------------------------------------------------------------------------- resumable fetch

@dataclass
class _State:
    urls: list[str]
    part: int = 0                  # index of the part being fetched
    start: int = 0                 # where that part begins in the .part file
    size: int | None = None        # that part's length, once a response said it
    validator: str | None = None   # its strong ETag or Last-Modified, for If-Range
    path: Path | None = field(default=None, repr=False)
    sha256_known: bool = field(default=False, repr=False)  # the whole file's sum is checked at the end

    @classmethod
    def load(cls, path: Path, urls: list[str]) -> "_State | None":
        try:
            d = json.loads(path.read_text())
            state = cls(urls=d["urls"], part=int(d["part"]), start=int(d["start"]), size=d["size"],
                        validator=d["validator"], path=path)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return state if state.urls == urls and 0 <= state.part <= len(urls) else None

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = {"urls": self.urls, "part": self.part, "start": self.start, "size": self.size,
                "validator": self.validator}
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.path)


def _length(f) -> int:
    f.flush()
    return os.fstat(f.fileno()).st_size


def _truncate(f, n: int) -> None:
    f.flush()
    f.truncate(n)
    f.seek(n)


def _write_all(f, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[f.write(view):]  # a raw (unbuffered) file may take less than all of it


def _validator(headers) -> str | None:
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):  # If-Range accepts only strong validators
        return etag
    return headers.get("Last-Modified")


def _request_part(f, url: str, state: _State, retry: Retry, bar: Progress) -> None:
    """Fetch the rest of part `state.part` into `f`.

    Raises _Transient (retry), DllamaError (give up), or OSError from writing `f` (e.g. the disk is full).
    """
    have = _length(f) - state.start
    headers = {}
    if have > 0:
        headers["Range"] = f"bytes={have}-"
        if state.validator:
            headers["If-Range"] = state.validator
    try:
        resp = urlopen(_request(url, headers), timeout=retry.timeout)
    except HTTPError as exc:
        if exc.code == 416 and have > 0:
            m = re.fullmatch(r"bytes\s+\*/(\d+)", exc.headers.get("Content-Range", "").strip())
            if m and int(m.group(1)) == have:  # the part was complete when the last run stopped
                state.size = have
                return
            _truncate(f, state.start)
            raise _Transient("the server refused to resume; starting the part again") from None
        raise _http_error(url, exc) from None
    except (URLError, OSError, http.client.HTTPException) as exc:
        raise (_unreachable(url, exc) or _Transient(str(getattr(exc, "reason", exc)))) from None
    with resp:
        if resp.status == 206:
            m = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
            if not m or int(m.group(1)) != have:
                _truncate(f, state.start)
                raise _Transient("the server resumed at the wrong offset; starting the part again")
            total = None if m.group(3) == "*" else int(m.group(3))
        else:
            if have > 0:  # no range support, or the file changed (If-Range): the whole part comes back
                _truncate(f, state.start)
                bar.sync(state.start)
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        validator = _validator(resp.headers)
        if (total, validator) != (state.size, state.validator):
            state.size, state.validator = total, validator
            state.save()
        _receive(f, resp, bar)
        # A chunked body that was cut short raised IncompleteRead above; a close-delimited one looks complete.
        delimited_by_close = total is None and not resp.chunked
    got = _length(f) - state.start
    if delimited_by_close:
        total = _length_for_unframed(f, url, state, retry, got)
    if total is None:
        state.size = got
    elif got != total:
        raise _Transient(f"connection closed after {got} of {total} bytes")


def _receive(f, resp, bar: Progress) -> None:
    """Append the body to `f` as it arrives. A failed read is _Transient; a failed write is not (OSError)."""
    while True:
        try:
            chunk = resp.read1(CHUNK)  # what has arrived: a stall loses nothing
        except (OSError, http.client.HTTPException) as exc:
            raise _Transient(f"connection lost: {exc}") from None
        if not chunk:
            return
        _write_all(f, chunk)
        bar.update(len(chunk))


def _length_for_unframed(f, url: str, state: _State, retry: Retry, got: int) -> int | None:
    """The length a body without Content-Length must have had, from HEAD.

    None when only the whole file's sha256 can tell (it is checked at the end). Raises DllamaError when
    nothing can tell a complete part from one cut short; the partial file is emptied.
    """
    total = remote_size(url, retry)
    if total is not None or state.sha256_known:
        return total
    _truncate(f, 0)
    raise DllamaError(f"{url} was sent without a length ({got} bytes until the connection closed), so a "
                      "cut-short file cannot be told from a complete one; nothing was kept")


def _fetch_part(f, state: _State, retry: Retry, bar: Progress) -> None:
    url = state.urls[state.part]
    failures = 0
    while True:
        bar.sync(_length(f))
        have = _length(f) - state.start
        if state.size is not None and have == state.size:
            return
        if state.size is not None and have > state.size:
            _truncate(f, state.start)
            have = 0
        try:
            _request_part(f, url, state, retry, bar)
            return
        except _Transient as exc:
            progressed = _length(f) - state.start > have
            failures = 1 if progressed else failures + 1
            if failures >= retry.attempts:
                raise DllamaError(f"could not download {url}: {exc} (after {failures} attempts)") from None
            delay = min(retry.backoff * 2 ** (failures - 1), retry.max_delay)
            bar.note(f"{exc}; retrying in {delay:.0f} s")
            time.sleep(delay)


def _discard(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def _verify(path: Path, target: Target, out) -> None:
    """Raises DllamaError (and removes `path`) if the size or sha256 is not what the catalogue says."""
    partial, sidecar = partial_paths(target.dest)
    got = path.stat().st_size
    if target.size is not None and got != target.size:
        _discard(partial, sidecar)
        raise DllamaError(f"{target.dest.name}: got {got} bytes, expected {target.size}; the file was removed")
    if target.sha256:
        print(f"{target.dest.name}: checking sha256", file=out, flush=True)
        digest = sha256_file(path)
        if digest != target.sha256.lower():
            _discard(partial, sidecar)
            raise DllamaError(f"{target.dest.name}: sha256 is {digest}, expected {target.sha256}; "
                              "the file was removed")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK * 4):
            h.update(block)
    return h.hexdigest()


def fetch(target: Target, *, force: bool = False, retry: Retry = Retry(), total: int | None = None,
          out=None, tty: bool | None = None, interval: float = 10.0) -> Path:
    """Download `target` (all its parts, concatenated) to `target.dest`, resuming any earlier attempt.

    An existing `dest` is kept unless `force`. `total` (bytes, e.g. from HEAD) feeds the progress bar and
    the "need N more" of a full disk.
    Raises DllamaError: a 4xx answer, a server that cannot be reached (at once), one still failing after
    `retry.attempts`, a full disk, a wrong size or sha256 (the bad file is removed). After a network failure
    or a full disk `<dest>.part` is kept for the next run to resume; folders made for it are removed when
    nothing is left in them.
    """
    out = out if out is not None else sys.stderr
    dest = Path(target.dest)
    if dest.exists() and not force:
        if target.size is not None and dest.stat().st_size != target.size:
            raise DllamaError(f"{dest} has {dest.stat().st_size} bytes, expected {target.size}: "
                              "remove it or pass --force")
        print(f"{dest}: already downloaded (--force fetches it again)", file=out, flush=True)
        return dest
    created = _missing_dirs(dest.parent)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return _fetch_into(target, dest, force, retry, total or target.size, out, tty, interval)
    except OSError as exc:
        raise _write_error(exc, dest, total or target.size or _size_from_sidecar(dest, target.urls)) from None
    finally:
        if not dest.exists():
            _remove_empty(created)


def _fetch_into(target: Target, dest: Path, force: bool, retry: Retry, total: int | None, out, tty,
                interval: float) -> Path:
    partial, sidecar = partial_paths(dest)
    fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
    with open(fd, "r+b", buffering=0) as f:  # unbuffered: the length on disk is the truth
        _lock(f, dest)
        try:
            if dest.exists() and not force:  # another run finished it while this one waited to start
                _discard(partial, sidecar)
                return dest
            state = _resume_state(f, sidecar, list(target.urls), force)
            state.sha256_known = bool(target.sha256)
            bar = Progress(dest.name, total, _length(f), out, tty, interval)
            if bar.done:
                bar.note(f"resuming at {hsize(bar.done)} (part {state.part + 1} of {len(state.urls)})")
            while state.part < len(state.urls):
                _fetch_part(f, state, retry, bar)
                state.part, state.start, state.size, state.validator = state.part + 1, _length(f), None, None
                state.save()
            bar.finish()
        except BaseException:
            if _length(f) == 0:  # nothing worth resuming
                _discard(partial, sidecar)
            raise
        _verify(partial, target, out)
        os.replace(partial, dest)
        sidecar.unlink(missing_ok=True)
    return dest


def _write_error(exc: OSError, dest: Path, total: int | None) -> DllamaError:
    """The one line for a file that could not be written: a full disk says how much more it needs."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return DllamaError(f"cannot write {exc.filename or dest}: {exc.strerror or exc}")
    partial = partial_paths(dest)[0]
    have = partial.stat().st_size if partial.exists() else 0
    need = f"need {hsize(total - have)} more" if total is not None else "the rest of the size is unknown"
    kept = f"; {partial.name} is kept, so a new run resumes" if have else ""
    return DllamaError(f"no space left on {dest.parent}: {need}{kept}")


def _size_from_sidecar(dest: Path, urls) -> int | None:
    """The whole file's length once its last part's response has told it (the GET's Content-Length)."""
    state = _State.load(partial_paths(dest)[1], list(urls))
    if state is None or state.size is None or state.part != len(urls) - 1:
        return None
    return state.start + state.size


def _missing_dirs(directory: Path) -> list[Path]:
    """`directory` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    return missing


def _remove_empty(directories: list[Path]) -> None:
    for d in directories:  # deepest first: a parent empties once its child is gone
        try:
            d.rmdir()
        except OSError:  # not empty (a .part kept to resume) or already gone
            return


def _lock(f, dest: Path) -> None:
    """Hold an exclusive lock on the .part file: two runs must not write one file."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; one run at a time is the user's to keep
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise DllamaError(f"another process is downloading {dest}") from None


def _resume_state(f, sidecar: Path, urls: list[str], force: bool) -> _State:
    """The sidecar's state if it describes this download and the .part file, else a fresh start."""
    state = None if force else _State.load(sidecar, urls)
    if state is None or _length(f) < state.start:
        _truncate(f, 0)
        state = _State(urls=urls, path=sidecar)
        state.save()
    state.path = sidecar
    f.seek(0, os.SEEK_END)
    return state


# ------------------------------------------------------------------------------------------ several files

def pending(targets, force: bool = False) -> list[Target]:
    return [t for t in targets if force or not Path(t.dest).exists()]


def bytes_to_fetch(target: Target, retry: Retry = Retry()) -> tuple[int | None, int]:
    """(total size of the file or None if unknown, bytes already in its .part). HEADs every part."""
    partial, sidecar = partial_paths(Path(target.dest))
    state = _State.load(sidecar, list(target.urls))
    have = partial.stat().st_size if state is not None and partial.exists() else 0
    if target.size is not None:
        return target.size, have
    sizes = [remote_size(u, retry) for u in target.urls]
    return (None if None in sizes else sum(sizes)), have


def check_space(directory: Path, needed: int) -> None:
    """Raises DllamaError if the filesystem holding `directory` has less than `needed` bytes free."""
    probe = Path(directory).resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise DllamaError(f"not enough disk space in {probe}: the download needs {hsize(needed)}, "
                          f"{hsize(free)} is free")


def fetch_all(targets, *, force: bool = False, confirm=None, retry: Retry = Retry(), out=None,
              tty: bool | None = None, interval: float = 10.0) -> list[Path]:
    """Fetch several files: sizes asked first, disk space checked, `confirm(question) -> bool` asked once
    (None: just say what is downloaded).

    Raises DllamaError as `fetch` does, when the disk is too small, or when `confirm` says no.
    """
    out = out if out is not None else sys.stderr
    todo = pending(targets, force)
    totals = {}
    if todo:
        needed, unknown = 0, False
        for t in todo:
            total, have = bytes_to_fetch(t, retry)
            totals[t.dest] = total
            if total is None:
                unknown = True
            else:
                needed += max(total - (0 if force else have), 0)
        check_space(Path(todo[0].dest).parent, needed)
        size = "size unknown" if unknown and not needed else hsize(needed) + (" or more" if unknown else "")
        what = f"{len(todo)} file(s), {size}, into {Path(todo[0].dest).parent}"
        if confirm is None:
            print(f"downloading {what}", file=out, flush=True)
        elif not confirm(f"Download {what}?"):
            raise DllamaError("download cancelled")
    return [fetch(t, force=force, retry=retry, total=totals.get(t.dest), out=out, tty=tty, interval=interval)
            for t in targets]
