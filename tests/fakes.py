"""In-memory adapters for whole ``Device``s: wireguard-go's ``tuntest``/``bindtest`` idea.

Everything the daemon touches through ``secureiod.daemon.ports`` has a fake here, driven by
one virtual clock, so two or three real ``Device`` objects can talk over an in-memory UDP
wire without root, sockets, threads or sleeping:

* ``VirtualClock``: monotonic seconds and wall-clock nanoseconds that only ``Sim`` moves;
* ``SimLoop``: the ``LoopPort`` of ``secureiod.daemon.loop.EventLoop`` on virtual time, with
  the same order inside one wake-up (ready readers and writers, thread-safe callbacks, due
  timers, then ``after_wakeup(now)``) and the same level-triggered readiness: a reader whose
  fake still holds data is called again on the next wake-up at the same instant;
* ``FakeTun``, ``InMemoryWire`` + ``FakeUdp``, ``FakeNetlink``, ``FakeNotifier``,
  ``FakeResolver``: the adapters, with knobs for what a test needs to provoke (loss,
  duplication, reordering, path MTU and black holes, NAT rebinding, an attacker sending from
  any address, netlink failures, names that appear in DNS later);
* ``Sim``: jumps the clock from one event (timer, delivery, resolver answer) to the next and
  wakes every loop that has work, bounded in wake-ups so a broken daemon fails the test
  instead of hanging it;
* ``boot`` and ``Tunnel``: real ``Device`` objects on those ports, started as the daemon
  starts them, with helpers for what device tests repeat (wait until established, ping
  and round trip, run a call on a device's loop as the control server would);
* ``ConfigBuilder``: key files and TOML in a temporary directory, loaded by the real
  ``load_config``, for two sites or a hub with spokes;
* IP packet builders (``ipv4``, ``ipv6``, ``udp4``, ``udp6``, ``ping4``, ``ping6``) for what
  a test injects into a TUN.

Addresses on the wire must lie in the test ranges (underlay 198.18.0.0/15 and
fd00:5ec:ff::/64), so a test cannot come to depend on something that looks real.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import ipaddress
import itertools
import random
import select
import socket
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

from secureiod.config import Config, load_config
from secureiod.daemon.loop import Timer
from secureiod.daemon.ports import Interface, Network, ResolveCallback
from secureiod.endpoint import Address
from secureiod.netlink import RT_TABLE_MAIN, NetlinkError, RouteInfo, Rule, default_metric
from secureiod.secureio.identity import Identity, write_identity
from secureiod.tun import VNET_HDR_SIZE, TunError, TunStats
from secureiod.udp import SendResult, UdpStats

if TYPE_CHECKING:
    from secureiod.daemon.device import Device
    from secureiod.daemon.peer import Peer

__all__ = [
    "DEFAULT_LATENCY",
    "FAKE_FD_BASE",
    "UNDERLAY_NETS",
    "ZERO_VNET_HDR",
    "ConfigBuilder",
    "FakeNetlink",
    "FakeNotifier",
    "FakeResolver",
    "FakeTun",
    "FakeUdp",
    "InMemoryWire",
    "Lookup",
    "Node",
    "NodeSpec",
    "PathConditions",
    "Sim",
    "SimError",
    "SimLoop",
    "Tunnel",
    "VirtualClock",
    "WireDatagram",
    "WireStats",
    "boot",
    "echo_reply",
    "hub_and_spokes",
    "ip_dst",
    "ip_src",
    "ipv4",
    "ipv6",
    "ping4",
    "ping6",
    "sockaddr",
    "two_sites",
    "udp4",
    "udp6",
]

Callback = Callable[[float], None]
T = TypeVar("T")

FAKE_FD_BASE: Final = 1 << 30
"""Fake descriptors start here, far above any real one (the kernel caps ``nr_open`` at
2**20 by default), so a loop can tell a fake from a real descriptor and neither collides."""
DEFAULT_LATENCY: Final = 0.001
UDP4_OVERHEAD: Final = 28
"""IPv4 (20) + UDP (8) header bytes: a path MTU of 1500 carries 1472-byte datagrams."""
UDP6_OVERHEAD: Final = 48
"""IPv6 (40) + UDP (8) header bytes."""
UNDERLAY_NETS: Final = (
    ipaddress.ip_network("198.18.0.0/15"),
    ipaddress.ip_network("fd00:5ec:ff::/64"),
)
ZERO_VNET_HDR: Final = bytes(VNET_HDR_SIZE)
"""A virtio-net header asking for no offload work: the packet after it is a plain one."""
TUN_QUEUE_LIMIT: Final = 500
"""The kernel's default ``txqueuelen`` for a TUN: packets routed into a full queue drop."""
UDP_QUEUE_LIMIT: Final = 4096
"""Datagrams a fake socket holds before it drops (a socket receive buffer, in datagrams)."""
MAX_WAKEUPS_PER_INSTANT: Final = 10_000
"""Wake-ups of all loops at one virtual instant before ``Sim`` calls it a livelock: a
reader that never drains its descriptor, or a writer that stays registered, would spin a
real daemon at 100 % CPU too."""


class SimError(AssertionError):
    """The simulation cannot go on: a livelock, a runaway run, or a misuse of the fakes.
    An ``AssertionError`` so pytest shows it as the test's failure, not as an error in a
    fixture."""


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(address.split("%", 1)[0])


def _check_underlay(host: str) -> None:
    ip = _ip(host)
    if not any(ip in net for net in UNDERLAY_NETS):
        raise SimError(
            f"{host} is outside the test underlay ranges 198.18.0.0/15, fd00:5ec:ff::/64"
        )


def sockaddr(host: str, port: int) -> Address:
    """The address tuple the ``socket`` module would give for (host, port)."""
    ip = _ip(host)
    return (str(ip), port) if ip.version == 4 else (str(ip), port, 0, 0)


# --- time and the event loop ---------------------------------------------------------------


class VirtualClock:
    """Satisfies ``ClockPort``. Time stands still while callbacks run (a daemon's work is
    free in virtual time) and moves only when ``Sim`` jumps it to the next event."""

    def __init__(self, start: float = 1000.0, wall_start_ns: int = 1_700_000_000 * 10**9) -> None:
        """``start`` is not 0 so that code treating 0 as 'never' is not accidentally
        right; the wall clock is a fixed date so session CreatedAt values repeat."""
        self.start = start
        self.now = start
        self.wall_start_ns = wall_start_ns
        self.wall_offset_ns = 0
        """Added to ``wall_ns``: a test may step the wall clock (NTP) without moving time."""

    def monotonic(self) -> float:
        return self.now

    def wall_ns(self) -> int:
        return self.wall_start_ns + round((self.now - self.start) * 1e9) + self.wall_offset_ns

    def advance_to(self, when: float) -> None:
        if when < self.now:
            raise SimError(f"the clock cannot go back from {self.now} to {when}")
        self.now = when


class Readable(Protocol):
    """A fake descriptor's side of readiness: the loop asks, level-triggered."""

    def readable(self) -> bool: ...


