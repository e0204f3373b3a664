"""Roaming: a peer's underlay address changes under a running daemon (bound to 0.0.0.0 or
[::]); its authenticated packets from the new address move the other side's endpoint,
with no config change and no restart."""

from __future__ import annotations

import pytest
from harness import Net


@pytest.mark.parametrize(
    ("ipv6_underlay", "old", "new", "prefix", "endpoint", "roamer_speaks_first"),
    [
        (False, "198.18.0.2", "198.18.0.3", 24, "198.18.0.3:5800", True),
        (True, "fd00:5ec:ff::2", "fd00:5ec:ff::3", 64, "[fd00:5ec:ff::3]:5800", True),
        (False, "198.18.0.2", "198.18.0.3", 24, "198.18.0.3:5800", False),
    ],
    ids=["v4", "v6", "v4-idle-roamer"],
)
def test_peer_moves_to_new_address(
    net: Net,
    ipv6_underlay: bool,
    old: str,
    new: str,
    prefix: int,
    endpoint: str,
    roamer_speaks_first: bool,
) -> None:
    """With ``roamer_speaks_first=False`` B sends nothing of its own: A's pings into the
    old address go nowhere until B's keepalive (5 s of silence) tells A where B is."""
    a, b = net.pair(ipv6_underlay=ipv6_underlay)
    assert b.underlay == old and b.dev is not None
    b.assert_ping(a.tunnel4, count=2, interval=0.05)
    a_pid, b_pid = a.pid, b.pid
    config_a, config_b = a.config_path.read_text(), b.config_path.read_text()
    roamed0 = a.status()["roamed"]

    # B moves: the new address comes, the old one goes, so the kernel sources B's
    # datagrams from the new one (IPv4: promote it when the primary is deleted).
    if not ipv6_underlay:
        b.exec(["sysctl", "-q", "-w", f"net.ipv4.conf.{b.dev}.promote_secondaries=1"], check=True)
    net.add_address(b.ns, b.dev, f"{new}/{prefix}")
    net.del_address(b.ns, b.dev, f"{old}/{prefix}")
    addrs = b.ip("-br", "addr", "show", "dev", b.dev).stdout
    assert new in addrs and f"{old}/" not in addrs, addrs

    if roamer_speaks_first:
        # traffic from B resumes at once (B's daemon still sends to A's fixed endpoint)
        b.wait_ping(a.tunnel4, timeout=5)
    else:
        # A speaks first: answered once B's keepalive has reached A from the new address
        took = a.wait_ping(b.tunnel4, timeout=10)
        print(f"A reached the idle roamer after {took:.1f} s")
    # both ways work at the new address
    b.assert_ping(a.tunnel4, count=3, interval=0.05)
    a.assert_ping(b.tunnel4, count=3, interval=0.05)
    a.assert_ping(b.tunnel6, count=3, interval=0.05)

    pa = a.peer("b")
    assert pa["endpoint"] == endpoint, pa
    assert pa["established"]
    assert a.status()["roamed"] == roamed0 + 1
    assert f"peer b: endpoint {old if not ipv6_underlay else f'[{old}]'}:5800 → {endpoint}" in (
        a.read_log()
    )
    # no config change, no restart
    assert a.config_path.read_text() == config_a
    assert b.config_path.read_text() == config_b
    assert (a.pid, b.pid) == (a_pid, b_pid)
    assert a.pids == [a_pid] and b.pids == [b_pid]
