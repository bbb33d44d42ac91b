"""The engine: model resolution, retries, fallbacks, timing and cost, in one place.

The policy is pure and shared (``Router`` builds the chain of targets, ``Plan`` decides what
to try next and how long to wait, ``StreamFinisher`` puts usage, cost and timing on the final
chunk). Only the loops that wait on the network exist twice: ``SyncEngine`` and
``AsyncEngine``. The gateway runs ``AsyncEngine`` too.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import json
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from ._catalog import Catalog, Deployment, ProviderSpec, checked_base_url, cost, scaled_round
from ._errors import (
    MAX_RETRY_AFTER_SECONDS,
    APIConnectionError,
    APIError,
    APITimeoutError,
    Attempt,
    AuthenticationError,
    BadRequestError,
    ClientClosedError,
    GatewayTimeoutError,
    LunarError,
    NotFoundError,
    UnprocessableEntityError,
    retry_after_seconds,
)
from ._health import Health
from ._http import AsyncPool, HeaderDefaults, Timeouts, TransportError, TransportTimeout
from ._json import loads
from ._request import TIMEOUT_HEADER, RequestOptions
from ._types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChoiceDelta,
    ChunkChoice,
    ChunkEncoder,
    Usage,
)
from .providers import Adapter, HTTPRequest, StreamTranslator, Target, adapter_for
from .providers._shared import MISSHAPEN, PromptCount, bad_answer, misshapen

if TYPE_CHECKING:
    from .providers.openai import PlainRelay, RelaySink

_now = time.perf_counter

# ---------------------------------------------------------------------------------------------
# Where to send: the chain of targets for one request


class Router:
    """Turns a model name plus fallbacks into the ordered targets to try, with credentials
    and endpoints from explicit overrides first, then ``{PROVIDER}_API_KEY`` /
    ``{PROVIDER}_BASE_URL`` from the environment, then the catalogue's defaults. A base URL
    of ``providers=`` that is no URL raises ``ValueError`` here; one of the environment or
    the catalogue is the error of the provider's targets (see ``base_url``)."""

    def __init__(
        self,
        catalog: Catalog,
        providers: Mapping[str, Mapping[str, Any]] | None = None,
        fallbacks: Mapping[str, list[str]] | None = None,
        remote: Target | None = None,
        environ: Mapping[str, str] | None = None,
        health: Health | None = None,
    ) -> None:
        self.catalog = catalog
        self.health = health or Health()
        self.overrides = {k: dict(v) for k, v in (providers or {}).items()}
        for name, override in self.overrides.items():
            url = override.get("base_url")
            if url:  # (None and "" leave it to the environment, then the catalogue)
                setting = f"providers['{name}']['base_url']"
                if not isinstance(url, str):
                    raise ValueError(f"{setting} must be a string, got {url!r}")
                override["base_url"] = checked_base_url(url, setting)
        self.fallbacks = {k: list(v) for k, v in (fallbacks or {}).items()}
        self.remote = remote
        self._environ = os.environ if environ is None else environ
        self._targets: dict[Deployment, Target] = {}
        #: Per provider, its adapter's ``refusal`` hook, or None (only the local one has one).
        self._refusal_hooks: dict[str, Callable[[Mapping[str, Any]], LunarError | None] | None]
        self._refusal_hooks = {}

    def with_fallbacks(self, fallbacks: Mapping[str, list[str]]) -> Router:
        """A router with these fallbacks instead, sharing this one's catalogue, health and
        everything else (a client's ``with_options(fallbacks=...)``)."""
        router = copy.copy(self)
        router.fallbacks = {k: list(v) for k, v in fallbacks.items()}
        return router

    def chain(
        self, opts: RequestOptions, body: Mapping[str, Any] | None = None
    ) -> list[tuple[str, Target | LunarError]]:
        """``(model, target or the reason it cannot be tried)`` in the order to try them:
        the model's deployments ranked by health, then each fallback's; deployments whose
        breaker is open go last. An unknown primary model, or one that cannot take what the
        request needs (tools, images, ``n`` > 1 choices, what its adapter refuses), raises at
        once: that is bad input, not an outage. A fallback that cannot is kept as the reason
        it is skipped."""
        if self.remote is not None:
            dep = Deployment(opts.model, "lunar", opts.model, None, catalogued=False)
            return [
                (
                    opts.model,
                    Target(dep, self.remote.spec, self.remote.base_url, None, self.remote.headers),
                )
            ]
        fallbacks = (
            opts.fallbacks if opts.fallbacks is not None else self.fallbacks.get(opts.model, [])
        )
        needs = requirements(body) if body is not None else frozenset()
        n = choices_asked(body) if body is not None else 1
        out: list[tuple[str, Target | LunarError]] = []
        cooling: list[tuple[str, Target | LunarError]] = []
        for i, name in enumerate([opts.model, *fallbacks]):
            try:
                deployments = self.catalog.resolve(name, opts.provider if i == 0 else None)
            except NotFoundError as e:
                if i == 0:
                    raise
                # Kept without its traceback, which holds this frame and so ``out``: a
                # cycle, even when the model before it serves.
                out.append((name, e.with_traceback(None)))
                continue
            missing = needs - deployments[0].capabilities if deployments[0].catalogued else None
            if missing:
                err = capability_error(name, missing)
                if i == 0:
                    raise err
                out.append((name, err))
                continue
            single = self.one_choice(deployments) if n > 1 else ()
            if single and len(single) == len(deployments):
                err = choices_error(name, n, single[0].provider)
                if i == 0:
                    raise err
                out.append((name, err))
                continue
            refused = self.refusals(deployments, body) if body is not None else {}
            if refused and len(refused) == len(deployments):
                refusal = refused[deployments[0]]
                if i == 0:
                    raise refusal
                out.append((name, refusal))
                continue
            for dep in self.health.rank(deployments, lambda d: d):
                if dep in single:
                    target: Target | LunarError = choices_error(name, n, dep.provider)
                else:
                    target = (refused.get(dep) if refused else None) or self.target(dep)
                entry = (name, target)
                (cooling if self.health.cooling_down(dep) else out).append(entry)
        return out + cooling

    def one_choice(self, deployments: list[Deployment]) -> list[Deployment]:
        """The deployments whose wire answers one choice per request (no ``n``)."""
        out = []
        for dep in deployments:
            spec = self.catalog.providers.get(dep.provider)
            if spec is not None and not adapter_for(spec.protocol).multiple_choices:
                out.append(dep)
        return out

    def refusals(
        self, deployments: list[Deployment], body: Mapping[str, Any]
    ) -> dict[Deployment, LunarError]:
        """What the deployments whose adapter checks a body itself (the local model: no
        logprobs, no tool messages, ...) refuse in this one, found before anything runs."""
        out: dict[Deployment, LunarError] = {}
        hooks = self._refusal_hooks
        stops = body.get("stop")
        # Several stop sequences: more than some providers take (``max_stop_sequences``).
        many = len(stops) if type(stops) is list and len(stops) > 1 else 0
        for dep in deployments:
            try:
                refusal = hooks[dep.provider]
            except KeyError:
                spec = self.catalog.providers.get(dep.provider)
                try:
                    adapter = adapter_for(spec.protocol) if spec else None
                except ImportError:  # a protocol Lunar lacks: its target() says so, if tried
                    adapter = None
                refusal = hooks[dep.provider] = getattr(adapter, "refusal", None)
            err = refusal(body) if refusal is not None else None
            if err is None and many:
                err = too_many_stops(dep, self.catalog.providers.get(dep.provider), many)
            if err is not None:
                # Without the traceback of its making: frames up to this one, and ``out``.
                out[dep] = err.with_traceback(None)
        return out

    def target(self, dep: Deployment) -> Target | LunarError:
        cached = self._targets.get(dep)
        if cached is not None:
            return cached
        made = self._make_target(dep)
        if isinstance(made, Target):
            self._targets[dep] = made
        # No target is asked again each time: a key set in the environment later is seen.
        # And so its error is made anew for each request: one object raised again and again
        # would grow its traceback by every raise (the frames, and what they hold, of every
        # request so far) and share its ``attempts`` between requests.
        return made

    def _make_target(self, dep: Deployment) -> Target | LunarError:
        """The target, or the error that says why there is none."""
        spec = self.catalog.providers.get(dep.provider)
        if spec is None:
            return NotFoundError(
                f"Unknown provider '{dep.provider}' for model '{dep.model}'", param="provider"
            )
        override = self.overrides.get(spec.name, {})
        unset = override.get("unset")  # the gateway's: a provider nothing set up
        if unset is not None:
            return NotFoundError(
                unset, param="model", code="provider_not_configured", provider=spec.name
            )
        env = self._environ
        api_key = override.get("api_key")
        if api_key is None and spec.api_key_env:
            api_key = env.get(spec.api_key_env)
            for alt in spec.api_key_env_alt:
                api_key = api_key or env.get(alt)
        if spec.key_required and not api_key:
            return missing_key_error(spec)
        base_url = self.base_url(spec)
        if not isinstance(base_url, str):
            return base_url
        headers = dict(override.get("headers") or {})
        return Target(dep, spec, base_url, api_key, headers)

    def base_url(self, spec: ProviderSpec) -> str | APIError:
        """Where requests to ``spec``'s provider go (``""`` for the local model, which needs
        none): ``providers=`` (checked by the constructor), else ``{NAME}_BASE_URL`` (the
        spaces around it dropped), else the catalogue's. Or the error naming the setting
        that is no URL to send to: said at once, where a request would fail to connect and
        be retried as if the provider were down."""
        if spec.protocol == "local":
            return ""
        url = self.overrides.get(spec.name, {}).get("base_url")
        if url:
            return str(url)
        setting = spec.base_url_env
        url = self._environ.get(setting, "").strip()
        if not url:
            if not spec.base_url:
                return APIError(
                    f"No base URL for provider '{spec.name}': set {setting} or pass "
                    f"providers={{'{spec.name}': {{'base_url': ...}}}}",
                    code=NO_BASE_URL,
                    provider=spec.name,
                )
            url, setting = spec.base_url, f"the catalogue's base_url of provider '{spec.name}'"
        try:
            return checked_base_url(url, setting)
        except ValueError as e:
            return APIError(str(e), code="invalid_base_url", provider=spec.name)


