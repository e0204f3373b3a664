"""The daemon's configuration: one TOML file per interface, validated, then resolved.

Loading happens in two layers, because they fail for different reasons and serve different
readers:

1. **Schema** (``ConfigSchema``, ``InterfaceSchema``, ``PeerSchema``): pydantic models that
   check the shape of the file - every key known (``extra="forbid"``: a misspelt key would
   otherwise be silently ignored and, say, leave a peer without its PSK), every value of the
   right type and range.  They touch nothing outside the file.
2. **Resolution** (``Config``, ``InterfaceConfig``, ``PeerConfig``): frozen dataclasses holding
   what the daemon actually uses - the loaded ``Identity``, each peer's ``PublicKey`` and PSK
   bytes, parsed networks - plus the checks that need more than one value at a time (a prefix
   in two peers' ``allowed_ips``, duplicate names and keys, IPv6 versus the MTU).  They are
   hashable and compare by value, so a reload is a plain ``diff_config(old, new)``.

Every problem becomes one ``ConfigError`` whose message is a single line of the form
``<file>: <field path>: <what is wrong>[; <fix>]`` (for example
``/etc/secureiod/sio0.toml: peer "b".allowed_ips[0]: 198.19.0.1/24 has host bits set; did you
mean 198.19.0.0/24?``), because it is printed by ``secureiod --check`` and logged by a daemon
that refuses to start: an administrator must be able to act on it without a traceback.  When
there are several problems the first one *in file order* is shown, followed by
``(and N more errors)``; all of them are in ``ConfigError.problems``.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import logging
import math
import os
import pwd
import re
import socket
import stat
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StrictBool, ValidationError

from .paths import control_socket_path
from .secretfile import SecretFileError, read_psk_file
from .secureio.constants import DEFAULT_PAYLOAD_SIZE_LIMIT
from .secureio.errors import IdentityError, SecureioError
from .secureio.identity import (
    Identity,
    PublicKey,
    load_identity,
    load_public_key,
    parse_public_key,
)
from .secureio.negotiation import MIN_PROBE_SIZE

if TYPE_CHECKING:
    from .netlink import RouteInfo

__all__ = [
    "DEFAULT_KEEPALIVE_TIMEOUT",
    "DEFAULT_KEY_UPDATE_INTERVAL",
    "DEFAULT_LISTEN_PORT",
    "RELOADABLE_INTERFACE_FIELDS",
    "RESTART_INTERFACE_FIELDS",
    "Config",
    "ConfigDiff",
    "ConfigError",
    "ConfigSchema",
    "IPInterface",
    "IPNetwork",
    "InterfaceConfig",
    "InterfaceSchema",
    "PeerChange",
    "PeerConfig",
    "PeerSchema",
    "SocketAddress",
    "check_config",
    "diff_config",
    "load_config",
    "restart_required",
]

logger = logging.getLogger(__name__)

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface: TypeAlias = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
_Loc: TypeAlias = tuple[str | int, ...]

DEFAULT_LISTEN_HOST: Final = "0.0.0.0"
DEFAULT_LISTEN_PORT: Final = 5800
DEFAULT_KEY_UPDATE_INTERVAL: Final = 60.0
DEFAULT_KEEPALIVE_TIMEOUT: Final = 15.0
MIN_MTU: Final = 576
"""The smallest datagram every IPv4 host must accept (RFC 791)."""
MAX_MTU: Final = 65535
MIN_IPV6_MTU: Final = 1280
"""RFC 8200: a link carrying IPv6 must have an MTU of at least 1280."""
IFNAMSIZ: Final = 16
"""Linux interface names are at most IFNAMSIZ - 1 = 15 bytes (one for the NUL)."""
_SUN_PATH_MAX: Final = 107
"""sockaddr_un.sun_path is 108 bytes including the NUL: longer socket paths cannot bind."""
_MAX_CONFIG_SIZE: Final = 4 << 20
"""A bound on what a config file can make us parse and hold. A full peer entry (name, key,
endpoint, IPv4 and IPv6 allowed_ips, psk_file) is about 250 bytes, so 4 MiB fits 12,000 such
peers (10,000 and 20 % headroom) with room for comments; bigger is a mistake, not a site."""
_WEAK_PSK_SIZE: Final = 16

RESTART_INTERFACE_FIELDS: Final = frozenset(
    {"name", "listen", "private_key", "control_socket", "user", "payload_size_limit", "offload"}
    | {"metrics_listen"}
    | {"table", "fwmark", "dns"}
)
"""Interface keys a running daemon cannot change: the TUN device, the UDP socket, the
identity every peer knows us by, the control socket, the metrics listener and the dropped
privileges are all set up once at start; ``payload_size_limit`` must match the peers' and
is baked into every live session and the automatic MTU. ``table``, ``fwmark`` and ``dns``
shape the host's routing rules, the UDP socket's mark and the resolver, set up once at start
and given back at stop."""
RELOADABLE_INTERFACE_FIELDS: Final = frozenset(
    {"address", "mtu", "key_update_interval", "keepalive_timeout"}
)
"""Interface keys a reload can apply in place (addresses and MTU through netlink, timers on
their next run)."""

_INTERFACE_FIELD_ORDER: Final = (
    "name",
    "private_key",
    "listen",
    "address",
    "mtu",
    "key_update_interval",
    "keepalive_timeout",
    "control_socket",
    "user",
    "payload_size_limit",
    "offload",
    "metrics_listen",
    "table",
    "fwmark",
    "dns",
)


class ConfigError(Exception):
    """A config file that cannot be used; ``str()`` is the whole report, on one line.

    ``problems`` holds every problem found (each one line, in file order) so that a caller
    that has room, such as a log, can show them all; the message shows the first.
    """

    def __init__(self, message: str, *, problems: Sequence[str] = ()) -> None:
        message = _one_line(message)
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(_one_line(p) for p in problems) or (message,)


# --- message helpers ---------------------------------------------------------------------


def _one_line(text: str) -> str:
    """Escape anything that could break a message over lines (file names and key material
    come from the user), so the one-line contract holds whatever the input."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else json.dumps(c)[1:-1] for c in text)


