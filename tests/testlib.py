"""Helpers for tests, importable by name from any test directory (unlike `conftest`, of which there are
several: `from conftest import ...` picks whichever one pytest loaded first)."""

from __future__ import annotations

import os

import pytest

REQUIRE_ALL = os.environ.get("DLLAMA_REQUIRE_ALL_TESTS") == "1"


def need(condition: bool, reason: str) -> None:
    """Skip when a prerequisite is missing, except in CI where every test must run."""
    if not condition:
        if REQUIRE_ALL:
            pytest.fail(f"prerequisite missing in a run that requires all tests: {reason}")
        pytest.skip(reason)
