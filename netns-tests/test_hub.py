"""Hub and spokes: A talks to B and C over two underlay links; each spoke knows only A.
A packet from B whose inner source is C's tunnel address is dropped by A and counted."""

from __future__ import annotations

from harness import Node


def test_hub_reaches_both_spokes(hub: tuple[Node, Node, Node]) -> None:
    a, b, c = hub
    for spoke in (b, c):
        spoke.assert_ping(a.tunnel4)
        spoke.assert_ping(a.tunnel6)
        a.assert_ping(spoke.tunnel4)
        a.assert_ping(spoke.tunnel6)
    st = a.status()
    assert st["peers_established"] == st["peers_total"] == 2
    peers = {p["name"]: p for p in a.peers()}
    assert peers["b"]["endpoint"] == "198.18.1.2:5800"
    assert peers["c"]["endpoint"] == "198.18.2.2:5800"
    for p in peers.values():
        assert p["rx_packets"] >= 6 and p["tx_packets"] >= 6, p
        assert not p["drops"], p
    # a spoke has a route only to the hub's addresses: C's address is not routed by B's
    # daemon (the kernel hands it to sio0 via the /24, the daemon finds no peer for it)
    before = b.status()["no_route"]
    assert b.ping(c.tunnel4, count=2, interval=0.1, wait=0.5).returncode != 0
    assert b.status()["no_route"] >= before + 2


def test_spoofed_inner_source_is_dropped(hub: tuple[Node, Node, Node]) -> None:
    a, b, c = hub
    count = 5
    # B claims C's tunnel address as a source: a second address on its sio0
    b.ip("addr", "add", f"{c.tunnel4}/32", "dev", b.ifname)
    a_b0, a_c0 = a.peer("b"), a.peer("c")
    b_a0 = b.peer("a")

    result = b.ping(a.tunnel4, count=count, interval=0.05, wait=0.5, source=c.tunnel4)
    assert result.returncode != 0, result.stdout
    assert f"{count} packets transmitted, 0 received" in result.stdout, result.stdout

    a_b1, a_c1 = a.peer("b"), a.peer("c")
    b_a1 = b.peer("a")
    # B's daemon did send them (the destination is A's, allowed for peer a) ...
    assert b_a1["tx_packets"] - b_a0["tx_packets"] >= count
    # ... A authenticated them as B's, found the source belongs to C, and dropped them
    dropped = a_b1["drops"].get("source-not-allowed", 0) - a_b0["drops"].get(
        "source-not-allowed", 0
    )
    assert dropped >= count, a_b1["drops"]
    assert a_b1["rx_packets"] == a_b0["rx_packets"], "a spoofed packet reached A's TUN"
    # A never answered: nothing went back to B nor to C (the address's owner)
    assert a_b1["tx_packets"] == a_b0["tx_packets"]
    assert a_c1["tx_packets"] == a_c0["tx_packets"]
    assert a_c1["rx_packets"] == a_c0["rx_packets"]
    assert b_a1["rx_packets"] == b_a0["rx_packets"]
    assert not a_c1["drops"], a_c1["drops"]
    # the session with B is unharmed: an honest ping still works
    b.assert_ping(a.tunnel4)
