"""``secureioctl`` subcommands that talk to a running daemon or manage keys:
``status``, ``peers``, ``reload``, ``genkey``, ``pubkey``.

Output is meant for people (like ``wg show``) unless ``--json`` asks for the daemon's
answer as it is, for scripts and tests.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..control import ControlError, default_socket_path, request
from ..secureio.errors import IdentityError
from ..secureio.identity import Identity, load_identity, resolve_public_key, write_identity_file
from . import CliError

RUN_DIR = Path("/run/secureiod")


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


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return args.socket
    if args.interface:
        return default_socket_path(args.interface)
    sockets = sorted(RUN_DIR.glob("*.sock")) if RUN_DIR.is_dir() else []
    if len(sockets) == 1:
        return sockets[0]
    if not sockets:
        raise CliError(f"no daemon control socket in {RUN_DIR}; is secureiod running?", 1)
    names = ", ".join(p.stem for p in sockets)
    raise CliError(f"several daemons are running ({names}); choose one with -i IFNAME")


def _ask(args: argparse.Namespace, command: str) -> Any:
    try:
        return request(_socket_path(args), command)
    except ControlError as exc:
        raise CliError(str(exc), 1) from None


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
    result = _ask(args, "status")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"interface: {result['interface']}")
    print(f"  public key: {result['public_key']}")
    print(f"  listening: {result['listen']} (port {result['listen_port']})")
    print(f"  mtu: {result['mtu']} ({result['mtu_mode']})")
    print(f"  addresses: {', '.join(result['addresses'])}")
    print(f"  peers: {result['peers_established']}/{result['peers_total']} established")
    return 0


def _peers(args: argparse.Namespace) -> int:
    result = _ask(args, "peers")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for i, p in enumerate(result):
        if i:
            print()
        print(f"peer: {p['name']}")
        print(f"  public key: {p['public_key']}")
        print(f"  endpoint: {p['endpoint'] or '(none)'}")
        print(f"  allowed ips: {', '.join(p['allowed_ips'])}")
        print(f"  state: {p['state']}")
        print(f"  latest handshake: {_ago(p['latest_handshake'])}")
        print(f"  payload size: {p['payload_size']}, route mtu: {p['mtu'] or '(pending)'}")
        print(
            f"  transfer: {_size(p['rx_bytes'])} received ({p['rx_packets']} packets), "
            f"{_size(p['tx_bytes'])} sent ({p['tx_packets']} packets)"
        )
        drops = {**p.get("drops", {}), **p.get("session_drops", {})}
        if drops:
            print("  drops: " + ", ".join(f"{k}={v}" for k, v in sorted(drops.items())))
    return 0


def _reload(args: argparse.Namespace) -> int:
    result = _ask(args, "reload")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for what in ("added", "removed", "changed"):
        if result.get(what):
            print(f"{what}: {', '.join(result[what])}")
    print(f"unchanged: {len(result.get('unchanged', []))} peer(s) kept their sessions")
    return 0


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
GENKEY = Subcommand(
    "genkey",
    "write a new identity (PATH, PATH.pub) and print its public key",
    _genkey_arguments,
    _genkey,
)
PUBKEY = Subcommand("pubkey", "print the public key of a key file", _pubkey_arguments, _pubkey)
ALL = (STATUS, PEERS, RELOAD, GENKEY, PUBKEY)
