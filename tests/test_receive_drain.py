"""``ReceivePath.drain`` writes the packets a session accepted in runs (``_write_run``: one
``write_many`` each) and must keep what per-packet writes gave: packets and handler events
in order, each packet behind the right header, exact counters when the kernel refuses one,
and no event lost when the TUN dies while a run is written (review 8b)."""

from __future__ import annotations

import collections
import ipaddress
import struct
from types import SimpleNamespace
from typing import Any

import pytest
from fakes import FakeTun, SimLoop, VirtualClock

from secureiod.daemon.allowed_ips import AllowedIPs
from secureiod.daemon.offload import CAPS_TYPE, VNET_TYPE, ZERO_HDR
from secureiod.daemon.peer import DATA_TYPE
from secureiod.daemon.receive import ReceivePath
from secureiod.secureio.events import MessageReceived
from secureiod.tun import TunError


def v4(dst_last: int, size: int = 28) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, size, 0, 0, 64, 17, 0,
        ipaddress.IPv4Address("198.19.0.2").packed,
        ipaddress.IPv4Address(f"198.19.0.{dst_last}").packed,
    )  # fmt: skip
    return header + bytes(size - 20)


class Session:
    """The two calls drain makes of a session's event queue."""

    def __init__(self, events: list[Any]) -> None:
        self.queue = collections.deque(events)

    def take_events(self) -> list[Any]:
        out = list(self.queue)
        self.queue.clear()
        return out

    def put_back_events(self, events: list[Any]) -> None:
        self.queue.extendleft(reversed(events))


def rig(vnet: bool = False) -> tuple[ReceivePath, FakeTun, SimpleNamespace, list[Any]]:
    """A receive path over a FakeTun whose writes and handler calls land in one list."""
    tun = FakeTun(SimLoop(VirtualClock()), vnet_hdr=vnet)
    peer = SimpleNamespace(
        counters=SimpleNamespace(drops=collections.Counter(), rx_packets=0, rx_bytes=0),
        session=None,
    )
    router: AllowedIPs[Any] = AllowedIPs()
    router.insert(ipaddress.ip_network("198.19.0.0/16"), peer)
    log: list[Any] = []
    receive = ReceivePath(
        tun,
        SimpleNamespace(recv_runs=None),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        router,
        set(),
        None,  # type: ignore[arg-type]
        on_caps=lambda p, payload: log.append(("caps", payload)),
        on_event=lambda p, ev, now: log.append(("event", ev)),
        yield_cpu=lambda: None,
    )
    real = tun._write

    def write(data: bytes) -> bool:
        log.append(("tun", data))
        return real(data)

    tun._write = write  # type: ignore[method-assign]
    return receive, tun, peer, log


def test_packets_and_events_keep_their_order() -> None:
    receive, _, peer, log = rig()
    state = SimpleNamespace(name="a state change")
    p1, p2, p3, p4 = v4(1), v4(3), v4(4), v4(5)
    peer.session = Session(
        [
            MessageReceived(DATA_TYPE, p1),
            MessageReceived(DATA_TYPE, p2),
            state,
            MessageReceived(DATA_TYPE, p3),
            MessageReceived(CAPS_TYPE, b"caps"),
            MessageReceived(DATA_TYPE, p4),
        ]
    )
    receive.drain(peer, 0.0)  # type: ignore[arg-type]
    assert log == [
        ("tun", p1),
        ("tun", p2),
        ("event", state),
        ("tun", p3),
        ("caps", b"caps"),
        ("tun", p4),
    ]
    assert peer.counters.rx_packets == 4
    assert peer.counters.rx_bytes == 4 * 28


def test_each_kind_of_packet_gets_its_own_header() -> None:
    """On a device with ``vnet_hdr``, a plain packet goes behind a zero header and an
    offload message (its own header first) as it is, however the two alternate."""
    receive, tun, peer, _ = rig(vnet=True)
    plain = [v4(1), v4(3, 40)]
    offloaded = [ZERO_HDR + v4(4, 60), ZERO_HDR + v4(5, 80)]
    peer.session = Session(
        [
            MessageReceived(DATA_TYPE, plain[0]),
            MessageReceived(VNET_TYPE, offloaded[0]),
            MessageReceived(VNET_TYPE, offloaded[1]),
            MessageReceived(DATA_TYPE, plain[1]),
        ]
    )
    receive.drain(peer, 0.0)  # type: ignore[arg-type]
    assert tun.written == [ZERO_HDR + plain[0], offloaded[0], offloaded[1], ZERO_HDR + plain[1]]
    assert peer.counters.rx_packets == 4
    assert peer.counters.rx_bytes == 28 + 60 + 80 + 40  # headers not counted


def test_a_refused_packet_mid_run_is_counted_alone() -> None:
    receive, tun, peer, _ = rig()
    tun.refuse_writes = lambda data: data[19] == 9
    packets = [v4(1, 40), v4(9, 60), v4(3, 80)]
    peer.session = Session([MessageReceived(DATA_TYPE, p) for p in packets])
    receive.drain(peer, 0.0)  # type: ignore[arg-type]
    assert tun.written == [packets[0], packets[2]]
    assert peer.counters.rx_packets == 2
    assert peer.counters.rx_bytes == 40 + 80
    assert receive.tun_write_errors == 1


@pytest.mark.parametrize("between", ["event", "caps"])
def test_a_dead_tun_loses_no_event(between: str) -> None:
    """The run before a handler's event is written first; when that write finds the TUN
    dead, the event and everything after it stay queued for the next drain."""
    receive, tun, peer, log = rig()
    middle = SimpleNamespace(name="a state change") if between == "event" else None
    if middle is None:
        middle = MessageReceived(CAPS_TYPE, b"caps")
    after = MessageReceived(DATA_TYPE, v4(3))
    peer.session = Session([MessageReceived(DATA_TYPE, v4(1)), middle, after])
    tun.closed = True
    with pytest.raises(TunError):
        receive.drain(peer, 0.0)  # type: ignore[arg-type]
    assert list(peer.session.queue) == [middle, after]
    assert [entry for entry in log if entry[0] != "tun"] == []
