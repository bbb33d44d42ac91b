"""Lunar: one SDK and gateway over every LLM provider, with fallbacks, retries, cost on every
response, and an offline local model.

    from lunar import Lunar
    client = Lunar()
    for chunk in client.chat.completions.create(model="gpt-4o-mini", messages=[...], stream=True):
        print(chunk.choices[0].delta.content or "", end="")
"""

__version__ = "0.1.0"

from ._client import AsyncLunar, Lunar
from ._errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    Attempt,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    ConnectionError,
    GatewayTimeoutError,
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

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "AsyncLunar",
    "AsyncStream",
    "Attempt",
    "AuthenticationError",
    "BadRequestError",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionMessage",
    "Completion",
    "ConflictError",
    "ConnectionError",
    "GatewayTimeoutError",
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
