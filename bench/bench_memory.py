"""Lane 4, memory: idle RSS and RSS growth over many streamed requests, Lunar beside LiteLLM.

    python bench/bench_memory.py [--full] [--requests N] [--targets lunar,litellm]
                                 [--json out.json] [--img docs/img] [--no-install]

Both gateways run at once (pinned to core 0) in front of one emulator (core 1, 64-delta
streams, no pacing); the stream client (core 1, 8 connections) sends the requests in blocks
that alternate between the gateways, and the RSS of each gateway's process tree (VmRSS) is
sampled every 0.2 s. Figures: RSS right after ready (idle), after a warm-up of 200 streamed
requests (500 with --full; the baseline), after all N (end, after a 1 s settle), growth =
end − baseline (target ≤ 5 MB over 10,000: no leak), and the peak. Quick: N = 2,000 (the
growth is shown, not judged); --full: N = 10,000.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway import litellm_env, plots, procs, stats, streams, targets
from gateway.stats import fmt, table, verdict

ROOT = Path(__file__).resolve().parent.parent
IMG = ROOT / "docs" / "img"
CHUNKS = 64
CONNECTIONS = 8
WARMUP = {False: 200, True: 500}  # quick, full
SAMPLE_S = 0.2


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Sampler:
    """RSS of each target's process tree every SAMPLE_S, with requests done so far."""

    def __init__(self, ts: Sequence[targets.Target]) -> None:
        self.ts = [t for t in ts if t.pid]
        self.done = {t.name: 0 for t in self.ts}
        self.live: dict[str, list[streams.Raw]] = {t.name: [] for t in self.ts}
        self.lock = threading.Lock()
        self.series: dict[str, list[tuple[float, float, float]]] = {t.name: [] for t in self.ts}
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> dict[str, float]:
        now = time.monotonic() - self.t0
        out = {}
        for t in self.ts:
            assert t.pid is not None
            m = procs.rss_mib(t.pid)
            with self.lock:
                done = self.done[t.name] + len(self.live[t.name])
            self.series[t.name].append((now, done, m))
            out[t.name] = m
        return out

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.sample()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def settle_rss(t: targets.Target, seconds: float = 1.0) -> float:
    time.sleep(seconds)
    assert t.pid is not None
    return procs.rss_mib(t.pid)


