"""The receive-side batch path (``_rxbatch.c``, ``rxbatch.py``, ``Session.receive_datagram_run``,
``Demultiplexer.receive_run``, ``UdpSocket.recv_runs``): a run of datagrams gives exactly
what feeding them one by one gives, for hostile runs too, with the pure-Python path as the
reference."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from identities import ID_A, ID_B

from secureiod.secureio import MessageType
from secureiod.secureio.constants import FRAGMENT_HEADER_SIZE, PACKET_OVERHEAD
from secureiod.secureio.demux import Demultiplexer
from secureiod.secureio.errors import AuthenticationError, MalformedError
from secureiod.secureio.events import MessageReceived
from secureiod.secureio.identity import Identity
from secureiod.secureio.keyexchange import KeyExchangeOptions
from secureiod.secureio.packet import KeyRing, PacketKey, open_python, seal_python
from secureiod.secureio.reassembly import Reassembler, fragment_message
from secureiod.secureio.replay import ReplayWindow
from secureiod.secureio.rxbatch import RXBATCH
from secureiod.secureio.rxbatch import open_run as rxbatch_open_run
from secureiod.secureio.session import Session, SessionOptions
from secureiod.udp import UdpSocket

needs_batch = pytest.mark.skipif(
    RXBATCH is None, reason="needs the _rxbatch extension (pip install -e .)"
)

ID_C = Identity.from_seed(bytes(range(64, 96)))
ADDR_A = ("198.18.0.1", 5800)
ADDR_A2 = ("198.18.0.9", 5900)
ADDR_B = ("198.18.0.2", 5800)
RW = MessageType.READ_WRITE


# --- the C function against the reference --------------------------------------------------


def _keys() -> tuple[list[PacketKey], KeyRing]:
    keys = [
        PacketKey.session(bytes(range(32)), bytes(16)),
        PacketKey.session(bytes(range(1, 33)), bytes(range(16))),
        PacketKey.aux(bytes(range(2, 34))),
        PacketKey.clear(),
    ]
    return keys, KeyRing(keys)


def _reference_groups(data: bytes, seg: int, keys: list[PacketKey], mask: int) -> list[Any]:
    """What open_run must return, computed datagram by datagram with packet.open_python."""
    per: list[Any] = []
    for i, start in enumerate(range(0, len(data), seg)):
        d = data[start : start + seg]
        try:
            o = open_python(d, keys, mask)
        except MalformedError:
            per.append((i, 1))
            continue
        except AuthenticationError:
            per.append((i, 2))
            continue
        m = o.messages
        frag = None
        if len(m) >= 33 and m[8] & 2 and int.from_bytes(m[4:8], "little") + 9 == len(m):
            chain, st, total = (int.from_bytes(m[k : k + 8], "little") for k in (9, 17, 25))
            chunk = len(m) - 33
            if chunk > 0 and total > 0 and st <= total and chunk <= total - st:
                frag = (int.from_bytes(m[:4], "little"), chain, total, st, m[33:])
        per.append((i, o.key_index, o.packet_id, m, frag, len(d)))
    groups: list[Any] = []
    k = 0
    while k < len(per):
        g = per[k]
        if len(g) == 2:
            groups.append(g)
            k += 1
            continue
        if g[4] is None:
            groups.append(g[:4])
            k += 1
            continue
        j = k + 1
        while j < len(per):
            p, q = per[j - 1], per[j]
            if not (
                len(q) == 6
                and q[4] is not None
                and q[1] == p[1]
                and q[2] == p[2] + 1
                and q[4][:3] == p[4][:3]
                and q[4][3] == p[4][3] + len(p[4][4])
            ):
                break
            j += 1
        mtype, chain, total, st, _ = g[4]
        chunks = b"".join(per[x][4][4] for x in range(k, j))
        wire = sum(per[x][5] for x in range(k, j))
        groups.append((k, j - k, g[1], g[2], mtype, chain, total, st, chunks, wire))
        k = j
    return groups


@needs_batch
def test_open_run_matches_the_reference_on_hostile_runs() -> None:
    keys, ring = _keys()
    rng = random.Random(7)
    mask = 0x1234
    for trial in range(300):
        seg = rng.choice([44, 60, 200, 1445])
        key = rng.choice(keys)
        pid = rng.randrange(1, 1 << 64) if rng.random() < 0.1 else rng.randrange(1, 1000)
        total = rng.choice([100, 5000, 65536])
        chain = rng.randrange(1, 5)
        datagrams = []
        chunk = seg - PACKET_OVERHEAD - FRAGMENT_HEADER_SIZE
        payload = rng.randbytes(total)
        frags = fragment_message(RW, payload, chain, seg - PACKET_OVERHEAD) if chunk > 0 else []
        start = rng.randrange(0, max(1, len(frags)))
        for f in frags[start : start + rng.randrange(1, 50)]:
            datagrams.append(bytearray(seal_python(key, pid & ((1 << 64) - 1) or 1, f, mask)))
            pid += 1
        while len(datagrams) < 3:
            datagrams.append(bytearray(rng.randbytes(seg)))
        for d in datagrams:  # hostile changes
            r = rng.random()
            if r < 0.05:
                d[rng.randrange(len(d))] ^= 1 << rng.randrange(8)
            elif r < 0.08:
                d[:] = rng.randbytes(len(d))
            elif r < 0.1:
                d[:8] = (mask).to_bytes(8, "little")  # packet id 0
        if rng.random() < 0.2:
            k = rng.randrange(len(datagrams) - 1)
            datagrams[k], datagrams[k + 1] = datagrams[k + 1], datagrams[k]
        if rng.random() < 0.2:
            datagrams[-1] = datagrams[-1][: rng.randrange(1, len(datagrams[-1]) + 1)]
        # every datagram but the last is seg bytes (the GRO layout)
        datagrams = [bytes(d[:seg]).ljust(seg, b"\0") for d in datagrams[:-1]] + [
            bytes(datagrams[-1][:seg])
        ]
        data = b"".join(datagrams)
        got = RXBATCH.open_run(data, seg, ring.pairs, mask)  # type: ignore[attr-defined]
        assert got == _reference_groups(data, seg, keys, mask), trial


@needs_batch
def test_open_run_never_raises_for_data_and_checks_its_arguments() -> None:
    _, ring = _keys()
    run = RXBATCH.open_run  # type: ignore[attr-defined]
    assert run(b"", 100, ring.pairs, 0) == []
    # (i, 1): malformed (too short, PacketID 0); (i, 2) would be a tag no key verifies.
    assert run(b"x", 1, ring.pairs, 0) == [(0, 1)]
    assert run(bytes(1000), 1, ring.pairs, 0) == [(i, 1) for i in range(1000)]
    assert run(bytes(100), 1 << 40, ring.pairs, 0) == [(0, 1)]
    assert run(bytearray(300), 44, (), 0) == [(i, 1) for i in range(7)]
    assert run(b"\x01" + bytes(99), 100, ring.pairs, 0) == [(0, 2)]
    with pytest.raises(ValueError):
        run(b"abc", 0, ring.pairs, 0)
    with pytest.raises(ValueError):
        run(bytes(5000), 1, ring.pairs, 0)  # more datagrams than any read returns
    with pytest.raises(ValueError):
        run(b"abc", 1, ((b"short", bytes(24)),), 0)
    with pytest.raises(TypeError):
        run(b"abc", 1, (b"notapair",), 0)


@needs_batch
@pytest.mark.parametrize(
    ("mask", "error"), [(-1, OverflowError), (1 << 64, OverflowError), ("1", TypeError)]
)
def test_open_run_refuses_out_of_range_masks_instead_of_wrapping(
    mask: object, error: type[Exception]
) -> None:
    """As _accel does: -1 must not silently become 0xFFFF_FFFF_FFFF_FFFF."""
    _, ring = _keys()
    with pytest.raises(error):
        RXBATCH.open_run(bytes(100), 50, ring.pairs, mask)  # type: ignore[attr-defined]


@needs_batch
def test_a_run_beyond_the_c_bounds_is_fed_one_by_one_not_raised() -> None:
    """5 MiB in 2000-byte datagrams passes the session's datagram-count check but not the
    C function's byte bound: it must be taken datagram by datagram, not raise out of the
    receive loop."""
    _, ring = _keys()
    data = bytes(5 << 20)
    assert rxbatch_open_run(data, 2000, ring, 0) == list(range(-(-len(data) // 2000)))
    seen = []
    for batched in (False, True):
        s = _session(ID_B, ID_A, 2, ADDR_A)
        s.start(1000.0)
        if batched:
            s.receive_datagram_run(data, 2000, ADDR_A, 1000.0)
        else:
            for k in range(0, len(data), 2000):
                s.receive_datagram(data[k : k + 2000], ADDR_A, 1000.0)
        seen.append((asdict(s.stats), s.state))
    assert seen[0] == seen[1]


# --- the window and the reassembler in one step ----------------------------------------------


@pytest.mark.parametrize("size", [-1, 1, 0, 64, 256, 1000])
def test_accept_consecutive_equals_accepting_one_by_one(size: int) -> None:
    rng = random.Random(size)
    for _ in range(300):
        one, many = ReplayWindow(size), ReplayWindow(size)
        for _ in range(rng.randrange(0, 5)):
            pid = rng.randrange(1, 2000)
            one.accept(pid)
            many.accept(pid)
        first = rng.randrange(1, 3000) if rng.random() < 0.8 else (1 << 62)
        count = rng.randrange(1, 80)
        if many.accept_consecutive(first, count):
            assert all(one.accept(p) for p in range(first, first + count))
        else:
            assert one.latest >= first or count < 1
        assert (one.latest, one._bitmap) == (many.latest, many._bitmap)
        for p in range(1, 3100):
            assert one.check(p) == many.check(p)


def test_add_span_equals_adding_the_fragments() -> None:
    rng = random.Random(3)
    for _ in range(400):
        opts = {
            "max_message_size": rng.choice([5000, 65536]),
            "max_chains": rng.choice([1, 2, 8]),
            "byte_budget": rng.choice([6000, 1 << 20]),
            "max_chain_id_diff": 3,
        }
        one, many = Reassembler(**opts), Reassembler(**opts)
        out_one: list[bytes] = []
        out_many: list[bytes] = []
        for _ in range(rng.randrange(1, 6)):
            chain = rng.randrange(1, 8)
            total = rng.choice([3000, 7000, 60000])
            data = rng.randbytes(total)
            chunk = rng.choice([500, 1368])
            pieces = [(s, data[s : s + chunk]) for s in range(0, total, chunk)]
            k = rng.randrange(len(pieces))
            span = pieces[k : k + rng.randrange(1, len(pieces) + 1)]
            mtype = rng.choice([RW, RW + 1])
            for s, c in span:
                try:
                    whole = one.add(
                        mtype,
                        chain.to_bytes(8, "little")
                        + s.to_bytes(8, "little")
                        + total.to_bytes(8, "little")
                        + c,
                    )
                except Exception:
                    whole = None
                if whole is not None:
                    out_one.append(whole)
            got = many.add_span(mtype, chain, total, span[0][0], b"".join(c for _, c in span))
            if got is False:
                for s, c in span:
                    payload = chain.to_bytes(8, "little") + s.to_bytes(8, "little")
                    try:
                        whole = many.add(mtype, payload + total.to_bytes(8, "little") + c)
                    except Exception:
                        whole = None
                    if whole is not None:
                        out_many.append(whole)
            elif got is not None:
                out_many.append(got)  # type: ignore[arg-type]
        assert out_one == out_many
        for attr in (
            "duplicates",
            "evictions",
            "expired",
            "completed",
            "partial_chains",
            "bytes_reserved",
        ):
            assert getattr(one, attr) == getattr(many, attr), attr
        assert one._done_ids == many._done_ids
        assert {k: (bytes(c.buf), c.starts, c.ends, c.covered) for k, c in one._chains.items()} == {
            k: (bytes(c.buf), c.starts, c.ends, c.covered) for k, c in many._chains.items()
        }


# --- whole sessions: one by one against runs ----------------------------------------------------


def _session(identity: Identity, remote: Identity, seed: int, endpoint: Any, **kw: Any) -> Session:
    opt = SessionOptions(
        send_delay=0,
        enable_fragmentation=True,
        key_exchange=KeyExchangeOptions(key_update_interval=3.0),
        **kw,
    )
    return Session(
        identity,
        remote.public_key,
        created_at_ns=1_700_000_000_000_000_000 + seed,
        options=opt,
        random=random.Random(seed).randbytes,
        endpoint=endpoint,
    )


def _runs(datagrams: list[bytes], rng: random.Random) -> list[list[bytes]]:
    """Cut into runs as GRO does: equal sizes, the last of a run may be shorter."""
    runs: list[list[bytes]] = []
    for d in datagrams:
        cur = runs[-1] if runs else None
        if (
            cur is not None
            and len(cur) < 64
            and len(d) <= len(cur[0])
            and len(cur[-1]) == len(cur[0])
            and rng.random() < 0.95
        ):
            cur.append(d)
        else:
            runs.append([d])
    return runs


def scenario(batched: bool, seed: int, psk: bytes | None = None) -> dict[str, Any]:
    """Two peers (and a foreign pair) exchanging a mix of messages; B's demultiplexer gets
    A's traffic in GRO-like runs, with tampered, replayed, reordered, foreign, truncated
    and roaming datagrams mixed in. Returns everything B observed."""
    rng = random.Random(seed)
    a = _session(ID_A, ID_B, 1, ADDR_B, psk=psk)
    b = _session(ID_B, ID_A, 2, ADDR_A, psk=psk)
    c = _session(ID_C, ID_B, 3, ADDR_B, psk=psk)  # a stranger talking to B's identity
    demux: Demultiplexer[str] = Demultiplexer()
    demux.add("a", b)
    events: list[Any] = []
    history: list[bytes] = []
    now = 1000.0
    a_addr = ADDR_A

    def deliver(datagrams: list[bytes], src: Any) -> None:
        for run in _runs(datagrams, rng):
            if batched and len(run) > 1:
                demux.receive_run(b"".join(run), len(run[0]), src, now)
            else:
                for d in run:
                    demux.receive_datagram(d, src, now)
            while (ev := b.next_event()) is not None:
                if isinstance(ev, MessageReceived):
                    events.append(("msg", ev.type, bytes(ev.payload).hex()[:64], len(ev.payload)))
                else:
                    events.append(repr(ev))

    a.start(now)
    c.start(now)
    for step in range(160):
        now += rng.choice([0.001, 0.01, 0.2])
        for s in (a, b, c):
            s.handle_timer(now)
        if a.is_established and step % 3 == 0:
            size = rng.choice([40, 1000, 1392, 3000, 20000, 65000])
            for _ in range(rng.randrange(1, 4)):
                a.write_message(RW, rng.randbytes(size), now)
        if c.is_established and rng.random() < 0.2:
            c.write_message(RW, rng.randbytes(3000), now)
        out = [d for d, _ in a.datagrams_to_send(now)]
        foreign = [d for d, _ in c.datagrams_to_send(now)]
        history.extend(out)
        mutated: list[bytes] = []
        for d in out:
            r = rng.random()
            if r < 0.03:
                t = bytearray(d)
                t[rng.randrange(len(t))] ^= 0x40
                mutated.append(bytes(t))
            elif r < 0.06 and history:
                mutated.append(rng.choice(history))  # a replay
                mutated.append(d)
            elif r < 0.08 and foreign:
                mutated.append(foreign.pop())
                mutated.append(d)
            elif r < 0.09:
                mutated.append(d[: rng.randrange(1, len(d))])
            else:
                mutated.append(d)
        if len(mutated) > 2 and rng.random() < 0.2:
            k = rng.randrange(len(mutated) - 1)
            mutated[k], mutated[k + 1] = mutated[k + 1], mutated[k]
        if rng.random() < 0.03:
            a_addr = ADDR_A2 if a_addr == ADDR_A else ADDR_A  # roaming
        deliver(mutated, a_addr)
        for d, _ in b.datagrams_to_send(now):
            if rng.random() < 0.97:
                a.receive_datagram(d, ADDR_B, now)
                c.receive_datagram(d, ADDR_B, now)
        for d, _ in c.datagrams_to_send(now):
            demux.receive_datagram(d, ("198.18.0.3", 1), now)
    r = b._reassembler
    return {
        "events": events,
        "stats": asdict(b.stats),
        "demux": asdict(demux.stats),
        "endpoint": list(b.endpoint or ()),
        "replay": [b._replay.latest, b._replay._bitmap],
        "reassembler": [r.duplicates, r.evictions, r.expired, r.completed, r.partial_chains],
        "rotations": list(b.key_rotations),
        "state": b.state.name,
    }


@needs_batch
@pytest.mark.parametrize("seed", range(6))
def test_runs_give_exactly_what_one_by_one_gives(seed: int) -> None:
    psk = bytes(range(32)) if seed % 2 else None
    one = scenario(False, seed, psk)
    runs = scenario(True, seed, psk)
    assert one["stats"]["rx_messages"] > 20  # the scenario does deliver
    assert one["reassembler"][3] > 5
    assert runs == one


@needs_batch
def test_batch_path_is_used_and_matches_the_pure_python_reference(tmp_path: Path) -> None:
    """The C batch path against the pure-Python path (SECUREIOD_PURE_PYTHON=1), in a
    child process, on the same scenario."""
    calls = 0
    real = Session._receive_span

    def counting(self: Session, *args: Any) -> bool:
        nonlocal calls
        taken = real(self, *args)
        calls += taken
        return taken

    Session._receive_span = counting  # type: ignore[method-assign]
    try:
        runs = scenario(True, 11)
    finally:
        Session._receive_span = real  # type: ignore[method-assign]
    assert calls > 10  # the spans did go the batch way
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import test_rx_batch as t; "
        "from secureiod.secureio.packet import ACCEL; assert ACCEL is None; "
        "print(json.dumps(t.scenario(False, 11)))"
    )
    env = {**os.environ, "SECUREIOD_PURE_PYTHON": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    assert json.loads(out) == json.loads(json.dumps(runs))


@needs_batch
@pytest.mark.parametrize(
    ("endpoint", "source"),
    [
        (ADDR_A, ADDR_A),
        # the same path (flowinfo is not part of it): validation would change nothing
        (("fd00:5ec::1", 5800, 0, 0), ("fd00:5ec::1", 5800, 9, 0)),
    ],
)
def test_session_receive_datagram_run_equals_receive_datagram(
    monkeypatch: pytest.MonkeyPatch, endpoint: Any, source: Any
) -> None:
    """The session's own run method (no demultiplexer), including a run that completes a
    chain and one that extends a partial one."""

    taken: list[bool] = []
    real = Session._receive_span
    monkeypatch.setattr(
        Session, "_receive_span", lambda self, *args: taken.append(real(self, *args)) or taken[-1]
    )
    results = []
    for batched in (False, True):
        a, b = _established(endpoint)
        payload = bytes(range(256)) * 250
        a.write_message(RW, payload, 2000.0)
        first = [d for d, _ in a.datagrams_to_send(2000.0)]
        a.write_message(RW, payload[:30000], 2000.0)
        second = [d for d, _ in a.datagrams_to_send(2000.0)]
        seg = len(first[0])
        # a run that starts a chain, one that completes it (its last datagram shorter),
        # one that starts the next, one that completes it
        for run in (first[:20], first[20:], second[:-3], second[-3:]):
            if batched:
                b.receive_datagram_run(b"".join(run), seg, source, 2000.0)
            else:
                for d in run:
                    b.receive_datagram(d, source, 2000.0)
        evs = []
        while (ev := b.next_event()) is not None:
            evs.append((ev.type, bytes(ev.payload)))  # type: ignore[union-attr]
        results.append((evs, asdict(b.stats), b.fragment_chains, b.endpoint))
    assert results[0] == results[1]
    assert [len(p) for _, p in results[0][0]] == [64000, 30000]
    assert taken == [True] * 4  # each run was one span, taken in one step


ADDR_X = ("198.18.1.66", 4444)  # an attacker replaying captured runs from elsewhere


def _established(endpoint: Any = ADDR_A) -> tuple[Session, Session]:
    """A and B established, B knowing A at ``endpoint``, B's events drained."""
    a = _session(ID_A, ID_B, 1, ADDR_B)
    b = _session(ID_B, ID_A, 2, endpoint)
    now = 1000.0
    a.start(now)
    b.start(now)
    for _ in range(40):
        for d, _ in a.datagrams_to_send(now):
            b.receive_datagram(d, endpoint, now)
        for d, _ in b.datagrams_to_send(now):
            a.receive_datagram(d, ADDR_B, now)
        now += 0.05
        a.handle_timer(now)
        b.handle_timer(now)
    assert a.is_established and b.is_established
    while b.next_event() is not None:
        pass
    return a, b


