"""A worker whose memory is limited by its cgroup (a systemd unit's MemoryMax=, a container's limit), as a
real process on loopback: it reports the room under that limit, not the machine's free memory, and the
root refuses a plan that does not fit before sending a single weight, naming the node and the shortfall."""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from pathlib import Path

import pytest
from cluster_fixtures import KEY_ARGS, WorkerProcess, random_cluster_model
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


def _worker_in(cg: Path, tmp: Path) -> WorkerProcess:
    enter = ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh"]
    return WorkerProcess(tmp, prefix=enter).wait_ready()


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory):
    return random_cluster_model(tmp_path_factory.mktemp("long"), seq_len=SEQ_LEN)


def test_a_worker_limited_by_its_cgroup_is_refused_before_any_weight(long_context_model, tmp_path):
    from test_cluster import _dllama

    path, tok = long_context_model
    with memory_cgroup(LIMIT) as cg:
        w = _worker_in(cg, tmp_path)
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
            assert re.fullmatch(rf"dllama: error: worker {w.address}: refused: (worker {w.address}: )?the slice "
                                rf"needs \d+ MB .*; this "
                                rf"worker has (\d+) MB available \(a slice may take 90%\): short by \d+ MB", last), err
            assert int(re.search(r"has (\d+) MB available", last).group(1)) < LIMIT / 1e6
            assert w.proc.poll() is None, w.log()   # refused, not killed by the kernel
        finally:
            w.stop()
