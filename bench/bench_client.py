"""SDK client cost: CPU per streamed chunk and import time, Lunar vs the official openai SDK.

Both clients consume the same long stream from the emulator (its own process, pinned to the
other core when ``taskset`` exists), alternating A and B in one run; the figure is the
client process's CPU time per chunk (what the SDK itself costs), with wall time beside it.
Import time is whole-process time of ``python -c "import X"`` minus nothing, alternating.

    python bench/bench_client.py [--chunks 4000] [--requests 300] [--runs 7] [--json out.json]

Four comparisons, each alternating the clients: a long stream (CPU per chunk) and many small
requests (CPU per request), with the sync clients and with the async ones (AsyncLunar on
Lunar's own HTTP pool, AsyncOpenAI on httpx).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

MESSAGES = [{"role": "user", "content": "Write a long story."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cmd: list[str], core: int) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", str(core), *cmd]
    return cmd


def start_emulator(chunks: int) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    proc = subprocess.Popen(
        pinned(
            [sys.executable, "-m", "lunar.testing", "--port", str(port), "--chunks", str(chunks)], 1
        ),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # "lunar mock listening on ..."
    return proc, f"http://127.0.0.1:{port}/v1"


def consume_openai(client: Any) -> int:
    n = 0
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            n += 1
    return n


def consume_lunar(client: Any) -> int:
    n = 0
    for chunk in client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            n += 1
    return n


async def aconsume_openai(client: Any) -> int:
    n = 0
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            n += 1
    return n


async def aconsume_lunar(client: Any) -> int:
    n = 0
    async for chunk in await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            n += 1
    return n


def requests(n: int) -> Callable[[Any], int]:
    """``n`` non-streamed requests one after another (the per-request cost)."""

    def run(client: Any) -> int:
        for _ in range(n):
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        return n

    return run


def arequests(n: int) -> Callable[[Any], Awaitable[int]]:
    async def run(client: Any) -> int:
        for _ in range(n):
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        return n

    return run


def measure(fn: Any, client: Any) -> tuple[float, float, int]:
    c0, w0 = time.process_time(), time.perf_counter()
    n = fn(client)
    return time.process_time() - c0, time.perf_counter() - w0, n


def compare(
    openai_side: tuple[Callable[[Any], int], Any],
    lunar_side: tuple[Callable[[Any], int], Any],
    per: int,
    runs: int,
) -> dict[str, list[float]]:
    """CPU and wall µs per unit for both clients, alternating; ratio Lunar / openai."""
    for _ in range(2):  # warm up both (connections, imports, caches)
        measure(*openai_side)
        measure(*lunar_side)
    rows: dict[str, list[float]] = {
        "openai_cpu": [],
        "lunar_cpu": [],
        "openai_wall": [],
        "lunar_wall": [],
        "ratio_cpu": [],
    }
    for _ in range(runs):
        oc, ow, on = measure(*openai_side)
        lc, lw, ln = measure(*lunar_side)
        assert on == ln == per, (on, ln)
        rows["openai_cpu"].append(oc / per * 1e6)
        rows["lunar_cpu"].append(lc / per * 1e6)
        rows["openai_wall"].append(ow / per * 1e6)
        rows["lunar_wall"].append(lw / per * 1e6)
        rows["ratio_cpu"].append(lc / oc)
    return rows


def stream_lane(chunks: int, runs: int, n_requests: int) -> dict[str, Any]:
    """Four comparisons: a long stream and many small requests, sync and async."""
    import openai

    import lunar

    proc, base_url = start_emulator(chunks)
    loop = asyncio.new_event_loop()

    def on_loop(fn: Callable[[Any], Awaitable[int]]) -> Callable[[Any], int]:
        return lambda client: loop.run_until_complete(fn(client))

    try:
        oai = openai.OpenAI(base_url=base_url, api_key="sk-bench", max_retries=0)
        providers = {"openai": {"base_url": base_url, "api_key": "sk-bench"}}
        lun = lunar.Lunar(providers=providers, max_retries=0)
        aoai = openai.AsyncOpenAI(base_url=base_url, api_key="sk-bench", max_retries=0)
        alun = lunar.AsyncLunar(providers=providers, max_retries=0)
        lanes = {
            "sync_stream": compare((consume_openai, oai), (consume_lunar, lun), chunks, runs),
            "async_stream": compare(
                (on_loop(aconsume_openai), aoai), (on_loop(aconsume_lunar), alun), chunks, runs
            ),
            "sync_requests": compare(
                (requests(n_requests), oai), (requests(n_requests), lun), n_requests, runs
            ),
            "async_requests": compare(
                (on_loop(arequests(n_requests)), aoai),
                (on_loop(arequests(n_requests)), alun),
                n_requests,
                runs,
            ),
        }
        loop.run_until_complete(aoai.close())
        loop.run_until_complete(alun.close())
        return {
            "chunks": chunks,
            "requests": n_requests,
            "runs": runs,
            "openai_version": openai.__version__,
            "async_http": type(alun._http).__module__ + "." + type(alun._http).__name__,
            **lanes,
        }
    finally:
        loop.close()
        proc.terminate()
        proc.wait()


def import_time(statement: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True)
    return time.perf_counter() - t


def import_lane(runs: int) -> dict[str, Any]:
    for m in ("import lunar", "import openai") * 2:  # warm the OS file cache
        import_time(m)
    rows: dict[str, list[float]] = {
        "python": [],
        "lunar": [],
        "lunar_client": [],
        "openai": [],
        "ratio": [],
        "ratio_client": [],
    }
    for _ in range(runs):
        base = import_time("import sys")
        lt = import_time("import lunar")
        lc = import_time("from lunar import Lunar")
        ot = import_time("from openai import OpenAI")
        rows["python"].append(base * 1000)
        rows["lunar"].append(lt * 1000)
        rows["lunar_client"].append(lc * 1000)
        rows["openai"].append(ot * 1000)
        rows["ratio"].append(lt / ot)
        rows["ratio_client"].append(lc / ot)
    return {"runs": runs, **rows}


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}–{max(xs):.2f})"


def markdown(stream: dict[str, Any], imports: dict[str, Any]) -> str:
    r = statistics.median(stream["sync_stream"]["ratio_cpu"])
    ir = statistics.median(imports["ratio"])
    labels = {
        "sync_stream": f"stream of {stream['chunks']} chunks, µs per chunk: `OpenAI` / `Lunar`",
        "async_stream": "the same stream, µs per chunk: `AsyncOpenAI` / `AsyncLunar`",
        "sync_requests": f"{stream['requests']} requests, µs per request: `OpenAI` / `Lunar`",
        "async_requests": "the same requests, µs per request: `AsyncOpenAI` / `AsyncLunar`",
    }
    table = [
        "| what | openai CPU | Lunar CPU | openai wall | Lunar wall | Lunar / openai CPU |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, label in labels.items():
        rows = stream[key]
        table.append(
            f"| {label} | {med(rows['openai_cpu'])} | {med(rows['lunar_cpu'])} | "
            f"{med(rows['openai_wall'])} | {med(rows['lunar_wall'])} | "
            f"{statistics.median(rows['ratio_cpu']):.2f} |"
        )
    return "\n".join(
        [
            f"From the emulator (its own process), {stream['runs']} runs alternating the two "
            f"clients; openai {stream['openai_version']}; AsyncLunar's HTTP client: "
            f"`{stream['async_http']}`. CPU = the client process's CPU time (what the SDK "
            "costs); median (min–max).",
            "",
            *table,
            "",
            f"**Lunar / openai CPU per chunk: {r:.2f}** (target ≤ 0.33: "
            f"{'met' if r <= 1 / 3 else 'NOT met'}).",
            "",
            f'Import, whole process (`python -c "import X"`), {imports["runs"]} runs, ms:',
            "",
            "| `python -c` | ms |",
            "| --- | --- |",
            f"| `import sys` (interpreter floor) | {med(imports['python'])} |",
            f"| `import lunar` | {med(imports['lunar'])} |",
            f"| `from lunar import Lunar` (loads httpx) | {med(imports['lunar_client'])} |",
            f"| `from openai import OpenAI` | {med(imports['openai'])} |",
            "",
            f"**`import lunar` / openai: {ir:.2f}** (target ≤ 0.33: "
            f"{'met' if ir <= 1 / 3 else 'NOT met'}); `from lunar import Lunar` / openai: "
            f"{statistics.median(imports['ratio_client']):.2f}.",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=4000)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args()
    stream = stream_lane(args.chunks, args.runs, args.requests)
    imports = import_lane(args.runs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"stream": stream, "imports": imports}, f, indent=1)
    print(markdown(stream, imports))


if __name__ == "__main__":
    main()
