"""Sizing the shares: --split parsing, planning by speed within memory, the calibration's figure."""

from __future__ import annotations

import math

import pytest

from dllama.errors import DllamaError
from dllama.formats.spec import ModelSpec
from dllama.model.split import AUTO, calibrate, describe, parse_split, plan_by_speed
from dllama.net.limits import slice_bytes

SMOLLM2 = ModelSpec(dim=576, hidden_dim=1536, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                    vocab_size=49152, seq_len=8192)
NAMES = ["root", "a:9998", "b:9998"]


def test_parse_split():
    assert parse_split(None, 3) is None and parse_split("auto", 3) == AUTO
    assert parse_split("3,1,1", 3) == [3.0, 1.0, 1.0]
    assert parse_split("0.5,2", 2) == [0.5, 2.0]
    for text, what in (("3,1", r"2 weights for 3 nodes \(the root and 2 workers\)"), ("3,x,1", "expected 'auto'"),
                       ("3,0,1", "positive"), ("3,-1,1", "positive"), ("3,nan,1", "positive"), ("fast", "expected")):
        with pytest.raises(DllamaError, match=what):
            parse_split(text, 3)


def _need(node):
    return slice_bytes(SMOLLM2, node, 1024, 32)


def test_plan_follows_speed_where_memory_allows():
    plan = plan_by_speed(SMOLLM2, [3e9, 1e9, 1e9], [None, None, None], _need, NAMES)
    assert [len(n.ffn) for n in plan] == [928, 288, 320]
    # node 1 holds too little memory for a 3/5 share: its weight drops until its slice fits
    even = plan_by_speed(SMOLLM2, [1e9, 3e9, 1e9], [None, None, None], _need, NAMES)
    cap = int(0.8 * _need(even[1]))
    plan = plan_by_speed(SMOLLM2, [1e9, 3e9, 1e9], [None, cap, None], _need, NAMES)
    assert _need(plan[1]) <= cap < _need(even[1])
    assert len(plan[0].ffn) > len(even[0].ffn) and len(plan[2].ffn) > len(even[2].ffn)


def test_plan_refused_naming_the_node_and_its_shortfall():
    smallest = _need(plan_by_speed(SMOLLM2, [1, 1e6, 1e6], [None] * 3, _need, NAMES)[0])
    with pytest.raises(DllamaError, match=r"node 2 \(b:9998\) needs \d+ MB for its share, has 1 MB: short by \d+ MB"):
        plan_by_speed(SMOLLM2, [1e9, 1e9, 1e9], [None, None, 10**6], _need, NAMES)
    assert smallest > 10**6


def test_describe_names_each_share_and_expected_time():
    plan = plan_by_speed(SMOLLM2, [3e9, 1e9, 1e9], [None] * 3, _need, NAMES)
    lines = describe(SMOLLM2, plan, NAMES, [3e9, 1e9, 1e9])
    assert lines[0].startswith("node 0 root: heads 5/9, ffn 928/1536 (60%), vocab ")
    assert "measured 3.00 Gvalues/s" in lines[0] and "ms/token" in lines[2]


def test_a_reconnect_keeps_the_plan_in_force_within_the_tolerance():
    """Re-measured speeds: the plan in force stands while it is within 10% of the best expected time per
    token and fits; a node that slowed down a lot, or came back with less memory, gets a new plan."""
    from dllama.model.split import AutoPlanner, expected_s

    said = []
    planner = AutoPlanner(SMOLLM2, 1024, 32, NAMES, said.append)
    planner.own = (3e9, None)
    first = planner([(1e9, None), (1e9, None)])
    planner.current = first
    # a few percent slower worker: the same plan, said so
    assert planner([(0.95e9, None), (1e9, None)]) is first
    assert said[-1].startswith("re-measured: keeping the plan in force (")
    # node 1 at a third of its speed: the old plan would be far slower than a new one
    said.clear()
    slow = [(1 / 3 * 1e9, None), (1e9, None)]
    new = planner(slow)
    assert new != first and len(new[1].ffn) < len(first[1].ffn)
    speeds = [3e9, 1 / 3 * 1e9, 1e9]
    assert expected_s(SMOLLM2, first, speeds) > 1.1 * expected_s(SMOLLM2, new, speeds)
    assert said[0].startswith("re-measured: the plan in force would take ") and "split by measured speed:" in said
    # same speeds, but node 2 returns with less memory than its slice in force needs
    said.clear()
    new = planner([(1e9, None), (1e9, int(0.8 * _need(first[2])) * 10 // 9)])
    assert _need(new[2]) < _need(first[2])
    assert said[0] == "re-measured: the plan in force no longer fits every node's memory; re-planning"


def test_calibration_is_a_positive_speed_and_refuses_odd_shapes():
    speed = calibrate("q40", 576, seconds=0.01)
    assert math.isfinite(speed) and speed > 0
    with pytest.raises(DllamaError, match="cannot calibrate"):
        calibrate("q40", 100)


def test_check_model_is_what_cluster_and_roles_run_on_the_root(tmp_path, capsys):
    from dllama.formats.random_model import preset_spec, write_random_model
    from dllama.model.split import check_model

    path = tmp_path / "m.m"
    write_random_model(str(path), preset_spec("llama3_2_1b", "q40", dim=128, hidden_dim=256, n_layers=1,
                                              n_heads=8, n_kv_heads=2, vocab_size=64, seq_len=16), seed=1)
    assert check_model([str(path), "3", "2,1,1"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("node 0 root: heads 4/8, ffn 128/256")
    assert check_model([str(path), "9"]) == 3
    assert "cannot be split over 9 nodes" in capsys.readouterr().out
    assert check_model([str(path), "3", "1,1"]) == 3
    assert "2 weights for 3 nodes" in capsys.readouterr().out


@pytest.mark.parametrize("forge", [None, "speed", "mac"])
def test_root_takes_only_reports_the_worker_holding_the_key_made(forge):
    """A calibration report is under the cluster key: a worker's figures changed on the way (or made up
    without the key) are refused, not planned on."""
    import socket
    import threading

    from dllama.net import auth
    from dllama.net import protocol as P
    from dllama.net.root import _handshake
    from dllama.net.transport import Connection

    key = b"k" * 32
    a, b = socket.socketpair()
    root, worker = Connection(a, "worker w", 5), Connection(b, "root r", 5)

    def fake_worker():
        hello = worker.expect(P.Hello)
        assert (hello.calibrate, hello.calibrate_cols) == ("q40", 576)
        mine = auth.nonce()
        worker.send(P.Challenge(mine, auth.worker_proof(key, hello, mine)))
        worker.expect(P.Auth)
        speed, free = 2e9, 8 << 30
        mac = auth.report_mac(key if forge != "mac" else b"guess", hello, mine, speed, free)
        worker.send(P.HelloAck(P.PROTOCOL_VERSION, 20e9 if forge == "speed" else speed, free, mac))

    t = threading.Thread(target=fake_worker, daemon=True)
    t.start()
    try:
        if forge is None:
            assert _handshake(root, 1, 2, key, ("q40", 576)) == (None, (2e9, 8 << 30), b"")   # no local slice
        else:
            with pytest.raises(DllamaError, match="worker w: its calibration report fails authentication"):
                _handshake(root, 1, 2, key, ("q40", 576))
    finally:
        t.join(5)
        root.close()
        worker.close()
