"""The replay window against a set-based model (PROTOCOL §10, without Go's shift bug)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from secureiod.secureio import ReplayWindow


class ModelWindow:
    """Obviously-correct reference: remember every accepted ID."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.seen: set[int] = set()
        self.latest = 0

    def accept(self, pid: int) -> bool:
        if pid > self.latest:
            self.latest = pid
            self.seen.add(pid)
            return True
        if self.size == 1:
            return False
        if pid == self.latest or self.latest - pid >= self.size or pid in self.seen:
            return False
        self.seen.add(pid)
        return True


# Sequences that move forward in steps that hit the interesting distances, with replays.
steps = st.one_of(
    st.sampled_from([1, 2, 63, 64, 65, 100, 128, 255, 256, 257, 1000]),
    st.integers(min_value=-300, max_value=300),
    st.integers(min_value=1, max_value=2**40),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(steps, min_size=1, max_size=200), st.sampled_from([1, 64, 256, 512]))
def test_window_matches_model(moves: list[int], size: int) -> None:
    window, model = ReplayWindow(size), ModelWindow(size)
    pid = 0
    history: list[int] = []
    for move in moves:
        pid = max(0, pid + move)
        for candidate in (pid, *history[-3:]):
            assert window.accept(candidate) == model.accept(candidate), (candidate, size)
        history.append(pid)


def test_jumps_keep_replays_out() -> None:
    """Go empties the bitmap on jumps of 65..255, letting earlier IDs in again (§13.16)."""
    for jump in (64, 65, 100, 200, 255):
        w = ReplayWindow()
        for pid in range(1, 11):
            assert w.accept(pid)
        assert w.accept(10 + jump)
        for pid in range(1, 11):
            assert not w.accept(pid), (jump, pid)


def test_window_edges() -> None:
    w = ReplayWindow()
    assert w.size == 256
    assert not w.accept(0)
    assert w.accept(300)
    assert not w.accept(300)
    assert not w.accept(300 - 256)  # exactly W behind: too old
    assert w.accept(300 - 255)  # inside
    assert not w.accept(300 - 255)
    assert w.accept(300 + 256)  # jump of exactly W
    assert not w.accept(300)  # now exactly W behind
    assert w.accept(300 + 1)


def test_sizes() -> None:
    assert ReplayWindow(0).size == 256
    assert ReplayWindow(65).size == 128
    strict = ReplayWindow(1)
    assert strict.accept(5) and not strict.accept(4) and not strict.accept(5)
    assert strict.accept(6)
    off = ReplayWindow(-1)
    assert off.accept(5) and off.accept(5) and off.accept(0)


def test_huge_jump_is_cheap() -> None:
    w = ReplayWindow()
    assert w.accept(1)
    assert w.accept(2**63)
    assert not w.accept(1)
    assert w.accept(2**63 - 1)


def test_check_does_not_record() -> None:
    w = ReplayWindow()
    assert w.check(5) and w.check(5)
    assert w.accept(5)
    assert not w.check(5)
    assert w.check(4)
