"""Test utilities: an emulator of the OpenAI Chat Completions wire format with scripted faults.

    from lunar.testing import MockServer, Reply

    with MockServer() as mock:
        mock.enqueue(Reply(status=429, retry_after=1.5), Reply(chunks=16, pacing=0.01))
        client = openai.OpenAI(base_url=mock.base_url, api_key="test")
        ...
        assert mock.requests[-1].json["model"] == "gpt-4o-mini"

Standalone: ``python -m lunar.testing --port 4010`` (see `serve`).

Token accounting is deterministic: ``prompt_tokens`` = Σ over messages of (whitespace-separated
words of the content + 3); ``completion_tokens`` = content pieces sent times ``n``. See
`lunar.testing._render` for the details.

This package depends only on the standard library and ``h11``.
"""

from __future__ import annotations

from ._render import STORY
from ._reply import RecordedRequest, Reply
from ._server import DEFAULT_MODELS, MockServer, serve

__all__ = ["DEFAULT_MODELS", "STORY", "MockServer", "RecordedRequest", "Reply", "serve"]
