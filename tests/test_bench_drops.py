"""bench/tunnel_measure.py's drop counters, read for real: ``ip -j -s link`` and
``/proc/net/snmp`` of this host (the bench reads them inside its namespaces the same way),
so a change in either format shows here instead of as zeros in a bench run."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Any

import pytest
from bench_modules import load_bench

tunnel_measure = load_bench("tunnel_measure")


@dataclass
class HostNode:
    """The part of ``harness.Node`` the counters use, running commands on the host."""

    def exec(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)


def _snmp_udp() -> dict[str, int]:
    with open("/proc/net/snmp") as f:
        rows = [line.split()[1:] for line in f if line.startswith("Udp: ")]
    return {k: int(v) for k, v in zip(rows[0], rows[1], strict=True)}


def test_counters_are_read_from_the_kernel_not_defaulted() -> None:
    before = _snmp_udp()
    counters = tunnel_measure.drop_counters(HostNode(), "lo")
    after = _snmp_udp()
    assert set(counters) == {"tunnel_tx_dropped", "udp_rcvbuf_errors", "udp_sndbuf_errors"}
    # the kernel's counters only grow: the bench's reading lies between two of our own
    for key, field in (
        ("udp_rcvbuf_errors", "RcvbufErrors"),
        ("udp_sndbuf_errors", "SndbufErrors"),
    ):
        assert before[field] <= counters[key] <= after[field]
    link = HostNode().exec(["ip", "-j", "-s", "link", "show", "dev", "lo"]).stdout
    assert f'"dropped":{counters["tunnel_tx_dropped"]}' in link.replace(" ", "")


def test_the_tunnel_devices_drops_come_from_ip_link(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device's transmit drops are its ``stats64.tx.dropped``; no such device: 0."""
    node = HostNode()
    real = node.exec

    def fake_exec(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        if argv[:2] == ["ip", "-j"]:
            out = '[{"ifname":"tun0","stats64":{"tx":{"dropped":1234},"rx":{"dropped":0}}}]'
            return subprocess.CompletedProcess(argv, 0, out, "")
        return real(argv)

    monkeypatch.setattr(node, "exec", fake_exec)
    assert tunnel_measure.drop_counters(node, "tun0")["tunnel_tx_dropped"] == 1234
    assert tunnel_measure.drop_counters(HostNode(), "no-such-dev0")["tunnel_tx_dropped"] is None


def test_a_counter_that_was_not_read_or_went_back_grows_by_nothing_known() -> None:
    """Unknown is "-" in the table, never 0 % (nor a negative share after a restart)."""
    assert tunnel_measure._growth(10, 25) == 15
    assert tunnel_measure._growth(None, 25) is None
    assert tunnel_measure._growth(10, None) is None
    assert tunnel_measure._growth(30, 5) is None


def test_the_route_to_a_local_address_goes_through_lo() -> None:
    assert tunnel_measure.tunnel_device(HostNode(), "127.0.0.1") == "lo"
