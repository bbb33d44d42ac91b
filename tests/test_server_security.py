"""The gateway from the side of an operator who hands virtual keys to clients it does not
trust: what a client can make the gateway do on its host, send upstream, or tell back.
A real `lunar serve` process, real HTTP, the emulator as every provider, which shows what
the upstream received."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from lunar.testing import MockServer, Reply

from .test_server import CONFIG, MASTER, GatewayProcess, every_wire

pytest.importorskip("uvicorn")

HI = [{"role": "user", "content": "Hi"}]

# An internal host (nothing listens on port 9 of the loopback) and a provider whose key
# variable is not set: what their errors say is the operator's business.
INTERNAL = "127.0.0.1:9"
SECURITY_CONFIG = (
    CONFIG
    + f"""
[local.models]
house = "/nonexistent/house.gguf"

[providers.internal]
protocol = "openai"
base_url = "http://{INTERNAL}/v1"
key_required = false

[providers.nokey]
protocol = "openai"
base_url = "http://{INTERNAL}/v1"
api_key_env = "NOKEY_SECRET_VAR"

[models.internal-llama]
deployments = [{{provider = "internal", id = "llama"}}]

[models.nokey-llama]
deployments = [{{provider = "nokey", id = "llama"}}]
"""
)


@pytest.fixture(scope="module")
def gw(upstream: MockServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    proc = GatewayProcess(
        tmp_path_factory.mktemp("gateway"),
        upstream,
        SECURITY_CONFIG,
        VLLM_BASE_URL=upstream.base_url,  # vLLM set up; Ollama not
        **every_wire(upstream),
    )
    yield proc
    proc.stop()


@pytest.fixture(autouse=True)
def _fresh(upstream: MockServer) -> None:
    upstream.reset()


@pytest.fixture
def key(gw: GatewayProcess) -> str:
    return gw.new_key("untrusted")[0]


def chat(gw: GatewayProcess, key: str, path: str = "/v1/chat/completions", **body: Any) -> Any:
    payload = {"model": "gpt-4o-mini", "messages": HI, **body}
    return gw.http.post(path, json=payload, headers={"x-api-key": key})


def _error(r: httpx.Response) -> dict[str, Any]:
    return r.json()["error"]  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------
# Files on the gateway's host


def test_a_client_cannot_make_the_gateway_open_a_file_as_a_local_model(gw, key, tmp_path):
    """``local/<path>`` is a GGUF path in direct mode; through the gateway any client could
    have the gateway load any file on its host (into memory) and tell from the answer
    whether it exists. Both are refused alike, before anything is opened."""
    existing = tmp_path / "secret.txt"
    existing.write_text("not a model")
    answers = []
    for path in (str(existing), str(tmp_path / "missing.gguf"), "~/.bashrc"):
        r = chat(gw, key, model=f"local/{path}")
        assert r.status_code == 404, r.text
        err = _error(r)
        assert (err["code"], err["param"]) == ("model_not_found", "model")
        answers.append(err["message"].replace(path, "PATH"))
        assert "attempts" not in r.json()  # nothing was tried
    assert len(set(answers)) == 1  # an existing file and a missing one: the same answer
    # ... nor as a fallback, nor under provider= (the same name, forced).
    r = chat(gw, key, fallbacks=[f"local/{existing}"])
    assert r.status_code == 404 and _error(r)["param"] == "fallbacks[0]", r.text
    r = chat(gw, key, model=f"local/{existing}", provider="local")
    assert r.status_code == 404 and _error(r)["code"] == "model_not_found", r.text
    r = chat(gw, key, path="/v1/messages", model=f"local/{existing}", max_tokens=5)
    assert r.status_code == 404, r.text


def test_a_local_model_the_config_names_is_still_served(gw, key):
    """The names [local.models] gives (and their file's id) reach the local runtime: here
    its own 'file not found', since the configured file does not exist in the test."""
    for model in ("house", "local//nonexistent/house.gguf"):
        r = chat(gw, key, model=model)
        assert r.status_code in (404, 502), r.text
        assert "/nonexistent/house.gguf" in _error(r)["message"], r.text


# ---------------------------------------------------------------------------------------------
# Where requests go


def test_a_keyless_provider_nothing_set_up_is_not_served(gw, key, upstream):
    """Ollama and vLLM need no key, and the catalogue puts them on loopback ports of the
    gateway's host: any client could have the gateway post to whatever listens there.
    A gateway serves them only when its operator set them up."""
    for body in (
        {"model": "ollama/llama3"},
        {"model": "gpt-4.1-nano", "fallbacks": ["ollama/llama3"]},
    ):
        upstream.enqueue(Reply.status_error(503), model="gpt-4.1-nano")
        r = chat(gw, key, **body)
        attempts = r.json().get("attempts", [])
        tried = [a for a in attempts if a["provider"] == "ollama"]
        assert tried, r.text
        assert {(a["status"], a["code"]) for a in tried} == {(404, "provider_not_configured")}
        # How to set it up is the operator's to read (the master key's answer), not a client's.
        assert "OLLAMA_BASE_URL" not in tried[0]["message"], tried
        upstream.enqueue(Reply.status_error(503), model="gpt-4.1-nano")
        r = chat(gw, MASTER, **body)
        assert "OLLAMA_BASE_URL" in r.json()["attempts"][-1]["message"], r.text
    # vLLM, whose base URL the operator set, is served (here by the emulator).
    r = chat(gw, key, model="vllm/meta-llama/Llama-3.1-8B-Instruct")
    assert r.status_code == 200, r.text
    assert upstream.requests[-1].json["model"] == "meta-llama/Llama-3.1-8B-Instruct"


def test_client_fields_and_headers_never_change_where_a_request_goes_or_its_key(gw, upstream):
    """Body fields named like routing settings are not read by the gateway (a virtual key may
    not even send them: see below; here the master key's), and none of the client's
    headers reach the upstream: it sees the gateway's own key."""
    headers = {
        "x-api-key": MASTER,
        "authorization": "Bearer sk-client",
        "api-key": "sk-client",
        "x-goog-api-key": "sk-client",
        "anthropic-version": "1999-01-01",
        "x-lunar-base-url": "http://169.254.169.254",
    }
    for model in ("gpt-4o-mini", "claude-3-5-haiku", "gemini-2.0-flash"):
        upstream.reset()
        body = {"model": model, "messages": HI, "max_tokens": 5}
        r = gw.http.post(
            "/v1/chat/completions",
            json={**body, "base_url": "http://169.254.169.254", "api_base": "http://x"},
            headers=headers,
        )
        # The routing-like fields go on as body fields (providers refuse what they do not
        # know: the emulator as Gemini does); the request went to the configured upstream.
        assert len(upstream.requests) == 1, r.text
        sent = upstream.requests[0].headers
        assert "sk-client" not in str(sent) and "1999-01-01" not in str(sent)
        assert {sent.get("authorization"), sent.get("x-api-key"), sent.get("x-goog-api-key")} & {
            "Bearer sk-openai",
            "sk-ant",
            "sk-gem",
        }


# ---------------------------------------------------------------------------------------------
# Body fields passed on to the provider


@pytest.mark.parametrize(
    "field",
    ["models", "route", "transforms", "base_url", "api_base", "api_key", "safetySettings",
     "cachedContent"],
)  # fmt: skip
def test_a_virtual_key_may_not_send_fields_that_pick_a_model_route_or_credential(
    gw, upstream, field
):
    """Unknown body fields go on to the provider as its own: with an OpenRouter-style
    upstream `"models": [...]` (or `"route"`) had any model answer a key allowed one cheap
    model, billed at that model's price; Gemini's `cachedContent` and `safetySettings`, a
    LiteLLM-style upstream's `api_base` / `api_key` are the operator's. A virtual key's
    request carries OpenAI's chat fields and those `extra_body_fields` allows; any other
    is a 400 naming it, sent nowhere, and in the ledger."""
    key, key_id = gw.new_key("restricted", models=["gpt-4o-mini"])
    for stream in (False, True):
        r = chat(gw, key, stream=stream, **{field: ["openai/gpt-4o"]})
        assert r.status_code == 400, r.text
        err = _error(r)
        assert (err["code"], err["param"], err["type"]) == (
            "field_not_allowed",
            field,
            "invalid_request_error",
        )
        assert f"'{field}'" in err["message"] and "top_k" in err["message"]
    assert upstream.requests == []
    rows = gw.rows(key_id, expected=2)
    assert [(row["http_status"], row["status"]) for row in rows] == [(400, "error")] * 2


def test_the_openapi_document_tells_of_field_not_allowed(gw, upstream):
    """``/openapi.json`` is what clients read of the gateway's errors: the chat route's 400
    names ``field_not_allowed`` beside a bad field, and its examples are what a virtual key
    gets for each."""
    doc = gw.http.get("/openapi.json").json()
    documented = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["400"]
    assert "field_not_allowed" in documented["description"]
    examples = documented["content"]["application/json"]["examples"]
    key = gw.new_key("documented")[0]
    for name, body in (
        ("field_not_allowed", {"route": "fallback"}),
        ("invalid_value", {"temperature": "hot"}),
    ):
        r = chat(gw, key, **body)
        assert r.status_code == 400, r.text
        sent, shown = _error(r), examples[name]["value"]["error"]
        for field in ("type", "param", "code"):
            assert shown[field] == sent[field], (name, field, sent)
        assert shown["message"].split(" ")[:2] == sent["message"].split(" ")[:2], sent
    assert upstream.requests == []


def test_sampling_fields_pass_by_default_and_the_master_key_passes_any(gw, key, upstream):
    """The default `extra_body_fields` are open-model servers' sampling settings (vLLM,
    Together, OpenRouter …); the operator's own master key is not restricted."""
    sampling = {"top_k": 5, "min_p": 0.1, "top_a": 0.2, "repetition_penalty": 1.1}
    r = chat(gw, key, model="vllm/meta-llama/Llama-3.1-8B-Instruct", **sampling)
    assert r.status_code == 200, r.text
    sent = upstream.requests[-1].json
    assert {k: sent[k] for k in sampling} == sampling
    r = chat(gw, MASTER, models=["openai/gpt-4o"], route="fallback")
    assert r.status_code == 200, r.text
    sent = upstream.requests[-1].json
    assert (sent["models"], sent["route"]) == (["openai/gpt-4o"], "fallback")


def test_the_operator_chooses_the_fields(upstream, tmp_path):
    """`extra_body_fields` (here `LUNAR_EXTRA_BODY_FIELDS`) replaces the default list; `*`
    alone lets any field through, as before."""
    proc = GatewayProcess(tmp_path, upstream, CONFIG, LUNAR_EXTRA_BODY_FIELDS="models, top_k")
    try:
        key = proc.new_key("router")[0]
        r = chat(proc, key, models=["openai/gpt-4o"], top_k=3)
        assert r.status_code == 200, r.text
        assert upstream.requests[-1].json["models"] == ["openai/gpt-4o"]
        r = chat(proc, key, min_p=0.1)
        assert r.status_code == 400 and _error(r)["param"] == "min_p", r.text
        assert "(extra_body_fields: models, top_k)" in _error(r)["message"]
    finally:
        proc.stop()


def test_extra_body_fields_in_the_config_file_and_its_mistakes(tmp_path):
    from lunar.server.config import EXTRA_BODY_FIELDS, ConfigError, load_config

    assert load_config(environ={}).extra_body_fields == list(EXTRA_BODY_FIELDS)
    path = tmp_path / "lunar.toml"
    path.write_text('[server]\nextra_body_fields = ["*"]\n')
    assert load_config(path, environ={}).extra_body_fields == ["*"]
    path.write_text("[server]\nextra_body_fields = []\n")
    assert load_config(path, environ={}).extra_body_fields == []
    for bad, message in (
        ('["*", "top_k"]', "'*' (any field) stands alone"),
        ('[" top_k"]', "is not a field name"),
        ('"top_k"', "must be a list of strings"),
    ):
        path.write_text(f"[server]\nextra_body_fields = {bad}\n")
        with pytest.raises(ConfigError, match="extra_body_fields") as info:
            load_config(path, environ={})
        assert message in str(info.value)


def test_direct_mode_passes_any_field(upstream, monkeypatch):
    """The restriction is the gateway's, for its clients: the SDK with the user's own keys
    sends what it is given."""
    import lunar

    monkeypatch.setenv("OPENAI_API_KEY", "sk-own")
    monkeypatch.setenv("OPENAI_BASE_URL", upstream.base_url)
    client = lunar.Lunar(max_retries=0)
    client.chat.completions.create(
        model="gpt-4o-mini", messages=HI, extra_body={"models": ["x/y"], "route": "fallback"}
    )
    assert upstream.requests[-1].json["models"] == ["x/y"]


# ---------------------------------------------------------------------------------------------
# What errors tell a client


def _both(gw: GatewayProcess, upstream: MockServer, reply: Reply | None, **body: Any) -> Any:
    """The same failing request with a virtual key and with the master key: (the virtual
    key's answer, the master key's, the virtual key's ledger row)."""
    key, key_id = gw.new_key("client")
    answers = []
    for credential in (key, MASTER):
        if reply is not None:
            upstream.enqueue(reply, model=body.get("model", "gpt-4o-mini"))
        answers.append(chat(gw, credential, **body))
    (row,) = gw.rows(key_id, expected=1)
    return answers[0], answers[1], row


def _same_but_the_words(r: httpx.Response, full: httpx.Response) -> dict[str, Any]:
    """A virtual key's error answer: the master key's, message aside."""
    assert r.status_code == full.status_code, (r.text, full.text)
    assert r.headers.get("x-should-retry") == full.headers.get("x-should-retry")
    assert r.headers.get("retry-after") == full.headers.get("retry-after")
    assert r.headers["x-request-id"] != full.headers["x-request-id"]
    told, whole = r.json(), full.json()
    for name in ("type", "code", "param"):
        assert told["error"][name] == whole["error"][name]
    strip = lambda a: {k: v for k, v in a.items() if k != "message"}  # noqa: E731
    assert [strip(a) for a in told.get("attempts", [])] == [
        strip(a) for a in whole.get("attempts", [])
    ]
    return told  # type: ignore[no-any-return]


def _the_gateways_credentials(r: httpx.Response, full: httpx.Response) -> dict[str, Any]:
    """A virtual key's answer when the upstream refused the gateway's credentials (or it has
    none): a 502 ``upstream_auth_error`` not to retry, each attempt so too, where the master
    key sees the upstream's (or the engine's) 401/403."""
    assert full.status_code in (401, 403), full.text
    assert r.status_code == 502, r.text
    assert r.headers.get("x-should-retry") == full.headers.get("x-should-retry") == "false"
    told, whole = r.json(), full.json()
    assert (told["error"]["type"], told["error"]["code"]) == ("server_error", "upstream_auth_error")
    assert [(a["status"], a["code"]) for a in told["attempts"]] == [
        (502, "upstream_auth_error")
    ] * len(whole["attempts"])
    assert [(a["model"], a["provider"]) for a in told["attempts"]] == [
        (a["model"], a["provider"]) for a in whole["attempts"]
    ]
    return told  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("model", "leak"),
    [("internal-llama", INTERNAL), ("nokey-llama", "NOKEY_SECRET_VAR")],
    ids=["internal-host", "key-variable"],
)
def test_a_virtual_key_is_not_told_internal_hosts_or_key_variables(gw, upstream, model, leak):
    """A connection error named the upstream's base URL (an internal host), a missing key
    the variable it is read from: the master key is told as before, a virtual key what
    failed and where, its status, type, code and attempts the same; the log has it all."""
    before = len(gw.logs())
    r, full, row = _both(gw, upstream, None, model=model)
    if model == "nokey-llama":  # no key for the provider: the gateway's credentials
        told = _the_gateways_credentials(r, full)
    else:
        told = _same_but_the_words(r, full)
    assert leak in full.json()["error"]["message"], full.text
    assert leak not in r.text, r.text
    provider = model.split("-")[0]
    assert f"rovider '{provider}'" in told["error"]["message"], r.text
    assert "gateway's log" in told["error"]["message"]
    logged = gw.logs()[before:]
    assert r.headers["x-request-id"] in logged and leak in logged
    assert (row["http_status"], row["status"]) == (r.status_code, "error")
    assert row["error_type"] == {"internal-llama": "api_connection_error"}.get(
        model, "authentication_error"
    )


@pytest.mark.parametrize("status", [401, 403])
def test_an_upstream_401_or_403_is_a_502_not_to_retry_for_a_virtual_key(gw, upstream, status):
    """An upstream's 401/403 is about the gateway's own key, and may quote it. Relayed as
    it was, a virtual key's client read it as its own key refused (and no SDK retries a 401
    either way). It is told the provider refused the gateway's credentials, as a ``502``
    ``upstream_auth_error`` with ``x-should-retry: false`` (every attempt so too); the
    master key gets the upstream's status and words; the log keeps the message without the
    key's fragment, the ledger the cause and the status the client got."""
    quoted = "sk-open****************1234"
    reply = Reply(
        status=status,
        error_message=f"Incorrect API key provided: {quoted}. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
    )
    before = len(gw.logs())
    r, full, row = _both(gw, upstream, reply)
    told = _the_gateways_credentials(r, full)
    assert full.status_code == status and quoted in full.text
    assert quoted not in r.text and "platform.openai.com" not in r.text
    assert told["error"]["message"].startswith("Provider 'openai' refused the gateway's")
    logged = gw.logs()[before:]
    assert "Incorrect API key provided" in logged and quoted not in logged
    assert (row["http_status"], row["error_type"]) == (
        502,
        {401: "authentication_error", 403: "permission_error"}[status],
    )


@pytest.mark.parametrize("status", [401, 403])
def test_sdks_see_a_server_error_they_do_not_retry_when_the_gateways_key_is_refused(
    gw, upstream, status
):
    """The official SDKs, with their default retries, against a virtual key's gateway whose
    upstream refuses its credentials: a 5xx error (not ``AuthenticationError`` /
    ``PermissionDeniedError``), raised after one request (``x-should-retry: false``); an
    SDK retry would have met the emulator's next answer, a success. Lunar's remote mode
    alike."""
    import anthropic
    import openai

    import lunar

    key = gw.new_key("sdk")[0]
    refused = Reply(status=status, error_message="Incorrect API key provided: sk-op***34")
    upstream.enqueue(refused, model="gpt-4o-mini")
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key)  # max_retries: the default
    with pytest.raises(openai.InternalServerError) as oai_err:
        client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert oai_err.value.status_code == 502 and oai_err.value.code == "upstream_auth_error"
    upstream.enqueue(refused, model="gpt-4o-mini")
    ant = anthropic.Anthropic(base_url=gw.url, api_key=key)
    with pytest.raises(anthropic.InternalServerError) as ant_err:
        ant.messages.create(model="gpt-4o-mini", max_tokens=5, messages=HI)
    assert ant_err.value.status_code == 502
    assert "refused the gateway's credentials" in str(ant_err.value)
    upstream.enqueue(refused, model="gpt-4o-mini")
    with (
        lunar.Lunar(base_url=gw.url, api_key=key) as remote,
        pytest.raises(lunar.ServerError) as lunar_err,
    ):
        remote.chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert not isinstance(lunar_err.value, (lunar.AuthenticationError, lunar.PermissionDeniedError))
    assert (lunar_err.value.status_code, lunar_err.value.code) == (502, "upstream_auth_error")
    assert len(upstream.requests) == 3  # one each: none retried


