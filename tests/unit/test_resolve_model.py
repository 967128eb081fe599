"""`--model NAME`: a catalogue name stands for its installed file."""

from __future__ import annotations

import os

import pytest

from dllama.catalog import resolve_model
from dllama.errors import DllamaError


def test_a_path_passes_through(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert resolve_model(str(f)) == str(f)
    assert resolve_model("no/such/file.m") == "no/such/file.m"   # the loader names it


def test_the_default_model_is_found_without_importing_its_package(smollm2_path):
    path = resolve_model("smollm2_135m_instruct")
    assert os.path.samefile(path, smollm2_path) and path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_a_catalogue_model_not_downloaded_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DllamaError, match=r"models/llama3_2_1b_instruct_q40/.*python launch.py llama3_2_1b_instruct_q40"):
        resolve_model("llama3_2_1b_instruct_q40")
