"""End-to-end harness: network namespaces, veth links and running ``secureiod`` daemons.

``Net`` owns everything a scenario creates: namespaces (named ``sio-<pid>-<n>``, unique per
run), veth links, ``Node``s (one namespace + one key + one config + one daemon) and helper
processes. ``Net.close()`` kills every process left in its namespaces, deletes them and
removes the work directory; it runs from the pytest fixture's finalizer, from ``atexit``
and (for the demo) from a ``with`` block, so nothing survives a failure or Ctrl-C. A run
that was SIGKILLed leaves namespaces whose pid is dead: ``cleanup_orphans()`` removes those.

Traffic stays inside namespaces this module creates. Addresses are checked against the
ranges the suite may use: underlay 198.18.0.0/16 and fd00:5ec:ff::/64, tunnel
198.19.0.0/16 and fd00:5ec::/48 (minus the underlay /64). No namespace gets a default
route. Every wait is a bounded poll (no fixed sleeps), every command has a timeout.

Shared by ``netns-tests/`` (through its conftest) and ``scripts/demo.py``.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import ipaddress
import itertools
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final

__all__ = [
    "CommandError",
    "Net",
    "Node",
    "Transfer",
    "check_tunnel",
    "check_underlay",
    "cleanup_orphans",
    "expected_payload",
    "make_random_file",
    "poll",
]

REPO: Final = Path(__file__).resolve().parent.parent
PORT: Final = 5800
CMD_TIMEOUT: Final = 30.0
POLL_INTERVAL: Final = 0.05
LOG_TAIL_BYTES: Final = 100_000

UNDERLAY_NETS: Final = (
    ipaddress.ip_network("198.18.0.0/16"),
    ipaddress.ip_network("fd00:5ec:ff::/64"),
)
TUNNEL_NETS: Final = (
    ipaddress.ip_network("198.19.0.0/16"),
    ipaddress.ip_network("fd00:5ec::/48"),
)
_NS_RE: Final = re.compile(r"^sio-(\d+)-\d+$")
_DIR_RE: Final = re.compile(r"^sio-(\d+)-[A-Za-z0-9_]+$")
_counter = itertools.count(1)
_live: set[Net] = set()


# -- small utilities ----------------------------------------------------------------------


def _tool(name: str) -> str:
    """The venv's console script (next to this interpreter), else one on PATH."""
    for directory in (Path(sys.executable).parent, REPO / ".venv" / "bin"):
        candidate = directory / name
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found next to {sys.executable} nor on PATH")
    return found


SECUREIOD: Final = _tool("secureiod")
SECUREIOCTL: Final = _tool("secureioctl")
PYTHON: Final = sys.executable


class CommandError(AssertionError):
    """A command that exited non-zero; carries its output."""

    def __init__(self, argv: Sequence[str], result: subprocess.CompletedProcess[str]) -> None:
        self.argv = list(argv)
        self.result = result
        super().__init__(
            f"command failed (exit {result.returncode}): {' '.join(map(str, argv))}\n"
            f"stdout: {result.stdout.strip()}\nstderr: {result.stderr.strip()}"
        )


