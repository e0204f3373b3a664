"""Bash completion (packaging/completion/): run by a real bash, the way readline calls it
(COMP_WORDS, COMP_CWORD, then the completion function), and kept in step with the
argument parsers: every option of every subcommand must be offered."""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from secureiod.cli import daemon, secureioctl

REPO = Path(__file__).resolve().parent.parent
COMPLETION = REPO / "packaging" / "completion"
BASH = shutil.which("bash") or "/bin/bash"


def complete(script: str, words: list[str], env: dict[str, str] | None = None) -> list[str]:
    """What the completion function offers for the last of ``words`` (being typed)."""
    function = {"secureioctl": "_secureioctl", "secureiod": "_secureiod"}[script]
    program = (
        f"source {COMPLETION / script}\n"
        f"COMP_WORDS=({' '.join(_quote(w) for w in words)})\n"
        f"COMP_CWORD={len(words) - 1}\n"
        f"{function}\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(
        [BASH, "--norc", "--noprofile", "-c", program],
        capture_output=True,
        text=True,
        timeout=10,
        env=env,
        check=False,
    )
    assert result.returncode == 0 and result.stderr == "", result
    return [line for line in result.stdout.splitlines() if line]


def _quote(word: str) -> str:
    return "'" + word.replace("'", "'\\''") + "'"


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for action in parser._actions for o in action.option_strings}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_every_subcommand_is_offered() -> None:
    commands = set(_subparsers(secureioctl.build_parser()))
    assert set(complete("secureioctl", ["secureioctl", ""])) == commands
    assert complete("secureioctl", ["secureioctl", "sh"]) == ["show", "showconf"]


@pytest.mark.parametrize("command", sorted(_subparsers(secureioctl.build_parser())))
def test_every_option_of_each_subcommand_is_offered(command: str) -> None:
    parser = _subparsers(secureioctl.build_parser())[command]
    offered = complete("secureioctl", ["secureioctl", command, "-"])
    assert set(offered) == _options(parser), command


def test_every_option_of_the_daemon_is_offered() -> None:
    offered = complete("secureiod", ["secureiod", "-"])
    assert set(offered) == _options(daemon.build_parser())


def test_option_values(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("sio0", "sio1"):
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(run_dir / f"{name}.sock"))
    (run_dir / "not-a-socket.sock").write_text("")
    env = {"SECUREIOD_RUN_DIR": str(run_dir), "PATH": "/usr/bin:/bin"}
    assert complete("secureioctl", ["secureioctl", "metrics", "-i", ""], env) == ["sio0", "sio1"]
    assert complete("secureioctl", ["secureioctl", "show", "--interface", "sio1"], env) == ["sio1"]
    assert complete("secureioctl", ["secureioctl", "pubkey", "--format", ""]) == ["base64", "pem"]
    assert complete("secureioctl", ["secureioctl", "cat", "--negotiation", "o"]) == ["on", "off"]
    key = tmp_path / "id_ed25519"
    key.write_text("")
    assert complete("secureioctl", ["secureioctl", "genkey", str(tmp_path / "id_")]) == [str(key)]
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    (conf_dir / "sio0.toml").write_text("")
    (conf_dir / "notes.txt").write_text("")
    env = {"SECUREIOD_CONFIG_DIR": str(conf_dir), "PATH": "/usr/bin:/bin"}
    assert complete("secureiod", ["secureiod", "-i", ""], env) == ["sio0"]
    assert complete("secureiod", ["secureiod", "--log-level", "w"]) == ["warning"]


def test_each_file_completes_the_command_it_is_named_for() -> None:
    """bash-completion loads /usr/share/bash-completion/completions/NAME when NAME is
    first completed (the .deb installs these files there): each must register NAME."""
    files = sorted(p.name for p in COMPLETION.iterdir())
    assert files == ["secureioctl", "secureiod"]
    for name in files:
        text = (COMPLETION / name).read_text()
        assert text.rstrip().endswith(f"complete -F _{name} {name}"), name
