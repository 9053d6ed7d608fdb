"""sd_notify against a socket the test owns, as systemd would hold it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from echonode.config import to_toml
from echonode.daemon.node import Node
from echonode.ops.sdnotify import notify, watchdog_interval_s
from tests.conftest import REPO, echonode_cmd, make_config
from tests.peers import c_echo


class Listener:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.address = address
        self.messages: list[str] = []

    def wait_for(self, line: str, timeout: float = 30.0) -> str:
        """Return the first message (unread so far) with ``line`` among its lines."""
        deadline = time.monotonic() + timeout
        while True:
            for i, msg in enumerate(self.messages):
                if line in msg.split("\n"):
                    del self.messages[: i + 1]
                    return msg
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no {line!r} within {timeout}s; got {self.messages}")
            self.sock.settimeout(left)
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def path_socket(monkeypatch) -> Iterator[Listener]:
    # Short folder: AF_UNIX paths are limited to 107 bytes.
    folder = tempfile.mkdtemp(prefix="sdn", dir="/tmp")
    listener = Listener(os.path.join(folder, "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    yield listener
    listener.close()
    os.unlink(listener.address)
    os.rmdir(folder)


@pytest.fixture
def abstract_socket(monkeypatch) -> Iterator[Listener]:
    listener = Listener(f"@echonode-test-{uuid.uuid4().hex}")
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    yield listener
    listener.close()


def test_no_socket_means_no_notification(monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert notify("READY=1") is False


def test_a_socket_nobody_listens_on_is_not_an_error(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "absent"))
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", f"@echonode-absent-{uuid.uuid4().hex}")
    assert notify("READY=1") is False


def test_path_socket(path_socket: Listener) -> None:
    assert notify("READY=1\nSTATUS=hello") is True
    assert path_socket.wait_for("READY=1") == "READY=1\nSTATUS=hello"


def test_abstract_socket(abstract_socket: Listener) -> None:
    assert notify("STATUS=über") is True  # UTF-8
    assert abstract_socket.wait_for("STATUS=über")


def test_watchdog_interval(monkeypatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert watchdog_interval_s() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval_s() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    monkeypatch.setenv("WATCHDOG_USEC", "soon")
    assert watchdog_interval_s() is None


def test_node_says_ready_once_listening_then_stopping(path_socket: Listener, tmp_path: Path) -> None:
    node = Node(make_config(tmp_path), start_worker=False)
    node.start()
    try:
        ready = path_socket.wait_for("READY=1")
        assert f"STATUS=listening on port {node.scp.port} as ECHONODE" in ready.split("\n")
        # READY means the SCP answers now.
        assert c_echo(node.scp.port) == 0
    finally:
        node.stop()
    path_socket.wait_for("STOPPING=1")


def test_serve_under_a_systemd_like_supervisor(abstract_socket: Listener, tmp_path: Path) -> None:
    """``echonode serve`` as systemd runs it: READY, WATCHDOG, reload on SIGHUP, STOPPING on SIGTERM."""
    cfg_path = tmp_path / "echonode.toml"
    cfg_path.write_text(to_toml(make_config(tmp_path)))
    env = {
        **os.environ,
        "NOTIFY_SOCKET": abstract_socket.address,
        "WATCHDOG_USEC": "1000000",  # WatchdogSec=1: a ping every 0.5 s
    }
    proc = subprocess.Popen(
        echonode_cmd("--config", str(cfg_path), "serve"),
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        abstract_socket.wait_for("READY=1", timeout=60)
        abstract_socket.wait_for("WATCHDOG=1", timeout=5)
        abstract_socket.wait_for("WATCHDOG=1", timeout=5)
        proc.send_signal(signal.SIGHUP)
        abstract_socket.wait_for("RELOADING=1", timeout=30)
        abstract_socket.wait_for("READY=1", timeout=60)
        proc.send_signal(signal.SIGTERM)
        abstract_socket.wait_for("STOPPING=1", timeout=30)
        assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
