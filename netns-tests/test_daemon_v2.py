"""Issue 10 on a live daemon: the faults that only show end to end, each a regression test.

* a key-exchange datagram of A's, captured on the wire and replayed to B from a third
  namespace every 20 ms, never moves B's endpoint for A, costs A's pings nothing and writes
  a handful of log lines, not hundreds;
* control-socket abuse (a 2,000-deep ``[`` line, a client that pipelines 3,200 requests
  and never reads, 40 idle connections) never stalls the tunnel nor locks out a fresh
  ``secureioctl``;
* a refused config on SIGHUP or ``secureioctl reload`` is one error line, and the tunnel
  keeps running;
* an endpoint name that does not resolve at start-up is retried with backoff and used as
  soon as it resolves, and ``peers`` shows where the resolution stands;
* ``--user`` with a root-owned 0600 key: ``secureioctl reload`` still works.

Run with ``-s`` to see the figures each test measures.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from harness import PORT, PYTHON, Net, Node, _pid_alive, poll

from secureiod.control import DEFAULT_LIMITS, request
from secureiod.secureio.constants import KX_PACKET_SIZE
from secureiod.secureio.errors import SecureioError
from secureiod.secureio.identity import resolve_public_key
from secureiod.secureio.kx_message import KeyExchangeMessage
from secureiod.secureio.packet import PacketKey, open_packet
from secureiod.secureio.wire import MessageType, iter_messages

# -- helpers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PingResult:
    transmitted: int
    received: int
    max_rtt_ms: float
    longest_gap_s: float
    """The longest time without an answer, from the regular send schedule and each
    answer's RTT (the start and the end of the run count as answers)."""
    output: str

    @property
    def loss(self) -> float:
        return 1.0 - self.received / self.transmitted if self.transmitted else 1.0

    def summary(self) -> str:
        return (
            f"{self.received}/{self.transmitted} answered ({100 * self.loss:.1f} % loss), "
            f"max RTT {self.max_rtt_ms:.1f} ms, longest gap {self.longest_gap_s:.2f} s"
        )


_REPLY: Final = re.compile(r"icmp_seq=(\d+) .*time=([\d.]+) ms")
_TRANSMITTED: Final = re.compile(r"(\d+) packets transmitted")


