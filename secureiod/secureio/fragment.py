"""Fragment header codec (PROTOCOL §9.1): ``ChainID || StartPos || TotalMessageLength``."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from .constants import FRAGMENT_HEADER_SIZE
from .errors import MalformedError

FRAGMENT_HEADER: Final = struct.Struct("<QQQ")


@dataclass(frozen=True, slots=True)
class FragmentHeader:
    chain_id: int
    start_pos: int
    total_length: int

    def encode(self) -> bytes:
        return FRAGMENT_HEADER.pack(self.chain_id, self.start_pos, self.total_length)

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> FragmentHeader:
        if len(payload) < FRAGMENT_HEADER_SIZE:
            raise MalformedError(f"fragment of {len(payload)} bytes is shorter than its header")
        return cls(*FRAGMENT_HEADER.unpack_from(payload))
