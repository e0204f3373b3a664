"""The tables ``bench/tunnel.py`` prints, and issue 13's goals checked against one run.

The goals are judged only from the numbers of the same run (ratios to the wireguard-go that
ran beside secureiod on the same veth), because absolute figures change with the machine and
its load while ratios taken minutes apart on the same box mostly do not.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

TUNNELS = ("veth", "secureiod", "wireguard-go", "tinc", "nebula")
COMPARED = ("veth", "wireguard-go", "tinc", "nebula")
MANY_PEERS_GOAL = 10_000
# issue 13 "Goal": the wireguard-go the goals were set against (older builds lack batching)
GOAL_WG_VERSION = "0.0.20250522"


def get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:,.{digits}f}"


def _num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def ratio(x: Any, y: Any) -> float | None:
    if not _num(x) or not _num(y) or not y:
        return None
    return float(x / y)


# -- rows ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One measurement: its label, how to read its number (for ratios and the chart) and
    how to show it (a pair A / B, or A + B, says more than the sum alone)."""

    key: str
    label: str
    value: Callable[[Any], float | None]
    shown: Callable[[Any], str]
    better: str  # "higher" or "lower": which way is good, for the chart's caption


def _plain(path: tuple[str, ...], digits: int) -> tuple[Callable[[Any], Any], Callable[[Any], str]]:
    return (lambda t: get(t, *path)), (lambda t: fmt(get(t, *path), digits))


def _cpu_sum(t: Any, key: str) -> float | None:
    c = get(t, key, "cpu")
    return float(c["A"] + c["B"]) if c else None


def _cpu_shown(t: Any, key: str) -> str:
    c = get(t, key, "cpu")
    return f"{c['A']:.0f} + {c['B']:.0f}" if c else "-"


def cpu_per_gbit(t: Any, key: str) -> float | None:
    """CPU % (A + B) per Gbit/s delivered: the cost of a bit, whatever the speed reached."""
    total, mbit = _cpu_sum(t, key), get(t, key, "mbit_s")
    if total is None or not _num(mbit) or not mbit:
        return None
    return round(total / (mbit / 1000), 1)


def _mem_sum(t: Any, field: str) -> float | None:
    m = get(t, "mem_kib")
    return (m["A"][field] + m["B"][field]) / 1024 if m else None


def _mem_shown(t: Any, field: str) -> str:
    m = get(t, "mem_kib")
    return f"{m['A'][field] / 1024:.1f} / {m['B'][field] / 1024:.1f}" if m else "-"


def _rows() -> list[Row]:
    rows = [
        Row("tcp1", "TCP, 1 stream (Mbit/s)", *_plain(("tcp1", "mbit_s"), 0), "higher"),
        Row("tcp4", "TCP, 4 streams (Mbit/s)", *_plain(("tcp4", "mbit_s"), 0), "higher"),
        Row(
            "udp64",
            "UDP 64 B delivered (datagrams/s)",
            *_plain(("udp64", "delivered_pps"), 0),
            "higher",
        ),
        Row("udp64_loss", "UDP 64 B loss (%)", *_plain(("udp64", "lost_percent"), 1), "lower"),
        Row(
            "udp64_lost_tun",
            "UDP 64 B lost at A's tunnel device queue (% of sent)",
            *_plain(("udp64", "lost_where_percent", "at_A_tunnel_device"), 1),
            "lower",
        ),
        Row(
            "udp64_lost_rcvbuf",
            "UDP 64 B dropped at full UDP sockets in B, any socket (% of sent)",
            *_plain(("udp64", "lost_where_percent", "B_udp_rcvbuf"), 1),
            "lower",
        ),
        Row(
            "ping",
            "ping RTT avg, 50 pings 20 ms apart (ms)",
            *_plain(("ping", "avg_ms"), 3),
            "lower",
        ),
    ]
    for key, what in (("tcp1", "TCP 1 stream"), ("tcp4", "TCP 4 streams")):
        rows.append(
            Row(
                f"cpu_per_gbit_{key}",
                f"CPU % A + B per Gbit/s, {what}",
                lambda t, key=key: cpu_per_gbit(t, key),
                lambda t, key=key: fmt(cpu_per_gbit(t, key), 1),
                "lower",
            )
        )
    for key, what in (
        ("tcp1", "TCP 1 stream"),
        ("tcp4", "TCP 4 streams"),
        ("udp64", "UDP 64 B"),
        ("ping", "ping"),
    ):
        rows.append(
            Row(
                f"cpu_{key}",
                f"CPU % A + B during {what}",
                lambda t, key=key: _cpu_sum(t, key),
                lambda t, key=key: _cpu_shown(t, key),
                "lower",
            )
        )
    for field, label in (("VmRSS", "VmRSS A / B (MiB)"), ("VmHWM", "VmHWM (peak) A / B (MiB)")):
        rows.append(
            Row(
                field.lower(),
                label,
                lambda t, field=field: _mem_sum(t, field),
                lambda t, field=field: _mem_shown(t, field),
                "lower",
            )
        )
    return rows


