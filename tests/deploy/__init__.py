"""Deployment tests (Ansible, dllama cluster) against namespace test hosts; a package so its conftest
and helpers do not shadow the top-level tests/conftest.py."""
