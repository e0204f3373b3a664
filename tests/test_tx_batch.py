"""The send-side batch path: one C call fragments and seals a whole message into one UDP
GSO buffer (``packet.seal_fragments``), the session hands it out as a ``DatagramRun`` and
the socket sends it with one ``sendmsg``.

The pure-Python path (``fragment_message`` + ``seal_python``) is the reference: the C
output must equal it byte for byte, a pure-Python receiver must take it, and the session
must count, number and resend exactly as it does one fragment at a time.
"""

from __future__ import annotations

import importlib.util
import os
import random
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes import Tunnel, ipv4, two_sites
from test_session import established, make_pair

from secureiod.daemon.offload import (
    COMMON_PAYLOAD_SIZES,
    SEGMENT_CEILING,
    VNET_HDR_SIZE,
    gso_max_size_for,
)
from secureiod.secureio import MessageType, packet
from secureiod.secureio.constants import FRAGMENT_HEADER_SIZE, PACKET_OVERHEAD
from secureiod.secureio.datagram_run import DatagramRun
from secureiod.secureio.events import DropReason
from secureiod.secureio.packet import (
    MAX_BATCH_PAYLOAD,
    PacketKey,
    open_python,
    seal_fragments,
    seal_fragments_python,
)
from secureiod.secureio.path import Address
from secureiod.secureio.reassembly import Reassembler
from secureiod.secureio.session import Session, SessionOptions
from secureiod.secureio.wire import iter_messages
from secureiod.udp import SendResult, UdpSocket

RW = MessageType.READ_WRITE
VNET_LIKE = MessageType.channel(7)
ACCEL = packet.ACCEL
needs_accel = pytest.mark.skipif(
    ACCEL is None or not hasattr(ACCEL, "seal_fragments"),
    reason="the C accelerator is not built (SECUREIOD_PURE_PYTHON or no libsodium)",
)
KEYS = [
    PacketKey.session(bytes(range(32)), bytes(range(100, 116))),
    PacketKey.aux(bytes(range(64, 96))),
    PacketKey.clear(),
]


