"""The Lunar gateway: ``lunar serve``.

An OpenAI- and Anthropic-compatible HTTP API over the same engine as the SDK's direct mode,
with virtual keys, per-key limits and budgets, a usage ledger and Prometheus metrics.

    from lunar.server import create_app, load_config
    app = create_app(load_config("lunar.toml"))   # any ASGI server can run it

Needs the ``server`` extra (uvicorn, uvloop, httptools) to be served by ``lunar serve``.
"""

from __future__ import annotations

from .app import Gateway, create_app
from .cli import add_server_commands
from .config import ConfigError, ServerConfig, load_config
from .storage import KeyRecord, SQLiteStorage, Storage, UsageQuery, UsageRow

__all__ = [
    "ConfigError",
    "Gateway",
    "KeyRecord",
    "SQLiteStorage",
    "ServerConfig",
    "Storage",
    "UsageQuery",
    "UsageRow",
    "add_server_commands",
    "create_app",
    "load_config",
]
