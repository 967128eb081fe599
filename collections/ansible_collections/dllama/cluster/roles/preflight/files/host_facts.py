#!/usr/bin/env python3
"""What preflight needs to know about a host, as one JSON line (standard library; any Python 3).

    host_facts.py DIR [NAME...]

DIR: where the model files go; its free space is measured on the nearest existing parent, and the
files NAME already there are counted (a re-run overwrites them in place of needing more space).
"""

import json
import os
import platform
import shutil
import struct
import subprocess
import sys


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def disk_free(path: str) -> int:
    while not os.path.exists(path):
        path = os.path.dirname(path) or "/"
    return shutil.disk_usage(path).free


def clock_synced():
    """True/False when timedatectl or chrony can tell, None when neither can."""
    try:
        r = subprocess.run(["timedatectl", "show", "--property=NTPSynchronized", "--value"],
                           capture_output=True, text=True, timeout=10)
        if r.returncode == 0 and r.stdout.strip() in ("yes", "no"):
            return r.stdout.strip() == "yes"
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        r = subprocess.run(["chronyc", "tracking"], capture_output=True, text=True, timeout=10)
        if r.returncode == 0:
            return "Leap status     : Normal" in r.stdout
    except (OSError, subprocess.TimeoutExpired):
        pass
    return None


print(json.dumps({
    "machine": platform.machine(),
    # A 32-bit userland on a 64-bit kernel reports aarch64 as its machine: the pointer size tells.
    "bits": struct.calcsize("P") * 8,
    "python": "%d.%d" % sys.version_info[:2],
    # numba's thread pool is at most this large (NUMBA_NUM_THREADS defaults to it).
    "cpus": os.cpu_count() or 1,
    "mem_available": mem_available(),
    "disk_free": disk_free(sys.argv[1]),
    "present": sum(os.path.getsize(os.path.join(sys.argv[1], n)) for n in sys.argv[2:]
                   if os.path.isfile(os.path.join(sys.argv[1], n))),
    "clock_synced": clock_synced(),
}))
