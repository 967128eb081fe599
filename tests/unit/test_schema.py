"""The tensor schema and the quant registry against the `gguf` package's own tables (gguf-py is what
llama.cpp's converter writes with): every GGUF name an architecture gets is one llama.cpp gives it, and
every size the registry states is ggml's."""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
from gguf import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES

from dllama import kernels as K
from dllama import quants, schema
from dllama.formats.spec import ModelSpec
from dllama.model.partition import node_tensor_names, partition
from dllama.net import protocol as P

BASE = ModelSpec(dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=40)
ARCH_SPECS = {
    "llama": (MODEL_ARCH.LLAMA, BASE),
    "mixtral": (MODEL_ARCH.LLAMA, dataclasses.replace(BASE, arch="mixtral", n_experts=4, n_active_experts=2)),
    "qwen3": (MODEL_ARCH.QWEN3, dataclasses.replace(BASE, arch="qwen3", head_dim=32)),
    "qwen3_moe": (MODEL_ARCH.QWEN3MOE, dataclasses.replace(BASE, arch="qwen3_moe", n_experts=4,
                                                           n_active_experts=2, moe_hidden_dim=64)),
    "grok1": (MODEL_ARCH.GROK, dataclasses.replace(BASE, arch="grok1", n_experts=4, n_active_experts=2)),
}


@pytest.mark.parametrize("arch", list(ARCH_SPECS))
def test_gguf_names_are_llama_cpps(arch):
    gguf_arch, spec = ARCH_SPECS[arch]
    theirs = {TENSOR_NAMES[t] for t in MODEL_TENSORS[gguf_arch]}
    for r in schema.rows_for(spec):
        assert TENSOR_NAMES[r.gguf] in theirs, f"{arch}: {r.leaf} -> {TENSOR_NAMES[r.gguf]}"


def test_every_architecture_has_rows_and_qk_norms_only_qwen3():
    assert set(ARCH_SPECS) == set(schema.ARCHS)
    for arch, (_, spec) in ARCH_SPECS.items():
        leaves = {r.leaf for r in schema.rows_for(spec)}
        assert {"tok_embd", "wq", "wk", "wv", "wo", "attn_norm", "ffn_norm", "norm", "wcls"} <= leaves
        assert ("q_norm" in leaves) == arch.startswith("qwen3")
        assert ("moe_gate" in leaves) == bool(spec.n_experts)


@pytest.mark.parametrize("arch", list(ARCH_SPECS))
def test_names_parse_back_to_their_rows(arch):
    spec = ARCH_SPECS[arch][1]
    for name, row, (layer, expert) in schema.entries(spec):
        assert schema.parse(name) == (row, layer, expert)
    # the root streams every tensor; a worker all but the embedding
    plan = partition(spec, 2)
    assert node_tensor_names(spec, plan[0]) == [n for n, _, _ in schema.entries(spec)]
    assert node_tensor_names(spec, plan[1]) == [n for n, _, _ in schema.entries(spec) if n != "tok_embd"]


def test_unknown_names_are_refused():
    for name in ("layers.0.wz", "layers.0.experts.1.wq", "emb", "layers.x.wq"):
        with pytest.raises(KeyError):
            schema.parse(name)


@pytest.mark.parametrize("qtype", quants.QTYPES)
def test_quant_registry_sizes_are_ggmls_everywhere(qtype):
    q = quants.quant(qtype)
    shape = (3, max(128, q.block_size))   # a K-quant row holds whole 256-value super-blocks
    ggml = gguf.quant_shape_to_byte_shape(shape, q.gguf)
    want = int(np.prod(ggml))
    assert quants.tensor_bytes(qtype, shape) == want
    assert P.tensor_nbytes(qtype, shape) == want
    assert K.pack(qtype, np.zeros(want, np.uint8), *shape).rows == 3
    assert quants.BY_WIRE_CODE[q.wire_code] == qtype
    if q.dlm_code is not None:
        assert quants.BY_DLM_CODE[q.dlm_code] == qtype


def test_dlm_codes_are_the_reference_float_types():
    # the reference's FloatType enum: F32 0, F16 1, Q40 2, Q80 3 (it has no Q4_1)
    assert quants.BY_DLM_CODE == {0: "f32", 1: "f16", 2: "q40", 3: "q80"}
