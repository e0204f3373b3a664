"""The daemon's command line: refusals are one line with the right exit status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from secureiod.secureio.identity import Identity, write_identity_file

DAEMON = [sys.executable, "-m", "secureiod.cli.daemon"]
CTL = [sys.executable, "-m", "secureiod.cli.secureioctl"]


def _config(tmp_path: Path, extra: str = "") -> Path:
    key = tmp_path / "id_ed25519"
    write_identity_file(key, Identity.generate())
    peer = Identity.generate().public_key
    path = tmp_path / "sio9.toml"
    path.write_text(
        f"""[interface]
private_key = "{key}"
address = ["198.19.9.1/24"]
control_socket = "{tmp_path}/sio9.sock"
{extra}
[[peer]]
name = "b"
public_key = "{peer}"
allowed_ips = ["198.19.9.2/32"]
"""
    )
    return path


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def test_check_accepts_a_good_config(tmp_path: Path) -> None:
    r = _run([*DAEMON, "--check", "--config", str(_config(tmp_path))])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{tmp_path}/sio9.toml: OK: interface sio9, 1 peer")


def test_bad_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = _config(tmp_path, extra="mtu = 100")
    for argv in ([*DAEMON, "--check", "--config", str(path)], [*DAEMON, "--config", str(path)]):
        r = _run(argv)
        assert r.returncode == 2
        assert r.stderr == (
            f"secureiod: error: {path}: interface.mtu: 100 is out of range; "
            'use 576..65535 or "auto"\n'
        ), r.stderr
        assert "Traceback" not in r.stderr


def test_missing_config_names_the_file(tmp_path: Path) -> None:
    r = _run([*DAEMON, "--config", str(tmp_path / "nope.toml")])
    assert r.returncode == 2
    assert r.stderr == f"secureiod: error: {tmp_path}/nope.toml: config file does not exist\n"


def test_require_unprivileged_refuses_full_root(tmp_path: Path) -> None:
    """The unit passes --require-unprivileged: as root with every capability (this test
    runs as root) the daemon must refuse before serving, naming the fix."""
    name = f"sio-u-{tmp_path.name[-6:]}".replace("_", "")[:15]
    ns = subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        r = _run(
            [
                "ip",
                "netns",
                "exec",
                name,
                *DAEMON,
                "--config",
                str(_config(tmp_path)),
                "--require-unprivileged",
            ]
        )
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
    assert ns.returncode == 0
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if "--require-unprivileged" in ln]
    assert len(lines) == 1 and "running as uid 0 with CAP_" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_secureioctl_says_when_no_daemon_runs(tmp_path: Path) -> None:
    r = _run([*CTL, "status", "--socket", str(tmp_path / "none.sock")])
    assert r.returncode == 1
    assert r.stderr == (
        f"secureioctl status: error: {tmp_path}/none.sock: no such control socket; "
        "is secureiod running for this interface?\n"
    )


def test_genkey_and_pubkey_round_trip(tmp_path: Path) -> None:
    key = tmp_path / "keys" / "id_ed25519"
    r = _run([*CTL, "genkey", str(key)])
    assert r.returncode == 0, r.stderr
    public = r.stdout.strip()
    assert (key.stat().st_mode & 0o777) == 0o600
    assert _run([*CTL, "pubkey", str(key)]).stdout.strip() == public
    assert _run([*CTL, "pubkey", str(key) + ".pub"]).stdout.strip() == public
    again = _run([*CTL, "genkey", str(key)])
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
