"""drop_privileges in forked children (never in the pytest process), each inside a fresh
network namespace so the CAP_NET_ADMIN it keeps can only touch that namespace."""

from __future__ import annotations

import errno
import ipaddress
import os
import pwd
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netns_util import call_in, netns

from secureiod.netlink import Netlink, NetlinkError
from secureiod.privileges import (
    PrivilegeError,
    bounding_set,
    capability_mask,
    current_capabilities,
    drop_privileges,
    permitted_capabilities,
)
from secureiod.tun import TunDevice, TunError

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="needs root and TUN"
)

TUN = "siotun0"


@pytest.fixture
def ns() -> Iterator[str]:
    with netns() as name:
        yield name


def _status_field(name: str) -> str:
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return ""


def _can_read(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except PermissionError:
        return "denied"
    return "read"


def _drop_and_probe(keep: tuple[str, ...]) -> dict[str, Any]:
    """Child: open a TUN as root, drop to nobody, then see what is still possible."""
    tun = TunDevice.open(TUN)  # before the drop, as the daemon does
    drop_privileges("nobody", keep_caps=keep)
    out: dict[str, Any] = {
        "resuid": os.getresuid(),
        "resgid": os.getresgid(),
        "groups": os.getgroups(),
        "effective": current_capabilities(),
        "permitted": permitted_capabilities(),
        "bounding": bounding_set(),
        "no_new_privs": _status_field("NoNewPrivs"),
        "shadow": _can_read("/etc/shadow"),
    }
    try:
        with Netlink() as nl:
            nl.set_mtu(TUN, 1400)
            nl.add_address(TUN, ipaddress.ip_interface("198.19.0.1/24"))
            nl.set_up(TUN)
            out["netlink"] = ("ok", nl.get_mtu(TUN))
    except NetlinkError as exc:
        out["netlink"] = ("error", exc.code, str(exc))
    try:
        TunDevice.open("siotun1").close()
        out["new_tun"] = "ok"
    except TunError as exc:
        out["new_tun"] = f"error: {exc}"
    # The descriptor opened as root keeps working (the link is up only if netlink worked).
    out["old_tun_write"] = tun.write(b"\x45" + bytes(19))
    try:
        os.setuid(0)
        out["setuid0"] = "succeeded"
    except PermissionError:
        out["setuid0"] = "denied"
    tun.close()
    return out


def test_drop_to_nobody_keeps_only_net_admin(ns: str) -> None:
    nobody = pwd.getpwnam("nobody")
    result = call_in(ns, _drop_and_probe, ("CAP_NET_ADMIN",))
    assert result["resuid"] == (nobody.pw_uid,) * 3
    assert result["resgid"] == (nobody.pw_gid,) * 3
    assert result["groups"] == []
    assert result["effective"] == {"CAP_NET_ADMIN"}
    assert result["permitted"] == {"CAP_NET_ADMIN"}
    assert result["bounding"] == {"CAP_NET_ADMIN"}
    assert result["no_new_privs"] == "1"
    assert result["shadow"] == "denied"
    assert result["setuid0"] == "denied"
    assert result["netlink"] == ("ok", 1400)
    assert result["old_tun_write"] is True
    # A new TUN needs CAP_NET_ADMIN (kept) and access to the clone device (its mode).
    if os.stat("/dev/net/tun").st_mode & (stat.S_IROTH | stat.S_IWOTH) == (
        stat.S_IROTH | stat.S_IWOTH
    ):
        assert result["new_tun"] == "ok"
    else:
        assert result["new_tun"].startswith("error: permission denied opening /dev/net/tun")


def test_without_net_admin_link_changes_are_refused(ns: str) -> None:
    result = call_in(ns, _drop_and_probe, ())
    assert result["effective"] == set()
    assert result["bounding"] == set()
    kind, code, message = result["netlink"]
    assert (kind, code) == ("error", errno.EPERM)
    assert "needs CAP_NET_ADMIN" in message


def _drop_with_a_thread() -> str:
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        drop_privileges("nobody")
    except PrivilegeError as exc:
        return str(exc)
    finally:
        stop.set()
        thread.join()
    return "no error"


def test_refuses_while_other_threads_run(ns: str) -> None:
    message = call_in(ns, _drop_with_a_thread)
    assert "threads running" in message


def _drop_unknown(user: str) -> str:
    try:
        drop_privileges(user)
    except PrivilegeError as exc:
        return str(exc)
    return "no error"


def test_missing_user_is_a_clear_error(ns: str) -> None:
    message = call_in(ns, _drop_unknown, "sio-no-such-user")
    assert message.startswith("user 'sio-no-such-user' does not exist")
    assert "\n" not in message


def test_capability_names() -> None:
    assert capability_mask(["CAP_NET_ADMIN"]) == 1 << 12
    assert capability_mask(["net_admin", "cap_net_raw"]) == (1 << 12) | (1 << 13)
    with pytest.raises(ValueError, match="unknown capability"):
        capability_mask(["CAP_FLY"])


def test_reading_our_own_sets() -> None:
    """Read-only: the pytest process runs as root with (nearly) every capability."""
    assert "CAP_NET_ADMIN" in current_capabilities()
    assert "CAP_NET_ADMIN" in bounding_set()
