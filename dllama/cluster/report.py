"""`dllama cluster status` (a table, exit 1 when a node is unhealthy) and `dllama cluster logs`."""

from __future__ import annotations

import shlex
import sys
import threading

from dllama.cluster import nodes as N
from dllama.cluster.inventory import Cluster, Node
from dllama.cluster.ops import Session

COLUMNS = ("NODE", "ROLE", "REACHABLE", "RUNNING", "VERSION", "PORT", "MEM FREE", "LOAD", "SERVES")


def status_rows(c: Cluster, connect_timeout: float = 10) -> tuple[list[tuple], list[str]]:
    """One row per node (COLUMNS) and the names of unhealthy nodes with why."""
    s = Session(c, connect_timeout)
    try:
        s.gather(connect_timeout + 10)
        root_facts = s.facts[c.root.name]
        answers = s.probe(c.workers) if root_facts.reachable and root_facts.python else {}
        rows, unhealthy = [], []
        for node in c.nodes:
            f = s.facts[node.name]
            mem = f"{f.mem_free_mb} MB" if f.mem_free_mb is not None else "-"
            if node is c.root:
                api = N.read_pid(s.runners[node.name], node, "root-api") if f.reachable else None
                running = "api(systemd)" if f.api_active else "api" if api and N.alive(s.runners[node.name], api) else "-"
                serves = "-"
                if running != "-":
                    health = N.api_health(s.runners[node.name], node, s.root_python(), c.api_host, c.api_port)
                    serves = f"api {health.get('status', '?')}"
                    if health.get("status") not in ("ready", "loading"):
                        unhealthy.append(f"{node.name}: {_api_trouble(health)}")
                rows.append((node.name, "root", _yes(f.reachable), running, "-", "-", mem, f.load or "-", serves))
                if not f.reachable:
                    unhealthy.append(f"{node.name}: unreachable ({f.error})")
                continue
            info = answers.get(node.endpoint, {"error": "root unreachable, not probed"})
            ok = "error" not in info
            rows.append((node.name, "worker", _yes(f.reachable), _yes(ok), info.get("version", "-"),
                         str(node.port), mem, f.load or "-", info.get("root") or "-"))
            if not f.reachable:
                unhealthy.append(f"{node.name}: unreachable ({f.error})")
            elif not ok:
                unhealthy.append(f"{node.name}: worker not answering on port {node.port} ({info['error']})")
        return rows, unhealthy
    finally:
        s.close()


def _api_trouble(health: dict) -> str:
    """One line for an API that is not serving: degraded names the nodes it lost, as its /health does."""
    down = [n for n in health.get("nodes", []) if isinstance(n, dict) and n.get("state") == "down"]
    what = "; ".join(f"{n.get('address')} down ({n.get('error') or 'lost'})" for n in down)
    return f"API {health.get('status')}" + (f": {what}" if what else f" ({health.get('error', 'no reason given')})")


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def format_table(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in [COLUMNS, *rows])


def status(c: Cluster, connect_timeout: float = 10) -> int:
    rows, unhealthy = status_rows(c, connect_timeout)
    print(format_table(rows), flush=True)
    for line in unhealthy:
        print(f"unhealthy: {line}", file=sys.stderr)
    return 1 if unhealthy else 0


def log_command(node: Node, facts: N.Facts, lines: int, follow: bool, name: str, unit: str = "") -> str:
    """The journal of `unit` where systemd runs it, else the log file of the process `name`."""
    if unit:
        return f"{N.sudo(facts)}journalctl --no-pager -n {lines} -u {shlex.quote(unit)}" + (" -f" if follow else "")
    path = N.state_path(node, f"{name}.log")
    return f"tail -n {lines} {'-F ' if follow else ''}{path} 2>/dev/null || echo '(no log yet)'"


def logs(c: Cluster, lines: int = 50, follow: bool = False, connect_timeout: float = 10) -> int:
    """The last lines of each node's log, each line prefixed with the node's name."""
    s = Session(c, connect_timeout)
    lock = threading.Lock()
    width = max(len(n.name) for n in c.nodes)

    def emit(name: str, line: str) -> None:
        with lock:
            print(f"{name.ljust(width)} | {line}", flush=True)

    def one(node: Node) -> None:
        f = s.facts[node.name]
        if not f.reachable:
            emit(node.name, f"(unreachable: {f.error})")
            return
        if node is c.root:
            cmd = log_command(node, f, lines, follow, "root-api", c.api_service if f.api_unit else "")
        else:
            cmd = log_command(node, f, lines, follow, node.name, node.service if f.systemd_unit else "")
        if follow:
            s.runners[node.name].stream(cmd, lambda line: emit(node.name, line))
        else:
            for line in s.runners[node.name].run(cmd, timeout=60).out.splitlines():
                emit(node.name, line)

    try:
        s.gather(connect_timeout + 10)
        # Not a pool: with --follow, each node streams until Ctrl-C.
        threads = [threading.Thread(target=one, args=(n,), daemon=True) for n in c.nodes]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.5)
        return 0
    finally:
        s.close()
