"""Running shell commands on a node: over SSH with Fabric, or on this machine for local nodes."""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass

from dllama.cluster.inventory import Node
from dllama.errors import DllamaError


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


class LocalRunner:
    """A node with `ansible_connection: local`: commands run here, through /bin/sh."""

    def __init__(self, node: Node):
        self.node = node

    def run(self, command: str, timeout: float = 60) -> Result:
        try:
            r = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, timeout=timeout,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return Result(124, "", f"timed out after {timeout:.0f} s: {command}")
        return Result(r.returncode, r.stdout, r.stderr)

    def stream(self, command: str, on_line) -> None:
        with subprocess.Popen(["/bin/sh", "-c", command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, text=True) as p:
            for line in p.stdout:
                on_line(line.rstrip("\n"))

    def close(self) -> None:
        pass


# paramiko logs connection failures with tracebacks from its own thread; the caller reports them in one line.
logging.getLogger("paramiko").addHandler(logging.NullHandler())
logging.getLogger("paramiko").propagate = False


class SshRunner:
    """A node reached over SSH (Fabric): the inventory's host, user, port and key."""

    def __init__(self, node: Node, connect_timeout: float = 10):
        try:
            from fabric import Connection
        except ImportError:
            raise DllamaError("dllama cluster needs Fabric for SSH hosts: pip install 'dllama[cluster]'") from None
        kwargs = {"key_filename": [node.ssh_key]} if node.ssh_key else {}
        self.node = node
        self.conn = Connection(node.ssh_host, user=node.ssh_user, port=node.ssh_port,
                               connect_timeout=connect_timeout, connect_kwargs=kwargs)

    def run(self, command: str, timeout: float = 60) -> Result:
        try:
            r = self.conn.run(command, hide=True, warn=True, timeout=timeout, in_stream=False)
        except Exception as exc:  # paramiko/socket errors have no common base worth naming
            return Result(255, "", f"cannot reach {self.node.name} ({self.node.ssh_host}): {_reason(exc)}")
        return Result(r.exited, r.stdout, r.stderr)

    def stream(self, command: str, on_line) -> None:
        class Out:
            def __init__(self):
                self.buf = ""

            def write(self, data):
                self.buf += data
                *lines, self.buf = self.buf.split("\n")
                for line in lines:
                    on_line(line)

            def flush(self):
                pass

        self.conn.run(command, warn=True, out_stream=Out(), err_stream=Out(), in_stream=False)

    def close(self) -> None:
        self.conn.close()


def _reason(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def runner_for(node: Node, connect_timeout: float = 10):
    return LocalRunner(node) if node.local else SshRunner(node, connect_timeout)
