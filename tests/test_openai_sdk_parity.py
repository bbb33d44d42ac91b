"""Code written against the official ``openai`` SDK, ported to Lunar by changing the
import: the arguments it passes, the attributes it reads and the errors it catches behave
as they do there (against the emulator, over real sockets)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from lunar import BadRequestError, Lunar
from lunar.testing import Reply

MESSAGES = [{"role": "user", "content": "Hi"}]

#: OpenAI's chat parameters beyond the sampling ones, each with a value it takes.
OPENAI_PARAMS: dict[str, Any] = {
    "reasoning_effort": "low",
    "verbosity": "low",
    "metadata": {"run": "7"},
    "store": True,
    "service_tier": "auto",
    "modalities": ["text"],
    "prediction": {"type": "content", "content": "Hello"},
    "web_search_options": {"search_context_size": "low"},
    "safety_identifier": "user-1",
    "prompt_cache_key": "k1",
    "prompt_cache_retention": "24h",
    "max_completion_tokens": 50,
    "parallel_tool_calls": False,
}


def test_openais_chat_parameters_reach_an_openai_provider(mock):
    """They were a TypeError (unexpected keyword argument), though the gateway took them.
    (o4-mini: ``reasoning_effort`` goes only to a model that reasons, tests/test_reasoning.py.)"""
    Lunar().chat.completions.create(model="o4-mini", messages=MESSAGES, **OPENAI_PARAMS)
    sent = mock.requests[-1].json
    for name, value in OPENAI_PARAMS.items():
        assert sent[name] == value, name


def test_openais_chat_parameters_are_left_out_for_anthropic(mock, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-a")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", mock.url)
    # All but reasoning_effort, which is Anthropic's thinking (tests/test_reasoning.py).
    params = {k: v for k, v in OPENAI_PARAMS.items() if k != "reasoning_effort"}
    answer = Lunar().chat.completions.create(model="claude-3-haiku", messages=MESSAGES, **params)
    assert answer.choices[0].message.content
    sent = mock.requests[-1].json
    assert not set(OPENAI_PARAMS) & set(sent), sorted(set(OPENAI_PARAMS) & set(sent))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("reasoning_effort", 3),
        ("store", "yes"),
        ("metadata", {"k": 1}),
        ("modalities", "text"),
        ("prediction", "Hello"),
        ("service_tier", ["auto"]),
        # Answers Lunar's objects would not carry: refused, not sent to be dropped.
        ("modalities", ["text", "audio"]),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("functions", [{"name": "f", "parameters": {"type": "object"}}]),
        ("function_call", "auto"),
    ],
)
def test_a_bad_openai_parameter_is_refused_naming_it(mock, name, value):
    with pytest.raises(BadRequestError) as info:
        Lunar().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, **{name: value})
    assert info.value.param == name
    assert not mock.requests


@pytest.mark.parametrize(
    ("status", "openai_name"),
    [
        (400, "BadRequestError"),
        (401, "AuthenticationError"),
        (404, "NotFoundError"),
        (429, "RateLimitError"),
        (500, "InternalServerError"),
        (503, "InternalServerError"),
    ],
)
def test_errors_are_caught_and_read_as_with_the_openai_sdk(mock, status, openai_name):
    """The openai SDK's ``except`` clauses and attributes: its class names (``APIStatusError``
    and ``InternalServerError`` were missing) and ``e.body``, which is the answer's
    ``error`` object there (``e.body["code"]``), not the whole JSON."""
    import openai

    import lunar

    reply = Reply.status_error(status, "No.", type="some_type", code="some_code")
    mock.enqueue(reply, reply, model="gpt-4o-mini")
    theirs = openai.OpenAI(base_url=mock.base_url, api_key="sk", max_retries=0)
    with pytest.raises(openai.APIStatusError) as expected:
        theirs.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    with pytest.raises(lunar.APIStatusError) as got:
        Lunar(max_retries=0).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    err, want = got.value, expected.value
    assert isinstance(want, getattr(openai, openai_name))
    assert isinstance(err, getattr(lunar, openai_name))
    assert isinstance(err, lunar.APIError)
    for name in ("status_code", "body", "code", "param", "type"):
        assert getattr(err, name) == getattr(want, name), name
    assert err.body["message"] == "No."
    assert err.request_id is not None and err.request_id.startswith("req_mock_")


def _logprob_paths(choice_logprobs: Any) -> list[Any]:
    """What code written for the openai SDK reads of a choice's logprobs."""
    return [
        (t.token, t.logprob, t.bytes, [(a.token, a.logprob, a.bytes) for a in t.top_logprobs])
        for t in choice_logprobs.content
    ]


