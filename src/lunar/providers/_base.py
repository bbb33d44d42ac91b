"""What every sans-I/O provider adapter offers, and the pieces they share.

An adapter never touches a socket: it turns a normalized request (an OpenAI-shaped body)
into an ``HTTPRequest``, turns response bytes into a ``ChatCompletion``, and gives a stream
translator that is fed raw bytes and returns OpenAI-shaped chunks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from .._catalog import Deployment, ProviderSpec
from .._errors import APIError
from .._types import ChatCompletion, ChatCompletionChunk


@dataclass(frozen=True)
class Target:
    """A deployment made concrete: where to send, with which credentials."""

    deployment: Deployment
    spec: ProviderSpec
    base_url: str
    api_key: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def provider(self) -> str:
        return self.deployment.provider

    @property
    def model(self) -> str:
        return self.deployment.model


class HTTPRequest(NamedTuple):
    method: str
    url: str
    headers: dict[str, str]
    content: bytes


class StreamTranslator(Protocol):
    def feed(self, data: bytes) -> list[ChatCompletionChunk]:
        """Bytes as they arrived in, the chunks they complete out. Raises ``StreamError``
        on an error event."""

    def close(self) -> list[ChatCompletionChunk]:
        """End of the byte stream: the last chunks, or an ``APIConnectionError`` when the
        stream ended before it was complete."""


class Adapter(Protocol):
    #: Whether the wire can answer several choices for one request (OpenAI ``n``, Gemini
    #: ``candidateCount``). Where it cannot, the engine refuses ``n`` > 1 before sending, or
    #: skips the deployment as a fallback: one answer must not stand for ``n`` of them.
    multiple_choices: bool
    # Optional: ``refusal(body) -> LunarError | None``, what the adapter cannot do in a body
    # (the local model's own checks). The engine asks it before trying the deployment, and
    # skips it as a fallback the way it skips one without tools or vision.

    def build_request(
        self, body: Mapping[str, Any], target: Target, stream: bool
    ) -> HTTPRequest: ...

    def parse_response(self, content: bytes, target: Target) -> ChatCompletion: ...

    def stream_translator(self, target: Target) -> StreamTranslator: ...

    def parse_error(
        self, status: int, headers: Mapping[str, str], content: bytes, target: Target
    ) -> APIError: ...