def test_an_upstream_400_still_tells_the_client_what_was_wrong(gw, upstream):
    """A 400 is about the client's request: its message stays, hosts and key-like tokens
    taken out."""
    reply = Reply(status=400, error_message="Invalid 'top_p': see http://10.1.2.3:8080/docs")
    r, full, _ = _both(gw, upstream, reply)
    told = _same_but_the_words(r, full)
    assert told["error"]["message"].startswith("Invalid 'top_p': see <url>"), r.text
    assert "10.1.2.3" not in r.text and "10.1.2.3" in full.text


def test_a_mid_stream_error_event_is_told_as_an_answer_is(gw, upstream):
    reply = Reply(chunks=5, error_after=2, error_message="worker http://10.0.0.7:8000 died")
    events = []
    for credential in (gw.new_key("client")[0], MASTER):
        upstream.enqueue(reply, model="gpt-4o-mini")
        r = chat(gw, credential, stream=True)
        assert r.status_code == 200
        (event,) = [
            json.loads(line[6:])
            for line in r.text.splitlines()
            if line.startswith("data: {") and '"error"' in line
        ]
        events.append(event)
    told, whole = events
    assert "10.0.0.7" in whole["error"]["message"]
    assert "10.0.0.7" not in json.dumps(told)
    assert (told["status"], told["error"]["type"]) == (whole["status"], whole["error"]["type"])
    assert told["error"]["message"].startswith("Provider 'openai'")


