"""Peer-endpoint lookups that leave by the underlay, not by the tunnel they are for.

Under a full tunnel (``table = "auto"`` with a peer that has ``0.0.0.0/0`` or ``::/0``)
every unmarked packet of the host enters the tunnel, ``getaddrinfo``'s DNS queries
included. When the peer behind a DNS name moves, its session dies, and the query that
would find its new address goes into that dead tunnel: the peer never comes back.
``getaddrinfo`` cannot put a firewall mark on its socket, so ``StubLookup`` sends the
query itself, from a UDP socket carrying the same mark as the daemon's datagrams, to the
nameservers of ``/etc/resolv.conf``: it follows the main table, exactly where the
daemon's own datagrams go. ``/etc/hosts`` is read first, as the "files" source of
``getaddrinfo`` would be.

Every reply is hostile: the socket is connected to the nameserver (the kernel drops
datagrams from any other address or port), the ID is random and must match, the question
must be echoed exactly, the reply is bounded in size, a compressed name may only point
backwards (no loops) and the answer section is read only for the queried name and its
CNAME chain (bounded). A lookup never takes longer than its ``budget``.

The callable has ``socket.getaddrinfo``'s signature, so ``ThreadResolver`` runs it on its
threads with its watchdog as it runs ``getaddrinfo``.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from .netlink import RT_TABLE_MAIN

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .config import Config
    from .netlink import RouteInfo

__all__ = [
    "StubLookup",
    "UnderlayLookup",
    "build_query",
    "name_warnings",
    "parse_reply",
    "parse_resolv_conf",
]

logger = logging.getLogger(__name__)

_SO_MARK: Final = getattr(socket, "SO_MARK", 36)
RESOLV_CONF: Final = Path("/etc/resolv.conf")
RESOLVED_UPSTREAM: Final = Path("/run/systemd/resolve/resolv.conf")
"""systemd-resolved's list of the real upstream servers: used when resolv.conf names only
its local stub, whose own (unmarked) queries would go into the tunnel."""
HOSTS: Final = Path("/etc/hosts")
MAX_FILE: Final = 64 * 1024
"""resolv.conf and hosts are read up to this many bytes."""
MAX_NAMESERVERS: Final = 3  # glibc's MAXNS
MAX_REPLY: Final = 4096
MAX_CNAMES: Final = 8
MAX_ADDRESSES: Final = 32
SERVER_TIMEOUT: Final = 2.0
TYPE_A: Final = 1
TYPE_CNAME: Final = 5
TYPE_AAAA: Final = 28
CLASS_IN: Final = 1
RCODE_NXDOMAIN: Final = 3
_STUB_ADDRESSES: Final = frozenset({"127.0.0.53", "127.0.0.54"})


class DnsError(Exception):
    """One line about why a reply is unusable."""


@dataclass(frozen=True, slots=True)
class Reply:
    rcode: int
    truncated: bool
    addresses: tuple[str, ...]


def _encode_name(host: str) -> bytes:
    """The wire form of ``host`` (absolute; no search domains are applied)."""
    name = host.rstrip(".")
    try:
        raw = name.encode("idna")
    except UnicodeError as exc:
        raise DnsError(f"not a valid host name ({exc})") from None
    out = bytearray()
    for label in raw.split(b"."):
        if not 0 < len(label) <= 63:
            raise DnsError("not a valid host name (empty or overlong label)")
        out.append(len(label))
        out += label
    out.append(0)
    if len(out) > 255:
        raise DnsError("not a valid host name (too long)")
    return bytes(out)


def build_query(qid: int, host: str, qtype: int) -> bytes:
    """A standard recursive query for one name and type."""
    return (
        struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
        + _encode_name(host)
        + struct.pack("!HH", qtype, CLASS_IN)
    )


def _read_name(data: bytes, pos: int) -> tuple[bytes, int]:
    """(the lower-cased dotted name at ``pos``, the position after it). A compression
    pointer must point before the label that holds it, so every jump goes backwards and
    the walk ends; the name is bounded at 255 bytes."""
    labels: list[bytes] = []
    length = 0
    end: int | None = None
    while True:
        if pos >= len(data):
            raise DnsError("name runs past the reply")
        n = data[pos]
        if n & 0xC0 == 0xC0:
            if pos + 1 >= len(data):
                raise DnsError("cut compression pointer")
            target = ((n & 0x3F) << 8) | data[pos + 1]
            if target >= pos:
                raise DnsError("compression pointer does not point backwards")
            if end is None:
                end = pos + 2
            pos = target
            continue
        if n & 0xC0:
            raise DnsError("unknown label type")
        if n == 0:
            return b".".join(labels).lower(), (end if end is not None else pos + 1)
        label = data[pos + 1 : pos + 1 + n]
        if len(label) != n:
            raise DnsError("label runs past the reply")
        length += n + 1
        if length > 255:
            raise DnsError("name longer than 255 bytes")
        labels.append(label)
        pos += 1 + n


def parse_reply(data: bytes, qid: int, host: str, qtype: int) -> Reply:
    """The addresses a reply gives for ``host`` (``qtype`` A or AAAA), following CNAMEs
    inside the answer section. Raises ``DnsError`` for a reply that is not the answer to
    our question (it is then ignored, and the wait goes on)."""
    if len(data) < 12 or len(data) > MAX_REPLY:
        raise DnsError(f"reply of {len(data)} bytes")
    rid, flags, qdcount, ancount, _ns, _ar = struct.unpack_from("!HHHHHH", data)
    if rid != qid or not flags & 0x8000 or (flags >> 11) & 0xF != 0 or qdcount != 1:
        raise DnsError("not a reply to our query")
    qname, pos = _read_name(data, 12)
    if pos + 4 > len(data):
        raise DnsError("cut question")
    rtype, rclass = struct.unpack_from("!HH", data, pos)
    want = host.rstrip(".").encode("idna").lower()
    if qname != want or rtype != qtype or rclass != CLASS_IN:
        raise DnsError("the reply's question is not ours")
    pos += 4
    rcode = flags & 0xF
    truncated = bool(flags & 0x0200)
    owners = {want}
    addresses: list[str] = []
    size = 4 if qtype == TYPE_A else 16
    for _ in range(ancount):
        if pos >= len(data):
            break  # a truncated answer section: keep what was complete
        owner, pos = _read_name(data, pos)
        if pos + 10 > len(data):
            break
        atype, aclass, _ttl, rdlength = struct.unpack_from("!HHIH", data, pos)
        pos += 10
        rdata_at = pos
        pos += rdlength
        if pos > len(data):
            break
        if aclass != CLASS_IN or owner not in owners:
            continue
        if atype == TYPE_CNAME:
            if len(owners) <= MAX_CNAMES:
                target, _ = _read_name(data, rdata_at)
                owners.add(target)
        elif atype == qtype and rdlength == size and len(addresses) < MAX_ADDRESSES:
            raw = data[rdata_at:pos]
            ip = ipaddress.IPv4Address(raw) if size == 4 else ipaddress.IPv6Address(raw)
            addresses.append(str(ip))
    return Reply(rcode, truncated, tuple(addresses))


def _read_small(path: Path) -> str:
    try:
        with path.open("rb") as f:
            return f.read(MAX_FILE).decode("utf-8", "replace")
    except OSError:
        return ""


def parse_resolv_conf(text: str) -> list[str]:
    """The first ``MAX_NAMESERVERS`` valid ``nameserver`` addresses (a ``%zone`` kept)."""
    servers: list[str] = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        try:
            ipaddress.ip_address(words[1].split("%", 1)[0])
        except ValueError:
            continue
        servers.append(words[1])
        if len(servers) == MAX_NAMESERVERS:
            break
    return servers


def _hosts_lookup(text: str, host: str) -> list[str]:
    want = host.rstrip(".").lower()
    found: list[str] = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) < 2 or want not in (w.lower() for w in words[1:]):
            continue
        try:
            found.append(str(ipaddress.ip_address(words[0])))
        except ValueError:
            continue
    return found[:MAX_ADDRESSES]


def _gaierror(code: int, text: str) -> socket.gaierror:
    return socket.gaierror(code, text)


def _infos(ips: list[str], port: int) -> list[tuple]:
    out: list[tuple] = []
    for ip in ips:
        if ":" in ip:
            out.append((socket.AF_INET6, socket.SOCK_DGRAM, 17, "", (ip, port, 0, 0)))
        else:
            out.append((socket.AF_INET, socket.SOCK_DGRAM, 17, "", (ip, port)))
    return out


@dataclass
class StubLookup:
    """``getaddrinfo`` for peer endpoints by a marked stub resolver (module docstring).

    ``mark`` None sends unmarked (tests without CAP_NET_ADMIN). ``budget`` bounds one
    whole lookup; each nameserver gets at most ``server_timeout`` of it per question."""

    mark: int | None
    resolv_conf: Path = RESOLV_CONF
    resolved_upstream: Path = RESOLVED_UPSTREAM
    hosts: Path = HOSTS
    budget: float = 8.0
    server_timeout: float = SERVER_TIMEOUT
    port: int = 53
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    def nameservers(self) -> list[str]:
        servers = parse_resolv_conf(_read_small(self.resolv_conf))
        if servers and all(s in _STUB_ADDRESSES for s in servers):
            upstream = parse_resolv_conf(_read_small(self.resolved_upstream))
            upstream = [s for s in upstream if s not in _STUB_ADDRESSES]
            if upstream:
                return upstream
        return servers

    def __call__(
        self, host: str, port: int, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> list[tuple]:
        """``socket.getaddrinfo(host, port, family, ...)``: AF_INET asks for A records
        only, anything else for AAAA and A. Raises ``socket.gaierror`` as it would."""
        known = _hosts_lookup(_read_small(self.hosts), host)
        if known:
            if family == socket.AF_INET:
                known = [ip for ip in known if ":" not in ip]
            if known:
                return _infos(known, port)
        servers = self.nameservers()
        if not servers:
            raise _gaierror(socket.EAI_AGAIN, "no nameserver in resolv.conf")
        deadline = self.clock() + self.budget
        qtypes = [TYPE_A] if family == socket.AF_INET else [TYPE_AAAA, TYPE_A]
        found: dict[int, list[str]] = {}
        errors: list[str] = []
        for qtype in qtypes:
            try:
                found[qtype] = self._ask(servers, host, qtype, deadline, errors)
            except socket.gaierror:
                if qtype == qtypes[-1] and not any(found.values()):
                    raise
                found[qtype] = []
        v6, v4 = found.get(TYPE_AAAA, []), found.get(TYPE_A, [])
        ips = v6 + v4 if v6 and self._routable(v6[0]) else v4 + v6
        if not ips:
            raise _gaierror(socket.EAI_NODATA, "no address for the name")
        return _infos(ips, port)

    def _routable(self, ip: str) -> bool:
        """Whether a marked datagram to ``ip`` has a route (getaddrinfo's RFC 6724 check
        that puts IPv6 first only on a host that can use it)."""
        try:
            with self._socket(socket.AF_INET6) as s:
                s.connect((ip, 9))
            return True
        except OSError:
            return False

    def _socket(self, fam: int) -> socket.socket:
        s = socket.socket(fam, socket.SOCK_DGRAM)
        try:
            if self.mark is not None:
                s.setsockopt(socket.SOL_SOCKET, _SO_MARK, self.mark)
        except BaseException:
            s.close()
            raise
        return s

    def _ask(
        self, servers: list[str], host: str, qtype: int, deadline: float, errors: list[str]
    ) -> list[str]:
        """Each server in turn until one answers; NXDOMAIN is final."""
        try:
            build_query(0, host, qtype)
        except DnsError as exc:
            raise _gaierror(socket.EAI_NONAME, str(exc)) from None
        for server in servers:
            left = deadline - self.clock()
            if left <= 0:
                break
            try:
                reply = self._query(server, host, qtype, min(left, self.server_timeout))
            except (OSError, DnsError) as exc:
                errors.append(f"{server}: {exc}")
                continue
            if reply.rcode == RCODE_NXDOMAIN:
                raise _gaierror(socket.EAI_NONAME, "Name or service not known")
            if reply.rcode != 0:
                errors.append(f"{server}: rcode {reply.rcode}")
                continue
            if reply.truncated and not reply.addresses:
                errors.append(f"{server}: truncated reply")
                continue
            return list(reply.addresses)
        shown = "; ".join(errors[-MAX_NAMESERVERS:]) or "no time left"
        raise _gaierror(socket.EAI_AGAIN, f"no usable answer from the nameservers ({shown})")

    def _query(self, server: str, host: str, qtype: int, timeout: float) -> Reply:
        info = socket.getaddrinfo(
            server, self.port, 0, socket.SOCK_DGRAM, 0, socket.AI_NUMERICHOST
        )[0]
        qid = secrets.randbelow(0x10000)
        query = build_query(qid, host, qtype)
        end = self.clock() + timeout
        with self._socket(info[0]) as s:
            s.connect(info[4])  # the kernel now drops datagrams from anyone else
            s.send(query)
            while True:
                left = end - self.clock()
                if left <= 0:
                    raise DnsError("timed out")
                s.settimeout(left)
                try:
                    data = s.recv(MAX_REPLY + 1)
                except TimeoutError:
                    raise DnsError("timed out") from None
                try:
                    return parse_reply(data, qid, host, qtype)
                except DnsError as exc:
                    logger.debug("dns: ignored a reply from %s: %s", server, exc)


@dataclass
class UnderlayLookup:
    """``getaddrinfo`` while nothing captures the host's traffic, ``stub`` while
    ``captured()`` says a full tunnel would (asked per lookup: a reload may add or remove
    the full tunnel)."""

    stub: StubLookup
    captured: Callable[[], bool]
    getaddrinfo: Callable[..., list] = field(default=socket.getaddrinfo, repr=False)

    def __call__(self, *args: object) -> list:
        return (self.stub if self.captured() else self.getaddrinfo)(*args)


def name_warnings(
    config: Config, nameservers: list[str], host_routes: Sequence[RouteInfo] | None = None
) -> list[str]:
    """``--check``: the one case the marked lookups cannot help. A full tunnel's peer is
    known by a DNS name, and every nameserver the stub would ask lies in a prefix that the
    tunnel routes (an ``allowed_ips`` prefix other than a default route, or an interface
    prefix) more specifically than the host's own main-table routes (``host_routes``;
    None: judged on the config alone). The mark does not keep those queries out of the
    tunnel, so a name that moves cannot be found again while the tunnel is down."""
    iface = config.interface
    full = str(iface.table) == "auto" and any(
        n.prefixlen == 0 for pc in config.peers for n in pc.allowed_ips
    )
    named = [pc for pc in config.peers if pc.endpoint is not None and pc.endpoint.ip is None]
    if not full or not named or not nameservers:
        return []
    tunnel = [n for pc in config.peers for n in pc.allowed_ips if n.prefixlen > 0]
    tunnel += [a.network for a in iface.address]
    host = [
        r.dst
        for r in host_routes or ()
        if r.table == RT_TABLE_MAIN
        and r.kind == "unicast"
        and r.dev != iface.name
        and r.dst.prefixlen
    ]

    def longest(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: list) -> int:
        return max((n.prefixlen for n in nets if n.version == ip.version and ip in n), default=-1)

    def tunneled(server: str) -> bool:
        ip = ipaddress.ip_address(server.split("%", 1)[0])
        inside = longest(ip, tunnel)
        return inside >= 0 and inside > longest(ip, host)

    if not all(tunneled(s) for s in nameservers):
        return []
    names = ", ".join(f'peer "{pc.name}" ({pc.endpoint})' for pc in named[:3])
    return [
        f"{names}: the endpoint is a DNS name, and every nameserver of this host "
        f"({', '.join(nameservers)}) is routed into the tunnel, so when the peer moves its "
        "new address cannot be looked up while the tunnel is down; give the endpoint as an "
        "IP address, or add a nameserver outside the tunnel to /etc/resolv.conf"
    ]
