"""Worker slice files (`dllama slice`, `dllama worker --weights`): the bytes a worker loads from its file are
the bytes the root would stream it; damage, truncation and a slice of another node, model or plan are
refused with one line naming the file."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from dllama.cli import main
from dllama.errors import DllamaError
from dllama.net import slicefile as S


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from dllama.formats.presets import preset_spec
    from dllama.formats.random_model import write_random_model

    spec = preset_spec("llama3_2_1b", "q40", dim=128, hidden_dim=256, n_layers=2, n_heads=4, n_kv_heads=4,
                       vocab_size=96, seq_len=64)
    path = tmp_path_factory.mktemp("slice") / "m.m"
    write_random_model(str(path), spec, seed=3)
    return str(path)


class Recorder:
    """A NodeModel stand-in that keeps what it is given."""

    def __init__(self):
        self.got = []

    def load(self, name, qtype, shape, raw):
        self.got.append((name, qtype, tuple(shape), bytes(raw)))


def _wire(loaded, plan, index):
    """What the root streams node `index` (net/root.py _stream_slice cuts the same way)."""
    from dllama.model.partition import node_tensor_names, slice_tensor

    out = []
    for name in node_tensor_names(loaded.spec, plan[index]):
        part = slice_tensor(loaded.tensors[name], name, loaded.spec, plan[index])
        if part is not None:
            out.append((name, part[0], tuple(part[1]), np.ascontiguousarray(part[2]).tobytes()))
    return out


def _cut(model_path, out, nodes=4):
    assert main(["slice", "--model", model_path, "--nodes", str(nodes), "--out", str(out)]) == 0
    return sorted(os.listdir(out))


def test_round_trip_gives_the_streamed_bytes_of_every_worker(model_path, tmp_path):
    from dllama.formats.loader import load_model
    from dllama.model.partition import partition

    assert _cut(model_path, tmp_path / "s") == [f"node{i}-of-4.dlslice" for i in (1, 2, 3)]
    loaded = load_model(model_path)
    plan = partition(loaded.spec, 4)
    whole = S.model_fingerprint(model_path)
    for i in (1, 2, 3):
        sf = S.SliceFile(str(tmp_path / "s" / S.slice_name(i, 4)))
        a = sf.announcement()
        assert (a["model_fingerprint"], a["node_index"], a["n_nodes"]) == (whole, i, 4)
        assert a["plan_sha256"] == S.plan_sha256(loaded.spec, plan)
        rec = Recorder()
        assert sf.load_into(rec, loaded.spec, plan[i]) == a["payload_size"]
        assert rec.got == _wire(loaded, plan, i)
        assert S.mismatch(P_json(a), whole, S.plan_sha256(loaded.spec, plan), i, 4) is None


def P_json(obj) -> bytes:
    from dllama.net.protocol import json_bytes

    return json_bytes(obj)


def test_a_damaged_weight_byte_is_caught_by_the_sha256(model_path, tmp_path):
    from dllama.formats.loader import load_model
    from dllama.model.partition import partition

    _cut(model_path, tmp_path, nodes=2)
    path = tmp_path / S.slice_name(1, 2)
    data = bytearray(path.read_bytes())
    data[S.PREAMBLE.size + 1000] ^= 0x01
    path.write_bytes(bytes(data))
    sf = S.SliceFile(str(path))   # opening reads no weights
    loaded = load_model(model_path)
    with pytest.raises(DllamaError, match=r"--weights .*node1-of-2.dlslice: its weights do not match their sha256"):
        sf.load_into(Recorder(), loaded.spec, partition(loaded.spec, 2)[1])


def test_a_damaged_header_is_refused_on_opening(model_path, tmp_path):
    _cut(model_path, tmp_path, nodes=2)
    path = tmp_path / S.slice_name(1, 2)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x20
    path.write_bytes(bytes(data))
    with pytest.raises(DllamaError, match="its header does not match its sha256"):
        S.SliceFile(str(path))


@pytest.mark.parametrize("keep", [10, S.PREAMBLE.size + 100, -1])
def test_a_truncated_file_is_one_line_error(model_path, tmp_path, keep):
    _cut(model_path, tmp_path, nodes=2)
    path = tmp_path / S.slice_name(1, 2)
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(DllamaError, match=r"^--weights .*: (truncated|\d+ bytes where its preamble says)") as exc:
        S.SliceFile(str(path))
    assert "\n" not in str(exc.value)


def test_a_model_file_is_not_a_slice(model_path):
    with pytest.raises(DllamaError, match="not a dllama slice file"):
        S.SliceFile(model_path)


def test_another_nodes_or_models_slice_is_refused(model_path, tmp_path):
    from dllama.formats.loader import load_model
    from dllama.model.partition import partition

    _cut(model_path, tmp_path, nodes=4)
    loaded = load_model(model_path)
    plan = partition(loaded.spec, 4)
    sf = S.SliceFile(str(tmp_path / S.slice_name(2, 4)))
    with pytest.raises(DllamaError, match="not node 1's slice"):
        sf.load_into(Recorder(), loaded.spec, plan[1])
    a, digest = P_json(sf.announcement()), sf.header["model_fingerprint"]
    plan_digest = S.plan_sha256(loaded.spec, plan)
    assert "node 2 of 4, it joins as node 1 of 4" in S.mismatch(a, digest, plan_digest, 1, 4)
    assert "another model file" in S.mismatch(a, "0" * 64, plan_digest, 2, 4)
    assert "another model file" in S.mismatch(a, None, plan_digest, 2, 4)
    two = S.plan_sha256(loaded.spec, partition(loaded.spec, 2))
    assert "another partition plan" in S.mismatch(a, digest, two, 2, 4)
    assert "malformed" in S.mismatch(b"{", digest, plan_digest, 2, 4)


def test_model_fingerprint_is_the_documented_sha256(model_path, tmp_path):
    data = open(model_path, "rb").read()
    prefix = b"dllama model fingerprint 1\0" + len(data).to_bytes(8, "little")
    assert S.model_fingerprint(model_path) == hashlib.sha256(prefix + data).hexdigest()   # small: every byte
    big = tmp_path / "big"
    size = 100 << 20
    with open(big, "wb") as f:
        f.truncate(size)
    first = S.model_fingerprint(str(big))
    step = (size - S.FP_SPAN) / (S.FP_SAMPLES - 1)
    with open(big, "r+b") as f:   # a byte between two sampled spans does not count ...
        f.seek(int(100 * step) + S.FP_SPAN + 10)
        f.write(b"x")
    assert S.model_fingerprint(str(big)) == first
    with open(big, "r+b") as f:   # ... one inside a span does
        f.seek(int(100 * step) + 10)
        f.write(b"x")
    assert S.model_fingerprint(str(big)) != first


def test_a_failed_cut_leaves_nothing_behind(model_path, tmp_path, monkeypatch, capsys):
    from dllama.model import partition

    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(28, "No space left on device")
        return real(*args)

    real = partition.slice_tensor
    monkeypatch.setattr(partition, "slice_tensor", failing)
    assert main(["slice", "--model", model_path, "--nodes", "2", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dllama: error: cannot write slice ") and "No space left on device" in err
    assert err.count("\n") == 1
    assert os.listdir(tmp_path / "o") == []


@pytest.mark.parametrize("argv,match", [
    (["--nodes", "1"], "--nodes must be at least 2"),
    (["--nodes", "5"], "cannot be split over 5 nodes"),   # more nodes than its 4 query heads
    (["--nodes", "4", "--node", "4"], "--node 4: worker nodes of a 4-node cluster are 1..3"),
    (["--nodes", "3", "--split", "auto"], "--split auto: the shares are measured at every start"),
    (["--nodes", "3", "--split", "2,1"], "2 weights for 3 nodes"),
])
def test_bad_arguments_are_one_line_errors(model_path, tmp_path, capsys, argv, match):
    assert main(["slice", "--model", model_path, "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dllama: error: ") and match in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists() or os.listdir(tmp_path / "o") == []


def test_slices_cut_for_split_weights_carry_that_plan(model_path, tmp_path):
    """A root started with --split 2,1,1 accepts only slices cut for those weights."""
    from dllama.formats.loader import load_model
    from dllama.model.partition import partition
    from dllama.net.slicefile import SliceFile, plan_sha256

    assert main(["slice", "--model", model_path, "--nodes", "3", "--split", "2,1,1", "--out", str(tmp_path)]) == 0
    with load_model(model_path) as m:
        weighted, even = plan_sha256(m.spec, partition(m.spec, 3, [2, 1, 1])), plan_sha256(m.spec, partition(m.spec, 3))
    got = SliceFile(str(tmp_path / "node1-of-3.dlslice")).announcement()["plan_sha256"]
    assert got == weighted != even
