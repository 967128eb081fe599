"""The cluster described by an Ansible inventory: one root, workers in inventory order.

Read through `ansible-inventory --list` when Ansible is installed (YAML or INI, group_vars, host_vars),
otherwise straight from a YAML inventory. The variables are the roles' (docs/deploy.md). What the
inventory leaves unset, or sets to a Jinja expression (not evaluated here), is taken from the nodes once
they are reached (`resolve`): the settings role dllama_root recorded on the root, and each node's CPU count
for the threads, the roles' own default.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field

from dllama.errors import DllamaError

ROOT_GROUP, WORKER_GROUP = "dllama_root", "dllama_workers"


# `dllama worker`'s own default, as in the reference's docs; the roles use the same.
DEFAULT_WORKER_PORT = 9998

@dataclass
class Node:
    name: str
    address: str                 # on the cluster network: what the root connects to
    ssh_host: str                # what SSH connects to (ansible_host)
    ssh_user: str | None = None
    ssh_port: int = 22
    ssh_key: str | None = None
    local: bool = False          # ansible_connection: local -> run on this machine, no SSH
    port: int = DEFAULT_WORKER_PORT
    bind: str = "0.0.0.0"        # the address the worker listens on (dllama_worker_host)
    threads: int | None = None   # None: the node's CPU count
    spin_us: int | None = None   # dllama_worker_spin_us (the root: dllama_root_spin_us); None: nodes.spin_us
    install_dir: str = "/opt/dllama"
    venv: str = ""
    numba_cache_dir: str = ""
    service: str = "dllama-worker"
    cluster_key: bool = True     # pass the cluster key file when the node has it
    cluster_key_file: str = "/etc/dllama/cluster.key"
    state_dir: str = "~/.dllama"  # pid and log files of detached processes
    weights: str = ""            # the worker's slice file (dllama_worker_local_weights), else ""
    vars: dict = field(default_factory=dict, repr=False)

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.port}"


# What the root runs when neither the inventory nor the root's recorded settings say (the roles' defaults).
ROOT_DEFAULTS = {"model": "", "tokenizer": "", "buffer_float_type": "q80", "max_seq_len": None,
                 "api_host": "0.0.0.0", "api_port": 9990, "api_service": "dllama-api"}


@dataclass
class Cluster:
    root: Node
    workers: list[Node]
    # None: not in the inventory; `resolve` fills it from the root's settings, then ROOT_DEFAULTS.
    model: str | None = None
    tokenizer: str | None = None
    root_threads: int | None = None
    buffer_float_type: str | None = None
    max_seq_len: int | None = None
    api_host: str | None = None
    api_port: int | None = None
    api_service: str | None = None

    @property
    def nodes(self) -> list[Node]:
        return [self.root, *self.workers]


def literal(v: dict, name: str):
    """The inventory's value of `name`, None when unset or a Jinja expression Ansible would evaluate."""
    value = v.get(name)
    return None if value is None or (isinstance(value, str) and "{{" in value) else value


