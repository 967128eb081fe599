"""The Ansible content passes ansible-lint (offline, production profile) and every playbook's syntax check."""

from __future__ import annotations

import glob
import os
import subprocess

import pytest

from . import nshosts
from .nshosts import require

pytestmark = pytest.mark.slow

PLAYBOOKS = sorted(glob.glob(os.path.join(nshosts.REPO, "playbooks", "*.yml")))
ROOT_PLAYBOOKS = [os.path.join(nshosts.REPO, f"{name}.yml") for name in ("deploy", "network", "update")]


def ansible_env() -> dict:
    return dict(os.environ, ANSIBLE_CONFIG=os.path.join(nshosts.REPO, "ansible.cfg"), ANSIBLE_NOCOLOR="1")


def test_playbooks_exist():
    names = {os.path.basename(p) for p in PLAYBOOKS}
    assert {"deploy.yml", "network.yml", "update.yml"} <= names
    assert all(os.path.isfile(p) for p in ROOT_PLAYBOOKS)


@pytest.mark.parametrize("playbook", PLAYBOOKS + ROOT_PLAYBOOKS, ids=lambda p: os.path.relpath(p, nshosts.REPO))
def test_syntax_check(playbook):
    tool = nshosts.ansible_tool("ansible-playbook")
    require(tool is not None, "ansible-playbook is not installed")
    inv = os.path.join(nshosts.REPO, "inventory", "example-raspberrypi.yml")
    r = subprocess.run([tool, "--syntax-check", "-i", inv, playbook], capture_output=True, text=True,
                       cwd=nshosts.REPO, env=ansible_env(), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ansible_lint_is_clean():
    tool = nshosts.ansible_tool("ansible-lint")
    require(tool is not None, "ansible-lint is not installed")
    paths = ["playbooks", os.path.relpath(nshosts.ROLES, nshosts.REPO), "inventory",
             *(os.path.basename(p) for p in ROOT_PLAYBOOKS)]
    r = subprocess.run([tool, "--offline", "--nocolor", *paths],
                       capture_output=True, text=True, cwd=nshosts.REPO, env=ansible_env(), timeout=300)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]


@pytest.mark.parametrize("playbook", ["deploy.yml", "update.yml"])
def test_run_without_inventory_fails_with_one_message(playbook, tmp_path):
    """`ansible-playbook deploy.yml` typed at the root with no inventory must not succeed doing nothing."""
    tool = nshosts.ansible_tool("ansible-playbook")
    require(tool is not None, "ansible-playbook is not installed")
    # A missing file stands for "no inventory" (and keeps a developer's own inventory/hosts.yml out of it).
    env = dict(ansible_env(), ANSIBLE_INVENTORY=str(tmp_path / "none.yml"), ANSIBLE_LOCAL_TEMP=str(tmp_path / "tmp"))
    r = subprocess.run([tool, playbook], capture_output=True, text=True, cwd=nshosts.REPO, env=env, timeout=120)
    assert r.returncode != 0, r.stdout
    out = " ".join(r.stdout.split())
    assert "the inventory has no host in group dllama_root" in out and "-i" in out, r.stdout[-3000:]
    assert "PLAY [Validate the inventory]" not in r.stdout