#: The code of the error of a provider with no base URL at all (``Router.base_url``).
NO_BASE_URL = "missing_base_url"


def requirements(body: Mapping[str, Any]) -> frozenset[str]:
    """Capabilities a request needs from a model: ``tools``, ``vision``."""
    needs = set()
    if body.get("tools"):
        needs.add("tools")
    for msg in body.get("messages", ()):
        content = msg.get("content")
        if isinstance(content, list) and any(
            isinstance(p, Mapping) and p.get("type") == "image_url" for p in content
        ):
            needs.add("vision")
            break
    return frozenset(needs)


def capability_error(model: str, missing: frozenset[str]) -> BadRequestError:
    what = {"tools": "tool calling (tools)", "vision": "image inputs (vision)"}
    names = " and ".join(what[m] for m in sorted(missing))
    return BadRequestError(
        f"Model '{model}' does not support {names}: choose a model that does "
        "(`lunar models` lists capabilities)",
        param="model",
        code="unsupported_capability",
    )


#: The code of ``too_many_stops``'s error (OpenAI's, for the same refusal).
TOO_MANY_STOPS = "array_above_max_length"


def too_many_stops(
    dep: Deployment, spec: ProviderSpec | None, count: int
) -> BadRequestError | None:
    """The error of ``count`` stop sequences sent to a provider that takes fewer (OpenAI 4,
    Gemini 5; Anthropic has no such small limit), else None."""
    limit = spec.max_stop_sequences if spec is not None else None
    if limit is None or count <= limit:
        return None
    return BadRequestError(
        f"'stop' has {count} stop sequences, and provider '{dep.provider}' (model "
        f"'{dep.model}') takes at most {limit}: send at most {limit}, or choose a model "
        "whose provider takes more (param: stop)",
        param="stop",
        code=TOO_MANY_STOPS,
        provider=dep.provider,
    )


def choices_asked(body: Mapping[str, Any]) -> int:
    """How many choices the request asks for (``n``, 1 when not given)."""
    n = body.get("n")
    return n if isinstance(n, int) and n > 1 else 1


def choices_error(model: str, n: int, provider: str) -> BadRequestError:
    return BadRequestError(
        f"Model '{model}' cannot give n={n} choices: provider '{provider}' answers one choice "
        "per request. Send n=1 (once for each answer you want), or choose a model whose "
        "provider supports n",
        param="n",
        code="unsupported_parameter",
        provider=provider,
    )


def wants_json(body: Mapping[str, Any]) -> bool:
    fmt = body.get("response_format")
    if fmt is None:  # the usual case, without the ABC check (Python code) for Mapping
        return False
    return isinstance(fmt, Mapping) and fmt.get("type") in ("json_object", "json_schema")


def body_for(body: Mapping[str, Any], target: Target) -> tuple[Mapping[str, Any], bool]:
    """The body to send to ``target``, and whether its output must be checked as JSON:
    for a model without native JSON mode, the response format becomes an instruction; an
    output budget beyond the model's maximum output is asked as that maximum."""
    dep = target.deployment
    limit = dep.max_output_tokens
    if limit is not None:
        body = within_output(body, limit)
    if not (wants_json(body) and dep.catalogued and "json" not in dep.capabilities):
        return body, False
    fmt = body["response_format"]
    instruction = "Respond with one valid JSON value and nothing else: no prose, no code fences."
    schema = (fmt.get("json_schema") or {}).get("schema")
    if schema:
        instruction += " It must conform to this JSON Schema: " + json.dumps(schema)
    new = {k: v for k, v in body.items() if k != "response_format"}
    new["messages"] = [{"role": "system", "content": instruction}, *body["messages"]]
    return new, True


def within_output(body: Mapping[str, Any], limit: int) -> Mapping[str, Any]:
    """``body`` with ``max_tokens`` and ``max_completion_tokens`` at most ``limit`` (the
    model's maximum output, from the catalogue): a budget beyond it is refused upstream (a
    400 that stopped the chain at a fallback with a smaller maximum), and the answer cannot
    be longer anyway. The same body when within it."""
    tokens, completion = body.get("max_tokens"), body.get("max_completion_tokens")
    if (tokens is None or tokens <= limit) and (completion is None or completion <= limit):
        return body
    capped = dict(body)
    if tokens is not None and tokens > limit:
        capped["max_tokens"] = limit
    if completion is not None and completion > limit:
        capped["max_completion_tokens"] = limit
    return capped


def check_json(text: str, target: Target) -> None:
    try:
        json.loads(text)
    except ValueError:
        raise UnprocessableEntityError(
            f"Model '{target.model}' did not return valid JSON (JSON mode is emulated for "
            f"this model by instruction): {text[:200]!r}",
            param="response_format",
            code="invalid_json_output",
            provider=target.provider,
        ) from None


def missing_key_error(spec: ProviderSpec) -> AuthenticationError:
    return AuthenticationError(
        f"No API key for provider '{spec.name}': set {spec.api_key_env} or pass "
        f"providers={{'{spec.name}': {{'api_key': ...}}}}",
        code="missing_api_key",
        provider=spec.name,
    )