class SimLoop:
    """Satisfies ``LoopPort`` on virtual time (see module doc).

    Fakes get their descriptor from ``new_fd``; descriptors below ``FAKE_FD_BASE`` are real
    ones (say a control socket) and are polled without waiting on each wake-up. A fake's
    writer is always ready: fakes never block a sender.
    """

    def __init__(
        self, clock: VirtualClock, *, name: str = "loop", fds: Iterator[int] | None = None
    ) -> None:
        self.name = name
        self.virtual_clock = clock
        self.clock: Callable[[], float] = clock.monotonic
        """As ``EventLoop.clock``: a callable giving monotonic seconds."""
        self._fds = fds if fds is not None else itertools.count(FAKE_FD_BASE)
        self._sources: dict[int, Readable] = {}
        self._readers: dict[int, Callback] = {}
        self._writers: dict[int, Callback] = {}
        self._timers: list[Timer] = []
        self._pending: deque[Callback] = deque()
        self._poll: select.poll | None = None
        self.after_wakeup: Callback | None = None
        self.running = True
        """False after ``stop``: the daemon's ``run`` would have returned; Sim skips it."""
        self.wakeups = 0
        self.callback_failures = 0
        """As ``EventLoop.callback_failures``; the sim lets a callback's exception through
        (a test should see it), so only a test sets it."""

    # -- descriptors of fakes ------------------------------------------------------------

    def new_fd(self, source: Readable) -> int:
        fd = next(self._fds)
        self._sources[fd] = source
        return fd

    def forget_fd(self, fd: int) -> None:
        """The fake was closed: its descriptor is no longer polled (a reader left
        registered on it is never called again, like a closed descriptor in epoll)."""
        self._sources.pop(fd, None)

    # -- LoopPort ------------------------------------------------------------------------

    def add_reader(self, fd: int, callback: Callback) -> None:
        self._check_fd(fd)
        self._readers[fd] = callback
        self._update_real(fd)

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._update_real(fd)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._check_fd(fd)
        self._writers[fd] = callback
        self._update_real(fd)

    def remove_writer(self, fd: int) -> None:
        if self._writers.pop(fd, None) is not None:
            self._update_real(fd)

    def call_at(self, when: float, callback: Callback) -> Timer:
        timer = Timer(when, callback)
        heapq.heappush(self._timers, timer)
        return timer

    def call_later(self, delay: float, callback: Callback) -> Timer:
        return self.call_at(self.clock() + delay, callback)

    def call_soon_threadsafe(self, callback: Callback) -> None:
        self._pending.append(callback)  # deque.append is atomic, as in EventLoop

    def stop(self) -> None:
        self.running = False

    def close(self) -> None:
        self._poll = None
        self._readers.clear()
        self._writers.clear()

    # -- driving -------------------------------------------------------------------------

    def attach(self, after_wakeup: Callback | None) -> None:
        """What ``EventLoop.run(after_wakeup)`` does, minus the blocking: from now on every
        wake-up ends with ``after_wakeup(now)``."""
        self.after_wakeup = after_wakeup
        self.running = True

    def next_time(self, now: float) -> float | None:
        """When this loop next has work: ``now`` if a descriptor is ready or a callback is
        pending, else its earliest live timer, else None."""
        if not self.running:
            return None
        if self._pending or self._ready(now):
            return now
        timers = self._timers
        while timers and timers[0].cancelled:
            heapq.heappop(timers)
        return timers[0].when if timers else None

    def has_work(self, now: float) -> bool:
        when = self.next_time(now)
        return when is not None and when <= now

    def wakeup(self, now: float) -> None:
        """One iteration of ``EventLoop.run`` after its ``select`` returned."""
        self.wakeups += 1
        for fd, events in self._ready(now):
            if events & select.POLLIN:
                cb = self._readers.get(fd)
                if cb is not None:
                    cb(now)
            if events & select.POLLOUT:
                cb = self._writers.get(fd)
                if cb is not None:
                    cb(now)
        self._run_pending(now)
        self._run_timers(self.clock())
        if self.after_wakeup is not None:
            self.after_wakeup(self.clock())

    def step(self, now: float, max_wakeups: int = MAX_WAKEUPS_PER_INSTANT) -> int:
        """Wake up while there is work at ``now`` (level-triggered: a reader whose fake
        still holds data runs again); returns the number of wake-ups."""
        count = 0
        while self.has_work(now):
            if count >= max_wakeups:
                raise SimError(f"{self.name}: still busy after {count} wake-ups at t={now}")
            self.wakeup(now)
            count += 1
        return count

    def timers(self) -> list[float]:
        """The times of the live timers, sorted (for tests of the daemon's scheduling)."""
        return sorted(t.when for t in self._timers if not t.cancelled)

    # -- internals -----------------------------------------------------------------------

    def _check_fd(self, fd: int) -> None:
        if not isinstance(fd, int) or fd < 0:
            raise SimError(f"{self.name}: {fd!r} is not a descriptor")
        if fd >= FAKE_FD_BASE and fd not in self._sources:
            raise SimError(f"{self.name}: fake descriptor {fd} belongs to no fake of this loop")

    def _update_real(self, fd: int) -> None:
        if fd >= FAKE_FD_BASE:
            return
        if self._poll is None:
            self._poll = select.poll()
        mask = (select.POLLIN if fd in self._readers else 0) | (
            select.POLLOUT if fd in self._writers else 0
        )
        with contextlib.suppress(KeyError):
            self._poll.unregister(fd)
        if mask:
            self._poll.register(fd, mask)

    def _ready(self, now: float) -> list[tuple[int, int]]:
        """Ready descriptors in registration order (readers first, then writer-only ones),
        as (fd, POLLIN|POLLOUT bits). Deterministic where epoll's order is not."""
        ready: dict[int, int] = {}
        sources = self._sources
        for fd in self._readers:
            if fd >= FAKE_FD_BASE:
                source = sources.get(fd)
                if source is not None and source.readable():
                    ready[fd] = select.POLLIN
        for fd in self._writers:
            if fd >= FAKE_FD_BASE and fd in sources:
                ready[fd] = ready.get(fd, 0) | select.POLLOUT
        if self._poll is not None:
            for fd, events in self._poll.poll(0):
                bits = 0
                if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    bits |= select.POLLIN if fd in self._readers else 0
                if events & (select.POLLOUT | select.POLLHUP | select.POLLERR):
                    bits |= select.POLLOUT if fd in self._writers else 0
                if bits:
                    ready[fd] = ready.get(fd, 0) | bits
        return list(ready.items())

    def _run_pending(self, now: float) -> None:
        """Only what was pending when the wake-up began; callbacks added meanwhile run on
        the next wake-up (``EventLoop._run_pending``)."""
        pending = self._pending
        for _ in range(len(pending)):
            pending.popleft()(now)

    def _run_timers(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0].when <= now:
            timer = heapq.heappop(timers)
            if not timer.cancelled:
                timer.cancelled = True
                timer.callback(now)


# --- TUN ----------------------------------------------------------------------------------


class FakeTun:
    """Satisfies ``TunPort``. ``inject`` is the kernel routing a packet into the TUN (the
    device reads it); ``written`` is what the device wrote, exactly as written (with the
    virtio-net header when ``vnet_hdr`` is on)."""

    def __init__(
        self,
        loop: SimLoop,
        *,
        name: str = "sio0",
        vnet_hdr: bool = False,
        queue_limit: int = TUN_QUEUE_LIMIT,
    ) -> None:
        self.name = name
        self.vnet_hdr = vnet_hdr
        self.offload = 0
        self.offload_history: list[int] = []
        """Every ``set_offload`` argument, in order."""
        self.written: list[bytes] = []
        self.stats = TunStats()
        self.queue_limit = queue_limit
        self.injected_dropped = 0
        """Packets ``inject`` refused because the queue was full."""
        self.refuse_writes: Callable[[bytes], bool] | None = None
        """Return True to make the kernel refuse a written packet (counted EINVAL)."""
        self.closed = False
        self._queue: deque[bytes] = deque()
        self._loop = loop
        self._fd = loop.new_fd(self)

    # -- the test's side -----------------------------------------------------------------

    def inject(self, packet: bytes, *, vnet_header: bytes | None = None) -> bool:
        """Route ``packet`` (raw IP) into the TUN; with ``vnet_hdr`` it is preceded by
        ``vnet_header`` (default: all zero, no offload work). False if the queue is full."""
        if self.vnet_hdr:
            header = ZERO_VNET_HDR if vnet_header is None else vnet_header
            if len(header) != VNET_HDR_SIZE:
                raise SimError(f"a virtio-net header is {VNET_HDR_SIZE} bytes, not {len(header)}")
            packet = header + packet
        elif vnet_header is not None:
            raise SimError(f"{self.name} has no vnet_hdr: a packet cannot carry a header")
        return self.inject_raw(packet)

    def inject_raw(self, data: bytes) -> bool:
        """Queue ``data`` exactly as the device will read it."""
        if len(self._queue) >= self.queue_limit:
            self.injected_dropped += 1
            return False
        self._queue.append(bytes(data))
        return True

    def packets(self) -> list[bytes]:
        """``written`` without the virtio-net headers: the IP packets the kernel got."""
        if not self.vnet_hdr:
            return list(self.written)
        return [p[VNET_HDR_SIZE:] for p in self.written]

    def take(self) -> list[bytes]:
        """The IP packets written since the last ``take`` (and forget them)."""
        out = self.packets()
        self.written.clear()
        return out

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- TunPort -------------------------------------------------------------------------

    def fileno(self) -> int:
        return -1 if self.closed else self._fd

    @property
    def fd(self) -> int:
        return self.fileno()

    def readable(self) -> bool:
        return not self.closed and bool(self._queue)

    def read_batch(self, max_packets: int = 256, bufsize: int = 65535) -> list[bytes]:
        """Up to ``max_packets`` packets; one longer than ``bufsize`` is cut short, as the
        kernel silently does with a too-small read buffer."""
        if self.closed:
            raise TunError(f"TUN device {self.name} is closed: Bad file descriptor", errno.EBADF)
        out: list[bytes] = []
        queue = self._queue
        stats = self.stats
        while queue and len(out) < max_packets:
            packet = queue.popleft()[:bufsize]
            stats.packets_read += 1
            stats.bytes_read += len(packet)
            out.append(packet)
        return out

    def write(self, packet: bytes | bytearray | memoryview) -> bool:
        return self._write(bytes(packet))

    def write_parts(self, header: bytes, packet: bytes | bytearray | memoryview) -> bool:
        return self._write(bytes(header) + bytes(packet))

    def write_many(
        self, header: bytes, packets: Sequence[bytes | bytearray | memoryview]
    ) -> list[int]:
        """Like ``TunDevice.write_many``: each packet as ``write_parts``; the refused indexes."""
        head = bytes(header)
        return [i for i, packet in enumerate(packets) if not self._write(head + bytes(packet))]

    def _write(self, data: bytes) -> bool:
        if self.closed:
            raise TunError(f"TUN device {self.name} is closed: Bad file descriptor", errno.EBADF)
        if self.refuse_writes is not None and self.refuse_writes(data):
            errors = self.stats.write_errors
            errors["EINVAL"] = errors.get("EINVAL", 0) + 1
            return False
        self.written.append(data)
        self.stats.packets_written += 1
        self.stats.bytes_written += len(data)
        return True

    def set_offload(self, flags: int) -> None:
        if flags and not self.vnet_hdr:
            raise TunError(f"{self.name}: offloads need a device opened with vnet headers")
        self.offload = flags
        self.offload_history.append(flags)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._loop.forget_fd(self._fd)


