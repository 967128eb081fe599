"""`--m-keys auto|2024|2025`: reading a `.m` file with the key set it was written with, whatever its header
looks like, and a one-line error when the forced set does not fit the file.

The reference's 2025 converter reuses arch ids 0xABCD01/02 (Grok-1 and Mixtral in Oct 2024) for Qwen3 and
Qwen3-MoE; `auto` tells them apart by the keys only 2025 writes. A 2025 Qwen3-MoE file whose header has
none of them (head_dim = dim / heads, epsilon 1e-5, experts as wide as hidden_dim) reads as Mixtral under
`auto`; `--m-keys 2025` reads it.
"""

from __future__ import annotations

import dataclasses
import struct
import subprocess
import sys

import numpy as np
import pytest

from dllama import quants
from dllama.errors import FormatError
from dllama.formats import dlm
from dllama.formats.loader import load_model
from dllama.schema import grok_dlm_scalings
from unit.test_formats_dlm import REF_KEYS, TINY, source_tensors

QWEN3 = dataclasses.replace(TINY, arch="qwen3", rope_type="falcon", norm_eps=1e-6, weight_type="f32")
# a Qwen3-MoE whose 2025 header needs none of keys 19-21 but for the head_dim our writer always adds
QWEN3_MOE_PLAIN = dataclasses.replace(TINY, arch="qwen3_moe", rope_type="falcon", n_experts=3, n_active_experts=2,
                                      weight_type="f32")
MIXTRAL = dataclasses.replace(TINY, arch="mixtral", rope_type="llama", n_experts=3, n_active_experts=2,
                              weight_type="f32")
# a Grok-1 `.m` header has no keys for its scalings: the writer takes only those a `.m` file implies
GROK = dataclasses.replace(MIXTRAL, arch="grok1", hidden_act="gelu", **grok_dlm_scalings(MIXTRAL.head_dim))


def write(path, spec, drop_2025_keys=False):
    src = source_tensors(spec)
    dlm.write_dlm(str(path), spec, [(n, src[n]) for n, _, _ in dlm.dlm_layout(spec, dlm.write_key_set(spec))])
    if drop_2025_keys:
        write_without_2025_keys(path)
    return str(path), src


def write_without_2025_keys(path) -> None:
    """Rewrites the `.m` at `path` without keys 19-21, as a writer that states only what differs from the
    Oct 2024 defaults would leave a header whose values are those defaults."""
    raw = path.read_bytes()
    size = struct.unpack_from("<i", raw, 4)[0]
    ints = struct.unpack_from(f"<{(size - 8) // 4}i", raw, 8)
    pairs = [(k, v) for k, v in zip(ints[0::2], ints[1::2]) if k < REF_KEYS["head_dim"]]
    body = b"".join(struct.pack("<ii", k, v) for k, v in pairs)
    path.write_bytes(struct.pack("<ii", dlm.DLM_MAGIC, 8 + len(body)) + body + raw[size:])


def test_qwen3_2025_file_reads_as_qwen3_with_auto_and_2025_and_refuses_2024(tmp_path):
    path, src = write(tmp_path / "q.m", QWEN3)
    for keys in ("auto", "2025"):
        with load_model(path, keys) as m:
            assert (m.spec.arch, m.spec.extra["dlm_key_set"], m.spec.norm_eps) == ("qwen3", "2025", 1e-6)
            np.testing.assert_array_equal(m.tensors["layers.1.k_norm"].to_f32(), src["layers.1.k_norm"])
    with pytest.raises(FormatError, match=r"q\.m: does not fit --m-keys 2024: its header has norm_epsilon, "
                                          r"a key only the 2025 set has"):
        load_model(path, "2024")


def test_qwen3_moe_without_the_new_keys_needs_the_flag(tmp_path):
    path, src = write(tmp_path / "qm.m", QWEN3_MOE_PLAIN, drop_2025_keys=True)
    with pytest.raises(FormatError):   # read as an Oct 2024 Mixtral: no q/k norms, so the sizes disagree
        load_model(path)
    with load_model(path, "2025") as m:
        assert (m.spec.arch, m.spec.n_experts, m.spec.extra["dlm_key_set"]) == ("qwen3_moe", 3, "2025")
        for name, x in src.items():
            np.testing.assert_array_equal(m.tensors[name].data, quants.quantize("f32", x).ravel())


@pytest.mark.parametrize("spec, says", [
    (MIXTRAL, r"does not fit --m-keys 2025 \(read as a 2025 qwen3_moe file: .*\)"),
    (GROK, "does not fit --m-keys 2025: arch 0xabcd01 is dense Qwen3 there, and this file has 3 experts"),
])
def test_2024_moe_files_refuse_2025(tmp_path, spec, says):
    path, _ = write(tmp_path / "x.m", spec)
    for keys in ("auto", "2024"):
        with load_model(path, keys) as m:
            assert (m.spec.arch, m.spec.extra["dlm_key_set"]) == (spec.arch, "2024")
    with pytest.raises(FormatError, match=says):
        load_model(path, "2025")


def test_commands_take_the_flag_and_print_one_line(tmp_path):
    path, _ = write(tmp_path / "q.m", QWEN3)
    for cmd in (["inference", "--prompt", "hi", "--steps", "1"], ["chat"]):
        proc = subprocess.run([sys.executable, "-m", "dllama", *cmd, "--model", path, "--m-keys", "2024"],
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("dllama: error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert "does not fit --m-keys 2024" in proc.stderr
    plain, _ = write(tmp_path / "qm.m", QWEN3_MOE_PLAIN, drop_2025_keys=True)
    out = tmp_path / "fixed.m"
    proc = subprocess.run([sys.executable, "-m", "dllama", "convert", "--model", plain, "--m-keys", "2025",
                           "--output-model", str(out), "--weight-type", "f32"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    with load_model(str(out)) as m:   # written with the head_dim key: auto reads it now
        assert m.spec.arch == "qwen3_moe"
    proc = subprocess.run([sys.executable, "-m", "dllama", "convert", "--model", plain, "--m-keys", "2026",
                           "--output-model", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--m-keys: invalid choice: '2026'" in proc.stderr
