"""docs/deploy.md followed as written, on four fresh namespace hosts: its example inventory (the file it
tells you to copy, and the model files its step 4 lists), unmodified but for the addresses, the SSH
connection and where the model files are on the controller; `ansible-playbook deploy.yml`, then
`dllama cluster up` generating text over 1 root + 3 workers, then `dllama cluster down`.

The model is SmolLM2-135M converted as it is: its 3 KV heads split over 4 nodes, some nodes sharing a head;
its greedy continuation must be llama.cpp's (tests/data/smollm2_greedy.json).
Parsing the doc (not a copy of its inventory) makes the test fail when the doc drifts from what works.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

import pytest
import yaml

import testlib

from . import nshosts
from .nshosts import model_file, require

pytestmark = [pytest.mark.deploy, pytest.mark.slow]

DOC = os.path.join(nshosts.REPO, "docs", "deploy.md")
CASE, STEPS = "counting", 8   # llama.cpp's top-1 leads by 1.7 or more at every step: no near-tie to part on


def docs_inventory() -> tuple[str, dict, dict]:
    """(the inventory file docs/deploy.md says to copy, that file's content, the step 4 model variables)."""
    with open(DOC) as f:
        doc = f.read()
    copied = re.search(r"^cp (inventory/\S+\.yml) inventory/hosts\.yml", doc, re.M)
    assert copied, "docs/deploy.md no longer says which example inventory to copy"
    with open(os.path.join(nshosts.REPO, copied.group(1))) as f:
        inventory = yaml.safe_load(f)
    blocks = [yaml.safe_load(b) for b in re.findall(r"^```yaml\n(.*?)^```", doc, re.M | re.S)]
    model = [b for b in blocks if isinstance(b, dict) and "dllama_root_model_files" in b]
    assert len(model) == 1, "docs/deploy.md step 4 no longer lists the model files in one YAML block"
    return copied.group(1), inventory, model[0]


def localize(inventory: dict, model_vars: dict, hosts: nshosts.TestHosts, sources: dict[str, str]) -> dict:
    """The doc's inventory with the namespace hosts' addresses and SSH connection, and step 4's model
    files taken from `sources` (by file suffix) on this controller. Nothing else is changed."""
    groups = inventory["all"]["children"]
    names = list(groups["dllama_root"]["hosts"]) + list(groups["dllama_workers"]["hosts"])
    assert len(names) == len(hosts.hosts), f"the doc's inventory has {len(names)} hosts: {names}"
    for group in ("dllama_root", "dllama_workers"):
        for name, entry in groups[group]["hosts"].items():
            host = hosts.hosts[names.index(name)]
            assert {"ansible_host", "dllama_address"} <= set(entry), (name, entry)
            entry.update(ansible_host=host.mgmt_ip, dllama_address=host.cluster_ip)
    files = [dict(f, src=sources[os.path.splitext(f["name"])[1]]) for f in model_vars["dllama_root_model_files"]]
    inventory["all"]["vars"].update(
        model_vars, dllama_root_model_files=files,
        # The hosts take root's key, without sudo, and have /usr/bin/python3.
        ansible_user="root", ansible_become=False, ansible_ssh_private_key_file=hosts.key,
        ansible_python_interpreter="/usr/bin/python3")
    return inventory


@pytest.fixture(scope="module")
def docs_cluster(tmp_path_factory):
    """(hosts, inventory path) after deploy.yml from the doc's inventory onto 4 fresh hosts."""
    missing = nshosts.missing_prerequisites()
    require(not missing, "namespace test hosts need " + ", ".join(missing))
    require(nshosts.ansible_tool("ansible-playbook") is not None, "ansible-playbook is not installed")
    from dllama.formats.convert import convert

    tmp = tmp_path_factory.mktemp("docs-example")
    # as the doc's user has it: 3 KV heads on 4 nodes, the nodes sharing heads
    converted = str(tmp / "smollm2_135m.m")
    convert(model_file(), converted)
    example, inventory, model_vars = docs_inventory()
    # Another prefix than the session's hosts (tests/deploy/conftest.py), which may still be up.
    hosts = nshosts.TestHosts(n_hosts=4, single_interface=True, prefix=f"dld{os.getpid() % 100000}")
    try:
        hosts.start()
        # Beside a copy of the repository's group_vars, as inventory/hosts.yml is.
        invdir = os.path.join(hosts.workdir, "inventory")
        shutil.copytree(os.path.join(os.path.dirname(os.path.join(nshosts.REPO, example)), "group_vars"),
                        os.path.join(invdir, "group_vars"))
        inv = os.path.join(invdir, "hosts.yml")
        with open(inv, "w") as f:
            yaml.safe_dump(localize(inventory, model_vars, hosts, {".m": converted, ".t": model_file()}), f)
        r = nshosts.run_playbook(hosts, "deploy.yml", inv)
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
        yield hosts, inv
    finally:
        hosts.stop()


def dllama_cluster(hosts, action, inv, *args, timeout=600):
    return hosts.in_controller([sys.executable, "-m", "dllama", "cluster", action, "-i", inv, *args],
                               check=False, timeout=timeout)


def test_docs_example_inventory_deploys_four_nodes_that_generate_text(docs_cluster):
    hosts, inv = docs_cluster
    ref = next(c for c in testlib.reference()["completions"] if c["name"] == CASE)
    r = dllama_cluster(hosts, "up", inv, "--run", "inference", "--", "--prompt", ref["prompt"],
                       "--steps", str(STEPS), "--temperature", "0", "--json")
    try:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["prompt_ids"] == ref["prompt_ids"]
        assert out["generated_ids"] == ref["generated_ids"][:STEPS], (out["text"], ref["generated_text"])
        assert out["sent_bytes_per_token"] > 0
        for name in ("raspberrypi2", "raspberrypi3", "raspberrypi4"):
            assert f"{name}: ready" in r.stderr, r.stderr[-3000:]
        status = dllama_cluster(hosts, "status", inv)
        assert status.returncode == 0, status.stdout + status.stderr
    finally:
        down = dllama_cluster(hosts, "down", inv)
    assert down.returncode == 0, down.stdout + down.stderr
    for host in hosts.hosts[1:]:
        assert "dllama worker" not in hosts.ssh(host, "ps -eo args").stdout
