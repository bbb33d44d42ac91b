"""The command line and the configuration as a new user meets them: `lunar serve`, `lunar
keys`, `lunar chat` run as processes (or through their ``main``), with real sockets and the
emulator as the provider. Each mistake is one `Error: …` line naming what to change, never a
traceback, and nothing listens before the configuration is known to work."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from lunar.server.config import load_config
from lunar.testing import MockServer, Reply

from .test_server import MASTER, MESSAGES, GatewayProcess, _cli, gateway_env
from .test_server_units import _unprivileged

pytest.importorskip("uvicorn")


@pytest.fixture
def upstream():
    with MockServer() as server:
        yield server


def _refused(out: subprocess.CompletedProcess[str], message: str) -> None:
    """Exit code 2, nothing on stdout (no 'listening on'), one line naming the problem."""
    assert (out.returncode, out.stdout) == (2, ""), out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("Error: ") and message in out.stderr, out.stderr


def test_a_config_file_that_cannot_be_read_is_an_error_naming_it(upstream, tmp_path):
    """A directory, a file that is not UTF-8 or one it may not read: it was a traceback
    (IsADirectoryError, UnicodeDecodeError, PermissionError) and exit code 1."""
    env = gateway_env(upstream)
    out = _cli("serve", "--print-config", "--config", str(tmp_path), env=env)
    _refused(out, f"{tmp_path}: cannot be read: Is a directory")
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'[server]\nhost = "caf\xe9"\n')
    out = _cli("serve", "--print-config", "--config", str(latin), env=env)
    _refused(out, f"{latin}: invalid TOML: not UTF-8 text")
    secret = tmp_path / "secret.toml"
    secret.write_text("[server]\nport = 4001\n")
    secret.chmod(0)
    done = subprocess.run(
        [*_unprivileged(), sys.executable, "-m", "lunar.server", "serve", "--print-config",
         "--config", str(secret)],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    _refused(done, f"{secret}: cannot be read: Permission denied")


def test_a_config_file_from_lunar_config_is_named_by_the_variable(upstream, tmp_path):
    missing = tmp_path / "nope.toml"
    out = _cli("serve", "--print-config", env=gateway_env(upstream, LUNAR_CONFIG=str(missing)))
    _refused(out, f"Error: $LUNAR_CONFIG: Config file not found: {missing}")


def test_an_empty_host_is_refused_not_every_interface(upstream, tmp_path):
    """The socket reads '' as every interface: `--host ''` (or a `host = ""` left blank in
    the file) opened the gateway to the network and printed 'http://:PORT'."""
    db = tmp_path / "x.db"
    out = _cli("serve", "--port", "0", "--db", str(db), "--host", "", env=gateway_env(upstream))
    _refused(out, "--host is empty: give an interface (127.0.0.1; 0.0.0.0 for every")
    cfg = tmp_path / "lunar.toml"
    cfg.write_text('[server]\nhost = ""\n')
    out = _cli("serve", "--config", str(cfg), "--port", "0", "--db", str(db),
               env=gateway_env(upstream))  # fmt: skip
    _refused(out, f"{cfg}: server.host is empty")
    assert not db.exists()


def test_a_db_path_that_cannot_be_created_is_refused_before_listening(upstream, tmp_path):
    """It printed 'listening on', then uvicorn's 'Application startup failed' (exit code 3)
    with the OS's words ('[Errno 17] File exists') and not the setting."""
    afile = tmp_path / "notes.txt"
    afile.write_text("notes\n")
    out = _cli("serve", "--port", "0", "--db", str(afile / "lunar.db"), env=gateway_env(upstream))
    _refused(
        out,
        f"--db '{afile}/lunar.db': cannot open or create the database: '{afile}' is a file, "
        "not a directory",
    )
    if Path("/dev/null").exists():  # a device: SQLite cannot keep a database there
        out = _cli("serve", "--port", "0", env=gateway_env(upstream, LUNAR_DB="/dev/null"))
        _refused(out, "$LUNAR_DB '/dev/null': cannot open or create the database: ")


def test_a_tilde_in_the_db_path_is_the_home_directory(upstream, tmp_path):
    """No shell expands `~` in lunar.toml or $LUNAR_DB: the directory was made in the home
    directory and the file then opened under a directory named '~' (exit code 3)."""
    assert load_config(None, {"LUNAR_DB": "~/a.db"}).db == str(Path("~/a.db").expanduser())
    env = gateway_env(upstream, HOME=str(tmp_path), LUNAR_DB="~/data/gw.db")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lunar.server", "serve", "--port", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    db = tmp_path / "data" / "gw.db"
    assert f"(db {db};" in line, err
    assert db.is_file()
    # The keys command reads it by the same spelling (`--db=~/…` reaches no shell).
    out = _cli("keys", "create", "--name", "tilde", "--db=~/data/gw.db", env=env)
    assert out.returncode == 0, out.stderr
    out = _cli("keys", "list", "--db=~/data/gw.db", "--json", env=env)
    assert out.returncode == 0, out.stderr
    assert '"name": "tilde"' in out.stdout


