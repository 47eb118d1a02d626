"""The child-process server helper: a free port, and a failed start reported with the child's own log."""

from __future__ import annotations

import socket

import pytest

from child_server import free_port, serve_in_subprocess


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_a_server_that_cannot_start_is_reported_with_its_log(tmp_path) -> None:
    missing = tmp_path / "no-such-model.safetensors"
    with pytest.raises(RuntimeError, match="exited with") as failure:
        with serve_in_subprocess(missing, timeout=60):
            pass
    assert "no-such-model.safetensors" in str(failure.value)  # the child's own error, from its log
