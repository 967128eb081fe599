"""`.m` files: our writer against an independent parser of the reference's layout, our reader against
hand-built files of both key sets (Oct 2024 and 2025), and every one-line error."""

from __future__ import annotations

import dataclasses
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from dllama import quants, schema
from dllama.errors import DllamaError, FormatError
from dllama.formats import dlm
from dllama.formats.loader import load_model
from dllama.formats.random_model import preset_spec, write_random_model
from dllama.formats.spec import ModelSpec

# The reference's header keys (src/llm.hpp LlmHeaderKey) and float types (converter/writer.py), by hand
REF_KEYS = {"version": 0, "arch_type": 1, "dim": 2, "hidden_dim": 3, "n_layers": 4, "n_heads": 5,
            "n_kv_heads": 6, "n_experts": 7, "n_active_experts": 8, "vocab_size": 9, "max_seq_len": 10,
            "hidden_act": 11, "rope_theta": 12, "weights_float_type": 13, "rope_scaling_factor": 14,
            "rope_scaling_low_freq_factor": 15, "rope_scaling_high_freq_factory": 16,
            "rope_scaling_orig_max_seq_len": 17, "rope_type": 18, "head_dim": 19, "norm_epsilon": 20,
            "moe_hidden_dim": 21}
REF_FLOAT = {"f32": 0, "f16": 1, "q40": 2, "q80": 3}
MAGIC = 0x0A00ABCD

TINY = ModelSpec(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=80,
                 seq_len=256, rope_theta=500000.0, norm_eps=1e-5)


def ref_parse_header(path):
    """An independent reader of the reference layout: int32 magic, int32 header size, int32 pairs."""
    with open(path, "rb") as f:
        magic, size = struct.unpack("<ii", f.read(8))
        ints = struct.unpack(f"<{(size - 8) // 4}i", f.read(size - 8))
    return magic, size, dict(zip(ints[0::2], ints[1::2]))


def source_tensors(spec, seed=0):
    """f32 sources for every tensor of the 2025 layout, computed independently of the writer."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, _q, shape in dlm.dlm_layout(spec):
        out[name] = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    return out


def dense_file_bytes(spec, wt):
    """Expected file size of a dense Llama .m, from the reference loader's list of tensors."""
    mat = lambda r, c: r * quants.row_bytes(wt, c)  # noqa: E731
    hd, d, f = spec.head_dim, spec.dim, spec.hidden_dim
    q, kv = spec.n_heads * hd, spec.n_kv_heads * hd
    layer = mat(q, d) + 2 * mat(kv, d) + mat(d, q) + 2 * mat(f, d) + mat(d, f) + 2 * d * 4
    return spec.vocab_size * d * 4 + spec.n_layers * layer + d * 4 + mat(spec.vocab_size, d)


@pytest.mark.parametrize("wt", ["f32", "f16", "q40", "q80"])
def test_round_trip_every_weight_type(tmp_path, wt):
    spec = dataclasses.replace(TINY, weight_type=wt)
    src = source_tensors(spec)
    path = tmp_path / "m.m"
    written = dlm.write_dlm(str(path), spec, src.items())
    magic, hsize, kv = ref_parse_header(path)
    assert magic == MAGIC and written == os.path.getsize(path) == hsize + dense_file_bytes(spec, wt)
    assert kv[REF_KEYS["weights_float_type"]] == REF_FLOAT[wt]
    # the embedding sits right after the header, as raw f32 (the reference's loadRoot("embedding"))
    emb = np.fromfile(path, dtype=np.float32, count=spec.vocab_size * spec.dim, offset=hsize)
    np.testing.assert_array_equal(emb, src["tok_embd"].ravel())

    m = dlm.read_dlm(str(path))
    for f in ("arch", "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size",
              "seq_len", "rope_theta", "norm_eps", "weight_type", "rope_type", "hidden_act"):
        assert getattr(m.spec, f) == getattr(spec, f), f
    for name, x in src.items():
        t = m.tensors[name]
        assert t.data.dtype == np.uint8 and t.data.ndim == 1 and not t.data.flags.writeable
        assert isinstance(t.data, np.memmap)    # a view of the map, not a copy
        want_q = "f32" if len(t.shape) == 1 or name == "tok_embd" else wt
        assert t.qtype == want_q, name
        np.testing.assert_array_equal(t.data, quants.quantize(want_q, x).ravel())
    m.close()


