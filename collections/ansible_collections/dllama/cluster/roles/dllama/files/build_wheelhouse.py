#!/usr/bin/env python3
"""Build the dllama wheel and gather its dependencies' wheels for one kind of host (run on the controller).

    build_wheelhouse.py --source REPO --out DIR --python-version 3.11 --platform manylinux_2_17_aarch64 ...
    build_wheelhouse.py --pack-only --out DIR


The hosts reach no package index, so everything they install comes from DIR. The wheel is built
reproducibly (SOURCE_DATE_EPOCH) from a copy of the sources, so an unchanged tree gives a byte-identical
wheel and Ansible's copy reports no change. Dependencies are taken from DIR when it already has them
(offline), otherwise downloaded, at the exact versions of --constraints when given: the first kind of host
records the versions it got there (name==version per line), every later kind gets the same ones, and only
the pinned versions are packed, so an x86 root and aarch64 workers run the same numba. Finally the wheels are packed into DIR.tar, byte-identical for the same
wheels, so a host receives one file (copying a directory costs Ansible a round trip per file). Prints one
JSON line: {"wheel": name, "changed": bool}; exit 1 with a one-line message on stderr on failure.
"""

from __future__ import annotations

import argparse
import filecmp
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

SOURCE_FILES = ("pyproject.toml", "setup.cfg", "setup.py", "README.md", "LICENSE", "launch.py")
EPOCH_1980 = "315532800"  # zip timestamps cannot go earlier


