"""The UDP adapter: one non-blocking datagram socket, batched reads, non-blocking sends.

It knows nothing of secureio. It owns the file descriptor and turns the system calls'
failure modes into values a caller can act on without ``try``/``except`` on the hot path:
a send that the kernel refuses as too big (``EMSGSIZE``) comes back as
``SendResult.TOO_BIG`` so the caller can tell the session (``Session.report_too_big``), a
full socket buffer is a counted drop (UDP is lossy anyway; blocking would stall every peer
behind one slow one), and anything else is counted and logged once per kind so a broken
route cannot flood the journal.

It is synchronous on purpose: the asyncio API (``secureiod.aio``) and the daemon both put
the file descriptor into their own event loop and call ``recv_batch``/``send`` when it is
ready.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import pwd
import socket
import struct
import sys
from dataclasses import dataclass, field
from typing import Final

from .endpoint import Address, format_endpoint

__all__ = [
    "BindError",
    "DEFAULT_BUFFER_SIZE",
    "RECV_BUFFER_SIZE",
    "Address",
    "SendResult",
    "UdpSocket",
    "UdpStats",
]

logger = logging.getLogger(__name__)


DEFAULT_BUFFER_SIZE: Final = 4 * 1024 * 1024
"""Kernel socket buffers: large enough to ride out a burst while the loop is busy
decrypting, so bursts are not dropped in the kernel before we even see them."""
RECV_BUFFER_SIZE: Final = 65535 + 1024
"""Larger than any UDP payload (65507 on IPv4, 65527 on IPv6), so a datagram is never
silently truncated: the protocol needs the peer's P + 53 bytes at least (§12 item 1)."""
BULK_READ: Final = 16384
"""A GRO read this large makes the next read allocate its own buffer (``recv_runs``)."""

# Linux values; the ``socket`` module does not export them (include/uapi/linux/in.h, in6.h).
_IP_MTU_DISCOVER: Final = getattr(socket, "IP_MTU_DISCOVER", 10)
_IP_PMTUDISC_DO: Final = getattr(socket, "IP_PMTUDISC_DO", 2)
_IPV6_MTU_DISCOVER: Final = getattr(socket, "IPV6_MTU_DISCOVER", 23)
_IPV6_PMTUDISC_DO: Final = getattr(socket, "IPV6_PMTUDISC_DO", 2)
_IPV6_DONTFRAG: Final = getattr(socket, "IPV6_DONTFRAG", 62)
_SO_RCVBUFFORCE: Final = getattr(socket, "SO_RCVBUFFORCE", 33)
_SO_SNDBUFFORCE: Final = getattr(socket, "SO_SNDBUFFORCE", 32)
_SO_MARK: Final = getattr(socket, "SO_MARK", 36)

_SOL_UDP: Final = 17
_UDP_SEGMENT: Final = 103  # include/uapi/linux/udp.h: GSO, one sendmsg for many datagrams
_UDP_GRO: Final = 104  # receive coalesced datagrams with their segment size in a cmsg
GSO_MAX_SEGMENTS: Final = 64
"""Datagrams per GSO send at most (``UDP_MAX_SEGMENTS``, include/net/udp.h)."""
GSO_MAX_BYTES: Final = 65000
"""Bytes per GSO send at most: below the 65,507-byte UDP payload of one IPv4 skb."""
_GSO_SIZE: Final = struct.Struct("=H")
_GRO_SIZE: Final = struct.Struct("=i")
_CMSG_SPACE: Final = socket.CMSG_SPACE(4)

_DROP_ERRNOS: Final = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS})


class SendResult(enum.Enum):
    """What became of one ``send``; only ``TOO_BIG`` asks the caller to do something."""

    SENT = "sent"
    TOO_BIG = "too-big"
    """EMSGSIZE: larger than the path MTU the kernel knows (the socket does not fragment);
    hand ``len(data)`` to ``Session.report_too_big``."""
    DROPPED = "dropped"
    """The socket buffer was full (EAGAIN/ENOBUFS): lost like any UDP datagram."""
    ERROR = "error"
    """Any other failure (no route, address family mismatch, ...); counted and logged."""