ROWS = _rows()


def tables(results: dict[str, Any]) -> str:
    """Raw numbers per tunnel, then secureiod's ratio to each other tunnel, then the
    many-peers table; a skipped tunnel keeps its column (all "-") and gets a line."""
    t = results["targets"]
    present = [n for n in TUNNELS if n in t]
    lines = [
        "| measurement | " + " | ".join(present) + " |",
        "|---|" + "---:|" * len(present),
    ]
    for row in ROWS:
        lines.append(f"| {row.label} | " + " | ".join(row.shown(t[n]) for n in present) + " |")
    others = [n for n in COMPARED if n in t]
    lines += [
        "",
        "| secureiod / ... | " + " | ".join(others) + " |",
        "|---|" + "---:|" * len(others),
    ]
    for row in ROWS:
        sio = row.value(t.get("secureiod"))
        cells = [fmt(ratio(sio, row.value(t[n])), 2) for n in others]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    if len(results.get("rounds") or []) > 1:
        lines.append(
            "\n(ratios of each tunnel's median round, which may come from different rounds; "
            "the goals use each round's own ratio, in the per-round table)"
        )
    skipped = [f"{n}: skipped ({t[n]['skipped']})" for n in present if get(t[n], "skipped")]
    if skipped:
        lines += ["", *skipped]
    lines += ["", many_peers_table(results)]
    return "\n".join(lines)


def many_peers_table(results: dict[str, Any]) -> str:
    idle = results["config"]["idle_seconds"]
    lines = [
        "| secureiod, peers without endpoints | ready after (s) | VmRSS (MiB) "
        f"| VmHWM (MiB) | idle CPU % (over {idle:.0f} s) |",
        "|---:|---:|---:|---:|---:|",
    ]
    samples = results["many_peers"]
    for i, p in enumerate(samples):
        if p.get("error"):
            lines.append(f"| {p['peers']} | failed: {p['error'][:120]} | - | - | - |")
        else:
            lines.append(
                f"| {p['peers']} | {p['ready_s']:.2f} | {p['mem_kib']['VmRSS'] / 1024:.1f} "
                f"| {p['mem_kib']['VmHWM'] / 1024:.1f} | {p['idle_cpu_percent']:.1f} |"
            )
        last_of_goal = p["peers"] == MANY_PEERS_GOAL and (
            i + 1 == len(samples) or samples[i + 1]["peers"] != MANY_PEERS_GOAL
        )
        if last_of_goal:  # once, under the last of its starts (the goals take the worst)
            lines.append(f"| goal for {MANY_PEERS_GOAL:,} (issue 13) | < 5 | < 150 | - | < 1 |")
    return "\n".join(lines)


# -- rounds ---------------------------------------------------------------------------------


