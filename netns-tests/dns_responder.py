"""A tiny authoritative DNS server for the namespace tests (no DNS library is installed).

    python dns_responder.py ADDRESS ZONE_JSON QUERY_LOG

answers A and AAAA queries over UDP port 53 on ADDRESS from ZONE_JSON (``{"b.test":
["198.18.2.2"]}``), read again for every query so that a test can move a name; a name not
in the zone gets NXDOMAIN, a type it has no address of an empty NOERROR. Each query is
appended to QUERY_LOG as ``<source ip> <name> <type>``. Once bound it writes
``QUERY_LOG.ready``. Malformed queries are dropped.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import sys
from pathlib import Path

TYPES = {1: 4, 28: 6}  # A, AAAA -> IP version


def _question(query: bytes) -> tuple[str, int, int] | None:
    """(name, type, end of the question) of a plain one-question query, or None."""
    if len(query) < 17 or struct.unpack_from("!H", query, 4)[0] != 1:
        return None
    labels, pos = [], 12
    while pos < len(query) and query[pos] != 0:
        n = query[pos]
        if n > 63:
            return None
        labels.append(query[pos + 1 : pos + 1 + n].decode("ascii", "replace").lower())
        pos += 1 + n
    if pos + 5 > len(query):
        return None
    qtype = struct.unpack_from("!H", query, pos + 1)[0]
    return ".".join(labels), qtype, pos + 5


def reply(query: bytes, zone: dict[str, list[str]]) -> bytes | None:
    parsed = _question(query)
    if parsed is None:
        return None
    name, qtype, end = parsed
    qid, flags = struct.unpack_from("!HH", query)
    records = b""
    count = 0
    rcode = 3 if name not in zone else 0
    for address in zone.get(name, []):
        ip = ipaddress.ip_address(address)
        if TYPES.get(qtype) == ip.version:
            rdata = ip.packed
            records += b"\xc0\x0c" + struct.pack("!HHIH", qtype, 1, 5, len(rdata)) + rdata
            count += 1
    header = struct.pack("!HHHHHH", qid, 0x8400 | (flags & 0x0100) | 0x80 | rcode, 1, count, 0, 0)
    return header + query[12:end] + records


def main() -> None:
    address, zone_path, log_path = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((address, 53))
    Path(f"{log_path}.ready").write_text("ready\n")
    while True:
        query, peer = sock.recvfrom(512)
        parsed = _question(query)
        if parsed is None:
            continue
        with log_path.open("a") as log:
            log.write(f"{peer[0]} {parsed[0]} {parsed[1]}\n")
        try:
            zone = json.loads(zone_path.read_text())
        except (OSError, ValueError):
            continue
        answer = reply(query, zone)
        if answer is not None:
            sock.sendto(answer, peer)


if __name__ == "__main__":
    main()
