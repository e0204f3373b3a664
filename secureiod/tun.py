"""The TUN adapter: one ``/dev/net/tun`` file descriptor carrying raw IP packets.

It knows nothing of secureio. It owns the file descriptor, turns the ``TUNSETIFF`` failure
modes into one-line ``TunError`` messages an operator can act on, and turns per-packet
write failures into counted ``False`` results: a packet the kernel refuses (malformed, queue
full) is one lost packet, exactly as if the network had dropped it, and must never take the
tunnel down.

The device is opened with ``IFF_TUN | IFF_NO_PI``: every read and write is exactly one IP
packet with no 4-byte packet-information header, so the protocol layer can hand packets
through without slicing. The descriptor is non-blocking; the daemon puts it into its event
loop and calls ``read_batch`` when it is readable.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import pwd
import socket
import stat
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from . import tunio

__all__ = ["TUN_CLONE_DEVICE", "TunDevice", "TunError", "TunStats"]

logger = logging.getLogger(__name__)

TUN_CLONE_DEVICE: Final = "/dev/net/tun"

# include/uapi/linux/if_tun.h; the values are part of the kernel ABI.
_TUNSETIFF: Final = 0x400454CA  # _IOW('T', 202, int)
_IFF_TUN: Final = 0x0001
_IFF_MULTI_QUEUE: Final = 0x0100
_IFF_NO_PI: Final = 0x1000
_IFF_VNET_HDR: Final = 0x4000
_TUNSETOFFLOAD: Final = 0x400454D0  # _IOW('T', 208, unsigned int)
TUN_F_CSUM: Final = 0x01
TUN_F_TSO4: Final = 0x02
TUN_F_TSO6: Final = 0x04
VNET_HDR_SIZE: Final = 10
"""``struct virtio_net_hdr`` (no ``num_buffers``): flags, gso_type, hdr_len, gso_size,
csum_start, csum_offset; it precedes every packet on a device opened with ``vnet_hdr``."""
_IFNAMSIZ: Final = 16
_IFREQ_SIZE: Final = 40  # sizeof(struct ifreq) on Linux, whatever the architecture
_IFREQ_HEAD: Final = struct.Struct(f"{_IFNAMSIZ}sH")

_DROP_ERRNOS: Final = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS})
# The descriptor no longer reaches a device (closed, or the link was deleted under us):
# no later packet can succeed either, so these are raised instead of counted.
_FATAL_ERRNOS: Final = frozenset({errno.EBADF, errno.EBADFD})


class TunError(Exception):
    """Opening or using the TUN device failed; ``str()`` is one line for the operator."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code


@dataclass(slots=True)
class TunStats:
    """Per-device counters for status output; errors are keyed by errno name."""

    packets_read: int = 0
    bytes_read: int = 0
    packets_written: int = 0
    bytes_written: int = 0
    read_errors: dict[str, int] = field(default_factory=dict)
    write_errors: dict[str, int] = field(default_factory=dict)
    """Packets the kernel refused, e.g. ``{"EINVAL": 2, "ENOBUFS": 1}``."""

    @property
    def write_failures(self) -> int:
        return sum(self.write_errors.values())


