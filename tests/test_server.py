"""The gateway as users meet it: a real `lunar serve` process on a free port, real HTTP, the
official `openai` and `anthropic` SDKs, Lunar's remote mode and raw SSE reads, with the
emulator standing in for the providers. One gateway process serves the whole module; each
test makes its own keys, so limits and ledger rows never mix."""

from __future__ import annotations

import concurrent.futures
import contextlib
import gzip
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import lunar
from lunar import Lunar, LunarError
from lunar._catalog import Catalog
from lunar.server.limits import estimate
from lunar.testing import MockServer, Reply

from .conftest import OLD_LEDGER_ROW, PROVIDER_ENV, old_ledger

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
pytest.importorskip("uvicorn")

MASTER = "test-master-key-0123456789abcdef"
MESSAGES = [{"role": "user", "content": "Write a short story about a robot."}]
MAX_BODY = 200_000

CONFIG = f"""
[server]
max_body_bytes = {MAX_BODY}
keys_refresh_seconds = 0.3
graceful_timeout_seconds = 10

[engine]
max_retries = 0
timeout_seconds = 2.0
connect_timeout_seconds = 2.0

[limits]
window_seconds = 60
output_tokens_estimate = 64

[aliases]
fast = "gpt-4o-mini"
"""


# ---------------------------------------------------------------------------------------------
# A gateway process (shared with the other test_server_* modules)


def gateway_env(upstream: MockServer, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PROVIDER_ENV}
    env.pop("LUNAR_CONFIG", None)
    env.pop("LUNAR_DB", None)
    for p in ("OPENAI", "GROQ", "TOGETHER", "FIREWORKS"):
        env[f"{p}_API_KEY"] = f"sk-{p.lower()}"
        env[f"{p}_BASE_URL"] = upstream.base_url
    env["LUNAR_MASTER_KEY"] = MASTER
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


class GatewayProcess:
    """`python -m lunar.server serve --port 0` (what `lunar serve` runs), ready when
    /health answers."""

    def __init__(self, tmp: Path, upstream: MockServer, config: str = CONFIG, **env: str) -> None:
        self.tmp = tmp
        self.db = tmp / "lunar.db"
        cfg = tmp / "lunar.toml"
        cfg.write_text(config)
        self.log = open(tmp / "gateway.log", "w+b")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lunar.server",
                "serve",
                "--port",
                "0",
                "--db",
                str(self.db),
                "--config",
                str(cfg),
            ],
            env=gateway_env(upstream, **env),
            stdout=subprocess.PIPE,
            stderr=self.log,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if "listening on" not in line:
            self.proc.kill()
            raise RuntimeError(f"gateway did not start: {line!r}\n{self.logs()}")
        self.url = line.split("listening on ")[1].split()[0]
        self.http = httpx.Client(
            base_url=self.url, timeout=30.0, limits=httpx.Limits(max_connections=100)
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.http.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.proc.kill()
                raise RuntimeError(f"gateway not healthy:\n{self.logs()}")
            time.sleep(0.05)

    def logs(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return self.http.request(method, path, headers={"authorization": f"Bearer {MASTER}"}, **kw)

    def new_key(self, name: str = "test", **limits: Any) -> tuple[str, str]:
        r = self.admin("POST", "/admin/keys", json={"name": name, **limits})
        assert r.status_code == 201, r.text
        return r.json()["key"], r.json()["id"]

    def rows(self, key_id: str, expected: int | None = None) -> list[dict[str, Any]]:
        """The ledger rows of a key, oldest first (waiting for ``expected`` of them)."""
        deadline = time.monotonic() + 15
        while True:
            r = self.admin("GET", "/admin/usage", params={"key": key_id, "group_by": "none"})
            assert r.status_code == 200, r.text
            data = r.json()["data"]
            if expected is None or len(data) >= expected or time.monotonic() > deadline:
                return list(reversed(data))
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.http.close()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code


def every_wire(upstream: MockServer) -> dict[str, str]:
    """A gateway's environment for the emulator as Anthropic and Gemini too (OpenAI and its
    kin are in ``gateway_env``)."""
    return {
        "ANTHROPIC_API_KEY": "sk-ant",
        "ANTHROPIC_BASE_URL": upstream.url,
        "GEMINI_API_KEY": "sk-gem",
        "GEMINI_BASE_URL": upstream.url,
    }


@pytest.fixture(scope="module")
def gw(upstream: MockServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    proc = GatewayProcess(tmp_path_factory.mktemp("gateway"), upstream)
    yield proc
    code = proc.stop()
    # uvicorn shuts down gracefully, then re-raises the signal: "killed by SIGTERM".
    assert code in (0, -signal.SIGTERM), proc.logs()


@pytest.fixture(autouse=True)
def _fresh(upstream: MockServer) -> None:
    upstream.reset()


@pytest.fixture
def key(gw: GatewayProcess) -> str:
    return gw.new_key()[0]


def oai(gw: GatewayProcess, key: str, **kw: Any) -> Any:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, **kw)


def sse(response: httpx.Response) -> list[Any]:
    """The ``data:`` payloads of an SSE response, JSON-decoded (``[DONE]`` kept as is)."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def chat_stream(gw: GatewayProcess, key: str, **body: Any) -> tuple[httpx.Response, list[Any]]:
    payload = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True, **body}
    with gw.http.stream(
        "POST", "/v1/chat/completions", json=payload, headers={"authorization": f"Bearer {key}"}
    ) as r:
        if r.status_code != 200:
            r.read()
            return r, []
        return r, sse(r)


def cost_of(usage: Any, price_in: float = 0.15, price_out: float = 0.60) -> float:
    return round(usage["prompt_tokens"] * price_in / 1e6, 10) + round(
        usage["completion_tokens"] * price_out / 1e6, 10
    )


# ---------------------------------------------------------------------------------------------
# Serving


def test_health_openapi_and_public_pricing(gw):
    assert gw.http.get("/health").json()["status"] == "ok"
    head = gw.http.head("/health")
    assert head.status_code == 200 and head.content == b""
    doc = gw.http.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/messages", "/admin/keys"} <= set(doc["paths"])
    pricing = gw.http.get("/v1/pricing/models")  # no key needed
    assert pricing.status_code == 200
    mini = next(m for m in pricing.json()["data"] if m["id"] == "gpt-4o-mini")
    assert mini["deployments"][0]["input_price_per_1m"] == 0.15
    assert mini["deployments"][0]["cached_input_price_per_1m"] == 0.075
    assert mini["deployments"][0]["cache_write_price_per_1m"] is None
    sonnet = next(m for m in pricing.json()["data"] if m["id"] == "claude-sonnet-4-5")
    assert sonnet["deployments"][0]["cache_write_price_per_1m"] == 3.75
    assert sonnet["deployments"][0]["cache_write_1h_price_per_1m"] == 6.00
    assert any(m["id"] == "fast" for m in pricing.json()["data"])  # alias from the config


def test_openai_sdk_chat_completion_carries_lunar_cost_and_timing(gw, key, upstream):
    upstream.default = Reply(chunks=6)
    done = oai(gw, key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert done.object == "chat.completion"
    assert len(done.choices[0].message.content.split()) == 6
    assert done.choices[0].finish_reason == "stop"
    u = done.usage.model_dump()
    assert u["completion_tokens"] == 6 and u["prompt_tokens"] > 0
    assert u["total_cost_usd"] == pytest.approx(cost_of(u))
    assert u["latency_ms"] > 0 and u["ttft_ms"] > 0
    assert upstream.requests[-1].headers["authorization"] == "Bearer sk-openai"


def test_openai_sdk_streams_chunks_with_usage_on_the_last(gw, key, upstream):
    upstream.default = Reply(chunks=5)
    stream = oai(gw, key).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 5
    assert chunks[-1].choices[0].finish_reason == "stop"
    usage = chunks[-1].usage.model_dump()
    assert usage["completion_tokens"] == 5 and usage["total_cost_usd"] > 0
    assert usage["ttft_ms"] <= usage["latency_ms"]
    assert all(c.usage is None for c in chunks[:-1])


def test_openai_sdk_legacy_completions_stream_and_not(gw, key, upstream):
    upstream.default = Reply(chunks=4)
    client = oai(gw, key)
    done = client.completions.create(model="gpt-4o-mini", prompt="Once upon a time")
    assert done.object == "text_completion" and len(done.choices[0].text.split()) == 4
    assert done.usage.model_dump()["total_cost_usd"] > 0
    pieces = list(client.completions.create(model="gpt-4o-mini", prompt="Hi", stream=True))
    assert len("".join(p.choices[0].text for p in pieces if p.choices).split()) == 4
    assert upstream.requests[-1].json["messages"] == [{"role": "user", "content": "Hi"}]


def test_models_list_shows_what_the_key_may_use(gw):
    everything = oai(gw, gw.new_key()[0]).models.list()
    ids = {m.id for m in everything}
    assert {"gpt-4o-mini", "claude-3-5-haiku", "fast"} <= ids
    restricted, _ = gw.new_key(models=["gpt-4o-mini", "llama-3.1-8b"])
    # 'fast', the config's alias of gpt-4o-mini, is listed: the key may use it.
    assert {m.id for m in oai(gw, restricted).models.list()} == {
        "gpt-4o-mini",
        "llama-3.1-8b",
        "fast",
    }
    assert oai(gw, restricted).models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"
    assert oai(gw, restricted).models.retrieve("fast").id == "fast"
    oai(gw, restricted).chat.completions.create(model="fast", messages=MESSAGES)
    with pytest.raises(openai.NotFoundError):
        oai(gw, restricted).models.retrieve("gpt-4o")


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_lunar_remote_models_retrieve_asks_the_gateway_for_this_key(gw, mode):
    """Remote mode's ``models.retrieve`` is the gateway's ``GET /v1/models/{id}``: a model
    the key may not use is the gateway's 404 saying so, not the local catalogue's "unknown
    model, did you mean <the same name>"."""
    restricted, _ = gw.new_key(models=["gpt-4o-mini"])
    client = (lunar.Lunar if mode == "sync" else lunar.AsyncLunar)(
        base_url=gw.url + "/v1", api_key=restricted, max_retries=0
    )

    listed = {m.id: m for m in await call(client.models.list())}
    for name in ("gpt-4o-mini", "fast"):  # a model, and the config's alias of it
        model = await call(client.models.retrieve(name))
        assert model.id == name and model.owned_by == listed[name].owned_by
    for name in ("claude-3-haiku", "openai/gpt-4o", "no such model?"):
        with pytest.raises(lunar.NotFoundError) as info:
            await call(client.models.retrieve(name))
        assert str(info.value) == f"[404] Model '{name}' is not available to this key"
        assert (info.value.param, info.value.code) == ("model", "model_not_found")
    with pytest.raises(lunar.BadRequestError, match="'model' must be a non-empty string"):
        await call(client.models.retrieve(""))
    await call(client.close())


async def call(result: Any) -> Any:
    return (await result) if hasattr(result, "__await__") else result


def test_extra_body_fallbacks_are_honoured(gw, upstream):
    key, key_id = gw.new_key()
    upstream.enqueue(Reply(status=503), model="gpt-4.1-nano")
    upstream.default = Reply(chunks=3)
    done = oai(gw, key).chat.completions.create(
        model="gpt-4.1-nano", messages=MESSAGES, extra_body={"fallbacks": ["gpt-4o"]}
    )
    assert done.model == "gpt-4o"
    assert [r.model for r in upstream.requests] == ["gpt-4.1-nano", "gpt-4o"]
    assert done.usage.model_dump()["total_cost_usd"] == pytest.approx(
        cost_of(done.usage.model_dump(), 2.5, 10.0)
    )
    [row] = gw.rows(key_id, 1)
    assert (row["model"], row["served_model"], row["provider"], row["attempts"]) == (
        "gpt-4.1-nano",
        "gpt-4o",
        "openai",
        2,
    )


def test_extra_body_provider_is_honoured(gw, key, upstream):
    oai(gw, key).chat.completions.create(
        model="llama-3.1-8b", messages=MESSAGES, extra_body={"provider": "together"}
    )
    sent = upstream.requests[-1]
    assert sent.headers["authorization"] == "Bearer sk-together"
    assert sent.json["model"] == "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo"


def test_anthropic_sdk_messages_over_an_openai_model(gw, key, upstream):
    upstream.default = Reply(chunks=5)
    client = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0)
    msg = client.messages.create(
        model="gpt-4o-mini",
        max_tokens=100,
        system="Be brief.",
        messages=[{"role": "user", "content": "Tell me a story."}],
    )
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.stop_reason == "end_turn"
    assert len(msg.content[0].text.split()) == 5
    assert msg.usage.output_tokens == 5 and msg.usage.input_tokens > 0
    sent = upstream.requests[-1].json
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["max_tokens"] == 100

    with client.messages.stream(
        model="gpt-4o-mini", max_tokens=100, messages=[{"role": "user", "content": "Again."}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert len(text.split()) == 5
    assert final.content[0].text == text
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 5 and final.usage.input_tokens == 4  # "Again." + 3


def test_anthropic_sdk_raises_on_a_mid_stream_failure(gw, key, upstream):
    upstream.enqueue(Reply(chunks=20, cut_after=3))
    client = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0)
    seen = []
    with (
        pytest.raises(anthropic.APIError) as info,
        client.messages.stream(
            model="openai/anthropic-cut",
            max_tokens=100,
            messages=[{"role": "user", "content": "Go."}],
        ) as stream,
    ):
        for text in stream.text_stream:
            seen.append(text)
    assert seen and info.value.body["error"]["type"] == "api_error"


def test_anthropic_sdk_count_tokens_is_an_estimate(gw, key):
    client = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0)
    counted = client.messages.count_tokens(
        model="gpt-4o-mini", system="Be brief.", messages=[{"role": "user", "content": "x" * 400}]
    )
    assert 100 <= counted.input_tokens <= 110


def test_anthropic_sdk_tool_use_round_trip(gw, key, upstream):
    upstream.default = Reply(tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}])
    client = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0)
    tools = [
        {
            "name": "get_weather",
            "description": "Weather",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]
    msg = client.messages.create(
        model="gpt-4o-mini",
        max_tokens=50,
        tools=tools,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    )
    assert msg.stop_reason == "tool_use"
    [call] = [b for b in msg.content if b.type == "tool_use"]
    assert call.name == "get_weather" and call.input == {"city": "Paris"}
    with client.messages.stream(
        model="gpt-4o-mini",
        max_tokens=50,
        tools=tools,
        messages=[{"role": "user", "content": "Weather?"}],
    ) as stream:
        final = stream.get_final_message()
    [streamed] = [b for b in final.content if b.type == "tool_use"]
    assert streamed.input == {"city": "Paris"} and final.stop_reason == "tool_use"
    upstream.default = Reply(chunks=2)
    client.messages.create(
        model="gpt-4o-mini",
        max_tokens=50,
        tools=tools,
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": call.id, "name": "get_weather", "input": call.input}
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny"}],
            },
        ],
    )
    sent = upstream.requests[-1].json["messages"]
    assert sent[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert sent[2] == {"role": "tool", "tool_call_id": call.id, "content": "Sunny"}


def test_raw_sse_with_x_api_key_and_bearer(gw, key, upstream):
    upstream.default = Reply(chunks=3)
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}).encode()
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    for header in (f"x-api-key: {key}", f"Authorization: Bearer {key}"):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
                + header.encode()
                + b"\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
        head, _, rest = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"content-type: text/event-stream" in head.lower()
        assert b"transfer-encoding: chunked" in head.lower()
        payload = b""
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            payload, rest = payload + rest[:n], rest[n + 2 :]
        events = [e for e in payload.decode().split("\n\n") if e]
        assert all(e.startswith("data: ") for e in events)
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2][6:])
        assert last["choices"][0]["finish_reason"] == "stop"
        assert last["usage"]["total_cost_usd"] > 0