def _quote(value: str, limit: int = 60) -> str:
    """Double-quote a user's string as TOML would write it, escaped and shortened."""
    quoted = _one_line(json.dumps(value[:limit], ensure_ascii=False))
    return quoted[:-1] + '..."' if len(value) > limit else quoted


def _describe(value: object) -> str:
    """Name a TOML value's type, with the value if it is short, for 'expected X, got Y'."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, str):
        return f"string {_quote(value)}"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return type(value).__name__  # TOML dates and times


def _lower_first(text: object) -> str:
    text = str(text)
    return text[:1].lower() + text[1:]


# --- value validators (used by the schema; each raises ValueError with our own words) ------


def _expect_str(value: object, expected: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected {expected}, got {_describe(value)}")
    return value


def _ifname_problem(name: str) -> str | None:
    """Linux's dev_valid_name() rules plus '%', which would make the kernel pick a numbered
    name: the daemon must know its device's name to find it and to name its socket."""
    if not name:
        return "interface name is empty"
    if name in (".", ".."):
        return f"{_quote(name)} is not allowed as an interface name"
    bad = next(
        (c for c in name if c in "/:%" or c.isspace() or not (c.isascii() and c.isprintable())),
        None,
    )
    if bad is not None:
        return (
            f"{_quote(name)} contains {_quote(bad)}; interface names are printable ASCII "
            "without '/', ':', '%' or whitespace"
        )
    if len(name) >= IFNAMSIZ:
        return (
            f"{_quote(name)} is too long ({len(name)} characters); Linux allows at most "
            f"{IFNAMSIZ - 1}"
        )
    return None


def _v_ifname(value: object) -> str:
    name = _expect_str(value, "a string")
    problem = _ifname_problem(name)
    if problem is not None:
        raise ValueError(problem)
    return name


_PEER_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _v_peer_name(value: object) -> str:
    name = _expect_str(value, "a string")
    if not _PEER_NAME_RE.fullmatch(name):
        raise ValueError(
            f"{_quote(name)} is not a valid peer name; use 1 to 64 characters from "
            "A-Z a-z 0-9 _ . -"
        )
    return name


def _v_path(value: object) -> str:
    path = _expect_str(value, "a file path")
    if not path:
        raise ValueError("path is empty")
    if "\0" in path:
        raise ValueError(f"path {_quote(path)} contains a NUL character")
    return path


def _v_socket_path(value: object) -> str:
    path = _v_path(value)
    if not os.path.isabs(path):
        raise ValueError(f"{_quote(path)} is not an absolute path")
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise ValueError(
            f"path is too long for a Unix socket ({len(os.fsencode(path))} bytes, at most "
            f"{_SUN_PATH_MAX})"
        )
    return path


_USER_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")


def _v_user(value: object) -> str:
    user = _expect_str(value, "a user name")
    if not _USER_RE.fullmatch(user):
        raise ValueError(f"{_quote(user)} is not a valid user name")
    return user


def _v_key_text(value: object) -> str:
    text = _expect_str(value, 'a public key (base64, "ssh-ed25519 AAAA...") or a .pub file path')
    if not text.strip():
        raise ValueError("public key is empty")
    return text


def _int_range(lo: int, hi: int, *, zero_hint: str = "") -> Callable[[object], int]:
    """A validator for an integer in ``lo..hi``; ``zero_hint`` is the fix shown for 0,
    which people coming from WireGuard write to mean 'off'."""

    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer {lo}..{hi}, got {_describe(value)}")
        if not lo <= value <= hi:
            hint = zero_hint if value == 0 and zero_hint else ""
            raise ValueError(f"{value} is out of range {lo}..{hi}{hint}")
        return value

    return check


def _v_seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number of seconds, got {_describe(value)}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{value} is not a positive number of seconds")
    return float(value)


def _v_mtu(value: object) -> int | None:
    """``"auto"`` becomes None: the daemon derives the MTU from the path to its peers."""
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f'expected "auto" or an integer {MIN_MTU}..{MAX_MTU}, got {_describe(value)}'
        )
    if not MIN_MTU <= value <= MAX_MTU:
        raise ValueError(f'{value} is out of range; use {MIN_MTU}..{MAX_MTU} or "auto"')
    return value


def _v_network(value: object) -> IPNetwork:
    text = _expect_str(value, 'a network such as "198.19.0.2/32"')
    try:
        # The family's own class, not ip_network(): its errors say what is wrong ("'33' is
        # not a valid netmask") where ip_network() only says "does not appear to be".
        if ":" in text:
            return ipaddress.IPv6Network(text)
        return ipaddress.IPv4Network(text)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            fixed = ipaddress.ip_network(text, strict=False)
            raise ValueError(f"{text} has host bits set; did you mean {fixed}?") from None
        raise ValueError(f"{_quote(text)} is not an IP network: {_lower_first(exc)}") from None


def _v_interface_address(value: object) -> IPInterface:
    text = _expect_str(value, 'an address with prefix length such as "198.19.0.1/24"')
    try:
        iface: IPInterface = (
            ipaddress.IPv6Interface(text) if ":" in text else ipaddress.IPv4Interface(text)
        )
    except ValueError as exc:
        raise ValueError(f"{_quote(text)} is not an IP address: {_lower_first(exc)}") from None
    net = iface.network
    # A classic slip: copying a network (198.19.0.0/24) where a host address belongs.
    if iface.version == 4 and net.prefixlen < 31:
        which = {net.network_address: "network", net.broadcast_address: "broadcast"}
        if iface.ip in which:
            raise ValueError(
                f"{text} is the {which[iface.ip]} address of {net}; did you mean "
                f"{net.network_address + 1}/{net.prefixlen}?"
            )
    return iface


