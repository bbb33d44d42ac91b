"""Where a stream's added TTFT goes: timestamps at its steps inside the gateway.

    python bench/ttft_steps.py [--streams 12] [--hot 400] [--fine]

Lane 3's added TTFT is the gateway's work on a stream's critical path: forwarding the request
(the upstream starts its 20 ms pacing when the request arrives) and relaying the first
content event. Here Lunar's gateway app and the asgi-relay app (bench/gateway/asgi_relay.py)
run under uvicorn as ``lunar serve`` does, pinned as in lane 3, with timestamps taken inside
the process at: the app entered; the upstream request handed to the socket (Lunar's pool);
the first content event received from the upstream; the response head sent; the first
content's bytes handed to uvicorn. One stream at a time, the two alternating, from the
replay upstream (64 deltas, 20 ms pacing); printed: the median of each step in µs.

Then the same first step measured hot: the app driven in-process (no HTTP server), requests
back to back to the emulator. The difference is what a process idle between events pays to
run the same code (caches and a halted vCPU to wake on this VM).

``--fine`` also splits Lunar's first step at its parts (authentication, the body, validation,
access, limits, routing, the upstream request), each timed at a function's entry or return:
is one part slow when cold, or is all of it?
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

STEPS = (
    ("setup", "app", "upstream_write", "app entered → upstream request written"),
    ("head", "upstream_content", "head", "first content received → response head sent"),
    ("first", "upstream_content", "first_body", "first content received → its bytes sent"),
)


def _stamp_pool(marks: dict[str, float]) -> None:
    """Timestamps at the upstream side, in Lunar's pool (which both apps use)."""
    from lunar import _http

    send, received = _http._Connection.send, _http._Connection.data_received

    def timed_send(self: Any, data: bytes) -> None:
        marks.setdefault("upstream_write", time.perf_counter())
        send(self, data)

    def timed_received(self: Any, data: bytes) -> None:
        if b'"content":"' in data and b'"content":""' not in data:
            marks.setdefault("upstream_content", time.perf_counter())
        received(self, data)

    _http._Connection.send = timed_send  # type: ignore[method-assign]
    _http._Connection.data_received = timed_received  # type: ignore[method-assign]


# Lunar's first step in parts: (mark, what runs from it to the next mark), in order.
FINE = (
    ("app", "the app dispatches the request"),
    ("auth", "authentication"),
    ("auth_done", "the request's bookkeeping (ledger row, trace)"),
    ("read_body", "the body read"),
    ("parse_json", "JSON parsed and the request validated"),
    ("check_access", "model resolved, access checked"),
    ("admit", "limits; the disconnect watch"),
    ("plan_for", "routing (the candidates, ranked by health)"),
    ("plan_done", "JSON mode, the upstream request built"),
    ("pool_send", "the pool: a connection, the request's bytes written"),
    ("upstream_write", ""),
)


def _stamp_setup(marks: dict[str, float]) -> None:
    """Timestamps inside Lunar's first step, at the entry (or return) of its functions."""
    import functools
    import inspect

    from lunar import _engine, _http
    from lunar.server import app, limits

    def stamp(owner: Any, attr: str, entry: str | None, done: str | None = None) -> None:
        f = getattr(owner, attr)
        if inspect.iscoroutinefunction(f):

            @functools.wraps(f)
            async def timed(*a: Any, **k: Any) -> Any:
                if entry:
                    marks.setdefault(entry, time.perf_counter())
                out = await f(*a, **k)
                if done:
                    marks.setdefault(done, time.perf_counter())
                return out

        else:

            @functools.wraps(f)
            def timed(*a: Any, **k: Any) -> Any:
                if entry:
                    marks.setdefault(entry, time.perf_counter())
                out = f(*a, **k)
                if done:
                    marks.setdefault(done, time.perf_counter())
                return out

        static = isinstance(getattr(owner, "__dict__", {}).get(attr), staticmethod)
        setattr(owner, attr, staticmethod(timed) if static else timed)

    stamp(app.Gateway, "_authenticate", "auth", "auth_done")
    stamp(app.Gateway, "_read_body", "read_body")
    stamp(app.Gateway, "_parse_json", "parse_json")
    stamp(app.Gateway, "_check_access", "check_access")
    stamp(limits.InMemoryLimiter, "admit", "admit")
    stamp(_engine, "plan_for", "plan_for", "plan_done")
    stamp(_http.AsyncPool, "send", "pool_send")