# --- the UDP wire ---------------------------------------------------------------------------


@dataclass
class PathConditions:
    """One direction between two hosts (by IP). Mutable: a test changes it mid-run."""

    latency: float = DEFAULT_LATENCY
    jitter: float = 0.0
    """Uniform extra delay 0..jitter per datagram (reorders datagrams sent close together)."""
    loss: float = 0.0
    duplicate: float = 0.0
    """Probability that a second copy arrives ``latency / 2`` after the first."""
    reorder: float = 0.0
    """Probability that a datagram is held back by ``reorder_delay``."""
    reorder_delay: float = 0.005
    mtu: int = 1500
    black_hole: bool = False
    """Datagrams over the MTU vanish silently (no ICMP reached the sender, so its kernel
    does not know the MTU: ``send_batch`` says SENT and ``route_get`` says 1500)."""
    icmp_delay: float | None = None
    """For an ``mtu`` that is not a ``black_hole``. None: the sender's kernel knows the path
    MTU already (a larger send fails with EMSGSIZE at once). A number: as on a real path, a
    larger datagram is lost at the narrow hop, whose ICMP teaches the sender's kernel the
    MTU this many seconds later; from then on ``route_get`` says so and larger sends fail
    with EMSGSIZE, until ``pmtu_expires`` seconds later (``net.ipv4.route.mtu_expires``)."""
    pmtu_expires: float = 600.0
    down: bool = False
    """The path is cut: everything sent is lost."""
    drop: Callable[[WireDatagram], bool] | None = None
    """Targeted loss, e.g. 'drop every key-exchange datagram'."""

    def max_datagram(self, family: int) -> int:
        return self.mtu - (UDP6_OVERHEAD if family == socket.AF_INET6 else UDP4_OVERHEAD)


@dataclass(frozen=True, slots=True)
class WireDatagram:
    time: float
    """When it was sent."""
    src: Address
    dst: Address
    data: bytes
    injected: bool = False
    """Sent by ``InMemoryWire.inject`` (an attacker), not by a socket."""


@dataclass
class WireStats:
    sent: int = 0
    delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    too_big: int = 0
    black_holed: int = 0
    icmp_too_big: int = 0
    """Datagrams lost at a narrow hop that told the sender (``icmp_delay``)."""
    undeliverable: int = 0
    """Arrived at an address no socket is bound to (any more)."""
    queue_full: int = 0


class InMemoryWire:
    """Datagrams between ``FakeUdp`` sockets, after a latency, with per-direction loss,
    duplication, reordering and path MTU, each direction drawing from its own random
    stream seeded from ``seed`` (so one direction's traffic does not change the other's
    luck, and a run repeats exactly)."""

    def __init__(
        self,
        clock: VirtualClock,
        *,
        seed: int = 0,
        latency: float = DEFAULT_LATENCY,
        queue_limit: int = UDP_QUEUE_LIMIT,
    ) -> None:
        self.clock = clock
        self.seed = seed
        self.default = PathConditions(latency=latency)
        """The template for every direction not configured yet."""
        self.queue_limit = queue_limit
        self.stats = WireStats()
        self.observers: list[Callable[[WireDatagram], None]] = []
        """Called with every datagram that leaves a socket or is injected (before loss)."""
        self._paths: dict[tuple[str, str], PathConditions] = {}
        self._rngs: dict[tuple[str, str], random.Random] = {}
        self._sockets: dict[Address, FakeUdp] = {}
        self._in_flight: list[tuple[float, int, WireDatagram]] = []
        self._learned: dict[tuple[str, str], tuple[int, float, float]] = {}
        """(src IP, dst IP) -> (path MTU, known from, forgotten at): each sender kernel's
        path MTU cache, fed by ``icmp_delay`` paths."""
        self._seq = itertools.count()

    # -- configuration -------------------------------------------------------------------

    def path(self, src_ip: str, dst_ip: str) -> PathConditions:
        """The conditions from ``src_ip`` to ``dst_ip`` (created from ``default``)."""
        key = (str(_ip(src_ip)), str(_ip(dst_ip)))
        path = self._paths.get(key)
        if path is None:
            path = self._paths[key] = replace(self.default)
        return path

    def link(self, ip1: str, ip2: str, **changes: Any) -> None:
        """Set the same conditions in both directions between two hosts."""
        for a, b in ((ip1, ip2), (ip2, ip1)):
            path = self.path(a, b)
            for name, value in changes.items():
                if not hasattr(path, name):
                    raise SimError(f"PathConditions has no field {name!r}")
                setattr(path, name, value)

    def cut(self, ip1: str, ip2: str) -> None:
        self.link(ip1, ip2, down=True)

    def heal(self, ip1: str, ip2: str) -> None:
        self.link(ip1, ip2, down=False)

    def capture(
        self, predicate: Callable[[WireDatagram], bool] | None = None
    ) -> list[WireDatagram]:
        """A list that fills with every datagram sent from now on (matching ``predicate``)."""
        captured: list[WireDatagram] = []

        def observe(dg: WireDatagram) -> None:
            if predicate is None or predicate(dg):
                captured.append(dg)

        self.observers.append(observe)
        return captured

    # -- sockets -------------------------------------------------------------------------

    def bind(self, loop: SimLoop, host: str, port: int) -> FakeUdp:
        address = sockaddr(host, port)
        _check_underlay(host)
        if address in self._sockets:
            raise SimError(f"{host}:{port} is already bound (EADDRINUSE)")
        sock = FakeUdp(self, loop, address)
        self._sockets[address] = sock
        return sock

    def rebind(self, sock: FakeUdp, host: str, port: int) -> None:
        """The socket's public address changes (NAT rebinding, roaming to another network):
        later datagrams come from the new address, and datagrams still on their way to the
        old one find nobody (the NAT mapping is gone)."""
        address = sockaddr(host, port)
        _check_underlay(host)
        if _family_of(address) != sock.family:
            raise SimError(f"cannot rebind an {sock.family!r} socket to {host}")
        owner = self._sockets.get(address)
        if owner is not None and owner is not sock:
            raise SimError(f"{host}:{port} is already bound (EADDRINUSE)")
        self._sockets.pop(sock.address, None)
        sock.address = address
        self._sockets[address] = sock

    def unbind(self, sock: FakeUdp) -> None:
        if self._sockets.get(sock.address) is sock:
            del self._sockets[sock.address]

    def route_mtu(self, src_ip: str, dst_ip: str) -> int:
        """What the sender's kernel believes the MTU toward ``dst_ip`` is."""
        path = self.path(src_ip, dst_ip)
        if path.black_hole:
            return self.default.mtu
        if path.icmp_delay is not None:
            return self._known_mtu(src_ip, dst_ip)
        return path.mtu

    def _known_mtu(self, src_ip: str, dst_ip: str) -> int:
        learned = self._learned.get((str(_ip(src_ip)), str(_ip(dst_ip))))
        if learned is not None and learned[1] <= self.clock.now < learned[2]:
            return learned[0]
        return self.default.mtu

    # -- traffic -------------------------------------------------------------------------

    def send(self, sock: FakeUdp, data: bytes, dst: Address) -> SendResult:
        """A datagram from ``sock``; the result is what ``sendto`` would have said."""
        family = _family_of(dst)
        if family != sock.family:
            sock.note_error("EAFNOSUPPORT")
            return SendResult.ERROR
        if not _in_underlay(dst[0]):
            sock.note_error("ENETUNREACH")
            return SendResult.ERROR
        path = self.path(sock.address[0], dst[0])
        if not path.black_hole:
            mtu = path.mtu if path.icmp_delay is None else self._known_mtu(sock.address[0], dst[0])
            overhead = UDP6_OVERHEAD if family == socket.AF_INET6 else UDP4_OVERHEAD
            if len(data) > mtu - overhead:
                self.stats.too_big += 1
                return SendResult.TOO_BIG
        self._launch(WireDatagram(self.clock.now, sock.address, dst, data), path)
        return SendResult.SENT

    def send_run(self, sock: FakeUdp, run: list[bytes], dst: Address) -> bool:
        """A UDP GSO super-packet (its first datagram is the largest): False when the
        sender's kernel refuses it (the caller retries one by one, as ``UdpSocket`` does);
        at a black hole too small for it, every datagram of it is lost."""
        family = _family_of(dst)
        if family != sock.family or not _in_underlay(dst[0]):
            return False
        path = self.path(sock.address[0], dst[0])
        if path.black_hole and len(run[0]) > path.max_datagram(family):
            for data in run:
                self._notify(WireDatagram(self.clock.now, sock.address, dst, data))
                self.stats.sent += 1
                self.stats.black_holed += 1
                self.stats.lost += 1
            return True
        if any(self.send(sock, data, dst) is not SendResult.SENT for data in run[:1]):
            return False
        for data in run[1:]:
            self._launch(WireDatagram(self.clock.now, sock.address, dst, data), path)
        return True

    def inject(
        self, src: Address, dst: Address, data: bytes, *, delay: float | None = None
    ) -> None:
        """An attacker (or a test) sends ``data`` from any address. It travels like any
        datagram of that direction (latency, and loss when the path is lossy) unless
        ``delay`` is given, which delivers it exactly that much later, always."""
        _check_underlay(src[0])
        _check_underlay(dst[0])
        dg = WireDatagram(self.clock.now, _normal(src), _normal(dst), bytes(data), injected=True)
        if delay is None:
            self._launch(dg, self.path(src[0], dst[0]))
            return
        self._notify(dg)
        self.stats.sent += 1
        self._schedule(self.clock.now + delay, dg)

    def _launch(self, dg: WireDatagram, path: PathConditions) -> None:
        self._notify(dg)
        self.stats.sent += 1
        rng = self._rng(dg.src[0], dg.dst[0])
        # Always four draws per datagram, whatever the settings, so changing one
        # probability does not shift the luck of every later datagram.
        r_loss, r_jitter, r_reorder, r_dup = rng.random(), rng.random(), rng.random(), rng.random()
        family = _family_of(dg.dst)
        if path.black_hole and len(dg.data) > path.max_datagram(family):
            self.stats.black_holed += 1
            self.stats.lost += 1
            return
        if path.icmp_delay is not None and len(dg.data) > path.max_datagram(family):
            self.stats.icmp_too_big += 1
            self.stats.lost += 1
            key = (str(_ip(dg.src[0])), str(_ip(dg.dst[0])))
            known = dg.time + path.icmp_delay
            old = self._learned.get(key)
            if old is not None and old[0] == path.mtu and old[2] > dg.time:
                known = min(known, old[1])
            self._learned[key] = (path.mtu, known, dg.time + path.icmp_delay + path.pmtu_expires)
            return
        if path.down or r_loss < path.loss or (path.drop is not None and path.drop(dg)):
            self.stats.lost += 1
            return
        delay = path.latency + path.jitter * r_jitter
        if r_reorder < path.reorder:
            delay += path.reorder_delay
            self.stats.reordered += 1
        self._schedule(dg.time + delay, dg)
        if r_dup < path.duplicate:
            self.stats.duplicated += 1
            self._schedule(dg.time + delay + path.latency / 2, dg)

    def _notify(self, dg: WireDatagram) -> None:
        for observer in self.observers:
            observer(dg)

    def _schedule(self, when: float, dg: WireDatagram) -> None:
        heapq.heappush(self._in_flight, (when, next(self._seq), dg))

    def _rng(self, src_ip: str, dst_ip: str) -> random.Random:
        key = (src_ip, dst_ip)
        rng = self._rngs.get(key)
        if rng is None:
            # A str seed is hashed with SHA-512: stable across runs and PYTHONHASHSEED.
            rng = self._rngs[key] = random.Random(f"{self.seed}:{src_ip}>{dst_ip}")
        return rng

    # -- the Sim's side ------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def next_time(self) -> float | None:
        return self._in_flight[0][0] if self._in_flight else None

    def advance(self, now: float) -> bool:
        """Deliver everything due by ``now`` (in send order at equal times)."""
        flight = self._in_flight
        moved = False
        while flight and flight[0][0] <= now:
            _, _, dg = heapq.heappop(flight)
            moved = True
            sock = self._sockets.get(dg.dst)
            if sock is None or sock.closed:
                self.stats.undeliverable += 1
            elif sock.deliver(dg.data, dg.src):
                self.stats.delivered += 1
            else:
                self.stats.queue_full += 1
        return moved


