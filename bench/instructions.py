"""What one gateway request costs, in CPU instructions: a count that does not move with the
machine's noise, for before/after comparisons of the gateway's own work.

    python bench/instructions.py [--requests 500] [--against REV] [--stream] [--chunks 16]
                                 [--pacing-ms 0]
    python bench/instructions.py --profile [--stream] [--chunks 64] [--requests 1500]
    python bench/instructions.py --opcodes [--stream] [--pacing-ms 2] [--requests 100]

The gateway's ASGI app runs in-process, driven request after request by a minimal ASGI
caller (no HTTP server: uvicorn's share is not counted), with the emulator as its upstream
over real sockets in another process. ``valgrind --tool=cachegrind`` counts the process's
instructions (every thread: the ledger's writer too) for two run lengths; the difference
divided by the difference in requests is the cost of one request, start-up left out. The
same is measured for the asgi-relay app (bench/gateway/asgi_relay.py: the upstream's bytes
copied through Lunar's pool, nothing else), so "Lunar above the relay" is Lunar's own work.
``--against REV`` adds the gateway at a git revision (a temporary worktree) beside the
working tree's.

Wall-clock timings on this VM vary by ±10 % run to run; instruction counts repeat within
~0.5 %. They are not time (a syscall or a cache miss is one instruction), so the lanes in
bench_gateway.py stay the measure of speed; this is the measure of work. Needs valgrind
(apt-get install -y valgrind).

With ``--pacing-ms`` (streams only), the upstream paces its events, so each arrives in a read
of its own as in lane 3 (unpaced, one read carries many): per-read costs, the wait for each
read, then count as they do under lane 3's load. The pacing must exceed what an event costs
under valgrind (~50x slower than native, a millisecond or so), or events merge into reads by
how fast valgrind ran. Work that runs by the clock counts too, in proportion to how long a
request lasts: the ledger's writer ticks every 10 ms while rows are recent, so Lunar's count
at 10 ms pacing is 10 % above its count at 3 ms (2.58M vs 2.34M with 16 deltas; asgi-relay,
which has no ledger, 511k vs 509k). Compare counts taken at the same pacing.

``--profile`` shows where that work goes instead: py-spy (``pip install py-spy``) samples the same
in-process driver, and the functions with the most samples under the app are printed.
``--opcodes`` counts instead the bytecodes each Python function runs per request (a trace
function with opcode events, after the warm-up): exact and repeatable, and blind to C
code, which the instruction count sees.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

MASTER = "lm-instructions-bench-master-key-0123"
WARM_UP = 30


def request_body(stream: bool) -> bytes:
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


def chat_scope(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """The ASGI scope of a POST /v1/chat/completions with ``headers``."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }


async def _drive(app: Any, headers: list[tuple[bytes, bytes]], body: bytes, n: int) -> None:
    """``n`` requests one after another; each must answer 200."""
    scope = chat_scope(headers)
    for _ in range(n):
        status = await _one(app, scope, body)
        if status != 200:
            raise RuntimeError(f"a request answered {status}")


async def _one(
    app: Any, scope: dict[str, Any], body: bytes, leave_after: int | None = None
) -> int | None:
    """One request; its status. The client stays connected until the app is done (or
    leaves after ``leave_after`` body writes)."""
    delivered = False
    status: int | None = None
    writes = 0
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    def wrote() -> None:
        nonlocal writes
        writes += 1
        if writes == leave_after:
            gone.set()

    cycle = _Cycle(wrote)

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            cycle.response_started = True
        elif message["type"] == "http.response.body":
            wrote()

    # What lunar serve's uvicorn protocol gives the app (lunar.server.relay): the gateway
    # relays plain stream events to its transport, past send (older revisions ignore it).
    scope["extensions"] = {"lunar.uvicorn_cycle": weakref.ref(cycle)}
    await app(scope, receive, send)
    return status


class _Transport:
    def __init__(self, wrote: Callable[[], None]) -> None:
        self.wrote = wrote

    def write(self, data: bytes) -> None:
        self.wrote()

    def is_closing(self) -> bool:
        return False


class _Flow:
    write_paused = False


class _Cycle:
    """The parts of uvicorn's httptools ``RequestResponseCycle`` the relay reads."""

    def __init__(self, wrote: Callable[[], None]) -> None:
        self.transport = _Transport(wrote)
        self.flow = _Flow()
        self.disconnected = False
        self.response_complete = False
        self.response_started = False
        self.chunked_encoding = True