def test_header_keys_follow_the_reference(tmp_path):
    spec = dataclasses.replace(preset_spec("llama3_2_1b"), dim=128, hidden_dim=256, n_layers=1, n_heads=4,
                               n_kv_heads=2, head_dim=32, vocab_size=64)
    path = tmp_path / "h.m"
    write_random_model(str(path), spec)
    _, hsize, kv = ref_parse_header(path)
    assert hsize == 8 + 8 * len(kv)
    expect = {"arch_type": 0xABCD00, "dim": 128, "hidden_dim": 256, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2,
              "vocab_size": 64, "max_seq_len": 131072, "hidden_act": 1, "rope_theta": 500000,
              "weights_float_type": 2, "rope_type": 2, "rope_scaling_factor": 32, "rope_scaling_low_freq_factor": 1,
              "rope_scaling_high_freq_factory": 4, "rope_scaling_orig_max_seq_len": 8192}
    for key, value in expect.items():
        assert kv[REF_KEYS[key]] == value, key
    # head_dim = dim / n_heads and epsilon 1e-5 are both versions' defaults: left out, the Oct 2024
    # reference (which knows no key above 18) reads the file too
    assert max(kv) == 18
    back = load_model(str(path)).spec
    assert (back.rope_type, back.rope_scaling_factor, back.rope_scaling_orig_max_seq_len) == ("llama3.1", 32.0, 8192)


def test_2025_keys_are_written_when_they_differ_from_the_defaults(tmp_path):
    spec = dataclasses.replace(TINY, head_dim=32, norm_eps=1e-6, weight_type="f16")   # q_dim 128 != dim 64
    path = tmp_path / "k.m"
    dlm.write_dlm(str(path), spec, source_tensors(spec).items())
    _, _, kv = ref_parse_header(path)
    assert kv[REF_KEYS["head_dim"]] == 32 and kv[REF_KEYS["norm_epsilon"]] == 6
    m = load_model(str(path))
    assert (m.spec.head_dim, m.spec.q_dim, m.spec.norm_eps) == (32, 128, 1e-6)
    assert m.tensors["layers.1.wo"].shape == (64, 128)


@pytest.mark.parametrize("arch, experts", [("qwen3", 0), ("qwen3_moe", 2)])
def test_qwen3_round_trip(tmp_path, arch, experts):
    spec = dataclasses.replace(TINY, arch=arch, n_experts=experts, n_active_experts=experts // 2,
                               moe_hidden_dim=64 if experts else 0, rope_type="falcon", weight_type="q40")
    src = source_tensors(spec)
    dlm.write_dlm(str(tmp_path / "q.m"), spec, src.items())
    m = load_model(str(tmp_path / "q.m"))
    assert (m.spec.arch, m.spec.rope_type, m.spec.ffn_dim, m.spec.extra["dlm_key_set"]) == \
        (arch, "falcon", 64 if experts else 96, "2025")
    for name, x in src.items():
        np.testing.assert_array_equal(m.tensors[name].data, quants.quantize(m.tensors[name].qtype, x).ravel())


def handmade(path, pairs, tensor_bytes=0, magic=MAGIC, extra=b""):
    body = b"".join(struct.pack("<ii", k, v) for k, v in pairs)
    with open(path, "wb") as f:
        f.write(struct.pack("<ii", magic, 8 + len(body)) + body)
        f.write(np.arange(tensor_bytes, dtype=np.uint64).astype(np.uint8).tobytes() + extra)
    return str(path)


def base_pairs(**over):
    kv = {"arch_type": 0xABCD00, "dim": 64, "hidden_dim": 96, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2,
          "vocab_size": 40, "max_seq_len": 128, "weights_float_type": 0}
    kv.update(over)
    return [(REF_KEYS[k], v) for k, v in kv.items() if v is not None]


def f32_mat(r, c):
    return r * c * 4


