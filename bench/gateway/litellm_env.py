"""Install the LiteLLM proxy into its own venv (bench/.venv-litellm), idempotently.

    python bench/gateway/litellm_env.py [--venv bench/.venv-litellm] [--version 1.108.11]

A plain ``pip install 'litellm[proxy]'`` fails on this registry: litellm 1.106–1.109 declare
``certifi>=2026.10.19`` and the newest certifi here is 2026.10.18. So (see shared
ENVIRONMENT.md): read the wheel's ``Requires-Dist`` lines for the ``proxy`` extra, install them
with certifi and litellm-enterprise pinned, then ``pip install --no-deps litellm==VERSION``.
A stamp file records what was installed; a second run with the same version does nothing.

Also writes the proxy configuration for an emulator upstream (``write_config``) and knows how
to build its command line (``command``); bench_gateway.py and bench_memory.py import this.
"""

from __future__ import annotations

import argparse
import re
import secrets
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent
VENV = BENCH / ".venv-litellm"
VERSION = "1.108.11"
# What the registry has, where litellm's declared floor is higher than what exists here.
OVERRIDES = {
    "certifi": "certifi==2026.10.18",
    "litellm-enterprise": "litellm-enterprise==0.1.79.post1",
}


def _pip(venv: Path, *args: str) -> None:
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q", *args]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def _requirements(wheel: Path) -> list[str]:
    """The wheel's Requires-Dist with the proxy extra, markers evaluated for this Python."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.requirements import (  # type: ignore[assignment,unused-ignore]
            Requirement,
        )
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    out: list[str] = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate({"extra": "proxy"}):
            continue
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name in OVERRIDES:
            out.append(OVERRIDES[name])
            continue
        req.marker = None
        out.append(str(req))
    return out


def install(venv: Path = VENV, version: str = VERSION) -> Path:
    """Create ``venv`` with litellm[proxy]==version; return the ``litellm`` executable."""
    exe = venv / "bin" / "litellm"
    stamp = venv / ".installed"
    if exe.exists() and stamp.exists() and stamp.read_text().strip() == version:
        return exe
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        _pip(venv, "download", "--no-deps", "-d", tmp, f"litellm=={version}")
        wheel = next(Path(tmp).glob("litellm-*.whl"))
        reqs = _requirements(wheel)
        _pip(venv, "install", *reqs)
        _pip(venv, "install", "--no-deps", str(wheel))
    subprocess.run([str(exe), "--version"], check=True, capture_output=True)
    stamp.write_text(version + "\n")
    return exe


def installed_version(venv: Path = VENV) -> str:
    stamp = venv / ".installed"
    return stamp.read_text().strip() if stamp.exists() else "?"


def master_key() -> str:
    return "sk-" + secrets.token_hex(32)


def write_config(path: Path, upstream: str) -> Path:
    """A proxy config with one model, gpt-4o-mini, served by ``upstream`` (…/v1)."""
    path.write_text(
        "model_list:\n"
        "  - model_name: gpt-4o-mini\n"
        "    litellm_params:\n"
        "      model: openai/gpt-4o-mini\n"
        f"      api_base: {upstream}\n"
        "      api_key: sk-x\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
    )
    return path


def command(config: Path, port: int, venv: Path = VENV) -> list[str]:
    return [
        str(venv / "bin" / "litellm"),
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", type=Path, default=VENV)
    ap.add_argument("--version", default=VERSION)
    args = ap.parse_args()
    print(install(args.venv, args.version))


if __name__ == "__main__":
    main()
