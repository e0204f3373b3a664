"""The control protocol, shared by the daemon's server and ``secureioctl``, and its client.

A unix stream socket speaking JSON lines: one request per line,
``{"command": "status"}`` (arguments are further keys of the same object), one reply per
line, ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``, in request
order. The server lives in ``secureiod.daemon.control``; this module holds what both sides
must agree on (the commands and their argument types, the limits, how a line is decoded)
and the client, so that ``secureioctl`` imports neither the daemon nor pydantic.

Both sides treat the other as hostile: a line is refused before parsing when it is too
long or nested too deep (``json.loads`` recurses, and 2,000 ``[`` raise ``RecursionError``),
must be UTF-8, and must be a JSON object. Socket mode 0660, group ``secureiod`` when that
group exists, so an operator in the group can run ``secureioctl`` without root.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

__all__ = [
    "COMMANDS",
    "CONTROL_GROUP",
    "DEFAULT_LIMITS",
    "ArgumentTypes",
    "ControlError",
    "ControlLimits",
    "decode_line",
    "encode_line",
    "request",
    "shorten",
]

CONTROL_GROUP: Final = "secureiod"

ArgumentTypes = Mapping[str, type]
"""A command's arguments: name -> the JSON type its value must have (str, int, bool...)."""

COMMANDS: Final[Mapping[str, ArgumentTypes]] = MappingProxyType(
    {
        "status": MappingProxyType({}),
        "peers": MappingProxyType({}),
        "reload": MappingProxyType({}),
        "metrics": MappingProxyType({}),
        "showconf": MappingProxyType({}),
    }
)
"""The commands the daemon serves and their arguments. The server refuses anything else
(unknown command, unknown argument, wrong type) with a one-line error before its handler
runs, so the handler only ever sees well-formed requests."""


class ControlError(Exception):
    """A control request that cannot be served, or a daemon that cannot be reached."""


@dataclass(frozen=True, slots=True)
class ControlLimits:
    """Every bound of the control plane in one place (tests pass smaller ones).

    ``max_buffered`` is what a connection may have waiting to be sent before it is dropped
    as a client that does not read; one reply alone is always let through whole (its size
    is bounded by ``max_reply``, which the client also enforces on what it reads).
    """

    max_request: int = 64 * 1024
    """Bytes in one request line (the newline not counted)."""
    max_depth: int = 32
    """Nesting of arrays and objects in one line, requests and replies alike."""
    max_reply: int = 16 * 1024 * 1024
    """Bytes in one reply line."""
    max_buffered: int = 1024 * 1024
    """Unsent reply bytes per connection before the server drops it."""
    max_connections: int = 32
    """Open connections; a new one evicts the one idle the longest."""
    idle_timeout: float = 30.0
    """Seconds a connection may stay without a complete request or reply progress."""
    requests_per_wakeup: int = 64
    """Requests served per event-loop turn over all connections together, one per
    connection in turn (the rest wait for the next turn)."""
    turn_budget: float = 0.002
    """Seconds of request handling per event-loop turn over all connections together:
    once spent, the loop serves its other descriptors before the next turn."""
    reload_interval: float = 1.0
    """Seconds between the starts of two reloads; one asked for sooner waits its turn."""

    def __post_init__(self) -> None:
        if min(self.max_request, self.max_depth, self.max_reply, self.max_buffered) < 1:
            raise ValueError("ControlLimits: sizes and depth must be >= 1")
        if self.max_connections < 1 or self.requests_per_wakeup < 1:
            raise ValueError("ControlLimits: max_connections and requests_per_wakeup >= 1")
        if not self.idle_timeout > 0 or not self.turn_budget > 0:
            raise ValueError("ControlLimits: idle_timeout and turn_budget must be > 0")
        if not self.reload_interval >= 0:
            raise ValueError("ControlLimits: reload_interval must be >= 0")


DEFAULT_LIMITS: Final = ControlLimits()

_ONE_KIND: Final = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[]{}")


def _too_deep(line: bytes, max_depth: int) -> bool:
    """True when ``line`` nests arrays/objects deeper than ``max_depth`` (or its brackets
    do not balance, which makes it invalid JSON anyway).

    Works on the raw bytes (a quote or backslash byte is never part of a multi-byte
    UTF-8 character): escapes are dropped, the text between quotes (strings, where
    brackets do not nest) is cut out, both kinds of bracket become one, and then each
    ``bytes.replace`` pass removes exactly the innermost pairs (it does not rescan what
    it produced). Every step runs in C and a line that cannot shrink stops at once, so
    a 64 KiB request costs milliseconds and even a 16 MiB hostile reply a few seconds
    of the client's time at worst, never a ``RecursionError``.
    """
    if b"[" not in line and b"{" not in line:
        return False
    unescaped = line.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside_strings = b"".join(unescaped.split(b'"')[::2])
    brackets = outside_strings.translate(_ONE_KIND, _NOT_BRACKETS)
    for _ in range(max_depth):
        if not brackets:
            return False
        shorter = brackets.replace(b"[]", b"")
        if len(shorter) == len(brackets):
            return True  # no pair left to remove: unbalanced
        brackets = shorter
    return bool(brackets)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


MAX_NUMBER_DIGITS: Final = 100
"""Characters in one JSON number: nothing in the protocol needs more, and Python's own
limit (4300 digits) answers with advice about ``sys.set_int_max_str_digits``."""


