"""Fragmentation and reassembly (PROTOCOL §9, §13 items 22-24, §14 item 16)."""

from __future__ import annotations

import itertools

import pytest
from captures import load_capture
from hypothesis import given, settings
from hypothesis import strategies as st

from secureiod.secureio import (
    FragmentHeader,
    MalformedError,
    MessageType,
    iter_messages,
    open_packet,
)
from secureiod.secureio.packet import PacketClass
from secureiod.secureio.reassembly import FRAGMENT_FLAGS, Reassembler, fragment_message

RW = MessageType.READ_WRITE
MESSAGE_640 = bytes((i * 7 + 3) % 256 for i in range(640))


def frag(chain: int, start: int, total: int, chunk: bytes) -> bytes:
    return FragmentHeader(chain, start, total).encode() + chunk


def payloads(encoded: list[bytes]) -> list[tuple[int, int, bytes]]:
    """(type, flags, payload) of each encoded fragment message (one per packet)."""
    out = []
    for e in encoded:
        (m,) = iter_messages(e)
        out.append((m.type, m.flags, bytes(m.payload)))
    return out


def chunks_of(message: bytes, chain: int, e: int) -> list[bytes]:
    return [p for _, _, p in payloads(fragment_message(RW, message, chain, e))]


# -- sender -----------------------------------------------------------------------------


def test_640_bytes_at_e_256_split_at_0_232_464() -> None:
    """§14 item 16: F = 256 - 24 = 232."""
    parts = payloads(fragment_message(RW, MESSAGE_640, 1, 256))
    headers = [FragmentHeader.decode(p) for _, _, p in parts]
    assert headers == [
        FragmentHeader(1, 0, 640),
        FragmentHeader(1, 232, 640),
        FragmentHeader(1, 464, 640),
    ]
    assert [len(p) for _, _, p in parts] == [256, 256, 200]
    assert all(t == RW and f == 0x03 for t, f, _ in parts)
    assert b"".join(p[24:] for _, _, p in parts) == MESSAGE_640


def test_fragment_message_rejects_what_cannot_be_fragmented() -> None:
    with pytest.raises(ValueError):
        fragment_message(RW, MESSAGE_640, 1, 24)
    with pytest.raises(ValueError):
        fragment_message(RW, b"", 1, 256)
    with pytest.raises(ValueError):
        fragment_message(MessageType.NEGOTIATION, MESSAGE_640, 1, 256)


# -- receiver ---------------------------------------------------------------------------


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_any_order_reassembles_once(order: tuple[int, ...]) -> None:
    parts = chunks_of(MESSAGE_640, 1, 256)
    r = Reassembler()
    results = [r.add(RW, parts[i]) for i in order]
    assert results[:2] == [None, None]
    assert results[2] == MESSAGE_640
    assert r.partial_chains == 0 and r.bytes_reserved == 0 and r.completed == 1


def test_duplicates_are_dropped_quietly() -> None:
    parts = chunks_of(MESSAGE_640, 1, 256)
    r = Reassembler()
    assert r.add(RW, parts[1]) is None
    assert r.add(RW, parts[1]) is None  # duplicate of a partial chain's chunk
    assert r.duplicates == 1
    assert r.add(RW, parts[0]) is None
    assert r.add(RW, parts[2]) == MESSAGE_640
    # §13 item 22: in Go this panics the process. Here: dropped, counted, never redelivered.
    for p in parts:
        assert r.add(RW, p) is None
    assert r.duplicates == 4
    assert r.completed == 1


def test_one_byte_chain_then_same_fragment_again() -> None:
    """The two-datagram Go crash from §13 item 22."""
    r = Reassembler()
    one = frag(5, 0, 1, b"x")
    assert r.add(RW, one) == b"x"
    assert r.add(RW, one) is None
    assert r.duplicates == 1


def test_two_interleaved_chains() -> None:
    """Go discards every partial chain on a new ChainID (§13 item 23); we keep both."""
    other = bytes(range(200)) * 3
    a = chunks_of(MESSAGE_640, 1, 256)
    b = chunks_of(other, 2, 256)
    r = Reassembler()
    assert r.add(RW, a[0]) is None
    assert r.add(RW, b[2]) is None
    assert r.add(RW, a[2]) is None
    assert r.add(RW, b[0]) is None
    assert r.partial_chains == 2
    assert r.add(RW, b[1]) == other
    assert r.add(RW, a[1]) == MESSAGE_640
    assert r.evictions == r.expired == 0


def test_overlapping_chunks_count_only_new_bytes() -> None:
    msg = bytes(range(100))
    r = Reassembler()
    assert r.add(RW, frag(1, 0, 100, msg[0:60])) is None
    assert r.add(RW, frag(1, 40, 100, msg[40:90])) is None  # 30 new bytes
    assert r.add(RW, frag(1, 10, 100, msg[10:50])) is None  # nothing new: duplicate
    assert r.duplicates == 1
    assert r.add(RW, frag(1, 95, 100, msg[95:100])) is None  # a hole at 90..95 remains
    assert r.add(RW, frag(1, 85, 100, msg[85:97])) == msg


def test_overlap_keeps_the_first_bytes_received() -> None:
    r = Reassembler()
    assert r.add(RW, frag(1, 0, 10, b"AAAAAA")) is None
    assert r.add(RW, frag(1, 4, 10, b"bbbbbb")) == b"AAAAAAbbbb"


def test_go_coverage_bitmap_miscount_case() -> None:
    """Go counts coverage per 64-byte word and could declare a chain complete with holes
    (§13 item 24). Chunks [0,10) and [70,128) leave 60 bytes missing: not complete."""
    msg = bytes(range(128))
    r = Reassembler()
    assert r.add(RW, frag(1, 70, 128, msg[70:])) is None
    assert r.add(RW, frag(1, 0, 128, msg[:10])) is None
    assert r.add(RW, frag(1, 10, 128, msg[10:70])) == msg


def test_delivers_exactly_total_length_after_a_bigger_message() -> None:
    """Go reused a slot buffer and delivered 5000 bytes for a 1500-byte message."""
    r = Reassembler()
    big = bytes(5000)
    for p in chunks_of(big, 1, 1024):
        r.add(RW, p)
    small = b"s" * 1500
    out = [r.add(RW, p) for p in chunks_of(small, 9, 1024)]
    assert out[-1] == small and len(out[-1]) == 1500


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (bytes(23), "shorter than its header"),
        (frag(1, 0, 0, b""), "empty message"),
        (frag(1, 0, 65537, b"x"), "exceeds 65536"),
        (frag(1, 0, 10, b""), "empty chunk"),
        (frag(1, 8, 10, b"xyz"), "runs past the message end"),
        (frag(1, 2**64 - 1, 10, b"x"), "runs past the message end"),
    ],
)
def test_malformed_fragments(payload: bytes, reason: str) -> None:
    r = Reassembler()
    with pytest.raises(MalformedError, match=reason):
        r.add(RW, payload)
    assert r.partial_chains == 0


def test_inconsistent_total_or_type_is_malformed_and_changes_nothing() -> None:
    r = Reassembler()
    assert r.add(RW, frag(1, 0, 100, b"a" * 50)) is None
    with pytest.raises(MalformedError, match="TotalMessageLength 120 differs from 100"):
        r.add(RW, frag(1, 50, 120, b"b" * 50))
    with pytest.raises(MalformedError, match="type"):
        r.add(MessageType.channel(7), frag(1, 50, 100, b"b" * 50))
    assert r.add(RW, frag(1, 50, 100, b"b" * 50)) == b"a" * 50 + b"b" * 50


def test_chain_too_old() -> None:
    r = Reassembler(max_chain_id_diff=8)
    assert r.add(RW, frag(20, 0, 10, b"0123")) is None
    assert r.add(RW, frag(12, 0, 10, b"0123")) is None  # 20 - 12 = 8: still accepted
    with pytest.raises(MalformedError, match="more than 8 chains behind 20"):
        r.add(RW, frag(11, 0, 10, b"0123"))
    # A newer chain expires the partial ones that fell behind the window.
    assert r.add(RW, frag(25, 0, 10, b"0123")) is None
    assert r.expired == 1 and r.partial_chains == 2  # chain 12 gone; 20 and 25 kept
    assert r.bytes_reserved == 20


def test_completed_chain_remembered_even_when_old() -> None:
    """A late duplicate of a completed chain is quiet even after the window moved on."""
    r = Reassembler()
    assert r.add(RW, frag(1, 0, 1, b"x")) == b"x"
    assert r.add(RW, frag(50, 0, 1, b"y")) == b"y"
    assert r.add(RW, frag(1, 0, 1, b"x")) is None
    assert r.duplicates == 1


def test_completed_memory_is_bounded() -> None:
    r = Reassembler(remember_completed=4, max_chain_id_diff=100)
    for cid in range(1, 11):
        assert r.add(RW, frag(cid, 0, 1, b"x")) == b"x"
    assert r.add(RW, frag(10, 0, 1, b"x")) is None  # remembered
    assert r.add(RW, frag(6, 0, 2, b"x")) is None  # forgotten: starts a (harmless) new chain
    assert r.duplicates == 1 and r.partial_chains == 1


def test_max_chains_evicts_the_oldest_partial_chain() -> None:
    r = Reassembler(max_chains=3)
    for cid in (1, 2, 3):
        assert r.add(RW, frag(cid, 0, 10, b"head")) is None
    assert r.add(RW, frag(4, 0, 10, b"head")) is None
    assert r.evictions == 1 and r.partial_chains == 3
    # Chain 1 was evicted: its tail alone starts a new partial chain instead of completing.
    assert r.add(RW, frag(1, 4, 10, b"tail..")) is None
    assert r.add(RW, frag(3, 4, 10, b"tail..")) == b"headtail.."


def test_byte_budget_evicts_then_refuses() -> None:
    r = Reassembler(byte_budget=1000, max_message_size=4096)
    assert r.add(RW, frag(1, 0, 400, b"a")) is None
    assert r.add(RW, frag(2, 0, 400, b"b")) is None
    assert r.bytes_reserved == 800
    assert r.add(RW, frag(3, 0, 400, b"c")) is None  # 1200 > 1000: chain 1 gives way
    assert r.evictions == 1 and r.bytes_reserved == 800
    with pytest.raises(MalformedError, match="budget"):
        r.add(RW, frag(4, 0, 1001, b"d"))  # could never fit: refused, nothing evicted
    assert r.evictions == 1 and r.partial_chains == 2


def test_too_scattered_chain_is_refused() -> None:
    r = Reassembler(max_intervals=4)
    for i in range(4):
        assert r.add(RW, frag(1, 2 * i, 100, b"x")) is None
    with pytest.raises(MalformedError, match="too many pieces"):
        r.add(RW, frag(1, 20, 100, b"x"))
    assert r.add(RW, frag(1, 1, 100, b"x")) is None  # fills a hole: merges, allowed


def test_reset_forgets_chains() -> None:
    r = Reassembler()
    r.add(RW, frag(1, 0, 10, b"abc"))
    assert r.add(RW, frag(2, 0, 1, b"z")) == b"z"
    r.reset()
    assert r.partial_chains == 0 and r.bytes_reserved == 0
    assert r.add(RW, frag(2, 0, 1, b"z")) == b"z"  # a restarted peer reuses chain ids


@settings(max_examples=200, deadline=None)
@given(
    message=st.binary(min_size=1, max_size=3000),
    e=st.integers(min_value=25, max_value=700),
    data=st.data(),
)
def test_any_permutation_with_duplicates_reassembles_exactly_once(
    message: bytes, e: int, data: st.DataObject
) -> None:
    parts = chunks_of(message, 3, e)
    extra = data.draw(st.lists(st.sampled_from(parts), max_size=len(parts) * 2))
    order = data.draw(st.permutations(parts + extra))
    r = Reassembler()
    delivered = [out for p in order if (out := r.add(RW, p)) is not None]
    assert delivered == [message]
    assert r.duplicates == len(extra)
    assert r.partial_chains == 0 and r.bytes_reserved == 0


@settings(max_examples=200, deadline=None)
@given(
    message=st.binary(min_size=1, max_size=600),
    cuts=st.lists(st.tuples(st.integers(0, 599), st.integers(1, 200)), max_size=40),
)
def test_arbitrary_overlapping_chunks(message: bytes, cuts: list[tuple[int, int]]) -> None:
    """Random overlapping pieces plus a final tiling: delivered once, byte-exact, and not
    before every byte arrived."""
    n = len(message)
    pieces = [(s, min(n, s + ln)) for s, ln in cuts if s < n]
    pieces += [(s, min(n, s + 64)) for s in range(0, n, 64)]
    r = Reassembler()
    covered: set[int] = set()
    delivered = []
    for s, t in pieces:
        before = len(covered)
        covered.update(range(s, t))
        out = r.add(RW, frag(1, s, n, message[s:t]))
        if out is not None:
            delivered.append(out)
            assert len(covered) == n
        else:
            assert len(covered) < n or len(covered) == before
    assert delivered == [message]


# -- the Go capture ---------------------------------------------------------------------


def _captured_fragments() -> list[tuple[int, int, bytes]]:
    cap = load_capture("cap_frag_nopsk.json")
    out = []
    for p in cap.packets:
        opened = open_packet(p.data, [p.session_key, p.fallback], p.packet_id_mask)
        for m in iter_messages(opened.messages):
            if m.flags & 0x02:
                assert opened.packet_class == PacketClass.CLEAR  # Go's bug, §13 item 3
                out.append((m.type, m.flags, bytes(m.payload)))
    return out


def test_capture_fragments_reassemble_in_every_order() -> None:
    frags = _captured_fragments()
    assert len(frags) == 3
    message = None
    for order in itertools.permutations(frags):
        r = Reassembler()
        results = [r.add(t, p) for t, _, p in order]
        assert results[:2] == [None, None]
        assert results[2] is not None and len(results[2]) == 640
        message = message or results[2]
        assert results[2] == message
    assert message is not None
    by_start = sorted(frags, key=lambda f: FragmentHeader.decode(f[2]).start_pos)
    assert message == b"".join(p[24:] for _, _, p in by_start)


def test_our_fragments_match_the_capture_except_the_flags() -> None:
    frags = _captured_fragments()
    r = Reassembler()
    (message,) = [out for t, _, p in frags if (out := r.add(t, p)) is not None]
    ours = payloads(fragment_message(RW, message, 1, 256))
    go_sorted = sorted(frags, key=lambda f: FragmentHeader.decode(f[2]).start_pos)
    assert [FragmentHeader.decode(p) for _, _, p in ours] == [
        FragmentHeader.decode(p) for _, _, p in go_sorted
    ]
    # Same type and bytes; only the flags differ: Go 0x02 (clear/aux packet), ours 0x03.
    assert [(t, p) for t, _, p in ours] == [(t, p) for t, _, p in go_sorted]
    assert {f for _, f, _ in go_sorted} == {0x02}
    assert {f for _, f, _ in ours} == {0x03} == {FRAGMENT_FLAGS}
