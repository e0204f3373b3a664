"""The asyncio API and the UDP adapter over real UDP on 127.0.0.1 (no mocks).

Every test runs its own event loop under a hard deadline, so a hang fails in seconds
instead of stalling the suite.
"""

from __future__ import annotations

import asyncio
import functools
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from secureiod.aio import (
    PayloadTooBigError,
    SecureSession,
    SessionClosedError,
    SessionState,
    connect,
    listen,
)
from secureiod.endpoint import format_endpoint, parse_endpoint
from secureiod.secureio import MessageType, PacketKey, seal
from secureiod.secureio.constants import KX_PAYLOAD_SIZE
from secureiod.secureio.identity import Identity
from secureiod.secureio.session import SessionOptions
from secureiod.secureio.wire import encode_message
from secureiod.udp import SendResult, UdpSocket

RW = MessageType.READ_WRITE
ALICE = Identity.from_seed(bytes(range(32)))
BOB = Identity.from_seed(bytes(range(32, 64)))
STEP = 5.0
"""Bound on any single wait in these tests; loopback handshakes take milliseconds."""

T = TypeVar("T")


def async_test(
    fn: Callable[..., Coroutine[Any, Any, None]],
) -> Callable[..., None]:
    """Run an async test in a fresh loop, failing it after 20 s whatever happens."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 20))

    return wrapper


async def within(awaitable: Awaitable[T], timeout: float = STEP) -> T:
    return await asyncio.wait_for(awaitable, timeout)


@asynccontextmanager
async def session_pair(
    options: SessionOptions | None = None,
    options_bob: SessionOptions | None = None,
    *,
    establish: bool = True,
    **kwargs: Any,
) -> AsyncIterator[tuple[SecureSession, SecureSession]]:
    """Bob listens on a free port, Alice connects to it; both closed afterwards."""
    bob = await listen(BOB, ALICE.public_key, "127.0.0.1:0", options=options_bob or options)
    alice = None
    try:
        alice = await connect(
            ALICE, BOB.public_key, ("127.0.0.1", bob.local_address[1]), options=options, **kwargs
        )
        if establish:
            await alice.wait_established(STEP)
            await bob.wait_established(STEP)
        yield alice, bob
    finally:
        if alice is not None:
            await alice.close()
        await bob.close()


async def read_n(session: SecureSession, n: int) -> list[bytes]:
    return [await within(session.read()) for _ in range(n)]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the session API -------------------------------------------------------------------------


@async_test
async def test_handshake_and_100_messages_each_way() -> None:
    async with session_pair() as (alice, bob):
        assert alice.state == bob.state == SessionState.ESTABLISHED
        assert alice.payload_size == bob.payload_size == 1392
        # The listener learned Alice's address from her authenticated datagrams.
        assert bob.remote_address is not None
        assert bob.remote_address[1] == alice.local_address[1]
        for i in range(100):
            assert alice.write(f"to bob {i}".encode()) == len(f"to bob {i}")
            bob.write(f"to alice {i}".encode())
        assert await read_n(bob, 100) == [f"to bob {i}".encode() for i in range(100)]
        assert await read_n(alice, 100) == [f"to alice {i}".encode() for i in range(100)]
        # Written in one loop iteration, the messages shared packets.
        assert bob.stats.rx_messages == 100
        assert bob.stats.rx_packets < 50
        for s in (alice, bob):
            assert s.driver_stats.read_queue_drops == 0
            assert s.transport_stats.tx_dropped == s.transport_stats.tx_errors == 0


@async_test
async def test_channel_handlers_sync_async_and_failing() -> None:
    async with session_pair() as (alice, bob):
        got: dict[str, list[bytes]] = {"sync": [], "async": []}
        bob.set_handler(MessageType.channel(0), got["sync"].append)

        async def slow(payload: bytes) -> None:
            await asyncio.sleep(0)
            got["async"].append(payload)

        bob.set_handler(MessageType.channel(5), slow)

        def broken(payload: bytes) -> None:
            raise RuntimeError("handler bug")

        bob.set_handler(MessageType.channel(6), broken)
        for i in range(10):
            alice.write_message_async(MessageType.channel(0), b"c0-%d" % i)
            alice.write_message_async(MessageType.channel(5), b"c5-%d" % i)
        alice.write_message_async(MessageType.channel(6), b"boom")
        alice.write_message_async(MessageType.channel(6), b"boom again")
        alice.write_message_async(MessageType.channel(9), b"nobody listens")
        alice.write(b"still readable")
        assert await within(bob.read()) == b"still readable"
        await asyncio.sleep(0.05)
        assert got["sync"] == [b"c0-%d" % i for i in range(10)]
        assert got["async"] == [b"c5-%d" % i for i in range(10)]
        assert bob.driver_stats.handler_errors == 2  # counted, not fatal
        assert bob.driver_stats.unhandled_messages == 1
        assert bob.state == SessionState.ESTABLISHED
        # A READ_WRITE handler replaces the read() queue; removing it restores the queue.
        rw: list[bytes] = []
        bob.set_handler(RW, rw.append)
        alice.write(b"to handler")
        await asyncio.sleep(0.05)
        bob.set_handler(RW, None)
        alice.write(b"to queue")
        assert await within(bob.read()) == b"to queue"
        assert rw == [b"to handler"]
        with pytest.raises(ValueError):
            bob.set_handler(MessageType.KEY_EXCHANGE, rw.append)


@async_test
async def test_write_message_and_send_info() -> None:
    async with session_pair() as (alice, bob):
        await within(alice.write_message(RW, b"sync write"))
        assert await within(bob.read()) == b"sync write"

        infos = [alice.write_message_async(RW, b"async %d" % i) for i in range(20)]
        # Nothing is sent before the loop runs: all of them go out in one flush.
        assert not any(info.done() for info in infos)
        await within(asyncio.gather(*(info.wait() for info in infos)))
        assert all(info.done() and info.error is None for info in infos)
        assert await read_n(bob, 20) == [b"async %d" % i for i in range(20)]
        assert "sent" in repr(infos[0])


@async_test
async def test_messages_written_before_establishment_are_delivered() -> None:
    async with session_pair(establish=False) as (alice, bob):
        info = alice.write_message_async(RW, b"early bird")
        assert alice.write(b"second") == 6
        await within(info.wait())
        assert info.error is None
        assert alice.state == SessionState.ESTABLISHED
        assert await read_n(bob, 2) == [b"early bird", b"second"]


@async_test
async def test_psk_matching_and_mismatched() -> None:
    psk = SessionOptions(psk=b"correct horse battery staple")
    async with session_pair(psk) as (alice, bob):
        alice.write(b"with psk")
        assert await within(bob.read()) == b"with psk"

    other = SessionOptions(psk=b"a different key")
    async with session_pair(psk, other, establish=False) as (alice, bob):
        with pytest.raises(TimeoutError):
            await alice.wait_established(0.5)
        assert bob.stats.drops["auth"] > 0  # Alice's packets open with no key Bob has
        assert bob.remote_address is None  # ...so Bob never learned where she is
        assert bob.state == SessionState.KEY_EXCHANGING


@async_test
async def test_payload_too_big_surfaces_and_fragmentation_carries_it() -> None:
    async with session_pair() as (alice, bob):
        big = b"x" * (alice.payload_size + 1)
        with pytest.raises(PayloadTooBigError):
            alice.write(big)
        with pytest.raises(PayloadTooBigError):
            alice.write_message_async(MessageType.channel(1), big)
        with pytest.raises(PayloadTooBigError):
            await alice.write_message(RW, big)
        alice.write(b"x" * alice.payload_size)  # the limit itself fits
        assert len(await within(bob.read())) == alice.payload_size

    fragmenting = SessionOptions(enable_fragmentation=True)
    async with session_pair(fragmenting) as (alice, bob):
        payload = bytes(range(256)) * 40  # 10240 bytes: 8 fragments
        await within(alice.write_message(RW, payload))
        assert await within(bob.read()) == payload


@async_test
async def test_close() -> None:
    async with session_pair() as (alice, bob):
        alice.write(b"last words")
        await alice.close()
        assert alice.closed and alice.state == SessionState.CLOSED
        assert alice.close_reason == "closed by application"
        assert await within(bob.read()) == b"last words"  # close flushed the batch
        with pytest.raises(SessionClosedError):
            alice.write(b"too late")
        with pytest.raises(SessionClosedError):
            await alice.read()
        with pytest.raises(SessionClosedError):
            await alice.wait_established(1)
        await alice.close()  # idempotent
        await within(alice.wait_closed())
        assert [m async for m in alice] == []

    # Messages already received stay readable after close; then read() raises.
    async with session_pair() as (alice, bob):
        alice.write(b"unread")
        while bob.stats.rx_messages == 0:
            await within(asyncio.sleep(0.01))
        await bob.close()
        assert await bob.read() == b"unread"
        with pytest.raises(SessionClosedError):
            await bob.read()
    assert bob.local_address[1] > 0  # still answered after close, for log lines


@async_test
async def test_close_before_established_fails_pending_sends() -> None:
    nobody = free_udp_port()
    alice = await connect(ALICE, BOB.public_key, f"127.0.0.1:{nobody}")
    info = alice.write_message_async(RW, b"never sent")
    with pytest.raises(TimeoutError):
        await alice.wait_established(0.2)
    await alice.close()
    assert info.done()
    assert isinstance(info.error, SessionClosedError)
    with pytest.raises(SessionClosedError):
        await alice.write_message(RW, b"after close")


@async_test
async def test_key_exchange_timeout_closes_and_wakes_everyone() -> None:
    from secureiod.secureio.keyexchange import KeyExchangeOptions

    opt = SessionOptions(key_exchange=KeyExchangeOptions(timeout=0.3, retry_interval=0.1))
    alice = await connect(ALICE, BOB.public_key, f"127.0.0.1:{free_udp_port()}", options=opt)
    try:
        reader = asyncio.create_task(alice.read())
        with pytest.raises(SessionClosedError, match="key exchange timeout"):
            await within(alice.wait_established())
        with pytest.raises(SessionClosedError):
            await within(reader)
        assert alice.closed
    finally:
        await alice.close()


@async_test
async def test_full_read_queue_drops_instead_of_blocking() -> None:
    async with session_pair(read_queue_size=5) as (alice, bob):
        # Alice's queue is the small one: Bob floods it while nobody reads.
        for i in range(20):
            bob.write(b"%d" % i)
        bob.write_message_async(MessageType.channel(0), b"marker")
        got: list[bytes] = []
        alice.set_handler(MessageType.channel(0), got.append)
        while not got:
            await within(asyncio.sleep(0.01))
        assert alice.driver_stats.read_queue_drops == 15
        assert await read_n(alice, 5) == [b"0", b"1", b"2", b"3", b"4"]
        assert alice.state == SessionState.ESTABLISHED


@async_test
async def test_listener_follows_only_authenticated_sources() -> None:
    bob = await listen(BOB, ALICE.public_key, "127.0.0.1:0")
    port = bob.local_address[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
        attacker.bind(("127.0.0.1", 0))
        # Garbage, and a clear packet with a key-exchange message that is not signed by Alice:
        # the clear MAC is computable by anyone (§13 item 1), the signature is not.
        forged_kx = seal(
            PacketKey.clear(),
            7,
            encode_message(MessageType.KEY_EXCHANGE, bytes(KX_PAYLOAD_SIZE), 0),
        )
        for datagram in (b"garbage" * 10, forged_kx):
            attacker.sendto(datagram, ("127.0.0.1", port))
        await asyncio.sleep(0.05)
        # The clear packet passes its (public) MAC but not the signature: it neither counts as
        # received nor teaches Bob an address.
        assert bob.stats.rx_packets == 0
        assert bob.stats.drops["kx-bad-signature"] == 1
        assert bob.remote_address is None
        alice = await connect(ALICE, BOB.public_key, ("127.0.0.1", port))
        try:
            await alice.wait_established(STEP)
            await bob.wait_established(STEP)
            assert bob.remote_address == ("127.0.0.1", alice.local_address[1])
            for datagram in (b"more garbage" * 10, forged_kx):
                attacker.sendto(datagram, ("127.0.0.1", port))
            alice.write(b"after the noise")
            assert await within(bob.read()) == b"after the noise"
            assert bob.remote_address == ("127.0.0.1", alice.local_address[1])
            assert bob.driver_stats.address_changes == 1
        finally:
            await alice.close()
            await bob.close()


class _Relay(asyncio.DatagramProtocol):
    """A NAT in miniature: forwards a client's datagrams to a server from one of two
    upstream sockets, and the server's answers back. Switching the upstream makes the
    client appear to the server at a new address (roaming)."""

    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.client: tuple[str, int] | None = None
        self.front: asyncio.DatagramTransport | None = None
        self.upstreams: list[asyncio.DatagramTransport] = []
        self.active = 0

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.client = addr
        self.upstreams[self.active].sendto(data, self.server)

    def back(self, data: bytes) -> None:
        if self.front is not None and self.client is not None:
            self.front.sendto(data, self.client)


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, relay: _Relay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.relay.back(data)


@async_test
async def test_roaming_follows_the_latest_authenticated_address() -> None:
    loop = asyncio.get_running_loop()
    bob = await listen(BOB, ALICE.public_key, "127.0.0.1:0")
    relay = _Relay(("127.0.0.1", bob.local_address[1]))
    front, _ = await loop.create_datagram_endpoint(lambda: relay, local_addr=("127.0.0.1", 0))
    relay.front = front  # type: ignore[assignment]
    for _ in range(2):
        up, _ = await loop.create_datagram_endpoint(
            lambda: _Upstream(relay), local_addr=("127.0.0.1", 0)
        )
        relay.upstreams.append(up)  # type: ignore[arg-type]
    alice = await connect(ALICE, BOB.public_key, front.get_extra_info("sockname"))
    try:
        await alice.wait_established(STEP)
        first, second = (u.get_extra_info("sockname") for u in relay.upstreams)
        alice.write(b"via first")
        assert await within(bob.read()) == b"via first"
        assert bob.remote_address == first
        relay.active = 1
        alice.write(b"via second")
        assert await within(bob.read()) == b"via second"
        assert bob.remote_address == second
        bob.write(b"reply reaches the new address")
        assert await within(alice.read()) == b"reply reaches the new address"
    finally:
        await alice.close()
        await bob.close()
        front.close()
        for up in relay.upstreams:
            up.close()


@async_test
async def test_replayed_key_exchange_from_another_address_does_not_divert() -> None:
    """Issue 10 row 1 against the asyncio driver: Eve saw Alice's signed key exchange (here:
    through the relay) and replays it to Bob from her own socket. It verifies, but changes
    nothing, so Bob keeps sending to Alice."""
    loop = asyncio.get_running_loop()
    bob = await listen(BOB, ALICE.public_key, "127.0.0.1:0")
    relay = _Relay(("127.0.0.1", bob.local_address[1]))
    seen: list[bytes] = []
    forward = relay.datagram_received

    def record(data: bytes, addr: tuple[str, int]) -> None:
        seen.append(data)
        forward(data, addr)

    relay.datagram_received = record  # type: ignore[method-assign]
    front, _ = await loop.create_datagram_endpoint(lambda: relay, local_addr=("127.0.0.1", 0))
    relay.front = front  # type: ignore[assignment]
    up, _ = await loop.create_datagram_endpoint(
        lambda: _Upstream(relay), local_addr=("127.0.0.1", 0)
    )
    relay.upstreams.append(up)  # type: ignore[arg-type]
    alice = await connect(ALICE, BOB.public_key, front.get_extra_info("sockname"))
    try:
        await alice.wait_established(STEP)
        await bob.wait_established(STEP)
        alice_at = up.get_extra_info("sockname")
        assert bob.remote_address == alice_at
        captured = [d for d in seen if len(d) == 199]
        assert captured
        duplicates = bob.stats.rx_kx_duplicates
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as eve:
            eve.bind(("127.0.0.1", 0))
            for i in range(20):
                eve.sendto(captured[-1], ("127.0.0.1", bob.local_address[1]))
                bob.write(b"to alice %d" % i)
                await asyncio.sleep(0.02)
            assert bob.remote_address == alice_at
            assert await read_n(alice, 20) == [b"to alice %d" % i for i in range(20)]
        assert bob.stats.rx_kx_duplicates - duplicates >= 10  # the replays did verify
        assert bob.driver_stats.address_changes == 1  # the first contact only
    finally:
        await alice.close()
        await bob.close()
        front.close()
        up.close()


@async_test
async def test_async_context_manager_and_iteration() -> None:
    bob = await listen(BOB, ALICE.public_key, "127.0.0.1:0")
    async with bob, await connect(ALICE, BOB.public_key, ("127.0.0.1", bob.local_address[1])) as a:
        for word in (b"one", b"two", b"three"):
            a.write(word)
        seen = []
        async for message in bob:
            seen.append(message)
            if len(seen) == 3:
                break
        assert seen == [b"one", b"two", b"three"]
    assert a.closed and bob.closed


@async_test
async def test_identity_and_key_arguments_accept_paths_and_text(tmp_path: Path) -> None:
    from secureiod.secureio.identity import load_or_create_identity

    bob_dir = tmp_path / "bob"
    bob_id = load_or_create_identity(bob_dir)
    bob = await listen(bob_dir, str(ALICE.public_key), "127.0.0.1:0")
    alice = await connect(
        ALICE, str(bob_dir / "id_ed25519.pub"), f"127.0.0.1:{bob.local_address[1]}"
    )
    try:
        await alice.wait_established(STEP)
        assert alice.remote_identity == bob_id.public_key
    finally:
        await alice.close()
        await bob.close()
    with pytest.raises(ValueError):
        await connect(ALICE, BOB.public_key, "127.0.0.1:0")
    with pytest.raises(ValueError):
        await connect(ALICE, BOB.public_key, "no-port")


_MTU_SCRIPT = """
import asyncio, subprocess
from secureiod.aio import connect, listen
from secureiod.secureio.identity import Identity