def test_lunar_remote_mode_talks_to_the_gateway(gw, key, upstream):
    upstream.default = Reply(chunks=4)
    with Lunar(base_url=gw.url + "/v1", api_key=key, max_retries=0) as client:
        done = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert len(done.choices[0].message.content.split()) == 4
        assert done.usage.total_cost_usd == pytest.approx(cost_of(done.usage.to_dict()))
        chunks = list(
            client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, stream=True, fallbacks=["gpt-4o"]
            )
        )
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert chunks[-1].usage.total_cost_usd > 0
        # who answered, as the gateway says, the same way for both shapes
        assert done.provider == chunks[-1].provider == "openai"
        assert "gpt-4o-mini" in {m.id for m in client.models.list()}
        upstream.enqueue(Reply(chunks=20, cut_after=3))
        with pytest.raises(LunarError):
            for _ in client.chat.completions.create(
                model="openai/remote-cut", messages=MESSAGES, stream=True
            ):
                pass


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("fault", "expected", "status"),
    [
        (Reply(chunks=20, cut_after=3), lunar.APIConnectionError, 502),
        (Reply(chunks=20, stall_after=3, stall=5), lunar.APITimeoutError, 504),
    ],
)
def test_remote_mode_raises_the_class_direct_mode_raises_when_the_provider_fails(
    gw, key, upstream, stream, fault, expected, status
):
    """Direct mode raises APIConnectionError (APITimeoutError) when the provider is cut
    (stalls); through the gateway the same fault is a 502 (504), whole or as a stream's
    error event. Remote mode's error is an instance of both: one ``except`` for both modes."""
    upstream.enqueue(fault)
    client = Lunar(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    with client, pytest.raises(expected) as info:
        answer = client.chat.completions.create(
            model=f"openai/remote-{status}-{stream}", messages=MESSAGES, stream=stream
        )
        if stream:
            list(answer)
    assert isinstance(info.value, lunar.ServerError) and info.value.status_code == status


# ---------------------------------------------------------------------------------------------
# Auth


def _error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"authorization": "Bearer not-a-lunar-key"}, "invalid_api_key"),
        ({"x-api-key": "lk-" + "A" * 32}, "invalid_api_key"),
        ({"authorization": "Basic abc"}, "invalid_api_key"),
    ],
)
def test_bad_keys_get_401_in_openai_shape(gw, headers, code):
    r = gw.http.post(
        "/v1/chat/completions", headers=headers, json={"model": "gpt-4o-mini", "messages": MESSAGES}
    )
    err = _error(r, 401)
    assert err["type"] == "authentication_error" and err["code"] == code
    assert _error(gw.http.get("/v1/models", headers=headers), 401)["code"] == code


def test_revoked_key_gets_401_and_anthropic_clients_get_anthropic_errors(gw):
    key, key_id = gw.new_key()
    assert gw.admin("DELETE", f"/admin/keys/{key_id}").json()["revoked"] is True
    r = gw.http.post(
        "/v1/chat/completions",
        headers={"x-api-key": key},
        json={"model": "gpt-4o-mini", "messages": MESSAGES},
    )
    assert _error(r, 401)["code"] == "revoked_api_key"
    client = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as info:
        client.messages.create(
            model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "authentication_error"


def test_key_limited_to_models_gets_403_for_others(gw, upstream):
    key, _ = gw.new_key(models=["gpt-4o-mini"])
    client = oai(gw, key)
    client.chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES)
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert info.value.body["code"] == "model_not_allowed"
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_body={"fallbacks": ["gpt-4o"]}
        )
    assert info.value.body["param"] == "fallbacks"


