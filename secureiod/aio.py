"""The asyncio API: one secureio session over one UDP socket, shaped like the Go library's.

Go                                          Python (this module)
``NewSession(ctx, remote, conn, …)``        ``await connect(identity, remote, "host:port")``
                                            ``await listen(identity, remote, "host:port")``
``session.Start(ctx)``                      (``connect``/``listen`` start the session)
``session.Write(b)``                        ``session.write(b)``
``session.Read(buf)``                       ``await session.read()``
``SetHandlerFuncs(type, f, errFunc)``      ``session.set_handler(MessageType.channel(0), f)``
``WriteMessage(t, p)``                      ``await session.write_message(t, p)``
``WriteMessageAsync(t, p) -> *SendInfo``    ``session.write_message_async(t, p) -> SendInfo``

The protocol lives in the sans-IO ``Session``; this module is only its driver. Every input
(a batch of datagrams, a timer, a write) ends the same way: flush the aggregation batch,
send what the session produced, dispatch its events, re-arm its one timer. Flushing when
the input runs dry (rather than after the reference's 50 µs debounce) is what aggregates:
everything written in one event-loop iteration, or received in one readiness batch, shares
packets, and nothing waits for a timer.

Where this differs from the Go reference on purpose:

* a full ``read()`` queue drops the message (counted in ``driver_stats``) instead of
  blocking the reader, which in Go also stalls key exchange (§5.4, §13 item 17);
* the peer's address is learned and followed (roaming) by the session itself, from
  datagrams that prove they are fresh and authentic (``Session.receive_datagram`` takes
  the source address), so neither a forged nor a replayed datagram redirects our replies.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from .endpoint import Address, format_endpoint, parse_endpoint
from .secureio.errors import PayloadTooBigError
from .secureio.events import (
    Closed,
    KeyRotated,
    MessageReceived,
    PathChanged,
    PayloadSizeNegotiated,
    PeerRestarted,
    SessionState,
    StateChanged,
)
from .secureio.identity import Identity, PublicKey, load_or_create_identity, resolve_public_key
from .secureio.session import (
    QueueFullError,
    Session,
    SessionClosedError,
    SessionOptions,
    SessionStats,
)
from .secureio.wire import MessageType
from .udp import SendResult, UdpSocket, UdpStats

__all__ = [
    "DriverStats",
    "Handler",
    "PayloadTooBigError",
    "QueueFullError",
    "SecureSession",
    "SendInfo",
    "SessionClosedError",
    "SessionState",
    "connect",
    "listen",
]

logger = logging.getLogger(__name__)

READ_QUEUE_SIZE: Final = 1024
"""Messages ``read()`` holds, as the reference's queue (§5.4)."""
RECV_BATCH: Final = 64
"""Datagrams handled per wake-up; the rest waits for the next loop iteration so one busy
socket cannot starve the other tasks of the loop."""
_TRANSMIT_ROUNDS: Final = 8
"""``report_too_big`` can make the session produce smaller probes at once; bound the
resulting send loop so a kernel that refuses everything cannot spin us."""

Handler = Callable[[bytes], object]
"""Called with each payload of its message type; may return an awaitable, which is run as a
task. Exceptions are logged and counted, the session carries on (as the reference)."""
AddressLike = str | tuple[str, int]
IdentityLike = Identity | str | os.PathLike[str]
RemoteIdentityLike = PublicKey | str | bytes | None


@dataclass(slots=True)
class DriverStats:
    """Counters of this module's own decisions (the session and the socket have theirs)."""

    read_queue_drops: int = 0
    """READ_WRITE messages dropped because nobody read them fast enough."""
    unhandled_messages: int = 0
    """Messages of a type with no handler (dropped silently, as the reference does)."""
    handler_errors: int = 0
    unaddressed_drops: int = 0
    """Datagrams the session still produced after the socket was closed. (What a listener
    produces before it knows where its peer is, the session counts as ``no-endpoint``.)"""
    address_changes: int = 0
    """Times the session adopted a new peer address (its ``PathChanged`` events)."""


