"""What a peer or an odd packet must not be able to do to a device (issue 10, review).

* a message the session refuses is a counted drop, never an exception out of the send
  path (``SendPath.write``);
* a peer toggling its offload capabilities cannot turn each message into a log line and
  a TSO ioctl (``OffloadCaps``);
* a peer's timer deadline is exactly the instant its check turns true, so the loop never
  re-arms a timer for the instant it is already at (the in-memory livelock of the review);
* a read that found a queue makes the next one take a whole batch, however far apart
  other work on the loop spaces the wake-ups (``BatchSize``).

In memory over ``tests/fakes.py``; ``SimLoop`` lets exceptions through, so anything that
escapes a callback fails the test.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fakes import Tunnel, two_sites
from hypothesis import given
from hypothesis import strategies as st

from secureiod.daemon.offload import (
    CAP_LOSSY,
    CAP_VNET,
    CAPS_BURST,
    CAPS_INTERVAL,
    CAPS_TYPE,
    OffloadCaps,
    encode_caps,
)
from secureiod.daemon.peer import OffloadState, Peer, PeerTiming
from secureiod.daemon.send import BATCH, BUSY_GAP, BatchSize
from secureiod.secureio.constants import KX_PACKET_SIZE
from secureiod.secureio.errors import MalformedError
from secureiod.secureio.events import SessionState

ATTACKER = ("198.18.0.66", 6666)

# -- the send path -------------------------------------------------------------------------


def test_a_message_the_session_refuses_is_a_counted_drop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: a ValueError (or any SecureioError other than the three expected ones)
    from ``write_message`` escaped ``SendPath.write`` and ended the wake-up, with the
    rest of its packets, and in the daemon the event loop."""
    tunnel = Tunnel(two_sites(tmp_path))
    tunnel.wait_established(timeout=5)
    peer = tunnel.peer("a", "b")
    assert peer.session is not None
    errors: list[Exception] = [ValueError("odd"), MalformedError("odder")]
    real = peer.session.write_message

    def refusing(mtype: int, payload: Any, now: float) -> None:
        if errors:
            raise errors.pop(0)
        real(mtype, payload, now)

    def refusing_each(
        mtype: int, payloads: Any, now: float, offset: int = 0
    ) -> list[tuple[int, Exception]]:
        """``write_messages`` as the session refuses: in place, the rest still written."""
        refused: list[tuple[int, Exception]] = []
        for i, payload in enumerate(payloads):
            try:
                refusing(mtype, payload[offset:], now)
            except (ValueError, MalformedError) as exc:
                refused.append((i, exc))
        return refused

    monkeypatch.setattr(peer.session, "write_message", refusing)
    monkeypatch.setattr(peer.session, "write_messages", refusing_each)
    for seq in range(3):
        tunnel.ping("a", "b", seq)
    tunnel.sim.run_for(0.1)
    assert peer.counters.drops["refused-by-session"] == 2
    assert len(tunnel.nodes["b"].tun.packets()) == 1  # the third went through


# -- capabilities --------------------------------------------------------------------------


