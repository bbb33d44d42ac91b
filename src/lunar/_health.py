"""Provider health: rolling error rate and latency per deployment, a circuit breaker, and the
health-first order in which a model's deployments are tried.

Pure bookkeeping with an injectable clock and random source, so ranking is deterministic
under test. Keyed by deployment (provider + provider model id), because one provider can be
fast for one model and overloaded for another.
"""

from __future__ import annotations

import random
import threading
import time
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import median
from typing import TypeVar

from . import _fork
from ._catalog import Deployment

T = TypeVar("T")


@dataclass
class HealthPolicy:
    window: int = 50  # outcomes remembered per deployment
    max_age: float = 300.0  # seconds an outcome counts
    min_samples: int = 5  # below this, the error rate is not trusted
    error_threshold: float = 0.5  # above this, a deployment goes to the back of the line
    trip_after: int = 3  # consecutive 429/5xx/connection failures that open the breaker
    cooldown: float = 30.0  # first cooldown; doubles while the breaker keeps tripping
    max_cooldown: float = 300.0
    probe_rate: float = 0.05  # share of requests that try a deployment with no recent data


class _Stats:
    """One deployment's recent outcomes, with what ranking reads kept up to date as they
    come and go (ranking runs on every request to a model with several deployments;
    recounting the window each time cost ~9 µs per deployment). Outcomes arrive in clock
    order (the clock is monotonic), so the oldest is always first. Not thread-safe by
    itself: ``Health`` holds its lock around every use."""

    __slots__ = ("cooldown", "failed", "failures_in_a_row", "open_until", "outcomes", "ttfts")

    def __init__(self, window: int) -> None:
        self.outcomes: deque[tuple[float, bool, float | None, float | None]] = deque(maxlen=window)
        self.failed = 0  # failures among ``outcomes``
        self.ttfts: list[float] = []  # the TTFTs among ``outcomes``, sorted
        self.failures_in_a_row = 0
        self.open_until = 0.0
        self.cooldown = 0.0

    def add(self, outcome: tuple[float, bool, float | None, float | None]) -> None:
        outcomes = self.outcomes
        if outcomes.maxlen == 0:
            return  # a policy that remembers nothing
        if len(outcomes) == outcomes.maxlen:
            self._forget(outcomes[0])  # the append below pushes it out
        outcomes.append(outcome)
        if not outcome[1]:
            self.failed += 1
        elif outcome[2] is not None:
            insort(self.ttfts, outcome[2])

    def expire(self, now: float, max_age: float) -> None:
        """Drop the outcomes older than ``max_age``: they never count again."""
        outcomes = self.outcomes
        while outcomes and now - outcomes[0][0] > max_age:
            self._forget(outcomes.popleft())

    def _forget(self, outcome: tuple[float, bool, float | None, float | None]) -> None:
        if not outcome[1]:
            self.failed -= 1
        elif outcome[2] is not None:
            del self.ttfts[bisect_left(self.ttfts, outcome[2])]

    def ttft_p50(self) -> float | None:
        ttfts = self.ttfts
        n = len(ttfts)
        if not n:
            return None
        mid = n // 2
        return ttfts[mid] if n % 2 else (ttfts[mid - 1] + ttfts[mid]) / 2


