"""The catalogue: providers, model aliases, provider model ids, prices and context windows.

All of it is data (``catalog.json`` beside this file); users extend or override it with
``Lunar(catalog=...)`` or the ``LUNAR_CATALOG`` environment variable (a JSON file path).
This module only reads it, resolves names and does the cost math.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ._errors import NotFoundError
from ._types import Model, Usage

_BUILTIN = Path(__file__).with_name("catalog.json")


@dataclass(frozen=True)
class ProviderSpec:
    name: str
    protocol: str
    base_url: str | None = None
    api_key_env: str | None = None
    api_key_env_alt: tuple[str, ...] = ()
    key_required: bool = True
    #: The most stop sequences the provider takes (OpenAI's 4, Gemini's 5); None: no limit
    #: Lunar knows of. A request with more is refused before it is sent there (a fallback
    #: there is skipped): ``Router.refusals``.
    max_stop_sequences: int | None = None
    #: Fields of Lunar's request this provider refuses, left out of what is sent to it
    #: (``top_k``, which OpenAI's own API does not take): OpenAI-wire providers only.
    drop_params: frozenset[str] = frozenset()
    #: Whether this OpenAI-wire provider takes Anthropic's ``cache_control`` on content parts,
    #: messages and tools (OpenRouter, which passes it on to Claude): the others do not get it.
    cache_control: bool = False

    @property
    def base_url_env(self) -> str:
        return f"{self.name.upper()}_BASE_URL"


def checked_base_url(url: str, setting: str) -> str:
    """``url`` without the spaces around it (a value pasted with them), once it is a URL
    requests can go to: ``http://`` or ``https://`` and a host. Else ``ValueError`` naming
    ``setting`` (an environment variable, an argument, a config key): without a scheme
    (``127.0.0.1:9000/v1``) every request would fail to connect and be retried, as if the
    provider were down. Called where a target or client is made, never per request."""
    url = url.strip()
    problem = _url_problem(url)
    if problem:
        raise ValueError(f"{setting} = {url!r} is not a usable base URL: {problem}")
    return url


def _url_problem(url: str) -> str | None:
    if not url:
        return "it is empty"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (a port that is not a number raises)
    except ValueError as e:
        return f"not a URL ({e})"
    if parts.scheme.lower() not in ("http", "https"):
        if "://" in url:
            return "the scheme must be http:// or https://"
        return f"it has no scheme (write 'http://{url}', or https://)"
    return None if parts.hostname else "it has no host"


#: What Anthropic bills a token written to its 1-hour prompt cache, in input prices: the
#: 1-hour write price of a deployment that does not give its own ``cache_write_1h``.
HOUR_WRITE_TIMES_INPUT = 2.0


@dataclass(frozen=True)
class Prices:
    """USD per 1M tokens. ``cached_input``: tokens read from a prompt cache (None: no
    discount, the input price); ``cache_write``: tokens written to one (Anthropic's
    5-minute cache, 1.25x its input price; None: the input price); ``cache_write_1h``:
    tokens written to Anthropic's 1-hour cache (None: ``HOUR_WRITE_TIMES_INPUT`` x the
    input price, as Anthropic bills them whatever the model)."""

    input: float
    output: float
    cached_input: float | None = None
    cache_write: float | None = None
    cache_write_1h: float | None = None
    #: Other prices by the service tier that answered (OpenAI's ``priority``, ``flex``):
    #: ``(tier, prices)`` pairs, so that the prices stay hashable.
    tiers: tuple[tuple[str, Prices], ...] = ()

    def at(self, tier: str | None) -> Prices:
        """The prices of an answer served at ``tier`` (the answer's ``service_tier``): its
        own when the catalogue gives them, else these."""
        for name, prices in self.tiers:
            if name == tier:
                return prices
        return self


#: The prices a priced deployment may leave out (each has a default: see ``Prices``).
OPTIONAL_PRICES = ("cached_input", "cache_write", "cache_write_1h")


@dataclass(frozen=True)
class Deployment:
    """One provider's offer of a model: ``model`` is Lunar's name, ``provider_model`` the
    provider's own id; ``prices`` is ``None`` for names the catalogue does not know."""

    model: str
    provider: str
    provider_model: str
    prices: Prices | None
    context_window: int | None = None
    max_output_tokens: int | None = None
    capabilities: frozenset[str] = field(default_factory=frozenset)
    #: False for ``provider/model`` names the catalogue does not know: nothing is assumed.
    catalogued: bool = True

    def __hash__(self) -> int:
        # Deployments key the router's and health's dicts on every request: the generated
        # hash of all eight fields (prices, capabilities) cost ~70 bytecodes a call. Equal
        # deployments share these three, so this one agrees with ``__eq__``.
        return hash((self.model, self.provider, self.provider_model))


def scaled_round(x: float, scale: float) -> float:
    """``x`` rounded to steps of ``1 / scale`` (scale 1e10: ten decimals), as
    ``round(x * scale) / scale``: a sixth of the cost of ``round(x, 10)``, which goes
    through a decimal string. The same value, except where ``x * scale`` lands within a
    rounding error of a half: there the two may differ by one step."""
    return round(x * scale) / scale


def cost(usage: Usage, prices: Prices) -> None:
    """Fill the cost fields of ``usage`` in place: tokens / 1e6 x price, per side, rounded to
    10 decimals. Cached input tokens are billed at the cached price when there is one, and
    tokens written to a cache (part of the input cost) at the cache-write price: the 1-hour
    one for those written to Anthropic's 1-hour cache."""
    prompt = usage.prompt_tokens
    cached = min(usage.cached_tokens, prompt) if prices.cached_input is not None else 0
    written = usage.cache_write_tokens
    if written:  # Anthropic's cache writes: a part of the prompt, never the tokens read
        written = min(written, prompt - min(usage.cached_tokens, prompt))
        write_price = prices.input if prices.cache_write is None else prices.cache_write
        hour = min(usage.cache_write_1h_tokens, written)  # of them, to the 1-hour cache
        if hour:
            hour_price = prices.cache_write_1h
            if hour_price is None:
                hour_price = HOUR_WRITE_TIMES_INPUT * prices.input
            written_cost = (written - hour) * write_price + hour * hour_price
        else:
            written_cost = written * write_price
        input_cost = scaled_round(
            ((prompt - cached - written) * prices.input + written_cost) / 1e6, 1e10
        )
    else:
        input_cost = scaled_round((prompt - cached) * prices.input / 1e6, 1e10)
    cached_cost = scaled_round(cached * (prices.cached_input or 0.0) / 1e6, 1e10)
    output_cost = scaled_round(usage.completion_tokens * prices.output / 1e6, 1e10)
    usage.input_cost_usd = input_cost
    usage.cached_input_cost_usd = cached_cost
    usage.output_cost_usd = output_cost
    usage.total_cost_usd = scaled_round(input_cost + cached_cost + output_cost, 1e10)


def _check_price(value: Any, model: str, deployment: Mapping[str, Any], field: str) -> None:
    """A price is a finite number of USD per 1M tokens, at least 0: anything else would
    fail (or bill infinity) on every request that uses it, so it fails at load."""
    if value is None and field in OPTIONAL_PRICES:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        where = f"{deployment.get('provider')}/{deployment.get('id')}"
        raise ValueError(
            f"Catalogue model '{model}', deployment '{where}': '{field}' must be a finite "
            f"price of at least 0 (USD per 1M tokens), got {value!r}"
        )


#: What a catalogue model entry and each of its deployments may say.
MODEL_KEYS = frozenset(
    {"deployments", "context_window", "max_output_tokens", "capabilities", "full_name"}
)
DEPLOYMENT_KEYS = frozenset(
    {"provider", "id", "input", "output", *OPTIONAL_PRICES, "context_window", "service_tiers"}
)
#: What a deployment's ``service_tiers`` entry may say: the prices its tier bills.
TIER_KEYS = frozenset({"input", "output", "cached_input"})
#: ``reasoning``: the model takes reasoning controls (``reasoning_effort``, ``thinking``); a
#: catalogued model without it is sent neither (a fallback answers without reasoning rather
#: than refusing the field).
CAPABILITIES = ("tools", "vision", "json", "reasoning")


def _check_model(name: str, m: Any) -> None:
    """A model entry a user wrote (``catalog=``, ``LUNAR_CATALOG``): the wrong shape fails
    here, naming the model and the field, not as a KeyError on load, a crash in
    ``lunar models`` or, for a price left out, a model silently unpriced."""

    def bad(what: str) -> ValueError:
        return ValueError(f"Catalogue model '{name}': {what}")

    if not isinstance(m, Mapping):
        raise bad(f"must be an object with 'deployments', got {m!r}")
    if extra := set(m) - MODEL_KEYS:  # a typo would be ignored, its value lost
        raise bad(f"unknown field '{sorted(extra)[0]}' (known: {', '.join(sorted(MODEL_KEYS))})")
    for key in ("context_window", "max_output_tokens"):
        value = m.get(key)
        if value is not None and (type(value) is not int or value <= 0):
            raise bad(f"'{key}' must be a whole number of tokens above 0, got {value!r}")
    caps = m.get("capabilities", ())
    if not isinstance(caps, (list, tuple)) or not all(c in CAPABILITIES for c in caps):
        raise bad(f"'capabilities' must be a list of {', '.join(CAPABILITIES)}, got {caps!r}")
    if m.get("full_name") is not None and not isinstance(m["full_name"], str):
        raise bad(f"'full_name' must be a string, got {m['full_name']!r}")
    deps = m.get("deployments", [])
    if not isinstance(deps, (list, tuple)):
        raise bad(f"'deployments' must be a list of objects, got {deps!r}")
    for i, d in enumerate(deps):
        if not isinstance(d, Mapping):
            raise bad(f"deployments[{i}] must be an object, got {d!r}")
        if extra := set(d) - DEPLOYMENT_KEYS:
            known = ", ".join(sorted(DEPLOYMENT_KEYS))
            field = sorted(extra)[0]
            raise bad(f"deployments[{i}] has an unknown field '{field}' (known: {known})")
        for key in ("provider", "id"):
            if not isinstance(d.get(key), str) or not d[key]:
                raise bad(f"deployments[{i}] needs '{key}' (a string), got {d.get(key)!r}")
        priced = [key for key in ("input", "output") if d.get(key) is not None]
        if len(priced) == 1:
            missing = "output" if priced == ["input"] else "input"
            raise bad(
                f"deployments[{i}] has '{priced[0]}' but no '{missing}' price: give both "
                "(USD per 1M tokens), or neither for an unpriced model"
            )
        for key in OPTIONAL_PRICES:
            if not priced and d.get(key) is not None:
                raise bad(f"deployments[{i}] has '{key}' but no 'input' and 'output' prices")
        tiers = d.get("service_tiers")
        if tiers is None:
            continue
        if not priced:
            raise bad(f"deployments[{i}] has 'service_tiers' but no 'input' and 'output' prices")
        if not isinstance(tiers, Mapping):
            raise bad(f"deployments[{i}].service_tiers must be an object, got {tiers!r}")
        for tier, t in tiers.items():
            where = f"deployments[{i}].service_tiers.{tier}"
            if not isinstance(t, Mapping) or t.get("input") is None or t.get("output") is None:
                raise bad(f"{where} must be an object with 'input' and 'output' prices")
            if extra := set(t) - TIER_KEYS:
                known = ", ".join(sorted(TIER_KEYS))
                raise bad(f"{where} has an unknown field '{sorted(extra)[0]}' (known: {known})")


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for section in ("providers", "models"):
        if section in extra:
            if not isinstance(extra[section], Mapping):
                raise ValueError(
                    f"Catalogue '{section}' must be an object of name: entry, "
                    f"got {type(extra[section]).__name__}"
                )
            merged = dict(base.get(section, {}))
            merged.update(extra[section])
            out[section] = merged
    return out


class Catalog:
    def __init__(self, data: Mapping[str, Any]) -> None:
        self.providers: dict[str, ProviderSpec] = {}
        for name, p in data.get("providers", {}).items():
            limit = p.get("max_stop_sequences")
            if limit is not None and (type(limit) is not int or limit < 1):
                raise ValueError(
                    f"Catalogue provider '{name}': 'max_stop_sequences' must be a whole number "
                    f"above 0, got {limit!r}"
                )
            dropped = p.get("drop_params", [])
            if not isinstance(dropped, list) or not all(isinstance(f, str) for f in dropped):
                raise ValueError(
                    f"Catalogue provider '{name}': 'drop_params' must be a list of field "
                    f"names, got {dropped!r}"
                )
            self.providers[name] = ProviderSpec(
                name=name,
                protocol=p.get("protocol", "openai"),
                base_url=p.get("base_url"),
                api_key_env=p.get("api_key_env"),
                api_key_env_alt=tuple(p.get("api_key_env_alt", ())),
                key_required=p.get("key_required", True),
                max_stop_sequences=limit,
                drop_params=frozenset(dropped),
                cache_control=p.get("cache_control") is True,
            )
        self.models: dict[str, list[Deployment]] = {}
        self._by_provider_id: dict[tuple[str, str], Deployment] = {}
        self._aliases: dict[str, str] = {}
        for name, m in data.get("models", {}).items():
            _check_model(name, m)
            caps = frozenset(m.get("capabilities", ()))
            deployments = []
            for d in m.get("deployments", ()):
                prices = None
                if d.get("input") is not None and d.get("output") is not None:
                    for field in ("input", "output", *OPTIONAL_PRICES):
                        _check_price(d.get(field), name, d, field)
                    tiers = []
                    for tier, t in (d.get("service_tiers") or {}).items():
                        for field, value in t.items():  # (input and output are there)
                            if value is not None:
                                _check_price(value, name, d, f"service_tiers.{tier}.{field}")
                        tiers.append((tier, Prices(t["input"], t["output"], t.get("cached_input"))))
                    prices = Prices(
                        d["input"],
                        d["output"],
                        d.get("cached_input"),
                        d.get("cache_write"),
                        d.get("cache_write_1h"),
                        tuple(tiers),
                    )
                dep = Deployment(
                    model=name,
                    provider=d["provider"],
                    provider_model=d["id"],
                    prices=prices,
                    context_window=d.get("context_window", m.get("context_window")),
                    max_output_tokens=m.get("max_output_tokens"),
                    capabilities=caps,
                )
                deployments.append(dep)
                self._by_provider_id[(dep.provider, dep.provider_model)] = dep
            self.models[name] = deployments
            if m.get("full_name"):
                self._aliases[m["full_name"]] = name

    @classmethod
    def load(cls, extra: Mapping[str, Any] | str | os.PathLike[str] | None = None) -> Catalog:
        data: dict[str, Any] = json.loads(_BUILTIN.read_text())
        env_path = os.environ.get("LUNAR_CATALOG")
        if env_path:
            try:
                data = _merge(data, json.loads(Path(env_path).read_text()))
            except (OSError, ValueError) as e:  # the variable is what to change: name it
                raise ValueError(
                    f"LUNAR_CATALOG={env_path!r} cannot be read as a catalogue file: "
                    f"{getattr(e, 'strerror', None) or e} (fix or unset LUNAR_CATALOG)"
                ) from None
        if isinstance(extra, (str, os.PathLike)):
            data = _merge(data, json.loads(Path(extra).read_text()))
        elif extra:
            data = _merge(data, extra)
        return cls(data)

    def resolve(self, name: str, provider: str | None = None) -> list[Deployment]:
        """Every deployment that can serve ``name``, in catalogue order.

        ``name`` is an alias (``gpt-4o-mini``), a full name (``local/smollm2-135m-instruct``),
        a provider's own id (``llama-3.1-8b-instant``) or ``provider/model`` to force a
        provider, which also passes through names the catalogue does not know (unpriced).
        """
        name = self._aliases.get(name, name)
        deployments = self.models.get(name)
        if deployments is None:
            prefix, _, rest = name.partition("/")
            if rest and prefix in self.providers and (provider is None or provider == prefix):
                return [self._forced(prefix, rest)]
            deployments = [d for (_, pid), d in self._by_provider_id.items() if pid == name]
        if not deployments:
            raise self.unknown(name)
        if provider is not None:
            chosen = [d for d in deployments if d.provider == provider]
            if not chosen:
                offered = ", ".join(sorted({d.provider for d in deployments}))
                raise NotFoundError(
                    f"Model '{name}' is not offered by provider '{provider}' "
                    f"(offered by: {offered})",
                    param="provider",
                    code="model_not_found",
                )
            return chosen
        return deployments

    def _forced(self, provider: str, model: str) -> Deployment:
        known = self._by_provider_id.get((provider, model))
        if known is not None:
            return known
        for dep in self.models.get(model, ()):
            if dep.provider == provider:
                return dep
        return Deployment(
            model=f"{provider}/{model}",
            provider=provider,
            provider_model=model,
            prices=None,
            catalogued=False,
        )

    def unknown(self, name: str) -> NotFoundError:
        names = list(self.models) + list(self._aliases)
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        return NotFoundError(
            f"Unknown model '{name}'.{hint} Use 'provider/model' to send any model id to a "
            "provider, or `lunar models` to list the catalogue.",
            param="model",
            code="model_not_found",
        )

    def list_models(self) -> list[Model]:
        out = []
        for name, deps in self.models.items():
            if not deps:
                continue
            first = deps[0]
            out.append(
                Model(
                    id=name,
                    owned_by=first.provider,
                    providers=[d.provider for d in deps],
                    context_window=first.context_window,
                    input_price_per_1m=first.prices.input if first.prices else None,
                    output_price_per_1m=first.prices.output if first.prices else None,
                    capabilities=sorted(first.capabilities),
                )
            )
        return out
