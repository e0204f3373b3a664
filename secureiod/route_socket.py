"""The few route-netlink requests the daemon makes by the thousand, encoded by hand.

A daemon with 10,000 peers adds (and at stop deletes) one kernel route per allowed prefix
and looks up its device's index for each. Through pyroute2 each request costs 1.5-4 ms of
Python (argument filters, an asyncio round per call, decoding every attribute of the
reply), which made 10,000 peers take over 15 s to start; these encoders cost ~20 µs a
request, most of it the kernel's. ``Netlink`` keeps pyroute2 for everything else.

The socket is a duplicate of pyroute2's (so it lives in the same namespace, however that
one was opened) and is used only between pyroute2's calls, which are synchronous: each
request here reads its own answer (by sequence number) before returning, so pyroute2
never finds one of ours waiting.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import struct
from typing import Final

from pyroute2.netlink.exceptions import NetlinkError as PyrouteError

_NLMSG_ERROR: Final = 2
_NLMSG_DONE: Final = 3
_RTM_NEWLINK: Final = 16
_RTM_GETLINK: Final = 18
_RTM_NEWROUTE: Final = 24
_RTM_DELROUTE: Final = 25
_NLM_F_REQUEST: Final = 0x1
_NLM_F_ACK: Final = 0x4
_NLM_F_EXCL: Final = 0x200
_NLM_F_CREATE: Final = 0x400
_IFLA_IFNAME: Final = 3
_RTA_DST: Final = 1
_RTA_OIF: Final = 4
_RTA_PRIORITY: Final = 6
_RTA_METRICS: Final = 8
_RTA_TABLE: Final = 15
_RTAX_MTU: Final = 2
_RTN_UNICAST: Final = 1
_RTPROT_STATIC: Final = 4
"""What pyroute2's ``route("add")`` sets (``ip route add`` says boot): routes keep the
protocol they had before this module existed."""
_RT_TABLE_UNSPEC: Final = 0
_IFNAMSIZ: Final = 16

_HDR: Final = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
# rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTMSG: Final = struct.Struct("=BBBBBBBBI")
_IFINFO: Final = struct.Struct("=BxHiII")  # family, type, index, flags, change
_ERR: Final = struct.Struct("=i")
_ATTR: Final = struct.Struct("=HH")
_U32_ATTR: Final = struct.Struct("=HHI")
_TIMEOUT: Final = 5.0
_FIRST_SEQ: Final = 0x70000000
"""Far above pyroute2's sequence numbers, so an answer is never mistaken for the other's."""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _attr(kind: int, payload: bytes) -> bytes:
    size = _ATTR.size + len(payload)
    return _ATTR.pack(size, kind) + payload + b"\0" * (-size % 4)


def _u32(kind: int, value: int) -> bytes:
    return _U32_ATTR.pack(8, kind, value)


class RouteSocket:
    """Route add/delete and link lookup by name on a duplicate of ``fd`` (a route-netlink
    socket). Errors are pyroute2's ``NetlinkError`` with the kernel's errno, as pyroute2
    raises them, so callers handle both paths alike."""

    def __init__(self, fd: int) -> None:
        self._sock = socket.socket(fileno=os.dup(fd))
        self._seq = _FIRST_SEQ

    def close(self) -> None:
        self._sock.close()

    def link_index(self, name: str) -> int | None:
        """The ifindex of ``name`` in the socket's namespace, ``None`` if there is none."""
        raw = name.encode()
        if not raw or len(raw) >= _IFNAMSIZ or b"\0" in raw:
            return None  # no link can have it (the kernel would say EINVAL)
        body = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _attr(_IFLA_IFNAME, raw + b"\0")
        try:
            reply = self._request(_RTM_GETLINK, _NLM_F_REQUEST, body, want=_RTM_NEWLINK)
        except PyrouteError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise
        assert reply is not None
        return int(_IFINFO.unpack_from(reply)[2])

    def add_route(
        self, net: Network, oif: int, *, table: int, metric: int, scope: int, mtu: int | None
    ) -> None:
        """``ip route add NET dev OIF table T metric M [mtu N]``; EEXIST if that key is taken."""
        body = self._route(net, oif, table, _RTPROT_STATIC, scope, _RTN_UNICAST)
        body += _u32(_RTA_PRIORITY, metric)
        if mtu is not None:
            body += _attr(_RTA_METRICS, _u32(_RTAX_MTU, mtu))
        flags = _NLM_F_REQUEST | _NLM_F_ACK | _NLM_F_CREATE | _NLM_F_EXCL
        self._request(_RTM_NEWROUTE, flags, body)

    def delete_route(
        self, net: Network, oif: int, *, table: int, metric: int | None, scope: int
    ) -> None:
        """Delete one route ``NET dev OIF table T [metric M]`` of any protocol and (with
        ``scope`` RT_SCOPE_NOWHERE) any scope; ESRCH if there is none."""
        body = self._route(net, oif, table, 0, scope, 0)
        if metric is not None:
            body += _u32(_RTA_PRIORITY, metric)
        self._request(_RTM_DELROUTE, _NLM_F_REQUEST | _NLM_F_ACK, body)

    @staticmethod
    def _route(net: Network, oif: int, table: int, proto: int, scope: int, kind: int) -> bytes:
        family = socket.AF_INET if net.version == 4 else socket.AF_INET6
        head = _RTMSG.pack(
            family,
            net.prefixlen,
            0,
            0,
            table if table < 256 else _RT_TABLE_UNSPEC,
            proto,
            scope,
            kind,
            0,
        )
        return (
            head
            + _attr(_RTA_DST, net.network_address.packed)
            + _u32(_RTA_TABLE, table)
            + _u32(_RTA_OIF, oif)
        )

    def _request(self, kind: int, flags: int, body: bytes, want: int | None = None) -> bytes | None:
        """Send one request and read until its answer: the payload of a ``want`` message,
        or ``None`` for an acknowledgement; a kernel error raises."""
        self._seq = self._seq + 1 if self._seq < 0xFFFFFFFF else _FIRST_SEQ
        seq = self._seq
        self._sock.send(_HDR.pack(_HDR.size + len(body), kind, flags, seq, 0) + body)
        while True:
            ready, _, _ = select.select([self._sock], [], [], _TIMEOUT)
            if not ready:
                raise OSError(errno.ETIMEDOUT, "no answer from the kernel")
            data = self._sock.recv(65536, socket.MSG_DONTWAIT)
            offset = 0
            while offset + _HDR.size <= len(data):
                size, mtype, _, mseq, _ = _HDR.unpack_from(data, offset)
                if size < _HDR.size:
                    break  # malformed: drop the rest of this read
                payload = data[offset + _HDR.size : offset + size]
                offset += (size + 3) & ~3
                if mseq != seq:
                    continue  # not ours (nothing else should be waiting; never act on it)
                if mtype == _NLMSG_ERROR:
                    (code,) = _ERR.unpack_from(payload)
                    if code:
                        raise PyrouteError(-code, os.strerror(-code))
                    return None
                if want is not None and mtype == want:
                    return payload
                if mtype == _NLMSG_DONE:
                    return None