@dataclass(frozen=True, slots=True)
class SocketAddress:
    """A UDP address as written in the config: ``host`` is an IP literal (IPv6 without
    brackets, possibly with a ``%zone``) or, for peer endpoints only, a DNS name that the
    daemon resolves itself, so that a name is re-resolved when it changes."""

    host: str
    port: int

    @property
    def ip(self) -> IPAddress | None:
        """The host as an address, or None for a DNS name."""
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_PORT_RE: Final = re.compile(r"[0-9]{1,5}")
_HOST_LABEL_RE: Final = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _parse_host_port(text: str, example: str) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port``; an unbracketed IPv6 address is refused because
    its last group and the port cannot be told apart."""
    expected = f"expected host:port such as {example}, got {_quote(text)}"
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ValueError(expected)
        host, port_text = text[1:close], text[close + 2 :]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if ip is None or ip.version != 6:
            raise ValueError(f"{_quote('[' + host + ']')} is not an IPv6 address")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(expected)
        if ":" in host:
            raise ValueError(
                f'IPv6 addresses need brackets, e.g. "[fd00::1]:5800"; got {_quote(text)}'
            )
    if not _PORT_RE.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port must be 1..65535, got {_quote(port_text)}")
    return host, int(port_text)


def _v_listen(value: object) -> SocketAddress:
    example = '"0.0.0.0:5800" or "[::]:5800"'
    text = _expect_str(value, f"a string address:port such as {example}")
    host, port = _parse_host_port(text, example)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"{_quote(host)} is not an IP address; listen takes a local address such as {example}"
        ) from None
    return SocketAddress(str(ip), port)


def _v_metrics_listen(value: object) -> SocketAddress:
    """An IP literal and a port, nothing shorter: the metrics tell whoever can connect the
    peers' names, keys, endpoints and traffic, so which addresses serve them is never
    implied. A bare port or ``":9586"`` means every address to some readers and loopback
    to others, and a name may resolve anywhere; both are refused with the two spellings
    that say which. A wildcard (``0.0.0.0``, ``[::]``) is accepted when written out."""
    example = '"127.0.0.1:9586" (this host only) or "0.0.0.0:9586" (every IPv4 address)'
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(f"a port alone does not say who may read the metrics; write {example}")
    text = _expect_str(value, f"a string address:port such as {example}")
    if re.fullmatch(r":?[0-9]+", text):
        raise ValueError(f"{_quote(text)} has no address; write {example}")
    host, port = _parse_host_port(text, example)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{_quote(host)} is not an IP address; write {example}") from None
    return SocketAddress(str(ip), port)


def _v_endpoint(value: object) -> SocketAddress:
    example = '"198.18.0.2:5800" or "[fd00::1]:5800"'
    text = _expect_str(value, f"a string host:port such as {example}")
    host, port = _parse_host_port(text, example)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
            _check_zone(ip, port)
        return SocketAddress(str(ip), port)
    # getaddrinfo() would accept "198.18.0" as 198.18.0.0: a digits-and-dots name is never
    # meant as a DNS name, so it must be a complete IPv4 address.
    if re.fullmatch(r"[0-9.]+", host):
        raise ValueError(f"{_quote(host)} is not a valid IPv4 address")
    name = host.removesuffix(".")
    if len(name) > 253 or not all(_HOST_LABEL_RE.fullmatch(part) for part in name.split(".")):
        raise ValueError(f"{_quote(host)} is not a valid host name or IP address")
    return SocketAddress(host, port)


def _check_zone(ip: ipaddress.IPv6Address, port: int) -> None:
    """A zone (``fe80::1%eth0``) must name an interface of this host, and only a link-local
    address takes one: the daemon makes the socket address with the same ``getaddrinfo``
    call, and a config that passed here must not fail there (at start or on reload)."""
    try:
        socket.getaddrinfo(
            str(ip), port, socket.AF_INET6, socket.SOCK_DGRAM, 0, socket.AI_NUMERICHOST
        )
    except (OSError, UnicodeError):
        zone = ip.scope_id or ""
        link_local = ip.is_link_local or (ip.is_multicast and ip.packed[1] & 0x0F == 2)
        if not link_local:
            raise ValueError(
                f"{_quote(str(ip))}: a zone (%{zone}) applies only to link-local addresses "
                "(fe80::/10); remove it"
            ) from None
        raise ValueError(
            f"{_quote(str(ip))}: there is no interface {_quote(zone)} on this host; name one "
            "that `ip link` lists, e.g. [fe80::1%eth0]:5800"
        ) from None


TABLE_AUTO: Final = "auto"
"""``table = "auto"``: the peers' routes in the main table, except default routes, which go
into a table of their own with rules that keep the daemon's own datagrams out of the
tunnel (``daemon/policy.py``), as wg-quick does."""
TABLE_OFF: Final = "off"
"""``table = "off"``: the daemon installs no routes; the administrator routes."""
_RT_TABLE_MAIN: Final = 254
_RT_TABLE_LOCAL: Final = 255
_MAX_U32: Final = 0xFFFFFFFF


def _v_table(value: object) -> int | str:
    """wg-quick's ``Table``: "auto" (the default), "off", "main" or a table number (every
    route goes there and no rule is added: the administrator's rules decide)."""
    expected = f'"auto", "off", "main" or a routing table number 1..{_MAX_U32}'
    if isinstance(value, str) and value in (TABLE_AUTO, TABLE_OFF):
        return value
    if value == "main":
        return _RT_TABLE_MAIN
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected {expected}, got {_describe(value)}")
    if value == _RT_TABLE_LOCAL:
        raise ValueError(f'{value} is the kernel\'s local table; use another number or "auto"')
    if not 1 <= value <= _MAX_U32:
        raise ValueError(f"{value} is out of range; use {expected}")
    return value


def _v_fwmark(value: object) -> int:
    """wg-quick's ``FwMark``: the firewall mark of the daemon's UDP socket."""
    expected = f'a firewall mark 1..{_MAX_U32} (an integer, or hex text such as "0xca6c")'
    if isinstance(value, str) and re.fullmatch(r"0[xX][0-9a-fA-F]{1,8}", value):
        mark = int(value, 16)
    elif isinstance(value, int) and not isinstance(value, bool):
        mark = value
    else:
        raise ValueError(f"expected {expected}, got {_describe(value)}")
    if mark == 0:
        raise ValueError("0 is no mark; leave the key out and the daemon picks one when needed")
    if not 1 <= mark <= _MAX_U32:
        raise ValueError(f"{value} is out of range; use {expected}")
    return mark


