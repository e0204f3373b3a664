"""Turns the reference captures into keys and packets our code can open and re-seal."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from secureiod.secureio import PacketKey, PskKeys, derive_cipher_key

VECTORS_DIR = Path(__file__).parent / "vectors"
CAPTURE_FILES = sorted(p.name for p in VECTORS_DIR.glob("cap_*.json"))


@dataclass(frozen=True)
class CapturedPacket:
    direction: str
    data: bytes
    session_key: PacketKey
    """The sender's RB key with the sender's SessionID: what opens its confidential packets."""
    fallback: PacketKey
    """Aux (PSK) or clear: what opens its key-exchange and fragment packets."""
    packet_id_mask: int
    sender_ed25519_64: bytes


@dataclass(frozen=True)
class Capture:
    name: str
    raw: dict
    psk: PskKeys | None
    cipher_key: bytes
    packets: list[CapturedPacket]


def load_capture(name: str) -> Capture:
    raw = json.loads((VECTORS_DIR / name).read_text())
    psk = PskKeys.from_psk(bytes.fromhex(raw["psk"])) if raw["psk"] else None
    cipher_key = derive_cipher_key(
        bytes.fromhex(raw["A_x25519_private"]), bytes.fromhex(raw["B_x25519_public"]), psk
    )
    fallback = PacketKey.aux(psk.aux_key) if psk else PacketKey.clear()
    session = {
        "A>B": PacketKey.session(cipher_key, bytes.fromhex(raw["A_session_id"])),
        "B>A": PacketKey.session(cipher_key, bytes.fromhex(raw["B_session_id"])),
    }
    eds = {
        "A>B": bytes.fromhex(raw["A_ed25519_private_seed_and_pub"]),
        "B>A": bytes.fromhex(raw["B_ed25519_private_seed_and_pub"]),
    }
    packets = [
        CapturedPacket(
            p["dir"],
            bytes.fromhex(p["hex"]),
            session[p["dir"]],
            fallback,
            psk.packet_id_mask if psk else 0,
            eds[p["dir"]],
        )
        for p in raw["packets"]
    ]
    return Capture(name, raw, psk, cipher_key, packets)
