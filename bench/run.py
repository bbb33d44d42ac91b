"""Run the benchmark lanes and write docs/benchmarks.md (the tables and the commands).

    python bench/run.py [--full]

Lanes 1–3 (gateway latency, throughput frontier, streams) are bench/bench_gateway.py, lane 4
(memory) bench/bench_memory.py: they need wrk (apt-get install -y wrk) and install the LiteLLM
proxy into bench/.venv-litellm on first use; their plots go to docs/img/.

Each lane is its own script (runnable alone); this only runs them, side by side with their
peers in the same process run, and assembles the page.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores, {cpu}; Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def lane(title: str, cmd: list[str]) -> str:
    print(f"== {title}: {' '.join(cmd)}", flush=True)
    out = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        body = f"Failed (exit {out.returncode}):\n\n```\n{out.stderr[-2000:]}\n```"
    else:
        body = out.stdout.strip()
    print(body, flush=True)
    return f"## {title}\n\nCommand: `python {' '.join(cmd)}`\n\n{body}\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="more chunks and runs")
    args = ap.parse_args()
    runs = "15" if args.full else "7"
    full = ["--full"] if args.full else []
    sections = [
        lane(
            "Gateway: Lunar vs LiteLLM vs direct (lanes 1–3)",
            ["bench/bench_gateway.py", *full],
        ),
        lane("Memory: Lunar vs LiteLLM (lane 4)", ["bench/bench_memory.py", *full]),
        lane(
            "SDK client cost: Lunar vs the openai SDK",
            ["bench/bench_client.py", "--chunks", "4000" if args.full else "2000", "--runs", runs],
        )
    ]
    if importlib.util.find_spec("llama_cpp") is not None:
        sections.append(
            lane(
                "Local provider: Lunar vs llama-cpp-python directly",
                ["bench/bench_local.py", "--runs", "7" if args.full else "5"],
            )
        )
    else:
        sections.append(
            "## Local provider\n\nSkipped: llama-cpp-python is not installed "
            "(`make demo` or `pip install 'lunar[local]'`).\n"
        )
    today = datetime.date.today().isoformat()
    page = "\n".join(
        [
            "# Benchmarks",
            "",
            f"Produced by `make bench` (`python bench/run.py{' --full' if args.full else ''}`) on "
            f"{today}: {machine()}.",
            "Every figure is a median over several runs with the min–max beside it; every "
            "comparison alternates the two sides in one process run. Unit tests never assert "
            "times; these pages are where speed is tracked.",
            "",
            *sections,
        ]
    )
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(page)
    print(f"wrote {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