def _int(value, name: str, host: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DllamaError(f"{name} of {host} is {value!r}, not a number") from None


def make_node(name: str, v: dict) -> Node:
    install_dir = v.get("dllama_install_dir", "/opt/dllama")
    local = v.get("ansible_connection") == "local"
    address = v.get("dllama_address") or ("127.0.0.1" if local else None)
    if not address:
        raise DllamaError(f"dllama_address is not set for {name}")
    port = _int(v.get("dllama_worker_port", DEFAULT_WORKER_PORT), "dllama_worker_port", name)
    if not 0 < port < 65536:
        raise DllamaError(f"dllama_worker_port of {name} is {port}, not a port in 1-65535")
    return Node(
        name=name, address=str(address), ssh_host=str(v.get("ansible_host", name)),
        ssh_user=v.get("ansible_user"), ssh_port=_int(v.get("ansible_port", 22), "ansible_port", name),
        ssh_key=v.get("ansible_ssh_private_key_file") or v.get("ansible_private_key_file"), local=local,
        port=port, bind=str(v.get("dllama_worker_host", "0.0.0.0")),
        threads=_opt_int(v, "dllama_worker_threads", name),
        spin_us=_opt_int(v, "dllama_worker_spin_us", name),
        install_dir=install_dir, venv=v.get("dllama_venv", f"{install_dir}/venv"),
        numba_cache_dir=v.get("dllama_numba_cache_dir", f"{install_dir}/numba-cache"),
        service=v.get("dllama_worker_service", "dllama-worker"),
        cluster_key=str(v.get("dllama_cluster_key", True)).lower() not in ("false", "no", "0"),
        cluster_key_file=literal(v, "dllama_cluster_key_file") or "/etc/dllama/cluster.key",
        state_dir=v.get("dllama_cluster_state_dir", "~/.dllama"), vars=v,
    )


def make_cluster(groups: dict[str, list[str]], hostvars: dict[str, dict], source: str) -> Cluster:
    roots = groups.get(ROOT_GROUP, [])
    if len(roots) != 1:
        raise DllamaError(f"{source}: group {ROOT_GROUP} must hold exactly one host, it holds {len(roots)}")
    root = make_node(roots[0], hostvars.get(roots[0], {}))
    workers = [make_node(h, hostvars.get(h, {})) for h in groups.get(WORKER_GROUP, [])]
    seen: dict[tuple, str] = {}
    for n in [root, *workers]:
        key = (n.address, n.port)
        if key in seen and n is not root:
            raise DllamaError(f"dllama_address {n.address} port {n.port} is set for both {seen[key]} and {n.name}")
        seen[key] = n.name
    for i, w in enumerate(workers, start=1):
        if str(w.vars.get("dllama_worker_local_weights", False)).lower() in ("true", "yes", "1"):
            # the roles' default path: node<I>-of-<N>.dlslice, I the worker's place in the group
            folder = literal(w.vars, "dllama_worker_weights_dir") or f"{w.install_dir}/weights"
            w.weights = (literal(w.vars, "dllama_worker_weights_file")
                         or f"{folder}/node{i}-of-{len(workers) + 1}.dlslice")
    rv = hostvars.get(roots[0], {})
    root.spin_us = _opt_int(rv, "dllama_root_spin_us", root.name)
    return Cluster(
        root=root, workers=workers, model=literal(rv, "dllama_root_model"),
        tokenizer=literal(rv, "dllama_root_tokenizer"),
        root_threads=_opt_int(rv, "dllama_root_threads", root.name),
        buffer_float_type=literal(rv, "dllama_root_buffer_float_type"),
        max_seq_len=_opt_int(rv, "dllama_root_max_seq_len", root.name),
        api_host=literal(rv, "dllama_root_api_host"),
        api_port=_opt_int(rv, "dllama_root_api_port", root.name),
        api_service=literal(rv, "dllama_root_api_service"),
    )


def _opt_int(v: dict, name: str, host: str) -> int | None:
    value = literal(v, name)
    return None if value is None else _int(value, name, host)


def resolve(c: Cluster, recorded: dict, cpus: dict[str, int | None]) -> None:
    """Fill what the inventory left unset: from the root's recorded settings (role dllama_root's
    root.json), then the roles' defaults; threads from each node's CPU count (`cpus`, by node name)."""
    for attr, default in ROOT_DEFAULTS.items():
        if getattr(c, attr) is None:
            value = recorded.get(attr)
            setattr(c, attr, value if value not in (None, "") else default)
    if c.root_threads is None:
        c.root_threads = int(recorded.get("threads") or cpus.get(c.root.name) or 1)
    for w in c.workers:
        if w.threads is None:
            w.threads = cpus.get(w.name) or 1


def read_inventory(path: str) -> Cluster:
    """The cluster an inventory file describes. Raises DllamaError naming the file or variable."""
    if not os.path.exists(path):
        raise DllamaError(f"inventory not found: {path}")
    tool = ansible_inventory_tool()
    if tool:
        groups, hostvars = _via_ansible(tool, path)
    else:
        groups, hostvars = _via_yaml(path)
    return make_cluster(groups, hostvars, path)


def ansible_inventory_tool() -> str | None:
    """ansible-inventory beside this Python (a venv that is not activated) or on PATH."""
    import sys

    beside = os.path.join(os.path.dirname(sys.executable), "ansible-inventory")
    return beside if os.access(beside, os.X_OK) else shutil.which("ansible-inventory")


def _via_ansible(tool: str, path: str) -> tuple[dict, dict]:
    r = subprocess.run([tool, "-i", path, "--list"], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        raise DllamaError(f"ansible-inventory cannot read {path}: {last}")
    data = json.loads(r.stdout)
    hostvars = data.get("_meta", {}).get("hostvars", {})

    def hosts_of(group: str) -> list[str]:
        g = data.get(group, {})
        out = list(g.get("hosts", []))
        for child in g.get("children", []):
            out += [h for h in hosts_of(child) if h not in out]
        return out

    return {ROOT_GROUP: hosts_of(ROOT_GROUP), WORKER_GROUP: hosts_of(WORKER_GROUP)}, hostvars


def _via_yaml(path: str) -> tuple[dict, dict]:
    """A YAML inventory without Ansible: all.vars < group vars < host vars, groups in file order."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise DllamaError(f"{path} is not a YAML inventory: {exc}") from None
    groups: dict[str, list[str]] = {}
    hostvars: dict[str, dict] = {}

    def walk(name: str, group: dict, inherited: dict) -> list[str]:
        group = group or {}
        gvars = {**inherited, **(group.get("vars") or {})}
        members = []
        for host, hvars in (group.get("hosts") or {}).items():
            hostvars[host] = {**gvars, **hostvars.get(host, {}), **(hvars or {})}
            members.append(host)
        for child, cgroup in (group.get("children") or {}).items():
            members += [h for h in walk(child, cgroup, gvars) if h not in members]
        groups[name] = members
        return members

    for name, group in data.items():
        walk(name, group, {})
    return groups, hostvars


def from_hosts(items: list[str], model: str | None = None, threads: int | None = None) -> Cluster:
    """`--hosts ROOT WORKER...` without an inventory: [user@]host[:port] each, SSH as configured."""
    nodes = []
    for i, item in enumerate(items):
        user, _, rest = item.rpartition("@")
        host, sep, port = rest.partition(":")
        if sep and not port.isdigit():
            raise DllamaError(f"--hosts: {item!r} is not [USER@]HOST[:PORT]")
        local = host in ("localhost", "127.0.0.1")
        v = {"ansible_host": host, "dllama_address": host,
             "dllama_worker_port": int(port) if sep else DEFAULT_WORKER_PORT,
             "ansible_connection": "local" if local else "ssh"}
        if threads is not None:
            v["dllama_worker_threads"] = threads
        if local:
            v["dllama_worker_host"] = "127.0.0.1"
        if user:
            v["ansible_user"] = user
        nodes.append(make_node(f"{host}:{port}" if sep else host, v))
    if not nodes:
        raise DllamaError("--hosts needs at least the root")
    return Cluster(root=nodes[0], workers=nodes[1:], model=model, root_threads=threads)
