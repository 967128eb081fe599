"""Fixtures for the deployment tests: namespace test hosts, shared by the Ansible and cluster tests."""

from __future__ import annotations

import os

import pytest

import nshosts


def require(condition: bool, reason: str) -> None:
    """Skip when a prerequisite is missing; in CI (DLLAMA_REQUIRE_ALL_TESTS=1) fail instead."""
    if condition:
        return
    if os.environ.get("DLLAMA_REQUIRE_ALL_TESTS") == "1":
        pytest.fail(f"prerequisite missing (DLLAMA_REQUIRE_ALL_TESTS=1): {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def ns_hosts():
    """Two SSH test hosts in network namespaces; torn down at the end of the session, also on failure."""
    missing = nshosts.missing_prerequisites()
    require(not missing, "namespace test hosts need " + ", ".join(missing))
    hosts = nshosts.TestHosts(n_hosts=2)
    try:
        hosts.start()
        yield hosts
    finally:
        hosts.stop()
