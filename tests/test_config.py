"""Tests of the TOML config: the one-line error for each kind of mistake, the examples in
config/, and the diff a reload is built on.

Every error test compares the whole message, because the message *is* the interface: it is
all an administrator sees when the daemon refuses a file.
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import json
import logging
import os
import random
import re
import struct
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from secureiod import paths
from secureiod.config import (
    RELOADABLE_INTERFACE_FIELDS,
    RESTART_INTERFACE_FIELDS,
    Config,
    ConfigError,
    InterfaceSchema,
    PeerSchema,
    SocketAddress,
    check_config,
    diff_config,
    load_config,
    restart_required,
)
from secureiod.secureio.identity import Identity, PublicKey, write_identity

EXAMPLES = Path(__file__).resolve().parent.parent / "config"
TUNNEL_V4 = ipaddress.ip_network("198.19.0.0/16")
TUNNEL_V6 = ipaddress.ip_network("fd00:5ec::/48")

# --- building config files --------------------------------------------------------------------


def _toml(value: object) -> str:
    """TOML for the values a config holds; JSON strings are valid TOML basic strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    raise TypeError(value)


def render(interface: dict[str, Any] | None, peers: list[dict[str, Any]]) -> str:
    """A config file from dicts; a value of None leaves the key out."""
    lines: list[str] = []
    if interface is not None:
        lines.append("[interface]")
        lines += [f"{k} = {_toml(v)}" for k, v in interface.items() if v is not None]
    for peer in peers:
        lines += ["", "[[peer]]"]
        lines += [f"{k} = {_toml(v)}" for k, v in peer.items() if v is not None]
    return "\n".join(lines) + "\n"


def ssh_line(key: PublicKey, comment: str = "user@host") -> str:
    blob = struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 32) + key.raw
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} {comment}"


@dataclasses.dataclass
class Site:
    """A directory with our identity (``id/id_ed25519``), three peers' key pairs, and the
    config file under test (``sio0.toml``)."""

    dir: Path
    me: Identity
    keys: dict[str, Identity]

    @property
    def path(self) -> Path:
        return self.dir / "sio0.toml"

    @property
    def key_file(self) -> Path:
        return self.dir / "id" / "id_ed25519"

    def interface(self, **changes: Any) -> dict[str, Any]:
        base: dict[str, Any] = {
            "name": "sio0",
            "private_key": "id/id_ed25519",
            "address": ["198.19.0.1/24", "fd00:5ec::1/64"],
        }
        return {**base, **changes}

    def peer(self, which: str, /, **changes: Any) -> dict[str, Any]:
        """Peer ``b``, ``c`` or ``d``: its own key, 198.19.0.N/32 and fd00:5ec::N/128."""
        number = {"b": 2, "c": 3, "d": 4}[which]
        base: dict[str, Any] = {
            "name": which,
            "public_key": str(self.keys[which].public_key),
            "allowed_ips": [f"198.19.0.{number}/32", f"fd00:5ec::{number}/128"],
        }
        return {**base, **changes}

    def write(
        self,
        interface: dict[str, Any] | None = None,
        peers: list[dict[str, Any]] | None = None,
        *,
        name: str = "sio0.toml",
    ) -> Path:
        path = self.dir / name
        text = render(
            self.interface() if interface is None else interface,
            [self.peer("b"), self.peer("c")] if peers is None else peers,
        )
        path.write_text(text)
        return path

    def write_psk(self, name: str, data: bytes, mode: int = 0o600) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        path.chmod(mode)
        return path


@pytest.fixture
def site(tmp_path: Path) -> Site:
    me = Identity.generate()
    write_identity(tmp_path / "id", me)
    keys = {name: Identity.generate() for name in ("b", "c", "d")}
    return Site(tmp_path, me, keys)


def error_of(path: Path | str) -> str:
    """The message of the ConfigError that loading ``path`` raises, checked to be one line
    that does not leak Python internals."""
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    assert "Traceback" not in message, message
    assert "pydantic" not in message.lower(), message
    assert "Schema" not in message, message
    return message


# --- the file itself --------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert error_of(path) == f"{path}: config file does not exist"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert error_of(tmp_path) == f"{tmp_path}: config file is a directory"


