"""The C accelerator (``_accel.c``) agrees byte for byte with the pure-Python reference.

``packet.seal``/``open_packet`` use the accelerator when it is built; the Python functions
``seal_python``/``open_python`` define the behaviour. Both must give the same bytes, the
same packet class and key index, and reject the same inputs with the same exception type.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from blake3 import blake3
from captures import CAPTURE_FILES, load_capture

from secureiod.secureio import packet
from secureiod.secureio.errors import SecureioError
from secureiod.secureio.packet import PacketKey, open_python, seal_python


def _outcome(fn, *args):  # type: ignore[no-untyped-def]
    try:
        r = fn(*args)
    except SecureioError as exc:
        return type(exc)
    return (r.packet_id, r.packet_class, r.key_index, bytes(r.messages))


def test_accelerator_is_built_where_make_test_runs() -> None:
    """CI installs libsodium-dev: a silently missing build would hide a speed regression."""
    assert packet.ACCEL is not None


def test_blake3_matches_package() -> None:
    rng = random.Random(3)
    for _ in range(2000):
        x = rng.randbytes(32)
        assert packet.ACCEL.blake3_32(x) == blake3(x).digest()  # type: ignore[union-attr]


@pytest.mark.parametrize("name", CAPTURE_FILES)
def test_captures_same_results(name: str) -> None:
    cap = load_capture(name)
    for p in cap.packets:
        keys = [p.session_key, p.fallback]
        assert _outcome(packet.open_packet, p.data, keys, p.packet_id_mask) == _outcome(
            open_python, p.data, keys, p.packet_id_mask
        )
        opened = open_python(p.data, keys, p.packet_id_mask)
        key = keys[opened.key_index]
        assert packet.seal(key, opened.packet_id, opened.messages, p.packet_id_mask) == p.data


def test_random_seal_open_and_mutations_agree() -> None:
    rng = random.Random(9)
    keys = [
        PacketKey.session(rng.randbytes(32), rng.randbytes(16)),
        PacketKey.aux(rng.randbytes(32)),
        PacketKey.clear(),
    ]
    for i in range(3000):
        key = keys[i % 3]
        pid = rng.randint(1, 2**64 - 1)
        mask = rng.choice([0, rng.getrandbits(64)])
        msg = rng.randbytes(rng.choice([0, 1, 35, 36, 63, 64, 65, 200, 1400, 9000]))
        sealed = seal_python(key, pid, msg, mask)
        assert packet.seal(key, pid, msg, mask) == sealed
        candidates = rng.sample(keys, rng.randint(1, 3))
        mutated = bytearray(sealed)
        if rng.random() < 0.7:
            mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
        if rng.random() < 0.1:
            del mutated[rng.randrange(len(mutated)) :]
        data = bytes(mutated)
        assert _outcome(packet.open_packet, data, candidates, mask) == _outcome(
            open_python, data, candidates, mask
        )


def test_pure_python_path_passes_vectors_and_tamper_tests() -> None:
    """Run the byte-exact and tamper suites once more without the accelerator."""
    root = Path(__file__).parent
    env = {**os.environ, "SECUREIOD_PURE_PYTHON": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(root / "test_vectors.py"),
            str(root / "test_tamper.py"),
            str(root / "test_session.py"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


@pytest.mark.parametrize("value", [-1, 1 << 64])
def test_out_of_range_integers_are_refused_not_wrapped(value: int) -> None:
    """A PacketID or mask outside 0..2^64-1 must raise, never wrap silently into another
    (valid-looking) PacketID: the C code once parsed them with "K", which wraps."""
    accel = packet.ACCEL
    seed = bytes(24)
    with pytest.raises(OverflowError):
        accel.seal(None, seed, value, b"x", 0)  # type: ignore[attr-defined]
    with pytest.raises(OverflowError):
        accel.seal(None, seed, 1, b"x", value)  # type: ignore[attr-defined]
    with pytest.raises(OverflowError):
        accel.open(bytes(64), ((None, seed),), value)  # type: ignore[attr-defined]
