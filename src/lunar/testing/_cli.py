"""Command line of the emulator: ``python -m lunar.testing --port N [--host H] [--chunks N]
[--pacing-ms X] [--delay-ms X] [--api-key KEY]``; ``main(argv, prog)`` is reusable by other CLIs.
"""

from __future__ import annotations

import argparse
import math
import sys

from ._reply import Reply
from ._server import serve


def build_parser(
    prog: str = "python -m lunar.testing", default_port: int = 4010
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve the Lunar emulator (OpenAI, Anthropic and Gemini wires) in the "
        "foreground.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    parser.add_argument(
        "--port",
        type=int,
        default=default_port,
        help=f"port (0: a free one; default {default_port})",
    )
    parser.add_argument(
        "--chunks", type=int, default=8, help="content pieces per reply (default 8)"
    )
    parser.add_argument(
        "--pacing-ms", type=float, default=0.0, help="milliseconds between streamed events"
    )
    parser.add_argument(
        "--delay-ms", type=float, default=0.0, help="milliseconds before the response headers"
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help="require KEY (OpenAI: 'Authorization: Bearer KEY'; Anthropic: 'x-api-key'; "
        "Gemini: 'x-goog-api-key' or '?key=')",
    )
    return parser


def main(
    argv: list[str] | None = None, prog: str = "python -m lunar.testing", default_port: int = 4010
) -> int:
    args = build_parser(prog, default_port).parse_args(argv)
    problem = _refused(args)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    default = Reply(
        chunks=args.chunks, pacing=args.pacing_ms / 1000.0, delay=args.delay_ms / 1000.0
    )
    try:
        serve(args.host, args.port, default, require_api_key=args.api_key)
    except OSError as e:  # the port taken, an unknown interface (gaierror)
        where = f"{args.host}:{args.port}"
        print(f"Error: cannot listen on {where}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


def _refused(args: argparse.Namespace) -> str | None:
    """What is wrong with the options, before anything listens."""
    if args.chunks < 0:
        return "--chunks must be >= 0"
    if not 0 <= args.port <= 65535:
        return f"--port must be between 0 and 65535, got {args.port}"
    for name, value in (("--pacing-ms", args.pacing_ms), ("--delay-ms", args.delay_ms)):
        if not (math.isfinite(value) and value >= 0):
            return f"{name} must be a number of milliseconds >= 0, got {value:g}"
    return None