def rounds_table(results: dict[str, Any]) -> str:
    """secureiod / wireguard-go in each round and from the reported medians, so a reader
    sees how far one round's ratio strays; "" for a one-round run (nothing to spread)."""
    rounds = results.get("rounds") or []
    if len(rounds) < 2:
        return ""
    lines = [
        "| secureiod / wireguard-go | "
        + " | ".join(f"round {i + 1}" for i in range(len(rounds)))
        + " | median |",
        "|---|" + "---:|" * (len(rounds) + 1),
    ]
    for label, ratio_in in (
        ("TCP 1", _measured("tcp1", "mbit_s")),
        ("TCP 4", _measured("tcp4", "mbit_s")),
        ("UDP 64 B", _measured("udp64", "delivered_pps")),
        ("ping", _measured("ping", "avg_ms")),
        ("CPU per Gbit/s, TCP 1", _cpu_ratio("tcp1")),
        ("CPU per Gbit/s, TCP 4", _cpu_ratio("tcp4")),
    ):
        cells = [fmt(ratio_in(r), 2) for r in rounds]
        cells.append(fmt(paired_ratio(results, ratio_in), 2))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(
        "\na round's ratio pairs the two tunnels measured in that round; the goals take the "
        "median of these; the tables above show each tunnel's median round"
    )
    lines += results.get("round_notes") or []
    return "\n".join(lines)


# -- goals ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    goal: str
    value: float | None  # the measured ratio or figure; None when it could not be measured
    target: str
    met: bool | None  # None: not measured (a tunnel skipped, a measurement failed)
    rounds_met: tuple[int, int] | None = None
    """(rounds whose own ratio meets the target, rounds with a ratio), for a ratio goal of a
    run in rounds: how firm the verdict is (three rounds resolve about ±15 %)."""


def _round_verdicts(
    results: dict[str, Any],
    ratio_in: Callable[[dict[str, Any]], float | None],
    ok: Callable[[float], bool],
) -> tuple[int, int] | None:
    rounds = results.get("rounds") or []
    if len(rounds) < 2:
        return None
    values = [v for r in rounds if (v := ratio_in(r)) is not None]
    return (sum(1 for v in values if ok(v)), len(values))


def _ratio_goal(
    results: dict[str, Any],
    goal: str,
    ratio_in: Callable[[dict[str, Any]], float | None],
    target: str,
    ok: Callable[[float], bool],
) -> Goal:
    """A secureiod / wireguard-go goal: judged on ``paired_ratio``, with how many rounds
    met it on their own."""
    checked = _check(goal, paired_ratio(results, ratio_in), target, ok)
    return Goal(
        checked.goal,
        checked.value,
        checked.target,
        checked.met,
        _round_verdicts(results, ratio_in, ok),
    )


def _check(goal: str, value: float | None, target: str, ok: Callable[[float], bool]) -> Goal:
    rounded = round(value, 3) if value is not None else None
    return Goal(goal, rounded, target, ok(value) if value is not None else None)


def _measured(key: str, field: str) -> Callable[[dict[str, Any]], float | None]:
    """secureiod / wireguard-go for one number of one measurement, in a set of targets."""

    def ratio_in(t: dict[str, Any]) -> float | None:
        return ratio(get(t.get("secureiod"), key, field), get(t.get("wireguard-go"), key, field))

    return ratio_in


def _cpu_ratio(key: str) -> Callable[[dict[str, Any]], float | None]:
    def ratio_in(t: dict[str, Any]) -> float | None:
        sio, wg = t.get("secureiod"), t.get("wireguard-go")
        return ratio(cpu_per_gbit(sio, key), cpu_per_gbit(wg, key))

    return ratio_in


def paired_ratio(
    results: dict[str, Any], ratio_in: Callable[[dict[str, Any]], float | None]
) -> float | None:
    """The run's secureiod / wireguard-go ratio for a goal. With several rounds: the median
    of the rounds' own ratios, each pairing the two tunnels measured within a round (a
    minute or two apart, so the box's drift cancels), not the ratio of the two tunnels'
    median rounds, which may come from different rounds and pair a fast moment of one with a
    slow moment of the other. One round: its ratio."""
    rounds = results.get("rounds") or []
    if len(rounds) < 2:
        return ratio_in(results["targets"])
    values = [v for r in rounds if (v := ratio_in(r)) is not None]
    return statistics.median(values) if values else None