def test_config_file_permission_denied(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unreadable config file (faked: the suite runs as root, which reads any file)."""
    path = site.write()

    def refuse(self: Path, *args: object, **kwargs: object) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", refuse)
    monkeypatch.setattr(Path, "open", refuse)  # the loader reads through a bounded open()
    assert error_of(path) == f"{path}: cannot read the config file: permission denied"


def test_not_toml(site: Site) -> None:
    site.path.write_text('[interface]\nname "sio0"\n')
    assert error_of(site.path) == (
        f"{site.path}: invalid TOML: Expected '=' after a key in a key/value pair "
        "(at line 2, column 6)"
    )


def test_duplicate_toml_key_is_a_toml_error(site: Site) -> None:
    site.path.write_text('[interface]\nname = "a"\nname = "b"\n')
    assert error_of(site.path) == (
        f"{site.path}: invalid TOML: Cannot overwrite a value (at line 3, column 11)"
    )


def test_not_utf8(site: Site) -> None:
    site.path.write_bytes(b'[interface]\nname = "\xff"\n')
    assert error_of(site.path) == (
        f"{site.path}: config file is not UTF-8 text (bad byte at offset 20)"
    )


def test_path_may_be_a_string(site: Site) -> None:
    site.write()
    assert load_config(str(site.path)).interface.name == "sio0"


# --- unknown, missing and mistyped keys -------------------------------------------------------


def test_unknown_peer_key_with_suggestion(site: Site) -> None:
    site.write(peers=[site.peer("b", allowd_ips=["198.19.0.9/32"])])
    assert error_of(site.path) == (
        f'{site.path}: peer "b".allowd_ips: unknown key; did you mean allowed_ips?'
    )


def test_unknown_key_without_suggestion(site: Site) -> None:
    site.write(site.interface(colour="blue"))
    assert error_of(site.path) == f"{site.path}: interface.colour: unknown key"


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [("ListenPort", "listen"), ("PrivateKey", "private_key"), ("MTU", "mtu")],
)
def test_unknown_wireguard_key_suggests_ours(site: Site, key: str, suggestion: str) -> None:
    site.write(site.interface(**{key: 1}))
    assert error_of(site.path) == (
        f"{site.path}: interface.{key}: unknown key; did you mean {suggestion}?"
    )


def test_unknown_top_level_key(site: Site) -> None:
    site.path.write_text(render(site.interface(), []) + "\n[[peers]]\nname = 'b'\n")
    assert error_of(site.path) == f"{site.path}: peers: unknown key; did you mean peer?"


def test_missing_required_peer_key(site: Site) -> None:
    site.write(peers=[site.peer("b", public_key=None)])
    assert error_of(site.path) == f'{site.path}: peer "b".public_key: missing required key'


def test_missing_required_interface_key(site: Site) -> None:
    site.write(site.interface(private_key=None))
    assert error_of(site.path) == f"{site.path}: interface.private_key: missing required key"


def test_missing_interface_table(site: Site) -> None:
    site.path.write_text(render(None, [site.peer("b")]))
    assert error_of(site.path) == (
        f"{site.path}: interface: missing required table; add an [interface] section"
    )


def test_single_bracket_peer_table(site: Site) -> None:
    site.path.write_text(render(site.interface(), []) + '\n[peer]\nname = "b"\n')
    assert error_of(site.path) == (
        f"{site.path}: peer: expected an array, got table; "
        "write each peer as [[peer]] (double brackets)"
    )


def test_interface_that_is_not_a_table(site: Site) -> None:
    site.path.write_text('interface = "sio0"\n')
    assert error_of(site.path) == f'{site.path}: interface: expected a table, got string "sio0"'


_INTERFACE_VALUE_ERRORS = [
    ("mtu", "1400", 'expected "auto" or an integer 576..65535, got string "1400"'),
    ("mtu", True, 'expected "auto" or an integer 576..65535, got boolean true'),
    ("mtu", 500, '500 is out of range; use 576..65535 or "auto"'),
    ("mtu", 65536, '65536 is out of range; use 576..65535 or "auto"'),
    (
        "listen",
        5800,
        'expected a string address:port such as "0.0.0.0:5800" or "[::]:5800", got integer 5800',
    ),
    (
        "listen",
        "localhost:5800",
        '"localhost" is not an IP address; listen takes a local address such as '
        '"0.0.0.0:5800" or "[::]:5800"',
    ),
    (
        "listen",
        "0.0.0.0",
        'expected host:port such as "0.0.0.0:5800" or "[::]:5800", got "0.0.0.0"',
    ),
    ("listen", "0.0.0.0:0", 'port must be 1..65535, got "0"'),
    ("listen", "[::]:65536", 'port must be 1..65535, got "65536"'),
    (
        "listen",
        "[::1:5800",
        'expected host:port such as "0.0.0.0:5800" or "[::]:5800", got "[::1:5800"',
    ),
    ("key_update_interval", 0, "0 is not a positive number of seconds"),
    ("key_update_interval", float("inf"), "inf is not a positive number of seconds"),
    ("key_update_interval", "60", 'expected a number of seconds, got string "60"'),
    ("keepalive_timeout", -1.5, "-1.5 is not a positive number of seconds"),
    ("payload_size_limit", 100, "100 is out of range 147..65216"),
    ("payload_size_limit", 1392.0, "expected an integer 147..65216, got float 1392.0"),
    ("control_socket", "sio0.sock", '"sio0.sock" is not an absolute path'),
    (
        "control_socket",
        "/run/" + "x" * 120,
        "path is too long for a Unix socket (125 bytes, at most 107)",
    ),
    ("user", "bad user", '"bad user" is not a valid user name'),
    ("private_key", "", "path is empty"),
    ("private_key", 7, "expected a file path, got integer 7"),
    (
        "address",
        "198.19.0.1/24",
        'expected an array, got string "198.19.0.1/24"; write ["198.19.0.1/24"]',
    ),
]


@pytest.mark.parametrize(("key", "value", "message"), _INTERFACE_VALUE_ERRORS)
def test_bad_interface_value(site: Site, key: str, value: object, message: str) -> None:
    site.write(site.interface(**{key: value}))
    assert error_of(site.path) == f"{site.path}: interface.{key}: {message}"


_PEER_VALUE_ERRORS = [
    (
        "name",
        "b c",
        '"b c" is not a valid peer name; use 1 to 64 characters from A-Z a-z 0-9 _ . -',
    ),
    (
        "name",
        "x" * 65,
        f'"{"x" * 60}..." is not a valid peer name; use 1 to 64 characters from A-Z a-z 0-9 _ . -',
    ),
    ("public_key", "  ", "public key is empty"),
    (
        "public_key",
        ["AAAA"],
        'expected a public key (base64, "ssh-ed25519 AAAA...") or a .pub file path, got array',
    ),
    ("persistent_keepalive", 0, "0 is out of range 1..65535; leave the key out to disable it"),
    ("persistent_keepalive", 70000, "70000 is out of range 1..65535"),
    ("persistent_keepalive", "25", 'expected an integer 1..65535, got string "25"'),
    (
        "allowed_ips",
        "198.19.0.2/32",
        'expected an array, got string "198.19.0.2/32"; write ["198.19.0.2/32"]',
    ),
    ("psk_file", 1, "expected a file path, got integer 1"),
]


@pytest.mark.parametrize(("key", "value", "message"), _PEER_VALUE_ERRORS)
def test_bad_peer_value(site: Site, key: str, value: object, message: str) -> None:
    site.write(peers=[site.peer("b", **{key: value})])
    label = 'peer "b"' if key != "name" else "peer[0]"
    assert error_of(site.path) == f"{site.path}: {label}.{key}: {message}"


# --- addresses, networks and endpoints --------------------------------------------------------


def test_allowed_ips_host_bits_set(site: Site) -> None:
    site.write(peers=[site.peer("b", allowed_ips=["198.19.0.1/24"])])
    assert error_of(site.path) == (
        f'{site.path}: peer "b".allowed_ips[0]: 198.19.0.1/24 has host bits set; '
        "did you mean 198.19.0.0/24?"
    )


def test_allowed_ips_host_bits_set_ipv6(site: Site) -> None:
    site.write(peers=[site.peer("b", allowed_ips=["198.19.0.2/32", "fd00:5ec::2/64"])])
    assert error_of(site.path) == (
        f'{site.path}: peer "b".allowed_ips[1]: fd00:5ec::2/64 has host bits set; '
        "did you mean fd00:5ec::/64?"
    )


@pytest.mark.parametrize(
    ("network", "why"),
    [
        ("198.19.0.300/32", "octet 300 (> 255) not permitted in '198.19.0.300'"),
        ("198.19.0.0/33", "'33' is not a valid netmask"),
        ("fd00::/129", "'129' is not a valid netmask"),
        ("fd00:::1/128", "at most one '::' permitted in 'fd00:::1'"),
        ("vpn.example.com", "expected 4 octets in 'vpn.example.com'"),
    ],
)
def test_allowed_ips_not_a_network(site: Site, network: str, why: str) -> None:
    site.write(peers=[site.peer("b", allowed_ips=["198.19.0.2/32", network])])
    assert error_of(site.path) == (
        f'{site.path}: peer "b".allowed_ips[1]: "{network}" is not an IP network: {why}'
    )


def test_allowed_ips_listed_twice_in_one_peer(site: Site) -> None:
    site.write(peers=[site.peer("b", allowed_ips=["198.19.0.2/32", "198.19.0.2/32"])])
    assert error_of(site.path) == (
        f'{site.path}: peer "b".allowed_ips[1]: 198.19.0.2/32 is listed twice (also allowed_ips[0])'
    )


def test_bad_interface_address(site: Site) -> None:
    site.write(site.interface(address=["198.19.0.1/24", "198.19.0.1/33"]))
    assert error_of(site.path) == (
        f'{site.path}: interface.address[1]: "198.19.0.1/33" is not an IP address: '
        "'33' is not a valid netmask"
    )


def test_interface_address_is_the_network_address(site: Site) -> None:
    site.write(site.interface(address=["198.19.0.0/24"]))
    assert error_of(site.path) == (
        f"{site.path}: interface.address[0]: 198.19.0.0/24 is the network address of "
        "198.19.0.0/24; did you mean 198.19.0.1/24?"
    )


def test_interface_address_listed_twice(site: Site) -> None:
    site.write(site.interface(address=["198.19.0.1/24", "198.19.0.1/16"]))
    assert error_of(site.path) == (
        f"{site.path}: interface.address[1]: 198.19.0.1 is listed twice (also address[0])"
    )


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        (
            "198.18.0.2",
            'expected host:port such as "198.18.0.2:5800" or "[fd00::1]:5800", got "198.18.0.2"',
        ),
        (
            ":5800",
            'expected host:port such as "198.18.0.2:5800" or "[fd00::1]:5800", got ":5800"',
        ),
        ("fd00::1:5800", 'IPv6 addresses need brackets, e.g. "[fd00::1]:5800"; got "fd00::1:5800"'),
        ("198.18.0.2:70000", 'port must be 1..65535, got "70000"'),
        ("198.18.0.2:0", 'port must be 1..65535, got "0"'),
        ("198.18.0.2:http", 'port must be 1..65535, got "http"'),
        ("198.18.0:5800", '"198.18.0" is not a valid IPv4 address'),
        ("bad_host!:5800", '"bad_host!" is not a valid host name or IP address'),
        ("-bad.example:5800", '"-bad.example" is not a valid host name or IP address'),
        ("[198.18.0.2]:5800", '"[198.18.0.2]" is not an IPv6 address'),
        ("a\nb:5800", '"a\\nb" is not a valid host name or IP address'),
    ],
)
def test_bad_endpoint(site: Site, endpoint: str, message: str) -> None:
    site.write(peers=[site.peer("b", endpoint=endpoint)])
    assert error_of(site.path) == f'{site.path}: peer "b".endpoint: {message}'


@pytest.mark.parametrize(
    ("listen", "endpoint", "host", "port"),
    [
        ("0.0.0.0:5800", "198.18.0.2:5800", "198.18.0.2", 5800),
        ("0.0.0.0:5800", "vpn.Example.com.:443", "vpn.Example.com.", 443),
        ("[::]:5800", "[fd00::1]:5801", "fd00::1", 5801),
        ("[::]:5800", "198.18.0.2:1", "198.18.0.2", 1),  # "::" is dual-stack
        ("[fe80::1%lo]:5800", "[fe80::2%lo]:5800", "fe80::2%lo", 5800),  # lo: on every host
    ],
)
def test_good_endpoint(site: Site, listen: str, endpoint: str, host: str, port: int) -> None:
    site.write(site.interface(listen=listen), [site.peer("b", endpoint=endpoint)])
    peer = load_config(site.path).peers[0]
    assert (peer.endpoint_host, peer.endpoint_port) == (host, port)
    assert peer.endpoint == SocketAddress(host, port)


def test_ipv6_endpoint_needs_an_ipv6_socket(site: Site) -> None:
    site.write(peers=[site.peer("b", endpoint="[fd00::1]:5800")])
    assert error_of(site.path) == (
        f'{site.path}: peer "b".endpoint: [fd00::1]:5800 is IPv6 but interface.listen '
        '0.0.0.0:5800 is an IPv4 socket; listen on "[::]:5800" to reach IPv6 peers'
    )


def test_ipv4_endpoint_needs_an_ipv4_capable_socket(site: Site) -> None:
    site.write(site.interface(listen="[fd00::9]:5800"), [site.peer("b", endpoint="1.2.3.4:5")])
    assert error_of(site.path) == (
        f'{site.path}: peer "b".endpoint: 1.2.3.4:5 is IPv4 but interface.listen '
        '[fd00::9]:5800 is bound to an IPv6 address; listen on "[::]:5800" or an IPv4 address'
    )


# --- allowed_ips across peers -------------------------------------------------------------------

_ONE_PEER_ONLY = (
    "a prefix is routed to one peer only: remove it from one of them (a narrower or wider "
    "prefix is fine, the longest prefix wins)"
)


def test_nested_prefixes_on_different_peers_are_fine(site: Site) -> None:
    """WireGuard's cryptokey routing: longest prefix wins, so a network inside another
    peer's network is no conflict, whichever comes first in the file."""
    site.write(
        peers=[
            site.peer("b", allowed_ips=["198.19.0.0/24"]),
            site.peer("c", allowed_ips=["198.19.1.0/24", "198.19.0.3/32", "fd00:5ec::/64"]),
            site.peer("d", allowed_ips=["fd00:5ec::4/128"]),
        ]
    )
    config = load_config(site.path)
    assert [str(n) for n in config.peers[1].allowed_ips] == [
        "198.19.0.3/32",
        "198.19.1.0/24",
        "fd00:5ec::/64",
    ]


def test_exit_peer_beside_site_peers(site: Site) -> None:
    site.write(
        peers=[
            site.peer("b", allowed_ips=["0.0.0.0/0", "::/0"]),
            site.peer("c", allowed_ips=["198.19.5.0/24", "fd00:5ec:5::/64"]),
            site.peer("d"),
        ]
    )
    config = load_config(site.path)
    assert [p.name for p in config.peers] == ["b", "c", "d"]
    assert check_config(site.path, host_routes=[]).startswith(
        f"{site.path}: OK: interface sio0, 3 peers"
    )


def test_same_network_in_two_peers(site: Site) -> None:
    site.write(peers=[site.peer("b"), site.peer("c", allowed_ips=["198.19.0.2/32"])])
    assert error_of(site.path) == (
        f'{site.path}: peer "c".allowed_ips[0]: 198.19.0.2/32 is also in '
        f'peer "b".allowed_ips[0]; {_ONE_PEER_ONLY}'
    )


def test_same_default_route_in_two_peers(site: Site) -> None:
    site.write(
        peers=[
            site.peer("b", allowed_ips=["198.19.0.2/32", "::/0"]),
            site.peer("c", allowed_ips=["::/0"]),
        ]
    )
    with pytest.raises(ConfigError) as info:
        load_config(site.path)
    assert str(info.value) == (
        f'{site.path}: peer "c".allowed_ips[0]: ::/0 is also in peer "b".allowed_ips[1]; '
        f"{_ONE_PEER_ONLY}"
    )
    assert len(info.value.problems) == 1


def test_a_network_listed_twice_in_one_peer(site: Site) -> None:
    site.write(peers=[site.peer("b", allowed_ips=["198.19.0.2/32", "198.19.0.2/32"])])
    assert error_of(site.path) == (
        f'{site.path}: peer "b".allowed_ips[1]: 198.19.0.2/32 is listed twice (also allowed_ips[0])'
    )


def test_nesting_within_one_peer_and_adjacent_networks_are_fine(site: Site) -> None:
    site.write(
        peers=[
            site.peer("b", allowed_ips=["198.19.0.0/25", "198.19.0.2/32", "::/0"]),
            site.peer("c", allowed_ips=["198.19.0.128/25", "0.0.0.0/1"]),
        ]
    )
    config = load_config(site.path)
    assert [str(n) for n in config.peers[1].allowed_ips] == ["0.0.0.0/1", "198.19.0.128/25"]


def test_cross_peer_check_agrees_with_brute_force(site: Site) -> None:
    """Refused exactly when two peers list the same network, on random nested and
    disjoint networks."""
    rng = random.Random(5800)
    refused = accepted = 0
    for _ in range(60):
        networks: dict[str, list[str]] = {"b": [], "c": [], "d": []}
        for name in networks:
            for _ in range(rng.randint(0, 4)):
                prefix = rng.randint(28, 32)
                address = (198 << 24) | (19 << 16) | rng.getrandbits(6)
                network = ipaddress.IPv4Network((address, prefix), strict=False)
                if str(network) not in networks[name]:
                    networks[name].append(str(network))
        same = any(
            a == b
            for first in networks
            for second in networks
            if first < second
            for a in networks[first]
            for b in networks[second]
        )
        site.write(peers=[site.peer(n, allowed_ips=nets) for n, nets in networks.items()])
        if same:
            assert _ONE_PEER_ONLY in error_of(site.path)
            refused += 1
        else:
            load_config(site.path)
            accepted += 1
    assert refused and accepted


# --- names and keys ---------------------------------------------------------------------------


def test_duplicate_peer_names(site: Site) -> None:
    site.write(peers=[site.peer("b"), {**site.peer("c"), "name": "b"}])
    assert error_of(site.path) == (
        f'{site.path}: peer[1].name: "b" is also the name of an earlier peer (peer[0]); '
        "peer names must be unique"
    )


def test_duplicate_public_keys(site: Site) -> None:
    site.write(peers=[site.peer("b"), site.peer("c", public_key=str(site.keys["b"].public_key))])
    assert error_of(site.path) == (
        f'{site.path}: peer "c".public_key: same public key as peer "b"; '
        "every peer needs its own key pair"
    )


def test_duplicate_public_keys_in_different_forms(site: Site) -> None:
    """The comparison is on the key, not on how it is written."""
    (site.dir / "b.pub").write_text(site.keys["b"].public_key.to_pem())
    site.write(
        peers=[
            site.peer("b", public_key="b.pub"),
            site.peer("c", public_key=ssh_line(site.keys["b"].public_key)),
        ]
    )
    assert error_of(site.path).endswith(
        'peer "c".public_key: same public key as peer "b"; every peer needs its own key pair'
    )


def test_peer_with_our_own_public_key(site: Site) -> None:
    site.write(peers=[site.peer("b", public_key=str(site.me.public_key))])
    assert error_of(site.path) == (
        f'{site.path}: peer "b".public_key: this is our own public key (of '
        "interface.private_key); give the peer's key (run secureioctl pubkey on the peer)"
    )


def test_private_key_readable_by_others(site: Site) -> None:
    site.write()
    site.key_file.chmod(0o644)
    key = site.key_file
    assert error_of(site.path) == (
        f"{site.path}: interface.private_key: {key}: private key is accessible by others "
        f"(mode 0644); fix with: chmod 600 {key}"
    )


def test_private_key_missing(site: Site) -> None:
    site.write(site.interface(private_key="keys/id_ed25519"))
    key = site.dir / "keys" / "id_ed25519"
    assert error_of(site.path) == (
        f"{site.path}: interface.private_key: {key}: private key file does not exist; "
        f"create it with: secureioctl genkey {key}"
    )


def test_private_key_that_is_a_public_key(site: Site) -> None:
    site.write(site.interface(private_key="id/id_ed25519.pub"))
    site.key_file.with_suffix(".pub").chmod(0o600)
    key = site.dir / "id" / "id_ed25519.pub"
    assert error_of(site.path) == (
        f"{site.path}: interface.private_key: {key}: this is a public key (ED25519 PUBLIC "
        "KEY); an identity needs the private key"
    )


def test_private_key_may_be_an_identity_directory(site: Site) -> None:
    site.write(site.interface(private_key=str(site.dir / "id")))
    config = load_config(site.path)
    assert config.identity == site.me
    assert config.interface.private_key == site.dir / "id"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            base64.b64encode(bytes(31)).decode(),
            "base64 public key must be 32 bytes, got 31",
        ),
        (
            "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ user@host",
            "OpenSSH key is of type 'ssh-rsa', not ssh-ed25519; create one with: "
            "ssh-keygen -t ed25519",
        ),
        ("ssh-ed25519", "ssh-ed25519 line has no key after the type"),
        (
            "-----BEGIN ED25519 PUBLIC KEY-----\nAAAA\n",
            "PEM block 'ED25519 PUBLIC KEY' has no END line (file truncated?)",
        ),
    ],
)
def test_bad_inline_public_key(site: Site, value: str, message: str) -> None:
    site.write(peers=[site.peer("b", public_key=value)])
    assert error_of(site.path) == f'{site.path}: peer "b".public_key: {message}'


