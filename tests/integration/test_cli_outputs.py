"""`convert` and `random-model` outputs, as a user types them in a fresh clone: missing folders are made;
any failure is one line, exit 2, and leaves no file or folder behind."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_cli_errors import assert_one_line_error, dllama

from dllama.formats.loader import load_model

pytestmark = pytest.mark.slow

TINY = ("--preset", "smollm2_135m", "--n-layers", "1", "--dim", "64", "--hidden-dim", "128", "--n-heads", "4",
        "--n-kv-heads", "2", "--vocab-size", "256", "--seq-len", "64")


def tree(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root)
                  for n in dirs + files)


def test_random_model_and_convert_make_their_output_folders(tmp_path):
    res = dllama("random-model", "--output", str(tmp_path / "models" / "tiny.m"), *TINY)
    assert res.returncode == 0, res.stderr
    res = dllama("convert", "--model", str(tmp_path / "models" / "tiny.m"),
                 "--output-model", str(tmp_path / "models" / "q80" / "a" / "tiny.m"), "--weight-type", "q80")
    assert res.returncode == 0, res.stderr
    assert tree(tmp_path) == ["models", "models/q80", "models/q80/a", "models/q80/a/tiny.m", "models/tiny.m"]
    model = load_model(str(tmp_path / "models" / "q80" / "a" / "tiny.m"))
    try:
        assert (model.spec.dim, model.spec.n_layers, model.spec.weight_type) == (64, 1, "q80")
    finally:
        model.close()


def test_relative_output_in_a_fresh_folder(tmp_path):
    # the README's form: a path relative to the current folder, whose first part does not exist yet
    res = subprocess.run([sys.executable, "-m", "dllama", "random-model", "--output", "models/tiny.m", *TINY],
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert tree(tmp_path) == ["models", "models/tiny.m"]


@pytest.fixture(scope="module")
def tiny_m(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "tiny.m"
    assert dllama("random-model", "--output", str(path), *TINY).returncode == 0
    return path


def test_failure_after_making_folders_removes_them(tiny_m, tmp_path):
    # a .m holds no vocabulary: the tokenizer step fails after the folders for both outputs were made
    res = dllama("convert", "--model", str(tiny_m), "--output-model", str(tmp_path / "new" / "deep" / "x.m"),
                 "--output-tokenizer", str(tmp_path / "other" / "x.t"))
    assert_one_line_error(res, "--output-tokenizer")
    assert tree(tmp_path) == []


def test_a_file_where_a_folder_should_be(tiny_m, tmp_path):
    (tmp_path / "models").write_text("not a folder")
    res = dllama("convert", "--model", str(tiny_m), "--output-model", str(tmp_path / "models" / "sub" / "x.m"))
    assert_one_line_error(res, "cannot create the folder", str(tmp_path / "models"))
    assert tree(tmp_path) == ["models"]


def test_output_that_is_a_folder(tiny_m, tmp_path):
    (tmp_path / "out.m").mkdir()
    res = dllama("convert", "--model", str(tiny_m), "--output-model", str(tmp_path / "out.m"))
    assert_one_line_error(res, "cannot write", str(tmp_path / "out.m"))
    assert tree(tmp_path) == ["out.m"]
