"""Prometheus metrics in the text exposition format (0.0.4), written by hand.

Everything about an inference request is observed from its ledger row, so metrics and ledger
always agree. Labels are bounded: models are validated catalogue names (or ``provider/model``
names an operator allowed), never free text from a failed request.
"""

from __future__ import annotations

import bisect
import gc
import math
from collections.abc import Callable, Iterable

from .._catalog import Deployment
from .storage import UsageRow


def model_label(dep: Deployment) -> str:
    """A deployment's model as a label value: its catalogue name, or ``provider/other`` for
    names passed through to a provider (``openai/anything``), which a client chooses."""
    return dep.model if getattr(dep, "catalogued", True) else f"{dep.provider}/other"


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

Labels = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Labels, values: Labels, extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(x: float) -> str:
    if not math.isfinite(x):  # the text format's spellings (a sum can overflow)
        return "NaN" if math.isnan(x) else ("+Inf" if x > 0 else "-Inf")
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    return repr(float(x))


class Counter:
    def __init__(self, name: str, help: str, labels: Labels) -> None:
        self.name, self.help, self.labels = name, help, labels
        self.values: dict[Labels, float] = {}

    def inc(self, values: Labels, amount: float = 1.0) -> None:
        self.values[values] = self.values.get(values, 0.0) + amount

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        for values, v in sorted(self.values.items()):
            yield f"{self.name}{_labels(self.labels, values)} {_num(v)}"


class Histogram:
    def __init__(self, name: str, help: str, labels: Labels, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.labels, self.buckets = name, help, labels, buckets
        self.values: dict[Labels, list[float]] = {}  # bucket counts..., sum, count

    def observe(self, values: Labels, x: float) -> None:
        row = self.values.get(values)
        if row is None:
            row = self.values[values] = [0.0] * (len(self.buckets) + 2)
        i = bisect.bisect_left(self.buckets, x)
        if i < len(self.buckets):
            row[i] += 1
        row[-2] += x
        row[-1] += 1

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        for values, row in sorted(self.values.items()):
            cumulative = 0.0
            for bound, n in zip(self.buckets, row):
                cumulative += n
                le = f'le="{_num(bound)}"'
                yield f"{self.name}_bucket{_labels(self.labels, values, le)} {_num(cumulative)}"
            inf = 'le="+Inf"'
            yield f"{self.name}_bucket{_labels(self.labels, values, inf)} {_num(row[-1])}"
            yield f"{self.name}_sum{_labels(self.labels, values)} {_num(row[-2])}"
            yield f"{self.name}_count{_labels(self.labels, values)} {_num(row[-1])}"


class Metrics:
    def __init__(self) -> None:
        self.requests = Counter(
            "lunar_requests_total",
            "Inference requests by route, requested model, provider and outcome.",
            ("route", "model", "provider", "status", "code"),
        )
        self.errors = Counter(
            "lunar_errors_total",
            "Failed or refused inference requests by error type.",
            ("route", "model", "type"),
        )
        self.tokens = Counter(
            "lunar_tokens_total",
            "Tokens by model, provider and kind (prompt, completion, cached, cache_write).",
            ("model", "provider", "kind"),
        )
        self.cost = Counter(
            "lunar_cost_usd_total",
            "Cost in USD by model and provider (as priced by the catalogue).",
            ("model", "provider"),
        )
        self.ttft = Histogram(
            "lunar_ttft_seconds",
            "Time to first token of successful requests.",
            ("model", "provider"),
            TTFT_BUCKETS,
        )
        self.latency = Histogram(
            "lunar_request_duration_seconds",
            "Duration of inference requests, first byte in to last byte out.",
            ("route", "model", "provider"),
            LATENCY_BUCKETS,
        )
        self.auth_failures = Counter(
            "lunar_auth_failures_total",
            "Requests refused before any key was identified.",
            ("reason",),
        )
        self.in_flight = 0
        self.gauges: list[tuple[str, str, Callable[[], float], str]] = []

    def observe(self, row: UsageRow, model: str, served: str) -> None:
        """Count a finished request. ``model`` and ``served`` are label values the caller
        bounded (catalogue names, ``provider/other`` for uncatalogued ones, "" when the
        model did not resolve), so free text from a request never becomes a label."""
        provider = row.provider or ""
        self.requests.inc((row.route, model, provider, row.status, str(row.http_status)))
        if row.status != "ok":
            self.errors.inc((row.route, model, row.error_type or row.status))
        served = served or model
        if row.prompt_tokens:
            self.tokens.inc((served, provider, "prompt"), row.prompt_tokens)
        if row.completion_tokens:
            self.tokens.inc((served, provider, "completion"), row.completion_tokens)
        if row.cached_tokens:
            self.tokens.inc((served, provider, "cached"), row.cached_tokens)
        if row.cache_write_tokens:
            self.tokens.inc((served, provider, "cache_write"), row.cache_write_tokens)
        if row.total_cost_usd:
            self.cost.inc((served, provider), row.total_cost_usd)
        if row.status == "ok" and row.ttft_ms is not None:
            self.ttft.observe((served, provider), row.ttft_ms / 1000)
        if row.latency_ms is not None:
            self.latency.observe((row.route, model, provider), row.latency_ms / 1000)

    def gauge(self, name: str, help: str, read: Callable[[], float], kind: str = "gauge") -> None:
        """A value read when metrics are rendered (``kind="counter"``: a total kept
        elsewhere, such as the ledger writer's)."""
        self.gauges.append((name, help, read, kind))

    def render(self) -> bytes:
        lines: list[str] = []
        for metric in (self.requests, self.errors, self.tokens, self.cost, self.auth_failures):
            lines.extend(metric.render())
        lines.extend(self.ttft.render())
        lines.extend(self.latency.render())
        lines.append("# HELP lunar_in_flight_requests Inference requests being served.")
        lines.append("# TYPE lunar_in_flight_requests gauge")
        lines.append(f"lunar_in_flight_requests {self.in_flight}")
        for name, help, read, kind in self.gauges:
            lines.append(f"# HELP {name} {help}")
            lines.append(f"# TYPE {name} {kind}")
            lines.append(f"{name} {_num(read())}")
        lines.extend(_gc_lines())
        return ("\n".join(lines) + "\n").encode()


# The cyclic GC's counters, by generation, under the names Prometheus' Python client uses.
# Objects it collects are reference cycles the request path should not make; its collections
# pause every request in flight.
_GC_COUNTERS = (
    ("python_gc_collections_total", "collections", "Collections of the cyclic GC."),
    ("python_gc_objects_collected_total", "collected", "Objects the cyclic GC freed."),
    (
        "python_gc_objects_uncollectable_total",
        "uncollectable",
        "Uncollectable objects the cyclic GC found.",
    ),
)


def _gc_lines() -> Iterable[str]:
    stats = gc.get_stats()
    for name, field, help in _GC_COUNTERS:
        yield f"# HELP {name} {help}"
        yield f"# TYPE {name} counter"
        for generation, counts in enumerate(stats):
            yield f'{name}{{generation="{generation}"}} {counts[field]}'
