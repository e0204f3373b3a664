"""Batched TUN reads and writes (``secureiod.tunio``, C in ``_tunio.c``) on a real TUN.

Each kernel test runs in a forked child inside a fresh namespace (``call_in``), once with
the C functions and once with the pure-Python twin, and the two must agree: same packets in
the same order, same truncation, same errno reports, same ``TunStats``. IPv6 is off in the
namespace so the kernel queues nothing of its own (router solicitations, MLD) on the TUN:
what is read is exactly what the test sent.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fakes import FakeTun, SimLoop, VirtualClock
from netns_util import call_in, netns

from secureiod import tun as tun_module
from secureiod import tunio
from secureiod.netlink import Netlink
from secureiod.tun import VNET_HDR_SIZE, TunDevice, TunError

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="needs root and TUN"
)

TUN = "siotio0"
LOCAL = "198.19.0.1"
PEER = "198.19.0.2"
PORT = 7000
IMPLS = ["c", "python"]


@pytest.fixture
def ns() -> Iterator[str]:
    with netns() as name:
        yield name


def use(impl: str) -> None:
    """Make ``tunio`` (and so ``TunDevice``) use one implementation, in this process: only
    ever called in a forked child, so the test process keeps the default."""
    if impl == "c":
        assert tunio.ACCEL is not None
        tunio.read_many = tunio.ACCEL.read_many  # type: ignore[misc]
        tunio.write_many = tunio.ACCEL.write_many  # type: ignore[misc]
    else:
        tunio.read_many = tunio.py_read_many  # type: ignore[misc]
        tunio.write_many = tunio.py_write_many  # type: ignore[misc]


def ipv4_udp(src: str, dst: str, dport: int, payload: bytes) -> bytes:
    """An IPv4/UDP packet (UDP checksum 0: none, allowed over IPv4)."""
    udp = struct.pack("!HHHH", 5000, dport, 8 + len(payload), 0) + payload
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        0,
        0,
        64,
        17,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    total = sum(struct.unpack("!10H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return header[:10] + struct.pack("!H", ~total & 0xFFFF) + header[12:] + udp


def open_tun(*, vnet_hdr: bool = False, mtu: int | None = None) -> TunDevice:
    with open("/proc/sys/net/ipv6/conf/default/disable_ipv6", "w") as knob:
        knob.write("1")
    tun = TunDevice.open(TUN, vnet_hdr=vnet_hdr)
    with Netlink() as nl:
        nl.add_address(tun.name, ipaddress.ip_interface(f"{LOCAL}/24"))
        if mtu is not None:
            nl.set_mtu(tun.name, mtu)
        nl.set_up(tun.name)
    return tun


def send_through_tun(payloads: list[bytes]) -> None:
    """The kernel routes each datagram to PEER out of the TUN, in order."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        for payload in payloads:
            tx.sendto(payload, (PEER, 9))
    time.sleep(0.05)


def normalized(reads: dict[str, Any]) -> dict[str, Any]:
    """``read_many`` results with what differs between two runs zeroed: the IP ID and
    header checksum, the UDP source port and checksum (a new socket, a new port)."""

    def clean(packet: bytes) -> bytes:
        out = bytearray(packet)
        for start, end in ((4, 6), (10, 12), (20, 22), (26, 28)):
            out[start:end] = bytes(len(out[start:end]))
        return bytes(out)

    return {k: ([clean(p) for p in ps], total, code) for k, (ps, total, code) in reads.items()}


def udp_payload(packet: bytes, offset: int = 0) -> bytes:
    ihl = (packet[offset] & 0x0F) * 4
    return packet[offset + ihl + 8 :]


# --- children -------------------------------------------------------------------------------


