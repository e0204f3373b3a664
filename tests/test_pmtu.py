"""The payload size follows the path for the life of a session (issue 12).

Three levels, all in memory on virtual clocks:

* the sans-IO ``PathProber`` against a scripted peer that answers pings whose datagram
  crosses a path of a given MTU (black-hole search, kernel limits, silence, budgets);
* two ``Session`` objects over ``wire_double.Link``, where the path narrows mid-stream
  (silently, or with EMSGSIZE from the "kernel") and widens again: nothing written after
  the shrink is lost for good, and what goes out mid-session is only §8 pings and pongs;
* whole ``Device``s over ``fakes.InMemoryWire``: a full-size flow through the tunnel
  while the path shrinks from 1500 to 1280 with ICMP (``icmp_delay``: the first oversize
  datagram is lost, then the sender's kernel knows) or without (``black_hole``), on IPv4
  and IPv6 underlays; routes, link MTU and the log line follow; the path widens again.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fakes import Sim, Tunnel, two_sites, udp4
from wire_double import Link, PathRules

from secureiod.secureio import MessageType, decode_negotiation, iter_messages, open_packet
from secureiod.secureio.constants import FRAGMENT_HEADER_SIZE, PACKET_OVERHEAD
from secureiod.secureio.events import PayloadSizeNegotiated, SessionState
from secureiod.secureio.fragment import FragmentHeader
from secureiod.secureio.identity import Identity
from secureiod.secureio.negotiation import MIN_PAYLOAD_SIZE, MIN_PROBE_SIZE
from secureiod.secureio.negotiation_message import (
    NegotiationControl,
    NegotiationProbe,
    encode_ping,
    pong_for,
)
from secureiod.secureio.pmtu import (
    ITERATION_BASE,
    REASON_BLACK_HOLE,
    REASON_KERNEL,
    REASON_RAISE,
    REASON_TOO_BIG,
    PathMtuOptions,
    PathProber,
    plateau_below,
)
from secureiod.secureio.session import Session, SessionOptions

RW = MessageType.READ_WRITE
NET = ipaddress.ip_network
V4_B = NET("198.19.0.2/32")
V6_B = NET("fd00:5ec::2/128")

# --- the prober against a scripted peer ------------------------------------------------------


@dataclass
class ScriptedPath:
    """Answers the prober's pings after ``rtt`` when their datagram crosses: payload + 53
    bytes of secureio headers + 28 of IPv4/UDP within ``mtu``. ``answer`` can refuse more
    (a peer that does not answer big pings, or none at all)."""

    prober: PathProber
    mtu: int = 1500
    rtt: float = 0.01
    now: float = 0.0
    largest_sent: int = 0
    """What the "session" keeps sending (the confirmation size), 0 when idle."""
    answer: Callable[[int], bool] | None = None
    refuse_over: int | None = None
    """The local kernel refuses pings above this payload with EMSGSIZE."""
    pings: list[tuple[float, int, int]] = field(default_factory=list)
    _pongs: list[tuple[float, int, bytes]] = field(default_factory=list)
    _seq: int = 0

    def crosses(self, size: int) -> bool:
        return size + PACKET_OVERHEAD + 28 <= self.mtu

    def _drain(self) -> None:
        for payload in self.prober.take_outgoing():
            msg = decode_negotiation(payload)
            assert isinstance(msg, NegotiationProbe) and not msg.is_pong
            if self.refuse_over is not None and msg.size > self.refuse_over:
                assert self.prober.probe_refused(msg.size, self.now)
                continue
            self.pings.append((self.now, msg.iteration, msg.size))
            ok = self.crosses(msg.size) and (self.answer is None or self.answer(msg.size))
            if ok:
                self._seq += 1
                heapq.heappush(self._pongs, (self.now + self.rtt, self._seq, pong_for(payload)))

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        for _ in range(1_000_000):
            self._drain()
            timer = self.prober.get_timer(self.largest_sent)
            pong_at = self._pongs[0][0] if self._pongs else None
            nxt = min(t for t in (timer, pong_at, end) if t is not None)
            self.now = max(self.now, nxt)
            if nxt >= end and (pong_at is None or pong_at > end) and (timer is None or timer > end):
                self.now = end
                return
            if pong_at is not None and pong_at <= self.now:
                _, _, pong = heapq.heappop(self._pongs)
                msg = decode_negotiation(pong)
                assert isinstance(msg, NegotiationProbe)
                assert self.prober.on_pong(msg, self.now)
            elif self.prober.handle_timer(self.now, self.largest_sent):
                pass  # a confirmation began; the session would reset its largest-sent here
        raise AssertionError("did not settle")


def started(size: int = 1408, ceiling: int = 1408, **options: float) -> PathProber:
    prober = PathProber(ceiling, PathMtuOptions(**options))  # type: ignore[arg-type]
    prober.start(size, 0.0)
    return prober


def test_plateaus() -> None:
    assert plateau_below(1408) == 1392  # 1500 with IPv6 headers
    assert plateau_below(1392) == 1376  # PPPoE's 1492
    assert plateau_below(1200) == 1168  # the IPv6 minimum, 1280
    assert plateau_below(400) == MIN_PROBE_SIZE


def test_a_black_hole_is_found_by_confirmations_and_searched_down() -> None:
    """1500 → 1280 without ICMP: full-size confirmations go unanswered while the small
    control comes back; two in a row start a search that settles on the largest 16-byte
    step that crosses (1280 - 28 - 53 = 1199 → 1184)."""
    path = ScriptedPath(started(), largest_sent=1408)
    path.run(3.0)
    assert path.prober.size == 1408  # the 1500-byte path confirms fine
    path.mtu = 1280
    path.run(5.0)
    decision = path.prober.take_decision()
    assert decision == (1184, REASON_BLACK_HOLE)
    stats = path.prober.stats
    assert stats.black_holes == 1 and stats.decreases == 1
    assert stats.probes_sent < 60


def test_the_kernel_limit_applies_at_once_without_a_probe() -> None:
    prober = started()
    prober.data_too_big(1408, 5.0, limit=1184)
    assert prober.take_decision() == (1184, REASON_KERNEL)
    assert prober.take_outgoing() == []
    # every later refusal of the same burst changes nothing
    prober.data_too_big(1408, 5.0, limit=1184)
    prober.data_too_big(1300, 5.0, limit=1184)
    assert prober.take_decision() is None


def test_emsgsize_without_a_limit_steps_to_a_plateau_then_searches() -> None:
    """An I/O layer that cannot read the kernel's path MTU (the asyncio API): the size
    drops to the next common plateau below the refused size, and a search between the two
    finds the rest (the "kernel" refuses above 1240 here)."""
    prober = started()
    path = ScriptedPath(prober, refuse_over=1240)
    prober.data_too_big(1408, 0.0)
    assert prober.take_decision() == (1392, REASON_TOO_BIG)
    path.run(2.0)
    assert prober.take_decision() == (1232, REASON_TOO_BIG)
    assert prober.kernel_limit is not None and 1240 <= prober.kernel_limit < 1248
    assert all(size <= 1240 for _, _, size in path.pings)  # nothing above left the host


def test_random_loss_is_not_a_black_hole() -> None:
    """5 % loss each way (about 10 % per round trip) for an hour of full-size traffic:
    a confirmation pair may fail now and then, but the search that follows tries the size
    again, so the size does not go down."""
    rng = random.Random(7)
    path = ScriptedPath(started(), largest_sent=1408, answer=lambda size: rng.random() > 0.0975)
    path.run(3600.0)
    stats = path.prober.stats
    assert stats.confirmations > 3000
    assert stats.black_holes >= 1  # the loss did fool the confirmations...
    assert stats.decreases == 0 and path.prober.size == 1408  # ...but not the search


def test_silence_concludes_nothing() -> None:
    """A peer (or path) that answers nothing is not a small path: the size stays."""
    path = ScriptedPath(started(), largest_sent=1408, answer=lambda size: False)
    path.run(120.0)
    assert path.prober.size == 1408
    assert path.prober.take_decision() is None
    assert path.prober.stats.searches == 0


def test_a_peer_that_never_answers_full_size_cannot_make_us_probe_in_a_loop() -> None:
    """Only small pongs come back, for an hour, while full-size traffic flows: one search
    takes the size down, and what follows is bounded (one confirmation a second, raises on
    a doubling timer, searches from a token bucket)."""
    path = ScriptedPath(started(), largest_sent=1408, answer=lambda size: size <= MIN_PROBE_SIZE)
    path.run(3600.0)
    stats = path.prober.stats
    assert path.prober.size == MIN_PROBE_SIZE or path.prober.size < 1408
    assert stats.searches <= 3 + 3600 / 20
    assert stats.probes_sent < 3600 * 5
    per_second: dict[int, int] = {}
    for t, _, _ in path.pings:
        per_second[int(t)] = per_second.get(int(t), 0) + 1
    assert max(per_second.values()) <= 40  # a search's rounds at most, never a flood


def test_raises_back_off_to_every_ten_minutes() -> None:
    """Below the ceiling on a path that stays narrow: raise tries at 10 s, then doubling
    intervals up to 600 s (RFC 8899's PMTU_RAISE_TIMER)."""
    path = ScriptedPath(started(size=1184), mtu=1280)
    path.run(3000.0)
    raises = sorted({t for t, _, size in path.pings if size == 1408})
    gaps = [round(b - a) for a, b in itertools.pairwise(raises)]
    assert round(raises[0]) == 10
    # each try waits answer_timeout (1 s) for pongs that never come, then backs off
    assert gaps[:5] == [21, 41, 81, 161, 321]
    assert max(gaps) == 601
    assert path.prober.size == 1184


def test_a_widened_path_is_used_again_at_the_next_raise() -> None:
    path = ScriptedPath(started(size=1184), mtu=1280)
    path.run(15.0)
    path.mtu = 1500
    path.run(25.0)
    assert path.prober.take_decision() == (1408, REASON_RAISE)
    assert path.prober.get_timer(0) is None  # at the ceiling: no more raises


def test_the_prober_never_goes_below_the_floor() -> None:
    """Review of issue 10, finding 1: E never goes below ``MIN_PAYLOAD_SIZE``, whatever
    the signals say: kernel limits below it, refusals down to nothing, a tiny path, a
    start below it, and a path whose every ping is refused."""
    prober = started()
    sizes = []
    for limit in (10, 0, 100, MIN_PAYLOAD_SIZE - 1, None):
        for refused in (1408, 600, 300, 148, 147, 100, 10):
            prober.data_too_big(refused, 1.0, limit)
            sizes.append(prober.size)
        prober.path_limit(limit or 1, 1.0)
        sizes.append(prober.size)
    assert min(sizes) == MIN_PAYLOAD_SIZE
    path = ScriptedPath(started(), largest_sent=1408, answer=lambda size: size <= 147)
    path.run(600.0)
    assert path.prober.size == MIN_PAYLOAD_SIZE
    low = started(size=10)
    assert low.size == MIN_PAYLOAD_SIZE
    assert plateau_below(10) == MIN_PAYLOAD_SIZE


def test_foreign_and_late_pongs_are_ignored() -> None:
    prober = started()
    # a pong of the §8 negotiation (small iteration): not ours
    assert not prober.on_pong(NegotiationProbe(True, 2, 1408), 1.0)
    # ours, but no round is out: late, ignored
    assert prober.on_pong(NegotiationProbe(True, ITERATION_BASE | 7, 1408), 1.0)
    prober.handle_timer(2.0, 1408)
    (iteration,) = {decode_negotiation(p).iteration for p in prober.take_outgoing()}  # type: ignore[union-attr]
    # a size we did not ask for in this round does not count
    assert prober.on_pong(NegotiationProbe(True, iteration, 1000), 2.01)
    assert prober.busy
    assert prober.stats.answers == 0


# --- two sessions over a datagram path -------------------------------------------------------


def make_link(
    *, fragmentation: bool = False, path_mtu: PathMtuOptions | None = None, limit: int = 1408
) -> Link:
    ia, ib = Identity.generate(), Identity.generate()
    opts = SessionOptions(
        payload_size_limit=limit,
        enable_fragmentation=fragmentation,
        path_mtu=path_mtu or PathMtuOptions(),
    )
    a = Session(ia, ib.public_key, created_at_ns=1, options=opts, random=random.Random(1).randbytes)
    b = Session(ib, ia.public_key, created_at_ns=2, options=opts, random=random.Random(2).randbytes)
    link = Link(a, b, PathRules())
    link.start()
    link.run(5.0, until=lambda: a.is_established and b.is_established)
    assert a.payload_size == b.payload_size == limit
    return link


def stream(
    link: Link, seconds: float, size: Callable[[], int], every: float = 0.002
) -> list[bytes]:
    """A writes one message every ``every`` seconds for ``seconds``; returns them."""
    written = []
    end = link.now + seconds
    n = 0
    while link.now < end:
        n += 1
        payload = n.to_bytes(4, "big") + bytes(max(0, size() - 4))
        link.a.session.write_message(RW, payload, link.now)
        written.append(payload)
        link.pump()
        link.run(every)
    return written


def test_session_follows_a_black_hole_mid_stream_and_widens_again() -> None:
    link = make_link()
    a = link.a.session
    stream(link, 1.0, lambda: a.payload_size)
    link.rules[id(a)].max_datagram = 1280 - 28  # silently, no EMSGSIZE
    shrunk_at = link.now
    written = stream(link, 4.0, lambda: a.payload_size)
    assert a.payload_size == 1184 and a.payload_size_reason == REASON_BLACK_HOLE
    assert [e.size for e in link.a.events if isinstance(e, PayloadSizeNegotiated)][-1] == 1184
    # everything written after the decrease arrived
    got = set(link.b.messages(RW))
    late = [w for w in written if len(w) <= 1184]
    assert late and all(w in got for w in late)
    assert a.path_mtu_stats.black_holes == 1
    assert link.now - shrunk_at < 5
    link.rules[id(a)].max_datagram = None
    link.run(15.0)
    assert a.payload_size == 1408 and a.payload_size_reason == REASON_RAISE


class RefusingLink(Link):
    """The local "kernel" refuses datagrams above ``refuse_over`` with EMSGSIZE, and the
    I/O layer hands them back to the session with the kernel's limit, as the daemon does."""

    refuse_over: int | None = None
    with_limit: bool = True

    def pump(self) -> None:
        ep = self.a
        original = ep.session.datagrams_to_send

        def sender(now: float) -> list[tuple[bytes, tuple[str, int]]]:
            out = []
            for _ in range(8):
                batch = original(now)
                if not batch:
                    break
                for d, addr in batch:
                    if self.refuse_over is not None and len(d) > self.refuse_over:
                        limit = self.refuse_over - PACKET_OVERHEAD if self.with_limit else None
                        ep.session.report_too_big(len(d), now, datagram=d, path_limit=limit)
                    else:
                        out.append((d, addr))
            return out

        ep.session.datagrams_to_send = sender  # type: ignore[method-assign]
        try:
            super().pump()
        finally:
            del ep.session.datagrams_to_send


def refusing_link(**kwargs: object) -> RefusingLink:
    link = make_link(**kwargs)  # type: ignore[arg-type]
    refusing = RefusingLink.__new__(RefusingLink)
    refusing.__dict__.update(link.__dict__)
    return refusing


@pytest.mark.parametrize("with_limit", [True, False], ids=["kernel-limit", "no-limit"])
def test_messages_refused_with_emsgsize_are_sent_again_at_the_new_size(with_limit: bool) -> None:
    """Nothing written after the path narrowed is lost: each datagram the kernel refuses
    is opened again and its messages re-sent at the new size (re-fragmented when they no
    longer fit, with fragmentation on)."""
    link = refusing_link(fragmentation=True)
    link.with_limit = with_limit
    a = link.a.session
    rng = random.Random(3)
    before = stream(link, 0.2, lambda: 1408)
    link.refuse_over = 1280 - 28  # the kernel learned the path MTU
    after = stream(link, 0.5, lambda: rng.choice([1408, 1300, 900, 40]))
    big = [rng.randbytes(20_000) for _ in range(3)]
    for payload in big:
        a.write_message(RW, payload, link.now)
    link.pump()
    link.run(3.0)
    got = link.b.messages(RW)
    assert sorted(got) == sorted(before + after + big)
    assert a.payload_size + PACKET_OVERHEAD <= 1280 - 28
    assert a.payload_size_reason == (REASON_KERNEL if with_limit else REASON_TOO_BIG)
    assert a.path_mtu_stats.resent_messages > 0
    assert a.stats.drops["send-too-big"] == 0


def test_without_fragmentation_what_no_longer_fits_is_dropped_and_counted() -> None:
    link = refusing_link()
    a = link.a.session
    link.refuse_over = 1280 - 28
    a.write_message(RW, b"x" * 1408, link.now)  # accepted at E = 1408, refused by the kernel
    a.write_message(RW, b"y" * 100, link.now)
    link.pump()
    link.run(1.0)
    assert link.b.messages(RW) == [b"y" * 100]
    assert a.stats.drops["send-too-big"] == 1
    assert a.payload_size == 1280 - 28 - PACKET_OVERHEAD


def test_refragmented_fragments_start_on_64_byte_words() -> None:
    """A reference receiver counts fragment coverage per 64-byte word (PROTOCOL §9.2):
    pieces of a re-split fragment start on word boundaries, so its count stays exact."""
    link = refusing_link(fragmentation=True)
    a = link.a.session
    link.refuse_over = 1280 - 28
    payload = random.Random(4).randbytes(10_000)
    sent: list[bytes] = []
    original = a._seal

    def spy(key: object, messages: bytes, now: float) -> None:
        sent.append(messages)
        original(key, messages, now)  # type: ignore[arg-type]

    a._seal = spy  # type: ignore[method-assign]
    a.write_message(RW, payload, link.now)
    link.pump()
    link.run(1.0)
    assert link.b.messages(RW) == [payload]
    starts = []
    for messages in sent:
        for m in iter_messages(messages):
            if m.flags & 0x02:
                starts.append(FragmentHeader.decode(m.payload).start_pos)
    original_chunk = 1408 - FRAGMENT_HEADER_SIZE
    resplit = [s for s in starts if s % original_chunk]
    assert resplit and all(s % 64 == 0 for s in resplit)


def test_mid_session_probing_sends_only_pings_and_pongs() -> None:
    """Wire compatibility with a reference (Go) peer: its negotiation handler stays
    registered and answers pings forever, but a control or END after its negotiation
    ended may block it (§13 item 19). So mid-session we send pings (and answer pings with
    pongs), never a control; and a peer that does no tracking of its own (as Go) answers
    ours."""
    link = make_link(path_mtu=PathMtuOptions())
    b = link.b.session
    b._prober.stop()  # B behaves as a reference peer: it only answers
    a = link.a.session
    link.run_past_late_ends()  # (the initial negotiation's ENDs: not mid-session)
    first = len(link.a.sent), len(link.b.sent)
    link.rules[id(a)].max_datagram = 1280 - 28
    stream(link, 4.0, lambda: a.payload_size)
    assert a.payload_size == 1184
    negotiation = 0
    for ep, start in ((link.a, first[0]), (link.b, first[1])):
        session = ep.session
        keys = [session._kx.send_key, session.fallback_key[0]]  # what it sealed with
        for d in ep.sent[start:]:
            opened = open_packet(d, keys)  # type: ignore[arg-type]
            for m in iter_messages(opened.messages):
                if m.type == MessageType.NEGOTIATION:
                    msg = decode_negotiation(m.payload)
                    assert not isinstance(msg, NegotiationControl)
                    assert isinstance(msg, NegotiationProbe)
                    assert msg.iteration >= ITERATION_BASE
                    negotiation += 1
    assert negotiation > 0


def test_a_mid_session_ping_is_answered_with_a_pong_of_its_size() -> None:
    """What a prober on the other side (ours or a future one) relies on."""
    link = make_link()
    b = link.b.session
    assert b.state == SessionState.ESTABLISHED
    b._handle_negotiation(memoryview(encode_ping(ITERATION_BASE | 5, 1000)), link.now)
    b._after_input(link.now)
    ((datagram, _),) = b.datagrams_to_send(link.now)
    assert len(datagram) == 1000 + PACKET_OVERHEAD


# --- whole devices ---------------------------------------------------------------------------


class Flow:
    """A bulk sender on site a's TUN toward b's tunnel address: one packet of the route MTU
    (what TCP would send) every ``interval``, numbered, until ``stop``."""

    def __init__(self, tunnel: Tunnel, interval: float = 0.001) -> None:
        self.tunnel = tunnel
        self.a, self.b = tunnel.nodes["a"], tunnel.nodes["b"]
        self.interval = interval
        self.sent = 0
        self.received: list[tuple[float, int]] = []
        self.running = True
        self.a.loop.call_at(tunnel.sim.now, self._tick)

    def _tick(self, now: float) -> None:
        if not self.running:
            return
        mtu = self.a.netlink.routes[V4_B][1] or 1400
        payload = self.sent.to_bytes(4, "big") + bytes(mtu - 32)
        self.a.tun.inject(udp4("198.19.0.1", "198.19.0.2", payload))
        self.sent += 1
        self.a.loop.call_at(now + self.interval, self._tick)

    def collect(self) -> None:
        now = self.tunnel.sim.now
        for packet in self.b.tun.take():
            self.received.append((now, int.from_bytes(packet[28:32], "big")))

    def run(self, seconds: float, step: float = 0.01) -> None:
        end = self.tunnel.sim.now + seconds
        while self.tunnel.sim.now < end:
            self.tunnel.sim.run_for(step)
            self.collect()

    def resumed_after(self, t0: float, first_seq: int) -> float | None:
        """Virtual seconds from ``t0`` until a packet sent after it arrived."""
        for t, seq in self.received:
            if seq >= first_seq:
                return t - t0
        return None


def narrow(sim: Sim, ipv6: bool, **conditions: object) -> None:
    a, b = ("fd00:5ec:ff::1", "fd00:5ec:ff::2") if ipv6 else ("198.18.0.1", "198.18.0.2")
    sim.wire.link(a, b, **conditions)


@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("icmp", [True, False], ids=["icmp", "black-hole"])
def test_device_follows_the_path_down_mid_stream_and_back_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, ipv6: bool, icmp: bool
) -> None:
    caplog.set_level(logging.INFO, logger="secureiod")
    tunnel = Tunnel(two_sites(tmp_path, ipv6_underlay=ipv6))
    for node in tunnel.nodes.values():
        node.udp.gso = True  # as the daemon's socket: runs of datagrams share their fate
    tunnel.wait_established(timeout=5)
    full, small = (1392, 1168) if ipv6 else (1408, 1184)
    a = tunnel.nodes["a"]
    session = tunnel.peer("a", "b").session
    assert session is not None and session.payload_size == full
    flow = Flow(tunnel)
    flow.run(1.0)
    t0, first_seq = tunnel.sim.now, flow.sent
    if icmp:
        narrow(tunnel.sim, ipv6, mtu=1280, icmp_delay=0.002, pmtu_expires=20.0)
    else:
        narrow(tunnel.sim, ipv6, mtu=1280, black_hole=True)
    flow.run(5.0)
    resumed = flow.resumed_after(t0, first_seq)
    assert resumed is not None and resumed < (0.1 if icmp else 1.5), resumed
    assert session.payload_size == small
    assert a.netlink.routes[V4_B] == ("sio0", small)
    assert a.netlink.routes[V6_B] == ("sio0", 1280)
    assert a.netlink.mtu["sio0"] == 1280
    line = f"peer b: path MTU {full} → {small}"
    assert sum(line in r.getMessage() for r in caplog.records) == 1, caplog.text
    # after the shrink, what was sent arrives (re-sent when refused): only the few
    # datagrams on their way when the path narrowed, and (without ICMP) those sent until
    # the black hole was found, are lost
    lost = {s for s in range(first_seq, flow.sent - 50)} - {s for _, s in flow.received}
    assert len(lost) < (10 if icmp else 1500), len(lost)
    assert session.stats.drops["send-too-big"] == 0
    # the path widens again: used within the next raise (or the kernel forgetting)
    narrow(tunnel.sim, ipv6, mtu=1500, black_hole=False)
    flow.interval = 0.05
    flow.run(45.0, step=0.5)
    assert session.payload_size == full
    assert a.netlink.routes[V4_B] == ("sio0", full)
    assert f"peer b: path MTU {small} → {full}" in caplog.text