class SendInfo:
    """The fate of one ``write_message_async``: done once the datagram(s) carrying the
    message were handed to the socket (UDP promises nothing beyond that), or failed.

    Synchronous failures (too big, queue full, closed) raise from ``write_message_async``
    itself; ``error`` reports what happens later, i.e. the session closing before the
    message went out.
    """

    __slots__ = ("_error", "_future", "message_type", "size")

    def __init__(self, future: asyncio.Future[None], message_type: int, size: int) -> None:
        self._future = future
        self._error: Exception | None = None
        self.message_type = message_type
        self.size = size

    def done(self) -> bool:
        return self._future.done()

    @property
    def error(self) -> Exception | None:
        return self._error

    async def wait(self) -> None:
        """Return when done; never raises the send error (check ``error``), so that waiting
        on many infos is one ``gather`` without ``return_exceptions``."""
        # shield: a cancelled waiter must not cancel the outcome other waiters share.
        await asyncio.shield(self._future)

    def _complete(self, error: Exception | None = None) -> None:
        if not self._future.done():
            self._error = error
            self._future.set_result(None)

    def __repr__(self) -> str:
        state = (
            "pending" if not self.done() else f"error={self._error!r}" if self._error else "sent"
        )
        return f"SendInfo({MessageType.name(self.message_type)}, {self.size} bytes, {state})"