# ---------------------------------------------------------------------------------------------
# Deep JSON


def _nested(depth: int) -> str:
    """A JSON object ``depth`` levels deep, as text (the client's encoder would recurse)."""
    return '{"a":' * depth + '"x"' + "}" * depth


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("where", ["tools", "response_format", "messages_route"])
def test_a_schema_nested_too_deep_for_an_adapter_is_a_400_sent_nowhere(
    gw, key, upstream, where, stream
):
    """Deep enough for Gemini's schema translation to recurse past Python's limit, not for
    the JSON parser (~1,000): was a 500 and ~100 kB of traceback in the log per request."""
    deep = _nested(900)
    schema = '{"type":"object","properties":{"a":' + deep + "}}"
    path = "/v1/chat/completions"
    if where == "tools":
        extra = '"tools":[{"type":"function","function":{"name":"f","parameters":' + schema + "}}]"
    elif where == "response_format":
        extra = (
            '"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":'
            + schema
            + "}}"
        )
    else:
        path = "/v1/messages"
        extra = '"max_tokens":5,"tools":[{"name":"f","input_schema":' + schema + "}]"
    body = (
        '{"model":"gemini-2.0-flash","stream":' + ("true" if stream else "false") + ","
        '"messages":[{"role":"user","content":"Hi"}],' + extra + "}"
    )
    before = len(gw.logs())
    r = gw.http.post(
        path, content=body, headers={"x-api-key": key, "content-type": "application/json"}
    )
    assert r.status_code == 400, r.text[:300]
    assert "nested too deeply" in r.text
    assert upstream.requests == []
    assert len(gw.logs()) == before  # a client's bad input is not the gateway's error


