"""The `lunar` command: chat streams to the terminal with a cost line; models lists prices."""

from __future__ import annotations

import socket
import subprocess
import sys

import httpx
import pytest

from lunar.cli import default_model, main
from lunar.testing import Reply


def test_chat_streams_answer_then_summary(mock, capsys):
    mock.default = Reply(text="Beep boop, said the robot.", chunks=5)
    assert main(["chat", "--model", "gpt-4o-mini", "Write a short story about a robot."]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "Beep boop, said the robot."
    assert "gpt-4o-mini via openai" in err and "$0.0000" in err and "TTFT" in err
    assert mock.requests[-1].json["messages"][-1]["content"].startswith("Write a short story")


def test_chat_no_stream_system_and_fallback(mock, capsys):
    mock.enqueue(*[Reply(status=503, retry_after=0)] * 3, model="gpt-4o-mini")  # 1 + 2 retries
    code = main(
        [
            "chat",
            "-m",
            "gpt-4o-mini",
            "--fallback",
            "llama-3.1-8b",
            "--system",
            "Be brief",
            "--no-stream",
            "--max-tokens",
            "20",
            "hi",
        ]
    )
    assert code == 0
    out, err = capsys.readouterr()
    assert out.strip() and "via groq" in err
    sent = mock.requests[-1].json
    assert sent["messages"][0] == {"role": "system", "content": "Be brief"}
    assert sent["max_tokens"] == 20


def test_chat_error_exits_1_and_lists_attempts(mock, capsys):
    mock.enqueue(Reply(status=401), model="gpt-4o-mini")
    assert main(["chat", "-m", "gpt-4o-mini", "hi"]) == 1
    _, err = capsys.readouterr()
    assert "Error: [401]" in err and "tried gpt-4o-mini via openai" in err


def test_default_model_prefers_configured_then_keyed_provider_then_local():
    assert default_model({"LUNAR_DEFAULT_MODEL": "gpt-4o"}) == ("gpt-4o", None)
    assert default_model({"ANTHROPIC_API_KEY": "k"})[0] == "claude-3-5-haiku"
    model, note = default_model({})
    assert model == "smollm2" and note is not None and "local model" in note


def test_models_lists_catalogue_with_prices(capsys):
    assert main(["models"]) == 0
    out, _ = capsys.readouterr()
    assert "gpt-4o-mini" in out and "0.15" in out and "claude-3-haiku" in out


def test_models_json_is_the_tables_data_machine_readable(capsys):
    """`lunar models --json`: /v1/models' shape, one entry per row of the table, with its
    prices, context window and capabilities as numbers and lists."""
    import json

    assert main(["models"]) == 0
    table = capsys.readouterr().out.splitlines()[1:]
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == [line.split()[0] for line in table]
    mini = next(m for m in listed["data"] if m["id"] == "gpt-4o-mini")
    assert (mini["input_price_per_1m"], mini["output_price_per_1m"]) == (0.15, 0.6)
    assert mini["context_window"] == 128000 and "tools" in mini["capabilities"]
    assert mini["providers"] == ["openai"]


def test_mock_takes_the_emulators_options(capsys):
    """`lunar mock` and `python -m lunar.testing` read one command line."""
    with pytest.raises(SystemExit) as info:
        main(["mock", "-h"])
    assert info.value.code == 0
    out, _ = capsys.readouterr()
    assert out.startswith("usage: lunar mock") and "--delay-ms" in out and "--api-key" in out
    assert "default 9000" in out
    assert main(["mock", "--chunks", "-1"]) == 2
    assert "--chunks must be >= 0" in capsys.readouterr().err
    # Refused before listening, as `lunar serve` does: not a port taken modulo 65536, not
    # a negative or endless pause.
    for option, value, said in (
        ("--port", "99999", "--port must be between 0 and 65535, got 99999"),
        ("--pacing-ms", "-5", "--pacing-ms must be a number of milliseconds >= 0, got -5"),
        ("--delay-ms", "inf", "--delay-ms must be a number of milliseconds >= 0, got inf"),
        ("--pacing-ms", "nan", "--pacing-ms must be a number of milliseconds >= 0, got nan"),
    ):
        assert main(["mock", option, value]) == 2
        assert said in capsys.readouterr().err
    for argv in (["models", "--no-such-option"], ["--no-such-option", "mock"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_mock_command_serves_the_emulator():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lunar.cli", "mock", "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert f"127.0.0.1:{port}" in proc.stdout.readline()
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.json()["object"] == "chat.completion"
    finally:
        proc.terminate()
        proc.wait(10)


def test_mock_on_a_taken_port_says_so_without_a_traceback(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["mock", "--port", str(port)]) == 1
    out, err = capsys.readouterr()
    assert err.startswith(f"Error: cannot listen on 127.0.0.1:{port}: ") and "in use" in err
    assert "Traceback" not in err and out == ""


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_models_in_remote_mode_without_a_key_says_what_to_set(monkeypatch, capsys):
    """As `lunar chat` does: one `Error:` line, exit 1, no traceback."""
    monkeypatch.setenv("LUNAR_BASE_URL", f"http://127.0.0.1:{_closed_port()}/v1")
    for command in (["models"], ["chat", "hi"]):
        assert main(command) == 1
        out, err = capsys.readouterr()
        assert err.startswith("Error: [401] No credentials for the Lunar gateway")
        assert "set LUNAR_API_KEY" in err and out == ""


def test_models_with_the_gateway_down_says_it_cannot_connect(monkeypatch, capsys):
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    monkeypatch.setenv("LUNAR_BASE_URL", url)
    monkeypatch.setenv("LUNAR_API_KEY", "lk-x")
    assert main(["models"]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("Error: Connection to provider 'lunar'") and url in err
    assert out == ""


@pytest.mark.parametrize("content", [None, "{not json"])
def test_an_unreadable_lunar_catalog_is_an_error_naming_it(content, tmp_path, monkeypatch, capsys):
    path = tmp_path / "catalog.json"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv("LUNAR_CATALOG", str(path))
    for command in (["models"], ["chat", "hi"]):
        assert main(command) == 1
        out, err = capsys.readouterr()
        assert err.startswith(f"Error: LUNAR_CATALOG='{path}' cannot be read")
        assert "unset LUNAR_CATALOG" in err and out == ""


def test_version_prints_the_packages_version():
    import lunar

    out = subprocess.run(
        [sys.executable, "-m", "lunar.cli", "--version"], capture_output=True, text=True, timeout=60
    )
    assert (out.returncode, out.stdout, out.stderr) == (0, f"lunar {lunar.__version__}\n", "")
