"""The embedded model through Lunar vs llama-cpp-python called directly: TTFT and tokens/s.

Same GGUF (the bundled SmolLM2-135M-Instruct), same context (2048), threads and sampling
(temperature 0, top_p 0.9, top_k 40, min_p 0.05, fixed seed), same prompt and max_tokens.
The direct lane is ``Llama.create_chat_completion(stream=True)`` on its own ``Llama``; the
Lunar lanes are ``Lunar().chat.completions.create(model="smollm2", stream=True)`` and the
same with ``AsyncLunar``, on the model Lunar loads itself (load times are reported apart).

Each side runs in its own process (started once, then told to run one request at a time):
llama.cpp's OpenMP (libgomp) stops spin-waiting in a process that has more OpenMP threads
than CPUs, so two models driven from two threads of one process would slow each other down
and measure that instead. Lanes alternate, in a rotating order, after one warm-up each.
Every run evaluates the whole prompt afresh (Lunar does for seeded requests; the direct
lane calls ``reset()``), so TTFT is prompt evaluation plus the first token.

The prompt's evaluation varies by ±20 ms from run to run here, more than the 5 ms target,
so each TTFT is also split where llama.cpp's token generator is entered and where it gives
its first token (``Marks``, wrapped around each side's ``Llama.generate``): the caller's work
before, llama.cpp's own, the caller's work after. Both sides evaluate the same prompt tokens
(printed), so Lunar's added TTFT is its before + after minus the direct lane's, paired by
round; the whole-TTFT difference is printed beside it. (A first token that gives no text yet
puts the next tokens' decoding in "after", on both sides alike: the outputs are the same.)

TTFT is the time to the first chunk with text; decode tokens/s is (tokens - 1) over the
time from the first to the last text chunk; tokens are Lunar's ``usage.completion_tokens``
(and the text chunks, one per token here, for the direct lane).

    python bench/bench_local.py [--runs 5] [--max-tokens 128] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

PROMPT = "Write a short story about a robot who learns to paint."
SAMPLING: dict[str, Any] = {"temperature": 0.0, "top_p": 0.9}
LLAMA_ONLY: dict[str, Any] = {"top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0}


METRICS = ("ttft_ms", "decode_tps", "total_ms", "tokens")


class Marks:
    """When llama.cpp's token generator was entered and gave its first token: wrapped around
    ``Llama.generate`` of each side's model, it splits a TTFT into the caller's work before
    llama.cpp starts, llama.cpp's own (the prompt's evaluation and the first token: the same
    work on both sides, same tokens), and the caller's work until the text is in hand."""

    def __init__(self, llm: Any) -> None:
        self.reset()
        generate = llm.generate

        def timed(prompt: Any, *args: Any, **kwargs: Any) -> Any:
            self.prompt_tokens = len(prompt)
            tokens = generate(prompt, *args, **kwargs)
            self.entered = time.perf_counter()
            try:
                for i, token in enumerate(tokens):
                    if i == 0:
                        self.first = time.perf_counter()
                    yield token
            finally:
                tokens.close()

        llm.generate = timed

    def reset(self) -> None:
        self.entered = self.first = 0.0
        self.prompt_tokens = 0


class Run:
    __slots__ = (
        "after_ms",
        "before_ms",
        "decode_tps",
        "llama_ms",
        "prompt_tokens",
        "text",
        "tokens",
        "total_ms",
        "ttft_ms",
    )

    def __init__(
        self, started: float, stamps: list[float], tokens: int, text: str, marks: Marks
    ) -> None:
        if not started < marks.entered <= marks.first <= stamps[0]:
            raise RuntimeError("the run did not go through the Llama whose generate is timed")
        self.tokens = tokens
        self.text = text
        self.ttft_ms = (stamps[0] - started) * 1000
        self.before_ms = (marks.entered - started) * 1000
        self.llama_ms = (marks.first - marks.entered) * 1000
        self.after_ms = (stamps[0] - marks.first) * 1000
        self.prompt_tokens = marks.prompt_tokens
        self.total_ms = (time.perf_counter() - started) * 1000
        span = stamps[-1] - stamps[0]
        self.decode_tps = (len(stamps) - 1) / span if span > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


