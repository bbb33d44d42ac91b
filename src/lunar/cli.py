"""The ``lunar`` command: ``chat``, ``models``, ``mock``. Presentation only; the SDK decides."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

# Which model `lunar chat` picks when none is given: the first provider with a key wins,
# and with no key at all the embedded local model answers.
_DEFAULTS_BY_KEY = (
    ("OPENAI_API_KEY", "gpt-4o-mini"),
    ("ANTHROPIC_API_KEY", "claude-3-5-haiku"),
    ("GEMINI_API_KEY", "gemini-2.0-flash"),
    ("GOOGLE_API_KEY", "gemini-2.0-flash"),
    ("GROQ_API_KEY", "llama-3.1-8b"),
)
LOCAL_MODEL = "smollm2"


def default_model(environ: Any = os.environ) -> tuple[str, str | None]:
    """The model to use and, when it was chosen for the user, a note saying why."""
    chosen = environ.get("LUNAR_DEFAULT_MODEL")
    if chosen:
        return chosen, None
    if environ.get("LUNAR_BASE_URL"):
        return "gpt-4o-mini", None
    for env, model in _DEFAULTS_BY_KEY:
        if environ.get(env):
            return model, None
    return LOCAL_MODEL, (
        f"No provider key found: using the local model '{LOCAL_MODEL}' "
        "(set OPENAI_API_KEY or another provider key, or pass --model)."
    )


class _Out:
    """rich when installed (``lunar[cli]``), plain text otherwise."""

    def __init__(self) -> None:
        self.mid_line = False  # stdout's last text did not end its line
        try:
            from rich.console import Console

            self.console: Any = Console(highlight=False)
            self.err: Any = Console(stderr=True, highlight=False)
        except ImportError:
            self.console = self.err = None

    def text(self, s: str) -> None:
        if s:
            self.mid_line = not s.endswith("\n")
        sys.stdout.write(s)
        sys.stdout.flush()

    def end_line(self) -> None:
        """End a streamed answer cut short; write nothing when none was written, so that
        `lunar chat ... > answer.txt` holds no empty line for an error."""
        if self.mid_line:
            self.text("\n")

    def dim(self, s: str) -> None:
        if self.err is not None:
            self.err.print(s, style="dim", markup=False, soft_wrap=True)
        else:
            print(s, file=sys.stderr)

    def error(self, s: str) -> None:
        if self.err is not None:
            self.err.print(s, style="bold red", markup=False, soft_wrap=True)
        else:
            print(s, file=sys.stderr)


def _summary(model: str, provider: str | None, usage: Any) -> str:
    parts = [f"{model} via {provider or '?'}"]
    if usage is not None:
        parts.append(f"{usage.prompt_tokens} in / {usage.completion_tokens} out tokens")
        if usage.total_cost_usd is not None:
            parts.append(f"${usage.total_cost_usd:.6f}")
        if usage.ttft_ms is not None:
            parts.append(f"TTFT {usage.ttft_ms:.0f} ms")
        if usage.latency_ms is not None:
            parts.append(f"{usage.latency_ms / 1000:.2f} s")
    return " · ".join(parts)


def _client(out: _Out) -> Any:
    """``Lunar()``, or None once the reason it cannot be built is printed: no key for the
    gateway of ``LUNAR_BASE_URL``, or a ``LUNAR_CATALOG`` that cannot be read."""
    from . import Lunar, LunarError

    try:
        return Lunar()
    except (LunarError, ValueError) as err:
        out.error(f"Error: {err}")
        return None


def cmd_chat(args: argparse.Namespace) -> int:
    from . import LunarError

    out = _Out()
    client = _client(out)
    if client is None:
        return 1
    model, note = (args.model, None) if args.model else default_model()
    if note:
        out.dim(note)
    messages: list[dict[str, Any]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": args.prompt})
    params: dict[str, Any] = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    try:
        with client:
            if args.no_stream:
                done = client.chat.completions.create(
                    model=model, messages=messages, fallbacks=args.fallback or None, **params
                )
                out.text((done.choices[0].message.content or "") + "\n")
                out.dim(_summary(done.model, done.provider, done.usage))
                return 0
            stream = client.chat.completions.create(
                model=model,
                messages=messages,
                stream=True,
                fallbacks=args.fallback or None,
                **params,
            )
            last = None
            with stream:
                for chunk in stream:
                    last = chunk
                    if chunk.choices and chunk.choices[0].delta.content:
                        out.text(chunk.choices[0].delta.content)
            out.text("\n")
            if last is not None:
                out.dim(_summary(last.model, last.provider, last.usage))
            return 0
    except LunarError as err:
        out.end_line()
        out.error(f"Error: {err}")
        for attempt in err.attempts:
            out.dim(f"  tried {attempt.model} via {attempt.provider}: {attempt.error}")
        return 1
    except KeyboardInterrupt:
        out.end_line()
        return 130


def cmd_models(args: argparse.Namespace) -> int:
    from . import LunarError

    out = _Out()
    client = _client(out)
    if client is None:
        return 1
    try:
        with client:  # remote mode (LUNAR_BASE_URL) asks the gateway
            models = list(client.models.list())
    except LunarError as err:
        out.error(f"Error: {err}")
        return 1
    if args.json:  # what the table shows, whole: /v1/models' shape
        data = [m.to_dict() for m in models]
        print(json.dumps({"object": "list", "data": data}, indent=2))
        return 0
    rows = [
        (
            m.id,
            ", ".join(m.providers),
            "-" if m.input_price_per_1m is None else f"{m.input_price_per_1m:g}",
            "-" if m.output_price_per_1m is None else f"{m.output_price_per_1m:g}",
            "-" if m.context_window is None else f"{m.context_window:,}",
            ", ".join(m.capabilities),
        )
        for m in models
    ]
    headers = ("model", "providers", "$/1M in", "$/1M out", "context", "capabilities")
    if out.console is not None and sys.stdout.isatty():
        from rich.table import Table

        table = Table(*headers)
        for row in rows:
            table.add_row(*row)
        out.console.print(table)
    else:
        # Plain columns when piped: one line per model, easy to grep.
        widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
        for row in [headers, *rows]:
            print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
    return 0


def cmd_mock(args: argparse.Namespace) -> int:
    from .testing._cli import main as emulator  # one command line for both ways in

    return emulator(args.options, prog="lunar mock", default_port=9000)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="lunar", description="Lunar: one LLM inference layer.")
    p.add_argument("--version", action="version", version=f"lunar {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="ask a model; the answer streams to the terminal")
    chat.add_argument("prompt")
    chat.add_argument(
        "--model",
        "-m",
        help="model (default: LUNAR_DEFAULT_MODEL, a model of "
        "the first provider with a key, or the local model)",
    )
    chat.add_argument(
        "--fallback",
        action="append",
        metavar="MODEL",
        help="a fallback model; repeat for more, tried in order",
    )
    chat.add_argument("--system", help="a system prompt")
    chat.add_argument("--max-tokens", type=int, default=None)
    chat.add_argument("--temperature", type=float, default=None)
    chat.add_argument("--no-stream", action="store_true", help="wait for the whole answer")
    chat.set_defaults(func=cmd_chat)

    models = sub.add_parser("models", help="list the catalogue with prices")
    models.add_argument("--json", action="store_true", help="print JSON (/v1/models' shape)")
    models.set_defaults(func=cmd_models)

    # The emulator's own parser reads the options (`lunar mock -h` shows them), so the two
    # ways to start it (this and `python -m lunar.testing`) take the same ones.
    mock = sub.add_parser(
        "mock",
        help="run the provider emulator (OpenAI, Anthropic, Gemini wires) for tests",
        add_help=False,
    )
    mock.set_defaults(func=cmd_mock, options=[])

    from .server.cli import add_server_commands  # serve, keys, usage

    add_server_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["mock"]:  # everything after it is the emulator's to read
        return cmd_mock(argparse.Namespace(options=argv[1:]))
    from .server.cli import dispatch  # Ctrl-C and `lunar models | head`, as for `serve`

    return dispatch(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
