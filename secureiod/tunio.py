"""Many TUN packets per call: ``read_many`` and ``write_many``, in C when ``_tunio`` is built.

Why a module of its own: per small packet, the Python around ``os.readv``/``os.writev``
(the call, the ``BlockingIOError`` that ends every read batch, the result handling) costs
several times the system call itself. ``_tunio.c`` does a whole batch in one call with the
GIL released; the functions here are its pure-Python twin, which define the behaviour and
serve where the extension is not built or ``SECUREIOD_PURE_PYTHON=1`` is set (the tests
run both against a real TUN device and compare).

Neither decides what an error means: they report errno values and ``tun.py`` keeps the
accounting (counters, rate-limited logs, ``TunError`` for a dead descriptor).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Final

__all__ = [
    "ACCEL",
    "MAX_BUFSIZE",
    "MAX_HEADER",
    "MAX_PACKETS",
    "py_read_many",
    "py_write_many",
    "read_many",
    "write_many",
]

MAX_PACKETS: Final = 65536
"""Most packets one call reads or writes (a bound on what a caller can make us allocate)."""
MAX_BUFSIZE: Final = 1 << 20
"""Largest read buffer: a TUN packet with its virtio-net header is at most 64 KiB + 10."""
MAX_HEADER: Final = 256
"""Longest header ``write_many`` puts before each packet (a virtio-net header is 10)."""

_FATAL: Final = frozenset({errno.EBADF, errno.EBADFD})
"""The descriptor no longer reaches a device: no later packet can succeed, the batch ends."""

Buffer = bytes | bytearray | memoryview
ReadMany = Callable[[int, int, int], tuple[list[bytes], int, int]]
WriteMany = Callable[[int, Buffer, Sequence[Buffer]], tuple[int, int, list[tuple[int, int]]]]


def _check_read(max_packets: int, bufsize: int) -> None:
    if not 0 <= max_packets <= MAX_PACKETS:
        raise ValueError(f"max_packets must be 0..{MAX_PACKETS}")
    if not 1 <= bufsize <= MAX_BUFSIZE:
        raise ValueError(f"bufsize must be 1..{MAX_BUFSIZE}")


def py_read_many(fd: int, max_packets: int, bufsize: int) -> tuple[list[bytes], int, int]:
    """Read up to ``max_packets`` packets of at most ``bufsize`` bytes each (a longer one
    is cut, as the kernel does); stop at an empty queue (errno 0) or at the first other
    error, whose errno is returned. Returns ``(packets, total bytes, errno or 0)``."""
    _check_read(max_packets, bufsize)
    buffer = bytearray(bufsize)
    buffers = [buffer]
    view = memoryview(buffer)
    out: list[bytes] = []
    total = 0
    for _ in range(max_packets):
        try:
            size = os.readv(fd, buffers)
        except BlockingIOError:
            return out, total, 0
        except OSError as exc:
            return out, total, exc.errno or errno.EIO
        size = min(size, bufsize)
        total += size
        out.append(bytes(view[:size]))
    return out, total, 0


def py_write_many(
    fd: int, header: Buffer, packets: Sequence[Buffer]
) -> tuple[int, int, list[tuple[int, int]]]:
    """``writev(header, packet)`` for each packet (just the packet when ``header`` is
    empty); a refused packet does not stop the rest, a dead descriptor (EBADF/EBADFD) does.
    Returns ``(packets written, bytes written, [(index, errno) of each refused packet]``
    in order); a fatal errno, if any, is the last one."""
    if len(header) > MAX_HEADER:
        raise ValueError(f"header must be at most {MAX_HEADER} bytes")
    if len(packets) > MAX_PACKETS:
        raise ValueError(f"at most {MAX_PACKETS} packets per call")
    for packet in packets:  # every buffer is checked before anything is written, as in C
        if not isinstance(packet, bytes | bytearray | memoryview):
            raise TypeError(f"a bytes-like object is required, not {type(packet).__name__}")
    written = nbytes = 0
    errors: list[tuple[int, int]] = []
    for index, packet in enumerate(packets):
        try:
            nbytes += os.writev(fd, (header, packet)) if header else os.write(fd, packet)
        except OSError as exc:
            code = exc.errno or errno.EIO
            errors.append((index, code))
            if code in _FATAL:
                break
            continue
        written += 1
    return written, nbytes, errors


def _load() -> ModuleType | None:
    """The C twin, unless ``SECUREIOD_PURE_PYTHON`` asks for the reference code."""
    if os.environ.get("SECUREIOD_PURE_PYTHON"):
        return None
    try:
        from . import _tunio  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _tunio


ACCEL: Final = _load()
read_many: Final[ReadMany] = ACCEL.read_many if ACCEL is not None else py_read_many
write_many: Final[WriteMany] = ACCEL.write_many if ACCEL is not None else py_write_many