def _family_of(address: Address) -> int:
    return socket.AF_INET6 if ":" in address[0] else socket.AF_INET


def _in_underlay(host: str) -> bool:
    try:
        ip = _ip(host)
    except ValueError:
        return False
    return any(ip in net for net in UNDERLAY_NETS)


def _normal(address: Address) -> Address:
    return sockaddr(address[0], address[1])


class FakeUdp:
    """Satisfies ``UdpPort``: one socket on an ``InMemoryWire``; create it with
    ``InMemoryWire.bind``."""

    def __init__(self, wire: InMemoryWire, loop: SimLoop, address: Address) -> None:
        self.wire = wire
        self.address = address
        self.family = _family_of(address)
        self.stats = UdpStats()
        self.gso = False
        self.gro = False
        self.closed = False
        self.queue_drops = 0
        """Datagrams that arrived while the receive queue was full."""
        self._queue: deque[tuple[bytes, Address]] = deque()
        self._loop = loop
        self._fd = loop.new_fd(self)

    @property
    def local_address(self) -> Address:
        return self.address

    def fileno(self) -> int:
        return -1 if self.closed else self._fd

    def readable(self) -> bool:
        return not self.closed and bool(self._queue)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def deliver(self, data: bytes, src: Address) -> bool:
        """From the wire: queue a datagram, or drop it if the queue is full."""
        if len(self._queue) >= self.wire.queue_limit:
            self.queue_drops += 1
            return False
        self._queue.append((data, src))
        return True

    def recv_batch(self, max_count: int = 64) -> list[tuple[bytes, Address]]:
        out: list[tuple[bytes, Address]] = []
        queue = self._queue
        stats = self.stats
        while queue and len(out) < max_count:
            data, src = queue.popleft()
            stats.rx_datagrams += 1
            stats.rx_bytes += len(data)
            out.append((data, src))
        return out

    def recv_runs(self, max_count: int = 64) -> list[tuple[bytes, int, Address]]:
        """``UdpSocket.recv_runs`` with the kernel's GRO rules: one read coalesces queued
        datagrams of one sender of one size (the last may be shorter), at most 64 and
        64 KiB, so whole-device tests run the receive batch path."""
        out: list[tuple[bytes, int, Address]] = []
        queue = self._queue
        stats = self.stats
        while queue and len(out) < max_count:
            data, src = queue.popleft()
            run = [data]
            size = len(data)
            total = size
            while (
                queue
                and len(run) < 64
                and queue[0][1] == src
                and 0 < len(queue[0][0]) <= size
                and len(run[-1]) == size
                and total + len(queue[0][0]) <= 65535
            ):
                total += len(queue[0][0])
                run.append(queue.popleft()[0])
            stats.rx_datagrams += len(run)
            stats.rx_bytes += total
            out.append((b"".join(run), size or 1, src))
        return out

    def send(self, data: bytes | bytearray | memoryview, address: Address) -> SendResult:
        stats = self.stats
        if self.closed:
            self.note_error("EBADF")
            return SendResult.ERROR
        payload = bytes(data)
        result = self.wire.send(self, payload, address)
        if result is SendResult.SENT:
            stats.tx_datagrams += 1
            stats.tx_bytes += len(payload)
        elif result is SendResult.TOO_BIG:
            stats.tx_too_big += 1
        return result

    def send_run(
        self, buffer: bytes, segment_size: int, address: Address
    ) -> list[tuple[bytes, SendResult]]:
        """``UdpSocket.send_run``: datagrams back to back in one buffer. Cut into the same
        datagrams and sent as ``send_batch`` sends them (the same GSO grouping), so what
        the wire sees does not depend on which of the two the daemon used."""
        view = memoryview(buffer)
        run = [bytes(view[i : i + segment_size]) for i in range(0, len(view), segment_size)]
        return self.send_batch(run, address)

    def send_batch(
        self, datagrams: Sequence[bytes], address: Address
    ) -> list[tuple[bytes, SendResult]]:
        """With ``gso`` set, runs are grouped as ``UdpSocket.send_batch`` groups them (equal
        sizes plus one shorter tail) and travel as one super-packet (``InMemoryWire.
        send_run``): refused whole, retried one by one, or lost whole at a black hole."""
        failures: list[tuple[bytes, SendResult]] = []
        n, i = len(datagrams), 0
        while i < n:
            j = i + 1
            if self.gso:
                size = len(datagrams[i])
                while j < n and j - i < 64 and len(datagrams[j]) == size:
                    j += 1
                if j < n and j - i < 64 and len(datagrams[j]) < size:
                    j += 1
            run = list(datagrams[i:j])
            if len(run) > 1 and not self.closed and self.wire.send_run(self, run, address):
                self.stats.tx_datagrams += len(run)
                self.stats.tx_bytes += sum(len(d) for d in run)
            else:
                for datagram in run:
                    result = self.send(datagram, address)
                    if result is not SendResult.SENT:
                        failures.append((datagram, result))
            i = j
        return failures

    def note_error(self, name: str) -> None:
        self.stats.tx_errors += 1
        kinds = self.stats.errors_by_kind
        kinds[name] = kinds.get(name, 0) + 1

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._queue.clear()
            self.wire.unbind(self)
            self._loop.forget_fd(self._fd)

    def __repr__(self) -> str:
        return f"FakeUdp({self.address!r})"


# --- netlink, sd_notify, DNS ---------------------------------------------------------------