def _v_dns_entry(value: object) -> str:
    """wg-quick's ``DNS``: server addresses, and names that are search domains."""
    text = _expect_str(value, 'a DNS server address such as "198.19.0.1" or a search domain')
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    name = text.removesuffix(".")
    if (
        name
        and len(name) <= 253
        and not re.fullmatch(r"[0-9.]+", name)
        and all(_HOST_LABEL_RE.fullmatch(part) for part in name.split("."))
    ):
        return name
    raise ValueError(f"{_quote(text)} is neither an IP address nor a search domain")


# --- schema --------------------------------------------------------------------------------

_IfName = Annotated[str, PlainValidator(_v_ifname)]
_PeerName = Annotated[str, PlainValidator(_v_peer_name)]
_FilePath = Annotated[str, PlainValidator(_v_path)]
_SocketPath = Annotated[str, PlainValidator(_v_socket_path)]
_UserName = Annotated[str, PlainValidator(_v_user)]
_KeyText = Annotated[str, PlainValidator(_v_key_text)]
_Seconds = Annotated[float, PlainValidator(_v_seconds)]
_Mtu = Annotated[int | None, PlainValidator(_v_mtu)]
_Network = Annotated[IPNetwork, PlainValidator(_v_network)]
_IfAddress = Annotated[IPInterface, PlainValidator(_v_interface_address)]
_Listen = Annotated[SocketAddress, PlainValidator(_v_listen)]
_Endpoint = Annotated[SocketAddress, PlainValidator(_v_endpoint)]
_MetricsListen = Annotated[SocketAddress, PlainValidator(_v_metrics_listen)]
_PayloadSize = Annotated[
    int, PlainValidator(_int_range(MIN_PROBE_SIZE, DEFAULT_PAYLOAD_SIZE_LIMIT))
]
_Keepalive = Annotated[
    int, PlainValidator(_int_range(1, 65535, zero_hint="; leave the key out to disable it"))
]
_Table = Annotated[int | str, PlainValidator(_v_table)]
_Fwmark = Annotated[int, PlainValidator(_v_fwmark)]
_DnsEntry = Annotated[str, PlainValidator(_v_dns_entry)]


class _Schema(BaseModel):
    """Unknown keys are errors: TOML has no schema of its own, and a misspelt optional key
    (``psk_flie``) would otherwise silently mean 'not set'."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class InterfaceSchema(_Schema):
    """The ``[interface]`` table, as written (paths not yet resolved, files not yet read)."""

    name: _IfName | None = None
    """Defaults to the config file's name without ``.toml`` (as wg-quick does)."""
    private_key: _FilePath
    listen: _Listen = SocketAddress(DEFAULT_LISTEN_HOST, DEFAULT_LISTEN_PORT)
    address: list[_IfAddress]
    mtu: _Mtu = None
    key_update_interval: _Seconds = DEFAULT_KEY_UPDATE_INTERVAL
    keepalive_timeout: _Seconds = DEFAULT_KEEPALIVE_TIMEOUT
    control_socket: _SocketPath | None = None
    user: _UserName | None = None
    payload_size_limit: _PayloadSize | None = None
    offload: StrictBool = True
    metrics_listen: _MetricsListen | None = None
    table: _Table = TABLE_AUTO
    fwmark: _Fwmark | None = None
    dns: list[_DnsEntry] = Field(default_factory=list)
    """Off by default: Prometheus metrics over HTTP only when an address is written."""


class PeerSchema(_Schema):
    """One ``[[peer]]`` table, as written."""

    name: _PeerName
    public_key: _KeyText
    endpoint: _Endpoint | None = None
    allowed_ips: list[_Network]
    psk_file: _FilePath | None = None
    persistent_keepalive: _Keepalive | None = None


class ConfigSchema(_Schema):
    """The whole file: ``[interface]`` and any number of ``[[peer]]`` tables."""

    interface: InterfaceSchema
    peer: list[PeerSchema] = Field(default_factory=list)


# --- resolved configuration ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InterfaceConfig:
    """The local side, ready to use.  Field names are the TOML keys, so that a diff or an
    error names what the administrator wrote."""

    name: str
    private_key: Path
    """Absolute path of the key file or identity directory (the loaded key is
    ``Config.identity``)."""
    listen: SocketAddress
    """Always an IP literal; one UDP socket on it serves every peer."""
    address: tuple[IPInterface, ...]
    """In file order: the first address of each family is the preferred source."""
    mtu: int | None
    """None means "auto": derived by the daemon from the underlay path and the overhead."""
    key_update_interval: float
    keepalive_timeout: float
    control_socket: Path
    user: str | None
    payload_size_limit: int | None
    """None: derived per peer from the underlay MTU toward its endpoint."""
    offload: bool
    """Carry whole TCP segments between secureiod peers (TUN TSO; see ``daemon/offload.py``)."""
    metrics_listen: SocketAddress | None
    """Where Prometheus metrics are served over HTTP (``daemon/metrics.py``); None: off."""
    table: int | str = TABLE_AUTO
    """``TABLE_AUTO``, ``TABLE_OFF`` or a routing table number (254 for "main")."""
    fwmark: int | None = None
    """The UDP socket's firewall mark; None: chosen by the daemon when ``table`` is
    "auto" (the policy table's number), else no mark."""
    dns: tuple[str, ...] = ()
    """DNS servers (IP literals) and search domains for this link, set through
    systemd-resolved while the daemon runs."""


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """One peer, ready to use; compares by what matters to the tunnel."""

    name: str
    public_key: PublicKey
    allowed_ips: tuple[IPNetwork, ...]
    """Sorted (IPv4 first, then by address and prefix length), so that reordering the list
    in the file is not a change on reload."""
    endpoint: SocketAddress | None = None
    psk: bytes | None = field(default=None, repr=False)
    """The pre-shared key: the file's bytes with one trailing newline removed."""
    psk_file: Path | None = field(default=None, compare=False)
    """Where ``psk`` came from; moving the file is not a change, its content is."""
    persistent_keepalive: int | None = None

    @property
    def endpoint_host(self) -> str | None:
        """An IP literal (IPv6 without brackets) or a DNS name for the daemon to resolve."""
        return self.endpoint.host if self.endpoint is not None else None

    @property
    def endpoint_port(self) -> int | None:
        return self.endpoint.port if self.endpoint is not None else None


