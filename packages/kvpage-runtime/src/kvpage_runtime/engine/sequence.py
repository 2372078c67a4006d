"""Engine-side state of a request: one RequestGroup holding its n Sequences."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvpage_runtime.engine.detokenizer import IncrementalDetokenizer
from kvpage_runtime.engine.outputs import (
    CompletionOutput,
    PositionLogprobs,
    RequestMetrics,
    RequestOutput,
)
from kvpage_runtime.engine.stop import held_back_chars
from kvpage_runtime.lora.request import LoRARequest
from kvpage_runtime.sampling import SamplingParams


@dataclass(eq=False)
class Sequence:
    """One completion: its scheduler id, tokens, text and logprobs so far."""

    seq_id: str
    index: int
    group: RequestGroup
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text_end: int | None = None  # where a stop string cut the text

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def visible_text(self) -> str:
        text = self.detokenizer.text
        if self.text_end is not None:
            return text[: self.text_end]
        if self.finished:
            return text
        hold = held_back_chars(self.group.params)
        return text[: len(text) - hold] if hold else text

    def to_output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.visible_text(),
            token_ids=list(self.token_ids),
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


@dataclass(eq=False)
class RequestGroup:
    """A user request: prompt, parameters and its n sequences (forked after the prompt)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # filled chunk by chunk
    forked: bool = False
    error: str | None = None  # set when the engine failed this request
    lora_request: LoRARequest | None = None

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return (self.prompt_logprobs is not None
                and len(self.prompt_logprobs) < len(self.prompt_token_ids))

    def to_output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=self.prompt_logprobs,
            outputs=[s.to_output() for s in self.seqs],
            finished=self.finished,
            metrics=self.metrics,
            error=self.error,
            lora_request=self.lora_request,
        )