def test_2024_mixtral_layout(tmp_path):
    # convert-mixtral.py (2024): router in the weight type, experts as up, gate, down; falcon rope by default
    d, f, v, e = 64, 96, 40, 3
    per_layer = 2 * f32_mat(64, d) + 2 * f32_mat(32, d) + f32_mat(e, d) + e * 3 * f32_mat(f, d) + 2 * d * 4
    total = v * d * 4 + per_layer + d * 4 + f32_mat(v, d)
    path = handmade(tmp_path / "mx.m", base_pairs(arch_type=0xABCD02, n_experts=e, n_active_experts=2), total)
    m = load_model(path)
    assert (m.spec.arch, m.spec.rope_type, m.spec.n_experts, m.spec.extra["dlm_key_set"]) == ("mixtral", "falcon", 3, "2024")
    names = list(m.tensors)
    assert names[5:9] == ["layers.0.moe_gate", "layers.0.experts.0.w3", "layers.0.experts.0.w1", "layers.0.experts.0.w2"]
    assert m.tensors["layers.0.moe_gate"].qtype == "f32" and m.tensors["layers.0.experts.0.w2"].shape == (d, f)
    # the router starts right after wo: offsets follow the file order
    off = 8 + 8 * 11 + v * d * 4 + 2 * f32_mat(64, d) + 2 * f32_mat(32, d)
    expect = np.arange(off, off + f32_mat(e, d), dtype=np.uint64).astype(np.uint8) - np.uint8((8 + 8 * 11) % 256)
    np.testing.assert_array_equal(m.tensors["layers.0.moe_gate"].data, expect)