@dataclass(frozen=True, slots=True)
class Config:
    """A loaded, fully checked configuration: what ``load_config`` returns."""

    interface: InterfaceConfig
    identity: Identity
    peers: tuple[PeerConfig, ...]
    """In file order; names, public keys and allowed_ips are unique across peers."""
    path: Path = field(compare=False)
    """The file it was loaded from (absolute); not part of equality."""

    @property
    def public_key(self) -> PublicKey:
        return self.identity.public_key

    def peers_by_name(self) -> dict[str, PeerConfig]:
        return {peer.name: peer for peer in self.peers}

    def peers_by_key(self) -> dict[PublicKey, PeerConfig]:
        return {peer.public_key: peer for peer in self.peers}


# --- loading -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Problem:
    loc: _Loc
    message: str


def _too_large(shown: str, size: int) -> ConfigError:
    return ConfigError(
        f"{shown}: config file is too large ({size} bytes, the limit is {_MAX_CONFIG_SIZE} "
        "bytes, about 12,000 peers); trim comments or split the peers over two interfaces"
    )


def _read_config_text(path: Path, shown: str) -> str:
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"{shown}: config file is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{shown}: config file is not a regular file")
        if info.st_size > _MAX_CONFIG_SIZE:
            raise _too_large(shown, info.st_size)
        with path.open("rb") as f:  # bounded: the file may have grown since the stat
            data = f.read(_MAX_CONFIG_SIZE + 1)
        if len(data) > _MAX_CONFIG_SIZE:
            raise _too_large(shown, len(data))
    except FileNotFoundError:
        raise ConfigError(f"{shown}: config file does not exist") from None
    except PermissionError:
        raise ConfigError(f"{shown}: cannot read the config file: permission denied") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        why = getattr(exc, "strerror", None) or exc
        raise ConfigError(f"{shown}: cannot read the config file: {why}") from None
    try:
        # "utf-8-sig": a byte-order mark in front (Windows Notepad writes one) is not text.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{shown}: config file is not UTF-8 text (bad byte at offset {exc.start})"
        ) from None


def reload_config(path: str | os.PathLike[str], running: Config) -> Config:
    """``load_config`` for a reload: the running daemon's identity stands in for a private
    key file at the same path that can no longer be read (after ``--user`` the daemon
    may not read a root-owned key, and it need not: an unchanged key needs no re-read). A
    key file that reads differently still shows up as a change that needs a restart."""
    return load_config(path, running=running)


def load_config(path: str | os.PathLike[str], *, running: Config | None = None) -> Config:
    """Read, validate and resolve the config file at ``path``.

    Relative paths inside the file (``private_key``, ``public_key`` files, ``psk_file``) are
    relative to the file's directory, so a config directory can be moved as a whole.  Raises
    ``ConfigError`` (one line) for every problem, including unreadable key files.
    """
    shown = os.fspath(path)
    text = _read_config_text(Path(path), shown)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{shown}: invalid TOML: {exc}") from None
    try:
        schema = ConfigSchema.model_validate(raw)
    except ValidationError as exc:
        errors = [_translate(error) for error in exc.errors(include_url=False)]
        raise _config_error(shown, raw, errors) from None
    problems: list[_Problem] = []
    config = _resolve(schema, Path(os.path.abspath(path)), problems, running)
    if problems:
        raise _config_error(shown, raw, problems)
    assert config is not None  # _resolve returns None only with a problem recorded
    logger.debug(
        "loaded %s: interface %s, %d peers", shown, config.interface.name, len(config.peers)
    )
    return config


def _config_error(shown: str, raw: dict[str, Any], problems: list[_Problem]) -> ConfigError:
    """Order problems as they appear in the file, so the one shown is the first one an
    administrator reading from the top would meet."""
    labels = _peer_labels(raw.get("peer"))
    ordered = sorted(problems, key=lambda p: _position(raw, p.loc))
    lines = []
    for problem in ordered:
        where = _format_loc(problem.loc, labels)
        lines.append(
            f"{shown}: {where}: {problem.message}" if where else f"{shown}: {problem.message}"
        )
    message = lines[0]
    if len(lines) > 1:
        more = len(lines) - 1
        message += f" (and {more} more error{'s' if more > 1 else ''})"
    return ConfigError(message, problems=lines)


def _peer_labels(peers: object) -> list[str]:
    """``peer "b"`` for a peer with a valid name that is the first to use it, ``peer[2]``
    otherwise: a label must point at exactly one table."""
    labels: list[str] = []
    if not isinstance(peers, list):
        return labels
    seen: set[str] = set()
    for index, item in enumerate(peers):
        name = item.get("name") if isinstance(item, dict) else None
        if isinstance(name, str) and _PEER_NAME_RE.fullmatch(name) and name not in seen:
            seen.add(name)
            labels.append(f'peer "{name}"')
        else:
            labels.append(f"peer[{index}]")
    return labels


def _format_loc(loc: _Loc, labels: Sequence[str]) -> str:
    out = ""
    for depth, part in enumerate(loc):
        if isinstance(part, int):
            if depth == 1 and loc[0] == "peer":
                out = labels[part] if 0 <= part < len(labels) else f"peer[{part}]"
            else:
                out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return _one_line(out)


def _position(raw: object, loc: _Loc) -> tuple[int, ...]:
    """Where ``loc`` is in the file: TOML tables keep their keys in file order.  Keys that
    are missing sort after the keys of their table."""
    position: list[int] = []
    node = raw
    for part in loc:
        if isinstance(node, dict):
            keys = list(node)
            position.append(keys.index(part) if part in node else len(keys))
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int):
            position.append(part)
            node = node[part] if 0 <= part < len(node) else None
        else:
            position.append(0)
            node = None
    return tuple(position)


