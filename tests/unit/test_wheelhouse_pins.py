"""build_wheelhouse.py pins the dependency versions: every kind of host gets the versions the first got,
and only those (plus the dllama wheel) are packed, whatever older wheels the directory still holds."""

from __future__ import annotations

import importlib.util
import os
import tarfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "collections", "ansible_collections", "dllama", "cluster", "roles", "dllama", "files",
                      "build_wheelhouse.py")


def load():
    spec = importlib.util.spec_from_file_location("build_wheelhouse", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def wheels(d, names):
    os.makedirs(d, exist_ok=True)
    for n in names:
        with open(os.path.join(d, n), "wb") as f:
            f.write(n.encode())


def test_first_kind_of_host_records_the_pins_and_later_kinds_keep_them(tmp_path):
    bw = load()
    cons = str(tmp_path / "constraints.txt")
    x86 = str(tmp_path / "cp311-x86_64")
    wheels(x86, ["dllama-0.1.0-py3-none-any.whl", "numba-0.68.0-cp311-cp311-manylinux_2_28_x86_64.whl",
                 "llvmlite-0.50.0-cp311-cp311-manylinux_2_27_x86_64.whl", "typing_extensions-4.12.2-py3-none-any.whl"])
    pins = bw.record_pins(cons, x86, bw.read_pins(cons))
    assert open(cons).read() == "llvmlite==0.50.0\nnumba==0.68.0\ntyping-extensions==4.12.2\n"
    # The aarch64 directory also holds a newer numba (an earlier, unpinned run): it must not be packed.
    arm = str(tmp_path / "cp311-aarch64")
    wheels(arm, ["dllama-0.1.0-py3-none-any.whl", "numba-0.68.0-cp311-cp311-manylinux_2_28_aarch64.whl",
                 "numba-0.68.1-cp311-cp311-manylinux_2_28_aarch64.whl", "cffi-1.17.1-cp311-cp311-manylinux_2_17_aarch64.whl"])
    pins = bw.record_pins(cons, arm, bw.read_pins(cons))
    assert pins["numba"] == "0.68.0" and pins["cffi"] == "1.17.1"  # a dependency only this kind needs joins
    assert bw.pack(arm, pins)
    with tarfile.open(arm + ".tar") as tar:
        packed = sorted(tar.getnames())
    assert packed == ["cffi-1.17.1-cp311-cp311-manylinux_2_17_aarch64.whl", "dllama-0.1.0-py3-none-any.whl",
                      "numba-0.68.0-cp311-cp311-manylinux_2_28_aarch64.whl"]
    assert not bw.pack(arm, pins)  # byte-identical the second time