def stream_block(t: targets.Target, n: int, sampler: Sampler) -> tuple[int, int]:
    """n streamed requests over CONNECTIONS connections; (ok, failed)."""
    per = max(1, n // CONNECTIONS)
    live: list[streams.Raw] = []
    sampler.live[t.name] = live
    raws = streams.run(
        t, connections=CONNECTIONS, streams_per_connection=per, stagger_s=0.05, out=live
    )
    with sampler.lock:
        sampler.done[t.name] += len(raws)
        sampler.live[t.name] = []
    ok = 0
    for r in raws:
        s = streams.decode(r)
        ok += s.ok and s.deltas == CHUNKS
    return ok, len(raws) - ok


def measure(names: Sequence[str], requests: int, block: int, warmup: int) -> dict[str, Any]:
    procs.pin_self(procs.LOAD_CORE)
    with tempfile.TemporaryDirectory(prefix="lunar-mem-") as tmp, procs.Procs(Path(tmp)) as ps:
        emu = procs.start_emulator(ps, chunks=CHUNKS)
        ts: list[targets.Target] = []
        idle: dict[str, float] = {}
        for n in names:
            t = targets.start(targets.SPECS[n], ps, emu)
            ts.append(t)
            idle[n] = settle_rss(t)
            log(f"{n} ready, idle RSS {idle[n]:.1f} MiB: {t.command}")
        result: dict[str, Any] = {
            "requests": requests,
            "block": block,
            "commands": {"emulator": emu.proc.shown(), **{t.name: t.command for t in ts}},
            "versions": {t.name: t.version for t in ts},
            "idle": idle,
            "warmup": warmup,
        }
        with Sampler(ts) as sampler:
            sampler.sample()
            for t in ts:  # warm-up: pools, caches, the ledger's first batches
                ok, bad = stream_block(t, warmup, sampler)
            baseline = {t.name: settle_rss(t) for t in ts}
            log("baseline RSS " + ", ".join(f"{k} {v:.1f} MiB" for k, v in baseline.items()))
            failed = {t.name: 0 for t in ts}
            done = {t.name: 0 for t in ts}
            i = 0
            t_run = {t.name: 0.0 for t in ts}
            while any(done[t.name] < requests for t in ts):
                for t in ts[i % len(ts) :] + ts[: i % len(ts)]:
                    if done[t.name] >= requests:
                        continue
                    size = min(block, requests - done[t.name])
                    t0 = time.monotonic()
                    ok, bad = stream_block(t, size, sampler)
                    t_run[t.name] += time.monotonic() - t0
                    done[t.name] += ok + bad
                    failed[t.name] += bad
                    i += 1
                log(
                    "done "
                    + ", ".join(
                        f"{t.name} {done[t.name]:,} ({procs.rss_mib(t.pid or 0):.1f} MiB)"
                        for t in ts
                    )
                )
            end = {t.name: settle_rss(t) for t in ts}
            sampler.sample()
        result.update(
            baseline=baseline,
            end=end,
            done=done,
            failed=failed,
            seconds=t_run,
            peak={n: max(m for _, _, m in s) for n, s in sampler.series.items()},
            series=sampler.series,
        )
        return result


def markdown(r: dict[str, Any]) -> tuple[str, dict[str, bool]]:
    rows = []
    for n in r["idle"]:
        growth = r["end"][n] - r["baseline"][n]
        rate = r["done"][n] / r["seconds"][n] if r["seconds"][n] else math.nan
        rows.append(
            [
                n,
                fmt(r["idle"][n], 1),
                fmt(r["baseline"][n], 1),
                fmt(r["end"][n], 1),
                f"{growth:+.1f}",
                fmt(r["peak"][n], 1),
                f"{r['done'][n]:,}",
                str(r["failed"][n]),
                fmt(rate, 0),
            ]
        )
    out = [
        f"{r['requests']:,} streamed requests ({CHUNKS} deltas each, no pacing) per gateway after "
        f"a warm-up of {r['warmup']}, over {CONNECTIONS} connections, in blocks of {r['block']:,} "
        "alternating the gateways; RSS = VmRSS of the gateway's process tree, MiB. One run.",
        "",
        table(
            [
                "gateway",
                "idle",
                "after warm-up",
                "end",
                "growth",
                "peak",
                "requests",
                "failed",
                "streams/s",
            ],
            rows,
        ),
        "",
    ]
    met: dict[str, bool] = {}
    if "lunar" in r["idle"]:
        growth = r["end"]["lunar"] - r["baseline"]["lunar"]
        if r["requests"] >= 10_000:
            met["lane4 growth"] = growth <= 5.0
            out.append(
                f"- Lunar RSS growth ≤ 5 MB over {r['requests']:,} streamed requests: "
                f"{verdict(met['lane4 growth'], f'{growth:+.1f} MB')}"
            )
        else:
            scaled = growth * 10_000 / r["requests"]
            out.append(
                f"- Lunar RSS growth over {r['requests']:,} streamed requests: {growth:+.1f} MB "
                f"(linear to 10,000: {scaled:+.1f} MB, indicative only; the target, ≤ 5 MB over "
                "10,000, is judged by `--full`)."
            )
        if "litellm" in r["idle"] and r["idle"]["lunar"] > 0:
            out.append(
                f"- Idle RSS: LiteLLM / Lunar = {r['idle']['litellm'] / r['idle']['lunar']:.1f}×."
            )
    return "\n".join(out), met


def run(
    full: bool = False,
    names: Sequence[str] = ("lunar", "litellm"),
    requests: int | None = None,
    img: Path | None = IMG,
    json_out: Path | None = None,
    install: bool = True,
) -> str:
    requests = requests or (10_000 if full else 2_000)
    block = 1_000 if requests >= 10_000 else max(100, requests // 4)
    if "litellm" in names and install and targets.LITELLM.available() is not None:
        log("installing the LiteLLM proxy into bench/.venv-litellm (once)")
        litellm_env.install()
    avail, skipped = [], []
    for n in names:
        why = targets.SPECS[n].available()
        if why is None:
            avail.append(n)
        else:
            skipped.append(f"{n}: {why}")
    before = stats.loadavg()
    r = measure(avail, requests, block, WARMUP[requests >= 10_000])
    md, met = markdown(r)
    head = [
        f"Machine: {procs.machine()}. Load average {before} before, {stats.loadavg()} after.",
        "Versions: " + "; ".join(f"{k}: {v}" for k, v in r["versions"].items()) + ".",
        "",
        "Processes:",
        "",
        *[f"- {k}: `{v}`" for k, v in r["commands"].items()],
        f"- load: the asyncio stream client (bench/gateway/streams.py), {CONNECTIONS} connections.",
    ]
    if skipped:
        head += ["", "Not measured: " + "; ".join(skipped)]
    if img is not None:
        p = plots.rss(
            img / "memory_rss.png",
            f"Lane 4: gateway RSS, {requests:,} streamed requests after a {r['warmup']} warm-up",
            r["series"],
        )
        if p is not None:
            head += ["", f"Plot: ![memory_rss]({stats.doc_link(p)})"]
    if json_out is not None:
        json_out.write_text(json.dumps({**r, "met": met}, indent=1))
    return "\n".join([*head, "", md]).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="10,000 requests (default 2,000)")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--targets", default="lunar,litellm")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--img", type=Path, default=IMG)
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-install", action="store_true")
    args = ap.parse_args()
    names = [x.strip() for x in args.targets.split(",") if x.strip()]
    for n in names:
        if n not in targets.SPECS:
            ap.error(f"unknown target {n!r} (known: {', '.join(targets.SPECS)})")
    out = run(
        args.full,
        names,
        args.requests,
        None if args.no_plots else args.img,
        args.json,
        not args.no_install,
    )
    print(out, end="")


if __name__ == "__main__":
    main()
