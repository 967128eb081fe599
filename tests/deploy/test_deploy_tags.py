"""Tags select parts of the playbooks: what `ansible-playbook --list-tasks --tags T` lists, as Ansible
itself evaluates the tags (inherited from roles, imports and include_role). A tag run for real is in
test_deploy_networkd.py (`deploy.yml --tags network`) and test_deploy_systemd.py (`--tags firewall`)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from . import nshosts
from .nshosts import require

pytestmark = pytest.mark.slow

COMPONENTS = {"preflight", "install", "node", "network", "worker", "root"}
INVENTORY = os.path.join(nshosts.REPO, "inventory", "example-raspberrypi.yml")


def listed(playbook: str, *args: str) -> list[tuple[str, str, set[str]]]:
    """(play, task, tags) for every task `--list-tasks` prints; argument checks (Ansible tags them
    always) left out."""
    tool = nshosts.ansible_tool("ansible-playbook")
    require(tool is not None, "ansible-playbook is not installed")
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(nshosts.REPO, "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    r = subprocess.run([tool, "-i", INVENTORY, playbook, "--list-tasks", *args], capture_output=True, text=True,
                       cwd=nshosts.REPO, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out, play = [], ""
    for line in r.stdout.splitlines():
        m = re.match(r"\s+play #\d+ \((.*?)\): (.*?)\tTAGS:", line)
        if m:
            play = m.group(2)
            continue
        m = re.match(r"\s+(.*?)\tTAGS: \[(.*)\]$", line)
        if m and "Validating arguments against arg spec" not in m.group(1):
            out.append((play, m.group(1), {t.strip() for t in m.group(2).split(",") if t.strip()}))
    return out


def roles(tasks) -> set[str]:
    prefix = nshosts.COLLECTION + "."
    return {name.split(" : ")[0].removeprefix(prefix) for _, name, _ in tasks if " : " in name}


@pytest.mark.parametrize("playbook", ["deploy.yml", "network.yml", "update.yml"])
def test_every_task_has_a_part(playbook):
    """No task that only a full run reaches: each carries one of the component tags."""
    tasks = listed(playbook)
    assert tasks
    untagged = [(play, name) for play, name, tags in tasks if not tags & COMPONENTS]
    assert not untagged, untagged


@pytest.mark.parametrize("tag, expected", [
    ("network", {"preflight", "static_ip"}),
    ("install", {"preflight", "common", "dllama"}),
    ("node", {"preflight", "dllama_node"}),
    ("worker", {"preflight", "dllama_worker"}),
    ("root", {"preflight", "dllama_root"}),
    ("preflight", {"preflight", "common", "static_ip", "dllama", "dllama_worker", "dllama_root"}),
])
def test_a_part_runs_its_roles_and_the_checks(tag, expected):
    tasks = listed("deploy.yml", "--tags", tag)
    assert roles(tasks) == expected, tasks
    # Apart from the inventory checks (always), everything listed answers to the tag.
    assert all(tag in tags or "always" in tags for _, _, tags in tasks), tasks
    if tag == "preflight":
        assert all(name.split(" : ")[-1].startswith(("Check", "Look", "Ask", "Decide", "Find", "List", "Note",
                                                      "Describe", "Read", "Measure", "Warn", "Record", "Fail"))
                   for _, name, _ in tasks), tasks


@pytest.mark.parametrize("tag", ["keys", "security", "firewall"])
def test_cross_cutting_tags_reach_the_services_keys_and_firewall(tag):
    tasks = listed("deploy.yml", "--tags", tag)
    setup = [(name, tags) for play, name, tags in tasks if play == "Set up the cluster's nodes"]
    # The shared role comes in through include_role from each service role; --list-tasks shows the include.
    includes = {name for name, _ in setup if name.startswith("Keys, hardening and firewall")}
    assert includes == {"Keys, hardening and firewall of the worker service",
                        "Keys, hardening and firewall of the API service"}, setup
    assert all(tag in tags for _, tags in setup), setup
    restarts = {name for name, _ in setup if " : Restart the running" in name}
    assert bool(restarts) == (tag != "firewall"), setup


def test_update_parts():
    assert roles(listed("update.yml", "--tags", "worker")) == {"preflight", "dllama_worker"}
    assert roles(listed("update.yml", "--tags", "install")) == {"preflight", "dllama"}
