"""The catalogue resolves names, forces providers, prices tokens."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lunar import NotFoundError, Usage
from lunar._catalog import Catalog, Prices, cost, scaled_round
from lunar._engine import ms


@pytest.fixture
def catalog() -> Catalog:
    return Catalog.load()


def test_seed_aliases_resolve(catalog):
    assert [(d.provider, d.provider_model) for d in catalog.resolve("gpt-4o-mini")] == [
        ("openai", "gpt-4o-mini")
    ]
    assert catalog.resolve("claude-3-haiku")[0].provider_model == "claude-3-haiku-20240307"
    llama = catalog.resolve("llama-3.1-8b")
    assert llama[0].provider == "groq" and llama[0].provider_model == "llama-3.1-8b-instant"
    assert {d.provider for d in llama} == {"groq", "together", "fireworks"}


def test_provider_prefix_forces_provider(catalog):
    [dep] = catalog.resolve("together/llama-3.1-8b")
    assert dep.provider == "together"
    assert dep.prices is not None
    [dep] = catalog.resolve("openai/gpt-4o-mini")
    assert dep.prices is not None and dep.prices.at(None) == Prices(
        0.15, 0.60, 0.075, tiers=dep.prices.tiers
    )


def test_provider_prefix_passes_unknown_models_through_unpriced(catalog):
    [dep] = catalog.resolve("openai/gpt-9-preview")
    assert (dep.provider, dep.provider_model, dep.prices) == ("openai", "gpt-9-preview", None)


def test_provider_model_id_and_full_name(catalog):
    assert catalog.resolve("llama-3.1-8b-instant")[0].provider == "groq"
    assert catalog.resolve("local/smollm2-135m-instruct")[0].model == "smollm2"


def test_provider_argument_restricts(catalog):
    [dep] = catalog.resolve("llama-3.1-8b", provider="fireworks")
    assert dep.provider == "fireworks"
    with pytest.raises(NotFoundError, match="not offered by provider 'openai'"):
        catalog.resolve("llama-3.1-8b", provider="openai")


def test_unknown_model_lists_close_matches(catalog):
    with pytest.raises(NotFoundError) as info:
        catalog.resolve("gpt-4o-mni")
    assert "gpt-4o-mini" in str(info.value)
    assert info.value.param == "model"


def test_cost_is_tokens_over_a_million_times_price_rounded():
    usage = Usage(prompt_tokens=1234, completion_tokens=567)
    cost(usage, Prices(0.15, 0.60))
    assert usage.input_cost_usd == round(1234 * 0.15 / 1e6, 10)
    assert usage.output_cost_usd == round(567 * 0.60 / 1e6, 10)
    assert usage.total_cost_usd == round(usage.input_cost_usd + usage.output_cost_usd, 10)


def test_cached_tokens_billed_at_cached_price():
    usage = Usage(prompt_tokens=1000, completion_tokens=0, cached_tokens=400)
    cost(usage, Prices(2.0, 8.0, 0.5))
    assert usage.input_cost_usd == round(600 * 2.0 / 1e6, 10)
    assert usage.cached_input_cost_usd == round(400 * 0.5 / 1e6, 10)
    assert usage.total_cost_usd == round(600 * 2.0 / 1e6 + 400 * 0.5 / 1e6, 10)


def test_user_catalogue_extends_and_overrides(tmp_path, monkeypatch):
    extra = {
        "models": {
            "my-model": {
                "deployments": [
                    {"provider": "vllm", "id": "org/my-model", "input": 0.01, "output": 0.02}
                ]
            }
        }
    }
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(extra))
    monkeypatch.setenv("LUNAR_CATALOG", str(path))
    catalog = Catalog.load(
        {
            "models": {
                "gpt-4o-mini": {
                    "deployments": [
                        {
                            "provider": "openrouter",
                            "id": "openai/gpt-4o-mini",
                            "input": 1,
                            "output": 2,
                        }
                    ]
                }
            }
        }
    )
    assert catalog.resolve("my-model")[0].provider_model == "org/my-model"
    assert catalog.resolve("gpt-4o-mini")[0].provider == "openrouter"


def test_models_list_has_prices(catalog):
    models = {m.id: m for m in catalog.list_models()}
    assert models["gpt-4o-mini"].input_price_per_1m == 0.15
    assert models["llama-3.1-8b"].providers == ["groq", "together", "fireworks"]


def _near_a_tie(scaled: float) -> bool:
    """Whether ``scaled`` is within its own rounding error of a half."""
    return abs(abs(scaled) % 1 - 0.5) <= abs(scaled) * 1e-15 + 1e-12


@given(
    tokens=st.integers(0, 10_000_000),
    price=st.floats(0, 1_000, allow_nan=False),
)
def test_costs_are_rounded_to_ten_decimals_as_round_does(tokens, price):
    # Costs are rounded by scaling (round with digits costs six times more): the same value
    # as round(x, 10), but within a rounding error of a tie, where it may be one step off.
    usage = Usage(prompt_tokens=tokens, completion_tokens=tokens)
    cost(usage, Prices(price, price))
    exact = tokens * price / 1e6
    if not _near_a_tie(exact * 1e10):
        assert usage.input_cost_usd == round(exact, 10)
    # One step, plus the float spacing at the value's size (dollars in the thousands).
    assert abs(usage.input_cost_usd - round(exact, 10)) <= 1e-10 + 2 * math.ulp(exact)


@given(st.floats(0, 1e5, allow_nan=False))
def test_milliseconds_are_rounded_to_three_decimals_as_round_does(seconds):
    value = ms(seconds)
    if not _near_a_tie(seconds * 1e6):
        assert value == round(seconds * 1000, 3)
    assert abs(value - round(seconds * 1000, 3)) <= 1e-3 * (1 + 1e-6)


def test_scaled_round_can_differ_from_round_only_at_a_tie():
    assert round(5e-11, 10) == 1e-10  # 5e-11 is a little above the tie in binary...
    assert scaled_round(5e-11, 1e10) == 0.0  # ...but 5e-11 * 1e10 is exactly 0.5
    assert scaled_round(1.23456789016e-5, 1e10) == round(1.23456789016e-5, 10)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("input", "0.15"),
        ("output", float("inf")),
        ("input", float("nan")),
        ("output", -1),
        ("cached_input", True),
    ],
)
def test_a_price_that_is_not_a_finite_number_fails_at_load_naming_it(field, value):
    deployment = {"provider": "openai", "id": "m-1", "input": 1.0, "output": 2.0, field: value}
    with pytest.raises(ValueError, match=f"'{field}' must be a finite price") as info:
        Catalog.load({"models": {"m": {"deployments": [deployment]}}})
    assert "'m'" in str(info.value) and "openai/m-1" in str(info.value)


def test_a_catalogue_file_with_a_bad_price_is_a_config_error(tmp_path):
    from lunar.server import load_config
    from lunar.server.config import ConfigError

    deployment = {"provider": "openai", "id": "x", "input": -1, "output": 1}
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"models": {"m": {"deployments": [deployment]}}}))
    config = load_config(None, {}, db=str(tmp_path / "l.db"))
    config = dataclasses.replace(config, catalog=str(path))
    with pytest.raises(ConfigError, match="'input' must be a finite price"):
        config.build_catalog()


def test_an_unreadable_lunar_catalog_names_the_variable(tmp_path, monkeypatch):
    """A missing file or invalid JSON is a ValueError saying which variable to fix, as a bad
    price in the same file is."""
    missing = tmp_path / "nope.json"
    monkeypatch.setenv("LUNAR_CATALOG", str(missing))
    with pytest.raises(ValueError, match=r"LUNAR_CATALOG=.*nope\.json.*No such file"):
        Catalog.load()
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    monkeypatch.setenv("LUNAR_CATALOG", str(broken))
    with pytest.raises(ValueError, match=r"LUNAR_CATALOG=.*broken\.json"):
        Catalog.load()


PRICED = {"provider": "openai", "id": "x", "input": 1, "output": 2}
TIER = {"input": 2, "output": 4}


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ({"deployments": {"provider": "openai", "id": "x"}}, "'deployments' must be a list"),
        ({"deployments": ["openai/x"]}, r"deployments\[0\] must be an object"),
        ({"deployments": [{"provider": "openai", "input": 1, "output": 2}]}, "'id'"),
        ({"deployments": [{"id": "x", "input": 1, "output": 2}]}, "'provider'"),
        # A typo must not leave the model silently unpriced (costs None).
        (
            {"deployments": [{"provider": "openai", "id": "x", "input": 1, "ouput": 2}]},
            "unknown field 'ouput'",
        ),
        ({"context": 8192, "deployments": []}, "unknown field 'context'"),
        ({"capabilities": ["tool"], "deployments": []}, "'capabilities' must be a list of tools"),
        ({"deployments": [{"provider": "openai", "id": "x", "output": 2}]}, "'input'"),
        (
            {"deployments": [{"provider": "openai", "id": "x", "cached_input": 1}]},
            "'input' and 'output'",
        ),
        ({"context_window": "128k", "deployments": []}, "'context_window'"),
        ({"max_output_tokens": 0, "deployments": []}, "'max_output_tokens'"),
        ({"capabilities": "tools", "deployments": []}, "'capabilities'"),
        ({"full_name": 3, "deployments": []}, "'full_name'"),
        ([{"provider": "openai", "id": "x"}], "must be an object"),
        (
            {"deployments": [{"provider": "openai", "id": "x", "service_tiers": {}}]},
            "'service_tiers' but no 'input' and 'output'",
        ),
        (
            {"deployments": [{**PRICED, "service_tiers": {"priority": {"input": 2}}}]},
            r"service_tiers\.priority must be an object with 'input' and 'output'",
        ),
        (
            {"deployments": [{**PRICED, "service_tiers": {"flex": {**TIER, "cache": 1}}}]},
            r"service_tiers\.flex has an unknown field 'cache'",
        ),
        (
            {"deployments": [{**PRICED, "service_tiers": {"flex": {**TIER, "output": -1}}}]},
            r"'service_tiers\.flex\.output' must be a finite price",
        ),
        ({"deployments": [{**PRICED, "service_tiers": [TIER]}]}, "must be an object"),
    ],
)
def test_a_malformed_catalogue_entry_fails_at_load_naming_the_model_and_field(entry, says):
    with pytest.raises(ValueError, match=says) as info:
        Catalog.load({"models": {"my-model": entry}})
    assert "'my-model'" in str(info.value)


def test_a_catalogue_whose_models_are_not_an_object_fails_at_load():
    with pytest.raises(ValueError, match="'models' must be an object"):
        Catalog.load({"models": [{"my-model": {}}]})


def test_cache_write_is_a_price_of_the_catalogue_and_of_the_gateway_config(tmp_path):
    from lunar.server import load_config

    assert Catalog.load().resolve("claude-sonnet-4-5")[0].prices.cache_write == 3.75
    cfg = tmp_path / "lunar.toml"
    cfg.write_text(
        '[models.house-claude]\ndeployments = [{provider = "anthropic", id = "c", '
        "input = 2.0, output = 8.0, cached_input = 0.2, cache_write = 2.5}]\n"
    )
    catalog = load_config(cfg, {}, db=str(tmp_path / "l.db")).build_catalog()
    prices = catalog.resolve("house-claude")[0].prices
    assert (prices.cached_input, prices.cache_write) == (0.2, 2.5)
    with pytest.raises(ValueError, match="'cache_write' must be a finite price"):
        Catalog.load(
            {"models": {"m": {"deployments": [
                {"provider": "anthropic", "id": "c", "input": 1, "output": 2, "cache_write": "x"}
            ]}}}
        )  # fmt: skip


def test_cache_writes_without_a_cache_write_price_cost_the_input_price():
    usage = Usage(prompt_tokens=1000, cached_tokens=300, cache_write_tokens=500)
    cost(usage, Prices(input=2.0, output=8.0, cached_input=0.2))
    assert usage.input_cost_usd == round(700 * 2.0 / 1e6, 10)  # 200 plain + 500 written
    assert usage.cached_input_cost_usd == round(300 * 0.2 / 1e6, 10)
    # A provider that says more was cached and written than the prompt had: each token once.
    usage = Usage(prompt_tokens=100, cached_tokens=80, cache_write_tokens=80)
    cost(usage, Prices(input=1.0, output=1.0, cached_input=0.1, cache_write=1.25))
    assert usage.input_cost_usd == round(20 * 1.25 / 1e6, 10)
    assert usage.cached_input_cost_usd == round(80 * 0.1 / 1e6, 10)


def test_cache_write_1h_is_a_price_of_the_catalogue_and_of_the_gateway_config(tmp_path):
    from lunar.server import load_config

    assert Catalog.load().resolve("claude-sonnet-4-5")[0].prices.cache_write_1h == 6.00
    cfg = tmp_path / "lunar.toml"
    cfg.write_text(
        '[models.house-claude]\ndeployments = [{provider = "anthropic", id = "c", '
        "input = 2.0, output = 8.0, cache_write = 2.5, cache_write_1h = 4.5}]\n"
    )
    catalog = load_config(cfg, {}, db=str(tmp_path / "l.db")).build_catalog()
    prices = catalog.resolve("house-claude")[0].prices
    assert (prices.cache_write, prices.cache_write_1h) == (2.5, 4.5)
    dep = {"provider": "anthropic", "id": "c", "input": 1, "output": 2}
    with pytest.raises(ValueError, match="'cache_write_1h' must be a finite price"):
        Catalog.load({"models": {"m": {"deployments": [{**dep, "cache_write_1h": -1}]}}})
    with pytest.raises(ValueError, match="has 'cache_write_1h' but no 'input' and 'output'"):
        Catalog.load(
            {"models": {"m": {"deployments": [{"provider": "anthropic", "id": "c",
                                               "cache_write_1h": 2.0}]}}}
        )  # fmt: skip


def test_1h_cache_writes_cost_their_price_else_twice_the_input_price():
    """Anthropic bills a 1-hour cache write at 2x the input price (a 5-minute one 1.25x):
    a deployment without a ``cache_write_1h`` price bills them at that, not at the
    5-minute price."""
    usage = Usage(prompt_tokens=1000, cached_tokens=300, cache_write_tokens=500,
                  cache_write_1h_tokens=200)  # fmt: skip
    cost(usage, Prices(input=2.0, output=8.0, cached_input=0.2, cache_write=2.5,
                       cache_write_1h=4.5))  # fmt: skip
    assert usage.input_cost_usd == round((200 * 2.0 + 300 * 2.5 + 200 * 4.5) / 1e6, 10)
    cost(usage, Prices(input=2.0, output=8.0, cached_input=0.2, cache_write=2.5))
    assert usage.input_cost_usd == round((200 * 2.0 + 300 * 2.5 + 200 * 4.0) / 1e6, 10)
    # More 1-hour writes than writes, more writes than the prompt: each token billed once.
    usage = Usage(prompt_tokens=100, cached_tokens=80, cache_write_tokens=80,
                  cache_write_1h_tokens=90)  # fmt: skip
    cost(usage, Prices(input=1.0, output=1.0, cached_input=0.1, cache_write=1.25))
    assert usage.input_cost_usd == round(20 * 2.0 / 1e6, 10)


def test_a_service_tiers_prices_are_its_own_and_other_tiers_bill_the_standard_ones(catalog):
    prices = catalog.resolve("gpt-4o")[0].prices
    assert prices is not None
    assert (prices.at("priority").input, prices.at("priority").output) == (4.25, 17.0)
    assert prices.at("priority").cached_input == 2.125
    for tier in ("default", "scale", None):
        assert prices.at(tier) is prices
    mine = Catalog.load(
        {"models": {"m": {"deployments": [{**PRICED, "service_tiers": {"flex": TIER}}]}}}
    )
    flex = mine.resolve("m")[0].prices.at("flex")
    assert (flex.input, flex.output, flex.cached_input) == (2, 4, None)
