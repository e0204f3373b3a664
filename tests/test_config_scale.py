"""The config file's size bound (issue 13): 10,000 peers and 20 % headroom load, one byte
over the bound is refused with one line that names the limit and the way out."""

from __future__ import annotations

from pathlib import Path

import pytest

from secureiod.config import _MAX_CONFIG_SIZE, ConfigError, load_config
from secureiod.secureio.identity import Identity, write_identity

HEADROOM_PEERS = 12_000


def _site(tmp_path: Path) -> str:
    write_identity(tmp_path / "id", Identity.generate())
    psk = tmp_path / "psk"
    psk.write_bytes(b"s" * 32)
    psk.chmod(0o600)
    return (
        '[interface]\nname = "sio0"\nprivate_key = "id/id_ed25519"\n'
        'listen = "0.0.0.0:5800"\naddress = ["198.19.0.1/16", "fd00:5ec::1/64"]\n'
    )


def _full_peer(i: int, key: str) -> str:
    """A peer with everything an operator writes: ~230 bytes."""
    return (
        f'\n[[peer]]\nname = "branch-office-{i:05d}"\npublic_key = "{key}"\n'
        f'endpoint = "198.18.{i // 250}.{1 + i % 250}:5800"\n'
        f'allowed_ips = ["198.19.{16 + i // 250}.{1 + i % 250}/32", "fd00:5ec::{i + 16:x}/128"]\n'
        'psk_file = "psk"\npersistent_keepalive = 25\n'
    )


def test_twelve_thousand_full_peers_fit_under_the_bound(tmp_path: Path) -> None:
    text = _site(tmp_path) + "".join(
        _full_peer(i, str(Identity.generate().public_key)) for i in range(HEADROOM_PEERS)
    )
    assert 220 * HEADROOM_PEERS < len(text.encode()) <= _MAX_CONFIG_SIZE
    path = tmp_path / "sio0.toml"
    path.write_text(text)
    config = load_config(path)
    assert len(config.peers) == HEADROOM_PEERS


def test_over_the_bound_is_one_line_naming_the_limit(tmp_path: Path) -> None:
    head = _site(tmp_path)
    path = tmp_path / "sio0.toml"
    path.write_text(head + "#" * (_MAX_CONFIG_SIZE + 1 - len(head) - 1) + "\n")
    assert path.stat().st_size == _MAX_CONFIG_SIZE + 1
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: config file is too large ({_MAX_CONFIG_SIZE + 1} bytes, the limit is "
        f"{_MAX_CONFIG_SIZE} bytes, about 12,000 peers); trim comments or split the peers "
        "over two interfaces"
    )
    path.write_text(head + "#" * (_MAX_CONFIG_SIZE - len(head) - 1) + "\n")  # at the bound
    load_config(path)
