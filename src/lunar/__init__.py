"""Lunar: one SDK and gateway over every LLM provider, with fallbacks, retries, cost on every
response, and an offline local model.

    from lunar import Lunar
    client = Lunar()
    for chunk in client.chat.completions.create(model="gpt-4o-mini", messages=[...], stream=True):
        print(chunk.choices[0].delta.content or "", end="")
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

from ._errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    Attempt,
    AuthenticationError,
    BadGatewayError,
    BadRequestError,
    ClientClosedError,
    ConflictError,
    ConnectionError,
    GatewayTimeoutError,
    InternalServerError,
    LunarError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestEntityTooLargeError,
    ServerError,
    ServiceUnavailableError,
    StreamError,
    TimeoutError,
    UnprocessableEntityError,
)
from ._streaming import AsyncStream, Stream
from ._types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    Completion,
    Model,
    Usage,
)

if TYPE_CHECKING:
    from ._client import AsyncLunar, Lunar


def __getattr__(name: str) -> Any:
    """The clients load on first use: they bring httpx, which code that only needs Lunar's
    types and errors (or `lunar --help`) should not pay for."""
    if name in ("Lunar", "AsyncLunar"):
        from . import _client

        return getattr(_client, name)
    raise AttributeError(f"module 'lunar' has no attribute {name!r}")


__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncLunar",
    "AsyncStream",
    "Attempt",
    "AuthenticationError",
    "BadGatewayError",
    "BadRequestError",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionMessage",
    "ClientClosedError",
    "Completion",
    "ConflictError",
    "ConnectionError",
    "GatewayTimeoutError",
    "InternalServerError",
    "Lunar",
    "LunarError",
    "Model",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestEntityTooLargeError",
    "ServerError",
    "ServiceUnavailableError",
    "Stream",
    "StreamError",
    "TimeoutError",
    "UnprocessableEntityError",
    "Usage",
    "__version__",
]
