"""``secureioctl`` subcommands that talk to a running daemon or manage keys:
``status``, ``peers``, ``show``, ``showconf``, ``metrics``, ``reload``, ``genkey``, ``pubkey``.

Output is meant for people (like ``wg show``) unless ``--json`` asks for the daemon's
answer as it is, for scripts and tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..control import ControlError, request, shorten
from ..paths import RUN_DIR, control_socket_path
from ..secureio.errors import IdentityError
from ..secureio.identity import Identity, load_identity, resolve_public_key, write_identity_file
from . import EXIT_FAILURE, CliError

DEFAULT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Subcommand:
    NAME: str
    HELP: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _socket_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("-i", "--interface", metavar="IFNAME", help="the daemon's interface")
    where.add_argument("--socket", metavar="PATH", type=Path, help="the control socket")
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        help=f"give up when the daemon has not answered in time (default {DEFAULT_TIMEOUT:g})",
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text} is out of range; use 0 < SECONDS <= 3600")
    return value


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return args.socket
    if args.interface:
        return control_socket_path(args.interface)
    sockets = sorted(RUN_DIR.glob("*.sock")) if RUN_DIR.is_dir() else []
    if len(sockets) == 1:
        return sockets[0]
    if not sockets:
        raise CliError(f"no daemon control socket in {RUN_DIR}; is secureiod running?", 1)
    names = ", ".join(p.stem for p in sockets)
    raise CliError(f"several daemons are running ({names}); choose one with -i IFNAME")


def _ask(args: argparse.Namespace, command: str, path: Path | None = None) -> Any:
    try:
        return request(path or _socket_path(args), command, timeout=args.timeout)
    except ControlError as exc:
        raise CliError(str(exc), EXIT_FAILURE) from None


def _show(args: argparse.Namespace, command: str, render: Callable[[Any], list[str]]) -> int:
    """Ask the daemon and print its answer: as JSON with ``--json``, else rendered for
    people. The whole text is rendered before anything is printed, so an answer without
    the expected shape (a daemon of another version) is one error line and no half
    output, not a traceback from deep inside the printer."""
    result = _ask(args, command)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    lines = _rendered(command, render, result)
    if lines:
        print("\n".join(lines))
    return 0


def _rendered(command: str, render: Callable[[Any], list[str]], result: Any) -> list[str]:
    try:
        return render(result)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        detail = f"missing {shorten(exc, 60)}" if isinstance(exc, KeyError) else shorten(exc, 80)
        raise CliError(
            f"the daemon's answer to {command!r} is not in the expected form ({detail}); "
            "is secureioctl the same version as secureiod? (--json shows the raw answer)",
            EXIT_FAILURE,
        ) from None


def _text(args: argparse.Namespace, command: str) -> int:
    """Print a daemon's answer that is text already (``metrics``, ``showconf``)."""
    result = _ask(args, command)
    if not isinstance(result, str):
        raise CliError(
            f"the daemon's answer to {command!r} is not text; is secureioctl the same "
            "version as secureiod?",
            EXIT_FAILURE,
        )
    sys.stdout.write(result if result.endswith("\n") or not result else result + "\n")
    return 0


def _json_flag(parser: argparse.ArgumentParser) -> None:
    _socket_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the raw answer as JSON")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{n} B"


def _ago(wall: float | None) -> str:
    if wall is None:
        return "never"
    seconds = max(0, int(time.time() - wall))
    return f"{seconds} second{'s' if seconds != 1 else ''} ago"


def _status(args: argparse.Namespace) -> int:
    return _show(args, "status", _render_status)


def _render_status(result: dict[str, Any]) -> list[str]:
    lines = [
        f"interface: {result['interface']}",
        f"  public key: {result['public_key']}",
        f"  listening: {result['listen']} (port {result['listen_port']})",
        f"  mtu: {result['mtu']} ({result['mtu_mode']})",
        f"  addresses: {', '.join(result['addresses'])}",
        f"  peers: {result['peers_established']}/{result['peers_total']} established",
    ]
    # newer fields: a daemon of an older version leaves them out
    if result.get("gso_max_size") is not None:
        lines.insert(4, f"  segment size (gso_max_size): {result['gso_max_size']}")
    if "lone_hop" in result:
        hop = result["lone_hop"]
        lines.append(
            "  lone-packet hop: off"
            if hop is None
            else f"  lone-packet hop: {hop['sends']} sent, {hop['receives']} received, "
            f"{hop['handed_back'] + hop['receive_handed_back']} handed back"
        )
    return lines


def _peers(args: argparse.Namespace) -> int:
    return _show(args, "peers", _render_peers)


def _render_peers(result: list[dict[str, Any]]) -> list[str]:
    if not isinstance(result, list):
        raise TypeError("expected a list of peers")
    lines: list[str] = []
    for i, p in enumerate(result):
        if i:
            lines.append("")
        lines += [
            f"peer: {p['name']}",
            f"  public key: {p['public_key']}",
            f"  endpoint: {p['endpoint'] or '(none)'}",
        ]
        if p.get("endpoint_name"):
            lines.append(f"  endpoint name: {p['endpoint_name']} ({_resolve_state(p)})")
        lines += [
            f"  allowed ips: {', '.join(p['allowed_ips'])}",
            f"  state: {p['state']}",
            f"  latest handshake: {_ago(p['latest_handshake'])}",
            f"  payload size: {p['payload_size']}, route mtu: {p['mtu'] or '(pending)'}",
            f"  transfer: {_size(p['rx_bytes'])} received ({p['rx_packets']} packets), "
            f"{_size(p['tx_bytes'])} sent ({p['tx_packets']} packets)",
        ]
        drops = {**p.get("drops", {}), **p.get("session_drops", {})}
        if drops:
            lines.append("  drops: " + ", ".join(f"{k}={v}" for k, v in sorted(drops.items())))
    return lines