# WireGuard's spellings, so that a converted wg-quick file gets a useful hint.
_KEY_ALIASES: Final = {
    "privatekey": "private_key",
    "publickey": "public_key",
    "listenport": "listen",
    "addresses": "address",
    "allowedips": "allowed_ips",
    "presharedkey": "psk_file",
    "psk": "psk_file",
    "persistentkeepalive": "persistent_keepalive",
    "peers": "peer",
}


def _known_keys(loc: _Loc) -> Iterable[str]:
    if len(loc) == 1:
        return ConfigSchema.model_fields
    if len(loc) == 2 and loc[0] == "interface":
        return InterfaceSchema.model_fields
    if len(loc) == 3 and loc[0] == "peer":
        return PeerSchema.model_fields
    return ()


def _suggest(loc: _Loc) -> str:
    key = str(loc[-1])
    known = list(_known_keys(loc))
    normal = key.lower().replace("-", "_")
    guess = _KEY_ALIASES.get(normal.replace("_", ""))
    if guess is None:
        close = difflib.get_close_matches(normal, known, n=1, cutoff=0.6)
        guess = close[0] if close else None
    return f"; did you mean {guess}?" if guess in known and guess != key else ""


def _translate(error: Mapping[str, Any]) -> _Problem:
    """Turn one pydantic error into our words: pydantic's own ('Input should be a valid
    dictionary or instance of PeerSchema') speak of Python, not of the TOML file."""
    loc: _Loc = tuple(error["loc"])
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        message = "unknown key" + _suggest(loc)
    elif kind == "missing":
        message = (
            "missing required table; add an [interface] section"
            if loc == ("interface",)
            else "missing required key"
        )
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        message = f"expected a table, got {_describe(value)}"
    elif kind == "list_type":
        message = f"expected an array, got {_describe(value)}"
        if loc == ("peer",) and isinstance(value, dict):
            message += "; write each peer as [[peer]] (double brackets)"
        elif isinstance(value, str):
            message += f"; write [{_quote(value)}]"
    elif kind == "value_error":
        message = str(error.get("ctx", {}).get("error", error["msg"]))
    else:  # not expected with our validators; keep pydantic's text rather than lose it
        message = _lower_first(error["msg"])
    return _Problem(loc, message)


# --- resolution ------------------------------------------------------------------------------


def _resolve_path(text: str, base: Path) -> Path:
    path = Path(text)
    return path if path.is_absolute() else base / path


def _resolve(
    schema: ConfigSchema, path: Path, problems: list[_Problem], running: Config | None = None
) -> Config | None:
    """Everything that needs more than one value, or a file: collects every problem, so
    that one run of ``--check`` counts them all."""
    base = path.parent
    interface = _resolve_interface(schema.interface, path, problems)
    identity = _load_own_identity(schema.interface.private_key, base, problems, running)
    peers: list[PeerConfig | None] = [
        _resolve_peer(index, peer, base, problems) for index, peer in enumerate(schema.peer)
    ]
    _check_peer_names(schema.peer, problems)
    _check_public_keys(peers, identity, problems)
    _check_allowed_ips(schema.peer, problems)
    _check_endpoint_families(schema.peer, schema.interface.listen, problems)
    if interface is None or identity is None or problems:
        return None
    return Config(
        interface=interface,
        identity=identity,
        peers=tuple(peer for peer in peers if peer is not None),
        path=path,
    )


def _resolve_interface(
    schema: InterfaceSchema, path: Path, problems: list[_Problem]
) -> InterfaceConfig | None:
    name = schema.name
    if name is None:
        name = path.stem
        problem = _ifname_problem(name)
        if problem is not None:
            problems.append(
                _Problem(
                    ("interface", "name"),
                    f"missing required key, and the file name cannot stand in for it: {problem}",
                )
            )
            return None
    ipv6 = next((a for a in schema.address if a.version == 6), None)
    if schema.mtu is not None and schema.mtu < MIN_IPV6_MTU and ipv6 is not None:
        problems.append(
            _Problem(
                ("interface", "mtu"),
                f"{schema.mtu} is below {MIN_IPV6_MTU}, the minimum for IPv6, and address "
                f'{ipv6} is IPv6; raise mtu to at least {MIN_IPV6_MTU} or use "auto"',
            )
        )
    first_index: dict[IPAddress, int] = {}
    for index, address in enumerate(schema.address):
        if address.ip in first_index:
            problems.append(
                _Problem(
                    ("interface", "address", index),
                    f"{address.ip} is listed twice (also address[{first_index[address.ip]}])",
                )
            )
        first_index.setdefault(address.ip, index)
    if schema.user is not None:
        try:
            pwd.getpwnam(schema.user)
        except KeyError:
            problems.append(_Problem(("interface", "user"), f"no such user {_quote(schema.user)}"))
    control_socket = (
        Path(schema.control_socket)
        if schema.control_socket is not None
        else control_socket_path(name)
    )
    return InterfaceConfig(
        name=name,
        private_key=_resolve_path(schema.private_key, path.parent),
        listen=schema.listen,
        address=tuple(schema.address),
        mtu=schema.mtu,
        key_update_interval=schema.key_update_interval,
        keepalive_timeout=schema.keepalive_timeout,
        control_socket=control_socket,
        user=schema.user,
        payload_size_limit=schema.payload_size_limit,
        offload=schema.offload,
        metrics_listen=schema.metrics_listen,
        table=schema.table,
        fwmark=schema.fwmark,
        dns=tuple(schema.dns),
    )


def _load_own_identity(
    text: str, base: Path, problems: list[_Problem], running: Config | None = None
) -> Identity | None:
    path = _resolve_path(text, base)
    if (
        running is not None
        and running.interface.private_key == path
        and os.path.exists(path)
        and not os.access(path, os.R_OK)
    ):
        return running.identity
    try:
        return load_identity(path)
    except (SecureioError, OSError, ValueError) as exc:
        message = str(exc)
        if not os.path.lexists(path):
            message += f"; create it with: secureioctl genkey {path}"
        problems.append(_Problem(("interface", "private_key"), message))
        return None


