"""Continuous batching (issue 15): conversations sharing forward passes produce what they produce alone, on
one node and over a real worker on loopback; a cancelled one disturbs nobody; a freed slot's KV memory
goes back; a returning conversation finds its own cache."""

from __future__ import annotations

import numpy as np
import pytest

from cluster_fixtures import KEY, random_cluster_model, start_workers  # noqa: F401  (fixtures)
from dllama.batcher import Batcher, Sequence

pytestmark = [pytest.mark.slow]

# F32 buffers everywhere; a row's matmul sums in the same order whatever the batch (the kernels' rows are
# independent), but numba may pick another vector path for a batch of 4 rows than for 1, so logits are
# held to 1e-4 of the lone run (their spread is ~3) and tokens compared while the top-2 gap is > 1e-3.
TOL_LOGITS = 1e-4
PROMPTS = [[256, 72, 101, 108, 108, 111], [256, 87, 104, 97, 116, 32, 105, 115, 32, 97, 32, 99, 97, 116],
           [256, 84, 104, 101], [256, 49, 50, 51, 52, 53, 54, 55, 56, 57, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57,
                                 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 48, 49, 50, 51, 52, 53, 54]]
STEPS = 16


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    m, t = random_cluster_model(tmp_path_factory.mktemp("batching"))
    return str(m), str(t)


class Recorder:
    """A greedy sampler that keeps every row of logits it was given."""

    def __init__(self):
        self.rows = []

    def __call__(self, logits):
        self.rows.append(np.array(logits, np.float64))
        return int(np.argmax(logits))


def _open(model_files, workers=(), parallel=4):
    from dllama.engine import Engine

    return Engine.open(model_files[0], model_files[1], buffer_float_type="f32", workers=list(workers),
                       cluster_key=KEY, parallel=parallel)


def _alone(engine, prompt):
    rec = Recorder()
    engine.cache_ids = []
    toks = list(engine.generate(prompt, STEPS, rec, stop_ids=()))
    return toks, rec.rows


def _batched(engine, prompts, max_rows=None):
    b = Batcher(engine, max_rows)
    seqs = [Sequence(p, STEPS, Recorder(), tag=i) for i, p in enumerate(prompts)]
    got = {i: [] for i in range(len(prompts))}
    for s in seqs:
        b.admit(s)
    while b.running:
        for seq, tok in b.step():
            got[seq.tag].append(tok)
    return got, seqs, b


def _compare(alone, got, seqs, skip=()):
    compared = 0
    for i, (toks, rows) in enumerate(alone):
        if i in skip:
            continue
        brows = seqs[i].sampler.rows
        for t, (a, bt) in enumerate(zip(rows, brows)):
            np.testing.assert_allclose(bt, a, atol=TOL_LOGITS, err_msg=f"stream {i}, token {t}")
            top2 = np.sort(a)[-2:]
            if top2[1] - top2[0] < 1e-3:
                break
            assert got[i][t] == toks[t], f"stream {i}, token {t}"
            compared += 1
    return compared


def test_batched_streams_match_alone_one_node(model_files):
    engine = _open(model_files)
    try:
        alone = [_alone(engine, p) for p in PROMPTS]
        assert len({tuple(t) for t, _ in alone}) == len(PROMPTS), "the prompts should lead to different replies"
        # 8 rows a pass: the long prompt is evaluated in chunks between the others' decodes
        got, seqs, b = _batched(engine, PROMPTS, max_rows=8)
        assert _compare(alone, got, seqs) >= 3 * STEPS
        assert b.rows / b.passes > 3   # the passes did carry several conversations
    finally:
        engine.close()


def test_cancelled_stream_disturbs_nobody_and_frees_its_memory(model_files):
    engine = _open(model_files)
    try:
        alone = [_alone(engine, p) for p in PROMPTS]
        engine.release(0)
        kv = engine.model.kv
        b = Batcher(engine)
        seqs = [Sequence(p, STEPS, Recorder(), tag=i) for i, p in enumerate(PROMPTS)]
        got = {i: [] for i in range(len(PROMPTS))}
        for s in seqs:
            b.admit(s)
        for _ in range(4):
            for seq, tok in b.step():
                got[seq.tag].append(tok)
        held = kv.resident_bytes()
        victim = seqs[3]          # the longest prompt: its positions span the most pages
        b.cancel(victim)
        assert victim not in b.running and victim.slot in b.free
        if held is not None:
            assert kv.resident_bytes() < held, "the cancelled slot's pages should go back"
        while b.running:
            for seq, tok in b.step():
                got[seq.tag].append(tok)
        assert _compare(alone, got, seqs, skip={3}) >= 2 * STEPS
        for s in seqs[:3]:
            b.engine.release(s.slot)
        if held is not None:
            assert kv.resident_bytes() <= 3 * 4096 * 2 * engine.spec.n_layers, "freed slots keep their pages"
    finally:
        engine.close()


