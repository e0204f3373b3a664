"""``secureioctl show`` (every running interface, like ``wg show all``), ``showconf`` (the
running config as TOML, secrets as file paths only) and ``metrics``, against real devices
serving real control sockets (issue 14).

The devices run on ``tests/fakes`` (virtual time); while ``secureioctl`` waits for an
answer, the simulation runs in a thread so their control sockets are served as the
daemon's loop would serve them.
"""

from __future__ import annotations

import contextlib
import json
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes import Tunnel, two_sites
from prometheus_client.parser import text_string_to_metric_families

from secureiod.cli import ctl, secureioctl
from secureiod.config import load_config
from secureiod.daemon.status import running_config_toml

PSK = b"a shared secret of thirty-two by"


@pytest.fixture
def run_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short runtime directory standing in for /run/secureiod."""
    with tempfile.TemporaryDirectory(prefix="sio-s-", dir="/tmp") as d:
        monkeypatch.setattr(ctl, "RUN_DIR", Path(d))
        monkeypatch.setattr(ctl, "control_socket_path", lambda name: Path(d) / f"{name}.sock")
        yield Path(d)


@pytest.fixture
def ab(tmp_path: Path, run_dir: Path) -> Iterator[Tunnel]:
    """Sites a and b with a PSK, each serving its control socket in ``run_dir`` (a as
    sio0, b as sio1), established."""
    builder = two_sites(tmp_path, psk=PSK)
    tunnel = Tunnel(builder, start=[])
    tunnel.start("a", control_path=run_dir / "sio0.sock")
    tunnel.start("b", control_path=run_dir / "sio1.sock")
    tunnel.wait_established(timeout=5)
    yield tunnel
    tunnel.close()


@contextlib.contextmanager
def serving(tunnel: Tunnel) -> Iterator[None]:
    stop = threading.Event()

    def run() -> None:
        # virtual time moves with real time: the gate spaces a `peers` run that took more
        # than 2 ms of real time (a loaded box) by a loop timer, which a frozen virtual
        # clock would never reach
        while not stop.is_set():
            tunnel.sim.run_for(0.002)
            time.sleep(0.002)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def ctl_main(
    tunnel: Tunnel, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str, str]:
    with serving(tunnel):
        code = secureioctl.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_show_without_an_interface_shows_every_running_one(
    ab: Tunnel, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = ctl_main(ab, capsys, "show")
    assert (code, err) == (0, "")
    blocks = out.split("\n\n")
    # each interface: its status, then its peers (a's peer is b and b's is a)
    keys = [str(ab.devices[s].config.public_key) for s in ("a", "b")]
    assert out.count("interface: sio0") == 2
    assert f"  public key: {keys[0]}" in blocks[0] and "peer: b" in blocks[1]
    assert f"  public key: {keys[1]}" in blocks[2] and "peer: a" in blocks[3]
    assert out.count("state: established") == 2
    # the in-memory devices run without the C hop; their segment size fits a 1500-byte path
    assert out.count("  lone-packet hop: off") == 2
    assert out.count(f"  segment size (gso_max_size): {59_966}") == 2

    code, out, _ = ctl_main(ab, capsys, "show", "--json")
    shown = json.loads(out)
    assert set(shown) == {"sio0", "sio1"}
    assert shown["sio0"]["status"]["public_key"] == keys[0]
    assert [p["name"] for p in shown["sio1"]["peers"]] == ["a"]


def test_show_one_interface(ab: Tunnel, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = ctl_main(ab, capsys, "show", "-i", "sio1")
    assert (code, err) == (0, "")
    assert "peer: a" in out and "peer: b" not in out


def test_show_goes_on_past_a_daemon_that_is_gone(
    ab: Tunnel, run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = run_dir / "sio9.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # the file stays, nobody listens
    code, out, err = ctl_main(ab, capsys, "show")
    assert code == 1
    assert err == (
        f"secureioctl show: error: sio9: {stale}: connection refused; secureiod is not running\n"
    )
    assert out.count("interface: sio0") == 2  # the two live ones are still shown


def test_show_with_no_daemon_shows_nothing(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Like ``wg show all`` with no interface: nothing to show is not an error, with or
    without the runtime directory."""
    for directory in (run_dir, run_dir / "absent"):
        monkeypatch.setattr(ctl, "RUN_DIR", directory)
        assert secureioctl.main(["show"]) == 0
        assert capsys.readouterr() == ("", "")
        assert secureioctl.main(["show", "--json"]) == 0
        out, err = capsys.readouterr()
        assert (json.loads(out), err) == ({}, "")


