"""POST /v1/completions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from kvpage_runtime.server.errors import APIError
from kvpage_runtime.server.limits import check_num_sequences, completion_budget
from kvpage_runtime.server.logprobs import completion_logprobs
from kvpage_runtime.server.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
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

Prompt = str | list[int]
DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for completions


def _prompts(state: ServerState, raw: Any) -> list[Prompt]:
    """A string, a list of strings, token ids or a list of token-id lists -> a list of prompts."""
    if isinstance(raw, str) or (raw and all(isinstance(t, int) for t in raw)):
        prompts = [raw]
    else:
        prompts = list(raw)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise APIError("prompt must not be empty", param="prompt")
    for p in prompts:
        if not isinstance(p, str):
            state.check_token_ids(p, "prompt")
    return prompts


def _check_request(state: ServerState, req: CompletionRequest, num_prompts: int) -> None:
    check_supported(req)
    if req.best_of is not None and req.best_of != req.n:
        raise APIError("best_of must equal n (or be omitted)", param="best_of")
    state.limits.check(req)
    check_num_sequences(num_prompts, req.n, state.max_num_seqs)


def _token_ids(state: ServerState, prompt: Prompt) -> list[int]:
    """The ids the engine computes: text is tokenized here, as the engine would."""
    return state.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)


def _prompt_text(state: ServerState, prompt: Prompt, output: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return (
        output.prompt
        if output.prompt is not None
        else state.tokenizer.decode(output.prompt_token_ids)
    )


class _Completion:
    """One completions request: its engine calls, and both ways of answering it."""

    def __init__(self, state: ServerState, req: CompletionRequest) -> None:
        self.state, self.req = state, req
        self.model, lora = state.resolve_model(req.model)
        self.id = random_id("cmpl")
        self.prompts = _prompts(state, req.prompt)
        _check_request(state, req, len(self.prompts))
        calls = []
        for i, prompt in enumerate(self.prompts):
            ids = _token_ids(state, prompt)
            budget = completion_budget(
                state.max_model_len, len(ids), req.max_tokens, DEFAULT_MAX_TOKENS, "prompt"
            )
            params = sampling_params(
                req,
                max_tokens=budget,
                logprobs=req.logprobs,
                prompt_logprobs=req.logprobs if req.echo else None,
                vocab_size=state.vocab_size,
            )
            calls.append(EngineCall(ids, params, f"{self.id}-{i}", req.priority, lora))
        self.requests = EngineRequests(state, calls)

    def _index(self, prompt_index: int, output_index: int) -> int:
        return prompt_index * self.req.n + output_index

    def _logprobs(self, ids: list[int], positions: list[Any], offset: int):
        return completion_logprobs(
            self.state.tokenizer, ids, positions, self.req.logprobs or 0, offset
        )

    def _echo_logprobs(self, out: Any) -> tuple[list[int], list[Any]]:
        ids = list(out.prompt_token_ids)
        return ids, list(out.prompt_logprobs or [None] * len(ids))

    def _usage(self, finals: dict[int, Any]) -> Usage:
        prompt = sum(len(out.prompt_token_ids) for out in finals.values())
        completion = sum(len(o.token_ids) for out in finals.values() for o in out.outputs)
        return Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )

    def _final_choice(self, i: int, out: Any, o: Any) -> CompletionChoice:
        prefix = _prompt_text(self.state, self.prompts[i], out) if self.req.echo else ""
        logprobs = None
        if self.req.logprobs is not None:
            ids, positions = self._echo_logprobs(out) if self.req.echo else ([], [])
            logprobs = self._logprobs(
                ids + list(o.token_ids), positions + list(o.logprobs or []), 0
            )
        return CompletionChoice(
            index=self._index(i, o.index),
            text=prefix + o.text,
            logprobs=logprobs,
            finish_reason=o.finish_reason,
            stop_reason=o.stop_reason,
        )

    async def respond(self) -> CompletionResponse:
        await self.requests.start()
        finals: dict[int, Any] = {}
        try:
            async for i, out in self.requests:
                finals[i] = out
        finally:
            await self.requests.aclose()
        choices = [
            self._final_choice(i, out, o) for i, out in sorted(finals.items()) for o in out.outputs
        ]
        choices.sort(key=lambda c: c.index)
        return CompletionResponse(
            id=self.id, model=self.model, choices=choices, usage=self._usage(finals)
        )

    def _chunk(self, choice: CompletionChoice) -> str:
        return sse(CompletionResponse(id=self.id, model=self.model, choices=[choice]))

    def _echo_chunk(self, i: int, out: Any, index: int) -> tuple[str, int]:
        """The first chunk of an echoed choice: its prompt; returns it and the prompt's length."""
        text = _prompt_text(self.state, self.prompts[i], out)
        logprobs = (
            self._logprobs(*self._echo_logprobs(out), 0) if self.req.logprobs is not None else None
        )
        return self._chunk(CompletionChoice(index=index, text=text, logprobs=logprobs)), len(text)

    async def _events(self) -> AsyncIterator[str]:
        tracker, finals, offsets = DeltaTracker(), {}, {}
        async for i, out in self.requests:
            finals[i] = out
            for o in out.outputs:
                index = self._index(i, o.index)
                if self.req.echo and index not in offsets:
                    chunk, offsets[index] = self._echo_chunk(i, out, index)
                    yield chunk
                delta = tracker.delta(index, o)
                if delta is None:
                    continue
                logprobs = None
                if self.req.logprobs is not None:
                    logprobs = self._logprobs(
                        delta.token_ids, delta.logprobs, offsets.get(index, 0)
                    )
                offsets[index] = offsets.get(index, 0) + len(delta.text)
                yield self._chunk(
                    CompletionChoice(
                        index=index,
                        text=delta.text,
                        logprobs=logprobs,
                        finish_reason=delta.finish_reason,
                        stop_reason=delta.stop_reason,
                    )
                )
        if self.req.stream_options and self.req.stream_options.include_usage:
            yield sse(
                CompletionResponse(
                    id=self.id, model=self.model, choices=[], usage=self._usage(finals)
                )
            )

    async def stream(self) -> SSEResponse:
        return await sse_response(self.requests, self._events())


async def create_completion(
    state: ServerState, req: CompletionRequest
) -> CompletionResponse | SSEResponse:
    completion = _Completion(state, req)
    return await (completion.stream() if req.stream else completion.respond())
