"""The control socket server: JSON lines over a unix socket, served from the event loop.

It shares the loop with the data path, so nothing a control client does may stall it:

* replies are sent without blocking; what the socket cannot take waits in a per-connection
  buffer, and a client whose unsent replies exceed ``max_buffered`` (one that writes
  requests and never reads) is disconnected, never waited for;
* a line longer than ``max_request`` is refused as soon as the limit is passed (at most
  one receive chunk past it is ever buffered), nesting is bounded before ``json.loads``
  runs, and any malformed request gets a one-line error reply and affects only its own
  connection;
* requests are served in turns: one request per connection in round-robin order, until
  ``turn_budget`` seconds of handling or ``requests_per_wakeup`` requests over ALL
  connections are spent; then the loop serves its other descriptors before the next
  turn. A connection whose complete requests wait for a turn is not read from meanwhile,
  so 32 pipelining clients cost the data path no more than one;
* the commands that cost in proportion to the config (``reload``, ``peers``, ``metrics``,
  ``showconf``) go through a ``CommandGate``: one run at a time, shared by every request
  that arrived while it was queued, runs spaced by their own cost (so at most about half
  the loop's time), and reloads at least ``reload_interval`` apart (a reload asked for
  sooner waits; SIGHUP can share the same gate);
* connections without a complete request or reply progress for ``idle_timeout`` are
  closed, and at ``max_connections`` a new client evicts the one idle the longest, so a
  fresh ``secureioctl`` is never locked out by clients that hold connections open;
* a handler that raises anything but ``ControlError`` is a bug: the client gets
  "internal error", the log gets one rate-limited line (no traceback per request).

Only ``LoopPort`` methods are used, so a virtual-time loop can drive it in tests; the
only clock the server reads itself is ``cost_clock``, to measure its own work.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import grp
import logging
import os
import socket
import stat
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ..control import (
    COMMANDS,
    CONTROL_GROUP,
    DEFAULT_LIMITS,
    ArgumentTypes,
    ControlError,
    ControlLimits,
    decode_line,
    encode_line,
    shorten,
)
from ..logs import RateLimitedLog
from .gate import CommandGate, GateOutcome
from .ports import LoopPort, TimerHandle

__all__ = ["SHARED_COMMANDS", "ControlServer", "ControlStats", "Handler"]

logger = logging.getLogger(__name__)

Handler = Callable[[str, dict[str, Any]], Any]
"""``(command, request) -> result``: the result must be JSON-able; raise ``ControlError``
to refuse (its message is the error reply). The request has been validated against the
command table: known command, known arguments of the declared types."""

RECV_SIZE: Final = 64 * 1024
FLUSH_AT: Final = 64 * 1024
"""Send as soon as this much is waiting, not only at the end of a batch of requests."""
ACCEPTS_PER_WAKEUP: Final = 16
LISTEN_BACKLOG: Final = 64
"""Connections the kernel queues for ``accept``; a client finding it full gets EAGAIN
(``request`` retries until its deadline)."""
ACCEPT_PAUSE: Final = 1.0
"""Seconds to stop accepting after the process ran out of descriptors (a level-triggered
listening socket would otherwise wake the loop again at once, forever)."""
SHARED_COMMANDS: Final = frozenset({"reload", "peers", "metrics", "showconf"})
"""Commands served through a ``CommandGate`` when asked without arguments: with a
thousand peers they take 15 to 250 ms each (``status`` stays well under one)."""
_SEND_FLAGS: Final = getattr(socket, "MSG_NOSIGNAL", 0)
_JSON_TYPES: Final = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}


@dataclass(slots=True)
class ControlStats:
    """Counters for ``status`` and tests (``dataclasses.asdict`` gives a JSON-able dict)."""

    accepted: int = 0
    requests: int = 0
    """Request lines served, bad ones included."""
    errors: int = 0
    """Error replies of every kind (refusals, bad requests, internal errors)."""
    bad_requests: int = 0
    """Lines that were not a valid request (not JSON, too deep, wrong types, unknown)."""
    too_large: int = 0
    """Lines over ``max_request``: refused and their connection closed."""
    internal_errors: int = 0
    """Handler failures other than ``ControlError`` (bugs), and unencodable results."""
    disconnected_slow: int = 0
    """Connections dropped because their unsent replies exceeded ``max_buffered``."""
    evicted_idle: int = 0
    """Connections closed to make room for a new one at ``max_connections``."""
    timed_out: int = 0
    """Connections closed after ``idle_timeout`` without activity."""
    accept_errors: int = 0
    turns: int = 0
    """Turns in which requests were served."""
    turns_cut: int = 0
    """Turns that ended with requests still waiting (budget or request limit reached)."""
    shared: int = 0
    """Requests answered by a shared (gated) run."""
    longest_turn: float = 0.0
    """The most seconds one turn spent handling requests (gated runs not included)."""


class _Connection:
    __slots__ = (
        "closing",
        "eof",
        "fd",
        "inbuf",
        "last_active",
        "out",
        "reading",
        "sock",
        "waiting",
        "writing",
    )

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = bytearray()
        self.out = bytearray()
        self.last_active = now
        self.reading = False
        self.writing = False
        self.eof = False
        """The client shut down its side: serve what it sent, flush, then close."""
        self.closing = False
        """Close once ``out`` is flushed; read nothing more."""
        self.waiting = False
        """A request waits for a shared run; later ones wait for its reply (order)."""


class _BadRequest(Exception):
    pass


class ControlServer:
    """Serves one control socket on a ``LoopPort``. The constructor binds (so a second
    daemon is refused before it touches anything); ``start`` begins serving.

    ``clock`` is the loop's clock; every loop callback already gets ``now``, so the
    server only keeps it for its owner's convenience. ``cost_clock`` measures how long
    handling takes (the turn budget, the spacing of shared runs). ``commands`` is the
    command table requests are checked against before ``handler`` runs
    (``secureiod.control.COMMANDS`` by default).

    ``gates`` are the owner's ``CommandGate`` objects for commands of
    ``SHARED_COMMANDS`` (the device passes its reload gate, which SIGHUP uses too); the
    server makes its own for the other shared commands in ``commands``, running
    ``handler``."""

    def __init__(
        self,
        path: Path,
        handler: Handler,
        loop: LoopPort,
        *,
        clock: Callable[[], float],
        limits: ControlLimits = DEFAULT_LIMITS,
        commands: Mapping[str, ArgumentTypes] = COMMANDS,
        gates: Mapping[str, CommandGate] | None = None,
        cost_clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.path = path
        self.limits = limits
        self.stats = ControlStats()
        self._handler = handler
        self._loop = loop
        self.clock = clock
        self._cost_clock = cost_clock
        self._commands = commands
        self._connections: dict[int, _Connection] = {}
        self._ready: dict[int, _Connection] = {}
        """Connections with a complete request to serve, in turn order."""
        self._turn_pending = False
        self.gates: dict[str, CommandGate] = dict(gates or {})
        self._own_gates: list[CommandGate] = []
        for command in sorted(SHARED_COMMANDS & set(commands)):
            if command not in self.gates:
                self.gates[command] = gate = CommandGate(
                    loop,
                    functools.partial(self._run_shared, command),
                    name=f"control {command}",
                    min_interval=limits.reload_interval if command == "reload" else 0.0,
                    cost_clock=cost_clock,
                )
                self._own_gates.append(gate)
        self._gate_waiters: dict[str, dict[int, _Connection]] = {}
        self._sweep: TimerHandle | None = None
        self._accept_timer: TimerHandle | None = None
        self._log = RateLimitedLog(logger, interval=30.0, max_keys=64, max_lines=16)
        self._sock, self._inode = _bind(path)
        self._listening = False
        self._closed = False

    @property
    def connections(self) -> int:
        return len(self._connections)

    def fileno(self) -> int:
        return self._sock.fileno()

    def start(self) -> None:
        self._listen(True)

    def close(self) -> None:
        """Close every connection and the socket, and remove the socket file (if it is
        still ours: a newer daemon may have replaced a socket it found stale)."""
        if self._closed:
            return
        self._closed = True
        for c in list(self._connections.values()):
            self._close(c)
        self._gate_waiters.clear()
        for gate in self._own_gates:
            gate.close()
        for timer in (self._sweep, self._accept_timer):
            if timer is not None:
                timer.cancel()
        self._listen(False)
        self._sock.close()
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            # After dropping privileges the runtime directory may not be ours to change;
            # the next start finds the socket stale (nobody listens) and replaces it.
            logger.info("leaving %s behind: %s", self.path, exc.strerror or exc)

    # -- accepting ----------------------------------------------------------------------

    def _listen(self, on: bool) -> None:
        if on and not self._listening and not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._on_accept)
            self._listening = True
        elif not on and self._listening:
            self._loop.remove_reader(self._sock.fileno())
            self._listening = False

    def _on_accept(self, now: float) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.stats.accept_errors += 1
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._log.log(
                        now,
                        "accept",
                        logging.WARNING,
                        "control socket: accept failed (%s); pausing %gs",
                        exc.strerror or exc,
                        ACCEPT_PAUSE,
                    )
                    self._listen(False)
                    self._accept_timer = self._loop.call_at(now + ACCEPT_PAUSE, self._resume_accept)
                    return
                continue  # the client went away between connect and accept
            self._admit(sock, now)

    def _resume_accept(self, now: float) -> None:
        self._accept_timer = None
        self._listen(True)

    def _admit(self, sock: socket.socket, now: float) -> None:
        if len(self._connections) >= self.limits.max_connections:
            oldest = min(self._connections.values(), key=lambda c: c.last_active)
            self.stats.evicted_idle += 1
            self._close(oldest)
        sock.setblocking(False)
        c = _Connection(sock, now)
        self._connections[c.fd] = c
        self.stats.accepted += 1
        self._set_reading(c, True)
        if self._sweep is None:
            self._arm_sweep()

    # -- reading and serving ------------------------------------------------------------

    def _set_reading(self, c: _Connection, on: bool) -> None:
        if on and not c.reading:
            self._loop.add_reader(c.fd, functools.partial(self._on_readable, c))
            c.reading = True
        elif not on and c.reading:
            self._loop.remove_reader(c.fd)
            c.reading = False

    def _on_readable(self, c: _Connection, now: float) -> None:
        if self._connections.get(c.fd) is not c:
            return
        try:
            data = c.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(c)
            return
        if data:
            c.inbuf += data
        else:
            c.eof = True
            self._set_reading(c, False)
            if c.inbuf and not c.inbuf.endswith(b"\n"):
                c.inbuf += b"\n"  # a last request without its newline still counts
        self._advance(c, now)

    def _advance(self, c: _Connection, now: float) -> None:
        """After input or a reply: queue the connection for a turn if a complete request
        waits, else read on, refuse an overlong line, or close after a client's EOF."""
        if c.closing or c.waiting:
            self._set_reading(c, False)
            return
        limit = self.limits.max_request
        inbuf = c.inbuf
        end = inbuf.find(b"\n", 0, limit + 1)
        if end >= 0:
            self._set_reading(c, False)  # what is buffered first; the socket can wait
            self._ready[c.fd] = c
            if not self._turn_pending:
                self._turn_pending = True
                self._loop.call_soon_threadsafe(self._turn)
        elif len(inbuf) > limit:
            self._refuse_too_large(c)
            self._flush(c, now)
        elif c.eof:
            c.closing = True
            inbuf.clear()
            self._flush(c, now)
        else:
            self._set_reading(c, True)

    def _turn(self, now: float) -> None:
        """Serve one request per ready connection, round-robin, until the budget is spent
        or none is left; what is left waits for the next turn (the next wake-up)."""
        ready = self._ready
        if not ready:
            self._turn_pending = False
            return
        # _turn_pending stays True while serving: a connection put back in line must not
        # schedule another turn of its own; the end of this one decides
        limits = self.limits
        clock = self._cost_clock
        started = clock()
        deadline = started + limits.turn_budget
        touched: dict[int, _Connection] = {}
        for _ in range(limits.requests_per_wakeup):
            if not ready:
                break
            fd = next(iter(ready))
            c = ready.pop(fd)
            if self._connections.get(fd) is not c:
                continue
            touched[fd] = c
            if self._serve_one(c, now):
                self._advance(c, now)  # back in line behind the others, if it has more
            if clock() >= deadline:
                break
        spent = clock() - started
        stats = self.stats
        stats.turns += 1
        stats.longest_turn = max(stats.longest_turn, spent)
        for fd, c in touched.items():
            if self._connections.get(fd) is c:
                self._flush(c, now)
        if ready:
            stats.turns_cut += 1
            self._loop.call_soon_threadsafe(self._turn)
        else:
            self._turn_pending = False

    def _serve_one(self, c: _Connection, now: float) -> bool:
        """Take the first complete request off ``c`` and answer it, or hand it to its
        gate; False when that closed the connection."""
        inbuf = c.inbuf
        end = inbuf.find(b"\n", 0, self.limits.max_request + 1)
        if end < 0:  # cannot happen: only connections with a complete line are ready
            return True
        line = bytes(inbuf[:end])
        del inbuf[: end + 1]
        c.last_active = now
        self.stats.requests += 1
        try:
            command, request = self._parse(line)
        except _BadRequest as exc:
            self.stats.bad_requests += 1
            return self._queue(c, self._error(f"bad request: {exc}"))
        gate = self.gates.get(command)
        if gate is not None and len(request) == 1:
            waiters = self._gate_waiters.setdefault(command, {})
            if not waiters:
                gate.request(now, functools.partial(self._shared_done, command))
            waiters[c.fd] = c
            c.waiting = True
            return True
        try:
            result = self._handler(command, request)
        except Exception as exc:
            return self._queue(c, self._failure_reply(command, exc, now))
        return self._queue(c, self._result_reply(command, result, now))

    def _run_shared(self, command: str, now: float) -> Any:
        return self._handler(command, {"command": command})

    def _shared_done(self, command: str, outcome: GateOutcome) -> None:
        """A shared run is over: one reply, encoded once, for every connection that
        waited for it; each then goes on with its next request."""
        waiters = self._gate_waiters.pop(command, {})
        live = [c for fd, c in waiters.items() if self._connections.get(fd) is c]
        if not live:
            return
        now = outcome.now
        if outcome.error is not None:
            reply = self._failure_reply(command, outcome.error, now)
        else:
            reply = self._result_reply(command, outcome.result, now)
        self._count_copies(reply, len(live) - 1)
        self.stats.shared += len(live)
        for c in live:
            c.waiting = False
            c.last_active = now
            if self._queue(c, reply):
                self._advance(c, now)
                if self._connections.get(c.fd) is c:
                    self._flush(c, now)

    def _count_copies(self, reply: bytes, copies: int) -> None:
        """The counters of one reply, for the ``copies`` more connections that get it."""
        if copies <= 0 or reply.startswith(b'{"ok":true'):
            return
        self.stats.errors += copies
        if reply.startswith(b'{"ok":false,"error":"internal error'):
            self.stats.internal_errors += copies

    def _refuse_too_large(self, c: _Connection) -> None:
        self.stats.requests += 1
        self.stats.too_large += 1
        self.stats.bad_requests += 1
        self.stats.errors += 1
        reply = encode_line(
            {"ok": False, "error": f"request too large: limit {self.limits.max_request} bytes"}
        )
        c.inbuf.clear()
        c.closing = True
        self._set_reading(c, False)
        c.out += reply

    def _failure_reply(self, command: str, exc: Exception, now: float) -> bytes:
        if isinstance(exc, ControlError):
            return self._error(shorten(exc, 1000))
        # a bug must not kill the daemon; report it to the caller
        return self._internal_error(command, exc, now)

    def _result_reply(self, command: str, result: Any, now: float) -> bytes:
        try:
            reply = encode_line({"ok": True, "result": result})
        except (TypeError, ValueError, RecursionError) as exc:
            return self._internal_error(command, exc, now)
        if len(reply) > self.limits.max_reply:
            return self._internal_error(
                command, ValueError(f"reply of {len(reply)} bytes is over the limit"), now
            )
        return reply

    def _parse(self, line: bytes) -> tuple[str, dict[str, Any]]:
        try:
            request = decode_line(line, self.limits)
        except ValueError as exc:
            raise _BadRequest(shorten(exc)) from None
        if not isinstance(request, dict):
            raise _BadRequest('expected a JSON object such as {"command": "status"}')
        command = request.get("command")
        if not isinstance(command, str):
            raise _BadRequest("'command' must be a string")
        argument_types = self._commands.get(command)
        if argument_types is None:
            known = ", ".join(sorted(self._commands))
            raise _BadRequest(f"unknown command {shorten(repr(command), 60)}; known: {known}")
        for name, value in request.items():
            if name == "command":
                continue
            expected = argument_types.get(name)
            if expected is None:
                raise _BadRequest(f"{command}: unknown argument {shorten(repr(name), 60)}")
            if not _is_json_type(value, expected):
                what = _JSON_TYPES.get(expected, expected.__name__)
                raise _BadRequest(f"{command}: argument {name!r} must be {what}")
        return command, request

    def _error(self, message: str) -> bytes:
        self.stats.errors += 1
        return encode_line({"ok": False, "error": message})

    def _internal_error(self, command: str, exc: BaseException, now: float) -> bytes:
        self.stats.internal_errors += 1
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
        self._log.log(
            now,
            ("internal", command),
            logging.ERROR,
            "control command %r failed: %s: %s%s",
            command,
            type(exc).__name__,
            shorten(exc),
            where,
        )
        return self._error(f"internal error: {type(exc).__name__}: {shorten(exc)}")

    # -- writing ------------------------------------------------------------------------

    def _queue(self, c: _Connection, reply: bytes) -> bool:
        """Add a reply to the connection's output; False when that dropped the connection
        (its client is not reading and its unsent replies passed ``max_buffered``)."""
        out = c.out
        if out and len(out) + len(reply) > self.limits.max_buffered:
            self.stats.disconnected_slow += 1
            self._close(c)
            return False
        out += reply
        if len(out) >= FLUSH_AT and not c.writing:
            self._flush(c, None)
        return c.fd in self._connections

    def _flush(self, c: _Connection, now: float | None) -> None:
        """Send what the socket takes now; wait for writability for the rest."""
        out = c.out
        while out:
            try:
                sent = c.sock.send(out, _SEND_FLAGS)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close(c)
                return
            del out[:sent]
            if now is not None:
                c.last_active = now
        if out and not c.writing:
            self._loop.add_writer(c.fd, functools.partial(self._on_writable, c))
            c.writing = True
        elif not out and c.writing:
            self._loop.remove_writer(c.fd)
            c.writing = False
        if not out and c.closing:
            self._close(c)

    def _on_writable(self, c: _Connection, now: float) -> None:
        if c.fd in self._connections:
            self._flush(c, now)

    # -- idle connections ---------------------------------------------------------------

    def _arm_sweep(self) -> None:
        """One timer at the earliest idle deadline. Activity only moves deadlines later,
        so the timer is never late; when it fires it closes what expired and re-arms."""
        if self._connections:
            oldest = min(c.last_active for c in self._connections.values())
            self._sweep = self._loop.call_at(oldest + self.limits.idle_timeout, self._on_sweep)
        else:
            self._sweep = None

    def _on_sweep(self, now: float) -> None:
        limit = now - self.limits.idle_timeout
        for c in list(self._connections.values()):
            if c.last_active <= limit:
                self.stats.timed_out += 1
                self._close(c)
        self._arm_sweep()

    def _close(self, c: _Connection) -> None:
        if self._connections.get(c.fd) is not c:
            return
        del self._connections[c.fd]
        if self._ready.get(c.fd) is c:
            del self._ready[c.fd]
        for waiters in self._gate_waiters.values():
            if waiters.get(c.fd) is c:
                del waiters[c.fd]
        # off the loop before the descriptor is closed (its number may be reused at once)
        self._set_reading(c, False)
        if c.writing:
            self._loop.remove_writer(c.fd)
            c.writing = False
        c.sock.close()
        c.inbuf.clear()
        c.out.clear()


