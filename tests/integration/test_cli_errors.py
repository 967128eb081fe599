"""Bad input: a one-line error naming the problem, exit status 2, no traceback (issue 2's list)."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys

import pytest

from dllama.formats.random_model import preset_spec, write_random_model

pytestmark = pytest.mark.slow


LOADING = re.compile(r"(root: reading and packing weights|weights to worker \S+): .*B/s")


def dllama(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "dllama", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def assert_one_line_error(res, *needles):
    assert res.returncode == 2, (res.returncode, res.stderr)
    # the loading progress (an error found once the model is loaded comes after it) is not part of the error
    lines = [l for l in res.stderr.splitlines() if l.strip() and not l.startswith("compiling kernels")
             and not LOADING.match(l)]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_m(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny.m"
    spec = preset_spec("smollm2_135m", n_layers=1, dim=64, hidden_dim=128, n_heads=4, n_kv_heads=2,
                       vocab_size=256, seq_len=64)
    write_random_model(str(path), spec, seed=0)
    return path


def test_missing_model_file(tmp_path):
    missing = tmp_path / "nope.m"
    assert_one_line_error(dllama("inference", "--model", str(missing), "--prompt", "x"), str(missing))


def test_directory_as_model(tmp_path):
    assert_one_line_error(dllama("inference", "--model", str(tmp_path), "--prompt", "x"), str(tmp_path))


def test_truncated_m_file(tiny_m, tmp_path):
    cut = tmp_path / "cut.m"
    cut.write_bytes(tiny_m.read_bytes()[:-100])
    assert_one_line_error(dllama("inference", "--model", str(cut), "--prompt", "x"), "cut.m", "truncated")


def test_wrong_magic(tmp_path):
    bad = tmp_path / "bad.m"
    bad.write_bytes(b"\x01\x02\x03\x04" + bytes(100))
    assert_one_line_error(dllama("inference", "--model", str(bad), "--prompt", "x"), "bad.m")


def test_unknown_header_key(tiny_m, tmp_path):
    data = bytearray(tiny_m.read_bytes())
    # the first key/value pair sits after magic and header size: make its key one no version defines
    struct.pack_into("<i", data, 8, 999)
    bad = tmp_path / "key.m"
    bad.write_bytes(bytes(data))
    assert_one_line_error(dllama("inference", "--model", str(bad), "--prompt", "x"), "key.m", "999")


def test_unsupported_gguf_tensor_type(tmp_path):
    import gguf
    import numpy as np

    # IQ4_NL (blocks of 32 values in 18 bytes): a type llama.cpp writes and dllama does not read
    path = tmp_path / "iq4.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("blk.0.attn_q.weight", np.zeros((2, 256 // 32 * 18), np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    assert_one_line_error(dllama("inference", "--model", str(path), "--prompt", "x"), "IQ4_NL")


def test_unsupported_gguf_architecture(tmp_path):
    import gguf

    path = tmp_path / "arch.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    assert_one_line_error(dllama("inference", "--model", str(path), "--prompt", "x"), "mamba")


def test_nthreads_zero(smollm2_path):
    assert_one_line_error(dllama("inference", "--model", smollm2_path, "--prompt", "x", "--nthreads", "0"),
                          "--nthreads")


def test_prompt_longer_than_context(smollm2_path):
    res = dllama("inference", "--model", smollm2_path, "--prompt", "word " * 200, "--max-seq-len", "64",
                 "--steps", "4")
    assert_one_line_error(res, "context")


def test_steps_past_max_seq_len(smollm2_path):
    res = dllama("inference", "--model", smollm2_path, "--prompt", "hi", "--max-seq-len", "64", "--steps", "100")
    assert_one_line_error(res, "--steps", "--max-seq-len")


def test_m_model_without_tokenizer(tiny_m):
    assert_one_line_error(dllama("inference", "--model", str(tiny_m), "--prompt", "x"), "--tokenizer")


def test_bad_worker_address(smollm2_path):
    assert_one_line_error(dllama("inference", "--model", smollm2_path, "--prompt", "x", "--workers", "nohost"),
                          "nohost")


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_worker_port_out_of_range(port):
    assert_one_line_error(dllama("worker", "--host", "127.0.0.1", "--port", port), "--port", port)


def test_worker_address_port_out_of_range(tiny_m):
    res = dllama("inference", "--model", str(tiny_m), "--prompt", "x", "--workers", "127.0.0.1:70000")
    assert_one_line_error(res, "--workers", "70000")


def test_api_port_out_of_range(tiny_m):
    res = subprocess.run([sys.executable, "-c", "import sys; from dllama.cli import main_api; sys.exit(main_api())",
                          "--model", str(tiny_m), "--host", "127.0.0.1", "--port", "65536"],
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert_one_line_error(res, "--port", "65536")


@pytest.mark.parametrize("value", ["0", "33"])
def test_api_parallel_out_of_range(tiny_m, value):
    res = subprocess.run([sys.executable, "-c", "import sys; from dllama.cli import main_api; sys.exit(main_api())",
                          "--model", str(tiny_m), "--host", "127.0.0.1", "--port", "0", "--parallel", value],
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert_one_line_error(res, "--parallel", value)


@pytest.mark.parametrize("flag", ["--max-seq-len", "--steps", "--nthreads"])
def test_a_bad_flag_is_named_alone(tiny_m, flag):
    res = dllama("inference", "--model", str(tiny_m), "--prompt", "x", flag, "0")
    assert_one_line_error(res, flag)
    others = {"--max-seq-len", "--steps", "--nthreads"} - {flag}
    assert not [o for o in others if o in res.stderr], res.stderr


def test_a_short_context_without_steps_generates_what_fits(smollm2_path):
    from dllama.tokenizer import Tokenizer

    res = dllama("inference", "--model", smollm2_path, "--prompt", "Hello", "--max-seq-len", "16",
                 "--temperature", "0", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert len(out["prompt_ids"]) == len(Tokenizer.from_gguf(smollm2_path).encode("Hello"))
    assert len(out["prompt_ids"]) + len(out["generated_ids"]) == 16


def test_tokenizer_of_another_model(tiny_m, tmp_path):
    """The tiny model has 256 tokens; a 200-token tokenizer, which could not print what the model picks, is
    refused at load, naming both sizes."""
    from dllama.formats.dlt import TokenizerData, write_t

    tok = tmp_path / "other.t"
    write_t(str(tok), TokenizerData([bytes([i]) for i in range(200)], [0.0] * 200,
                                    bos_id=0, eos_ids=[1], special_ids=frozenset()))
    res = dllama("inference", "--model", str(tiny_m), "--tokenizer", str(tok), "--prompt", "x", "--steps", "32")
    assert_one_line_error(res, "other.t", "200", "256")
    assert not res.stdout


def _with_header(m_path, out_path, **values):
    """A copy of a .m file with header values replaced (keys as dllama.formats.dlm names them)."""
    from dllama.formats.dlm import KEY_IDS

    data = bytearray(m_path.read_bytes())
    header_size = struct.unpack_from("<i", data, 4)[0]
    for off in range(8, header_size, 8):
        key = struct.unpack_from("<i", data, off)[0]
        for name, value in values.items():
            if key == KEY_IDS[name]:
                struct.pack_into("<i", data, off + 4, value)
    out_path.write_bytes(bytes(data))
    return out_path


@pytest.fixture(scope="module")
def tiny_t(tmp_path_factory):
    from dllama.formats.dlt import TokenizerData, write_t

    path = tmp_path_factory.mktemp("t") / "tiny.t"
    write_t(str(path), TokenizerData([bytes([i]) for i in range(256)], [0.0] * 256, bos_id=0, eos_ids=[1],
                                     special_ids=frozenset()))
    return path


@pytest.mark.parametrize("field", ["n_layers", "vocab_size", "dim", "hidden_dim", "n_experts"])
def test_m_header_describing_more_than_its_file(tiny_m, tiny_t, tmp_path, field):
    bad = _with_header(tiny_m, tmp_path / "huge.m", **{field: 2**31 - 1})
    res = dllama("inference", "--model", str(bad), "--tokenizer", str(tiny_t), "--prompt", "x")
    assert_one_line_error(res, "huge.m")


def test_m_header_context_past_the_memory_of_the_machine(tiny_m, tiny_t, tmp_path):
    bad = _with_header(tiny_m, tmp_path / "long.m", seq_len=2**31 - 1)
    res = dllama("inference", "--model", str(bad), "--tokenizer", str(tiny_t), "--prompt", "x")
    assert_one_line_error(res, "2147483647", "--max-seq-len")
    ok = dllama("inference", "--model", str(bad), "--tokenizer", str(tiny_t), "--prompt", "x", "--max-seq-len", "64",
                "--steps", "4")
    assert ok.returncode == 0, ok.stderr


def test_chat_max_tokens_zero(tiny_m):
    assert_one_line_error(dllama("chat", "--model", str(tiny_m), "--max-tokens", "0"), "--max-tokens")