def direct_lane(
    llm: Any, messages: list[dict[str, str]], max_tokens: int, seed: int, marks: Marks
) -> Callable[[], Run]:
    def run() -> Run:
        llm.reset()
        marks.reset()
        started = time.perf_counter()
        stamps: list[float] = []
        parts: list[str] = []
        for chunk in llm.create_chat_completion(
            messages=messages,
            stream=True,
            max_tokens=max_tokens,
            seed=seed,
            **SAMPLING,
            **LLAMA_ONLY,
        ):
            text = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if text:
                stamps.append(time.perf_counter())
                parts.append(text)
        return Run(started, stamps, len(stamps), "".join(parts), marks)

    return run


def lunar_lane(
    client: Any, messages: list[dict[str, str]], max_tokens: int, seed: int, marks: Marks
) -> Callable[[], Run]:
    def run() -> Run:
        marks.reset()
        started = time.perf_counter()
        stamps: list[float] = []
        parts: list[str] = []
        usage = None
        for chunk in client.chat.completions.create(
            model="smollm2",
            messages=messages,
            stream=True,
            max_tokens=max_tokens,
            seed=seed,
            **SAMPLING,
        ):
            text = chunk.choices[0].delta.content if chunk.choices else None
            if text:
                stamps.append(time.perf_counter())
                parts.append(text)
            usage = chunk.usage or usage
        assert usage is not None and usage.completion_tokens >= len(stamps)
        return Run(started, stamps, usage.completion_tokens, "".join(parts), marks)

    return run


def async_lane(
    client: Any, messages: list[dict[str, str]], max_tokens: int, seed: int, marks: Marks
) -> Callable[[], Run]:
    loop = asyncio.new_event_loop()

    async def once() -> Run:
        marks.reset()
        started = time.perf_counter()
        stamps: list[float] = []
        parts: list[str] = []
        usage = None
        stream = await client.chat.completions.create(
            model="smollm2",
            messages=messages,
            stream=True,
            max_tokens=max_tokens,
            seed=seed,
            **SAMPLING,
        )
        async for chunk in stream:
            text = chunk.choices[0].delta.content if chunk.choices else None
            if text:
                stamps.append(time.perf_counter())
                parts.append(text)
            usage = chunk.usage or usage
        assert usage is not None
        return Run(started, stamps, usage.completion_tokens, "".join(parts), marks)

    return lambda: loop.run_until_complete(once())


def child(side: str, args: argparse.Namespace) -> None:
    """One side in its own process: load, say so, then one run per lane name read."""
    messages = [{"role": "user", "content": args.prompt}]
    t0 = time.perf_counter()
    import llama_cpp

    from lunar import AsyncLunar, Lunar
    from lunar.providers import local

    info: dict[str, Any] = {
        "import_s": time.perf_counter() - t0,
        "llama_cpp_version": llama_cpp.__version__,
        "threads": local.thread_count(),
        "model": local.bundled_model_path(),
    }
    t0 = time.perf_counter()
    lanes: dict[str, Callable[[], Run]]
    if side == "direct":
        llm = llama_cpp.Llama(
            model_path=info["model"], n_ctx=2048, n_threads=info["threads"], verbose=False
        )
        info["load_s"] = time.perf_counter() - t0
        marks = Marks(llm)
        lanes = {"direct": direct_lane(llm, messages, args.max_tokens, args.seed, marks)}
    else:
        model = local.preload()
        info["load_s"] = time.perf_counter() - t0
        marks = Marks(model._llama)  # the Llama that Lunar loaded and generates with
        lanes = {
            "lunar": lunar_lane(Lunar(), messages, args.max_tokens, args.seed, marks),
            "lunar_async": async_lane(AsyncLunar(), messages, args.max_tokens, args.seed, marks),
        }
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        print(json.dumps(lanes[line.strip()]().to_dict()), flush=True)


