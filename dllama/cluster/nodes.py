"""What `dllama cluster` does on one node: learn its state, start and stop a worker, probe workers.

A worker runs through its systemd unit where the Ansible role installed one and systemd is running;
otherwise as a detached process with a pid file and a log file in the node's state directory:

    nohup setsid PYTHON -m dllama worker ... >STATE/NAME.log 2>&1 </dev/null & echo $! > STATE/NAME.pid

Only that simple command carries the `&` (a compound one keeps the SSH channel open), and readiness is
judged by the pid the worker reports in its handshake, not by "something listens on the port".
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import sys
from dataclasses import dataclass, field

from dllama.cluster.inventory import Node
from dllama.errors import DllamaError


def state_path(node: Node, name: str) -> str:
    """A path in the node's state directory, quoted for the node's shell ("~/" becomes "$HOME/")."""
    path = node.state_dir.rstrip("/") + ("/" + name if name else "")
    if path == "~" or path.startswith("~/"):
        if any(c in path for c in '"$`\\'):
            raise DllamaError(f"dllama_cluster_state_dir of {node.name} has shell special characters: {path}")
        return '"$HOME' + path[1:] + '"'
    return shlex.quote(path)


@dataclass
class Facts:
    reachable: bool
    error: str = ""
    root_user: bool = False
    systemd_unit: bool = False   # systemd is PID 1 and the role's unit is installed
    python: str = ""             # the interpreter that has dllama on this node
    cache_writable: bool = False
    mem_free_mb: int | None = None
    load: str = ""
    cpus: int | None = None
    key: bool = False            # the cluster key file is readable (and the inventory wants it)
    api_key: bool = False        # the API key file the roles write (API_KEY_FILE) is readable
    api_unit: bool = False       # systemd is PID 1 and the dllama-api unit is installed
    api_active: bool = False
    recorded: dict = field(default_factory=dict)  # the root's settings from role dllama_root


ROOT_SETTINGS = "root.json"     # beside the cluster key, written by role dllama_root
API_KEY_FILE = "api.env"        # beside the cluster key: DLLAMA_API_KEY=..., written by role dllama_cluster


def api_key_file(node: Node) -> str:
    return os.path.join(os.path.dirname(node.cluster_key_file), API_KEY_FILE)


def python_of(node: Node) -> str:
    return sys.executable if node.local else f"{node.venv}/bin/python"


def gather(runner, node: Node, api_service: str = "dllama-api", timeout: float = 20) -> Facts:
    """One round trip: what the node has and runs. The last line is the root's recorded settings."""
    py = python_of(node)
    q = shlex.quote
    unit, api = f"/etc/systemd/system/{node.service}.service", f"/etc/systemd/system/{api_service}.service"
    conf = q(os.path.join(os.path.dirname(node.cluster_key_file), ROOT_SETTINGS))
    script = "; ".join([
        "id -u",
        f"if test -d /run/systemd/system && test -f {q(unit)}; then echo unit; else echo nounit; fi",
        f"if test -x {q(py)}; then echo py; else echo nopy; fi",
        f"if test -w {q(node.numba_cache_dir)}; then echo cache; else echo nocache; fi",
        "awk '/^MemAvailable:/ {print int($2/1024)}' /proc/meminfo",
        "cut -d' ' -f1-3 /proc/loadavg",
        "nproc",
        f"if test -r {q(node.cluster_key_file)}; then echo key; else echo nokey; fi",
        f"if test -d /run/systemd/system && test -f {q(api)}; then echo api; else echo noapi; fi",
        # one line whatever happens: without a running systemd, is-active prints nothing at all
        f"a=$(systemctl is-active {q(api_service)} 2>/dev/null); echo \"${{a:-unknown}}\"",
        f"if test -r {q(api_key_file(node))}; then echo apikey; else echo noapikey; fi",
        f"tr -d '\\n' < {conf} 2>/dev/null; echo",
    ])
    r = runner.run(script, timeout=timeout)
    if not r.ok:
        return Facts(False, error=(r.err.strip() or f"exit status {r.rc}").splitlines()[-1])
    lines = r.out.split("\n")
    if len(lines) < 12:
        return Facts(False, error=f"unexpected answer: {r.out.strip()[:200]}")
    try:
        recorded = json.loads(lines[11]) if lines[11].strip() else {}
    except ValueError:
        recorded = {}
    api_unit = lines[8] == "api"
    return Facts(True, root_user=lines[0] == "0", systemd_unit=lines[1] == "unit",
                 python=py if lines[2] == "py" else "", cache_writable=lines[3] == "cache",
                 mem_free_mb=int(lines[4]) if lines[4].isdigit() else None, load=lines[5],
                 cpus=int(lines[6]) if lines[6].isdigit() else None,
                 key=node.cluster_key and lines[7] == "key", api_unit=api_unit,
                 api_active=api_unit and lines[9] == "active", api_key=lines[10] == "apikey", recorded=recorded)


def key_args(node: Node, facts: Facts) -> list[str]:
    return ["--cluster-key-file", node.cluster_key_file] if facts.key else []


def env_prefix(node: Node, facts: Facts) -> list[str]:
    """`env NUMBA_CACHE_DIR=...`: the kernels the roles compiled at install (the services' cache).

    `env`, not a VAR=value prefix: the command may go after `nohup setsid`, which execs its argument."""
    return ["env", f"NUMBA_CACHE_DIR={node.numba_cache_dir}"] if facts.cache_writable else []


