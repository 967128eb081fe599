"""A worker whose memory is limited by its cgroup (a systemd unit's MemoryMax=, a container's limit), as a
real process on loopback: it reports the room under that limit, not the machine's free memory; the root
refuses a plan that does not fit before sending a single weight, naming the node and the shortfall; and a
`--split auto` root whose lost worker returns with less room re-plans when it reconnects."""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from cluster_fixtures import KEY, KEY_ARGS, WorkerProcess, random_cluster_model
from testlib import need

pytestmark = [pytest.mark.network, pytest.mark.slow]

LIMIT = 400 << 20          # the worker's cgroup: a Python process with numba loaded, and some room
SEQ_LEN = 1 << 19          # K/V of even one of the model's 4 KV heads: 3 layers x 2^19 x 32 x 8 B = 400 MB


def _writable_memory_cgroup_root() -> tuple[Path, str] | None:
    """(a folder to create a cgroup in, its limit file): cgroup v2 with the memory controller enabled
    for children, else a v1 memory hierarchy; None where neither is writable."""
    for v2 in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        control = v2 / "cgroup.subtree_control"
        if control.exists() and "memory" in control.read_text().split() and os.access(v2, os.W_OK):
            return v2, "memory.max"
    v1 = Path("/sys/fs/cgroup/memory")
    if (v1 / "memory.limit_in_bytes").exists() and os.access(v1, os.W_OK):
        return v1, "memory.limit_in_bytes"
    return None


@contextlib.contextmanager
def memory_cgroup(limit: int):
    """A fresh cgroup limited to `limit` bytes; yields its folder, removed afterwards (its processes must
    be gone by then)."""
    found = _writable_memory_cgroup_root()
    need(found is not None, "no writable cgroup memory controller (run as root on Linux)")
    root, limit_file = found
    cg = root / f"dllama-test-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    try:
        (cg / limit_file).write_text(str(limit))
        yield cg
    finally:
        for _ in range(50):   # a killed process leaves its cgroup a moment later
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def _enter(cg: Path) -> list[str]:
    """A command prefix that moves the process into `cg` before it starts."""
    return ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh"]


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory):
    return random_cluster_model(tmp_path_factory.mktemp("long"), seq_len=SEQ_LEN)


def test_a_worker_limited_by_its_cgroup_is_refused_before_any_weight(long_context_model, tmp_path):
    from test_cluster import _dllama

    path, tok = long_context_model
    with memory_cgroup(LIMIT) as cg:
        w = WorkerProcess(tmp_path, prefix=_enter(cg)).wait_ready()
        try:
            common = ["inference", "--model", str(path), "--tokenizer", str(tok), "--prompt", "Hi", "--steps", "2",
                      "--buffer-float-type", "f32", "--workers", w.address, *KEY_ARGS]
            proc = _dllama(*common, "--split", "auto")
            _, err = proc.communicate(timeout=180)
            assert proc.returncode == 2, err
            assert "Traceback" not in err and err.count("\n") >= 1
            last = err.strip().splitlines()[-1]
            m = re.fullmatch(rf"dllama: error: the model does not fit: node 1 \({w.address}\) needs (\d+) MB for "
                             rf"its share, has (\d+) MB: short by (\d+) MB", last)
            assert m, err
            needs, has, short = (int(x) for x in m.groups())
            # what it has is the room under its cgroup's limit (less the process itself), not the machine's
            assert has < LIMIT / 1e6, (has, err)
            assert needs - has == pytest.approx(short, abs=1) and needs >= 400
            assert "sent " not in err and "weights to" not in err   # refused before streaming
            assert w.wait_idle()["state"] == "idle", w.log()

            # the even split, where the root does not ask: the worker refuses the CONFIG, with both figures
            proc = _dllama(*common)
            _, err = proc.communicate(timeout=180)
            assert proc.returncode == 2, err
            last = err.strip().splitlines()[-1]
            assert re.fullmatch(rf"dllama: error: worker {w.address}: refused: the slice "
                                rf"needs \d+ MB .*; this "
                                rf"worker has (\d+) MB available \(a slice may take 90%\): short by \d+ MB", last), err
            assert int(re.search(r"has (\d+) MB available", last).group(1)) < LIMIT / 1e6
            assert w.proc.poll() is None, w.log()   # refused, not killed by the kernel
        finally:
            w.stop()


RECONNECT_SEQ_LEN = 1 << 18   # K/V of an even share (2 of 4 KV heads): 400 MB; of one KV head: 200 MB
RECONNECT_LIMIT = 500 << 20   # room for one KV head's share, not for an even one


def test_a_reconnect_measures_again_and_replans_when_the_returning_worker_has_less_memory(long_context_model,
                                                                                           tmp_path):
    """`--split auto`: the worker that comes back after a loss (the API's healing path, Engine.reconnect)
    is limited by its cgroup to less than its share in force: every node is measured again, the plan
    changes (the worker's share shrinks, the root's grows and the root loads its new slice), and the
    tokens are still one node's."""
    import signal

    from test_batching import Recorder

    from dllama.engine import Engine

    path, tok = long_context_model
    prompt = [256, 72, 101, 108, 108, 111]

    def greedy(engine):
        engine.cache_ids = []
        rec = Recorder()
        return list(engine.generate(prompt, 6, rec, stop_ids=())), np.array(rec.rows)

    alone = Engine.open(str(path), str(tok), buffer_float_type="f32", max_seq_len=RECONNECT_SEQ_LEN)
    try:
        ids1, logits1 = greedy(alone)
    finally:
        alone.close()
    w = WorkerProcess(tmp_path).wait_ready()
    said: list[str] = []
    engine = Engine.open(str(path), str(tok), buffer_float_type="f32", max_seq_len=RECONNECT_SEQ_LEN,
                         workers=[w.address], split="auto", cluster_key=KEY, log=said.append)
    try:
        first = engine.coll.plan
        assert greedy(engine)[0] == ids1
        w.proc.send_signal(signal.SIGKILL)
        w.stop()
        with memory_cgroup(RECONNECT_LIMIT) as cg:
            back = WorkerProcess(tmp_path, port=w.port, prefix=_enter(cg)).wait_ready()
            try:
                said.clear()
                engine.reconnect()
                plan = engine.coll.plan
                assert "re-measured: the plan in force no longer fits every node's memory; re-planning" in said, said
                assert len(plan[1].kv_heads) < len(first[1].kv_heads), (first, plan)
                assert engine.model.node == plan[0] != first[0]
                ids, logits = greedy(engine)
                assert ids == ids1
                np.testing.assert_allclose(logits, logits1, atol=0.03 * np.abs(logits1).max())
                assert back.proc.poll() is None, back.log()
            finally:
                engine.close()
                back.stop()
    finally:
        engine.close()
        w.stop()
