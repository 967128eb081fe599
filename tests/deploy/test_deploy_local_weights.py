"""`dllama_worker_local_weights: true` for real on the namespace hosts: the root cuts the slices, the
controller fetches them, the worker receives only its own (same sha256 as the root's cut), its unit passes
`--weights`, a second run changes nothing, and a root then loads that worker without streaming it a byte
of weights. Restores the shared deploy (local weights off) at the end."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from . import nshosts, unit_runner
from .test_deploy_ansible import UNIT, VENV, again, probe_from_root, start_unit

pytestmark = [pytest.mark.deploy, pytest.mark.slow]

SLICE = "/opt/dllama/weights/node1-of-2.dlslice"

ROOT_SCRIPT = """
import json, sys
from dllama.formats.loader import load_model
from dllama.model.partition import partition
from dllama.net.auth import read_key_file
from dllama.net.root import connect_workers
loaded = load_model(sys.argv[1])
key = read_key_file(sys.argv[3]) if sys.argv[3] else None
log = []
coll = connect_workers([sys.argv[2]], loaded, partition(loaded.spec, 2), 64, "f32", key=key, log=log.append)
coll.close()
print(json.dumps(log))
"""


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_each_worker_gets_only_its_slice_and_loads_it(deployed):
    from dllama.formats.presets import preset_spec
    from dllama.formats.random_model import write_random_model

    hosts, inv = deployed
    root, worker = hosts.hosts
    model = os.path.join(hosts.workdir, "localw.m")
    spec = preset_spec("llama3_2_1b", "q40", dim=256, hidden_dim=512, n_layers=2, n_heads=8, n_kv_heads=4,
                       vocab_size=128, seq_len=64)
    write_random_model(model, spec, seed=9)
    cache = os.path.join(hosts.workdir, "slices")
    local = json.dumps({"dllama_worker_local_weights": True, "dllama_root_slice_cache": cache,
                        "dllama_root_model_files": [{"name": "localw.m", "src": model}]})
    try:
        r = again(hosts, inv, "deploy.yml", "-e", local)
        assert r.returncode == 0, r.stdout[-6000:]
        (key,) = os.listdir(cache)
        fetched = os.path.join(cache, key, "node1-of-2.dlslice")
        assert os.listdir(os.path.join(cache, key)) == ["node1-of-2.dlslice"]
        assert _sha256(root.path(f"/opt/dllama/slices/{key}/node1-of-2.dlslice")) == _sha256(fetched)
        assert _sha256(worker.path(SLICE)) == _sha256(fetched)
        assert os.listdir(worker.path("/opt/dllama/weights")) == ["node1-of-2.dlslice"]
        assert not os.path.exists(worker.path("/opt/dllama/models/localw.m"))
        svc = unit_runner.read_service(worker.path(UNIT))
        assert svc["ExecStart"].endswith(f" --weights {SLICE}"), svc["ExecStart"]

        r = again(hosts, inv, "deploy.yml", "-e", local)
        assert all(c["changed"] == 0 for c in nshosts.recap(r.stdout).values()), r.stdout[-6000:]

        start_unit(hosts, worker)
        probe_from_root(hosts, worker)
        key_file = "/etc/dllama/cluster.key" if nshosts.supports_cluster_key() else ""
        r = hosts.ssh(root, f"{VENV}/bin/python -c '{ROOT_SCRIPT}' /opt/dllama/models/localw.m "
                            f"{worker.cluster_ip}:9998 '{key_file}'")
        log = json.loads(r.stdout.strip().splitlines()[-1])
        assert f"worker {worker.cluster_ip}:9998: loads its local slice (node 1 of 2)" in log, log
        assert any(line.startswith("sent 0.0 MB of weights to 0 workers") for line in log), log
        worker_log = open(worker.path("/var/log/dllama-worker.log")).read()
        assert f"from {SLICE}" in worker_log, worker_log[-3000:]
    finally:
        hosts.ssh(worker, "kill $(cat /run/dllama-worker-runner.pid)", check=False)
        r = again(hosts, inv)
        assert r.returncode == 0, r.stdout[-6000:]
