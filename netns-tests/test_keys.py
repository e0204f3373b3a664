"""A peer configured with the wrong public key never establishes: its key-exchange packets
fail signature verification, are counted as ``kx-bad-signature``, and the log says why."""

from __future__ import annotations

import re
import time

import pytest
from harness import Net, Node

OBSERVE = 3.0
"""Seconds to watch: three key-exchange retries (one per second) must all be refused."""


def _start_with_wrong_key(net: Net) -> tuple[Node, Node]:
    a, b = net.pair(start=False)
    a.peer_specs[0]["public_key"] = net.genkey("stranger")  # A expects the wrong key for b
    a.start(wait=False)
    b.start(wait=False)
    a.wait_ready()
    b.wait_ready()
    return a, b


def _watch_never_established(a: Node, b: Node) -> None:
    """Poll both sides every 50 ms for OBSERVE s: neither may ever be established."""
    deadline = time.monotonic() + OBSERVE
    while time.monotonic() < deadline:
        pa, pb = a.peer("b"), b.peer("a")
        assert not pa["established"] and pa["state"] != "established", pa
        assert not pb["established"] and pb["state"] != "established", pb
        time.sleep(0.05)


@pytest.fixture
def wrong_key(net: Net) -> tuple[Node, Node]:
    a, b = _start_with_wrong_key(net)
    _watch_never_established(a, b)
    return a, b


def test_wrong_public_key_never_establishes(wrong_key: tuple[Node, Node]) -> None:
    a, b = wrong_key
    pa = a.peer("b")
    # B's key-exchange packets reached A and were refused, again and again
    assert pa["session_drops"].get("kx-bad-signature", 0) >= 2, pa
    assert pa["payload_size"] is not None and pa["mtu"] is None  # never negotiated
    assert a.status()["peers_established"] == 0
    assert b.status()["peers_established"] == 0
    # nothing passes: the ping fails and A counts the packets it could not send
    result = a.ping(b.tunnel4, count=2, interval=0.1, wait=0.5)
    assert result.returncode != 0
    assert " 0 received" in result.stdout
    assert a.peer("b")["rx_packets"] == 0
    assert b.peer("a")["rx_packets"] == 0


def test_wrong_public_key_is_logged(wrong_key: tuple[Node, Node]) -> None:
    """An operator reading A's log must learn that peer b's key exchange fails its
    signature check (i.e. the configured public key is wrong)."""
    a, _ = wrong_key
    log = a.read_log()
    pattern = re.compile(r"peer b\b.*(signature|public key|wrong key|key mismatch)", re.I)
    assert pattern.search(log), (
        "A refused every key exchange of peer b (kx-bad-signature counted in "
        "`peers --json`), but its log never says so:\n" + log
    )
