"""bench/cost_model.py's bytes and round trips per token against what the socket collectives really send
and receive for one token's exchanges (root and workers over socket pairs)."""

import socket
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from dllama.model.collective import FULL_LOGITS, LOGITS_TOP
from dllama.model.partition import NodeSlice
from dllama.net.exchange import RootCollective, WorkerCollective
from dllama.net.transport import Connection

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import cost_model  # noqa: E402


@pytest.mark.parametrize("n_nodes", [2, 3])
@pytest.mark.parametrize("buffer,sampling", [("q80", "greedy"), ("q80", "top-p"), ("f32", "full")])
def test_bytes_per_token_are_what_the_collectives_move(n_nodes, buffer, sampling):
    dim, n_layers, vocab = 64, 3, 1536
    want = {"greedy": (LOGITS_TOP, 0.0, 1), "top-p": (LOGITS_TOP, 0.8, cost_model.TOP_K), "full": FULL_LOGITS}
    cols = vocab // n_nodes
    plan = [NodeSlice(i, n_nodes, range(0), range(0), range(0), range(i * cols, (i + 1) * cols))
            for i in range(n_nodes)]
    pairs = [socket.socketpair() for _ in range(1, n_nodes)]
    root = RootCollective([Connection(a, f"w{i}", 5.0) for i, (a, _) in enumerate(pairs, 1)], plan, dim, 1, buffer)
    rng = np.random.default_rng(0)

    def worker(i, conn):
        coll = WorkerCollective(conn, i, n_nodes, dim, 1, cols, buffer, i * cols)
        x = np.zeros((1, dim), np.float32)
        while coll.step() is not None:
            coll.broadcast(x)
            for _ in range(2 * n_layers):
                coll.all_reduce(x)
            coll.gather(rng.standard_normal((1, cols)).astype(np.float32))

    threads = [threading.Thread(target=worker, args=(i, Connection(b, "root", 5.0))) for i, (_, b) in
               enumerate(pairs, 1)]
    for t in threads:
        t.start()
    x = np.ones((1, dim), np.float32)
    root.step(1, np.zeros(1, np.int64), want[sampling])
    root.broadcast(x)
    for _ in range(2 * n_layers):
        root.all_reduce(x)
    root.gather(np.zeros((1, cols), np.float32), np.zeros((1, vocab), np.float32))
    sent, recv = root.sent_bytes, root.recv_bytes
    root.close()
    for t in threads:
        t.join(5)
    model = cost_model.per_token(dim, n_layers, vocab, n_nodes, buffer, sampling)
    assert (sent, recv) == (model["sent_bytes"], model["recv_bytes"])
    assert model["exchanges"] == 2 * n_layers + 1
    # two nodes swap partials (one way each), more send theirs to the root and wait for the sum
    assert model["trips"] == 2 + 2 * n_layers * (1 if n_nodes == 2 else 2)
