"""A full tunnel to an exit peer known only by a DNS name (issue 11), with a real DNS
server: the home-router topology of ``test_full_tunnel.py``, plus a nameserver on R at
198.18.53.53 (on R's loopback, so A reaches it only through its default route, the route
the full tunnel takes over) that A's resolv.conf names (``ip netns exec`` bind-mounts
``/etc/netns/<ns>/resolv.conf``).

* The start looks ``b.test`` up before it installs the tunnel's rules: the session comes
  up and traffic goes through the tunnel.
* B moves to another address and DNS follows; A's session dies, and the new lookup is
  sent from the daemon's marked socket, past the tunnel (an unmarked query would go into
  the dead tunnel and never come back): A finds B there and the tunnel works again.
* After SIGTERM, A's routes and rules are as before.

A runs with ``--user nobody``: the marked socket needs CAP_NET_ADMIN, which is all it keeps.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Net, poll, run
from test_full_tunnel import B_R, FULL, INTERNET4, POLICY_TABLE, home, nat_on_b, routing_state

DNS_SERVER = "198.18.53.53"
RESPONDER = Path(__file__).resolve().parent / "dns_responder.py"
B_MOVED = "198.18.2.3"
FIRST, MOVED = "[::ffff:198.18.2.2]:5800", f"[::ffff:{B_MOVED}]:5800"  # A's socket is [::]


@contextlib.contextmanager
def resolv_conf(ns: str, nameserver: str) -> Iterator[Path]:
    """``/etc/netns/<ns>/resolv.conf`` for processes started by ``ip netns exec``;
    removed afterwards (with the directories, when they are left empty)."""
    directory = Path("/etc/netns") / ns
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "resolv.conf"
    path.write_text(f"nameserver {nameserver}\noptions timeout:1 attempts:1\n")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
        for d in (directory, directory.parent):
            with contextlib.suppress(OSError):
                d.rmdir()


def start_nameserver(net: Net, ns: str, zone: dict[str, list[str]]) -> tuple[Path, Path]:
    """The responder on ``DNS_SERVER`` in ``ns``: (its zone file, its query log)."""
    run(["ip", "-n", ns, "addr", "add", f"{DNS_SERVER}/32", "dev", "lo"])
    zone_path = net.workdir / "zone.json"
    zone_path.write_text(json.dumps(zone))
    log = net.workdir / "queries.log"
    net.popen(ns, [sys.executable, str(RESPONDER), DNS_SERVER, str(zone_path), str(log)])
    poll(lambda: Path(f"{log}.ready").exists(), 5.0, "the DNS responder")
    return zone_path, log


def queries(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_a_named_exit_peer_comes_up_and_is_found_again_after_it_moves(net: Net) -> None:
    h = home(net)
    nat_on_b(h)
    zone, log = start_nameserver(net, h.r, {"b.test": ["198.18.2.2"]})
    h.a.interface["keepalive_timeout"] = 4
    h.a.extra_args = ["--user", "nobody"]  # the marked lookups need only CAP_NET_ADMIN
    h.a.add_peer(h.b, endpoint="b.test:5800", allowed_ips=FULL)
    h.b.add_peer(h.a)
    before = routing_state(h.a.ns)
    with resolv_conf(h.a.ns, DNS_SERVER):
        h.b.start()
        h.a.start()
        h.a.wait_established("b")
        assert h.a.peer("b")["endpoint"] == FIRST
        first = queries(log)
        assert first and all(q.startswith("198.18.1.2 b.test ") for q in first), first
        # from now on an unmarked query to the nameserver would enter the tunnel
        assert " dev sio0 " in h.a.ip("route", "get", DNS_SERVER).stdout
        marked = h.a.ip("route", "get", DNS_SERVER, "mark", str(POLICY_TABLE)).stdout
        assert f" dev {h.a.dev} " in marked
        h.a.assert_ping(INTERNET4, count=3, interval=0.05)

        # B moves (and restarts, so it cannot tell A where it went): only DNS can
        h.b.stop()
        run(["ip", "netns", "exec", h.b.ns, "sysctl", "-q", "-w",
             f"net.ipv4.conf.{h.b.dev}.promote_secondaries=1"])  # fmt: skip
        h.b.ip("addr", "add", f"{B_MOVED}/24", "dev", h.b.dev)
        h.b.ip("addr", "del", B_R[0], "dev", h.b.dev)
        zone.write_text(json.dumps({"b.test": [B_MOVED]}))
        asked = len(queries(log))
        h.b.start()
        poll(
            lambda: h.a.peer("b")["endpoint"] == MOVED,
            30.0,
            "A finding B at its new address",
            describe=h.a.log_tail,
        )
        h.a.wait_established("b", timeout=15)
        again = queries(log)[asked:]
        assert again and all(q.startswith("198.18.1.2 b.test ") for q in again), again
        h.a.assert_ping(INTERNET4, count=3, interval=0.05)
        log_a = h.a.read_log()
        assert f"peer b: endpoint b.test:5800 is {FIRST}" in log_a
        assert f"peer b: endpoint b.test:5800 is {MOVED}" in log_a
        assert "Traceback" not in log_a
        h.a.stop()
    assert routing_state(h.a.ns) == before
    h.b.stop()
    h.finish()


@pytest.mark.parametrize("answer", [{}, {"b.test": ["198.18.2.2"]}], ids=["nxdomain", "ok"])
def test_a_name_that_does_not_resolve_at_start_never_blocks_it(
    net: Net, answer: dict[str, list[str]]
) -> None:
    """The start waits a bounded time for names; one that does not resolve is logged in
    one line and retried, and the daemon serves meanwhile."""
    h = home(net)
    zone, log = start_nameserver(net, h.r, {})
    h.a.add_peer(h.b, endpoint="b.test:5800", allowed_ips=FULL)
    h.b.add_peer(h.a)
    with resolv_conf(h.a.ns, DNS_SERVER):
        h.b.start()
        h.a.start(timeout=10)
        assert "cannot resolve endpoint b.test:5800 at start" in h.a.read_log()
        assert h.a.peer("b")["endpoint"] is None
        zone.write_text(json.dumps(answer))
        if answer:  # the retry (1 s, 2 s, ...: through the marked socket) finds it
            h.a.wait_established("b", timeout=15)
        else:
            poll(lambda: len(queries(log)) >= 5, 10.0, "retries")
            assert h.a.running
        h.a.stop()
    h.b.stop()
    h.finish()
