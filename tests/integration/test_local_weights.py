"""Workers that load their slice from a local file (`dllama slice`, `dllama worker --weights`), on loopback
with real worker processes: the same logits as a worker streamed its weights, no WEIGHT frame sent to it,
and a slice of another model streamed over instead (the root logs why)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from cluster_fixtures import KEY, WorkerProcess
from dllama.errors import DllamaError
from dllama.net import protocol as P
from dllama.net.slicefile import PREAMBLE

pytestmark = [pytest.mark.network, pytest.mark.slow]

PROMPT = [1, 17, 33, 5, 60]
STEPS = 6


def _model(path, seed):
    from dllama.formats.presets import preset_spec
    from dllama.formats.random_model import write_random_model

    spec = preset_spec("llama3_2_1b", "q40", dim=256, hidden_dim=512, n_layers=2, n_heads=8, n_kv_heads=4,
                       vocab_size=128, seq_len=64)
    write_random_model(str(path), spec, seed=seed)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A model, its slices for 2 nodes, and the slices of another model of the same shape."""
    from dllama.cli import main

    d = tmp_path_factory.mktemp("localw")
    model, other = _model(d / "m.m", 5), _model(d / "other.m", 6)
    for m, out in ((model, d / "s"), (other, d / "other")):
        assert main(["slice", "--model", str(m), "--nodes", "2", "--out", str(out)]) == 0
    return model, d / "s" / "node1-of-2.dlslice", d / "other" / "node1-of-2.dlslice"


@pytest.fixture
def weight_frames(monkeypatch):
    """Counts the WEIGHT frames this process sends, per connection label."""
    from dllama.net.transport import Connection

    counts: dict[str, int] = {}
    send = Connection.send

    def counting(self, msg):
        if isinstance(msg, P.Weight):
            counts[self.label] = counts.get(self.label, 0) + 1
        return send(self, msg)

    monkeypatch.setattr(Connection, "send", counting)
    return counts


def _greedy(model_path, worker, log):
    """Greedy ids and the logits of each step of a 2-node root (F32 buffers: the floats cross exactly)."""
    from dllama.formats.loader import load_model
    from dllama.model.llama import NodeModel
    from dllama.model.partition import node_tensor_names, partition, slice_tensor
    from dllama.net.root import connect_workers

    loaded = load_model(str(model_path))
    spec = loaded.spec
    plan = partition(spec, 2)
    coll = connect_workers([worker.address], loaded, plan, spec.seq_len, "f32", key=KEY, log=log.append)
    try:
        model = NodeModel(spec, plan[0], spec.seq_len, 32, coll)
        for name in node_tensor_names(spec, plan[0]):
            part = slice_tensor(loaded.tensors[name], name, spec, plan[0])
            if part is not None:
                model.load(name, *part)
        model.finish_loading()
        ids, out, tokens, pos = [], [], PROMPT, 0
        for _ in range(STEPS):
            positions = np.arange(pos, pos + len(tokens))
            coll.step(len(tokens), positions)
            logits = model.forward(np.asarray(tokens), positions)[-1].copy()
            out.append(logits)
            ids.append(int(np.argmax(logits)))
            pos, tokens = pos + len(tokens), [ids[-1]]
        return ids, np.array(out)
    finally:
        coll.close()


def test_local_slice_gives_the_streamed_logits_without_weight_frames(files, tmp_path, weight_frames):
    model, mine, other = files
    streamed_w = WorkerProcess(tmp_path).wait_ready()
    local_w = WorkerProcess(tmp_path, args=["--weights", str(mine)]).wait_ready()
    try:
        log: list[str] = []
        ids, logits = _greedy(model, streamed_w, log)
        assert weight_frames.pop(f"worker {streamed_w.address}") > 0
        ids_local, logits_local = _greedy(model, local_w, log)
        assert ids_local == ids and np.array_equal(logits_local, logits)
        assert f"worker {local_w.address}" not in weight_frames
        assert any("loads its local slice (node 1 of 2)" in line for line in log), log
        local_w.wait_idle()
        assert f"from {mine}" in local_w.log()
    finally:
        streamed_w.stop()
        local_w.stop()


def test_a_slice_of_another_model_is_streamed_over_and_the_root_says_why(files, tmp_path, weight_frames):
    model, mine, other = files
    w = WorkerProcess(tmp_path, args=["--weights", str(other)]).wait_ready()
    try:
        log: list[str] = []
        _greedy(model, w, log)
        assert weight_frames[f"worker {w.address}"] > 0
        assert any(f"worker {w.address}: not using its local slice: its slice is of another model file" in line
                   and "streaming its weights" in line for line in log), log
        w.wait_idle()
        assert "from the root" in w.log()
    finally:
        w.stop()


def test_a_slice_damaged_after_the_worker_started_is_refused_naming_the_worker(files, tmp_path):
    model, mine, _ = files
    damaged = tmp_path / "damaged.dlslice"
    data = bytearray(mine.read_bytes())
    damaged.write_bytes(bytes(data))
    w = WorkerProcess(tmp_path, args=["--weights", str(damaged)]).wait_ready()
    try:
        data[PREAMBLE.size + 4096] ^= 0x10
        damaged.write_bytes(bytes(data))
        with pytest.raises(DllamaError, match=rf"worker {w.address}: refused: .*its weights do not match their sha256"):
            _greedy(model, w, [])
        assert w.wait_idle()["state"] == "idle"
    finally:
        w.stop()


def test_worker_with_a_bad_slice_file_exits_with_one_line(tmp_path):
    bad = tmp_path / "bad.dlslice"
    bad.write_bytes(b"DLSLICE\0" + bytes(20))
    r = subprocess.run([sys.executable, "-m", "dllama", "worker", "--host", "127.0.0.1", "--port", "0",
                        "--weights", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith(f"dllama: error: --weights {bad}: truncated")
    assert r.stderr.count("\n") == 1, r.stderr
