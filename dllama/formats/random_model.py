"""`dllama random-model`: a `.m` file of any shape with random weights N(0, 0.02) and unit norms.

Only the speed of such a model means anything (benchmarks, partition and network tests). Weights are
generated and quantized a chunk of rows at a time straight into the output, so an 8B file is written
in bounded RAM.
"""

from __future__ import annotations

import queue
import threading
import numpy as np

from dllama.formats.presets import PRESETS, preset_spec  # noqa: F401 (the writer's callers name them here)
from dllama.formats.spec import ModelSpec

STD = 0.02


def _random_rows(rng: np.random.Generator, rows: int, cols: int):
    step = max(1, (1 << 22) // cols)
    for r in range(0, rows, step):
        x = rng.standard_normal((min(step, rows - r), cols), dtype=np.float32)
        x *= np.float32(STD)
        yield x


def random_tensors(spec: ModelSpec, seed: int = 0):
    """(name, source) pairs for write_dlm: norms are ones, everything else N(0, 0.02) row chunks."""
    from dllama.formats.dlm import dlm_layout, write_key_set

    rng = np.random.default_rng(seed)
    for name, _qtype, shape in dlm_layout(spec, write_key_set(spec)):
        if len(shape) == 1:
            yield name, np.ones(shape, dtype=np.float32)
        else:
            yield name, _random_rows(rng, shape[0], shape[1])


def _prefetched(items, depth: int = 3):
    """The (name, source) pairs of `items`, their chunks computed by a thread `depth` chunks ahead.

    Drawing normal numbers costs twice what quantizing them does, and numpy releases the GIL for
    both, so on two cores the writer quantizes one chunk while the thread draws the next. The values
    are those of `items`, in the same order.
    """
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for name, src in items:
                for chunk in ([src] if isinstance(src, np.ndarray) else src):
                    if not put((name, chunk)):
                        return
            put(end)
        except BaseException as exc:   # handed to the writer, which raises it
            put(exc)

    def take():
        item = q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    threading.Thread(target=produce, name="random-model", daemon=True).start()
    try:
        item = take()
        while item is not end:
            name = item[0]

            def chunks():
                nonlocal item
                while item is not end and item[0] == name:
                    yield item[1]
                    item = take()

            it = chunks()
            yield name, it
            for _ in it:   # whatever the consumer left of this tensor
                pass
    finally:
        stop.set()


def write_random_model(path: str, spec: ModelSpec, seed: int = 0, progress: bool = False) -> int:
    """Writes a random `.m` of spec's shape atomically; returns its size. Raises DllamaError.

    The weights are those of `random_tensors(spec, seed)`.
    """
    from dllama.formats.convert import with_progress
    from dllama.formats.dlm import write_dlm

    items = _prefetched(random_tensors(spec, seed))
    return write_dlm(path, spec, with_progress(items, spec.n_layers, "random-model") if progress else items)
