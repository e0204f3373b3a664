"""Flipping any single bit of a real packet makes it fail to open.

Covers every bit of one packet of each class (clear key exchange, aux key exchange,
session data, session negotiation) from the reference captures.
"""

from __future__ import annotations

import pytest
from captures import CapturedPacket, load_capture

from secureiod.secureio import (
    AuthenticationError,
    MalformedError,
    PacketClass,
    open_packet,
)


def _pick(name: str, wanted: PacketClass, nth: int = 0) -> CapturedPacket:
    found = []
    for p in load_capture(name).packets:
        opened = open_packet(p.data, [p.session_key, p.fallback], p.packet_id_mask)
        if opened.packet_class == wanted:
            found.append(p)
    return found[nth]


CASES = [
    ("cap_nopsk.json", PacketClass.CLEAR, 0),
    ("cap_psk.json", PacketClass.AUX, 0),
    ("cap_nopsk.json", PacketClass.SESSION, 0),
    ("cap_psk.json", PacketClass.SESSION, 1),
    ("cap_negotiation.json", PacketClass.SESSION, 3),
    ("cap_frag_nopsk.json", PacketClass.CLEAR, 2),
]


@pytest.mark.parametrize(("name", "cls", "nth"), CASES)
def test_every_single_bit_flip_is_rejected(name: str, cls: PacketClass, nth: int) -> None:
    p = _pick(name, cls, nth)
    keys = [p.session_key, p.fallback]
    assert open_packet(p.data, keys, p.packet_id_mask).packet_class == cls
    for bit in range(len(p.data) * 8):
        tampered = bytearray(p.data)
        tampered[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises((AuthenticationError, MalformedError)):
            open_packet(bytes(tampered), keys, p.packet_id_mask)


@pytest.mark.parametrize(("name", "cls", "nth"), CASES[:3])
def test_truncation_and_extension_are_rejected(name: str, cls: PacketClass, nth: int) -> None:
    p = _pick(name, cls, nth)
    keys = [p.session_key, p.fallback]
    for cut in range(len(p.data)):
        with pytest.raises((AuthenticationError, MalformedError)):
            open_packet(p.data[:cut], keys, p.packet_id_mask)
    for extra in (b"\x00", b"\xff" * 16):
        with pytest.raises((AuthenticationError, MalformedError)):
            open_packet(p.data + extra, keys, p.packet_id_mask)


def test_session_packet_does_not_open_with_other_sessions_id() -> None:
    cap = load_capture("cap_nopsk.json")
    a_to_b = [p for p in cap.packets if p.direction == "A>B"]
    b_to_a = [p for p in cap.packets if p.direction == "B>A"]
    data_pkt = next(
        p
        for p in a_to_b
        if open_packet(p.data, [p.session_key, p.fallback]).packet_class == PacketClass.SESSION
    )
    # B's SessionID in the nonce: same cipher key, wrong sender -> no key verifies.
    with pytest.raises(AuthenticationError):
        open_packet(data_pkt.data, [b_to_a[0].session_key])


def test_clear_packet_is_not_accepted_when_psk_expects_aux() -> None:
    nopsk = load_capture("cap_nopsk.json")
    psk = load_capture("cap_psk.json")
    clear_kx = nopsk.packets[0]
    with pytest.raises((AuthenticationError, MalformedError)):
        open_packet(clear_kx.data, [psk.packets[0].fallback], psk.packets[0].packet_id_mask)
