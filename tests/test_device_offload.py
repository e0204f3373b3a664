"""Segmentation-offload capabilities between two devices (``secureiod.daemon.offload``).

Whole TCP segments (up to 64 KiB behind a virtio-net header) travel as one fragmented
message, but only to a peer that announced it takes them, and the TUN device's TSO is on
only while every established peer does.
"""

from __future__ import annotations

import struct
from pathlib import Path

from fakes import ZERO_VNET_HDR, Tunnel, ipv4, two_sites, udp4

from secureiod.daemon.offload import CAP_LOSSY, CAP_VNET, VNET_TYPE
from secureiod.tun import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6

TSO = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
A_IP, B_IP = "198.18.0.1", "198.18.0.2"


def segment(
    seq: int = 0, size: int = 4000, src: str = "198.19.0.1", dst: str = "198.19.0.2"
) -> tuple[bytes, bytes]:
    """A TCP super-packet as the kernel hands it over with TSO: (virtio-net header asking
    for 1360-byte segments and a checksum, IP packet)."""
    tcp = struct.pack("!HHIIBBHHH", 40000, 80, seq, 0, 5 << 4, 0x18, 65535, 0, 0)
    packet = ipv4(src, dst, tcp + bytes([seq % 256]) * size, proto=6)
    header = struct.pack("<BBHHHH", 1, 1, 40, 1360, 20, 16)
    return header, packet


def test_both_sides_with_vnet_hdr_exchange_caps_and_turn_tso_on(tmp_path: Path) -> None:
    tunnel = Tunnel(two_sites(tmp_path), vnet_hdr=["a", "b"])
    tunnel.wait_established(timeout=5)
    tunnel.sim.run_for(0.1)
    for site, other in (("a", "b"), ("b", "a")):
        assert tunnel.peer(site, other).offload.remote_caps == CAP_VNET
        assert tunnel.nodes[site].tun.offload == TSO
        assert tunnel.nodes[site].tun.offload_history == [TSO]


def test_a_whole_segment_crosses_as_one_message_and_one_tun_write(tmp_path: Path) -> None:
    tunnel = Tunnel(two_sites(tmp_path), vnet_hdr=["a", "b"])
    tunnel.wait_established(timeout=5)
    tunnel.sim.run_for(0.1)
    header, packet = segment()
    sent = tunnel.nodes["a"].udp.stats.tx_datagrams
    tunnel.nodes["a"].tun.inject(packet, vnet_header=header)
    tunnel.sim.run_for(0.1)
    assert tunnel.nodes["b"].tun.written == [header + packet]
    assert tunnel.nodes["a"].udp.stats.tx_datagrams - sent >= 3  # fragments of one message
    assert tunnel.peer("b", "a").counters.rx_packets == 1
    assert tunnel.peer("b", "a").counters.rx_bytes == len(packet)


def test_plain_packets_to_a_vnet_tun_get_a_zero_header(tmp_path: Path) -> None:
    tunnel = Tunnel(two_sites(tmp_path), vnet_hdr=["b"])
    tunnel.wait_established(timeout=5)
    packet = udp4("198.19.0.1", "198.19.0.2", b"plain")
    tunnel.nodes["a"].tun.inject(packet)
    tunnel.sim.run_for(0.1)
    assert tunnel.nodes["b"].tun.written == [ZERO_VNET_HDR + packet]


def test_a_peer_without_vnet_hdr_means_no_tso(tmp_path: Path) -> None:
    """a could take segments but b cannot: b announces no CAP_VNET, so a never turns TSO
    on (its kernel segments), and a segment the kernel hands over anyway is dropped and
    counted instead of sent to a peer that cannot write it."""
    tunnel = Tunnel(two_sites(tmp_path), vnet_hdr=["a"])
    tunnel.wait_established(timeout=5)
    tunnel.sim.run_for(1.0)
    assert tunnel.peer("a", "b").offload.remote_caps == 0
    assert tunnel.nodes["a"].tun.offload == 0
    assert tunnel.nodes["a"].tun.offload_history == []
    assert tunnel.nodes["b"].tun.offload_history == []
    header, packet = segment()
    tunnel.nodes["a"].tun.inject(packet, vnet_header=header)
    tunnel.nodes["a"].tun.inject(udp4("198.19.0.1", "198.19.0.2", b"small"))
    tunnel.sim.run_for(0.1)
    assert tunnel.peer("a", "b").counters.drops["offload-unsupported"] == 1
    assert tunnel.delivered("b") == [udp4("198.19.0.1", "198.19.0.2", b"small")]


def test_tso_only_while_every_established_peer_takes_segments(tmp_path: Path) -> None:
    """a has vnet_hdr and two peers; c has none: TSO stays off on a although b would take
    segments, because the kernel's TSO is per device, not per destination."""
    builder = two_sites(tmp_path)
    builder.connect(builder.nodes["a"], builder.add("c"))
    tunnel = Tunnel(builder, vnet_hdr=["a", "b"])
    tunnel.wait_established(timeout=5)
    tunnel.sim.run_for(1.0)
    assert tunnel.peer("a", "b").offload.remote_caps == CAP_VNET
    assert tunnel.nodes["a"].tun.offload == 0
    tunnel.devices["c"].close()  # c goes away; once a declares it dead, only b is left
    tunnel.sim.wait_for(lambda: not tunnel.established("a", "c"), 30)
    tunnel.sim.run_for(0.5)
    assert tunnel.nodes["a"].tun.offload == TSO