def test_public_key_file_missing(site: Site) -> None:
    site.write(peers=[site.peer("b", public_key="peers/b.pub")])
    assert error_of(site.path) == (
        f'{site.path}: peer "b".public_key: {site.dir}/peers/b.pub: public key file does not exist'
    )


def test_public_key_file_holding_a_private_key(site: Site) -> None:
    site.write(peers=[site.peer("b", public_key=str(site.key_file))])
    assert error_of(site.path) == (
        f'{site.path}: peer "b".public_key: {site.key_file}: PEM label is \'ED25519 PRIVATE '
        "KEY', expected 'ED25519 PUBLIC KEY' (that is a private key; give the public key)"
    )


def test_public_key_forms(site: Site) -> None:
    b, c, d = (site.keys[n].public_key for n in "bcd")
    (site.dir / "peers").mkdir()
    (site.dir / "peers" / "c.pub").write_text(ssh_line(c) + "\n")
    site.write(
        peers=[
            site.peer("b", public_key=b.to_pem()),  # PEM text inline (multi-line string)
            site.peer("c", public_key="peers/c.pub"),  # relative to the config's directory
            site.peer("d", public_key=ssh_line(d, "laptop key")),
        ]
    )
    config = load_config(site.path)
    assert [p.public_key for p in config.peers] == [b, c, d]


