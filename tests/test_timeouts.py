"""``timeout``, per client and per request, on every client (sync; async on Lunar's pool;
async on a caller's httpx client): what is accepted, what a bad one raises (before any
network call, the same everywhere), and what ``None`` means."""

from __future__ import annotations

import math

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lunar import APITimeoutError, AsyncLunar, BadRequestError, Lunar
from lunar._client import DEFAULT_TIMEOUT
from lunar._request import CONNECT_TIMEOUT, LONGEST_TIMEOUT, parse_timeout
from lunar.testing import Reply

MESSAGES = [{"role": "user", "content": "Tell me a story."}]
CLIENTS = ["sync", "async", "async-httpx"]


def make(mode: str, http_timeout: float | None = None, **kw):
    """A client; for the ``-httpx`` modes on a caller's httpx client (with ``http_timeout``
    as its own timeout when given, else httpx's default)."""
    http_kw = {} if http_timeout is None else {"timeout": http_timeout}
    if mode == "sync":
        return Lunar(**kw)
    if mode == "sync-httpx":
        return Lunar(**kw, http_client=httpx.Client(**http_kw))
    if mode == "async-httpx":
        return AsyncLunar(**kw, http_client=httpx.AsyncClient(**http_kw))
    return AsyncLunar(**kw)


async def create(client, stream: bool = False, **kw):
    result = client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=stream, **kw
    )
    if isinstance(client, AsyncLunar):
        result = await result
        return [c async for c in result] if stream else result
    return list(result) if stream else result


BAD = [
    pytest.param("30", "timeout", "must be a number of seconds", id="str"),
    pytest.param(True, "timeout", "must be a number of seconds", id="bool"),
    pytest.param((5.0, 5.0), "timeout", "must be a number of seconds", id="tuple"),
    pytest.param(-1, "timeout", "more than 0", id="negative"),
    pytest.param(0, "timeout", "more than 0", id="zero"),
    pytest.param(0.0, "timeout", "more than 0", id="zero-float"),
    pytest.param(math.inf, "timeout", "finite", id="inf"),
    pytest.param(math.nan, "timeout", "finite", id="nan"),
    pytest.param(httpx.Timeout(5.0, read=-1), "timeout.read", "more than 0", id="Timeout-read"),
    pytest.param(httpx.Timeout(5.0, connect=0), "timeout.connect", "more than 0", id="Timeout-con"),
    pytest.param(httpx.Timeout(5.0, pool=math.inf), "timeout.pool", "finite", id="Timeout-pool"),
    pytest.param(
        httpx.Timeout(5.0, write="1"), "timeout.write", "a number of seconds", id="Timeout-write"
    ),
]


@pytest.mark.parametrize("mode", CLIENTS)
@pytest.mark.parametrize(("value", "param", "says"), BAD)
async def test_a_bad_request_timeout_fails_before_any_network_call(mock, mode, value, param, says):
    client = make(mode, max_retries=0)
    with pytest.raises(BadRequestError, match=says) as info:
        await create(client, timeout=value)
    assert info.value.param == param
    assert f"'{param}'" in str(info.value)
    assert mock.requests == []


@pytest.mark.parametrize("cls", [Lunar, AsyncLunar])
@pytest.mark.parametrize(("value", "param", "says"), BAD)
def test_a_bad_client_timeout_is_a_value_error_naming_it(cls, value, param, says):
    with pytest.raises(ValueError, match=says) as info:
        cls(timeout=value)
    assert f"'{param}'" in str(info.value)


@pytest.mark.parametrize("mode", CLIENTS)
@pytest.mark.parametrize(
    "value", [1, 0.5, 1e300, httpx.Timeout(5.0), httpx.Timeout(None, connect=5.0)]
)
async def test_good_request_timeouts_serve(mock, mode, value):
    """Huge ones too: past ``LONGEST_TIMEOUT`` (about 31 years) they are taken as that, where
    httpx's sync sockets raised OverflowError."""
    completion = await create(make(mode, max_retries=0), timeout=value)
    assert completion.choices[0].message.content


@pytest.mark.parametrize("mode", CLIENTS)
async def test_a_request_timeout_of_none_is_no_timeout(mock, mode):
    """As in the openai SDK: ``timeout=None`` given is no timeout (not the client's)."""
    client = make(mode, max_retries=0, timeout=0.2)
    mock.enqueue(Reply(delay=0.6), model="gpt-4o-mini")
    completion = await create(client, timeout=None)
    assert completion.choices[0].message.content


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_client_timeout_of_none_is_no_timeout(mode):
    client = make(mode, timeout=None)
    http = client._http
    if isinstance(http, httpx.Client):
        assert http.timeout == httpx.Timeout(None)
    else:
        assert (http.timeout, http.connect_timeout, http.pool_timeout) == (None, None, None)


def test_a_number_bounds_every_wait_and_connecting_at_most_ten_seconds():
    assert parse_timeout(30) == httpx.Timeout(30.0, connect=10.0)
    assert parse_timeout(2) == httpx.Timeout(2.0)
    assert parse_timeout(None) == httpx.Timeout(None)
    given_ = httpx.Timeout(1.0, read=None)
    assert parse_timeout(given_) == given_


seconds = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
)
timeouts = st.one_of(
    seconds,
    st.builds(
        lambda c, r, w, p: httpx.Timeout(connect=c, read=r, write=w, pool=p),
        seconds,
        seconds,
        seconds,
        seconds,
    ),
    st.tuples(seconds, seconds),
)


@given(timeouts)
def test_parse_timeout_gives_a_usable_timeout_or_an_error_naming_the_field(value):
    """Whatever is passed: an httpx.Timeout whose every field is None (no limit) or seconds
    in (0, LONGEST_TIMEOUT], or a BadRequestError naming ``timeout`` or one of its fields;
    never another exception."""
    try:
        t = parse_timeout(value)
    except BadRequestError as err:
        fields = ("", ".connect", ".read", ".write", ".pool")
        assert err.param in {"timeout" + f for f in fields}
        assert f"'{err.param}'" in err.message
        return
    for f in (t.connect, t.read, t.write, t.pool):
        assert f is None or (type(f) is float and 0 < f <= LONGEST_TIMEOUT)
    if isinstance(value, (int, float)):
        assert t.read == min(value, LONGEST_TIMEOUT)
        assert t.connect == min(value, CONNECT_TIMEOUT)


@pytest.mark.parametrize("mode", ["sync", "sync-httpx", "async", "async-httpx"])
@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
async def test_the_client_timeout_applies_with_or_without_an_http_client(mock, mode, stream):
    """As in the openai SDK, the client's timeout goes with every request, also on a
    caller's httpx client (whose own, here 30 s, it replaces)."""
    client = make(mode, http_timeout=30.0, max_retries=0, timeout=0.3)
    mock.enqueue(Reply(delay=3.0), model="gpt-4o-mini")
    with pytest.raises(APITimeoutError):
        await create(client, stream=stream)


@pytest.mark.parametrize("mode", ["sync-httpx", "async-httpx"])
async def test_a_timeout_left_out_defers_to_the_http_clients_own(mock, mode):
    """As in the openai SDK: with no ``timeout=``, a caller's client keeps a timeout it was
    given; one with httpx's default (5 s) gets Lunar's (600 s, 10 s to connect)."""
    client = make(mode, http_timeout=0.3, max_retries=0)
    mock.enqueue(Reply(delay=3.0), model="gpt-4o-mini")
    with pytest.raises(APITimeoutError):
        await create(client)
    assert make(mode)._engine.timeout == DEFAULT_TIMEOUT == httpx.Timeout(600.0, connect=10.0)
