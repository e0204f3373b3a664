"""What ``secureioctl status`` and ``peers`` show, and the line systemd shows."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..endpoint import format_endpoint
from ..secureio.events import SessionState
from .peer import Peer

if TYPE_CHECKING:
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
        "addresses": [str(a) for a in iface.address],
        "peers_total": len(device.peers),
        "peers_established": sum(1 for p in peers if p.state == SessionState.ESTABLISHED),
        "uptime": round(now - device.started_at, 3),
        "no_route": device.send.no_route,
        "unknown_source": demux.unknown_source,
        "identify_rate_limited": demux.rate_limited,
        "roamed": sum(p.counters.roams for p in peers),
        "tun_write_errors": device.receive.tun_write_errors,
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
