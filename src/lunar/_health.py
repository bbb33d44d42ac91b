"""Provider health: rolling error rate and latency per deployment, a circuit breaker, and the
health-first order in which a model's deployments are tried.

Pure bookkeeping with an injectable clock and random source, so ranking is deterministic
under test. Keyed by deployment (provider + provider model id), because one provider can be
fast for one model and overloaded for another.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import median
from typing import TypeVar

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
    __slots__ = ("cooldown", "failures_in_a_row", "open_until", "outcomes")

    def __init__(self, window: int) -> None:
        self.outcomes: deque[tuple[float, bool, float | None, float | None]] = deque(maxlen=window)
        self.failures_in_a_row = 0
        self.open_until = 0.0
        self.cooldown = 0.0


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

    def _get(self, dep: Deployment) -> _Stats:
        key = (dep.provider, dep.provider_model)
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = _Stats(self.policy.window)
        return stats

    # -- recording ------------------------------------------------------------------------

    def success(self, dep: Deployment, ttft: float | None, latency: float | None) -> None:
        stats = self._get(dep)
        stats.outcomes.append((self._clock(), True, ttft, latency))
        stats.failures_in_a_row = 0
        stats.open_until = 0.0
        stats.cooldown = 0.0

    def failure(self, dep: Deployment, trips_breaker: bool = True) -> None:
        """A failed attempt. Overloads (429, 5xx, connection errors, timeouts) trip the
        breaker; other failures only count toward the error rate."""
        stats = self._get(dep)
        now = self._clock()
        stats.outcomes.append((now, False, None, None))
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
        stats = self._get(dep)
        now = self._clock()
        recent = [o for o in stats.outcomes if now - o[0] <= self.policy.max_age]
        ok = [o for o in recent if o[1]]
        ttfts = [o[2] for o in ok if o[2] is not None]
        latencies = [o[3] for o in ok if o[3] is not None]
        return {
            "samples": len(recent),
            "error_rate": (len(recent) - len(ok)) / len(recent) if recent else None,
            "ttft_p50": median(ttfts) if ttfts else None,
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
        known, unknown, unhealthy, cooling = [], [], [], []
        for item in items:
            dep = deployment(item)
            snap = self.snapshot(dep)
            price = dep.prices.input + dep.prices.output if dep.prices else float("inf")
            samples = snap["samples"]
            rate = snap["error_rate"]
            assert isinstance(samples, int)
            if snap["cooling_down"]:
                cooling.append((price, item))
            elif samples < p.min_samples:
                unknown.append((price, item))
            elif isinstance(rate, float) and rate > p.error_threshold:
                unhealthy.append((rate, price, item))
            else:
                ttft = snap["ttft_p50"]
                known.append(
                    (
                        round(float(rate or 0.0), 1),
                        ttft if isinstance(ttft, float) else float("inf"),
                        price,
                        item,
                    )
                )
        known.sort(key=lambda k: k[:3])
        unknown.sort(key=lambda k: k[0])
        unhealthy.sort(key=lambda k: k[:2])
        cooling.sort(key=lambda k: k[0])
        order = [k[-1] for k in known]
        fresh = [k[-1] for k in unknown]
        if order and fresh and self._rand() < p.probe_rate:
            order.insert(0, fresh.pop(0))
        return order + fresh + [k[-1] for k in unhealthy] + [k[-1] for k in cooling]