def test_admin_routes_need_the_master_key(gw, key):
    for headers in ({}, {"authorization": f"Bearer {key}"}, {"x-api-key": MASTER + "x"}):
        assert gw.http.get("/admin/keys", headers=headers).status_code == 401
        assert gw.http.get("/admin/usage", headers=headers).status_code == 401
        assert gw.http.post("/admin/keys", headers=headers, json={"name": "x"}).status_code == 401
    r = gw.http.get("/admin/keys", headers={"x-api-key": MASTER})
    assert r.status_code == 200
    assert all("key_hash" not in k and "key" not in k for k in r.json()["data"])


def test_created_key_is_shown_once_and_stored_hashed(gw):
    key, key_id = gw.new_key(name="team-a", rpm=10, tpm=1000, budget_usd=5, models=["gpt-4o-mini"])
    assert key.startswith("lk-") and len(key) == 35
    got = gw.admin("GET", f"/admin/keys/{key_id}").json()
    assert (got["name"], got["rpm"], got["tpm"], got["budget_usd"], got["models"]) == (
        "team-a",
        10,
        1000,
        5.0,
        ["gpt-4o-mini"],
    )
    assert "key" not in got and key not in json.dumps(got)
    import sqlite3

    with sqlite3.connect(gw.db) as db:
        stored = db.execute("SELECT * FROM keys WHERE id = ?", (key_id,)).fetchone()
    assert key not in repr(stored)
    r = gw.admin("POST", "/admin/keys", json={"name": "x", "models": ["no-such-model"]})
    assert _error(r, 400)["param"] == "models[0]"


# ---------------------------------------------------------------------------------------------
# Faults from the upstream -> what the client sees


def test_upstream_429_gives_429_with_retry_after(gw, key, upstream):
    upstream.enqueue(Reply.rate_limited(retry_after=7))
    r = gw.http.post(
        "/v1/chat/completions",
        headers={"x-api-key": key},
        json={"model": "openai/limited", "messages": MESSAGES},
    )
    assert _error(r, 429)["type"] == "rate_limit_error"
    assert r.headers["retry-after"] == "7"


def test_the_openai_sdks_stream_helper_assembles_streamed_tool_calls(gw, key, upstream):
    """Continuation pieces of a tool call went out with ``"id": null, "type": null`` and a
    null ``name``; OpenAI leaves those keys out, and the openai SDK's ``stream()`` helper
    copied the null ``type`` over ``"function"`` and failed."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    upstream.enqueue(Reply(tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}]))
    with oai(gw, key).chat.completions.stream(
        model="gpt-4o-mini", messages=MESSAGES, tools=tools
    ) as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert (call.type, call.function.name) == ("function", "get_weather")
    assert json.loads(call.function.arguments) == {"city": "Paris"}


@pytest.mark.parametrize("stream", [False, True])
def test_the_openai_sdk_reads_cached_tokens_where_openai_puts_them(gw, key, upstream, stream):
    upstream.enqueue(Reply(cached_tokens=6))
    client = oai(gw, key)
    if stream:
        *_, last = client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        )
        usage = last.usage
    else:
        usage = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).usage
    assert usage.prompt_tokens_details.cached_tokens == 6


def test_an_unpriced_models_answer_with_costs_that_are_no_amounts_is_served_and_recorded(
    gw, key, upstream
):
    """Cost is Lunar's own, from the catalogue; an unpriced model keeps what its upstream
    sent (a Lunar gateway sends its costs). A string there failed the key's settlement after
    the answer had gone out, and the row was lost."""
    key, key_id = gw.new_key(name="costs")
    msg = '"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
    usage = '{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4,"total_cost_usd":"0.5"}'
    body = '{"id":"x","created":1,"model":"m","choices":[{"index":0,' + msg + '"usage":'
    upstream.enqueue(Reply(body=body + usage + "}"))
    r = gw.http.post(
        "/v1/chat/completions",
        json={"model": "openai/unpriced-costs", "messages": MESSAGES},
        headers={"x-api-key": key},
    )
    assert r.status_code == 200 and r.json()["usage"]["total_cost_usd"] is None
    (row,) = gw.rows(key_id, expected=1)
    assert (row["status"], row["total_cost_usd"]) == ("ok", 0)


@pytest.mark.parametrize("retry_after", ["inf", "1e999"])
def test_upstream_429_with_an_endless_retry_after_is_still_a_429(gw, key, upstream, retry_after):
    upstream.enqueue(Reply(status=429, headers={"retry-after": retry_after}))
    r = gw.http.post(
        "/v1/chat/completions",
        headers={"x-api-key": key},
        json={"model": "openai/limited", "messages": MESSAGES},
    )
    assert _error(r, 429)["type"] == "rate_limit_error"
    assert r.headers["retry-after"] == str(365 * 86400)


def test_stream_falls_back_when_upstream_fails_before_first_chunk(gw, key, upstream):
    # Models no other test uses: the engine's circuit breaker remembers failures.
    upstream.enqueue(Reply(status=500), model="fails")
    upstream.enqueue(Reply(chunks=10, stall_after=0, stall=30), model="stalls")
    upstream.default = Reply(chunks=3)
    r, events = chat_stream(
        gw, key, model="openai/fails", fallbacks=["openai/stalls", "llama-3.1-8b"]
    )
    assert r.status_code == 200
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[-2]["provider"] == "groq"
    assert [q.model for q in upstream.requests] == ["fails", "stalls", "llama-3.1-8b-instant"]


@pytest.mark.parametrize(
    ("reply", "etype"),
    [
        (Reply(chunks=20, cut_after=3), "api_connection_error"),
        (Reply(chunks=20, error_after=3, error_type="server_error"), "server_error"),
        (Reply(chunks=20, stall_after=3, stall=30), "timeout_error"),
    ],
    ids=["cut", "error-event", "stall"],
)
def test_failure_after_first_chunk_is_an_error_event_then_done(gw, key, upstream, reply, etype):
    model = f"mid-stream-{etype}"
    upstream.enqueue(reply)
    r, events = chat_stream(gw, key, model=f"openai/{model}", fallbacks=["gpt-4o"])
    assert r.status_code == 200
    assert events[-1] == "[DONE]"
    err = events[-2]
    assert err["object"] == "error" and err["error"]["type"] == etype
    assert err["id"].startswith("chatcmpl")
    content = [e for e in events[:-2]]
    assert "".join(e["choices"][0]["delta"]["content"] or "" for e in content).split()
    assert all(c["choices"][0]["finish_reason"] is None for c in content)  # never clean
    assert [q.model for q in upstream.requests] == [model]  # no fallback after the start


def test_openai_sdk_raises_in_the_loop_on_a_mid_stream_error(gw, key, upstream):
    upstream.enqueue(Reply(chunks=20, error_after=2, error_type="server_error"))
    seen = []
    with pytest.raises(openai.APIError):
        for chunk in oai(gw, key).chat.completions.create(
            model="openai/sdk-mid-stream", messages=MESSAGES, stream=True
        ):
            seen.append(chunk)
    assert seen and all(c.choices[0].finish_reason is None for c in seen)


# ---------------------------------------------------------------------------------------------
# Bad input


def _post(gw, key, path="/v1/chat/completions", **kw):
    return gw.http.post(path, headers={"x-api-key": key, **kw.pop("headers", {})}, **kw)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"", 400, None),
        (b"[1, 2]", 400, None),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', 400, "model"),
        (b'{"model": "gpt-4o-mini"}', 400, "messages"),
        (
            b'{"model": "gpt-4o-mini", "messages": [{"role": "robot", "content": "x"}]}',
            400,
            "messages[0].role",
        ),
        (
            b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], '
            b'"temperature": 7}',
            400,
            "temperature",
        ),
        (
            b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], '
            b'"stream": "yes"}',
            400,
            "stream",
        ),
        (
            b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], '
            b'"fallbacks": "gpt-4o"}',
            400,
            "fallbacks",
        ),
        (b'{"model": "gpt-5-ultra", "messages": [{"role": "user", "content": "x"}]}', 404, "model"),
        (
            b'{"model": "gpt-4o-mini", "provider": "groq", "messages": [{"role": "user", '
            b'"content": "x"}]}',
            404,
            "provider",
        ),
        (
            b'{"model": "gpt-4o-mini", "messages": [{"role": {}, "content": "x"}]}',
            400,
            "messages[0].role",
        ),
        (
            b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [{"type": {}}]}]}',
            400,
            "messages[0].content[0]",
        ),
        (b"\xff\xfe{}", 400, None),
        (b"[" * 100_000, 400, None),
    ],
)
def test_bad_input_gets_4xx_naming_the_field(gw, key, body, status, param):
    r = _post(gw, key, content=body, headers={"content-type": "application/json"})
    err = _error(r, status)
    assert err["param"] == param
    if param:
        assert param.split("[")[0] in err["message"]


def test_text_sqlite_cannot_store_never_breaks_the_ledger(gw):
    key, key_id = gw.new_key()
    # JSON allows lone surrogates; UTF-8 (and SQLite) does not.
    r = _post(
        gw,
        key,
        content=b'{"model": "gpt-\\ud800", "messages": [{"role": "user", "content": "x"}]}',
        headers={"content-type": "application/json"},
    )
    assert _error(r, 404)["param"] == "model"
    assert _post(gw, key, json={"model": "gpt-4o-mini", "messages": MESSAGES}).status_code == 200
    rows = gw.rows(key_id, 2)
    assert [r["status"] for r in rows] == ["error", "ok"]
    assert rows[0]["model"] == "gpt-?"
    for bad in (
        b'{"name": "x", "tpm": 1000000000000000000000000000000}',
        b'{"name": "\\ud800"}',
        b'{"name": "x", "rpm": 0}',
        b'{"name": "x", "budget_usd": 1e300}',
    ):
        r = gw.admin("POST", "/admin/keys", content=bad)
        assert r.status_code == 400, (bad, r.text)


def test_oversized_bodies_get_413_and_other_requests_are_unaffected(gw, key, upstream):
    big = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * MAX_BODY}]}
    assert _error(_post(gw, key, json=big), 413)["type"] == "request_too_large"

    def chunked():
        data = json.dumps(big).encode()
        for i in range(0, len(data), 8192):
            yield data[i : i + 8192]

    assert _post(gw, key, content=chunked()).status_code == 413
    r = gw.http.post("/v1/messages", headers={"x-api-key": key}, json={**big, "max_tokens": 5})
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
    assert _post(gw, key, json={"model": "gpt-4o-mini", "messages": MESSAGES}).status_code == 200


def test_compressed_request_bodies_are_decoded_or_refused_naming_the_encoding(gw, key):
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode()
    for encoding, data in (
        ("gzip", gzip.compress(body)),
        ("deflate", zlib.compress(body)),
        ("identity", body),
    ):
        r = _post(gw, key, content=data, headers={"content-encoding": encoding})
        assert r.status_code == 200, (encoding, r.text)
    # Small on the wire, larger than max_body_bytes once decoded: 413 as for a plain body.
    big = json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * MAX_BODY}]}
    )
    r = _post(gw, key, content=gzip.compress(big.encode()), headers={"content-encoding": "gzip"})
    assert _error(r, 413)["code"] == "request_too_large"
    r = _post(gw, key, content=b"\x1f\x8b not gzip", headers={"content-encoding": "gzip"})
    assert _error(r, 400)["code"] == "invalid_body_encoding"
    r = _post(gw, key, content=b"...", headers={"content-encoding": "br"})
    err = _error(r, 415)
    assert err["code"] == "unsupported_content_encoding" and "'br'" in err["message"]
    r = gw.http.post(
        "/v1/messages",
        headers={"x-api-key": key, "content-encoding": "zstd"},
        content=b"...",
    )
    assert r.status_code == 415 and r.json()["type"] == "error"


def _raw_exchange(gw: GatewayProcess, head: bytes, pieces: Iterator[bytes]) -> bytes:
    """Send ``head`` then ``pieces`` on one connection (stopping when the gateway closes
    it), and read until it closes."""
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head)
        try:
            for piece in pieces:
                s.sendall(piece)
        except OSError:  # closed by the gateway before the header ended
            pass
        got = b""
        with contextlib.suppress(ConnectionResetError):
            while data := s.recv(65536):
                got += data
    return got


@pytest.mark.parametrize("shape", ["one long value", "many headers"])
def test_a_header_block_without_end_gets_431_and_other_requests_are_unaffected(gw, key, shape):
    """The request head is held in memory until it ends: one that never ends would take the
    gateway's memory, and every request in flight with it. Past 64 KiB it is refused."""
    if shape == "one long value":
        head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nx-big: "
        pieces = (b"a" * 16384 for _ in range(8192))  # 128 MiB, never ended
    else:
        head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n"
        pieces = (b"x-h: 1\r\n" * 2048 for _ in range(8192))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        refused = pool.submit(_raw_exchange, gw, head, pieces)
        ok = _post(gw, key, json={"model": "gpt-4o-mini", "messages": MESSAGES})
        answer = refused.result(timeout=60)
    assert ok.status_code == 200
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 431 Request Header Fields Too Large", answer[:200]
    head_lines, _, body = rest.partition(b"\r\n\r\n")
    assert b"connection: close" in head_lines.lower().split(b"\r\n")
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "header_too_large"
    assert "64 KiB" in error["message"]
    assert "Invalid HTTP request" not in gw.logs()


