"""Two peers over a veth: pings, a 200 MiB TCP transfer, an IPv6 underlay, and counters
that match the traffic sent."""

from __future__ import annotations

from pathlib import Path

from harness import Net, Transfer, expected_payload


def test_ping_v4_v6_both_ways(net: Net) -> None:
    a, b = net.pair()
    a.assert_ping(b.tunnel4)
    a.assert_ping(b.tunnel6)
    b.assert_ping(a.tunnel4)
    b.assert_ping(a.tunnel6)
    pa, pb = a.peer("b"), b.peer("a")
    assert pa["state"] == pb["state"] == "established"
    # v4 underlay overhead is 28 + 53: ((1500 - 81) // 16) * 16 = 1408
    assert pa["payload_size"] == pb["payload_size"] == expected_payload(1500, ipv6=False)
    assert pa["endpoint"] == "198.18.0.2:5800"
    assert pb["endpoint"] == "198.18.0.1:5800"


def test_tcp_200mib_sha256(net: Net, big_file: tuple[Path, str]) -> None:
    path, digest = big_file
    a, b = net.pair()
    transfer = Transfer(a, b, b.tunnel4, path, timeout=90).start()
    sent_n, sent_hash, recv_n, recv_hash = transfer.wait()
    size = path.stat().st_size
    assert sent_n == recv_n == size
    assert sent_hash == recv_hash == digest
    mbit = size * 8 / transfer.elapsed / 1e6
    print(f"200 MiB in {transfer.elapsed:.1f} s ({mbit:.0f} Mbit/s)")
    # the whole stream went through the tunnel: B received at least the payload bytes
    assert b.peer("a")["rx_bytes"] >= size
    assert a.peer("b")["tx_bytes"] >= size


def test_ipv6_underlay(net: Net) -> None:
    a, b = net.pair(ipv6_underlay=True)
    a.assert_ping(b.tunnel4)
    a.assert_ping(b.tunnel6)
    b.assert_ping(a.tunnel6)
    pa = a.peer("b")
    assert pa["endpoint"] == "[fd00:5ec:ff::2]:5800"
    # v6 underlay overhead is 48 + 53: ((1500 - 101) // 16) * 16 = 1392
    assert pa["payload_size"] == pa["mtu"] == expected_payload(1500, ipv6=True) == 1392
    st = a.status()
    assert st["listen"].startswith("[::]")
    assert st["peers_established"] == st["peers_total"] == 1
    assert st["crypto"] == "openssl+libsodium"  # the daemon runs the C path with OpenSSL


def test_counters_match_traffic(net: Net) -> None:
    a, b = net.pair()
    count, size = 20, 1000
    packet = size + 8 + 20  # ICMP payload + ICMP header + IPv4 header
    a0, b0 = a.peer("b"), b.peer("a")
    sa0, sb0 = a.status(), b.status()

    result = a.assert_ping(b.tunnel4, count=count, interval=0.02, size=size)
    assert f"{count} packets transmitted, {count} received" in result.stdout

    a1, b1 = a.peer("b"), b.peer("a")
    sa1 = a.status()

    def moved(before: dict, after: dict, key: str) -> int:
        return after[key] - before[key]

    # A sent count echo requests and received count replies; B the mirror image.
    for side, before, after, direction in (
        ("A", a0, a1, "tx"),
        ("A", a0, a1, "rx"),
        ("B", b0, b1, "rx"),
        ("B", b0, b1, "tx"),
    ):
        packets = moved(before, after, f"{direction}_packets")
        nbytes = moved(before, after, f"{direction}_bytes")
        assert packets >= count, f"{side} {direction}_packets moved by {packets} < {count}"
        assert nbytes >= count * packet, f"{side} {direction}_bytes moved by {nbytes}"
        # anything beyond the pings is whole extra packets of at most the MTU each
        assert nbytes - count * packet <= (packets - count) * a1["mtu"], (side, direction)
    # what A sent is what B received, and back
    assert moved(a0, a1, "tx_packets") <= moved(b0, b1, "rx_packets") + 2
    assert moved(b0, b1, "tx_packets") <= moved(a0, a1, "rx_packets") + 2
    assert not a1["drops"] and not b1["drops"], (a1["drops"], b1["drops"])
    # the session carried them: wire packets and UDP datagrams moved too
    assert moved(a0, a1, "wire_tx_packets") >= count
    assert sa1["udp"]["tx_datagrams"] - sa0["udp"]["tx_datagrams"] >= count
    assert sa1["udp"]["rx_datagrams"] - sa0["udp"]["rx_datagrams"] >= count
    # status agrees with the setup
    for node, st in ((a, sa1), (b, sb0)):
        assert st["interface"] == "sio0"
        assert st["public_key"] == node.public_key
        assert st["listen_port"] == 5800
        assert st["peers_established"] == st["peers_total"] == 1
        assert st["mtu"] == expected_payload(1500, ipv6=False) == 1408
        assert st["addresses"] == node.address
