"""Network paths as the core sees them: the peer's socket address, compared the way routing does.

The core cannot import ``socket`` (it stays liftable), so the address type is defined here
with the same shape the ``socket`` module hands out; the daemon's ``secureiod.endpoint``
type is the same union, so values pass between them unchanged.
"""

from __future__ import annotations

__all__ = ["Address", "PathKey", "path_key", "same_path"]

Address = tuple[str, int] | tuple[str, int, int, int]
"""(host, port) for IPv4; (host, port, flowinfo, scope_id) for IPv6."""

PathKey = tuple[str, int] | tuple[str, int, int]
"""What identifies a path: host and port, plus the scope for IPv6 (see ``path_key``)."""


def path_key(addr: Address) -> PathKey:
    """The part of an address that names a path.

    IPv6 ``flowinfo`` is a per-flow label a sender may change at will: two datagrams from
    the same host and port with different labels come over the same path, so it must not
    look like roaming. ``scope_id`` does name a different path (the same link-local address
    on another interface is another host).
    """
    if len(addr) == 2:
        return addr
    return (addr[0], addr[1], addr[3])  # type: ignore[misc]


def same_path(a: Address | None, b: Address | None) -> bool:
    """Do ``a`` and ``b`` name the same path? ``None`` (no address) equals only ``None``."""
    if a is None or b is None:
        return a is b
    return a == b or path_key(a) == path_key(b)