# ---------------------------------------------------------------------------------------------
# What to try next: retries and fallbacks


def may_fall_back(err: LunarError) -> bool:
    """Fallbacks happen on 408, 409, 429, 5xx, connection errors and timeouts — never on
    other 4xx, where another model would be refused the same way."""
    if isinstance(err, APIConnectionError):
        return True
    if isinstance(err, APIError):
        status = err.status_code
        return status is None or status in (408, 409, 429) or status >= 500
    return False


def the_requests_fault(err: LunarError) -> bool:
    """A refusal of this request (malformed, too large, unprocessable), not a sign of the
    provider's health: counted, one caller's bad requests would move every caller's traffic
    off a healthy provider. (401, 403 and 404 still count: a deployment with a wrong key or
    a model it lacks fails every request.)"""
    return isinstance(err, APIError) and err.status_code in (400, 413, 422)


#: The ``code`` of the error an attempt cut at the request's deadline raises.
DEADLINE_EXCEEDED = "deadline_exceeded"


def deadline_error(model: str, target: Target, tried: bool) -> GatewayTimeoutError:
    """What the request's deadline running out raises (504): the caller's own limit, so no
    provider's health pays for it, and nothing more is tried."""
    what = "while waiting for" if tried else "before it could try"
    return GatewayTimeoutError(
        f"The request's deadline (the client's timeout, {TIMEOUT_HEADER}) ran out {what} "
        f"model '{model}' at provider '{target.provider}': retries and fallbacks stop "
        "there. Give the request a longer timeout if the answer takes longer",
        code=DEADLINE_EXCEEDED,
        provider=target.provider,
    )


def too_long_for(err: LunarError) -> bool:
    """The prompt does not fit this model's context window (another's may hold it)."""
    return isinstance(err, APIError) and err.code == "context_length_exceeded"


def backoff(retry: int, rand: Callable[[], float] = random.random) -> float:
    """Exponential backoff with jitter, as the official SDKs do: min(0.5 * 2**n, 8) x [0.75, 1]."""
    return min(0.5 * 2.0**retry, 8.0) * (1 - 0.25 * rand())


class Step:
    __slots__ = ("delay", "model", "target", "waited")

    def __init__(self, model: str, target: Target, delay: float, waited: float = 0.0) -> None:
        self.model = model
        self.target = target
        self.delay = delay
        #: Seconds from the request's start to this attempt's (after ``delay``): the time
        #: lost to the attempts before it, which is not this provider's.
        self.waited = waited


class Plan:
    """The attempts for one request. ``next()`` says what to try and how long to wait first;
    ``failed()`` is told what went wrong; ``error()`` is what to raise when nothing is left."""

    def __init__(
        self,
        chain: list[tuple[str, Target | LunarError]],
        max_retries: int,
        rand: Callable[[], float] = random.random,
        health: Health | None = None,
        started: float | None = None,
        primary: str | None = None,
        deadline: float | None = None,
    ) -> None:
        self._health = health
        #: ``perf_counter()`` time past which nothing is tried (``RequestOptions.deadline``).
        self.deadline = deadline
        self._started = _now() if started is None else started
        self._chain = chain
        #: The model asked for (the chain's first unless its deployments are cooling down).
        self._primary = primary if primary is not None else (chain[0][0] if chain else None)
        self._max_retries = max_retries
        self._rand = rand
        self._index = 0
        self._retries = 0
        self._delay = 0.0
        self._stopped = False
        self._last_tried: LunarError | None = None
        self._last_skipped: LunarError | None = None
        self.attempts: list[Attempt] = []

    def next(self) -> Step | None:
        while not self._stopped and self._index < len(self._chain):
            model, target = self._chain[self._index]
            if isinstance(target, LunarError):
                provider = getattr(target, "provider", None) or "?"
                self.attempts.append(Attempt(model, provider, target))
                self._last_skipped = target
                self._index += 1
                continue
            delay, self._delay = self._delay, 0.0
            if self.deadline is not None and _now() + delay >= self.deadline:
                # Out of time before this try (a retry or a fallback): kept as the reason.
                err = deadline_error(model, target, tried=False)
                self.attempts.append(Attempt(model, target.provider, err))
                self._last_skipped = err
                self._stopped = True
                return None
            waited = _now() + delay - self._started if self.attempts else 0.0
            return Step(model, target, delay, waited)
        return None

    def failed(self, step: Step, err: LunarError) -> None:
        relayed = err.attempts  # a Lunar gateway's (remote mode): the attempts it made
        if relayed:
            self.attempts += relayed
        else:
            self.attempts.append(Attempt(step.model, step.target.provider, err))
        previous, self._last_tried = self._last_tried, err
        if isinstance(err, ClientClosedError):  # not the provider's doing: nothing more
            self._stopped = True
            return
        if self.deadline is not None and getattr(err, "code", None) == DEADLINE_EXCEEDED:
            # Cut at the request's own deadline: no time is left for anything, and the
            # provider's health does not pay for the caller's limit.
            self._stopped = True
            return
        overload = may_fall_back(err)
        if self._health is not None and not the_requests_fault(err):
            self._health.failure(step.target.deployment, trips_breaker=overload)
        # A retry first: the provider may ask for one even on a 4xx (``x-should-retry``).
        if err.retryable and self._retries < self._max_retries:
            headers = getattr(err, "headers", None)
            wait = retry_after_seconds(headers) if headers else None
            if wait is None:
                wait = backoff(self._retries, self._rand)
            in_time = self.deadline is None or _now() + wait < self.deadline
            if wait <= MAX_RETRY_AFTER_SECONDS and in_time:
                self._retries += 1
                self._delay = wait
                return
        if not overload:  # another model would be refused the same way ...
            if step.model != self._primary and too_long_for(err):
                # ... but not for a prompt too long for this fallback's window: skipped, and
                # what led to it (an outage) stays the error to raise if nothing serves.
                self._last_tried, self._last_skipped = previous, err
            else:
                self._stopped = True
                return
        self._index += 1
        self._retries = 0

    def lost(self, step: Step, err: LunarError) -> LunarError:
        """A failure after the caller had chunks: nothing more is tried; ``err`` gets every
        attempt and is what to raise."""
        self.failed(step, err)
        err.attempts = self.attempts
        return err

    def got_through(self) -> None:
        """An attempt got through (its answer, or a stream's first chunk): the failures
        before it will not be raised, and their tracebacks go. A traceback holds the
        frames the error passed, and a frame its caller's, up to the engine's frame that
        holds this plan: kept, they would tie the plan, its attempts and the request's data
        (body, chunks) into a cycle that only the cyclic GC frees, after every retry or
        fallback that served."""
        if self.attempts:
            _drop_tracebacks(attempt.error for attempt in self.attempts)

    def release(self) -> None:
        """For a caller done with the request's errors (the gateway, once they are in its
        ledger): drops what still ties them into cycles, so reference counting frees the
        request at once: their tracebacks, and the ``attempts`` of the error raised, which
        hold that error itself."""
        for attempt in self.attempts:
            attempt.error.attempts = []
        _drop_tracebacks(attempt.error for attempt in self.attempts)

    def succeeded(self, step: Step, usage: Usage | None) -> None:
        """Health learns the serving attempt's own timing: ``usage`` counts from the
        request's start (what the caller waited), failed attempts and waits included."""
        if self._health is not None and usage is not None:
            ttft, latency = usage.ttft_ms, usage.latency_ms
            if step.waited and ttft is not None and latency is not None:
                ttft, latency = ttft - ms(step.waited), latency - ms(step.waited)
            self._health.success(step.target.deployment, ttft, latency)

    def error(self) -> LunarError:
        err = self._last_tried or self._last_skipped
        if err is None:
            err = LunarError("No model to try")
        err.attempts = self.attempts
        return err


