"""TunDevice against the real kernel, each test in a fresh network namespace.

The device is opened in a forked child that entered the namespace (``call_in``): a TUN
link lives in the namespace that opened ``/dev/net/tun``, and pytest must stay where it is.
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netns_util import call_in, netns, run_in

from secureiod.netlink import Netlink
from secureiod.tun import TunDevice, TunError

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="needs root and TUN"
)

TUN = "siotun0"
LOCAL = "198.19.0.1"
PEER = "198.19.0.2"


@pytest.fixture
def ns() -> Iterator[str]:
    with netns() as name:
        yield name


# --- packet helpers -------------------------------------------------------------------------


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_packet(src: str, dst: str, proto: int, payload: bytes, ident: int = 0x1234) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(payload),
        ident,
        0,
        64,
        proto,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + payload


def icmp_echo(kind: int, ident: int, seq: int, data: bytes) -> bytes:
    message = struct.pack("!BBHHH", kind, 0, 0, ident, seq) + data
    return message[:2] + struct.pack("!H", checksum(message)) + message[4:]


def parse_ipv4(packet: bytes) -> dict[str, Any]:
    ihl = (packet[0] & 0x0F) * 4
    return {
        "version": packet[0] >> 4,
        "proto": packet[9],
        "src": socket.inet_ntoa(packet[12:16]),
        "dst": socket.inet_ntoa(packet[16:20]),
        "header_ok": checksum(packet[:ihl]) == 0,
        "payload": packet[ihl:],
    }


def echo_reply_for(request: bytes) -> bytes:
    """Answer an ICMP echo request: swap addresses, type 0, fresh checksums."""
    ip = parse_ipv4(request)
    icmp = ip["payload"]
    _, _, _, ident, seq = struct.unpack("!BBHHH", icmp[:8])
    return ipv4_packet(ip["dst"], ip["src"], 1, icmp_echo(0, ident, seq, icmp[8:]))


def wait_for(tun: TunDevice, predicate: Any, timeout: float = 3.0) -> bytes | None:
    """Read from ``tun`` until a packet satisfies ``predicate`` (others, e.g. IPv6 router
    solicitations, are skipped) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        select.select([tun.fd], [], [], remaining)
        for packet in tun.read_batch():
            if predicate(packet):
                return packet
    return None


def is_echo_request_to(dst: str) -> Any:
    def match(packet: bytes) -> bool:
        if packet[0] >> 4 != 4:
            return False
        ip = parse_ipv4(packet)
        return ip["proto"] == 1 and ip["dst"] == dst and ip["payload"][0] == 8

    return match


def configured_tun(name: str = TUN) -> TunDevice:
    tun = TunDevice.open(name)
    with Netlink() as nl:
        nl.add_address(tun.name, ipaddress.ip_interface(f"{LOCAL}/24"))
        nl.set_up(tun.name)
    return tun


# --- children (run inside the namespace) ----------------------------------------------------


