"""Which library should do secureio's per-packet crypto?  (``make bench-crypto``)

Every datagram costs one BLAKE3 (the Poly1305 one-time key), two Poly1305 tags and one
ChaCha20 pass in each direction, so the binding that carries ChaCha20 and Poly1305 decides
most of the per-packet CPU of the daemon.  This script runs the *same* seal+open under each
candidate route and prints microseconds per seal+open for 64, 1400 and 8000 byte payloads:

* ``cryptography``: ChaCha20 and Poly1305 from ``cryptography`` (OpenSSL), as
  ``secureiod.secureio.packet`` does;
* ``pysodium``: ChaCha20 from the system libsodium through ``pysodium`` (ctypes); pysodium has
  no ``crypto_onetimeauth``, so Poly1305 still comes from ``cryptography``;
* ``pycryptodome``: ``Crypto.Cipher.ChaCha20`` with an 8-byte nonce; its public Poly1305 API
  only derives keys from a cipher, so Poly1305 again comes from ``cryptography``.

Before anything is timed, every route must produce byte-identical datagrams to
``packet.seal`` for a fixed key, PacketID and payload, open ``packet.seal``'s output, and
reject a tampered datagram: a fast route that computes something else is worthless.

It then times the pieces alone (BLAKE3 poly key, ChaCha20 context creation, Poly1305, the
pure-Python HChaCha20 that runs once per key, X25519 and Ed25519) so the table can be read as
"where does the time go".  Numbers are medians of per-call times on this machine; they are
for comparing routes, never thresholds for a test.
"""

from __future__ import annotations

import argparse
import hmac
import importlib.metadata
import json
import platform
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any, Final

import nacl.signing
from benchlib import cpu_model, measure
from blake3 import blake3
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.poly1305 import Poly1305

from secureiod.secureio import crypto, packet
from secureiod.secureio.constants import KX_SIGNED_SIZE, POLY_KEY_XOR

SIZES: Final = (64, 1400, 8000)
"""A small control packet, a full UDP-MTU data packet, a large aggregated/jumbo packet."""

_ZERO8: Final = bytes(8)
_U32: Final = struct.Struct("<I")
_HEAD: Final = 36  # HeadersTag(16) || MessagesTag(16) || LE32(Length): the first ciphertext
_XOR_PID: Final = int.from_bytes(POLY_KEY_XOR[:8], "little")
_XOR_KEY: Final = int.from_bytes(POLY_KEY_XOR[8:32], "little")

# Fixed inputs for the equivalence check and the timings: deterministic so that a failure
# is reproducible, arbitrary otherwise.
CIPHER_KEY: Final = bytes(range(32))
SESSION_ID: Final = bytes(range(100, 116))
CHECK_PID: Final = 0x0102030405060708
WARM_UP_S: Final = 0.5

Seal = Callable[[bytes, bytes, int, bytes], bytes]
"""``seal(stream_key, mac_seed, packet_id, messages) -> datagram``."""
Open = Callable[[bytes, bytes, bytes], bytes]
"""``open(datagram, stream_key, mac_seed) -> messages``; raises ``ValueError`` if forged."""


class Forged(ValueError):
    """A tag did not verify: the routes raise it instead of returning garbage."""


# --- the shared, non-contested parts of the construction ------------------------------------


def mac_seed(key: bytes) -> bytes:
    """``K[0:24] xor C32[8:32]``, written out here so the check below is not circular."""
    return (int.from_bytes(key[:24], "little") ^ _XOR_KEY).to_bytes(24, "little")


def poly_key(seed: bytes, packet_id: int) -> bytes:
    """The per-packet Poly1305 key ``BLAKE3((LE64(pid) || K[0:24]) xor C32)``.

    Identical in every route: BLAKE3 has one binding, so it is not what is being compared.
    """
    return blake3((packet_id ^ _XOR_PID).to_bytes(8, "little") + seed).digest()


def _plaintext_head(pk: bytes, messages: bytes) -> bytes:
    length = _U32.pack(len(messages))
    return Poly1305.generate_tag(pk, length) + Poly1305.generate_tag(pk, messages) + length


def _check_head(pk: bytes, head: bytes) -> None:
    if not hmac.compare_digest(Poly1305.generate_tag(pk, head[32:_HEAD]), head[:16]):
        raise Forged("headers tag")


def _check_body(pk: bytes, head: bytes, body: bytes) -> None:
    if not hmac.compare_digest(Poly1305.generate_tag(pk, body), head[16:32]):
        raise Forged("messages tag")
    if _U32.unpack_from(head, 32)[0] != len(body):
        raise Forged("Length field")