@pytest.mark.parametrize(("size", "refused"), [(60_000, False), (70_000, True), (200_000, True)])
def test_a_whole_header_block_past_64_kib_gets_431_however_it_arrives(gw, key, size, refused):
    """The documented bound is the head's size, not how many reads it took: a complete head
    past 64 KiB sent at once (one read, or its end in the read that began it) is refused as
    one that trickles in is, and one under it is served."""
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nx-api-key: %s\r\n"
        b"connection: close\r\nx-big: %s\r\ncontent-length: %d\r\n\r\n"
        % (key.encode(), b"a" * size, len(body))
    )
    answer = _raw_exchange(gw, head + body, iter(()))
    status = answer.partition(b"\r\n")[0]
    if refused:
        assert status == b"HTTP/1.1 431 Request Header Fields Too Large", answer[:200]
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "header_too_large"
    else:
        assert status == b"HTTP/1.1 200 OK", answer[:200]
    assert "Invalid HTTP request" not in gw.logs() and "Traceback" not in gw.logs()


def test_a_head_past_64_kib_pipelined_behind_a_request_in_flight_closes_cleanly(gw, key):
    """No answer can follow an unfinished one on the connection, so it is closed; the request
    in flight learns it as of any disconnect, and nothing fails inside the gateway."""
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode()

    def request(extra: bytes = b"") -> bytes:
        return (
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nx-api-key: %s\r\n%s"
            b"content-length: %d\r\n\r\n%s" % (key.encode(), extra, len(body), body)
        )

    before = gw.logs()
    _raw_exchange(gw, request() + request(b"x-big: %s\r\n" % (b"a" * 70_000,)), iter(()))
    assert _post(gw, key, json={"model": "gpt-4o-mini", "messages": MESSAGES}).status_code == 200
    new_logs = gw.logs()[len(before) :]
    assert "internal error" not in new_logs and "Traceback" not in new_logs, new_logs


@pytest.mark.parametrize(
    "garbage",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nbad header\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: x\r\n\r\n",
    ],
)
def test_bytes_that_are_not_http_get_a_400_in_openais_error_shape(gw, key, garbage):
    """uvicorn answers them with text/plain, which a client reading OpenAI's error shape
    cannot parse; the gateway answers JSON, closes that connection, and serves others."""
    answer = _raw_exchange(gw, garbage, iter(()))
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 400 Bad Request", answer[:200]
    head_lines, _, body = rest.partition(b"\r\n\r\n")
    lines = head_lines.lower().split(b"\r\n")
    assert b"content-type: application/json" in lines and b"connection: close" in lines
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_http_request"
    assert _post(gw, key, json={"model": "gpt-4o-mini", "messages": MESSAGES}).status_code == 200


def test_bytes_that_are_not_http_behind_a_request_in_flight_close_without_an_answer(gw, key):
    """An answer written while an earlier (pipelined) request is answered would cut into
    it: the connection is closed, and nothing fails inside the gateway."""
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nx-api-key: %s\r\n"
        b"content-length: %d\r\n\r\n%s" % (key.encode(), len(body), body)
    )
    before = gw.logs()
    answer = _raw_exchange(gw, request + b"NOT HTTP\r\n\r\n", iter(()))
    assert b"400 Bad Request" not in answer, answer[:300]
    assert _post(gw, key, json={"model": "gpt-4o-mini", "messages": MESSAGES}).status_code == 200
    new_logs = gw.logs()[len(before) :]
    assert "internal error" not in new_logs and "Traceback" not in new_logs, new_logs


def test_unknown_routes_and_methods(gw, key):
    assert _error(gw.http.get("/v1/nothing"), 404)["code"] == "unknown_route"
    r = gw.http.get("/v1/chat/completions", headers={"x-api-key": key})
    assert _error(r, 405)["code"] == "method_not_allowed" and r.headers["allow"] == "POST"


def test_without_cors_a_preflight_is_a_405_in_the_routes_shape(gw):
    """CORS is off by default: OPTIONS is a method no route takes, and no answer says
    any origin may read it."""
    preflight = {"origin": "https://app.example.com", "access-control-request-method": "POST"}
    r = gw.http.options("/v1/chat/completions", headers=preflight)
    assert _error(r, 405)["code"] == "method_not_allowed" and r.headers["allow"] == "POST"
    r = gw.http.options("/v1/messages", headers=preflight)
    assert r.status_code == 405 and r.json()["type"] == "error"
    r = gw.http.get("/health", headers={"origin": "https://app.example.com"})
    assert r.status_code == 200
    assert not [h for h in r.headers if h.startswith("access-control-") or h == "vary"]


def test_unknown_routes_and_methods_under_messages_answer_in_anthropics_shape(gw, key):
    """Anthropic clients read Anthropic's error shape on every /v1/messages route."""
    r = gw.http.get("/v1/messages", headers={"x-api-key": key})
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "GET" in r.json()["error"]["message"]
    for path in ("/v1/messages/", "/v1/messages/batches"):
        r = gw.http.post(path, headers={"x-api-key": key}, json={})
        assert r.status_code == 404
        assert r.json() == {
            "type": "error",
            "error": {
                "type": "not_found_error",
                "message": f"Unknown route POST {path}: see GET /openapi.json",
            },
        }


def test_legacy_completions_reject_unsupported_fields(gw, key):
    r = _post(
        gw, key, "/v1/completions", json={"model": "gpt-4o-mini", "prompt": "x", "echo": True}
    )
    assert _error(r, 400)["param"] == "echo"
    r = _post(gw, key, "/v1/completions", json={"model": "gpt-4o-mini", "prompt": ["a", "b"]})
    assert _error(r, 400)["param"] == "prompt"


def test_anthropic_bad_input_names_the_field(gw, key):
    r = gw.http.post(
        "/v1/messages",
        headers={"x-api-key": key},
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.status_code == 400
    assert r.json() == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "'max_tokens' is required (param: max_tokens)",
        },
    }


# ---------------------------------------------------------------------------------------------
# Limits and budgets, under a burst


def _burst(gw, key, n, body=None, path="/v1/chat/completions"):
    body = body or {"model": "gpt-4o-mini", "messages": MESSAGES}
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: _post(gw, key, path, json=body), range(n)))


def test_rpm_burst_admits_exactly_the_limit(gw, upstream):
    key, key_id = gw.new_key(rpm=5)
    upstream.default = Reply(delay=0.2)
    answers = _burst(gw, key, 20)
    assert sorted(r.status_code for r in answers) == [200] * 5 + [429] * 15
    for r in answers:
        if r.status_code == 429:
            err = _error(r, 429)
            assert (
                err["code"] == "rate_limit_exceeded" and "5 requests per minute" in err["message"]
            )
            assert 1 <= int(r.headers["retry-after"]) <= 60
    statuses = [row["status"] for row in gw.rows(key_id, 20)]
    assert sorted(statuses) == ["ok"] * 5 + ["rejected"] * 15