class Health:
    def __init__(
        self,
        policy: HealthPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.policy = policy or HealthPolicy()
        self._clock = clock
        self._rand = rand
        self._stats: dict[tuple[str, str], _Stats] = {}
        # One Health serves every thread of a sync client shared across threads, and the
        # summaries are several fields that must change together.
        self._lock = threading.Lock()
        _fork.track(self, Health._forked)

    def _forked(self) -> None:
        """In a forked child (``lunar._fork``): what the parent learned stays (it is only
        data, and true of the providers for the child too), under a lock of the child's own.
        If one of the parent's threads held the lock at the fork, the books may be half
        changed: then the child starts with none."""
        if self._lock.locked():
            self._stats = {}
        self._lock = threading.Lock()

    def _get(self, dep: Deployment) -> _Stats:
        key = (dep.provider, dep.provider_model)
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = _Stats(self.policy.window)
        return stats

    # -- recording ------------------------------------------------------------------------

    def success(self, dep: Deployment, ttft: float | None, latency: float | None) -> None:
        if ttft is not None and ttft != ttft:
            ttft = None  # NaN: no measurement (and it would break the sorted TTFTs)
        with self._lock:
            stats = self._get(dep)
            stats.add((self._clock(), True, ttft, latency))
            stats.failures_in_a_row = 0
            stats.open_until = 0.0
            stats.cooldown = 0.0

    def failure(self, dep: Deployment, trips_breaker: bool = True) -> None:
        """A failed attempt. Overloads (429, 5xx, connection errors, timeouts) trip the
        breaker; other failures (401, 403, 404 …) only count toward the error rate. The
        engine does not report a request's own refusals (400, 413, 422) at all."""
        with self._lock:
            stats = self._get(dep)
            now = self._clock()
            stats.add((now, False, None, None))
            if not trips_breaker:
                return
            stats.failures_in_a_row += 1
            p = self.policy
            if stats.failures_in_a_row >= p.trip_after:
                stats.cooldown = min(
                    stats.cooldown * 2 if stats.cooldown else p.cooldown, p.max_cooldown
                )
                stats.open_until = now + stats.cooldown
                stats.failures_in_a_row = p.trip_after - 1  # one more failure after it re-opens

    # -- reading --------------------------------------------------------------------------

    def snapshot(self, dep: Deployment) -> dict[str, float | int | bool | None]:
        """Error rate, p50 TTFT and latency (seconds), samples, and whether cooling down."""
        with self._lock:
            stats = self._get(dep)
            now = self._clock()
            stats.expire(now, self.policy.max_age)
            samples = len(stats.outcomes)
            latencies = [o[3] for o in stats.outcomes if o[1] and o[3] is not None]
            return {
                "samples": samples,
                "error_rate": stats.failed / samples if samples else None,
                "ttft_p50": stats.ttft_p50(),
                "latency_p50": median(latencies) if latencies else None,
                "cooling_down": stats.open_until > now,
            }

    def cooling_down(self, dep: Deployment) -> bool:
        stats = self._stats.get((dep.provider, dep.provider_model))
        return stats is not None and stats.open_until > self._clock()

    def rank(self, items: Sequence[T], deployment: Callable[[T], Deployment]) -> list[T]:
        """The order to try one model's deployments: healthy ones with data by (error rate,
        TTFT, price); then ones with no recent data by price (one of them is moved to the
        front now and then, to learn about it); then those above the error threshold; and
        last those whose breaker is open — never dropped, so a request is always tried."""
        if len(items) < 2:
            return list(items)  # nothing to order (and no medians to compute per request)
        p = self.policy
        now = self._clock()
        known, unknown, unhealthy, cooling = [], [], [], []
        with self._lock:
            for item in items:
                dep = deployment(item)
                stats = self._get(dep)
                stats.expire(now, p.max_age)
                price = dep.prices.input + dep.prices.output if dep.prices else float("inf")
                samples = len(stats.outcomes)
                if stats.open_until > now:
                    cooling.append((price, item))
                elif samples < p.min_samples:
                    unknown.append((price, item))
                elif (rate := stats.failed / samples if samples else 0.0) > p.error_threshold:
                    unhealthy.append((rate, price, item))
                else:
                    ttft = stats.ttft_p50()
                    ttft_key = float("inf") if ttft is None else ttft
                    known.append((round(rate, 1), ttft_key, price, item))
        known.sort(key=lambda k: k[:3])
        unknown.sort(key=lambda k: k[0])
        unhealthy.sort(key=lambda k: k[:2])
        cooling.sort(key=lambda k: k[0])
        order = [k[-1] for k in known]
        fresh = [k[-1] for k in unknown]
        if order and fresh and self._rand() < p.probe_rate:
            order.insert(0, fresh.pop(0))
        return order + fresh + [k[-1] for k in unhealthy] + [k[-1] for k in cooling]
