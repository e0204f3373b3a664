"""Endpoints: one home for parsing, formatting and resolving peer and listen addresses.

An endpoint is written ``HOST:PORT``, ``[IPv6]:PORT`` or ``:PORT`` (a listener on any
address); in memory it is a socket address as the ``socket`` module gives it
(``Address``). Resolution that may ask DNS is blocking here (``resolve_endpoint``, for
start-up); the daemon resolves peer names off its event loop through a resolver port.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Final

__all__ = ["Address", "format_endpoint", "parse_endpoint", "resolve_endpoint"]

Address = tuple[str, int] | tuple[str, int, int, int]
"""A socket address as the ``socket`` module gives it: (host, port) for IPv4,
(host, port, flowinfo, scope_id) for IPv6."""

_ENDPOINT_FORMS: Final = "expected HOST:PORT, [IPv6]:PORT or :PORT"


def parse_endpoint(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT``, ``[IPv6]:PORT`` or ``:PORT`` into (host, port).

    An empty host (``:PORT``) means "any address" to a listener. A bare IPv6 address with a
    port is refused rather than guessed at, because ``::1:5000`` is ambiguous. Port 0 is
    allowed here (a listener picking a free port); a caller that connects checks for it.
    """
    if not isinstance(text, str):
        raise ValueError(f"endpoint must be text, not {type(text).__name__}")
    value = text.strip()
    if not value:
        raise ValueError(f"empty endpoint; {_ENDPOINT_FORMS}")
    if value.startswith("["):
        close = value.find("]")
        if close < 0:
            raise ValueError(f"{text!r}: missing ']' after the IPv6 address; {_ENDPOINT_FORMS}")
        host = value[1:close]
        rest = value[close + 1 :]
        if not rest.startswith(":"):
            raise ValueError(f"{text!r}: missing ':PORT' after ']'; {_ENDPOINT_FORMS}")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r}: missing ':PORT'; {_ENDPOINT_FORMS}")
        if ":" in host:
            raise ValueError(
                f"{text!r}: put an IPv6 address in brackets, e.g. [{host}]:{port_text}"
            )
        if any(c.isspace() for c in host):
            raise ValueError(f"{text!r}: the host contains whitespace")
    if not port_text.isdigit() or not port_text.isascii():
        raise ValueError(f"{text!r}: port {port_text!r} is not a number in 0..65535")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"{text!r}: port {port} is out of range 0..65535")
    return host, port


def format_endpoint(address: Address | tuple[str, int]) -> str:
    """The inverse of ``parse_endpoint``, for log lines and CLI output."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def resolve_endpoint(
    host: str, port: int, *, family: int = socket.AF_UNSPEC, passive: bool = False
) -> tuple[int, Address]:
    """Resolve to (family, sockaddr) with getaddrinfo; the first answer wins.

    Blocking (it may ask DNS): asyncio callers use ``loop.getaddrinfo`` instead. An empty
    host with ``passive`` is the IPv4 wildcard: a dual-stack socket would hand us
    v4-mapped addresses and make roaming comparisons surprising.
    """
    if not host:
        if not passive:
            raise ValueError("an address to send to needs a host")
        host = "::" if family == socket.AF_INET6 else "0.0.0.0"
    flags = socket.AI_PASSIVE if passive else 0
    infos = socket.getaddrinfo(host, port, family, socket.SOCK_DGRAM, socket.IPPROTO_UDP, flags)
    if not infos:  # pragma: no cover - getaddrinfo raises instead
        raise OSError(f"no address for {host!r}")
    fam, _, _, _, sockaddr = infos[0]
    return int(fam), sockaddr


def literal_sockaddr(host: str, port: int, family: int) -> Address | None:
    """The socket address for an IP literal on a socket of ``family``; None for a name
    (resolve it) or an address the socket cannot reach (IPv6 on an IPv4 socket). On an
    IPv6 socket an IPv4 literal becomes v4-mapped, as the kernel reports its senders."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if family == socket.AF_INET6:
        if ip.version == 4:
            return (f"::ffff:{ip}", port, 0, 0)
        if "%" in host:
            infos = socket.getaddrinfo(
                host, port, socket.AF_INET6, socket.SOCK_DGRAM, 0, socket.AI_NUMERICHOST
            )
            return infos[0][4]  # type: ignore[return-value]
        return (str(ip), port, 0, 0)
    if ip.version == 6:
        return None
    return (str(ip), port)


_SOCKADDR_IN: Final = struct.Struct("=H2s4s8x")
_SOCKADDR_IN6: Final = struct.Struct("=H2sI16sI")


def pack_sockaddr(address: Address, family: int) -> bytes:
    """``address`` as the kernel's ``struct sockaddr_in`` (16 bytes) or ``sockaddr_in6``
    (28 bytes) for a socket of ``family``: what C code hands to ``sendto`` (the daemon's
    lone-packet hop). ``ValueError`` for an address that is not an IP literal of that
    family (the hop is then not used; Python's ``sendto`` takes the same tuples)."""
    host, port = address[0], address[1]
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 0..65535")
    if family == socket.AF_INET:
        raw4 = ipaddress.IPv4Address(host).packed
        return _SOCKADDR_IN.pack(socket.AF_INET, port.to_bytes(2, "big"), raw4)
    if family == socket.AF_INET6:
        flowinfo = address[2] if len(address) > 2 else 0  # type: ignore[misc]
        scope_id = address[3] if len(address) > 3 else 0  # type: ignore[misc]
        raw = ipaddress.IPv6Address(host.split("%", 1)[0]).packed
        return _SOCKADDR_IN6.pack(
            socket.AF_INET6, port.to_bytes(2, "big"), socket.htonl(flowinfo), raw, scope_id
        )
    raise ValueError(f"address family {family} is neither AF_INET nor AF_INET6")
