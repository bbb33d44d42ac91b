"""The engine's pure policy: what to try next, how long to wait, what lands on the final chunk."""

from __future__ import annotations

import pytest

from lunar import APIConnectionError, BadRequestError, RateLimitError, ServerError
from lunar._catalog import Catalog
from lunar._engine import Plan, Router, StreamFinisher, backoff
from lunar._errors import error_from_response
from lunar._request import RequestOptions
from lunar._types import ChatCompletionChunk, ChoiceDelta, ChunkChoice, Usage

ENV = {
    "OPENAI_API_KEY": "sk-o",
    "GROQ_API_KEY": "gk",
    "TOGETHER_API_KEY": "tk",
    "FIREWORKS_API_KEY": "fk",
    "ANTHROPIC_API_KEY": "ak",
}


def router(env=ENV, **kw):
    return Router(Catalog.load(), environ=env, **kw)


def chain(r, model, fallbacks=None, provider=None):
    return r.chain(RequestOptions(model, fallbacks, provider))


def test_chain_is_model_then_fallbacks_with_every_deployment():
    c = chain(router(), "gpt-4o-mini", ["claude-3-haiku", "llama-3.1-8b"])
    assert [(m, t.provider) for m, t in c] == [
        ("gpt-4o-mini", "openai"),
        ("claude-3-haiku", "anthropic"),
        ("llama-3.1-8b", "groq"),
        ("llama-3.1-8b", "together"),
        ("llama-3.1-8b", "fireworks"),
    ]


def test_per_request_fallbacks_replace_client_level_ones():
    r = router(fallbacks={"gpt-4o-mini": ["claude-3-haiku"]})
    assert [m for m, _ in chain(r, "gpt-4o-mini")] == ["gpt-4o-mini", "claude-3-haiku"]
    assert [m for m, _ in chain(r, "gpt-4o-mini", ["llama-3.1-8b"])][:2] == [
        "gpt-4o-mini",
        "llama-3.1-8b",
    ]
    assert [m for m, _ in chain(r, "gpt-4o-mini", [])] == ["gpt-4o-mini"]


def test_missing_key_names_the_env_var_and_is_skipped():
    c = chain(router(env={}), "gpt-4o-mini")
    [(_, err)] = c
    assert "set OPENAI_API_KEY" in str(err)
    assert str(err).startswith("[401]")


def test_base_url_from_env_and_overrides():
    env = {**ENV, "GROQ_BASE_URL": "http://127.0.0.1:1/v1"}
    r = router(env=env, providers={"openai": {"api_key": "x", "base_url": "http://h/v1"}})
    assert chain(r, "llama-3.1-8b")[0][1].base_url == "http://127.0.0.1:1/v1"
    t = chain(r, "gpt-4o-mini")[0][1]
    assert (t.base_url, t.api_key) == ("http://h/v1", "x")


def test_unknown_fallback_is_skipped_but_unknown_model_raises():
    c = chain(router(), "gpt-4o-mini", ["nope-model"])
    assert "Unknown model 'nope-model'" in str(c[1][1])
    with pytest.raises(Exception, match="Unknown model"):
        chain(router(), "nope-model")


def step_through(plan, errors):
    """Drive a plan with a scripted error per attempt; returns [(model, provider, delay)]."""
    seen = []
    errors = list(errors)
    while (step := plan.next()) is not None:
        seen.append((step.model, step.target.provider, round(step.delay, 3)))
        if not errors:
            break
        plan.failed(step, errors.pop(0))
    return seen


def test_retries_then_falls_back_with_backoff():
    plan = Plan(chain(router(), "gpt-4o-mini", ["claude-3-haiku"]), max_retries=2, rand=lambda: 0.0)
    boom = error_from_response(500, {}, b"")
    seen = step_through(plan, [boom, boom, boom])
    assert seen == [
        ("gpt-4o-mini", "openai", 0),
        ("gpt-4o-mini", "openai", 0.5),
        ("gpt-4o-mini", "openai", 1.0),
        ("claude-3-haiku", "anthropic", 0),
    ]


def test_retry_after_is_honoured():
    plan = Plan(chain(router(), "gpt-4o-mini"), max_retries=1)
    err = error_from_response(429, {"retry-after-ms": "250"}, b"")
    assert step_through(plan, [err])[1][2] == 0.25


def test_too_long_retry_after_falls_back_at_once():
    plan = Plan(chain(router(), "gpt-4o-mini", ["claude-3-haiku"]), max_retries=2)
    err = error_from_response(429, {"retry-after": "3600"}, b"")
    assert [s[1] for s in step_through(plan, [err])] == ["openai", "anthropic"]


def test_should_retry_false_skips_retries_but_still_falls_back():
    plan = Plan(chain(router(), "gpt-4o-mini", ["claude-3-haiku"]), max_retries=2)
    err = error_from_response(503, {"x-should-retry": "false"}, b"")
    assert [s[1] for s in step_through(plan, [err])] == ["openai", "anthropic"]


