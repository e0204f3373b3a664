"""The tunnel MTU follows the underlay: the daemon derives the payload limit P from the
route MTU toward the peer, the negotiation confirms it on a clean path, and the TUN device,
the peer's route and ``peers --json`` all carry it (the device's gso_max_size fits it).
DF pings of exactly the MTU pass; one byte more is refused locally by the kernel with
"message too long"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from harness import Net, Node, Transfer, expected_payload

from secureiod.daemon.offload import gso_max_size_for


def _link_mtu(node: Node) -> int:
    (link,) = json.loads(node.ip("-j", "link", "show", node.ifname).stdout)
    return int(link["mtu"])


def _gso_max_size(node: Node) -> int:
    (link,) = json.loads(node.ip("-d", "-j", "link", "show", node.ifname).stdout)
    return int(link["gso_max_size"])


def _route_mtu(node: Node, dst: str) -> int | None:
    family = "-6" if ":" in dst else "-4"
    (route,) = json.loads(node.ip("-j", family, "route", "show", dst).stdout)
    metrics = route.get("metrics") or [{}]
    mtu = metrics[0].get("mtu")
    return int(mtu) if mtu is not None else None


@pytest.mark.parametrize(
    ("underlay_mtu", "ipv6_underlay", "payload"),
    [
        (1400, False, 1312),  # (1400 - 28 - 53) // 16 * 16
        (9000, False, 8912),  # (9000 - 28 - 53) // 16 * 16
        (1400, True, 1296),  # (1400 - 48 - 53) // 16 * 16
    ],
    ids=["v4-1400", "v4-9000", "v6-1400"],
)
def test_tunnel_mtu_follows_underlay(
    net: Net, underlay_mtu: int, ipv6_underlay: bool, payload: int
) -> None:
    assert expected_payload(underlay_mtu, ipv6_underlay) == payload
    a, b = net.pair(mtu=underlay_mtu, ipv6_underlay=ipv6_underlay)

    for node, other, peer_name in ((a, b, "b"), (b, a, "a")):
        p = node.peer(peer_name)
        assert p["payload_size"] == payload, f"{node.name}: negotiated {p['payload_size']}"
        assert p["mtu"] == payload
        assert _link_mtu(node) == payload
        assert node.status()["mtu"] == payload
        # a TSO segment of the device leaves in one UDP GSO send (offload.gso_max_size_for)
        assert _gso_max_size(node) == node.status()["gso_max_size"] == gso_max_size_for(payload)
        assert _route_mtu(node, other.tunnel4) == payload
        assert _route_mtu(node, other.tunnel6) == max(payload, 1280)

    for src, dst in ((a, b), (b, a)):
        # IPv4: 20 bytes of IP header + 8 of ICMP
        src.assert_ping(dst.tunnel4, count=2, interval=0.05, size=payload - 28, dont_fragment=True)
        too_big = src.ping(dst.tunnel4, count=1, size=payload - 27, dont_fragment=True)
        assert too_big.returncode != 0
        assert f"ping: local error: message too long, mtu={payload}" in too_big.stderr, (
            too_big.stdout + too_big.stderr
        )
        # IPv6: 40 + 8
        src.assert_ping(dst.tunnel6, count=2, interval=0.05, size=payload - 48, dont_fragment=True)
        too_big6 = src.ping(dst.tunnel6, count=1, size=payload - 47, dont_fragment=True)
        assert too_big6.returncode != 0
        assert f"ping: local error: message too long, mtu: {payload}" in too_big6.stderr, (
            too_big6.stdout + too_big6.stderr
        )

    # the full-size packets crossed whole: nothing was dropped as too big on either side
    for node, peer_name in ((a, "b"), (b, "a")):
        p = node.peer(peer_name)
        assert not p["drops"], p["drops"]
        assert node.status()["udp"]["tx_too_big"] == 0


def test_a_jumbo_underlay_carries_tcp_whole(net: Net, big_file: tuple[Path, str]) -> None:
    """A 65535-byte underlay (loopback-sized): payload 65,216, a datagram too big for UDP
    GSO at all (65,269 > 65,000). The device's segment size makes every TCP segment one
    unfragmented message, and a stream of 200 MiB arrives intact (it used to stop after
    the first second: a send of such datagrams raised in the loop)."""
    a, b = net.pair(mtu=65535)
    assert a.peer("b")["payload_size"] == 65216
    assert _gso_max_size(a) == a.status()["gso_max_size"] == gso_max_size_for(65216) == 59966
    path, digest = big_file
    sent_n, sent_hash, recv_n, recv_hash = (
        Transfer(a, b, b.tunnel4, path, timeout=90).start().wait()
    )
    assert sent_n == recv_n == path.stat().st_size and sent_hash == recv_hash == digest
    assert "failed" not in a.read_log() and "failed" not in b.read_log()