class FakeNetlink:
    """Satisfies ``NetlinkPort`` (and the policy-routing calls of ``daemon/owned.py``) and
    records the state the daemon asked for.

    Routes the daemon adds are in ``routes`` (main table: dst -> (dev, mtu)) and ``tables``
    (other tables); ``host_routes`` are the host's own routes (``add_host_route``), which
    the daemon must never overwrite or delete: a replace or delete that would is carried
    out as the kernel would, and the victim is appended to ``clobbered`` for a test to
    see. ``rule_list`` holds every rule, starting with the kernel's three per family.

    ``route_get`` evaluates the rules in priority order (fwmark and ``not``, suppress_
    prefixlength) over the tables, longest prefix first; the main table also holds the
    underlay: ``underlay_routes``, or ``route_lookup`` when set (``Sim`` points it at the
    wire, so the answer is the path MTU the sender's kernel would know) for the underlay
    ranges. ``fail`` makes an operation raise ``NetlinkError``, as a vanished link or a
    refusing kernel would. Connected routes of addresses are not modelled.
    """

    OPERATIONS: Final = frozenset(
        {
            "set_mtu",
            "get_mtu",
            "set_gso_max_size",
            "set_up",
            "add_address",
            "create_address",
            "delete_address",
            "replace_route",
            "add_route",
            "delete_route",
            "route_get",
            "list_routes",
            "rules",
            "add_rule",
            "delete_rule",
        }
    )

    def __init__(
        self,
        *,
        underlay_routes: dict[Network, tuple[str, int]] | None = None,
        route_lookup: Callable[[str], tuple[str, int]] | None = None,
    ) -> None:
        self.mtu: dict[str, int] = {}
        self.mtu_history: list[tuple[str, int]] = []
        self.gso_max_size: dict[str, int] = {}
        self.gso_max_size_kept: int | None = None
        """Set: ``set_gso_max_size`` succeeds but the link keeps this value."""
        self.up: set[str] = set()
        self.addresses: dict[str, list[Interface]] = {}
        self.routes: dict[Network, tuple[str, int | None]] = {}
        self.tables: dict[int, dict[Network, tuple[str, int | None]]] = {}
        self.metrics: dict[tuple[int, Network], int] = {}
        """The metric of each route the daemon added, by (table, dst)."""
        self.route_history: list[tuple[str, Network, int | None]] = []
        """("replace" | "add" | "delete", dst, mtu) in call order."""
        self.host_routes: list[RouteInfo] = []
        self.clobbered: list[RouteInfo] = []
        self.rule_list: list[Rule] = [
            Rule(version, priority, table)
            for version in (4, 6)
            for priority, table in ((0, 255), (32766, 254), (32767, 253))
            if not (version == 6 and table == 253)
        ]
        self.rule_history: list[tuple[str, Rule]] = []
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.underlay_routes: dict[Network, tuple[str, int]] = (
            dict(underlay_routes)
            if underlay_routes is not None
            else {net: ("eth0", 1500) for net in UNDERLAY_NETS}
        )
        self.route_lookup = route_lookup
        self._failures: dict[str, tuple[str, int | None]] = {}

    def fail(self, operation: str, message: str | None = None, *, times: int | None = None) -> None:
        """Make ``operation`` raise ``NetlinkError(message)`` ``times`` times (None: until
        ``recover``)."""
        if operation not in self.OPERATIONS:
            raise SimError(f"netlink has no operation {operation!r}")
        self._failures[operation] = (message or f"{operation}: Operation not permitted", times)

    def recover(self, operation: str | None = None) -> None:
        if operation is None:
            self._failures.clear()
        else:
            self._failures.pop(operation, None)

    def _call(self, operation: str, *args: Any) -> None:
        self.calls.append((operation, args))
        failure = self._failures.get(operation)
        if failure is None:
            return
        message, times = failure
        if times is not None:
            if times <= 1:
                del self._failures[operation]
            else:
                self._failures[operation] = (message, times - 1)
        raise NetlinkError(message, errno.EPERM)

    # -- the host's own state (what a test sets up before the daemon starts) --

    def add_host_route(self, route: str, **fields: Any) -> RouteInfo:
        """A route the host had before the daemon: ``add_host_route("default", dev="eth0",
        gateway="198.18.1.1")``, ``add_host_route("198.18.1.0/24", dev="eth0",
        proto=2, scope=253)`` (a connected prefix)."""
        dst = ipaddress.ip_network("0.0.0.0/0" if route == "default" else route)
        version = fields.pop("version", dst.version)
        if route == "default" and version == 6:
            dst = ipaddress.ip_network("::/0")
        gateway = fields.pop("gateway", None)
        info = RouteInfo(
            dst=dst,
            gateway=ipaddress.ip_address(gateway) if gateway else None,
            **{"metric": 0 if dst.version == 4 else 1024, "proto": 3, **fields},
        )
        self.host_routes.append(info)
        return info

    def snapshot(self) -> tuple[Any, ...]:
        """Everything a ``give_back`` must restore, comparable with ``==``."""
        return (
            dict(self.routes),
            {t: dict(r) for t, r in self.tables.items() if r},
            list(self.host_routes),
            sorted(self.rule_list, key=lambda r: (r.version, r.priority, r.table)),
            {n: list(a) for n, a in self.addresses.items() if a},
        )

    # -- links and addresses --

    def set_mtu(self, name: str, mtu: int) -> None:
        self._call("set_mtu", name, mtu)
        self.mtu[name] = int(mtu)
        self.mtu_history.append((name, int(mtu)))

    def set_gso_max_size(self, name: str, size: int) -> int | None:
        self._call("set_gso_max_size", name, size)
        if self.gso_max_size_kept is not None:  # a kernel that takes it and keeps its own
            return self.gso_max_size_kept
        self.gso_max_size[name] = int(size)
        return int(size)

    def get_mtu(self, name: str) -> int:
        """The link's MTU: what was set, else 1500 (a fresh TUN's)."""
        self._call("get_mtu", name)
        return self.mtu.get(name, 1500)

    def set_up(self, name: str) -> None:
        self._call("set_up", name)
        self.up.add(name)

    def add_address(self, name: str, iface: Interface) -> None:
        self._call("add_address", name, iface)
        addresses = self.addresses.setdefault(name, [])
        if iface not in addresses:
            addresses.append(iface)

    def create_address(self, name: str, iface: Interface) -> bool:
        self._call("create_address", name, iface)
        addresses = self.addresses.setdefault(name, [])
        if iface in addresses:
            return False
        addresses.append(iface)
        return True

    def delete_address(self, name: str, iface: Interface) -> None:
        self._call("delete_address", name, iface)
        addresses = self.addresses.get(name, [])
        if iface in addresses:
            addresses.remove(iface)

    # -- routes --

    def _installed(self, table: int) -> dict[Network, tuple[str, int | None]]:
        return self.routes if table == RT_TABLE_MAIN else self.tables.setdefault(table, {})

    def _host_at(self, table: int, net: Network, metric: int | None) -> list[RouteInfo]:
        return [
            r
            for r in self.host_routes
            if r.table == table and r.dst == net and (metric is None or r.metric == metric)
        ]

    def replace_route(
        self,
        dst: Network,
        dev: str,
        mtu: int | None = None,
        *,
        table: int = RT_TABLE_MAIN,
        metric: int | None = None,
    ) -> None:
        net = ipaddress.ip_network(dst)
        self._call("replace_route", net, dev, mtu)
        key_metric = default_metric(net.version) if metric is None else metric
        for victim in self._host_at(table, net, key_metric):
            self.host_routes.remove(victim)
            self.clobbered.append(victim)
        installed = self._installed(table)
        if net in installed and self.metrics.get((table, net), key_metric) != key_metric:
            raise SimError(f"two daemon routes to {net} in table {table} (metrics differ)")
        installed[net] = (dev, mtu)
        self.metrics[(table, net)] = key_metric
        self.route_history.append(("replace", net, mtu))

    def add_route(
        self,
        dst: Network,
        dev: str,
        *,
        table: int = RT_TABLE_MAIN,
        metric: int | None = None,
        mtu: int | None = None,
    ) -> None:
        net = ipaddress.ip_network(dst)
        self._call("add_route", net, dev, table, metric)
        key_metric = default_metric(net.version) if metric is None else metric
        installed = self._installed(table)
        if self._host_at(table, net, key_metric) or net in installed:
            raise NetlinkError(f"add route {net} dev {dev}: File exists", errno.EEXIST)
        installed[net] = (dev, mtu)
        self.metrics[(table, net)] = key_metric
        self.route_history.append(("add", net, mtu))

    def delete_route(
        self,
        dst: Network,
        dev: str,
        *,
        table: int = RT_TABLE_MAIN,
        metric: int | None = None,
    ) -> None:
        net = ipaddress.ip_network(dst)
        self._call("delete_route", net, dev)
        installed = self._installed(table)
        if installed.get(net, ("",))[0] == dev and (
            metric is None or self.metrics.get((table, net)) == metric
        ):
            del installed[net]
            self.metrics.pop((table, net), None)
            self.route_history.append(("delete", net, None))
            if metric is not None:
                return
        for victim in self._host_at(table, net, metric):
            if victim.dev == dev:
                self.host_routes.remove(victim)
                self.clobbered.append(victim)
                if metric is not None:
                    return

    def list_routes(self, version: int | None = None, table: int | None = None) -> list[RouteInfo]:
        self._call("list_routes", version, table)
        out = [r for r in self.host_routes]
        for table_id, routes in ((RT_TABLE_MAIN, self.routes), *self.tables.items()):
            for net, (dev, mtu) in routes.items():
                metric = self.metrics.get((table_id, net), default_metric(net.version))
                out.append(RouteInfo(net, table_id, metric, dev, None, "unicast", 4, 0, mtu))
        return [
            r
            for r in out
            if (version is None or r.dst.version == version) and (table is None or r.table == table)
        ]

    # -- rules --

    def rules(self, version: int) -> list[Rule]:
        self._call("rules", version)
        return sorted((r for r in self.rule_list if r.version == version), key=lambda r: r.priority)

    def add_rule(self, rule: Rule) -> None:
        self._call("add_rule", rule)
        if rule in self.rule_list:
            raise NetlinkError(f"add rule {rule.describe()}: File exists", errno.EEXIST)
        self.rule_list.append(rule)
        self.rule_history.append(("add", rule))

    def delete_rule(self, rule: Rule) -> None:
        self._call("delete_rule", rule)
        if rule in self.rule_list:
            self.rule_list.remove(rule)
            self.rule_history.append(("delete", rule))

    # -- lookups --

    def route_get(
        self,
        dst_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | str,
        *,
        mark: int | None = None,
    ) -> tuple[str, int]:
        ip = ipaddress.ip_address(dst_ip)
        self._call("route_get", ip)
        for rule in sorted(self.rule_list, key=lambda r: r.priority):
            if rule.version != ip.version or rule.table == 255:
                continue
            matches = True
            if rule.fwmark is not None:
                mask = 0xFFFFFFFF if rule.fwmask is None else rule.fwmask
                matches = (mark or 0) & mask == rule.fwmark
            if rule.invert:
                matches = not matches
            if not matches:
                continue
            found = self._lookup(rule.table, ip)
            if found is None:
                continue
            prefixlen, answer = found
            if rule.suppress_prefixlength is not None and prefixlen <= rule.suppress_prefixlength:
                continue
            return answer
        raise NetlinkError(f"look up route to {ip}: Network is unreachable", errno.ENETUNREACH)

    def _lookup(
        self, table: int, ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> tuple[int, tuple[str, int]] | None:
        """Longest prefix in ``table``: (prefix length, (device, MTU))."""
        best: tuple[int, tuple[str, int]] | None = None
        best_key = (-1, 0)

        def consider(net: Network, dev: str, mtu: int | None, metric: int) -> None:
            nonlocal best, best_key
            key = (net.prefixlen, -metric)  # longest prefix, then the lowest metric
            if ip.version == net.version and ip in net and key > best_key:
                best_key = key
                best = (net.prefixlen, (dev, mtu or self.mtu.get(dev, 1500)))

        for net, (dev, mtu) in self._installed(table).items():
            consider(net, dev, mtu, self.metrics.get((table, net), default_metric(net.version)))
        for route in self.host_routes:
            if route.table == table and route.kind == "unicast" and route.dev is not None:
                consider(route.dst, route.dev, route.mtu, route.metric)
        if table != RT_TABLE_MAIN:
            return best
        if self.route_lookup is not None:
            for net in UNDERLAY_NETS:
                if (
                    ip.version == net.version
                    and ip in net
                    and (best is None or net.prefixlen > best[0])
                ):
                    with contextlib.suppress(NetlinkError):
                        best = (net.prefixlen, self.route_lookup(str(ip)))
            return best
        for net, answer in self.underlay_routes.items():
            if (
                ip.version == net.version
                and ip in net
                and (best is None or net.prefixlen > best[0])
            ):
                best = (net.prefixlen, answer)
        return best

    def route_mtu(self, dst: str) -> int | None:
        """The MTU metric of the installed main-table route to exactly ``dst`` (a network)."""
        entry = self.routes.get(ipaddress.ip_network(dst))
        return None if entry is None else entry[1]


class FakeNotifier:
    """Satisfies ``NotifierPort``; ``calls`` holds (method, argument) in order."""

    def __init__(self, *, enabled: bool = True) -> None:
        self._enabled = enabled
        self.calls: list[tuple[str, str | None]] = []

    @property
    def enabled(self) -> bool:
        return self._enabled

    def _record(self, what: str, text: str | None) -> bool:
        self.calls.append((what, text))
        return self._enabled

    def ready(self, status: str | None = None) -> bool:
        return self._record("ready", status)

    def status(self, text: str) -> bool:
        return self._record("status", text)

    def watchdog(self) -> bool:
        return self._record("watchdog", None)

    def reloading(self, status: str | None = None) -> bool:
        return self._record("reloading", status)

    def stopping(self, status: str | None = None) -> bool:
        return self._record("stopping", status)

    def of(self, what: str) -> list[str | None]:
        return [text for kind, text in self.calls if kind == what]


@dataclass(frozen=True, slots=True)
class Lookup:
    time: float
    host: str
    port: int
    family: int


RESOLVE_UNKNOWN: Final = "Name or service not known"
RESOLVE_NO_FAMILY: Final = "Address family for hostname not supported"


class FakeResolver:
    """Satisfies ``ResolverPort``: ``names`` maps a host name to IP strings and may change
    during a test. An answer is computed ``delay`` (or ``delays[host]``) after the request,
    from ``names`` as it is then, and handed to the loop with ``call_soon_threadsafe``,
    exactly as a resolver thread would. ``lookups`` records every request."""

    def __init__(self, clock: VirtualClock, loop: SimLoop, *, delay: float = 0.05) -> None:
        self.clock = clock
        self.loop = loop
        self.delay = delay
        self.names: dict[str, list[str]] = {}
        self.delays: dict[str, float] = {}
        self.lookups: list[Lookup] = []
        self.closed = False
        self._queue: list[tuple[float, int, Lookup, ResolveCallback]] = []
        self._seq = itertools.count()

    def resolve(self, host: str, port: int, family: int, callback: ResolveCallback) -> None:
        if self.closed:
            raise SimError("resolve() after close()")
        lookup = Lookup(self.clock.now, host, port, family)
        self.lookups.append(lookup)
        delay = self.delays.get(host, self.delay)
        heapq.heappush(self._queue, (self.clock.now + delay, next(self._seq), lookup, callback))

    def close(self) -> None:
        self.closed = True
        self._queue.clear()

    def lookups_of(self, host: str) -> list[float]:
        """The times ``host`` was asked for."""
        return [lookup.time for lookup in self.lookups if lookup.host == host]

    @property
    def in_flight(self) -> int:
        return len(self._queue)

    def answer(self, lookup: Lookup) -> tuple[list[Address] | None, str | None]:
        try:
            _ip(lookup.host)
            ips = [lookup.host]
        except ValueError:
            if lookup.host not in self.names:
                return None, RESOLVE_UNKNOWN
            ips = self.names[lookup.host]
        wanted = {socket.AF_INET: 4, socket.AF_INET6: 6}.get(lookup.family)
        addresses = [
            sockaddr(ip, lookup.port) for ip in ips if wanted is None or _ip(ip).version == wanted
        ]
        if not addresses:
            return None, RESOLVE_NO_FAMILY if ips else RESOLVE_UNKNOWN
        return addresses, None

    def next_time(self) -> float | None:
        return self._queue[0][0] if self._queue else None

    def advance(self, now: float) -> bool:
        moved = False
        while self._queue and self._queue[0][0] <= now:
            _, _, lookup, callback = heapq.heappop(self._queue)
            addresses, error = self.answer(lookup)
            self.loop.call_soon_threadsafe(lambda _now, cb=callback, a=addresses, e=error: cb(a, e))
            moved = True
        return moved


# --- the simulation -------------------------------------------------------------------------


class EventSource(Protocol):
    """Something besides a loop that makes things happen at a time (wire, resolver)."""

    def next_time(self) -> float | None: ...
    def advance(self, now: float) -> bool: ...


@dataclass
class Node:
    """One simulated host: its loop and every port a ``Device`` needs."""

    name: str
    clock: VirtualClock
    loop: SimLoop
    tun: FakeTun
    udp: FakeUdp
    netlink: FakeNetlink
    notifier: FakeNotifier
    resolver: FakeResolver

    def ports(self) -> dict[str, Any]:
        """Keyword arguments for ``Device(config, **node.ports())``."""
        return {
            "tun": self.tun,
            "udp": self.udp,
            "netlink": self.netlink,
            "notifier": self.notifier,
            "resolver": self.resolver,
            "loop": self.loop,
            "clock": self.clock,
        }

    @property
    def address(self) -> Address:
        return self.udp.local_address

    @property
    def ip(self) -> str:
        return self.udp.local_address[0]


class Sim:
    """One virtual clock, one wire, any number of nodes (see module doc).

    ``run_for``/``run_until`` jump from event to event: at each instant they deliver what
    is due, then wake every loop that has work until none has (round-robin, so two devices
    answering each other at the same instant interleave as two processes would), then jump
    to the earliest next event. ``max_wakeups`` bounds one run, ``MAX_WAKEUPS_PER_INSTANT``
    one instant.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        latency: float = DEFAULT_LATENCY,
        start: float = 1000.0,
        max_wakeups: int = 1_000_000,
    ) -> None:
        self.clock = VirtualClock(start)
        self.wire = InMemoryWire(self.clock, seed=seed, latency=latency)
        self.loops: list[SimLoop] = []
        self.sources: list[EventSource] = [self.wire]
        self.nodes: dict[str, Node] = {}
        self.max_wakeups = max_wakeups
        self.wakeups = 0
        self._fds = itertools.count(FAKE_FD_BASE)

    @property
    def now(self) -> float:
        return self.clock.now

    def loop(self, name: str = "loop") -> SimLoop:
        loop = SimLoop(self.clock, name=name, fds=self._fds)
        self.loops.append(loop)
        return loop

    def node(
        self,
        name: str,
        ip: str,
        port: int = 5800,
        *,
        vnet_hdr: bool = False,
        tun_name: str = "sio0",
        resolver_delay: float = 0.05,
    ) -> Node:
        if name in self.nodes:
            raise SimError(f"node {name!r} exists")
        loop = self.loop(name)
        udp = self.wire.bind(loop, ip, port)

        def route_lookup(dst: str) -> tuple[str, int]:
            if not _in_underlay(dst):
                raise NetlinkError(f"look up route to {dst}: Network is unreachable")
            return "eth0", self.wire.route_mtu(udp.local_address[0], dst)

        resolver = FakeResolver(self.clock, loop, delay=resolver_delay)
        self.sources.append(resolver)
        node = Node(
            name=name,
            clock=self.clock,
            loop=loop,
            tun=FakeTun(loop, name=tun_name, vnet_hdr=vnet_hdr),
            udp=udp,
            netlink=FakeNetlink(route_lookup=route_lookup),
            notifier=FakeNotifier(),
            resolver=resolver,
        )
        self.nodes[name] = node
        return node

    def settle(self) -> int:
        """Deliver and wake everything due at the current instant; returns wake-ups."""
        now = self.clock.now
        count = 0
        busy = True
        while busy:
            busy = False
            for source in self.sources:
                if source.advance(now):
                    busy = True
            for loop in self.loops:
                if loop.has_work(now):
                    loop.wakeup(now)
                    count += 1
                    busy = True
            if count > MAX_WAKEUPS_PER_INSTANT:
                names = [loop.name for loop in self.loops if loop.has_work(now)]
                raise SimError(f"livelock at t={now}: {names} still busy after {count} wake-ups")
        self.wakeups += count
        return count

    def next_time(self) -> float | None:
        now = self.clock.now
        times = [t for t in (s.next_time() for s in self.sources) if t is not None]
        times += [t for t in (loop.next_time(now) for loop in self.loops) if t is not None]
        return min(times) if times else None

    def run_until(self, predicate: Callable[[], bool] | None, timeout: float) -> bool:
        """Run until ``predicate()`` holds (checked after every instant) or ``timeout``
        virtual seconds passed; True if it held. With no predicate, run the whole time."""
        deadline = self.clock.now + timeout
        budget = self.wakeups + self.max_wakeups
        while True:
            self.settle()
            if predicate is not None and predicate():
                return True
            if self.wakeups > budget:
                raise SimError(f"more than {self.max_wakeups} wake-ups in one run")
            when = self.next_time()
            if when is None or when > deadline:
                self.clock.advance_to(max(deadline, self.clock.now))
                self.settle()
                return predicate is not None and predicate()
            self.clock.advance_to(max(when, self.clock.now))

    def run_for(self, seconds: float) -> None:
        self.run_until(None, seconds)

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str = "") -> float:
        """``run_until`` that fails the test on timeout; returns the virtual time taken."""
        start = self.clock.now
        if not self.run_until(predicate, timeout):
            raise SimError(f"not within {timeout} s of virtual time: {what or predicate}")
        return self.clock.now - start


# --- whole devices ---------------------------------------------------------------------------


def boot(
    node: Node,
    config: Config,
    *,
    resolved: dict[tuple[str, int], list[Address] | str] | None = None,
    **kwargs: Any,
) -> Device:
    """A ``Device`` on ``node``'s ports, started as the daemon starts it (interface first,
    then peers and descriptors), with ``after_wakeup`` hooked into the node's loop and the
    reload loader of the real daemon (``reload_config``) unless given. ``resolved``: the
    endpoint names the daemon's start looked up before installing anything."""
    from secureiod.config import reload_config
    from secureiod.daemon.device import Device

    kwargs.setdefault("config_loader", reload_config)
    device = Device(config, **node.ports(), **kwargs)
    device.configure_interface()
    device.start(resolved)
    node.loop.attach(device.after_wakeup)
    return device