def test_relative_paths_are_relative_to_the_config_file(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    site.write_psk("b.psk", b"0123456789abcdef0123\n")
    site.write(peers=[site.peer("b", psk_file="b.psk")])
    monkeypatch.chdir(site.dir.parent)
    config = load_config(Path(site.dir.name) / "sio0.toml")  # a relative config path, too
    monkeypatch.chdir("/")  # the daemon's working directory must not matter afterwards
    assert config.interface.private_key == site.key_file
    assert config.peers[0].psk_file == site.dir / "b.psk"


# --- pre-shared keys --------------------------------------------------------------------------


def test_psk_is_file_bytes_minus_one_newline(site: Site) -> None:
    site.write_psk("b.psk", b"0123456789abcdef0123\n\n")
    site.write_psk("c.psk", b"\x00\xffbinary-psk-without-newline")
    site.write(peers=[site.peer("b", psk_file="b.psk"), site.peer("c", psk_file="c.psk")])
    peers = load_config(site.path).peers
    assert peers[0].psk == b"0123456789abcdef0123\n"
    assert peers[1].psk == b"\x00\xffbinary-psk-without-newline"
    assert "psk=" not in repr(peers[0])  # never logged by accident


def test_psk_file_missing(site: Site) -> None:
    site.write(peers=[site.peer("b", psk_file="b.psk")])
    assert error_of(site.path) == (
        f'{site.path}: peer "b".psk_file: {site.dir}/b.psk: pre-shared key file does not '
        "exist (both peers need the same file)"
    )


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o660])
def test_psk_file_accessible_by_others(site: Site, mode: int) -> None:
    psk = site.write_psk("b.psk", b"0123456789abcdef0123", mode)
    site.write(peers=[site.peer("b", psk_file="b.psk")])
    assert error_of(site.path) == (
        f'{site.path}: peer "b".psk_file: {psk}: pre-shared key is accessible by others '
        f"(mode {mode:04o}); fix with: chmod 600 {psk}"
    )


