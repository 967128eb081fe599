#!/usr/bin/env python3
"""Replace an interface's ifupdown configuration by one static stanza, and undo it unless confirmed.

    ifupdown_switch.py --iface eth0 --stanza FILE --timeout 90 --confirm /run/dllama-static-ip.confirmed

Runs detached on the host (Ansible's async): the controller loses its connection when the old address
goes. Backs up /etc/network/interfaces and interfaces.d/dllama-IFACE, takes the interface down with its
old configuration (releasing a DHCP lease), comments out its other stanzas, installs FILE as
interfaces.d/dllama-IFACE and brings the interface up. If the confirm file does not appear within
--timeout seconds (the controller could not reach the new address), everything is put back and the
interface comes up as before. Standard library only: it runs with the host's python3.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

MAIN = "/etc/network/interfaces"
KEYWORDS = re.compile(r"^(iface|auto|allow-\S+|mapping|source|source-directory|rename)\b")


def without_stanzas(text: str, iface: str) -> str:
    """The file with iface's stanzas and auto/allow lines commented out; everything else as it was."""
    out, inside = [], False
    for line in text.splitlines(keepends=True):
        words = line.split()
        if KEYWORDS.match(line):
            inside = words[0] == "iface" and len(words) > 1 and words[1] == iface
            if inside or ((words[0] == "auto" or words[0].startswith("allow-")) and words[1:] == [iface]):
                out.append("# dllama: " + line)
                continue
        out.append(("# dllama: " + line) if inside and line.strip() else line)
    return "".join(out)


def run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    print(f"{' '.join(cmd)}: exit {r.returncode} {r.stderr.strip()}", flush=True)


def wait_for(path: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        time.sleep(1.0)
    return os.path.exists(path)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iface", required=True)
    ap.add_argument("--stanza", required=True)
    ap.add_argument("--timeout", type=float, required=True)
    ap.add_argument("--confirm", required=True)
    a = ap.parse_args()
    ours = f"/etc/network/interfaces.d/dllama-{a.iface}"
    backup = os.path.dirname(a.stanza)
    with open(MAIN) as f:
        main_text = f.read()
    shutil.copy2(MAIN, os.path.join(backup, "interfaces.orig"))
    had_ours = os.path.exists(ours)
    if had_ours:
        shutil.copy2(ours, os.path.join(backup, "ours.orig"))
    if os.path.exists(a.confirm):
        os.unlink(a.confirm)

    run("ifdown", a.iface)
    run("ip", "-4", "addr", "flush", "dev", a.iface, "scope", "global")
    with open(MAIN + ".dllama-new", "w") as f:
        f.write(without_stanzas(main_text, a.iface))
    os.replace(MAIN + ".dllama-new", MAIN)
    shutil.copy2(a.stanza, ours)
    run("ifup", a.iface)
    if wait_for(a.confirm, a.timeout):
        print("confirmed: keeping the new configuration", flush=True)
        return 0

    print(f"not confirmed within {a.timeout:.0f} s: reverting", flush=True)
    run("ifdown", a.iface)
    run("ip", "-4", "addr", "flush", "dev", a.iface, "scope", "global")
    shutil.copy2(os.path.join(backup, "interfaces.orig"), MAIN)
    if had_ours:
        shutil.copy2(os.path.join(backup, "ours.orig"), ours)
    else:
        os.unlink(ours)
    run("ifup", a.iface)
    return 1


if __name__ == "__main__":
    sys.exit(main())