def test_show_of_a_named_interface_that_is_not_running(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (["show", "-i", "sio5"], ["show", "-i", "sio5", "--json"]):
        assert secureioctl.main(argv) == 1
        out, err = capsys.readouterr()
        assert out == ""
        assert err.startswith("secureioctl show: error: ") and "sio5" in err, err
        assert err.count("\n") == 1


def test_showconf_is_the_running_config_and_reads_back(
    ab: Tunnel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = ab.devices["a"]
    code, out, err = ctl_main(ab, capsys, "showconf", "-i", "sio0")
    assert (code, err) == (0, "")
    assert out == running_config_toml(a.config)
    copy = tmp_path / "copy" / "sio0.toml"
    copy.parent.mkdir()
    copy.write_text(out)
    assert load_config(copy) == a.config  # equal in every field the daemon uses
    # secrets: the files' paths, never what is in them
    peer = a.config.peers[0]
    assert f'psk_file = "{peer.psk_file}"' in out
    assert f'private_key = "{a.config.interface.private_key}"' in out
    key_file = a.config.interface.private_key.read_bytes()
    for secret in (PSK, PSK.hex(), key_file.decode(errors="replace").strip()):
        text = secret if isinstance(secret, str) else secret.decode()
        assert text not in out
    assert "psk =" not in out


def test_showconf_follows_a_reload(ab: Tunnel, capsys: pytest.CaptureFixture[str]) -> None:
    spec = ab.builder.nodes["a"]
    spec.interface["keepalive_timeout"] = 22.5
    spec.write()
    a = ab.devices["a"]
    ab.call("a", lambda now: a.reload())
    _, out, _ = ctl_main(ab, capsys, "showconf", "-i", "sio0")
    assert "keepalive_timeout = 22.5\n" in out


@pytest.mark.parametrize(
    "interface",
    [
        {"mtu": 1400, "payload_size_limit": 1300, "user": "root", "offload": False},
        {"metrics_listen": "[::1]:9586", "control_socket": "/run/x/ctl.sock"},
        {"table": 1234, "fwmark": 16, "dns": ["198.19.0.1", "example.org"]},
        {"table": "off"},
        {"table": "main"},
    ],
    ids=["sizes", "sockets", "routing", "table-off", "table-main"],
)
def test_showconf_reads_back_whatever_the_keys(tmp_path: Path, interface: dict) -> None:
    """Every interface key (defaults spelt out, None left out), peers with and without an
    endpoint, keepalive and PSK: what showconf prints loads to an equal config."""
    builder = two_sites(tmp_path, psk=PSK, persistent_keepalive=25)
    builder.nodes["a"].interface.update(interface)
    config = builder.load("a")
    out = tmp_path / "back.toml"
    out.write_text(running_config_toml(config))
    assert load_config(out) == config


def test_showconf_escapes_what_toml_cannot_hold_raw(tmp_path: Path) -> None:
    """A file name with a quote, a backslash or a control character stays one TOML string
    that reads back as the same path."""
    builder = two_sites(tmp_path)
    odd = tmp_path / 'odd "dir"\\\t'
    odd.mkdir()
    key = builder.nodes["a"].directory / "id" / "id_ed25519"
    (odd / "id_ed25519").write_bytes(key.read_bytes())
    (odd / "id_ed25519").chmod(0o600)
    builder.nodes["a"].interface["private_key"] = str(odd / "id_ed25519")
    config = builder.load("a")
    text = running_config_toml(config)
    out = tmp_path / "back.toml"
    out.write_text(text)
    assert load_config(out) == config


def test_metrics_subcommand_prints_the_exposition(
    ab: Tunnel, capsys: pytest.CaptureFixture[str]
) -> None:
    ab.round_trip("a", "b")
    code, out, err = ctl_main(ab, capsys, "metrics", "-i", "sio0")
    assert (code, err) == (0, "")
    families = {f.name: f for f in text_string_to_metric_families(out)}
    rx = families["secureiod_peer_rx_packets"].samples[0]
    assert rx.labels == {"interface": "sio0", "peer": "b"}
    assert rx.value == ab.peer("a", "b").counters.rx_packets == 1


def test_metrics_needs_one_daemon_when_several_run(
    ab: Tunnel, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two daemons' expositions cannot be concatenated (duplicate families): choose one."""
    code, out, err = ctl_main(ab, capsys, "metrics")
    assert code == 2 and out == ""
    assert "several daemons are running (sio0, sio1); choose one with -i IFNAME" in err
