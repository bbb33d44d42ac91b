"""The OpenAI wire: ``POST /v1/chat/completions`` and ``POST /v1/completions``."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ._render import (
    MESSAGE_OVERHEAD,
    NO_TOOLS,
    Event,
    Job,
    Plan,
    ToolCall,
    ToolOffer,
    count_words,
    dumps,
    make_job,
    resolve_tool_calls,
    words,
)
from ._reply import (
    DEFAULT_ERROR_MESSAGE,
    DEFAULT_ERROR_TYPE,
    Reply,
    default_error_message,
    error_type_for_status,
)
from ._wire import Incoming, Rejection, Wire, too_many_tokens

FINGERPRINT = "fp_lunar_mock"


def error_body(status: int, message: str | None = None, **extra: Any) -> bytes:
    """OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""
    error: dict[str, Any] = {
        "message": message if message is not None else default_error_message(status),
        "type": extra.pop("type", None) or error_type_for_status(status),
        "param": extra.pop("param", None),
        "code": extra.pop("code", None),
    }
    return json.dumps({"error": error}).encode()


#: The model ids of OpenAI's own API, whose limits the emulator keeps (as OpenAI-compatible
#: servers, vLLM, Together, …, it takes what they take: more stop sequences, ``top_k``).
OPENAI_MODELS = ("gpt-", "o1", "o3", "o4", "chatgpt-")


def _openai_refusal(request: dict[str, Any]) -> Rejection | None:
    """What OpenAI's API refuses that other OpenAI-compatible servers take: more than 4
    stop sequences, ``top_k`` (not one of its parameters), more output than the model gives."""
    stop = request.get("stop")
    if isinstance(stop, list) and len(stop) > 4:
        message = (
            "Invalid 'stop': array too long. Expected an array with maximum length 4, but got "
            f"an array with length {len(stop)} instead."
        )
        return Rejection(400, error_body(400, message, param="stop", code="array_above_max_length"))
    if "top_k" in request:
        return Rejection(400, error_body(400, "Unrecognized request argument supplied: top_k"))
    for name in ("max_completion_tokens", "max_tokens"):
        asked = request.get(name)
        if (limit := too_many_tokens(str(request["model"]), asked)) is not None:
            message = (
                f"{name} is too large: {asked}. This model supports at most {limit} completion "
                f"tokens, whereas you provided {asked}."
            )
            return Rejection(400, error_body(400, message, param=name, code="invalid_value"))
    return None


def error_payload(message: str, type_: str, code: str | None = None) -> str:
    return dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})


def prompt_tokens_chat(messages: list[Any]) -> int:
    """Σ over messages of (words of the content + 3)."""
    total = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        total += count_words(content) + MESSAGE_OVERHEAD
    return total


def _prompt_item_tokens(item: Any) -> int:
    """A string: its words; a token id: 1; a list of token ids: its length."""
    if isinstance(item, str):
        return words(item)
    if isinstance(item, int):
        return 1
    return len(item) if isinstance(item, list) else 0


def prompt_tokens_completion(prompt: Any) -> int:
    """Words of the prompt (list of strings: summed; list of token ids: its length)."""
    if isinstance(prompt, list):
        return sum(_prompt_item_tokens(item) for item in prompt)
    return words(prompt)


def tool_offer(request: dict[str, Any]) -> ToolOffer:
    tools = request.get("tools")
    choice = request.get("tool_choice")
    if not isinstance(tools, list) or not tools:
        return NO_TOOLS
    functions = tuple(
        (
            str(t["function"].get("name", "tool")),
            t["function"].get("parameters", {"type": "object"}),
        )
        for t in tools
        if isinstance(t, dict) and isinstance(t.get("function"), dict)
    )
    forced: str | None = None
    if isinstance(choice, dict):
        fn = choice.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            forced = fn["name"]
    messages = request.get("messages")
    last_is_tool = (
        isinstance(messages, list)
        and bool(messages)
        and isinstance(messages[-1], dict)
        and messages[-1].get("role") == "tool"
    )
    mode = choice if choice in ("none", "required") else "auto"
    return ToolOffer(functions, str(mode), forced, last_is_tool)


