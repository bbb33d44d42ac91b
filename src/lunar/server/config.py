"""The gateway's configuration: defaults < ``lunar.toml`` < environment < command-line flags.

    [server]
    host = "127.0.0.1"
    port = 4000
    db = "./lunar.db"

    [providers.openai]
    api_key_env = "OPENAI_API_KEY"        # secrets by environment reference only
    [providers.my-vllm]                   # a new provider: give its protocol
    protocol = "openai"
    base_url = "http://10.0.0.5:8000/v1"
    key_required = false

    [models.llama-8b-house]               # extra models, in the catalogue's format
    context_window = 8192
    deployments = [{provider = "my-vllm", id = "meta-llama/Llama-3.1-8B-Instruct"}]

    [local.models]                        # GGUF files for the embedded llama.cpp runtime
    house-3b = "/models/house-3b.Q4_K_M.gguf"   # or {path = "...", context_window = 4096}

    [aliases]
    fast = "gpt-4o-mini"

    [cors]                                # browsers may call the gateway from these pages
    allow_origins = ["https://app.example.com"]

    [fallbacks]
    "gpt-4o-mini" = ["claude-3-5-haiku", "smollm2"]

See docs/gateway.md for every setting and its environment variable.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._catalog import _BUILTIN as BUILTIN_CATALOG
from .._catalog import CAPABILITIES, DEPLOYMENT_KEYS, MODEL_KEYS, Catalog, checked_base_url
from .._engine import NO_BASE_URL, Router
from .._errors import NotFoundError
from . import cors
from .storage import unusable_path

__all__ = ["ConfigError", "ProviderConfig", "ServerConfig", "load_config", "read_toml"]

# What `log_level` takes (`--log-level`'s choices too); any case from the file or environment.
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")

#: The body fields beyond OpenAI's chat parameters that a virtual key's request may pass on to
#: providers by default: sampling settings of open-model servers (vLLM, Together, Fireworks,
#: OpenRouter …). Nothing that picks another model or route (OpenRouter's ``models`` and
#: ``route``, ``provider``), another endpoint or credential (``base_url``, ``api_key`` for a
#: LiteLLM-style upstream), or a provider-side resource (Gemini's ``cachedContent``) or policy
#: (``safetySettings``): the operator adds those it wants to ``extra_body_fields``.
EXTRA_BODY_FIELDS = ("top_k", "min_p", "top_a", "repetition_penalty", "min_tokens")


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it and where it came from."""