def _read_exact(impl: str, vnet_hdr: bool, size: int, count: int) -> dict[str, Any]:
    use(impl)
    with open_tun(vnet_hdr=vnet_hdr) as tun:
        payloads = [i.to_bytes(4, "big") * (size // 4) for i in range(count)]
        send_through_tun(payloads)
        bufsize = 65535 + (VNET_HDR_SIZE if vnet_hdr else 0)
        packets, total, code = tunio.read_many(tun.fd, 256, bufsize)
        again = tunio.read_many(tun.fd, 256, bufsize)
        offset = VNET_HDR_SIZE if vnet_hdr else 0
        return {
            "payloads": payloads,
            "got": [udp_payload(p, offset) for p in packets],
            "headers": {p[:offset] for p in packets},
            "total": total,
            "lengths": sum(len(p) for p in packets),
            "code": code,
            "again": again,
        }


def _read_mixed_sizes(impl: str, vnet_hdr: bool) -> dict[str, Any]:
    """Short and long packets alternating, longer than the 1,500 bytes of the other tests
    (the C side packs short ones into its arena and moves on to a new chunk when a full
    buffer no longer fits): every packet whole, in order, whatever came before it; and a
    buffer shorter than a long packet cuts it."""
    use(impl)
    with open_tun(vnet_hdr=vnet_hdr, mtu=9000) as tun:
        sizes = [36, 6000, 1400, 2020, 2021, 8000, 36, 36, 3000, 1] * 8
        payloads = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
        send_through_tun(payloads)
        offset = VNET_HDR_SIZE if vnet_hdr else 0
        packets, total, code = tunio.read_many(tun.fd, 256, 9000 + offset)
        send_through_tun([b"x" * 5000, b"y" * 10])
        cut = tunio.read_many(tun.fd, 256, 3000)
        return {
            "payloads": payloads,
            "got": [udp_payload(p, offset) for p in packets],
            "total": total,
            "lengths": sum(len(p) for p in packets),
            "code": code,
            "cut": [len(p) for p in cut[0]],
        }


def _read_limits_and_truncation(impl: str) -> dict[str, Any]:
    use(impl)
    with open_tun() as tun:
        send_through_tun([bytes([i]) * 100 for i in range(10)])
        first = tunio.read_many(tun.fd, 4, 65535)
        cut = tunio.read_many(tun.fd, 1, 50)
        rest = tunio.read_many(tun.fd, 256, 65535)
        none = tunio.read_many(tun.fd, 0, 65535)
        return {"first": first, "cut": cut, "rest": rest, "none": none}


def _read_batch_stats(impl: str) -> dict[str, Any]:
    use(impl)
    with open_tun() as tun:
        send_through_tun([b"a" * 36, b"b" * 100, b"c" * 1000])
        packets = tun.read_batch()
        empty = tun.read_batch()
        return {"packets": packets, "empty": empty, "stats": tun.stats}


def _write_many(impl: str, vnet_hdr: bool) -> dict[str, Any]:
    use(impl)
    with open_tun(vnet_hdr=vnet_hdr) as tun:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
            rx.bind((LOCAL, PORT))
            rx.settimeout(2)
            good = [ipv4_udp(PEER, LOCAL, PORT, b"%03d" % i * 10) for i in range(40)]
            packets: list[Any] = list(good)
            packets.insert(3, b"\x00junk")  # not IPv4/IPv6: EINVAL
            packets.insert(10, bytearray(good[0][:0]))  # empty: EINVAL
            packets.insert(20, memoryview(b"\x70" + bytes(39)))  # version 7: EINVAL
            header = bytes(VNET_HDR_SIZE) if vnet_hdr else b""
            refused = tun.write_many(header, packets)
            received = [rx.recv(2048) for _ in good]
        return {
            "refused": refused,
            "received": received,
            "sent": [udp_payload(p) for p in good],
            "stats": tun.stats,
            "good_bytes": sum(len(header) + len(p) for p in good),
        }


def _write_many_raw_vs_parts(impl: str) -> dict[str, Any]:
    """write_many with an empty header on a vnet device: the packets carry their own."""
    use(impl)
    with open_tun(vnet_hdr=True) as tun, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind((LOCAL, PORT))
        rx.settimeout(2)
        packet = ipv4_udp(PEER, LOCAL, PORT, b"own header")
        refused = tun.write_many(b"", [bytes(VNET_HDR_SIZE) + packet])
        return {"refused": refused, "received": rx.recv(2048), "stats": tun.stats}


def _closed(impl: str) -> dict[str, Any]:
    use(impl)
    tun = open_tun()
    tun.close()
    out: dict[str, Any] = {}
    for what, call in (
        ("read", lambda: tun.read_batch()),
        ("write", lambda: tun.write_many(b"", [ipv4_udp(PEER, LOCAL, PORT, b"x")] * 3)),
    ):
        try:
            call()
            out[what] = "no error"
        except TunError as exc:
            out[what] = (str(exc), exc.errno)
    return out


# --- kernel tests ---------------------------------------------------------------------------


@needs_root
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("vnet_hdr", "size", "count"),
    [(False, 36, 150), (True, 36, 150), (False, 1400, 100), (True, 1400, 100)],
)
def test_read_many_returns_the_queued_packets_in_order_then_stops(
    ns: str, impl: str, vnet_hdr: bool, size: int, count: int
) -> None:
    # 150 small packets cross the C side's 64-packet chunks; 100 large ones its arena.
    result = call_in(ns, _read_exact, impl, vnet_hdr, size, count)
    assert result["got"] == result["payloads"]
    assert result["code"] == 0
    assert result["total"] == result["lengths"]
    assert result["again"] == ([], 0, 0)
    if vnet_hdr:
        assert all(len(h) == VNET_HDR_SIZE for h in result["headers"])


@needs_root
@pytest.mark.parametrize("vnet_hdr", [False, True])
def test_read_many_long_and_short_packets_alternating(ns: str, vnet_hdr: bool) -> None:
    results = {impl: call_in(ns, _read_mixed_sizes, impl, vnet_hdr) for impl in IMPLS}
    for result in results.values():
        assert result["got"] == result["payloads"]
        assert result["code"] == 0
        assert result["total"] == result["lengths"]
    assert (
        results["c"]["cut"]
        == results["python"]["cut"]
        == [
            3000,
            38 + (VNET_HDR_SIZE if vnet_hdr else 0),
        ]
    )


@needs_root
def test_read_many_c_and_python_agree_on_limits_and_truncation(ns: str) -> None:
    results = {impl: call_in(ns, _read_limits_and_truncation, impl) for impl in IMPLS}
    c = results["c"]
    assert normalized(c) == normalized(results["python"])
    packets, total, code = c["first"]
    assert [p[-100:] for p in packets] == [bytes([i]) * 100 for i in range(4)]
    assert (total, code) == (4 * 128, 0)
    cut, cut_total, _ = c["cut"]
    assert [len(p) for p in cut] == [50]
    assert cut_total == 50  # a packet longer than the buffer is cut, as readv does
    assert [p[-100:] for p in c["rest"][0]] == [bytes([i]) * 100 for i in range(5, 10)]
    assert c["none"] == ([], 0, 0)


@needs_root
@pytest.mark.parametrize("impl", IMPLS)
def test_read_batch_keeps_its_stats(ns: str, impl: str) -> None:
    result = call_in(ns, _read_batch_stats, impl)
    assert [udp_payload(p) for p in result["packets"]] == [b"a" * 36, b"b" * 100, b"c" * 1000]
    assert result["empty"] == []
    stats = result["stats"]
    assert stats.packets_read == 3
    assert stats.bytes_read == 3 * 28 + 36 + 100 + 1000
    assert stats.read_errors == {}


@needs_root
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("vnet_hdr", [False, True])
def test_write_many_delivers_and_counts_refused_packets(ns: str, impl: str, vnet_hdr: bool) -> None:
    result = call_in(ns, _write_many, impl, vnet_hdr)
    assert result["refused"] == [3, 10, 20]
    assert result["received"] == result["sent"]
    stats = result["stats"]
    assert stats.packets_written == 40
    assert stats.bytes_written == result["good_bytes"]
    assert stats.write_errors == {"EINVAL": 3}


@needs_root
@pytest.mark.parametrize("impl", IMPLS)
def test_write_many_with_empty_header_writes_packets_as_they_are(ns: str, impl: str) -> None:
    result = call_in(ns, _write_many_raw_vs_parts, impl)
    assert result["refused"] == []
    assert result["received"] == b"own header"
    assert result["stats"].bytes_written == VNET_HDR_SIZE + 28 + len(b"own header")


@needs_root
@pytest.mark.parametrize("impl", IMPLS)
def test_closed_device_raises_on_batched_read_and_write(ns: str, impl: str) -> None:
    result = call_in(ns, _closed, impl)
    for what in ("read", "write"):
        message, code = result[what]
        assert code == errno.EBADF
        assert "closed" in message


# --- without a namespace --------------------------------------------------------------------


def test_c_extension_is_built() -> None:
    """The install builds ``_tunio`` (setup.py); without it every TUN batch is Python."""
    assert tunio.ACCEL is not None
    assert tunio.read_many is tunio.ACCEL.read_many
    assert tunio.write_many is tunio.ACCEL.write_many


def test_pure_python_is_forced_by_the_environment() -> None:
    code = (
        "from secureiod import tunio; "
        "assert tunio.ACCEL is None; "
        "assert tunio.read_many is tunio.py_read_many; "
        "assert tunio.write_many is tunio.py_write_many"
    )
    env = {**os.environ, "SECUREIOD_PURE_PYTHON": "1"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)


def implementations() -> list[tuple[Any, Any]]:
    assert tunio.ACCEL is not None
    return [
        (tunio.ACCEL.read_many, tunio.ACCEL.write_many),
        (tunio.py_read_many, tunio.py_write_many),
    ]


@pytest.mark.parametrize("index", [0, 1], ids=IMPLS)
def test_bounds_are_refused_before_any_system_call(index: int) -> None:
    read_many, write_many = implementations()[index]
    for max_packets, bufsize in ((-1, 100), (tunio.MAX_PACKETS + 1, 100), (1, 0), (1, -5)):
        with pytest.raises(ValueError, match=r"max_packets|bufsize"):
            read_many(-1, max_packets, bufsize)
    with pytest.raises(ValueError, match="bufsize"):
        read_many(-1, 1, tunio.MAX_BUFSIZE + 1)
    with pytest.raises(ValueError, match="header"):
        write_many(-1, bytes(tunio.MAX_HEADER + 1), [b"x"])
    with pytest.raises(ValueError, match="packets"):
        write_many(-1, b"", [b"x"] * (tunio.MAX_PACKETS + 1))
    with pytest.raises(TypeError):
        write_many(-1, b"", [b"x", 5])
    assert tunio.ACCEL is not None
    assert (tunio.ACCEL.MAX_PACKETS, tunio.ACCEL.MAX_BUFSIZE, tunio.ACCEL.MAX_HEADER) == (
        tunio.MAX_PACKETS,
        tunio.MAX_BUFSIZE,
        tunio.MAX_HEADER,
    )


@contextlib.contextmanager
def refused_socket() -> Iterator[socket.socket]:
    """A non-blocking UDP socket connected to a closed port: after a send, its next
    call reports ECONNREFUSED, an error that is neither EAGAIN nor fatal."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as closed_port:
        closed_port.bind(("127.0.0.1", 0))
        target = closed_port.getsockname()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect(target)
        yield sock


@pytest.mark.parametrize("index", [0, 1], ids=IMPLS)
def test_any_other_error_is_reported_not_raised(index: int) -> None:
    """Errors on a descriptor that is no TUN device, to reach errnos a TUN rarely gives."""
    read_many, write_many = implementations()[index]
    r, w = os.pipe()
    try:
        os.set_blocking(r, False)
        os.write(w, b"0123456789")
        assert read_many(r, 8, 4) == ([b"0123", b"4567", b"89"], 10, 0)
        assert read_many(w, 8, 4) == ([], 0, errno.EBADF)  # the write end: not readable
        # A dead descriptor ends the batch: the packets after it are not tried.
        assert write_many(r, b"h", [b"a", b"b"]) == (0, 0, [(0, errno.EBADF)])
        assert write_many(w, b"h", [b"a", b"bc"]) == (2, 5, [])
        assert os.read(r, 100) == b"hahbc"
    finally:
        os.close(r)
        os.close(w)
    with refused_socket() as sock:
        sock.send(b"nobody listens")
        time.sleep(0.05)
        assert read_many(sock.fileno(), 8, 100) == ([], 0, errno.ECONNREFUSED)
        sock.send(b"again")
        time.sleep(0.05)
        assert write_many(sock.fileno(), b"", [b"a", b"b"]) == (1, 1, [(0, errno.ECONNREFUSED)])


def test_tun_device_counts_and_logs_a_refused_read_once(caplog: pytest.LogCaptureFixture) -> None:
    with refused_socket() as sock:
        device = TunDevice(sock.fileno(), "fake0", preexisted=False, multi_queue=False)
        with caplog.at_level(logging.WARNING, logger=tun_module.__name__):
            for _ in range(2):
                sock.send(b"nobody listens")
                time.sleep(0.05)
                assert device.read_batch() == []
        assert device.stats.read_errors == {"ECONNREFUSED": 2}
        assert device.stats.packets_read == 0
        assert len([r for r in caplog.records if "read on fake0" in r.getMessage()]) == 1


def test_fake_tun_write_many_matches_the_device() -> None:
    tun = FakeTun(SimLoop(VirtualClock()), vnet_hdr=True)
    tun.refuse_writes = lambda data: data[VNET_HDR_SIZE:].startswith(b"bad")
    refused = tun.write_many(bytes(VNET_HDR_SIZE), [b"one", b"bad", b"two"])
    assert refused == [1]
    assert tun.packets() == [b"one", b"two"]
    assert tun.stats.write_errors == {"EINVAL": 1}
    assert tun.stats.packets_written == 2