# --- the routes ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    note: str
    seal: Seal
    open: Open


def cryptography_route() -> Route:
    """What ``packet.py`` does: one OpenSSL ChaCha20 context per packet, fed twice."""

    def seal(stream_key: bytes, seed: bytes, pid: int, messages: bytes) -> bytes:
        pk = poly_key(seed, pid)
        pid8 = pid.to_bytes(8, "little")
        enc = Cipher(algorithms.ChaCha20(stream_key, _ZERO8 + pid8), mode=None).encryptor()
        return pid8 + enc.update(_plaintext_head(pk, messages)) + enc.update(messages)

    def open_(data: bytes, stream_key: bytes, seed: bytes) -> bytes:
        view = memoryview(data)
        pid8 = bytes(view[:8])
        dec = Cipher(algorithms.ChaCha20(stream_key, _ZERO8 + pid8), mode=None).decryptor()
        head = dec.update(view[8 : 8 + _HEAD])
        pk = poly_key(seed, int.from_bytes(pid8, "little"))
        _check_head(pk, head)
        body = dec.update(view[8 + _HEAD :])
        _check_body(pk, head, body)
        return body

    return Route("cryptography", "ChaCha20 + Poly1305 from cryptography (OpenSSL)", seal, open_)


def pysodium_route() -> Route:
    """libsodium's DJB ChaCha20 through ctypes; one call per direction, no context object.

    libsodium's stream API is stateless, so opening decrypts block 0 (the 36 header bytes
    and the first 28 message bytes) first, checks the header tag, then the remaining blocks
    from counter 1: the same "reject wrong keys after one block" behaviour as a context.
    """
    # Imported here, not at the top: pysodium is a bench-only extra, and its absence (or a
    # missing libsodium, which pysodium reports as ValueError) must skip this route only.
    import pysodium

    xor = pysodium.crypto_stream_chacha20_xor
    xor_ic = pysodium.crypto_stream_chacha20_xor_ic

    def seal(stream_key: bytes, seed: bytes, pid: int, messages: bytes) -> bytes:
        pk = poly_key(seed, pid)
        pid8 = pid.to_bytes(8, "little")
        return pid8 + xor(_plaintext_head(pk, messages) + messages, pid8, stream_key)

    def open_(data: bytes, stream_key: bytes, seed: bytes) -> bytes:
        pid8 = data[:8]
        block0 = xor(data[8:72], pid8, stream_key)
        pk = poly_key(seed, int.from_bytes(pid8, "little"))
        _check_head(pk, block0)
        body = block0[_HEAD:]
        if len(data) > 72:
            body += xor_ic(data[72:], pid8, 1, stream_key)
        _check_body(pk, block0, body)
        return body

    return Route(
        "pysodium",
        "ChaCha20 from libsodium via pysodium; Poly1305 from cryptography "
        "(pysodium has no crypto_onetimeauth binding)",
        seal,
        open_,
    )


def pycryptodome_route() -> Route:
    """pycryptodome's ChaCha20 (8-byte nonce selects the DJB layout), stateful like OpenSSL."""
    from Crypto.Cipher import ChaCha20  # bench-only extra: ImportError skips the route

    new = ChaCha20.new

    def seal(stream_key: bytes, seed: bytes, pid: int, messages: bytes) -> bytes:
        pk = poly_key(seed, pid)
        pid8 = pid.to_bytes(8, "little")
        enc = new(key=stream_key, nonce=pid8)
        return pid8 + enc.encrypt(_plaintext_head(pk, messages)) + enc.encrypt(messages)

    def open_(data: bytes, stream_key: bytes, seed: bytes) -> bytes:
        view = memoryview(data)
        pid8 = bytes(view[:8])
        dec = new(key=stream_key, nonce=pid8)
        head = dec.decrypt(view[8 : 8 + _HEAD])
        pk = poly_key(seed, int.from_bytes(pid8, "little"))
        _check_head(pk, head)
        body = dec.decrypt(view[8 + _HEAD :])
        _check_body(pk, head, body)
        return body

    return Route(
        "pycryptodome",
        "ChaCha20 from pycryptodome; Poly1305 from cryptography (pycryptodome's Poly1305 "
        "derives its key from a cipher; raw keys need its private modules)",
        seal,
        open_,
    )


ROUTE_FACTORIES: Final[tuple[tuple[str, Callable[[], Route]], ...]] = (
    ("cryptography", cryptography_route),
    ("pysodium", pysodium_route),
    ("pycryptodome", pycryptodome_route),
)


