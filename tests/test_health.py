"""Health-first ranking of a model's providers, and the circuit breaker — deterministic with
an injected clock and random source."""

from __future__ import annotations

import random
import sys
import threading

import pytest

from lunar import BadRequestError
from lunar._catalog import Catalog
from lunar._engine import Router
from lunar._health import Health, HealthPolicy
from lunar._request import RequestOptions

CATALOG = Catalog.load()
LLAMA = {d.provider: d for d in CATALOG.resolve("llama-3.1-8b")}  # groq, together, fireworks
KEYS = {
    "GROQ_API_KEY": "g",
    "TOGETHER_API_KEY": "t",
    "FIREWORKS_API_KEY": "f",
    "OPENAI_API_KEY": "o",
    "ANTHROPIC_API_KEY": "a",
}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(probe: float = 1.0, **policy):
    clock = Clock()
    rolls = iter([probe] * 1000)
    return Health(HealthPolicy(**policy), clock=clock, rand=lambda: next(rolls)), clock


def order(health) -> list[str]:
    return [d.provider for d in health.rank(list(LLAMA.values()), lambda d: d)]


def feed(health, provider, ok=0, failed=0, ttft=100.0):
    for _ in range(ok):
        health.success(LLAMA[provider], ttft, ttft * 2)
    for _ in range(failed):
        health.failure(LLAMA[provider], trips_breaker=False)


def test_no_data_orders_by_price():
    health, _ = make()
    assert order(health) == ["groq", "together", "fireworks"]


def test_faster_provider_goes_first_when_error_rates_are_equal():
    health, _ = make()
    feed(health, "groq", ok=10, ttft=300.0)
    feed(health, "together", ok=10, ttft=80.0)
    feed(health, "fireworks", ok=10, ttft=150.0)
    assert order(health) == ["together", "fireworks", "groq"]


def test_error_rate_outranks_speed_and_price():
    health, _ = make()
    feed(health, "groq", ok=7, failed=3, ttft=50.0)  # 30% errors
    feed(health, "together", ok=10, ttft=200.0)
    feed(health, "fireworks", ok=10, ttft=100.0)
    assert order(health) == ["fireworks", "together", "groq"]


def test_above_threshold_goes_behind_providers_with_no_data():
    health, _ = make()
    feed(health, "groq", ok=2, failed=8)
    feed(health, "fireworks", ok=10)
    assert order(health) == ["fireworks", "together", "groq"]


def test_probe_moves_a_provider_with_no_recent_data_to_the_front():
    health, _ = make(probe=0.0)  # every roll is below probe_rate
    feed(health, "groq", ok=10)
    feed(health, "fireworks", ok=10)
    assert order(health)[0] == "together"
    health, _ = make(probe=0.99)
    feed(health, "groq", ok=10)
    feed(health, "fireworks", ok=10)
    assert order(health)[-1] == "together"


def test_old_outcomes_age_out():
    health, clock = make()
    feed(health, "groq", ok=0, failed=10)
    assert order(health)[-1] == "groq"
    clock.now += 301
    assert order(health) == ["groq", "together", "fireworks"]


def test_breaker_opens_after_repeated_overloads_and_retries_after_cooldown():
    health, clock = make(trip_after=3, cooldown=30.0)
    for _ in range(3):
        health.failure(LLAMA["groq"])
    assert health.cooling_down(LLAMA["groq"])
    assert order(health)[-1] == "groq"
    clock.now += 31
    assert not health.cooling_down(LLAMA["groq"])  # half-open: tried again
    health.failure(LLAMA["groq"])  # fails again: re-opens with a longer cooldown
    clock.now += 31
    assert health.cooling_down(LLAMA["groq"])
    clock.now += 30
    health.success(LLAMA["groq"], 10.0, 20.0)  # a success closes it
    assert not health.cooling_down(LLAMA["groq"])


def test_client_errors_do_not_trip_the_breaker():
    health, _ = make(trip_after=2)
    for _ in range(5):
        health.failure(LLAMA["groq"], trips_breaker=False)
    assert not health.cooling_down(LLAMA["groq"])


def test_router_puts_cooling_primary_behind_its_fallbacks():
    health, _ = make(trip_after=1)
    router = Router(CATALOG, environ=KEYS, health=health)
    health.failure(CATALOG.resolve("gpt-4o-mini")[0])
    chain = router.chain(RequestOptions("gpt-4o-mini", ["claude-3-haiku"]))
    assert [t.provider for _, t in chain] == ["anthropic", "openai"]


