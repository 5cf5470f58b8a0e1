"""Fixtures of the end-to-end tests: real backend processes, real lbproxy
nodes, real sockets on 127.0.0.0/8 (helpers in e2e_support.py, fixtures in
e2e_fixtures.py, shared with the fault suite).

Every process started here is ended by its PID in a finalizer; every node
must leave no process and no /dev/shm/fulcrum-<id> behind; every file lives
in a temporary directory removed at teardown.
"""
from __future__ import annotations

import pytest
from e2e_fixtures import backends, lbproxy, workdir  # noqa: F401 (fixtures)


def pytest_configure(config: pytest.Config) -> None:
    # pytest-timeout registers this marker; without the plugin it is inert.
    config.addinivalue_line("markers", "timeout(seconds): per-test time limit (pytest-timeout)")
