"""Sampling from the nodes' top candidates: the merge math against numpy's softmax over the whole
vocabulary, and the tokens against the sampler given the full logits (root and workers over socket pairs)."""

import socket
import threading

import numpy as np
import pytest

from dllama.candidates import top_k
from dllama.model.collective import FULL_LOGITS, LOGITS_TOP
from dllama.model.partition import NodeSlice
from dllama.net.exchange import RootCollective, WorkerCollective
from dllama.net.transport import Connection
from dllama.sampler import Sampler


def test_top_k_is_a_stable_descending_sort_prefix():
    rng = np.random.default_rng(3)
    x = rng.integers(-20, 20, size=1000).astype(np.float32)   # many ties
    ids, vals = np.empty(1000, np.int32), np.empty(1000, np.float32)
    for k in (1, 7, 64, 999, 1000, 5000):
        n = top_k(x, k, ids, vals)
        want = np.lexsort((np.arange(x.size), -x))[:k]   # value descending, index ascending
        assert n == min(k, x.size)
        assert np.array_equal(ids[:n], want) and np.array_equal(vals[:n], x[want])


class Cluster:
    """A root and n - 1 worker threads over socket pairs, each node holding a slice of `logits`."""

    def __init__(self, logits: np.ndarray, n_nodes: int):
        vocab = logits.size
        bounds = np.linspace(0, vocab, n_nodes + 1).astype(int)
        self.plan = [NodeSlice(i, n_nodes, range(0), range(0), range(0), range(bounds[i], bounds[i + 1]))
                     for i in range(n_nodes)]
        self.logits = logits
        pairs = [socket.socketpair() for _ in range(1, n_nodes)]
        self.root = RootCollective([Connection(a, f"worker {i}", 5.0) for i, (a, _) in enumerate(pairs, 1)],
                                   self.plan, 32, 1, "f32")
        self.threads = [threading.Thread(target=self._worker, args=(i, Connection(b, "root", 5.0)), daemon=True)
                        for i, (_, b) in enumerate(pairs, 1)]
        for t in self.threads:
            t.start()
        self.out = np.zeros((1, vocab), np.float32)

    def _worker(self, i, conn):
        node = self.plan[i]
        coll = WorkerCollective(conn, i, len(self.plan), 32, 1, len(node.vocab), "f32", node.vocab.start)
        part = self.logits[node.vocab.start:node.vocab.stop][None, :].copy()
        while coll.step() is not None:
            coll.gather(part)

    def output(self, want: tuple):
        """What the root's forward pass returns for one step asking for `want`."""
        self.root.step(1, np.zeros(1, np.int64), want)
        own = self.plan[0].vocab
        got = self.root.gather(self.logits[own.start:own.stop][None, :].copy(), self.out)
        return self.out[0] if got is None else got

    def close(self):
        self.root.close()
        for t in self.threads:
            t.join(5)


def _softmax(logits, temperature):
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    return p / p.sum()


@pytest.mark.parametrize("n_nodes", [2, 3])
def test_merged_probabilities_are_numpys_softmax(n_nodes):
    rng = np.random.default_rng(n_nodes)
    logits = (rng.standard_normal(3000) * 3).astype(np.float32)
    cluster = Cluster(logits, n_nodes)
    try:
        cands = cluster.output((LOGITS_TOP, 0.7, 64))
    finally:
        cluster.close()
    p_ref = _softmax(logits, 0.7)
    sent = [node.vocab.start + np.lexsort((np.arange(len(node.vocab)), -logits[node.vocab.start:node.vocab.stop]))[:64]
            for node in cluster.plan]
    assert np.array_equal(cands.ids, np.concatenate(sent))
    nucleus = cands.nucleus(0.5)
    assert nucleus is not None
    ids, p = nucleus
    np.testing.assert_allclose(p, p_ref[ids], rtol=1e-13)
    order = np.lexsort((np.arange(3000), -p_ref))   # the whole vocabulary, most probable first
    last = int(np.searchsorted(np.cumsum(p_ref[order]), 0.5)) + 1
    assert np.array_equal(ids, order[:last])


def test_candidates_that_do_not_reach_top_p_fall_back_to_the_full_logits():
    logits = np.zeros(4000, np.float32)   # flat: a 0.9 nucleus needs 3600 tokens, 2 x 64 were sent
    logits[:3] = [1.0, 2.0, 3.0]
    cluster = Cluster(logits, 2)
    try:
        cands = cluster.output((LOGITS_TOP, 1.0, 64))
        assert cands.nucleus(0.9) is None
        full = cands.full()
        assert np.array_equal(full, logits) and cluster.root.top_fallbacks == 1
        # the workers serve the next step as usual after a fall-back
        assert np.array_equal(cluster.output(FULL_LOGITS), logits)
    finally:
        cluster.close()


def test_the_fall_back_fetch_keeps_the_pinger_off_the_sockets():
    """The fetch comes after the pass has ended; a pinger that looked meanwhile would take the workers'
    logits on a readable socket for a close. So the fetch is marked as in a pass, and ends it again."""
    logits = np.zeros(4000, np.float32)
    logits[:3] = [1.0, 2.0, 3.0]
    cluster = Cluster(logits, 2)
    root, seen = cluster.root, []
    collect = root._collect

    def watched(*args):
        seen.append(root.in_pass)
        return collect(*args)

    try:
        cands = cluster.output((LOGITS_TOP, 1.0, 64))
        assert not root.in_pass
        root._collect = watched
        ended = root.last_io
        assert np.array_equal(cands.full(), logits)
        assert seen == [True] and not root.in_pass and root.last_io >= ended
    finally:
        cluster.close()


@pytest.mark.parametrize("temperature,topp", [(0.0, 0.9), (0.5, 0.9), (1.0, 0.95), (0.8, 0.3), (1.0, 1.0)])
def test_same_tokens_as_the_sampler_given_the_full_logits(temperature, topp):
    rng = np.random.default_rng(11)
    a, b = Sampler(temperature, topp, seed=5), Sampler(temperature, topp, seed=5)
    fallbacks = 0
    for n_nodes in (2, 3):
        for step in range(40):
            # peaked and flat rows, and exact ties between nodes for greedy's tie rule
            logits = (rng.standard_normal(900) * (6 if step % 2 else 0.3)).astype(np.float32)
            if step % 5 == 0:
                logits[[100, 700]] = logits.max() + 1
            cluster = Cluster(logits, n_nodes)
            try:
                got = a(cluster.output(a.wants()))
            finally:
                cluster.close()
            fallbacks += cluster.root.top_fallbacks
            assert got == b(logits.copy())
    if 0 < temperature and topp < 1:   # both ways were taken: decided by the candidates, and fetched
        assert 0 < fallbacks < 80
    else:
        assert fallbacks == 0