def test_ctrl_c_lets_the_request_in_flight_finish_then_exits_130_without_a_traceback(
    upstream, tmp_path
):
    """SIGINT (Ctrl-C): uvicorn shuts down gracefully, then raises the signal again; that
    was a KeyboardInterrupt traceback and exit status -2."""
    gw = GatewayProcess(tmp_path, upstream)
    key, _ = gw.new_key()
    upstream.default = Reply(chunks=10, pacing=0.05)
    lines: list[str] = []
    first = threading.Event()

    def stream() -> None:
        body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
        with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body,
                          headers={"x-api-key": key}, timeout=30) as r:  # fmt: skip
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(30)
    code = gw.stop(signal.SIGINT)
    reader.join(30)
    assert code == 130, gw.logs()
    assert lines[-1] == "data: [DONE]" and len(lines) > 2
    assert "Traceback" not in gw.logs() and "KeyboardInterrupt" not in gw.logs()


@pytest.mark.parametrize("amount", ["nan", "inf", "-inf", "lots"])
def test_a_budget_that_is_no_amount_is_refused_by_the_flag(upstream, amount):
    """Over HTTP, NaN and infinity made the JSON encoder raise: a traceback, exit code 1."""
    env = gateway_env(upstream)
    for args in (["create", "--name", "x"], ["update", "key_0123"]):
        out = _cli("keys", *args, f"--budget-usd={amount}", env=env)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert f"argument --budget-usd: must be a number of USD, got '{amount}'" in out.stderr


def test_log_level_flag_takes_any_case_as_the_file_and_environment_do(upstream):
    out = _cli("serve", "--print-config", "--log-level", "INFO", env=gateway_env(upstream))
    assert out.returncode == 0, out.stderr
    assert 'log_level = "info"' in out.stdout


def test_print_config_names_the_key_variable_of_the_file(upstream, tmp_path):
    """With `api_key_env = "TEAM_KEY"` and no key set, it told to set $OPENAI_API_KEY only."""
    cfg = tmp_path / "lunar.toml"
    cfg.write_text('[providers.openai]\napi_key_env = "TEAM_KEY"\n')
    env = gateway_env(upstream)
    del env["OPENAI_API_KEY"]
    out = _cli("serve", "--print-config", "--config", str(cfg), env=env)
    assert out.returncode == 0, out.stderr
    assert 'api_key = "not set (set $TEAM_KEY or $OPENAI_API_KEY)"' in out.stdout
    assert MASTER not in out.stdout