def test_kv_cache_release_returns_pages():
    from dllama.model.kvcache import KVCache

    kv = KVCache(n_layers=2, n_slots=3, seq_len=1024, kv_dim=256)   # 1 MiB per slot and layer for K and V
    base = kv.resident_bytes()
    if base is None:
        pytest.skip("no mincore on this platform")
    for layer in range(2):
        kv.k[layer][kv.base(1):kv.base(1) + 1024] = 1.0
        kv.v[layer][kv.base(1):kv.base(1) + 1024] = 1.0
        kv.k[layer][kv.base(2):kv.base(2) + 8] = 2.0
    assert kv.resident_bytes() - base >= 4 << 20
    kv.release(1, keep=4)
    assert kv.resident_bytes() - base <= 3 * 2 * 2 * 4096 + 2 * 4096   # slot 1's first page, slot 2's
    assert (kv.k[0][kv.base(1):kv.base(1) + 4] == 1.0).all()          # the kept positions stay
    assert not kv.k[0][kv.base(1) + 1020:kv.base(1) + 1024].any()     # the released read as zeros
    assert (kv.k[1][kv.base(2):kv.base(2) + 8] == 2.0).all()          # the other slot is untouched
    with pytest.raises(ValueError):
        kv.release(3)


def test_returning_conversation_finds_its_slot(model_files):
    engine = _open(model_files)
    try:
        b = Batcher(engine)
        first = [Sequence(p, 4, Recorder()) for p in PROMPTS]
        for s in first:
            b.admit(s)
        while b.running:
            b.step()
        # the second prompt's conversation returns with its reply and a new turn: its own slot is picked
        # and the whole earlier prompt is reused
        back = PROMPTS[1] + [101, 102]
        seq = Sequence(back, 2, Recorder())
        b.admit(seq)
        assert seq.slot == first[1].slot and seq.reused == len(PROMPTS[1])
    finally:
        engine.close()


@pytest.mark.network
def test_batched_streams_match_alone_over_a_worker(model_files, start_workers):  # noqa: F811
    workers = start_workers(1)
    engine = _open(model_files, [w.address for w in workers])
    try:
        alone = [_alone(engine, p) for p in PROMPTS]
        got, seqs, b = _batched(engine, PROMPTS, max_rows=8)
        assert _compare(alone, got, seqs) >= 3 * STEPS
        # a cancelled slot is released on the worker too, and the cluster keeps serving
        s = Sequence(PROMPTS[0], STEPS, Recorder())
        b.admit(s)
        b.step()
        b.cancel(s)
        got2, seqs2, _ = _batched(engine, PROMPTS[:2])
        assert _compare(alone[:2], got2, seqs2) >= STEPS
    finally:
        engine.close()


def test_memory_for_every_slot_is_checked_up_front():
    from dllama.engine import _check_memory, _context_bytes
    from dllama.errors import DllamaError
    from dllama.formats.random_model import preset_spec
    from dllama.model.partition import partition
    from dllama.net.memory import available_bytes

    have = available_bytes()
    if have is None:
        pytest.skip("the available memory cannot be read here")
    spec = preset_spec("llama3_2_1b", "q40")
    node = partition(spec, 1)[0]
    seq_len = have // _context_bytes(spec, node, 1) // 4   # one slot's cache: a quarter of what is there
    _check_memory(spec, node, seq_len, 1)
    with pytest.raises(DllamaError, match="--parallel"):
        _check_memory(spec, node, seq_len, 8)


def test_the_memory_estimate_grows_per_slot_by_what_a_slot_maps():
    """Each slot adds its K and V cache (what KVCache maps for it); rope tables and score rows are shared."""
    from dllama.engine import _context_bytes
    from dllama.formats.random_model import preset_spec
    from dllama.model.kvcache import KVCache
    from dllama.model.partition import partition

    spec = preset_spec("llama3_2_1b", "q40")
    node = partition(spec, 2)[1]
    seq_len, kv_dim = 256, len(node.kv_heads) * spec.head_dim
    maps = [len(KVCache(spec.n_layers, n, seq_len, kv_dim)._map) for n in (1, 4)]
    estimates = [_context_bytes(spec, node, seq_len, n) for n in (1, 4)]
    assert estimates[1] - estimates[0] == maps[1] - maps[0]
    assert estimates[0] > maps[0]   # and the shared scratch once