subprocess.run(["ip", "link", "set", "lo", "up", "mtu", "1400"], check=True)

async def main():
    a, b = Identity.generate(), Identity.generate()
    bob = await listen(b, a.public_key, "127.0.0.1:0")
    alice = await connect(a, b.public_key, ("127.0.0.1", bob.local_address[1]))
    await alice.wait_established(10)
    alice.write(b"x" * alice.payload_size)
    got = await asyncio.wait_for(bob.read(), 5)
    print(alice.payload_size, len(got), alice.transport_stats.tx_too_big > 0, alice.state.name)
    await alice.close()
    await bob.close()

asyncio.run(main())
"""


def test_emsgsize_shrinks_negotiation_instead_of_closing() -> None:
    """PROTOCOL §8.4/§13 item 20: with loopback MTU 1400 the first 1445-byte probe fails
    with EMSGSIZE (the socket does not fragment); the session must settle below the MTU.
    Runs in a private network namespace, so it needs root (or user namespaces)."""
    try:
        probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10)
    except FileNotFoundError:
        pytest.skip("no unshare(1)")
    if probe.returncode != 0:
        pytest.skip("cannot create a network namespace here")
    result = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", _MTU_SCRIPT],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    size, received, refused, state = result.stdout.split()
    # 1314 + 53 bytes of secureio + 28 of IPv4/UDP = 1395 <= 1400.
    assert int(size) + 53 + 28 <= 1400 and int(size) >= 1200
    assert int(received) == int(size)
    assert refused == "True" and state == "ESTABLISHED"


# -- the UDP adapter ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:5000", ("127.0.0.1", 5000)),
        ("example.org:1", ("example.org", 1)),
        ("[::1]:443", ("::1", 443)),
        ("[fe80::1%eth0]:7", ("fe80::1%eth0", 7)),
        (":0", ("", 0)),
        (" 10.0.0.2:65535 ", ("10.0.0.2", 65535)),
    ],
)
def test_parse_endpoint(text: str, expected: tuple[str, int]) -> None:
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "empty"),
        ("127.0.0.1", "missing ':PORT'"),
        ("::1:5000", "brackets"),
        ("[::1]5000", "missing ':PORT'"),
        ("[::1:5000", "missing ']'"),
        ("[nope]:1", "not an IPv6"),
        ("host:http", "not a number"),
        ("host:70000", "out of range"),
        ("host:-1", "not a number"),
    ],
)
def test_parse_endpoint_errors(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=re.escape(complaint)):
        parse_endpoint(text)


def test_format_endpoint_round_trips() -> None:
    assert format_endpoint(("::1", 5, 0, 0)) == "[::1]:5"
    assert parse_endpoint(format_endpoint(("127.0.0.1", 9))) == ("127.0.0.1", 9)


def test_udp_socket_batches_and_maps_send_failures() -> None:
    a = UdpSocket.bind(("127.0.0.1", 0))
    b = UdpSocket.bind(("127.0.0.1", 0))
    try:
        # The don't-fragment option is on (IP_MTU_DISCOVER = IP_PMTUDISC_DO).
        assert a._sock.getsockopt(socket.IPPROTO_IP, 10) == 2
        assert a.recv_batch() == []  # empty socket: no wait, no error
        for i in range(10):
            assert a.send(b"%d" % i, b.local_address) is SendResult.SENT
        assert b.recv_batch(4) == [(b"%d" % i, a.local_address) for i in range(4)]
        assert [d for d, _ in b.recv_batch()] == [b"%d" % i for i in range(4, 10)]
        # A datagram no IPv4 packet can hold: EMSGSIZE, reported, not raised.
        assert a.send(b"x" * 70000, b.local_address) is SendResult.TOO_BIG
        assert a.stats.tx_too_big == 1
        # Broadcast without SO_BROADCAST fails with EACCES: counted, logged once, not raised.
        assert a.send(b"x", ("255.255.255.255", 9)) is SendResult.ERROR
        assert a.send(b"x", ("255.255.255.255", 9)) is SendResult.ERROR
        assert a.stats.tx_errors == 2 and sum(a.stats.errors_by_kind.values()) == 2
        assert a.stats.tx_datagrams == 10 and b.stats.rx_datagrams == 10
    finally:
        a.close()
        b.close()
    assert a.closed


def test_udp_socket_ipv6() -> None:
    try:
        a = UdpSocket.bind(("::1", 0, 0, 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        assert a.send(b"v6", a.local_address) is SendResult.SENT
        assert [d for d, _ in a.recv_batch()] == [b"v6"]
    finally:
        a.close()


@async_test
async def test_sessions_over_ipv6() -> None:
    try:
        bob = await listen(BOB, ALICE.public_key, "[::1]:0")
    except OSError:
        pytest.skip("no IPv6 loopback")
    alice = await connect(ALICE, BOB.public_key, f"[::1]:{bob.local_address[1]}")
    try:
        alice.write(b"over v6")
        assert await within(bob.read()) == b"over v6"
    finally:
        await alice.close()
        await bob.close()


# -- the README example ------------------------------------------------------------------


def _readme_blocks(section: str) -> list[tuple[str, str]]:
    """The fenced code blocks of a README section, as (language, text)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index(f"\n{section}\n")
    end = readme.find("\n## ", start + 1)
    body = readme[start : end if end >= 0 else len(readme)]
    return re.findall(r"^```(\w*)\n(.*?)^```$", body, re.S | re.M)


def test_readme_python_api_example_runs_as_written() -> None:
    blocks = _readme_blocks("## Python API")
    code = next(text for language, text in blocks if language == "python")
    expected = next(text for language, text in blocks if language == "")  # "It prints:"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected
