"""Small things a new user trips on (issue 12, item 3), each of which once gave a
confusing result: a config saved with a byte-order mark, and a listen port that is taken.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fakes import two_sites

from secureiod.config import load_config
from secureiod.udp import BindError, UdpSocket


def test_a_config_saved_with_a_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    """Windows Notepad writes UTF-8 with a BOM in front; TOML has no use for it."""
    spec = two_sites(tmp_path).nodes["a"]
    path = spec.write()
    plain = load_config(path)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert load_config(path) == plain


def test_address_in_use_names_the_address_and_who_holds_it() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        with pytest.raises(BindError) as info:
            UdpSocket.bind(("127.0.0.1", port))
    text = str(info.value)
    assert text.startswith(f"cannot listen on 127.0.0.1:{port}: the address is already in use")
    assert f"(pid {os.getpid()})" in text, text  # this test process holds it
    assert "choose another port" in text
    assert "\n" not in text and "Errno" not in text


def test_address_in_use_by_another_process_is_named() -> None:
    """The usual case: another program (an earlier daemon) holds the port."""
    code = (
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.bind(('127.0.0.1', 0))\n"
        "print(s.getsockname()[1], flush=True)\n"
        "time.sleep(30)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        with pytest.raises(BindError) as info:
            UdpSocket.bind(("127.0.0.1", port))
        assert f"(pid {proc.pid})" in str(info.value), str(info.value)
    finally:
        proc.kill()
        proc.wait(5)


def test_other_bind_failures_name_the_address() -> None:
    with pytest.raises(BindError) as info:
        UdpSocket.bind(("198.18.77.77", 0))  # not an address of this host
    assert str(info.value) == (
        "cannot listen on 198.18.77.77:0: no interface of this host has that address"
    )
