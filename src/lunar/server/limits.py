"""Per-key limits: requests per minute, tokens per minute, and a budget in USD.

Admission reserves before the request runs and settles after it with what it really used,
so a burst cannot overshoot: every admitted request holds its share (one request slot, its
estimated tokens, its estimated cost) from the moment it is admitted.

* rpm: a sliding-window log; admitted iff fewer than ``rpm`` requests started in the window.
* tpm: the tokens of requests started in the window (estimates while in flight, the real
  total once settled); admitted iff the estimate fits in what is left (a request larger
  than the whole limit is admitted only into an empty window, so it can ever run).
* budget: spent (from the ledger, plus settled costs) + reserved (estimates in flight) +
  this request's estimate must not exceed the budget.

``InMemoryLimiter`` is correct for one gateway process: ``admit`` and ``settle`` never
await, so on one event loop they are atomic. A shared backend (Redis) implements the same
``Limiter`` interface for several gateway processes.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from .._catalog import Catalog, Prices
from .._engine import choices_asked, estimate_tokens, prompt_chars
from .._errors import NotFoundError
from .storage import KeyRecord

__all__ = [
    "UNUSED",
    "Estimate",
    "InMemoryLimiter",
    "Limiter",
    "Refusal",
    "Ticket",
    "estimate",
    "needs_estimate",
]


class Estimate:
    """What a request may use, known before it runs."""

    __slots__ = ("cost_usd", "output_tokens", "prompt_tokens", "unpriced")

    def __init__(
        self, prompt_tokens: int, output_tokens: int, cost_usd: float, unpriced: str | None = None
    ) -> None:
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.cost_usd = cost_usd
        #: The first candidate model that may answer with no price (its cost unknown).
        self.unpriced = unpriced

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens


def estimate(
    body: Mapping[str, Any],
    candidates: Iterable[tuple[str, str | None]],
    catalog: Catalog,
    default_output_tokens: int,
) -> Estimate:
    """Prompt tokens (~4 characters a token), output tokens (``max_tokens``, else
    ``default_output_tokens``, for each of the ``n`` choices asked; for each model at most
    its maximum output, which is all it is asked for) and the dearest cost among the
    models that may answer (``candidates``: ``(model, provider)``, the primary and its
    fallbacks)."""
    prompt = estimate_tokens(prompt_chars(body))
    asked = body.get("max_completion_tokens") or body.get("max_tokens") or default_output_tokens
    if not isinstance(asked, int) or isinstance(asked, bool):
        asked = default_output_tokens
    n = choices_asked(body)
    tier = body.get("service_tier")  # what it is billed at if that tier serves it
    if type(tier) is not str:
        tier = None
    most = 0  # the most output any of the models may give, each within its maximum
    dearest = 0.0
    unpriced = None
    for name, provider in candidates:
        try:
            deployments = catalog.resolve(name, provider)
        except NotFoundError:
            continue
        for dep in deployments:
            limit = dep.max_output_tokens
            out = asked if limit is None or asked <= limit else limit
            most = max(most, out)
            if dep.prices is not None:
                dearest = max(dearest, _cost(dep.prices.at(tier), prompt, out * n))
            elif unpriced is None:
                unpriced = name
    return Estimate(prompt, (most or asked) * n, dearest, unpriced)


#: What a request is taken to need when its key has no token or budget limit: nothing reads
#: it, so the estimate (a walk of the prompt and a price lookup per candidate, ~3 % of the
#: gateway's CPU per request) is skipped. Shared by every such request: read it, never
#: write it.
UNUSED = Estimate(0, 0, 0.0)


def needs_estimate(key: KeyRecord) -> bool:
    """Whether ``admit`` reads the estimate for ``key``: only token and budget limits do."""
    return key.tpm is not None or key.budget_usd is not None


def _cost(prices: Prices, prompt: int, out: int) -> float:
    return (prompt * prices.input + out * prices.output) / 1e6


class Refusal:
    """Why a request was not admitted: HTTP 429, with ``retry_after`` seconds when waiting
    helps (rate limits) and ``None`` when it does not (budget)."""

    __slots__ = ("code", "message", "retry_after", "type")

    def __init__(self, message: str, code: str, type: str, retry_after: float | None) -> None:
        self.message = message
        self.code = code
        self.type = type
        self.retry_after = retry_after


class Ticket:
    """An admitted request's reservations, given back to ``settle``."""

    __slots__ = ("cost", "entry", "key_id", "settled")

    def __init__(self, key_id: str, entry: list[Any] | None, cost: float) -> None:
        self.key_id = key_id
        self.entry = entry  # [start time, tokens, still in the window]
        self.cost = cost
        self.settled = False


class Limiter(Protocol):
    """Admits requests against a key's limits. ``est`` is ``UNUSED`` when the key has no
    token or budget limit (``needs_estimate``): rpm alone does not read it."""

    def admit(self, key: KeyRecord, est: Estimate) -> Ticket | Refusal: ...

    def settle(self, ticket: Ticket, tokens: int, cost_usd: float) -> None: ...

    def load_spend(self, spend: Mapping[str, float]) -> None: ...

    def spent(self, key_id: str) -> float: ...