class Side:
    def __init__(self, side: str, args: argparse.Namespace) -> None:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            side,
            "--max-tokens",
            str(args.max_tokens),
            "--seed",
            str(args.seed),
            "--prompt",
            args.prompt,
        ]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info: dict[str, Any] = json.loads(self._read())

    def _read(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"bench child exited with {self.proc.wait()}")
        return line

    def run(self, lane: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(lane + "\n")
        self.proc.stdin.flush()
        result: dict[str, Any] = json.loads(self._read())
        return result

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--threads", type=int, help="llama.cpp threads (default: Lunar's)")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--child", choices=["direct", "lunar"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        os.environ["LUNAR_LOCAL_THREADS"] = str(args.threads)
    if args.child:
        child(args.child, args)
        return

    sides = {"direct": Side("direct", args), "lunar": Side("lunar", args)}
    side_of = {"direct": "direct", "lunar": "lunar", "lunar_async": "lunar"}
    names = list(side_of)
    texts = {name: sides[side_of[name]].run(name)["text"] for name in names}  # warm-up
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for i in range(args.runs):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            run = sides[side_of[name]].run(name)
            runs[name].append(run)
            texts[name] = run["text"]
    for side in sides.values():
        side.close()

    info = sides["lunar"].info
    results: dict[str, Any] = {
        "model": info["model"],
        "llama_cpp_version": info["llama_cpp_version"],
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "threads": info["threads"],
        "runs": args.runs,
        "max_tokens": args.max_tokens,
        "import_s": {name: side.info["import_s"] for name, side in sides.items()},
        "load_s": {name: side.info["load_s"] for name, side in sides.items()},
        "same_text": len(set(texts.values())) == 1,
        "prompt_tokens": sorted({r["prompt_tokens"] for lane in runs.values() for r in lane}),
        "lanes": {
            name: {
                metric: summary([float(r[metric]) for r in runs[name]])
                for metric in (*METRICS, "before_ms", "llama_ms", "after_ms")
            }
            for name in names
        },
    }
    lanes_out = results["lanes"]

    def cell(name: str, metric: str, fmt: str) -> str:
        s = lanes_out[name][metric]
        return f"{s['median']:{fmt}} ({s['min']:{fmt}}–{s['max']:{fmt}})"

    def ratio(name: str, metric: str) -> str:
        return f"{lanes_out[name][metric]['median'] / lanes_out['direct'][metric]['median']:.3f}"

    print(
        f"SmolLM2-135M-Instruct Q4_1, llama-cpp-python {results['llama_cpp_version']}, "
        f"{results['threads']} threads on {results['cpus']} CPUs, "
        f"max_tokens={args.max_tokens}, temperature 0, {args.runs} runs (median, min–max)\n"
    )
    print(
        "| metric | direct llama-cpp | Lunar | AsyncLunar | Lunar / direct | AsyncLunar / direct |"
    )
    print("|---|---|---|---|---|---|")
    for metric, label, fmt in (
        ("ttft_ms", "TTFT (ms)", ".1f"),
        ("decode_tps", "decode tokens/s", ".1f"),
        ("total_ms", "total (ms)", ".0f"),
        ("tokens", "tokens", ".0f"),
    ):
        print(
            f"| {label} | {cell('direct', metric, fmt)} | {cell('lunar', metric, fmt)} "
            f"| {cell('lunar_async', metric, fmt)} | {ratio('lunar', metric)} "
            f"| {ratio('lunar_async', metric)} |"
        )
    best = {
        name: (
            lanes_out[name]["ttft_ms"]["min"],
            lanes_out[name]["decode_tps"]["max"],
            lanes_out[name]["total_ms"]["min"],
        )
        for name in names
    }
    print(
        "\nbest runs (the least disturbed; min TTFT / max tokens/s / min total): "
        + ", ".join(
            f"{name} {b[0]:.1f} ms / {b[1]:.1f} tok/s / {b[2]:.0f} ms" for name, b in best.items()
        )
    )
    # Each round runs every lane back to back, so a round's lanes share the machine's state
    # of the moment: the median of the per-round differences is steadier than the
    # difference of the medians when the runs themselves spread widely.
    paired: dict[str, dict[str, float]] = {}
    for name in ("lunar", "lunar_async"):
        d_ttft = [r["ttft_ms"] - b["ttft_ms"] for r, b in zip(runs[name], runs["direct"])]
        r_tps = [r["decode_tps"] / b["decode_tps"] for r, b in zip(runs[name], runs["direct"])]
        # The caller's own part of the TTFT (before llama.cpp's generator is entered, and
        # from its first token to the text in hand), lane minus direct: the TTFT without the
        # prompt's evaluation, whose spread from run to run is larger than the target.
        d_own = [
            r["before_ms"] + r["after_ms"] - b["before_ms"] - b["after_ms"]
            for r, b in zip(runs[name], runs["direct"])
        ]
        paired[name] = {
            "own_added_ms": statistics.median(d_own),
            "own_added_min": min(d_own),
            "own_added_max": max(d_own),
            "ttft_added_ms": statistics.median(d_ttft),
            "ttft_added_q1": _quartiles(d_ttft)[0],
            "ttft_added_q3": _quartiles(d_ttft)[1],
            "tps_ratio": statistics.median(r_tps),
        }
    results["paired"] = paired
    print(
        "\npaired by round (median over rounds of lane − direct in the same round): "
        + "; ".join(
            f"{label} TTFT {p['ttft_added_ms']:+.1f} ms (quartiles {p['ttft_added_q1']:+.1f} "
            f"to {p['ttft_added_q3']:+.1f}), tokens/s {p['tps_ratio']:.3f}×"
            for label, p in (("Lunar", paired["lunar"]), ("AsyncLunar", paired["lunar_async"]))
        )
    )
    print(
        "TTFT split (median ms: before llama.cpp / llama.cpp's prompt and first token / after): "
        + ", ".join(
            f"{name} {lanes_out[name]['before_ms']['median']:.2f} / "
            f"{lanes_out[name]['llama_ms']['median']:.1f} / "
            f"{lanes_out[name]['after_ms']['median']:.2f}"
            for name in names
        )
        + "; the caller's own part, lane − direct paired by round: "
        + "; ".join(
            f"{label} {p['own_added_ms']:+.2f} ms ({p['own_added_min']:+.2f} to "
            f"{p['own_added_max']:+.2f})"
            for label, p in (("Lunar", paired["lunar"]), ("AsyncLunar", paired["lunar_async"]))
        )
        + f"; prompt tokens evaluated: {results['prompt_tokens']}"
        + (
            ""
            if len(results["prompt_tokens"]) == 1
            else " (NOT the same on every side: the split compares unequal work)"
        )
    )
    print()
    for label, name in (("Lunar", "lunar"), ("AsyncLunar", "lunar_async")):
        p = paired[name]
        tps, own = p["tps_ratio"], p["own_added_ms"]
        print(
            f"- {label} tokens/s ≥ 95 % of llama-cpp-python's (paired median): "
            f"{'met' if tps >= 0.95 else '**NOT met**'} ({tps:.1%})"
        )
        print(
            f"- {label} added TTFT ≤ 5 ms (its own part, paired median): "
            f"{'met' if own <= 5 else '**NOT met**'} ({own:+.2f} ms; whole TTFT "
            f"{p['ttft_added_ms']:+.1f} ms, quartiles {p['ttft_added_q1']:+.1f} to "
            f"{p['ttft_added_q3']:+.1f})"
        )
    print()
    load, imp = results["load_s"], results["import_s"]
    print(
        f"load: direct Llama() {load['direct']:.3f} s, Lunar preload() {load['lunar']:.3f} s "
        f"(imports: llama_cpp {imp['direct']:.3f} s, llama_cpp + lunar {imp['lunar']:.3f} s); "
        f"same text in every lane: {results['same_text']}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