def test_a_lossy_path_turns_segments_off_then_on_again_after_the_cooldown(
    tmp_path: Path,
) -> None:
    """One lost datagram loses a whole chain: b, seeing chains lost, asks a for MTU-sized
    packets (CAP_LOSSY) and a turns TSO off; 30 s later b offers again."""
    tunnel = Tunnel(two_sites(tmp_path), vnet_hdr=["a", "b"])
    tunnel.wait_established(timeout=5)
    tunnel.sim.run_for(0.1)
    tunnel.sim.wire.link(A_IP, B_IP, loss=0.05)
    for seq in range(200):
        header, packet = segment(seq)
        tunnel.nodes["a"].tun.inject(packet, vnet_header=header)
        tunnel.sim.run_for(0.01)
    assert tunnel.peer("a", "b").offload.remote_caps == CAP_VNET | CAP_LOSSY
    assert tunnel.nodes["a"].tun.offload_history == [TSO, 0]
    tunnel.sim.wire.link(A_IP, B_IP, loss=0.0)
    tunnel.sim.run_for(35)
    assert tunnel.peer("a", "b").offload.remote_caps == CAP_VNET
    assert tunnel.nodes["a"].tun.offload_history == [TSO, 0, TSO]


def test_a_bad_offload_header_from_the_peer_never_reaches_the_tun(tmp_path: Path) -> None:
    tunnel = Tunnel(two_sites(tmp_path), vnet_hdr=["a", "b"])
    tunnel.wait_established(timeout=5)
    tunnel.sim.run_for(0.1)
    header, packet = segment(src="198.19.0.2", dst="198.19.0.1")
    bad = [
        struct.pack("<BBHHHH", 0x80, 1, 40, 1360, 20, 16) + packet,  # unknown flag
        struct.pack("<BBHHHH", 1, 3, 40, 1360, 20, 16) + packet,  # UDP fragmentation offload
        struct.pack("<BBHHHH", 1, 4, 40, 1360, 20, 16) + packet,  # TCPv6 on an IPv4 packet
        struct.pack("<BBHHHH", 1, 1, 40, 1360, 4100, 16) + packet,  # checksum beyond the end
        header + packet[:-1],  # the IP length lies
    ]
    b, peer_a = tunnel.devices["b"], tunnel.peer("b", "a")
    for message in [*bad, header + packet]:
        tunnel.call("b", lambda now, m=message: b.send.write(peer_a, VNET_TYPE, m, now))
    tunnel.sim.run_for(0.1)
    drops = tunnel.peer("a", "b").counters.drops
    assert drops["bad-offload-header"] == 4
    assert drops["inner-bad-length"] == 1
    assert tunnel.nodes["a"].tun.written == [header + packet]  # only the good one
    assert tunnel.peer("a", "b").counters.rx_packets == 1


def test_plain_and_offload_packets_of_one_read_keep_their_order_and_counts(
    tmp_path: Path,
) -> None:
    """One TUN read of small plain packets, checksum-offload packets (header flags set:
    sent with their header) and whole segments, interleaved: each kind goes to the session
    in runs (``SendPath.write_run``), and B's TUN gets them all in the order A read them,
    counted once each (bytes without the virtio-net header, as one at a time counted them)."""
    tunnel = Tunnel(two_sites(tmp_path), vnet_hdr=["a", "b"])
    tunnel.wait_established(timeout=5)
    tunnel.sim.run_for(0.1)
    csum = struct.pack("<BBHHHH", 1, 0, 0, 0, 20, 6)  # NEEDS_CSUM, no segmentation
    sent: list[bytes] = []
    for i in range(40):
        payload = bytes([i]) * (i % 7 * 13)
        if i % 10 == 9:
            header, packet = segment(seq=i, size=3000 + i)
        elif i % 3 == 0:
            header, packet = csum, udp4("198.19.0.1", "198.19.0.2", payload)
        else:
            header, packet = ZERO_VNET_HDR, udp4("198.19.0.1", "198.19.0.2", payload)
        assert tunnel.nodes["a"].tun.inject(packet, vnet_header=header)
        sent.append(header + packet)
    c = tunnel.peer("a", "b").counters
    tx0, bytes0 = c.tx_packets, c.tx_bytes
    tunnel.sim.run_for(0.2)
    assert tunnel.nodes["b"].tun.written == sent
    assert c.tx_packets - tx0 == len(sent)
    assert c.tx_bytes - bytes0 == sum(len(p) - 10 for p in sent)
    rx = tunnel.peer("b", "a").counters
    assert rx.rx_packets == len(sent) and not any(rx.drops.values()), rx.drops
