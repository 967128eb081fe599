"""Grok-1 against llama.cpp: Grok-1 has no `transformers` class, so llama.cpp's `grok` graph is the truth.

Tiny random Grok GGUFs (tests/grok_gguf.py: F32 weights, 4 experts top-2, GELU experts, the post-attention
and post-FFN norms) in three cases: no scaling keys (llama.cpp's Grok-1 defaults: embedding x78.4, q.k
x0.0884 then 30 tanh(s / 30), logits x0.577), every `grok.*` scaling key set to other values, and the
values a `.m` file implies. tests/data/grok_tiny_logits.npz holds llama.cpp's logits for them (after the
prompt and after each of its greedy tokens); dllama runs the same files on one node, split over two
nodes in one process, over a `dllama worker` on loopback, and converted to `.m`.

Tolerance: TOL of the largest |logit|. Both sides compute in f32 (F32 weights take f32 activations in
dllama; the test asks llama.cpp for an F32 KV cache), except that ggml's GELU reads a float16 table
(GGML_GELU_FP16), which rounds every expert activation to about 5e-4: measured 3e-4 at most.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import grok_gguf as G
from cluster_fixtures import KEY, start_workers  # noqa: F401  (a fixture)

from dllama import schema
from dllama.engine import Engine

TOL = 1e-3
GOLDEN = Path(__file__).resolve().parents[1] / "data" / "grok_tiny_logits.npz"


@pytest.fixture(scope="module")
def golden() -> dict:
    with np.load(GOLDEN) as z:
        return {case: z[case] for case in G.CASES}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("grok")
    paths = {}
    for case in G.CASES:
        paths[case] = str(d / f"{case}.gguf")
        G.write(paths[case], case)
    return paths


def _rel(ours, ref) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _run(eng, ref) -> np.ndarray:
    """Logits after the prompt, then after each of llama.cpp's greedy tokens (the argmax of its rows)."""
    eng.cache_ids = []
    out = [eng.prefill(G.PROMPT).copy()]
    for i in range(G.STEPS):
        out.append(eng._forward([int(np.argmax(ref[i]))], len(G.PROMPT) + i).copy())
    return np.stack(out)


def test_spec_reads_grok_keys_or_llama_cpp_defaults(files):
    for case, keys in G.CASES.items():
        eng = Engine.open(files[case], nthreads=1)
        try:
            s = eng.spec
        finally:
            eng.close()
        assert (s.arch, s.hidden_act, s.rope_type, s.n_experts, s.n_active_experts) == (
            "grok1", "gelu", "falcon", G.N_EXPERTS, G.N_ACTIVE)
        for field, (key, default) in schema.GROK_SCALINGS.items():
            assert getattr(s, field) == pytest.approx(keys.get(key, default), rel=1e-6), (case, field)


@pytest.mark.parametrize("case", list(G.CASES))
def test_one_node_matches_llama_cpp(files, golden, case):
    eng = Engine.open(files[case], nthreads=1)
    try:
        ours = _run(eng, golden[case])
    finally:
        eng.close()
    for i, (row, ref) in enumerate(zip(ours, golden[case])):
        assert _rel(row, ref) < TOL, f"{case} row {i}: {_rel(row, ref):.2e} of max"
        assert np.argmax(row) == np.argmax(ref), (case, i)


SABOTAGES = {
    "no embedding multiplier": lambda e: setattr(e.spec, "embedding_scale", 0.0),
    "no attention soft cap": lambda e: setattr(e.spec, "attn_softcap", 0.0),
    "1/sqrt(head_dim) for the q.k multiplier": lambda e: setattr(e.spec, "attn_scale", 0.0),
    "no output multiplier": lambda e: setattr(e.spec, "logit_scale", 0.0),
    "no post-attention norm": lambda e: [setattr(x, "attn_post_norm", None) for x in e.model.layers],
    "no post-FFN norm": lambda e: [setattr(x, "ffn_post_norm", None) for x in e.model.layers],
    "SiLU experts": lambda e: setattr(e.spec, "hidden_act", "silu"),
}


@pytest.mark.parametrize("sabotage", list(SABOTAGES))
def test_each_grok_difference_moves_the_logits(files, golden, sabotage):
    """The comparison has teeth: leaving out any one of Grok's differences is far outside TOL."""
    eng = Engine.open(files["defaults"], nthreads=1)
    try:
        SABOTAGES[sabotage](eng)
        ours = _run(eng, golden["defaults"])
    finally:
        eng.close()
    assert _rel(ours, golden["defaults"]) > 20 * TOL, sabotage


@pytest.mark.parametrize("case", list(G.CASES))
def test_split_in_process_matches_llama_cpp(files, golden, case):
    """Two nodes in one process (threads exchanging F32 buffers): each holds half the heads, half of every
    expert's rows and half the vocabulary. Prefill in batches of 8, then greedy decode."""
    from unit.test_tensor_parallel import build, greedy

    from dllama.formats.loader import load_model

    with load_model(files[case]) as loaded:
        got, first = greedy(build(loaded.spec, loaded.tensors, 2), G.PROMPT, G.STEPS)
    assert _rel(first, golden[case][0]) < TOL, case
    assert got == [int(np.argmax(r)) for r in golden[case][:G.STEPS]], case


def test_m_file_matches_llama_cpp(files, golden, tmp_path):
    """`dllama convert` to the reference's Oct 2024 `.m`: its header has no scaling keys, and the
    reader supplies the ones such a file means (schema.grok_dlm_scalings)."""
    from dllama.formats.convert import convert

    m, t = str(tmp_path / "grok.m"), str(tmp_path / "grok.t")
    convert(files["dlm"], m, t, "f32")
    eng = Engine.open(m, t, nthreads=1)
    try:
        assert eng.loaded.spec.extra["dlm_key_set"] == "2024"
        ours = _run(eng, golden["dlm"])
    finally:
        eng.close()
    assert _rel(ours, golden["dlm"]) < TOL


@pytest.mark.parametrize("case", ["defaults", "keys"])
def test_m_file_refuses_scalings_it_cannot_hold(files, tmp_path, case):
    from dllama.errors import DllamaError
    from dllama.formats.convert import convert

    m = tmp_path / "grok.m"
    with pytest.raises(DllamaError, match="cannot write this grok1 model as .m"):
        convert(files[case], str(m), None, "f32")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.network
def test_two_nodes_over_loopback_match_llama_cpp(files, golden, start_workers):
    """A root and a `dllama worker` on loopback, F32 buffers: the scalings travel in the worker's config."""
    (worker,) = start_workers(1)
    for case in ("defaults", "keys"):
        assert worker.wait_idle()["state"] == "idle", worker.log()
        eng = Engine.open(files[case], nthreads=1, buffer_float_type="f32", workers=[worker.address],
                          cluster_key=KEY)
        try:
            ours = _run(eng, golden[case])
        finally:
            eng.close()
        assert _rel(ours, golden[case]) < TOL, case
