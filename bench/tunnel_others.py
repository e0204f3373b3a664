"""The tunnels ``bench/tunnel.py`` compares secureiod with: wireguard-go, tinc and Nebula.

Each runner brings its tunnel up between the two namespaces of the one veth pair, measures
it with ``tunnel_measure.measure`` and takes it down again before returning, so tunnels never
compete for the CPU or the link. Each one gets its own tunnel subnet (198.19.1/2/3.0/24) and
its own interface MTU of 1420 (wg-quick's default on a 1500-byte underlay, and below what
every one of them needs for its own headers), so none is favoured by a bigger MTU. A tunnel
that cannot run raises ``Skip`` with one sentence saying why.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tunnel_measure import (
    Say,
    Skip,
    first_line,
    harness,
    measure,
    stop_all,
    wait_started,
    wait_tunnel,
)

TUNNEL_MTU = 1420
WG_PORT = 51820
WG_ADDR = ("198.19.1.1", "198.19.1.2")
TINC_PORT = 655
TINC_ADDR = ("198.19.2.1", "198.19.2.2")
NEBULA_PORT = 4242
NEBULA_ADDR = ("198.19.3.1", "198.19.3.2")
# UDP socket buffers for tinc and Nebula, which otherwise keep the OS default (208 KiB here)
# and drop bursts; wireguard-go asks for 7 MiB itself. Capped by net.core.rmem_max/wmem_max.
SOCKET_BUFFER = 4 << 20


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise Skip(f"{', '.join(missing)} not installed (make bench installs it with apt)")


def _ends(a: harness.Node, b: harness.Node, addrs: tuple[str, str]) -> list[tuple[Any, ...]]:
    """(node, its tunnel address, the other node, the other's tunnel address) per end."""
    if a.underlay is None or b.underlay is None:
        raise Skip("the veth pair has no underlay addresses")
    return [(a, addrs[0], b, addrs[1]), (b, addrs[1], a, addrs[0])]


# -- wireguard-go --------------------------------------------------------------------------


def _wg_key(net: harness.Net, name: str) -> tuple[Path, str]:
    private = harness.run(["wg", "genkey"]).stdout.strip()
    path = net.workdir / f"{name}.wgkey"
    path.write_text(private + "\n")
    path.chmod(0o600)
    public = harness.run(["wg", "pubkey"], input=private, stdin=None).stdout.strip()
    return path, public


def run_wireguard(
    net: harness.Net, a: harness.Node, b: harness.Node, args: argparse.Namespace, say: Say
) -> dict[str, Any]:
    """The userspace WireGuard first on PATH, configured with ``wg`` over its UAPI socket."""
    _need("wireguard-go", "wg")
    tag = f"wgb{os.getpid() % 100000}"
    ifnames = {a.name: f"{tag}a", b.name: f"{tag}b"}
    keys = {node.name: _wg_key(net, node.name) for node in (a, b)}
    procs: dict[str, subprocess.Popen[Any]] = {}
    socket_dir = Path("/var/run/wireguard")
    try:
        for node in (a, b):
            ifname = ifnames[node.name]
            # the UAPI socket is not per namespace: our own unique name, stale one removed
            (socket_dir / f"{ifname}.sock").unlink(missing_ok=True)
            env = dict(os.environ, WG_PROCESS_FOREGROUND="1", LOG_LEVEL="error")
            procs[node.name] = node.popen(
                ["wireguard-go", ifname],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        for node in (a, b):
            ifname = ifnames[node.name]
            wait_started(procs[node.name], node, ifname, "wireguard-go")
            harness.poll(
                lambda ifname=ifname: (socket_dir / f"{ifname}.sock").exists(),
                10,
                f"wireguard-go UAPI socket of {ifname}",
            )
        for node, addr, other, other_addr in _ends(a, b, WG_ADDR):
            ifname = ifnames[node.name]
            key_path, _ = keys[node.name]
            _, other_public = keys[other.name]
            node.exec(
                ["wg", "set", ifname, "private-key", str(key_path), "listen-port",
                 str(WG_PORT), "peer", other_public, "endpoint",
                 f"{other.underlay}:{WG_PORT}", "allowed-ips", f"{other_addr}/32"],
                check=True,
            )  # fmt: skip
            harness.check_tunnel(f"{addr}/24")
            node.ip("addr", "add", f"{addr}/24", "dev", ifname)
            node.ip("link", "set", ifname, "mtu", str(TUNNEL_MTU), "up")
        wait_tunnel(a, WG_ADDR[1], "wireguard-go")
        pids = {node.name.upper(): procs[node.name].pid for node in (a, b)}
        out = measure("wireguard-go", a, b, WG_ADDR[1], pids, args, say)
        out["mtu"] = TUNNEL_MTU
        out["version"] = first_line(["wireguard-go", "--version"])
        out["setup"] = "wg set: one peer each, allowed-ips /32, no keepalive"
        return out
    finally:
        stop_all(list(procs.values()))
        for ifname in ifnames.values():
            (socket_dir / f"{ifname}.sock").unlink(missing_ok=True)


# -- tinc 1.0 ---------------------------------------------------------------------------------

# tinc 1.0's defaults are Blowfish-CBC with HMAC-SHA1 truncated to 4 bytes; AES-256-CBC with
# SHA-256 is what a deployment today would choose and what OpenSSL accelerates with AES-NI,
# so tinc is measured at its best rather than at its 1990s defaults. Path MTU discovery is
# off: while it probes, tinc 1.0 sends every packet above the MTU found so far over its TCP
# meta connection, which would measure TCP-in-TCP; the veth carries 1420 + tinc's headers.
TINC_CIPHER = "aes-256-cbc"
TINC_DIGEST = "sha256"


def _tinc_config(net: harness.Net, node: harness.Node, addr: str, connect_to: str | None) -> Path:
    """A tinc 1.0 directory for ``node``: tinc.conf, tinc-up, RSA keys from ``tincd -K``."""
    directory = net.workdir / f"tinc-{node.name}"
    (directory / "hosts").mkdir(parents=True)
    lines = [
        f"Name = {node.name}",
        "Mode = router",
        f"Interface = tinc{node.name}",
        "DeviceType = tun",
        "AddressFamily = ipv4",
        f"Port = {TINC_PORT}",
        f"UDPRcvBuf = {SOCKET_BUFFER}",
        f"UDPSndBuf = {SOCKET_BUFFER}",
    ]
    if connect_to:
        lines.append(f"ConnectTo = {connect_to}")
    (directory / "tinc.conf").write_text("\n".join(lines) + "\n")
    (directory / "hosts" / node.name).write_text(
        f"Address = {node.underlay}\nPort = {TINC_PORT}\nSubnet = {addr}/32\n"
        f"Cipher = {TINC_CIPHER}\nDigest = {TINC_DIGEST}\nPMTUDiscovery = no\n"
    )
    harness.check_tunnel(f"{addr}/24")
    up = directory / "tinc-up"
    up.write_text(
        "#!/bin/sh\n"
        f'ip addr add {addr}/24 dev "$INTERFACE"\n'
        f'ip link set "$INTERFACE" mtu {TUNNEL_MTU} up\n'
    )
    up.chmod(0o755)
    # -K appends the public key to hosts/NAME; stdin is not a terminal, so it asks nothing
    harness.run(["tincd", "-c", str(directory), "-K", "2048"], timeout=60)
    return directory


def run_tinc(
    net: harness.Net, a: harness.Node, b: harness.Node, args: argparse.Namespace, say: Say
) -> dict[str, Any]:
    """Debian 12's tinc 1.0 in router mode, a connects to b, both run in the foreground."""
    _need("tincd")
    dirs = {
        a.name: _tinc_config(net, a, TINC_ADDR[0], connect_to=b.name),
        b.name: _tinc_config(net, b, TINC_ADDR[1], connect_to=None),
    }
    for node in (a, b):  # each end knows the other's host file (address, subnet, key)
        for other in (a, b):
            if other is not node:
                shutil.copy(dirs[other.name] / "hosts" / other.name, dirs[node.name] / "hosts")
    procs: dict[str, subprocess.Popen[Any]] = {}
    try:
        for node in (b, a):
            directory = dirs[node.name]
            procs[node.name] = node.popen(
                ["tincd", "-c", str(directory), "-D", "-d0",
                 f"--pidfile={directory / 'tinc.pid'}", f"--logfile={directory / 'tinc.log'}"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
        for node in (a, b):
            wait_started(procs[node.name], node, f"tinc{node.name}", "tincd")
        wait_tunnel(a, TINC_ADDR[1], "tinc")
        pids = {node.name.upper(): procs[node.name].pid for node in (a, b)}
        out = measure("tinc", a, b, TINC_ADDR[1], pids, args, say)
        out["mtu"] = TUNNEL_MTU
        out["version"] = first_line(["tincd", "--version"])
        out["setup"] = f"router mode, RSA 2048, {TINC_CIPHER} + {TINC_DIGEST}, no PMTU discovery"
        return out
    finally:
        stop_all(list(procs.values()))


# -- Nebula 1.6 --------------------------------------------------------------------------------


def _nebula_config(
    net: harness.Net, ca: Path, node: harness.Node, addr: str, other: harness.Node, other_addr: str
) -> Path:
    """Certificate signed by the bench CA and a lighthouse-less config with a static host map.

    The config is written as JSON, which is valid YAML, so no YAML library is needed."""
    directory = ca.parent
    crt, key = directory / f"{node.name}.crt", directory / f"{node.name}.key"
    harness.check_tunnel(f"{addr}/24")
    harness.run(
        ["nebula-cert", "sign", "-ca-crt", str(ca), "-ca-key", str(directory / "ca.key"),
         "-name", node.name, "-ip", f"{addr}/24", "-out-crt", str(crt), "-out-key", str(key)],
    )  # fmt: skip
    any_rule = [{"port": "any", "proto": "any", "host": "any"}]
    config = {
        "pki": {"ca": str(ca), "cert": str(crt), "key": str(key)},
        "static_host_map": {other_addr: [f"{other.underlay}:{NEBULA_PORT}"]},
        "lighthouse": {"am_lighthouse": False, "interval": 60, "hosts": []},
        "listen": {
            "host": "0.0.0.0",
            "port": NEBULA_PORT,
            "read_buffer": SOCKET_BUFFER,
            "write_buffer": SOCKET_BUFFER,
        },
        "punchy": {"punch": False},
        "tun": {"disabled": False, "dev": f"nebula{node.name}", "mtu": TUNNEL_MTU},
        "logging": {"level": "error", "format": "text"},
        "firewall": {"outbound": any_rule, "inbound": any_rule},
    }
    path = directory / f"{node.name}.yml"
    path.write_text(json.dumps(config, indent=1) + "\n")
    return path


def run_nebula(
    net: harness.Net, a: harness.Node, b: harness.Node, args: argparse.Namespace, say: Say
) -> dict[str, Any]:
    """Debian 12's Nebula 1.6: one CA, two signed hosts, no lighthouse, allow-all firewall."""
    _need("nebula", "nebula-cert")
    directory = net.workdir / "nebula"
    directory.mkdir()
    ca = directory / "ca.crt"
    harness.run(
        ["nebula-cert", "ca", "-name", "secureiod bench", "-duration", "24h",
         "-out-crt", str(ca), "-out-key", str(directory / "ca.key")],
    )  # fmt: skip
    configs = {
        node.name: _nebula_config(net, ca, node, addr, other, other_addr)
        for node, addr, other, other_addr in _ends(a, b, NEBULA_ADDR)
    }
    procs: dict[str, subprocess.Popen[Any]] = {}
    try:
        for node in (a, b):
            procs[node.name] = node.popen(
                ["nebula", "-config", str(configs[node.name])],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        for node in (a, b):
            wait_started(procs[node.name], node, f"nebula{node.name}", "nebula")
        wait_tunnel(a, NEBULA_ADDR[1], "nebula")
        pids = {node.name.upper(): procs[node.name].pid for node in (a, b)}
        out = measure("nebula", a, b, NEBULA_ADDR[1], pids, args, say)
        out["mtu"] = TUNNEL_MTU
        out["version"] = first_line(["nebula", "-version"])
        out["setup"] = (
            "static_host_map, no lighthouse, allow-all firewall, default cipher (AES-GCM)"
        )
        return out
    finally:
        stop_all(list(procs.values()))
