"""A full tunnel on a host with strict reverse-path filtering (issue 11), in namespaces.

The namespaces of test_full_tunnel.py (A at home behind the router R, the exit server B,
the "internet" I behind B), with ``rp_filter=1`` on A's ``all`` and on its underlay
``ul0``. Without the mark restore (``secureiod/daemon/nft.py``) B's replies, whose source
A looks up unmarked and finds routed into the tunnel, are dropped on ul0 and the session
never comes up; with it the session comes up and traffic flows. After SIGTERM, and after
``kill -9`` plus the next start's clean-up, A's routes, rules, addresses, nftables
ruleset and sysctls are what they were.
"""

from __future__ import annotations

from harness import Net, run
from test_full_tunnel import (
    B_ENDPOINT,
    FULL,
    INTERNET4,
    INTERNET6,
    POLICY_TABLE,
    Home,
    home,
    nat_on_b,
    ping_through_tunnel,
    routing_state,
)

TABLE = "secureiod-sio0"
SYSCTLS = (
    "net.ipv4.conf.all.rp_filter",
    "net.ipv4.conf.ul0.rp_filter",
    "net.ipv4.conf.all.src_valid_mark",
    "net.ipv4.conf.ul0.src_valid_mark",
)


def host_state(ns: str) -> str:
    """Everything the daemon may touch on A, to compare before and after."""
    ruleset = run(["ip", "netns", "exec", ns, "nft", "list", "ruleset"]).stdout
    sysctls = run(["ip", "netns", "exec", ns, "sysctl", *SYSCTLS]).stdout
    return f"{routing_state(ns)}\n$ nft list ruleset\n{ruleset}\n$ sysctl\n{sysctls}"


def strict_home(net: Net) -> Home:
    h = home(net)
    nat_on_b(h)
    h.a.exec(
        ["sysctl", "-q", "-w", "net.ipv4.conf.all.rp_filter=1", "net.ipv4.conf.ul0.rp_filter=1"],
        check=True,
    )
    h.a.add_peer(h.b, endpoint=B_ENDPOINT[4], allowed_ips=FULL)
    h.b.add_peer(h.a)
    return h


def _sysctl(h: Home, name: str) -> str:
    return h.a.exec(["sysctl", "-n", name], check=True).stdout.strip()


def _table(h: Home) -> str:
    return h.a.exec(["nft", "list", "table", "inet", TABLE], check=False).stdout


def test_strict_rp_filter_full_tunnel_comes_up_and_gives_everything_back(net: Net) -> None:
    h = strict_home(net)
    before = host_state(h.a.ns)
    assert _sysctl(h, "net.ipv4.conf.all.src_valid_mark") == "0"
    h.b.start()
    h.a.start()
    h.a.wait_established("b", timeout=15)
    h.b.wait_established("a")

    table = _table(h)
    assert f"meta mark {POLICY_TABLE:#010x} ct mark set meta mark" in table, table
    assert f"ct mark {POLICY_TABLE:#010x} meta mark set ct mark" in table, table
    assert _sysctl(h, "net.ipv4.conf.all.src_valid_mark") == "1"
    assert _sysctl(h, "net.ipv4.conf.ul0.rp_filter") == "1"  # the filter stays strict
    during = host_state(h.a.ns)
    ping_through_tunnel(h, INTERNET4)
    ping_through_tunnel(h, INTERNET6)
    log = h.a.read_log()
    assert (
        "strict reverse-path filtering on ul0: the replies to the daemon's datagrams get "
        f"their mark {POLICY_TABLE:#x} back (nftables table inet {TABLE}, src_valid_mark)"
    ) in log
    assert " WARNING " not in log and "Traceback" not in log

    h.a.stop()
    after = host_state(h.a.ns)
    print(f"=== A before ===\n{before}\n=== A with the tunnel up ===\n{during}")
    print(f"=== A after SIGTERM ===\n{after}")
    assert after == before
    h.b.stop()
    h.finish()


def test_strict_rp_filter_kill9_then_restart_leaves_nothing_behind(net: Net) -> None:
    h = strict_home(net)
    before = host_state(h.a.ns)
    h.b.start()
    h.a.start()
    h.a.wait_established("b", timeout=15)
    h.a.kill9()
    # what the killed daemon leaves: its rules, its table, the sysctl it set
    assert f"lookup {POLICY_TABLE}" in h.a.ip("rule").stdout
    assert TABLE in _table(h)
    assert _sysctl(h, "net.ipv4.conf.all.src_valid_mark") == "1"

    h.a.start()
    h.a.wait_established("b", timeout=15)
    log = h.a.read_log().split("--- harness: start #2 ---")[1]
    assert "a previous secureiod for this interface stopped without cleaning up" in log
    assert "1 nftables table, 1 sysctl" in log
    ruleset = h.a.exec(["nft", "list", "ruleset"], check=True).stdout
    assert ruleset.count(f"table inet {TABLE}") == 1  # not two
    ping_through_tunnel(h, INTERNET4, count=3)
    h.a.stop()
    assert host_state(h.a.ns) == before
    assert not (h.a.dir / "sio0.owned").exists()
    h.b.stop()
    h.finish()
