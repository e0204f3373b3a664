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
import threading
import time
from pathlib import Path

import pytest
from blake3 import blake3
from captures import CAPTURE_FILES, load_capture

from secureiod.secureio import MessageType, packet
from secureiod.secureio.errors import MalformedError, SecureioError
from secureiod.secureio.packet import PacketKey, open_python, seal_python
from secureiod.secureio.wire import encode_message, iter_messages, split_messages


def _outcome(fn, *args):  # type: ignore[no-untyped-def]
    try:
        r = fn(*args)
    except SecureioError as exc:
        return type(exc)
    return (r.packet_id, r.packet_class, r.key_index, bytes(r.messages))


def _pytest_passes(env: dict[str, str], *args: str) -> None:
    """Run pytest on ``args`` in a fresh interpreter with ``env`` (the accelerator is
    chosen at import): it must pass, and run something."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


def test_accelerator_is_built_where_make_test_runs() -> None:
    """CI installs libsodium-dev and libssl-dev: a silently missing build (or OpenSSL half)
    would hide a speed regression."""
    assert packet.ACCEL is not None
    assert packet.ACCEL.OPENSSL is True
    assert packet.crypto_backend() == "openssl+libsodium"


_BASE_PROVIDER_ONLY = """openssl_conf = openssl_init
[openssl_init]
providers = provider_sect
[provider_sect]
base = base_sect
[base_sect]
activate = 1
"""


def test_without_openssls_algorithms_the_accelerator_stays_on_with_libsodium(
    tmp_path: Path,
) -> None:
    """An OpenSSL that offers no ChaCha20/POLY1305 (a FIPS-only box, a restricted
    OPENSSL_CONF: here only the base provider) must not turn the C path off and leave the
    daemon ten times slower: every input then goes to libsodium, with the same bytes."""
    conf = tmp_path / "openssl.cnf"
    conf.write_text(_BASE_PROVIDER_ONLY)
    env = {**os.environ, "OPENSSL_CONF": str(conf)}
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "from secureiod.secureio import _accel, _rxbatch, packet, rxbatch\n"
            "print(_accel.OPENSSL, _rxbatch.OPENSSL, packet.ACCEL is _accel,"
            " rxbatch.RXBATCH is not None, packet.crypto_backend())",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.stdout.split() == ["False", "False", "True", "True", "libsodium"], probe.stderr[
        -2000:
    ]
    root = Path(__file__).parent
    _pytest_passes(
        env,
        "-k",
        "crossovers or captures or random or open_run or threads",
        str(root / "test_accel.py"),
        str(root / "test_rx_batch.py"),
    )


def _cpu_has_avx512f() -> bool:
    return any(
        line.startswith("flags") and "avx512f" in line.split()
        for line in Path("/proc/cpuinfo").read_text().splitlines()
    )


def test_the_avx512_chacha_is_on_exactly_where_the_cpu_has_it() -> None:
    """Where the CPU has AVX-512F, fragments are encrypted sixteen blocks at a time
    (``chacha16_xor`` in ``_construction.h``): on such a box every byte-for-byte test in
    this file and in test_rx_batch.py / test_tx_batch.py runs it, and a build that lost
    it (a speed regression only) is noticed here."""
    from secureiod.secureio import _accel, _rxbatch

    wanted = _cpu_has_avx512f() and not os.environ.get("SECUREIOD_NO_AVX512")
    assert _accel.AVX512 is _rxbatch.AVX512 is wanted


_SEAL_AND_OPEN = """
import hashlib
from secureiod.secureio import _accel, _rxbatch, rxbatch
from secureiod.secureio.packet import PacketKey, seal_fragments
key = PacketKey.session(bytes(range(32)), bytes(range(100, 116)))
other = PacketKey.session(bytes(range(1, 33)), bytes(range(101, 117)))
h = hashlib.sha256()
pid = (1 << 32) - 40  # the PacketIDs (nonces) cross 2^32 on the way
for e in (25, 90, 101, 1408, 1500):
    for size in (1, 63, 64, 65, 1000, 1436, 1437, 16 * 1437, 17 * 1437 + 5, 59700):
        out, count, seg = seal_fragments(key, pid, 0, 7, bytes(i % 251 for i in range(size)), 3, e)
        pid += count
        h.update(out)
        if count > 64:  # more than one GRO read
            continue
        for keys in (((key.stream_key, key.mac_seed),),
                     ((other.stream_key, other.mac_seed), (key.stream_key, key.mac_seed))):
            h.update(repr(rxbatch.RXBATCH.open_run(out, seg, keys, 0)).encode())