def payload(size: int) -> bytes:
    """Deterministic, non-repeating-looking bytes (zeros could hide a keystream mistake)."""
    return bytes((i * 167 + 13) & 0xFF for i in range(size))


def verify_route(route: Route, stream_key: bytes, seed: bytes, key: packet.PacketKey) -> None:
    """Fail loudly unless ``route`` is byte-for-byte the protocol, in both directions.

    Explicit raises rather than ``assert`` so the check survives ``python -O``.
    """
    for size in (0, 1, *SIZES):
        msgs = payload(size)
        reference = packet.seal(key, CHECK_PID, msgs)
        ours = route.seal(stream_key, seed, CHECK_PID, msgs)
        if ours != reference:
            raise AssertionError(f"{route.name}: seal differs from packet.seal at {size} bytes")
        if route.open(reference, stream_key, seed) != msgs:
            raise AssertionError(f"{route.name}: cannot open packet.seal output ({size} bytes)")
        if packet.open_packet(ours, [key]).messages != msgs:
            raise AssertionError(f"{route.name}: packet.open_packet rejects its output")
        for flip in (8, len(reference) - 1):  # a header byte, then the last message byte
            tampered = bytearray(reference)
            tampered[flip] ^= 0x01
            try:
                route.open(bytes(tampered), stream_key, seed)
            except Forged:
                continue
            raise AssertionError(f"{route.name}: accepted a datagram tampered at byte {flip}")


# --- timing ----------------------------------------------------------------------------------


def seal_open_op(route: Route, stream_key: bytes, seed: bytes, msgs: bytes) -> Callable[[], None]:
    """One seal then one open, with a fresh PacketID each time as on a real session."""
    seal, open_, ids = route.seal, route.open, count(1)

    def op() -> None:
        open_(seal(stream_key, seed, next(ids), msgs), stream_key, seed)

    return op


def piece_ops(stream_key: bytes, seed: bytes) -> list[tuple[str, Callable[[], object]]]:
    """The building blocks, timed one by one to show where a seal+open spends its time."""
    key = packet.PacketKey.session(CIPHER_KEY, SESSION_ID)
    pk = poly_key(seed, CHECK_PID)
    nonce16 = _ZERO8 + CHECK_PID.to_bytes(8, "little")
    p64, p1400 = payload(64), payload(1400)
    kx_signed = payload(KX_SIGNED_SIZE)
    ours = crypto.x25519_private_from_random(lambda n: bytes(range(1, n + 1)))
    theirs = crypto.x25519_public(crypto.x25519_private_from_random(lambda n: bytes(n * [7])))
    signer = nacl.signing.SigningKey(bytes(range(32)))
    verifier = signer.verify_key
    signed = signer.sign(kx_signed)
    ids = count(1)
    ops: list[tuple[str, Callable[[], object]]] = [
        ("BLAKE3 poly key (PacketKey.poly_key)", lambda: key.poly_key(next(ids))),
        (
            "ChaCha20 context creation (cryptography)",
            lambda: Cipher(algorithms.ChaCha20(stream_key, nonce16), mode=None).encryptor(),
        ),
        ("Poly1305 tag, 64 B (cryptography)", lambda: Poly1305.generate_tag(pk, p64)),
        ("Poly1305 tag, 1400 B (cryptography)", lambda: Poly1305.generate_tag(pk, p1400)),
        (
            "HChaCha20, pure Python (once per key+SessionID)",
            lambda: crypto.hchacha20(CIPHER_KEY, SESSION_ID),
        ),
        (
            "X25519 shared secret (PyNaCl, crypto.x25519_shared)",
            lambda: crypto.x25519_shared(ours, theirs),
        ),
        (f"Ed25519 sign, {KX_SIGNED_SIZE} B (PyNaCl)", lambda: signer.sign(kx_signed)),
        (f"Ed25519 verify, {KX_SIGNED_SIZE} B (PyNaCl)", lambda: verifier.verify(signed)),
    ]
    try:
        from Crypto.Cipher import ChaCha20

        pid8 = CHECK_PID.to_bytes(8, "little")
        ops.insert(
            2,
            (
                "ChaCha20 context creation (pycryptodome)",
                lambda: ChaCha20.new(key=stream_key, nonce=pid8),
            ),
        )
    except ImportError:
        pass
    return ops


# --- reporting -------------------------------------------------------------------------------


