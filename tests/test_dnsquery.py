"""The marked stub resolver (``secureiod.dnsquery``) against a real UDP nameserver on
127.0.0.1 that answers well, badly or hostilely, and ``resolver.prefetch``'s budget.

The nameserver is hand-encoded here (no DNS library), one behaviour per test.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from secureiod.dnsquery import (
    TYPE_A,
    TYPE_AAAA,
    DnsError,
    StubLookup,
    build_query,
    parse_reply,
    parse_resolv_conf,
)
from secureiod.resolver import ThreadResolver, normalize_answers, prefetch

Handler = Callable[[bytes], list[bytes]]


def _name(host: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in host.split(".")) + b"\0"


def _question(query: bytes) -> tuple[int, bytes, int]:
    """(id, the question section, qtype) of a query we built."""
    qid = struct.unpack_from("!H", query)[0]
    end = query.index(b"\0", 12) + 5
    return qid, query[12:end], struct.unpack_from("!H", query, end - 4)[0]


def answer(
    query: bytes,
    records: list[bytes],
    *,
    rcode: int = 0,
    flags: int = 0x8180,
    qid_delta: int = 0,
) -> bytes:
    qid, question, _ = _question(query)
    header = struct.pack(
        "!HHHHHH", (qid + qid_delta) & 0xFFFF, flags | rcode, 1, len(records), 0, 0
    )
    return header + question + b"".join(records)


def rr(owner: bytes, rtype: int, rdata: bytes, rclass: int = 1) -> bytes:
    return owner + struct.pack("!HHIH", rtype, rclass, 60, len(rdata)) + rdata


def addresses_for(query: bytes, v4: list[str], v6: list[str]) -> list[bytes]:
    _, _, qtype = _question(query)
    if qtype == TYPE_A:
        return [rr(b"\xc0\x0c", TYPE_A, socket.inet_aton(ip)) for ip in v4]
    return [rr(b"\xc0\x0c", TYPE_AAAA, socket.inet_pton(socket.AF_INET6, ip)) for ip in v6]


class Nameserver:
    """A UDP server on 127.0.0.1 that sends whatever ``handler`` returns for a query."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.queries: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            self.queries.append(data)
            for reply in self.handler(data):
                self.sock.sendto(reply, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[Handler], StubLookup]]:
    servers: list[Nameserver] = []

    def start(handler: Handler) -> StubLookup:
        server = Nameserver(handler)
        servers.append(server)
        conf = tmp_path / "resolv.conf"
        conf.write_text("# test\nsearch example\nnameserver 127.0.0.1\noptions ndots:1\n")
        return StubLookup(
            mark=None,
            resolv_conf=conf,
            hosts=tmp_path / "hosts",
            port=server.port,
            budget=1.0,
            server_timeout=0.5,
        )

    yield start
    for server in servers:
        server.close()


def _ips(infos: list[tuple]) -> list[str]:
    return [info[4][0] for info in infos]


def test_a_and_aaaa_answers(serve: Callable[[Handler], StubLookup]) -> None:
    lookup = serve(lambda q: [answer(q, addresses_for(q, ["198.18.2.2"], ["fd00:5ec:ff::2:2"]))])
    assert _ips(lookup("b.test", 5800, socket.AF_INET)) == ["198.18.2.2"]
    infos = lookup("B.Test.", 5800, socket.AF_UNSPEC)  # case and a final dot do not matter
    assert sorted(_ips(infos)) == ["198.18.2.2", "fd00:5ec:ff::2:2"]
    assert normalize_answers(infos, socket.AF_INET, 5800) == [("198.18.2.2", 5800)]


def test_a_cname_chain_inside_the_answer_is_followed(
    serve: Callable[[Handler], StubLookup],
) -> None:
    def handler(q: bytes) -> list[bytes]:
        target = _name("exit.example")
        at = 12 + len(_name("b.test")) + 4 + 2 + 10  # where the CNAME's rdata lies
        return [
            answer(
                q,
                [
                    rr(b"\xc0\x0c", 5, target),
                    rr(struct.pack("!H", 0xC000 | at), TYPE_A, socket.inet_aton("198.18.2.7")),
                    rr(_name("elsewhere.test"), TYPE_A, socket.inet_aton("198.18.9.9")),
                ],
            )
        ]

    lookup = serve(handler)
    assert _ips(lookup("b.test", 1, socket.AF_INET)) == ["198.18.2.7"]


def test_replies_that_are_not_ours_are_ignored(serve: Callable[[Handler], StubLookup]) -> None:
    def handler(q: bytes) -> list[bytes]:
        good = answer(q, addresses_for(q, ["198.18.2.2"], []))
        other = bytearray(good)
        other[12 + 1] ^= 0x20  # same length, another name in the question
        return [
            answer(q, addresses_for(q, ["198.18.6.6"], []), qid_delta=1),  # wrong ID
            bytes(other),
            answer(q, addresses_for(q, ["198.18.6.7"], []), flags=0x0100),  # a query, not reply
            b"\0" * 5,
            good,
        ]

    lookup = serve(handler)
    assert _ips(lookup("b.test", 1, socket.AF_INET)) == ["198.18.2.2"]