# ---------------------------------------------------------------------------------------------
# Usage, cost and timing


def _drop_tracebacks(errors: Iterable[BaseException]) -> None:
    """Each error's traceback, and those of its causes and contexts, set to None, down to
    the exception the caller is handling, if any: called in an ``except`` block, the engine
    chains its errors to the caller's exception, whose traceback is the caller's own."""
    seen: set[int] = {id(sys.exc_info()[1])}
    todo: list[BaseException | None] = list(errors)
    while todo:
        err = todo.pop()
        if err is not None and id(err) not in seen:
            seen.add(id(err))
            err.__traceback__ = None
            todo += (err.__cause__, err.__context__)


def estimate_tokens(text_chars: int) -> int:
    """Rough token count (~4 characters a token) for upstreams that report no usage."""
    return (text_chars + 3) // 4


def prompt_chars(body: Mapping[str, Any]) -> int:
    total = 0
    for msg in body.get("messages", ()):
        content = msg.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p.get("text", "")) for p in content if isinstance(p, Mapping))
        calls = msg.get("tool_calls")
        if calls:  # an agent's history is mostly its calls' arguments and their results
            for call in calls:
                fn = call.get("function") if isinstance(call, Mapping) else None
                if isinstance(fn, Mapping) and isinstance(fn.get("arguments"), str):
                    total += len(fn["arguments"])
    return total


def ms(seconds: float) -> float:
    """Seconds as milliseconds to 3 decimals (see ``scaled_round``)."""
    return scaled_round(seconds * 1000, 1000)


def account(
    usage: Usage, target: Target, started: float, ttft: float | None, tier: str | None = None
) -> None:
    """Put cost (when the catalogue prices the deployment, at the prices of the service
    ``tier`` that answered) and timing on ``usage``."""
    prices = target.deployment.prices
    if prices is not None:
        cost(usage, prices.at(tier) if tier else prices)
    elapsed = _now() - started
    usage.latency_ms = ms(elapsed)
    usage.ttft_ms = ms(elapsed if ttft is None else ttft)


def _arguments_chars(calls: Iterable[Any]) -> int:
    """Characters of tool-call arguments (whole calls or stream deltas, which may lack a
    function): what a usage estimate counts beside the text."""
    return sum(len(c.function.arguments or "") for c in calls if c.function is not None)


def _answer_chars(message: ChatCompletionMessage) -> int:
    """What an estimate of the output counts: text, tool arguments and reasoning."""
    return (
        len(message.content or "")
        + _arguments_chars(message.tool_calls or ())
        + len(message.reasoning_content or "")
    )


def finish_completion(
    completion: ChatCompletion,
    target: Target,
    body: Mapping[str, Any],
    started: float,
    json_check: bool = False,
) -> ChatCompletion:
    if json_check:
        for choice in completion.choices:
            if not choice.message.tool_calls:
                check_json(choice.message.content or "", target)
    usage = completion.usage
    if usage is None:  # the provider sent none: estimate it from the text and tool arguments
        chars = sum(_answer_chars(c.message) for c in completion.choices)
        usage = completion.usage = Usage(
            estimate_tokens(prompt_chars(body)), estimate_tokens(chars)
        )
    completion.provider = completion.provider or target.provider
    account(usage, target, started, None, completion.service_tier)
    return completion


class StreamFinisher:
    """Hands chunks on as they come, except the one carrying ``finish_reason``: it is held
    until the stream ends so that usage (which OpenAI sends in a separate chunk after it),
    cost and timing can be put on it. The caller's last chunk thus has ``choices[0]`` and
    ``usage`` both, and a plain ``chunk.choices[0].delta.content`` loop never breaks."""

    __slots__ = (
        "_body",
        "_held",
        "_last",
        "_provisional",
        "_target",
        "_text",
        "_tier",
        "_tools",
        "_usage",
        "chars",
        "first_at",
        "started",
        "usage",
    )

    def __init__(
        self, target: Target, body: Mapping[str, Any], started: float, json_check: bool = False
    ) -> None:
        #: Text kept only when the output must be checked as JSON at the end.
        self._text: list[str] | None = [] if json_check else None
        self._tools = False  # an answer made of tool calls is not checked as JSON
        self._target = target
        self._body = body
        self.started = started
        self._held: ChatCompletionChunk | None = None
        #: The last chunk with choices: for ``end``'s envelope when no chunk finished. An
        #: event's dict when the gateway relayed it (``relayed``) without building it.
        self._last: ChatCompletionChunk | dict[str, Any] | None = None
        self._usage: Usage | None = None  # the provider's, when it sends one
        self._tier: str | None = None  # the service tier that answered, when it says
        #: ``_usage`` is what the provider told before any content (Anthropic's
        #: message_start, Gemini's first event): its prompt is exact, its output not yet.
        self._provisional = False
        #: What the stream has brought so far: characters of text and tool arguments, when
        #: the first of them came (``perf_counter``, like ``started``), and its priced usage
        #: once ``end`` or ``seen`` gave it (what the gateway's ledger bills).
        self.chars = 0
        self.first_at: float | None = None
        self.usage: Usage | None = None

    def push(self, chunks: list[ChatCompletionChunk]) -> list[ChatCompletionChunk]:
        out = []
        for chunk in chunks:
            if chunk.usage is not None:
                self._usage = chunk.usage
                self._tier = chunk.service_tier
                if not chunk.choices:
                    self._provisional = type(chunk) is PromptCount
                    continue
                self._provisional = False
            self._last = chunk
            if self._held is not None:
                out.append(self._held)
                self._held = None
            finishing = False
            for choice in chunk.choices:
                delta = choice.delta
                if delta.content:
                    self.chars += len(delta.content)
                    if self._text is not None and choice.index == 0:
                        self._text.append(delta.content)
                    if self.first_at is None:
                        self.first_at = _now()
                elif delta.reasoning_content:  # (looked at only when there is no text)
                    # Reasoning is output: billed, and the first token of the answer.
                    self.chars += len(delta.reasoning_content)
                    if self.first_at is None:
                        self.first_at = _now()
                if delta.tool_calls:
                    self._tools = True
                    self.chars += _arguments_chars(delta.tool_calls)
                    if self.first_at is None:
                        self.first_at = _now()
                if choice.finish_reason is not None:
                    finishing = True
            if finishing:
                self._held = chunk
            else:
                out.append(chunk)
        return out

    def relayable(self) -> bool:
        """Whether the gateway may relay the next events itself (``relayed``): nothing is
        held, and the text is not kept for a check at the end."""
        return self._held is None and self._text is None

    def relayed(self, event: dict[str, Any] | None, chars: int) -> None:
        """An event the gateway relayed without its chunk (``PlainRelay``): one choice, no
        usage, no tool call, no finish, ``chars`` of text; what ``push`` would note of it.
        ``event``: its dict, or ``None`` when it was the last one's but for its text."""
        if event is not None:
            self._last = event
        if chars:
            self.chars += chars
            if self.first_at is None:
                self.first_at = _now()

    def end(self) -> list[ChatCompletionChunk]:
        if self._text is not None and not self._tools:
            check_json("".join(self._text), self._target)
        final = self._held
        if final is None:
            # The upstream ended cleanly ([DONE]) but said no finish_reason (some OpenAI-
            # compatible servers): the answer is whole, so it finished as answers do, and the
            # caller's last chunk still has ``choices[0]``.
            seen = self._last
            last = (
                ChatCompletionChunk.from_dict(seen, self._target.provider)
                if isinstance(seen, dict)
                else seen
            )
            finished = ChunkChoice(0, ChoiceDelta(), "tool_calls" if self._tools else "stop")
            final = ChatCompletionChunk(
                id=last.id if last else "",
                created=last.created if last else int(time.time()),
                model=last.model if last else self._target.deployment.provider_model,
                choices=[finished],
                provider=self._target.provider,
            )
        final.usage = self._account()
        self._held = None
        return [final]

    def seen(self) -> Usage | None:
        """What the stream used as far as it got, priced and timed: the usage ``end`` gave;
        for a stream cut short, the provider's if it sent one, else an estimate from what
        came; None when nothing came."""
        if self.usage is None and (self._usage is not None or self.first_at is not None):
            told = self._usage
            if told is not None and self._provisional:
                # Cut before the provider said its output: what streamed, estimated (the
                # prompt stays the provider's count, its cached and cache-write parts too).
                out = max(told.completion_tokens, estimate_tokens(self.chars))
                told.completion_tokens = out
                told.total_tokens = told.prompt_tokens + out
            self._account()
        return self.usage

    def _account(self) -> Usage:
        """The provider's usage, or an estimate (prompt and what streamed), with cost and
        timing on it."""
        usage = self._usage
        if usage is None:
            usage = Usage(estimate_tokens(prompt_chars(self._body)), estimate_tokens(self.chars))
        ttft = None if self.first_at is None else self.first_at - self.started
        account(usage, self._target, self.started, ttft, self._tier)
        self.usage = usage
        return usage


