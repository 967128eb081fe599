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


def ansible_env() -> dict:
    return dict(os.environ, ANSIBLE_CONFIG=os.path.join(nshosts.REPO, "ansible.cfg"), ANSIBLE_NOCOLOR="1")


def test_playbooks_exist():
    names = {os.path.basename(p) for p in PLAYBOOKS}
    assert {"deploy.yml", "network.yml", "update.yml"} <= names


@pytest.mark.parametrize("playbook", PLAYBOOKS, ids=os.path.basename)
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
    r = subprocess.run([tool, "--offline", "--nocolor", "playbooks", "roles", "inventory"],
                       capture_output=True, text=True, cwd=nshosts.REPO, env=ansible_env(), timeout=300)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
