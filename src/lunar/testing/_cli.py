"""Command line of the emulator: ``python -m lunar.testing --port N [--host H] [--chunks N]
[--pacing-ms X] [--delay-ms X] [--api-key KEY]``; ``main(argv, prog)`` is reusable by other CLIs.
"""

from __future__ import annotations

import argparse
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
    if args.chunks < 0:
        print("--chunks must be >= 0", file=sys.stderr)
        return 2
    default = Reply(
        chunks=args.chunks, pacing=args.pacing_ms / 1000.0, delay=args.delay_ms / 1000.0
    )
    serve(args.host, args.port, default, require_api_key=args.api_key)
    return 0
