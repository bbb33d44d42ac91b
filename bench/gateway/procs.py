"""Processes of a benchmark: pinned, waited for, and always stopped.

Every process is started by ``start`` into a ``Procs`` (a context manager) that terminates
them all (by pid: SIGTERM, then SIGKILL after a grace) whatever happens.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

GATEWAY_CORE = 0  # the gateway under test
LOAD_CORE = 1  # the emulator and the load generator (wrk, the stream client)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def can_pin() -> bool:
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) > 1


def pinned(cmd: list[str], core: int | None) -> list[str]:
    """``cmd`` under ``taskset -c core`` when pinning is possible (2+ cores)."""
    if core is None or not can_pin():
        return cmd
    return ["taskset", "-c", str(core % (os.cpu_count() or 1)), *cmd]


def pin_self(core: int) -> None:
    """Pin this process (the stream client, the orchestrator) to ``core``."""
    if can_pin() and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core % (os.cpu_count() or 1)})


def move(pid: int, core: int) -> None:
    """Move every thread of ``pid`` and its descendants to ``core`` (a running gateway).
    Raises when a thread that still runs could not be moved: a "shared" figure measured with
    the gateway left where it was would be a split one under another name."""
    if not (can_pin() and hasattr(os, "sched_setaffinity")):
        return
    want = {core % (os.cpu_count() or 1)}
    for p in tree(pid):
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{p}/task")]
        except OSError:
            continue  # the process has exited
        for tid in tids:
            try:
                os.sched_setaffinity(tid, want)
            except ProcessLookupError:
                continue  # the thread has exited
            if os.sched_getaffinity(tid) != want:
                raise RuntimeError(f"thread {tid} of {p} is not on core {core}")


def http_get(url: str, timeout: float = 2.0, headers: Mapping[str, str] | None = None) -> int:
    """Status of GET ``url`` (http://127.0.0.1:port/path), or 0 when it cannot connect."""
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    conn = http.client.HTTPConnection(host, int(port or 80), timeout=timeout)
    try:
        conn.request("GET", "/" + path, headers=dict(headers or {}))
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except OSError:
        return 0
    finally:
        conn.close()


def http_json(
    method: str, url: str, body: Any, headers: Mapping[str, str], timeout: float = 10.0
) -> tuple[int, Any]:
    import json

    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    conn = http.client.HTTPConnection(host, int(port or 80), timeout=timeout)
    try:
        conn.request(
            method,
            "/" + path,
            body=json.dumps(body).encode(),
            headers={"content-type": "application/json", **headers},
        )
        resp = conn.getresponse()
        data = resp.read()
        try:
            return resp.status, json.loads(data)
        except ValueError:
            return resp.status, data.decode(errors="replace")
    finally:
        conn.close()


@dataclass
class Proc:
    name: str
    cmd: list[str]
    popen: subprocess.Popen[bytes]
    log: Path
    env_shown: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def shown(self) -> str:
        """The command line as a person would type it (environment first)."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env_shown.items())
        return (env + " " if env else "") + shlex.join(self.cmd)

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


class Procs:
    """Started processes, stopped on exit (by pid, never by name)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []
        self._logs: list[IO[bytes]] = []

    def start(
        self,
        name: str,
        cmd: list[str],
        *,
        core: int | None,
        env: Mapping[str, str] | None = None,
        env_shown: Mapping[str, str] | None = None,
    ) -> Proc:
        full = pinned(cmd, core)
        log = self.workdir / f"{name}-{len(self.procs)}.log"
        fh = open(log, "wb")  # noqa: SIM115 (closed in stop)
        self._logs.append(fh)
        popen = subprocess.Popen(
            full,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=self.workdir,
            start_new_session=True,  # its own group: its children are stopped with it
        )
        p = Proc(name, full, popen, log, dict(env_shown or {}))
        self.procs.append(p)
        return p

    def stop(self, p: Proc, grace: float = 10.0) -> None:
        if p.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.popen.pid, signal.SIGTERM)
            try:
                p.popen.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.popen.pid, signal.SIGKILL)
                p.popen.wait(5)
        if p in self.procs:
            self.procs.remove(p)

    def close(self) -> None:
        for p in list(reversed(self.procs)):
            self.stop(p)
        for fh in self._logs:
            fh.close()

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_ready(
    p: Proc, url: str, timeout: float = 90.0, headers: Mapping[str, str] | None = None
) -> float:
    """Poll ``url`` until 200; return seconds waited. Raises with the log's tail."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if p.popen.poll() is not None:
            raise RuntimeError(f"{p.name} exited ({p.popen.returncode}):\n{p.tail()}")
        if http_get(url, headers=headers) == 200:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise RuntimeError(f"{p.name} not ready at {url} after {timeout:.0f}s:\n{p.tail()}")


# -- the emulator ---------------------------------------------------------------------------

# `python -m lunar.testing` prefers uvloop; if its server refuses uvloop's transports (an
# `assert isinstance(transport, asyncio.Transport)` in lunar.testing._server fails under uvloop
# 0.23), run it on the standard asyncio loop instead: the same CLI with uvloop hidden.
_NO_UVLOOP = (
    "import sys; sys.modules['uvloop'] = None; from lunar.testing._cli import main; "
    "raise SystemExit(main(sys.argv[1:]))"
)


@dataclass
class Emulator:
    proc: Proc
    port: int
    loop: str  # "uvloop" or "asyncio"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def v1(self) -> str:
        return f"{self.base}/v1"


def _probe_chat(base: str) -> bool:
    try:
        status, _ = http_json(
            "POST",
            f"{base}/v1/chat/completions",
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            {},
            timeout=3,
        )
        return status == 200
    except OSError:
        return False


def start_emulator(
    procs: Procs, *, chunks: int, pacing_ms: float = 0.0, core: int | None = LOAD_CORE
) -> Emulator:
    """The emulator in its own process (pre-rendered replies), pinned to ``core``."""
    args = ["--port", "0", "--chunks", str(chunks)]
    if pacing_ms:
        args += ["--pacing-ms", str(pacing_ms)]
    for loop, cmd in (
        ("uvloop", [sys.executable, "-m", "lunar.testing"]),
        ("asyncio", [sys.executable, "-c", _NO_UVLOOP]),
    ):
        port = free_port()
        args[1] = str(port)
        p = procs.start("emulator", [*cmd, *args], core=core)
        try:
            wait_ready(p, f"http://127.0.0.1:{port}/health", timeout=8 if loop == "uvloop" else 30)
        except RuntimeError:
            if loop != "uvloop":
                raise
            procs.stop(p)
            continue
        if _probe_chat(f"http://127.0.0.1:{port}"):
            if loop == "uvloop":
                loop = "uvloop" if _uses_uvloop() else "asyncio"
            return Emulator(p, port, loop)
        procs.stop(p)
    raise RuntimeError("the emulator does not answer /v1/chat/completions")


def start_replay(
    procs: Procs, *, chunks: int, pacing_ms: float, burst: int = 1, core: int | None = LOAD_CORE
) -> Emulator:
    """The paced replay upstream (bench/gateway/upstream.py): the emulator's bytes, one timer
    wheel for every stream; pinned to ``core``."""
    port = free_port()
    script = Path(__file__).resolve().parent / "upstream.py"
    cmd = [
        sys.executable,
        str(script),
        "--port",
        str(port),
        "--chunks",
        str(chunks),
        "--pacing-ms",
        f"{pacing_ms:g}",
        *(["--burst", str(burst)] if burst > 1 else []),
    ]
    p = procs.start("upstream", cmd, core=core)
    wait_ready(p, f"http://127.0.0.1:{port}/health", timeout=30)
    if not _probe_chat(f"http://127.0.0.1:{port}"):
        raise RuntimeError(f"the replay upstream does not answer:\n{p.tail()}")
    return Emulator(p, port, "uvloop" if _uses_uvloop() else "asyncio")


def _uses_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


# -- machine and versions -------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def machine() -> str:
    return (
        f"{os.cpu_count()} cores (nproc), {cpu_model()}, "
        f"{platform.system()} {platform.release()}; Python {platform.python_version()}"
    )


def version_of(python: str, dist: str) -> str:
    out = subprocess.run(
        [python, "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or "not installed"


def wrk_version() -> str:
    out = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    return (out.stdout + out.stderr).split("\n", 1)[0].split(" [")[0].strip() or "wrk ?"


@contextlib.contextmanager
def timer() -> Iterator[list[float]]:
    box = [0.0]
    t = time.perf_counter()
    try:
        yield box
    finally:
        box[0] = time.perf_counter() - t


# -- /proc: CPU and memory of a process tree ------------------------------------------------


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (taskset execs in place, so the pid is the program's)."""
    kids = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in tree(pid):
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(f[11]) + int(f[12])) / tick
    return total


def rss_mib(pid: int) -> float:
    """Resident set of ``pid`` and its descendants (VmRSS), MiB."""
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
    return total / 1024.0
