"""What is measured: a pluggable target = a command line + a ready URL + request headers.

``direct`` is the emulator alone (the physical floor: no gateway process). ``lunar`` is
``python -m lunar.server serve`` (the same as ``lunar serve``) with its OpenAI provider pointed
at the emulator; ``litellm`` is the LiteLLM proxy from bench/.venv-litellm with the same
emulator as its one upstream; ``relay`` is a byte relay that parses nothing (the floor of any
Python gateway, bench/gateway/relay.py). Every gateway is pinned to GATEWAY_CORE. A new peer
is one more ``Spec``.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import litellm_env
from .procs import GATEWAY_CORE, Emulator, Proc, Procs, free_port, http_json, wait_ready

CHAT_PATH = "/v1/chat/completions"
MODEL = "gpt-4o-mini"


@dataclass
class Target:
    name: str
    base: str  # http://127.0.0.1:PORT
    headers: dict[str, str]
    proc: Proc | None  # None for direct
    command: str  # as a person would type it
    version: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.base + CHAT_PATH

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


@dataclass
class Spec:
    """How to start one gateway in front of an emulator."""

    name: str
    # (upstream /v1 URL, port, work dir) -> (argv, env to add, env to show in the command)
    command: Callable[[str, int, Path], tuple[list[str], dict[str, str], dict[str, str]]]
    ready_path: str
    # (base URL, the env given) -> headers for requests; may call the admin API
    headers: Callable[[str, dict[str, str]], dict[str, str]]
    available: Callable[[], str | None]  # None when it can run, else why not
    version: Callable[[], str]
    ready_timeout: float = 90.0


# -- Lunar ----------------------------------------------------------------------------------


def _lunar_command(
    upstream: str, port: int, work: Path
) -> tuple[list[str], dict[str, str], dict[str, str]]:
    master = "lm-" + secrets.token_urlsafe(24)
    db = work / f"lunar-{port}.db"
    env = {"LUNAR_MASTER_KEY": master, "OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": upstream}
    shown = {"LUNAR_MASTER_KEY": "…", "OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": upstream}
    cmd = [
        sys.executable,
        "-m",
        "lunar.server",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--db",
        str(db),
    ]
    return cmd, env, shown


def _lunar_headers(base: str, env: dict[str, str]) -> dict[str, str]:
    status, body = http_json(
        "POST",
        base + "/admin/keys",
        {"name": "bench"},
        {"authorization": "Bearer " + env["LUNAR_MASTER_KEY"]},
    )
    if status not in (200, 201) or not isinstance(body, dict) or "key" not in body:
        raise RuntimeError(f"POST /admin/keys answered {status}: {body}")
    return {"Authorization": "Bearer " + body["key"]}


def _lunar_available() -> str | None:
    try:
        import uvicorn  # noqa: F401

        import lunar.server  # noqa: F401
    except ImportError as e:
        return f"the gateway cannot be imported ({e}): pip install -e '.[server]'"
    return None


# What a Lunar target reports as its version, asked of the interpreter that runs it.
_VERSION = """
import importlib.metadata as md, sys
import lunar
extras = []
for dist in ("uvicorn", "uvloop", "httptools", "httpx"):
    try:
        extras.append(f"{dist} {md.version(dist)}")
    except Exception:
        extras.append(f"{dist} -")
print(f"lunar {lunar.__version__} on Python {sys.version.split()[0]} ({', '.join(extras)})")
"""


def _run_python(exe: str, code: str) -> tuple[bool, str]:
    """``exe -c code``: (succeeded, its output or why not)."""
    try:
        out = subprocess.run([exe, "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    return out.returncode == 0, (out.stdout if out.returncode == 0 else out.stderr).strip()


def _lunar_version() -> str:
    ok, text = _run_python(sys.executable, _VERSION)
    return text if ok else f"? ({text[-200:]})"


LUNAR = Spec("lunar", _lunar_command, "/health", _lunar_headers, _lunar_available, _lunar_version)


def lunar_on(python: str) -> Spec:
    """The same gateway run by another interpreter: ``python`` is that venv's executable (a
    path, or a name on PATH), with Lunar installed (``pip install -e '.[server]'``). Does the
    interpreter's build matter (pyenv's default links libpython and has no PGO or LTO;
    distributions and Docker's images build it otherwise)? The target is named after the
    venv's folder, or the executable when it is in none: ``lunar@<name>``."""
    found = python if "/" in python else shutil.which(python)
    exe = str(Path(found or python).absolute())
    venv = Path(exe).parent.parent
    label = venv.name if (venv / "pyvenv.cfg").exists() else Path(exe).name

    def command(
        upstream: str, port: int, work: Path
    ) -> tuple[list[str], dict[str, str], dict[str, str]]:
        argv, env, shown = _lunar_command(upstream, port, work)
        return [exe, *argv[1:]], env, shown

    def available() -> str | None:
        ok, why = _run_python(exe, "import uvicorn, uvloop, lunar.server")
        return None if ok else f"{exe} cannot run the gateway: {why[-300:]}"

    def version() -> str:
        ok, text = _run_python(exe, _VERSION)
        return text if ok else f"? ({text[-200:]})"

    return dataclasses.replace(
        LUNAR, name=f"lunar@{label}", command=command, available=available, version=version
    )


# -- LiteLLM --------------------------------------------------------------------------------

_LITELLM_LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"default": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "default"}},
    "loggers": {
        "uvicorn": {"handlers": ["default"], "level": "WARNING"},
        "uvicorn.error": {"level": "WARNING"},
        "uvicorn.access": {"handlers": ["default"], "level": "WARNING", "propagate": False},
    },
}