def test_logprobs_are_objects_as_in_the_openai_sdk(mock):
    """``choice.logprobs.content[0].logprob``: they were the raw dict (an AttributeError),
    whole and streamed; and their JSON is OpenAI's."""
    import openai

    theirs = openai.OpenAI(base_url=mock.base_url, api_key="sk", max_retries=0)
    ours = Lunar()
    kw: dict[str, Any] = {"model": "gpt-4o-mini", "messages": MESSAGES, "logprobs": True}
    want = theirs.chat.completions.create(**kw, top_logprobs=2).choices[0]
    got = ours.chat.completions.create(**kw, top_logprobs=2).choices[0]
    assert want.logprobs is not None and got.logprobs is not None
    assert len(got.logprobs.content) == 8
    assert _logprob_paths(got.logprobs) == _logprob_paths(want.logprobs)
    assert got.logprobs.refusal is None
    assert got.model_dump()["logprobs"] == want.model_dump()["logprobs"]

    want_chunks = [
        _logprob_paths(c.choices[0].logprobs)
        for c in theirs.chat.completions.create(**kw, stream=True)
        if c.choices and c.choices[0].logprobs
    ]
    got_chunks = [
        _logprob_paths(c.choices[0].logprobs)
        for c in ours.chat.completions.create(**kw, stream=True)
        if c.choices and c.choices[0].logprobs
    ]
    assert len(got_chunks) == 8 and got_chunks == want_chunks
    # Not asked: none, as before.
    assert (
        ours.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).choices[0].logprobs
        is None
    )


async def test_final_completion_of_a_stream_gathers_its_logprobs(mock):
    """``get_final_completion()`` had ``logprobs`` None though every chunk carried them; the
    openai SDK's stream helper joins the chunks' token lists, and so does Lunar now, in
    both clients (the whole answer's, the same tokens)."""
    import openai

    from lunar import AsyncLunar

    kw: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": MESSAGES,
        "logprobs": True,
        "top_logprobs": 2,
    }
    theirs = openai.OpenAI(base_url=mock.base_url, api_key="sk", max_retries=0)
    with theirs.chat.completions.stream(**kw) as helper:
        want = helper.get_final_completion().choices[0].logprobs
    whole = Lunar().chat.completions.create(**kw).choices[0].logprobs
    got = Lunar().chat.completions.create(**kw, stream=True).get_final_completion()
    client = AsyncLunar()
    stream = await client.chat.completions.create(**kw, stream=True)
    got_async = await stream.get_final_completion()
    await client.close()
    for final in (got, got_async):
        logprobs = final.choices[0].logprobs
        assert logprobs is not None and len(logprobs.content) == 8
        assert _logprob_paths(logprobs) == _logprob_paths(want) == _logprob_paths(whole)
        assert logprobs.refusal is None
        assert final.model_dump()["choices"][0]["logprobs"] == want.model_dump()
    # Not asked: none, as before.
    final = Lunar().chat.completions.create(**kw | {"logprobs": None}, stream=True)
    assert final.get_final_completion().choices[0].logprobs is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"exclude_unset": True},
        {"exclude_none": True},
        {"include": {"id", "choices"}},
        {"exclude": {"usage", "created"}},
        {"include": {"choices": {0: {"message": {"content", "role"}}}}},
        {"include": {"choices": {"__all__": {"finish_reason"}}}},
        {"exclude": {"choices": {0: {"message": ...}}, "usage": True}},
    ],
)
def test_model_dump_takes_the_openai_sdks_arguments(mock, kwargs):
    """``model_dump(exclude_unset=True)``, ``include=`` and ``exclude=`` were a TypeError;
    they keep what pydantic keeps of the same answer (Lunar's own fields aside)."""
    import openai

    theirs = openai.OpenAI(base_url=mock.base_url, api_key="sk", max_retries=0)
    want = theirs.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    got = Lunar().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    dumped, expected = got.model_dump(**kwargs), want.model_dump(**kwargs)

    def common(ours: Any, reference: Any) -> Any:
        """``ours`` where ``reference`` has it: Lunar's additions (provider, costs) and the
        openai SDK's (annotations, audio, ...) aside; the id and the time (one per request)
        are left out below."""
        if isinstance(ours, dict) and isinstance(reference, dict):
            return {k: common(v, reference[k]) for k, v in ours.items() if k in reference}
        if isinstance(ours, list):
            return [common(a, b) for a, b in zip(ours, reference, strict=True)]
        return ours

    mine = common(dumped, expected)
    theirs_common = common(expected, dumped)
    for side in (mine, theirs_common):
        side.pop("id", None)
        side.pop("created", None)
    assert mine == theirs_common
    assert set(dumped) - set(expected) <= {"provider"}
    assert got.model_dump_json(**kwargs) == json.dumps(dumped, separators=(",", ":"))