_INLINE_SOURCE: Final = "<inline>"
_BASE64_KEY_RE: Final = re.compile(r"[A-Za-z0-9+/]{43}=")
_BASE64_LIKE_RE: Final = re.compile(r"[A-Za-z0-9+/]{40,}={0,2}")
_SSH_TYPE_RE: Final = re.compile(r"(ssh-|ecdsa-|sk-)\S*")


def _looks_inline(text: str, base: Path) -> bool:
    """The key itself rather than a path to it.  Same rule as ``resolve_public_key`` (PEM,
    ``ssh-...`` line, base64), except that base64 of a wrong length also counts as a key when
    no file has that name: a mistyped key should say 'must be 32 bytes', not 'no such file'."""
    stripped = text.strip()
    if "-----BEGIN " in stripped:
        return True
    words = stripped.split()
    if _BASE64_KEY_RE.fullmatch(stripped) or (words and _SSH_TYPE_RE.fullmatch(words[0])):
        return True
    return (
        _BASE64_LIKE_RE.fullmatch(stripped) is not None
        and not stripped.startswith("/")
        and not os.path.lexists(base / stripped)
    )


def _resolve_public_key(text: str, base: Path) -> PublicKey:
    """Like ``resolve_public_key``, but a relative path is relative to the config file."""
    if _looks_inline(text, base):
        try:
            return parse_public_key(text, source=_INLINE_SOURCE)
        except IdentityError as exc:
            raise IdentityError(str(exc).removeprefix(f"{_INLINE_SOURCE}: ")) from None
    return load_public_key(_resolve_path(text.strip(), base))


def _resolve_peer(
    index: int, schema: PeerSchema, base: Path, problems: list[_Problem]
) -> PeerConfig | None:
    ok = True
    public_key: PublicKey | None = None
    try:
        public_key = _resolve_public_key(schema.public_key, base)
    except (SecureioError, OSError, ValueError) as exc:
        problems.append(_Problem(("peer", index, "public_key"), str(exc)))
        ok = False
    psk: bytes | None = None
    psk_file: Path | None = None
    if schema.psk_file is not None:
        psk_file = _resolve_path(schema.psk_file, base)
        try:
            psk = read_psk_file(psk_file)
        except SecretFileError as exc:
            problems.append(_Problem(("peer", index, "psk_file"), str(exc)))
            ok = False
        else:
            if len(psk) < _WEAK_PSK_SIZE:
                logger.warning(
                    "peer %s: the pre-shared key in %s is only %d bytes; "
                    "use at least 32 random bytes",
                    schema.name,
                    psk_file,
                    len(psk),
                )
    if not ok or public_key is None:
        return None
    return PeerConfig(
        name=schema.name,
        public_key=public_key,
        allowed_ips=tuple(sorted(schema.allowed_ips, key=_network_sort_key)),
        endpoint=schema.endpoint,
        psk=psk,
        psk_file=psk_file,
        persistent_keepalive=schema.persistent_keepalive,
    )


def _network_sort_key(network: IPNetwork) -> tuple[int, int, int]:
    return network.version, int(network.network_address), network.prefixlen


def _check_peer_names(peers: Sequence[PeerSchema], problems: list[_Problem]) -> None:
    first: dict[str, int] = {}
    for index, peer in enumerate(peers):
        if peer.name in first:
            problems.append(
                _Problem(
                    ("peer", index, "name"),
                    f"{_quote(peer.name)} is also the name of an earlier peer "
                    f"(peer[{first[peer.name]}]); peer names must be unique",
                )
            )
        first.setdefault(peer.name, index)


def _check_public_keys(
    peers: Sequence[PeerConfig | None], identity: Identity | None, problems: list[_Problem]
) -> None:
    """One key pair per peer: the daemon finds a peer by the key that signs its handshake,
    so two peers with one key could not be told apart, and our own key would be us."""
    first: dict[PublicKey, int] = {}
    for index, peer in enumerate(peers):
        if peer is None:
            continue
        loc = ("peer", index, "public_key")
        if identity is not None and peer.public_key == identity.public_key:
            problems.append(
                _Problem(
                    loc,
                    "this is our own public key (of interface.private_key); give the peer's "
                    "key (run secureioctl pubkey on the peer)",
                )
            )
        elif peer.public_key in first:
            other = peers[first[peer.public_key]]
            assert other is not None
            problems.append(
                _Problem(
                    loc,
                    f'same public key as peer "{other.name}"; every peer needs its own key pair',
                )
            )
        first.setdefault(peer.public_key, index)


def _check_allowed_ips(peers: Sequence[PeerSchema], problems: list[_Problem]) -> None:
    """One prefix, one peer: the same network on two peers is an error naming both,
    since which of them got its traffic would depend on the order they were added. Nested
    prefixes on different peers are fine and resolved by longest prefix, as in WireGuard
    (an exit peer with 0.0.0.0/0 beside site peers with their own networks), for packets
    out and for the check of a packet's inner source. A network listed twice in one
    peer's list is a slip, also refused."""
    labels = _peer_labels([{"name": peer.name} for peer in peers])
    owner: dict[IPNetwork, tuple[int, int]] = {}
    for peer_index, peer in enumerate(peers):
        seen: dict[IPNetwork, int] = {}
        for item_index, network in enumerate(peer.allowed_ips):
            loc = ("peer", peer_index, "allowed_ips", item_index)
            if network in seen:
                problems.append(
                    _Problem(loc, f"{network} is listed twice (also allowed_ips[{seen[network]}])")
                )
                continue
            seen[network] = item_index
            first = owner.get(network)
            if first is not None:
                problems.append(
                    _Problem(
                        loc,
                        f"{network} is also in {labels[first[0]]}.allowed_ips[{first[1]}]; "
                        "a prefix is routed to one peer only: remove it from one of them "
                        "(a narrower or wider prefix is fine, the longest prefix wins)",
                    )
                )
                continue
            owner[network] = (peer_index, item_index)


