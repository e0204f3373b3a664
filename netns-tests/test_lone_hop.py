"""The C lone-packet hop (``secureiod/daemon/lone.py``, ``_fastpath.c``) in real daemons.

Quiet pings must leave and arrive by the hop on both sides and be counted exactly as the
Python path counts them; anything the hop may not send (a revoked destination, offload work, a size
above the lane's limit, a second packet of a burst) must still take the Python path and
arrive; with the hop switched off the daemon runs on ``epoll.poll`` as before.
"""

from __future__ import annotations

from typing import Any

import pytest
from harness import Net, Node


def _hop(node: Node) -> dict[str, Any]:
    hop = node.status()["lone_hop"]
    assert hop is not None, f"{node.name}: the daemon runs without the C lone hop"
    return hop  # type: ignore[no-any-return]


def _counts(a: Node, b: Node) -> tuple[int, int, int, int]:
    pa, pb = a.peer("b"), b.peer("a")
    return pa["tx_packets"], pa["tx_bytes"], pb["rx_packets"], pb["rx_bytes"]


@pytest.mark.parametrize("family", [4, 6])
def test_quiet_pings_take_the_hop_both_ways_and_count_as_the_python_path(
    net: Net, family: int
) -> None:
    a, b = net.pair()
    dst_b = b.tunnel4 if family == 4 else b.tunnel6
    a.assert_ping(dst_b, count=3, interval=0.05)  # the Python path sends first and arms
    hop_a0, hop_b0 = _hop(a), _hop(b)
    tx0, txb0, rx0, rxb0 = _counts(a, b)
    n = 40
    result = a.assert_ping(dst_b, count=n, interval=0.02)
    assert f"{n} received" in result.stdout
    hop_a1, hop_b1 = _hop(a), _hop(b)
    # every request left A by the hop, every reply left B by it (2 of 40 may miss it:
    # a keepalive or timer in between lets the Python path send and re-arm)
    assert hop_a1["sends"] - hop_a0["sends"] >= n - 2, (hop_a0, hop_a1)
    assert hop_b1["sends"] - hop_b0["sends"] >= n - 2, (hop_b0, hop_b1)
    assert hop_a1["send_failures"] == hop_b1["send_failures"] == 0
    # and every reply reached A's TUN by A's hop, every request B's TUN by B's
    assert hop_a1["receives"] - hop_a0["receives"] >= n - 2, (hop_a0, hop_a1)
    assert hop_b1["receives"] - hop_b0["receives"] >= n - 2, (hop_b0, hop_b1)
    # counted as the Python path counts: what A says it sent is what B says it got
    tx1, txb1, rx1, rxb1 = _counts(a, b)
    assert tx1 - tx0 == rx1 - rx0 >= n
    assert txb1 - txb0 == rxb1 - rxb0
    pa, pb = a.peer("b"), b.peer("a")
    assert not pa["session_drops"].get("replay") and not pb["session_drops"].get("replay")
    st = a.status()
    assert st["loop"]["callback_failures"] == 0


def test_a_revoked_destination_never_leaves_by_the_hop(net: Net) -> None:
    """The hop's destinations are a cache of the allowed IPs; a reload that takes B's
    address from the peer must empty it at once, though the TUN still gets the packets
    (the /24 on the interface routes them there)."""
    a, b = net.pair()
    a.assert_ping(b.tunnel4, count=5, interval=0.02)
    sends0 = _hop(a)["sends"]
    rx0 = b.peer("a")["rx_packets"]
    no_route0 = a.status()["no_route"]
    a.peer_specs[0]["allowed_ips"] = [p for p in b.host_prefixes() if ":" in p]
    a.write_config()
    reloaded = a.reload()
    assert "b" in reloaded["changed"] + reloaded["in_place"], reloaded
    result = a.ping(b.tunnel4, count=5, interval=0.02, wait=0.3)
    assert result.returncode != 0
    assert _hop(a)["sends"] == sends0
    assert b.peer("a")["rx_packets"] == rx0
    assert a.status()["no_route"] - no_route0 >= 5
    # the address B kept still works, by the hop again once it is armed
    a.assert_ping(b.tunnel6, count=10, interval=0.02)
    assert _hop(a)["sends"] > sends0


def test_what_the_hop_may_not_send_still_arrives(net: Net) -> None:
    """Sizes above the lane's limit, IP fragments in bursts, and back-to-back packets: the
    hop hands them to the Python path and nothing is lost or counted twice."""
    a, b = net.pair()
    a.assert_ping(b.tunnel4, count=3, interval=0.05)
    tx0, txb0, rx0, rxb0 = _counts(a, b)
    for size, count, interval in ((56, 50, 0.002), (1200, 20, 0.02), (3000, 10, 0.02)):
        result = a.assert_ping(b.tunnel4, count=count, interval=interval, size=size)
        assert f"{count} received" in result.stdout, result.stdout
    tx1, txb1, rx1, rxb1 = _counts(a, b)
    assert tx1 - tx0 == rx1 - rx0
    assert txb1 - txb0 == rxb1 - rxb0
    assert _hop(a)["send_failures"] == 0
    # a PacketID sent twice, by the hop and by Python, would be a replay at the other end
    for node, other in ((a, "b"), (b, "a")):
        drops = node.peer(other)["session_drops"]
        assert not drops.get("replay"), (node.name, drops)


def test_switched_off_the_daemon_waits_on_epoll_as_before(
    net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SECUREIOD_NO_LONE_HOP", "1")
    a, b = net.pair()
    assert a.status()["lone_hop"] is None
    a.assert_ping(b.tunnel4, count=20, interval=0.02)
    assert "lone hop Python" in a.read_log()