def test_chat_that_fails_before_any_text_writes_nothing_to_stdout(mock, capsys):
    """`lunar chat … > answer.txt`: an error left an empty line in the file."""
    from lunar.cli import main

    mock.enqueue(Reply(status=401), model="gpt-4o-mini")
    assert main(["chat", "-m", "gpt-4o-mini", "hi"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "Error: [401]" in err


def test_a_provider_base_url_that_is_no_url_stops_the_gateway_at_start_up(upstream, tmp_path):
    """`OPENAI_BASE_URL=127.0.0.1:9000/v1` started the gateway, and every request to OpenAI's
    models was then a connection error, retried `max_retries` times."""
    db = tmp_path / "gw.db"
    bare = upstream.base_url.removeprefix("http://")
    env = gateway_env(upstream, OPENAI_BASE_URL=bare)
    for args in (["--print-config"], ["--port", "0", "--db", str(db)]):
        out = _cli("serve", *args, env=env)
        _refused(out, f"OPENAI_BASE_URL = '{bare}' is not a usable base URL: it has no scheme")
    cfg = tmp_path / "lunar.toml"
    cfg.write_text('[providers.vllm]\nbase_url = "localhost:8000/v1"\n')
    out = _cli("serve", "--config", str(cfg), "--port", "0", "--db", str(db),
               env=gateway_env(upstream))  # fmt: skip
    _refused(out, f"{cfg}: [providers.vllm] base_url = 'localhost:8000/v1' is not a usable")
    cfg.write_text('[providers.acme]\nprotocol = "openai"\nkey_required = false\n')
    out = _cli("serve", "--config", str(cfg), "--port", "0", "--db", str(db),
               env=gateway_env(upstream))  # fmt: skip
    _refused(out, "Provider 'acme' has no base URL: set ACME_BASE_URL or [providers.acme] base_url")
    assert not db.exists()


def test_the_gateway_drops_spaces_around_a_base_url(upstream, tmp_path):
    gw = GatewayProcess(tmp_path, upstream, OPENAI_BASE_URL=f" {upstream.base_url} ")
    try:
        key = gw.new_key()[0]
        r = gw.http.post(
            "/v1/chat/completions",
            headers={"x-api-key": key},
            json={"model": "gpt-4o-mini", "messages": MESSAGES},
        )
        assert r.status_code == 200, r.text
        assert upstream.requests[-1].path == "/v1/chat/completions"
    finally:
        gw.stop()


def test_keys_and_usage_take_the_sdks_gateway_url_ending_in_v1(upstream, tmp_path):
    """`--url http://host:4000/v1` (what LUNAR_BASE_URL holds) was a 404 'Unknown route GET
    /v1/admin/keys'; a URL without a scheme was 'Cannot reach the gateway'."""
    gw = GatewayProcess(tmp_path, upstream)
    try:
        key_id = gw.new_key("v1-team")[1]
        env = gateway_env(upstream)
        for url in (gw.url + "/v1", gw.url + "/v1/"):
            out = _cli("keys", "list", "--url", url, env=env)
            assert out.returncode == 0 and "v1-team" in out.stdout, out.stderr
        out = _cli("usage", "--json", env={**env, "LUNAR_GATEWAY_URL": gw.url + "/v1"})
        assert out.returncode == 0 and '"totals"' in out.stdout, out.stderr
        out = _cli("keys", "revoke", key_id, "--url", gw.url + "/v1", env=env)
        assert out.returncode == 0 and "revoked" in out.stdout, out.stderr
    finally:
        gw.stop()
    bare = gw.url.removeprefix("http://")
    out = _cli("keys", "list", "--url", bare, env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"Error: --url = '{bare}' is not a usable base URL: it has no")
    out = _cli("usage", env={**env, "LUNAR_GATEWAY_URL": bare})
    assert out.returncode == 1 and f"$LUNAR_GATEWAY_URL = '{bare}'" in out.stderr, out.stderr


def test_keys_and_usage_read_the_sdks_variables_when_no_url_is_given(upstream, tmp_path):
    """With no --url (and no LUNAR_GATEWAY_URL), `keys` and `usage` went to
    http://127.0.0.1:4000 whatever LUNAR_BASE_URL said, and needed LUNAR_MASTER_KEY even
    where LUNAR_API_KEY held the master key: they read the SDK's variables as it does."""
    gw = GatewayProcess(tmp_path, upstream)
    try:
        virtual, key_id = gw.new_key("sdk-env")
        env = gateway_env(upstream)
        del env["LUNAR_MASTER_KEY"]
        env["LUNAR_BASE_URL"] = gw.url + "/v1"
        env["LUNAR_API_KEY"] = MASTER
        out = _cli("keys", "list", env=env)
        assert out.returncode == 0 and "sdk-env" in out.stdout, out.stderr
        out = _cli("usage", "--json", env=env)
        assert out.returncode == 0 and '"totals"' in out.stdout, out.stderr
        # LUNAR_GATEWAY_URL, and --url, still come first.
        out = _cli("keys", "list", env={**env, "LUNAR_GATEWAY_URL": "http://127.0.0.1:9"})
        assert out.returncode == 1 and "127.0.0.1:9" in out.stderr, out.stderr
        out = _cli("keys", "list", "--url", gw.url, env={**env, "LUNAR_BASE_URL": "x"})
        assert out.returncode == 0 and "sdk-env" in out.stdout, out.stderr
        # A virtual key in LUNAR_API_KEY: the admin API refuses it, and the error says why.
        out = _cli("keys", "revoke", key_id, env={**env, "LUNAR_API_KEY": virtual})
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert "[401]" in out.stderr and "LUNAR_API_KEY was sent" in out.stderr, out.stderr
        assert "LUNAR_MASTER_KEY" in out.stderr
        # LUNAR_MASTER_KEY, when set, is the one sent.
        out = _cli(
            "keys", "list", env={**env, "LUNAR_MASTER_KEY": MASTER, "LUNAR_API_KEY": virtual}
        )
        assert out.returncode == 0 and "sdk-env" in out.stdout, out.stderr
        del env["LUNAR_API_KEY"]
        out = _cli("keys", "list", env=env)
        assert out.returncode == 1 and "LUNAR_MASTER_KEY is not set" in out.stderr, out.stderr
        assert "LUNAR_API_KEY" in out.stderr
    finally:
        gw.stop()


def test_the_server_module_tells_its_version():
    from lunar import __version__

    out = _cli("--version")
    assert (out.returncode, out.stdout.strip()) == (0, f"lunar {__version__}"), out.stderr


def test_config_is_a_flag_only_of_the_commands_that_read_it(upstream, tmp_path):
    """`keys list`, `keys revoke` and `usage` took a --config they never read; `keys create`
    and `keys update` read it with --db, to check the models --models names."""
    env = gateway_env(upstream)
    for args in (["keys", "list"], ["keys", "revoke", "key_1"], ["usage"]):
        out = _cli(*args, "--config", "lunar.toml", env=env)
        assert out.returncode == 2 and "unrecognized arguments: --config" in out.stderr, args
    cfg = tmp_path / "team.toml"
    cfg.write_text('[aliases]\nteam-model = "gpt-4o-mini"\n')
    GatewayProcess(tmp_path, upstream).stop()  # a gateway's database
    db = str(tmp_path / "lunar.db")
    out = _cli("keys", "create", "--name", "t", "--models", "team-model", "--db", db, env=env)
    assert out.returncode == 1 and "team-model" in out.stderr, out.stderr
    out = _cli("keys", "create", "--name", "t", "--models", "team-model", "--db", db,
               "--config", str(cfg), "--json", env=env)  # fmt: skip
    assert out.returncode == 0 and '"team-model"' in out.stdout, out.stderr