def test_snapshot_reports_rates_and_medians():
    health, _ = make()
    feed(health, "groq", ok=3, failed=1, ttft=100.0)
    snap = health.snapshot(LLAMA["groq"])
    assert snap["error_rate"] == 0.25 and snap["ttft_p50"] == 100.0
    assert snap["latency_p50"] == 200.0 and snap["samples"] == 4


TOOLS = [{"type": "function", "function": {"name": "f"}}]
IMAGE = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        ],
    }
]


def test_tools_to_a_model_without_them_fail_fast_naming_model_and_capability():
    router = Router(CATALOG, environ=KEYS)
    with pytest.raises(BadRequestError, match=r"'smollm2' does not support tool calling"):
        router.chain(RequestOptions("smollm2"), {"messages": [], "tools": TOOLS})
    with pytest.raises(BadRequestError, match=r"'llama-3.1-8b' does not support image inputs"):
        router.chain(RequestOptions("llama-3.1-8b"), {"messages": IMAGE})


def test_incapable_fallback_is_skipped_with_a_reason():
    router = Router(CATALOG, environ=KEYS)
    chain = router.chain(
        RequestOptions("gpt-4o-mini", ["llama-3.1-8b", "claude-3-haiku"]), {"messages": IMAGE}
    )
    assert chain[0][1].provider == "openai"
    assert "does not support image inputs" in str(chain[1][1])
    assert chain[2][1].provider == "anthropic"


def test_n_above_one_to_a_model_that_gives_one_choice_fails_fast_naming_n():
    router = Router(CATALOG, environ=KEYS)
    for model in ("claude-3-haiku", "anthropic/claude-new", "smollm2"):
        with pytest.raises(BadRequestError, match=r"n=3") as info:
            router.chain(RequestOptions(model), {"messages": [], "n": 3})
        assert info.value.param == "n"
    [(_, target)] = router.chain(RequestOptions("claude-3-haiku"), {"messages": [], "n": 1})
    assert target.provider == "anthropic"
    [(_, target)] = router.chain(RequestOptions("gemini-2.0-flash"), {"messages": [], "n": 3})
    assert target.provider == "gemini"


def test_fallback_that_gives_one_choice_is_skipped_for_n_above_one():
    router = Router(CATALOG, environ=KEYS)
    chain = router.chain(
        RequestOptions("gpt-4o-mini", ["claude-3-haiku", "smollm2", "gpt-4o"]),
        {"messages": [], "n": 2},
    )
    assert [(model, type(t).__name__) for model, t in chain] == [
        ("gpt-4o-mini", "Target"),
        ("claude-3-haiku", "BadRequestError"),
        ("smollm2", "BadRequestError"),
        ("gpt-4o", "Target"),
    ]
    assert chain[1][1].param == "n" and chain[1][1].provider == "anthropic"


def test_n_above_one_skips_only_the_deployments_that_give_one_choice():
    both = {"deployments": [{"provider": p, "id": "m"} for p in ("anthropic", "openai")]}
    router = Router(Catalog.load({"models": {"m": both}}), environ=KEYS)
    chain = router.chain(RequestOptions("m"), {"messages": [], "n": 2})
    assert sorted(type(t).__name__ for _, t in chain) == ["BadRequestError", "Target"]
    assert [t.provider for _, t in chain if not isinstance(t, BadRequestError)] == ["openai"]


def test_uncatalogued_models_are_not_second_guessed():
    router = Router(CATALOG, environ=KEYS)
    [(_, target)] = router.chain(
        RequestOptions("groq/some-new-vision-model"), {"messages": IMAGE, "tools": TOOLS}
    )
    assert target.provider == "groq"


# --- the running summary against a recount -------------------------------------------------

from statistics import median  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_POLICY = {"window": 5, "max_age": 10.0, "min_samples": 2, "error_threshold": 0.5}
_steps = st.lists(
    st.one_of(
        st.tuples(st.just("ok"), st.integers(0, 2), st.one_of(st.none(), st.floats(0.01, 5.0))),
        st.tuples(st.just("fail"), st.integers(0, 2), st.booleans()),
        st.tuples(st.just("wait"), st.floats(0.0, 8.0), st.none()),
    ),
    max_size=60,
)


def recount(log, now):
    """What ranking should see: the last ``window`` outcomes, those recent enough."""
    recent = [o for o in log[-_POLICY["window"] :] if now - o[0] <= _POLICY["max_age"]]
    ok = [o for o in recent if o[1]]
    ttfts = [o[2] for o in ok if o[2] is not None]
    return {
        "samples": len(recent),
        "error_rate": (len(recent) - len(ok)) / len(recent) if recent else None,
        "ttft_p50": median(ttfts) if ttfts else None,
    }


