"""The services' command lines as the roles render them, parsed by dllama's own command line: a flag the
template passes that the CLI does not know (or a value it refuses) fails here, without a host. Each case is
one `ansible-playbook` run on the controller alone (connection local: no host, no network)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

from dllama import cli

from . import nshosts
from .nshosts import require

pytestmark = pytest.mark.slow

ROLES = os.path.join(nshosts.REPO, "collections", "ansible_collections", "dllama", "cluster", "roles")
UNITS = {"worker": ("dllama_worker", "dllama-worker.service.j2"), "api": ("dllama_root", "dllama-api.service.j2")}
PLAY = """
- hosts: localhost
  gather_facts: false
  vars_files: {defaults}
  tasks:
    - ansible.builtin.template:
        src: {template}
        dest: {dest}
        mode: "0644"
"""


def render(tmp_path, unit: str, **extra) -> list[str]:
    """The unit's ExecStart as argv, rendered with the roles' defaults (and `extra`)."""
    tool = nshosts.ansible_tool("ansible-playbook")
    require(tool is not None, "ansible-playbook is not installed")
    role, template = UNITS[unit]
    defaults = [os.path.join(ROLES, r, "defaults", "main.yml") for r in ("dllama", "dllama_cluster", role)]
    dest = tmp_path / f"{unit}.service"
    play = tmp_path / "render.yml"
    play.write_text(PLAY.format(defaults=defaults, template=os.path.join(ROLES, role, "templates", template),
                                dest=dest))
    args = [tool, "-i", "localhost,", "-c", "local", "-e", f"ansible_python_interpreter={sys.executable}", str(play)]
    for key, value in extra.items():
        args += ["-e", f"{key}={value}"]
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(nshosts.REPO, "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"))
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    line = next(x for x in dest.read_text().splitlines() if x.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart="))


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_a_dedicated_host_spins_and_a_shared_one_can_say_no(unit, tmp_path):
    argv = render(tmp_path, unit)
    parser = cli.build_parser() if unit == "worker" else cli.build_api_parser()
    args = parser.parse_args(argv[1:])
    assert args.spin_us == "2000"
    shared = render(tmp_path, unit, **{f"dllama_{'worker' if unit == 'worker' else 'root'}_spin_us": 0})
    assert shared[shared.index("--spin-us") + 1] == "0"
