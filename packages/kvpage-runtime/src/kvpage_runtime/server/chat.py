"""POST /v1/chat/completions: messages through the model's chat template, then the engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from kvpage_runtime.server.errors import APIError
from kvpage_runtime.server.limits import check_num_sequences, completion_budget
from kvpage_runtime.server.logprobs import chat_logprobs
from kvpage_runtime.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    DeltaMessage,
    Usage,
    random_id,
)
from kvpage_runtime.server.sampling import check_supported, sampling_params
from kvpage_runtime.server.state import ServerState
from kvpage_runtime.server.streams import (
    DeltaTracker,
    EngineCall,
    EngineRequests,
    SSEResponse,
    sse,
    sse_response,
)


def chat_prompt_ids(
    state: ServerState, messages: list[ChatMessage], add_generation_prompt: bool
) -> list[int]:
    """Renders the conversation with the model's chat template and tokenizes it.

    The template writes every special token itself, so the tokenizer adds none.
    """
    tokenizer = state.tokenizer
    template = getattr(tokenizer, "chat_template", None) or getattr(
        state.engine, "chat_template", None
    )
    if not template:
        raise APIError("this model has no chat template; use /v1/completions", param="messages")
    conversation = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        ids = tokenizer.apply_chat_template(
            conversation,
            chat_template=template,
            tokenize=True,
            return_dict=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as exc:  # template errors (e.g. roles that must alternate) are bad input
        raise APIError(f"chat template failed: {exc}", param="messages") from exc
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def _check_request(state: ServerState, req: ChatCompletionRequest) -> None:
    check_supported(req)
    for i, message in enumerate(req.messages):
        for name in message.unsupported_fields():
            raise APIError(
                f"messages.{i}.{name} is not supported by this server",
                param=f"messages.{i}.{name}",
                code="unsupported_parameter",
            )
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError("top_logprobs needs logprobs set to true", param="top_logprobs")
    state.limits.check(req)
    check_num_sequences(1, req.n, state.max_num_seqs)


class _Chat:
    def __init__(self, state: ServerState, req: ChatCompletionRequest) -> None:
        _check_request(state, req)
        self.state, self.req = state, req
        self.model, lora = state.resolve_model(req.model)
        self.id = random_id("chatcmpl")
        prompt_ids = chat_prompt_ids(state, req.messages, req.add_generation_prompt)
        self.k = req.top_logprobs or 0
        requested = (
            req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        )
        params = sampling_params(
            req,
            max_tokens=completion_budget(
                state.max_model_len, len(prompt_ids), requested, None, "messages"
            ),
            logprobs=self.k if req.logprobs else None,
            vocab_size=state.vocab_size,
        )
        self.requests = EngineRequests(
            state, [EngineCall(prompt_ids, params, self.id, req.priority, lora)]
        )

    def _logprobs(self, ids: list[int], positions: list[Any]) -> ChatLogprobs | None:
        if not self.req.logprobs:
            return None
        return ChatLogprobs(content=chat_logprobs(self.state.tokenizer, ids, positions, self.k))

    @staticmethod
    def _usage(out: Any) -> Usage:
        prompt = len(out.prompt_token_ids)
        completion = sum(len(o.token_ids) for o in out.outputs)
        return Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )

    async def respond(self) -> ChatCompletionResponse:
        await self.requests.start()
        final = None
        try:
            async for _, out in self.requests:
                final = out
        finally:
            await self.requests.aclose()
        choices = [
            ChatChoice(
                index=o.index,
                message=AssistantMessage(content=o.text),
                logprobs=self._logprobs(o.token_ids, o.logprobs or []),
                finish_reason=o.finish_reason,
                stop_reason=o.stop_reason,
            )
            for o in sorted(final.outputs, key=lambda o: o.index)
        ]
        return ChatCompletionResponse(
            id=self.id, model=self.model, choices=choices, usage=self._usage(final)
        )

    def _chunk(self, choice: ChatChunkChoice) -> str:
        return sse(ChatCompletionChunk(id=self.id, model=self.model, choices=[choice]))

    async def _events(self) -> AsyncIterator[str]:
        tracker, final = DeltaTracker(), None
        for index in range(self.req.n):
            yield self._chunk(
                ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))
            )
        async for _, out in self.requests:
            final = out
            for o in out.outputs:
                delta = tracker.delta(o.index, o)
                if delta is not None:
                    yield self._chunk(
                        ChatChunkChoice(
                            index=o.index,
                            delta=DeltaMessage(content=delta.text),
                            logprobs=self._logprobs(delta.token_ids, delta.logprobs),
                            finish_reason=delta.finish_reason,
                            stop_reason=delta.stop_reason,
                        )
                    )
        if final is not None and self.req.stream_options and self.req.stream_options.include_usage:
            yield sse(
                ChatCompletionChunk(
                    id=self.id, model=self.model, choices=[], usage=self._usage(final)
                )
            )

    async def stream(self) -> SSEResponse:
        return await sse_response(self.requests, self._events())


async def create_chat_completion(
    state: ServerState, req: ChatCompletionRequest
) -> ChatCompletionResponse | SSEResponse:
    chat = _Chat(state, req)
    return await (chat.stream() if req.stream else chat.respond())
