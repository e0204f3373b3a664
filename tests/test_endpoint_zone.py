"""A link-local endpoint's zone (``[fe80::1%eth0]:5800``) must name an interface of this
host: otherwise the config is refused with one line naming the file and the field, at
``--check``, at start and on reload, instead of failing in ``getaddrinfo`` when the daemon
makes the socket address (which stopped the daemon on SIGHUP; review of issue 10).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from secureiod.config import ConfigError, check_config, load_config
from secureiod.secureio.identity import Identity, write_identity_file

DAEMON = [sys.executable, "-m", "secureiod.cli.daemon"]
NO_SUCH = (
    '"fe80::1%nosuch0": there is no interface "nosuch0" on this host; name one that '
    "`ip link` lists, e.g. [fe80::1%eth0]:5800"
)


def _config(tmp_path: Path, endpoint: str) -> Path:
    key = tmp_path / "id_ed25519"
    write_identity_file(key, Identity.generate())
    path = tmp_path / "sio9.toml"
    path.write_text(
        f"""[interface]
private_key = "{key}"
listen = "[::]:5800"
address = ["198.19.9.1/24"]
control_socket = "{tmp_path}/sio9.sock"

[[peer]]
name = "b"
public_key = "{Identity.generate().public_key}"
endpoint = "{endpoint}"
allowed_ips = ["198.19.9.2/32"]
"""
    )
    return path


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ("[fe80::1%nosuch0]:5800", NO_SUCH),
        (
            "[fd00::1%lo]:5800",
            '"fd00::1%lo": a zone (%lo) applies only to link-local addresses (fe80::/10); '
            "remove it",
        ),
    ],
)
def test_a_zone_the_host_cannot_use_is_a_config_error(
    tmp_path: Path, endpoint: str, message: str
) -> None:
    path = _config(tmp_path, endpoint)
    for load in (load_config, check_config):
        with pytest.raises(ConfigError) as info:
            load(path)
        assert str(info.value) == f'{path}: peer "b".endpoint: {message}'


@pytest.mark.parametrize(
    ("endpoint", "sockaddr_host"),
    [("[fe80::1%lo]:5800", "fe80::1%lo"), ("[fe80::1%1]:5800", "fe80::1%1")],
)
def test_a_zone_naming_an_interface_is_accepted(
    tmp_path: Path, endpoint: str, sockaddr_host: str
) -> None:
    peer = load_config(_config(tmp_path, endpoint)).peers[0]
    assert peer.endpoint is not None and peer.endpoint.host == sockaddr_host


def test_the_daemon_refuses_it_in_one_line_with_exit_2(tmp_path: Path) -> None:
    path = _config(tmp_path, "[fe80::1%nosuch0]:5800")
    for argv in ([*DAEMON, "--check", "--config", str(path)], [*DAEMON, "--config", str(path)]):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        assert r.returncode == 2, r.stderr
        assert r.stderr == f'secureiod: error: {path}: peer "b".endpoint: {NO_SUCH}\n'