def _resolve_state(peer: dict[str, Any]) -> str:
    """Where resolving a peer's endpoint name stands: ``ok; again in N s``,
    ``resolving``, ``failed: <why>; retry in N s``. While the session is established the
    daemon does not look the name up (the endpoint is proven by the traffic); it does
    again as soon as the session fails, and that is what is shown then."""
    r = peer.get("resolve") or {}
    state = str(r.get("state", "unknown"))
    if r.get("error"):
        state += f": {r['error']}"
    if state == "resolving":
        return state
    if peer.get("established"):
        state += "; looked up again if the session fails"
    elif r.get("next_in") is not None:
        state += f"; {'retry' if r.get('error') else 'again'} in {float(r['next_in']):.0f} s"
    return state


def _show_all(args: argparse.Namespace) -> int:
    """``show``: status and peers of one daemon (``-i``/``--socket``), or of every daemon
    with a control socket in the runtime directory, like ``wg show all``. A daemon that
    does not answer is one error line on stderr; the others are still shown (exit 1).
    No daemon running is not an error (nothing to show, ``{}`` with ``--json``), so scripts
    and monitoring can run it unconditionally; a named interface that is not running is."""
    if args.socket is not None or args.interface:
        targets = [_socket_path(args)]
    else:
        targets = sorted(RUN_DIR.glob("*.sock")) if RUN_DIR.is_dir() else []
    shown: dict[str, Any] = {}
    blocks: list[list[str]] = []
    failed = 0
    for path in targets:
        name = path.stem
        try:
            status = _ask(args, "status", path)
            peers = _ask(args, "peers", path)
            if args.socket is not None and isinstance(status, dict):
                name = str(status.get("interface", name))  # else the socket names it
            lines = _rendered("status", _render_status, status)
            peer_lines = _rendered("peers", _render_peers, peers)
        except CliError as exc:
            if len(targets) == 1:
                raise
            failed += 1
            print(f"secureioctl show: error: {name}: {exc}", file=sys.stderr)
            shown[name] = {"error": str(exc)}
            continue
        shown[name] = {"status": status, "peers": peers}
        blocks.append([*lines, "", *peer_lines] if peer_lines else lines)
    if args.json:
        print(json.dumps(shown, indent=2))
    elif blocks:
        print("\n\n".join("\n".join(block) for block in blocks))
    return EXIT_FAILURE if failed else 0


def _show_arguments(parser: argparse.ArgumentParser) -> None:
    _json_flag(parser)
    parser.description = (
        "Show the interface and its peers; without -i or --socket, every running "
        f"interface (every control socket in {RUN_DIR})."
    )


def _metrics(args: argparse.Namespace) -> int:
    return _text(args, "metrics")


def _showconf(args: argparse.Namespace) -> int:
    return _text(args, "showconf")


def _reload(args: argparse.Namespace) -> int:
    return _show(args, "reload", _render_reload)


def _render_reload(result: dict[str, Any]) -> list[str]:
    """The daemon's own sentence, the one it logs (``--json`` has the lists)."""
    summary = result["summary"]
    if not isinstance(summary, str):
        raise TypeError("'summary' is not text")
    return [summary]


def _genkey_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="private key file to write (PATH.pub too)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing key")


def _genkey(args: argparse.Namespace) -> int:
    identity = Identity.generate()
    try:
        write_identity_file(args.path, identity, overwrite=args.force)
    except IdentityError as exc:
        raise CliError(str(exc)) from None
    print(identity.public_key)
    return 0


def _pubkey_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a private key (file or identity dir) or a public key")
    parser.add_argument("--format", choices=("base64", "pem"), default="base64", help="output form")


def _pubkey(args: argparse.Namespace) -> int:
    try:
        try:
            public = load_identity(args.path).public_key
        except IdentityError:
            public = resolve_public_key(args.path)
    except IdentityError as exc:
        raise CliError(str(exc)) from None
    print(public.to_pem().rstrip("\n") if args.format == "pem" else public)
    return 0


STATUS = Subcommand("status", "show the daemon's interface and peer counts", _json_flag, _status)
PEERS = Subcommand("peers", "show every peer: state, endpoint, MTU, counters", _json_flag, _peers)
RELOAD = Subcommand("reload", "re-read the config and apply the difference", _json_flag, _reload)
SHOW = Subcommand(
    "show",
    "show interfaces and their peers (all running ones without -i)",
    _show_arguments,
    _show_all,
)
SHOWCONF = Subcommand(
    "showconf",
    "print the running config as TOML (secret file paths, never their contents)",
    _socket_arguments,
    _showconf,
)
METRICS = Subcommand(
    "metrics", "print the daemon's Prometheus metrics (text format)", _socket_arguments, _metrics
)
GENKEY = Subcommand(
    "genkey",
    "write a new identity (PATH, PATH.pub) and print its public key",
    _genkey_arguments,
    _genkey,
)
PUBKEY = Subcommand("pubkey", "print the public key of a key file", _pubkey_arguments, _pubkey)
ALL = (STATUS, PEERS, SHOW, SHOWCONF, METRICS, RELOAD, GENKEY, PUBKEY)