def test_an_estimate_reserves_no_more_output_than_a_model_can_give():
    """Each model is asked at most its maximum output (the engine caps ``max_tokens``), so
    a token limit or budget reserves no more: gpt-4o-mini gives 16,384 at most, gpt-4.1
    32,768; a model the catalogue does not know is taken at its word."""
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 100_000}
    catalog = Catalog.load()
    mini = estimate(body, [("gpt-4o-mini", None)], catalog, 64)
    assert mini.output_tokens == 16_384
    assert mini.cost_usd == pytest.approx((mini.prompt_tokens * 0.15 + 16_384 * 0.60) / 1e6)
    both = estimate(body, [("gpt-4o-mini", None), ("gpt-4.1", None)], catalog, 64)
    assert both.output_tokens == 32_768
    assert both.cost_usd == pytest.approx((both.prompt_tokens * 2.0 + 32_768 * 8.0) / 1e6)
    assert estimate({**body, "n": 2}, [("gpt-4o-mini", None)], catalog, 64).output_tokens == (
        2 * 16_384
    )
    unknown = estimate(body, [("openai/gpt-9", None)], catalog, 64)
    assert unknown.output_tokens == 100_000


def test_limits_count_every_choice_asked(gw, upstream):
    """``n`` choices are ``n`` answers: a request's reservation counts ``max_tokens`` for
    each, or a key under a token limit or budget could spend ``n`` times what it holds."""
    one = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 100}
    need = estimate(one, [("gpt-4o-mini", None)], Catalog.load(), 64)
    assert estimate({**one, "n": 8}, [("gpt-4o-mini", None)], Catalog.load(), 64).tokens == (
        need.tokens + 7 * 100
    )
    key, _ = gw.new_key(tpm=need.tokens * 2)
    headers = {"authorization": f"Bearer {key}"}
    # (The first request of a window is let through whatever it needs.)
    assert gw.http.post("/v1/chat/completions", json=one, headers=headers).status_code == 200
    r = gw.http.post("/v1/chat/completions", json={**one, "n": 8}, headers=headers)
    assert _error(r, 429)["code"] == "tokens_rate_limit_exceeded"
    assert gw.http.post("/v1/chat/completions", json=one, headers=headers).status_code == 200


def test_a_budgeted_key_may_not_use_a_model_without_a_price(gw, upstream):
    """An unpriced model (a name the catalogue does not know) costs an unknown amount: a
    budget could not hold it, so a key with a budget is refused it, and told why."""
    budgeted, key_id = gw.new_key(budget_usd=5)
    free, _ = gw.new_key()
    chat = {"messages": MESSAGES}
    for body, param in (
        ({"model": "openai/gpt-9-preview"}, "model"),
        ({"model": "gpt-4o-mini", "fallbacks": ["openai/gpt-9-preview"]}, "fallbacks"),
    ):
        r = gw.http.post(
            "/v1/chat/completions", json={**chat, **body}, headers={"x-api-key": budgeted}
        )
        err = _error(r, 403)
        assert (err["code"], err["param"]) == ("model_not_priced", param)
        assert "gpt-9-preview" in err["message"] and "price" in err["message"]
    assert upstream.requests == []
    assert [row["status"] for row in gw.rows(key_id, 2)] == ["rejected", "rejected"]
    r = gw.http.post(
        "/v1/chat/completions",
        json={**chat, "model": "openai/gpt-9-preview"},
        headers={"x-api-key": free},
    )
    assert r.status_code == 200


def test_tpm_burst_admits_what_fits(gw, upstream):
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 8}
    need = estimate(body, [("gpt-4o-mini", None)], Catalog.load(), 64).tokens
    key, _ = gw.new_key(tpm=need * 3 + need // 2)
    upstream.default = Reply(delay=0.2, chunks=8)
    answers = _burst(gw, key, 12, body)
    assert sorted(r.status_code for r in answers) == [200] * 3 + [429] * 9
    refused = next(r for r in answers if r.status_code == 429)
    assert _error(refused, 429)["code"] == "tokens_rate_limit_exceeded"
    assert int(refused.headers["retry-after"]) >= 1


def test_budget_burst_cannot_double_spend(gw, upstream):
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 8}
    est = estimate(body, [("gpt-4o-mini", None)], Catalog.load(), 64).cost_usd
    key, _ = gw.new_key(budget_usd=est * 3.5)
    upstream.default = Reply(delay=0.3, chunks=8)
    answers = _burst(gw, key, 15, body)
    assert sorted(r.status_code for r in answers) == [200] * 3 + [429] * 12
    refused = next(r for r in answers if r.status_code == 429)
    err = _error(refused, 429)
    assert err["type"] == "insufficient_quota" and err["code"] == "budget_exceeded"
    assert "budget" in err["message"].lower()
    assert "retry-after" not in refused.headers
    assert refused.headers["x-should-retry"] == "false"


def test_a_priority_answer_is_estimated_and_billed_at_priority_prices(gw, upstream):
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 8}
    standard = estimate(body, [("gpt-4o", None)], Catalog.load(), 64).cost_usd
    asked = {**body, "service_tier": "priority"}
    assert estimate(asked, [("gpt-4o", None)], Catalog.load(), 64).cost_usd == pytest.approx(
        standard * 1.7
    )
    key, key_id = gw.new_key(budget_usd=1.0)
    upstream.default = Reply(chunks=4)
    answer = oai(gw, key).chat.completions.create(**asked)
    usage = answer.usage
    billed = (usage.prompt_tokens * 4.25 + usage.completion_tokens * 17.0) / 1e6
    assert answer.service_tier == "priority"
    assert usage.total_cost_usd == pytest.approx(billed)
    spent = gw.admin("GET", f"/admin/keys/{key_id}").json()["spent_usd"]
    assert spent == pytest.approx(billed)


def test_budget_refuses_once_spent_with_a_clear_message(gw, upstream):
    long_word = "x" * 80  # estimated at 20 tokens; the emulator counts it as 1 word (+3)
    body = {
        "model": "gpt-4o-mini",
        "max_tokens": 4,
        "messages": [{"role": "user", "content": long_word}],
    }
    est = estimate(body, [("gpt-4o-mini", None)], Catalog.load(), 64).cost_usd
    budget = est * 2.5
    key, key_id = gw.new_key(budget_usd=budget)
    upstream.default = Reply(chunks=4)
    client = oai(gw, key)
    served = 0
    with pytest.raises(openai.RateLimitError) as info:
        for _ in range(10):
            client.chat.completions.create(**body)
            served += 1
    assert 2 <= served <= 3
    assert "Budget" in info.value.message and "key 'test'" in info.value.message
    spent = gw.admin("GET", f"/admin/keys/{key_id}").json()["spent_usd"]
    assert 0 < spent <= budget


# ---------------------------------------------------------------------------------------------
# Ledger, cancellation, metrics


def _wait(predicate, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_client_disconnect_cancels_upstream_and_records_usage_seen(gw, upstream):
    key, key_id = gw.new_key()
    upstream.enqueue(Reply(chunks=500, pacing=0.02))
    payload = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    with gw.http.stream(
        "POST", "/v1/chat/completions", json=payload, headers={"x-api-key": key}
    ) as r:
        got = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                got.append(line)
            if len(got) == 4:
                break
    # Leaving the block closed our connection; the gateway must close the upstream one.
    _wait(lambda: upstream.disconnects >= 1, "the upstream connection to be closed")
    [row] = gw.rows(key_id, 1)
    assert row["status"] == "cancelled" and row["error_type"] == "client_disconnected"
    assert 3 <= row["completion_tokens"] < 500
    assert row["total_cost_usd"] > 0 and row["provider"] == "openai"
    assert 0 < row["ttft_ms"] < row["latency_ms"]  # from the first delta the gateway saw


def leave_stream_at(gw: GatewayProcess, key: str, payload: dict[str, Any], text: str) -> None:
    """Stream ``payload`` and hang up at the first line with ``text`` (the first piece)."""
    with gw.http.stream(
        "POST", "/v1/chat/completions", json=payload, headers={"x-api-key": key}
    ) as r:
        for line in r.iter_lines():
            if text in line:
                break


def test_a_tool_call_stream_cut_short_bills_the_arguments_seen(gw, upstream):
    key, key_id = gw.new_key()
    # 4,000 characters of arguments (~1,000 tokens) in three pieces, half a second apart,
    # and no usage from the provider: what the ledger bills is the gateway's estimate.
    call = {"name": "f", "arguments": {"city": "x" * 4000}}
    upstream.enqueue(Reply(pacing=0.5, usage=False, tool_calls=[call]))
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    payload = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True, "tools": tools}
    leave_stream_at(gw, key, payload, '"arguments":"x')
    [row] = gw.rows(key_id, 1)
    assert (row["status"], row["error_type"]) == ("cancelled", "client_disconnected")
    assert 100 < row["completion_tokens"] < 1000  # the pieces seen, not 0 and not all
    assert row["total_cost_usd"] > 0 and 0 < row["ttft_ms"] < row["latency_ms"]


def test_non_streaming_disconnect_cancels_upstream(gw, upstream):
    key, key_id = gw.new_key()
    upstream.enqueue(Reply(delay=30))
    with pytest.raises(httpx.TimeoutException):
        gw.http.post(
            "/v1/chat/completions",
            headers={"x-api-key": key},
            timeout=0.3,
            json={"model": "gpt-4o-mini", "messages": MESSAGES},
        )
    _wait(lambda: upstream.disconnects >= 1, "the upstream connection to be closed")
    [row] = gw.rows(key_id, 1)
    assert row["status"] == "cancelled" and row["http_status"] == 499