def test_a_roam_to_a_narrower_path_takes_the_kernel_limit_at_once(tmp_path: Path) -> None:
    """b moves to a network whose path MTU the kernel knows (1280): a's session drops to
    what the kernel will send as soon as it adopts b's new address, before any probe."""
    tunnel = Tunnel(two_sites(tmp_path))
    tunnel.wait_established(timeout=5)
    sim = tunnel.sim
    sim.wire.link("198.18.0.1", "198.18.0.12", mtu=1280)
    sim.wire.rebind(tunnel.nodes["b"].udp, "198.18.0.12", 40000)
    tunnel.round_trip("b", "a")
    session = tunnel.peer("a", "b").session
    assert session is not None
    assert session.endpoint == ("198.18.0.12", 40000)
    assert session.payload_size == 1184
    assert tunnel.nodes["a"].netlink.routes[V4_B] == ("sio0", 1184)


def test_kernel_readings_are_bounded_during_a_refusal_burst(tmp_path: Path) -> None:
    """Hundreds of datagrams refused in one burst cost one look-up of the kernel's route."""
    tunnel = Tunnel(two_sites(tmp_path))
    tunnel.wait_established(timeout=5)
    pmtu = tunnel.devices["a"].lifecycle.pmtu
    reads = pmtu.reads
    narrow(tunnel.sim, False, mtu=1280)  # the kernel knows at once: every send is refused
    a = tunnel.nodes["a"]
    for n in range(200):
        a.tun.inject(udp4("198.19.0.1", "198.19.0.2", n.to_bytes(4, "big") + bytes(1408 - 32)))
    tunnel.sim.run_for(0.05)
    assert pmtu.reads - reads <= 2
    assert len(tunnel.delivered("b")) == 200  # all of them: re-sent at the new size
    assert tunnel.sim.wire.stats.too_big >= 1


