"""Network-namespace helpers for tests that touch real links (they need root).

Every namespace is uniquely named per run (``sio-t-<pid>-<random>``) so parallel or
crashed runs never collide, and is deleted on exit even when the test fails, after killing
whatever still runs inside it (a leftover process would keep the namespace alive). Code
under test runs either in a subprocess (``run_in``) or in a forked child that enters the
namespace (``call_in``): the pytest process itself never changes namespace.

Addresses are checked against the ranges tests may use, so a typo cannot send traffic
anywhere real: underlay 198.18.0.0/15, tunnel 198.19.0.0/16 and fd00:5ec::/48.
"""

from __future__ import annotations

import ipaddress
import os
import pickle
import secrets
import select
import signal
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any, Final, TypeVar

__all__ = [
    "ALLOWED_NETWORKS",
    "call_in",
    "check_allowed",
    "netns",
    "netns_pids",
    "run_in",
    "unique_name",
    "veth_pair",
]

T = TypeVar("T")

ALLOWED_NETWORKS: Final = (
    ipaddress.ip_network("198.18.0.0/15"),
    ipaddress.ip_network("fd00:5ec::/48"),
)
_TIMEOUT: Final = 20.0


def unique_name(prefix: str = "sio-t") -> str:
    """A name no other run uses: pid for parallel runs, random part within one run."""
    return f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"


def check_allowed(address: str) -> None:
    """Refuse any address outside the test ranges (see module doc)."""
    iface = ipaddress.ip_interface(address)
    for net in ALLOWED_NETWORKS:
        if net.version == iface.version and iface.network.subnet_of(net):  # type: ignore[arg-type]
            return
    raise ValueError(f"{address} is outside the test ranges 198.18.0.0/15 and fd00:5ec::/48")


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", *argv], check=check, capture_output=True, text=True, timeout=_TIMEOUT
    )


def netns_pids(name: str) -> list[int]:
    result = _ip("netns", "pids", name, check=False)
    return [int(p) for p in result.stdout.split() if p.isdigit()]


def _destroy(name: str) -> None:
    """Kill what runs inside, then delete; bounded in time whatever happens."""
    me = os.getpid()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        pids = [p for p in netns_pids(name) if p != me]
        if not pids:
            break
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    _ip("netns", "del", name, check=False)


@contextmanager
def netns(name_prefix: str = "sio-t") -> Iterator[str]:
    """A fresh namespace with ``lo`` up; yields its name and deletes it on exit."""
    name = unique_name(name_prefix)
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        _destroy(name)


def run_in(ns: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run`` of ``argv`` inside ``ns``; captures text output and times out
    unless told otherwise."""
    kw.setdefault("timeout", _TIMEOUT)
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    return subprocess.run(["ip", "netns", "exec", ns, *argv], **kw)


def veth_pair(
    ns_a: str,
    ns_b: str,
    addr_a: str,
    addr_b: str,
    *,
    name_a: str = "sio-a",
    name_b: str = "sio-b",
) -> tuple[str, str]:
    """A veth link ``name_a`` in ``ns_a`` <-> ``name_b`` in ``ns_b``, addressed and up.

    It is created inside ``ns_a`` (never in ours), so fixed short names cannot clash with
    the host's links; IPv6 addresses skip duplicate address detection to be usable at once.
    """
    check_allowed(addr_a)
    check_allowed(addr_b)
    _ip("-n", ns_a, "link", "add", name_a, "type", "veth", "peer", "name", name_b, "netns", ns_b)
    for ns, name, addr in ((ns_a, name_a, addr_a), (ns_b, name_b, addr_b)):
        extra = ["nodad"] if ":" in addr else []
        _ip("-n", ns, "addr", "add", addr, "dev", name, *extra)
        _ip("-n", ns, "link", "set", name, "up")
    return name_a, name_b


def call_in(ns: str, func: Callable[..., T], *args: Any, timeout: float = _TIMEOUT) -> T:
    """Run ``func(*args)`` in a forked child that has entered ``ns``; return its result.

    The child's exception comes back as a ``RuntimeError`` carrying its traceback. The
    child always ends with ``os._exit`` (never running pytest's exit handlers) and is
    killed if it outlives ``timeout``. Use it for code that must run *in* the namespace
    (a TUN device belongs to the namespace that opened ``/dev/net/tun``) or that changes
    the process irrevocably (dropping privileges).
    """
    from pyroute2 import netns as pyroute2_netns

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        status = 0
        try:
            os.close(read_fd)
            try:
                pyroute2_netns.setns(ns, flags=0)
                payload = pickle.dumps(("ok", func(*args)))
            except BaseException:
                payload = pickle.dumps(("error", traceback.format_exc()))
            with os.fdopen(write_fd, "wb") as out:
                out.write(payload)
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(write_fd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                raise TimeoutError(f"child in {ns} did not finish within {timeout} s")
            ready, _, _ = select.select([read_fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        _reap(pid)
    if not chunks:
        raise RuntimeError(f"child in {ns} died without a result")
    kind, value = pickle.loads(b"".join(chunks))
    if kind == "error":
        raise RuntimeError(f"child in {ns} failed:\n{value}")
    return value  # type: ignore[no-any-return]


def _reap(pid: int) -> None:
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        time.sleep(0.01)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    os.waitpid(pid, 0)