def _ping_through_tun() -> dict[str, Any]:
    with configured_tun() as tun:
        ping = subprocess.Popen(
            ["ping", "-n", "-c1", "-W2", PEER],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            request = wait_for(tun, is_echo_request_to(PEER))
            wrote = tun.write(echo_reply_for(request)) if request is not None else None
            output, _ = ping.communicate(timeout=5)
        finally:
            if ping.poll() is None:
                ping.kill()
                ping.wait()
        info = parse_ipv4(request) if request is not None else None
        return {
            "request": info,
            "wrote": wrote,
            "rc": ping.returncode,
            "out": output,
            "stats": tun.stats,
        }


def _kernel_answers_our_echo() -> dict[str, Any]:
    with configured_tun() as tun:
        request = ipv4_packet(PEER, LOCAL, 1, icmp_echo(8, 0x4242, 7, b"secureiod"))
        wrote = tun.write(request)
        reply = wait_for(
            tun, lambda p: p[0] >> 4 == 4 and parse_ipv4(p)["dst"] == PEER and p[9] == 1
        )
        return {"wrote": wrote, "reply": reply, "stats": tun.stats}


def _malformed_writes() -> dict[str, Any]:
    with TunDevice.open(TUN) as tun:
        down = tun.write(ipv4_packet(PEER, LOCAL, 17, b"x"))  # link still down: EIO
        with Netlink() as nl:
            nl.set_up(tun.name)
        results = [tun.write(b"\0" * 20), tun.write(b""), tun.write(b"\x70" + b"\0" * 39)]
        written = tun.write_batch([ipv4_packet(PEER, LOCAL, 17, b"y"), b"\x00junk"])
        return {"down": down, "results": results, "batch": written, "stats": tun.stats}


def _open_twice(multi_queue: bool) -> dict[str, Any]:
    first = TunDevice.open(TUN, multi_queue=multi_queue)
    try:
        try:
            second = TunDevice.open(TUN, multi_queue=multi_queue)
        except TunError as exc:
            return {"error": str(exc), "errno": exc.errno}
        second.close()
        return {"error": None, "second_preexisted": second.preexisted}
    finally:
        first.close()


def _open_and_close(name: str) -> dict[str, Any]:
    tun = TunDevice.open(name)
    opened = {"name": tun.name, "preexisted": tun.preexisted, "fd_ok": tun.fd >= 0}
    tun.close()
    tun.close()  # idempotent
    try:
        socket.if_nametoindex(opened["name"])
        exists_after = True
    except OSError:
        exists_after = False
    return {**opened, "exists_after": exists_after, "fd_after": tun.fd}


def _open_error(name: str) -> str:
    try:
        TunDevice.open(name).close()
    except TunError as exc:
        return str(exc)
    return "no error"


def _use_after_delete() -> dict[str, Any]:
    tun = configured_tun()
    with Netlink() as nl:
        nl.delete_link(tun.name)
    out: dict[str, Any] = {}
    for what, call in (("read", tun.read_batch), ("write", lambda: tun.write(b"\x45" + bytes(19)))):
        try:
            call()
            out[what] = "no error"
        except TunError as exc:
            out[what] = str(exc)
    tun.close()
    try:
        tun.write(b"\x45" + bytes(19))
        out["closed"] = "no error"
    except TunError as exc:
        out["closed"] = str(exc)
    return out


# --- tests ----------------------------------------------------------------------------------


def test_ping_request_is_read_and_crafted_reply_answers_it(ns: str) -> None:
    result = call_in(ns, _ping_through_tun)
    request = result["request"]
    assert request is not None, f"no echo request read from the TUN; ping said {result['out']}"
    assert request["version"] == 4
    assert request["proto"] == 1
    assert request["dst"] == PEER
    assert request["src"] == LOCAL
    assert request["header_ok"]
    assert result["wrote"] is True
    assert result["rc"] == 0, result["out"]
    stats = result["stats"]
    assert stats.packets_read >= 1
    assert stats.packets_written == 1
    assert stats.write_errors == {}


def test_written_packet_reaches_the_kernel_which_answers_through_the_tun(ns: str) -> None:
    result = call_in(ns, _kernel_answers_our_echo)
    assert result["wrote"] is True
    reply = result["reply"]
    assert reply is not None, "the kernel's echo reply never came out of the TUN"
    ip = parse_ipv4(reply)
    assert (ip["src"], ip["dst"], ip["header_ok"]) == (LOCAL, PEER, True)
    kind, code, _, ident, seq = struct.unpack("!BBHHH", ip["payload"][:8])
    assert (kind, code, ident, seq) == (0, 0, 0x4242, 7)
    assert ip["payload"][8:] == b"secureiod"
    assert checksum(ip["payload"]) == 0


def test_refused_writes_are_counted_not_raised(ns: str) -> None:
    result = call_in(ns, _malformed_writes)
    assert result["down"] is False
    assert result["results"] == [False, False, False]
    assert result["batch"] == 1
    stats = result["stats"]
    assert stats.write_errors == {"EIO": 1, "EINVAL": 4}
    assert stats.write_failures == 5
    assert stats.packets_written == 1


def test_second_open_is_busy_without_multi_queue(ns: str) -> None:
    result = call_in(ns, _open_twice, False)
    assert result["errno"] == 16  # EBUSY
    assert "in use" in result["error"]
    assert "\n" not in result["error"]


def test_multi_queue_allows_several_queues(ns: str) -> None:
    result = call_in(ns, _open_twice, True)
    assert result == {"error": None, "second_preexisted": True}


def test_new_device_is_not_preexisting_and_vanishes_on_close(ns: str) -> None:
    result = call_in(ns, _open_and_close, TUN)
    assert result == {
        "name": TUN,
        "preexisted": False,
        "fd_ok": True,
        "exists_after": False,
        "fd_after": -1,
    }


def test_kernel_picks_the_number_in_a_template(ns: str) -> None:
    result = call_in(ns, _open_and_close, "siot%d")
    assert result["name"] == "siot0"
    assert result["preexisted"] is False


def test_persistent_device_reports_preexisted_and_survives_close(ns: str) -> None:
    run_in(ns, ["ip", "tuntap", "add", "dev", TUN, "mode", "tun"], check=True)
    result = call_in(ns, _open_and_close, TUN)
    assert result["preexisted"] is True
    assert result["exists_after"] is True


def test_existing_link_that_is_not_a_tun_is_refused(ns: str) -> None:
    run_in(ns, ["ip", "link", "add", "siov0", "type", "veth", "peer", "name", "siov1"], check=True)
    message = call_in(ns, _open_error, "siov0")
    assert "siov0 exists but is not a TUN device" in message


def test_deleted_or_closed_device_raises(ns: str) -> None:
    result = call_in(ns, _use_after_delete)
    assert "detached" in result["read"]
    assert "detached" in result["write"]
    assert "closed" in result["closed"]


def test_missing_clone_device_says_modprobe(tmp_path: Path) -> None:
    with pytest.raises(TunError, match="modprobe tun") as info:
        TunDevice.open("siotun9", clone_device=str(tmp_path / "tun"))
    assert info.value.errno == 2


@pytest.mark.parametrize("name", ["", "a" * 16, "a/b", "a b", "tün"])
def test_bad_names_are_refused_before_any_system_call(name: str) -> None:
    with pytest.raises(ValueError, match="interface name"):
        TunDevice.open(name, clone_device="/nonexistent")