# ---------------------------------------------------------------------------------------------
# The drivers: the only code that waits on the network


#: What a failed exchange with a provider raises, from either HTTP client.
NETWORK_ERRORS = (httpx.HTTPError, TransportError)


def connection_error(exc: Exception, target: Target) -> APIConnectionError:
    where = f"provider '{target.provider}' at {target.base_url}"
    if isinstance(exc, (httpx.TimeoutException, TransportTimeout)):
        return APITimeoutError(f"Timed out waiting for {where} ({type(exc).__name__})")
    detail = str(exc) or type(exc).__name__
    return APIConnectionError(f"Connection to {where} failed: {detail}")


def with_request_id(err: LunarError, resp: Any) -> LunarError:
    """``err``, raised while reading a stream's events, with the answer's request id (the
    provider's, or a gateway's) when it has no headers of its own: a mid-stream error
    keeps ``e.request_id`` as an error answer does."""
    headers = getattr(resp, "headers", None)
    if isinstance(err, APIError) and not err.headers and headers is not None:
        rid = headers.get("x-request-id") or headers.get("request-id")
        if rid:
            err.headers = {"x-request-id": rid}
    return err


def client_closed() -> ClientClosedError:
    return ClientClosedError(
        "This Lunar client is closed (close() was called, or its `with` block ended): "
        "create a new client to make more requests"
    )


def closed_error(closed: bool, http: Any, borrowed: bool = False) -> ClientClosedError | None:
    """What to raise for a request on a closed client (``closed``: ``close()`` was called),
    or on one whose HTTP client is closed (the caller's ``http_client``, closed by its
    owner; ``borrowed``: the pool of the client this one is a ``with_options()`` copy of,
    closed with it); ``None`` while both are open. Checked before anything is tried, so a
    closed client costs no attempt, no backoff and no provider's health."""
    if closed:
        return client_closed()
    if getattr(http, "is_closed", False):
        if borrowed:
            return ClientClosedError(
                "The Lunar client this one was copied from (with_options() or copy()) is "
                "closed, and with it the connections they share: create a new client"
            )
        return ClientClosedError(
            "The http_client given to this Lunar client is closed: keep it open while the "
            "client is in use, or create the client with an open one"
        )
    return None


def _timeout(opts: RequestOptions, default: httpx.Timeout | None) -> Any:
    """For httpx: the request's timeout, else the engine's, else the client's own."""
    if opts.timeout is not None:
        return opts.timeout
    return httpx.USE_CLIENT_DEFAULT if default is None else default


def pool_timeouts(timeout: httpx.Timeout | None) -> Timeouts | None:
    """A request's timeout as Lunar's pool takes it: httpx's ``read``, ``connect`` and
    ``pool``. ``write`` has no counterpart: the pool hands a request to the socket's buffer
    and never waits to write (a peer that stops reading shows as a read timeout)."""
    if timeout is None:
        return None
    return Timeouts(timeout.read, timeout.connect, timeout.pool)


def _headers(
    headers: dict[str, str], opts: RequestOptions, defaults: Mapping[str, str] | None = None
) -> Mapping[str, str]:
    """The target's headers, then the request's ``extra_headers``; under them, when given,
    the engine's ``defaults`` (names compared without case, as HTTP does)."""
    if defaults:
        merged = httpx.Headers(defaults)
        merged.update(headers)
        if opts.extra_headers:
            merged.update(opts.extra_headers)
        return merged
    if opts.extra_headers:
        headers = {**headers, **opts.extra_headers}
    return headers


def with_query(url: str, query: str) -> str:
    """The URL with a request's ``extra_query`` (encoded already) appended to its own."""
    return f"{url}{'&' if '?' in url else '?'}{query}"


def _httpx_request(
    http: httpx.Client | httpx.AsyncClient,
    req: HTTPRequest,
    opts: RequestOptions,
    defaults: Mapping[str, str] | None,
    timeout: httpx.Timeout | None,
    dropped: tuple[str, ...] = (),
) -> httpx.Request:
    """The request for an httpx client (the caller's, or Lunar's own sync one), with the
    engine's headers and timeout: they go with every request, as in the openai SDK.
    ``dropped``: default headers of the client's own that the engine's leave out (a
    ``with_options(set_default_headers=...)`` copy), unless the request sets them."""
    headers = _headers(req.headers, opts, defaults)
    request = http.build_request(
        req.method,
        req.url if opts.extra_query is None else with_query(req.url, opts.extra_query),
        headers=headers,
        content=req.content,
        timeout=_timeout(opts, timeout),
    )
    for name in dropped:
        if name not in headers:
            request.headers.pop(name, None)
    return request


def parse_answer(adapter: Adapter, content: bytes, target: Target) -> ChatCompletion:
    """The adapter's reading of a 2xx answer; one of the wrong shape is the provider's error
    (502), not the parser's ``AttributeError``."""
    try:
        return adapter.parse_response(content, target)
    except MISSHAPEN as exc:
        raise misshapen(target.provider, exc, content) from exc


def not_an_event_stream(headers: Mapping[str, str]) -> bool:
    """A 2xx answer to a stream request that is plainly something else: a JSON body (an
    error, or a whole answer from a server that ignored ``stream``) or a web page (a proxy's,
    a login portal's). Asked only of a stream that gave no chunk (on the way to an error),
    so a stream that works never decodes its headers for it."""
    ctype = headers.get("content-type") or ""
    return ctype.startswith(("application/json", "text/html"))


def unopened(
    err: LunarError, first: list[ChatCompletionChunk], resp: Any, seen: bytes, target: Target
) -> APIError | None:
    """A stream that failed before its first chunk (``err``, after ``seen`` bytes): the
    error to raise instead, when the answer was no event stream; else ``err``, with the
    answering server's request id, is raised as it is (None)."""
    if not first and not_an_event_stream(resp.headers):
        return stream_refused(resp.headers, seen, target)
    with_request_id(err, resp)
    return None


