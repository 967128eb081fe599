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
