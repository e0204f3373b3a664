"""The measurements ``bench/tunnel.py`` takes through every tunnel, and the /proc readings
around them. Kept apart from the tunnels themselves so that each tunnel (secureiod,
wireguard-go, tinc, Nebula) is measured by exactly the same code: the comparison is only
fair if nothing but the tunnel differs."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "netns-tests"))

import harness  # noqa: E402

IPERF_PORT = 5201
CLK_TCK = os.sysconf("SC_CLK_TCK")

Say = Callable[[str], None]


class Skip(Exception):
    """A tunnel that cannot run here (tool missing, failed to come up): one line, no trace."""


# -- /proc ------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def mem_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1])
    return out


@contextlib.contextmanager
def cpu(pids: dict[str, int], into: dict[str, Any]) -> Iterator[None]:
    """CPU % of each pid (100 = one core) over the ``with`` block, into ``into["cpu"]``."""
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    t0 = time.monotonic()
    yield
    wall = time.monotonic() - t0
    into["cpu"] = {k: round(100 * (cpu_seconds(p) - before[k]) / wall, 1) for k, p in pids.items()}


# -- measurements -------------------------------------------------------------------------


def _iperf(a: harness.Node, dst: str, args: list[str], seconds: float) -> dict[str, Any]:
    argv = ["iperf3", "-c", dst, "-p", str(IPERF_PORT), "-t", str(seconds), "-J", *args]
    result = a.exec(argv, timeout=seconds + 30)
    try:
        data = json.loads(result.stdout)
    except json.JSONDecodeError:
        return {"error": (result.stdout + result.stderr).strip()[-500:]}
    if "error" in data:
        return {"error": data["error"]}
    return data["end"]  # type: ignore[no-any-return]


def _tcp(a: harness.Node, dst: str, streams: int, seconds: float) -> dict[str, Any]:
    end = _iperf(a, dst, ["-P", str(streams)], seconds)
    if "error" in end:
        return end
    return {
        "mbit_s": round(end["sum_received"]["bits_per_second"] / 1e6, 1),
        "retransmits": end["sum_sent"].get("retransmits"),
    }


def drop_counters(node: harness.Node, tunnel_dev: str | None) -> dict[str, int | None]:
    """The counters of ``node``'s namespace that say where a datagram died: the tunnel
    device's transmit drops (packets the kernel could not queue for the tunnel daemon: it
    read too slowly) and the namespace's UDP receive and send buffer errors (a full socket
    buffer: the tunnel's own underlay socket or iperf3's, one namespace holds both; an
    underlay datagram dropped there carries a dozen of iperf3's, counted as one). None: the
    counter could not be read (no such device, another format), never a made-up 0."""
    out: dict[str, int | None] = dict.fromkeys(
        ("tunnel_tx_dropped", "udp_rcvbuf_errors", "udp_sndbuf_errors")
    )
    if tunnel_dev is not None:
        link = node.exec(["ip", "-j", "-s", "link", "show", "dev", tunnel_dev])
        with contextlib.suppress(ValueError, LookupError, TypeError):
            out["tunnel_tx_dropped"] = int(json.loads(link.stdout)[0]["stats64"]["tx"]["dropped"])
    snmp = node.exec(["cat", "/proc/net/snmp"]).stdout.splitlines()
    udp = [line.split()[1:] for line in snmp if line.startswith("Udp: ")]
    if len(udp) == 2:
        fields = dict(zip(udp[0], udp[1], strict=False))
        with contextlib.suppress(KeyError, ValueError):
            out["udp_rcvbuf_errors"] = int(fields["RcvbufErrors"])
        with contextlib.suppress(KeyError, ValueError):
            out["udp_sndbuf_errors"] = int(fields["SndbufErrors"])
    return out


def _growth(before: int | None, after: int | None) -> int | None:
    """A counter's growth over the run; None if unread either time or if it went back (the
    device went and came back: its counters started again)."""
    if before is None or after is None or after < before:
        return None
    return after - before


def tunnel_device(a: harness.Node, dst: str) -> str | None:
    """The device A routes ``dst`` through: the tunnel's (the veth for plain veth)."""
    route = a.exec(["ip", "-j", "route", "get", dst])
    with contextlib.suppress(ValueError, LookupError, TypeError):
        return str(json.loads(route.stdout)[0]["dev"])
    return None