class Tunnel:
    """Sites from a ``ConfigBuilder`` as running devices on one ``Sim``: the device tests'
    world. ``devices[name]`` and ``nodes[name]`` are keyed by site name."""

    def __init__(
        self,
        builder: ConfigBuilder,
        *,
        sim: Sim | None = None,
        vnet_hdr: Iterable[str] = (),
        start: Iterable[str] | None = None,
    ) -> None:
        self.builder = builder
        self.sim = sim if sim is not None else Sim()
        self.nodes: dict[str, Node] = {}
        self.devices: dict[str, Device] = {}
        vnet = set(vnet_hdr)
        for name in builder.nodes:
            self.nodes[name] = builder.sim_node(self.sim, name, vnet_hdr=name in vnet)
        for name in builder.nodes if start is None else start:
            self.start(name)

    def start(self, name: str, **kwargs: Any) -> Device:
        device = boot(self.nodes[name], self.builder.load(name), **kwargs)
        self.devices[name] = device
        return device

    def peer(self, site: str, peer: str) -> Peer:
        """Site ``site``'s view of its peer ``peer``."""
        return self.devices[site].peers[peer]

    def established(self, site: str, peer: str) -> bool:
        session = self.devices[site].peers[peer].session
        return session is not None and session.is_established

    def wait_established(
        self, pairs: Iterable[tuple[str, str]] | None = None, timeout: float = 10.0
    ) -> float:
        """Until every (site, peer) pair (default: every configured one of running
        devices) is established; returns the virtual time it took."""
        if pairs is None:
            pairs = [(site, peer) for site, d in self.devices.items() for peer in d.peers]
        wanted = list(pairs)
        return self.sim.wait_for(
            lambda: all(self.established(s, p) for s, p in wanted), timeout, f"{wanted} established"
        )

    def call(self, site: str, function: Callable[[float], T]) -> T:
        """Run ``function(now)`` on ``site``'s loop, as the control server or a signal
        handler would (so the wake-up's ``after_wakeup`` flushes what it did), and return
        its result or raise its exception."""
        box: dict[str, Any] = {}

        def run(now: float) -> None:
            try:
                box["value"] = function(now)
            except Exception as exc:
                box["error"] = exc

        self.nodes[site].loop.call_soon_threadsafe(run)
        self.sim.settle()
        if "error" in box:
            raise box["error"]
        if "value" not in box:
            raise SimError(f"{site}: the loop did not run the call (stopped?)")
        return box["value"]  # type: ignore[no-any-return]

    def tunnel_ip(self, site: str, version: int = 4) -> str:
        spec = self.builder.nodes[site]
        return spec.tunnel4 if version == 4 else spec.tunnel6

    def ping(self, src: str, dst: str, seq: int = 1, *, version: int = 4, size: int = 4) -> bytes:
        """Inject an echo request from site ``src``'s tunnel address to ``dst``'s into
        ``src``'s TUN; returns the packet (to compare with what ``dst``'s TUN got)."""
        payload = (seq.to_bytes(4, "big") * (size // 4 + 1))[:size]
        make = ping4 if version == 4 else ping6
        packet = make(self.tunnel_ip(src, version), self.tunnel_ip(dst, version), seq, payload)
        if not self.nodes[src].tun.inject(packet):
            raise SimError(f"{src}: TUN queue full")
        return packet

    def delivered(self, site: str) -> list[bytes]:
        """IP packets ``site``'s device wrote to its TUN since the last call."""
        return self.nodes[site].tun.take()

    def round_trip(
        self, src: str, dst: str, seq: int = 1, *, version: int = 4, timeout: float = 1.0
    ) -> None:
        """A ping from ``src`` reaches ``dst``, and ``dst``'s kernel's reply reaches ``src``."""
        packet = self.ping(src, dst, seq, version=version)
        dst_tun = self.nodes[dst].tun
        self.sim.wait_for(lambda: packet in dst_tun.packets(), timeout, f"{src}->{dst} #{seq}")
        dst_tun.written.clear()
        reply = echo_reply(packet)
        dst_tun.inject(reply)
        src_tun = self.nodes[src].tun
        self.sim.wait_for(lambda: reply in src_tun.packets(), timeout, f"{dst}->{src} reply #{seq}")
        src_tun.written.clear()

    def close(self) -> None:
        for device in self.devices.values():
            device.close()


# --- configs ---------------------------------------------------------------------------------


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


@dataclass
class NodeSpec:
    """One site's config as data: edit ``interface`` and ``peers``, then ``write``/``load``
    (a reload test edits and writes, then calls ``Device.reload``)."""

    name: str
    number: int
    directory: Path
    identity: Identity
    underlay_ip: str
    port: int
    interface: dict[str, Any]
    peers: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.directory / f"{self.interface['name']}.toml"

    @property
    def public_key(self) -> str:
        return str(self.identity.public_key)

    @property
    def endpoint(self) -> str:
        ip = _ip(self.underlay_ip)
        host = f"[{ip}]" if ip.version == 6 else str(ip)
        return f"{host}:{self.port}"

    @property
    def tunnel4(self) -> str:
        return f"198.19.0.{self.number}"

    @property
    def tunnel6(self) -> str:
        return f"fd00:5ec::{self.number:x}"

    def text(self) -> str:
        lines = ["[interface]"]
        lines += [f"{k} = {_toml(v)}" for k, v in self.interface.items() if v is not None]
        for peer in self.peers.values():
            lines += ["", "[[peer]]"]
            lines += [f"{k} = {_toml(v)}" for k, v in peer.items() if v is not None]
        return "\n".join(lines) + "\n"

    def write(self) -> Path:
        self.path.write_text(self.text())
        return self.path

    def load(self) -> Config:
        return load_config(self.write())


class ConfigBuilder:
    """Sites under ``root``: each gets ``root/<name>/id/id_ed25519`` (a fresh key), a
    number N (tunnel 198.19.0.N/24 and fd00:5ec::N/64, underlay 198.18.0.N or
    fd00:5ec:ff::N, port 5800) and ``root/<name>/sio0.toml``."""

    def __init__(self, root: Path, *, ipv6_underlay: bool = False, port: int = 5800) -> None:
        self.root = root
        self.ipv6_underlay = ipv6_underlay
        self.port = port
        self.nodes: dict[str, NodeSpec] = {}

    def add(self, name: str, **interface: Any) -> NodeSpec:
        """A site; ``interface`` keys override the defaults (None removes one)."""
        if name in self.nodes:
            raise SimError(f"site {name!r} exists")
        number = len(self.nodes) + 1
        directory = self.root / name
        directory.mkdir(parents=True, exist_ok=True)
        identity = Identity.generate()
        write_identity(directory / "id", identity)
        underlay = f"fd00:5ec:ff::{number:x}" if self.ipv6_underlay else f"198.18.0.{number}"
        base: dict[str, Any] = {
            "name": "sio0",
            "private_key": "id/id_ed25519",
            "listen": f"[::]:{self.port}" if self.ipv6_underlay else f"0.0.0.0:{self.port}",
            "address": [f"198.19.0.{number}/24", f"fd00:5ec::{number:x}/64"],
        }
        spec = NodeSpec(
            name=name,
            number=number,
            directory=directory,
            identity=identity,
            underlay_ip=underlay,
            port=self.port,
            interface={**base, **interface},
        )
        self.nodes[name] = spec
        return spec

    def peer_entry(
        self,
        of: NodeSpec,
        *,
        endpoint: bool = True,
        allowed_ips: Sequence[str] | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """The ``[[peer]]`` table naming ``of``: its key, its endpoint (if ``endpoint``) and
        by default its own tunnel addresses as allowed_ips."""
        entry: dict[str, Any] = {
            "name": of.name,
            "public_key": of.public_key,
            "endpoint": of.endpoint if endpoint else None,
            "allowed_ips": list(allowed_ips)
            if allowed_ips is not None
            else [f"{of.tunnel4}/32", f"{of.tunnel6}/128"],
        }
        entry.update(options)
        return entry

    def connect(
        self,
        a: NodeSpec,
        b: NodeSpec,
        *,
        a_knows_b: bool = True,
        b_knows_a: bool = True,
        psk: bytes | None = None,
        allowed_a: Sequence[str] | None = None,
        allowed_b: Sequence[str] | None = None,
        **options: Any,
    ) -> None:
        """Make ``a`` and ``b`` peers of each other. ``a_knows_b``: a's entry for b has b's
        endpoint. ``allowed_a``: what b routes to a (default a's own addresses)."""
        if psk is not None:
            psk_path = self.root / f"psk-{a.name}-{b.name}"
            psk_path.write_bytes(psk)
            psk_path.chmod(0o600)
            options = {**options, "psk_file": str(psk_path)}
        a.peers[b.name] = self.peer_entry(b, endpoint=a_knows_b, allowed_ips=allowed_b, **options)
        b.peers[a.name] = self.peer_entry(a, endpoint=b_knows_a, allowed_ips=allowed_a, **options)

    def load(self, name: str) -> Config:
        return self.nodes[name].load()

    def load_all(self) -> dict[str, Config]:
        return {name: spec.load() for name, spec in self.nodes.items()}

    def sim_node(self, sim: Sim, name: str, **kwargs: Any) -> Node:
        """The ``Sim`` node at this site's underlay address."""
        spec = self.nodes[name]
        return sim.node(name, spec.underlay_ip, spec.port, **kwargs)


def two_sites(root: Path, *, ipv6_underlay: bool = False, **connect: Any) -> ConfigBuilder:
    """Sites ``a`` (198.19.0.1) and ``b`` (198.19.0.2), each the other's peer with an
    endpoint unless ``connect`` says otherwise."""
    builder = ConfigBuilder(root, ipv6_underlay=ipv6_underlay)
    a, b = builder.add("a"), builder.add("b")
    builder.connect(a, b, **connect)
    return builder


def hub_and_spokes(root: Path, spokes: int = 3, *, hub_knows_spokes: bool = False) -> ConfigBuilder:
    """Site ``hub`` (198.19.0.1) and spokes ``s1``.. (198.19.0.2..): each spoke routes the
    whole tunnel network through the hub (whose endpoint it knows); the hub routes each
    spoke's addresses to it and, by default, waits to be contacted (spokes behind NAT)."""
    builder = ConfigBuilder(root)
    hub = builder.add("hub")
    for index in range(1, spokes + 1):
        spoke = builder.add(f"s{index}")
        builder.connect(
            hub,
            spoke,
            a_knows_b=hub_knows_spokes,
            b_knows_a=True,
            allowed_a=["198.19.0.0/24", "fd00:5ec::/64"],
        )
    return builder


# --- IP packets --------------------------------------------------------------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(
    src: str, dst: str, payload: bytes = b"", *, proto: int = 17, ttl: int = 64, ident: int = 0
) -> bytes:
    """An IPv4 packet with a correct header checksum (the payload's is the caller's)."""
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(payload),
        ident,
        0x4000,  # don't fragment
        ttl,
        proto,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    checksum = _checksum(header)
    return header[:10] + struct.pack("!H", checksum) + header[12:] + payload


def ipv6(
    src: str, dst: str, payload: bytes = b"", *, proto: int = 17, hop_limit: int = 64
) -> bytes:
    return (
        struct.pack("!IHBB", 6 << 28, len(payload), proto, hop_limit)
        + ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + payload
    )


def _udp(pseudo: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    length = 8 + len(payload)
    segment = struct.pack("!HHHH", sport, dport, length, 0) + payload
    checksum = _checksum(pseudo + segment) or 0xFFFF
    return segment[:6] + struct.pack("!H", checksum) + segment[8:]


def udp4(src: str, dst: str, payload: bytes = b"", sport: int = 40000, dport: int = 7) -> bytes:
    length = 8 + len(payload)
    pseudo = (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + struct.pack("!BBH", 0, 17, length)
    )
    return ipv4(src, dst, _udp(pseudo, sport, dport, payload), proto=17)


def udp6(src: str, dst: str, payload: bytes = b"", sport: int = 40000, dport: int = 7) -> bytes:
    length = 8 + len(payload)
    pseudo = (
        ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + struct.pack("!IxxxB", length, 17)
    )
    return ipv6(src, dst, _udp(pseudo, sport, dport, payload), proto=17)


def ping4(
    src: str, dst: str, seq: int = 1, payload: bytes = b"ping", *, reply: bool = False
) -> bytes:
    """An ICMP echo request (or reply) with a correct checksum."""
    message = struct.pack("!BBHHH", 0 if reply else 8, 0, 0, 0x5EC, seq) + payload
    checksum = _checksum(message)
    return ipv4(src, dst, message[:2] + struct.pack("!H", checksum) + message[4:], proto=1)


def ping6(
    src: str, dst: str, seq: int = 1, payload: bytes = b"ping", *, reply: bool = False
) -> bytes:
    """An ICMPv6 echo request (or reply) with a correct checksum."""
    message = struct.pack("!BBHHH", 129 if reply else 128, 0, 0, 0x5EC, seq) + payload
    pseudo = (
        ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + struct.pack("!IxxxB", len(message), 58)
    )
    checksum = _checksum(pseudo + message)
    return ipv6(src, dst, message[:2] + struct.pack("!H", checksum) + message[4:], proto=58)


def ip_src(packet: bytes) -> str:
    if packet[0] >> 4 == 4:
        return str(ipaddress.IPv4Address(packet[12:16]))
    return str(ipaddress.IPv6Address(packet[8:24]))


def ip_dst(packet: bytes) -> str:
    if packet[0] >> 4 == 4:
        return str(ipaddress.IPv4Address(packet[16:20]))
    return str(ipaddress.IPv6Address(packet[24:40]))


def echo_reply(packet: bytes) -> bytes:
    """What the far host's kernel answers to a ``ping4``/``ping6`` request."""
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 0x0F) * 4
        seq = struct.unpack_from("!H", packet, ihl + 6)[0]
        return ping4(ip_dst(packet), ip_src(packet), seq, packet[ihl + 8 :], reply=True)
    seq = struct.unpack_from("!H", packet, 46)[0]
    return ping6(ip_dst(packet), ip_src(packet), seq, packet[48:], reply=True)


def hub_with_a_newcomer(root: Path) -> tuple[ConfigBuilder, Tunnel]:
    """Reload scenes: a with peers b, c, d (all up); e knows a, but a does not know e yet
    (a reload that adds it is the test)."""
    builder = ConfigBuilder(root)
    a = builder.add("a")
    for name in ("b", "c", "d", "e"):
        builder.connect(a, builder.add(name))
    del a.peers["e"]
    tunnel = Tunnel(builder)
    tunnel.wait_established([("a", p) for p in "bcd"], timeout=5)
    return builder, tunnel
