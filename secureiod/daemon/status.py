"""What ``secureioctl status``, ``peers`` and ``showconf`` show, and the line systemd shows."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from ..endpoint import format_endpoint
from ..secureio.events import SessionState
from ..secureio.packet import crypto_backend
from .peer import Peer

if TYPE_CHECKING:
    from ..config import Config
    from .device import Device


def status_line(peers: Iterable[Peer]) -> str:
    """The one line ``systemctl status`` shows (sd_notify STATUS=)."""
    total = up = 0
    for p in peers:
        total += 1
        up += p.state == SessionState.ESTABLISHED
    return f"{up}/{total} peers established"


def device_status(device: Device, now: float) -> dict[str, Any]:
    """The ``status`` answer: the interface and device-wide counters (JSON-able)."""
    config = device.lifecycle.config
    iface = config.interface
    udp = device.udp
    peers = device.peers.values()
    demux = device.demux.stats
    return {
        "interface": device.ifname,
        "public_key": str(config.identity.public_key),
        "listen_port": udp.local_address[1],
        "listen": format_endpoint(udp.local_address),
        "mtu": device.routes.link_mtu,
        "mtu_mode": "auto" if iface.mtu is None else "fixed",
        "gso_max_size": device.routes.gso_max_size,
        "addresses": [str(a) for a in iface.address],
        "peers_total": len(device.peers),
        "peers_established": sum(1 for p in peers if p.state == SessionState.ESTABLISHED),
        "uptime": round(now - device.started_at, 3),
        "crypto": crypto_backend(),
        # None: lone packets take the Python path (no C build, or switched off)
        "lone_hop": device.lone.status() if device.lone is not None else None,
        "no_route": device.send.no_route,
        "unknown_source": demux.unknown_source,
        "identify_rate_limited": demux.rate_limited,
        "demux": dataclasses.asdict(demux),
        "loop": {
            # a port need not count these (LoopPort does not require them): None then
            "wakeups": getattr(device.loop, "wakeups", None),
            "callback_failures": getattr(device.loop, "callback_failures", None),
        },
        "roamed": sum(p.counters.roams for p in peers),
        "tun_write_errors": device.receive.tun_write_errors,
        "receive_yields": device.receive.yields,
        "reloads": device.reloader.reloads,
        "reloads_refused": device.reloader.refused,
        "control": dataclasses.asdict(device.control.stats) if device.control else None,
        "udp": {
            "rx_datagrams": udp.stats.rx_datagrams,
            "tx_datagrams": udp.stats.tx_datagrams,
            "tx_dropped": udp.stats.tx_dropped,
            "tx_too_big": udp.stats.tx_too_big,
            "tx_errors": udp.stats.tx_errors,
        },
    }


# --- showconf ------------------------------------------------------------------------------

_AUTO_WHEN_NONE: Final = frozenset({"mtu"})
"""Interface keys whose None is spelt out ("auto") rather than left out."""


def running_config_toml(config: Config) -> str:
    """The running config as TOML that ``load_config`` reads back to an equal ``Config``
    (``secureioctl showconf``). Keys are the resolved fields, so defaults are spelt out and
    relative paths are absolute. Secrets appear as the paths of their files: the private
    key and ``psk_file``. A field marked ``repr=False`` (the PSK bytes) and anything of type
    ``bytes`` is never written, whatever its name, so a secret added later stays out too."""
    iface = config.interface
    lines = [
        _comment(f"secureiod running config of {iface.name}, loaded from {config.path}"),
        f"# public key: {config.public_key}",
        "# secrets are shown as the paths of their files, never their contents",
        "",
        "[interface]",
        *_toml_fields(iface, auto=_AUTO_WHEN_NONE),
    ]
    for peer in config.peers:
        lines += ["", "[[peer]]", *_toml_fields(peer)]
    return "\n".join(lines) + "\n"


def _toml_fields(obj: Any, auto: frozenset[str] = frozenset()) -> list[str]:
    lines = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not f.repr or isinstance(value, bytes | bytearray):
            continue
        if value is None:
            if f.name in auto:
                lines.append(f'{f.name} = "auto"')
            continue
        lines.append(f"{f.name} = {_toml_value(value)}")
    return lines


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} has no TOML spelling the config accepts")
        return repr(value)
    if isinstance(value, tuple | list | frozenset | set):
        items = sorted(value, key=str) if isinstance(value, frozenset | set) else value
        return "[" + ", ".join(_toml_value(v) for v in items) + "]"
    if isinstance(value, bytes | bytearray):
        raise TypeError("bytes are never written (secrets)")
    # Path, SocketAddress, PublicKey, IP networks and interfaces: their str() is the
    # spelling the config takes
    return _toml_string(str(value))


def _comment(text: str) -> str:
    """A comment line; a newline in a file name must not end it early."""
    return "# " + "".join(ch if ch.isprintable() else "?" for ch in text)


def _toml_string(text: str) -> str:
    """A TOML basic string: quote, backslash and control characters escaped (TOML has no
    raw DEL or C0 control in a basic string)."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        elif 0xD800 <= code <= 0xDFFF:  # a file name's undecodable byte: TOML cannot hold it
            out.append("\ufffd")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)