def test_psk_file_empty(site: Site) -> None:
    psk = site.write_psk("b.psk", b"\n")
    site.write(peers=[site.peer("b", psk_file="b.psk")])
    assert error_of(site.path) == (
        f'{site.path}: peer "b".psk_file: {psk}: pre-shared key file is empty; create one '
        f"with: (umask 077; head -c 32 /dev/urandom | base64 > {psk})"
    )


def test_psk_file_is_a_directory(site: Site) -> None:
    (site.dir / "psk.d").mkdir(mode=0o700)
    site.write(peers=[site.peer("b", psk_file="psk.d")])
    assert error_of(site.path) == (
        f'{site.path}: peer "b".psk_file: {site.dir}/psk.d: pre-shared key file is a directory'
    )


def test_psk_file_permission_denied(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unreadable PSK file (faked: the suite runs as root, which reads any file)."""
    psk = site.write_psk("b.psk", b"0123456789abcdef0123")
    site.write(peers=[site.peer("b", psk_file="b.psk")])
    real_open = os.open

    def refuse_psk(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if Path(path) == psk:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse_psk)
    assert error_of(site.path) == (
        f'{site.path}: peer "b".psk_file: {psk}: cannot read the pre-shared key: permission '
        "denied (run as its owner)"
    )


def test_short_psk_is_accepted_with_a_warning(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    site.write_psk("b.psk", b"short\n")
    site.write(peers=[site.peer("b", psk_file="b.psk")])
    with caplog.at_level(logging.WARNING, logger="secureiod.config"):
        assert load_config(site.path).peers[0].psk == b"short"
    assert "only 5 bytes" in caplog.text


# --- interface name and MTU -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "secureiod-tunnel0",
            '"secureiod-tunnel0" is too long (17 characters); Linux allows at most 15',
        ),
        (
            "a/b",
            "\"a/b\" contains \"/\"; interface names are printable ASCII without '/', ':', "
            "'%' or whitespace",
        ),
        (
            "sio 0",
            '"sio 0" contains " "; interface names are printable ASCII without \'/\', '
            "':', '%' or whitespace",
        ),
        (
            "sio%d",
            '"sio%d" contains "%"; interface names are printable ASCII without \'/\', '
            "':', '%' or whitespace",
        ),
        (".", '"." is not allowed as an interface name'),
        ("..", '".." is not allowed as an interface name'),
        ("", "interface name is empty"),
        (0, "expected a string, got integer 0"),
    ],
)
def test_bad_interface_name(site: Site, name: object, message: str) -> None:
    site.write(site.interface(name=name))
    assert error_of(site.path) == f"{site.path}: interface.name: {message}"


def test_fifteen_character_name_is_the_limit(site: Site) -> None:
    site.write(site.interface(name="a" * 15))
    assert load_config(site.path).interface.name == "a" * 15


def test_name_defaults_to_the_file_name(site: Site) -> None:
    path = site.write(site.interface(name=None), name="tun7.toml")
    interface = load_config(path).interface
    assert interface.name == "tun7"
    assert interface.control_socket == Path("/run/secureiod/tun7.sock")


def test_file_name_that_cannot_be_an_interface_name(site: Site) -> None:
    path = site.write(site.interface(name=None), name="this-file-name-is-long.toml")
    assert error_of(path) == (
        f"{path}: interface.name: missing required key, and the file name cannot stand in "
        'for it: "this-file-name-is-long" is too long (22 characters); Linux allows at most 15'
    )


def test_ipv6_address_needs_mtu_1280(site: Site) -> None:
    site.write(site.interface(mtu=1200))
    assert error_of(site.path) == (
        f"{site.path}: interface.mtu: 1200 is below 1280, the minimum for IPv6, and address "
        'fd00:5ec::1/64 is IPv6; raise mtu to at least 1280 or use "auto"'
    )


def test_small_mtu_is_fine_without_ipv6(site: Site) -> None:
    site.write(site.interface(mtu=576, address=["198.19.0.1/24"]))
    assert load_config(site.path).interface.mtu == 576


# --- several errors ---------------------------------------------------------------------------


def test_first_error_in_file_order_and_a_count(site: Site) -> None:
    """File order, not the schema's (which has listen before mtu): the first error shown is
    the first one met reading the file from the top."""
    site.write(
        site.interface(mtu="big", listen="nowhere"),
        [site.peer("b", endpoint="x"), site.peer("c", allowed_ips=["198.19.0.3/24"])],
    )
    with pytest.raises(ConfigError) as info:
        load_config(site.path)
    assert str(info.value) == (
        f'{site.path}: interface.mtu: expected "auto" or an integer 576..65535, got string '
        '"big" (and 3 more errors)'
    )
    assert [p.split(": ")[1] for p in info.value.problems] == [
        "interface.mtu",
        "interface.listen",
        'peer "b".endpoint',
        'peer "c".allowed_ips[0]',
    ]
    assert all(p.startswith(f"{site.path}: ") and "\n" not in p for p in info.value.problems)


def test_file_errors_are_all_collected(site: Site) -> None:
    site.key_file.chmod(0o640)
    site.write(
        peers=[
            site.peer("b", psk_file="missing.psk"),
            site.peer("c", public_key="missing.pub"),
        ]
    )
    message = error_of(site.path)
    assert message.startswith(f"{site.path}: interface.private_key: ")
    assert message.endswith(" (and 2 more errors)")


def test_one_more_error_is_singular(site: Site) -> None:
    site.write(site.interface(mtu="big", listen="nowhere"))
    assert error_of(site.path).endswith(" (and 1 more error)")


def test_peer_without_a_valid_name_is_labelled_by_index(site: Site) -> None:
    site.write(peers=[site.peer("b"), site.peer("c", name="c!", endpoint="x")])
    with pytest.raises(ConfigError) as info:
        load_config(site.path)
    assert info.value.problems == (
        f'{site.path}: peer[1].name: "c!" is not a valid peer name; use 1 to 64 characters '
        "from A-Z a-z 0-9 _ . -",
        f'{site.path}: peer[1].endpoint: expected host:port such as "198.18.0.2:5800" or '
        '"[fd00::1]:5800", got "x"',
    )


def test_hostile_strings_stay_on_one_line(site: Site) -> None:
    site.write(site.interface(**{"user": "evil\nroot\u2028x"}))
    message = error_of(site.path)
    assert message == (
        f'{site.path}: interface.user: "evil\\nroot\\u2028x" is not a valid user name'
    )
    assert len(message.splitlines()) == 1


def test_unknown_user(site: Site) -> None:
    site.write(site.interface(user="no-such-user-here"))
    assert error_of(site.path) == f'{site.path}: interface.user: no such user "no-such-user-here"'


# --- valid configs ----------------------------------------------------------------------------


def test_defaults(site: Site) -> None:
    site.write(peers=[site.peer("b")])
    config = load_config(site.path)
    interface = config.interface
    assert interface.listen == SocketAddress("0.0.0.0", 5800)
    assert interface.mtu is None
    assert interface.key_update_interval == 60.0
    assert interface.keepalive_timeout == 15.0
    assert interface.control_socket == Path("/run/secureiod/sio0.sock")
    assert interface.user is None
    assert interface.payload_size_limit is None
    peer = config.peers[0]
    assert (peer.endpoint, peer.endpoint_host, peer.endpoint_port) == (None, None, None)
    assert (peer.psk, peer.psk_file, peer.persistent_keepalive) == (None, None, None)
    assert config.identity == site.me and config.public_key == site.me.public_key
    assert config.path == site.path


def test_every_value_set(site: Site) -> None:
    site.write_psk("b.psk", b"0123456789abcdef0123")
    site.write(
        site.interface(
            listen="[::]:5900",
            mtu=1420,
            key_update_interval=30.5,
            keepalive_timeout=10,
            control_socket="/run/x/sio0.sock",
            user="root",
            payload_size_limit=1200,
        ),
        [site.peer("b", endpoint="[fd00::2]:5900", psk_file="b.psk", persistent_keepalive=25)],
    )
    config = load_config(site.path)
    interface = config.interface
    assert interface.listen == SocketAddress("::", 5900)
    assert (interface.mtu, interface.key_update_interval, interface.keepalive_timeout) == (
        1420,
        30.5,
        10.0,
    )
    assert interface.control_socket == Path("/run/x/sio0.sock")
    assert (interface.user, interface.payload_size_limit) == ("root", 1200)
    assert [str(a) for a in interface.address] == ["198.19.0.1/24", "fd00:5ec::1/64"]
    peer = config.peers[0]
    assert (peer.endpoint_host, peer.endpoint_port, peer.persistent_keepalive) == (
        "fd00::2",
        5900,
        25,
    )
    assert peer.psk == b"0123456789abcdef0123"


def test_zero_peers_is_valid(site: Site) -> None:
    site.write(peers=[])
    assert load_config(site.path).peers == ()


def test_allowed_ips_are_sorted_and_typed(site: Site) -> None:
    site.write(
        peers=[site.peer("b", allowed_ips=["fd00:5ec::2/128", "198.19.2.0/24", "198.19.0.2"])]
    )
    allowed = load_config(site.path).peers[0].allowed_ips
    assert [str(n) for n in allowed] == ["198.19.0.2/32", "198.19.2.0/24", "fd00:5ec::2/128"]
    assert isinstance(allowed, tuple)


def test_loaded_configs_are_hashable_and_compare_by_value(site: Site) -> None:
    site.write()
    first, second = load_config(site.path), load_config(site.path)
    assert first == second and hash(first) == hash(second)
    assert first.peers[0] in set(second.peers)
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.peers[0].name = "x"  # type: ignore[misc]
    assert first.peers_by_name() == {"b": first.peers[0], "c": first.peers[1]}
    assert first.peers_by_key()[site.keys["c"].public_key] is first.peers[1]


def test_check_config_summary(site: Site) -> None:
    site.write_psk("b.psk", b"0123456789abcdef0123")
    site.write(
        peers=[
            site.peer("b", endpoint="198.18.0.2:5800", psk_file="b.psk", persistent_keepalive=25),
            site.peer("c"),
        ]
    )
    b, c = site.keys["b"].public_key, site.keys["c"].public_key
    assert check_config(site.path) == "\n".join(
        [
            f"{site.path}: OK: interface sio0, 2 peers",
            f"  interface sio0: public key {site.me.public_key}, listen 0.0.0.0:5800, "
            "address 198.19.0.1/24, fd00:5ec::1/64, mtu auto",
            f'  peer "b": public key {b}, endpoint 198.18.0.2:5800, allowed_ips 198.19.0.2/32, '
            "fd00:5ec::2/128, psk, keepalive 25s",
            f'  peer "c": public key {c}, allowed_ips 198.19.0.3/32, fd00:5ec::3/128',
        ]
    )


def test_check_config_raises_the_same_error(site: Site) -> None:
    site.write(site.interface(mtu=1))
    with pytest.raises(ConfigError, match=re.escape("interface.mtu: 1 is out of range")):
        check_config(site.path)


def test_default_config_path() -> None:
    assert paths.config_path("sio0") == Path("/etc/secureiod/sio0.toml")


# --- the examples in config/ ------------------------------------------------------------------


def install_example(name: str, root: Path) -> Path:
    """Copy an example with /etc/secureiod/ moved under ``root`` and create every file it
    names: our key, peers' .pub files and PSKs (the same PSK path gets the same bytes)."""
    text = (EXAMPLES / name).read_text().replace("/etc/secureiod/", f"{root}/etc/")
    (root / "etc").mkdir(parents=True, exist_ok=True)
    path = root / "etc" / name
    path.write_text(text)
    data = tomllib.loads(text)
    key_path = Path(data["interface"]["private_key"])
    assert key_path.name == "id_ed25519" and key_path.is_relative_to(root)
    write_identity(key_path.parent, Identity.generate())
    for peer in data["peer"]:
        if peer["public_key"].startswith(str(root)):
            pub = Path(peer["public_key"])
            pub.parent.mkdir(parents=True, exist_ok=True)
            pub.write_text(Identity.generate().public_key.to_pem())
        if "psk_file" in peer:
            psk = Path(peer["psk_file"])
            psk.parent.mkdir(parents=True, exist_ok=True)
            psk.write_bytes(b"example pre-shared key, 32 bytes\n")
            psk.chmod(0o600)
    return path


@pytest.mark.parametrize("name", ["two-site-a.toml", "two-site-b.toml", "hub.toml"])
def test_example_loads(tmp_path: Path, name: str) -> None:
    original = (EXAMPLES / name).read_text()
    assert f"{tmp_path}" not in original and "/etc/secureiod/id_ed25519" in original
    config = load_config(install_example(name, tmp_path))
    assert config.interface.name == "sio0"
    assert config.interface.mtu is None
    assert config.peers
    assert check_config(config.path).startswith(f"{config.path}: OK: interface sio0, ")


def test_hub_example(tmp_path: Path) -> None:
    config = load_config(install_example("hub.toml", tmp_path))
    branch, server, laptop = config.peers
    assert [p.name for p in config.peers] == ["branch", "server", "laptop"]
    assert (branch.endpoint_host, branch.endpoint_port) == ("branch.example.net", 5800)
    assert server.psk == b"example pre-shared key, 32 bytes"
    assert laptop.endpoint is None
    assert str(laptop.public_key) == "75I6Dfp2TQYg7+apNG31FxG0RytwRQyUVK8rCWgRJUc="


def test_two_site_examples_mirror_each_other(tmp_path: Path) -> None:
    """Each site routes the other's tunnel addresses to it and sends to its listen port."""
    a = load_config(install_example("two-site-a.toml", tmp_path / "a"))
    b = load_config(install_example("two-site-b.toml", tmp_path / "b"))
    for here, there in ((a, b), (b, a)):
        (peer,) = here.peers
        assert peer.endpoint is not None
        assert peer.endpoint.port == there.interface.listen.port
        for address in there.interface.address:
            assert any(address.ip in network for network in peer.allowed_ips)
        for network in peer.allowed_ips:
            tunnel = TUNNEL_V4 if network.version == 4 else TUNNEL_V6
            assert network.subnet_of(tunnel)  # type: ignore[arg-type]
    psk_a = (tmp_path / "a" / "etc" / "peers" / "site-a-site-b.psk").read_bytes()
    psk_b = (tmp_path / "b" / "etc" / "peers" / "site-a-site-b.psk").read_bytes()
    assert psk_a == psk_b


@pytest.mark.parametrize("name", ["two-site-a.toml", "two-site-b.toml", "hub.toml"])
def test_examples_mention_every_interface_key(name: str) -> None:
    text = (EXAMPLES / name).read_text()
    for key in InterfaceSchema.model_fields:
        assert re.search(rf"^#? ?{key} = ", text, re.MULTILINE), f"{name} lacks {key}"


def test_main_example_mentions_every_peer_key() -> None:
    text = (EXAMPLES / "two-site-a.toml").read_text()
    for key in PeerSchema.model_fields:
        assert re.search(rf"^#? ?{key} = ", text, re.MULTILINE), f"two-site-a.toml lacks {key}"


# --- reload diffs -----------------------------------------------------------------------------


@pytest.fixture
def reload(site: Site) -> Callable[..., Config]:
    """Write a config as ``new.toml`` in the same directory and load it."""

    def load(interface: dict[str, Any] | None = None, peers: list[dict[str, Any]] | None = None):
        return load_config(site.write(interface, peers, name="new.toml"))

    return load


def test_diff_identical(site: Site, reload: Callable[..., Config]) -> None:
    old = load_config(site.write())
    diff = diff_config(old, reload())
    assert not diff.has_changes
    assert list(diff.unchanged) == ["b", "c"]
    assert (diff.added, diff.removed, diff.changed) == ({}, {}, {})
    assert diff.interface_changed == frozenset()
    assert restart_required(diff) == []


def test_diff_added_removed_changed_unchanged(site: Site, reload: Callable[..., Config]) -> None:
    old = load_config(site.write(peers=[site.peer("b"), site.peer("c"), site.peer("d")]))
    new = reload(
        peers=[
            site.peer("c", allowed_ips=["198.19.0.3/32", "198.19.3.0/24"], endpoint="1.2.3.4:5"),
            site.peer("b"),
            {**site.peer("d"), "name": "e"},
        ]
    )
    diff = diff_config(old, new)
    assert list(diff.added) == ["e"] and diff.added["e"] is new.peers[2]
    assert list(diff.removed) == ["d"] and diff.removed["d"] is old.peers[2]
    assert list(diff.unchanged) == ["b"]
    assert list(diff.changed) == ["c"]
    change = diff.changed["c"]
    assert change.fields == {"allowed_ips", "endpoint"}
    assert (change.old, change.new) == (old.peers[1], new.peers[0])
    assert diff.has_changes and diff.interface_changed == frozenset()


def test_diff_ignores_order(site: Site, reload: Callable[..., Config]) -> None:
    old = load_config(site.write())
    new = reload(
        peers=[
            site.peer("c"),
            site.peer("b", allowed_ips=["fd00:5ec::2/128", "198.19.0.2/32"]),
        ]
    )
    assert not diff_config(old, new).has_changes


def test_diff_public_key_change(site: Site, reload: Callable[..., Config]) -> None:
    old = load_config(site.write())
    new = reload(peers=[site.peer("b", public_key=str(site.keys["d"].public_key)), site.peer("c")])
    diff = diff_config(old, new)
    assert diff.changed["b"].fields == {"public_key"}


def test_diff_psk_content_not_path(site: Site, reload: Callable[..., Config]) -> None:
    site.write_psk("one.psk", b"0123456789abcdef0123")
    site.write_psk("two.psk", b"0123456789abcdef0123")
    site.write_psk("three.psk", b"a different key, long enough")
    old = load_config(site.write(peers=[site.peer("b", psk_file="one.psk"), site.peer("c")]))
    moved = reload(peers=[site.peer("b", psk_file="two.psk"), site.peer("c")])
    assert not diff_config(old, moved).has_changes
    rekeyed = reload(peers=[site.peer("b", psk_file="three.psk"), site.peer("c")])
    assert diff_config(old, rekeyed).changed["b"].fields == {"psk"}
    dropped = reload(peers=[site.peer("b"), site.peer("c", persistent_keepalive=5)])
    diff = diff_config(old, dropped)
    assert diff.changed["b"].fields == {"psk"}
    assert diff.changed["c"].fields == {"persistent_keepalive"}


def test_diff_reloadable_interface_changes(site: Site, reload: Callable[..., Config]) -> None:
    old = load_config(site.write())
    new = reload(
        site.interface(
            address=["198.19.0.1/24", "fd00:5ec::9/64"],
            mtu=1400,
            keepalive_timeout=20,
            key_update_interval=120,
        )
    )
    diff = diff_config(old, new)
    assert diff.interface_changed == {"address", "mtu", "keepalive_timeout", "key_update_interval"}
    assert diff.interface_changed <= RELOADABLE_INTERFACE_FIELDS
    assert restart_required(diff) == []
    assert not diff.changed and list(diff.unchanged) == ["b", "c"]


def test_diff_interface_changes_that_need_a_restart(
    site: Site, reload: Callable[..., Config]
) -> None:
    old = load_config(site.write())
    new = reload(site.interface(name="sio1", listen="0.0.0.0:5801", mtu=1400))
    diff = diff_config(old, new)
    assert diff.interface_changed == {"name", "listen", "mtu", "control_socket"}
    assert restart_required(diff) == ["name", "listen", "control_socket"]


def test_diff_new_key_in_the_same_file_needs_a_restart(
    site: Site, reload: Callable[..., Config]
) -> None:
    old = load_config(site.write())
    write_identity(site.dir / "id", Identity.generate(), overwrite=True)
    diff = diff_config(old, reload())
    assert diff.interface_changed == {"private_key"}
    assert restart_required(diff) == ["private_key"]


def test_restart_and_reloadable_fields_cover_the_interface() -> None:
    assert RESTART_INTERFACE_FIELDS.isdisjoint(RELOADABLE_INTERFACE_FIELDS)
    every_key = set(InterfaceSchema.model_fields)
    assert every_key == RESTART_INTERFACE_FIELDS | RELOADABLE_INTERFACE_FIELDS
