"""K-quant GGUF files as llama.cpp quantized them, against llama.cpp's own logits on the same files
(tests/data/README.md: how they were made), on 1 node and on 2 (threads exchanging through queues).

Teacher-forced: every position of the prompt, one token at a time. The yardstick is the Q8_0 gap, dllama's
mean |logit difference| from llama.cpp on the Q8_0 file of the same model: llama.cpp quantizes activations
differently (f16 block scales, Q8_K blocks of 256 for K-quants) and keeps its KV cache in f16.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from dllama.formats.loader import load_model
from testlib import DATA
from test_tensor_parallel import build  # tests/unit is on sys.path (pytest's prepend import mode)

KQUANTS = ["Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K"]


@pytest.fixture(scope="module")
def reference():
    return np.load(DATA / "kquant_logits.npz")


def teacher_forced(name: str, prompt, n_nodes: int) -> np.ndarray:
    """dllama's logits (positions, vocab) at every prompt position of tests/data/tiny_<name>.gguf."""
    model = load_model(DATA / f"tiny_{name.lower()}.gguf")
    models = build(model.spec, model.tensors, n_nodes)

    def follow(m):
        while (pos := m.coll.step(0, None)) is not None:
            m.forward(None, pos)

    workers = [threading.Thread(target=follow, args=(m,), daemon=True) for m in models[1:]]
    for t in workers:
        t.start()
    root, out = models[0], []
    try:
        for i, token in enumerate(prompt):
            pos = np.array([i], np.int64)
            root.coll.step(1, pos)
            out.append(root.forward(np.array([token], np.int64), pos).copy())
    finally:
        for q in getattr(root.coll, "down", []):
            q.put(None)
        for t in workers:
            t.join(timeout=60)
    return np.array(out)


@pytest.fixture(scope="module")
def q80_gap(reference):
    return float(np.abs(teacher_forced("Q8_0", reference["prompt"], 1) - reference["Q8_0"]).mean())


def test_the_files_hold_the_types_named(reference):
    types = {name: {t.qtype for t in load_model(DATA / f"tiny_{name.lower()}.gguf").tensors.values()
                    if len(t.shape) == 2} for name in KQUANTS}
    assert types["Q4_K_M"] >= {"q4k", "q6k"} and types["Q5_K_M"] >= {"q5k", "q6k"}
    assert types["Q6_K"] == {"q6k"} and "q3k" in types["Q3_K_M"] and "q2k" in types["Q2_K"]


@pytest.mark.parametrize("n_nodes", [1, 2])
@pytest.mark.parametrize("name", KQUANTS)
def test_logits_agree_with_llamacpp(name, n_nodes, reference, q80_gap):
    theirs = reference[name]
    ours = teacher_forced(name, reference["prompt"], n_nodes)
    gap = float(np.abs(ours - theirs).mean())
    assert gap <= 3 * q80_gap, f"{name}: mean |difference| {gap:.4f}, Q8_0's {q80_gap:.4f}"
    top2 = np.sort(theirs, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > q80_gap
    same = ours.argmax(axis=1) == theirs.argmax(axis=1)
    assert clear.sum() >= len(clear) // 2, "the reference decides too few positions clearly to test"
    assert same[clear].mean() >= 0.95, f"{name}: top-1 agrees at {same[clear].mean():.1%} of clear positions"


def test_a_split_inside_a_super_block_is_refused_naming_the_tensor():
    from dllama.errors import DllamaError
    from dllama.formats.loader import Tensor
    from dllama.formats.spec import ModelSpec
    from dllama.model.partition import check_blocks, partition, slice_tensor
    from naive import random_blocks

    # q_dim 256 over 2 nodes: wo's columns 0..128 and 128..256, each half a Q4_K super-block. The plan
    # itself aligns to the file's main type (here Q8_0, 32 values), as a mixed file's plan does; the
    # one Q4_K tensor is what must be caught.
    spec = ModelSpec(dim=256, hidden_dim=512, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=64, vocab_size=256,
                     seq_len=64, rope_theta=10000.0, norm_eps=1e-5, weight_type="q80")
    wo = Tensor("layers.0.wo", "q4k", (256, 256), random_blocks("q4k", 256, 0).reshape(-1))
    plan = partition(spec, 2)
    with pytest.raises(DllamaError, match=r"tensor layers\.0\.wo \(q4k, blocks of 256 values\) cannot be split "
                                          r"over 2 nodes"):
        check_blocks({"layers.0.wo": wo}, spec, plan)
    with pytest.raises(DllamaError, match=r"tensor layers\.0\.wo"):
        slice_tensor(wo, "layers.0.wo", spec, plan[1])
    check_blocks({"layers.0.wo": wo}, spec, partition(spec, 1))   # one node cuts nothing


def test_convert_kquants_to_q40_with_a_note(tmp_path, capsys):
    import gguf

    from dllama import quants
    from dllama.formats import convert as conv

    src = DATA / "tiny_q4_k_m.gguf"
    out = tmp_path / "tiny.m"
    conv.convert(str(src), str(out), weight_type="q40")
    assert "q4k, q6k weights are dequantized and re-quantized to q40, which costs accuracy" in capsys.readouterr().err
    m = load_model(out)
    assert m.kind == "dlm" and m.spec.weight_type == "q40"
    g = {t.name: t for t in gguf.GGUFReader(str(src)).tensors}
    for gname, name in (("blk.0.attn_q.weight", "layers.0.wq"), ("blk.0.ffn_down.weight", "layers.0.w2"),
                        ("token_embd.weight", "wcls")):
        t = g[gname]
        rows = int(t.shape[1])
        values = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(rows, -1)
        np.testing.assert_array_equal(m.tensors[name].data, quants.quantize("q40", values).reshape(-1), err_msg=name)
    conv.convert(str(src), str(tmp_path / "f32.m"), weight_type="f32")
    assert "costs accuracy" not in capsys.readouterr().err


def test_weight_frames_carry_kquant_tensors():
    from dllama.net import protocol as P

    raw = (DATA / "tiny_q4_k_m.gguf").read_bytes()[-2 * 144:]
    frame = P.encode_bytes(P.Weight("layers.0.wq", "q4k", (1, 512), 0, 288, raw))
    # WEIGHT meta "<QQBB": offset, total, qtype code 7 (docs/protocol.md), ndim
    assert frame[8 + 16] == 7
    got = P.decode(frame)
    assert (got.qtype, got.shape, bytes(got.payload)) == ("q4k", (1, 512), raw)