class OpenAIWire(Wire):
    """Chat Completions (``kind="chat"``) or legacy Completions (``kind="completion"``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.name = "openai"

    def authorize(self, headers: dict[str, str], query: str, key: str) -> Rejection | None:
        given = headers.get("authorization")
        if given == f"Bearer {key}":
            return None
        if not given:
            message = (
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        else:
            shown = given.removeprefix("Bearer ").strip()
            shown = (
                shown[:3] + "*" * max(0, len(shown) - 7) + shown[-4:] if len(shown) > 8 else "***"
            )
            message = f"Incorrect API key provided: {shown}."
        return Rejection(401, error_body(401, message, code="invalid_api_key"))

    def parse(
        self, request: Any, headers: dict[str, str], path: str, query: str
    ) -> Incoming | Rejection:
        if not isinstance(request, dict):
            return Rejection(
                400,
                error_body(
                    400,
                    "We could not parse the JSON body of your request. (HINT: This likely means "
                    "you aren't using your HTTP library correctly. The OpenAI API expects a JSON "
                    "payload, but what was sent was not valid JSON.)",
                ),
            )
        second = "messages" if self.kind == "chat" else "prompt"
        for name in ("model", second):
            if name not in request:
                return Rejection(
                    400, error_body(400, f"Missing required parameter: '{name}'.", param=name)
                )
        model = request["model"]
        if not isinstance(model, str):
            return Rejection(
                400, error_body(400, "Invalid type for 'model': expected a string.", param="model")
            )
        if self.kind == "chat" and not isinstance(request["messages"], list):
            return Rejection(
                400,
                error_body(
                    400, "Invalid type for 'messages': expected an array.", param="messages"
                ),
            )
        if self.kind == "chat" and model.startswith(OPENAI_MODELS):
            refused = _openai_refusal(request)
            if refused is not None:
                return refused
        return Incoming(model, bool(request.get("stream")), request)

    def job(self, incoming: Incoming, reply: Reply, number: int) -> Job:
        request = incoming.request
        stream = incoming.stream
        n = request.get("n")
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
            n = 1
        options = request.get("stream_options")
        include_usage = (
            stream
            and reply.usage
            and isinstance(options, dict)
            and options.get("include_usage") is True
        )
        limit = request.get("max_completion_tokens")
        if limit is None:
            limit = request.get("max_tokens")
        if self.kind == "chat":
            calls = (
                resolve_tool_calls(tool_offer(request), reply, f"call_mock_{number}_")
                if reply.tool_calls is not None or request.get("tools")
                else []
            )
            prompt_tokens = prompt_tokens_chat(request["messages"])
        else:
            calls = []
            prompt_tokens = prompt_tokens_completion(request["prompt"])
        job = make_job(
            self.kind,
            incoming.model,
            reply,
            stream=stream,
            prompt_tokens=prompt_tokens,
            calls=calls,
            limit=limit,
            n=n,
            include_usage=include_usage,
            reasoning=self.kind == "chat",
        )
        if self.kind == "chat" and request.get("logprobs") is True:
            top = request.get("top_logprobs")
            top = top if isinstance(top, int) and not isinstance(top, bool) else 0
            job = dataclasses.replace(job, top_logprobs=max(0, min(top, 20)))
        tier = request.get("service_tier")
        if self.kind == "chat" and isinstance(tier, str):
            job = dataclasses.replace(job, service_tier="default" if tier == "auto" else tier)
        if self.kind == "chat" and reply.annotations is not None:
            job = dataclasses.replace(job, annotations=dumps(reply.annotations))
        return job

    def response_id(self, number: int, job: Job) -> str:
        return f"chatcmpl-{number}" if self.kind == "chat" else f"cmpl-{number}"

    def error_body(
        self, status: int, message: str | None = None, type_: str | None = None
    ) -> bytes:
        return error_body(status, message, type=type_)

    def error_response(self, reply: Reply) -> tuple[int, bytes]:
        return 500, self.stream_error(reply).encode()

    def stream_error(self, reply: Reply) -> str:
        return error_payload(
            reply.error_message if reply.error_message is not None else DEFAULT_ERROR_MESSAGE,
            reply.error_type if reply.error_type is not None else DEFAULT_ERROR_TYPE,
        )

    def render_stream(self, job: Job, id_: str, created: str) -> Plan:
        """The events of a streamed completion, ``[DONE]`` last."""
        model = dumps(job.model)
        n = job.n
        if job.kind == "chat":
            prefix = (
                f'{{"id":"{id_}","object":"chat.completion.chunk","created":{created},'
                f'"model":{model},{_tier(job)}"system_fingerprint":"{FINGERPRINT}","choices":['
            )
        else:
            prefix = (
                f'{{"id":"{id_}","object":"text_completion","created":{created},'
                f'"model":{model},"system_fingerprint":"{FINGERPRINT}","choices":['
            )
        suffix = '],"usage":null}' if job.include_usage else "]}"
        finish = dumps(job.finish_reason)
        pre: list[Event] = []
        positions: list[list[Event]] = []
        post: list[Event] = []

        if job.kind == "chat":

            def event(i: int, delta: str, finish_json: str = "null", logprobs: str = "null") -> str:
                return (
                    f'{prefix}{{"index":{i},"delta":{delta},"logprobs":{logprobs},'
                    f'"finish_reason":{finish_json}}}{suffix}'
                )

            # The reasoning first, each piece a position, as DeepSeek streams it.
            thinking: list[list[Event]] = [
                [
                    event(i, f'{{"content":null,{dumps(job.reasoning_field)}:{dumps(piece)}}}')
                    for i in range(n)
                ]
                for piece in job.reasoning
            ]
            if job.tool_calls:
                for i in range(n):
                    first = job.tool_calls[0]
                    header = _tool_header(0, first)
                    pre.append(
                        event(i, '{"role":"assistant","content":null}')
                        if thinking
                        else event(
                            i, f'{{"role":"assistant","content":null,"tool_calls":[{header}]}}'
                        )
                    )
                positions += thinking
                for index, call in enumerate(job.tool_calls):
                    for j, piece in enumerate(call.pieces):
                        position: list[Event] = []
                        for i in range(n):
                            if j == 0 and (index > 0 or thinking):
                                position.append(
                                    event(i, f'{{"tool_calls":[{_tool_header(index, call)}]}}')
                                )
                            position.append(
                                event(
                                    i,
                                    f'{{"tool_calls":[{{"index":{index},'
                                    f'"function":{{"arguments":{dumps(piece)}}}}}]}}',
                                )
                            )
                        positions.append(position)
            else:
                pre = [event(i, '{"role":"assistant","content":""}') for i in range(n)]
                positions += thinking
                for piece in job.pieces:
                    delta = f'{{"content":{dumps(piece)}}}'
                    lp = _logprobs(job, (piece,))
                    positions.append([event(i, delta, logprobs=lp) for i in range(n)])
            post = [event(i, "{}", finish) for i in range(n)]
            if job.annotations is not None:
                cited = f'{{"annotations":{job.annotations}}}'
                post[:0] = [event(i, cited) for i in range(n)]
        else:

            def tevent(i: int, text: str, finish_json: str = "null") -> str:
                return (
                    f'{prefix}{{"text":{text},"index":{i},"logprobs":null,'
                    f'"finish_reason":{finish_json}}}{suffix}'
                )

            for piece in job.pieces:
                text = dumps(piece)
                positions.append([tevent(i, text) for i in range(n)])
            post = [tevent(i, '""', finish) for i in range(n)]
        if job.include_usage:
            post.append(f'{prefix}],"usage":{dumps(job.usage())}}}')
        post.append("[DONE]")
        return Plan(pre, positions, post)

    def render_json(self, job: Job, id_: str, created: str) -> str:
        """The body of a non-streamed completion."""
        finish = dumps(job.finish_reason)
        text = "".join(job.pieces)
        choices: list[str] = []
        if job.kind == "chat":
            message: dict[str, Any]
            if job.tool_calls:
                message = {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": c.id,
                            "type": "function",
                            "function": {"name": c.name, "arguments": c.arguments},
                        }
                        for c in job.tool_calls
                    ],
                    "refusal": None,
                }
            else:
                message = {"role": "assistant", "content": text, "refusal": None}
            if job.annotations is not None:
                message["annotations"] = json.loads(job.annotations)
            if job.reasoning:
                message[job.reasoning_field] = job.reasoning_text
            message_json = dumps(message)
            logprobs = _logprobs(job, () if job.tool_calls else job.pieces)
            for i in range(job.n):
                choices.append(
                    f'{{"index":{i},"message":{message_json},"logprobs":{logprobs},'
                    f'"finish_reason":{finish}}}'
                )
            obj = "chat.completion"
        else:
            text_json = dumps(text)
            for i in range(job.n):
                choices.append(
                    f'{{"text":{text_json},"index":{i},"logprobs":null,"finish_reason":{finish}}}'
                )
            obj = "text_completion"
        return (
            f'{{"id":"{id_}","object":"{obj}","created":{created},"model":{dumps(job.model)},'
            f'{_tier(job)}"system_fingerprint":"{FINGERPRINT}","choices":[{",".join(choices)}],'
            f'"usage":{dumps(job.usage())}}}'
        )


def _tier(job: Job) -> str:
    """The answer's ``service_tier`` member, with its comma, when it has one."""
    return "" if job.service_tier is None else f'"service_tier":{dumps(job.service_tier)},'


def _logprobs(job: Job, pieces: tuple[str, ...]) -> str:
    """A choice's ``logprobs`` for its content ``pieces``, as OpenAI gives them when asked
    (``null`` when not): each piece a token of log probability -0.25, its alternatives
    (``top_logprobs`` of them) the token itself then ``alt1``, ``alt2`` … at -1, -2 …"""
    top = job.top_logprobs
    if top is None:
        return "null"

    def token(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = [
        {
            **token(piece, -0.25),
            "top_logprobs": [token(piece, -0.25)]
            + [token(f"alt{j}", -float(j)) for j in range(1, top)]
            if top
            else [],
        }
        for piece in pieces
    ]
    return dumps({"content": content, "refusal": None})


def _tool_header(index: int, call: ToolCall) -> str:
    return (
        f'{{"index":{index},"id":{dumps(call.id)},"type":"function",'
        f'"function":{{"name":{dumps(call.name)},"arguments":""}}}}'
    )


CHAT = OpenAIWire("chat")
COMPLETION = OpenAIWire("completion")
