"""Issue 11 gaps, in memory: a full tunnel under strict reverse-path filtering gets the
mark restore of ``daemon/nft.py`` (its own nftables table and ``src_valid_mark``),
recorded and given back; and a persistent TUN someone else made gets its MTU back.

``FakeHostFilter`` stands for /proc/sys and ``nft``: it keeps the sysctls and the tables
the scripts create or delete, and can refuse as the real ones do (no nft, a read-only
/proc/sys, a table of that name that is someone else's). The real ones are exercised in
netns-tests/test_full_tunnel_rpfilter.py.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from pathlib import Path

import pytest
from fakes import FakeNetlink, Tunnel, two_sites

from secureiod.daemon import owned as owned_module
from secureiod.daemon.ledger import (
    Ledger,
    LedgerFile,
    OwnedMtu,
    OwnedNftTable,
    OwnedRule,
    OwnedSysctl,
    _from_json,
)
from secureiod.daemon.nft import (
    SRC_VALID_MARK,
    HostFilterError,
    default_host_filter,
    restore_script,
    table_name,
)
from secureiod.daemon.owned import OwnedNetlink, undo_leftovers
from secureiod.daemon.status import device_status
from secureiod.netlink import Netlink, NetlinkError

T = 51820
FULL = ["0.0.0.0/0", "::/0"]
TABLE = OwnedNftTable("inet", "secureiod-sio0")
VALID_MARK = OwnedSysctl(SRC_VALID_MARK, "0")


class FakeHostFilter:
    """Satisfies ``nft.HostFilterPort`` (see module doc)."""

    def __init__(self, strict: list[str] | None = None) -> None:
        self.strict = ["eth0"] if strict is None else strict
        self.sysctls: dict[str, str] = {SRC_VALID_MARK: "0"}
        self.tables: dict[str, str] = {}
        """name -> the script that created it."""
        self.scripts: list[str] = []
        self.installed = True
        self.read_only = False
        self.excluded: list[tuple[str, ...]] = []

    def strict_rp_filter(self, exclude: tuple[str, ...]) -> list[str]:
        self.excluded.append(exclude)
        return [d for d in self.strict if d not in exclude]

    def read_sysctl(self, key: str) -> str | None:
        return self.sysctls.get(key)

    def write_sysctl(self, key: str, value: str) -> None:
        if self.read_only:
            raise HostFilterError(f"cannot set {key.replace('/', '.')}: Read-only file system")
        self.sysctls[key] = value

    def nft(self, script: str) -> None:
        if not self.installed:
            raise FileNotFoundError("nft")
        self.scripts.append(script)
        first = script.splitlines()[0].split()
        verb, name = first[0], first[3]
        if verb == "create":
            if name in self.tables:
                raise HostFilterError("nft: Error: Could not process rule: File exists")
            self.tables[name] = script
        elif verb == "delete":
            if name not in self.tables:
                raise HostFilterError(
                    "nft: Error: Could not process rule: No such file or directory"
                )
            del self.tables[name]
        else:
            raise AssertionError(f"unexpected nft script {script!r}")


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> FakeHostFilter:
    """Every ``OwnedNetlink`` (and ``undo``) of the test gets this host filter."""
    fake = FakeHostFilter()
    monkeypatch.setattr(owned_module, "default_host_filter", lambda netlink: fake)
    return fake


def _full_tunnel(tmp_path: Path) -> Tunnel:
    tunnel = Tunnel(two_sites(tmp_path, allowed_b=FULL), start=[])
    netlink = tunnel.nodes["a"].netlink
    netlink.add_host_route("198.18.1.0/24", dev="eth0", proto=2, scope=253)
    netlink.add_host_route("default", dev="eth0", gateway="198.18.1.1")
    return tunnel


# --- strict rp_filter ----------------------------------------------------------------------------


def test_strict_rp_filter_gets_the_mark_restore_and_gives_it_back(
    tmp_path: Path, host: FakeHostFilter, caplog: pytest.LogCaptureFixture
) -> None:
    tunnel = _full_tunnel(tmp_path)
    netlink = tunnel.nodes["a"].netlink
    initial = netlink.snapshot()
    caplog.set_level(logging.INFO)
    tunnel.start("b")
    device = tunnel.start("a")
    tunnel.wait_established(timeout=5)
    assert host.excluded == [("sio0",)]  # the tunnel's own device is not the underlay
    assert list(host.tables) == ["secureiod-sio0"]
    script = host.tables["secureiod-sio0"]
    assert script == restore_script("secureiod-sio0", T)
    assert "meta l4proto udp meta mark 0xca6c ct mark set meta mark" in script
    assert "meta l4proto udp ct mark 0xca6c meta mark set ct mark" in script
    assert script.startswith("create table inet secureiod-sio0\n")  # never "add"
    assert host.sysctls[SRC_VALID_MARK] == "1"
    items = device.routes.netlink.ledger.items()
    first_rule = next(i for i, item in enumerate(items) if isinstance(item, OwnedRule))
    # recorded (and made) before the rules: no reply is dropped in between
    assert items.index(TABLE) < items.index(VALID_MARK) < first_rule
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "replies to the daemon's datagrams get their mark 0xca6c back" in caplog.text
    tunnel.round_trip("a", "b")
    device.close()
    device.give_back()
    assert host.tables == {}
    assert host.sysctls[SRC_VALID_MARK] == "0"
    assert netlink.snapshot() == initial
    assert len(device.routes.netlink.ledger) == 0


def test_nothing_is_touched_without_strict_filtering_or_a_full_tunnel(
    tmp_path: Path, host: FakeHostFilter
) -> None:
    host.strict = []
    tunnel = _full_tunnel(tmp_path)
    tunnel.start("b")
    tunnel.start("a")
    tunnel.wait_established(timeout=5)
    assert host.scripts == [] and host.sysctls[SRC_VALID_MARK] == "0"
    # strict, but no default route: the tunnel takes no reply's reverse path
    host.strict = ["eth0"]
    site = Tunnel(two_sites(tmp_path / "site"), start=["a", "b"])
    site.wait_established(timeout=5)
    assert host.scripts == [] and host.excluded == [("sio0",)]


def test_a_valid_mark_that_is_already_on_is_left_alone(
    tmp_path: Path, host: FakeHostFilter
) -> None:
    host.sysctls[SRC_VALID_MARK] = "1"
    tunnel = _full_tunnel(tmp_path)
    tunnel.start("b")
    device = tunnel.start("a")
    assert "secureiod-sio0" in host.tables
    assert VALID_MARK not in device.routes.netlink.ledger
    device.give_back()
    assert host.sysctls[SRC_VALID_MARK] == "1" and host.tables == {}
    # the kernel ORs all and the device: a strict device that has it needs no change
    host.sysctls = {SRC_VALID_MARK: "0", "net/ipv4/conf/eth0/src_valid_mark": "1"}
    device = _full_tunnel(tmp_path / "again").start("a")
    assert host.sysctls[SRC_VALID_MARK] == "0" and "secureiod-sio0" in host.tables
    device.give_back()


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        (lambda h: setattr(h, "installed", False), "nft (nftables) is not installed"),
        (
            lambda h: setattr(h, "read_only", True),
            "cannot set net.ipv4.conf.all.src_valid_mark: Read-only file system",
        ),
        (
            lambda h: h.tables.update({"secureiod-sio0": "someone else's"}),
            "a table inet secureiod-sio0 is already there and is not this daemon's (remove "
            "it: nft delete table inet secureiod-sio0)",
        ),
    ],
    ids=["no-nft", "read-only-sysctl", "foreign-table"],
)
def test_what_cannot_be_done_is_one_warning_with_the_fix(
    tmp_path: Path,
    host: FakeHostFilter,
    caplog: pytest.LogCaptureFixture,
    setup: object,
    reason: str,
) -> None:
    setup(host)  # type: ignore[operator]
    before = dict(host.tables)
    tunnel = _full_tunnel(tmp_path)
    caplog.set_level(logging.WARNING)
    tunnel.start("b")
    device = tunnel.start("a")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        f"{reason}: strict reverse-path filtering (rp_filter=1) on eth0 drops the peers' "
        "datagrams that arrive there while the tunnel holds the default route; make it "
        "loose: sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.eth0.rp_filter=2"
    ]
    # nothing half-done stays, someone else's table is untouched, the tunnel is set up
    assert host.tables == before and host.sysctls[SRC_VALID_MARK] == "0"
    ledger = device.routes.netlink.ledger
    assert TABLE not in ledger and VALID_MARK not in ledger
    assert any(isinstance(i, OwnedRule) for i in ledger.items())
    device.give_back()
    assert host.tables == before


def test_a_reload_that_drops_the_default_route_drops_the_mark_restore(
    tmp_path: Path, host: FakeHostFilter
) -> None:
    builder = two_sites(tmp_path, allowed_b=FULL)
    tunnel = Tunnel(builder)
    tunnel.wait_established(timeout=5)
    device = tunnel.devices["a"]
    assert "secureiod-sio0" in host.tables
    spec = builder.nodes["a"]
    spec.peers["b"]["allowed_ips"] = ["198.19.0.2/32", "fd00:5ec::2/128"]
    spec.write()
    tunnel.call("a", lambda now: device.reload())
    assert host.tables == {} and host.sysctls[SRC_VALID_MARK] == "0"
    ledger = device.routes.netlink.ledger
    assert TABLE not in ledger and VALID_MARK not in ledger
    # and back: the next full tunnel sets it up again
    spec.peers["b"]["allowed_ips"] = FULL
    spec.write()
    tunnel.sim.run_for(1.5)  # reloads are at most one a second
    tunnel.call("a", lambda now: device.reload())
    assert "secureiod-sio0" in host.tables and host.sysctls[SRC_VALID_MARK] == "1"
    device.give_back()
    assert host.tables == {} and host.sysctls[SRC_VALID_MARK] == "0"


def test_a_killed_daemons_table_and_sysctl_go_at_the_next_start(
    tmp_path: Path, host: FakeHostFilter, caplog: pytest.LogCaptureFixture
) -> None:
    config = two_sites(tmp_path, allowed_b=FULL).load("a")
    netlink = FakeNetlink()
    path = tmp_path / "sio0.owned"
    store, _ = LedgerFile.open(path)
    first = OwnedNetlink(netlink, "sio0", config.interface)
    first.attach(ledger=Ledger(store))
    for net in config.peers[0].allowed_ips:
        first.install(net, "b")
    assert "secureiod-sio0" in host.tables and host.sysctls[SRC_VALID_MARK] == "1"
    os.close(store._fd)  # type: ignore[arg-type]  # kill -9
    store._fd = None
    host.sysctls["net/ipv4/conf/eth0/rp_filter"] = "1"  # unrelated: must stay
    store, leftovers = LedgerFile.open(path)
    assert TABLE in leftovers and VALID_MARK in leftovers
    ledger = Ledger(store)
    caplog.set_level(logging.WARNING)
    undo_leftovers(netlink, leftovers, None, ledger)
    assert host.tables == {} and host.sysctls[SRC_VALID_MARK] == "0"
    assert host.sysctls["net/ipv4/conf/eth0/rp_filter"] == "1"
    assert re.search(r"removed what it had added \(.*1 nftables table, 1 sysctl", caplog.text)
    assert len(ledger) == 0
    # a table already gone and a sysctl someone set since count as given back
    ledger.add(TABLE)
    ledger.add(VALID_MARK)
    host.sysctls[SRC_VALID_MARK] = "2"
    assert owned_module.undo(netlink, ledger.items(), None, ledger) == 0
    assert host.sysctls[SRC_VALID_MARK] == "2" and len(ledger) == 0
    ledger.close()
    assert not path.exists()


def test_the_record_accepts_only_our_own_tables_and_sysctl() -> None:
    good = [
        {"kind": "nft-table", "family": "inet", "name": "secureiod-sio0"},
        {"kind": "sysctl", "key": SRC_VALID_MARK, "value": "0"},
        {"kind": "mtu", "dev": "sio0", "mtu": 9000},
    ]
    assert [_from_json(g) for g in good] == [TABLE, VALID_MARK, OwnedMtu("sio0", 9000)]
    for bad in (
        {"kind": "nft-table", "family": "inet", "name": "filter"},
        {"kind": "nft-table", "family": "ip", "name": "secureiod-sio0"},
        {"kind": "nft-table", "family": "inet", "name": "secureiod-x; flush ruleset"},
        {"kind": "nft-table", "family": "inet", "name": "secureiod-"},
        {"kind": "sysctl", "key": "kernel/core_pattern", "value": "0"},
        {"kind": "sysctl", "key": "net/ipv4/conf/all/../../../kernel/x", "value": "0"},
        {"kind": "sysctl", "key": SRC_VALID_MARK, "value": "|sh"},
        {"kind": "mtu", "dev": "sio0", "mtu": 10},
        {"kind": "mtu", "dev": "sio0", "mtu": True},
    ):
        with pytest.raises((ValueError, KeyError, TypeError)):
            _from_json(bad)


def test_table_names_and_the_real_adapter_only_with_the_real_netlink() -> None:
    assert table_name("sio0") == "secureiod-sio0"
    assert table_name("wg@home") == "secureiod-wg_home"
    assert default_host_filter(FakeNetlink()) is None
    assert default_host_filter(Netlink.__new__(Netlink)) is not None


# --- a TUN device someone else made ---------------------------------------------------------------


def _boot(tunnel: Tunnel, name: str, *, preexisted: bool) -> object:
    node = tunnel.nodes[name]
    node.tun.preexisted = preexisted  # type: ignore[attr-defined]
    return tunnel.start(name)


def test_a_persistent_tun_gets_its_mtu_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="secureiod")
    builder = two_sites(tmp_path)
    tunnel = Tunnel(builder, start=[])
    netlink = tunnel.nodes["a"].netlink
    netlink.mtu["sio0"] = 9000  # the administrator's
    tunnel.start("b")
    device = _boot(tunnel, "a", preexisted=True)
    tunnel.wait_established(timeout=5)
    tunnel.round_trip("a", "b")
    # the link MTU followed the peers' (mtu = "auto"): the first value is what is kept
    assert netlink.mtu["sio0"] != 9000 and len(netlink.mtu_history) >= 2
    ledger = device.routes.netlink.ledger  # type: ignore[attr-defined]
    assert [i for i in ledger.items() if isinstance(i, OwnedMtu)] == [OwnedMtu("sio0", 9000)]
    # its gso_max_size is the administrator's too: not set (nothing to give back), not
    # claimed in status, and the log says what to set
    assert not any(op == "set_gso_max_size" for op, _ in netlink.calls)
    assert tunnel.nodes["b"].netlink.gso_max_size == {"sio0": 59_966}
    assert device_status(device, tunnel.sim.now)["gso_max_size"] is None  # type: ignore[arg-type]
    assert "`ip link set sio0 gso_max_size 59966` lets each TCP segment" in caplog.text
    device.close()  # type: ignore[attr-defined]
    device.give_back()  # type: ignore[attr-defined]
    assert netlink.mtu["sio0"] == 9000
    assert len(ledger) == 0


def test_a_device_the_daemon_created_is_not_read_or_recorded(tmp_path: Path) -> None:
    tunnel = Tunnel(two_sites(tmp_path), start=[])
    netlink = tunnel.nodes["a"].netlink
    device = _boot(tunnel, "a", preexisted=False)
    assert not any(op == "get_mtu" for op, _ in netlink.calls)
    assert not any(isinstance(i, OwnedMtu) for i in device.routes.netlink.ledger.items())  # type: ignore[attr-defined]
    # a persistent device whose MTU is already ours: nothing to give back
    again = Tunnel(two_sites(tmp_path / "b"), start=[])
    again.nodes["a"].netlink.mtu["sio0"] = 1280
    device = _boot(again, "a", preexisted=True)
    assert not any(isinstance(i, OwnedMtu) for i in device.routes.netlink.ledger.items())  # type: ignore[attr-defined]


def test_a_killed_daemons_mtu_change_is_undone_at_the_next_start(tmp_path: Path) -> None:
    config = two_sites(tmp_path).load("a")
    netlink = FakeNetlink()
    netlink.mtu["sio0"] = 9000
    path = tmp_path / "sio0.owned"
    store, _ = LedgerFile.open(path)
    first = OwnedNetlink(netlink, "sio0", config.interface, created=False)
    first.attach(ledger=Ledger(store))
    first.set_mtu("sio0", 1420)
    first.set_mtu("sio0", 1380)
    os.close(store._fd)  # type: ignore[arg-type]  # kill -9
    store._fd = None
    store, leftovers = LedgerFile.open(path)
    assert leftovers == [OwnedMtu("sio0", 9000)]
    ledger = Ledger(store)
    undo_leftovers(netlink, leftovers, None, ledger)
    assert netlink.mtu["sio0"] == 9000 and len(ledger) == 0
    # the next instance records the true original again, not the killed one's value
    second = OwnedNetlink(netlink, "sio0", config.interface, created=False)
    second.attach(ledger=ledger)
    second.set_mtu("sio0", 1420)
    assert ledger.items() == [OwnedMtu("sio0", 9000)]
    second.give_back()
    assert netlink.mtu["sio0"] == 9000
    ledger.close()
    assert not path.exists()


class _GoneLink(FakeNetlink):
    def set_mtu(self, name: str, mtu: int) -> None:
        raise NetlinkError(f"no such link: {name}", errno.ENODEV)


def test_a_vanished_device_counts_as_given_back_a_refusal_does_not() -> None:
    ledger = Ledger(items=[OwnedMtu("sio9", 1500)])
    assert owned_module.undo(_GoneLink(), ledger.items(), None, ledger) == 0
    assert len(ledger) == 0
    refusing = FakeNetlink()
    refusing.fail("set_mtu")
    ledger = Ledger(items=[OwnedMtu("sio9", 1500)])
    assert owned_module.undo(refusing, ledger.items(), None, ledger) == 1
    assert ledger.items() == [OwnedMtu("sio9", 1500)]  # the next start tries again