def stream_refused(headers: Mapping[str, str], content: bytes, target: Target) -> APIError:
    """What a stream request answered with no event stream raises, once it gave no chunk:
    the provider's error when the body is one (with a 200), else a 502 that shows what came
    instead (both retried and fallen back from, as a provider's fault)."""
    adapter = adapter_for(target.spec.protocol)
    try:
        answer = loads(content)
    except ValueError:
        answer = None
    if isinstance(answer, dict) and "error" in answer:
        return adapter.parse_error(502, headers, content, target)
    ctype = headers.get("content-type") or ""
    what = f"Provider '{target.provider}' answered a stream request with {ctype}"
    return bad_answer(target.provider, f"{what}, not an event stream", content)


def has_substance(chunks: list[ChatCompletionChunk]) -> bool:
    """Whether any chunk carries something for the caller. Providers send a role-only chunk
    before generating; committing to a provider waits for more, so a failure right after
    that empty chunk can still fall back."""
    for chunk in chunks:
        if chunk.usage is not None and chunk.choices:  # not the prompt's count told first
            return True
        for choice in chunk.choices:
            d = choice.delta
            if d.content or d.tool_calls or d.refusal or choice.finish_reason is not None:
                return True
    return False


class Trace:
    """What the engine did for one request, filled in as it goes. Pass one to ``complete`` or
    ``stream`` to observe a request (the gateway's ledger does): ``plan.attempts`` holds the
    failed attempts so far, ``target`` the target being tried, and after success the one
    that served; for a stream, ``stream`` counts what it brought (``StreamFinisher``), also
    when it is cut short."""

    __slots__ = ("plan", "stream", "target")

    def __init__(self) -> None:
        self.plan: Plan | None = None
        self.target: Target | None = None
        self.stream: StreamFinisher | None = None


def plan_for(
    router: Router,
    opts: RequestOptions,
    body: Mapping[str, Any],
    max_retries: int,
    trace: Trace | None,
    started: float | None = None,
) -> Plan:
    chain = router.chain(opts, body)
    if opts.max_retries is not None:
        max_retries = opts.max_retries
    plan = Plan(
        chain,
        max_retries,
        health=router.health,
        started=started,
        primary=opts.model,
        deadline=opts.deadline,
    )
    if trace is not None:
        trace.plan = plan
        trace.stream = None  # a Trace used again: nothing from its last request
    return plan


_T = TypeVar("_T")


async def within(attempt: Awaitable[_T], deadline: float, step: Step) -> _T:
    """``attempt``'s result, or the request's deadline error when it runs out first (the
    attempt is cancelled, which closes its upstream connection).

    An answer that is in when the deadline comes wins. The bytes that complete it wake the
    attempt through the event loop's queue of ready callbacks: cancelling the task in the
    deadline's own timer callback (as ``asyncio.timeout`` does) overrode a wake-up already
    queued, in the same turn of the loop or the one before, and threw the answer away for a
    504. So the cut is queued behind what is ready at the deadline: an attempt that finishes
    with it is not cut (``timer.reschedule`` to a time already past queues the cut)."""
    left = deadline - _now()
    if _asyncio_timeout is None:  # Python 3.10
        # wait_for runs the attempt as a task of its own, and when its time is up, takes
        # the task's result if it is done by then: a wake-up queued first has run.
        try:
            return await asyncio.wait_for(attempt, left)
        except asyncio.TimeoutError:
            raise deadline_error(step.model, step.target, tried=True) from None
    loop = asyncio.get_running_loop()
    timer = _asyncio_timeout(None)
    try:
        async with timer:
            cut = loop.call_later(left, _cut_soon, timer, loop)
            try:
                return await attempt
            finally:
                cut.cancel()
    except TimeoutError:
        if not timer.expired():
            raise
        raise deadline_error(step.model, step.target, tried=True) from None


def _cut_soon(timer: Any, loop: asyncio.AbstractEventLoop) -> None:
    """The deadline came: the cut goes behind the callbacks ready now."""
    timer.reschedule(loop.time())


_asyncio_timeout = getattr(asyncio, "timeout", None)


def build_request(
    adapter: Adapter, body: Mapping[str, Any], target: Target, stream: bool
) -> HTTPRequest:
    """The adapter's request for ``body``. A body nested deeper than the adapter's
    translation can recurse (a JSON Schema or tool arguments some hundreds of levels deep)
    is the caller's bad input, a 400, not a ``RecursionError``."""
    try:
        return adapter.build_request(body, target, stream=stream)
    except RecursionError:
        raise BadRequestError(
            f"The request is nested too deeply to be sent to provider '{target.provider}' "
            "(a schema, tool arguments or content hundreds of levels deep)",
            param=None,
            code="invalid_request",
        ) from None


def _in_process(adapter: Adapter) -> Any:
    """Adapters that run a model in this process (the local one) instead of sending HTTP."""
    return getattr(adapter, "in_process", None)


class _Opened:
    """The engine's iterator and the upstream response it reads, closed together."""

    __slots__ = ("_chunks", "_upstream")

    def __init__(self, chunks: Any, upstream: Any) -> None:
        self._chunks = chunks
        self._upstream = upstream


class OpenStream(_Opened):
    """What ``SyncEngine.stream`` returns: iterating runs the engine's loop; ``close()`` also
    closes the upstream response, even before the first read (closing a generator that
    never started skips its ``finally``)."""

    __slots__ = ()
    _chunks: Iterator[ChatCompletionChunk]

    def __iter__(self) -> OpenStream:
        return self

    def __next__(self) -> ChatCompletionChunk:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()  # type: ignore[attr-defined]
        self._upstream.close()


class AsyncOpenStream(_Opened):
    """``OpenStream`` for ``AsyncEngine.stream``. The engine hands the chunks on in batches,
    those one upstream read completed: ``batches()`` gives them so (the gateway writes each
    batch at once, so a read of several events costs one write, not one each), iterating
    gives them one by one. Use one or the other."""

    __slots__ = ("_ready", "relay")
    _chunks: AsyncIterator[list[ChatCompletionChunk]]

    def __init__(self, chunks: Any, upstream: Any) -> None:
        super().__init__(chunks, upstream)
        self._ready: collections.deque[ChatCompletionChunk] = collections.deque()
        #: Set by ``relay_to``.
        self.relay: tuple[ChunkEncoder, RelaySink] | None = None

    def relay_to(self, encoder: ChunkEncoder, sink: RelaySink) -> None:
        """Let the gateway relay plain events (an OpenAI stream's text deltas) from the
        upstream's reads straight to ``sink``, written as ``encoder`` writes their chunks,
        without building their chunks or waking the reader: ``batches()`` then gives only
        the rest, each batch after the bytes relayed before it (``PlainRelay``)."""
        self.relay = (encoder, sink)

    def batches(self) -> AsyncIterator[list[ChatCompletionChunk]]:
        if self._ready:
            raise RuntimeError("batches() after part of a batch was taken chunk by chunk")
        return self._chunks

    def __aiter__(self) -> AsyncOpenStream:
        return self

    async def __anext__(self) -> ChatCompletionChunk:
        ready = self._ready
        if not ready:
            ready.extend(await self._chunks.__anext__())
        return ready.popleft()

    async def aclose(self) -> None:
        self._ready.clear()  # closed means no more chunks, not the rest of the last read
        await self._chunks.aclose()  # type: ignore[attr-defined]
        await self._upstream.aclose()