def _is_json_type(value: object, expected: type) -> bool:
    """JSON's view of types: a boolean is not a number; an integer is a number."""
    if isinstance(value, bool):
        return expected is bool
    if expected is float:
        return isinstance(value, int | float)
    return isinstance(value, expected)


def _bind(path: Path) -> tuple[socket.socket, tuple[int, int]]:
    """Create the listening socket at ``path``: mode 0660, group ``secureiod`` if it
    exists. A leftover socket nobody listens on is replaced; a live one (another daemon)
    or anything that is not a socket is refused with a one-line ``ControlError``."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(
                f"{path}: exists and is not a socket; remove it or choose another control_socket"
            )
        _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        old_umask = os.umask(0o117)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o660)
        with contextlib.suppress(KeyError, PermissionError):
            os.chown(path, -1, grp.getgrnam(CONTROL_GROUP).gr_gid)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        st = os.lstat(path)
    except OSError as exc:
        sock.close()
        raise ControlError(
            f"{path}: cannot serve the control socket: {exc.strerror or exc}"
        ) from None
    return sock, (st.st_dev, st.st_ino)


def _remove_stale(path: Path) -> None:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.setblocking(False)
    try:
        probe.connect(str(path))
    except BlockingIOError:
        pass  # a listener with a full backlog: alive
    except OSError:
        path.unlink(missing_ok=True)  # nobody listens: a leftover from a crash
        return
    finally:
        probe.close()
    raise ControlError(f"{path}: another daemon is already listening on this control socket")