class PingStream:
    """``ping -i INTERVAL`` in the background for at most ``seconds``; stop it early with
    ``stop()`` (SIGINT: ping still prints its summary)."""

    def __init__(self, node: Node, dst: str, *, seconds: float, interval: float = 0.05) -> None:
        self.interval = interval
        self.seconds = seconds
        self.started = time.monotonic()
        self.proc = node.popen(
            ["ping", "-n", "-i", str(interval), "-W", "1", "-w", str(int(seconds) + 2),
             "-c", str(int(seconds / interval)), dst],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip

    def stop(self) -> PingResult:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
        return self.wait()

    def wait(self) -> PingResult:
        left = self.seconds + 10 - (time.monotonic() - self.started)
        try:
            out, _ = self.proc.communicate(timeout=max(2.0, left))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            raise AssertionError(f"ping still running after {self.seconds + 10} s") from None
        return parse_ping(out, self.interval)


def parse_ping(out: str, interval: float) -> PingResult:
    replies = {int(m.group(1)): float(m.group(2)) for m in _REPLY.finditer(out)}
    m = _TRANSMITTED.search(out)
    transmitted = int(m.group(1)) if m else max(replies, default=0)
    # arrival time of answer k ~ (k - 1) * interval + rtt_k
    arrivals = [0.0, *sorted((k - 1) * interval + rtt / 1000 for k, rtt in replies.items())]
    arrivals.append(max(arrivals[-1], (transmitted - 1) * interval))
    gap = max((b - a for a, b in itertools.pairwise(arrivals)), default=0.0)
    return PingResult(
        transmitted, len(replies), max(replies.values(), default=0.0), gap, out[-2000:]
    )


def log_since(node: Node, offset: int) -> str:
    with open(node.log_path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def log_size(node: Node) -> int:
    return node.log_path.stat().st_size


def ask(node: Node, command: str, timeout: float = 5.0) -> Any:
    """One control request from this process (quicker than the CLI, for sampling)."""
    return request(node.control_socket, command, timeout=timeout)


def _peer_of(node: Node, name: str) -> dict[str, Any]:
    for p in ask(node, "peers"):
        if p["name"] == name:
            return p  # type: ignore[no-any-return]
    raise AssertionError(f"{node.name} has no peer {name!r}")


def _start(*nodes: Node) -> None:
    for node in nodes:
        node.start(wait=False)
    for node in nodes:
        node.wait_ready()


# -- 1. a replayed key exchange ------------------------------------------------------------

# Captures, on one interface of its namespace (outgoing included: ETH_P_ALL), the UDP
# payloads of IPv4 datagrams to DST:PORT that are exactly SIZE bytes; one hex line each.
# Stops when stdin closes or after TIMEOUT seconds.
_SNIFFER = r"""
import select, socket, struct, sys, time
dev, dst = sys.argv[1], sys.argv[2]
port, size, timeout = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0003))
s.bind((dev, 0x0003))
want = socket.inet_aton(dst)
print("ready", flush=True)
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    r, _, _ = select.select([s, sys.stdin], [], [], 0.2)
    if sys.stdin in r and not sys.stdin.readline():
        break
    if s not in r:
        continue
    pkt, addr = s.recvfrom(65535)
    if addr[1] != 0x0800 or len(pkt) < 28 or pkt[9] != 17 or pkt[16:20] != want:
        continue
    ihl = (pkt[0] & 15) * 4
    dport, ulen = struct.unpack_from("!2xHH", pkt, ihl)
    if dport == port and ulen - 8 == size:
        print(pkt[ihl + 8:ihl + ulen].hex(), flush=True)
"""

# Sends one datagram (hex in argv) from SRC to DST:PORT every INTERVAL s for SECONDS s;
# prints how many went out.
_REPLAYER = r"""
import socket, sys, time
data = bytes.fromhex(sys.argv[1])
src, dst, port = sys.argv[2], sys.argv[3], int(sys.argv[4])
interval, seconds = float(sys.argv[5]), float(sys.argv[6])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, 0))
start = time.monotonic()
sent = errors = 0
while True:
    due = start + sent * interval
    if due >= start + seconds:
        break
    time.sleep(max(0.0, due - time.monotonic()))
    try:
        s.sendto(data, (dst, port))
    except OSError:
        errors += 1
    sent += 1
print(sent, errors, flush=True)
"""

REPLAY_INTERVAL: Final = 0.02
REPLAY_SECONDS: Final = 10.0
ROAM_LOG: Final = re.compile(r"endpoint|roam|refus", re.IGNORECASE)


def _delta(before: dict[str, Any], after: dict[str, Any], key: str) -> int:
    """A counter's growth (0 for a counter this daemon does not have)."""
    return int(after.get(key, 0)) - int(before.get(key, 0))


def _signed_kx(datagram: bytes, signer: str) -> KeyExchangeMessage | None:
    """The key-exchange message in a clear packet, if its signature is ``signer``'s."""
    try:
        opened = open_packet(datagram, [PacketKey.clear()])
        msg = next(iter_messages(opened.messages))
        if msg.type != MessageType.KEY_EXCHANGE:
            return None
        kx = KeyExchangeMessage.decode(msg.payload)
    except (SecureioError, StopIteration):
        return None
    return kx if kx.verify(resolve_public_key(signer)) else None


def test_replayed_key_exchange_never_moves_the_endpoint(net: Net) -> None:
    """A — B, and M linked to B only. A sniffer on A's underlay veth records A's clear
    key-exchange datagrams to B while the tunnel comes up; M then replays one of them to
    B every 20 ms for 10 s while A pings B and B pings A through the tunnel. B must keep
    A's endpoint (sampled all along), (almost) no ping may be lost, B's log must stay
    quiet, and B's counters must show the replays arriving and going nowhere."""
    a, b = net.pair(start=False)
    assert a.dev is not None and b.underlay is not None and a.underlay is not None
    m = net.namespace()
    net.link(b.ns, m, "198.18.1.1/24", "198.18.1.2/24")
    sniffer = net.popen(
        a.ns,
        [PYTHON, "-c", _SNIFFER, a.dev, b.underlay, str(PORT), str(KX_PACKET_SIZE), "60"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sniffer.stdout is not None and sniffer.stdin is not None
    ready, _, _ = select.select([sniffer.stdout], [], [], 10.0)
    assert ready and sniffer.stdout.readline().strip() == "ready", "the sniffer did not start"

    _start(a, b)
    a.wait_established("b")
    b.wait_established("a")
    a.assert_ping(b.tunnel4, count=2, interval=0.05)
    out, _ = sniffer.communicate(timeout=10)  # closes its stdin: the sniffer stops
    captured = [bytes.fromhex(line) for line in out.split()]
    signed = [(d, kx) for d in captured if (kx := _signed_kx(d, a.public_key)) is not None]
    assert signed, f"no signed key exchange of A's among {len(captured)} captured datagrams"
    # A's first request (not an answer): B answers requests, so it is the one that makes
    # B do the most; any signed one of A's is what an on-path observer could have kept.
    datagram = next((d for d, kx in signed if not kx.is_answer), signed[0][0])

    a_endpoint = f"{a.underlay}:{PORT}"
    pb0, st0 = _peer_of(b, "a"), ask(b, "status")
    assert pb0["endpoint"] == a_endpoint, pb0
    offset = log_size(b)

    pings = PingStream(a, b.tunnel4, seconds=REPLAY_SECONDS + 0.5)
    # B's own traffic to A is what follows B's endpoint first (the issue measured B -> A)
    pings_ba = PingStream(b, a.tunnel4, seconds=REPLAY_SECONDS + 0.5)
    replayer = net.popen(
        m,
        [PYTHON, "-c", _REPLAYER, datagram.hex(), "198.18.1.2", "198.18.1.1", str(PORT),
         str(REPLAY_INTERVAL), str(REPLAY_SECONDS)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    samples: list[str | None] = []
    deadline = time.monotonic() + REPLAY_SECONDS + 10
    while replayer.poll() is None and time.monotonic() < deadline:
        samples.append(_peer_of(b, "a")["endpoint"])
        time.sleep(0.1)
    out, _ = replayer.communicate(timeout=max(1.0, deadline - time.monotonic()))
    replayed, send_errors = map(int, out.split())
    ping = pings.wait()
    ping_ba = pings_ba.wait()
    time.sleep(0.5)  # whatever was still in flight has been handled
    samples.append(_peer_of(b, "a")["endpoint"])
    pb, st = _peer_of(b, "a"), ask(b, "status")
    pa = _peer_of(a, "b")
    lines = [line for line in log_since(b, offset).splitlines() if ROAM_LOG.search(line)]

    moved = [s for s in samples if s != a_endpoint]
    drops0, drops = pb0.get("session_drops", {}), pb.get("session_drops", {})
    drop_delta = {k: v - drops0.get(k, 0) for k, v in drops.items() if v != drops0.get(k, 0)}
    rx_delta = st["udp"]["rx_datagrams"] - st0["udp"]["rx_datagrams"]
    wire_rx_delta = pb["wire_rx_packets"] - pb0["wire_rx_packets"]
    wire_tx_delta = pb["wire_tx_packets"] - pb0["wire_tx_packets"]
    print(
        f"\ncaptured {len(captured)} key-exchange-sized datagrams of A's ({len(signed)} signed);"
        f" replayed {replayed} ({send_errors} send errors) from M in {REPLAY_SECONDS:g} s\n"
        f"A -> B ping: {ping.summary()}\nB -> A ping: {ping_ba.summary()}\n"
        f"B's endpoint for A: {len(samples)} samples, {len(moved)} elsewhere "
        f"({sorted(set(samples), key=str)})\n"
        f"B: udp rx +{rx_delta}, peer a wire rx +{wire_rx_delta} tx +{wire_tx_delta} "
        f"({ping.received + ping_ba.transmitted} pings among them), session drops "
        f"+{drop_delta}, roams {pb0.get('roams')} -> {pb.get('roams')}, roamed {st0['roamed']} -> "
        f"{st['roamed']}, unknown_source +{st['unknown_source'] - st0['unknown_source']}, "
        f"identify_rate_limited +{_delta(st0, st, 'identify_rate_limited')}\n"
        f"B log lines about endpoint/roam/refused during the replay: {len(lines)}"
        + "".join(f"\n  {line}" for line in lines[:10])
    )

    assert send_errors == 0 and replayed >= 0.8 * REPLAY_SECONDS / REPLAY_INTERVAL, out
    assert rx_delta >= replayed, "the replays did not reach B's socket"
    assert len(samples) >= 20, f"only {len(samples)} endpoint samples"
    assert not moved, f"B moved A's endpoint: {samples}"
    assert pb["endpoint"] == a_endpoint and pb["established"], pb
    assert pb.get("roams") == pb0.get("roams") and st["roamed"] == st0["roamed"], (pb, st)
    assert pb["sessions_started"] == pb0["sessions_started"] == 1, pb
    assert pa["sessions_started"] == 1 and pa["established"], pa
    assert ping.loss <= 0.02, ping.output
    assert ping_ba.loss <= 0.02, ping_ba.output
    assert len(lines) <= 5, "\n".join(lines[:50])
    # Every replay is accounted for, never as received: by B's session for A (a signed
    # key exchange it already knew, or one dropped as replayed or rate-limited), or by
    # the demultiplexer before any session saw it.
    kx_dup_delta = pb["wire_rx_kx_duplicates"] - pb0["wire_rx_kx_duplicates"]
    pings = ping.transmitted + ping_ba.transmitted
    assert wire_rx_delta <= 2 * pings + 20, f"replays counted as received: +{wire_rx_delta}"
    accounted = (
        kx_dup_delta
        + sum(drop_delta.values())
        + st["unknown_source"]
        - st0["unknown_source"]
        + _delta(st0, st, "identify_rate_limited")
    )
    assert accounted >= 0.95 * replayed, (
        f"only {accounted} of {replayed} replays show up in B's drop counters "
        f"(session drops +{drop_delta}; peer a wire rx +{wire_rx_delta}: counted as received?)"
    )


# -- 2. control-socket abuse ---------------------------------------------------------------

SLOW_REQUESTS: Final = 3200
NL: Final = b"\n"
IDLE_CONNECTIONS: Final = 40


def _connect(node: Node, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(node.control_socket))
    return s


def _hung_up(s: socket.socket) -> bool:
    """Has the daemon closed its end (without us reading what it sent)?"""
    p = select.poll()
    p.register(s, select.POLLHUP | select.POLLERR)
    return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in p.poll(0))


def _read_line(s: socket.socket, timeout: float) -> bytes:
    """One line, or what came before the daemon closed the connection (b"" at once)."""
    s.settimeout(timeout)
    buf = b""
    with contextlib.suppress(ConnectionResetError):
        while b"\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return buf.split(b"\n", 1)[0]


def _drain(s: socket.socket, limit: float = 5.0) -> bytes:
    """What the daemon sent before it closed the connection (read after the fact)."""
    s.settimeout(1.0)
    data = bytearray()
    deadline = time.monotonic() + limit
    with contextlib.suppress(OSError):
        while time.monotonic() < deadline:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    return bytes(data)


def _timed_status(node: Node) -> float:
    t0 = time.monotonic()
    ask(node, "status", timeout=1.0)
    return time.monotonic() - t0


def test_control_abuse_never_hurts_the_tunnel(net: Net) -> None:
    """While A pings B through the tunnel every 50 ms, B's control socket gets a line of
    2,000 ``[``, a client that writes 3,200 requests and never reads, and 40 idle
    connections. B stays up, the pings never stop for a second, the non-reading client is
    dropped, and ``secureioctl status`` answers within a second without a traceback."""
    a, b = net.pair()
    pings = PingStream(a, b.tunnel4, seconds=60)
    sockets: list[socket.socket] = []
    try:
        time.sleep(0.5)  # a baseline of answered pings before the abuse
        ctl0 = ask(b, "status").get("control") or {}

        # 2,000 '[' on one line: a one-line error reply, or that connection closed
        s = _connect(b)
        sockets.append(s)
        s.sendall(b"[" * 2000 + b"\n")
        deep_reply = _read_line(s, 5.0)
        s.close()
        assert b.running, f"B died on a 2,000-deep line\n{b.log_tail()}"
        assert deep_reply == b"" or deep_reply.startswith(b'{"ok":false'), deep_reply
        deep_status = _timed_status(b)

        # 3,200 pipelined requests, never read
        slow = _connect(b)
        sockets.append(slow)
        slow.setblocking(False)
        payload = b'{"command":"status"}\n' * SLOW_REQUESTS
        sent = 0
        t_slow = time.monotonic()
        write_deadline = t_slow + 10
        while sent < len(payload) and time.monotonic() < write_deadline:
            if _hung_up(slow):
                break
            _, w, _ = select.select([], [slow], [], 0.1)
            if w:
                try:
                    sent += slow.send(payload[sent : sent + 65536])
                except (BlockingIOError, InterruptedError):
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    break
        requests_sent = sent // len(b'{"command":"status"}\n')
        hung_early = _hung_up(slow)
        # meanwhile the daemon answers others at once
        during = [_timed_status(b) for _ in range(5)]
        dropped_after = poll(
            lambda: _hung_up(slow) and time.monotonic() - t_slow,
            DEFAULT_LIMITS.idle_timeout + 10,
            "B to drop the client that does not read",
            interval=0.05,
        )
        unread = _drain(slow)
        slow.close()
        after_slow = _timed_status(b)

        # 40 idle connections, then a fresh secureioctl
        idle = [_connect(b) for _ in range(IDLE_CONNECTIONS)]
        sockets += idle
        time.sleep(0.3)  # all accepted
        t0 = time.monotonic()
        cli = b.ctl("status", "--timeout", "1", check=False)
        cli_seconds = time.monotonic() - t0
        direct = _timed_status(b)
        evicted = sum(_hung_up(s) for s in idle)
        time.sleep(1.0)  # a stall the abuse caused would show in the pings after it
    finally:
        for s in sockets:
            s.close()
        ping = pings.stop()

    pa, pb = _peer_of(a, "b"), _peer_of(b, "a")
    ctl1 = ask(b, "status").get("control") or {}
    ctl_delta = {k: v - ctl0.get(k, 0) for k, v in ctl1.items() if v != ctl0.get(k, 0)}
    print(
        f"\n2,000 '[': reply {deep_reply[:120]!r}; status after it {1000 * deep_status:.1f} ms\n"
        f"non-reading client: wrote {requests_sent} requests, dropped after "
        f"{dropped_after:.2f} s with {unread.count(NL)} replies ({len(unread)} bytes) "
        f"it never read; status meanwhile max {1000 * max(during):.1f} ms, after "
        f"{1000 * after_slow:.1f} ms\n"
        f"{IDLE_CONNECTIONS} idle connections: {evicted} evicted; secureioctl status "
        f"rc {cli.returncode} in {cli_seconds:.2f} s (process included), in-process "
        f"{1000 * direct:.1f} ms\nA -> B ping throughout: {ping.summary()}\n"
        f"B's control counters: +{ctl_delta}"
    )
    assert b.running and a.running
    assert requests_sent == SLOW_REQUESTS or hung_early, f"could write only {requests_sent}"
    assert unread.startswith(b'{"ok":true'), unread[:200]  # it served, then dropped it
    # Its replies outgrow the output bound (what the socket took aside): dropped at once,
    # not after the idle timeout.
    reply_size = len(unread) / max(1, unread.count(NL))
    if SLOW_REQUESTS * reply_size > DEFAULT_LIMITS.max_buffered + len(unread) + 65536:
        assert dropped_after < 5.0, f"dropped only after {dropped_after:.1f} s"
    assert max(during) < 1.0 and after_slow < 1.0, during
    assert cli.returncode == 0, f"rc {cli.returncode}\n{cli.stdout}\n{cli.stderr}"
    assert "Traceback" not in cli.stderr + cli.stdout, cli.stderr
    assert direct < 1.0
    # the oldest idle ones made room: every one over the limit, and one for the CLI (whose
    # own connection is gone again when the in-process request connects)
    assert evicted >= IDLE_CONNECTIONS + 1 - DEFAULT_LIMITS.max_connections, evicted
    assert ping.transmitted >= 30, ping.output
    assert ping.longest_gap_s < 1.0, ping.output
    assert ping.max_rtt_ms < 1000, ping.output
    assert ping.loss <= 0.02, ping.output
    for p in (pa, pb):
        assert p["sessions_started"] == 1 and p["established"], p
    assert "Traceback" not in b.read_log(), b.log_tail()
    # B's own account: the bad line refused, the non-reader dropped as such (not timed
    # out), the idle ones evicted, no handler failure
    assert ctl_delta.get("bad_requests", 0) >= 1, ctl_delta
    assert ctl_delta.get("disconnected_slow") == 1, ctl_delta
    assert ctl_delta.get("evicted_idle", 0) == evicted, ctl_delta
    assert not ctl_delta.get("internal_errors"), ctl_delta


# -- 3. a refused reload --------------------------------------------------------------------

REFUSED: Final = "reload refused"


def _count(node: Node, text: str) -> int:
    return node.read_log().count(text)


def _sighup_refused(node: Node, expected: int) -> str:
    """SIGHUP; wait for the ``expected``-th refusal line; the new line."""
    os.kill(node.pid, signal.SIGHUP)
    poll(
        lambda: _count(node, REFUSED) >= expected,
        5,
        f"{node.name}: refusal #{expected} in the log",
        describe=node.log_tail,
    )
    time.sleep(0.5)  # and nothing after it: no exit, no second line
    assert node.running, f"{node.name} exited after a refused reload\n{node.log_tail()}"
    assert _count(node, REFUSED) == expected, node.log_tail()
    return [line for line in node.read_log().splitlines() if REFUSED in line][-1]


def test_refused_reload_keeps_the_tunnel(net: Net) -> None:
    """SIGHUP with invalid TOML, then with a private_key that does not exist: one error
    line each, the daemon and its tunnel carry on; the fixed file applies on the next
    SIGHUP; ``secureioctl reload`` of a broken file exits non-zero with one line."""
    a, b = net.pair()
    pid = b.pid
    good = b.config_text()

    b.config_path.write_text(good.replace("[interface]", "[interface", 1))
    line_toml = _sighup_refused(b, 1)
    a.assert_ping(b.tunnel4, count=3, interval=0.05)

    missing = b.dir / "missing.key"
    b.config_path.write_text(good.replace(str(b.key_path), str(missing)))
    line_key = _sighup_refused(b, 2)
    a.assert_ping(b.tunnel4, count=3, interval=0.05)
    st = b.status()
    assert st["reloads_refused"] == 2 and st["reloads"] == 0, st

    # fixed, with a change a reload can apply
    b.peer_specs[0]["persistent_keepalive"] = 7
    b.write_config()
    offset = log_size(b)
    os.kill(b.pid, signal.SIGHUP)
    poll(lambda: "reloaded:" in log_since(b, offset), 5, "the reload", describe=b.log_tail)
    applied = next(line for line in log_since(b, offset).splitlines() if "reloaded:" in line)
    b.wait_established("a")
    a.assert_ping(b.tunnel4, count=3, interval=0.05)
    assert b.status()["reloads"] == 1

    # the same refusal through secureioctl
    b.config_path.write_text(good.replace("[interface]", "[interface", 1))
    cli = b.ctl("reload", check=False)
    time.sleep(0.3)
    err_lines = cli.stderr.strip().splitlines()
    print(
        f"\nSIGHUP, invalid TOML: {line_toml}\nSIGHUP, missing key: {line_key}\n"
        f"SIGHUP, fixed: {applied}\nsecureioctl reload, invalid TOML: rc {cli.returncode}, "
        f"stderr {cli.stderr.strip()!r}"
    )
    assert cli.returncode != 0, cli
    assert len(err_lines) == 1 and "Traceback" not in cli.stderr, cli.stderr
    assert "invalid TOML" in err_lines[0], err_lines
    assert _count(b, REFUSED) == 3, b.log_tail()
    assert b.running and b.pid == pid and b.pids == [pid]
    a.assert_ping(b.tunnel4, count=3, interval=0.05)
    assert "Traceback" not in b.read_log(), b.log_tail()
    assert str(b.config_path) in line_toml and "invalid TOML" in line_toml, line_toml
    assert str(missing) in line_key or "private_key" in line_key, line_key
    b.write_config()  # leave a good file behind


# -- 4. an endpoint name that resolves late --------------------------------------------------

NAME: Final = "peer-b.sio-test.invalid"


_NS_DIR: Final = re.compile(r"^sio-(\d+)-\d+$")


@contextlib.contextmanager
def _netns_etc(ns: str) -> Any:
    """/etc/netns/NS (``ip netns exec`` bind-mounts its files over /etc); removed at the
    end, with /etc/netns itself if it was not there before. Directories a SIGKILLed run
    left behind (their pid is gone) are removed first."""
    top = Path("/etc/netns")
    for entry in top.glob("sio-*") if top.is_dir() else ():
        m = _NS_DIR.match(entry.name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
    made_top = not top.exists()
    path = top / ns
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if made_top:
            with contextlib.suppress(OSError):
                top.rmdir()


def test_endpoint_name_resolved_when_it_appears(net: Net) -> None:
    """A's endpoint for B is a name A's namespace cannot resolve at start-up (B knows no
    endpoint for A, so only the name can bring the tunnel up). A must show the failing
    resolution in ``peers``, keep retrying with backoff, and come up as soon as the name
    is added to its hosts file (rewritten in place: the bind mount keeps the inode)."""
    a = net.node("a")
    b = net.node("b")
    a.dev, b.dev = net.link(a.ns, b.ns, "198.18.0.1/24", "198.18.0.2/24")
    a.add_peer(b, endpoint=f"{NAME}:{PORT}")
    b.add_peer(a)  # passive: learns A's address from A's first datagram
    with _netns_etc(a.ns) as etc:
        hosts = etc / "hosts"
        hosts.write_text("127.0.0.1 localhost\n")
        # no DNS server in the namespace: a lookup fails at once instead of timing out
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        inode = hosts.stat().st_ino
        _start(b, a)
        t_start = time.monotonic()
        failed = poll(
            lambda: (p := _peer_of(a, "b")).get("resolve", {}).get("state") == "failed" and p,
            5,
            "A to report the failing resolution",
            describe=a.log_tail,
        )
        # let the backoff run a few rounds (attempts at 0, 1, 3, 7 s...), noting when
        # each next attempt is due
        due: list[float] = []
        while time.monotonic() - t_start < 4.5:
            r = _peer_of(a, "b")["resolve"]
            if r["next_in"] is not None:
                at = round(time.monotonic() - t_start + r["next_in"], 1)
                if not due or abs(at - due[-1]) > 0.3:
                    due.append(at)
            time.sleep(0.1)
        before = _peer_of(a, "b")
        assert before["endpoint"] is None and not before["established"], before
        assert before["resolve"]["state"] == "failed" and before["resolve"]["error"], before
        next_in = before["resolve"]["next_in"]
        # retried with a growing delay: after 1 and 2 s, the next one is due within 4 s
        assert len(due) >= 2 and due == sorted(due), due
        assert next_in is not None and 0 <= next_in <= 4.0, (before, due)
        with open(hosts, "r+") as f:
            f.truncate()
            f.write(f"127.0.0.1 localhost\n{b.underlay or '198.18.0.2'} {NAME}\n")
        assert hosts.stat().st_ino == inode
        t_name = time.monotonic()
        appeared_at = t_name - t_start
        a.wait_established("b", timeout=next_in + 5)
        took = time.monotonic() - t_name
        after = _peer_of(a, "b")
        b.wait_established("a")
        a.assert_ping(b.tunnel4, count=3, interval=0.05)
        b.assert_ping(a.tunnel4, count=3, interval=0.05)
        warnings = [line for line in a.read_log().splitlines() if "cannot resolve" in line]
    print(
        f"\nwhile unresolvable: endpoint {failed['endpoint']}, resolve {failed['resolve']}\n"
        f"attempts due at {due} s after start\n"
        f"{appeared_at:.1f} s after start, when the name appeared: resolve "
        f"{before['resolve']}\nA established {took:.2f} s after the name appeared "
        f"(next retry was due in {next_in:.2f} s); then endpoint {after['endpoint']}, "
        f"resolve {after['resolve']}\n'cannot resolve' log lines: {len(warnings)}"
        + "".join(f"\n  {line}" for line in warnings[:5])
    )
    assert took <= next_in + 3, (took, next_in)
    assert after["endpoint"] == f"198.18.0.2:{PORT}", after
    assert after["resolve"]["state"] == "ok", after
    assert after["resolve"]["addresses"] == [f"198.18.0.2:{PORT}"], after
    assert 1 <= len(warnings) <= 3, warnings
    assert not Path("/etc/netns", a.ns).exists()


# -- 5. --user and a root-owned key -------------------------------------------------------


def _ids(pid: int) -> tuple[list[int], list[int]]:
    fields: dict[str, list[int]] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid"):
                fields[key] = [int(v) for v in value.split()]
    return fields["Uid"], fields["Gid"]


def test_reload_after_dropping_privileges(net: Net) -> None:
    """B runs ``secureiod --user nobody`` with its key root-owned and 0600 (nobody cannot
    read it); the config itself is world-readable. After a change to a peer's
    persistent_keepalive, ``secureioctl reload`` (as root) is applied, the tunnel carries
    on, and so does a second reload by SIGHUP."""
    a, b = net.pair(start=False)
    b.extra_args = ["--user", "nobody"]
    # nobody may traverse to the config (a reload reads it) but not read the key
    for d in (net.workdir, b.dir):
        os.chmod(d, 0o711)
    key = b.key_path.stat()
    assert key.st_uid == 0 and stat.S_IMODE(key.st_mode) == 0o600, oct(key.st_mode)
    _start(a, b)
    b.config_path.chmod(0o644)
    a.wait_established("b")
    b.wait_established("a")
    uid, gid = _ids(b.pid)
    assert uid == [65534] * 4, f"B still runs as {uid}"
    a.assert_ping(b.tunnel4, count=3, interval=0.05)
    # the key is really out of reach of the daemon's user
    probe = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", str(b.key_path)],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert probe.returncode != 0 and "Permission denied" in probe.stderr, (
        f"nobody can read the key, or the probe failed otherwise: {probe.stderr.strip()}"
    )

    b.peer_specs[0]["persistent_keepalive"] = 3
    b.write_config()
    b.config_path.chmod(0o644)
    cli = b.ctl("reload", "--json", check=False)
    assert cli.returncode == 0, f"rc {cli.returncode}: {cli.stderr.strip()}\n{b.log_tail()}"
    b.wait_established("a")
    a.wait_established("b")
    a.assert_ping(b.tunnel4, count=3, interval=0.05)

    b.peer_specs[0]["persistent_keepalive"] = 4
    b.write_config()
    b.config_path.chmod(0o644)
    offset = log_size(b)
    os.kill(b.pid, signal.SIGHUP)
    poll(lambda: "reloaded:" in log_since(b, offset), 5, "the SIGHUP reload", describe=b.log_tail)
    b.wait_established("a")
    a.assert_ping(b.tunnel4, count=3, interval=0.05)
    st = b.status()
    print(
        f"\nB runs as uid {uid[0]} gid {gid[0]}; key {oct(stat.S_IMODE(key.st_mode))} uid "
        f"{key.st_uid}\nsecureioctl reload: {cli.stdout.strip()}\nstatus: reloads "
        f"{st['reloads']}, refused {st['reloads_refused']}"
    )
    assert st["reloads"] == 2 and st["reloads_refused"] == 0, st
    assert _ids(b.pid)[0] == [65534] * 4
    assert "Traceback" not in b.read_log(), b.log_tail()
