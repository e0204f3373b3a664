"""Byte-for-byte agreement with the reference Go implementation.

Every packet of every capture and every packet vector opens with our code and re-seals to
the identical bytes; every intermediate value in vectors.json is recomputed.
"""

from __future__ import annotations

from typing import Any

import pytest
from captures import CAPTURE_FILES, load_capture

from secureiod.secureio import (
    FragmentHeader,
    KeyExchangeMessage,
    MessageType,
    NegotiationControl,
    NegotiationProbe,
    PacketClass,
    PacketKey,
    PskKeys,
    SessionID,
    decode_negotiation,
    derive_cipher_key,
    encode_message,
    encode_ping,
    iter_messages,
    open_packet,
    pong_for,
    seal,
)
from secureiod.secureio.constants import SALT
from secureiod.secureio.crypto import (
    chacha20_xor,
    hchacha20,
    poly1305,
    salted_hash,
    x25519_public,
    xchacha20_xor,
)
from secureiod.secureio.identity import Identity, PublicKey


def h(s: str | None) -> bytes:
    return bytes.fromhex(s) if s else b""


def test_salted_hash_vectors(vectors: dict[str, Any]) -> None:
    for v in vectors["hash"]["vectors"]:
        salts = [h(s) for s in v["salts"] or []]
        assert salted_hash(h(v["input"]), *salts).hex() == v["output"], v["description"]


def test_constants_match_reference(vectors: dict[str, Any]) -> None:
    c = vectors["constants"]
    assert SALT.hex() == c["salt"]
    assert c["poly1305_key_xorer_ascii"].startswith("github.com/xaionaro-go/secureio ")
    assert c["message_types"]["read_write"] == MessageType.READ_WRITE
    assert c["message_types"]["key_exchange"] == MessageType.KEY_EXCHANGE
    assert c["message_types"]["negotiation"] == MessageType.NEGOTIATION
    assert c["message_types"]["channel0"] == MessageType.channel(0)
    assert c["message_types"]["channel7"] == MessageType.channel(7)
    sizes = c["sizes"]
    from secureiod.secureio import constants as k

    assert sizes["messagesContainerHeadersSize"] == k.CONTAINER_HEADER_SIZE
    assert sizes["messageHeadersSize"] == k.MESSAGE_HEADER_SIZE
    assert sizes["messageFragmentHeadersSize"] == k.FRAGMENT_HEADER_SIZE
    assert sizes["maxPossiblePacketSize"] == k.MAX_POSSIBLE_PACKET_SIZE
    assert sizes["defaultPayloadSizeLimit"] == k.DEFAULT_PAYLOAD_SIZE_LIMIT
    assert sizes["defaultPayloadLossySizeLimit"] == k.DEFAULT_PAYLOAD_SIZE_LIMIT_UDP


def test_parties_and_shared_keys(vectors: dict[str, Any]) -> None:
    for p in vectors["parties"]:
        ident = Identity.from_seed(h(p["ed25519_seed"]))
        assert ident.public_key.raw.hex() == p["ed25519_public_key"]
        assert ident.private_key_64.hex() == p["ed25519_private_key_64"]
        assert x25519_public(h(p["x25519_private_key"])).hex() == p["x25519_public_key"]
        sid = SessionID(p["session_id"]["created_at"], p["session_id"]["random"])
        assert sid.to_bytes().hex() == p["session_id"]["bytes"]
        assert SessionID.from_bytes(sid.to_bytes()) == sid
    for s in vectors["shared_keys"]:
        psk = PskKeys.from_psk(h(s["psk"])) if s["psk"] else None
        key = derive_cipher_key(h(s["local_x25519_private"]), h(s["remote_x25519_public"]), psk)
        assert key.hex() == s["cipher_key"]
        if psk:
            assert psk.psk_mask.hex() == s["psk_xorer"]
            assert psk.aux_key.hex() == s["aux_cipher_key"]


def test_secret_slots_example(vectors: dict[str, Any]) -> None:
    ex = vectors["secret_slots_example"]
    nl, pl = h(ex["next_local_x25519_private"]), h(ex["prev_local_x25519_private"])
    nr, pr = h(ex["next_remote_x25519_public"]), h(ex["prev_remote_x25519_public"])
    assert x25519_public(nl).hex() == ex["next_local_x25519_public"]
    slots = [(nl, nr), (nl, pr), (pl, nr), (pl, pr)]  # RB, RL, RR, PREV
    assert [derive_cipher_key(a, b, None).hex() for a, b in slots] == ex["secrets"]


def test_psk_packet_id_mask_from_spec() -> None:
    # PROTOCOL §4.4: M = 16c793b87555b775 for PSK "my-psk"; packet 1 appears as 17c7...
    psk = PskKeys.from_psk(b"my-psk")
    assert psk.packet_id_mask.to_bytes(8, "little").hex() == "16c793b87555b775"
    assert (1 ^ psk.packet_id_mask).to_bytes(8, "little").hex() == "17c793b87555b775"


def test_hchacha20_rfc_vector() -> None:
    # draft-irtf-cfrg-xchacha-03 §2.2.1
    key = bytes(range(32))
    nonce = bytes.fromhex("000000090000004a0000000031415927")
    assert hchacha20(key, nonce).hex() == (
        "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"
    )