def test_a_peer_toggling_its_caps_cannot_flood_the_log_or_the_tun(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Review: 500 caps messages alternating 0 and 1 in one second gave 499 INFO lines
    (and, with offload on, 499 TUNSETOFFLOAD ioctls)."""
    tunnel = Tunnel(two_sites(tmp_path), vnet_hdr=["a", "b"])
    tunnel.wait_established(timeout=5)
    tunnel.sim.run_for(0.1)
    caplog.set_level(logging.INFO)
    caplog.clear()
    a = tunnel.devices["a"]
    b_peer = tunnel.peer("a", "b")
    b_tun = tunnel.nodes["b"].tun
    ioctls_before = len(b_tun.offload_history)
    for i in range(500):
        tunnel.call("a", lambda now, i=i: a.send.write(b_peer, CAPS_TYPE, encode_caps(i & 1), now))
        tunnel.sim.run_for(0.002)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("secureiod")]
    print(f"\n{len(lines)} log lines, {len(b_tun.offload_history) - ioctls_before} ioctls")
    assert len(lines) <= 2 * CAPS_BURST, lines
    assert len(b_tun.offload_history) - ioctls_before <= CAPS_BURST
    assert tunnel.devices["b"].offload.caps_deferred >= 1


@dataclass
class StubSession:
    last_received: float | None = 0.0
    is_established: bool = True
    fragment_chains: tuple[int, int] = (0, 0)


@dataclass
class StubPeer:
    name: str = "b"
    session: StubSession = field(default_factory=StubSession)
    offload: OffloadState = field(default_factory=OffloadState)
    state: SessionState = SessionState.ESTABLISHED


class StubTun:
    name = "sio0"
    vnet_hdr = True

    def __init__(self) -> None:
        self.offload = 0
        self.history: list[int] = []

    def set_offload(self, flags: int) -> None:
        self.offload = flags
        self.history.append(flags)


def test_caps_changes_past_the_burst_wait_and_the_latest_wins() -> None:
    tun = StubTun()
    caps = OffloadCaps(tun, lambda *args: True, "sio0")  # type: ignore[arg-type]
    peer = StubPeer()
    peers: list[Any] = [peer]
    t = 100.0
    for value in (CAP_VNET, 0, CAP_VNET)[:CAPS_BURST]:  # a burst is applied at once
        caps.on_caps(peer, encode_caps(value), peers, t)  # type: ignore[arg-type]
        assert peer.offload.remote_caps == value
    caps.on_caps(peer, encode_caps(0), peers, t)  # type: ignore[arg-type]
    caps.on_caps(peer, encode_caps(CAP_VNET | CAP_LOSSY), peers, t + 1)  # type: ignore[arg-type]
    assert peer.offload.remote_caps == CAP_VNET and peer.offload.pending_caps == 3
    caps.check_loss(peers, t + CAPS_INTERVAL / 2)  # type: ignore[arg-type]
    assert peer.offload.remote_caps == CAP_VNET
    caps.check_loss(peers, t + CAPS_INTERVAL)  # type: ignore[arg-type]
    assert peer.offload.remote_caps == CAP_VNET | CAP_LOSSY  # the latest, not 0
    assert peer.offload.pending_caps is None
    # announcing the applied value again cancels a pending change
    caps.on_caps(peer, encode_caps(0), peers, t + CAPS_INTERVAL)  # type: ignore[arg-type]
    caps.on_caps(peer, encode_caps(CAP_VNET | CAP_LOSSY), peers, t + CAPS_INTERVAL)  # type: ignore[arg-type]
    assert peer.offload.pending_caps is None
    # the time of the carrying datagram when the caller gives none
    peer.session.last_received = t + 3 * CAPS_INTERVAL
    caps.on_caps(peer, encode_caps(CAP_VNET), peers)  # type: ignore[arg-type]
    assert peer.offload.remote_caps == CAP_VNET
    assert len(tun.history) <= 5


# -- deadlines -----------------------------------------------------------------------------


def stub_peer(tmp_path: Path) -> Peer:
    builder = two_sites(tmp_path)
    config = builder.load("a")
    return Peer(config.peers[0], config.identity, PeerTiming(), 1400)


class TimedSession:
    state = SessionState.ESTABLISHED
    is_established = True

    def __init__(self, last_sent: float, last_received: float) -> None:
        self.last_sent = last_sent
        self.last_received = last_received

    def get_timer(self) -> None:
        return None


def test_the_review_instant_keepalive_is_due_at_its_deadline(tmp_path: Path) -> None:
    """Review: last_sent 2045.0109999999997 + 5 = 2050.0109999999995, but at that instant
    ``now - last_sent`` is 4.999999999999773: not due, and the timer re-armed for the
    same instant, 10,001 times."""
    peer = stub_peer(tmp_path)
    peer.session = TimedSession(2045.0109999999997, 2045.0109999999997)  # type: ignore[assignment]
    deadline = peer.next_deadline()
    assert deadline == 2050.0109999999995
    assert deadline - 2045.0109999999997 < 5.0  # the rounding the old check tripped on
    assert peer.keepalive_due(deadline)
    assert not peer.keepalive_due(deadline - 1e-9)


@pytest.fixture(scope="module")
def one_peer(tmp_path_factory: pytest.TempPathFactory) -> Peer:
    return stub_peer(tmp_path_factory.mktemp("peer"))


@given(
    last_sent=st.floats(min_value=0.0, max_value=1e7, allow_nan=False),
    silent=st.floats(min_value=0.0, max_value=1e3, allow_nan=False),
    keepalive=st.sampled_from([1.0, 5.0, 25.0, 0.3]),
)
def test_every_deadline_is_the_instant_its_check_turns_true(
    last_sent: float, silent: float, keepalive: float, one_peer: Peer
) -> None:
    """Keepalive and dead-peer deadlines at any time and interval: the check at the
    deadline says due (the old ``now - last >= interval`` did not, for some sums)."""
    peer = one_peer
    peer.keepalive_interval = keepalive
    peer.restart_at = None
    peer.session = TimedSession(last_sent, last_sent - silent)  # type: ignore[assignment]
    deadline = peer.next_deadline()
    assert deadline is not None
    due = peer.keepalive_due(deadline) or peer.needs_restart(deadline) is not None
    assert due, (last_sent, silent, keepalive, deadline)


def test_a_replayed_old_key_exchange_does_not_livelock_the_simulator(tmp_path: Path) -> None:
    """The review's in-memory repro (dbg_livelock.py): 17 minutes of key rotations, one
    old key exchange replayed from another address, then a keepalive deadline that the
    check did not consider due: SimError after 10,001 wake-ups at one instant."""
    tunnel = Tunnel(two_sites(tmp_path), start=[])
    a_addr, b_addr = tunnel.nodes["a"].address, tunnel.nodes["b"].address
    cap = tunnel.sim.wire.capture(lambda dg: dg.src == a_addr and len(dg.data) == KX_PACKET_SIZE)
    tunnel.start("a")
    tunnel.start("b")
    tunnel.wait_established(timeout=5)
    tunnel.sim.run_for(17 * 60 + 5)
    tunnel.sim.wire.inject(ATTACKER, b_addr, cap[0].data)
    for _ in range(300):  # 30 s, as the repro (it failed after about 5 s)
        tunnel.sim.run_for(0.1)
    assert tunnel.peer("a", "b").state == SessionState.ESTABLISHED
    assert tunnel.peer("b", "a").state == SessionState.ESTABLISHED


# -- batch size ----------------------------------------------------------------------------


def test_a_queue_found_by_one_read_makes_the_next_read_a_whole_batch() -> None:
    """Review: control work spaced the wake-ups more than 2 ms apart, so every read took
    one packet per descriptor per wake-up while a queue built up."""
    batch = BatchSize()
    t = 10.0
    assert batch.on_wake(t) == 1  # after a quiet spell: one packet
    batch.note(1)  # ... and there was one: there may be more
    t += 0.005  # a busy loop: the next wake-up only 5 ms later (> BUSY_GAP)
    assert BUSY_GAP < 0.005
    assert batch.on_wake(t) == BATCH
    batch.note(40)
    for _ in range(5):  # the queue stays: whole batches, however far apart
        t += 0.008
        assert batch.on_wake(t) == BATCH
        batch.note(BATCH)
    t += 0.008
    assert batch.on_wake(t) == BATCH
    batch.note(1)  # drained: one packet where a batch was allowed
    t += 0.008
    assert batch.on_wake(t) == 1
    batch.note(0)
    assert batch.on_wake(t + 0.0005) == BATCH  # back to back: load by the old rule too


def test_lone_packets_are_still_read_one_at_a_time() -> None:
    """A ping a second: every read takes one packet (no extra read until EAGAIN)."""
    batch = BatchSize()
    for i in range(10):
        t = 10.0 + i
        assert batch.on_wake(t) == 1
        batch.note(1)
        assert batch.on_wake(t + 0.0003) == BATCH  # its reply, right after
        batch.note(1)