def goals(results: dict[str, Any]) -> list[Goal]:
    """Issue 13's goals from this run's own numbers; see the issue for why each one."""
    out = [
        _ratio_goal(
            results,
            "TCP 1 stream, secureiod / wireguard-go",
            _measured("tcp1", "mbit_s"),
            "≥ 1.2",
            lambda v: v >= 1.2,
        ),
        _ratio_goal(
            results,
            "TCP 4 streams, secureiod / wireguard-go",
            _measured("tcp4", "mbit_s"),
            "≥ 1.2",
            lambda v: v >= 1.2,
        ),
        _ratio_goal(
            results,
            "ping RTT avg (20 ms apart), secureiod / wireguard-go",
            _measured("ping", "avg_ms"),
            "≤ 1.0",
            lambda v: v <= 1.0,
        ),
        _ratio_goal(
            results,
            "UDP 64 B delivered, secureiod / wireguard-go",
            _measured("udp64", "delivered_pps"),
            "≥ 3",
            lambda v: v >= 3.0,
        ),
    ]
    for key, what in (("tcp1", "1 stream"), ("tcp4", "4 streams")):
        out.append(
            _ratio_goal(
                results,
                f"CPU % per Gbit/s during TCP {what}, secureiod / wireguard-go",
                _cpu_ratio(key),
                "≤ 1.0",
                lambda v: v <= 1.0,
            )
        )
    out += _many_peers_goals(results)
    return out


def _many_peers_goals(results: dict[str, Any]) -> list[Goal]:
    """The 10,000-peer goals, judged on the worst of the run's starts with that many peers
    (``--peer-samples``: one start is one sample of a noisy box, and a goal met only by
    the luckier start is not met), with how many of the starts met each on its own. A
    start that failed makes every one of these "not measured"."""
    samples = [p for p in results["many_peers"] if p["peers"] == MANY_PEERS_GOAL]
    # a start that answered ``status`` with fewer peers than configured did not load them
    # all: not a sample of this many peers, so as good as a failed start
    samples = [
        p
        if p.get("error") or p.get("peers_total", p["peers"]) == p["peers"]
        else p | {"error": f"only {p['peers_total']} of {p['peers']} peers loaded"}
        for p in samples
    ]
    specs: list[tuple[str, Callable[[Any], float | None], str, Callable[[float], bool]]] = [
        ("ready after (s)", lambda p: get(p, "ready_s"), "< 5", lambda v: v < 5),
        (
            "VmRSS (MiB)",
            lambda p: rss / 1024 if (rss := get(p, "mem_kib", "VmRSS")) is not None else None,
            "< 150",
            lambda v: v < 150,
        ),
        ("idle CPU %", lambda p: get(p, "idle_cpu_percent"), "< 1", lambda v: v < 1),
    ]
    out = []
    for label, value_of, target, ok in specs:
        values = [value_of(p) for p in samples]
        usable = (
            bool(values)
            and not any(p.get("error") for p in samples)
            and all(v is not None for v in values)
        )
        worst = max(v for v in values if v is not None) if usable else None
        checked = _check(f"{MANY_PEERS_GOAL:,} peers: {label}", worst, target, ok)
        tally = (
            (sum(1 for v in values if v is not None and ok(v)), len(values))
            if usable and len(values) > 1
            else None
        )
        out.append(Goal(checked.goal, checked.value, checked.target, checked.met, tally))
    return out


def goals_table(results: dict[str, Any]) -> str:
    version = get(results, "targets", "wireguard-go", "version") or "not run"
    lines = [
        f"goals of issue 13 (ratios against the wireguard-go of this run: {version})",
        "",
        "| goal | this run | target | | rounds (or starts) that met it |",
        "|---|---:|---:|---|---:|",
    ]
    for g in results["goals"]:
        verdict = {True: "met", False: "not met", None: "not measured"}[g["met"]]
        tally = g.get("rounds_met")
        rounds = f"{tally[0]} of {tally[1]}" if tally else "-"
        lines.append(
            f"| {g['goal']} | {fmt(g['value'], 2)} | {g['target']} | {verdict} | {rounds} |"
        )
    if version != "not run" and GOAL_WG_VERSION not in version:
        lines.append(
            f"\nnote: the goals are set against wireguard-go {GOAL_WG_VERSION}; builds before "
            "2023 lack its batching and offload, so ratios against them flatter secureiod"
        )
    return "\n".join(lines)


def goals_json(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [asdict(g) for g in goals(results)]
