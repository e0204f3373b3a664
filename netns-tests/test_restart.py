"""A daemon that dies (kill -9) and comes back is reachable again within seconds without
touching its peer; a reload adds a peer without disturbing a running stream."""

from __future__ import annotations

import time
from pathlib import Path

from harness import Net, Transfer, poll


def test_kill9_and_restart(net: Net) -> None:
    a, b = net.pair()
    a.assert_ping(b.tunnel4, count=2, interval=0.05)
    a_pid = a.pid
    b_first_pid = b.pid

    b.kill9()
    assert not b.running
    # A still runs and has not noticed yet: same process, same (stale) session
    assert a.running and a.pid == a_pid

    t0 = time.monotonic()
    b.start()
    b.wait_established("a", timeout=5)
    took = a.wait_ping(b.tunnel4, timeout=5 - (time.monotonic() - t0))
    total = time.monotonic() - t0
    print(f"ping answered {total:.2f} s after the restart ({took:.2f} s of pinging)")
    assert total < 5

    b.assert_ping(a.tunnel4, count=2, interval=0.05)
    a.assert_ping(b.tunnel6, count=2, interval=0.05)
    assert b.pid != b_first_pid
    # the other daemon was never restarted: same process, still running, and it kept its
    # peer entry (a new session with the restarted B, not a new daemon)
    assert a.running and a.pid == a_pid
    assert a.pids == [a_pid]
    assert a.status()["uptime"] > total
    pa = a.peer("b")
    assert pa["established"]
    assert pa["sessions_started"] >= 1
    assert "peer b restarted (new session id)" in a.read_log(), a.log_tail()


def test_reload_adds_peer_during_stream(net: Net, big_file: tuple[Path, str]) -> None:
    path, digest = big_file
    size = path.stat().st_size
    # the hub A starts with peer b only; c knows A from the start, A learns of it by reload
    a, b, c = net.hub(hub_knows_c=False)
    assert [p["name"] for p in a.peers()] == ["b"]

    transfer = Transfer(a, b, b.tunnel4, path, timeout=90).start()
    # reload once the stream is well under way (B has received 10 MiB)
    poll(
        lambda: b.peer("a")["rx_bytes"] >= 10 * 2**20 or not transfer.running,
        30,
        "the stream to get going",
    )
    assert transfer.running, "the stream ended before the reload: make the file bigger"
    a.add_peer(c, endpoint="198.18.2.2:5800")
    a.write_config()
    result = a.reload()
    assert result["added"] == ["c"]
    assert result["unchanged"] == ["b"]
    assert not result["removed"] and not result["changed"]
    mid_stream = transfer.running

    a.wait_established("c", timeout=10)
    c.wait_established("a", timeout=10)
    c.assert_ping(a.tunnel4)
    a.assert_ping(c.tunnel6)

    sent_n, sent_hash, recv_n, recv_hash = transfer.wait()
    assert mid_stream, "the stream ended during the reload: make the file bigger"
    assert sent_n == recv_n == size
    assert sent_hash == recv_hash == digest
    # B's session was kept across the reload, not restarted
    pb = a.peer("b")
    assert pb["sessions_started"] == 1, pb
    assert pb["established"]
    assert not pb["drops"], pb["drops"]
    assert a.status()["reloads"] == 1
    assert a.status()["peers_established"] == 2