def is_loopback_address(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # a host name
        return False


def listen_address(node: Node) -> str:
    """A node on loopback (the local demo) listens there only; any other where the inventory says
    (`dllama_worker_host`, default every address, so the worker is up before the cluster address is)."""
    return node.address if is_loopback_address(node.address) else node.bind


# the roles' dllama_worker_spin_us / dllama_root_spin_us: a host that runs only dllama spins
DEDICATED_SPIN_US = 2000


def spin_us(node: Node) -> int:
    """The node's --spin-us: the inventory's, else the roles' default, but 0 for a node on this machine (the
    local demo), whose cores the other nodes share."""
    if node.spin_us is not None:
        return node.spin_us
    return 0 if node.local or is_loopback_address(node.address) else DEDICATED_SPIN_US


def worker_command(node: Node, facts: Facts) -> str:
    args = [facts.python, "-m", "dllama", "worker", "--host", listen_address(node), "--port", str(node.port),
            "--nthreads", str(node.threads or facts.cpus or 1), "--spin-us", str(spin_us(node)),
            *key_args(node, facts),
            *(["--weights", node.weights] if node.weights else [])]
    return " ".join(shlex.quote(a) for a in env_prefix(node, facts) + args)


def start_detached(runner, node: Node, command: str, name: str) -> tuple[int | None, str]:
    """Start `command` detached on the node; returns (pid, error)."""
    mk = runner.run(f"mkdir -p {state_path(node, '')}", timeout=20)
    if not mk.ok:
        return None, mk.err.strip()
    log, pidfile = state_path(node, f"{name}.log"), state_path(node, f"{name}.pid")
    r = runner.run(f"nohup setsid {command} >{log} 2>&1 </dev/null & echo $! > {pidfile}", timeout=20)
    if not r.ok:
        return None, r.err.strip()
    return read_pid(runner, node, name), ""


def read_pid(runner, node: Node, name: str) -> int | None:
    r = runner.run(f"cat {state_path(node, name + '.pid')} 2>/dev/null", timeout=20)
    text = r.out.strip()
    return int(text) if r.ok and text.isdigit() else None


def alive(runner, pid: int) -> bool:
    """The pid is a live dllama process (not a recycled pid of something else)."""
    r = runner.run(f"tr '\\0' ' ' < /proc/{int(pid)}/cmdline", timeout=20)
    return r.ok and "dllama" in r.out


def stop_detached(runner, node: Node, name: str) -> str:
    """Stop the detached process `name` (TERM, then KILL after 5 s); idempotent. Returns what happened."""
    pid = read_pid(runner, node, name)
    pidfile = state_path(node, f"{name}.pid")
    if pid is None or not alive(runner, pid):
        runner.run(f"rm -f {pidfile}", timeout=20)
        return "not running"
    # setsid made the process a group leader: the group takes any children with it.
    runner.run(f"kill -TERM -- -{pid} 2>/dev/null || kill -TERM {pid}; "
               f"for i in $(seq 50); do kill -0 {pid} 2>/dev/null || break; sleep 0.1; done; "
               f"kill -KILL -- -{pid} 2>/dev/null; rm -f {pidfile}", timeout=30)
    return f"stopped (pid {pid})"


def sudo(facts: Facts) -> str:
    return "" if facts.root_user else "sudo -n "


PROBE_SCRIPT = """
import json, sys
from dllama.net import probe
out = {}
for ep in json.loads(sys.argv[1]):
    host, _, port = ep.rpartition(":")
    try:
        out[ep] = probe(host, int(port), float(sys.argv[2]))
    except Exception as exc:
        out[ep] = {"error": str(exc)}
print(json.dumps(out))
"""


HEALTH_SCRIPT = """
import json, sys, urllib.error, urllib.request
try:
    body = urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).read()
except urllib.error.HTTPError as exc:   # 503: loading or degraded, with the same body
    body = exc.read()
except Exception as exc:
    body = json.dumps({"status": "not answering", "error": str(exc)}).encode()
print(body.decode(errors="replace"))
"""


def api_health(root_runner, root: Node, python: str, host: str, port: int, timeout: float = 3.0) -> dict:
    """The API's own `/health` (status ready/loading/degraded/failed and each node's state), asked on the
    root itself: the API may listen on loopback only."""
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/health"
    cmd = " ".join(shlex.quote(a) for a in [python, "-c", HEALTH_SCRIPT, url, str(timeout)])
    r = root_runner.run(cmd, timeout=timeout + 30)
    try:
        return json.loads(r.out) if r.ok else {"status": "not answering", "error": r.err.strip()[-200:]}
    except ValueError:
        return {"status": "not answering", "error": r.out.strip()[-200:]}


def probe_all(root_runner, root: Node, python: str, endpoints: list[str], timeout: float = 3.0) -> dict:
    """Ask every worker for its handshake from the root node (the root is who must reach them).

    Returns {endpoint: info dict or {"error": message}}."""
    if not endpoints:
        return {}
    if root.local:
        from dllama.net import probe

        out = {}
        for ep in endpoints:
            host, _, port = ep.rpartition(":")
            try:
                out[ep] = probe(host, int(port), timeout)
            except Exception as exc:
                out[ep] = {"error": str(exc)}
        return out
    cmd = " ".join(shlex.quote(a) for a in [python, "-c", PROBE_SCRIPT, json.dumps(endpoints), str(timeout)])
    r = root_runner.run(cmd, timeout=timeout * len(endpoints) + 30)
    if not r.ok:
        msg = (r.err.strip().splitlines() or [f"exit status {r.rc}"])[-1]
        return {ep: {"error": f"probe from {root.name} failed: {msg}"} for ep in endpoints}
    return json.loads(r.out.strip().splitlines()[-1])