def run(
    argv: Sequence[str], *, timeout: float = CMD_TIMEOUT, check: bool = True, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run`` with text output captured and a timeout (the child is killed)."""
    kw.setdefault("capture_output", True)
    kw.setdefault("stdin", subprocess.DEVNULL)
    result = subprocess.run(list(argv), text=True, timeout=timeout, **kw)
    if check and result.returncode != 0:
        raise CommandError(argv, result)
    return result


def poll(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    *,
    interval: float = POLL_INTERVAL,
    describe: Callable[[], str] | None = None,
) -> Any:
    """Call ``predicate`` every ``interval`` s until it returns something truthy (returned);
    ``AssertionError`` naming ``what`` (and ``describe()``) after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f"\n{describe()}" if describe is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{detail}")
        time.sleep(interval)


def _check(address: str, nets: Iterable[ipaddress._BaseNetwork], kind: str) -> None:
    iface = ipaddress.ip_interface(address)
    ok = any(
        net.version == iface.version and iface.network.subnet_of(net)  # type: ignore[arg-type]
        for net in nets
    )
    if kind == "tunnel" and iface.version == 6:
        ok = ok and not iface.network.overlaps(UNDERLAY_NETS[1])
    if not ok:
        raise ValueError(f"{address} is not a {kind} address this suite may use")


def check_underlay(address: str) -> None:
    """Refuse underlay addresses outside 198.18.0.0/16 and fd00:5ec:ff::/64."""
    _check(address, UNDERLAY_NETS, "underlay")


def check_tunnel(address: str) -> None:
    """Refuse tunnel addresses outside 198.19.0.0/16 and fd00:5ec::/48 (minus underlay)."""
    _check(address, TUNNEL_NETS, "tunnel")


def _host(address: str) -> str:
    return str(ipaddress.ip_interface(address).ip)


def _host_prefix(address: str) -> str:
    ip = ipaddress.ip_interface(address).ip
    return f"{ip}/{ip.max_prefixlen}"


def _endpoint(address: str, port: int = PORT) -> str:
    ip = ipaddress.ip_interface(address).ip
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for everything we write
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ns_pids(ns: str) -> list[int]:
    result = run(["ip", "netns", "pids", ns], check=False, timeout=10)
    return [int(p) for p in result.stdout.split() if p.isdigit()]


def _destroy_namespace(ns: str) -> None:
    """Kill everything inside ``ns``, then delete it; bounded in time."""
    me = os.getpid()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        pids = [p for p in _ns_pids(ns) if p != me]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    run(["ip", "netns", "del", ns], check=False, timeout=10)


def cleanup_orphans() -> list[str]:
    """Delete namespaces and work dirs left by runs whose process is gone (SIGKILL)."""
    removed = []
    listing = run(["ip", "netns", "list"], check=False, timeout=10).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NS_RE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _destroy_namespace(name)
            removed.append(name)
    tmp = Path(tempfile.gettempdir())
    for entry in tmp.glob("sio-*"):
        m = _DIR_RE.match(entry.name)
        if m and entry.is_dir() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(str(entry))
    return removed


def expected_payload(underlay_mtu: int, ipv6: bool) -> int:
    """The secureio payload limit P the daemon derives from the underlay MTU toward a peer:
    ((mtu - IP/UDP header (28 or 48) - 53 bytes of secureio overhead) // 16) * 16."""
    return ((underlay_mtu - (48 if ipv6 else 28) - 53) // 16) * 16


def make_random_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``; return their sha256."""
    h = hashlib.sha256()
    chunk = 1 << 20
    with open(path, "wb") as f:
        left = size
        while left:
            data = os.urandom(min(chunk, left))
            h.update(data)
            f.write(data)
            left -= len(data)
    return h.hexdigest()


# -- the network ---------------------------------------------------------------------------


class Net:
    """Namespaces, links, nodes and helper processes of one scenario; ``close()`` undoes
    all of it (also usable as a context manager)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.namespaces: list[str] = []
        self.nodes: list[Node] = []
        self.procs: list[subprocess.Popen[Any]] = []
        self._links: dict[str, int] = {}
        self._closed = False
        self.workdir = Path(tempfile.mkdtemp(prefix=f"sio-{self.pid}-"))
        _live.add(self)

    def __enter__(self) -> Net:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- namespaces and links --

    def namespace(self) -> str:
        """A new namespace with ``lo`` up, no routes, IPv6 DAD off for new links."""
        while True:
            name = f"sio-{self.pid}-{next(_counter)}"
            if not Path("/run/netns", name).exists():
                break
        self.namespaces.append(name)  # first: an interrupted add is still cleaned up
        run(["ip", "netns", "add", name])
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        run(
            [
                "ip", "netns", "exec", name, "sysctl", "-q", "-w",
                "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
            ]
        )  # fmt: skip
        return name

    def link(
        self,
        ns_a: str,
        ns_b: str,
        addr_a: str | Sequence[str] = (),
        addr_b: str | Sequence[str] = (),
        *,
        mtu: int | None = None,
    ) -> tuple[str, str]:
        """A veth ``ulN`` in ``ns_a`` <-> ``ulM`` in ``ns_b``, addressed (underlay ranges
        only, IPv6 with ``nodad``), optional MTU on both ends, up. Returns the two names."""
        addrs_a = [addr_a] if isinstance(addr_a, str) else list(addr_a)
        addrs_b = [addr_b] if isinstance(addr_b, str) else list(addr_b)
        for a in (*addrs_a, *addrs_b):
            check_underlay(a)
        name_a = self._link_name(ns_a)
        name_b = self._link_name(ns_b)
        run(
            ["ip", "-n", ns_a, "link", "add", name_a, "type", "veth",
             "peer", "name", name_b, "netns", ns_b]
        )  # fmt: skip
        for ns, dev, addrs in ((ns_a, name_a, addrs_a), (ns_b, name_b, addrs_b)):
            if mtu is not None:
                run(["ip", "-n", ns, "link", "set", dev, "mtu", str(mtu)])
            for address in addrs:
                self.add_address(ns, dev, address)
            run(["ip", "-n", ns, "link", "set", dev, "up"])
        return name_a, name_b

    def _link_name(self, ns: str) -> str:
        n = self._links.get(ns, 0)
        self._links[ns] = n + 1
        return f"ul{n}"

    def add_address(self, ns: str, dev: str, address: str) -> None:
        check_underlay(address)
        extra = ["nodad"] if ipaddress.ip_interface(address).version == 6 else []
        run(["ip", "-n", ns, "addr", "add", address, "dev", dev, *extra])

    def del_address(self, ns: str, dev: str, address: str) -> None:
        run(["ip", "-n", ns, "addr", "del", address, "dev", dev])

    def genkey(self, name: str) -> str:
        """A key pair under the work dir that no node uses; its public key."""
        return run([SECUREIOCTL, "genkey", str(self.workdir / f"{name}.key")]).stdout.strip()

    # -- nodes --

    def node(
        self,
        name: str,
        *,
        ns: str | None = None,
        address: Sequence[str] | None = None,
        listen: str = f"0.0.0.0:{PORT}",
        **interface: Any,
    ) -> Node:
        """A node in ``ns`` (a new namespace by default) with a fresh key. Tunnel
        addresses default to 198.19.0.N/24 and fd00:5ec::N/64 (N = 1, 2, ... per node)."""
        if address is None:
            n = len(self.nodes) + 1
            address = [f"198.19.0.{n}/24", f"fd00:5ec::{n}/64"]
        node = Node(self, name, ns or self.namespace(), list(address), listen, interface)
        self.nodes.append(node)
        return node

    def pair(
        self,
        *,
        ipv6_underlay: bool = False,
        mtu: int | None = None,
        start: bool = True,
        timeout: float = 10.0,
    ) -> tuple[Node, Node]:
        """The standard two-site tunnel: nodes ``a`` and ``b`` in two namespaces joined by
        a veth (198.18.0.1/24 <-> 198.18.0.2/24, or fd00:5ec:ff::1/64 <-> ::2/64), each
        the other's peer with an endpoint; started and established unless ``start=False``."""
        if ipv6_underlay:
            ua, ub, listen = "fd00:5ec:ff::1/64", "fd00:5ec:ff::2/64", f"[::]:{PORT}"
        else:
            ua, ub, listen = "198.18.0.1/24", "198.18.0.2/24", f"0.0.0.0:{PORT}"
        a = self.node("a", listen=listen)
        b = self.node("b", listen=listen)
        a.dev, b.dev = self.link(a.ns, b.ns, ua, ub, mtu=mtu)
        a.underlay, b.underlay = _host(ua), _host(ub)
        a.add_peer(b, endpoint=_endpoint(ub))
        b.add_peer(a, endpoint=_endpoint(ua))
        if start:
            a.start(wait=False)
            b.start(wait=False)
            a.wait_ready()
            b.wait_ready()
            a.wait_established("b", timeout)
            b.wait_established("a", timeout)
        return a, b

    def hub(self, *, hub_knows_c: bool = True) -> tuple[Node, Node, Node]:
        """Hub ``a`` with spokes ``b`` and ``c`` on two underlay links (198.18.1.0/24,
        198.18.2.0/24), each spoke knowing only the hub; started, and established between
        the hub and every spoke it knows. ``hub_knows_c=False``: the hub's config leaves
        ``c`` out (a test adds it by reload), while ``c`` knows the hub from the start."""
        a = self.node("a")  # 198.19.0.1
        b = self.node("b")  # 198.19.0.2
        c = self.node("c")  # 198.19.0.3
        self.link(a.ns, b.ns, "198.18.1.1/24", "198.18.1.2/24")
        self.link(a.ns, c.ns, "198.18.2.1/24", "198.18.2.2/24")
        a.add_peer(b, endpoint="198.18.1.2:5800")
        if hub_knows_c:
            a.add_peer(c, endpoint="198.18.2.2:5800")
        b.add_peer(a, endpoint="198.18.1.1:5800")
        c.add_peer(a, endpoint="198.18.2.1:5800")
        for node in (a, b, c):
            node.start(wait=False)
        for node in (a, b, c):
            node.wait_ready()
        a.wait_established("b")
        b.wait_established("a")
        if hub_knows_c:
            a.wait_established("c")
            c.wait_established("a")
        return a, b, c

    # -- helper processes --

    def popen(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """A background process in ``ns``; killed by ``close()`` at the latest."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)
        self.procs.append(proc)
        return proc

    # -- checks and teardown --

    def assert_isolated(self) -> None:
        """No namespace of ours has a default route (nothing can leave the machine)."""
        for ns in self.namespaces:
            for family in ("-4", "-6"):
                routes = run(["ip", "-n", ns, family, "route", "show", "default"]).stdout
                assert not routes.strip(), f"{ns} has a default route: {routes}"

    def stop_all(self) -> None:
        """SIGTERM every running daemon and assert each exits 0 and removes its device."""
        errors = []
        for node in self.nodes:
            if node.running:
                try:
                    node.stop()
                except AssertionError as exc:
                    errors.append(str(exc))
        assert not errors, "\n".join(errors)

    def close(self) -> None:
        """Kill what still runs, delete the namespaces and the work dir. Idempotent."""
        if self._closed:
            return
        for node in self.nodes:
            node.terminate()
            node.final_log = node.read_log()
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        for ns in reversed(self.namespaces):
            _destroy_namespace(ns)
        # only now: if anything above was interrupted, atexit (or the next run's
        # cleanup_orphans) finishes the job
        self._closed = True
        shutil.rmtree(self.workdir, ignore_errors=True)
        _live.discard(self)


@atexit.register
def _close_all() -> None:
    for net in list(_live):
        with contextlib.suppress(Exception):
            net.close()


# -- a node: namespace + key + config + daemon --------------------------------------------


class Node:
    def __init__(
        self,
        net: Net,
        name: str,
        ns: str,
        address: list[str],
        listen: str,
        interface: dict[str, Any],
    ) -> None:
        for a in address:
            check_tunnel(a)
        self.net = net
        self.name = name
        self.ns = ns
        self.address = address
        self.listen = listen
        self.interface = dict(interface)
        self.ifname: str = self.interface.pop("name", "sio0")
        self.peer_specs: list[dict[str, Any]] = []
        self.dir = net.workdir / name
        self.dir.mkdir(mode=0o700)
        self.key_path = self.dir / "id_ed25519"
        self.config_path = self.dir / f"{self.ifname}.toml"
        self.control_socket = self.dir / "ctl.sock"
        self.log_path = self.dir / "secureiod.log"
        self.public_key = run([SECUREIOCTL, "genkey", str(self.key_path)]).stdout.strip()
        self.proc: subprocess.Popen[bytes] | None = None
        self.pids: list[int] = []
        self.final_log: str | None = None
        self.dev: str | None = None
        self.underlay: str | None = None
        self.log_level = "info"
        self.extra_args: list[str] = []
        """More ``secureiod`` arguments for the next ``start`` (e.g. ``["--user", "nobody"]``)."""

    def __repr__(self) -> str:
        return f"<Node {self.name} in {self.ns}>"

    # -- addresses --

    @property
    def tunnel4(self) -> str:
        return next(_host(a) for a in self.address if ipaddress.ip_interface(a).version == 4)

    @property
    def tunnel6(self) -> str:
        return next(_host(a) for a in self.address if ipaddress.ip_interface(a).version == 6)

    def host_prefixes(self) -> list[str]:
        """This node's tunnel addresses as /32 and /128: the default allowed_ips."""
        return [_host_prefix(a) for a in self.address]

    # -- config --

    def add_peer(
        self,
        other: Node,
        *,
        endpoint: str | None = None,
        name: str | None = None,
        public_key: str | None = None,
        allowed_ips: Sequence[str] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "name": name or other.name,
            "public_key": public_key or other.public_key,
        }
        if endpoint is not None:
            spec["endpoint"] = endpoint
        spec["allowed_ips"] = list(
            allowed_ips if allowed_ips is not None else other.host_prefixes()
        )
        spec.update(extra)
        self.peer_specs.append(spec)
        return spec

    def config_text(self) -> str:
        lines = [
            "[interface]",
            f"name = {_toml(self.ifname)}",
            f"private_key = {_toml(str(self.key_path))}",
            f"listen = {_toml(self.listen)}",
            f"address = {_toml(self.address)}",
            f"control_socket = {_toml(str(self.control_socket))}",
        ]
        lines += [f"{k} = {_toml(v)}" for k, v in self.interface.items()]
        for spec in self.peer_specs:
            lines += ["", "[[peer]]"]
            lines += [f"{k} = {_toml(v)}" for k, v in spec.items()]
        return "\n".join(lines) + "\n"

    def write_config(self) -> Path:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(self.config_text())
        tmp.replace(self.config_path)  # atomic: a reload never reads half a file
        return self.config_path

    # -- the daemon --

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name}: never started"
        return self.proc.pid

    def start(self, *, wait: bool = True, timeout: float = 10.0) -> None:
        """Write the config, start ``secureiod`` in the namespace (output to the log
        file), and (unless ``wait=False``) wait until its control socket answers."""
        assert not self.running, f"{self.name}: already running"
        self.write_config()
        with open(self.log_path, "ab") as log:
            log.write(f"--- harness: start #{len(self.pids) + 1} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, SECUREIOD, "--config", str(self.config_path),
                 "--log-level", self.log_level, *self.extra_args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.pids.append(self.proc.pid)
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Poll until the control socket answers; fail at once if the daemon exited."""

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name}: secureiod exited with {self.proc.returncode} at start\n"
                    + self.log_tail()
                )
            return self.ctl("status", check=False).returncode == 0

        poll(ready, timeout, f"{self.name}'s control socket", describe=self.log_tail)

    def stop(self, *, timeout: float = 10.0) -> None:
        """SIGTERM; assert a clean exit 0 and that the TUN device is gone."""
        assert self.proc is not None, f"{self.name}: never started"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(
                f"{self.name}: secureiod ignored SIGTERM for {timeout} s\n{self.log_tail()}"
            ) from None
        assert rc == 0, f"{self.name}: secureiod exited {rc} on SIGTERM\n{self.log_tail()}"
        link = run(["ip", "-n", self.ns, "link", "show", self.ifname], check=False)
        assert link.returncode != 0, f"{self.name}: {self.ifname} still exists after SIGTERM"

    def kill9(self) -> None:
        assert self.running, f"{self.name}: not running"
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)

    def terminate(self) -> None:
        """Teardown without checks: SIGTERM, then SIGKILL after 2 s."""
        if not self.running:
            return
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)

    # -- control --

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``secureioctl ARGS --socket S`` from the root namespace (the socket is a path)."""
        return run(
            [SECUREIOCTL, *args, "--socket", str(self.control_socket)], check=check, timeout=10
        )

    def status(self) -> dict[str, Any]:
        return json.loads(self.ctl("status", "--json").stdout)  # type: ignore[no-any-return]

    def peers(self) -> list[dict[str, Any]]:
        return json.loads(self.ctl("peers", "--json").stdout)  # type: ignore[no-any-return]

    def peer(self, name: str) -> dict[str, Any]:
        for p in self.peers():
            if p["name"] == name:
                return p
        raise AssertionError(f"{self.name} has no peer {name!r}")

    def reload(self) -> dict[str, Any]:
        return json.loads(self.ctl("reload", "--json").stdout)  # type: ignore[no-any-return]

    def wait_established(self, peer: str, timeout: float = 10.0) -> dict[str, Any]:
        """Poll ``peers --json`` every 50 ms until ``peer`` is established; its entry."""
        last: list[Any] = []

        def established() -> dict[str, Any] | None:
            last[:] = self.peers()
            for p in last:
                if p["name"] == peer and p["established"]:
                    return p
            return None

        def describe() -> str:
            return f"{self.name} peers: {json.dumps(last, indent=1)}\n{self.log_tail()}"

        return poll(  # type: ignore[no-any-return]
            established, timeout, f"{self.name} -> {peer} established", describe=describe
        )

    # -- commands in the namespace --

    def exec(
        self, argv: Sequence[str], *, timeout: float = CMD_TIMEOUT, check: bool = False, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", self.ns, *argv], timeout=timeout, check=check, **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        return self.net.popen(self.ns, argv, **kw)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["ip", "-n", self.ns, *args], check=check)

    def ping(
        self,
        dst: str,
        *,
        count: int = 3,
        interval: float = 0.2,
        size: int | None = None,
        dont_fragment: bool = False,
        source: str | None = None,
        wait: float = 1.0,
    ) -> subprocess.CompletedProcess[str]:
        """``ping`` from this namespace; bounded by a deadline; never raises on failure."""
        argv = ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", str(wait)]
        if size is not None:
            argv += ["-s", str(size)]
        if dont_fragment:
            argv += ["-M", "do"]
        if source is not None:
            argv += ["-I", source]
        argv.append(dst)
        # -c without -w: exactly count probes, then at most `wait` s for the last answer
        return self.exec(argv, timeout=count * interval + wait + 10)

    def assert_ping(self, dst: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        result = self.ping(dst, **kw)
        assert result.returncode == 0, (
            f"{self.name}: ping {dst} failed (exit {result.returncode})\n"
            f"{result.stdout}{result.stderr}"
        )
        return result

    def wait_ping(self, dst: str, timeout: float) -> float:
        """Single pings until one is answered; seconds it took (AssertionError after
        ``timeout``)."""
        t0 = time.monotonic()
        poll(
            lambda: self.ping(dst, count=1, wait=0.3).returncode == 0,
            timeout,
            f"{self.name}: a ping answer from {dst}",
            interval=0.0,
            describe=self.log_tail,
        )
        return time.monotonic() - t0

    # -- logs --

    def read_log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - LOG_TAIL_BYTES))
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return self.final_log or ""
        if size > LOG_TAIL_BYTES:
            text = f"[... first {size - LOG_TAIL_BYTES} bytes cut ...]\n" + text
        return text

    def log_tail(self, lines: int = 40) -> str:
        text = self.read_log().splitlines()[-lines:]
        return f"--- {self.name} ({self.ns}) log tail ---\n" + "\n".join(text)


# -- a TCP transfer through the tunnel ----------------------------------------------------

_RECEIVER = r"""
import hashlib, socket, sys, time
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + timeout
srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port))
srv.listen(1)
srv.settimeout(timeout)
print("ready", flush=True)
conn, _ = srv.accept()
h, n = hashlib.sha256(), 0
while True:
    left = deadline - time.monotonic()
    if left <= 0:
        print("timeout", n, flush=True)
        sys.exit(1)
    conn.settimeout(left)
    data = conn.recv(1 << 20)
    if not data:
        break
    h.update(data)
    n += len(data)
print(n, h.hexdigest(), flush=True)
conn.close()
"""

_SENDER = r"""
import hashlib, socket, sys
host, port, path, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
conn = socket.create_connection((host, port), timeout=timeout)
h, n = hashlib.sha256(), 0
with open(path, "rb") as f:
    while chunk := f.read(1 << 18):
        conn.sendall(chunk)
        h.update(chunk)
        n += len(chunk)
conn.shutdown(socket.SHUT_WR)
conn.recv(1)  # the receiver closes after it has read everything
print(n, h.hexdigest(), flush=True)
"""


class Transfer:
    """One TCP stream of a file from ``src`` to ``dst_addr`` (in ``dst``'s namespace),
    hashed on both ends by small Python programs; everything bounded by ``timeout``."""

    def __init__(
        self, src: Node, dst: Node, dst_addr: str, path: Path, *, port: int = 5901,
        timeout: float = 60.0,
    ) -> None:  # fmt: skip
        self.src, self.dst, self.dst_addr = src, dst, dst_addr
        self.path, self.port, self.timeout = path, port, timeout
        self.receiver: subprocess.Popen[str] | None = None
        self.sender: subprocess.Popen[str] | None = None
        self.started = 0.0
        self.elapsed = 0.0

    def start(self) -> Transfer:
        self.receiver = self.dst.popen(
            [PYTHON, "-c", _RECEIVER, self.dst_addr, str(self.port), str(self.timeout)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.receiver.stdout is not None
        ready, _, _ = select.select([self.receiver.stdout], [], [], 10.0)
        line = self.receiver.stdout.readline().strip() if ready else ""
        assert line == "ready", f"receiver did not start: {line!r}"
        self.started = time.monotonic()
        self.sender = self.src.popen(
            [PYTHON, "-c", _SENDER, self.dst_addr, str(self.port), str(self.path),
             str(self.timeout)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        return self

    @property
    def running(self) -> bool:
        return self.sender is not None and self.sender.poll() is None

    def wait(self) -> tuple[int, str, int, str]:
        """(bytes sent, sha256 sent, bytes received, sha256 received); asserts both
        programs succeeded within the timeout."""
        assert self.sender is not None and self.receiver is not None
        left = max(1.0, self.timeout - (time.monotonic() - self.started))
        results = []
        for role, proc in (("sender", self.sender), ("receiver", self.receiver)):
            try:
                out, err = proc.communicate(timeout=left + 5)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                raise AssertionError(f"TCP {role} still running after {self.timeout} s") from None
            assert proc.returncode == 0, f"TCP {role} failed ({proc.returncode}): {out} {err}"
            n, digest = out.split()
            results += [int(n), digest]
        self.elapsed = time.monotonic() - self.started
        return results[0], results[1], results[2], results[3]  # type: ignore[return-value]