class _Closable:
    """What both drivers do about a closed client."""

    http: Any
    #: Set by the client's ``close()``: every request then raises ``ClientClosedError``.
    closed = False
    #: ``http`` is the pool of another client (this one is its ``with_options()`` copy).
    borrowed = False
    headers: Mapping[str, str] | None
    timeout: httpx.Timeout | None
    #: Default headers of ``http``'s own that ``headers`` leave out (see ``_httpx_request``).
    dropped: tuple[str, ...]

    def _transport(
        self,
        headers: Mapping[str, str] | None,
        timeout: httpx.Timeout | None,
        dropped: Iterable[str],
        local_wait: float | None,
    ) -> None:
        self.headers = headers
        self.timeout = timeout
        self.dropped = tuple(dropped)
        self.local_wait = local_wait

    def ensure_open(self) -> None:
        if (err := closed_error(self.closed, self.http, self.borrowed)) is not None:
            raise err

    def _network_error(self, exc: Exception, target: Target) -> LunarError:
        """A failed exchange: the client closed under it, or the provider's connection."""
        return closed_error(self.closed, self.http, self.borrowed) or connection_error(exc, target)

    #: The client's read timeout, for the local model (which has no HTTP client to hold it).
    local_wait: float | None

    def _wait(self, opts: RequestOptions) -> float | None:
        """How long the local model may take for its next piece: the request's read
        timeout, else the client's."""
        return self.local_wait if opts.timeout is None else opts.timeout.read


class SyncEngine(_Closable):
    """``http`` is an ``httpx.Client``. ``headers`` and ``timeout``, when given, go with every
    request: what a caller's own client does not carry that Lunar's would (or what a
    ``with_options()`` copy changes of the client whose pool it shares)."""

    http: httpx.Client

    def __init__(
        self,
        router: Router,
        http: httpx.Client,
        max_retries: int = 2,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
        dropped: Iterable[str] = (),
        local_wait: float | None = None,
    ) -> None:
        self.router = router
        self.http = http
        self.max_retries = max_retries
        self._transport(headers, timeout, dropped, local_wait)

    def send(self, req: HTTPRequest, opts: RequestOptions, stream: bool) -> httpx.Response:
        """The response (its body read unless ``stream``)."""
        self.ensure_open()
        request = _httpx_request(self.http, req, opts, self.headers, self.timeout, self.dropped)
        return self.http.send(request, stream=stream)

    def complete(
        self, body: Mapping[str, Any], opts: RequestOptions, trace: Trace | None = None
    ) -> ChatCompletion:
        self.ensure_open()
        started = _now()
        plan = plan_for(self.router, opts, body, self.max_retries, trace, started)
        while (step := plan.next()) is not None:
            if trace is not None:
                trace.target = step.target
            if step.delay:
                time.sleep(step.delay)
            sent, json_check = body_for(body, step.target)
            try:
                completion = self._complete_once(step.target, sent, opts)
                completion = finish_completion(completion, step.target, body, started, json_check)
            except LunarError as err:
                plan.failed(step, err)
                continue
            plan.got_through()
            plan.succeeded(step, completion.usage)
            return completion
        raise plan.error()

    def _complete_once(
        self, target: Target, body: Mapping[str, Any], opts: RequestOptions
    ) -> ChatCompletion:
        adapter = adapter_for(target.spec.protocol)
        local = _in_process(adapter)
        if local is not None:
            result: ChatCompletion = local.complete(body, target, self._wait(opts))
            return result
        req = build_request(adapter, body, target, False)
        try:
            resp = self.send(req, opts, stream=False)
        except NETWORK_ERRORS as exc:
            raise self._network_error(exc, target) from exc
        if resp.status_code >= 400:
            raise adapter.parse_error(resp.status_code, resp.headers, resp.content, target)
        return parse_answer(adapter, resp.content, target)

    def stream(
        self, body: Mapping[str, Any], opts: RequestOptions, trace: Trace | None = None
    ) -> Iterator[ChatCompletionChunk]:
        """Connects and waits for the first chunk before returning (falling back while
        nothing has reached the caller); the iterator then yields every chunk as it comes."""
        self.ensure_open()
        started = _now()
        plan = plan_for(self.router, opts, body, self.max_retries, trace, started)
        while (step := plan.next()) is not None:
            if trace is not None:
                trace.target = step.target
            if step.delay:
                time.sleep(step.delay)
            sent, json_check = body_for(body, step.target)
            try:
                opened = self._open(step.target, sent, opts)
            except LunarError as err:
                plan.failed(step, err)
                continue
            plan.got_through()
            finisher = StreamFinisher(step.target, body, started, json_check)
            if trace is not None:
                trace.stream = finisher
            return OpenStream(self._iterate(step, opened, finisher, plan), opened[0])
        raise plan.error()

    def _open(
        self, target: Target, body: Mapping[str, Any], opts: RequestOptions
    ) -> tuple[Any, Iterator[Any], StreamTranslator | None, list[ChatCompletionChunk]]:
        adapter = adapter_for(target.spec.protocol)
        local = _in_process(adapter)
        if local is not None:
            wait = self._wait(opts)
            batches: Iterator[list[ChatCompletionChunk]] = local.stream(body, target, wait)
            try:
                head = next(batches, [])
            except BaseException:
                batches.close()  # type: ignore[attr-defined]
                raise
            return batches, batches, None, head
        req = build_request(adapter, body, target, True)
        resp = None
        try:
            resp = self.send(req, opts, stream=True)
            if resp.status_code >= 400:
                resp.read()
                raise adapter.parse_error(resp.status_code, resp.headers, resp.content, target)
            translator = adapter.stream_translator(target)
            raw = resp.iter_bytes()
            first: list[ChatCompletionChunk] = []
            seen = b""  # the bytes while no chunk came: shown if they were no event stream
            try:
                for data in raw:
                    if not first:
                        seen += data
                    first += translator.feed(data)
                    if has_substance(first):
                        break
                else:
                    first += translator.close()
                    translator = None  # type: ignore[assignment]
            except LunarError as err:
                if (refused := unopened(err, first, resp, seen, target)) is not None:
                    raise refused from None
                raise
            return resp, raw, translator, first
        except NETWORK_ERRORS as exc:
            if resp is not None:
                resp.close()
            raise self._network_error(exc, target) from exc
        except BaseException:
            if resp is not None:
                resp.close()
            raise

    def _iterate(
        self,
        step: Step,
        opened: tuple[Any, Iterator[Any], StreamTranslator | None, list[ChatCompletionChunk]],
        finisher: StreamFinisher,
        plan: Plan,
    ) -> Iterator[ChatCompletionChunk]:
        resp, raw, translator, first = opened
        try:
            yield from finisher.push(first)
            if translator is None:  # in-process: batches of chunks already
                for batch in raw:
                    if self.closed:  # close() ends every stream of the client
                        raise client_closed()
                    yield from finisher.push(batch)
            else:
                for data in raw:
                    if self.closed:  # with a caller's http_client, still open
                        raise client_closed()
                    chunks = translator.feed(data)
                    if chunks:
                        yield from finisher.push(chunks)
                yield from finisher.push(translator.close())
            final = finisher.end()
            plan.succeeded(step, final[0].usage)
            yield from final
        except NETWORK_ERRORS as exc:
            raise plan.lost(step, self._network_error(exc, step.target)) from exc
        except LunarError as err:
            plan.lost(step, with_request_id(err, resp))
            raise
        finally:
            resp.close()