def _sizes(e: int) -> list[int]:
    f = e - FRAGMENT_HEADER_SIZE
    sizes = {1, 2, f - 1, f, f + 1, 2 * f - 1, 2 * f, 2 * f + 1, 3 * f, 65536, 65545}
    return sorted(s for s in sizes if 0 < s <= MAX_BATCH_PAYLOAD and s // f < 3000)


def _split(buffer: bytes, segment: int) -> list[bytes]:
    return [buffer[i : i + segment] for i in range(0, len(buffer), segment)]


def _reassemble(datagrams: list[bytes], key: PacketKey, mask: int) -> list[bytes]:
    """A pure-Python receiver: open each datagram, reassemble the fragments."""
    r = Reassembler(max_message_size=1 << 17, max_chains=4, byte_budget=1 << 20)
    done = []
    for d in datagrams:
        opened = open_python(d, [key], mask)
        for m in iter_messages(opened.messages):
            got = r.add(m.type, m.payload)
            if got is not None:
                done.append(bytes(got))
    return done


@needs_accel
@pytest.mark.parametrize("e", [25, 100, 1232, 1392, 8948, 65216, 65535])
@pytest.mark.parametrize("key_index", [0, 1, 2])
def test_c_equals_reference_byte_for_byte(e: int, key_index: int) -> None:
    key = KEYS[key_index]
    rng = random.Random(e * 10 + key_index)
    for size in _sizes(e):
        payload = rng.randbytes(size)
        for pid, mask in ((1, 0), (rng.getrandbits(40) + 1, rng.getrandbits(64)), (7, 1 << 63)):
            chain = rng.getrandbits(64)
            got = seal_fragments(key, pid, mask, VNET_LIKE, payload, chain, e)
            want = seal_fragments_python(key, pid, mask, VNET_LIKE, payload, chain, e)
            assert got == want, (e, size, pid, mask)
            buffer, count, segment = got
            chunk = e - FRAGMENT_HEADER_SIZE
            assert count == -(-size // chunk)
            assert len(buffer) == count * (PACKET_OVERHEAD + FRAGMENT_HEADER_SIZE) + size
            assert segment == (e + PACKET_OVERHEAD if count > 1 else len(buffer))
            pieces = _split(buffer, segment)
            assert len(pieces) == count and all(len(p) == segment for p in pieces[:-1])
            assert 0 < len(pieces[-1]) <= segment


@needs_accel
@pytest.mark.parametrize("size", [1, 1367, 1368, 1369, 60_000, 65545, MAX_BATCH_PAYLOAD])
def test_pure_python_receiver_takes_the_batch(size: int) -> None:
    key, mask = KEYS[0], 0x0123456789ABCDEF
    payload = random.Random(size).randbytes(size)
    buffer, _count, segment = seal_fragments(key, 2**40, mask, VNET_LIKE, payload, 9, 1392)
    datagrams = _split(buffer, segment)
    assert _reassemble(datagrams, key, mask) == [payload]
    # PacketIDs are consecutive from the first one.
    pids = [packet.read_packet_id(d, mask) for d in datagrams]
    assert pids == list(range(2**40, 2**40 + len(datagrams)))


@needs_accel
@pytest.mark.parametrize(
    ("args", "why"),
    [
        ((None, bytes(24), 1, 0, 5, b"x", 1, 24), "max_payload"),
        ((None, bytes(24), 1, 0, 5, b"x", 1, 0), "max_payload"),
        ((None, bytes(24), 1, 0, 5, b"x", 1, -1), "max_payload"),
        ((None, bytes(24), 1, 0, 5, b"x", 1, 65536), "max_payload"),
        ((None, bytes(24), 1, 0, 5, b"", 1, 1392), "payload"),
        ((None, bytes(24), 1, 0, 5, bytes(MAX_BATCH_PAYLOAD + 1), 1, 1392), "payload"),
        ((None, bytes(24), 0, 0, 5, b"x", 1, 1392), "packet ids"),
        ((None, bytes(24), 2**64 - 1, 0, 5, bytes(2000), 1, 1392), "packet ids"),
        ((None, bytes(24), 1, 0, 2**32, b"x", 1, 1392), "32 bits"),
        ((bytes(31), bytes(24), 1, 0, 5, b"x", 1, 1392), "stream key"),
        ((None, bytes(23), 1, 0, 5, b"x", 1, 1392), "mac seed"),
    ],
)
def test_c_refuses_bad_arguments(args: tuple[object, ...], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        ACCEL.seal_fragments(*args)  # type: ignore[union-attr]


BAD_INTEGERS = [
    (None, bytes(24), -1, 0, 5, b"x", 1, 1392),
    (None, bytes(24), 2**64, 0, 5, b"x", 1, 1392),
    (None, bytes(24), 1, -1, 5, b"x", 1, 1392),
    (None, bytes(24), 1, 0, -1, b"x", 1, 1392),
    (None, bytes(24), 1, 0, 2**64, b"x", 1, 1392),
    (None, bytes(24), 1, 0, 5, b"x", 2**64, 1392),
    (None, bytes(24), 1, 0, 5, b"x", 1, 2**64),
    (None, bytes(24), 1.0, 0, 5, b"x", 1, 1392),
    (None, bytes(24), 1, 0, 5, "x", 1, 1392),
    (None, bytes(24), 1, 0, 5),
]


@needs_accel
def test_c_refuses_out_of_range_integers_without_crashing() -> None:
    for bad in BAD_INTEGERS:
        with pytest.raises((OverflowError, TypeError, ValueError)):
            ACCEL.seal_fragments(*bad)  # type: ignore[union-attr]


def test_last_packet_id_is_allowed_and_one_past_it_is_not() -> None:
    top = 2**64 - 1
    for fn in (seal_fragments, seal_fragments_python):
        buffer, count, _ = fn(KEYS[1], top - 1, 0, RW, bytes(2000), 1, 1392)
        assert count == 2 and packet.read_packet_id(buffer[-(2000 - 1368 + 77) :]) == top
        with pytest.raises(ValueError):
            fn(KEYS[1], top, 0, RW, bytes(2000), 1, 1392)


def test_internal_types_are_never_fragmented() -> None:
    with pytest.raises(ValueError, match="internal"):
        seal_fragments(KEYS[0], 1, 0, MessageType.KEY_EXCHANGE, bytes(3000), 1, 1392)


@pytest.mark.parametrize("var", ["SECUREIOD_NO_BATCH", "SECUREIOD_NO_TX_BATCH"])
def test_switches_turn_the_batch_path_off(var: str) -> None:
    code = "from secureiod.secureio import packet; print(packet.BATCH_SEAL)"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("SECUREIOD_NO_BATCH", "SECUREIOD_NO_TX_BATCH", "SECUREIOD_PURE_PYTHON")
    }
    built = importlib.util.find_spec("secureiod.secureio._accel") is not None
    for extra, want in (({var: "1"}, "False"), ({}, str(built))):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.stdout.strip() == want, out.stderr


# -- the session ----------------------------------------------------------------------------


def _pair(**kw: object):  # type: ignore[no-untyped-def]
    opt = SessionOptions(enable_fragmentation=True, max_fragmented_message_size=65545, **kw)  # type: ignore[arg-type]
    link = make_pair(opt)
    link.run_until(lambda: established(link))
    return link


@pytest.mark.parametrize("runs", [True, False])
@pytest.mark.parametrize("psk", [None, b"psk"])
def test_session_run_is_the_reference_fragments_sealed(runs: bool, psk: bytes | None) -> None:
    """Both paths produce exactly what fragment_message + seal_python would, with the
    same PacketIDs, ChainIDs, stats and largest_sent."""
    link = _pair(psk=psk)
    a: Session = link.a.session
    a._seal_runs = runs and packet.BATCH_SEAL
    rng = random.Random(3)
    for size in (1393, 2736, 65545, 40_000):
        payload = rng.randbytes(size)
        key, pid, mask = a._kx.send_key, a._next_pid, a._pid_mask
        before = (a.stats.tx_packets, a.stats.tx_bytes, a.stats.tx_messages)
        a.write_message(VNET_LIKE, payload, link.now)
        assert key is not None
        want, count, segment = seal_fragments_python(
            key, pid, mask, VNET_LIKE, payload, a._chain_id, a.payload_size
        )
        out = a.datagram_runs_to_send(link.now)
        if a._seal_runs:
            assert out == [DatagramRun(want, segment, count, a.endpoint)]  # type: ignore[arg-type]
        else:
            assert [r.count for r in out] == [1] * count
            assert b"".join(r.buffer for r in out) == want
        assert a._next_pid == pid + count
        after = (a.stats.tx_packets, a.stats.tx_bytes, a.stats.tx_messages)
        assert after == (before[0] + count, before[1] + len(want), before[2] + 1)
        assert a._largest_sent == a.payload_size
        assert _reassemble(_split(want, segment), key, mask) == [payload]


def test_datagrams_to_send_splits_runs_and_keeps_order() -> None:
    link = _pair(send_delay=0.0)
    a = link.a.session
    fragments = [1445, 1445, 1445, 5000 - 3 * 1368 + 77]
    for form in ("runs", "list"):
        pid = a._next_pid
        a.write_message(RW, b"before", link.now)
        a.write_message(RW, bytes(5000), link.now)
        a.write_message(RW, b"after", link.now)
        if form == "runs":
            runs = a.datagram_runs_to_send(link.now)
            assert [r.count for r in runs] == ([1, 4, 1] if a._seal_runs else [1] * 6)
            assert all(r.address == a.endpoint for r in runs)
            datagrams = [d for r in runs for d in r.datagrams()]
        else:
            listed = a.datagrams_to_send(link.now)
            assert all(addr == a.endpoint for _, addr in listed)
            datagrams = [d for d, _ in listed]
        assert [len(d) for d in datagrams] == [6 + 53, *fragments, 5 + 53]
        pids = [packet.read_packet_id(d, a._pid_mask) for d in datagrams]
        assert pids == list(range(pid, pid + 6))


def test_no_endpoint_counts_every_datagram_of_a_run() -> None:
    link = _pair()
    a = link.a.session
    a.set_endpoint(None)
    before = a.stats.drops[DropReason.NO_ENDPOINT.value]
    a.write_message(RW, bytes(10_000), link.now)
    assert a.datagram_runs_to_send(link.now) == []
    assert a.stats.drops[DropReason.NO_ENDPOINT.value] == before + 8


def test_too_big_on_a_run_shrinks_and_resends_the_fragments() -> None:
    """EMSGSIZE for a datagram of a run: the size goes down, the refused fragment goes out
    again re-split, and the receiver still gets the whole message."""
    link = _pair()
    a = link.a.session
    payload = random.Random(8).randbytes(30_000)
    a.write_message(RW, payload, link.now)
    runs = a.datagram_runs_to_send(link.now)
    datagrams = [d for r in runs for d in r.datagrams()]
    refused, passed = datagrams[0], datagrams[1:]
    assert len(refused) == a.payload_size + PACKET_OVERHEAD
    a.report_too_big(len(refused), link.now, datagram=refused, path_limit=1200)
    assert a.payload_size == 1200
    resent = [d for r in a.datagram_runs_to_send(link.now) for d in r.datagrams()]
    assert resent and all(len(d) <= 1200 + PACKET_OVERHEAD for d in resent)
    for d in passed + resent:
        link.b.session.receive_datagram(d, link.a.address, link.now)
    link.pump()
    assert link.b.messages(RW) == [payload]


# -- the socket -----------------------------------------------------------------------------


def _receive(sock: socket.socket, n: int, deadline: float) -> list[bytes]:
    got: list[bytes] = []
    while len(got) < n and time.monotonic() < deadline:
        try:
            got.append(sock.recv(70_000))
        except BlockingIOError:
            time.sleep(0.001)
    return got


@pytest.mark.parametrize("gso", [True, False])
@pytest.mark.parametrize(
    ("segment", "count", "last"),
    # 65269: a jumbo path's datagram, too big for GSO at all (above 65000): one per call
    [(1445, 48, 1000), (1445, 1, 78), (9001, 9, 9001), (40_000, 2, 10), (65_269, 2, 100)],
)
def test_send_run_over_real_udp(gso: bool, segment: int, count: int, last: int) -> None:
    """Real UDP on 127.0.0.1: every datagram arrives whole and in order, cut at the GSO
    limits (64 segments, 65000 bytes) when the run is longer."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    tx = UdpSocket.bind(("127.0.0.1", 0), segmentation=gso)
    try:
        rng = random.Random(segment + count)
        sizes = [segment] * (count - 1) + [last]
        datagrams = [rng.randbytes(s) for s in sizes]
        buffer = b"".join(datagrams)
        seg = segment if count > 1 else len(buffer)
        assert tx.send_run(buffer, seg, rx.getsockname()) == []
        got = _receive(rx, len(datagrams), time.monotonic() + 5)
        assert got == datagrams
        assert tx.stats.tx_datagrams == len(datagrams) and tx.stats.tx_bytes == len(buffer)
    finally:
        tx.close()
        rx.close()


def test_send_run_reports_each_refused_datagram() -> None:
    """A datagram the kernel refuses comes back as its own bytes with its result, as from
    ``send_batch`` (here: broadcast without SO_BROADCAST, refused locally)."""
    tx = UdpSocket.bind(("127.0.0.1", 0), segmentation=True)
    try:
        failures = tx.send_run(bytes(3000), 1000, ("255.255.255.255", 9))
        assert [len(d) for d, _ in failures] == [1000, 1000, 1000]
        assert all(r is SendResult.ERROR for _, r in failures)
    finally:
        tx.close()


# -- the daemon (in memory) -----------------------------------------------------------------


@pytest.mark.parametrize("batch", [True, False])
def test_a_tso_segment_leaves_as_one_run_and_arrives_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch: bool
) -> None:
    """A 60 KB TSO segment from A's TUN: with the batch path A's transmit hands the
    socket one run (``send_run``) and nothing one by one; without it (``SECUREIOD_NO_TX_
    BATCH``) the same number of datagrams goes through ``send_batch``. B writes the
    segment to its TUN unchanged either way."""
    tunnel = Tunnel(two_sites(tmp_path), vnet_hdr=["a", "b"])
    tunnel.wait_established(timeout=5)
    tunnel.sim.run_for(0.1)
    session = tunnel.peer("a", "b").session
    assert session is not None
    session._seal_runs = batch and packet.BATCH_SEAL
    udp = tunnel.nodes["a"].udp
    calls: list[tuple[str, int]] = []
    real_run, real_batch = udp.send_run, udp.send_batch

    inside_run = []  # the fake's send_run uses its send_batch: count transmit's calls only

    def send_run(buffer: bytes, segment_size: int, address: Address) -> list[object]:
        calls.append(("run", -(-len(buffer) // segment_size)))
        inside_run.append(True)
        try:
            return real_run(buffer, segment_size, address)  # type: ignore[return-value]
        finally:
            inside_run.pop()

    def send_batch(datagrams: list[bytes], address: Address) -> list[object]:
        if not inside_run:
            calls.append(("batch", len(datagrams)))
        return real_batch(datagrams, address)  # type: ignore[return-value]

    monkeypatch.setattr(udp, "send_run", send_run)
    monkeypatch.setattr(udp, "send_batch", send_batch)
    tcp = struct.pack("!HHIIBBHHH", 40000, 80, 0, 0, 5 << 4, 0x18, 65535, 0, 0)
    ip_packet = ipv4("198.19.0.1", "198.19.0.2", tcp + random.Random(4).randbytes(60_000), proto=6)
    header = struct.pack("<BBHHHH", 1, 1, 40, 1360, 20, 16)
    sent = udp.stats.tx_datagrams
    tunnel.nodes["a"].tun.inject(ip_packet, vnet_header=header)
    tunnel.sim.run_for(0.1)
    assert tunnel.nodes["b"].tun.written == [header + ip_packet]
    fragments = udp.stats.tx_datagrams - sent
    assert fragments >= 40
    if session._seal_runs:
        assert ("run", fragments) in calls and ("batch", fragments) not in calls
    else:
        assert ("batch", fragments) in calls and not any(k == "run" for k, _ in calls)


@pytest.mark.parametrize("payload_size", [576, 1312, 1392, 1408, 8000])
def test_a_segment_of_the_tun_gso_size_leaves_in_one_send_and_one_more_does_not(
    payload_size: int,
) -> None:
    """``offload.gso_max_size_for``: a TUN segment of that size (a VNET message: 10-byte
    header + segment) leaves in one GSO send and arrives in ONE GRO read over real UDP;
    one fragment's worth more would need a second (the size is the largest that fits)."""
    size = gso_max_size_for(payload_size)
    key = KEYS[0]
    chunk = payload_size - FRAGMENT_HEADER_SIZE
    rx = UdpSocket.bind(("127.0.0.1", 0), segmentation=True)
    tx = UdpSocket.bind(("127.0.0.1", 0), segmentation=True)
    try:
        assert rx.gro and tx.gso
        for message, sends in ((VNET_HDR_SIZE + size, 1), (VNET_HDR_SIZE + size + chunk, 2)):
            buffer, count, segment = seal_fragments_python(
                key, 1, 0, VNET_LIKE, bytes(message), 1, payload_size
            )
            assert segment == payload_size + PACKET_OVERHEAD
            assert tx.send_run(buffer, segment, rx.local_address) == []
            runs: list[tuple[bytes, int, Address]] = []
            deadline = time.monotonic() + 5
            while sum(-(-len(d) // s) for d, s, _ in runs) < count:
                assert time.monotonic() < deadline, "the datagrams did not all arrive"
                runs += rx.recv_runs(64)
            assert b"".join(d for d, _, _ in runs) == buffer
            assert len(runs) == sends, (message, count, [len(d) for d, _, _ in runs])
    finally:
        tx.close()
        rx.close()


def test_the_tun_gso_size_stays_in_the_kernels_bounds() -> None:
    """1280..SEGMENT_CEILING whatever the path: tiny paths still get segments, every
    common path the same value, and a path so wide that one datagram fills a send
    carries each segment whole, unfragmented."""
    sizes = {p: gso_max_size_for(p) for p in range(147, 65217, 7)}
    assert all(1280 <= s <= SEGMENT_CEILING for s in sizes.values())
    assert sizes[147] < 10_000
    # one value for every common path (1280-byte IPv6 to 1500-byte IPv4), the smallest
    # of their fits: 60,886 would fit a 1500-byte IPv4 path (44 fragments of 1,384)
    assert SEGMENT_CEILING == 59_966 < 44 * (1408 - 24) - 10
    assert {gso_max_size_for(p) for p in COMMON_PAYLOAD_SIZES} == {SEGMENT_CEILING}
    # one datagram per send at most (a 32 KB path or more): a segment not fragmented at all
    for payload in (32_448, 40_000, 59_976):
        assert gso_max_size_for(payload) == payload - VNET_HDR_SIZE, payload
    assert gso_max_size_for(65_216) == SEGMENT_CEILING