def can_build_without_isolation() -> bool:
    """Isolated builds fetch setuptools from the index; skip that when the controller already has it."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    import setuptools

    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


def build_wheel(source: str, workdir: str) -> str:
    src = os.path.join(workdir, "src")
    os.makedirs(src)
    for name in SOURCE_FILES:
        if os.path.exists(os.path.join(source, name)):
            shutil.copy2(os.path.join(source, name), src)
    shutil.copytree(os.path.join(source, "dllama"), os.path.join(src, "dllama"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc"))
    out = os.path.join(workdir, "out")
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", out, src]
    if can_build_without_isolation():
        cmd.insert(5, "--no-build-isolation")
    env = dict(os.environ, SOURCE_DATE_EPOCH=EPOCH_1980)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"building the dllama wheel failed: {r.stderr.strip().splitlines()[-1:]}")
    (wheel,) = glob.glob(os.path.join(out, "dllama-*.whl"))
    return wheel


def place(wheel: str, dest_dir: str) -> bool:
    """Put the wheel in dest_dir unless an identical one is there; returns whether anything changed."""
    dest = os.path.join(dest_dir, os.path.basename(wheel))
    if os.path.exists(dest) and filecmp.cmp(wheel, dest, shallow=False):
        return False
    for old in glob.glob(os.path.join(dest_dir, "dllama-*.whl")):
        os.unlink(old)  # only one dllama wheel, so hosts cannot pick a stale one
    tmp = dest + ".part"
    shutil.copyfile(wheel, tmp)
    os.replace(tmp, dest)
    return True


def wheel_pin(filename: str) -> tuple[str, str]:
    """(normalized name, version) of a wheel file name."""
    name, version = filename.split("-")[:2]
    return re.sub(r"[-_.]+", "-", name).lower(), version


def read_pins(path: str | None) -> dict[str, str]:
    pins = {}
    if path and os.path.exists(path):
        with open(path) as f:
            for line in f:
                name, sep, version = line.strip().partition("==")
                if sep:
                    pins[name] = version
    return pins


def record_pins(path: str, out: str, pins: dict[str, str]) -> dict[str, str]:
    """Add the versions of the wheels in out that path does not pin yet; returns all pins."""
    pins = dict(pins)
    for name in sorted(os.listdir(out)):
        if name.endswith(".whl") and not name.startswith("dllama-"):
            pins.setdefault(*wheel_pin(name))
    text = "".join(f"{n}=={v}\n" for n, v in sorted(pins.items()))
    if not os.path.exists(path) or open(path).read() != text:
        with open(path + ".part", "w") as f:
            f.write(text)
        os.replace(path + ".part", path)
    return pins


def download_dependencies(wheel: str, out: str, python_version: str, platforms: list[str], extras: str,
                          constraints: str | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", out, "--only-binary=:all:",
           "--implementation", "cp", "--python-version", python_version]
    if constraints and os.path.exists(constraints):
        cmd += ["--constraint", constraints]
    for p in platforms:
        cmd += ["--platform", p]
    if extras:
        wheel += f"[{extras}]"
    offline = subprocess.run(cmd + ["--no-index", "--find-links", out, wheel], capture_output=True, text=True)
    if offline.returncode == 0:
        return
    # An index page that fails to load reads to pip as "no matching distribution": a passing network
    # fault must not fail the deployment, so the download is tried three times.
    for attempt in range(3):
        online = subprocess.run(cmd + [wheel], capture_output=True, text=True)
        if online.returncode == 0:
            return
        time.sleep(5 * (attempt + 1))
    last = (online.stderr.strip().splitlines() or ["?"])[-1]
    raise SystemExit(f"downloading dependency wheels for Python {python_version} {platforms} failed: {last}")


def pack(out: str, pins: dict[str, str] | None = None) -> bool:
    """Write out + ".tar" from the wheels in out (with pins, only dllama's and the pinned versions),
    reproducibly; returns whether its bytes changed."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(os.listdir(out)):
            if not name.endswith(".whl"):
                continue
            if pins and not name.startswith("dllama-") and pins.get(wheel_pin(name)[0]) != wheel_pin(name)[1]:
                continue  # an earlier version left in out
            info = tar.gettarinfo(os.path.join(out, name), arcname=name)
            info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
            with open(os.path.join(out, name), "rb") as f:
                tar.addfile(info, f)
    data = buf.getvalue()
    dest = out.rstrip("/") + ".tar"
    if os.path.exists(dest) and os.path.getsize(dest) == len(data):
        with open(dest, "rb") as f:
            if f.read() == data:
                return False
    with open(dest + ".part", "wb") as f:
        f.write(data)
    os.replace(dest + ".part", dest)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", help="the dllama source tree (has pyproject.toml)")
    ap.add_argument("--out", required=True, help="wheelhouse directory for one kind of host")
    ap.add_argument("--python-version", help="the hosts' Python, e.g. 3.11")
    ap.add_argument("--platform", action="append", help="wheel platform tag (repeatable)")
    ap.add_argument("--extras", default="api", help="extras whose wheels to include too (default api)")
    ap.add_argument("--pack-only", action="store_true", help="only pack the wheels already in --out")
    ap.add_argument("--constraints", help="file of exact versions shared by every kind of host (made if missing)")
    args = ap.parse_args()
    if args.pack_only:
        wheels = glob.glob(os.path.join(args.out, "dllama-*.whl"))
        if len(wheels) != 1:
            raise SystemExit(f"{args.out}: expected one dllama wheel, found {len(wheels)}")
        changed = pack(args.out, read_pins(args.constraints))
        print(json.dumps({"wheel": os.path.basename(wheels[0]), "changed": changed}))
        return 0
    if not (args.source and args.python_version and args.platform):
        raise SystemExit("--source, --python-version and --platform are needed unless --pack-only")
    if not os.path.isfile(os.path.join(args.source, "pyproject.toml")):
        raise SystemExit(f"--source {args.source}: no pyproject.toml there")
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dllama-wheel-") as tmp:
        wheel = build_wheel(args.source, tmp)
        changed = place(wheel, args.out)
    name = os.path.basename(wheel)
    download_dependencies(os.path.join(args.out, name), args.out, args.python_version, args.platform, args.extras,
                          args.constraints)
    pins = record_pins(args.constraints, args.out, read_pins(args.constraints)) if args.constraints else None
    changed = pack(args.out, pins) or changed
    print(json.dumps({"wheel": name, "changed": changed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