@settings(max_examples=300, deadline=None)
@given(_steps)
def test_running_summary_equals_a_recount_of_the_window(steps):
    health, clock = make(probe=1.0, **_POLICY)
    deps = list(LLAMA.values())
    logs: dict[str, list] = {d.provider: [] for d in deps}
    for kind, arg, extra in steps:
        if kind == "wait":
            clock.now += arg
        elif kind == "ok":
            health.success(deps[arg], extra, None)
            logs[deps[arg].provider].append((clock.now, True, extra))
        else:
            health.failure(deps[arg], trips_breaker=extra)
            logs[deps[arg].provider].append((clock.now, False, None))
        for dep in deps:
            snap = health.snapshot(dep)
            expected = recount(logs[dep.provider], clock.now)
            assert {k: snap[k] for k in expected} == expected
        assert order(health) == expected_order(health, logs, clock.now)


def expected_order(health, logs, now):
    """Ranking's rules applied to a recount (no probe: ``make(probe=1.0)``)."""
    known, unknown, unhealthy, cooling = [], [], [], []
    for dep in LLAMA.values():
        seen = recount(logs[dep.provider], now)
        price = dep.prices.input + dep.prices.output
        rate = seen["error_rate"]
        if health.cooling_down(dep):
            cooling.append((price, dep.provider))
        elif seen["samples"] < _POLICY["min_samples"]:
            unknown.append((price, dep.provider))
        elif rate > _POLICY["error_threshold"]:
            unhealthy.append((rate, price, dep.provider))
        else:
            ttft = float("inf") if seen["ttft_p50"] is None else seen["ttft_p50"]
            known.append((round(rate, 1), ttft, price, dep.provider))
    return [
        k[-1]
        for group in (known, unknown, unhealthy, cooling)
        for k in sorted(group, key=lambda k: k[:-1])
    ]


def test_one_health_shared_by_threads_keeps_a_true_summary():
    """A sync client shared by a thread pool records outcomes from every thread at once."""
    health = Health(HealthPolicy(window=5))
    groq, together = LLAMA["groq"], LLAMA["together"]
    errors: list[BaseException] = []

    def requests(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            for i in range(3000):
                if rnd.random() < 0.7:
                    health.success(groq, rnd.random(), None)
                else:
                    health.failure(groq, trips_breaker=False)
                if i % 10 == 0:
                    health.rank([groq, together], lambda d: d)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        threads = [threading.Thread(target=requests, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    stats = health._stats[(groq.provider, groq.provider_model)]
    assert stats.failed == sum(1 for o in stats.outcomes if not o[1])
    assert stats.ttfts == sorted(o[2] for o in stats.outcomes if o[1] and o[2] is not None)


def test_a_nan_ttft_counts_as_a_success_without_a_ttft():
    health, _ = make()
    dep = LLAMA["groq"]
    for ttft in (0.2, float("nan"), 0.1, float("nan"), 0.3):
        health.success(dep, ttft, None)
    snap = health.snapshot(dep)
    assert snap["samples"] == 5 and snap["error_rate"] == 0.0 and snap["ttft_p50"] == 0.2


def test_a_policy_with_no_window_remembers_nothing():
    health, _ = make(window=0)
    health.success(LLAMA["groq"], 0.1, None)
    health.failure(LLAMA["groq"], trips_breaker=False)
    assert health.snapshot(LLAMA["groq"])["samples"] == 0
    assert len(order(health)) == 3


def test_a_requests_own_refusals_leave_its_providers_health_alone(mock):
    """Over real sockets: 400/413/422 answers (the request's fault) counted toward the
    provider's error rate, so a caller sending bad requests moved every caller's traffic
    off a healthy provider. A 401 (a wrong key: every request fails) still counts."""
    from lunar import APIError, Lunar
    from lunar.testing import Reply

    client = Lunar(max_retries=0)
    groq = LLAMA["groq"]
    for status in (400, 413, 422, 400, 413, 422):
        mock.enqueue(Reply(status=status), model=groq.provider_model)
        with pytest.raises(APIError):
            client.chat.completions.create(
                model="llama-3.1-8b", provider="groq", messages=[{"role": "user", "content": "x"}]
            )
    health = client._engine.router.health
    assert health.snapshot(groq)["samples"] == 0
    mock.enqueue(Reply(status=401), model=groq.provider_model)
    with pytest.raises(APIError):
        client.chat.completions.create(
            model="llama-3.1-8b", provider="groq", messages=[{"role": "user", "content": "x"}]
        )
    assert health.snapshot(groq) | {"ttft_p50": None} == {
        "samples": 1,
        "error_rate": 1.0,
        "ttft_p50": None,
        "latency_p50": None,
        "cooling_down": False,
    }
