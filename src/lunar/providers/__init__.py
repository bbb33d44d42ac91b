"""Sans-I/O provider adapters, one module per wire protocol."""

from __future__ import annotations

import importlib

from ._base import Adapter, HTTPRequest, StreamTranslator, Target

__all__ = ["Adapter", "HTTPRequest", "StreamTranslator", "Target", "adapter_for"]

_cache: dict[str, Adapter] = {}


def adapter_for(protocol: str) -> Adapter:
    """The adapter for a wire protocol named in the catalogue (``openai``, ``anthropic`` …)."""
    adapter = _cache.get(protocol)
    if adapter is None:
        module = importlib.import_module(f"{__name__}.{protocol}")
        adapter = _cache[protocol] = module.ADAPTER
    return adapter