@dataclass
class ProviderConfig:
    name: str
    protocol: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    api_key_env_alt: list[str] | None = None
    key_required: bool | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class ServerConfig:
    # [server]
    host: str = "127.0.0.1"
    port: int = 4000
    db: str = "./lunar.db"
    max_body_bytes: int = 8 * 1024 * 1024
    graceful_timeout_seconds: float = 30.0
    keys_refresh_seconds: float = 5.0
    metrics_public: bool = True
    log_level: str = "warning"
    extra_body_fields: list[str] = field(default_factory=lambda: list(EXTRA_BODY_FIELDS))
    # [engine]
    max_retries: int = 2
    timeout_seconds: float = 600.0
    connect_timeout_seconds: float = 10.0
    max_connections: int = 1000
    # [limits]
    window_seconds: float = 60.0
    output_tokens_estimate: int = 1024
    # [ledger]
    batch_size: int = 1000
    flush_interval_ms: float = 10.0
    durable_ack: bool = False
    # [cors] (no origins: off)
    allow_origins: list[str] = field(default_factory=list)
    allow_headers: list[str] = field(default_factory=lambda: ["*"])
    max_age_seconds: int = 600
    # routing
    providers: dict[str, ProviderConfig] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    fallbacks: dict[str, list[str]] = field(default_factory=dict)
    catalog: str | None = None
    # secrets and provenance (never printed)
    master_key: str | None = field(default=None, repr=False)
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ, repr=False)
    source: str | None = None
    origins: dict[str, str] = field(default_factory=dict, repr=False)

    def setting(self, name: str) -> str:
        """A setting as a message names it: by where its value came from (``--db``,
        ``$LUNAR_DB``, ``lunar.toml: server.db``, or ``server.db`` for the default)."""
        section = _SETTINGS[name][0]
        origin = self.origins.get(name, "default")
        if origin == "command line":
            return f"--{name.replace('_', '-')}"
        if origin.startswith("$"):
            return origin
        if origin == "default":
            return f"{section}.{name}"
        return f"{origin}: {section}.{name}"

    # -- what the engine is built from ---------------------------------------------------

    def build_catalog(self) -> Catalog:
        """The built-in catalogue, plus ``catalog`` (a JSON file), plus the providers and
        models of this file, plus the aliases."""
        file_data: dict[str, Any] = {}
        if self.catalog:
            try:
                file_data = json.loads(Path(self.catalog).read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"catalog = {self.catalog!r}: {e}") from None
        known = _load_catalog(file_data or None).providers
        new_providers: dict[str, Any] = {}
        for name, p in self.providers.items():
            if p.protocol is None and name in known:
                continue
            if p.protocol is None:
                raise ConfigError(
                    f"[providers.{name}] is not a provider Lunar knows: give its "
                    "'protocol' (openai, anthropic, gemini)"
                )
            entry: dict[str, Any] = {"protocol": p.protocol}
            if p.base_url:
                entry["base_url"] = p.base_url
            entry["api_key_env"] = p.api_key_env or f"{name.upper().replace('-', '_')}_API_KEY"
            if p.api_key_env_alt:
                entry["api_key_env_alt"] = p.api_key_env_alt
            if p.key_required is not None:
                entry["key_required"] = p.key_required
            new_providers[name] = entry
        merged = {
            "providers": {**file_data.get("providers", {}), **new_providers},
            "models": {**file_data.get("models", {}), **self.models},
        }
        catalog = _load_catalog(merged)
        for name, m in self.models.items():
            for d in m.get("deployments", ()):
                if d.get("provider") not in catalog.providers:
                    raise ConfigError(
                        f"[models.{name}]: unknown provider {d.get('provider')!r} (define it "
                        "under [providers.NAME] with a protocol)"
                    )
        for alias, target in self.aliases.items():
            try:
                catalog.models[alias] = list(catalog.resolve(target))
            except NotFoundError as e:
                raise ConfigError(f"[aliases] {alias} = {target!r}: {e.message}") from None
        for model, chain in self.fallbacks.items():
            for name in [model, *chain]:
                try:
                    catalog.resolve(name)
                except NotFoundError as e:
                    raise ConfigError(f"[fallbacks] {model!r}: {e.message}") from None
        return catalog

    def provider_overrides(self, catalog: Catalog) -> dict[str, dict[str, Any]]:
        """The Router's ``providers=`` argument. The environment wins over the file:
        ``{NAME}_BASE_URL`` beats ``base_url`` and the provider's usual key variable beats
        ``api_key_env`` of a known provider."""
        env = self.environ
        out: dict[str, dict[str, Any]] = {}
        for name, p in self.providers.items():
            spec = catalog.providers.get(name)
            if spec is None:
                continue
            o: dict[str, Any] = {}
            if p.headers:
                o["headers"] = dict(p.headers)
            if p.protocol is not None:  # defined by the file: the catalogue entry has the rest
                if o:
                    out[name] = o
                continue
            if p.base_url and not env.get(spec.base_url_env, "").strip():
                o["base_url"] = p.base_url
            if p.api_key_env and not (spec.api_key_env and env.get(spec.api_key_env)):
                value = env.get(p.api_key_env)
                if value:
                    o["api_key"] = value
            if o:
                out[name] = o
        return out

    def check_base_urls(self, catalog: Catalog) -> None:
        """Every provider's base URL is one requests can go to (``{NAME}_BASE_URL`` in the
        environment, a catalogue file's; this file's were checked as it was read): else a
        ``ConfigError`` naming it, at start-up, not an error on each request to it."""
        router = Router(catalog, self.provider_overrides(catalog), environ=self.environ)
        for name, spec in catalog.providers.items():
            url = router.base_url(spec)
            if isinstance(url, str):
                continue
            if url.code == NO_BASE_URL:
                raise ConfigError(
                    f"Provider '{name}' has no base URL: set {spec.base_url_env} or "
                    f"[providers.{name}] base_url"
                )
            raise ConfigError(url.message)

    def unset_providers(self, catalog: Catalog) -> dict[str, str]:
        """Providers that need no key and that nothing here sets up (Ollama and vLLM at
        their default loopback addresses): ``{name: why}``. The gateway serves none of them,
        or any client could send requests to whatever listens on those ports of its host."""
        env = self.environ
        # The built-in catalogue's own (not LUNAR_CATALOG's, which may set a base URL).
        builtin: dict[str, Any] = json.loads(BUILTIN_CATALOG.read_text())["providers"]
        used = {d.get("provider") for m in self.models.values() for d in m.get("deployments", ())}
        out = {}
        for name, spec in catalog.providers.items():
            known = builtin.get(name)
            if (
                spec.key_required
                or spec.protocol == "local"
                or known is None
                or spec.base_url != known.get("base_url")  # a catalogue file set it
                or name in self.providers
                or name in used
                or env.get(spec.base_url_env, "").strip()
                or (spec.api_key_env and env.get(spec.api_key_env))
            ):
                continue
            out[name] = (
                f"Provider '{name}' is not set up on this gateway: set {spec.base_url_env} "
                f"or [providers.{name}] base_url in its config to serve it"
            )
        return out

    # -- presentation --------------------------------------------------------------------

    def effective(self, catalog: Catalog | None = None) -> dict[str, Any]:
        """The configuration as it will be used, secrets masked: what
        ``lunar serve --print-config`` prints (TOML)."""
        env = self.environ
        catalog = catalog or self.build_catalog()
        overrides = self.provider_overrides(catalog)
        providers: dict[str, Any] = {}
        for name, spec in catalog.providers.items():
            o = overrides.get(name, {})
            base_url = (
                o.get("base_url") or env.get(spec.base_url_env, "").strip() or spec.base_url or ""
            )
            key_src = None
            if "api_key" in o:
                key_src = self.providers[name].api_key_env
            elif spec.api_key_env and env.get(spec.api_key_env):
                key_src = spec.api_key_env
            else:
                key_src = next((a for a in spec.api_key_env_alt if env.get(a)), None)
            if key_src:
                key = f"set (from ${key_src}, masked)"
            elif spec.key_required:
                named = self.providers[name].api_key_env if name in self.providers else None
                either = [v for v in (named, spec.api_key_env) if v]
                key = f"not set (set {' or '.join('$' + v for v in dict.fromkeys(either))})"
            else:
                key = "not needed"
            providers[name] = {"protocol": spec.protocol, "base_url": base_url, "api_key": key}
        master = "set (from $LUNAR_MASTER_KEY, masked)" if self.master_key else "NOT SET"
        return {
            "server": {
                "host": self.host,
                "port": self.port,
                "db": self.db,
                "master_key": master,
                "max_body_bytes": self.max_body_bytes,
                "graceful_timeout_seconds": self.graceful_timeout_seconds,
                "keys_refresh_seconds": self.keys_refresh_seconds,
                "metrics_public": self.metrics_public,
                "log_level": self.log_level,
                "extra_body_fields": list(self.extra_body_fields),
            },
            "engine": {
                "max_retries": self.max_retries,
                "timeout_seconds": self.timeout_seconds,
                "connect_timeout_seconds": self.connect_timeout_seconds,
                "max_connections": self.max_connections,
            },
            "limits": {
                "window_seconds": self.window_seconds,
                "output_tokens_estimate": self.output_tokens_estimate,
            },
            "ledger": {
                "batch_size": self.batch_size,
                "flush_interval_ms": self.flush_interval_ms,
                "durable_ack": self.durable_ack,
            },
            "cors": {
                "allow_origins": list(self.allow_origins),
                "allow_headers": list(self.allow_headers),
                "max_age_seconds": self.max_age_seconds,
            },
            "providers": providers,
            "aliases": dict(self.aliases),
            "fallbacks": {k: list(v) for k, v in self.fallbacks.items()},
            "models": {k: v for k, v in self.models.items()},
        }

    def render(self) -> str:
        where = self.source or "no config file"
        header = (
            f"# Effective Lunar gateway configuration ({where}); precedence: flags > "
            "environment > file > defaults. Secrets are masked.\n"
        )
        return header + to_toml(self.effective())