def test_nxdomain_and_silence_are_errors(serve: Callable[[Handler], StubLookup]) -> None:
    lookup = serve(lambda q: [answer(q, [], rcode=3)])
    with pytest.raises(socket.gaierror) as exc:
        lookup("gone.test", 1, socket.AF_UNSPEC)
    assert exc.value.errno == socket.EAI_NONAME
    silent = serve(lambda q: [])
    begun = time.monotonic()
    with pytest.raises(socket.gaierror, match=r"no usable answer.*timed out"):
        silent("b.test", 1, socket.AF_INET)
    assert time.monotonic() - begun < 1.5  # the budget


def test_a_compression_loop_is_refused_not_followed() -> None:
    query = build_query(7, "b.test", TYPE_A)
    loop_at = len(query)
    looped = answer(query, [struct.pack("!H", 0xC000 | loop_at) + b"\0" * 10])
    with pytest.raises(DnsError, match="backwards"):
        parse_reply(looped, 7, "b.test", TYPE_A)
    forward = answer(query, [struct.pack("!H", 0xC000 | (loop_at + 2)) + _name("x")])
    with pytest.raises(DnsError, match="backwards"):
        parse_reply(forward, 7, "b.test", TYPE_A)
    # pointers through a long backwards chain (kept in a TXT record's data) still end,
    # and a name that grows past 255 bytes on the way is refused
    for segments, ok in ((100, True), (200, False)):
        rdata_at = len(query) + 2 + 10
        chain = bytearray()
        previous = 12  # the question's name
        for _ in range(segments):
            at = rdata_at + len(chain)
            chain += b"\x01a" + struct.pack("!H", 0xC000 | previous)
            previous = at
        reply = answer(
            query,
            [
                rr(b"\xc0\x0c", 16, bytes(chain)),
                rr(struct.pack("!H", 0xC000 | previous), TYPE_A, socket.inet_aton("198.18.2.2")),
            ],
        )
        if ok:  # a name, just not ours
            assert parse_reply(reply, 7, "b.test", TYPE_A).addresses == ()
        else:
            with pytest.raises(DnsError, match="255"):
                parse_reply(reply, 7, "b.test", TYPE_A)
    with pytest.raises(DnsError, match="bytes"):
        parse_reply(b"\0" * 5000, 7, "b.test", TYPE_A)


def test_garbage_never_escapes_as_anything_but_dns_error() -> None:
    import random

    rng = random.Random(11)
    query = build_query(9, "b.test", TYPE_AAAA)
    good = answer(query, [rr(b"\xc0\x0c", TYPE_AAAA, bytes(16))] * 3)
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = data[: rng.randint(0, len(data))]
        try:
            reply = parse_reply(bytes(data), 9, "b.test", TYPE_AAAA)
        except DnsError:
            continue
        assert len(reply.addresses) <= 3


def test_hosts_first_then_resolved_upstream(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n198.18.2.5 exit.lan b.test # here\n")
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.53\noptions edns0\n")
    upstream = tmp_path / "upstream.conf"
    upstream.write_text("nameserver 198.18.1.1\nnameserver fe80::1%eth0\nnameserver bogus\n")
    lookup = StubLookup(mark=None, resolv_conf=conf, hosts=hosts, resolved_upstream=upstream)
    assert _ips(lookup("B.test", 1, socket.AF_INET)) == ["198.18.2.5"]
    # resolved's own stub would send the query on unmarked: its upstream servers instead
    assert lookup.nameservers() == ["198.18.1.1", "fe80::1%eth0"]
    upstream.unlink()
    assert lookup.nameservers() == ["127.0.0.53"]
    text = "\n".join(f"nameserver 198.18.1.{i}" for i in range(10))
    assert parse_resolv_conf(text) == ["198.18.1.0", "198.18.1.1", "198.18.1.2"]


def test_the_stub_runs_under_the_thread_resolver(serve: Callable[[Handler], StubLookup]) -> None:
    lookup = serve(lambda q: [answer(q, addresses_for(q, ["198.18.2.2"], []))])
    got: list[object] = []
    done = threading.Event()

    def post(run: Callable[[float], None]) -> None:
        run(0.0)
        done.set()

    resolver = ThreadResolver(post, getaddrinfo=lookup)
    resolver.resolve("b.test", 5800, socket.AF_INET6, lambda a, e: got.append((a, e)))
    assert done.wait(5)
    resolver.close()
    assert got == [([("::ffff:198.18.2.2", 5800, 0, 0)], None)]


def test_prefetch_answers_every_name_within_its_budget() -> None:
    release = threading.Event()

    def getaddrinfo(host: str, port: int, *args: object) -> list[tuple]:
        if host == "slow.test":
            release.wait(10)
        if host == "bad.test":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("198.18.0.9", port))]

    names = [(f"n{i}.test", 1) for i in range(6)] + [("slow.test", 2), ("bad.test", 3)]
    begun = time.monotonic()
    try:
        got = prefetch(names, socket.AF_INET, budget=0.5, getaddrinfo=getaddrinfo)
    finally:
        release.set()
    assert time.monotonic() - begun < 1.5
    assert got[("n5.test", 1)] == [("198.18.0.9", 1)]
    assert got[("bad.test", 3)] == "cannot resolve 'bad.test': Name or service not known"
    assert got[("slow.test", 2)] == "cannot resolve 'slow.test': no answer within 0.5s"
    assert prefetch([], socket.AF_INET) == {}
