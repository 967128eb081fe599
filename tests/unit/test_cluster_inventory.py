"""dllama cluster without hosts: inventory reading (checked against ansible-inventory itself), node rules,
shell quoting of state paths, the status table."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess

import pytest
from testlib import need

from dllama.cluster import inventory as I
from dllama.cluster import nodes as N
from dllama.cluster.ops import root_command, split_argument
from dllama.cluster.report import format_table
from dllama.errors import DllamaError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = ["example-raspberrypi.yml", "example-x86.yml", "local.yml"]


def strip(v: dict) -> dict:
    # ansible-inventory adds group_vars/ and its own magic; compare what the YAML file itself says.
    return {k: v[k] for k in v if not k.startswith("ansible_") or k in ("ansible_host", "ansible_user")}


@pytest.mark.parametrize("name", EXAMPLES)
def test_yaml_reader_agrees_with_ansible_inventory(name, tmp_path):
    tool = I.ansible_inventory_tool()
    need(tool is not None, "ansible-inventory is not installed")
    # A copy outside inventory/, so inventory/group_vars does not apply to either reader.
    path = tmp_path / name
    shutil.copy(os.path.join(REPO, "inventory", name), path)
    groups_a, vars_a = I._via_ansible(tool, str(path))
    groups_y, vars_y = I._via_yaml(str(path))
    for g in (I.ROOT_GROUP, I.WORKER_GROUP):
        assert groups_a[g] == groups_y[g]
    for host in groups_a[I.ROOT_GROUP] + groups_a[I.WORKER_GROUP]:
        ya = strip(vars_y[host])
        assert {k: vars_a[host][k] for k in ya} == ya


def test_raspberrypi_example_is_a_four_node_cluster_in_order():
    c = I.read_inventory(os.path.join(REPO, "inventory", "example-raspberrypi.yml"))
    assert c.root.name == "raspberrypi1" and c.root.ssh_user == "pi"
    assert [w.endpoint for w in c.workers] == ["10.0.0.2:9998", "10.0.0.3:9998", "10.0.0.4:9998"]
    argv = root_command(c, "/opt/dllama/venv/bin/python", "inference", ["--prompt", "hi"])
    i = argv.index("--workers")
    assert argv[i + 1:i + 4] == ["10.0.0.2:9998", "10.0.0.3:9998", "10.0.0.4:9998"]
    assert argv[-2:] == ["--prompt", "hi"]


def test_split_weights_become_the_roots_split_flag(tmp_path):
    """Any node count (3 here); dllama_split_weight per host, 1 where unset, or auto on every host."""
    import yaml

    def argv(root: dict, a: dict, b: dict) -> list[str]:
        p = tmp_path / "inv.yml"
        p.write_text(yaml.safe_dump({"all": {"children": {
            "dllama_root": {"hosts": {"r": {"dllama_address": "10.0.0.1", **root}}},
            "dllama_workers": {"hosts": {"a": {"dllama_address": "10.0.0.2", **a},
                                         "b": {"dllama_address": "10.0.0.3", **b}}}}}}))
        c = I.read_inventory(str(p))
        c.model, c.root_threads, c.buffer_float_type = "m.m", 1, "q80"
        return root_command(c, "python", "inference", [])

    plain = argv({}, {}, {})
    assert "--split" not in plain and plain[plain.index("--workers") + 1:] == ["10.0.0.2:9998", "10.0.0.3:9998"]
    weighted = argv({"dllama_split_weight": 3}, {}, {"dllama_split_weight": "0.5"})
    assert weighted[weighted.index("--split") + 1] == "3,1,0.5"
    auto = {"dllama_split_weight": "auto"}
    assert argv(auto, auto, auto)[-2:] == ["--split", "auto"]


def test_local_demo_listens_on_loopback_only():
    c = I.read_inventory(os.path.join(REPO, "inventory", "local.yml"))
    facts = N.Facts(True, python="/usr/bin/python3")

    def bind(node) -> str:
        argv = N.worker_command(node, facts).split()
        return argv[argv.index("--host") + 1]

    assert c.workers and all(bind(w) == "127.0.0.1" for w in c.workers)
    # Hosts given on the command line as this machine listen on loopback too; others on every address.
    local, remote = I.from_hosts(["127.0.0.1", "localhost:9997", "10.0.0.3"]).nodes[1:]
    assert bind(local) == "127.0.0.1" and (bind(remote), remote.port) == ("0.0.0.0", 9998)


def test_bad_inventories_name_the_variable(tmp_path):
    def cluster(workers: dict) -> str:
        import yaml

        p = tmp_path / "inv.yml"
        p.write_text(yaml.safe_dump({"all": {"children": {
            "dllama_root": {"hosts": {"r": {"dllama_address": "10.0.0.1"}}},
            "dllama_workers": {"hosts": workers}}}}))
        with pytest.raises(DllamaError) as e:
            c = I.read_inventory(str(p))
            split_argument(c)
        return str(e.value)

    assert "dllama_address is not set for w" in cluster({"w": {}})
    assert "dllama_worker_port of w is 70000" in cluster({"w": {"dllama_address": "10.0.0.2",
                                                                "dllama_worker_port": 70000}})
    assert "dllama_split_weight of b is 'fast'" in cluster({"a": {"dllama_address": "10.0.0.2"},
                                                           "b": {"dllama_address": "10.0.0.3",
                                                                 "dllama_split_weight": "fast"}})
    assert "dllama_split_weight is auto for a but not for r" in cluster(
        {"a": {"dllama_address": "10.0.0.2", "dllama_split_weight": "auto"}})
    assert "both a and b" in cluster({"a": {"dllama_address": "10.0.0.2"}, "b": {"dllama_address": "10.0.0.2"}})


def test_state_paths_expand_home_on_the_node_and_quote_the_rest():
    home = I.Node("n", "1.2.3.4", "h", state_dir="~/.dllama")
    odd = I.Node("n", "1.2.3.4", "h", state_dir="/tmp/a b;c")
    for node, want in ((home, os.path.expanduser("~/.dllama/x y.log")), (odd, "/tmp/a b;c/x y.log")):
        out = subprocess.run(["/bin/sh", "-c", f"printf %s {N.state_path(node, 'x y.log')}"],
                             capture_output=True, text=True).stdout
        assert out == want
    with pytest.raises(DllamaError):
        N.state_path(I.Node("n", "1.2.3.4", "h", state_dir="~/$(reboot)"), "x")


def test_status_table_aligns_columns():
    rows = [("node1", "root", "yes", "-", "-", "-", "100 MB", "0.1", "-"),
            ("node22", "worker", "NO", "NO", "-", "9998", "-", "-", "-")]
    lines = format_table(rows).splitlines()
    assert lines[0].startswith("NODE    ROLE") and lines[2].startswith("node22  worker  NO")


def _role_defaults(role: str) -> dict:
    import yaml

    with open(os.path.join(REPO, "collections", "ansible_collections", "dllama", "cluster", "roles", role, "defaults",
                           "main.yml")) as f:
        return yaml.safe_load(f)


def test_cluster_fallbacks_are_the_roles_defaults():
    """What `dllama cluster` assumes when neither the inventory nor the root says is what the roles do."""
    root, worker, shared = (_role_defaults(r) for r in ("dllama_root", "dllama_worker", "dllama_cluster"))
    assert I.ROOT_DEFAULTS["buffer_float_type"] == root["dllama_root_buffer_float_type"]
    assert I.ROOT_DEFAULTS["api_host"] == root["dllama_root_api_host"]
    assert I.ROOT_DEFAULTS["api_port"] == root["dllama_root_api_port"]
    assert I.ROOT_DEFAULTS["api_service"] == root["dllama_root_api_service"]
    node = I.make_node("w", {"dllama_address": "10.0.0.2"})
    assert node.port == worker["dllama_worker_port"] and node.service == worker["dllama_worker_service"]
    assert node.cluster_key_file == shared["dllama_cluster_key_file"] and node.cluster_key is shared["dllama_cluster_key"]
    # The roles' thread default is the host's CPU count: `dllama cluster` leaves it to the node too.
    assert "processor_vcpus" in worker["dllama_worker_threads"] and node.threads is None
    # A host away from this machine spins as the roles' services do.
    assert worker["dllama_worker_spin_us"] == root["dllama_root_spin_us"] == N.spin_us(node) == N.DEDICATED_SPIN_US


def test_nodes_on_this_machine_do_not_spin_unless_the_inventory_says():
    """The local demo's root and worker share this machine's cores: neither spins. Elsewhere the inventory's
    value, or the roles' default; the flag's value is what dllama's own parser takes."""
    from dllama import cli

    c = I.read_inventory(os.path.join(REPO, "inventory", "local.yml"))
    I.resolve(c, {}, {})
    facts = N.Facts(True, python="/usr/bin/python3")
    worker = cli.build_parser().parse_args(shlex.split(N.worker_command(c.workers[0], facts))[3:])
    root = cli.build_parser().parse_args(root_command(c, "py", "inference", ["--prompt", "hi"])[3:])
    assert worker.spin_us == root.spin_us == "0"
    c = I.make_cluster({I.ROOT_GROUP: ["r"], I.WORKER_GROUP: ["w", "v"]},
                       {"r": {"dllama_address": "10.0.0.1", "dllama_root_spin_us": 500},
                        "w": {"dllama_address": "10.0.0.2"}, "v": {"dllama_address": "10.0.0.3",
                                                                  "dllama_worker_spin_us": 0}}, "inv")
    I.resolve(c, {}, {})
    argv = root_command(c, "py", "inference", [])
    assert argv[argv.index("--spin-us") + 1] == "500"
    assert [N.spin_us(w) for w in c.workers] == [N.DEDICATED_SPIN_US, 0]


def test_unset_and_templated_values_come_from_the_root_then_the_defaults():
    hostvars = {
        "r": {"dllama_address": "10.0.0.1", "dllama_root_model": "{{ dllama_root_model_dir }}/m.m",
              "dllama_root_buffer_float_type": "f32"},
        "w": {"dllama_address": "10.0.0.2", "dllama_worker_threads": 2},
        "v": {"dllama_address": "10.0.0.3", "dllama_worker_threads": "{{ ansible_facts.processor_vcpus }}"},
        "x": {"dllama_address": "10.0.0.4", "dllama_cluster_key": False},
    }
    c = I.make_cluster({I.ROOT_GROUP: ["r"], I.WORKER_GROUP: ["w", "v", "x"]}, hostvars, "inv")
    assert c.model is None  # a Jinja expression is Ansible's to evaluate, not ours
    I.resolve(c, {"model": "/opt/dllama/models/m.m", "tokenizer": "", "threads": 3, "buffer_float_type": "q80",
                  "api_port": 9000}, {"r": 8, "w": 4, "v": 6, "x": None})
    assert (c.model, c.tokenizer, c.root_threads, c.buffer_float_type) == ("/opt/dllama/models/m.m", "", 3, "f32")
    assert (c.api_port, c.api_service, c.max_seq_len) == (9000, "dllama-api", None)
    assert [w.threads for w in c.workers] == [2, 6, 1]
    assert [w.cluster_key for w in c.workers] == [True, True, False]
    # Nothing recorded on the root (not deployed by the roles): the node's CPU count, the roles' defaults.
    c = I.make_cluster({I.ROOT_GROUP: ["r"], I.WORKER_GROUP: ["w"]}, hostvars, "inv")
    I.resolve(c, {}, {"r": 8})
    assert (c.model, c.root_threads, c.api_port) == ("", 8, 9990)


def test_root_command_passes_the_key_file_only_when_given():
    c = I.make_cluster({I.ROOT_GROUP: ["r"], I.WORKER_GROUP: ["w"]},
                       {"r": {"dllama_address": "10.0.0.1", "dllama_root_model": "m.m", "dllama_root_threads": 2},
                        "w": {"dllama_address": "10.0.0.2"}}, "inv")
    I.resolve(c, {}, {})
    with_key = root_command(c, "py", "inference", [], "/etc/dllama/cluster.key")
    assert with_key[with_key.index("--cluster-key-file") + 1] == "/etc/dllama/cluster.key"
    assert "--cluster-key-file" not in root_command(c, "py", "inference", [])


def test_gather_reads_every_fact_where_systemd_is_not_running(tmp_path):
    """One line per fact, whatever the host: `systemctl is-active` prints nothing without a running systemd,
    which must not shift the API key and the root's recorded settings into each other's place."""
    import json

    from dllama.cluster import remote

    (tmp_path / "cluster.key").write_text("k")
    (tmp_path / "api.env").write_text("DLLAMA_API_KEY=a\n")
    (tmp_path / "root.json").write_text(json.dumps({"model": "/m.gguf", "threads": 4}))
    node = I.Node(name="r", address="127.0.0.1", ssh_host="127.0.0.1", local=True,
                  cluster_key_file=str(tmp_path / "cluster.key"))
    facts = N.gather(remote.LocalRunner(node), node)
    assert facts.reachable and facts.key and facts.api_key
    assert facts.recorded == {"model": "/m.gguf", "threads": 4}
    (tmp_path / "api.env").unlink()
    assert not N.gather(remote.LocalRunner(node), node).api_key


def test_local_weights_give_each_worker_its_slice_file(tmp_path):
    """The path role dllama_worker copies the slice to (node<I>-of-<N>.dlslice, I the worker's place)."""
    import yaml

    p = tmp_path / "inv.yml"
    p.write_text(yaml.safe_dump({"all": {"vars": {"dllama_worker_local_weights": True}, "children": {
        "dllama_root": {"hosts": {"r": {"dllama_address": "10.0.0.1"}}},
        "dllama_workers": {"hosts": {f"w{i}": {"dllama_address": f"10.0.0.{i}"} for i in (2, 3, 4)}}}}}))
    c = I.read_inventory(str(p))
    facts = N.Facts(True, python="/usr/bin/python3")
    weights = []
    for w in c.workers:
        argv = N.worker_command(w, facts).split()
        weights.append(argv[argv.index("--weights") + 1])
    assert weights == [f"/opt/dllama/weights/node{i}-of-4.dlslice" for i in (1, 2, 3)]
    p.write_text(p.read_text().replace("dllama_worker_local_weights: true", "dllama_worker_local_weights: false"))
    assert all("--weights" not in N.worker_command(w, facts) for w in I.read_inventory(str(p)).workers)