print(_accel.AVX512, _rxbatch.AVX512, h.hexdigest())
"""


def test_without_avx512_openssls_chacha_gives_the_same_bytes() -> None:
    """``SECUREIOD_NO_AVX512=1`` (as a CPU without it) goes back to OpenSSL's ChaCha20 per
    fragment: the same sealed bytes and the same opened runs as the AVX-512 path, and the
    byte-for-byte tests against the Python reference pass on that path too."""
    runs = {}
    for off in ("", "1"):
        env = {k: v for k, v in os.environ.items() if k != "SECUREIOD_NO_AVX512"}
        if off:
            env["SECUREIOD_NO_AVX512"] = off
        result = subprocess.run(
            [sys.executable, "-c", _SEAL_AND_OPEN],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        runs[off] = result.stdout.split()
    assert runs["1"][:2] == ["False", "False"]
    assert runs[""][:2] == [str(_cpu_has_avx512f())] * 2
    assert runs[""][2] == runs["1"][2]
    root = Path(__file__).parent
    _pytest_passes(
        {**os.environ, "SECUREIOD_NO_AVX512": "1"},
        "-k",
        "crossovers or captures or random or open_run or threads or reference",
        str(root / "test_accel.py"),
        str(root / "test_rx_batch.py"),
        str(root / "test_tx_batch.py"),
    )


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
    _pytest_passes(
        env,
        str(root / "test_vectors.py"),
        str(root / "test_tamper.py"),
        str(root / "test_session.py"),
    )


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


# --- OpenSSL for long inputs, libsodium for short: one ChaCha20, one Poly1305 -------------
# _construction.h picks the library by input length (crossovers 128 B for ChaCha20, 192 B
# for Poly1305 within a run of fragments; 1024 B and 384 B in a one-packet call). Every
# length around those, and streams ending around every 64-byte block boundary, must give
# the reference's bytes and rejections.

CROSSOVERS = (128, 192, 384, 1024)


def _boundary_sizes() -> list[int]:
    """Message-area lengths n putting each primitive on both sides of each crossover: the
    messages tag covers n bytes, the sealing stream 36 + n, the opening stream (from the
    second block on) n - 28; and streams ending at every offset around 64-byte blocks."""
    sizes = set(range(0, 260))
    for base in CROSSOVERS:
        for d in range(-3, 4):
            sizes |= {base + d, base - 36 + d, base + 28 + d}
    for k in range(1, 40):
        for d in (-1, 0, 1):
            sizes |= {64 * k + d, 64 * k - 36 + d, 64 * k + 28 + d}
    sizes |= {1400, 1437, 1441, 4095, 8009, 9000, 65535, 70001}
    return sorted(s for s in sizes if s >= 0)


def _keys3(rng: random.Random) -> list[PacketKey]:
    return [
        PacketKey.session(rng.randbytes(32), rng.randbytes(16)),
        PacketKey.aux(rng.randbytes(32)),
        PacketKey.clear(),
    ]


def test_every_length_around_the_crossovers_seals_and_opens_as_the_reference() -> None:
    rng = random.Random(11)
    keys = _keys3(rng)
    for size in _boundary_sizes():
        for key_index, key in enumerate(keys):
            pid = rng.randint(1, 2**64 - 1)
            mask = rng.choice([0, rng.getrandbits(64)])
            msg = rng.randbytes(size)
            sealed = seal_python(key, pid, msg, mask)
            assert packet.seal(key, pid, msg, mask) == sealed, (size, key_index)
            # the right key last: the wrong ones are tried (and refused) first
            candidates = [k for k in keys if k is not key] + [key]
            want = (pid, key.packet_class, len(keys) - 1, msg)
            assert _outcome(packet.open_packet, sealed, candidates, mask) == want, size
            for pos in {8, 24, len(sealed) - 1, rng.randrange(8, len(sealed))}:
                bad = bytearray(sealed)
                bad[pos] ^= 1 << rng.randrange(8)
                got = _outcome(packet.open_packet, bytes(bad), candidates, mask)
                assert got == _outcome(open_python, bytes(bad), candidates, mask), (size, pos)


def test_keystream_is_libsodiums_djb_chacha20_on_both_sides_of_the_crossovers() -> None:
    """Sealing zeros exposes the keystream: it must be libsodium's own
    crypto_stream_chacha20 (DJB, 8-byte nonce = PacketID, counter from 0), whichever
    library made it; the OpenSSL IV is LE64(counter) || nonce."""
    import pysodium  # the `bench` extra, which `make test` installs: never skipped

    rng = random.Random(12)
    for size in _boundary_sizes():
        sk, seed, pid = rng.randbytes(32), rng.randbytes(24), rng.randint(1, 2**64 - 1)
        sealed = packet.ACCEL.seal(sk, seed, pid, bytes(size), 0)  # type: ignore[union-attr]
        stream = pysodium.crypto_stream_chacha20_xor(
            bytes(36 + size), pid.to_bytes(8, "little"), sk
        )
        assert sealed[8 + 36 :] == stream[36:], size


def _fragment_cases() -> list[tuple[int, int]]:
    """(max_payload, payload size): fragments whose messages areas (max_payload + 9, the
    last one shorter) fall on both sides of the run crossovers and end at odd offsets."""
    cases = []
    for area in (100, 119, 120, 127, 128, 129, 155, 156, 157, 183, 191, 192, 193, 257, 1437):
        e = area - 9
        for size in (1, 2 * (e - 24) + 1, 3 * (e - 24) - 61, 5 * (e - 24) + 7, 9000):
            if size > 0:
                cases.append((e, size))
    return cases


@pytest.mark.parametrize(("e", "size"), _fragment_cases())
def test_seal_fragments_around_the_crossovers_is_the_reference(e: int, size: int) -> None:
    rng = random.Random(e * 100_003 + size)
    payload = rng.randbytes(size)
    for key in _keys3(rng):
        pid, mask, chain = rng.randint(1, 2**40), rng.getrandbits(64), rng.getrandbits(64)
        got = packet.seal_fragments(key, pid, mask, 5, payload, chain, e)
        assert got == packet.seal_fragments_python(key, pid, mask, 5, payload, chain, e)


def test_calls_in_several_threads_at_once_give_the_single_thread_bytes() -> None:
    """The C calls release the GIL: their OpenSSL contexts are per call, so threads sealing
    and opening under different keys at the same time cannot mix them up."""
    rng = random.Random(13)
    jobs = []
    for _ in range(24):
        key = _keys3(rng)[rng.randrange(2)]
        pid, e = rng.randint(1, 2**40), rng.choice([1232, 1392, 8948])
        payload = rng.randbytes(rng.randint(1, 65536))
        jobs.append((key, pid, e, payload, packet.seal_fragments(key, pid, 0, 5, payload, 7, e)))
    errors: list[str] = []

    def work(offset: int) -> None:
        deadline = time.monotonic() + 3
        for round_ in range(20):
            for j in range(len(jobs)):
                key, pid, e, payload, want = jobs[(j + offset) % len(jobs)]
                if packet.seal_fragments(key, pid, 0, 5, payload, 7, e) != want:
                    errors.append(f"thread {offset} round {round_} job {j}")
            if time.monotonic() > deadline:
                return

    threads = [threading.Thread(target=work, args=(k * 5,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]


def _message_areas(rng: random.Random) -> list[bytes]:
    """Well-formed message areas, and the same cut short or with a length field bent."""
    areas = [b""]
    for _ in range(400):
        area = b"".join(
            encode_message(
                rng.choice([0, 1, MessageType.READ_WRITE, 0xFFFFFFEF, 0xFFFFFFFF]),
                rng.randbytes(rng.choice([0, 1, 8, 64, 1400])),
                rng.choice([0, 0x01, 0x80, 0x81, 0xFF]),
            )
            for _ in range(rng.randint(1, 12))
        )
        areas.append(area)
        areas.append(area[: rng.randrange(len(area) + 1)])
        bent = bytearray(area)
        at = rng.randrange(0, max(1, len(bent) - 8))
        bent[at + 4 : at + 8] = rng.getrandbits(32).to_bytes(4, "little")
        areas.append(bytes(bent))
    return areas


def test_split_messages_is_the_reference_on_good_cut_and_bent_areas() -> None:
    """``_accel.split_messages`` (the session's per-packet message walk) gives what
    ``wire.split_messages`` gives, which gives what ``iter_messages`` yields, including
    the messages before a truncated header or an overlong length and ``complete``."""
    split = packet.ACCEL.split_messages  # type: ignore[union-attr]
    for area in _message_areas(random.Random(13)):
        expected = split_messages(area)
        assert split(area) == expected
        assert split(memoryview(area)) == expected
        assert split(bytearray(area)) == expected
        walked: list[tuple[int, int, bytes]] = []
        try:
            for m in iter_messages(area):
                walked.append((m.type, m.flags, bytes(m.payload)))
        except MalformedError:
            assert expected == (walked, False)
        else:
            assert expected == (walked, True)
    with pytest.raises(TypeError):
        split("not bytes")