class _KeyState:
    __slots__ = ("requests", "reserved", "spent", "token_sum", "tokens")

    def __init__(self) -> None:
        self.requests: deque[float] = deque()
        self.tokens: deque[list[Any]] = deque()
        self.token_sum = 0
        self.spent = 0.0
        self.reserved = 0.0


def _money(x: float) -> str:
    return f"${x:.6f}".rstrip("0").rstrip(".") if x else "$0"


class InMemoryLimiter:
    def __init__(
        self, window_seconds: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window = float(window_seconds)
        self._clock = clock
        self._state: dict[str, _KeyState] = {}

    def _get(self, key_id: str) -> _KeyState:
        st = self._state.get(key_id)
        if st is None:
            st = self._state[key_id] = _KeyState()
        return st

    def load_spend(self, spend: Mapping[str, float]) -> None:
        for key_id, amount in spend.items():
            self._get(key_id).spent = amount

    def spent(self, key_id: str) -> float:
        st = self._state.get(key_id)
        return 0.0 if st is None else st.spent

    def reserved(self, key_id: str) -> float:
        st = self._state.get(key_id)
        return 0.0 if st is None else st.reserved

    def _prune(self, st: _KeyState, now: float) -> None:
        horizon = now - self.window
        requests = st.requests
        while requests and requests[0] <= horizon:
            requests.popleft()
        tokens = st.tokens
        while tokens and tokens[0][0] <= horizon:
            entry = tokens.popleft()
            entry[2] = False
            st.token_sum -= entry[1]

    def _wait(self, started: float, now: float) -> float:
        return max(1.0, math.ceil(started + self.window - now))

    def admit(self, key: KeyRecord, est: Estimate) -> Ticket | Refusal:
        rpm, tpm, budget = key.rpm, key.tpm, key.budget_usd
        if rpm is None and tpm is None and budget is None:
            return Ticket(key.id, None, 0.0)
        now = self._clock()
        st = self._get(key.id)
        self._prune(st, now)
        window = f"{self.window:g} s" if self.window != 60 else "minute"
        if rpm is not None and len(st.requests) >= rpm:
            return Refusal(
                f"Rate limit reached for key '{key.name}': {rpm} requests per {window}. "
                "Retry after the time in the Retry-After header, or ask for a higher rpm.",
                "rate_limit_exceeded",
                "rate_limit_error",
                self._wait(st.requests[0], now),
            )
        need = est.tokens
        if tpm is not None and st.tokens and st.token_sum + need > tpm:
            # The earliest time enough tokens leave the window.
            freed, wait_from = st.token_sum + need - tpm, st.tokens[0][0]
            for t, n, _ in st.tokens:
                freed -= n
                wait_from = t
                if freed <= 0:
                    break
            return Refusal(
                f"Token rate limit reached for key '{key.name}': {tpm} tokens per {window} "
                f"({st.token_sum} used or reserved, this request needs about {need}). "
                "Retry after the time in the Retry-After header, or lower max_tokens.",
                "tokens_rate_limit_exceeded",
                "rate_limit_error",
                self._wait(wait_from, now),
            )
        cost = est.cost_usd
        if budget is not None:
            committed = st.spent + st.reserved
            if committed >= budget or committed + cost > budget:
                in_flight = (
                    f", {_money(st.reserved)} reserved by requests in flight" if st.reserved else ""
                )
                if st.spent >= budget:
                    message = (
                        f"Budget exhausted for key '{key.name}': {_money(st.spent)} spent of "
                        f"{_money(budget)}. Ask an admin for a new key or a higher budget."
                    )
                else:
                    message = (
                        f"Budget of {_money(budget)} for key '{key.name}' would be exceeded: "
                        f"{_money(st.spent)} spent{in_flight}, and this request may cost up "
                        f"to {_money(cost)}. Lower max_tokens, or ask for a higher budget."
                    )
                return Refusal(message, "budget_exceeded", "insufficient_quota", None)
        entry: list[Any] | None = None
        if rpm is not None:
            st.requests.append(now)
        if tpm is not None:
            entry = [now, need, True]
            st.tokens.append(entry)
            st.token_sum += need
        if budget is not None:
            st.reserved += cost
        else:
            cost = 0.0
        return Ticket(key.id, entry, cost)

    def settle(self, ticket: Ticket, tokens: int, cost_usd: float) -> None:
        if ticket.settled:
            return
        ticket.settled = True
        st = self._get(ticket.key_id)
        entry = ticket.entry
        if entry is not None and entry[2]:
            st.token_sum += tokens - entry[1]
            entry[1] = tokens
        if ticket.cost:
            st.reserved = max(0.0, st.reserved - ticket.cost)
        st.spent += cost_usd