def _udp64(a: harness.Node, b: harness.Node, dst: str, seconds: float) -> dict[str, Any]:
    dev = tunnel_device(a, dst)
    before = {"A": drop_counters(a, dev), "B": drop_counters(b, None)}
    end = _iperf(a, dst, ["-u", "-l", "64", "-b", "0"], seconds)
    if "error" in end:
        return end
    after = {"A": drop_counters(a, dev), "B": drop_counters(b, None)}
    rx = end.get("sum_received") or end["sum"]
    delivered = rx["packets"] - rx["lost_packets"]
    sent = end.get("sum_sent", {}).get("packets", rx["packets"])
    drops = {
        side: {k: _growth(before[side][k], after[side][k]) for k in before[side]} for side in before
    }
    # where the sent datagrams died, as shares of those sent (the rest: elsewhere, e.g.
    # inside a tunnel daemon, or counted lost by iperf3 for being out of order)
    where = {
        "at_A_tunnel_device": drops["A"]["tunnel_tx_dropped"],
        "B_udp_rcvbuf": drops["B"]["udp_rcvbuf_errors"],
        "A_udp_rcvbuf": drops["A"]["udp_rcvbuf_errors"],
    }
    return {
        "delivered_pps": round(delivered / rx["seconds"]),
        "sent_pps": round(sent / end.get("sum_sent", rx)["seconds"]),
        "lost_percent": round(rx["lost_percent"], 2),
        "tunnel_device": dev,
        "drops": drops,
        "lost_where_percent": {
            k: round(100 * v / sent, 1) if sent and v is not None else None
            for k, v in where.items()
        },
    }


def _ping(a: harness.Node, dst: str) -> dict[str, Any]:
    result = a.exec(["ping", "-n", "-q", "-c", "50", "-i", "0.02", "-W", "1", dst], timeout=30)
    m = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", result.stdout)
    received = re.search(r"(\d+) received", result.stdout)
    if not m:
        return {"error": (result.stdout + result.stderr).strip()[-300:]}
    return {
        "avg_ms": float(m.group(2)),
        "min_ms": float(m.group(1)),
        "max_ms": float(m.group(3)),
        "received": int(received.group(1)) if received else None,
    }


def _wait_listening(node: harness.Node, addr: str) -> None:
    harness.poll(
        lambda: (
            f"{addr}:{IPERF_PORT}"
            in node.exec(["ss", "-Hltn", "sport", "=", f":{IPERF_PORT}"]).stdout
        ),
        10,
        f"iperf3 server on {addr}",
    )


def measure(
    name: str,
    a: harness.Node,
    b: harness.Node,
    dst: str,
    pids: dict[str, int],
    args: argparse.Namespace,
    say: Say,
) -> dict[str, Any]:
    """Every measurement against ``dst`` (in B) from A, with the daemons' CPU and memory."""
    server = b.popen(
        ["iperf3", "-s", "-B", dst, "-p", str(IPERF_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    out: dict[str, Any] = {"address": dst}
    try:
        _wait_listening(b, dst)
        steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("tcp1", lambda: _tcp(a, dst, 1, args.seconds)),
            ("tcp4", lambda: _tcp(a, dst, 4, args.seconds)),
            ("udp64", lambda: _udp64(a, b, dst, args.udp_seconds)),
            ("ping", lambda: _ping(a, dst)),
        ]
        for key, step in steps:
            say(f"{name}: {key}")
            box: dict[str, Any] = {}
            with cpu(pids, box):
                result = step()
            if pids:
                result["cpu"] = box["cpu"]
            out[key] = result
            time.sleep(0.5)  # let queues drain between measurements
        out["mem_kib"] = {k: mem_kib(p) for k, p in pids.items()}
    finally:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(5)
    return out


def stop_all(procs: list[subprocess.Popen[Any]]) -> None:
    """SIGTERM, then SIGKILL after 5 s: the next tunnel must find the veth to itself."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait_started(proc: subprocess.Popen[Any], node: harness.Node, ifname: str, what: str) -> None:
    """Poll until ``ifname`` exists in ``node``'s namespace; Skip at once if ``proc`` died."""

    def up() -> bool:
        if proc.poll() is not None:
            raise Skip(f"{what} exited with {proc.returncode} at start")
        return node.ip("link", "show", ifname, check=False).returncode == 0

    try:
        harness.poll(up, 10, f"{what}: {ifname} in {node.ns}")
    except AssertionError as exc:
        raise Skip(f"{what}: {ifname} did not appear within 10 s") from exc


def wait_tunnel(a: harness.Node, dst: str, what: str) -> None:
    """The first ping through a fresh tunnel also waits for its handshake."""
    try:
        a.wait_ping(dst, timeout=15)
    except AssertionError as exc:
        raise Skip(f"{what}: no ping answer from {dst} within 15 s") from exc


def first_line(argv: list[str]) -> str | None:
    """The first line a ``--version`` style command prints (stdout or stderr), if any."""
    try:
        out = harness.run(argv, check=False, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else None
