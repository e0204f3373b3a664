"""sd_notify messages arrive byte-exact on a real datagram socket, through libsystemd and
through the built-in sender; the watchdog period and the choice of log destination."""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from secureiod.logs import setup_daemon_logging
from secureiod.notify import Notifier, watchdog_interval

try:
    import systemd.daemon  # noqa: F401

    HAVE_SYSTEMD_PYTHON = True
except ImportError:
    HAVE_SYSTEMD_PYTHON = False

BACKENDS = [
    pytest.param(
        True,
        id="libsystemd",
        marks=pytest.mark.skipif(not HAVE_SYSTEMD_PYTHON, reason="systemd-python absent"),
    ),
    pytest.param(False, id="raw-socket"),
]


@pytest.fixture(params=["path", "abstract"])
def listener(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd, with NOTIFY_SOCKET naming it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        if request.param == "path":
            path = tmp_path / "notify"
            sock.bind(str(path))
            address = str(path)
        else:
            name = f"sio-notify-{os.getpid()}-{secrets.token_hex(4)}"
            sock.bind("\0" + name)
            address = "@" + name
        sock.settimeout(2.0)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        yield sock, address
    finally:
        sock.close()


def receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def assert_nothing_queued(sock: socket.socket) -> None:
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


@pytest.mark.parametrize("use_libsystemd", BACKENDS)
def test_messages_arrive_exactly(listener: tuple[socket.socket, str], use_libsystemd: bool) -> None:
    sock, address = listener
    with Notifier.from_env(use_libsystemd=use_libsystemd) as notifier:
        assert notifier.address == address
        assert notifier.backend == ("libsystemd" if use_libsystemd else "socket")

        assert notifier.ready() is True
        assert receive(sock) == "READY=1"
        assert notifier.ready(status="tunnel up, 2 peers") is True
        assert receive(sock) == "READY=1\nSTATUS=tunnel up, 2 peers"
        assert notifier.status("3 peers\nconnected") is True
        assert receive(sock) == "STATUS=3 peers connected"
        assert notifier.watchdog() is True
        assert receive(sock) == "WATCHDOG=1"

        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert notifier.reloading() is True
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        match = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)", receive(sock))
        assert match is not None
        assert before <= int(match.group(1)) <= after

        assert notifier.stopping() is True
        assert receive(sock) == "STOPPING=1"
        assert notifier.notify(EXTEND_TIMEOUT_USEC=5_000_000, READY=True) is True
        assert receive(sock) == "EXTEND_TIMEOUT_USEC=5000000\nREADY=1"
        assert_nothing_queued(sock)


def test_without_systemd_python_the_raw_sender_is_used(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, _ = listener
    monkeypatch.setitem(sys.modules, "systemd.daemon", None)  # import now fails
    notifier = Notifier.from_env()
    assert notifier.backend == "socket"
    assert notifier.ready() is True
    assert receive(sock) == "READY=1"
    notifier.close()


def test_explicit_address_that_is_not_in_the_environment(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """libsystemd only knows NOTIFY_SOCKET, so another address goes out by hand."""
    sock, address = listener
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/elsewhere")
    with Notifier(address) as notifier:
        assert notifier.watchdog() is True
        assert receive(sock) == "WATCHDOG=1"


def test_no_notify_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier.from_env()
    assert notifier.enabled is False
    assert notifier.backend == "disabled"
    for call in (
        notifier.ready,
        notifier.watchdog,
        notifier.reloading,
        notifier.stopping,
        lambda: notifier.status("x"),
    ):
        assert call() is False
    assert Notifier.from_env({"NOTIFY_SOCKET": ""}).enabled is False


@pytest.mark.parametrize("use_libsystemd", BACKENDS)
def test_send_failure_returns_false_and_warns_once(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    use_libsystemd: bool,
) -> None:
    address = str(tmp_path / "nobody-listens")
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    notifier = Notifier.from_env(use_libsystemd=use_libsystemd)
    with caplog.at_level(logging.DEBUG, logger="secureiod.notify"):
        assert notifier.ready() is False
        assert notifier.watchdog() is False
        assert notifier.stopping() is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert address in warnings[0].getMessage()
    notifier.close()


def test_unsupported_address_form_is_a_failure_not_an_exception(
    caplog: pytest.LogCaptureFixture,
) -> None:
    notifier = Notifier("relative/path", use_libsystemd=False)
    with caplog.at_level(logging.WARNING, logger="secureiod.notify"):
        assert notifier.ready() is False
    assert "unsupported NOTIFY_SOCKET" in caplog.text


def test_field_names_are_checked() -> None:
    with pytest.raises(ValueError, match="upper-case"):
        Notifier("@x", use_libsystemd=False).notify(ready=1)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "2000000"}, 1.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "not-a-pid"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(environ, pid=4242) == expected


def test_watchdog_interval_defaults_to_our_environment_and_pid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "500000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 0.25
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None


# --- setup_daemon_logging ------------------------------------------------------------------


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """Restore the root logger's handlers and level, which setup_daemon_logging changes."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield root
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)


def our_handlers(root: logging.Logger) -> list[logging.Handler]:
    return [h for h in root.handlers if h.get_name() == "secureiod"]


def stderr_identity() -> str:
    st = os.fstat(2)
    return f"{st.st_dev}:{st.st_ino}"


def test_stderr_when_journal_stream_is_absent_or_stale(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert setup_daemon_logging("debug") == "stderr"
    assert root_logger.level == logging.DEBUG
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    assert setup_daemon_logging(logging.INFO) == "stderr"
    (handler,) = our_handlers(root_logger)  # replaced, not added
    assert isinstance(handler, logging.StreamHandler)
    assert root_logger.level == logging.INFO


def test_journal_when_stderr_is_the_journal_stream(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = pytest.importorskip("systemd.journal")
    monkeypatch.setenv("JOURNAL_STREAM", stderr_identity())
    kind = setup_daemon_logging("INFO")
    (handler,) = our_handlers(root_logger)
    if kind == "journal":
        assert isinstance(handler, journal.JournalHandler)
    else:  # this systemd-python cannot build a handler here: the fallback must hold
        assert isinstance(handler, logging.StreamHandler)
    assert setup_daemon_logging("INFO", force_stderr=True) == "stderr"
    (handler,) = our_handlers(root_logger)
    assert not isinstance(handler, journal.JournalHandler)


def test_journal_stream_without_systemd_python_prefixes_priorities(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "systemd.journal", None)  # import now fails
    monkeypatch.setenv("JOURNAL_STREAM", stderr_identity())
    assert setup_daemon_logging("WARNING") == "stderr"
    (handler,) = our_handlers(root_logger)
    record = logging.LogRecord("secureiod.x", logging.ERROR, __file__, 1, "boom", None, None)
    assert handler.format(record) == "<3>secureiod.x: boom"


def test_unknown_level_is_refused(root_logger: logging.Logger) -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        setup_daemon_logging("loud")