class TunDevice:
    """An open TUN queue (see module doc); create it with ``TunDevice.open``."""

    def __init__(self, fd: int, name: str, *, preexisted: bool, multi_queue: bool) -> None:
        """Wrap an already-attached descriptor (e.g. one handed over by a parent process)."""
        self._fd = fd
        self.name = name
        self.preexisted = preexisted
        """The link existed before we attached (``ip tuntap add``): it outlives ``close``,
        so the daemon must not assume closing removes its addresses and routes."""
        self.multi_queue = multi_queue
        self.stats = TunStats()
        self._logged: set[tuple[str, int]] = set()
        self.vnet_hdr = False
        self.offload = 0

    @classmethod
    def open(
        cls,
        name: str,
        *,
        multi_queue: bool = False,
        vnet_hdr: bool = False,
        clone_device: str = TUN_CLONE_DEVICE,
    ) -> TunDevice:
        """Attach to (creating if needed) the TUN link ``name`` in the current netns.

        ``name`` may contain ``%d`` to let the kernel pick a free number; the actual name is
        in ``.name``. With ``multi_queue`` every further ``open`` of the same name adds a
        queue (one descriptor per worker); without it a second ``open`` fails with "in use".
        ``clone_device`` exists for sandboxes that bind-mount the node elsewhere.
        With ``vnet_hdr`` every packet read or written starts with a 10-byte virtio-net
        header, which is what lets the kernel hand over (``set_offload``) and take TCP
        segments of up to 64 KiB instead of one MTU-sized packet per system call.
        """
        encoded = _check_name(name)
        preexisted = "%" not in name and _link_exists(name)
        try:
            fd = os.open(clone_device, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise _open_error(exc, clone_device) from None
        flags = _IFF_TUN | _IFF_NO_PI | (_IFF_MULTI_QUEUE if multi_queue else 0)
        if vnet_hdr:
            flags |= _IFF_VNET_HDR
        request = _IFREQ_HEAD.pack(encoded, flags).ljust(_IFREQ_SIZE, b"\0")
        try:
            answer = fcntl.ioctl(fd, _TUNSETIFF, request)
        except OSError as exc:
            os.close(fd)
            raise _attach_error(exc, name, multi_queue) from None
        actual = answer[:_IFNAMSIZ].split(b"\0", 1)[0].decode("ascii", "replace")
        logger.debug(
            "attached to TUN %s (fd %d, %s)", actual, fd, "existing" if preexisted else "new"
        )
        device = cls(fd, actual, preexisted=preexisted, multi_queue=multi_queue)
        device.vnet_hdr = vnet_hdr
        return device

    # --- descriptor -------------------------------------------------------------------------

    @property
    def fd(self) -> int:
        """The descriptor for the event loop; -1 once closed."""
        return self._fd

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Detach; the kernel deletes the link with the last descriptor unless it preexisted
        (a persistent device), which is why ``preexisted`` is recorded. Idempotent."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def set_offload(self, flags: int) -> None:
        """Which segmentation/checksum work the kernel may leave to us (``TUN_F_*``): with
        TSO the kernel hands over TCP segments of up to 64 KiB with a GSO header; with 0 it
        segments and checksums everything itself. Needs a ``vnet_hdr`` device."""
        if flags and not self.vnet_hdr:
            raise TunError(f"{self.name}: offloads need a device opened with vnet headers")
        try:
            fcntl.ioctl(self._fd, _TUNSETOFFLOAD, flags)
        except OSError as exc:
            raise TunError(f"TUNSETOFFLOAD on {self.name} failed: {exc.strerror or exc}") from None
        self.offload = flags

    # --- packets ----------------------------------------------------------------------------

    def read_batch(self, max_packets: int = 256, bufsize: int = 65535) -> list[bytes]:
        """Read up to ``max_packets`` packets, stopping early when the queue is empty.

        One wake-up, many packets: the caller seals them all and flushes once. ``bufsize``
        must cover the link MTU, or the kernel truncates the packet silently. An unexpected
        error is counted and ends the batch; a dead descriptor raises ``TunError``. The
        reads are one call (``tunio.read_many``: C when built), not one per packet: per
        small packet the Python around ``os.readv`` cost more than the system call.
        """
        packets, size, code = tunio.read_many(self._fd, max_packets, bufsize)
        stats = self.stats
        stats.packets_read += len(packets)
        stats.bytes_read += size
        if code:
            self._failed(stats.read_errors, "read", code)
        return packets

    def write(self, packet: bytes | bytearray | memoryview) -> bool:
        """Hand one IP packet to the kernel; ``False`` (counted) if it was refused.

        EAGAIN/ENOBUFS (queue full) and EINVAL (not an IPv4/IPv6 packet) are per-packet
        losses, never exceptions: a peer sending garbage must not stop the tunnel. Only a
        dead descriptor raises ``TunError``.
        """
        return self._write(os.write, packet)

    def write_parts(self, header: bytes, packet: bytes | bytearray | memoryview) -> bool:
        """``write(header + packet)`` without the copy (one ``writev``)."""
        return self._write(os.writev, (header, packet))

    def _write(self, syscall: Callable[[int, Any], int], data: Any) -> bool:
        try:
            written = syscall(self._fd, data)
        except OSError as exc:
            if exc.errno in _FATAL_ERRNOS:
                raise self._dead(exc) from None
            self._count(self.stats.write_errors, "write", exc)
            return False
        stats = self.stats
        stats.packets_written += 1
        stats.bytes_written += written
        return True

    def note_written(self, size: int) -> None:
        """A packet of ``size`` bytes written by another way (the daemon's C lone-packet
        hop), counted as ``write`` counts its own."""
        stats = self.stats
        stats.packets_written += 1
        stats.bytes_written += size

    def note_write_error(self, code: int) -> None:
        """A write that failed with errno ``code`` elsewhere (the C lone-packet hop):
        counted, and logged once per kind, as ``write`` does."""
        self._count(self.stats.write_errors, "write", OSError(code, os.strerror(code)))

    def write_many(
        self, header: bytes, packets: Sequence[bytes | bytearray | memoryview]
    ) -> list[int]:
        """``write_parts(header, packet)`` for every packet in one call (``tunio``: C when
        built), with the same accounting; ``header`` may be empty. Returns the indexes of
        the packets the kernel refused (counted, as ``write`` counts them), so the caller
        can keep exact per-peer counters; a dead descriptor raises ``TunError``."""
        written, size, errors = tunio.write_many(self._fd, header, packets)
        stats = self.stats
        stats.packets_written += written
        stats.bytes_written += size
        if not errors:
            return []
        for _, code in errors:
            self._failed(stats.write_errors, "write", code)
        return [index for index, _ in errors]

    def write_batch(self, packets: Iterable[bytes | bytearray | memoryview]) -> int:
        """Write every packet (a refused one does not stop the rest); returns how many
        the kernel accepted."""
        batch = list(packets)
        return len(batch) - len(self.write_many(b"", batch))

    # --- helpers ----------------------------------------------------------------------------

    def _failed(self, kinds: dict[str, int], what: str, code: int) -> None:
        """A batch call reported errno ``code``: a dead descriptor raises ``TunError``,
        anything else is counted (and logged once per kind)."""
        exc = OSError(code, os.strerror(code))
        if code in _FATAL_ERRNOS:
            raise self._dead(exc)
        self._count(kinds, what, exc)

    def _count(self, kinds: dict[str, int], what: str, exc: OSError) -> None:
        code = exc.errno or 0
        name = errno.errorcode.get(code, type(exc).__name__)
        kinds[name] = kinds.get(name, 0) + 1
        if code in _DROP_ERRNOS or (what, code) in self._logged:
            return
        self._logged.add((what, code))
        logger.warning(
            "TUN %s on %s failed: %s (further %s errors of this kind are only counted)",
            what,
            self.name,
            exc.strerror or exc,
            what,
        )

    def _dead(self, exc: OSError) -> TunError:
        state = "closed" if self.closed else "detached (was the link deleted?)"
        return TunError(f"TUN device {self.name} is {state}: {exc.strerror or exc}", exc.errno)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"TunDevice({self.name!r}, {state}, preexisted={self.preexisted})"


def _check_name(name: str) -> bytes:
    """Refuse names the kernel would truncate or reject, with the reason, before any
    system call: a silently truncated name would attach to a different link."""
    if not isinstance(name, str):
        raise TypeError(f"interface name must be text, not {type(name).__name__}")
    try:
        encoded = name.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"interface name {name!r} must be ASCII") from None
    if not encoded or len(encoded) >= _IFNAMSIZ:
        raise ValueError(f"interface name {name!r} must be 1..{_IFNAMSIZ - 1} characters")
    if any(c in name for c in "/: \t\n") or name in (".", ".."):
        raise ValueError(f"interface name {name!r} contains '/', ':' or whitespace")
    return encoded


