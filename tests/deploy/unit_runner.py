"""Run a systemd service unit's ExecStart the way systemd would, where systemd is not PID 1 (tests).

    python3 unit_runner.py /etc/systemd/system/dllama-worker.service

What is honoured from [Service]: ExecStart (the exact command line), User, Group, Environment, Nice,
NoNewPrivileges, Restart=on-failure|always with RestartSec. The sandboxing keys (ProtectSystem, PrivateTmp,
...) need systemd itself and are not reproduced; `systemd-analyze verify` checks them instead. SIGTERM stops
the child and the runner, as `systemctl stop` would. Standard library only: it runs with the host's python3.
"""

from __future__ import annotations

import configparser
import ctypes
import grp
import os
import pwd
import shlex
import signal
import subprocess
import sys
import time

CLEAN_SIGNALS = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE}  # systemd's "clean" exits
PR_SET_NO_NEW_PRIVS = 38


def read_service(path: str) -> dict:
    """[Service] of the unit and its drop-ins (UNIT.d/*.conf, in name order, later keys win)."""
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str  # keys are case-sensitive in units
    dropins = path + ".d"
    names = sorted(n for n in os.listdir(dropins) if n.endswith(".conf")) if os.path.isdir(dropins) else []
    for p in [path, *(os.path.join(dropins, n) for n in names)]:
        with open(p) as f:
            cp.read_file(f)
    return dict(cp["Service"])


def environment(spec: str) -> dict:
    return dict(item.split("=", 1) for item in shlex.split(spec))


def preexec(svc: dict):
    user = svc.get("User")
    nice = int(svc.get("Nice", "0"))
    no_new_privs = svc.get("NoNewPrivileges", "no").lower() in ("yes", "true", "1")

    def setup():
        os.setsid()
        os.setpriority(os.PRIO_PROCESS, 0, nice)
        if no_new_privs:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        if user:
            pw = pwd.getpwnam(user)
            gid = grp.getgrnam(svc["Group"]).gr_gid if svc.get("Group") else pw.pw_gid
            os.setgroups([])
            os.setgid(gid)
            os.setuid(pw.pw_uid)

    return setup


def should_restart(policy: str, returncode: int) -> bool:
    if policy == "always":
        return True
    if policy != "on-failure":
        return False
    if returncode < 0:
        return signal.Signals(-returncode) not in CLEAN_SIGNALS
    return returncode != 0


def main(unit_path: str) -> int:
    svc = read_service(unit_path)
    argv = shlex.split(svc["ExecStart"])
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    env.update(environment(svc.get("Environment", "")))
    child = None
    stopping = False

    # Only signal the child here: waiting inside the handler would deadlock on the lock Popen.wait()
    # holds in the interrupted main loop.
    def stop(signum, frame):
        nonlocal stopping
        stopping = True
        if child is not None:
            child.terminate()

    signal.signal(signal.SIGTERM, stop)
    while not stopping:
        print(f"unit_runner: starting {' '.join(argv)}", flush=True)
        child = subprocess.Popen(argv, env=env, cwd="/", preexec_fn=preexec(svc), stdin=subprocess.DEVNULL)
        rc = child.wait()
        print(f"unit_runner: exited with {rc}", flush=True)
        if stopping:
            return 0
        if not should_restart(svc.get("Restart", "no"), rc):
            return rc if rc >= 0 else 128 - rc
        time.sleep(float(svc.get("RestartSec", "0.1").rstrip("s")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