# ---------------------------------------------------------------------------------------------
# Reading


def _load_catalog(data: Mapping[str, Any] | None) -> Catalog:
    try:
        return Catalog.load(data)
    except ValueError as e:  # a price that is not one, in the catalogue file or [models]
        raise ConfigError(str(e)) from None


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            raise ConfigError(
                "Reading lunar.toml on Python 3.10 needs 'tomli': pip install tomli "
                "(or use Python 3.11+)"
            ) from None
    try:
        with open(path, "rb") as f:
            data: dict[str, Any] = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"Config file not found: {path}") from None
    except OSError as e:  # a directory, a file it may not read
        raise ConfigError(f"{path}: cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:  # TOML is UTF-8
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 text ({e.reason})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    return data


_KIND_NAMES = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    dict: "a table",
    list: "a list",
}


def _kind_name(kind: type | tuple[type, ...]) -> str:
    """``kind`` as a setting's expected value reads in an error: "an integer", not "a int"."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(_KIND_NAMES.get(k, f"a {k.__name__}") for k in kinds)


def _check(where: str, value: Any, kind: type | tuple[type, ...], positive: bool = False) -> Any:
    if kind is list:  # the settings' lists are of strings
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of strings, got {value!r}")
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise ConfigError(f"{where} must be {_kind_name(kind)}, got {value!r}")
    if positive and (value <= 0 or (isinstance(value, float) and not math.isfinite(value))):  # type: ignore[operator]
        raise ConfigError(f"{where} must be positive, got {value!r}")
    return value


# setting -> (section, type, positive, environment variable)
_SETTINGS: dict[str, tuple[str, type, bool, str | None]] = {
    "host": ("server", str, False, "LUNAR_HOST"),
    "port": ("server", int, False, "LUNAR_PORT"),
    "db": ("server", str, False, "LUNAR_DB"),
    "max_body_bytes": ("server", int, True, "LUNAR_MAX_BODY_BYTES"),
    "graceful_timeout_seconds": ("server", float, True, "LUNAR_GRACEFUL_TIMEOUT_SECONDS"),
    "keys_refresh_seconds": ("server", float, True, "LUNAR_KEYS_REFRESH_SECONDS"),
    "metrics_public": ("server", bool, False, "LUNAR_METRICS_PUBLIC"),
    "log_level": ("server", str, False, "LUNAR_LOG_LEVEL"),
    "extra_body_fields": ("server", list, False, "LUNAR_EXTRA_BODY_FIELDS"),
    "max_retries": ("engine", int, False, "LUNAR_MAX_RETRIES"),
    "timeout_seconds": ("engine", float, True, "LUNAR_TIMEOUT_SECONDS"),
    "connect_timeout_seconds": ("engine", float, True, "LUNAR_CONNECT_TIMEOUT_SECONDS"),
    "max_connections": ("engine", int, True, "LUNAR_MAX_CONNECTIONS"),
    "window_seconds": ("limits", float, True, "LUNAR_RATE_WINDOW_SECONDS"),
    "output_tokens_estimate": ("limits", int, True, "LUNAR_OUTPUT_TOKENS_ESTIMATE"),
    "batch_size": ("ledger", int, True, "LUNAR_LEDGER_BATCH_SIZE"),
    "flush_interval_ms": ("ledger", float, True, "LUNAR_LEDGER_FLUSH_INTERVAL_MS"),
    "durable_ack": ("ledger", bool, False, "LUNAR_LEDGER_DURABLE_ACK"),
    "allow_origins": ("cors", list, False, "LUNAR_CORS_ALLOW_ORIGINS"),
    "allow_headers": ("cors", list, False, "LUNAR_CORS_ALLOW_HEADERS"),
    "max_age_seconds": ("cors", int, False, "LUNAR_CORS_MAX_AGE_SECONDS"),
}
_SECTIONS = {
    "server",
    "engine",
    "limits",
    "ledger",
    "cors",
    "providers",
    "models",
    "aliases",
    "fallbacks",
    "catalog",
    "local",
}
_PROVIDER_KEYS = {
    "protocol",
    "base_url",
    "api_key_env",
    "api_key_env_alt",
    "key_required",
    "headers",
}


def _local_models(local: Any, src: str) -> dict[str, Any]:
    """``[local.models]``: a name for each GGUF file, as catalogue entries of the local
    provider (free, JSON mode by grammar)."""
    usage = f'{src}: [local.models] maps a name to a GGUF path: house = "/models/house.gguf"'
    if not isinstance(local, dict) or set(local) - {"models"}:
        raise ConfigError(usage)
    models = local.get("models") or {}
    if not isinstance(models, dict):
        raise ConfigError(usage)
    out: dict[str, Any] = {}
    for name, entry in models.items():
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise ConfigError(usage)
        extra = set(entry) - {"path", "context_window"}
        if extra:
            raise ConfigError(
                f"{src}: [local.models.{name}]: unknown setting '{sorted(extra)[0]}' "
                "(known: context_window, path)"
            )
        out[name] = {
            "context_window": _check(
                f"{src}: [local.models.{name}] context_window",
                entry.get("context_window", 2048),
                int,
                positive=True,
            ),
            "capabilities": ["json"],
            "deployments": [
                {"provider": "local", "id": entry["path"], "input": 0.0, "output": 0.0}
            ],
        }
    return out


# The wire protocols a provider of the file may speak (an adapter in lunar.providers each).
PROTOCOLS = ("openai", "anthropic", "gemini")
# A [models.NAME] entry and its deployments, in the catalogue's format.
_MODEL_KEYS, _DEPLOYMENT_KEYS = MODEL_KEYS, DEPLOYMENT_KEYS


def _check_model(where: str, m: dict[str, Any]) -> None:
    """A ``[models.NAME]`` entry: the catalogue reads what it knows and ignores the rest, so
    a typo (``ouput = 0.6``) would silently leave the model unpriced, and a wrong type
    (``capabilities = "tools"``) would be read as something else."""
    deps = m.get("deployments")
    if (
        not isinstance(deps, list)
        or not deps
        or not all(
            isinstance(d, dict)
            and isinstance(d.get("provider"), str)
            and isinstance(d.get("id"), str)
            for d in deps
        )
    ):
        raise ConfigError(
            f'{where} needs deployments = [{{provider = "...", '
            'id = "...", input = 0.15, output = 0.6}]'
        )
    extra = set(m) - _MODEL_KEYS
    if extra:
        raise ConfigError(
            f"{where}: unknown setting '{sorted(extra)[0]}' (known: "
            f"{', '.join(sorted(_MODEL_KEYS))})"
        )
    for name in ("context_window", "max_output_tokens"):
        if name in m:
            _check(f"{where} {name}", m[name], int, positive=True)
    if "full_name" in m:
        _check(f"{where} full_name", m["full_name"], str)
    caps = m.get("capabilities", [])
    if not isinstance(caps, list) or not all(c in CAPABILITIES for c in caps):
        raise ConfigError(
            f"{where} capabilities must be a list of {', '.join(CAPABILITIES)}, got {caps!r}"
        )
    for i, d in enumerate(deps):
        at = f"{where} deployments[{i}]"
        extra = set(d) - _DEPLOYMENT_KEYS
        if extra:
            raise ConfigError(
                f"{at}: unknown setting '{sorted(extra)[0]}' (known: "
                f"{', '.join(sorted(_DEPLOYMENT_KEYS))})"
            )
        if ("input" in d) != ("output" in d):
            raise ConfigError(
                f"{at}: give both 'input' and 'output' prices (USD per 1M tokens), or neither "
                "for an unpriced model"
            )
        if "context_window" in d:
            _check(f"{at} context_window", d["context_window"], int, positive=True)


# Settings that take one of a few words, in any case.
_CHOICES: dict[str, tuple[str, ...]] = {"log_level": LOG_LEVELS}


def _choice(where: str, name: str, value: Any) -> Any:
    """``value``, lower-cased, when ``name`` takes one of a few words and it is one."""
    choices = _CHOICES.get(name)
    if choices is None:
        return value
    if value.lower() not in choices:
        raise ConfigError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
    return value.lower()


def _from_env(name: str, text: str, kind: type) -> Any:
    if kind is list:  # comma-separated
        return [part.strip() for part in text.split(",") if part.strip()]
    try:
        if kind is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        return kind(text)
    except ValueError:
        raise ConfigError(f"${name} must be {_kind_name(kind)}, got {text!r}") from None


def load_config(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    **flags: Any,
) -> ServerConfig:
    """Build the effective configuration. ``flags`` are command-line values (``None``: not
    given) named like the settings (``host``, ``port``, ``db`` …)."""
    env = os.environ if environ is None else environ
    cfg = ServerConfig(environ=env)
    data: dict[str, Any] = {}
    from_env = path is None and bool(env.get("LUNAR_CONFIG"))
    if from_env:
        path = env["LUNAR_CONFIG"]
    if path is not None:
        try:
            data = read_toml(path)
        except ConfigError as e:
            if from_env:  # say where the path came from, as for any other setting
                raise ConfigError(f"$LUNAR_CONFIG: {e}") from None
            raise
        cfg.source = str(path)
        unknown = set(data) - _SECTIONS
        if unknown:
            raise ConfigError(
                f"{path}: unknown section [{sorted(unknown)[0]}] (known: "
                f"{', '.join(sorted(_SECTIONS))})"
            )
    src = str(path) if path is not None else ""

    known_by_section: dict[str, set[str]] = {}
    for name, (section, _, _, _) in _SETTINGS.items():
        known_by_section.setdefault(section, set()).add(name)
    for section, names in known_by_section.items():
        table = data.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{src}: [{section}] must be a table")
        extra = set(table) - names
        if extra:
            raise ConfigError(
                f"{src}: unknown setting {section}.{sorted(extra)[0]} (known: "
                f"{', '.join(sorted(names))})"
            )

    for name, (section, kind, positive, env_name) in _SETTINGS.items():
        value: Any = None
        origin = "default"
        table = data.get(section, {})
        if name in table:
            where = f"{src}: {section}.{name}"
            value = _choice(where, name, _check(where, table[name], kind, positive))
            origin = src
        if env_name and env.get(env_name):
            where = f"${env_name}"
            value = _from_env(env_name, env[env_name], kind)
            value = _choice(where, name, _check(where, value, kind, positive))
            origin = f"${env_name}"
        flag = flags.get(name)
        if flag is not None:
            where = f"--{name.replace('_', '-')}"
            value = _choice(where, name, _check(where, flag, kind, positive))
            origin = "command line"
        if value is not None:
            setattr(cfg, name, value)
            cfg.origins[name] = origin
    if not cfg.host.strip():
        # An empty host is every interface to the socket: a gateway open to the network
        # that its operator did not ask for.
        raise ConfigError(
            f"{cfg.setting('host')} is empty: give an interface (127.0.0.1; 0.0.0.0 for every "
            "IPv4 interface, :: for every IPv6 one)"
        )
    if not 0 <= cfg.port <= 65535:
        raise ConfigError(f"{cfg.setting('port')} must be between 0 and 65535, got {cfg.port}")
    if cfg.max_retries < 0:
        raise ConfigError(f"{cfg.setting('max_retries')} must be >= 0, got {cfg.max_retries}")
    problem = unusable_path(cfg.db)
    if problem:
        raise ConfigError(f"db = {cfg.db!r}: {problem}")
    # '~' as a shell would (the file and $LUNAR_DB are read by no shell).
    cfg.db = os.path.expanduser(cfg.db)
    if cfg.max_age_seconds < 0:
        raise ConfigError(
            f"{cfg.setting('max_age_seconds')} must be >= 0, got {cfg.max_age_seconds}"
        )
    cfg.allow_origins = _cors_list(cfg, "allow_origins", cors.origin)
    cfg.allow_headers = _cors_list(cfg, "allow_headers", cors.header_name)
    cfg.extra_body_fields = _body_fields(cfg)

    catalog = data.get("catalog")
    if catalog is not None:
        cfg.catalog = os.path.expanduser(_check(f"{src}: catalog", catalog, str))

    providers = data.get("providers", {})
    if not isinstance(providers, dict):
        raise ConfigError(f"{src}: [providers] must be a table of [providers.NAME] tables")
    for name, table in providers.items():
        where = f"{src}: [providers.{name}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where} must be a table")
        extra = set(table) - _PROVIDER_KEYS
        if "api_key" in extra:
            raise ConfigError(
                f"{where}: write no secret in the file; name the environment variable that "
                'holds it: api_key_env = "MY_KEY_VAR"'
            )
        if extra:
            raise ConfigError(
                f"{where}: unknown setting '{sorted(extra)[0]}' (known: "
                f"{', '.join(sorted(_PROVIDER_KEYS))})"
            )
        headers = table.get("headers", {})
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise ConfigError(f"{where}: headers must be a table of strings")
        alt = table.get("api_key_env_alt")
        if alt is not None and (
            not isinstance(alt, list) or not all(isinstance(a, str) for a in alt)
        ):
            raise ConfigError(f"{where}: api_key_env_alt must be a list of variable names")
        protocol = _opt(table, "protocol", str, where)
        if protocol is not None and protocol not in PROTOCOLS:
            # Else every request to its models would be a 500 (no adapter to import).
            raise ConfigError(
                f"{where} protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}"
            )
        base_url = _opt(table, "base_url", str, where)
        if base_url is not None:
            try:
                base_url = checked_base_url(base_url, f"{where} base_url")
            except ValueError as e:
                raise ConfigError(str(e)) from None
        pc = ProviderConfig(
            name=name,
            protocol=protocol,
            base_url=base_url,
            api_key_env=_opt(table, "api_key_env", str, where),
            api_key_env_alt=alt,
            key_required=_opt(table, "key_required", bool, where),
            headers=dict(headers),
        )
        cfg.providers[name] = pc

    models = data.get("models", {})
    if not isinstance(models, dict) or not all(isinstance(m, dict) for m in models.values()):
        raise ConfigError(f"{src}: [models.NAME] entries must be tables (catalogue format)")
    for name, m in models.items():
        _check_model(f"{src}: [models.{name}]", m)
    cfg.models = dict(models)
    cfg.models.update(_local_models(data.get("local", {}), src))

    aliases = data.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise ConfigError(f'{src}: [aliases] maps a name to a model name: fast = "gpt-4o-mini"')
    cfg.aliases = dict(aliases)

    fallbacks = data.get("fallbacks", {})
    if not isinstance(fallbacks, dict) or not all(
        isinstance(v, list) and all(isinstance(x, str) and x for x in v) for v in fallbacks.values()
    ):
        raise ConfigError(
            f"{src}: [fallbacks] maps a model to a list of models: "
            '"gpt-4o-mini" = ["claude-3-5-haiku"]'
        )
    cfg.fallbacks = {k: list(v) for k, v in fallbacks.items()}

    cfg.master_key = env.get("LUNAR_MASTER_KEY") or None
    return cfg


def _cors_list(cfg: ServerConfig, name: str, check: Callable[[str], str]) -> list[str]:
    """``[cors]``'s list ``name``, each entry checked (and spelled as browsers do), without
    repeats."""
    try:
        values = list(dict.fromkeys(check(v) for v in getattr(cfg, name)))
        cors.alone(values)
    except ValueError as e:
        raise ConfigError(f"{cfg.setting(name)}: {e}") from None
    return values


def _body_fields(cfg: ServerConfig) -> list[str]:
    """``extra_body_fields``: field names (``*`` alone: any field), without repeats."""
    names = list(dict.fromkeys(cfg.extra_body_fields))
    for name in names:
        if not name.strip() or name != name.strip():
            raise ConfigError(f"{cfg.setting('extra_body_fields')}: {name!r} is not a field name")
    if "*" in names and len(names) > 1:
        raise ConfigError(
            f"{cfg.setting('extra_body_fields')}: '*' (any field) stands alone, got {names!r}"
        )
    return names


def _opt(table: Mapping[str, Any], name: str, kind: type, where: str) -> Any:
    if name not in table:
        return None
    return _check(f"{where} {name}", table[name], kind)


# ---------------------------------------------------------------------------------------------
# Writing (for --print-config): enough TOML for nested tables of scalars and lists


def _toml_key(key: str) -> str:
    if key and all(c.isalnum() or c in "-_" for c in key):
        return key
    return json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{" + inner + "}"
    if value is None:
        return '""'
    return json.dumps(str(value))


def to_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    lines: list[str] = []
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    if prefix and (scalars or not tables):
        lines.append(f"[{prefix}]")
    for k, v in scalars.items():
        lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    if scalars or (prefix and not tables):
        lines.append("")
    for k, v in tables.items():
        name = f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k)
        lines.append(to_toml(v, name).rstrip("\n") + "\n")
    return "\n".join(lines)