# Each attack: runs of A's fragments (f) as (datagrams, source), what B must end up with.
ATTACKS: dict[str, Any] = {
    "replayed-run-from-elsewhere": lambda f, c: [(f[:20], ADDR_A), (f[:20], ADDR_X)],
    "old-and-new-packet-ids-in-one-run": lambda f, c: [(f[:20], ADDR_A), (f[10:30], ADDR_A)],
    "old-and-new-from-elsewhere": lambda f, c: [(f[:20], ADDR_A), (f[10:30], ADDR_X)],
    "fresh-run-from-a-new-address": lambda f, c: [(f[:20], ADDR_A), (f[20:], ADDR_X)],
    "out-of-order-runs": lambda f, c: [(f[20:40], ADDR_A), (f[:20], ADDR_A)],
    "foreign-datagram-inside-a-run": lambda f, c: [(f[:10] + c + f[10:-1], ADDR_A)],
}


@needs_batch
@pytest.mark.parametrize("demuxed", [False, True])
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_hostile_runs_end_as_one_by_one(attack: str, demuxed: bool) -> None:
    """Replays, mixed old/new PacketIDs, a replayed run from another address (which must
    not move the endpoint), foreign datagrams: a run leaves B exactly as the datagrams one
    by one do, through the session and through the demultiplexer."""
    seen = []
    for batched in (False, True):
        a, b = _established()
        stranger = _session(ID_C, ID_B, 3, ADDR_B)
        stranger.start(1000.0)
        a.write_message(RW, bytes(range(256)) * 250, 2000.0)
        frags = [d for d, _ in a.datagrams_to_send(2000.0)]
        seg = len(frags[0])
        foreign = [d[:seg].ljust(seg, b"\0") for d, _ in stranger.datagrams_to_send(1000.0)][:1]
        demux: Demultiplexer[str] = Demultiplexer()
        demux.add("a", b)
        steps = []
        for run, source in ATTACKS[attack](frags, foreign):
            if batched and demuxed:
                demux.receive_run(b"".join(run), seg, source, 2000.0)
            elif batched:
                b.receive_datagram_run(b"".join(run), seg, source, 2000.0)
            else:
                for d in run:
                    if demuxed:
                        demux.receive_datagram(d, source, 2000.0)
                    else:
                        b.receive_datagram(d, source, 2000.0)
            events = []
            while (ev := b.next_event()) is not None:
                events.append(repr(ev) if not isinstance(ev, MessageReceived) else len(ev.payload))
            steps.append((events, asdict(b.stats), b.endpoint, b._replay.latest, b._replay._bitmap))
        seen.append(steps)
    assert seen[0] == seen[1]
    # Only fresh (never seen) PacketIDs from elsewhere move the endpoint, replays never.
    moved = attack in ("fresh-run-from-a-new-address", "old-and-new-from-elsewhere")
    assert seen[1][-1][2] == (ADDR_X if moved else ADDR_A)
    assert seen[1][-1][1]["drops"]["replay"] == {
        "replayed-run-from-elsewhere": 20,
        "old-and-new-packet-ids-in-one-run": 10,
        "old-and-new-from-elsewhere": 10,
    }.get(attack, 0)


