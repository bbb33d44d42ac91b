"""``Stream`` / ``AsyncStream``: what ``create(stream=True)`` returns, and the accumulator
that assembles the whole ``ChatCompletion`` from chunks (shared by both)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Generic, TypeVar, overload

from ._types import (
    Annotation,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    Choice,
    ChoiceLogprobs,
    Completion,
    Function,
    ReasoningDelta,
    ToolCall,
    Usage,
)

T = TypeVar("T")


class _ChoiceState:
    __slots__ = (
        "annotations",
        "blocks",
        "finish_reason",
        "logprobs",
        "parts",
        "reasoning",
        "refusal",
        "role",
        "stop_sequence",
        "thought",
        "tools",
    )

    def __init__(self) -> None:
        self.role = "assistant"
        self.parts: list[str] = []
        self.refusal: list[str] = []
        self.annotations: list[Annotation] = []
        self.reasoning: list[str] = []
        #: Anthropic's thinking blocks; ``thought``: where in ``reasoning`` the next begins.
        self.blocks: list[dict[str, Any]] = []
        self.thought = 0
        # index -> [id, name, [argument pieces], extra_content]
        self.tools: dict[int, list[Any]] = {}
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None
        #: The chunks' ``logprobs`` gathered (their token lists concatenated), from the
        #: first chunk that has them, as the openai SDK's stream helper gathers them.
        self.logprobs: ChoiceLogprobs | None = None

    def add_logprobs(self, logprobs: Any) -> None:
        if type(logprobs) is not ChoiceLogprobs:
            return  # not OpenAI's shape (kept as it came on the chunk): nothing to join
        mine = self.logprobs
        if mine is None:
            self.logprobs = ChoiceLogprobs(
                None if logprobs.content is None else list(logprobs.content),
                None if logprobs.refusal is None else list(logprobs.refusal),
            )
            return
        if logprobs.content:
            if mine.content is None:
                mine.content = []
            mine.content.extend(logprobs.content)
        if logprobs.refusal:
            if mine.refusal is None:
                mine.refusal = []
            mine.refusal.extend(logprobs.refusal)


class ChatAccumulator:
    """Feed every chunk; ``completion()`` is the whole answer, tool-call arguments
    concatenated by index."""

    __slots__ = ("_choices", "_first", "_usage")

    def __init__(self) -> None:
        self._choices: dict[int, _ChoiceState] = {}
        self._first: ChatCompletionChunk | None = None
        self._usage: Usage | None = None

    def add(self, chunk: ChatCompletionChunk) -> None:
        if self._first is None:
            self._first = chunk
        if chunk.usage is not None:
            self._usage = chunk.usage
        for c in chunk.choices:
            state = self._choices.get(c.index)
            if state is None:
                state = self._choices[c.index] = _ChoiceState()
            delta = c.delta
            if delta.content:
                state.parts.append(delta.content)
            if delta.role:
                state.role = delta.role
            if delta.refusal:
                state.refusal.append(delta.refusal)
            if delta.annotations:
                state.annotations.extend(delta.annotations)
            if delta.__class__ is ReasoningDelta:
                _add_reasoning(state, delta.reasoning_content, delta.thinking_blocks)
            if delta.tool_calls:
                for tc in delta.tool_calls:
                    entry = state.tools.get(tc.index)
                    if entry is None:
                        entry = state.tools[tc.index] = [None, None, [], None]
                    if tc.id:
                        entry[0] = tc.id
                    if tc.extra_content is not None:
                        entry[3] = tc.extra_content
                    if tc.function is not None:
                        if tc.function.name:
                            entry[1] = tc.function.name
                        if tc.function.arguments:
                            entry[2].append(tc.function.arguments)
            if c.logprobs is not None:
                state.add_logprobs(c.logprobs)
            if c.finish_reason is not None:
                state.finish_reason = c.finish_reason
                state.stop_sequence = c.stop_sequence

    def completion(self) -> ChatCompletion:
        first = self._first
        choices = []
        for index in sorted(self._choices):
            s = self._choices[index]
            tool_calls = [
                ToolCall(id or "", Function(name, "".join(args)), extra_content=extra)
                for _, (id, name, args, extra) in sorted(s.tools.items())
            ] or None
            message = ChatCompletionMessage(
                role=s.role,
                content="".join(s.parts) if s.parts or not tool_calls else None,
                tool_calls=tool_calls,
                refusal="".join(s.refusal) or None,
                annotations=s.annotations or None,
                reasoning_content="".join(s.reasoning) if s.reasoning else None,
                thinking_blocks=s.blocks or None,
            )
            choices.append(Choice(index, message, s.finish_reason, s.logprobs, s.stop_sequence))
        return ChatCompletion(
            id=first.id if first else "",
            created=first.created if first else 0,
            model=first.model if first else "",
            choices=choices,
            usage=self._usage,
            system_fingerprint=first.system_fingerprint if first else None,
            provider=first.provider if first else None,
        )


def _add_reasoning(
    state: _ChoiceState, text: str | None, blocks: list[dict[str, Any]] | None
) -> None:
    """A delta's reasoning: its text, and the thinking blocks it ends (a ``thinking`` block's
    signature closes the text since the last block, which is that block's)."""
    if text:
        state.reasoning.append(text)
    for block in blocks or ():
        if block.get("type") == "thinking" and "thinking" not in block:
            block = {
                "type": "thinking",
                "thinking": "".join(state.reasoning[state.thought :]),
                "signature": block.get("signature", ""),
            }
            state.thought = len(state.reasoning)
        state.blocks.append(block)


