"""Progress of downloads and model loading: bytes, speed and ETA, redrawn in place on a terminal or as
plain lines in a log.

Stdlib only: `launch.py` imports it (through the downloader) before any dependency is installed.
"""

from __future__ import annotations

import sys
import threading
import time


def hsize(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def htime(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Bytes, speed and ETA: a bar redrawn in place on a terminal, a plain line every `interval` s otherwise."""

    def __init__(self, label: str, total: int | None, done: int = 0, out=None, tty: bool | None = None,
                 interval: float = 10.0):
        self.label, self.total, self.done = label, total, done
        self.out = out if out is not None else sys.stderr
        self.tty = self.out.isatty() if tty is None else tty
        self.interval = 0.2 if self.tty else interval
        self.start_done, self.t0 = done, time.monotonic()
        self.last = self.t0

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-6)
        speed = (self.done - self.start_done) / elapsed
        text = f"{self.label}: {hsize(self.done)}"
        if self.total:
            text += f" / {hsize(self.total)} ({100 * self.done / self.total:3.0f}%)"
        text += f", {hsize(speed)}/s"
        if self.total and speed > 0 and self.done < self.total:
            text += f", ETA {htime((self.total - self.done) / speed)}"
        return text

    def _emit(self, text: str, final: bool = False) -> None:
        if self.tty:
            self.out.write("\r" + text.ljust(79) + ("\n" if final else ""))
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._emit(self.line())

    def sync(self, done: int) -> None:
        """Follow the file's length after a part was started again (speed restarts from there)."""
        if done < self.done:
            self.start_done, self.t0 = done, time.monotonic()
        self.done = done

    def note(self, message: str) -> None:
        if self.tty:
            self.out.write("\n")
        self._emit(f"{self.label}: {message}")

    def finish(self) -> None:
        self._emit(self.line(), final=True)


class Board:
    """Several bars at once (the root packing its slice while a thread per worker streams that worker's):
    on a terminal they are redrawn together in place, one line each; in a log each prints its own plain
    line every `interval` s and when it ends. `add` is the factory the loaders take; any thread may update."""

    def __init__(self, out=None, tty: bool | None = None, interval: float = 5.0):
        self.out = out if out is not None else sys.stderr
        if tty is None:
            try:
                tty = self.out.isatty()
            except (AttributeError, ValueError):
                tty = False
        self.tty, self.interval = tty, interval
        self.rows: list[Progress] = []
        self._lock = threading.Lock()
        self._drawn = 0   # terminal lines the last redraw wrote (the cursor is below them)

    def add(self, label: str, total: int | None) -> "Progress":
        row = _Row(self, label, total)
        with self._lock:
            self.rows.append(row)
        return row

    def _show(self, row: "Progress", text: str, final: bool) -> None:
        with self._lock:
            if not self.tty:
                self.out.write(text + "\n")
            else:
                up = f"\x1b[{self._drawn}F" if self._drawn else ""   # to the start of the first line drawn
                lines = [r.line() if r is not row else text for r in self.rows]
                self.out.write(up + "".join(f"\x1b[2K{t}\n" for t in lines))
                self._drawn = len(lines)
            row.ended = row.ended or final
            if all(r.ended for r in self.rows):
                # all shown in full: whatever is printed next stays, and later bars start below it
                self.rows, self._drawn = [], 0
            self.out.flush()


class _Row(Progress):
    def __init__(self, board: Board, label: str, total: int | None):
        super().__init__(label, total, out=board.out, tty=board.tty, interval=board.interval)
        self.board, self.ended = board, False

    def _emit(self, text: str, final: bool = False) -> None:
        self.board._show(self, text, final)
