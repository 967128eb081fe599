"""Helpers for tests, importable by name from any test directory (unlike `conftest`, of which there are
several: `from conftest import ...` picks whichever one pytest loaded first)."""

from __future__ import annotations

import functools
import importlib
import json
import os
from pathlib import Path

import pytest

REQUIRE_ALL = os.environ.get("DLLAMA_REQUIRE_ALL_TESTS") == "1"
# llama.cpp's outputs for SmolLM2, kept in the repository (tests/data/README.md says how they were made)
DATA = Path(__file__).resolve().parent / "data"


def need(condition: bool, reason: str, *, module: bool = False) -> None:
    """Skip when a prerequisite is missing, except under DLLAMA_REQUIRE_ALL_TESTS=1 (CI), where it fails.

    The one place that decides skip-or-fail: tests call this rather than pytest.skip or importorskip.
    `module=True` skips a whole test module from its top level.
    """
    if not condition:
        if REQUIRE_ALL:
            pytest.fail(f"prerequisite missing in a run that requires all tests: {reason}", pytrace=False)
        pytest.skip(reason, allow_module_level=module)


def need_module(name: str, install: str, *, module: bool = False):
    """Import and return module `name`, or skip (fail under DLLAMA_REQUIRE_ALL_TESTS=1) saying how to
    install it (`install`, e.g. "pip install 'dllama[test]'")."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        need(False, f"{name} is not installed ({install}): {exc}", module=module)


@functools.cache
def reference() -> dict:
    """llama.cpp's greedy completions, chats and tokenizations of SmolLM2 (tests/data/smollm2_greedy.json)."""
    return json.loads((DATA / "smollm2_greedy.json").read_text())