def test_client_gone_at_once_still_cancels_upstream(gw, upstream):
    """The disconnect watch starts a moment after the request (short requests never pay for
    it); a client that leaves before then is still noticed and its upstream closed."""
    key, key_id = gw.new_key()
    upstream.enqueue(Reply(delay=30))
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode()
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
            + f"Content-Length: {len(body)}\r\nx-api-key: {key}\r\n\r\n".encode()
            + body
        )
        _wait(lambda: len(upstream.requests) >= 1, "the request to reach the upstream")
    _wait(lambda: upstream.disconnects >= 1, "the upstream connection to be closed")
    [row] = gw.rows(key_id, 1)
    assert (row["status"], row["error_type"]) == ("cancelled", "client_disconnected")


def test_client_gone_during_upload_is_a_cancelled_row_not_an_error(gw):
    key, key_id = gw.new_key()
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000\r\n"
            + f"x-api-key: {key}\r\n\r\n".encode()
            + b'{"model": "gpt-4o-mini", '
        )
    [row] = gw.rows(key_id, 1)
    assert (row["status"], row["error_type"]) == ("cancelled", "client_disconnected")
    assert "internal error" not in gw.logs()


def test_ledger_has_one_row_per_request_with_its_status(gw, upstream):
    key, key_id = gw.new_key(rpm=6)  # the unknown model is refused before admission
    client = oai(gw, key)
    upstream.default = Reply(chunks=3)
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # ok
    list(client.chat.completions.create(model="fast", messages=MESSAGES, stream=True))  # ok
    client.completions.create(model="gpt-4o-mini", prompt="Hi")  # ok
    upstream.enqueue(Reply(status=500))
    with pytest.raises(openai.InternalServerError):  # error
        client.chat.completions.create(model="o4-mini", messages=MESSAGES)
    upstream.enqueue(Reply(chunks=20, cut_after=2))
    with pytest.raises(openai.APIError):  # error
        list(client.chat.completions.create(model="o4-mini", messages=MESSAGES, stream=True))
    with pytest.raises(openai.NotFoundError):  # error
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    upstream.enqueue(Reply(chunks=200, pacing=0.02))
    with client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True
    ) as stream:  # cancelled
        next(iter(stream))
        next(iter(stream))
    with pytest.raises(openai.RateLimitError):  # rejected
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    rows = gw.rows(key_id, 8)
    assert sorted(r["status"] for r in rows) == sorted(
        ["ok"] * 3 + ["error"] * 3 + ["cancelled", "rejected"]
    )
    ok = [r for r in rows if r["status"] == "ok"]
    assert [r["route"] for r in ok] == ["chat", "chat", "completions"]
    assert [r["model"] for r in ok] == ["gpt-4o-mini", "fast", "gpt-4o-mini"]
    for r in ok:
        assert r["served_model"] == "gpt-4o-mini" and r["provider"] == "openai"
        assert r["attempts"] == 1 and r["completion_tokens"] == 3
        assert r["total_cost_usd"] == pytest.approx(r["input_cost_usd"] + r["output_cost_usd"])
        assert r["latency_ms"] >= r["ttft_ms"] > 0
    errors = {r["error_type"] for r in rows if r["status"] == "error"}
    assert errors == {"server_error", "api_connection_error", "model_not_found"}
    usage = gw.admin("GET", "/admin/usage", params={"key": key_id}).json()
    assert usage["totals"]["requests"] == 8 and usage["totals"]["ok"] == 3
    assert usage["totals"]["total_cost_usd"] == pytest.approx(
        sum(r["total_cost_usd"] for r in rows)
    )


def test_usage_filters_by_model_and_time(gw, upstream):
    key, key_id = gw.new_key(name="filters")
    client = oai(gw, key)
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    gw.rows(key_id, 2)
    by_model = gw.admin("GET", "/admin/usage", params={"key": "filters", "model": "gpt-4o"})
    [item] = by_model.json()["data"]
    assert (item["key_id"], item["key_name"], item["model"], item["requests"]) == (
        key_id,
        "filters",
        "gpt-4o",
        1,
    )
    future = gw.admin("GET", "/admin/usage", params={"key": key_id, "since": "2999-01-01"})
    assert future.json()["totals"]["requests"] == 0
    recent = gw.admin(
        "GET", "/admin/usage", params={"key": key_id, "since": "1h", "group_by": "provider,day"}
    )
    assert recent.json()["totals"]["requests"] == 2
    assert (
        _error(gw.admin("GET", "/admin/usage", params={"group_by": "color"}), 400)["param"]
        == "group_by"
    )
    assert (
        _error(gw.admin("GET", "/admin/usage", params={"since": "yesterday-ish"}), 400)["param"]
        == "since"
    )


def test_metrics_in_prometheus_text(gw, key, upstream):
    oai(gw, key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    oai(gw, key).chat.completions.create(model="openai/client-chosen-name", messages=MESSAGES)
    gw.http.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": MESSAGES})
    text = gw.http.get("/metrics").text
    assert (
        'lunar_requests_total{route="chat",model="gpt-4o-mini",provider="openai",'
        'status="ok",code="200"}' in text
    )
    assert 'lunar_tokens_total{model="gpt-4o-mini",provider="openai",kind="completion"}' in text
    assert "lunar_cost_usd_total{" in text
    assert 'lunar_ttft_seconds_bucket{model="gpt-4o-mini",provider="openai",le="+Inf"}' in text
    assert 'lunar_request_duration_seconds_count{route="chat"' in text
    assert 'lunar_auth_failures_total{reason="missing_api_key"}' in text
    assert "lunar_ledger_pending_rows" in text
    assert "no-such-model" not in text  # free text never becomes a label
    assert "client-chosen-name" not in text and 'model="openai/other"' in text
    for generation in "012":
        assert f'python_gc_collections_total{{generation="{generation}"}} ' in text
        assert f'python_gc_objects_uncollectable_total{{generation="{generation}"}} 0' in text
    assert "# TYPE python_gc_objects_collected_total counter" in text


def test_keys_and_prompts_are_not_logged(gw, key, upstream):
    secret_prompt = "the-secret-prompt-4242"
    oai(gw, key).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": secret_prompt}]
    )
    gw.http.post(
        "/v1/chat/completions",
        headers={"x-api-key": key},
        json={
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": secret_prompt}],
            "temperature": "hot",
        },
    )
    logs = gw.logs()
    assert key not in logs and MASTER not in logs and secret_prompt not in logs
    assert "Once upon" not in logs


# ---------------------------------------------------------------------------------------------
# The commands


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lunar.server", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def cli(capsys, monkeypatch):
    """`lunar keys|usage ...` in this process (they only talk HTTP or open the database)."""
    from lunar.server.cli import main

    monkeypatch.setenv("LUNAR_MASTER_KEY", MASTER)

    def run(*args: str, master: str = MASTER) -> subprocess.CompletedProcess[str]:
        monkeypatch.setenv("LUNAR_MASTER_KEY", master)
        code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


