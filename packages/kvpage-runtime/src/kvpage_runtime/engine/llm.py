"""LLM: the offline API. Queue every prompt, step the engine until all are done."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from kvpage_runtime.engine.config import EngineConfig
from kvpage_runtime.engine.engine import LLMEngine
from kvpage_runtime.engine.outputs import RequestOutput
from kvpage_runtime.errors import InvalidRequestError, RequestFailedError
from kvpage_runtime.lora.request import LoRARequest
from kvpage_runtime.sampling import (
    BeamSearchOutput,
    BeamSearchParams,
    BeamSearchSequence,
    SamplingParams,
)
from kvpage_runtime.sampling.beam_search import normalized_score

Prompt = str | Sequence[int]
Messages = list[dict[str, Any]]


class LLM:
    """``LLM(model=None, **EngineConfig fields).generate(prompts, SamplingParams(...))``."""

    def __init__(self, model: str | None = None, **config: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **config))
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 prompt_token_ids: Sequence[Sequence[int]] | None = None,
                 use_tqdm: bool = True,
                 priority: Sequence[int] | None = None,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
                 ) -> list[RequestOutput]:
        """Generates for every prompt (text or token ids); outputs come back in input order.

        ``priority`` (one per prompt, lower first) matters under
        ``scheduling_policy="priority"``. ``lora_request``: one adapter for every prompt, or
        one (or None) per prompt (needs ``enable_lora=True``). A request the engine fails
        raises RequestFailedError.
        """
        batch = _as_prompt_list(prompts, prompt_token_ids)
        params = _as_params_list(sampling_params, len(batch))
        return self._run_all(batch, params, _as_priority_list(priority, len(batch)), use_tqdm,
                             _as_lora_list(lora_request, len(batch)))

    def _run_all(self, batch: list[Prompt], params: Sequence[SamplingParams | BeamSearchParams],
                 priorities: list[int], use_tqdm: bool,
                 loras: list[LoRARequest | None]) -> list[RequestOutput]:
        """Queues every prompt, steps the engine until all are done; outputs in input order."""
        ids = [f"{next(self._ids)}" for _ in batch]
        try:
            for rid, prompt, p, prio, lora in zip(ids, batch, params, priorities, loras,
                                                  strict=True):
                self.engine.add_request(rid, prompt, p, priority=prio, lora_request=lora)
            finals = self._run(len(batch), use_tqdm)
        except BaseException:  # invalid request, interrupt, model error: leave nothing behind
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return [finals[rid] for rid in ids]

    def beam_search(self, prompts: Sequence[Prompt | dict[str, Any]], params: BeamSearchParams,
                    use_tqdm: bool = False,
                    lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
                    ) -> list[BeamSearchOutput]:
        """Beam search for each prompt (text, token ids, or a dict with "prompt" or
        "prompt_token_ids"), all prompts' beams advancing together in the engine's batches;
        returns each prompt's hypotheses best first (``kvpage_runtime.sampling.beam_search``
        says how they are scored: as transformers' ``generate(num_beams=...)``)."""
        batch = [_unwrap_prompt(p) for p in prompts]
        finals = self._run_all(batch, [params] * len(batch), [0] * len(batch), use_tqdm,
                               _as_lora_list(lora_request, len(batch)))
        return [self._beam_output(out, params) for out in finals]

    def _beam_output(self, out: RequestOutput, params: BeamSearchParams) -> BeamSearchOutput:
        tokenizer = self.engine.tokenizer
        sequences = []
        for c in out.outputs:
            tokens = list(out.prompt_token_ids) + list(c.token_ids)
            sequences.append(BeamSearchSequence(
                tokens, tokenizer.decode(tokens, skip_special_tokens=True), c.cumulative_logprob,
                normalized_score(c.cumulative_logprob, len(c.token_ids), params.length_penalty),
                c.finish_reason))
        return BeamSearchOutput(sequences)

    def chat(self, messages: Messages | Sequence[Messages],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             add_generation_prompt: bool = True, use_tqdm: bool = True,
             lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
             ) -> list[RequestOutput]:
        """Applies the tokenizer's chat template to each conversation, then generates."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, add_generation_prompt) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm,
                             lora_request=lora_request)

    def apply_chat_template(self, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
        tokenizer = self.engine.tokenizer
        kwargs = {}
        if self.engine.chat_template is not None and getattr(tokenizer, "chat_template", None) is None:
            kwargs["chat_template"] = self.engine.chat_template
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                            tokenize=True, return_dict=False, **kwargs)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    def _run(self, total: int, use_tqdm: bool) -> dict[str, RequestOutput]:
        finals: dict[str, RequestOutput] = {}
        bar = tqdm(total=total, desc="Generating", unit="req", disable=not use_tqdm)
        started, out_tokens = time.perf_counter(), 0
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                if output.error is not None:
                    raise RequestFailedError(f"request {output.request_id} failed: {output.error}")
                if output.finished:
                    finals[output.request_id] = output
                    out_tokens += sum(len(c.token_ids) for c in output.outputs)
                    bar.update(1)
                    rate = out_tokens / max(time.perf_counter() - started, 1e-9)
                    bar.set_postfix_str(f"output {rate:.1f} tok/s", refresh=False)
        bar.close()
        return finals


def _as_prompt_list(prompts: Prompt | Sequence[Prompt] | None,
                    prompt_token_ids: Sequence[Sequence[int]] | None) -> list[Prompt]:
    if prompt_token_ids is not None:
        return [list(p) for p in prompt_token_ids]
    if prompts is None:
        raise InvalidRequestError("give prompts or prompt_token_ids")
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):
        return [prompts]
    return prompts


def _unwrap_prompt(prompt: Prompt | dict[str, Any]) -> Prompt:
    """vLLM's prompt dicts ({"prompt": text} or {"prompt_token_ids": ids}) or a plain prompt."""
    if not isinstance(prompt, dict):
        return prompt
    if "prompt_token_ids" in prompt:
        return list(prompt["prompt_token_ids"])
    if "prompt" in prompt:
        return prompt["prompt"]
    raise InvalidRequestError('a prompt dict needs "prompt" or "prompt_token_ids"')


def _as_lora_list(lora: LoRARequest | Sequence[LoRARequest | None] | None,
                  n: int) -> list[LoRARequest | None]:
    if lora is None or isinstance(lora, LoRARequest):
        return [lora] * n
    lora = list(lora)
    if len(lora) != n:
        raise InvalidRequestError(f"got {len(lora)} lora_requests for {n} prompts")
    return lora


def _as_priority_list(priority: Sequence[int] | None, n: int) -> list[int]:
    if priority is None:
        return [0] * n
    priority = list(priority)
    if len(priority) != n:
        raise InvalidRequestError(f"got {len(priority)} priorities for {n} prompts")
    return priority


def _as_params_list(params: SamplingParams | Sequence[SamplingParams] | None,
                    n: int) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * n
    params = list(params)
    if len(params) != n:
        raise InvalidRequestError(f"got {len(params)} sampling_params for {n} prompts")
    return params
