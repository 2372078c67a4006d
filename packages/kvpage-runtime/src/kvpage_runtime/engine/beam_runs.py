"""The engine's beam searches: each prompt's ``BeamSearch`` and the scheduler requests of its
live beams.

A live beam is a scheduler request whose output tokens are the beam's. Each step the beam
computes its last token and hands its next-token log-probabilities here, without sampling;
once every live beam of a search has done so, the search advances: each new beam is a fork
of its parent (sharing all its KV blocks, the partial last one included, copied on write by
the cache when the new token is written), and the previous beams are then aborted, so a beam
nobody continues gives its blocks back at once. Finished hypotheses keep their tokens, not
blocks. A beam that was not scheduled in a step (no budget, preempted) simply reports later;
its siblings wait for it.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch
from kvpage_sched import Request, Scheduler

from kvpage_runtime.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from kvpage_runtime.lora.request import LoRARequest
from kvpage_runtime.sampling.beam_search import BeamSearch, BeamSearchParams, Hypothesis


@dataclass
class _Run:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    search: BeamSearch
    metrics: RequestMetrics
    beam_ids: list[str]  # the scheduler requests of search.live, in its order
    reported: dict[str, torch.Tensor] = field(default_factory=dict)  # beam id -> logprobs
    lora_request: LoRARequest | None = None

    @property
    def ready(self) -> bool:
        return len(self.reported) == len(self.beam_ids)


class BeamSearches:
    def __init__(self, scheduler: Scheduler, tokenizer, eos_token_ids: frozenset[int]) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self._runs: dict[str, _Run] = {}  # by request id
        self._run_of_beam: dict[str, _Run] = {}  # by beam (scheduler request) id
        self._ids = itertools.count()

    def __len__(self) -> int:
        return len(self._runs)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._runs

    def owns(self, beam_id: str) -> bool:
        return beam_id in self._run_of_beam

    def request_ids(self) -> list[str]:
        return list(self._runs)

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
            params: BeamSearchParams, max_new_tokens: int, arrival_time: float,
            priority: int = 0, lora_request: LoRARequest | None = None) -> None:
        """Queues the search's first beam (its forks inherit its priority and adapter)."""
        search = BeamSearch(params, self.eos_token_ids, max_new_tokens)
        run = _Run(request_id, prompt, prompt_token_ids, search, RequestMetrics(arrival_time), [],
                   lora_request=lora_request)
        first = self._beam_id(request_id)
        self.scheduler.add_request(Request(first, prompt_token_ids, search.max_new_tokens,
                                           priority, lora_id=None if lora_request is None
                                           else lora_request.cache_key))
        self._attach(run, [first])
        self._runs[request_id] = run

    def report(self, beam_id: str, logits: torch.Tensor) -> None:
        """The beam's next-token logits (one row), computed this step."""
        run = self._run_of_beam[beam_id]
        if run.metrics.first_scheduled_time is None:
            run.metrics.first_scheduled_time = time.time()
        temperature = run.search.params.temperature
        scaled = logits.float() / temperature if temperature not in (0.0, 1.0) else logits.float()
        run.reported[beam_id] = torch.log_softmax(scaled, dim=-1)

    def advance(self) -> list[RequestOutput]:
        """Advances every search whose live beams have all reported (call after the step's
        scheduler update); returns the outputs of the searches that finished."""
        outputs = []
        for run in [r for r in self._runs.values() if r.ready]:
            rows = torch.stack([run.reported[b] for b in run.beam_ids])
            step = run.search.advance(rows)
            now = time.time()
            run.metrics.first_token_time = run.metrics.first_token_time or now
            run.metrics.last_token_time = now
            new_ids = [self._fork(run, run.beam_ids[parent], beam.tokens)
                       for (parent, _), beam in zip(step.continuations, run.search.live,
                                                    strict=True)]
            self._drop_beams(run)
            self._attach(run, new_ids)
            if run.search.done:
                outputs.append(self._finish(run, run.search.best()))
        return outputs

    def abort(self, request_id: str) -> RequestOutput | None:
        run = self._runs.get(request_id)
        if run is None:
            return None
        self._drop_beams(run)
        return self._finish(run, run.search.best(), unfinished="abort")

    def fail(self, request_id: str, reason: str) -> RequestOutput:
        output = self.abort(request_id)
        output.error = reason
        return output

    def hypothesis_text(self, hypothesis: Hypothesis) -> str:
        return self.tokenizer.decode(hypothesis.tokens, skip_special_tokens=True)

    # ---- beams and their requests ----------------------------------------------------------

    def _beam_id(self, request_id: str) -> str:
        return f"{request_id}#beam{next(self._ids)}"

    def _fork(self, run: _Run, parent_id: str, tokens: list[int]) -> str:
        child_id = self._beam_id(run.request_id)
        self.scheduler.fork_request(parent_id, child_id, tokens)
        return child_id

    def _attach(self, run: _Run, beam_ids: list[str]) -> None:
        run.beam_ids = beam_ids
        run.reported = {}
        for beam_id in beam_ids:
            self._run_of_beam[beam_id] = run

    def _drop_beams(self, run: _Run) -> None:
        """Abort the run's current beam requests (their blocks go back unless a fork holds
        them)."""
        for beam_id in run.beam_ids:
            self.scheduler.abort_request(beam_id)
            del self._run_of_beam[beam_id]
        run.beam_ids, run.reported = [], {}

    def _finish(self, run: _Run, best: list[Hypothesis],
                unfinished: str | None = None) -> RequestOutput:
        del self._runs[run.request_id]
        run.metrics.finished_time = time.time()
        outputs = [CompletionOutput(i, self.hypothesis_text(h), h.tokens, h.cum_logprob, None,
                                    h.finish_reason) for i, h in enumerate(best)]
        if unfinished is not None and not outputs:
            outputs = [CompletionOutput(0, "", [], None, None, unfinished)]
        return RequestOutput(run.request_id, run.prompt, run.prompt_token_ids, None, outputs,
                             True, run.metrics, lora_request=run.lora_request)
