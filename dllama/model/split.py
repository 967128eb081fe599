"""Sizing each node's share: `--split 3,1,1` by hand, or `--split auto` from each node's measured speed.

Every node (the root here, a worker at handshake) times the real matmul kernel, with its own thread count,
on a matrix of the model's weight type and width, and reports that speed with its free memory. The root
gives each node a share in proportion to its speed (the per-token time of a tensor-parallel step is the
slowest node's), lowers the share of any node whose slice would not fit in its memory, and refuses, naming
the node and the shortfall, when no plan fits. The plan itself is `partition.partition`.
"""

from __future__ import annotations

import functools
import math
import time

import numpy as np

from dllama import quants
from dllama.errors import DllamaError
from dllama.formats.spec import ModelSpec
from dllama.model.partition import NodeSlice, partition

AUTO = "auto"
CALIBRATION_S = 0.5            # s of matmuls timed: long enough for a core's time-sharing to average out
CALIBRATION_VALUES = 16 << 20  # weight values of the timed matrix: past the caches, as a layer's are
# a reconnect re-measures every node; the plan in force (the root's own slice loaded for it) is kept unless
# it would be this much slower than a new one by the new figures: re-streaming every slice is not free
REPLAN_TOLERANCE = 0.10


def parse_split(text: str | None, n_nodes: int):
    """`--split` -> None (even), AUTO, or a list of n_nodes positive weights. DllamaError naming what is wrong."""
    if text is None or text == "":
        return None
    if text == AUTO:
        return AUTO
    try:
        weights = [float(x) for x in text.split(",")]
    except ValueError:
        raise DllamaError(f"--split {text!r}: expected 'auto' or one weight per node, such as 3,1,1") from None
    if len(weights) != n_nodes:
        raise DllamaError(f"--split {text!r}: {len(weights)} weights for {n_nodes} nodes (the root and "
                          f"{n_nodes - 1} workers)")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise DllamaError(f"--split {text!r}: every weight must be a positive number")
    return weights


