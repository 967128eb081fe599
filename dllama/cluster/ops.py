"""`dllama cluster up|down|status|logs`: the whole cluster from its inventory, in parallel over SSH."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from dllama.cluster import nodes as N
from dllama.cluster.inventory import ROOT_DEFAULTS, Cluster, Node, literal, resolve
from dllama.cluster.remote import Result, runner_for
from dllama.errors import DllamaError


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Session:
    """One runner per node, facts gathered in parallel; closed at the end."""

    def __init__(self, cluster: Cluster, connect_timeout: float = 10):
        self.cluster = cluster
        self.runners = {n.name: runner_for(n, connect_timeout) for n in cluster.nodes}
        self.facts: dict[str, N.Facts] = {}

    def parallel(self, fn, nodes: list[Node]) -> list:
        with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
            return list(pool.map(fn, nodes))

    def gather(self, timeout: float) -> None:
        """The nodes' facts; then what the inventory left unset, from the root's recorded settings."""
        c = self.cluster
        api = c.api_service or ROOT_DEFAULTS["api_service"]
        found = self.parallel(lambda n: N.gather(self.runners[n.name], n, api, timeout), c.nodes)
        self.facts = {node.name: facts for node, facts in zip(c.nodes, found)}
        resolve(c, self.facts[c.root.name].recorded, {n: f.cpus for n, f in self.facts.items()})

    def systemctl(self, node: Node, verb: str, unit: str) -> Result:
        return self.runners[node.name].run(f"{N.sudo(self.facts[node.name])}systemctl {verb} {shlex.quote(unit)}",
                                           timeout=60)

    def root_python(self) -> str:
        return self.facts[self.cluster.root.name].python or N.python_of(self.cluster.root)

    def probe(self, workers: list[Node]) -> dict:
        root = self.cluster.root
        return N.probe_all(self.runners[root.name], root, self.root_python(), [w.endpoint for w in workers])

    def close(self) -> None:
        for r in self.runners.values():
            r.close()


def split_argument(cluster: Cluster) -> str | None:
    """`--split` from the nodes' dllama_split_weight: None when no node sets one, "auto" when they all say
    auto, else one weight per node (1 where unset). DllamaError naming the host of a bad value."""
    given = {n.name: literal(n.vars, "dllama_split_weight") for n in cluster.nodes}
    set_ = {k: v for k, v in given.items() if v not in (None, "")}
    if not set_:
        return None
    autos = sorted(k for k, v in set_.items() if str(v) == "auto")
    if autos:
        if len(autos) != len(cluster.nodes):
            other = next(n.name for n in cluster.nodes if n.name not in autos)
            raise DllamaError(f"dllama_split_weight is auto for {autos[0]} but not for {other}: "
                              "set auto on every node, or a number on each")
        return "auto"
    weights = []
    for name, v in given.items():
        try:
            w = 1.0 if v in (None, "") else float(v)
        except (TypeError, ValueError):
            w = float("nan")
        if not (w > 0 and w != float("inf")):
            raise DllamaError(f"dllama_split_weight of {name} is {v!r}: expected a positive number or auto")
        weights.append(f"{w:g}")
    return ",".join(weights)


def check_model(s: Session, n_nodes: int) -> None:
    """The model is on the root and splits over n_nodes (the partition rules, run where the model is)."""
    c = s.cluster
    if not c.model:
        raise DllamaError(f"no model for the root {c.root.name}: set dllama_root_model in the inventory (or dllama_root_model_files, then run playbooks/deploy.yml)")
    split = split_argument(c)
    cmd = " ".join(shlex.quote(a) for a in [s.root_python(), "-m", "dllama.model.split", c.model, str(n_nodes),
                                            *([split] if split else [])])
    r = s.runners[c.root.name].run(cmd, timeout=120)
    if r.rc == 3:
        raise DllamaError(f"{c.model} on {c.root.name}: {r.out.strip().splitlines()[-1]}")
    if not r.ok:
        raise DllamaError(f"cannot check the model on {c.root.name}: {(r.err.strip().splitlines() or ['?'])[-1]}")
    if c.tokenizer and not s.runners[c.root.name].run(f"test -r {shlex.quote(c.tokenizer)}", timeout=20).ok:
        raise DllamaError(f"tokenizer not found on {c.root.name}: {c.tokenizer} (dllama_root_tokenizer)")


def port_in_use(s: Session, node: Node, port: int | None = None) -> bool:
    r = s.runners[node.name].run(f"ss -Htln 'sport = :{port or node.port}'", timeout=20)
    return r.ok and bool(r.out.strip())


def start_worker(s: Session, node: Node) -> int | None:
    """Start one worker; returns the pid it must report (None when systemd runs it)."""
    facts, runner = s.facts[node.name], s.runners[node.name]
    if facts.systemd_unit:
        say(f"{node.name}: starting {node.service} (systemd)")
        r = s.systemctl(node, "start", node.service)
        if not r.ok:
            raise DllamaError(f"{node.name}: systemctl start {node.service} failed: {r.err.strip()}")
        return None
    say(f"{node.name}: starting worker on port {node.port}")
    pid, err = N.start_detached(runner, node, N.worker_command(node, facts), node.name)
    if pid is None:
        raise DllamaError(f"{node.name}: could not start the worker: {err or 'no pid file'}")
    return pid


def wait_ready(s: Session, expected: dict[str, int | None], timeout: float) -> None:
    """Until every worker answers the handshake (with the expected pid); names the ones that do not."""
    pending = {w.name: w for w in s.cluster.workers if w.name in expected}
    deadline = time.monotonic() + timeout
    errors: dict[str, str] = {}
    while pending:
        answers = s.probe(list(pending.values()))
        for name, node in list(pending.items()):
            info = answers.get(node.endpoint, {})
            pid = expected[name]
            if "error" not in info and (pid is None or info.get("pid") == pid):
                say(f"{name}: ready (pid {info.get('pid')}, dllama {info.get('version')})")
                del pending[name]
            elif pid is not None and not N.alive(s.runners[name], pid):
                tail = s.runners[name].run(f"tail -n 5 {N.state_path(node, name + '.log')}").out.strip()
                raise DllamaError(f"the worker on {name} exited: {tail.splitlines()[-1] if tail else 'no log'}")
            else:
                errors[name] = info.get("error", f"answers as pid {info.get('pid')}, expected {pid}")
        if pending and time.monotonic() > deadline:
            detail = "; ".join(f"{n}: {errors.get(n, '?')}" for n in pending)
            raise DllamaError(f"workers not ready after {timeout:.0f} s: {detail}")
        if pending:
            say("waiting for " + ", ".join(pending))
            time.sleep(1.0)


def _api_host(c: Cluster) -> str:
    # a root on this machine (the local demo) serves this machine only: without an API key dllama-api
    # refuses any other address, and the demo opens nothing to the network
    if c.api_host == "0.0.0.0" and (c.root.address == "localhost" or N.is_loopback_address(c.root.address)):
        return "127.0.0.1"
    return c.api_host


def root_command(c: Cluster, python: str, run: str, extra: list[str], key_file: str = "") -> list[str]:
    args = [python, "-m", "dllama", run] if run != "api" else [
        python, "-c", "import sys; from dllama.cli import main_api; sys.exit(main_api())",
        "--host", _api_host(c), "--port", str(c.api_port)]
    args += ["--model", c.model, "--nthreads", str(c.root_threads), "--buffer-float-type", c.buffer_float_type,
             "--spin-us", str(N.spin_us(c.root))]
    if c.tokenizer:
        args += ["--tokenizer", c.tokenizer]
    if c.max_seq_len:
        args += ["--max-seq-len", str(c.max_seq_len)]
    if key_file:
        args += ["--cluster-key-file", key_file]
    if c.workers:
        args += ["--workers", *(w.endpoint for w in c.workers)]
        split = split_argument(c)
        if split:
            args += ["--split", split]
    return args + list(extra)


def up(c: Cluster, run: str = "none", extra: list[str] = (), timeout: float = 120, connect_timeout: float = 10) -> int:
    """Validate, start the workers in parallel, wait for their handshakes, then run the root.

    Raises DllamaError naming what is wrong before anything starts (split weights, unreachable hosts, the
    model's plan over these nodes, busy ports); if a worker fails to come up, the workers started by this call are stopped again."""
    split_argument(c)
    s = Session(c, connect_timeout)
    started: list[Node] = []
    try:
        say(f"checking {len(c.nodes)} nodes: " + ", ".join(n.name for n in c.nodes))
        s.gather(connect_timeout + 10)
        down_nodes = [f"{n.name} ({s.facts[n.name].error})" for n in c.nodes if not s.facts[n.name].reachable]
        if down_nodes:
            raise DllamaError("unreachable: " + "; ".join(down_nodes) + "; nothing was started")
        no_py = [n.name for n in c.nodes if not s.facts[n.name].python]
        if no_py:
            raise DllamaError(f"dllama is not installed on {', '.join(no_py)} (run playbooks/deploy.yml)")
        if run != "none" or c.model:
            check_model(s, len(c.nodes))
        if run in ("inference", "chat") and s.facts[c.root.name].api_active:
            raise DllamaError(f"{c.api_service} runs on {c.root.name} (systemd) and holds the workers: "
                              "stop it first with `dllama cluster down`; nothing was started")
        busy = [w for w in c.workers if port_in_use(s, w)]
        answers = s.probe(busy)
        foreign = [f"{w.name}:{w.port}" for w in busy if "error" in answers.get(w.endpoint, {"error": ""})]
        if foreign:
            raise DllamaError(f"port in use by something that is not a dllama worker: {', '.join(foreign)}")
        for w in busy:
            say(f"{w.name}: worker already running (pid {answers[w.endpoint].get('pid')})")
        to_start = [w for w in c.workers if w not in busy]
        started = to_start  # before starting: if one fails to start, the others are stopped again
        expected = dict(zip([w.name for w in to_start], s.parallel(lambda w: start_worker(s, w), to_start)))
        wait_ready(s, expected, timeout)
        rc = run_root(s, run, list(extra))
        if rc == 0:
            started = []  # the cluster works: the workers stay up for the next root
        return rc
    finally:
        if started:
            say("stopping the workers started: " + ", ".join(w.name for w in started))
            s.parallel(lambda w: stop_worker(s, w), started)
        s.close()


def run_root(s: Session, run: str, extra: list[str]) -> int:
    """Run what the root runs; 0 when it succeeded (the API: once it listens)."""
    c = s.cluster
    facts = s.facts[c.root.name]
    key_file = c.root.cluster_key_file if facts.key else ""
    argv = root_command(c, s.root_python(), run if run != "none" else "inference", extra, key_file)
    if run == "none":
        line = " ".join(shlex.quote(a) for a in argv)
        say(f"workers ready. On {c.root.name}, run for example:\n  {line} --prompt 'Hello'")
        return 0
    if run == "api" and facts.api_unit:
        return start_api_unit(s)
    line = " ".join(shlex.quote(a) for a in N.env_prefix(c.root, facts) + argv)
    if run == "api":
        if facts.api_key:   # the key the roles made, as the unit would get it
            line += " --api-key-file " + shlex.quote(N.api_key_file(c.root))
        pid, err = N.start_detached(s.runners[c.root.name], c.root, line, "root-api")
        if pid is None:
            raise DllamaError(f"{c.root.name}: could not start the API: {err}")
        wait_api(s, pid, timeout=300)
        say(f"{c.root.name}: API ready (pid {pid}) on port {c.api_port}; its log: dllama cluster logs")
        return 0
    say(f"{c.root.name}: running the root ({run})")
    if c.root.local:
        env = dict(os.environ, NUMBA_CACHE_DIR=c.root.numba_cache_dir) if facts.cache_writable else None
        return subprocess.call(argv, env=env)
    conn = s.runners[c.root.name].conn
    r = conn.run(line, warn=True, pty=run == "chat", in_stream=None if run == "chat" else False)
    return r.exited


def start_api_unit(s: Session, timeout: float = 300) -> int:
    """Start the API through its systemd unit and wait until it listens (it loads and streams the model)."""
    c = s.cluster
    if s.facts[c.root.name].api_active:
        say(f"{c.root.name}: {c.api_service} already running (systemd)")
        return 0
    say(f"{c.root.name}: starting {c.api_service} (systemd)")
    r = s.systemctl(c.root, "start", c.api_service)
    if not r.ok:
        raise DllamaError(f"{c.root.name}: systemctl start {c.api_service} failed: {r.err.strip()}")
    def gone() -> str | None:
        if s.systemctl(c.root, "is-active --quiet", c.api_service).ok:
            return None
        journal = s.runners[c.root.name].run(
            f"{N.sudo(s.facts[c.root.name])}journalctl --no-pager -n 5 -u {shlex.quote(c.api_service)}").out
        return (journal.strip().splitlines() or ["no journal"])[-1]

    try:
        _wait_ready(s, gone, timeout)
    except DllamaError as exc:
        s.systemctl(c.root, "stop", c.api_service)
        raise DllamaError(f"{c.api_service} on {c.root.name} did not come up: {exc}") from None
    say(f"{c.root.name}: API ready ({c.api_service}, systemd) on port {c.api_port}; its log: dllama cluster logs")
    return 0


def wait_api(s: Session, pid: int, timeout: float) -> None:
    """Until the API started as `pid` has loaded the model and joined its workers (its /health says ready)."""
    c = s.cluster
    runner = s.runners[c.root.name]

    def gone() -> str | None:
        if N.alive(runner, pid):
            return None
        tail = runner.run(f"tail -n 5 {N.state_path(c.root, 'root-api.log')}").out.strip()
        return tail.splitlines()[-1] if tail else "no log"

    try:
        _wait_ready(s, gone, timeout)
    except DllamaError as exc:
        raise DllamaError(f"the API on {c.root.name}: {exc}") from None


def _wait_ready(s: Session, gone, timeout: float) -> None:
    """Until the API listens and its /health has left "loading" (it listens while it loads the model and
    streams the workers their slices). `gone()` says why the API is no longer running, or None. A cluster
    that comes up degraded is still up: `cluster status` names what is missing."""
    c = s.cluster
    deadline = time.monotonic() + timeout
    status, listening = "not listening", False
    while True:
        why = gone()
        if why is not None:
            raise DllamaError(f"exited: {why}")
        listening = listening or port_in_use(s, c.root, c.api_port)
        if listening:
            health = N.api_health(s.runners[c.root.name], c.root, s.root_python(), c.api_host, c.api_port)
            status = health.get("status", "not answering")
            if status in ("ready", "degraded"):
                return
            if status == "failed":
                raise DllamaError(f"failed: {health.get('error') or health}")
        if time.monotonic() > deadline:
            where = f"port {c.api_port}: {status}" if listening else f"not listening on port {c.api_port}"
            raise DllamaError(f"{where} after {timeout:.0f} s")
        time.sleep(1.0)


def stop_worker(s: Session, node: Node) -> str:
    facts = s.facts.get(node.name)
    result = N.stop_detached(s.runners[node.name], node, node.name)
    if facts is not None and facts.systemd_unit:
        result = _stop_unit(s, node, node.service)
    return result


def stop_api(s: Session) -> str:
    """Both ways the API runs: the systemd unit and a process started by `up --run api` without systemd."""
    root = s.cluster.root
    result = N.stop_detached(s.runners[root.name], root, "root-api")
    if s.facts[root.name].api_unit:
        result = _stop_unit(s, root, s.cluster.api_service)
    return result


def _stop_unit(s: Session, node: Node, unit: str) -> str:
    r = s.systemctl(node, "stop", unit)
    return "stopped (systemd)" if r.ok else f"systemctl stop {unit} failed: {r.err.strip()}"


def down(c: Cluster, connect_timeout: float = 10) -> int:
    """Stop the root's API and every worker; idempotent. Exit 1 if a node could not be reached."""
    s = Session(c, connect_timeout)
    try:
        s.gather(connect_timeout + 10)
        failed = 0

        def stop(node: Node) -> str:
            if not s.facts[node.name].reachable:
                return f"unreachable: {s.facts[node.name].error}"
            if node is c.root:
                return "API " + stop_api(s)
            return "worker " + stop_worker(s, node)

        for node, result in zip(c.nodes, s.parallel(stop, c.nodes)):
            say(f"{node.name}: {result}")
            failed += result.startswith("unreachable")
        return 1 if failed else 0
    finally:
        s.close()
