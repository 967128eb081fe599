"""`dllama convert` GGUF -> .m: the converted file runs exactly as the GGUF re-quantized to Q40 in memory."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from dllama import quants
from dllama.engine import Engine
from dllama.formats.loader import LoadedModel, Tensor, load_model
from dllama.sampler import Sampler
from dllama.tokenizer import Tokenizer

pytestmark = pytest.mark.slow
PROMPT_IDS = [504, 3575, 282, 4649, 314]   # "The capital of France is", llama.cpp's ids


def _requantized_in_memory(path: str) -> LoadedModel:
    """The GGUF's tensors as the .m format holds them: embedding and norms F32, every matrix Q40."""
    src = load_model(path)
    out = {}
    for name, t in src.tensors.items():
        f32 = t.to_f32()
        if len(t.shape) == 1 or name == "tok_embd":
            out[name] = Tensor(name, "f32", t.shape, quants.quantize("f32", f32).reshape(-1))
        else:
            out[name] = Tensor(name, "q40", t.shape, quants.quantize("q40", f32).reshape(-1))
    spec = dataclasses.replace(src.spec, weight_type="q40")
    return LoadedModel(spec=spec, tensors=out, path=path, kind="gguf")


def _greedy(engine, n=12):
    return list(engine.generate(PROMPT_IDS, n, Sampler(temperature=0), stop_ids=()))


def test_converted_m_equals_in_memory_q40(smollm2_path, tmp_path):
    m, t = tmp_path / "smollm2.m", tmp_path / "smollm2.t"
    res = subprocess.run([sys.executable, "-m", "dllama", "convert", "--model", smollm2_path,
                          "--output-model", str(m), "--output-tokenizer", str(t), "--weight-type", "q40"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    converted = Engine.open(str(m), str(t), max_seq_len=128)
    try:
        ids_m = _greedy(converted)
        assert converted.spec.weight_type == "q40"
    finally:
        converted.close()
    memory = Engine.from_loaded(_requantized_in_memory(smollm2_path), Tokenizer.from_gguf(smollm2_path),
                                max_seq_len=128)
    try:
        ids_q40 = _greedy(memory)
    finally:
        memory.close()
    assert ids_m == ids_q40


def test_padded_kv_heads_change_nothing_and_split_over_two_nodes(smollm2_path, tmp_path):
    """SmolLM2's 3 KV heads split over no node count; padded with zero heads to 4, it computes the same
    logits (bit for bit on one node) and can be split over 2 nodes."""
    import numpy as np

    from dllama.model.partition import partition

    outs = {}
    for pad in (None, 4):
        m = tmp_path / f"pad{pad}.m"
        args = [sys.executable, "-m", "dllama", "convert", "--model", smollm2_path, "--output-model", str(m),
                "--weight-type", "q40"] + (["--pad-kv-heads", str(pad)] if pad else [])
        res = subprocess.run(args, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr
        eng = Engine.from_loaded(load_model(str(m)), Tokenizer.from_gguf(smollm2_path), max_seq_len=64)
        try:
            outs[pad] = (eng.spec, eng.prefill(PROMPT_IDS).copy())
        finally:
            eng.close()
    (spec3, logits3), (spec4, logits4) = outs[None], outs[4]
    assert (spec4.n_kv_heads, spec4.n_heads, spec4.head_dim) == (4, 12, 64)
    np.testing.assert_array_equal(logits4, logits3)
    assert len(partition(spec4, 2)) == 2