# -- extra_query ------------------------------------------------------------------------------

QUERY = {"api-version": "2024-06-01", "flag": True, "n": 2, "skip": None, "q": "a b&c"}


def test_extra_query_goes_on_the_url_as_the_openai_sdk_sends_it(mock):
    """``extra_query=`` was a TypeError; Azure-style ``api-version`` is its common use."""
    import openai

    theirs = openai.OpenAI(base_url=mock.base_url, api_key="sk", max_retries=0)
    theirs.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, extra_query=QUERY)
    want = mock.requests[-1].query
    Lunar().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, extra_query=QUERY)
    got = mock.requests[-1]
    assert got.path == "/v1/chat/completions"
    assert sorted(got.query.split("&")) == sorted(want.split("&"))
    assert got.query == "api-version=2024-06-01&flag=true&n=2&q=a+b%26c"
    # Streamed, and through the legacy completions, too.
    list(
        Lunar().chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_query={"v": "1"}
        )
    )
    assert mock.requests[-1].query == "v=1"
    Lunar().completions.create(model="gpt-4o-mini", prompt="Hi", extra_query={"v": "2"})
    assert mock.requests[-1].query == "v=2"
    Lunar().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert mock.requests[-1].query == ""


async def test_extra_query_on_async_pool_and_after_a_urls_own_query(mock, monkeypatch):
    """Lunar's own pool sends it too; a provider URL with a query of its own (Gemini's
    streams: ``?alt=sse``) gets it after that."""
    from lunar import AsyncLunar

    monkeypatch.setenv("GEMINI_API_KEY", "gk")
    monkeypatch.setenv("GEMINI_BASE_URL", mock.url)
    client = AsyncLunar()
    await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, extra_query={"api-version": "1"}
    )
    assert mock.requests[-1].query == "api-version=1"
    stream = await client.chat.completions.create(
        model="gemini-2.0-flash", messages=MESSAGES, stream=True, extra_query={"v": "2"}
    )
    assert [c async for c in stream]
    assert mock.requests[-1].query == "alt=sse&v=2"
    await client.close()