def _litellm_command(
    upstream: str, port: int, work: Path
) -> tuple[list[str], dict[str, str], dict[str, str]]:
    cfg = litellm_env.write_config(work / f"litellm-{port}.yaml", upstream)
    log_cfg = work / "litellm-logging.json"
    log_cfg.write_text(json.dumps(_LITELLM_LOG_CONFIG))
    key = litellm_env.master_key()
    # Its production settings that apply here: no access log (Lunar has none either), errors
    # only, no .env loading, and the bundled cost map (no fetch: this machine is offline).
    env = {
        "LITELLM_MASTER_KEY": key,
        "LITELLM_LOG": "ERROR",
        "LITELLM_MODE": "PRODUCTION",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }
    shown = {**env, "LITELLM_MASTER_KEY": "sk-…"}
    cmd = [*litellm_env.command(cfg, port), "--log_config", str(log_cfg)]
    return cmd, env, shown


def _litellm_headers(base: str, env: dict[str, str]) -> dict[str, str]:
    return {"Authorization": "Bearer " + env["LITELLM_MASTER_KEY"]}


def _litellm_available() -> str | None:
    if not (litellm_env.VENV / "bin" / "litellm").exists():
        return "not installed: python bench/gateway/litellm_env.py (or --install-litellm)"
    return None


def _litellm_version() -> str:
    return f"litellm {litellm_env.installed_version()} (--num_workers 1)"


LITELLM = Spec(
    "litellm",
    _litellm_command,
    "/health/liveliness",
    _litellm_headers,
    _litellm_available,
    _litellm_version,
    ready_timeout=180.0,
)

# -- The relay: the floor of a Python gateway (bench/gateway/relay.py) ----------------------


def _script_command(
    name: str, upstream_arg: Callable[[str], str]
) -> Callable[[str, int, Path], tuple[list[str], dict[str, str], dict[str, str]]]:
    """The command of a relay script in this folder: ``--port N --upstream X``."""

    def command(
        upstream: str, port: int, work: Path
    ) -> tuple[list[str], dict[str, str], dict[str, str]]:
        script = str(Path(__file__).resolve().parent / name)
        args = ["--port", str(port), "--upstream", upstream_arg(upstream)]
        return [sys.executable, script, *args], {}, {}

    return command


RELAY = Spec(
    "relay",
    _script_command("relay.py", lambda up: up.split("://", 1)[1].split("/", 1)[0]),
    "/health",
    lambda base, env: {},
    lambda: None,
    lambda: "byte relay, no parsing (bench/gateway/relay.py)",
)


ASGI_RELAY = Spec(
    "asgi-relay",
    _script_command("asgi_relay.py", lambda up: up.split("/v1", 1)[0]),
    "/health",
    lambda base, env: {},
    _lunar_available,
    lambda: "uvicorn app copying the upstream's bytes (bench/gateway/asgi_relay.py)",
)


ASGI_SPLICE = Spec(
    "asgi-splice",
    _script_command("asgi_splice.py", lambda up: up.split("/v1", 1)[0]),
    "/health",
    lambda base, env: {},
    _lunar_available,
    lambda: "uvicorn app splicing parsed events past ASGI (bench/gateway/asgi_splice.py)",
)


def _granian_relay_command(
    upstream: str, port: int, work: Path
) -> tuple[list[str], dict[str, str], dict[str, str]]:
    origin = upstream.split("/v1", 1)[0]
    bindir = Path(sys.executable).parent
    env = {"RELAY_UPSTREAM": origin, "PYTHONPATH": str(Path(__file__).resolve().parent)}
    cmd = [
        str(bindir / "granian"),
        *("--interface", "asgi", "--host", "127.0.0.1", "--port", str(port)),
        *("--loop", "uvloop", "--workers", "1", "--runtime-threads", "1", "--backlog", "4096"),
        *("--factory", "asgi_relay:granian_app", "--log-level", "warning"),
    ]
    return cmd, env, env


def _granian_available() -> str | None:
    if not (Path(sys.executable).parent / "granian").exists():
        return "granian is not installed (pip install granian): an optional comparison"
    return _lunar_available()


def _granian_version() -> str:
    import importlib.metadata as md

    return f"granian {md.version('granian')}, the asgi-relay app (bench/gateway/asgi_relay.py)"


# The same app as asgi-relay on granian (Rust HTTP, ASGI): is another server's floor lower?
GRANIAN_RELAY = Spec(
    "granian-relay",
    _granian_relay_command,
    "/health",
    lambda base, env: {},
    _granian_available,
    _granian_version,
)

SPECS = {
    "lunar": LUNAR,
    "litellm": LITELLM,
    "relay": RELAY,
    "asgi-relay": ASGI_RELAY,
    "asgi-splice": ASGI_SPLICE,
    "granian-relay": GRANIAN_RELAY,
}


def direct(emu: Emulator) -> Target:
    return Target("direct", emu.base, {}, None, emu.proc.shown(), f"emulator ({emu.loop})")


def start(spec: Spec, procs: Procs, emu: Emulator, core: int | None = GATEWAY_CORE) -> Target:
    port = free_port()
    cmd, env, shown = spec.command(emu.v1, port, procs.workdir)
    p = procs.start(spec.name, cmd, core=core, env=env, env_shown=shown)
    base = f"http://127.0.0.1:{port}"
    wait_ready(p, base + spec.ready_path, timeout=spec.ready_timeout)
    headers = spec.headers(base, env)
    t = Target(spec.name, base, headers, p, p.shown(), spec.version())
    status, body = http_json(
        "POST", t.url, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, headers
    )
    if status != 200:
        raise RuntimeError(f"{spec.name}: a first request answered {status}: {str(body)[:500]}")
    return t