def _link_exists(name: str) -> bool:
    """Whether a link of that name exists in *this process's* network namespace.

    ``SIOCGIFINDEX`` on a socket (what ``if_nametoindex`` does) answers for the namespace
    the process is in; ``/sys/class/net`` answers for the namespace sysfs was mounted in,
    which differs after ``setns`` without a remount.
    """
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def _open_error(exc: OSError, path: str) -> TunError:
    code = exc.errno
    if code in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
        hint = f"{path} is missing or has no driver: load the module with `modprobe tun`"
    elif code in (errno.EACCES, errno.EPERM):
        hint = f"permission denied opening {path}{_node_facts(path)}: {_access_fix(path)}"
    else:
        hint = f"cannot open {path}: {exc.strerror or exc}"
    return TunError(hint, code)


def _node_facts(path: str) -> str:
    """`` (mode 0600, owner root)``: why the open was refused, or nothing if unknown."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    return f" (mode {stat.S_IMODE(st.st_mode):04o}, owner {owner})"


def _access_fix(path: str) -> str:
    """Opening the clone device is a file-permission check that CAP_NET_ADMIN does not
    pass: the fix is access to the node (as the packaged unit grants), or root."""
    uid = os.geteuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return (
        f"give user {user} read and write access to it (the secureiod@ unit does: "
        f"setfacl -m u:{user}:rw {path}), or run as root (or open it before dropping)"
    )


def _attach_error(exc: OSError, name: str, multi_queue: bool) -> TunError:
    code = exc.errno
    if code == errno.EPERM:
        hint = f"not permitted to create or attach TUN {name}: needs CAP_NET_ADMIN"
    elif code == errno.EBUSY:
        hint = f"TUN {name} is in use by another process (or another queue without multi_queue)"
    elif code == errno.EINVAL:
        mode = "multi-queue" if multi_queue else "single-queue"
        hint = f"link {name} exists but is not a TUN device, or not a {mode} one"
    else:
        hint = f"TUNSETIFF {name} failed: {exc.strerror or exc}"
    return TunError(hint, code)