def test_default_query_goes_with_every_request_under_extra_query(mock):
    """``Lunar(default_query=...)``, as the openai SDK's (Azure's ``api-version``): it was a
    TypeError. Every request's URL carries it; a request's ``extra_query`` goes over it name
    by name, as there (the same query strings from both SDKs); a ``None`` leaves one out."""
    import openai

    default = {"api-version": "2024-06-01", "deployment": "a"}
    theirs = openai.OpenAI(
        base_url=mock.base_url, api_key="sk", max_retries=0, default_query=default
    )
    ours = Lunar(default_query=default)
    for extra in (None, {"api-version": "2025-01-01", "x": 1}):
        sent = []
        for sdk in (theirs, ours):
            kw = {} if extra is None else {"extra_query": extra}
            sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, **kw)
            sent.append(mock.requests[-1].query)
        assert sent[0] == sent[1], extra
    assert sent[1] == "api-version=2025-01-01&deployment=a&x=1"
    ours.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, extra_query={"deployment": None}
    )
    assert mock.requests[-1].query == "api-version=2024-06-01"
    ours.completions.create(model="gpt-4o-mini", prompt="Hi")
    assert mock.requests[-1].query == "api-version=2024-06-01&deployment=a"
    # A copy adds to them (default_query) or replaces them (set_default_query).
    ours.with_options(default_query={"deployment": "b"}).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES
    )
    assert mock.requests[-1].query == "api-version=2024-06-01&deployment=b"
    ours.with_options(set_default_query={"v": True}).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES
    )
    assert mock.requests[-1].query == "v=true"
    Lunar().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert mock.requests[-1].query == ""


async def test_default_query_in_remote_mode_and_on_the_async_client(mock):
    """To the gateway's URL, as the openai SDK pointed at it sends it: chat and the model
    list alike."""
    from lunar import AsyncLunar

    client = AsyncLunar(base_url=mock.base_url, api_key="lk", default_query={"team": "t1"})
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert mock.requests[-1].query == "team=t1"
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_query={"run": 2}
    )
    assert [c async for c in stream]
    assert mock.requests[-1].query == "team=t1&run=2"
    await client.models.list()
    assert (mock.requests[-1].path, mock.requests[-1].query) == ("/v1/models", "team=t1")
    await client.close()


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("api-version=1", "default_query"),
        ({"": "1"}, "default_query"),
        ({"v": [1]}, "default_query.v"),
        ({"v": float("nan")}, "default_query.v"),
    ],
)
def test_a_bad_default_query_fails_at_construction_naming_it(query, param):
    with pytest.raises(ValueError, match=re.escape(f"'{param}'")):
        Lunar(default_query=query)


def test_extra_query_goes_to_the_gateway_in_remote_mode(mock):
    """As ``extra_headers``: to the gateway's URL, as the openai SDK pointed at it sends it."""
    client = Lunar(base_url=mock.base_url, api_key="lk")
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, extra_query={"a": 1})
    assert mock.requests[-1].query == "a=1"
    assert mock.requests[-1].path == "/v1/chat/completions"


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("api-version=1", "extra_query"),
        ({1: "x"}, "extra_query"),
        ({"": "x"}, "extra_query"),
        ({"v": ["1", "2"]}, "extra_query.v"),
        ({"v": {"a": 1}}, "extra_query.v"),
        ({"v": float("nan")}, "extra_query.v"),
    ],
)
def test_a_bad_extra_query_is_refused_naming_it(mock, query, param):
    with pytest.raises(BadRequestError) as info:
        Lunar().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, extra_query=query)
    assert info.value.param == param
    assert not mock.requests


# -- service_tier, annotations, audio, function_call -------------------------------------------

