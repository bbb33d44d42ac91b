"""SDK client cost: CPU per streamed chunk and import time, Lunar vs the official openai SDK.

Both clients consume the same long stream from the emulator (its own process, pinned to the
other core when ``taskset`` exists), alternating A and B in one run; the figure is the
client process's CPU time per chunk (what the SDK itself costs), with wall time beside it.
Import time is whole-process time of ``python -c "import X"`` minus nothing, alternating.

    python bench/bench_client.py [--chunks 4000] [--runs 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
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


def measure(fn: Any, client: Any) -> tuple[float, float, int]:
    c0, w0 = time.process_time(), time.perf_counter()
    n = fn(client)
    return time.process_time() - c0, time.perf_counter() - w0, n


def stream_lane(chunks: int, runs: int) -> dict[str, Any]:
    import openai

    import lunar

    proc, base_url = start_emulator(chunks)
    try:
        oai = openai.OpenAI(base_url=base_url, api_key="sk-bench", max_retries=0)
        lun = lunar.Lunar(
            providers={"openai": {"base_url": base_url, "api_key": "sk-bench"}}, max_retries=0
        )
        for _ in range(2):  # warm up both (connections, imports, caches)
            consume_openai(oai)
            consume_lunar(lun)
        rows: dict[str, list[float]] = {
            "openai_cpu": [],
            "lunar_cpu": [],
            "openai_wall": [],
            "lunar_wall": [],
            "ratio_cpu": [],
        }
        for _ in range(runs):
            oc, ow, on = measure(consume_openai, oai)
            lc, lw, ln = measure(consume_lunar, lun)
            assert on == ln == chunks, (on, ln)
            rows["openai_cpu"].append(oc / chunks * 1e6)
            rows["lunar_cpu"].append(lc / chunks * 1e6)
            rows["openai_wall"].append(ow / chunks * 1e6)
            rows["lunar_wall"].append(lw / chunks * 1e6)
            rows["ratio_cpu"].append(lc / oc)
        return {"chunks": chunks, "runs": runs, "openai_version": openai.__version__, **rows}
    finally:
        proc.terminate()
        proc.wait()


def import_time(statement: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True)
    return time.perf_counter() - t


def import_lane(runs: int) -> dict[str, Any]:
    for m in ("import lunar", "import openai") * 2:  # warm the OS file cache
        import_time(m)
    rows: dict[str, list[float]] = {"python": [], "lunar": [], "lunar_client": [], "openai": [],
                                    "ratio": [], "ratio_client": []}
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
    r = statistics.median(stream["ratio_cpu"])
    ir = statistics.median(imports["ratio"])
    return "\n".join(
        [
            f"Stream of {stream['chunks']} content chunks from the emulator, {stream['runs']} runs "
            f"alternating the two clients; openai {stream['openai_version']}. Median (min–max).",
            "",
            "| client | CPU µs / chunk | wall µs / chunk |",
            "| --- | --- | --- |",
            f"| openai SDK | {med(stream['openai_cpu'])} | {med(stream['openai_wall'])} |",
            f"| Lunar | {med(stream['lunar_cpu'])} | {med(stream['lunar_wall'])} |",
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
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args()
    stream = stream_lane(args.chunks, args.runs)
    imports = import_lane(args.runs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"stream": stream, "imports": imports}, f, indent=1)
    print(markdown(stream, imports))


if __name__ == "__main__":
    main()