def test_keys_cli_over_http_and_on_the_database(gw, cli):
    made = cli(
        "keys",
        "create",
        "--name",
        "cli-team",
        "--rpm",
        "3",
        "--budget-usd",
        "2",
        "--models",
        "gpt-4o-mini,gpt-4o",
        "--url",
        gw.url,
    )
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("lk-") and "shown only this once" in made.stderr
    assert oai(gw, key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    listed = cli("keys", "list", "--url", gw.url, "--json")
    mine = next(k for k in json.loads(listed.stdout)["data"] if k["name"] == "cli-team")
    assert (mine["rpm"], mine["budget_usd"], mine["models"]) == (3, 2.0, ["gpt-4o-mini", "gpt-4o"])
    assert mine["spent_usd"] > 0
    table = cli("keys", "list", "--url", gw.url)
    assert "cli-team" in table.stdout and key not in table.stdout
    revoked = cli("keys", "revoke", mine["id"], "--url", gw.url)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    with pytest.raises(openai.AuthenticationError):
        oai(gw, key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    # Straight on the database: the running gateway picks the key up by itself.
    made = cli("keys", "create", "--name", "db-team", "--db", str(gw.db))
    assert made.returncode == 0, made.stderr
    db_key = made.stdout.strip()
    _wait(
        lambda: gw.http.get("/v1/models", headers={"x-api-key": db_key}).status_code == 200,
        "the gateway to load the new key",
    )
    bad = cli("keys", "create", "--name", "x", "--url", gw.url, master="wrong")
    assert bad.returncode == 1 and "[401]" in bad.stderr
    memory = cli("keys", "list", "--db", ":memory:")
    assert memory.returncode == 1 and "the ledger needs a file path" in memory.stderr
    assert "Traceback" not in memory.stderr


@pytest.mark.parametrize("models", [[], "", " , "])
def test_a_key_for_no_model_at_all_is_refused_naming_models(gw, cli, models):
    """An empty allow-list made a key that every model refused (403, "allowed: "), which
    `lunar keys list` showed as allowed every model ("*")."""
    r = gw.admin("POST", "/admin/keys", json={"name": "none", "models": models})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "models"
    assert "at least one model" in r.json()["error"]["message"]
    out = cli("keys", "create", "--name", "none", "--models", ",", "--url", gw.url)
    assert out.returncode == 1 and "at least one model" in out.stderr


def test_raising_a_budget_lets_the_same_key_go_on(gw, upstream):
    """Budgets are lifetime amounts: topping one up keeps the key (its secret, id and
    spend); lowering a limit or narrowing the models applies to the next request."""
    upstream.default = Reply(chunks=4)
    key, key_id = gw.new_key(budget_usd=0.0)
    client = oai(gw, key)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert "Budget exhausted" in info.value.message
    r = gw.admin("PATCH", f"/admin/keys/{key_id}", json={"budget_usd": 1.0, "rpm": 100})
    assert r.status_code == 200, r.text
    changed = r.json()
    assert (changed["id"], changed["budget_usd"], changed["rpm"]) == (key_id, 1.0, 100)
    assert changed["spent_usd"] == 0 and "key" not in changed
    assert client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).usage
    _wait(lambda: gw.admin("GET", f"/admin/keys/{key_id}").json()["spent_usd"] > 0, "the spend")
    spent = gw.admin("GET", f"/admin/keys/{key_id}").json()["spent_usd"]

    # null lifts a limit; the models narrow at once; what is not given stays.
    r = gw.admin("PATCH", f"/admin/keys/{key_id}", json={"rpm": None, "models": ["gpt-4o"]})
    assert r.status_code == 200, r.text
    assert (r.json()["rpm"], r.json()["budget_usd"], r.json()["models"]) == (None, 1.0, ["gpt-4o"])
    assert r.json()["spent_usd"] == spent
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert [m.id for m in client.models.list()] == ["gpt-4o"]
    r = gw.admin("PATCH", f"/admin/keys/{key_id}", json={"name": "renamed", "models": None})
    assert (r.json()["name"], r.json()["models"]) == ("renamed", None)
    assert client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).usage


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({}, 400, None),
        ({"rpm": 0}, 400, "rpm"),
        ({"budget_usd": "lots"}, 400, "budget_usd"),
        ({"name": None}, 400, "name"),
        ({"models": []}, 400, "models"),
        ({"models": ["gpt-4o", "no-such-model"]}, 400, "models[1]"),
        ({"name": "team\nb"}, 400, "name"),  # it would break the tables of keys
        ({"name": "tab\there"}, 400, "name"),
        ({"key_hash": "x"}, 400, "key_hash"),
        ({"revoked_at": None}, 400, "revoked_at"),
    ],
)
def test_a_bad_key_change_is_refused_naming_the_field_and_changes_nothing(gw, body, status, param):
    _, key_id = gw.new_key(rpm=7)
    r = gw.admin("PATCH", f"/admin/keys/{key_id}", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param
    after = gw.admin("GET", f"/admin/keys/{key_id}").json()
    assert (after["name"], after["rpm"], after["models"], after["revoked_at"]) == (
        "test",
        7,
        None,
        None,
    )


def test_a_key_name_may_be_any_printable_text_but_no_control_character(gw):
    assert gw.admin("POST", "/admin/keys", json={"name": "équipe 日本 ✓"}).status_code == 201
    r = gw.admin("POST", "/admin/keys", json={"name": "a\nb"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "name"
    assert "printable" in r.json()["error"]["message"]


def test_a_revoked_or_unknown_key_cannot_be_changed(gw):
    key, key_id = gw.new_key()
    assert gw.admin("DELETE", f"/admin/keys/{key_id}").status_code == 200
    r = gw.admin("PATCH", f"/admin/keys/{key_id}", json={"budget_usd": 5})
    assert r.status_code == 409 and r.json()["error"]["code"] == "key_revoked"
    assert gw.http.get("/v1/models", headers={"x-api-key": key}).status_code == 401
    after = gw.admin("GET", f"/admin/keys/{key_id}").json()
    assert after["budget_usd"] is None and after["revoked_at"] is not None
    r = gw.admin("PATCH", "/admin/keys/key_nosuch", json={"rpm": 1})
    assert r.status_code == 404 and r.json()["error"]["param"] == "key_id"
    unauthorised = gw.http.patch(f"/admin/keys/{key_id}", json={"rpm": 1})
    assert unauthorised.status_code == 401


def test_keys_update_cli_over_http_and_on_the_database(gw, cli):
    _, key_id = gw.new_key(rpm=5, budget_usd=1.0)
    out = cli("keys", "update", key_id, "--budget-usd", "20", "--rpm", "none", "--url", gw.url)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (
        f"Key 'test' ({key_id}) updated: rpm none, tpm none, budget $ 20.0, models all.\n"
    )
    out = cli("keys", "update", key_id, "--models", "gpt-4o-mini", "--url", gw.url, "--json")
    assert json.loads(out.stdout)["models"] == ["gpt-4o-mini"]
    shown = gw.admin("GET", f"/admin/keys/{key_id}").json()
    assert (shown["rpm"], shown["budget_usd"], shown["models"]) == (None, 20.0, ["gpt-4o-mini"])

    # On the database: the running gateway picks the change up by itself.
    out = cli("keys", "update", key_id, "--models", "gpt-4o", "--db", str(gw.db))
    assert out.returncode == 0, out.stderr
    assert "models ['gpt-4o']" in out.stdout
    _wait(
        lambda: gw.admin("GET", f"/admin/keys/{key_id}").json()["models"] == ["gpt-4o"],
        "the gateway to load the change",
    )
    for args, said in (
        ((key_id, "--rpm", "0"), "'rpm' must be an integer from 1"),
        ((key_id,), "Nothing to change"),
        (("key_nosuch", "--rpm", "3"), "No key with id 'key_nosuch'"),
    ):
        for where in (("--url", gw.url), ("--db", str(gw.db))):
            out = cli("keys", "update", *args, *where)
            assert out.returncode == 1 and said in out.stderr, (args, where, out.stderr)
    gw.admin("DELETE", f"/admin/keys/{key_id}")
    out = cli("keys", "update", key_id, "--rpm", "3", "--db", str(gw.db))
    assert out.returncode == 1 and "is revoked" in out.stderr


DB_COMMANDS = [
    ("keys", "list"),
    ("keys", "revoke", "key_x"),
    ("keys", "update", "key_x", "--rpm", "3"),
    ("keys", "create", "--name", "x"),
    ("usage",),
]


def test_keys_and_usage_on_a_db_that_does_not_exist_fail_and_create_nothing(cli, tmp_path):
    """A mistyped --db made its directories and an empty database, and printed an empty
    table with exit code 0 (or created a key no gateway would ever read)."""
    path = tmp_path / "typo" / "sub" / "lunar.dbb"
    for command in DB_COMMANDS:
        out = cli(*command, "--db", str(path))
        assert out.returncode == 1 and out.stdout == ""
        assert out.stderr == (
            f"Error: --db '{path}': no such file. Give the database of a gateway "
            "(`lunar serve --db FILE` creates it), or check the path.\n"
        )
    assert list(tmp_path.iterdir()) == []


def test_keys_and_usage_on_a_file_that_is_not_a_database_say_so(cli, tmp_path):
    garbage = tmp_path / "notes.txt"
    garbage.write_text("not a database\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    other = tmp_path / "other.db"  # SQLite, but another program's tables
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE keys (x)")
    conn.close()
    for path, problem in [
        (garbage, "file is not a database (give the database of a gateway)"),
        (folder, "is a directory, not a database file"),
    ]:
        for command in DB_COMMANDS:
            out = cli(*command, "--db", str(path))
            assert out.returncode == 1 and out.stdout == ""
            assert out.stderr.startswith(f"Error: --db '{path}': {problem}"), out.stderr
    assert garbage.read_text() == "not a database\n"
    for command in DB_COMMANDS:  # another program's database is refused, and left as it was
        out = cli(*command, "--db", str(other))
        assert out.returncode == 1, out.stderr
        assert "not a Lunar gateway's database" in out.stderr
    with sqlite3.connect(other) as conn:
        tables = conn.execute("SELECT name FROM sqlite_master").fetchall()
    conn.close()
    assert tables == [("keys",)]


def test_usage_cli_prints_a_table(gw, cli):
    key, key_id = gw.new_key(name="usage-cli")
    oai(gw, key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    gw.rows(key_id, 1)
    out = cli("usage", "--key", "usage-cli", "--url", gw.url)
    assert out.returncode == 0, out.stderr
    assert "usage-cli" in out.stdout and "gpt-4o-mini" in out.stdout and "total" in out.stdout
    raw = cli("usage", "--key", key_id, "--group-by", "none", "--db", str(gw.db), "--json")
    [row] = json.loads(raw.stdout)["data"]
    assert row["status"] == "ok" and row["key_name"] == "usage-cli"


def test_serve_refuses_to_start_without_a_master_key(upstream, tmp_path):
    env = gateway_env(upstream)
    del env["LUNAR_MASTER_KEY"]
    out = _cli("serve", "--port", "0", "--db", str(tmp_path / "x.db"), env=env)
    assert out.returncode == 2 and "LUNAR_MASTER_KEY is not set" in out.stderr


def test_serve_refuses_a_db_that_is_not_a_database_before_listening(upstream, tmp_path):
    """It printed 'listening on', then failed at start-up (exit 3) with SQLite's words and
    not the path."""
    garbage = tmp_path / "notes.txt"
    garbage.write_text("not a database\n")
    out = _cli("serve", "--port", "0", "--db", str(garbage), env=gateway_env(upstream))
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == (
        f"Error: --db '{garbage}': file is not a database (give the gateway's SQLite file, "
        "or a path with no file yet to start with an empty one)\n"
    )
    out = _cli("serve", "--port", "0", env=gateway_env(upstream, LUNAR_DB=str(tmp_path)))
    assert out.returncode == 2
    assert out.stderr.startswith(f"Error: $LUNAR_DB '{tmp_path}': is a directory")
    assert garbage.read_text() == "not a database\n"


def test_serve_refuses_a_bad_log_level_from_the_environment_or_file_naming_it(upstream, tmp_path):
    """As `--log-level loud` is refused by the flag's parser: the message names the setting
    and where it came from, before anything starts (it was `ValueError: Unknown level`)."""
    env = gateway_env(upstream, LUNAR_LOG_LEVEL="loud")
    for args in (["--print-config"], ["--port", "0", "--db", str(tmp_path / "a.db")]):
        out = _cli("serve", *args, env=env)
        assert out.returncode == 2, out.stderr
        assert out.stderr == (
            "Error: $LUNAR_LOG_LEVEL must be one of critical, error, warning, info, debug, "
            "got 'loud'\n"
        )
    cfg = tmp_path / "lunar.toml"
    cfg.write_text('[server]\nlog_level = "verbose"\n')
    db = str(tmp_path / "b.db")
    out = _cli("serve", "--config", str(cfg), "--port", "0", "--db", db, env=gateway_env(upstream))
    assert out.returncode == 2
    assert out.stderr.startswith(f"Error: {cfg}: server.log_level must be one of critical")
    assert not (tmp_path / "a.db").exists() and not (tmp_path / "b.db").exists()


def test_print_config_masks_secrets(upstream, tmp_path):
    cfg = tmp_path / "lunar.toml"
    cfg.write_text(
        '[server]\nport = 4555\n[providers.openai]\nbase_url = "http://10.1.1.1/v1"\n'
        '[providers.house]\nprotocol = "openai"\nbase_url = "http://10.0.0.5/v1"\n'
        'api_key_env = "HOUSE_KEY"\n'
        '[models.house-llama]\ndeployments = [{provider = "house", id = "llama", input = 0.1, '
        'output = 0.2}]\n[fallbacks]\n"gpt-4o-mini" = ["house-llama"]\n'
    )
    env = gateway_env(
        upstream, HOUSE_KEY="sk-house-secret", LUNAR_PORT="4666", OPENAI_API_KEY="sk-openai-secret"
    )
    out = _cli("serve", "--config", str(cfg), "--print-config", "--db", "/tmp/x.db", env=env)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for secret in ("sk-house-secret", "sk-openai-secret", MASTER):
        assert secret not in text
    assert "port = 4666" in text  # the environment beats the file
    assert 'db = "/tmp/x.db"' in text  # the flag beats everything
    assert "[providers.house]" in text and 'api_key = "set (from $HOUSE_KEY' in text
    # OPENAI_BASE_URL (environment) beats the file's base_url
    assert f'base_url = "{upstream.base_url}"' in text
    assert 'gpt-4o-mini = ["house-llama"]' in text
    if sys.version_info >= (3, 11):
        import tomllib

        parsed = tomllib.loads(text)
        assert parsed["server"]["master_key"].startswith("set")
    bad = tmp_path / "bad.toml"
    bad.write_text('[providers.openai]\napi_key = "sk-inline"\n')
    out = _cli("serve", "--config", str(bad), "--print-config", env=env)
    assert out.returncode == 2 and "api_key_env" in out.stderr


UNUSABLE_USAGE = [
    '{"prompt_tokens": NaN, "completion_tokens": 1, "total_tokens": 2}',
    '{"prompt_tokens": Infinity, "completion_tokens": -1, "total_tokens": NaN}',
    '{"prompt_tokens": 3, "completion_tokens": "1",'
    ' "prompt_tokens_details": {"cached_tokens": NaN}}',
    '{"prompt_tokens": 1e400, "completion_tokens": 2.5, "prompt_tokens_details": []}',
    '"twelve"',
    "[1, 2]",
]


@pytest.mark.parametrize("usage", UNUSABLE_USAGE)
@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_usage_that_is_no_count_still_serves_records_and_settles(
    gw, upstream, usage, stream
):
    """Token counts come from the upstream's JSON. NaN, infinity, strings or no object at
    all made the cost arithmetic fail: a 500, and for a stream, no ledger row and a key's
    reservation never settled. They count as 0 instead; the answer is served."""
    head = '{"id":"x","created":1,"model":"gpt-4o-mini","choices":[{"index":0,'
    if stream:
        first = head + '"delta":{"role":"assistant","content":"hi"},"finish_reason":null}]}'
        last = head + '"delta":{},"finish_reason":"stop"}],"usage":' + usage + "}"
        body = f"data: {first}\n\ndata: {last}\n\ndata: [DONE]\n\n"
        reply = Reply(body=body, headers={"content-type": "text/event-stream"})
    else:
        msg = '"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
        reply = Reply(body=head + msg + '"usage":' + usage + "}")
    # Four requests that each reserve ~310 tokens under a 1,000-token-a-minute limit: they
    # pass only if each one's reservation is settled (to what it used) when it ends.
    key, key_id = gw.new_key(tpm=1000)
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    chat |= {"stream": stream, "max_tokens": 300}
    headers = {"authorization": f"Bearer {key}"}
    for _ in range(4):
        upstream.enqueue(reply)
        r = gw.http.post("/v1/chat/completions", json=chat, headers=headers)
        assert r.status_code == 200, r.text
        assert ("[DONE]" in r.text and '"error"' not in r.text) if stream else r.json()["usage"]
    rows = gw.rows(key_id, expected=4)
    assert [(x["status"], x["http_status"], x["provider"]) for x in rows] == [
        ("ok", 200, "openai")
    ] * 4
    assert all(x["prompt_tokens"] >= 0 and x["total_cost_usd"] >= 0 for x in rows)


@pytest.mark.parametrize("provider", ["anthropic", "gemini"])
def test_a_stream_cut_short_bills_the_prompt_its_provider_counted(upstream, tmp_path, provider):
    """Anthropic tells the prompt's count in message_start, Gemini in its first event: a
    stream cut after them was billed from Lunar's estimate (characters / 4, all at the input
    price) though the provider's exact count, cache reads included, had come."""
    gw = GatewayProcess(tmp_path, upstream, **every_wire(upstream))
    try:
        key, key_id = gw.new_key()
        model = {"anthropic": "claude-3-haiku", "gemini": "gemini-2.0-flash"}[provider]
        prompt = "a " * 2000  # 4,000 characters: an estimate of ~1,000 tokens; 2,000 words
        upstream.enqueue(Reply(chunks=20, pacing=0.2, cached_tokens=1500))
        payload = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "stream": True,
        }
        leave_stream_at(gw, key, payload, '"content":"Once')
        [row] = gw.rows(key_id, 1)
        assert (row["status"], row["error_type"]) == ("cancelled", "client_disconnected")
        assert row["prompt_tokens"] == 2003  # the emulator's count: its words, + 3
        assert row["cached_tokens"] == 1500
        assert 0 < row["completion_tokens"] < 20
    finally:
        gw.stop()


def test_cache_writes_reach_the_ledger_of_an_older_database_and_every_report(
    upstream, tmp_path, cli
):
    """A gateway started on an older gateway's database (no cache-write columns) keeps its
    rows and records Claude's cache writes, streamed or not, 1-hour ones apart, in the
    ledger, the admin usage report, ``lunar usage`` (over HTTP and on the file) and the
    metrics; its Anthropic route gives them back as Anthropic does."""
    old_ledger(tmp_path / "lunar.db")  # where GatewayProcess puts its database
    gw = GatewayProcess(tmp_path, upstream, **every_wire(upstream))
    try:
        key, key_id = gw.new_key(name="caching")
        prompt = [{"role": "user", "content": "a " * 2000}]  # 2,003 tokens to the emulator
        reply = Reply(
            chunks=4, cached_tokens=1500, cache_write_tokens=400, cache_write_1h_tokens=100
        )
        for stream in (False, True):
            upstream.enqueue(reply)
            r = gw.http.post(
                "/v1/chat/completions",
                headers={"x-api-key": key},
                json={"model": "claude-3-haiku", "messages": prompt, "stream": stream},
            )
            assert r.status_code == 200, r.text
            if stream:
                [usage] = [c["usage"] for c in sse(r) if c != "[DONE]" and c.get("usage")]
            else:
                usage = r.json()["usage"]
            assert (usage["cached_tokens"], usage["cache_write_tokens"]) == (1500, 400)
            assert usage["cache_write_1h_tokens"] == 100
        upstream.enqueue(reply)
        r = gw.http.post(
            "/v1/messages",
            headers={"x-api-key": key},
            json={"model": "claude-3-haiku", "max_tokens": 50, "messages": prompt},
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["cache_creation"] == {
            "ephemeral_5m_input_tokens": 300,
            "ephemeral_1h_input_tokens": 100,
        }
        rows = gw.rows(key_id, 3)
        assert [x["stream"] for x in rows] == [False, True, False]
        for x in rows:
            assert (x["prompt_tokens"], x["cached_tokens"]) == (2003, 1500)
            assert (x["cache_write_tokens"], x["cache_write_1h_tokens"]) == (400, 100)
            # claude-3-haiku per 1M: $0.25 input, $0.30 (5-minute) and $0.50 (1-hour) cache
            # writes, $0.03 cache reads.
            assert x["input_cost_usd"] == round((103 * 0.25 + 300 * 0.30 + 100 * 0.50) / 1e6, 10)
            assert x["cached_input_cost_usd"] == round(1500 * 0.03 / 1e6, 10)
        totals = gw.admin("GET", "/admin/usage", params={"key": key_id}).json()["totals"]
        assert (totals["cached_tokens"], totals["cache_write_tokens"]) == (4500, 1200)
        assert totals["cache_write_1h_tokens"] == 300
        old = gw.admin("GET", "/admin/usage", params={"key": "old-team", "group_by": "none"})
        [kept] = old.json()["data"]
        assert {k: kept[k] for k in OLD_LEDGER_ROW} == {**OLD_LEDGER_ROW, "stream": False}
        assert (kept["cache_write_tokens"], kept["cache_write_1h_tokens"]) == (0, 0)
        metrics = gw.http.get("/metrics").text
        written = (
            'lunar_tokens_total{model="claude-3-haiku",provider="anthropic",kind="cache_write"}'
        )
        assert f"{written} 1200" in metrics
        table = cli("usage", "--key", "caching", "--url", gw.url)
        assert table.returncode == 0, table.stderr
        head, *_, total = table.stdout.splitlines()
        assert "cache read tok" in head and "cache write tok" in head
        assert total.split()[-3:-1] == ["4500", "1200"]
        on_file = cli("usage", "--key", "old-team", "--group-by", "none", "--db", str(gw.db))
        assert on_file.returncode == 0, on_file.stderr
        assert "old-team" in on_file.stdout and "cache write tok" in on_file.stdout
        exported = json.loads(cli("usage", "--group-by", "model", "--url", gw.url, "--json").stdout)
        assert exported["totals"]["cache_write_1h_tokens"] == 300
    finally:
        gw.stop()