def library_versions() -> dict[str, str]:
    """Versions of everything whose speed is being compared, including the C libraries."""
    versions: dict[str, str] = {}
    for dist in ("cryptography", "blake3", "PyNaCl", "pysodium", "pycryptodome"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    try:
        from cryptography.hazmat.backends.openssl import backend

        versions["OpenSSL (cryptography)"] = backend.openssl_version_text()
    except ImportError:
        pass
    try:
        import pysodium

        versions["libsodium (pysodium, system)"] = pysodium.sodium.sodium_version_string().decode()
    except (ImportError, OSError, ValueError, AttributeError):
        pass
    return versions


def route_table(results: dict[str, dict[int, float]], skipped: dict[str, str], repeats: int) -> str:
    base = results.get("cryptography")
    header = "| route | " + " | ".join(f"{s} B" for s in SIZES) + " |"
    lines = [
        f"µs per seal+open (median of {repeats} batches; (N.NNx) = time relative to cryptography)",
        "",
        header,
        "|---|" + "---:|" * len(SIZES),
    ]
    for name, _ in ROUTE_FACTORIES:
        if name in skipped:
            lines.append(f"| {name} | " + " | ".join("skipped" for _ in SIZES) + " |")
            continue
        cells = []
        for size in SIZES:
            us = results[name][size]
            ratio = f" ({us / base[size]:.2f}x)" if base else ""
            cells.append(f"{us:.2f}{ratio}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pieces_table(pieces: dict[str, float]) -> str:
    lines = ["| piece | µs per call |", "|---|---:|"]
    lines += [f"| {name} | {us:.2f} |" for name, us in pieces.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    parser.add_argument("--repeats", type=int, default=9, help="batches per median (9)")
    parser.add_argument(
        "--batch-ms", type=float, default=25.0, help="minimum duration of one batch (25 ms)"
    )
    args = parser.parse_args(argv)
    target_ns = int(args.batch_ms * 1e6)
    started = time.perf_counter()

    key = packet.PacketKey.session(CIPHER_KEY, SESSION_ID)
    stream_key = crypto.hchacha20(CIPHER_KEY, SESSION_ID)
    seed = mac_seed(CIPHER_KEY)
    if stream_key != key.stream_key or poly_key(seed, CHECK_PID) != key.poly_key(CHECK_PID):
        raise AssertionError("bench key derivation disagrees with packet.PacketKey")

    versions = library_versions()
    print("# secureio crypto routes")
    print()
    print(
        f"- Python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.machine()}"
    )
    print(f"- CPU: {cpu_model()}")
    for lib, version in versions.items():
        print(f"- {lib}: {version}")
    print()

    routes: list[Route] = []
    skipped: dict[str, str] = {}
    for name, factory in ROUTE_FACTORIES:
        try:
            route = factory()
        except (ImportError, OSError, ValueError, AttributeError) as exc:
            skipped[name] = f"{type(exc).__name__}: {exc}"
            print(f"route {name}: skipped: {skipped[name]}")
            continue
        verify_route(route, stream_key, seed, key)
        routes.append(route)
        print(f"route {name}: identical to packet.seal/open_packet; {route.note}")
    print()

    # Run every route for a moment before timing anything: the first measurement otherwise
    # pays for frequency ramp-up and cold caches, which showed up as a ~10% outlier.
    warm_until = time.perf_counter() + WARM_UP_S
    while time.perf_counter() < warm_until:
        for route in routes:
            for size in SIZES:
                seal_open_op(route, stream_key, seed, payload(size))()

    results: dict[str, dict[int, float]] = {}
    for route in routes:
        results[route.name] = {
            size: measure(
                seal_open_op(route, stream_key, seed, payload(size)), args.repeats, target_ns
            )
            for size in SIZES
        }
    pieces = {
        name: measure(op, args.repeats, target_ns) for name, op in piece_ops(stream_key, seed)
    }

    print(route_table(results, skipped, args.repeats))
    print()
    print(pieces_table(pieces))
    elapsed = time.perf_counter() - started
    print()
    print(f"({elapsed:.1f} s)")

    if args.json:
        report: dict[str, Any] = {
            "unit": "microseconds per call, median",
            "python": platform.python_version(),
            "cpu": cpu_model(),
            "versions": versions,
            "repeats": args.repeats,
            "batch_ms": args.batch_ms,
            "seal_open_us": {
                name: {str(s): us for s, us in r.items()} for name, r in results.items()
            },
            "notes": {route.name: route.note for route in routes},
            "skipped": skipped,
            "pieces_us": pieces,
        }
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