@dataclass(slots=True)
class UdpStats:
    rx_datagrams: int = 0
    rx_bytes: int = 0
    rx_errors: int = 0
    tx_datagrams: int = 0
    tx_bytes: int = 0
    tx_dropped: int = 0
    tx_too_big: int = 0
    tx_errors: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    """Counts of the 'other' OSErrors, keyed by errno name, for status output."""


class BindError(OSError):
    """The socket could not be bound; its text is one line naming the address, the reason
    and, for "address already in use", what holds the port when this host can tell."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()

    @classmethod
    def explain(cls, exc: OSError, address: Address | tuple[str, int]) -> BindError:
        shown = format_endpoint(address)
        if exc.errno == errno.EADDRINUSE:
            holder = udp_port_holder(address[1])
            held = f" by {holder}" if holder else ""
            text = (
                f"cannot listen on {shown}: the address is already in use{held}; stop it "
                "or choose another port for listen"
            )
        elif exc.errno == errno.EADDRNOTAVAIL:
            text = f"cannot listen on {shown}: no interface of this host has that address"
        elif exc.errno == errno.EACCES:
            text = (
                f"cannot listen on {shown}: permission denied (ports below 1024 need "
                "CAP_NET_BIND_SERVICE)"
            )
        else:
            text = f"cannot listen on {shown}: {exc.strerror or exc}"
        return cls(exc.errno or 0, text)


_PROC_SCAN_LIMIT: Final = 100_000
"""File descriptors looked at, at most, to name the process holding a port."""


def udp_port_holder(port: int) -> str | None:
    """Who has a UDP socket on ``port`` in this network namespace: "secureiod (pid 812)",
    or "a socket of user nobody" when the process cannot be seen; None if unknown.

    From ``/proc/net/udp{,6}`` (the socket's inode and owner) and ``/proc/*/fd`` (which
    process has that inode open). Only for an error message: bounded and best-effort.
    """
    inodes: dict[str, int] = {}
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table, encoding="ascii", errors="replace") as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or ":" not in fields[1]:
                continue
            try:
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                uid = int(fields[7])
            except ValueError:
                continue
            if local_port == port and fields[9] != "0":
                inodes[f"socket:[{fields[9]}]"] = uid
    if not inodes:
        return None
    seen = 0
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        pids = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            seen += 1
            if seen > _PROC_SCAN_LIMIT:
                break
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target in inodes:
                try:
                    with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
                        name = f.read().strip()
                except OSError:
                    name = "a process"
                return f"{name} (pid {pid})"
        if seen > _PROC_SCAN_LIMIT:
            break
    uid = next(iter(inodes.values()))
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = f"uid {uid}"
    return f"a socket of user {user}"


# --- the socket -----------------------------------------------------------------------------


class UdpSocket:
    """A non-blocking UDP socket with the options the protocol wants (see module doc)."""

    def __init__(self, sock: socket.socket) -> None:
        """Wrap an existing socket (e.g. one handed over by systemd); ``bind`` makes one."""
        sock.setblocking(False)
        self._sock = sock
        self.family = sock.family
        self.stats = UdpStats()
        self._buffer = bytearray(RECV_BUFFER_SIZE)
        self._view = memoryview(self._buffer)
        self._bulk = False
        """The last read was a large GRO run: read the next into its own bytes."""
        self._logged: set[tuple[str, int]] = set()
        self.gso = False
        """Send runs of equal-size datagrams with one ``sendmsg`` (UDP_SEGMENT)."""
        self._gso_einval = False
        self.gro = False
        """The kernel may hand over several datagrams of one sender in one read."""

    @classmethod
    def bind(
        cls,
        address: Address | tuple[str, int],
        *,
        family: int | None = None,
        dont_fragment: bool = True,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        reuse_address: bool = False,
        segmentation: bool = False,
        mark: int | None = None,
    ) -> UdpSocket:
        """Create a socket bound to ``address`` (a sockaddr; port 0 picks a free port).

        ``dont_fragment`` (default) makes the kernel refuse datagrams above the path MTU with
        EMSGSIZE instead of fragmenting them, as the reference does on Linux (§8.4): the
        session's path-size negotiation then sees the real limit.
        ``segmentation`` turns on UDP GSO for ``send_batch`` and GRO for ``recv_batch``
        where the kernel has them: one system call per run of datagrams instead of one per
        datagram, which is most of a busy tunnel's system-call cost.
        ``mark`` is the firewall mark (``SO_MARK``, needs CAP_NET_ADMIN) of every datagram
        sent: policy routing keeps marked datagrams out of a full tunnel (wg-quick's
        ``FwMark``; ``daemon/policy.py``).
        """
        if family is None:
            family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, socket.IPPROTO_UDP)
        try:
            if reuse_address:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            _set_buffers(sock, buffer_size)
            if dont_fragment:
                _set_dont_fragment(sock)
            if mark is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, _SO_MARK, mark)
                except OSError as exc:
                    raise OSError(
                        exc.errno,
                        f"setting fwmark {mark:#x} on the UDP socket: "
                        f"{exc.strerror} (needs CAP_NET_ADMIN)",
                    ) from None
            try:
                sock.bind(address)
            except OSError as exc:
                raise BindError.explain(exc, address) from None
        except BaseException:
            sock.close()
            raise
        udp = cls(sock)
        if segmentation:
            udp.gso = True
            try:
                sock.setsockopt(_SOL_UDP, _UDP_GRO, 1)
                udp.gro = True
            except OSError as exc:
                logger.debug("UDP GRO unavailable: %s", exc)
        return udp

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def closed(self) -> bool:
        return self._sock.fileno() < 0

    @property
    def local_address(self) -> Address:
        return self._sock.getsockname()

    def close(self) -> None:
        self._sock.close()

    def recv_batch(self, max_count: int = 64) -> list[tuple[bytes, Address]]:
        """Read up to ``max_count`` datagrams, stopping early when the socket is empty.

        One wake-up, many datagrams: the caller feeds them all to the session and flushes
        once. Errors other than "empty" (e.g. a queued ICMP error) are counted and end the
        batch; the next readiness notification continues. With GRO one read may carry a
        run of datagrams of one sender, split here at the segment size the kernel reports.
        """
        out: list[tuple[bytes, Address]] = []
        for data, segment, addr in self.recv_runs(max_count):
            if segment >= len(data):
                out.append((data, addr))
            else:
                out.extend((data[i : i + segment], addr) for i in range(0, len(data), segment))
        return out

    def recv_runs(self, max_count: int = 64) -> list[tuple[bytes, int, Address]]:
        """``recv_batch`` as runs: each read as ``(data, segment_size, addr)``, its datagrams
        ``segment_size`` bytes back to back in ``data`` (the last may be shorter), one
        copy per read instead of one per datagram. Without GRO every run is one datagram
        (``segment_size == len(data)``). The one place the socket is read (``recv_batch``
        cuts these runs); its counters count datagrams, not reads."""
        sock = self._sock
        view = self._view
        buffers = [self._buffer]
        stats = self.stats
        gro = self.gro
        bulk = self._bulk
        out: list[tuple[bytes, int, Address]] = []
        for _ in range(max_count):
            try:
                if bulk:
                    # a bulk flow's reads are whole GRO runs (up to 64 KiB): received
                    # straight into their own bytes, the one copy being the kernel's
                    data, ancdata, _flags, addr = sock.recvmsg(RECV_BUFFER_SIZE, _CMSG_SPACE)
                    size = len(data)
                elif gro:
                    size, ancdata, _flags, addr = sock.recvmsg_into(buffers, _CMSG_SPACE)
                    data = None
                else:
                    size, addr = sock.recvfrom_into(self._buffer)
                    ancdata, data = (), None
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                stats.rx_errors += 1
                self._note_error("receive", exc)
                break
            segment = size
            for level, kind, cmsg in ancdata:
                if level == _SOL_UDP and kind == _UDP_GRO and len(cmsg) >= 4:
                    segment = _GRO_SIZE.unpack_from(cmsg)[0] or size
            if segment <= 0 or segment > size:
                segment = size
            stats.rx_bytes += size
            stats.rx_datagrams += -(-size // segment) if size else 1
            out.append((data if data is not None else bytes(view[:size]), segment or 1, addr))
            # small reads (a lone datagram, ACKs) copy less than a 64 KiB allocation costs
            bulk = gro and size >= BULK_READ
        self._bulk = bulk
        return out

    def send_batch(
        self, datagrams: list[bytes], address: Address
    ) -> list[tuple[bytes, SendResult]]:
        """Send datagrams in order; returns the ones that did not go out, with why.

        With GSO a run of equal-size datagrams (the last may be shorter) goes out in one
        ``sendmsg``; the kernel cuts it into separate datagrams on the wire, each exactly
        as it would have been sent alone. A refused run is retried one by one, so the
        caller still learns which datagram was too big.
        """
        failures: list[tuple[bytes, SendResult]] = []
        n = len(datagrams)
        i = 0
        send = self.send
        while i < n:
            first = datagrams[i]
            size = len(first)
            j = i + 1
            if self.gso:
                total = size
                while (
                    j < n
                    and j - i < GSO_MAX_SEGMENTS
                    and len(datagrams[j]) == size
                    and total + size <= GSO_MAX_BYTES
                ):
                    total += size
                    j += 1
                if (
                    j < n
                    and j - i < GSO_MAX_SEGMENTS
                    and len(datagrams[j]) < size
                    and total + len(datagrams[j]) <= GSO_MAX_BYTES
                ):
                    j += 1  # the shorter tail of a run rides along
            if j - i == 1:
                result = send(first, address)
                if result is not SendResult.SENT:
                    failures.append((first, result))
            elif not self._send_segmented(datagrams[i:j], size, address):
                too_big = False
                for d in datagrams[i:j]:
                    result = send(d, address)
                    if result is not SendResult.SENT:
                        failures.append((d, result))
                        too_big = too_big or result is SendResult.TOO_BIG
                if self._gso_einval and not too_big:
                    self.gso = False  # EINVAL, and not for the path MTU: no GSO here
                    logger.info("UDP GSO unavailable; sending datagrams one by one")
                self._gso_einval = False
            i = j
        return failures

    def send_run(
        self, buffer: bytes, segment_size: int, address: Address
    ) -> list[tuple[bytes, SendResult]]:
        """Send datagrams that lie back to back in ``buffer``, each ``segment_size`` bytes
        but the last (shorter or equal): the layout of one GSO ``sendmsg``, sent as it is
        (no join, no per-datagram objects), cut only at the GSO limits. Returns what
        ``send_batch`` returns: each datagram that did not go out, with why, as bytes. A
        refused piece is retried one by one, so EMSGSIZE still names a datagram."""
        size = len(buffer)
        if segment_size <= 0:
            raise ValueError("segment_size must be positive")
        view = memoryview(buffer)
        if size <= segment_size:
            result = self.send(buffer, address)
            return [] if result is SendResult.SENT else [(buffer, result)]
        failures: list[tuple[bytes, SendResult]] = []
        # a datagram above GSO_MAX_BYTES (a jumbo path) still goes, one per call
        per_call = max(1, min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // segment_size)) if self.gso else 1
        step = per_call * segment_size
        for start in range(0, size, step):
            piece = view[start : start + step]
            gso = self.gso and len(piece) > segment_size
            if gso and self._send_gso(piece, segment_size, address):
                continue
            too_big = False
            for i in range(0, len(piece), segment_size):
                datagram = piece[i : i + segment_size]
                result = self.send(datagram, address)
                if result is not SendResult.SENT:
                    failures.append((bytes(datagram), result))
                    too_big = too_big or result is SendResult.TOO_BIG
            if self._gso_einval and not too_big:
                self.gso = False  # EINVAL, and not for the path MTU: no GSO here
                logger.info("UDP GSO unavailable; sending datagrams one by one")
            self._gso_einval = False
        return failures

    def _send_gso(self, data: memoryview, size: int, address: Address) -> bool:
        """One ``sendmsg`` of ``data`` cut by the kernel into ``size``-byte datagrams."""
        try:
            self._sock.sendmsg([data], [(_SOL_UDP, _UDP_SEGMENT, _GSO_SIZE.pack(size))], 0, address)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                # Older kernels also say EINVAL (not EMSGSIZE) for a run above the path MTU:
                # decided by the one-by-one retry (``send_batch``, ``send_run``).
                self._gso_einval = True
            elif exc.errno in (errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EIO):
                self.gso = False  # the kernel or the route does not do UDP GSO: stop trying
                logger.info("UDP GSO unavailable (%s); sending datagrams one by one", exc)
            return False
        stats = self.stats
        stats.tx_datagrams += -(-len(data) // size)
        stats.tx_bytes += len(data)
        return True

    def _send_segmented(self, run: list[bytes], size: int, address: Address) -> bool:
        return self._send_gso(memoryview(b"".join(run)), size, address)

    def send(self, data: bytes | bytearray | memoryview, address: Address) -> SendResult:
        """Send one datagram without blocking; never raises for network conditions."""
        try:
            self._sock.sendto(data, address)
        except OSError as exc:
            return self._send_failed(exc)
        stats = self.stats
        stats.tx_datagrams += 1
        stats.tx_bytes += len(data)
        return SendResult.SENT

    def note_sent(self, size: int) -> None:
        """A datagram of ``size`` bytes that left this socket by another way (the
        daemon's C lone-packet hop), counted as ``send`` counts its own."""
        stats = self.stats
        stats.tx_datagrams += 1
        stats.tx_bytes += size

    def note_received(self, datagrams: int, size: int) -> None:
        """Datagrams read from this socket by another way (the C lone-packet hop)."""
        stats = self.stats
        stats.rx_datagrams += datagrams
        stats.rx_bytes += size

    def note_send_error(self, code: int) -> SendResult:
        """``sendto`` failed with errno ``code`` elsewhere (the C lone-packet hop):
        counted and classified exactly as ``send`` classifies its own failures."""
        return self._send_failed(OSError(code, os.strerror(code)))

    def _send_failed(self, exc: OSError) -> SendResult:
        code = exc.errno
        stats = self.stats
        if isinstance(exc, BlockingIOError) or code in _DROP_ERRNOS:
            stats.tx_dropped += 1
            return SendResult.DROPPED
        if code == errno.EMSGSIZE:
            stats.tx_too_big += 1
            return SendResult.TOO_BIG
        stats.tx_errors += 1
        self._note_error("send", exc)
        return SendResult.ERROR

    def _note_error(self, what: str, exc: OSError) -> None:
        code = exc.errno or 0
        name = errno.errorcode.get(code, type(exc).__name__)
        kinds = self.stats.errors_by_kind
        kinds[name] = kinds.get(name, 0) + 1
        if (what, code) not in self._logged:
            self._logged.add((what, code))
            logger.warning(
                "UDP %s on %s failed: %s (further %s errors of this kind are only counted)",
                what,
                self._describe(),
                exc.strerror or exc,
                what,
            )

    def _describe(self) -> str:
        try:
            return format_endpoint(self.local_address)
        except OSError:
            return "a closed socket"

    def __repr__(self) -> str:
        return f"UdpSocket({self._describe()})"


def _set_buffers(sock: socket.socket, size: int) -> None:
    """Ask for big buffers: the FORCE variants pass rmem_max when we have CAP_NET_ADMIN,
    the plain ones are capped by it; a failure only costs burst tolerance."""
    for force, plain in ((_SO_RCVBUFFORCE, socket.SO_RCVBUF), (_SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
            continue
        except OSError:
            pass
        try:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)
        except OSError as exc:
            logger.debug("cannot set UDP socket buffer to %d bytes: %s", size, exc)


def _set_dont_fragment(sock: socket.socket) -> None:
    """Linux: IP(V6)_PMTUDISC_DO; elsewhere only IPV6_DONTFRAG if it exists.

    A failure is logged, not raised, as in the reference: the session still works, only an
    oversize datagram is fragmented (or dropped on the path) instead of refused locally.
    """
    options: list[tuple[int, int, int]] = []
    if sock.family == socket.AF_INET6:
        if sys.platform.startswith("linux"):
            options.append((socket.IPPROTO_IPV6, _IPV6_MTU_DISCOVER, _IPV6_PMTUDISC_DO))
        options.append((socket.IPPROTO_IPV6, _IPV6_DONTFRAG, 1))
    elif sys.platform.startswith("linux"):
        options.append((socket.IPPROTO_IP, _IP_MTU_DISCOVER, _IP_PMTUDISC_DO))
    for level, name, value in options:
        try:
            sock.setsockopt(level, name, value)
        except OSError as exc:
            logger.warning("cannot forbid fragmentation on the UDP socket: %s", exc)