def test_2024_grok1_has_four_norms_and_gelu(tmp_path):
    d, f, v, e = 64, 96, 40, 2
    per_layer = 2 * f32_mat(64, d) + 2 * f32_mat(32, d) + f32_mat(e, d) + e * 3 * f32_mat(f, d) + 4 * d * 4
    path = handmade(tmp_path / "g.m", base_pairs(arch_type=0xABCD01, n_experts=e, n_active_experts=1),
                    v * d * 4 + per_layer + d * 4 + f32_mat(v, d))
    m = load_model(path)
    assert (m.spec.arch, m.spec.hidden_act, m.spec.rope_type) == ("grok1", "gelu", "falcon")
    # the reference hard-codes Grok-1's multipliers; llama.cpp adds the attention soft cap
    assert (m.spec.embedding_scale, m.spec.logit_scale, m.spec.attn_softcap) == (
        pytest.approx(78.38367176906169), pytest.approx(0.5773502691896257), 30.0)
    assert m.spec.attn_scale == pytest.approx(1 / (d // 4) ** 0.5)
    assert "layers.0.ffn_post_norm" in m.tensors


def test_2025_qwen3_moe_layout(tmp_path):
    # convert-hf.py (2025): head_dim, norm_epsilon and moe_hidden_dim keys; router f32; w1, w2, w3; q/k norms
    d, hd, moe_f, v, e = 64, 32, 64, 40, 2   # hidden_dim (96) is not the experts' width
    q, kv = 4 * hd, 2 * hd
    per_layer = (f32_mat(q, d) + 2 * f32_mat(kv, d) + f32_mat(d, q) + f32_mat(e, d) + e * 3 * f32_mat(moe_f, d)
                 + 2 * hd * 4 + 2 * d * 4)
    pairs = base_pairs(arch_type=0xABCD02, n_experts=e, n_active_experts=1, head_dim=hd, norm_epsilon=6,
                       moe_hidden_dim=moe_f)
    m = load_model(handmade(tmp_path / "q.m", pairs, v * d * 4 + per_layer + d * 4 + f32_mat(v, d)))
    assert (m.spec.arch, m.spec.rope_type, m.spec.norm_eps, m.spec.head_dim) == ("qwen3_moe", "falcon", 1e-6, hd)
    assert m.tensors["layers.0.experts.1.w2"].shape == (d, moe_f)
    assert m.tensors["layers.0.q_norm"].shape == (hd,)
    assert list(m.tensors)[5:8] == ["layers.0.moe_gate", "layers.0.experts.0.w1", "layers.0.experts.0.w2"]


def test_2025_qwen3_dense_without_new_keys(tmp_path):
    # arch 0xABCD01 and no experts cannot be Grok-1: read as Qwen3
    d, f, v = 64, 96, 40
    per_layer = 2 * f32_mat(64, d) + 2 * f32_mat(32, d) + 3 * f32_mat(f, d) + 2 * 16 * 4 + 2 * d * 4
    m = load_model(handmade(tmp_path / "q3.m", base_pairs(arch_type=0xABCD01),
                            v * d * 4 + per_layer + d * 4 + f32_mat(v, d)))
    assert (m.spec.arch, m.spec.extra["dlm_key_set"]) == ("qwen3", "2025")


@pytest.mark.parametrize("arch, arch_id, norms", [("mixtral", 0xABCD02, 2), ("grok1", 0xABCD01, 4)])
def test_moe_models_are_written_with_the_2024_keys(tmp_path, arch, arch_id, norms):
    # the 2025 reference builds experts only for Qwen3-MoE: llama-family MoE goes out as 2024 read it
    spec = dataclasses.replace(TINY, arch=arch, n_experts=3, n_active_experts=2, weight_type="q80",
                               hidden_act="gelu" if arch == "grok1" else "silu")
    if arch == "grok1":   # a .m header cannot state Grok's scalings: only those it implies can be written
        spec = dataclasses.replace(spec, **schema.grok_dlm_scalings(TINY.head_dim))
    assert dlm.write_key_set(spec) == "2024"
    src = source_tensors(spec)
    path = tmp_path / "moe.m"
    dlm.write_dlm(str(path), spec, [(n, src[n]) for n, _, _ in dlm.dlm_layout(spec, "2024")])
    _, _, kv = ref_parse_header(path)
    assert kv[REF_KEYS["arch_type"]] == arch_id and kv[REF_KEYS["rope_type"]] == 0 and max(kv) < 19
    m = load_model(str(path))
    assert (m.spec.arch, m.spec.extra["dlm_key_set"], m.spec.rope_type, m.spec.n_experts) == (arch, "2024", "llama", 3)
    assert m.tensors["layers.1.moe_gate"].qtype == "q80"
    assert sum(n.startswith("layers.0.") and n.endswith("norm") for n in m.tensors) == norms
    for name, x in src.items():
        np.testing.assert_array_equal(m.tensors[name].data, quants.quantize(m.tensors[name].qtype, x).ravel())
    with pytest.raises(DllamaError, match="Oct 2024 header"):
        dlm.write_dlm(str(tmp_path / "x.m"), dataclasses.replace(spec, norm_eps=1e-6), src.items())


def test_weight_type_inferred_from_size_when_absent(tmp_path):
    spec = dataclasses.replace(TINY, weight_type="q40")
    ok = tmp_path / "ok.m"
    dlm.write_dlm(str(ok), spec, source_tensors(spec).items())
    magic, hsize, kv = ref_parse_header(ok)
    kv.pop(REF_KEYS["weights_float_type"])
    kv = {k: v for k, v in kv.items() if k < 19}   # a 2024-style header
    body = open(ok, "rb").read()[hsize:]
    path = handmade(tmp_path / "old.m", list(kv.items()))
    with open(path, "ab") as out:
        out.write(body)
    assert load_model(path).spec.weight_type == "q40"


@pytest.fixture
def small_file(tmp_path):
    spec = dataclasses.replace(TINY, weight_type="q40")
    path = tmp_path / "s.m"
    dlm.write_dlm(str(path), spec, source_tensors(spec).items())
    return path


def test_truncated_and_overlong_files(small_file):
    data = small_file.read_bytes()
    small_file.write_bytes(data[:-1])
    with pytest.raises(FormatError, match=rf"s\.m: truncated \(expected {len(data)} bytes, found {len(data) - 1}\)"):
        load_model(str(small_file))
    small_file.write_bytes(data + b"\0\0")
    with pytest.raises(FormatError, match=rf"2 unexpected bytes .*expected {len(data)} bytes, found {len(data) + 2}"):
        load_model(str(small_file))
    small_file.write_bytes(data[:6])
    with pytest.raises(FormatError, match="truncated"):
        dlm.read_dlm(str(small_file))


@pytest.mark.parametrize("pairs, message", [
    (base_pairs() + [(99, 1)], r"unknown \.m header key 99"),
    (base_pairs(weights_float_type=7), "unsupported weight type 7"),
    (base_pairs(arch_type=0xABCD07), "unsupported arch type 0xabcd07"),
    (base_pairs(norm_epsilon=4), "unsupported norm epsilon code 4"),
    (base_pairs(dim=None), "lacks a positive dim"),
    (base_pairs(dim=48, weights_float_type=2), "q40 row needs a multiple of 32 values, got 48"),
])
def test_header_errors(tmp_path, pairs, message):
    path = handmade(tmp_path / "bad.m", pairs, 10)
    with pytest.raises(FormatError, match=message) as exc:
        load_model(path)
    assert str(exc.value).startswith(path) and "\n" not in str(exc.value)


def test_wrong_magic(tmp_path):
    path = handmade(tmp_path / "old.m", base_pairs(), 10, magic=0xABCD00)
    with pytest.raises(FormatError, match="pre-2024"):
        load_model(path)
    path = handmade(tmp_path / "x.m", base_pairs(), 10, magic=0x1234)
    with pytest.raises(FormatError, match="not a model file"):
        load_model(path)
    with pytest.raises(FormatError, match="wrong magic 0x00001234"):
        dlm.read_dlm(path)


def test_unwritable_specs_are_refused(tmp_path):
    for change, message in [({"weight_type": "q41"}, "cannot write 'q41'"), ({"arch": "grok1"}, "grok1"),
                            ({"dim": 48, "head_dim": 12}, r"tensor layers\.0\.wq \(48, 48\) as q40: .*multiple of 32"),
                            ({"norm_eps": 1e-4}, "norm epsilon"), ({"rope_theta": 10000.5}, "rope_theta")]:
        spec = dataclasses.replace(TINY, **change)
        with pytest.raises(DllamaError, match=message):
            dlm.write_dlm(str(tmp_path / "x.m"), spec, source_tensors(spec).items())
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_nothing(tmp_path):
    spec = dataclasses.replace(TINY, weight_type="q40")
    src = source_tensors(spec)

    def failing(exc):
        for i, item in enumerate(src.items()):
            if i == 5:
                raise exc
            yield item

    for exc in (RuntimeError("disk on fire"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            dlm.write_dlm(str(tmp_path / "out.m"), spec, failing(exc))
        assert os.listdir(tmp_path) == []
    with pytest.raises(DllamaError, match="expected tensor layers.0.wq, got layers.0.wk"):
        items = [(n, x) for n, x in src.items() if n != "layers.0.wq"]
        dlm.write_dlm(str(tmp_path / "out.m"), spec, items)
    assert os.listdir(tmp_path) == []


def test_random_model_values(tmp_path):
    spec = preset_spec("smollm2_135m", n_layers=2, vocab_size=256, dim=128, hidden_dim=256, n_heads=4, n_kv_heads=2)
    path = tmp_path / "r.m"
    write_random_model(str(path), spec, seed=1)
    m = load_model(str(path))
    assert m.spec.head_dim == 32 and m.spec.n_layers == 2
    w = m.tensors["layers.1.w2"].to_f32()
    assert abs(w.std() - 0.02) < 0.001 and abs(w.mean()) < 0.001
    assert np.all(m.tensors["layers.0.attn_norm"].to_f32() == 1)
    assert abs(m.tensors["tok_embd"].to_f32().std() - 0.02) < 0.001


def test_random_model_prefetch_keeps_the_values(tmp_path):
    from dllama.formats import random_model as rm

    spec = preset_spec("smollm2_135m", n_layers=2, vocab_size=96, dim=64, hidden_dim=128, n_heads=4, n_kv_heads=2)
    write_random_model(str(tmp_path / "a.m"), spec, seed=5)
    dlm.write_dlm(str(tmp_path / "b.m"), spec, rm.random_tensors(spec, seed=5))
    assert (tmp_path / "a.m").read_bytes() == (tmp_path / "b.m").read_bytes()

    def broken():
        yield from list(rm.random_tensors(spec))[:3]
        raise OSError("no more randomness")

    with pytest.raises(OSError, match="no more randomness"):
        dlm.write_dlm(str(tmp_path / "c.m"), spec, rm._prefetched(broken()))
    assert sorted(os.listdir(tmp_path)) == ["a.m", "b.m"]


def test_random_model_cli_and_errors(tmp_path, capsys):
    from dllama.cli import main

    out = tmp_path / "c.m"
    assert main(["random-model", "--output", str(out), "--preset", "llama3_8b", "--dim", "256", "--hidden-dim", "512",
                 "--n-layers", "1", "--n-heads", "8", "--vocab-size", "128", "--weight-type", "f16"]) == 0
    spec = load_model(str(out)).spec
    assert (spec.dim, spec.head_dim, spec.n_kv_heads, spec.weight_type) == (256, 32, 8, "f16")
    assert main(["random-model", "--output", str(tmp_path / "d.m"), "--preset", "llama3_8b", "--n-heads", "6"]) == 2
    assert "dllama: error: bad shape" in capsys.readouterr().err
    assert main(["random-model", "--output", str(tmp_path / "e.m"), "--preset", "llama3_8b", "--n-layers", "0"]) == 2
    assert "--n-layers must be positive, got 0" in capsys.readouterr().err


def test_sigterm_during_random_model_leaves_nothing(tmp_path):
    # a real process killed mid-write: the temporary must go, the output must never appear
    out = tmp_path / "big.m"
    proc = subprocess.Popen([sys.executable, "-m", "dllama", "random-model", "--output", str(out),
                             "--preset", "smollm2_135m", "--n-layers", "200"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not any(n.endswith(".tmp") for n in os.listdir(tmp_path)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM
    assert os.listdir(tmp_path) == []