def serve(which: str, port: int, upstream: str, out: str, fine: bool = False) -> None:
    """A child: one app under uvicorn, its marks written to ``out`` when it stops."""
    import uvicorn

    marks: dict[str, float] = {}
    _stamp_pool(marks)
    if fine and which == "lunar":
        _stamp_setup(marks)
    if which == "lunar":
        from lunar.server.app import create_app
        from lunar.server.config import load_config

        app: Any = create_app(load_config(db=str(Path(out).with_suffix(".db"))))
    else:
        from gateway.asgi_relay import app_for

        app = app_for(upstream)

    async def timed(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/chat/completions"):
            return await app(scope, receive, send)
        marks.clear()
        marks["app"] = time.perf_counter()

        async def timed_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                marks["head"] = time.perf_counter()
            await send(message)
            if message["type"] == "http.response.body" and "upstream_content" in marks:
                marks.setdefault("first_body", time.perf_counter())

        await app(scope, receive, timed_send)
        # One line a request, written at once: uvicorn ends on SIGTERM by re-raising it,
        # so nothing runs at exit.
        with open(out, "a") as f:
            f.write(json.dumps(marks) + "\n")

    uvicorn.run(timed, port=port, loop="uvloop", http="httptools", log_level="warning")


def _stream(base: str, headers: dict[str, str]) -> None:
    import http.client

    host, port = base.split("://", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps({**body, "stream": True}),
        {"content-type": "application/json", **headers},
    )
    r = conn.getresponse()
    r.read()
    conn.close()
    if r.status != 200:
        raise RuntimeError(f"{base} answered {r.status}")


def cold(streams: int, fine: bool = False) -> dict[str, dict[str, float]]:
    from gateway import procs, targets

    procs.pin_self(procs.LOAD_CORE)
    with tempfile.TemporaryDirectory() as tmp, procs.Procs(Path(tmp)) as ps:
        up = procs.start_replay(ps, chunks=64, pacing_ms=20)
        env = {"LUNAR_MASTER_KEY": "lm-" + "x" * 32, "OPENAI_API_KEY": "sk-x"}
        env["OPENAI_BASE_URL"] = up.v1
        gateways: dict[str, tuple[str, Any, str, dict[str, str]]] = {}
        for which in ("asgi-relay", "lunar"):
            port = procs.free_port()
            out = f"{tmp}/{which}.json"
            cmd = [sys.executable, __file__, "--serve", which, str(port), up.base, out]
            cmd += ["--fine"] if fine else []
            p = ps.start(which, cmd, core=procs.GATEWAY_CORE, env=env)
            base = f"http://127.0.0.1:{port}"
            procs.wait_ready(p, base + "/health", timeout=60)
            headers = targets._lunar_headers(base, env) if which == "lunar" else {}
            gateways[which] = (out, p, base, headers)
            _stream(base, headers)  # warm-up
        for _ in range(streams):
            for _out, _p, base, headers in gateways.values():
                _stream(base, headers)
        result: dict[str, dict[str, float]] = {}
        for which, (out, p, _base, _headers) in gateways.items():
            ps.stop(p)
            lines = Path(out).read_text().splitlines()[1:]  # the warm-up left out
            runs = [json.loads(line) for line in lines]
            parts = [(a, a, b, "") for (a, _), (b, _) in itertools.pairwise(FINE)]
            result[which] = {
                name: statistics.median((r[b] - r[a]) * 1e6 for r in runs if a in r and b in r)
                for name, a, b, _ in [*STEPS, *parts]
                if any(a in r and b in r for r in runs)
            }
            result[which]["streams"] = len(runs)
    return result


async def _hot_setup(upstream: str, n: int) -> dict[str, float]:
    import instructions
    from lunar.server import app as gateway
    from lunar.server.app import create_app
    from lunar.server.config import load_config

    marks: dict[str, float] = {}
    _stamp_pool(marks)
    gateway._Watch.WATCH_AFTER_S = 3600.0  # as instructions.py: requests here are short
    env = {"LUNAR_MASTER_KEY": instructions.MASTER, "OPENAI_API_KEY": "sk-x"}
    env["OPENAI_BASE_URL"] = upstream
    work = tempfile.mkdtemp()
    lunar = create_app(load_config(environ=env, db=f"{work}/ledger.db"))
    await lunar.startup()
    from gateway.asgi_relay import app_for

    relay = app_for(upstream.removesuffix("/v1"))
    lifespan = await instructions._lifespan(relay)
    auth = (b"authorization", b"Bearer " + instructions.MASTER.encode())
    scope = instructions.chat_scope([(b"content-type", b"application/json"), auth])
    body = instructions.request_body(True)
    out: dict[str, list[float]] = {"asgi-relay": [], "lunar": []}
    for _ in range(2):
        for which, app in (("asgi-relay", relay), ("lunar", lunar)):
            for i in range(n):
                marks.clear()
                t0 = time.perf_counter()
                await instructions._one(app, scope, body)
                if i >= n // 8:
                    out[which].append((marks["upstream_write"] - t0) * 1e6)
    lifespan.cancel()
    await lunar.shutdown()
    return {which: statistics.median(xs) for which, xs in out.items()}


def hot(n: int) -> dict[str, float]:
    from gateway import procs

    procs.pin_self(procs.GATEWAY_CORE)
    with tempfile.TemporaryDirectory() as tmp, procs.Procs(Path(tmp)) as ps:
        emu = procs.start_emulator(ps, chunks=16)
        import uvloop

        return uvloop.run(_hot_setup(emu.v1, n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=12, help="streams per gateway")
    ap.add_argument("--hot", type=int, default=400, help="in-process requests per app")
    ap.add_argument("--fine", action="store_true", help="also Lunar's first step in parts")
    ap.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        which, port, upstream, out = args.serve
        serve(which, int(port), upstream, out, args.fine)
        return
    c = cold(args.streams, args.fine)
    h = hot(args.hot)
    fine = " --fine" if args.fine else ""
    print(f"    python bench/ttft_steps.py --streams {args.streams} --hot {args.hot}{fine}\n")
    print("| step (median µs) | asgi-relay | Lunar |")
    print("| --- | ---: | ---: |")
    for name, _, _, label in STEPS:
        cells = [
            "–" if name not in c[w] else f"{c[w][name]:.0f}" if c[w][name] >= 0 else "before"
            for w in ("asgi-relay", "lunar")
        ]
        print(f"| {label}, one stream at a time | {' | '.join(cells)} |")
    print(
        f"| app entered → upstream request written, hot (in-process, back to back) "
        f"| {h['asgi-relay']:.0f} | {h['lunar']:.0f} |"
    )
    print(
        f'\n{c["lunar"]["streams"]:.0f} streams per gateway, alternating. "before": the '
        "relay sends the response head when the upstream's head arrives, 20 ms before; Lunar "
        "holds it until the first content, so that a failure before it can still fall back."
    )
    if args.fine:
        print("\n| Lunar's first step, in parts (median µs, one stream at a time) | |")
        print("| --- | ---: |")
        for mark, what in FINE[:-1]:
            if mark in c["lunar"]:
                print(f"| {what} | {c['lunar'][mark]:.0f} |")
        print(
            "\n(The parts' medians need not add up to the step's median. The marks are "
            "wrappers, and they cost a little themselves.)"
        )


if __name__ == "__main__":
    main()
