"""Test hosts on one machine: one network namespace per host, each with its own sshd.

Layout (all addresses exist only inside the namespaces created here):

    controller ns  <prefix>c   br0 10.213.0.1/24 (management, SSH)   br1 10.213.1.1/24 (cluster network)
    host i ns      <prefix>hi  eth0 10.213.0.(10+i)/24               eth1 left unconfigured: the
                                                                     static_ip role gives it 10.213.1.(10+i)

With single_interface=True (as a Raspberry Pi with one Ethernet port) there is no eth1 and no br1: br0
carries both networks, and the static_ip role adds 10.213.1.(10+i) to eth0, the very interface SSH
comes in through. eth0's management address is then configured by the host's own
/etc/network/interfaces and brought up with `ifup`, so ifupdown owns it as it would on a real host.

Each host runs `sshd -D` inside `unshare --mount --uts --pid --fork --kill-child --mount-proc`, with
per-host copies bind-mounted over /etc, /opt, /run, /var/log and /root, so playbooks keep their real
paths and the hosts do not see each other's files or processes. Teardown is SIGKILL of the `unshare` process
(`--kill-child` takes everything started on the host with it; `unshare --fork` ignores SIGTERM), then
`ip netns del`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from testlib import need

MGMT_NET = "10.213.0"
CLUSTER_NET = "10.213.1"
REQUIRED_TOOLS = ("ip", "unshare", "sshd", "ssh", "ssh-keygen", "ifup", "systemd-analyze")
# Bind-mounted per host; /etc is a full copy so users, units and interfaces stay apart. /root too: what
# a tool keeps in the SSH user's home (`dllama cluster`'s pid files, Ansible's temporary files) must not
# be shared with the other hosts or with another run on this machine.
PER_HOST_DIRS = ("etc", "opt", "run", "var/log", "root")


# Skip when a prerequisite is missing; under DLLAMA_REQUIRE_ALL_TESTS=1 (CI) fail instead.
require = need


def model_file() -> str:
    from dllama.catalog import resolve_model

    return resolve_model("smollm2_135m_instruct")


def supports_cluster_key() -> bool:
    """The package being deployed knows --cluster-key-file: then the tests deploy with the cluster key
    (the roles' default), otherwise with `dllama_cluster_key: false`."""
    r = subprocess.run([sys.executable, "-m", "dllama", "worker", "--help"], capture_output=True, text=True)
    return "--cluster-key-file" in r.stdout


def missing_prerequisites() -> list[str]:
    """What this machine lacks to run namespace hosts (empty when all is there)."""
    missing = [] if os.geteuid() == 0 else ["root privileges"]
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing += [t for t in REQUIRED_TOOLS if shutil.which(t, path=path) is None]
    return missing


def _run(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


@dataclass
class Host:
    name: str          # inventory name and hostname, e.g. node1
    netns: str
    index: int
    workdir: str       # per-host directories live under here
    proc: subprocess.Popen | None = None
    sshd_log: str = ""

    @property
    def mgmt_ip(self) -> str:
        return f"{MGMT_NET}.{10 + self.index}"

    @property
    def cluster_ip(self) -> str:
        return f"{CLUSTER_NET}.{10 + self.index}"

    def path(self, inside: str) -> str:
        """The controller-side path of a file the host sees at `inside` (under a per-host dir)."""
        for d in PER_HOST_DIRS:
            root = "/" + d
            if inside == root or inside.startswith(root + "/"):
                return os.path.join(self.workdir, d) + inside[len(root):]
        raise ValueError(f"{inside} is shared with the machine, not per host")


@dataclass
class TestHosts:
    n_hosts: int = 2
    single_interface: bool = False
    prefix: str = field(default_factory=lambda: f"dlt{os.getpid() % 100000}")
    workdir: str = ""
    hosts: list[Host] = field(default_factory=list)
    host_class = Host  # not a field: subclasses with other kinds of host set it

    @property
    def ctl_ns(self) -> str:
        return f"{self.prefix}c"

    @property
    def cluster_interface(self) -> str:
        return "eth0" if self.single_interface else "eth1"

    @property
    def key(self) -> str:
        return os.path.join(self.workdir, "id_ed25519")

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> "TestHosts":
        """Create the namespaces and start every host's sshd; raises on failure (call stop() anyway)."""
        self.workdir = tempfile.mkdtemp(prefix=f"{self.prefix}-")
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.key])
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(self.workdir, "hostkey")])
        shutil.copy(self.key + ".pub", os.path.join(self.workdir, "authorized_keys"))
        self._make_controller()
        for i in range(1, self.n_hosts + 1):
            host = self.host_class(f"node{i}", f"{self.prefix}h{i}", i, os.path.join(self.workdir, f"node{i}"))
            self.hosts.append(host)
            self._make_host(host)
        for host in self.hosts:
            self._wait_ssh(host)
        return self

    def stop(self) -> None:
        """Kill every host (and all it started), delete the namespaces and files. Never raises."""
        for host in self.hosts:
            if host.proc is not None and host.proc.poll() is None:
                host.proc.send_signal(signal.SIGKILL)
                host.proc.wait(timeout=10)
        for ns in [h.netns for h in self.hosts] + [self.ctl_ns]:
            _run(["ip", "netns", "del", ns], check=False)
        if self.workdir:
            # rm is much faster than shutil.rmtree on two venvs; never crosses into another file system.
            _run(["rm", "-rf", "--one-file-system", self.workdir], check=False)

    def _make_controller(self) -> None:
        ns = self.ctl_ns
        _run(["ip", "netns", "add", ns])
        sh = ["ip", "-n", ns]
        _run(sh + ["link", "set", "lo", "up"])
        bridges = ["br0"] if self.single_interface else ["br0", "br1"]
        for br in bridges:
            _run(sh + ["link", "add", br, "type", "bridge"])
            _run(sh + ["link", "set", br, "up"])
        _run(sh + ["addr", "add", f"{MGMT_NET}.1/24", "dev", "br0"])
        _run(sh + ["addr", "add", f"{CLUSTER_NET}.1/24", "dev", bridges[-1]])

    def _make_host(self, host: Host) -> None:
        _run(["ip", "netns", "add", host.netns])
        ctl, h = ["ip", "-n", self.ctl_ns], ["ip", "-n", host.netns]
        links = (("eth0", "br0"),) if self.single_interface else (("eth0", "br0"), ("eth1", "br1"))
        for iface, br in links:
            peer = f"{iface[-1]}h{host.index}"
            _run(ctl + ["link", "add", peer, "type", "veth", "peer", "name", iface, "netns", host.netns])
            _run(ctl + ["link", "set", peer, "master", br, "up"])
        _run(h + ["link", "set", "lo", "up"])
        if not self.single_interface:  # otherwise the host's ifupdown brings eth0 up (_start_sshd)
            _run(h + ["addr", "add", f"{host.mgmt_ip}/24", "dev", "eth0"])
            _run(h + ["link", "set", "eth0", "up"])
        self._make_host_dirs(host)
        self._start_sshd(host)

    def _make_host_dirs(self, host: Host) -> None:
        os.makedirs(host.workdir)
        _run(["cp", "-a", "/etc", os.path.join(host.workdir, "etc")])
        for d in PER_HOST_DIRS[1:]:
            os.makedirs(os.path.join(host.workdir, d))
        os.makedirs(host.path("/run/sshd"), mode=0o755)
        os.makedirs(host.path("/run/network"))
        # Lookups against an unreachable nameserver made fact gathering take ~10 s per host.
        with open(host.path("/etc/resolv.conf"), "w") as f:
            f.write("")
        with open(host.path("/etc/hosts"), "w") as f:
            f.write(f"127.0.0.1 localhost\n{host.mgmt_ip} {host.name}\n")
        with open(host.path("/etc/hostname"), "w") as f:
            f.write(host.name + "\n")
        # The machine's own sshd/network config must not leak into the host's: start from clean dirs.
        shutil.rmtree(host.path("/etc/network/interfaces.d"), ignore_errors=True)
        os.makedirs(host.path("/etc/network/interfaces.d"))
        if self.single_interface:
            with open(host.path("/etc/network/interfaces"), "w") as f:
                f.write(f"source /etc/network/interfaces.d/*\n\nauto eth0\niface eth0 inet static\n"
                        f"    address {host.mgmt_ip}/24\n")

    def _start_sshd(self, host: Host) -> None:
        cfg = os.path.join(host.workdir, "sshd_config")
        with open(cfg, "w") as f:
            f.write(
                f"ListenAddress {'0.0.0.0' if self.single_interface else host.mgmt_ip}\nHostKey {self.workdir}/hostkey\n"
                f"AuthorizedKeysFile {self.workdir}/authorized_keys\nPermitRootLogin prohibit-password\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                "PidFile none\nSubsystem sftp internal-sftp\nMaxSessions 50\nMaxStartups 50\n"
            )
        binds = " && ".join(
            f"mount --bind {os.path.join(host.workdir, d)} /{d}" for d in PER_HOST_DIRS
        )
        up = " && /sbin/ifup eth0" if self.single_interface else ""
        script = f"{binds} && hostname {host.name}{up} && exec /usr/sbin/sshd -D -e -f {cfg}"
        host.sshd_log = os.path.join(self.workdir, f"{host.name}-sshd.log")
        with open(host.sshd_log, "w") as log:
            host.proc = subprocess.Popen(
                ["ip", "netns", "exec", host.netns, "unshare", "--mount", "--uts", "--pid", "--fork",
                 "--kill-child", "--mount-proc", "sh", "-c", script],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )

    def _wait_ssh(self, host: Host, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            r = self.ssh(host, "true", check=False, timeout=10)
            if r.returncode == 0:
                return
            if host.proc.poll() is not None or time.monotonic() > deadline:
                with open(host.sshd_log) as f:
                    log = f.read()
                raise RuntimeError(f"sshd on {host.name} did not come up: {r.stderr.strip()}\n{log}")
            time.sleep(0.2)

    # ---- using the hosts -------------------------------------------------------------------------
    def ssh_options(self) -> list[str]:
        return ["-i", self.key, "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5"]

    def ssh(self, host: Host, command: str, check: bool = True, timeout: float = 120, address: str = ""):
        """Run a shell command on a host (in its namespaces) as root, through its management address
        unless another is given."""
        return self.in_controller(["ssh", *self.ssh_options(), f"root@{address or host.mgmt_ip}", command],
                                  check=check, timeout=timeout)

    def in_controller(self, cmd: list[str], check: bool = True, timeout: float = 600, env=None):
        """Run a command in the controller namespace (where ansible-playbook and Fabric run)."""
        r = subprocess.run(["ip", "netns", "exec", self.ctl_ns, *cmd], capture_output=True, text=True,
                           timeout=timeout, env=env)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def inventory(self, path: str, root: int = 1, extra_vars: dict | None = None,
                  host_vars: dict[str, dict] | None = None) -> str:
        """Write an Ansible inventory: host `root` in dllama_root, the others in dllama_workers."""
        import yaml

        def entry(h: Host) -> dict:
            return {"ansible_host": h.mgmt_ip, "dllama_address": h.cluster_ip, **(host_vars or {}).get(h.name, {})}

        root_host = self.hosts[root - 1]
        workers = [h for h in self.hosts if h is not root_host]
        inv = {"all": {
            "vars": {"ansible_user": "root", "ansible_become": False,
                     "ansible_python_interpreter": "/usr/bin/python3",
                     "ansible_ssh_private_key_file": self.key,
                     "static_ip_interface": self.cluster_interface, "static_ip_prefix": 24,
                     "dllama_worker_threads": 1, "dllama_root_threads": 1,
                     # the test hosts share this machine's cores: a spinning node would hold the core its peer needs
                     "dllama_worker_spin_us": 0, "dllama_root_spin_us": 0,
                     **(extra_vars or {})},
            "children": {
                "dllama_root": {"hosts": {root_host.name: entry(root_host)}},
                "dllama_workers": {"hosts": {h.name: entry(h) for h in workers}},
            },
        }}
        with open(path, "w") as f:
            yaml.safe_dump(inv, f, sort_keys=False)
        return path


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The roles' collection: playbooks name them dllama.cluster.ROLE.
COLLECTION = "dllama.cluster"
ROLES = os.path.join(REPO, "collections", "ansible_collections", *COLLECTION.split("."), "roles")


def ansible_tool(name: str) -> str | None:
    """An Ansible executable next to this Python (a venv) or on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return beside if os.path.exists(beside) else shutil.which(name)


def run_playbook(hosts: TestHosts, playbook: str, inventory: str, *args: str, timeout: float = 600):
    """ansible-playbook from the controller namespace with the repo's ansible.cfg; returns the result."""
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(REPO, "ansible.cfg"), ANSIBLE_HOST_KEY_CHECKING="False",
               # Per run: the same address in another run's namespaces must never share an SSH master.
               ANSIBLE_SSH_CONTROL_PATH_DIR=os.path.join(hosts.workdir, "cp"),
               ANSIBLE_LOCAL_TEMP=os.path.join(hosts.workdir, "ansible-tmp"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_FORCE_COLOR="0", ANSIBLE_CALLBACKS_ENABLED="junit",
               JUNIT_OUTPUT_DIR=os.path.join(hosts.workdir, "junit"), JUNIT_TASK_CLASS="yes")
    cmd = [ansible_tool("ansible-playbook"), "-i", inventory, os.path.join(REPO, "playbooks", playbook), *args]
    env["ANSIBLE_COLLECTIONS_PATH"] = os.path.join(REPO, "collections")
    return hosts.in_controller(cmd, check=False, timeout=timeout, env=env)


def new_build(tmp_path, marker: str) -> dict:
    """Extra vars for update.yml: a source tree that differs from the deployed one by a module
    `dllama._deploy_marker` holding VALUE = marker, built offline with the first run's dependency wheels."""
    src = tmp_path / "src"
    shutil.copytree(os.path.join(REPO, "dllama"), src / "dllama",
                    ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc"))
    for name in ("pyproject.toml", "README.md"):
        if os.path.exists(os.path.join(REPO, name)):
            shutil.copy(os.path.join(REPO, name), src)
    (src / "dllama" / "_deploy_marker.py").write_text(f"VALUE = {marker!r}\n")
    wheelhouse = tmp_path / "wheelhouse"
    shutil.copytree(os.path.join(REPO, "build", "wheelhouse"), wheelhouse,
                    ignore=shutil.ignore_patterns("*.tar", "dllama-*.whl"))
    return {"dllama_source_dir": str(src), "dllama_wheelhouse": str(wheelhouse), "dllama_warm_numba_cache": False}


def recap(output: str) -> dict:
    """The PLAY RECAP counters per test host: {"node1": {"ok": 5, "changed": 0, ...}} (not localhost, where
    the playbooks only check that there is an inventory)."""
    out = {}
    lines = output.split("PLAY RECAP", 1)[-1].splitlines()[1:]
    for line in lines:
        if ":" not in line:
            continue
        name, _, rest = line.partition(":")
        if name.strip() == "localhost":
            continue
        counters = dict(kv.split("=") for kv in rest.split())
        out[name.strip()] = {k: int(v) for k, v in counters.items()}
    return out


def assert_network_part_changes_nothing(hosts: TestHosts, inventory: str) -> None:
    """The whole deploy limited to its network part, after network.yml: the checks and static_ip run,
    nothing else, and they find nothing to change."""
    r = run_playbook(hosts, "deploy.yml", inventory, "--tags", "network", timeout=300)
    assert r.returncode == 0, r.stdout[-4000:]
    assert roles_run(r.stdout) == {"preflight", "static_ip"}, r.stdout[-6000:]
    assert all(c["changed"] == 0 for c in recap(r.stdout).values()), r.stdout[-4000:]


def roles_run(output: str) -> set[str]:
    """The roles whose tasks ran in a play's output (not their argument checks, which Ansible tags always)."""
    import re

    return {m.group(1) for m in re.finditer(rf"^TASK \[{re.escape(COLLECTION)}\.(\w+) : (?!Validating arguments)",
                                            output, re.M)}
