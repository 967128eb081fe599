"""Download progress: bytes, speed and ETA, redrawn in place on a terminal or as plain lines in a log.

Stdlib only: `launch.py` imports it (through the downloader) before any dependency is installed.
"""

from __future__ import annotations

import sys
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