CITED = {
    "id": "chatcmpl-cited",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4o-mini",
    "service_tier": "default",
    "choices": [
        {
            "index": 0,
            "finish_reason": "stop",
            "message": {
                "role": "assistant",
                "content": "The moon is far [1].",
                "refusal": None,
                "annotations": [
                    {
                        "type": "url_citation",
                        "url_citation": {
                            "start_index": 16,
                            "end_index": 19,
                            "title": "Moon",
                            "url": "https://example.org/moon",
                        },
                    }
                ],
            },
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11},
}


def _read_as_openai_code_does(answer: Any) -> Any:
    message = answer.choices[0].message
    return (
        answer.service_tier,
        [
            (
                a.type,
                a.url_citation.url,
                a.url_citation.title,
                a.url_citation.start_index,
                a.url_citation.end_index,
            )
            for a in message.annotations or []
        ],
        message.audio,
        message.function_call,
    )


def test_service_tier_and_annotations_read_as_with_the_openai_sdk(mock):
    """``answer.service_tier`` and ``message.annotations`` (web-search citations), and the
    ``audio`` / ``function_call`` openai code reads, were AttributeErrors."""
    import openai

    theirs = openai.OpenAI(base_url=mock.base_url, api_key="sk", max_retries=0)
    mock.enqueue(Reply(body=CITED), Reply(body=CITED), model="gpt-4o-mini")
    kw: dict[str, Any] = {"model": "gpt-4o-mini", "messages": MESSAGES}
    want = theirs.chat.completions.create(**kw, web_search_options={})
    got = Lunar().chat.completions.create(**kw, web_search_options={})
    assert _read_as_openai_code_does(got) == _read_as_openai_code_does(want)
    assert got.service_tier == "default" and len(got.choices[0].message.annotations) == 1
    dumped = got.model_dump()
    assert dumped["service_tier"] == "default"
    assert (
        dumped["choices"][0]["message"]["annotations"]
        == (want.model_dump()["choices"][0]["message"]["annotations"])
    )
    # Put back in the conversation, the message goes as the openai SDK sends it.
    sent = []
    for sdk in (theirs, Lunar()):
        answer = want if sdk is theirs else got
        sdk.chat.completions.create(**(kw | {"messages": [*MESSAGES, answer.choices[0].message]}))
        sent.append(mock.requests[-1].json["messages"][-1]["annotations"])
    assert sent[0] == sent[1] == CITED["choices"][0]["message"]["annotations"]


def test_without_them_they_are_none_and_not_in_the_json(mock):
    answer = Lunar().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    message = answer.choices[0].message
    assert answer.service_tier is None and message.annotations is None
    assert message.audio is None and message.function_call is None
    assert "service_tier" not in answer.to_dict() and "annotations" not in message.to_dict()
    for chunk in Lunar().chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True
    ):
        assert chunk.service_tier is None
        for choice in chunk.choices:
            assert choice.delta.function_call is None
            assert choice.delta.annotations is None
            assert "annotations" not in choice.delta.to_dict()


CITATIONS = CITED["choices"][0]["message"]["annotations"]


async def test_streamed_annotations_reach_the_deltas_and_the_final_completion(mock):
    """A web-search model streams its citations in a delta of their own; Lunar dropped
    them (``delta.annotations`` did not exist, ``get_final_completion()`` had none). Now
    the delta has them as objects, and the final message has them as the openai SDK's
    stream helper gathers them (and as the whole answer has them), in both clients."""
    import openai

    from lunar import AsyncLunar

    reply = Reply(annotations=CITATIONS)
    mock.enqueue(*[reply] * 4, model="gpt-4o-mini")
    kw: dict[str, Any] = {"model": "gpt-4o-mini", "messages": MESSAGES}
    theirs = openai.OpenAI(base_url=mock.base_url, api_key="sk", max_retries=0)
    with theirs.chat.completions.stream(**kw) as helper:
        want = helper.get_final_completion()
    assert want.choices[0].message.annotations  # the emulator streams them as OpenAI does
    whole = Lunar().chat.completions.create(**kw)
    stream = Lunar().chat.completions.create(**kw, stream=True)
    cited = [c.choices[0].delta for c in stream if c.choices and c.choices[0].delta.annotations]
    assert len(cited) == 1 and cited[0].content is None
    assert cited[0].annotations[0].url_citation.url == "https://example.org/moon"
    assert cited[0].to_dict()["annotations"] == CITATIONS
    client = AsyncLunar()
    astream = await client.chat.completions.create(**kw, stream=True)
    finals = [stream.get_final_completion(), await astream.get_final_completion()]
    await client.close()
    for final in finals:
        message = final.choices[0].message
        assert _read_as_openai_code_does(final)[1] == _read_as_openai_code_does(want)[1]
        assert _read_as_openai_code_does(final)[1] == _read_as_openai_code_does(whole)[1]
        text = message.content
        assert text == want.choices[0].message.content == whole.choices[0].message.content
        dumped = final.model_dump()["choices"][0]["message"]["annotations"]
        assert dumped == want.model_dump()["choices"][0]["message"]["annotations"] == CITATIONS