# --- the socket ------------------------------------------------------------------------------


def test_recv_runs_hands_over_gro_reads_as_runs() -> None:
    rx = UdpSocket.bind(("127.0.0.1", 0), segmentation=True)
    tx = UdpSocket.bind(("127.0.0.1", 0), segmentation=True)
    try:
        datagrams = [bytes([i]) * 1200 for i in range(20)] + [b"tail" * 10]
        assert tx.send_batch(datagrams, rx.local_address) == []
        got: list[tuple[bytes, int, Any]] = []
        deadline = time.monotonic() + 5
        while sum(-(-len(d) // s) for d, s, _ in got) < len(datagrams):
            assert time.monotonic() < deadline
            got.extend(rx.recv_runs(64))
        joined = []
        for data, seg, addr in got:
            assert addr == tx.local_address
            joined.extend(data[i : i + seg] for i in range(0, len(data), seg))
        assert joined == datagrams
        assert rx.stats.rx_datagrams == len(datagrams)
        if rx.gro and tx.gso:
            assert len(got) < len(datagrams)  # coalesced by the kernel
        plain = UdpSocket.bind(("127.0.0.1", 0))
        try:
            tx.send(b"one", plain.local_address)
            deadline = time.monotonic() + 5
            runs: list[Any] = []
            while not runs:
                assert time.monotonic() < deadline
                runs = plain.recv_runs(8)
            assert runs == [(b"one", 3, tx.local_address)]
        finally:
            plain.close()
    finally:
        rx.close()
        tx.close()


def test_after_a_bulk_read_small_and_large_reads_stay_exact() -> None:
    """A large GRO read makes the next read take its own buffer (``recv_runs``: no copy
    of 64 KiB), a small one switches back to the shared buffer: whatever the order, every
    read is its own bytes with the right datagrams and segment size, and none is changed
    by a later read (each read below would overwrite a shared buffer)."""
    rx = UdpSocket.bind(("127.0.0.1", 0), segmentation=True)
    tx = UdpSocket.bind(("127.0.0.1", 0), segmentation=True)
    try:
        assert rx.gro and tx.gso
        rng = random.Random(5)
        sends = [
            [rng.randbytes(1400) for _ in range(40)],  # bulk: the next read allocates
            [rng.randbytes(1400) for _ in range(40)],
            [rng.randbytes(90)],  # small: back to the shared buffer
            [rng.randbytes(120)],
            [rng.randbytes(1400) for _ in range(30)] + [rng.randbytes(7)],
            [rng.randbytes(60)],
        ]
        got: list[tuple[bytes, int, Any]] = []
        for datagrams in sends:  # one send at a time: one GRO read each
            assert tx.send_batch(datagrams, rx.local_address) == []
            deadline = time.monotonic() + 5
            count = len(got)
            while len(got) == count:
                assert time.monotonic() < deadline
                got.extend(rx.recv_runs(1))
        assert [type(d) for d, _, _ in got] == [bytes] * len(sends)
        for (data, seg, addr), datagrams in zip(got, sends, strict=True):
            assert addr == tx.local_address
            assert seg == len(datagrams[0])
            assert [data[i : i + seg] for i in range(0, len(data), seg)] == datagrams
        assert rx.stats.rx_datagrams == sum(map(len, sends))
    finally:
        rx.close()
        tx.close()


def test_switches_select_the_old_path() -> None:
    code = "from secureiod.secureio.rxbatch import RXBATCH; print(RXBATCH is None)"
    for var in ("SECUREIOD_NO_BATCH", "SECUREIOD_PURE_PYTHON"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, var: "1"},
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        assert out.strip() == "True"


@needs_batch
def test_junk_in_a_run_is_counted_without_being_decrypted_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Equal-size junk spoofed from a peer's address is coalesced by GRO into one run: the
    C call already tried every key, so the session counts each datagram from its answer
    instead of opening it a second time (a spoofer must not double our decryption work)."""
    import secureiod.secureio.session as session_module

    _, b = _established()
    demux: Demultiplexer[str] = Demultiplexer()
    demux.add("a", b)
    opened_again: list[int] = []
    real_open_ring = session_module.open_ring

    def counting(*args: Any, **kwargs: Any) -> Any:
        opened_again.append(1)
        return real_open_ring(*args, **kwargs)

    monkeypatch.setattr(session_module, "open_ring", counting)
    junk = bytes(random.Random(5).randbytes(1445 * 64))
    auth_before = b.stats.drops["auth"]
    malformed_before = b.stats.drops["malformed"]
    assert demux.receive_run(junk, 1445, ADDR_A, 2000.0) == ["a"]
    assert opened_again == []
    assert b.stats.drops["auth"] - auth_before == 64
    assert b.stats.drops["malformed"] == malformed_before
    assert b.consecutive_decrypt_failures >= 64


@pytest.mark.parametrize("segment_size", [0, -5])
def test_a_run_with_a_nonsense_segment_size_is_one_datagram_counted(segment_size: int) -> None:
    """Not reachable from the socket (a GRO size is at least 1), but a bad argument must be
    counted like any undecryptable datagram, never raise in the loop or vanish uncounted."""
    _, b = _established()
    before = b.stats.drops["malformed"] + b.stats.drops["auth"]
    b.receive_datagram_run(bytes(300), segment_size, ADDR_A, 2000.0)
    assert b.stats.drops["malformed"] + b.stats.drops["auth"] - before == 1
    demux: Demultiplexer[str] = Demultiplexer()
    demux.add("a", b)
    demux.receive_run(bytes(300), segment_size, ADDR_A, 2000.0)
    assert b.stats.drops["malformed"] + b.stats.drops["auth"] - before == 2


# --- OpenSSL for long inputs, libsodium for short (_construction.h) -------------------------


def _crossover_segment_sizes() -> list[int]:
    """Datagram sizes putting open_run's primitives on both sides of their crossovers: the
    stream after the first block is size - 72 bytes (ChaCha20 crossover 128), the messages
    tag covers size - 44 (Poly1305 crossover 192); plus odd MTU-sized and jumbo ones."""
    sizes = set()
    for base in (72 + 128, 44 + 192):
        sizes |= set(range(base - 4, base + 5))
    return sorted(sizes | {45, 71, 72, 73, 135, 137, 1481, 1473, 1500, 9001})


@needs_batch
@pytest.mark.parametrize("seg", _crossover_segment_sizes())
def test_open_run_with_keys_changing_datagram_by_datagram_matches_the_reference(seg: int) -> None:
    """Each datagram under a key picked at random (the run's one OpenSSL cipher context
    must switch keys, and back), some a little tampered, some fragments: the groups are the
    reference's, byte for byte."""
    keys, ring = _keys()
    rng = random.Random(seg)
    for trial in range(12):
        mask = rng.getrandbits(64)
        datagrams = []
        pid = rng.randrange(1, 1 << 40)
        for _ in range(rng.randrange(1, 40)):
            key = rng.choice(keys) if rng.random() < 0.6 else keys[0]
            size = seg if rng.random() < 0.9 else rng.randrange(44, seg + 1)
            if rng.random() < 0.5 and size > PACKET_OVERHEAD + FRAGMENT_HEADER_SIZE:
                chunk = size - PACKET_OVERHEAD - FRAGMENT_HEADER_SIZE
                (msg,) = fragment_message(RW, rng.randbytes(chunk), 9, size - PACKET_OVERHEAD)
            else:
                msg = rng.randbytes(size - 44)
            d = bytearray(seal_python(key, pid, msg, mask))
            pid += 1 if rng.random() < 0.9 else 2
            if rng.random() < 0.1:
                d[rng.randrange(len(d))] ^= 1 << rng.randrange(8)
            datagrams.append(bytes(d))
        # every datagram but the last is seg bytes (the GRO layout)
        datagrams = [d.ljust(seg, b"\0") for d in datagrams[:-1]] + datagrams[-1:]
        data = b"".join(datagrams)
        got = RXBATCH.open_run(data, seg, ring.pairs, mask)  # type: ignore[attr-defined]
        assert got == _reference_groups(data, seg, keys, mask), trial