def test_a_logged_traceback_keeps_its_ends_only():
    from lunar.server.app import _LOGGED_FRAMES, _frames

    # Two functions in turn, as a recursive translation goes (Python's traceback folds only
    # a line repeated as it is).
    def down(n: int) -> None:
        if n == 0:
            raise ValueError("bottom")
        across(n - 1)

    def across(n: int) -> None:
        down(n)

    try:
        down(200)
    except ValueError as exc:
        text = _frames(exc)
    assert "frames ..." in text and "test_a_logged_traceback_keeps_its_ends_only" in text
    assert 'raise ValueError("bottom")' in text
    assert len(text.splitlines()) <= 2 * (2 * _LOGGED_FRAMES) + 1


# ---------------------------------------------------------------------------------------------
# Clients that stop reading


@pytest.fixture(scope="module")
def small_pool(
    upstream: MockServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """A gateway with two upstream connections in all (``max_connections``), so that two
    stalled streams would hold every one."""
    config = CONFIG.replace(
        "connect_timeout_seconds = 2.0", "connect_timeout_seconds = 2.0\nmax_connections = 2", 1
    )
    proc = GatewayProcess(tmp_path_factory.mktemp("small-pool"), upstream, config)
    yield proc
    proc.stop()


def _stream_and_never_read(gw: GatewayProcess, key: str) -> socket.socket:
    host, port = gw.url.split("//")[1].rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    body = json.dumps({"model": "gpt-4o-mini", "stream": True, "messages": HI}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nx-api-key: {key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def test_streams_a_client_never_reads_cannot_hold_the_upstream_pool(small_pool, upstream):
    """A client that opens streams and never reads them made the gateway wait on it for
    ever, each holding an upstream connection of the pool every key shares: with the pool
    taken, every other client's request timed out (504). Now a stream whose client takes
    nothing for ``timeout_seconds`` ends, its connections closed."""
    gw = small_pool
    staller, staller_id = gw.new_key("staller")
    other = gw.new_key("other")[0]
    big = Reply(text="word " * 2_000_000, chunks=4000)  # far more than the socket buffers
    upstream.enqueue(big, big, model="gpt-4o-mini")
    socks = [_stream_and_never_read(gw, staller) for _ in range(2)]
    try:
        answers = []
        for _ in range(20):  # each try waits up to the gateway's 2 s for a connection
            r = gw.http.post(
                "/v1/chat/completions",
                json={"model": "gpt-4.1-nano", "messages": HI},
                headers={"x-api-key": other},
            )
            answers.append(r.status_code)
            if r.status_code == 200:
                break
        assert answers[-1] == 200, answers
        rows = gw.rows(staller_id, expected=2)
        assert [(row["status"], row["error_type"]) for row in rows] == [
            ("cancelled", "client_stalled")
        ] * 2
    finally:
        for sock in socks:
            sock.close()


# -- a client's query string ------------------------------------------------------------------

#: What an Azure-shaped client sends (``api-version``), and what would change an upstream's
#: answer or credentials if passed on: Gemini takes its API key as ``key=`` and the shape of
#: its answer as ``alt=``; Anthropic's SDK adds ``beta=true`` for its beta endpoints.
CLIENT_QUERY = {"api-version": "2024-06-01", "key": "attacker-key", "alt": "json", "beta": "true"}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-3-haiku", "gemini-2.0-flash"])
def test_a_clients_query_string_never_reaches_an_upstream(gw, key, upstream, model, stream):
    """The gateway answers with the operator's credentials, on the route it picks (a
    fallback's provider too): a virtual key's query parameters are not passed on, so they
    can neither swap the credential (Gemini's ``key=``) nor the answer's shape (``alt=``);
    the request is served as without them (an Azure-shaped client's ``api-version`` means
    nothing to Lunar's upstreams)."""
    r = gw.http.post(
        "/v1/chat/completions",
        params=CLIENT_QUERY,
        json={"model": model, "messages": HI, "stream": stream},
        headers={"x-api-key": key},
    )
    assert r.status_code == 200, r.text
    assert "[DONE]" in r.text if stream else r.json()["choices"][0]["message"]["content"]
    sent = upstream.requests[-1]
    if model.startswith("gemini"):
        assert sent.query == ("alt=sse" if stream else "")
        assert sent.headers["x-goog-api-key"] == "sk-gem"
    else:
        assert sent.query == ""
    assert b"attacker" not in sent.body


def test_sdks_sending_a_query_are_served(gw, key, upstream):
    """The openai SDK with ``default_query`` (an Azure-shaped client), Lunar's remote mode
    with ``default_query`` / ``extra_query``, and Anthropic's beta endpoints
    (``/v1/messages?beta=true``): all answered, nothing of their query upstream."""
    openai = pytest.importorskip("openai")
    anthropic = pytest.importorskip("anthropic")
    from lunar import Lunar

    sdk = openai.OpenAI(
        base_url=gw.url + "/v1", api_key=key, max_retries=0, default_query=CLIENT_QUERY
    )
    assert sdk.chat.completions.create(model="gpt-4o-mini", messages=HI).choices
    lunar = Lunar(base_url=gw.url, api_key=key, max_retries=0, default_query=CLIENT_QUERY)
    answer = lunar.chat.completions.create(model="gpt-4o-mini", messages=HI, extra_query={"x": 1})
    assert answer.choices
    claude = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0)
    message = claude.beta.messages.create(model="claude-3-haiku", max_tokens=20, messages=HI)
    assert message.content
    assert [r.query for r in upstream.requests] == ["", "", ""]
