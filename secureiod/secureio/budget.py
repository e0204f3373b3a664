"""A token bucket: the one rate limit the core applies to work a stranger can cause
(signature checks, trial decryptions), in the caller's time."""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; ``now`` is the caller's clock."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.stamp: float | None = None

    def take(self, now: float, cost: float = 1.0) -> bool:
        if self.stamp is not None:
            self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False