# -- the error hierarchy ----------------------------------------------------------------------

ERROR_NAMES = [
    "APIError",
    "APIStatusError",
    "APIConnectionError",
    "APITimeoutError",
    "BadRequestError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "ConflictError",
    "UnprocessableEntityError",
    "RateLimitError",
    "InternalServerError",
]


@pytest.mark.parametrize("name", ERROR_NAMES)
def test_the_error_classes_nest_as_the_openai_sdks(name):
    """``APIConnectionError`` and ``APITimeoutError`` were not ``APIError``s (they are in
    the openai SDK), and ``APIStatusError`` was ``APIError`` itself (so it caught them)."""
    import openai

    import lunar

    for base in ERROR_NAMES:
        want = issubclass(getattr(openai, name), getattr(openai, base))
        assert issubclass(getattr(lunar, name), getattr(lunar, base)) == want, base


async def test_connection_errors_are_caught_as_with_the_openai_sdk(mock):
    """Nothing listening, then a timeout: ``except APIError`` catches them and ``except
    APIStatusError`` does not, in both SDKs; status-less, not retried past ``max_retries``."""
    import socket

    import openai

    import lunar

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    theirs = openai.OpenAI(base_url=dead, api_key="sk", max_retries=0)
    ours = Lunar(providers={"openai": {"base_url": dead, "api_key": "sk"}}, max_retries=0)
    for sdk, mod in ((theirs, openai), (ours, lunar)):
        with pytest.raises(mod.APIError) as info:
            sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        err = info.value
        assert type(err) is mod.APIConnectionError
        assert not isinstance(err, mod.APIStatusError)
        assert getattr(err, "status_code", None) is None and err.body is None

    mock.enqueue(Reply(delay=0.5), Reply(delay=0.5), model="gpt-4o-mini")
    theirs = openai.OpenAI(base_url=mock.base_url, api_key="sk", max_retries=0, timeout=0.05)
    for sdk, mod in ((theirs, openai), (Lunar(max_retries=0, timeout=0.05), lunar)):
        with pytest.raises(mod.APIError) as info:
            sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert type(info.value) is mod.APITimeoutError
    assert isinstance(info.value, lunar.APIConnectionError)
    assert info.value.retryable and info.value.type == "timeout_error"


def test_status_errors_and_gateway_errors_keep_their_places():
    """What Lunar adds stays as it was: a 502/504 from a gateway that could not reach the
    provider is a status error and a connection error at once, and retries as its status
    and ``x-should-retry`` say (the gateway's ``false`` is honoured)."""
    import lunar
    from lunar._errors import error_from_response

    body = b'{"error": {"message": "down", "type": "api_connection_error"}}'
    gone = error_from_response(502, {"x-should-retry": "false"}, body)
    assert type(gone) is lunar.BadGatewayError
    assert isinstance(gone, lunar.APIStatusError) and isinstance(gone, lunar.APIConnectionError)
    assert not gone.retryable and gone.status_code == 502
    late = error_from_response(504, {}, b"")
    assert isinstance(late, lunar.APITimeoutError) and isinstance(late, lunar.APIStatusError)
    assert late.retryable
    odd = error_from_response(418, {}, b"")
    assert type(odd) is lunar.APIStatusError and isinstance(odd, lunar.APIError)
    assert not isinstance(odd, lunar.APIConnectionError)
    assert not issubclass(lunar.StreamError, lunar.APIStatusError)
