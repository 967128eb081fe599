"""Loading progress (dllama.progress.Board): plain lines in a log; on a terminal, one line per bar redrawn
in place, checked on a real pty through `pyte`'s VT100 emulator (what a person would see); and the
engine's loaders report exactly the bytes of each slice."""

from __future__ import annotations

import io
import os
import re
import threading

import pytest

from testlib import need_module

from dllama.progress import Board


def test_log_gets_plain_lines_with_speed_eta_and_a_last_line_per_bar():
    out = io.StringIO()
    board = Board(out=out, tty=False, interval=0.0)
    a, b = board.add("root: reading and packing weights", 4_000_000), board.add("weights to 10.0.0.2:9998", 2_000_000)
    a.update(1_000_000)
    b.update(2_000_000)
    a.update(3_000_000)
    b.finish()
    a.finish()
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].startswith("root: reading and packing weights: 1.0 MB / 4.0 MB ( 25%), ")
    assert "/s" in lines[0] and "ETA" in lines[0]
    assert lines[-2].startswith("weights to 10.0.0.2:9998: 2.0 MB / 2.0 MB (100%)")
    assert lines[-1].startswith("root: reading and packing weights: 4.0 MB / 4.0 MB (100%)")


def test_log_lines_are_periodic_not_per_update():
    out = io.StringIO()
    board = Board(out=out, tty=False, interval=3600)
    bar = board.add("x", 1000)
    for _ in range(1000):
        bar.update(1)
    bar.finish()
    assert out.getvalue().count("\n") == 1   # only the last line: no flood in a log


def test_terminal_shows_one_line_per_bar_redrawn_in_place():
    pyte = need_module("pyte", "pip install 'dllama[test]'")
    master, slave = os.openpty()
    out = os.fdopen(slave, "w")
    board = Board(out=out)   # detects the terminal itself
    assert board.tty
    names = ["root: reading and packing weights", "weights to 127.0.0.1:9001", "weights to 127.0.0.1:9002"]
    bars = [board.add(n, 8_000_000) for n in names]
    for bar in bars:
        bar.interval = 0.0

    def feed(bar):
        for _ in range(8):
            bar.update(1_000_000)
        bar.finish()

    threads = [threading.Thread(target=feed, args=(bar,)) for bar in bars]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.close()
    data = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:   # the pty's other end is closed: all read
            break
        if not chunk:
            break
        data += chunk
    os.close(master)
    screen = pyte.Screen(100, 20)
    pyte.ByteStream(screen).feed(data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    shown = [line.rstrip() for line in screen.display if line.strip()]
    assert len(shown) == 3, shown   # redrawn over itself: three lines, not one per update
    for name, line in zip(names, shown):
        assert re.fullmatch(re.escape(name) + r": 8\.0 MB / 8\.0 MB \(100%\), [\d.]+ [kMG]?B/s", line), line


def test_terminal_text_printed_between_rounds_of_bars_stays():
    pyte = need_module("pyte", "pip install 'dllama[test]'")
    out = io.StringIO()
    board = Board(out=out, tty=True)
    for label in ("weights to worker a", "weights to worker b"):
        bar = board.add(label, 10)
        bar.update(10)
        bar.finish()
    out.write("split: root 50%, a 25%, b 25%\n")   # what the engine logs between the workers and the root
    bar = board.add("root: reading and packing weights", 10)
    bar.finish()
    screen = pyte.Screen(100, 10)
    pyte.Stream(screen).feed(out.getvalue().replace("\n", "\r\n"))
    shown = [line.rstrip() for line in screen.display if line.strip()]
    assert [s.split(":")[0] for s in shown] == ["weights to worker a", "weights to worker b", "split",
                                                "root"], shown


@pytest.fixture(scope="module")
def smollm2_loaded(smollm2_path):
    from dllama.formats.loader import load_model

    loaded = load_model(smollm2_path, "auto")
    yield loaded
    loaded.close()


@pytest.mark.parametrize("n_nodes", [1, 3])
def test_slice_nbytes_is_what_slice_tensor_gives(smollm2_loaded, n_nodes):
    from dllama.model.partition import node_tensor_names, partition, slice_nbytes, slice_tensor

    spec = smollm2_loaded.spec
    for node in partition(spec, n_nodes):
        parts = [slice_tensor(smollm2_loaded.tensors[n], n, spec, node) for n in node_tensor_names(spec, node)]
        assert slice_nbytes(smollm2_loaded.tensors, spec, node) == sum(p[2].nbytes for p in parts if p is not None)