@functools.lru_cache(maxsize=4)
def _calibration_matrix(qtype: str, cols: int):
    from dllama import kernels as K

    rows = max(16, CALIBRATION_VALUES // cols)
    # 16 quantized rows repeated: as fast to multiply as any, and built in milliseconds, not seconds
    w = np.random.default_rng(0).standard_normal((16, cols), dtype=np.float32)
    raw = np.tile(quants.quantize(qtype, w).reshape(16, -1), (-(-rows // 16), 1))[:rows]
    return K.pack(qtype, raw.reshape(-1), rows, cols), rows


def calibrate(qtype: str, cols: int, seconds: float = CALIBRATION_S) -> float:
    """Weight values this process multiplies per second with the matmul kernel (at its set_threads),
    one token at a time, on a `qtype` matrix of `cols` columns."""
    from dllama import kernels as K

    if qtype not in quants.QUANTS or cols < 32 or cols % quants.quant(qtype).block_size or cols > 1 << 17:
        raise DllamaError(f"cannot calibrate on a {qtype} matrix of {cols} columns")
    w, rows = _calibration_matrix(qtype, cols)
    x, out = np.ones((1, cols), np.float32), np.empty((1, rows), np.float32)
    K.matmul(w, x, out)
    calls, t0 = 0, time.perf_counter()
    while True:
        K.matmul(w, x, out)
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and calls >= 3:
            return rows * cols * calls / elapsed


def values_per_token(spec: ModelSpec, node: NodeSlice) -> int:
    """Weight values the node multiplies per token (its matrices, the output layer included)."""
    from dllama.net.limits import weight_bytes

    return weight_bytes(spec, node, bits=8)


def plan_by_speed(spec: ModelSpec, speeds: list[float], free: list[int | None], need, names: list[str]):
    """The plan with shares by `speeds`, each node's slice within its free memory.

    `need(node)` is the bytes a node holding `node` allocates; `free[i]` what node i may use (None: unknown,
    not limited). A node over its memory has its weight lowered in proportion and the plan is made again;
    raises DllamaError naming the node and the shortfall when a node cannot hold even its smallest share."""
    weights = [float(s) for s in speeds]
    for _ in range(12):
        plan = partition(spec, len(weights), weights)
        over = [(i, need(node), free[i]) for i, node in enumerate(plan)
                if free[i] is not None and need(node) > free[i]]
        if not over:
            return plan
        for i, needed, have in over:
            weights[i] *= 0.95 * have / needed
    i, needed, have = max(over, key=lambda o: o[1] - o[2])
    raise DllamaError(f"the model does not fit: node {i} ({names[i]}) needs {needed / 1e6:.0f} MB for its share, "
                      f"has {have / 1e6:.0f} MB: short by {(needed - have) / 1e6:.0f} MB")


def describe(spec: ModelSpec, plan: list[NodeSlice], names: list[str], speeds: list[float] | None) -> list[str]:
    """The plan as lines to print: each node's share of heads, FFN rows and vocabulary, its weight bytes,
    and (with measured speeds) its expected matmul time per token."""
    from dllama.net.limits import weight_bytes

    bits = quants.quant(spec.weight_type).type_size * 8 / quants.quant(spec.weight_type).block_size
    lines = []
    for i, (node, name) in enumerate(zip(plan, names)):
        line = (f"node {i} {name}: heads {len(node.heads)}/{spec.n_heads}, ffn {len(node.ffn)}/{spec.ffn_dim}"
                f" ({len(node.ffn) / spec.ffn_dim:.0%}), vocab {len(node.vocab)}/{spec.vocab_size}, "
                f"weights {weight_bytes(spec, node, bits) / 1e6:.1f} MB")
        if speeds:
            line += (f", measured {speeds[i] / 1e9:.2f} Gvalues/s, "
                     f"expected {1e3 * values_per_token(spec, node) / speeds[i]:.1f} ms/token")
        lines.append(line)
    return lines


def expected_s(spec: ModelSpec, plan: list[NodeSlice], speeds: list[float]) -> float:
    """Seconds of matmuls per token of the slowest node (a tensor-parallel step waits for it)."""
    return max(values_per_token(spec, node) / speed for node, speed in zip(plan, speeds))


class AutoPlanner:
    """The `--split auto` planner handed to `connect_workers`: `measure()` times this node while the
    workers calibrate at handshake; called with their reports, it prints the plan it makes and returns it.
    Once `current` is set (the plan in force), a later call (a reconnect) keeps that plan while it fits every
    node's memory and is within REPLAN_TOLERANCE of the new plan's expected time per token."""

    def __init__(self, spec: ModelSpec, seq_len: int, max_batch: int, names: list[str], say, check=None,
                 n_slots: int = 1):
        self.spec, self.seq_len, self.max_batch, self.names, self.say = spec, seq_len, max_batch, names, say
        self.check, self.n_slots = check, n_slots   # check(plan) raises where the file's blocks forbid it
        self.own = None
        self.current: list[NodeSlice] | None = None

    def measure(self) -> None:
        from dllama.net.memory import available_bytes

        self.own = calibrate(self.spec.weight_type, self.spec.dim), available_bytes()

    def __call__(self, reports) -> list[NodeSlice]:
        from dllama.net.limits import HEADROOM, slice_bytes

        if self.own is None:
            self.measure()
        speeds, free = (list(x) for x in zip(*([self.own] + list(reports))))
        limits = [None if f is None else int(HEADROOM * f) for f in free]
        spec = self.spec

        def need(node):
            return slice_bytes(spec, node, self.seq_len, self.max_batch, self.n_slots)

        chosen = plan_by_speed(spec, speeds, limits, need, self.names)
        if self.check:
            self.check(chosen)
        if self._keeps_current(chosen, speeds, limits, need):
            return self.current
        self.say("split by measured speed:")
        for line in describe(spec, chosen, self.names, speeds):
            self.say("  " + line)
        return chosen

    def _keeps_current(self, chosen, speeds, limits, need) -> bool:
        current = self.current
        if current is None:
            return False
        # a node that came back with less memory than its slice in force needs decides it
        if any(have is not None and need(node) > have for node, have in zip(current, limits)):
            self.say("re-measured: the plan in force no longer fits every node's memory; re-planning")
            return False
        old, new = expected_s(self.spec, current, speeds), expected_s(self.spec, chosen, speeds)
        if chosen != current and old > (1 + REPLAN_TOLERANCE) * new:
            self.say(f"re-measured: the plan in force would take {1e3 * old:.1f} ms/token, a new one "
                     f"{1e3 * new:.1f}; re-planning")
            return False
        self.say(f"re-measured: keeping the plan in force ({1e3 * old:.1f} ms/token expected, a new one "
                 f"{1e3 * new:.1f}: within {REPLAN_TOLERANCE:.0%})")
        return True


def check_model(argv: list[str]) -> int:
    """`python -m dllama.model.split MODEL N_NODES [SPLIT]`: whether the model file splits over N_NODES
    nodes with SPLIT (even, auto or weights), run where the model is (`dllama cluster up`, role
    dllama_root). Prints the plan and returns 0, or prints why not and returns 3 (4: the model cannot
    be read)."""
    from dllama.formats.loader import load_model

    model, n_nodes, text = argv[0], int(argv[1]), argv[2] if len(argv) > 2 else None
    try:
        spec = load_model(model).spec
    except DllamaError as exc:   # not a plan's refusal: the caller says the model cannot be checked
        print(exc)
        return 4
    try:
        split = parse_split(text, n_nodes)
        plan = partition(spec, n_nodes, None if split in (None, AUTO) else split)
    except DllamaError as exc:
        print(exc)
        return 3
    names = ["root"] + [f"worker {i}" for i in range(1, n_nodes)]
    print("\n".join(describe(spec, plan, names, None)))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(check_model(sys.argv[1:]))
