"""Helpers of the gateway benchmark lanes (bench_gateway.py, bench_memory.py).

``procs``: processes, pinning, readiness, the emulator, machine and versions.
``targets``: what is under test (direct, Lunar, LiteLLM) as a pluggable command + ready URL +
headers. ``wrk``: the non-streaming load generator. ``streams``: the asyncio stream client.
``stats``: medians and markdown. ``plots``: PNGs with matplotlib. ``litellm_env``: the peer's
venv.
"""
