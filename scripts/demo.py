#!/usr/bin/env python3
"""``make demo``: a secureiod tunnel between two network namespaces, end to end.

Creates namespaces A and B joined by a veth (underlay 198.18.0.1 <-> 198.18.0.2),
generates keys and configs under a temporary directory, starts ``secureiod`` in each,
waits for the session, pings across the tunnel (IPv4 198.19.0.x and IPv6 fd00:5ec::x),
prints ``secureioctl peers`` from A, and tears everything down, also on failure or Ctrl-C.
Needs root. Traffic never leaves the two namespaces (no default routes).

Shares its code with the end-to-end suite (``netns-tests/harness.py``).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "netns-tests"))

import harness

T0 = time.monotonic()


def step(message: str) -> None:
    print(f"[{time.monotonic() - T0:5.2f}s] {message}", flush=True)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwind through the `with` block: teardown runs


def main() -> int:
    if os.geteuid() != 0:
        print("demo: needs root (network namespaces, TUN)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _terminate)
    harness.cleanup_orphans()
    net: harness.Net | None = None
    try:
        with harness.Net() as net:
            step("creating namespaces A and B joined by a veth (198.18.0.1 <-> 198.18.0.2)")
            a, b = net.pair(start=False)
            step(f"keys and configs in {net.workdir}")
            step(f"  A {a.ns}: public key {a.public_key}, tunnel {a.tunnel4} {a.tunnel6}")
            step(f"  B {b.ns}: public key {b.public_key}, tunnel {b.tunnel4} {b.tunnel6}")
            step("starting secureiod in A and B")
            a.start(wait=False)
            b.start(wait=False)
            a.wait_ready()
            b.wait_ready()
            peer = a.wait_established("b", timeout=10)
            b.wait_established("a", timeout=10)
            step(
                f"session established: payload {peer['payload_size']} bytes, "
                f"tunnel MTU {peer['mtu']}"
            )
            for src, dst in ((a, b.tunnel4), (a, b.tunnel6), (b, a.tunnel4), (b, a.tunnel6)):
                result = src.assert_ping(dst, count=3, interval=0.2)
                summary = next(
                    (line for line in result.stdout.splitlines() if "packets transmitted" in line),
                    "",
                )
                step(f"ping {src.name.upper()} -> {dst}: {summary}")
            step("secureioctl peers (on A):")
            print(a.ctl("peers").stdout, flush=True)
            step("stopping the daemons")
            net.stop_all()
            step("tearing down")
    except KeyboardInterrupt:
        print("demo: interrupted; everything was torn down", file=sys.stderr)
        return 130
    except (AssertionError, harness.CommandError) as exc:
        print(f"demo: FAILED: {exc}", file=sys.stderr)
        for node in net.nodes if net is not None else []:
            print(node.log_tail(), file=sys.stderr)
        return 1
    step("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
