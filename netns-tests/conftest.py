"""Fixtures for the end-to-end suite: ``net`` (a ``harness.Net``, torn down even on failure
or Ctrl-C), ``big_file`` (200 MiB of random bytes, made once per session), ``hub`` (A with
spokes B and C), and a report
hook that attaches every node's daemon log to a failing test's report.

pytest's default "prepend" import mode puts this directory on ``sys.path``, so the tests
import ``harness`` directly (``netns-tests`` cannot be a package).
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if os.path.dirname(__file__) not in sys.path:  # also under other import modes
    sys.path.insert(0, os.path.dirname(__file__))

import harness

BIG_FILE_SIZE = 200 * 2**20

_NETS = pytest.StashKey[list[harness.Net]]()
_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


def _missing_requirements() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, TUN)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    for tool in ("ip", "ping", "sysctl"):
        if shutil.which(tool) is None:
            return f"needs {tool} (make bootstrap installs it)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _missing_requirements()
    if reason is None:
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_sessionstart(session: pytest.Session) -> None:
    if _missing_requirements() is None:
        harness.cleanup_orphans()  # namespaces of earlier runs that were SIGKILLed
    # SIGTERM (e.g. a CI timeout) unwinds like Ctrl-C, so the finalizers still run.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, functools.partial(_raise_keyboard_interrupt, os.getpid()))


def _raise_keyboard_interrupt(main_pid: int, signum: int, frame: Any) -> None:
    if os.getpid() != main_pid:
        # A forked child (pyroute2's namespace helper, a test's worker) inherits this
        # handler; pyroute2 ends its helper with SIGTERM. Unwinding there would run a copy
        # of the pytest session in the child: die as the signal means instead.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture
def net(request: pytest.FixtureRequest) -> Iterator[harness.Net]:
    """A fresh ``Net``. At teardown, if the test passed, every daemon still running is
    stopped with SIGTERM and must exit 0; then everything is killed and deleted."""
    n = harness.Net()
    request.node.stash.setdefault(_NETS, []).append(n)
    try:
        yield n
        call = request.node.stash.get(_REPORTS, {}).get("call")
        if call is not None and call.passed:
            n.assert_isolated()
            n.stop_all()
    finally:
        n.close()


@pytest.fixture(scope="session")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """(path, sha256) of 200 MiB of random bytes, shared by the tests of one session."""
    path = tmp_path_factory.mktemp("data") / "random.bin"
    digest = harness.make_random_file(path, BIG_FILE_SIZE)
    yield path, digest
    path.unlink(missing_ok=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    if not report.failed:
        return
    for n in item.stash.get(_NETS, []):
        for node in n.nodes:
            report.sections.append(
                (f"secureiod log: node {node.name} ({node.ns}) [{report.when}]", node.read_log())
            )


@pytest.fixture
def hub(net: harness.Net) -> tuple[harness.Node, harness.Node, harness.Node]:
    """Hub A with spokes B and C (``Net.hub``), all established."""
    return net.hub()
