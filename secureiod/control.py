"""The control socket: a unix stream socket speaking JSON lines, and its client.

One request per line, ``{"command": "status"}``; one response per line,
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``. The daemon serves it
from its own event loop (no threads); requests are small and answered at once.
Mode 0660, group ``secureiod`` when that group exists, so an operator in the group can run
``secureioctl`` without root.
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

logger = logging.getLogger(__name__)

MAX_REQUEST: Final = 64 * 1024
MAX_CONNECTIONS: Final = 32
CONTROL_GROUP: Final = "secureiod"

Handler = Callable[[dict[str, Any]], Any]


class ControlError(Exception):
    """A control request that cannot be served, or a daemon that cannot be reached."""


class _Connection:
    __slots__ = ("buffer", "out", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.out = bytearray()


class ControlServer:
    """Non-blocking; the owner polls ``fileno()`` and the connections' fds for reading."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        self._connections: dict[int, _Connection] = {}
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            self._remove_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o117)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o660)
        with contextlib.suppress(KeyError, PermissionError):
            os.chown(path, -1, grp.getgrnam(CONTROL_GROUP).gr_gid)
        sock.listen(16)
        sock.setblocking(False)
        self._sock = sock

    @staticmethod
    def _remove_stale(path: Path) -> None:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # nobody listens: a leftover from a crash
            return
        finally:
            probe.close()
        raise ControlError(f"{path}: another daemon is already listening on this control socket")

    def fileno(self) -> int:
        return self._sock.fileno()

    def connection_fds(self) -> list[int]:
        return list(self._connections)

    def accept(self) -> list[int]:
        """Accept pending connections; returns the new fds the owner should watch."""
        new: list[int] = []
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return new
            except OSError as exc:
                logger.warning("control socket accept failed: %s", exc)
                return new
            if len(self._connections) >= MAX_CONNECTIONS:
                conn.close()
                continue
            conn.setblocking(False)
            self._connections[conn.fileno()] = _Connection(conn)
            new.append(conn.fileno())

    def handle_readable(self, fd: int) -> bool:
        """Serve what arrived on one connection; False when it closed (stop watching it)."""
        c = self._connections.get(fd)
        if c is None:
            return False
        try:
            data = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data = b""
        if not data:
            self._drop(fd)
            return False
        c.buffer += data
        if len(c.buffer) > MAX_REQUEST:
            self._reply(c, {"ok": False, "error": "request too large"})
            self._drop(fd)
            return False
        while b"\n" in c.buffer:
            line, _, rest = bytes(c.buffer).partition(b"\n")
            c.buffer = bytearray(rest)
            self._reply(c, self._serve(line))
        return True

    def _serve(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("command"), str):
                raise ValueError("expected an object with a 'command' string")
        except ValueError as exc:
            return {"ok": False, "error": f"bad request: {exc}"}
        try:
            return {"ok": True, "result": self._handler(request)}
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug must not kill the daemon; report it to the caller
            logger.exception("control command %r failed", request.get("command"))
            return {"ok": False, "error": f"internal error: {exc}"}

    def _reply(self, c: _Connection, response: dict[str, Any]) -> None:
        data = json.dumps(response, separators=(",", ":")).encode() + b"\n"
        try:
            c.sock.setblocking(True)
            c.sock.settimeout(2.0)
            c.sock.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                c.sock.setblocking(False)

    def _drop(self, fd: int) -> None:
        c = self._connections.pop(fd, None)
        if c is not None:
            c.sock.close()

    def close(self) -> None:
        for fd in list(self._connections):
            self._drop(fd)
        self._sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            # After dropping privileges the runtime directory may not be ours to change;
            # the next start finds the socket stale (nobody listens) and replaces it.
            logger.info("leaving %s behind: %s", self.path, exc.strerror or exc)


def default_socket_path(interface: str) -> Path:
    return Path("/run/secureiod") / f"{interface}.sock"


def request(path: Path, command: str, timeout: float = 10.0, **args: Any) -> Any:
    """Send one command and return its result; ``ControlError`` with a clear message."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ControlError(
                f"{path}: no such control socket; is secureiod running for this interface?"
            ) from None
        except ConnectionRefusedError:
            raise ControlError(f"{path}: connection refused; secureiod is not running") from None
        except PermissionError:
            raise ControlError(
                f"{path}: permission denied; run as root or as a member of group '{CONTROL_GROUP}'"
            ) from None
        except OSError as exc:
            raise ControlError(f"{path}: {exc.strerror or exc}") from None
        sock.sendall(json.dumps({"command": command, **args}).encode() + b"\n")
        buf = bytearray()
        while b"\n" not in buf:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise ControlError(f"{path}: no answer within {timeout:g} s") from None
            if not chunk:
                raise ControlError(f"{path}: the daemon closed the connection")
            buf += chunk
    finally:
        sock.close()
    try:
        response = json.loads(bytes(buf).partition(b"\n")[0])
    except ValueError as exc:
        raise ControlError(f"{path}: unreadable answer: {exc}") from None
    if not response.get("ok"):
        raise ControlError(str(response.get("error", "unknown error")))
    return response.get("result")
