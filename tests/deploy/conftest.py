"""Fixtures for the deployment tests: namespace test hosts, shared by the Ansible and cluster tests."""

from __future__ import annotations

import os
import time

import pytest

from . import nshosts
from .nshosts import model_file, require


@pytest.fixture(scope="session")
def ns_hosts():
    """Two SSH test hosts in network namespaces, each with a single interface that carries both the
    management address Ansible connects through and the cluster address; torn down at the end of the
    session, also on failure."""
    missing = nshosts.missing_prerequisites()
    require(not missing, "namespace test hosts need " + ", ".join(missing))
    hosts = nshosts.TestHosts(n_hosts=2, single_interface=True)
    try:
        hosts.start()
        yield hosts
    finally:
        hosts.stop()


@pytest.fixture(scope="session")
def deployed(ns_hosts):
    """The hosts after one full deploy; yields (hosts, inventory path)."""
    require(nshosts.ansible_tool("ansible-playbook") is not None, "ansible-playbook is not installed")
    model = model_file()
    inv = ns_hosts.inventory(os.path.join(ns_hosts.workdir, "inventory.yml"), extra_vars={
        "dllama_root_model_files": [{"name": os.path.basename(model), "src": model,
                                     "size": os.path.getsize(model)}],
        "dllama_cluster_key": nshosts.supports_cluster_key(),
    })
    t0 = time.monotonic()
    r = nshosts.run_playbook(ns_hosts, "deploy.yml", inv)
    print(f"first deploy took {time.monotonic() - t0:.0f} s")
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    yield ns_hosts, inv