class AsyncEngine(_Closable):
    """``http`` is Lunar's own pool (``_http.AsyncPool``) or any ``httpx.AsyncClient``.
    ``headers`` and ``timeout``, when given, go with every request sent with httpx: what a
    caller's own client does not carry that Lunar's would."""

    http: AsyncPool | httpx.AsyncClient

    def __init__(
        self,
        router: Router,
        http: AsyncPool | httpx.AsyncClient,
        max_retries: int = 2,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
        dropped: Iterable[str] = (),
        local_wait: float | None = None,
    ) -> None:
        self.router = router
        self.http = http
        self.max_retries = max_retries
        self._transport(headers, timeout, dropped, local_wait)
        # Lunar's own pool has its headers and timeouts: these replace them when given.
        self._pool_defaults = None if headers is None else HeaderDefaults(headers)
        self._pool_timeouts = pool_timeouts(timeout)

    async def send(self, req: HTTPRequest, opts: RequestOptions, stream: bool) -> Any:
        """The response (its body read unless ``stream``): ``status_code``, ``headers``,
        ``content``, ``aread()``, ``aiter_bytes()``, ``aclose()`` from either client."""
        self.ensure_open()
        if isinstance(self.http, AsyncPool):  # Lunar's own: its headers and timeouts set
            timeout = opts.timeout
            return await self.http.send(
                req.method,
                req.url if opts.extra_query is None else with_query(req.url, opts.extra_query),
                _headers(req.headers, opts),
                req.content,
                stream=stream,
                timeout=self._pool_timeouts if timeout is None else pool_timeouts(timeout),
                defaults=self._pool_defaults,
            )
        request = _httpx_request(self.http, req, opts, self.headers, self.timeout, self.dropped)
        return await self.http.send(request, stream=stream)

    async def complete(
        self, body: Mapping[str, Any], opts: RequestOptions, trace: Trace | None = None
    ) -> ChatCompletion:
        self.ensure_open()
        started = _now()
        plan = plan_for(self.router, opts, body, self.max_retries, trace, started)
        while (step := plan.next()) is not None:
            if trace is not None:
                trace.target = step.target
            if step.delay:
                await asyncio.sleep(step.delay)
            sent, json_check = body_for(body, step.target)
            try:
                answer = self._complete_once(step.target, sent, opts)
                if plan.deadline is None:
                    completion = await answer
                else:
                    completion = await within(answer, plan.deadline, step)
                completion = finish_completion(completion, step.target, body, started, json_check)
            except LunarError as err:
                plan.failed(step, err)
                continue
            plan.got_through()
            plan.succeeded(step, completion.usage)
            return completion
        raise plan.error()

    async def _complete_once(
        self, target: Target, body: Mapping[str, Any], opts: RequestOptions
    ) -> ChatCompletion:
        adapter = adapter_for(target.spec.protocol)
        local = _in_process(adapter)
        if local is not None:
            result: ChatCompletion = await local.acomplete(body, target, self._wait(opts))
            return result
        req = build_request(adapter, body, target, False)
        try:
            resp = await self.send(req, opts, stream=False)
        except NETWORK_ERRORS as exc:
            raise self._network_error(exc, target) from exc
        if resp.status_code >= 400:
            raise adapter.parse_error(resp.status_code, resp.headers, resp.content, target)
        return parse_answer(adapter, resp.content, target)

    async def stream(
        self, body: Mapping[str, Any], opts: RequestOptions, trace: Trace | None = None
    ) -> AsyncOpenStream:
        self.ensure_open()
        started = _now()
        plan = plan_for(self.router, opts, body, self.max_retries, trace, started)
        while (step := plan.next()) is not None:
            if trace is not None:
                trace.target = step.target
            if step.delay:
                await asyncio.sleep(step.delay)
            sent, json_check = body_for(body, step.target)
            try:
                opening = self._open(step.target, sent, opts)
                if plan.deadline is None:
                    opened = await opening
                else:
                    opened = await within(opening, plan.deadline, step)
            except LunarError as err:
                plan.failed(step, err)
                continue
            plan.got_through()
            finisher = StreamFinisher(step.target, body, started, json_check)
            if trace is not None:
                trace.stream = finisher
            stream = AsyncOpenStream(None, opened[0])
            stream._chunks = self._iterate(step, opened, finisher, plan, stream)
            return stream
        raise plan.error()

    async def _open(
        self, target: Target, body: Mapping[str, Any], opts: RequestOptions
    ) -> tuple[Any, AsyncIterator[Any], StreamTranslator | None, list[ChatCompletionChunk]]:
        adapter = adapter_for(target.spec.protocol)
        local = _in_process(adapter)
        if local is not None:
            wait = self._wait(opts)
            batches: AsyncIterator[list[ChatCompletionChunk]] = local.astream(body, target, wait)
            try:
                head: list[ChatCompletionChunk] = await anext(batches, [])
            except BaseException:
                await batches.aclose()  # type: ignore[attr-defined]
                raise
            return batches, batches, None, head
        req = build_request(adapter, body, target, True)
        resp = None
        try:
            resp = await self.send(req, opts, stream=True)
            if resp.status_code >= 400:
                await resp.aread()
                raise adapter.parse_error(resp.status_code, resp.headers, resp.content, target)
            translator = adapter.stream_translator(target)
            raw = resp.aiter_bytes()
            first: list[ChatCompletionChunk] = []
            seen = b""  # the bytes while no chunk came: shown if they were no event stream
            try:
                async for data in raw:
                    if not first:
                        seen += data
                    first += translator.feed(data)
                    if has_substance(first):
                        break
                else:
                    first += translator.close()
                    translator = None  # type: ignore[assignment]
            except LunarError as err:
                if (refused := unopened(err, first, resp, seen, target)) is not None:
                    raise refused from None
                raise
            return resp, raw, translator, first
        except NETWORK_ERRORS as exc:
            if resp is not None:
                await resp.aclose()
            raise self._network_error(exc, target) from exc
        except BaseException:
            if resp is not None:
                await resp.aclose()
            raise

    def _relay(
        self, stream: AsyncOpenStream, resp: Any, translator: Any, finisher: StreamFinisher
    ) -> PlainRelay | None:
        """Hand the stream's next plain events to the gateway's relay (the translator has
        one, OpenAI's, and the response a tap: checked once per stream), when nothing is
        pending in it, the finisher or the response: the relay, if it was."""
        if self.closed or not finisher.relayable():
            return None
        encoder, sink = stream.relay  # type: ignore[misc]
        relay: PlainRelay | None = translator.relay(encoder, sink, finisher)
        if relay is None or not resp.tap(relay):
            return None
        return relay

    async def _iterate(
        self,
        step: Step,
        opened: tuple[Any, AsyncIterator[Any], StreamTranslator | None, list[ChatCompletionChunk]],
        finisher: StreamFinisher,
        plan: Plan,
        stream: AsyncOpenStream,
    ) -> AsyncIterator[list[ChatCompletionChunk]]:
        """The chunks in batches, never empty: those each upstream read completed. Between
        reads, the events the gateway can relay itself go past this (``relay_to``)."""
        closer, raw, translator, first = opened
        try:
            if out := finisher.push(first):
                yield out
            if translator is None:
                async for batch in raw:
                    if self.closed:  # close() ends every stream of the client
                        raise client_closed()
                    if out := finisher.push(batch):
                        yield out
            else:
                relay = None
                if stream.relay is not None:
                    if hasattr(translator, "relay") and hasattr(closer, "tap"):
                        relay = self._relay(stream, closer, translator, finisher)
                    else:
                        stream.relay = None  # a wire without a relay, or httpx's response
                async for data in raw:
                    if self.closed:  # with a caller's http_client, still open
                        raise client_closed()
                    chunks = translator.feed(data)
                    if chunks and (out := finisher.push(chunks)):
                        yield out
                    if stream.relay is not None:
                        if relay is not None and relay.missed:
                            stream.relay = None  # not a stream of plain events
                        else:
                            relay = self._relay(stream, closer, translator, finisher)
                if out := finisher.push(translator.close()):
                    yield out
            final = finisher.end()
            plan.succeeded(step, final[0].usage)
            yield final
        except NETWORK_ERRORS as exc:
            raise plan.lost(step, self._network_error(exc, step.target)) from exc
        except LunarError as err:
            plan.lost(step, with_request_id(err, closer))
            raise
        finally:
            await closer.aclose()
