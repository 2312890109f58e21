"""tests/unit is the fast level: no Ray cluster, no subprocess, no network. A unit test
that tries either fails at once, so the level stays what it says."""

from __future__ import annotations

import socket
import subprocess

import pytest


@pytest.fixture(autouse=True)
def _unit_tests_start_nothing(monkeypatch):
    def refuse_process(*args, **kwargs):
        raise AssertionError("a unit test started a process: move it to tests/func")

    def refuse_connect(self, address):
        raise AssertionError(f"a unit test opened a connection to {address}: move it to tests/func")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse_process)
    monkeypatch.setattr(socket.socket, "connect", refuse_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse_connect)
