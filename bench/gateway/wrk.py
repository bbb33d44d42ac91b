"""wrk as the non-streaming load generator: a Lua script for the POST body and headers, and a
``done()`` hook that prints the latency percentiles (µs) and the error counts as one JSON line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .procs import LOAD_CORE, pinned
from .targets import CHAT_PATH, MODEL, Target

INSTALL_HINT = "wrk is not installed: apt-get install -y wrk (Debian/Ubuntu), brew install wrk"

BODY = json.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "Say hello in one sentence."}]},
    separators=(",", ":"),
)

# Percentiles printed by done(): enough points to draw a CDF.
GRID = [0.1, 0.5, *range(1, 100), 99.5, 99.9, 99.99]

_LUA = """-- written by bench/gateway/wrk.py
wrk.method = "POST"
wrk.path = "{path}"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
{headers}
local grid = {{{grid}}}
function done(summary, latency, requests)
  local pct = {{}}
  for _, p in ipairs(grid) do
    pct[#pct + 1] = string.format('"%s":%d', tostring(p), latency:percentile(p))
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests":%d,"duration_us":%d,"bytes":%d,"min_us":%d,"max_us":%d,' ..
    '"mean_us":%.3f,"errors":{{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}},' ..
    '"pct":{{%s}}}}\\n',
    summary.requests, summary.duration, summary.bytes, latency.min, latency.max, latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout, table.concat(pct, ",")))
end
"""


def check() -> str | None:
    return None if shutil.which("wrk") else INSTALL_HINT


def script(target: Target, work: Path) -> Path:
    headers = "\n".join(f'wrk.headers["{k}"] = [==[{v}]==]' for k, v in target.headers.items())
    grid = ", ".join(repr(float(p)) for p in GRID)
    path = work / f"wrk-{target.name}.lua"
    path.write_text(_LUA.format(path=CHAT_PATH, body=BODY, headers=headers, grid=grid))
    return path


@dataclass
class Result:
    target: str
    connections: int
    seconds: float
    requests: int
    errors: int
    pct: dict[float, float]  # percentile -> ms
    command: str
    raw: dict[str, Any]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def error_rate(self) -> float:
        total = self.requests + self.raw["errors"]["connect"]
        return self.errors / total if total else 1.0

    def p(self, q: float) -> float:
        return self.pct[q]


def run(
    target: Target, lua: Path, *, connections: int, seconds: float, timeout_s: float = 5.0
) -> Result:
    """One bounded wrk run (``seconds``, ``connections`` keep-alive connections, one thread)
    pinned to LOAD_CORE."""
    cmd = pinned(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds:g}s",
            f"--timeout={timeout_s:g}s",
            "-s",
            str(lua),
            target.base + CHAT_PATH,
        ],
        LOAD_CORE,
    )
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result ({out.returncode}): {out.stdout}{out.stderr}")
    raw = json.loads(line[8:])
    e = raw["errors"]
    errors = e["connect"] + e["read"] + e["write"] + e["status"] + e["timeout"]
    pct = {float(k): v / 1000.0 for k, v in raw["pct"].items()}
    return Result(
        target.name,
        connections,
        raw["duration_us"] / 1e6,
        raw["requests"],
        errors,
        pct,
        " ".join(cmd),
        raw,
    )