async def _lifespan(app: Any) -> asyncio.Task[None]:
    """Start ``app``'s lifespan; the task running it (keep it, or it may be collected)."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await queue.put({"type": "lifespan.startup"})
    started = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "lifespan.startup.complete":
            started.set()

    task = asyncio.get_running_loop().create_task(app({"type": "lifespan"}, queue.get, send))
    await started.wait()
    return task


@contextlib.contextmanager
def _counting_opcodes() -> Iterator[collections.Counter[str]]:
    """Bytecodes run per function (``file:line:name``) while the block runs."""
    counts: collections.Counter[str] = collections.Counter()

    def on_call(frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        code = frame.f_code
        where = code.co_filename.split("/src/")[-1].split("site-packages/")[-1]
        key = f"{where}:{code.co_firstlineno}:{code.co_qualname}"

        def on_opcode(frame: Any, event: str, arg: Any) -> Any:
            if event == "opcode":
                counts[key] += 1
            return on_opcode

        return on_opcode

    sys.settrace(on_call)
    try:
        yield counts
    finally:
        sys.settrace(None)


def _print_opcodes(counts: collections.Counter[str], n: int, top: int = 30) -> None:
    print(f"bytecodes per request: {sum(counts.values()) / n:,.0f}; by function:")
    for key, count in counts.most_common(top):
        print(f"{count / n:9,.1f}  {key}")


async def _run_driver(
    which: str, upstream: str, n: int, stream: bool, work: Path, opcodes: bool = False
) -> None:
    body = request_body(stream)
    json_header = (b"content-type", b"application/json")
    if which == "relay":
        from gateway.asgi_relay import app_for

        app = app_for(upstream.removesuffix("/v1"))
        lifespan = await _lifespan(app)
        headers = [json_header]
    else:
        from lunar.server import app as gateway
        from lunar.server import cli
        from lunar.server.app import create_app
        from lunar.server.config import load_config

        # The disconnect watch starts 50 ms into a request. These requests take well under
        # that natively but not always under valgrind's slowdown: keep it off so the count
        # does not depend on how fast valgrind ran (older revisions ignore the setting).
        gateway._Watch.WATCH_AFTER_S = 3600.0

        env = {"LUNAR_MASTER_KEY": MASTER, "OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": upstream}
        app = create_app(load_config(environ=env, db=str(work / "ledger.db")))
        # as `lunar serve` does (older revisions: freeze_heap, or nothing)
        getattr(cli, "tune_gc", getattr(cli, "freeze_heap", lambda: None))()
        await app.startup()
        headers = [json_header, (b"authorization", b"Bearer " + MASTER.encode())]
    if opcodes:
        await _drive(app, headers, body, WARM_UP)
        with _counting_opcodes() as counts:
            await _drive(app, headers, body, n)
        _print_opcodes(counts, n)
    else:
        await _drive(app, headers, body, WARM_UP + n)
    if which == "relay":
        lifespan.cancel()
    else:
        await app.shutdown()


def driver_main(args: argparse.Namespace) -> None:
    try:
        import uvloop

        run: Any = uvloop.run
    except ImportError:
        run = asyncio.run
    with tempfile.TemporaryDirectory() as work:
        run(
            _run_driver(
                args.drive, args.upstream, args.requests, args.stream, Path(work), args.opcodes
            )
        )


# ---------------------------------------------------------------------------------------------
# The outer run: valgrind around the driver


_IREFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def instructions(src: Path | None, which: str, upstream: str, n: int, stream: bool) -> int:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    cmd = [
        "valgrind",
        "--tool=cachegrind",
        "--cache-sim=no",
        "--cachegrind-out-file=/dev/null",
        sys.executable,
        str(Path(__file__).resolve()),
        "--drive",
        which,
        "--upstream",
        upstream,
        "--requests",
        str(n),
        *(["--stream"] if stream else []),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    m = _IREFS.search(out.stderr)
    if out.returncode != 0 or m is None:
        raise RuntimeError(
            f"{which}: valgrind run failed ({out.returncode}):\n{out.stderr[-3000:]}"
        )
    return int(m.group(1).replace(",", ""))


def per_request(src: Path | None, which: str, upstream: str, n: int, stream: bool) -> int:
    short = instructions(src, which, upstream, n // 5, stream)
    long = instructions(src, which, upstream, n, stream)
    return round((long - short) / (n - n // 5))


@contextlib.contextmanager
def worktree(rev: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="lunar-rev-"))
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(path), rev],
        check=True,
        capture_output=True,
    )
    try:
        yield path / "src"
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
            capture_output=True,
        )


def profile(args: argparse.Namespace) -> None:
    from gateway import procs
    from profile_gateway import top

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        sys.exit("needs py-spy: pip install py-spy")
    with procs.Procs(Path(tempfile.mkdtemp(prefix="lunar-instr-"))) as ps:
        emu = procs.start_emulator(ps, chunks=args.chunks, pacing_ms=args.pacing_ms)
        raw = ps.workdir / "samples.txt"
        drive = [sys.executable, str(Path(__file__).resolve()), "--drive", "lunar"]
        drive += ["--upstream", emu.v1, "--requests", str(args.requests)]
        drive += ["--stream"] if args.stream else []
        record = [spy, "record", "-r", "1000", "-f", "raw", "-o", str(raw), "--", *drive]
        subprocess.run(record, check=True, capture_output=True)
        print(top(raw, 30, within="_one ("))


def opcodes(args: argparse.Namespace) -> None:
    from gateway import procs

    with procs.Procs(Path(tempfile.mkdtemp(prefix="lunar-instr-"))) as ps:
        emu = procs.start_emulator(ps, chunks=args.chunks, pacing_ms=args.pacing_ms)
        drive = [sys.executable, str(Path(__file__).resolve()), "--drive", "lunar", "--opcodes"]
        drive += ["--upstream", emu.v1, "--requests", str(args.requests)]
        drive += ["--stream"] if args.stream else []
        subprocess.run(drive, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--stream", action="store_true", help="streamed requests (16 deltas each)")
    ap.add_argument("--against", metavar="REV", help="also measure the gateway at this revision")
    ap.add_argument("--chunks", type=int, default=16, help="content deltas per reply (default 16)")
    ap.add_argument(
        "--pacing-ms", type=float, default=0.0, help="the upstream's pause between events"
    )
    ap.add_argument("--profile", action="store_true", help="instead: where the work goes (py-spy)")
    ap.add_argument("--opcodes", action="store_true", help="instead: bytecodes per function")
    ap.add_argument("--drive", choices=["lunar", "relay"], help=argparse.SUPPRESS)
    ap.add_argument("--upstream", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.drive:
        driver_main(args)
        return
    if args.pacing_ms and not args.stream:
        ap.error("--pacing-ms paces stream events: use it with --stream")
    if args.requests < 50:
        ap.error("--requests must be at least 50 (the short run is a fifth of it)")
    if args.profile:
        profile(args)
        return
    if args.opcodes:
        opcodes(args)
        return
    if shutil.which("valgrind") is None:
        sys.exit("needs valgrind: apt-get install -y valgrind")

    from gateway import procs

    rows: list[tuple[str, int]] = []
    with procs.Procs(Path(tempfile.mkdtemp(prefix="lunar-instr-"))) as ps:
        emu = procs.start_emulator(ps, chunks=args.chunks, pacing_ms=args.pacing_ms)
        relay = per_request(None, "relay", emu.v1, args.requests, args.stream)
        rows.append(("asgi-relay (the upstream's bytes through Lunar's pool)", relay))
        if args.against:
            with worktree(args.against) as src:
                rows.append(
                    (
                        f"Lunar at {args.against}",
                        per_request(src, "lunar", emu.v1, args.requests, args.stream),
                    )
                )
        rows.append(
            (
                "Lunar (working tree)",
                per_request(ROOT / "src", "lunar", emu.v1, args.requests, args.stream),
            )
        )
    kind = f"streamed ({args.chunks} deltas)" if args.stream else "non-streamed"
    print(f"Instructions per {kind} request, ASGI app in-process (no HTTP server), every thread:")
    print(
        f"    python bench/instructions.py --requests {args.requests}"
        + (" --stream" if args.stream else "")
        + (f" --chunks {args.chunks}" if args.chunks != 16 else "")
        + (f" --pacing-ms {args.pacing_ms:g}" if args.pacing_ms else "")
        + (f" --against {args.against}" if args.against else "")
    )
    print()
    print("| app | instructions / request | above the relay |")
    print("| --- | ---: | ---: |")
    for name, n in rows:
        above = "" if n == relay else f"{n - relay:,}"
        print(f"| {name} | {n:,} | {above} |")


if __name__ == "__main__":
    main()
