#!/usr/bin/env python3
"""Print the name of the .network file systemd-networkd applies to an interface (nothing if none).

    networkd_file.py IFACE

Asks networkd when it runs; otherwise reads the files as networkd would: the first by file name
across /etc, /run and /usr/lib (a name in /etc hides the same name in the others) whose [Match]
Name= globs match the interface. Other [Match] keys are not evaluated, so such a file counts as
matching: the caller then adds a drop-in rather than a file that could take the interface over.
"""

import configparser
import fnmatch
import os
import subprocess
import sys

DIRS = ("/etc/systemd/network", "/run/systemd/network", "/usr/lib/systemd/network", "/lib/systemd/network")


def from_networkd(iface: str) -> str | None:
    try:
        r = subprocess.run(["networkctl", "status", "--no-pager", iface], capture_output=True, text=True,
                           timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in r.stdout.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "Network File" and value.strip().startswith("/"):
            return os.path.basename(value.strip())
    return None


def link_type(iface: str) -> str:
    sys_dir = f"/sys/class/net/{iface}"
    if os.path.isdir(f"{sys_dir}/wireless"):
        return "wlan"
    try:
        with open(f"{sys_dir}/type") as f:
            return {"1": "ether", "772": "loopback"}.get(f.read().strip(), "other")
    except OSError:
        return "other"


def globs_match(patterns: str, value: str) -> bool:
    negate = patterns.startswith("!")
    hit = any(fnmatch.fnmatchcase(value, g) for g in patterns.lstrip("!").split())
    return hit != negate


def matches(path: str, iface: str) -> bool:
    """Name= and Type= are evaluated; a Kind= (bridge, tunnel, ...) never fits the plain interface a
    cluster uses; any other key counts as matching, so an unsure answer leads to a drop-in."""
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    try:
        cp.read(path)
    except configparser.Error:
        return False
    m = cp["Match"] if cp.has_section("Match") else {}
    if "Kind" in m:
        return False
    if "Name" in m and not globs_match(m["Name"], iface):
        return False
    if "Type" in m and not globs_match(m["Type"], link_type(iface)):
        return False
    return True


def from_files(iface: str) -> str | None:
    seen = {}
    for d in DIRS:
        if os.path.isdir(d):
            for name in os.listdir(d):
                if name.endswith(".network") and name not in seen:
                    seen[name] = os.path.join(d, name)
    for name in sorted(seen):
        if matches(seen[name], iface):
            return name
    return None


def main() -> int:
    iface = sys.argv[1]
    print(from_networkd(iface) or from_files(iface) or "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
