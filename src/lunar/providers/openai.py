"""The OpenAI Chat Completions wire protocol, spoken by OpenAI, Groq, Together, Fireworks,
DeepSeek, Mistral, OpenRouter, Ollama, vLLM and Lunar's own gateway."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._errors import (
    APIConnectionError,
    APIError,
    StreamError,
    error_from_response,
    error_from_stream_event,
)
from .._types import ChatCompletion, ChatCompletionChunk
from ._base import HTTPRequest, Target
from ._shared import HTTPAdapter, SSETranslator, dump_body, invalid_json, json_object
from ._shared import loads as _loads


class OpenAIStreamTranslator(SSETranslator):
    """OpenAI SSE bytes in, ``ChatCompletionChunk`` out. The chunks already have the shape
    callers want, so this only frames, parses and checks that the stream ended properly."""

    __slots__ = ("_done", "_finished", "_provider", "_remote")

    def __init__(self, provider: str, remote: bool = False) -> None:
        super().__init__()
        self._provider = provider
        self._remote = remote
        self._done = False
        self._finished = False

    def _translate(self, data: bytes, out: list[ChatCompletionChunk]) -> None:
        for event in self._sse.feed(data):
            text = event.data
            if self._done:
                continue
            if text == "[DONE]":
                self._done = True
                continue
            try:
                obj = _loads(text)
            except ValueError:
                raise StreamError(
                    f"Malformed event in the stream from '{self._provider}': {text[:200]!r}",
                    provider=self._provider,
                ) from None
            if not isinstance(obj, dict):
                raise StreamError(
                    f"Unexpected event in the stream from '{self._provider}': {text[:200]!r}",
                    provider=self._provider,
                )
            if "error" in obj and not obj.get("choices"):
                if self._remote:
                    raise error_from_stream_event(
                        obj["error"], self._provider, True, obj.get("status"), obj.get("attempts")
                    )
                raise error_from_stream_event(obj["error"], self._provider)
            chunk = ChatCompletionChunk.from_dict(
                obj, answered_by(obj, self._provider) if self._remote else self._provider
            )
            if not self._finished:
                for choice in chunk.choices:
                    if choice.finish_reason is not None:
                        self._finished = True
            out.append(chunk)

    def _end(self) -> list[ChatCompletionChunk]:
        if not self._done and not self._finished:
            raise APIConnectionError(
                f"The stream from '{self._provider}' ended before it was complete "
                "(no finish_reason and no [DONE])"
            )
        return []


class OpenAIAdapter(HTTPAdapter):
    def parse_error(
        self, status: int, headers: Mapping[str, str], content: bytes, target: Target
    ) -> APIError:
        remote = target.spec.name == REMOTE
        return error_from_response(status, headers, content, target.provider, remote)

    def build_request(self, body: Mapping[str, Any], target: Target, stream: bool) -> HTTPRequest:
        payload = dict(body)
        payload["model"] = target.deployment.provider_model
        if stream:
            payload["stream"] = True
            options = dict(payload.get("stream_options") or {})
            options["include_usage"] = True
            payload["stream_options"] = options
        else:
            payload.pop("stream", None)
            payload.pop("stream_options", None)
        headers = {"content-type": "application/json", "accept": "application/json"}
        if stream:
            headers["accept"] = "text/event-stream"
        if target.api_key:
            headers["authorization"] = f"Bearer {target.api_key}"
        headers.update(target.headers)
        url = target.base_url.rstrip("/") + "/chat/completions"
        return HTTPRequest("POST", url, headers, dump_body(payload))

    def parse_response(self, content: bytes, target: Target) -> ChatCompletion:
        obj = json_object(content, target.provider)
        if "choices" not in obj:
            if "error" in obj:
                remote = target.spec.name == REMOTE
                raise error_from_stream_event(obj["error"], target.provider, remote)
            raise invalid_json(target.provider, content)
        remote = target.spec.name == REMOTE
        provider = answered_by(obj, target.provider) if remote else target.provider
        return ChatCompletion.from_dict(obj, provider)

    def stream_translator(self, target: Target) -> OpenAIStreamTranslator:
        return OpenAIStreamTranslator(target.provider, remote=target.spec.name == REMOTE)


#: The provider name of a Lunar gateway (remote mode), whose answers say who served them.
REMOTE = "lunar"


def answered_by(obj: Mapping[str, Any], fallback: str) -> str:
    """Who answered, as a Lunar gateway reports it; any other upstream's ``provider`` field
    (OpenRouter sends one) is its own business, not Lunar's provider name."""
    provider = obj.get("provider")
    return provider if isinstance(provider, str) and provider else fallback


ADAPTER = OpenAIAdapter()