def test_should_retry_true_retries_a_client_error_but_never_falls_back():
    """The provider's ``x-should-retry: true`` asks for a retry even on a 4xx (the openai SDK
    obeys it); the error still says nothing about another model, so no fallback."""
    plan = Plan(chain(router(), "gpt-4o-mini", ["claude-3-haiku"]), max_retries=2)
    err = error_from_response(400, {"x-should-retry": "true"}, b"")
    assert [s[1] for s in step_through(plan, [err, err, err])] == ["openai"] * 3
    assert plan.next() is None
    assert [a.provider for a in plan.error().attempts] == ["openai"] * 3


def test_a_fallback_too_small_for_the_prompt_is_passed_over():
    """A prompt longer than one fallback's context window says nothing of the next one's;
    the error to raise when nothing serves stays the outage that led to the fallbacks."""
    too_long = (
        b'{"error": {"message": "This model\'s maximum context length is 8192 tokens", '
        b'"type": "invalid_request_error", "param": "messages", '
        b'"code": "context_length_exceeded"}}'
    )
    outage = error_from_response(503, {}, b"")
    plan = Plan(chain(router(), "gpt-4o-mini", ["claude-3-haiku", "gpt-4o"]), max_retries=0)
    seen = step_through(plan, [outage, error_from_response(400, {}, too_long)])
    assert [s[1] for s in seen] == ["openai", "anthropic", "openai"]
    assert seen[-1][0] == "gpt-4o"
    plan = Plan(chain(router(), "gpt-4o-mini", ["claude-3-haiku"]), max_retries=0)
    step_through(plan, [outage, error_from_response(400, {}, too_long)])
    assert plan.error() is outage
    # Too long for the model asked for: that is what to change, nothing else is tried.
    plan = Plan(chain(router(), "gpt-4o-mini", ["claude-3-haiku"]), max_retries=0)
    assert len(step_through(plan, [error_from_response(400, {}, too_long)])) == 1
    assert plan.error().code == "context_length_exceeded"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_never_fall_back(status):
    plan = Plan(chain(router(), "gpt-4o-mini", ["claude-3-haiku"]), max_retries=2)
    err = error_from_response(status, {}, b"")
    assert len(step_through(plan, [err])) == 1
    raised = plan.error()
    assert raised is err
    assert [a.provider for a in raised.attempts] == ["openai"]


def test_connection_errors_fall_back_and_all_attempts_are_kept():
    plan = Plan(chain(router(), "gpt-4o-mini", ["claude-3-haiku"]), max_retries=0)
    e1, e2 = APIConnectionError("refused"), error_from_response(503, {}, b"")
    step_through(plan, [e1, e2])
    err = plan.error()
    assert err is e2
    assert [(a.model, a.provider, a.error) for a in err.attempts] == [
        ("gpt-4o-mini", "openai", e1),
        ("claude-3-haiku", "anthropic", e2),
    ]


def test_skipped_candidates_are_recorded_and_last_tried_error_wins():
    r = router(env={"OPENAI_API_KEY": "k"})
    plan = Plan(chain(r, "gpt-4o-mini", ["claude-3-haiku"]), max_retries=0)
    e1 = error_from_response(500, {}, b"")
    step_through(plan, [e1])
    err = plan.error()
    assert err is e1
    assert "ANTHROPIC_API_KEY" in str(err.attempts[1].error)


@pytest.mark.parametrize("n", range(6))
def test_backoff_bounds(n):
    base = min(0.5 * 2**n, 8.0)
    assert backoff(n, lambda: 0.0) == base
    assert backoff(n, lambda: 1.0) == pytest.approx(base * 0.75)


def chunk(content=None, finish=None, usage=None, choices=True, role=None):
    cs = [ChunkChoice(0, ChoiceDelta(role=role, content=content), finish)] if choices else []
    return ChatCompletionChunk("id1", 1, "gpt-4o-mini", cs, usage)


def test_finisher_puts_usage_cost_and_timing_on_the_finish_chunk():
    target = chain(router(), "gpt-4o-mini")[0][1]
    f = StreamFinisher(target, {"messages": []}, started=0.0)
    out = f.push([chunk("", role="assistant"), chunk("Hi"), chunk(" there")])
    assert [c.choices[0].delta.content for c in out] == ["", "Hi", " there"]
    assert f.push([chunk(finish="stop")]) == []  # held until usage arrives
    assert f.push([chunk(usage=Usage(10, 2), choices=False)]) == []
    [final] = f.end()
    assert final.choices[0].finish_reason == "stop"
    u = final.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (10, 2, 12)
    assert u.total_cost_usd == round(10 * 0.15 / 1e6 + 2 * 0.6 / 1e6, 10)
    assert u.latency_ms > 0 and u.ttft_ms > 0


def test_finisher_estimates_usage_when_upstream_reports_none():
    target = chain(router(), "gpt-4o-mini")[0][1]
    f = StreamFinisher(target, {"messages": [{"role": "user", "content": "x" * 40}]}, 0.0)
    f.push([chunk("y" * 20), chunk(finish="stop")])
    [final] = f.end()
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (10, 5)