class SecureSession:
    """A started secureio session bound to its own UDP socket; make one with ``connect`` or
    ``listen``. All methods must be called from the event loop's thread."""

    def __init__(
        self,
        session: Session,
        transport: UdpSocket,
        remote_address: Address | None,
        *,
        read_queue_size: int = READ_QUEUE_SIZE,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._session = session
        self._udp = transport
        if remote_address is not None:
            session.set_endpoint(remote_address)
        self._handlers: dict[int, Handler] = {}
        self._handler_tasks: set[asyncio.Task[object]] = set()
        self._failed_handler_types: set[int] = set()
        self._rx: deque[bytes] = deque()
        self._rx_limit = read_queue_size
        self._rx_ready = asyncio.Event()
        self._ready = asyncio.Event()
        """Set once established or closed: what ``wait_established`` waits for."""
        self._closed_event = asyncio.Event()
        self._written = session.stats.tx_messages
        """Messages accepted by the session so far; message n (1-based, counting from the
        stats baseline) is on the wire once ``stats.tx_messages >= n`` after a flush."""
        self._pending: deque[tuple[int, SendInfo]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when: float | None = None
        self._flush_handle: asyncio.Handle | None = None
        self._closed = False
        self._close_reason: str | None = None
        self._local = transport.local_address
        self._label = format_endpoint(self._local)
        self.driver_stats = DriverStats()

    def _start(self) -> None:
        self._loop.add_reader(self._udp.fileno(), self._on_readable)
        now = self._loop.time()
        self._session.start(now)
        self._after_input(now)

    # -- properties -------------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        return self._session.state

    @property
    def payload_size(self) -> int:
        """The largest payload sent in one packet (negotiated; larger ones need
        fragmentation)."""
        return self._session.payload_size

    @property
    def stats(self) -> SessionStats:
        return self._session.stats

    @property
    def transport_stats(self) -> UdpStats:
        return self._udp.stats

    @property
    def remote_address(self) -> Address | None:
        """Where datagrams go: the session's endpoint, i.e. the address given to ``connect``
        or the latest one the session validated (``None`` for a listener that has not heard
        from its peer yet)."""
        return self._session.endpoint

    @property
    def local_address(self) -> Address:
        """The bound socket address (still answered after close, for log lines)."""
        return self._local

    @property
    def remote_identity(self) -> PublicKey | None:
        return self._session.remote_identity

    @property
    def session(self) -> Session:
        """The sans-IO session, for inspection; driving it directly breaks the driver."""
        return self._session

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def close_reason(self) -> str | None:
        return self._close_reason

    # -- public API -------------------------------------------------------------------

    async def wait_established(self, timeout: float | None = None) -> None:
        """Wait for key exchange (and negotiation) to finish.

        Raises ``TimeoutError`` after ``timeout`` seconds and ``SessionClosedError`` if the
        session closes first (e.g. the key exchange timed out).
        """
        if not self._ready.is_set():
            await asyncio.wait_for(self._ready.wait(), timeout)
        if self._session.state != SessionState.ESTABLISHED:
            raise SessionClosedError(f"session closed: {self._close_reason}")

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Queue ``data`` as one READ_WRITE message (Go's ``Write``); returns ``len(data)``.

        Never blocks: before establishment the message waits in the session (up to
        ``max_queued_messages``, then ``QueueFullError``); it goes out at the end of this
        event-loop iteration together with everything else written meanwhile.
        """
        self._write(MessageType.READ_WRITE, data)
        return len(data)

    async def write_message(
        self, message_type: int, payload: bytes | bytearray | memoryview
    ) -> None:
        """Send one message and return once it was handed to the socket (Go's sync
        ``WriteMessage``). Raises the session's errors and ``SessionClosedError`` if the
        session closes before the message went out."""
        info = self.write_message_async(message_type, payload)
        await info.wait()
        if info.error is not None:
            raise info.error

    def write_message_async(
        self, message_type: int, payload: bytes | bytearray | memoryview
    ) -> SendInfo:
        """Queue one message and return its ``SendInfo`` at once.

        Raises ``PayloadTooBigError`` (above ``payload_size`` without fragmentation),
        ``QueueFullError`` and ``SessionClosedError`` immediately, like ``write``.
        """
        seq = self._write(message_type, payload)
        info = SendInfo(self._loop.create_future(), message_type, len(payload))
        self._pending.append((seq, info))
        return info

    async def read(self) -> bytes:
        """Return the next READ_WRITE message (Go's ``Read``, one message per call).

        Messages already received are still returned after the session closed; then it
        raises ``SessionClosedError``.
        """
        rx = self._rx
        while not rx:
            if self._closed:
                raise SessionClosedError(f"session closed: {self._close_reason}")
            self._rx_ready.clear()
            await self._rx_ready.wait()
        return rx.popleft()

    def set_handler(self, message_type: int, handler: Handler | None) -> None:
        """Route every message of ``message_type`` to ``handler`` (``None`` removes it).

        A handler for READ_WRITE replaces the ``read()`` queue, as in the reference, where a
        registered handler takes precedence over the queue (§5.4). It runs synchronously in
        the driver: keep it short, or return a coroutine to run it as a task.
        """
        if MessageType.is_internal(message_type):
            raise ValueError("internal message types are handled by the session itself")
        if handler is None:
            self._handlers.pop(message_type, None)
        else:
            self._handlers[message_type] = handler

    async def close(self) -> None:
        """Send what is batched and stop; the socket is closed. There is no close message
        in the protocol: the peer notices only when its key exchange times out."""
        if not self._closed:
            now = self._loop.time()
            self._session.close(now)
            self._after_input(now)
            # Closed is normally dispatched by _after_input; this covers an event queue that
            # overflowed and lost it.
            self._teardown(self._session.close_reason or "closed by application")
        if self._handler_tasks:
            await asyncio.gather(*self._handler_tasks, return_exceptions=True)

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    async def __aenter__(self) -> SecureSession:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        """``async for message in session``: READ_WRITE messages until the session closes."""
        while True:
            try:
                yield await self.read()
            except SessionClosedError:
                return

    def __repr__(self) -> str:
        endpoint = self._session.endpoint
        remote = format_endpoint(endpoint) if endpoint else "?"
        return f"SecureSession({self._label} <-> {remote}, {self.state.name})"

    # -- driver -----------------------------------------------------------------------

    def _write(self, message_type: int, payload: bytes | bytearray | memoryview) -> int:
        if self._closed:
            raise SessionClosedError(f"session closed: {self._close_reason}")
        self._session.write_message(message_type, payload, self._loop.time())
        self._written += 1
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._on_flush)
        return self._written

    def _on_flush(self) -> None:
        self._flush_handle = None
        if not self._closed:
            self._after_input(self._loop.time())

    def _on_readable(self) -> None:
        if self._closed:
            return
        batch = self._udp.recv_batch(RECV_BATCH)
        if not batch:
            return
        now = self._loop.time()
        receive = self._session.receive_datagram
        for data, addr in batch:
            receive(data, addr, now)
        self._after_input(now)

    def _on_timer(self) -> None:
        self._timer = None
        when = self._timer_when
        self._timer_when = None
        if self._closed:
            return
        # call_at may fire up to the clock resolution early; never hand the session a time
        # before its own deadline or it re-arms the same deadline in a tight loop.
        now = self._loop.time()
        if when is not None and now < when:
            now = when
        self._session.handle_timer(now)
        self._after_input(now)

    def _after_input(self, now: float) -> None:
        """The common tail of every input: flush, send, settle writes, events, timer."""
        session = self._session
        session.flush(now)
        self._transmit(now)
        if self._pending:
            self._resolve_sent()
        self._dispatch_events()
        self._arm_timer()

    def _transmit(self, now: float) -> None:
        session = self._session
        udp = self._udp
        for _ in range(_TRANSMIT_ROUNDS):
            out = session.datagrams_to_send(now)
            if not out:
                return
            if self._closed:
                self.driver_stats.unaddressed_drops += len(out)
                return
            for datagram, addr in out:
                if udp.send(datagram, addr) is SendResult.TOO_BIG:
                    session.report_too_big(len(datagram), now)
        if self._flush_handle is None and not self._closed:
            self._flush_handle = self._loop.call_soon(self._on_flush)

    def _resolve_sent(self) -> None:
        # Called right after a flush, so nothing counted in tx_messages is still batched.
        sent = self._session.stats.tx_messages
        pending = self._pending
        while pending and pending[0][0] <= sent:
            pending.popleft()[1]._complete()

    def _dispatch_events(self) -> None:
        session = self._session
        handlers = self._handlers
        read_write = MessageType.READ_WRITE
        while (event := session.next_event()) is not None:
            if type(event) is MessageReceived:
                handler = handlers.get(event.type)
                if handler is not None:
                    self._call_handler(handler, event)
                elif event.type == read_write:
                    if len(self._rx) >= self._rx_limit:
                        self.driver_stats.read_queue_drops += 1
                    else:
                        self._rx.append(event.payload)
                        self._rx_ready.set()
                else:
                    self.driver_stats.unhandled_messages += 1
            elif isinstance(event, StateChanged):
                # Entering CLOSED is reported with its reason by _teardown (one line).
                logger.log(
                    logging.DEBUG if event.new == SessionState.CLOSED else logging.INFO,
                    "%s: %s -> %s",
                    self._peer_label(),
                    _state_name(event.old),
                    _state_name(event.new),
                )
                if event.new == SessionState.ESTABLISHED:
                    self._ready.set()
            elif isinstance(event, PayloadSizeNegotiated):
                logger.info("%s: payload size %d bytes", self._peer_label(), event.size)
            elif isinstance(event, KeyRotated):
                logger.debug(
                    "%s: %s key rotated", self._peer_label(), "local" if event.local else "remote"
                )
            elif isinstance(event, PathChanged):
                self.driver_stats.address_changes += 1
                if event.old is None:
                    logger.info("%s: peer is at %s", self._label, format_endpoint(event.new))
                else:
                    logger.info(
                        "%s: peer moved from %s to %s",
                        self._label,
                        format_endpoint(event.old),
                        format_endpoint(event.new),
                    )
            elif isinstance(event, PeerRestarted):
                logger.info("%s: peer restarted (new remote session)", self._peer_label())
            elif isinstance(event, Closed):
                self._teardown(event.reason)

    def _call_handler(self, handler: Handler, event: MessageReceived) -> None:
        try:
            result = handler(event.payload)
        except Exception as exc:
            self._handler_failed(event.type, exc)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._handler_tasks.add(task)
            task.add_done_callback(lambda t, mtype=event.type: self._handler_done(t, mtype))

    def _handler_done(self, task: asyncio.Task[object], message_type: int) -> None:
        self._handler_tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._handler_failed(message_type, exc)

    def _handler_failed(self, message_type: int, exc: BaseException) -> None:
        self.driver_stats.handler_errors += 1
        # One traceback per message type; a handler failing on every message would
        # otherwise flood the log with copies of the same bug.
        if message_type not in self._failed_handler_types:
            self._failed_handler_types.add(message_type)
            logger.error(
                "%s: handler for %s failed (further failures are only counted)",
                self._peer_label(),
                MessageType.name(message_type),
                exc_info=exc,
            )

    def _arm_timer(self) -> None:
        when = None if self._closed else self._session.get_timer()
        if when == self._timer_when:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_when = when
        if when is not None:
            self._timer = self._loop.call_at(when, self._on_timer)

    def _teardown(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self._close_reason = reason
        self._loop.remove_reader(self._udp.fileno())
        self._udp.close()
        for handle in (self._timer, self._flush_handle):
            if handle is not None:
                handle.cancel()
        self._timer = self._flush_handle = None
        self._timer_when = None
        while self._pending:
            self._pending.popleft()[1]._complete(
                SessionClosedError(f"session closed before the message was sent: {reason}")
            )
        self._ready.set()
        self._rx_ready.set()
        self._closed_event.set()
        logger.info("%s: session closed: %s", self._peer_label(), reason)

    def _peer_label(self) -> str:
        endpoint = self._session.endpoint
        remote = format_endpoint(endpoint) if endpoint else "(peer address unknown)"
        return f"{self._label} <-> {remote}"


def _state_name(state: SessionState) -> str:
    return state.name.lower().replace("_", "-")


# -- factories ---------------------------------------------------------------------------


async def connect(
    identity: IdentityLike,
    remote_identity: RemoteIdentityLike,
    address: AddressLike,
    *,
    options: SessionOptions | None = None,
    local_address: AddressLike | None = None,
    dont_fragment: bool = True,
    read_queue_size: int = READ_QUEUE_SIZE,
) -> SecureSession:
    """Start a session with the peer at ``address`` (``"host:port"``, ``"[v6]:port"`` or a
    ``(host, port)`` tuple) from a fresh UDP socket (``local_address`` to pin it).

    Returns at once, like Go's ``Start``: writes before establishment are queued; use
    ``wait_established`` to wait for the handshake.
    """
    loop = asyncio.get_running_loop()
    host, port = _split(address, "address")
    if not host or port == 0:
        raise ValueError(f"cannot connect to {address!r}: a host and a non-zero port are needed")
    family, remote = await _resolve(loop, host, port, socket.AF_UNSPEC, passive=False)
    if local_address is not None:
        lhost, lport = _split(local_address, "local_address")
        _, local = await _resolve(loop, lhost, lport, family, passive=True)
    else:
        local = ("::", 0, 0, 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)
    udp = UdpSocket.bind(local, family=family, dont_fragment=dont_fragment)
    return _make(identity, remote_identity, udp, remote, options, read_queue_size)


async def listen(
    identity: IdentityLike,
    remote_identity: RemoteIdentityLike,
    address: AddressLike,
    *,
    options: SessionOptions | None = None,
    dont_fragment: bool = True,
    read_queue_size: int = READ_QUEUE_SIZE,
) -> SecureSession:
    """Start a session that waits for its peer on ``address`` (port 0 picks a free port;
    see ``local_address``). One socket, one peer: the session learns the peer's address
    from its first signed key exchange and follows it afterwards (roaming), by the rules of
    ``Session.receive_datagram``."""
    loop = asyncio.get_running_loop()
    host, port = _split(address, "address")
    family, local = await _resolve(loop, host, port, socket.AF_UNSPEC, passive=True)
    udp = UdpSocket.bind(local, family=family, dont_fragment=dont_fragment)
    return _make(identity, remote_identity, udp, None, options, read_queue_size)


def _make(
    identity: IdentityLike,
    remote_identity: RemoteIdentityLike,
    udp: UdpSocket,
    remote: Address | None,
    options: SessionOptions | None,
    read_queue_size: int,
) -> SecureSession:
    try:
        local_identity = _identity(identity)
        peer = _remote_identity(remote_identity)
        session = Session(
            local_identity,
            peer,
            created_at_ns=time.time_ns(),
            options=options or SessionOptions(),
            endpoint=remote,
        )
        secure = SecureSession(session, udp, None, read_queue_size=read_queue_size)
        secure._start()
    except BaseException:
        udp.close()
        raise
    return secure


def _identity(value: IdentityLike) -> Identity:
    """An ``Identity``, or a path to load/create one from (Go's ``NewIdentity(dir)``)."""
    if isinstance(value, Identity):
        return value
    return load_or_create_identity(value)


def _remote_identity(value: RemoteIdentityLike) -> PublicKey | None:
    if value is None:
        logger.warning(
            "no remote identity given: the first peer whose key exchange arrives is trusted"
        )
        return None
    if isinstance(value, PublicKey):
        return value
    if isinstance(value, bytes):
        return PublicKey(value)
    return resolve_public_key(value)


def _split(address: AddressLike, what: str) -> tuple[str, int]:
    if isinstance(address, str):
        return parse_endpoint(address)
    if (
        isinstance(address, tuple)
        and len(address) >= 2
        and isinstance(address[0], str)
        and isinstance(address[1], int)
    ):
        return address[0], address[1]
    raise TypeError(f"{what} must be 'host:port' or a (host, port) tuple, not {address!r}")


async def _resolve(
    loop: asyncio.AbstractEventLoop, host: str, port: int, family: int, *, passive: bool
) -> tuple[int, Address]:
    if not host:
        host = "::" if family == socket.AF_INET6 else "0.0.0.0"
    infos = await loop.getaddrinfo(
        host,
        port,
        family=family,
        type=socket.SOCK_DGRAM,
        proto=socket.IPPROTO_UDP,
        flags=socket.AI_PASSIVE if passive else 0,
    )
    fam, _, _, _, sockaddr = infos[0]
    return int(fam), sockaddr
