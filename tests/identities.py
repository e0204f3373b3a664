"""The two identities of the in-memory session tests: fixed seeds, so every run (and every
failure) has the same keys, and one definition for every test file that pairs sessions."""

from __future__ import annotations

from typing import Final

from secureiod.secureio.identity import Identity

ID_A: Final = Identity.from_seed(bytes(range(32)))
ID_B: Final = Identity.from_seed(bytes(range(32, 64)))