def test_xchacha20_rfc_keystream() -> None:
    # draft-irtf-cfrg-xchacha-03 §A.3.2: keystream (XOR with zeros) of XChaCha20 from
    # block 0 starts with the block counter-0 output of ChaCha20 under the subkey.
    key = bytes.fromhex("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f")
    nonce = bytes.fromhex("404142434445464748494a4b4c4d4e4f5051525354555658")
    sub = hchacha20(key, nonce[:16])
    assert xchacha20_xor(key, nonce, bytes(64)) == chacha20_xor(sub, nonce[16:], bytes(64))
    # The subkey route matches XChaCha20's definition (IETF variant: 4 zero bytes + 8).
    assert len(xchacha20_xor(key, nonce, bytes(100))) == 100


def _key_for(pkt: dict[str, Any]) -> tuple[PacketKey, int]:
    psk = PskKeys.from_psk(h(pkt["psk"])) if pkt["psk"] else None
    mask = psk.packet_id_mask if psk else 0
    if pkt["confidential"]:
        sid = h(pkt["sender_session_id"]["bytes"])
        return PacketKey.session(h(pkt["encryption_key"]), sid), mask
    if psk:
        assert psk.aux_key.hex() == pkt["aux_cipher_key"]
        return PacketKey.aux(psk.aux_key), mask
    return PacketKey.clear(), mask


@pytest.mark.parametrize("index", range(20))
def test_packet_vectors_open_and_reseal(vectors: dict[str, Any], index: int) -> None:
    pkt = vectors["packets"][index]
    key, mask = _key_for(pkt)
    data = h(pkt["packet"])
    assert len(data) == pkt["packet_len"]
    assert key.poly_key(pkt["packet_id"]).hex() == pkt["poly1305_key"]
    msgs = h(pkt["messages_bytes"])
    assert poly1305(key.poly_key(pkt["packet_id"]), msgs).hex() == pkt["messages_checksum"]
    assert data[:8].hex() == pkt["packet_id_on_wire"]

    opened = open_packet(data, [key], mask)
    assert opened.packet_id == pkt["packet_id"]
    assert opened.messages == msgs
    expected_class = (
        PacketClass.SESSION
        if pkt["confidential"]
        else (PacketClass.AUX if pkt["psk"] else PacketClass.CLEAR)
    )
    assert opened.packet_class == expected_class

    parsed = list(iter_messages(opened.messages))
    assert [(m.type, m.flags, bytes(m.payload)) for m in parsed] == [
        (m["type"], m["flags"], h(m["payload"])) for m in pkt["messages"]
    ]
    reencoded = b"".join(encode_message(m.type, m.payload, m.flags) for m in parsed)
    assert reencoded == msgs
    assert seal(key, pkt["packet_id"], reencoded, mask) == data

    extra = pkt.get("extra") or {}
    if "kx_payload" in extra:
        sender = next(p for p in vectors["parties"] if p["name"] == pkt["sender"])
        payload = h(extra["kx_payload"])
        kx = KeyExchangeMessage.decode(payload)
        assert kx.verify(PublicKey(h(sender["ed25519_public_key"])))
        assert kx.session_id.to_bytes().hex() == pkt["sender_session_id"]["bytes"]
        resigned = kx.signed_by(Identity.from_seed(h(sender["ed25519_seed"])))
        assert resigned.encode() == payload
    if "fragment_headers" in extra:
        header = FragmentHeader.decode(parsed[0].payload)
        assert header.encode().hex() == extra["fragment_headers"]


@pytest.mark.parametrize("name", CAPTURE_FILES)
def test_capture_opens_and_reseals(name: str) -> None:
    cap = load_capture(name)
    assert cap.cipher_key.hex() == cap.raw["cipher_key_recent_both"]
    if cap.psk:
        assert cap.psk.aux_key.hex() == cap.raw["aux_cipher_key"]
    chains: dict[int, bytearray] = {}
    seen_kinds: set[str] = set()
    for p in cap.packets:
        opened = open_packet(p.data, [p.session_key, p.fallback], p.packet_id_mask)
        key = p.session_key if opened.key_index == 0 else p.fallback
        assert seal(key, opened.packet_id, opened.messages, p.packet_id_mask) == p.data
        for m in iter_messages(opened.messages):
            if m.type == MessageType.KEY_EXCHANGE:
                assert opened.packet_class != PacketClass.SESSION
                kx = KeyExchangeMessage.decode(m.payload)
                signer = Identity.from_private_key_64(p.sender_ed25519_64)
                assert kx.identity_key == signer.public_key.raw
                assert kx.verify(signer.public_key)
                assert kx.signed_by(signer).encode() == bytes(m.payload)
                seen_kinds.add("kx")
            elif m.type == MessageType.NEGOTIATION:
                assert opened.packet_class == PacketClass.SESSION
                neg = decode_negotiation(m.payload)
                if isinstance(neg, NegotiationProbe):
                    ping = encode_ping(neg.iteration, neg.size)
                    assert (pong_for(ping) if neg.is_pong else ping) == bytes(m.payload)
                    seen_kinds.add("pong" if neg.is_pong else "ping")
                else:
                    assert isinstance(neg, NegotiationControl)
                    assert neg.encode() == bytes(m.payload)
                    seen_kinds.add("end" if neg.end else "control")
            elif m.flags & 0x02:
                header = FragmentHeader.decode(m.payload)
                buf = chains.setdefault(header.chain_id, bytearray(header.total_length))
                chunk = bytes(m.payload[24:])
                buf[header.start_pos : header.start_pos + len(chunk)] = chunk
                seen_kinds.add("fragment")
            else:
                assert opened.packet_class == PacketClass.SESSION
                seen_kinds.add("data")
    assert "kx" in seen_kinds
    if name == "cap_frag_nopsk.json":
        assert [len(c) for c in chains.values()] == [640]
    if name == "cap_negotiation.json":
        assert {"ping", "pong", "end"} <= seen_kinds