def _check_endpoint_families(
    peers: Sequence[PeerSchema], listen: SocketAddress, problems: list[_Problem]
) -> None:
    """Every peer is reached through the one listening socket, so an endpoint of a family
    that socket cannot send to would fail at run time, long after the config was 'OK'."""
    listen_ip = listen.ip
    assert listen_ip is not None
    for index, peer in enumerate(peers):
        endpoint_ip = peer.endpoint.ip if peer.endpoint is not None else None
        if endpoint_ip is None:
            continue
        if endpoint_ip.version == 6 and listen_ip.version == 4:
            problems.append(
                _Problem(
                    ("peer", index, "endpoint"),
                    f"{peer.endpoint} is IPv6 but interface.listen {listen} is an IPv4 "
                    f'socket; listen on "[::]:{listen.port}" to reach IPv6 peers',
                )
            )
        elif endpoint_ip.version == 4 and listen_ip.version == 6 and not listen_ip.is_unspecified:
            problems.append(
                _Problem(
                    ("peer", index, "endpoint"),
                    f"{peer.endpoint} is IPv4 but interface.listen {listen} is bound to an "
                    f'IPv6 address; listen on "[::]:{listen.port}" or an IPv4 address',
                )
            )


# --- reload --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerChange:
    """A peer present before and after a reload whose settings differ."""

    old: PeerConfig
    new: PeerConfig
    fields: frozenset[str]
    """Which of ``public_key``, ``allowed_ips``, ``endpoint``, ``psk``,
    ``persistent_keepalive`` differ: a new key or PSK needs a new session, new allowed_ips
    only new routes."""


@dataclass(frozen=True, slots=True)
class ConfigDiff:
    """What a reload changes.  Peers are matched by name: a renamed peer is removed and
    added, which is what the daemon must do anyway (its session is keyed by the old name's
    state).  When an allowed_ips network moves between peers, apply removals and the old
    sides of changes before additions."""

    added: Mapping[str, PeerConfig]
    removed: Mapping[str, PeerConfig]
    changed: Mapping[str, PeerChange]
    unchanged: Mapping[str, PeerConfig]
    """The new config's objects (equal to the old ones)."""
    interface_changed: frozenset[str]
    """Names of ``[interface]`` keys whose value differs (``private_key`` also when the key
    file's content changed)."""

    @property
    def has_changes(self) -> bool:
        return bool(self.added or self.removed or self.changed or self.interface_changed)


def diff_config(old: Config, new: Config) -> ConfigDiff:
    """Compare two loaded configs, for a reload (SIGHUP or ``secureioctl reload``)."""
    old_peers = old.peers_by_name()
    new_peers = new.peers_by_name()
    changed: dict[str, PeerChange] = {}
    unchanged: dict[str, PeerConfig] = {}
    for name, peer in new_peers.items():
        before = old_peers.get(name)
        if before is None:
            continue
        fields = _changed_fields(before, peer)
        if fields:
            changed[name] = PeerChange(before, peer, fields)
        else:
            unchanged[name] = peer
    interface_changed = set(_changed_fields(old.interface, new.interface))
    if old.identity != new.identity:
        interface_changed.add("private_key")
    return ConfigDiff(
        added={name: peer for name, peer in new_peers.items() if name not in old_peers},
        removed={name: peer for name, peer in old_peers.items() if name not in new_peers},
        changed=changed,
        unchanged=unchanged,
        interface_changed=frozenset(interface_changed),
    )


def _changed_fields(
    old: InterfaceConfig | PeerConfig, new: InterfaceConfig | PeerConfig
) -> frozenset[str]:
    return frozenset(
        f.name
        for f in dataclasses.fields(old)
        if f.compare and getattr(old, f.name) != getattr(new, f.name)
    )


def restart_required(diff: ConfigDiff) -> list[str]:
    """The changed interface keys a reload cannot apply (see ``RESTART_INTERFACE_FIELDS``),
    in file-schema order; empty when a reload is enough."""
    return [
        name
        for name in _INTERFACE_FIELD_ORDER
        if name in diff.interface_changed and name in RESTART_INTERFACE_FIELDS
    ]


# --- --check -------------------------------------------------------------------------------


def check_config(
    path: str | os.PathLike[str], *, host_routes: Sequence[RouteInfo] | None = None
) -> str:
    """Load ``path`` and summarise it for ``secureiod --check``: a first line that says the
    file is usable, then one line for the interface and one per peer (like ``wg show``),
    then one ``warning:`` line for each route that would capture the daemon's own
    datagrams or a connected prefix of this host (``daemon/capture.py``), judged against
    ``host_routes`` (default: this host's routing tables, when they can be read).
    Raises ``ConfigError`` exactly as ``load_config`` does."""
    from .daemon.capture import capture_warnings, read_host_routes

    config = load_config(path)
    interface = config.interface
    count = len(config.peers)
    lines = [
        f"{os.fspath(path)}: OK: interface {interface.name}, "
        f"{count} peer{'' if count == 1 else 's'}"
    ]
    addresses = ", ".join(str(a) for a in interface.address) or "none"
    mtu = "auto" if interface.mtu is None else str(interface.mtu)
    lines.append(
        f"  interface {interface.name}: public key {config.public_key}, "
        f"listen {interface.listen}, address {addresses}, mtu {mtu}"
    )
    for peer in config.peers:
        parts = [f"public key {peer.public_key}"]
        if peer.endpoint is not None:
            parts.append(f"endpoint {peer.endpoint}")
        parts.append("allowed_ips " + (", ".join(str(n) for n in peer.allowed_ips) or "none"))
        if peer.psk is not None:
            parts.append("psk")
        if peer.persistent_keepalive is not None:
            parts.append(f"keepalive {peer.persistent_keepalive}s")
        lines.append(f'  peer "{peer.name}": ' + ", ".join(parts))
    routes = read_host_routes() if host_routes is None else host_routes
    lines += [f"  warning: {text}" for text in capture_warnings(config, routes)]
    return "\n".join(lines)
