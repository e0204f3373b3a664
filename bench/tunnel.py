#!/usr/bin/env python3
"""``make bench``: what a tunnel costs, end to end, in network namespaces (needs root).

Two namespaces A and B joined by one veth (MTU 1500, underlay 198.18.0.1 <-> 198.18.0.2).
On that same pair, one after the other (each tunnel is stopped before the next starts, so
they never compete), it measures

* ``veth``: the plain link (iperf3 to B's underlay address), the ceiling;
* ``secureiod``: the daemon with its default settings (tunnel 198.19.0.1 <-> .2);
* ``wireguard-go``: the userspace WireGuard, if installed (tunnel 198.19.1.1 <-> .2),

each with iperf3 TCP over 1 and over 4 streams (Mbit/s), iperf3 UDP with 64-byte
datagrams at full speed (datagrams delivered per second: packets - lost, at the
receiver), ping RTT (average of 50 pings at 20 ms), and for the tunnels the daemons' CPU
(utime + stime from /proc over each measurement; 100 % = one core) and memory (VmRSS, and
VmHWM, the peak) at both ends. Then one secureiod with 1, 100 and 1000 configured peers
that have no endpoint (they just wait): time until its control socket answers, VmRSS and
CPU over 10 s of idling.

Prints the command line, the machine, and markdown tables with the raw numbers and the
ratios secureiod/veth and secureiod/wireguard-go; writes everything as JSON (default
``bench/results/tunnel.json``). A benchmark, not a test: nothing here asserts a speed, and
the numbers belong to the machine at hand (compare ratios, not absolute values across
machines). Every command has a timeout and the whole run a hard limit; the namespaces and
processes are removed on exit, error or Ctrl-C (the harness of ``netns-tests/``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "netns-tests"))

import harness  # noqa: E402

from secureiod.secureio.identity import Identity  # noqa: E402

IPERF_PORT = 5201
WG_PORT = 51820
WG_ADDR = ("198.19.1.1", "198.19.1.2")
WG_MTU = 1420  # wg-quick's default for a 1500-byte underlay
HARD_LIMIT = 420.0  # seconds for the whole run
CLK_TCK = os.sysconf("SC_CLK_TCK")
PEER_COUNTS = (1, 100, 1000)


class Deadline(Exception):
    pass


# -- /proc ------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def _mem_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1])
    return out


@contextlib.contextmanager
def _cpu(pids: dict[str, int], into: dict[str, Any]) -> Iterator[None]:
    """CPU % of each pid (100 = one core) over the ``with`` block, into ``into["cpu"]``."""
    before = {k: _cpu_seconds(p) for k, p in pids.items()}
    t0 = time.monotonic()
    yield
    wall = time.monotonic() - t0
    into["cpu"] = {k: round(100 * (_cpu_seconds(p) - before[k]) / wall, 1) for k, p in pids.items()}


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


def _udp64(a: harness.Node, dst: str, seconds: float) -> dict[str, Any]:
    end = _iperf(a, dst, ["-u", "-l", "64", "-b", "0"], seconds)
    if "error" in end:
        return end
    rx = end.get("sum_received") or end["sum"]
    delivered = rx["packets"] - rx["lost_packets"]
    sent = end.get("sum_sent", {}).get("packets", rx["packets"])
    return {
        "delivered_pps": round(delivered / rx["seconds"]),
        "sent_pps": round(sent / end.get("sum_sent", rx)["seconds"]),
        "lost_percent": round(rx["lost_percent"], 2),
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
    say: Callable[[str], None],
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
            ("udp64", lambda: _udp64(a, dst, args.udp_seconds)),
            ("ping", lambda: _ping(a, dst)),
        ]
        for key, step in steps:
            say(f"{name}: {key}")
            box: dict[str, Any] = {}
            with _cpu(pids, box):
                result = step()
            if pids:
                result["cpu"] = box["cpu"]
            out[key] = result
            time.sleep(0.5)  # let queues drain between measurements
        out["mem_kib"] = {k: _mem_kib(p) for k, p in pids.items()}
    finally:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(5)
    return out


# -- the tunnels ----------------------------------------------------------------------------


def run_secureiod(
    a: harness.Node, b: harness.Node, args: argparse.Namespace, say: Callable[[str], None]
) -> dict[str, Any]:
    a.start(wait=False)
    b.start(wait=False)
    a.wait_ready()
    b.wait_ready()
    a.wait_established("b", 15)
    b.wait_established("a", 15)
    peer = a.peer("b")
    try:
        out = measure("secureiod", a, b, b.tunnel4, {"A": a.pid, "B": b.pid}, args, say)
        out["peer_a"] = a.peer("b")
        out["peer_b"] = b.peer("a")
        out["mtu"] = peer["mtu"]
        out["offload"] = a.interface.get("offload", True)
    finally:
        for node in (a, b):
            try:
                node.stop()
            except AssertionError as exc:  # a daemon bug worth seeing, not a reason to stop
                say(f"secureiod {node.name} did not stop cleanly: {exc}")
                node.terminate()
    return out


def _wg_key(net: harness.Net, name: str) -> tuple[Path, str]:
    private = harness.run(["wg", "genkey"]).stdout.strip()
    path = net.workdir / f"{name}.wgkey"
    path.write_text(private + "\n")
    path.chmod(0o600)
    public = harness.run(["wg", "pubkey"], input=private, stdin=None).stdout.strip()
    return path, public


def run_wireguard(
    net: harness.Net,
    a: harness.Node,
    b: harness.Node,
    args: argparse.Namespace,
    say: Callable[[str], None],
) -> dict[str, Any]:
    tag = f"wgb{os.getpid() % 100000}"
    ends = [(a, f"{tag}a", a.underlay, WG_ADDR[0]), (b, f"{tag}b", b.underlay, WG_ADDR[1])]
    keys = {node.name: _wg_key(net, node.name) for node, *_ in ends}
    procs = {}
    socket_dir = Path("/var/run/wireguard")
    try:
        for node, ifname, _, _ in ends:
            # the UAPI socket is not per namespace: our own unique name, stale one removed
            (socket_dir / f"{ifname}.sock").unlink(missing_ok=True)
            env = dict(os.environ, WG_PROCESS_FOREGROUND="1", LOG_LEVEL="error")
            procs[node.name] = node.popen(
                ["wireguard-go", ifname],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        for node, ifname, _, _ in ends:
            harness.poll(
                lambda node=node, ifname=ifname: (
                    (socket_dir / f"{ifname}.sock").exists()
                    and node.ip("link", "show", ifname, check=False).returncode == 0
                ),
                10,
                f"wireguard-go {ifname} in {node.ns}",
            )
        for (node, ifname, _, addr), (other, _, other_underlay, other_addr) in zip(
            ends, reversed(ends), strict=True
        ):
            key_path, _ = keys[node.name]
            _, other_public = keys[other.name]
            node.exec(
                ["wg", "set", ifname, "private-key", str(key_path), "listen-port",
                 str(WG_PORT), "peer", other_public, "endpoint",
                 f"{other_underlay}:{WG_PORT}", "allowed-ips", f"{other_addr}/32"],
                check=True,
            )  # fmt: skip
            harness.check_tunnel(f"{addr}/24")
            node.ip("addr", "add", f"{addr}/24", "dev", ifname)
            node.ip("link", "set", ifname, "mtu", str(WG_MTU), "up")
        a.wait_ping(WG_ADDR[1], timeout=10)  # the handshake
        pids = {node.name.upper(): procs[node.name].pid for node, *_ in ends}
        out = measure("wireguard-go", a, b, WG_ADDR[1], pids, args, say)
        out["mtu"] = WG_MTU
        out["version"] = harness.run(["wireguard-go", "--version"]).stdout.split("\n")[0]
        return out
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for _, ifname, _, _ in ends:
            (socket_dir / f"{ifname}.sock").unlink(missing_ok=True)


def run_many_peers(
    net: harness.Net, count: int, idle: float, say: Callable[[str], None]
) -> dict[str, Any]:
    """One daemon, ``count`` peers without endpoints (one /32 each): start-up and idling."""
    node = net.node(f"peers{count}")
    for i in range(count):
        node.peer_specs.append(
            {
                "name": f"p{i}",
                "public_key": str(Identity.generate().public_key),
                "allowed_ips": [f"198.19.{16 + i // 250}.{1 + i % 250}/32"],
            }
        )
    say(f"secureiod with {count} peer(s): start, then {idle:.0f} s idle")
    t0 = time.monotonic()
    node.start(wait=False)
    node.wait_ready(timeout=120)
    ready = time.monotonic() - t0
    status = node.status()
    routes = node.ip("-4", "route", "show", "dev", node.ifname).stdout.count("\n")
    box: dict[str, Any] = {}
    with _cpu({"daemon": node.pid}, box):
        time.sleep(idle)
    mem = _mem_kib(node.pid)
    out = {
        "peers": count,
        "peers_total": status["peers_total"],
        "routes": routes,
        "ready_s": round(ready, 2),
        "idle_cpu_percent": box["cpu"]["daemon"],
        "mem_kib": mem,
    }
    try:
        node.stop(timeout=20)
    except AssertionError as exc:
        out["stop_error"] = str(exc)[:500]
        node.terminate()
    return out


# -- report -------------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _machine() -> dict[str, Any]:
    def version(argv: list[str]) -> str | None:
        if shutil.which(argv[0]) is None:
            return None
        out = harness.run(argv, check=False)
        text = (out.stdout or out.stderr).strip()
        return text.splitlines()[0] if text else None

    return {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "iperf3": version(["iperf3", "--version"]),
        "wireguard-go": version(["wireguard-go", "--version"]),
        "load_avg_at_start": os.getloadavg(),
    }


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:,.{digits}f}"


def _ratio(x: Any, y: Any) -> str:
    if not isinstance(x, int | float) or not isinstance(y, int | float) or not y:
        return "-"
    return f"{x / y:.2f}"


def _get(d: dict[str, Any] | None, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def report(results: dict[str, Any]) -> str:
    t = results["targets"]
    veth, sio, wg = t.get("veth"), t.get("secureiod"), t.get("wireguard-go")
    lines = [
        "| measurement | veth | secureiod | wireguard-go "
        "| secureiod/veth | secureiod/wireguard-go |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def row(label: str, path: tuple[str, ...], digits: int = 0) -> None:
        v, s, w = (_get(x, *path) for x in (veth, sio, wg))
        lines.append(
            f"| {label} | {_fmt(v, digits)} | {_fmt(s, digits)} | {_fmt(w, digits)} "
            f"| {_ratio(s, v)} | {_ratio(s, w)} |"
        )

    row("TCP, 1 stream (Mbit/s)", ("tcp1", "mbit_s"))
    row("TCP, 4 streams (Mbit/s)", ("tcp4", "mbit_s"))
    row("UDP 64 B delivered (datagrams/s)", ("udp64", "delivered_pps"))
    row("UDP 64 B loss (%)", ("udp64", "lost_percent"), 1)
    row("ping RTT avg (ms)", ("ping", "avg_ms"), 3)

    def cpu_row(label: str, key: str) -> None:
        cells, sums = [], []
        for x in (sio, wg):
            cpu = _get(x, key, "cpu")
            if cpu:
                cells.append(f"{cpu['A']:.0f} + {cpu['B']:.0f}")
                sums.append(cpu["A"] + cpu["B"])
            else:
                cells.append("-")
                sums.append(None)
        lines.append(f"| {label} | - | {cells[0]} | {cells[1]} | - | {_ratio(*sums)} |")

    cpu_row("CPU % A + B during TCP 1 stream", "tcp1")
    cpu_row("CPU % A + B during TCP 4 streams", "tcp4")
    cpu_row("CPU % A + B during UDP 64 B", "udp64")
    cpu_row("CPU % A + B during ping", "ping")
    for label, key in (("VmRSS A / B (MiB)", "VmRSS"), ("VmHWM (peak) A / B (MiB)", "VmHWM")):
        cells, sums = [], []
        for x in (sio, wg):
            mem = _get(x, "mem_kib")
            if mem:
                cells.append(f"{mem['A'][key] / 1024:.1f} / {mem['B'][key] / 1024:.1f}")
                sums.append(mem["A"][key] + mem["B"][key])
            else:
                cells.append("-")
                sums.append(None)
        lines.append(f"| {label} | - | {cells[0]} | {cells[1]} | - | {_ratio(*sums)} |")

    lines += [
        "",
        "| secureiod, peers without endpoints | ready after (s) | VmRSS (MiB) "
        "| VmHWM (MiB) | idle CPU % (over "
        f"{results['config']['idle_seconds']:.0f} s) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for p in results["many_peers"]:
        lines.append(
            f"| {p['peers']} | {p['ready_s']:.2f} | {p['mem_kib']['VmRSS'] / 1024:.1f} "
            f"| {p['mem_kib']['VmHWM'] / 1024:.1f} | {p['idle_cpu_percent']:.1f} |"
        )
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="per TCP measurement")
    parser.add_argument("--udp-seconds", type=float, default=5.0, help="per UDP measurement")
    parser.add_argument("--idle", type=float, default=10.0, help="idle time per peer count")
    parser.add_argument(
        "--json", type=Path, default=REPO / "bench" / "results" / "tunnel.json",
        help="where to write the results (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--no-wireguard", action="store_true", help="skip wireguard-go")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/tunnel.py: needs root (network namespaces, TUN)", file=sys.stderr)
        return 1

    t_start = time.monotonic()

    def say(message: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {message}", file=sys.stderr, flush=True)

    def _alarm(signum: int, frame: Any) -> None:
        raise Deadline(f"bench/tunnel.py: hard limit of {HARD_LIMIT:.0f} s reached")

    def _terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwind through the `with` block: teardown runs

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(HARD_LIMIT))
    harness.cleanup_orphans()

    command = shlex.join([sys.executable, *sys.argv])
    machine = _machine()
    results: dict[str, Any] = {
        "command": command,
        "machine": machine,
        "config": {
            "tcp_seconds": args.seconds,
            "udp_seconds": args.udp_seconds,
            "idle_seconds": args.idle,
            "underlay_mtu": 1500,
            "ping": "50 x 20 ms",
        },
        "targets": {},
        "many_peers": [],
    }
    wg_missing = shutil.which("wireguard-go") is None or shutil.which("wg") is None
    try:
        with harness.Net() as net:
            a, b = net.pair(start=False)  # the one veth pair every measurement uses
            say(f"namespaces {a.ns} <-> {b.ns}, veth MTU 1500")
            results["targets"]["veth"] = measure("veth", a, b, "198.18.0.2", {}, args, say)
            results["targets"]["secureiod"] = run_secureiod(a, b, args, say)
            if args.no_wireguard or wg_missing:
                reason = "--no-wireguard" if args.no_wireguard else "wireguard-go/wg not installed"
                say(f"wireguard-go skipped: {reason}")
                results["targets"]["wireguard-go"] = None
                results["wireguard_skipped"] = reason
            else:
                results["targets"]["wireguard-go"] = run_wireguard(net, a, b, args, say)
            for count in PEER_COUNTS:
                results["many_peers"].append(run_many_peers(net, count, args.idle, say))
    finally:
        signal.alarm(0)
    results["elapsed_s"] = round(time.monotonic() - t_start, 1)

    print(f"command: {command}")
    print(
        f"machine: {machine['cores']} cores, {machine['cpu']}, Linux {machine['kernel']}, "
        f"Python {machine['python']}, {machine['iperf3']}, wireguard-go {machine['wireguard-go']}"
    )
    print(
        f"setup: veth MTU 1500; iperf3 TCP {args.seconds:.0f} s, UDP {args.udp_seconds:.0f} s; "
        f"secureiod defaults (offload on, tunnel MTU "
        f"{_get(results['targets']['secureiod'], 'mtu')}), wireguard-go MTU {WG_MTU}; "
        "CPU 100 % = one core; load average at start "
        + ", ".join(f"{x:.2f}" for x in machine["load_avg_at_start"])
    )
    print()
    print(report(results))
    print()
    print(f"total {results['elapsed_s']:.0f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