def test_validation_errors_name_the_argument():
    from lunar._request import chat_body

    cases = [
        ([], {}, "messages"),
        ([{"role": "robot", "content": "x"}], {}, "messages[0].role"),
        ([{"role": "user", "content": 5}], {}, "messages[0].content"),
        ([{"role": "user", "content": "x"}], {"temperature": 3}, "temperature"),
        ([{"role": "user", "content": "x"}], {"n": 0}, "n"),
        ([{"role": "user", "content": "x"}], {"top_p": -1}, "top_p"),
        ([{"role": "user", "content": "x"}], {"stop": ["a", 5]}, "stop"),
    ]
    for messages, params, param in cases:
        with pytest.raises(BadRequestError) as info:
            chat_body(messages, params)
        assert info.value.param == param, (messages, params)
        assert param in str(info.value)


GOOD_PARAMS = {
    "temperature": 0.5,
    "top_p": 1,
    "presence_penalty": -2,
    "frequency_penalty": 2.0,
    "n": 1,
    "max_tokens": 5,
    "max_completion_tokens": 7,
    "seed": 3,
    "stop": ["a", "b"],
    "tools": [{"type": "function", "function": {"name": "f"}}],
    "response_format": {"type": "json_object"},
    "stream_options": {"include_usage": True},
}

BAD_PARAMS = [
    ("temperature", "2"),
    ("temperature", float("nan")),
    ("top_p", 1.5),
    ("presence_penalty", -3),
    ("frequency_penalty", True),
    ("n", 1.0),
    ("max_tokens", 0),
    ("max_completion_tokens", "5"),
    ("seed", False),
    ("stop", [1]),
    ("tools", {"name": "f"}),
    ("tools", [{"type": "function"}]),
    ("response_format", "json"),
    ("stream_options", ["include_usage"]),
]


def test_every_checked_parameter_accepts_good_values_and_names_a_bad_one():
    from lunar._request import chat_body

    messages = [{"role": "user", "content": "x"}]
    assert chat_body(messages, GOOD_PARAMS) == {"messages": messages, **GOOD_PARAMS}
    for name, value in BAD_PARAMS:
        with pytest.raises(BadRequestError) as info:
            chat_body(messages, {**GOOD_PARAMS, name: value})
        assert info.value.param.split("[")[0] == name, (name, value)
        assert name in str(info.value)


def test_the_first_bad_parameter_in_the_requests_order_is_the_one_named():
    from lunar._request import chat_body

    messages = [{"role": "user", "content": "x"}]
    for first, second in (("top_p", "n"), ("n", "top_p")):
        params = {first: -1, second: -1}
        with pytest.raises(BadRequestError) as info:
            chat_body(messages, params)
        assert info.value.param == first


def test_rate_limit_and_server_errors_are_typed():
    assert isinstance(error_from_response(429, {}, b""), RateLimitError)
    assert isinstance(error_from_response(500, {}, b""), ServerError)


def test_unhashable_role_or_part_type_is_a_clear_400():
    from lunar._request import chat_body

    with pytest.raises(BadRequestError) as info:
        chat_body([{"role": {}, "content": "x"}], {})
    assert info.value.param == "messages[0].role"
    with pytest.raises(BadRequestError) as info:
        chat_body([{"role": "user", "content": [{"type": []}]}], {})
    assert info.value.param == "messages[0].content[0]"


async def test_async_open_stream_gives_chunks_one_by_one_or_in_batches_never_both():
    from lunar._engine import AsyncOpenStream

    closed = []

    class Upstream:
        async def aclose(self) -> None:
            closed.append(True)

    async def reads():
        yield ["a1", "a2", "a3"]
        yield ["b1"]
        yield ["c1", "c2"]

    stream = AsyncOpenStream(reads(), Upstream())
    assert await stream.__anext__() == "a1"
    with pytest.raises(RuntimeError, match="chunk by chunk"):
        stream.batches()  # a2 and a3 would be lost
    assert [await stream.__anext__(), await stream.__anext__()] == ["a2", "a3"]
    batches = stream.batches()
    assert await batches.__anext__() == ["b1"]
    await stream.aclose()
    assert closed == [True]
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()


def test_a_fallback_of_a_protocol_lunar_lacks_does_not_break_the_requests_it_is_not_needed_for(
    mock,
):
    """The local model's refusal check looked up every deployment's adapter, fallbacks
    never tried included: one whose protocol does not exist (a catalogue typo) turned every
    request into a ModuleNotFoundError traceback."""
    from lunar import Lunar

    catalog = {
        "providers": {
            "acme": {"protocol": "opnai", "base_url": mock.base_url, "key_required": False}
        },
        "models": {"m": {"deployments": [{"provider": "acme", "id": "m"}]}},
    }
    client = Lunar(catalog=catalog, max_retries=0)
    answer = client.chat.completions.create(
        model="gpt-4o-mini", fallbacks=["m"], messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.provider == "openai"
