"""``secureioctl cat`` end to end: real processes, real UDP on 127.0.0.1.

An echo listener and a connecting client that feeds stdin and counts the echoes: the
client's stdout must equal its stdin. Processes are killed in ``finally`` blocks, and every
wait is bounded, so a broken build fails fast instead of hanging the suite.
"""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from secureiod.secureio.identity import load_or_create_identity

CAT = [sys.executable, "-m", "secureiod.cli.secureioctl", "cat"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Keys:
    """Alice's and Bob's identity directories, created as the CLI would."""

    def __init__(self, root: Path) -> None:
        self.alice = root / "alice"
        self.bob = root / "bob"
        load_or_create_identity(self.alice)
        load_or_create_identity(self.bob)

    @staticmethod
    def pub(identity_dir: Path) -> str:
        return str(identity_dir / "id_ed25519.pub")


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


class Background:
    """A running ``cat`` whose stderr is collected line by line by a thread."""

    def __init__(self, args: Sequence[str]) -> None:
        self.proc = subprocess.Popen(
            [*CAT, *args],
            stdin=subprocess.PIPE,  # kept open: EOF is not what ends a listener here
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=ENV,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            self.stderr.append(line)
            if text in line:
                return
        pytest.fail(f"{text!r} not seen on stderr; got {self.stderr!r}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        if self.proc.stdin is not None:
            self.proc.stdin.close()


@contextmanager
def echo_listener(keys: Keys, port: int, *extra: str) -> Iterator[Background]:
    listener = Background(
        [
            "--identity",
            str(keys.bob),
            "--peer",
            keys.pub(keys.alice),
            "--listen",
            f"127.0.0.1:{port}",
            "--echo",
            *extra,
        ]
    )
    try:
        listener.wait_for("listening on")
        yield listener
    finally:
        listener.stop()


def run_client(
    keys: Keys, port: int, stdin: bytes, *extra: str, timeout: float = 30
) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.Popen(
        [
            *CAT,
            "--identity",
            str(keys.alice),
            "--peer",
            keys.pub(keys.bob),
            "--connect",
            f"127.0.0.1:{port}",
            *extra,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


LINES = b"".join(b"line %d: the quick brown fox\n" % i for i in range(20))


@pytest.mark.parametrize(
    ("stdin", "extra"),
    [
        pytest.param(LINES, (), id="plain"),
        pytest.param(LINES, ("--channel", "7"), id="channel"),
        pytest.param(
            b"".join(os.urandom(20 + i).hex().encode() + b"\n" for i in range(20)),
            ("--hex",),
            id="hex",
        ),
        pytest.param(
            b"".join(bytes([65 + i]) * (900 + 50 * i) + b"\n" for i in range(20)),
            ("--fragment", "--payload-limit", "600", "--negotiation", "off"),
            id="fragment",
        ),
    ],
)
def test_echo_round_trip(keys: Keys, stdin: bytes, extra: tuple[str, ...]) -> None:
    port = free_udp_port()
    with echo_listener(keys, port, *extra):
        result = run_client(keys, port, stdin, "--count", "20", "--timeout", "20", *extra)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == stdin
    # State changes are reported, one line each, and nothing else goes wrong.
    err = result.stderr.decode()
    assert "negotiating -> established" in err
    assert "Traceback" not in err


def test_hex_carries_binary_that_contains_newlines(keys: Keys) -> None:
    payloads = [b"\n\x00\xff", b"", b"a\r\nb"]
    stdin = b"".join(p.hex().encode() + b"\n" for p in payloads)
    port = free_udp_port()
    with echo_listener(keys, port, "--hex"):
        result = run_client(keys, port, stdin, "--hex", "--count", "3", "--timeout", "20")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == stdin


def write_secret(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_psk(keys: Keys, tmp_path: Path) -> None:
    psk = write_secret(tmp_path / "psk", b"shared secret\n")
    # One trailing newline is not part of the key.
    same_without_newline = write_secret(tmp_path / "psk2", b"shared secret")
    port = free_udp_port()
    with echo_listener(keys, port, "--psk-file", str(psk)):
        result = run_client(
            keys,
            port,
            LINES,
            "--psk-file",
            str(same_without_newline),
            "--count",
            "20",
            "--timeout",
            "20",
        )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == LINES


def test_wrong_psk_times_out_with_one_clear_line(keys: Keys, tmp_path: Path) -> None:
    write_secret(tmp_path / "a", b"one secret")
    write_secret(tmp_path / "b", b"another secret")
    port = free_udp_port()
    with echo_listener(keys, port, "--psk-file", str(tmp_path / "a")):
        result = run_client(
            keys, port, b"hello\n", "--psk-file", str(tmp_path / "b"), "--count", "1",
            "--timeout", "1",
        )  # fmt: skip
    assert result.returncode == 1
    errors = [line for line in result.stderr.decode().splitlines() if "error:" in line]
    assert len(errors) == 1 and "timed out after 1 s: received 0 of 1" in errors[0]
    assert result.stdout == b""


def test_eof_without_count_sends_and_exits(keys: Keys) -> None:
    port = free_udp_port()
    with echo_listener(keys, port) as listener:
        result = run_client(keys, port, b"fire\nand\nforget")  # no newline after the last
        assert result.returncode == 0, result.stderr.decode()
        listener.wait_for("established")


def test_listener_serves_a_restarted_client(keys: Keys) -> None:
    port = free_udp_port()
    with echo_listener(keys, port):
        for attempt in range(2):
            line = b"attempt %d\n" % attempt
            result = run_client(keys, port, line, "--count", "1", "--timeout", "20")
            assert result.returncode == 0, result.stderr.decode()
            assert result.stdout == line


BAD_INPUTS = [
    pytest.param(["--peer", "bm90IGEga2V5"], "--peer", id="unparsable-inline-key"),
    pytest.param(["--peer", "/nonexistent/bob.pub"], "does not exist", id="missing-key-file"),
    pytest.param(["--peer", "ssh-rsa AAAAB3NzaC1yc2E="], "--peer", id="wrong-ssh-key-type"),
    pytest.param(["--connect", "127.0.0.1"], "--connect", id="endpoint-without-port"),
    pytest.param(["--connect", "::1:5000"], "brackets", id="bare-ipv6"),
    pytest.param(["--connect", "127.0.0.1:99999"], "out of range", id="port-out-of-range"),
    pytest.param(["--connect", "127.0.0.1:0"], "non-zero port", id="port-zero"),
    pytest.param(["--psk-file", "/nonexistent/psk"], "--psk-file", id="missing-psk-file"),
    pytest.param(["--channel", "-1"], "channel", id="bad-channel"),
    pytest.param(["--count", "0"], "--count", id="zero-count"),
    pytest.param(["--payload-limit", "10"], "payload limit", id="tiny-payload-limit"),
    pytest.param(["--negotiation", "maybe"], "--negotiation", id="bad-negotiation"),
]


@pytest.mark.parametrize(("override", "mention"), BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(keys: Keys, override: list[str], mention: str) -> None:
    args = {"--identity": str(keys.alice), "--peer": keys.pub(keys.bob)}
    args["--connect"] = "127.0.0.1:9"
    extra: list[str] = []
    for flag, value in zip(override[::2], override[1::2], strict=True):
        if flag in args:
            args[flag] = value
        else:
            extra += [flag, value]
    argv = [*(x for pair in args.items() for x in pair), *extra]
    result = subprocess.run(
        [*CAT, *argv], capture_output=True, timeout=30, env=ENV, stdin=subprocess.DEVNULL
    )
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert len(err.splitlines()) == 1, err
    assert mention in err
    assert "Traceback" not in err
    assert result.stdout == b""


@pytest.mark.parametrize(
    ("content", "mode", "mention"),
    [
        (b"\n", 0o600, "pre-shared key file is empty"),
        (b"", 0o600, "pre-shared key file is empty"),
        (b"shared secret", 0o644, "chmod 600"),
        (b"shared secret", 0o640, "chmod 600"),
        (b"x" * (64 * 1024 + 1), 0o600, "too large"),
    ],
)
def test_psk_file_policy_is_the_configs(
    keys: Keys, tmp_path: Path, content: bytes, mode: int, mention: str
) -> None:
    """The config refuses an empty or group/world-readable PSK file: ``cat`` does too, with
    the same one-line message (a key that works here works in a daemon config)."""
    psk = write_secret(tmp_path / "psk", content, mode)
    result = subprocess.run(
        [*CAT, "--identity", str(keys.alice), "--peer", keys.pub(keys.bob),
         "--connect", "127.0.0.1:9", "--psk-file", str(psk)],
        capture_output=True, timeout=30, env=ENV, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"--psk-file: {psk}: " in err and mention in err


def test_psk_reader_checks_what_it_opened(tmp_path: Path) -> None:
    """The checks run on the opened descriptor: a FIFO is refused without blocking, and a
    symlink is judged by the file it leads to (a 0600 key behind a link is fine)."""
    from secureiod.secretfile import SecretFileError, read_psk_file

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(SecretFileError, match="not a regular file"):
        read_psk_file(fifo)
    target = write_secret(tmp_path / "real", b"linked secret\n")
    (tmp_path / "link").symlink_to(target)
    assert read_psk_file(tmp_path / "link") == b"linked secret"
    target.chmod(0o604)
    with pytest.raises(SecretFileError, match="chmod 600"):
        read_psk_file(tmp_path / "link")
    with pytest.raises(SecretFileError, match="is a directory"):
        read_psk_file(tmp_path)
    with pytest.raises(SecretFileError, match="does not exist"):
        read_psk_file(tmp_path / "missing")


def test_unusable_identity_path_is_one_line(keys: Keys, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for identity in (blocker / "alice", tmp_path / "pub-as-private" / "id_ed25519"):
        if identity.parent.name == "pub-as-private":
            identity.parent.mkdir(mode=0o700)
            identity.write_text(Path(keys.pub(keys.bob)).read_text())
            identity.chmod(0o600)
        result = subprocess.run(
            [*CAT, "--identity", str(identity), "--peer", keys.pub(keys.bob),
             "--connect", "127.0.0.1:9"],
            capture_output=True, timeout=30, env=ENV, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        err = result.stderr.decode()
        assert result.returncode == 2, err
        assert len(err.splitlines()) == 1 and "--identity" in err, err


def test_listen_on_a_busy_port_is_one_line(keys: Keys) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        result = subprocess.run(
            [*CAT, "--identity", str(keys.bob), "--peer", keys.pub(keys.alice),
             "--listen", f"127.0.0.1:{port}"],
            capture_output=True, timeout=30, env=ENV, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert "in use" in err and err.count("error:") == 1


def test_fragment_warns_on_stderr(keys: Keys) -> None:
    result = subprocess.run(
        [*CAT, "--identity", str(keys.alice), "--peer", keys.pub(keys.bob),
         "--connect", "127.0.0.1:9", "--fragment", "--timeout", "0.3"],
        capture_output=True, timeout=30, env=ENV, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    warnings = [line for line in result.stderr.decode().splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "unauthenticated" in warnings[0]


def test_help_lists_cat() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "secureiod.cli.secureioctl", "--help"],
        capture_output=True, text=True, timeout=30, env=ENV,
    )  # fmt: skip
    assert result.returncode == 0
    assert "cat" in result.stdout
