"""``daemon/dns.py`` as the packaged unit needs it (the whole path, with a real resolved
and polkit under the unit, is packaging/tests/test_resolved_dns.py): resolvectl never sees
the service manager's variables, and resolved's refusal comes back with the fix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from secureiod.daemon.dns import Resolvectl, child_environment


def _fake_resolvectl(tmp_path: Path, stderr: str = "", exit_status: int = 0) -> Path:
    """A ``resolvectl`` on PATH that records its arguments and the environment it got."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    log = tmp_path / "resolvectl.log"
    script = bindir / "resolvectl"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        f"/usr/bin/env >> {log}\n"
        + (f'echo "{stderr}" >&2\nexit {exit_status}\n' if exit_status else "")
    )
    script.chmod(0o755)
    return log


def test_service_manager_variables_do_not_reach_resolvectl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing systemd tool sends ERRNO= to $NOTIFY_SOCKET: only the daemon may."""
    log = _fake_resolvectl(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    for name in ("NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC", "LISTEN_FDS", "LISTEN_PID"):
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("SECUREIOD_TEST_KEPT", "kept")
    assert Resolvectl().apply("sio0", ["198.19.0.1"]) is None
    seen = log.read_text().splitlines()
    assert "dns sio0 198.19.0.1" in seen and "domain sio0 ~." in seen, seen
    assert "SECUREIOD_TEST_KEPT=kept" in seen
    assert not [line for line in seen if line.startswith(("NOTIFY_", "WATCHDOG_", "LISTEN_"))]
    assert child_environment({"NOTIFY_SOCKET": "/run/n", "PATH": "/bin"}) == {"PATH": "/bin"}


@pytest.mark.parametrize(
    "answer",
    [
        "Failed to set DNS configuration: Access denied",
        "Failed to set DNS configuration: Interactive authentication required.",
    ],
)
def test_refusal_names_polkit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer: str) -> None:
    _fake_resolvectl(tmp_path, stderr=answer, exit_status=1)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    problem = Resolvectl().apply("sio0", ["198.19.0.1"])
    assert problem is not None
    assert problem.startswith(f"resolvectl dns failed: {answer.rstrip('.')}; "), problem
    assert "polkit" in problem and "user secureiod" in problem, problem
    assert "\n" not in problem


def test_other_failures_are_passed_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_resolvectl(tmp_path, stderr="Failed to resolve interface: No such device", exit_status=1)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert Resolvectl().revert("sio0") == (
        "resolvectl revert failed: Failed to resolve interface: No such device"
    )
