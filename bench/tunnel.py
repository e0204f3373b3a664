#!/usr/bin/env python3
"""``make bench``: what a tunnel costs, end to end, in network namespaces (needs root).

Two namespaces A and B joined by one veth (MTU 1500, underlay 198.18.0.1 <-> 198.18.0.2).
On that same pair, one after the other (each tunnel is stopped before the next starts, so
they never compete), it measures

* ``veth``: the plain link (iperf3 to B's underlay address), the ceiling;
* ``secureiod``: the daemon with its default settings (tunnel 198.19.0.1 <-> .2);
* ``wireguard-go``: whichever ``wireguard-go`` is first on PATH (tunnel 198.19.1.1 <-> .2);
  its version is printed and recorded, because builds before 2023 lack batching and GSO;
* ``tinc``: tinc 1.0 in router mode (tunnel 198.19.2.1 <-> .2);
* ``nebula``: Nebula with a static host map and no lighthouse (tunnel 198.19.3.1 <-> .2),

each with iperf3 TCP over 1 and over 4 streams (Mbit/s), iperf3 UDP with 64-byte
datagrams at full speed (datagrams delivered per second: packets - lost, at the
receiver), ping RTT (average of 50 pings at 20 ms), and for the tunnels the daemons' CPU
(utime + stime from /proc over each measurement; 100 % = one core) and memory (VmRSS, and
VmHWM, the peak) at both ends. A tunnel that cannot run (not installed, does not come up)
is skipped with one line. That whole sequence runs ``--rounds`` times (3), so the tunnels
are interleaved in time while the box's speed drifts, and each tunnel's median round per
measurement is reported (``tunnel_rounds.py``). Then, once, one secureiod with 1, 100, 1000
and 10000 configured peers that have no endpoint (they just wait): time until its control
socket answers, VmRSS and CPU over 10 s of idling; the 10000-peer start three times
(``--peer-samples``), the goals judged on the worst.

Prints the command line, the machine, markdown tables with the raw numbers and secureiod's
ratio to every other tunnel, and issue 13's goals marked met / not met from this run's own
numbers; writes everything as JSON (default ``bench/results/tunnel.json``) and a chart
(default ``bench/results/tunnel.svg``). A benchmark, not a test: nothing here asserts a
speed, and the numbers belong to the machine at hand (compare ratios, not absolute values
across machines). Every command has a timeout and the whole run a hard limit; the
namespaces and processes are removed on exit, error or Ctrl-C (the harness of
``netns-tests/``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tunnel_chart import write_chart
from tunnel_measure import REPO, Say, Skip, cpu, first_line, harness, measure, mem_kib
from tunnel_others import TUNNEL_MTU, run_nebula, run_tinc, run_wireguard
from tunnel_report import MANY_PEERS_GOAL, get, goals_json, goals_table, rounds_table, tables
from tunnel_rounds import aggregate

from secureiod.secureio.identity import Identity

# The whole run: ~25 s per tunnel (5 of them) per round (~125 s a round, 3 rounds by default)
# plus the peer counts (~50 s; the 10,000-peer daemon alone may take ~20 s to start and stop);
# the limit only has to stop a run that hangs (``hard_limit``: these, and the durations asked).
HARD_LIMIT_BASE = 110.0
HARD_LIMIT_PER_TUNNEL = 20.0
ROUNDS = 3
PEER_COUNTS = (1, 100, 1000, 10_000)
PEER_SAMPLES = 3
"""Starts with ``MANY_PEERS_GOAL`` peers: issue 13's goals for them take the worst start."""
OTHERS: dict[str, Callable[..., dict[str, Any]]] = {
    "wireguard-go": run_wireguard,
    "tinc": run_tinc,
    "nebula": run_nebula,
}


class Deadline(Exception):
    pass


# -- secureiod ---------------------------------------------------------------------------------