def tool_arguments(call: ToolCall) -> Any:
    """The parsed JSON arguments of a tool call."""
    return json.loads(call.function.arguments or "{}")


def _final(
    acc: ChatAccumulator, finish: Callable[[ChatCompletion], ChatCompletion | Completion] | None
) -> ChatCompletion | Completion:
    """The whole answer, as ``finish`` makes it (the legacy endpoint: a ``Completion``)."""
    completion = acc.completion()
    if finish is None:
        return completion
    return finish(completion)


def _text(chunk: ChatCompletionChunk) -> str | None:
    for choice in chunk.choices:
        if choice.index == 0:
            return choice.delta.content
    return None


class Stream(Generic[T]):
    """Iterate it for chunks. Leaving the loop early, ``close()``, the ``with`` block's end
    or garbage collection closes the upstream connection."""

    def __init__(
        self,
        iterator: Iterator[ChatCompletionChunk],
        convert: Callable[[ChatCompletionChunk], T] | None = None,
        finish: Callable[[ChatCompletion], ChatCompletion | Completion] | None = None,
    ) -> None:
        self._iterator = iterator
        self._convert = convert
        self._finish = finish
        self._acc = ChatAccumulator()
        self._closed = False

    def _next_chunk(self) -> ChatCompletionChunk:
        chunk = next(self._iterator)
        self._acc.add(chunk)
        return chunk

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        chunk = self._next_chunk()
        if self._convert is not None:
            return self._convert(chunk)
        return chunk  # type: ignore[return-value]

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._iterator.close()  # type: ignore[attr-defined]

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def until_done(self) -> Stream[T]:
        while True:
            try:
                self._next_chunk()
            except StopIteration:
                return self

    @overload
    def get_final_completion(self: Stream[Completion]) -> Completion: ...
    @overload
    def get_final_completion(self: Stream[ChatCompletionChunk]) -> ChatCompletion: ...

    def get_final_completion(self) -> ChatCompletion | Completion:
        """Reads the rest of the stream and returns the whole answer (the chunks already
        iterated included): a ``ChatCompletion`` for a chat stream, a ``Completion`` for a
        legacy completions stream, as the call without ``stream`` returns."""
        self.until_done()
        return _final(self._acc, self._finish)

    @property
    def text_stream(self) -> Iterator[str]:
        """Only the text of the first choice: ``for text in stream.text_stream: ...``."""

        def texts() -> Iterator[str]:
            while True:
                try:
                    text = _text(self._next_chunk())
                except StopIteration:
                    return
                if text:
                    yield text

        return texts()


class AsyncStream(Generic[T]):
    """``async for`` it. Leaving the loop and ``await close()`` / ``async with`` release the
    connection (an abandoned stream is closed by the event loop's generator finalizer)."""

    def __init__(
        self,
        iterator: AsyncIterator[ChatCompletionChunk],
        convert: Callable[[ChatCompletionChunk], T] | None = None,
        finish: Callable[[ChatCompletion], ChatCompletion | Completion] | None = None,
    ) -> None:
        self._iterator = iterator
        self._convert = convert
        self._finish = finish
        self._acc = ChatAccumulator()
        self._closed = False

    async def _next_chunk(self) -> ChatCompletionChunk:
        chunk = await self._iterator.__anext__()
        self._acc.add(chunk)
        return chunk

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        chunk = await self._next_chunk()
        if self._convert is not None:
            return self._convert(chunk)
        return chunk  # type: ignore[return-value]

    async def __aenter__(self) -> AsyncStream[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._iterator.aclose()  # type: ignore[attr-defined]

    async def until_done(self) -> AsyncStream[T]:
        while True:
            try:
                await self._next_chunk()
            except StopAsyncIteration:
                return self

    @overload
    async def get_final_completion(self: AsyncStream[Completion]) -> Completion: ...
    @overload
    async def get_final_completion(self: AsyncStream[ChatCompletionChunk]) -> ChatCompletion: ...

    async def get_final_completion(self) -> ChatCompletion | Completion:
        """As ``Stream.get_final_completion``."""
        await self.until_done()
        return _final(self._acc, self._finish)

    @property
    def text_stream(self) -> AsyncIterator[str]:
        async def texts() -> AsyncIterator[str]:
            while True:
                try:
                    text = _text(await self._next_chunk())
                except StopAsyncIteration:
                    return
                if text:
                    yield text

        return texts()
