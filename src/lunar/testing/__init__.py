"""Test utilities: an emulator of three LLM wire formats with scripted faults.

One server speaks OpenAI Chat Completions (``/v1/chat/completions``, ``/v1/completions``),
Anthropic Messages (``/v1/messages``) and Google Gemini
(``/v1beta/models/{model}:generateContent`` and ``:streamGenerateContent?alt=sse``); every
`Reply` fault applies to each of them.

    from lunar.testing import MockServer, Reply

    with MockServer() as mock:
        mock.enqueue(Reply(status=429, retry_after=1.5), Reply(chunks=16, pacing=0.01))
        client = openai.OpenAI(base_url=mock.base_url, api_key="test")
        ...
        assert mock.requests[-1].json["model"] == "gpt-4o-mini"
        # Anthropic and Gemini clients take the host root: mock.url
        mock.enqueue(Reply(status=529), model="claude-3-haiku-20240307")

Standalone: ``python -m lunar.testing --port 4010`` (see `serve`).

Token accounting is deterministic and the same on every wire: input tokens = Σ over messages
(a separate system prompt counts as one) of (whitespace-separated words of the text + 3);
output tokens = content pieces sent times the number of choices. See `lunar.testing._render`
for the details.

This package depends only on the standard library and ``h11``.
"""

from __future__ import annotations

from ._render import STORY
from ._reply import RecordedRequest, Reply
from ._server import DEFAULT_MODELS, MockServer, serve

__all__ = ["DEFAULT_MODELS", "STORY", "MockServer", "RecordedRequest", "Reply", "serve"]