def test_a_change_held_back_by_the_log_limit_gets_a_trailing_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two changes inside one rate-limit window: the second is not the log's last word
    for ever — when the window closes one line gives the size in use."""
    from fakes import FakeNetlink, SimLoop, VirtualClock

    from secureiod.daemon.pmtu import LOG_INTERVAL, PathMtu

    caplog.set_level(logging.INFO, logger="secureiod")
    clock = VirtualClock()
    loop = SimLoop(clock)
    pmtu = PathMtu(FakeNetlink(), loop, set())

    class _Peer:  # what PathMtu reads of a peer
        name = "b"
        endpoint = None
        session = type(
            "S",
            (),
            {
                "payload_size_reason": "black-hole",
                "options": type("O", (), {"payload_size_limit": 1408})(),
            },
        )()

    peer = _Peer()
    now = clock.monotonic()
    pmtu.on_payload_size(peer, 1408, now)  # type: ignore[arg-type]
    pmtu.on_payload_size(peer, 1312, now)  # type: ignore[arg-type]
    pmtu.on_payload_size(peer, 1264, now + 1)  # type: ignore[arg-type]
    lines = [r.getMessage() for r in caplog.records if "path MTU" in r.getMessage()]
    assert len(lines) == 1 and "1408 → 1312" in lines[0]
    clock.advance_to(now + 1 + LOG_INTERVAL + 0.1)
    loop.step(clock.monotonic())
    lines = [r.getMessage() for r in caplog.records if "path MTU" in r.getMessage()]
    assert len(lines) == 2 and "path MTU now 1264" in lines[1], lines