def _parse_int(text: str) -> int:
    if len(text) > MAX_NUMBER_DIGITS:
        raise ValueError(f"a number of {len(text)} digits; at most {MAX_NUMBER_DIGITS}")
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > MAX_NUMBER_DIGITS:
        raise ValueError(f"a number of {len(text)} characters; at most {MAX_NUMBER_DIGITS}")
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"the number {text} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose keys are all different: ``{"command": "status", "command":
    "reload"}`` means reload to ``json.loads`` (the last wins) and status to a reader."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {shorten(repr(key), 60)}")
            seen.add(key)
    return obj


def decode_line(line: bytes, limits: ControlLimits = DEFAULT_LIMITS) -> Any:
    """One protocol line (without its newline) to a Python value; ``ValueError`` with a
    short reason for anything that is not strict, shallow-enough UTF-8 JSON."""
    if _too_deep(line, limits.max_depth):
        raise ValueError(f"brackets nested deeper than {limits.max_depth} or not matched")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    try:
        return json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_int=_parse_int,
            parse_float=_parse_float,
            object_pairs_hook=_unique_keys,
        )
    except RecursionError:  # not reachable after the depth check; never let it escape
        raise ValueError("nested too deep") from None


def encode_line(value: Any) -> bytes:
    """A value to one protocol line, newline included. ASCII-only output, so no byte of a
    string can ever be a newline; ``ValueError``/``TypeError`` for what JSON cannot hold."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("ascii") + b"\n"


def shorten(text: object, limit: int = 200) -> str:
    """``str(text)`` on one line and at most ``limit`` characters: what goes into an error
    reply or a log line may come from a hostile request."""
    try:
        s = str(text)
    except Exception:  # a broken __str__ must not turn an error report into a crash
        s = f"<unprintable {type(text).__name__}>"
    s = s.replace("\r", " ").replace("\n", " ")
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _connect(path: Path, sock: socket.socket, deadline: float, timeout: float) -> None:
    while True:
        try:
            sock.connect(str(path))
            return
        except BlockingIOError:
            # EAGAIN: the daemon's accept backlog is full (a unix socket with a timeout
            # does not wait for room); the daemon makes room, so try again until the
            # deadline instead of failing a fresh client at once
            if time.monotonic() >= deadline:
                raise ControlError(f"{path}: the daemon accepts no connection; busy?") from None
            time.sleep(0.01)
        except FileNotFoundError:
            raise ControlError(
                f"{path}: no such control socket; is secureiod running for this interface?"
            ) from None
        except ConnectionRefusedError:
            raise ControlError(f"{path}: {_refused_because(path)}") from None
        except PermissionError:
            raise ControlError(
                f"{path}: permission denied; run as root or as a member of group '{CONTROL_GROUP}'"
            ) from None
        except TimeoutError:
            raise ControlError(f"{path}: no answer within {timeout:g} s") from None
        except OSError as exc:
            raise ControlError(f"{path}: {exc.strerror or exc}") from None


def _refused_because(path: Path) -> str:
    """Why connecting was refused: the path is not a socket at all (a mistyped
    ``--socket``), or it is one that nobody listens on (the daemon is gone)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = stat.S_IFSOCK
    if stat.S_ISDIR(mode):
        return "is a directory, not a control socket; give the socket inside it (IFNAME.sock)"
    if stat.S_ISREG(mode):
        return "is a regular file, not a control socket; is this the right path?"
    if not stat.S_ISSOCK(mode):
        return "is not a socket; is this the right path?"
    return "connection refused; secureiod is not running"


def _read_reply(path: Path, sock: socket.socket, deadline: float, limits: ControlLimits) -> bytes:
    """Read up to the first newline; at most ``max_reply`` bytes, before ``deadline``
    (one overall deadline, so a daemon trickling bytes cannot hold the client forever)."""
    buf = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ControlError(f"{path}: the daemon did not answer in time")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(256 * 1024)
        except TimeoutError:
            raise ControlError(f"{path}: the daemon did not answer in time") from None
        except OSError as exc:
            raise ControlError(f"{path}: reading the answer: {exc.strerror or exc}") from None
        if not chunk:
            raise ControlError(f"{path}: the daemon closed the connection without answering")
        end = chunk.find(b"\n")
        if end >= 0:
            buf += chunk[:end]
        else:
            buf += chunk
        if len(buf) > limits.max_reply:
            raise ControlError(
                f"{path}: the answer is larger than {limits.max_reply} bytes; refused"
            )
        if end >= 0:
            return bytes(buf)


def request(
    path: Path,
    command: str,
    timeout: float = 10.0,
    **args: Any,
) -> Any:
    """Send one command and return its result. Every failure (no daemon, no permission,
    timeout, a refused request, an answer that is not a well-formed reply) is a
    ``ControlError`` with a one-line message that names the socket."""
    limits = DEFAULT_LIMITS
    line = encode_line({"command": command, **args})
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        _connect(path, sock, deadline, timeout)
        try:
            sock.sendall(line)
        except TimeoutError:
            raise ControlError(f"{path}: the daemon did not take the request in time") from None
        except OSError as exc:
            raise ControlError(f"{path}: sending the request: {exc.strerror or exc}") from None
        raw = _read_reply(path, sock, deadline, limits)
    finally:
        sock.close()
    try:
        response = decode_line(raw, limits)
    except ValueError as exc:
        raise ControlError(f"{path}: unreadable answer: {shorten(exc)}") from None
    if not isinstance(response, dict) or not isinstance(response.get("ok"), bool):
        raise ControlError(f"{path}: unreadable answer: not a reply object")
    if not response["ok"]:
        error = response.get("error")
        raise ControlError(shorten(error if isinstance(error, str) else "unknown error", 1000))
    return response.get("result")
