"""The record of added routes (``sio0.owned``) is trusted only for what the daemon could
have added: a record that names the host's own routes, rules or addresses (edited, or
left by something else) must not make a start delete them.

Uses the home-router namespaces of ``test_full_tunnel.py``.
"""

from __future__ import annotations

import json

from harness import Net, run
from test_full_tunnel import A_R, B_ENDPOINT, FULL, R_A, _host, home, routing_state


def _netns_inode(ns: str) -> int:
    """What the record's header names as its network namespace."""
    out = run(["ip", "netns", "exec", ns, "stat", "-L", "-c", "%i", "/proc/self/ns/net"])
    return int(out.stdout.strip())


def test_a_record_naming_the_hosts_routes_never_removes_them(net: Net) -> None:
    h = home(net)
    h.a.add_peer(h.b, endpoint=B_ENDPOINT[4], allowed_ips=FULL)
    before = routing_state(h.a.ns)
    # one genuine leftover of a killed daemon (its suppress rule), which must go...
    h.a.ip("rule", "add", "pref", "32764", "lookup", "main", "suppress_prefixlength", "0")
    ours = {
        "kind": "rule", "version": 4, "priority": 32764, "table": 254, "fwmark": None,
        "fwmask": None, "invert": False, "suppress_prefixlength": 0,
    }  # fmt: skip
    # ...and the host's own default routes, main-table rule and underlay address, which
    # a daemon for sio0 never adds and must never remove
    hosts = [
        {"kind": "route", "dst": "0.0.0.0/0", "dev": "ul0", "table": 254, "metric": 0},
        {"kind": "route", "dst": "::/0", "dev": "ul0", "table": 254, "metric": 1024},
        {"kind": "address", "dev": "ul0", "address": A_R[0]},
        {
            "kind": "rule", "version": 4, "priority": 32766, "table": 254, "fwmark": None,
            "fwmask": None, "invert": False, "suppress_prefixlength": None,
        },
        {
            "kind": "rule", "version": 6, "priority": 32766, "table": 254, "fwmark": None,
            "fwmask": None, "invert": False, "suppress_prefixlength": None,
        },
    ]  # fmt: skip
    header = {
        "version": 1,
        "netns": _netns_inode(h.a.ns),
        "gen": 1,
        "pid": 1,
        "items": [*hosts, ours],
    }
    record = h.a.dir / "sio0.owned"
    record.write_text(json.dumps(header) + "\n")
    record.chmod(0o600)

    h.a.start()
    log = h.a.read_log()
    assert "removed what it had added (1 rule)" in log, log
    assert log.count("not something the daemon for sio0 adds; left alone") == 3, log
    assert log.count("not a rule the daemon adds") == 2, log
    assert h.a.ip("route", "show", "default").stdout.startswith(f"default via {_host(R_A[0])}")
    assert "32766:\tfrom all lookup main" in h.a.ip("rule").stdout
    assert "32766:\tfrom all lookup main" in h.a.ip("-6", "rule").stdout
    h.a.stop()
    assert routing_state(h.a.ns) == before
    h.a.assert_ping(_host(R_A[0]), count=1)  # the underlay still works
    h.finish()