def run_secureiod(
    a: harness.Node, b: harness.Node, args: argparse.Namespace, say: Say
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
        with contextlib.suppress(subprocess.TimeoutExpired, AssertionError, ValueError):
            out["crypto"] = a.status().get("crypto")  # AVX-512 or not moves bulk numbers
        out["offload"] = a.interface.get("offload", True)
    finally:
        for node in (a, b):
            try:
                node.stop()
            except AssertionError as exc:  # a daemon bug worth seeing, not a reason to stop
                say(f"secureiod {node.name} did not stop cleanly: {exc}")
                node.terminate()
    return out


def run_other(
    name: str,
    net: harness.Net,
    a: harness.Node,
    b: harness.Node,
    args: argparse.Namespace,
    say: Say,
) -> dict[str, Any]:
    """One comparison tunnel; if it cannot run, ``{"skipped": reason}`` and one line."""
    try:
        return OTHERS[name](net, a, b, args, say)
    except Skip as exc:
        reason = str(exc)
    except (AssertionError, OSError, subprocess.SubprocessError) as exc:
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
    say(f"{name} skipped: {reason}")
    return {"skipped": reason}


@contextlib.contextmanager
def _round_workdir(net: harness.Net, index: int) -> Iterator[None]:
    """From the second round on, a fresh directory under the run's own (removed with it) for
    the comparison tunnels' keys and configs: their set-up generates them anew each time and
    refuses to find the previous round's files in its way."""
    if index == 0:
        yield
        return
    base = net.workdir
    net.workdir = base / f"round{index + 1}"
    net.workdir.mkdir()
    try:
        yield
    finally:
        net.workdir = base  # Net's teardown removes ``base``, and every round's with it


def round_order(index: int) -> list[str]:
    """The tunnels after veth in round ``index`` (0-based): secureiod then OTHERS, reversed
    in every second round, so that no tunnel always runs right after another one while the
    box's speed drifts (a trend would otherwise shift every round's ratio the same way)."""
    names = ["secureiod", *OTHERS]
    return names[::-1] if index % 2 else names


def run_round(
    net: harness.Net,
    a: harness.Node,
    b: harness.Node,
    args: argparse.Namespace,
    say: Say,
    index: int,
) -> dict[str, Any]:
    """Every tunnel once, veth first, then in ``round_order``: one round's targets (keyed in
    the usual order). A ``--skip`` is said once, in the first round, not in every round."""
    targets: dict[str, Any] = {"veth": measure("veth", a, b, "198.18.0.2", {}, args, say)}
    for name in round_order(index):
        if name == "secureiod":
            targets[name] = run_secureiod(a, b, args, say)
        elif name in args.skip:
            if index == 0:
                say(f"{name} skipped: --skip {name}")
            targets[name] = {"skipped": f"--skip {name}"}
        else:
            targets[name] = run_other(name, net, a, b, args, say)
    return {name: targets[name] for name in ("veth", "secureiod", *OTHERS)}


def _wait_ready(node: harness.Node, timeout: float) -> None:
    """Like ``Node.wait_ready``, but a daemon still busy loading thousands of peers may hold
    a ``status`` request past secureioctl's own 10 s timeout: that is "not yet", not a crash."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.proc is not None and node.proc.poll() is not None:
            raise AssertionError(
                f"secureiod exited with {node.proc.returncode} at start\n{node.log_tail()}"
            )
        with contextlib.suppress(subprocess.TimeoutExpired):
            if node.ctl("status", check=False).returncode == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"control socket did not answer within {timeout:.0f} s")


def run_many_peers(
    net: harness.Net, count: int, idle: float, say: Say, sample: int = 0
) -> dict[str, Any]:
    """One daemon, ``count`` peers without endpoints (one /32 each): start-up and idling.
    ``sample``: which start with this many peers (each gets its own node)."""
    node = net.node(f"peers{count}" + (f"-{sample + 1}" if sample else ""))
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
    try:
        _wait_ready(node, timeout=60)
    except AssertionError as exc:  # e.g. a config refused as too large: a result, not a crash
        node.terminate()
        error = str(exc).strip()
        say(f"secureiod with {count} peers did not start: {error.splitlines()[0][:200]}")
        return {"peers": count, "error": error[-1000:]}
    ready = time.monotonic() - t0
    status: dict[str, Any] = {}
    with contextlib.suppress(subprocess.TimeoutExpired, AssertionError):
        status = node.status()
    routes = node.ip("-4", "route", "show", "dev", node.ifname).stdout.count("\n")
    box: dict[str, Any] = {}
    with cpu({"daemon": node.pid}, box):
        time.sleep(idle)
    mem = mem_kib(node.pid)
    out = {
        "peers": count,
        "peers_total": status.get("peers_total"),
        "routes": routes,
        "ready_s": round(ready, 2),
        "idle_cpu_percent": box["cpu"]["daemon"],
        "mem_kib": mem,
    }
    try:
        node.stop(timeout=30)
    except AssertionError as exc:
        out["stop_error"] = str(exc)[:500]
        node.terminate()
    return out


# -- the machine ---------------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    """The CPU features our crypto and wireguard-go's choose code by (AVX-512 above all):
    runs on CPUs that differ in these are not comparable, even as ratios."""
    wanted = ("avx2", "avx512f", "avx512ifma", "avx512vl", "vaes", "sha_ni")
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [flag for flag in wanted if flag in present]
    return []


def _source() -> dict[str, Any]:
    """The commit measured, and whether the work tree differed from it (what a result is
    of: a JSON without it cannot be told apart from another build's)."""

    def git(*argv: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(REPO), *argv], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def _machine() -> dict[str, Any]:
    def version(argv: list[str]) -> str | None:
        return first_line(argv) if shutil.which(argv[0]) else None

    return {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "iperf3": version(["iperf3", "--version"]),
        "wireguard-go": version(["wireguard-go", "--version"]),
        "wireguard-go_path": shutil.which("wireguard-go"),
        "tinc": version(["tincd", "--version"]),
        "nebula": version(["nebula", "-version"]),
        "load_avg_at_start": os.getloadavg(),
    }


# -- main ---------------------------------------------------------------------------------


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="per TCP measurement")
    parser.add_argument("--udp-seconds", type=float, default=5.0, help="per UDP measurement")
    parser.add_argument("--idle", type=float, default=10.0, help="idle time per peer count")
    parser.add_argument(
        "--rounds", type=int, default=ROUNDS,
        help="measure every tunnel this many times, interleaved, and report each tunnel's "
        "median round (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--json", type=Path, default=REPO / "bench" / "results" / "tunnel.json",
        help="where to write the results (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--chart", type=Path, default=REPO / "bench" / "results" / "tunnel.svg",
        help="where to draw the chart, .svg or .png (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--skip", action="append", default=[], choices=sorted(OTHERS),
        help="leave out a comparison tunnel (repeatable)",
    )  # fmt: skip
    parser.add_argument("--no-wireguard", action="store_true", help="same as --skip wireguard-go")
    parser.add_argument(
        "--peers", default=",".join(str(n) for n in PEER_COUNTS),
        help="comma-separated peer counts for the configured-peers rows (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--peer-samples", type=int, default=PEER_SAMPLES,
        help=f"starts with {MANY_PEERS_GOAL:,} peers; the goals take the worst "
        "(default: %(default)s)",
    )  # fmt: skip
    args = parser.parse_args()
    if not 1 <= args.peer_samples <= 9:
        parser.error(f"--peer-samples: {args.peer_samples} is not a number from 1 to 9")
    if args.no_wireguard:
        args.skip.append("wireguard-go")
    try:
        args.peer_counts = [int(n) for n in args.peers.split(",") if n.strip()]
    except ValueError:
        parser.error(f"--peers: {args.peers!r} is not a comma-separated list of numbers")
    if any(not 1 <= n <= 20_000 for n in args.peer_counts):
        parser.error("--peers: each count must be between 1 and 20000")
    if not 1 <= args.rounds <= 19 or args.rounds % 2 == 0:
        parser.error(
            f"--rounds: {args.rounds} is not an odd number from 1 to 19 (with an odd count the "
            "median is one round's ratio, the same whichever way the ratio is taken)"
        )
    return args


def hard_limit_s(args: argparse.Namespace) -> float:
    """Seconds after which the run is stopped as hung: per round, each of the five targets'
    measurements (two TCP, one UDP) plus HARD_LIMIT_PER_TUNNEL for its set-up, pings and
    pauses; then each peer-count start's idling, and HARD_LIMIT_BASE for every four starts
    (950 s for the defaults, which took about 500 s)."""
    per_round = 5 * (2 * args.seconds + args.udp_seconds + HARD_LIMIT_PER_TUNNEL)
    starts = len(args.peer_counts) + (args.peer_samples - 1) * (MANY_PEERS_GOAL in args.peer_counts)
    return HARD_LIMIT_BASE * (1 + starts / 4) + starts * args.idle + args.rounds * per_round


def main() -> int:
    args = _parse_args()
    if os.geteuid() != 0:
        print("bench/tunnel.py: needs root (network namespaces, TUN)", file=sys.stderr)
        return 1

    t_start = time.monotonic()
    hard_limit = hard_limit_s(args)

    def say(message: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {message}", file=sys.stderr, flush=True)

    def _alarm(signum: int, frame: Any) -> None:
        raise Deadline(f"bench/tunnel.py: hard limit of {hard_limit:.0f} s reached")

    def _terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwind through the `with` block: teardown runs

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(hard_limit))
    harness.cleanup_orphans()

    command = shlex.join([sys.executable, *sys.argv])
    machine = _machine()
    say(
        f"wireguard-go first on PATH: {machine['wireguard-go_path'] or 'none'}"
        f" ({machine['wireguard-go'] or 'no version'})"
    )
    source = _source()
    results: dict[str, Any] = {
        "command": command,
        "source": source,
        "machine": machine,
        "config": {
            "tcp_seconds": args.seconds,
            "udp_seconds": args.udp_seconds,
            "idle_seconds": args.idle,
            "underlay_mtu": 1500,
            "other_tunnels_mtu": TUNNEL_MTU,
            "ping": "50 x 20 ms",
            "rounds": args.rounds,
        },
        "targets": {},
        "rounds": [],
        "many_peers": [],
    }
    try:
        with harness.Net() as net:
            a, b = net.pair(start=False)  # the one veth pair every measurement uses
            say(f"namespaces {a.ns} <-> {b.ns}, veth MTU 1500")
            for i in range(args.rounds):
                if args.rounds > 1:
                    say(f"round {i + 1} of {args.rounds}")
                with _round_workdir(net, i):
                    results["rounds"].append(run_round(net, a, b, args, say, i))
            for count in args.peer_counts:
                for sample in range(args.peer_samples if count == MANY_PEERS_GOAL else 1):
                    results["many_peers"].append(run_many_peers(net, count, args.idle, say, sample))
    finally:
        signal.alarm(0)
    results["targets"], results["round_notes"] = aggregate(results["rounds"])
    results["elapsed_s"] = round(time.monotonic() - t_start, 1)
    results["goals"] = goals_json(results)

    print(f"command: {command}")
    print(
        f"source: commit {source['commit'] or 'unknown'}"
        + (" with uncommitted changes" if source["dirty"] else "")
    )
    print(
        f"machine: {machine['cores']} cores, {machine['cpu']} "
        f"({' '.join(machine['cpu_flags']) or 'no AVX2'}), Linux {machine['kernel']}, "
        f"Python {machine['python']}, {machine['iperf3']}"
    )
    print(
        f"wireguard-go: {machine['wireguard-go'] or 'not installed'}"
        f" ({machine['wireguard-go_path'] or '-'}); tinc: {machine['tinc'] or '-'}; "
        f"nebula: {machine['nebula'] or '-'}"
    )
    print(
        f"setup: veth MTU 1500; iperf3 TCP {args.seconds:.0f} s, UDP {args.udp_seconds:.0f} s"
        + (f", median of {args.rounds} rounds; " if args.rounds > 1 else "; ")
        + f"secureiod defaults (offload on, tunnel MTU "
        f"{get(results['targets']['secureiod'], 'mtu')}, crypto "
        f"{get(results['targets']['secureiod'], 'crypto') or '-'}), "
        f"other tunnels MTU {TUNNEL_MTU}; "
        "CPU 100 % = one core; load average at start "
        + ", ".join(f"{x:.2f}" for x in machine["load_avg_at_start"])
    )
    print()
    print(tables(results))
    print()
    if per_round := rounds_table(results):
        print(per_round)
        print()
    print(goals_table(results))
    print()
    print(f"total {results['elapsed_s']:.0f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(f"results written to {args.json}")
    problem = write_chart(results, args.chart)
    print(f"chart not drawn: {problem}" if problem else f"chart written to {args.chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
