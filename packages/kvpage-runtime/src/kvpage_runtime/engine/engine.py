"""LLMEngine: tokenize -> schedule -> run the model -> sample -> detokenize -> check stops -> update.

One ``step()`` is one forward pass over whatever the scheduler picked (prompt chunks and
decode tokens together). The engine is synchronous and single-threaded; ``LLM`` drives it to
completion and ``AsyncLLM`` drives it from a background thread.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path

import torch
from kvpage_cache import BlockPool, KVCacheManager
from kvpage_kernels import select_backend
from kvpage_sched import (
    FinishReason,
    Request,
    RequestRejectedError,
    ScheduledRequest,
    Scheduler,
    SchedulerConfig,
)

from kvpage_runtime.distributed.executor import TensorParallelDriver
from kvpage_runtime.engine.beam_runs import BeamSearches
from kvpage_runtime.engine.config import EngineConfig
from kvpage_runtime.engine.detokenizer import IncrementalDetokenizer, make_token_decoder
from kvpage_runtime.engine.kv_budget import plan_kv_cache
from kvpage_runtime.engine.outputs import (
    EngineStats,
    Logprob,
    PositionLogprobs,
    RequestMetrics,
    RequestOutput,
    StepTimings,
)
from kvpage_runtime.engine.sequence import RequestGroup, Sequence
from kvpage_runtime.engine.stop import stop_by_length, stop_by_string, stop_by_token
from kvpage_runtime.errors import EngineDeadError, InvalidRequestError, ModelLoadError
from kvpage_runtime.loaders import load_model, model_dtype
from kvpage_runtime.loaders.hf import load_tokenizer
from kvpage_runtime.lora.manager import LoRAManager
from kvpage_runtime.lora.request import LoRARequest
from kvpage_runtime.model_runner import ModelRunner
from kvpage_runtime.sampling import (
    BeamSearchParams,
    Sampler,
    SamplerOutput,
    SamplingParams,
    SamplingRow,
    TokenLogprobs,
    top_logprobs,
)
from kvpage_runtime.sampling.sampler import processes_logits
from kvpage_runtime.spec_decode import Drafts, SpeculativeConfig, build_speculator

logger = logging.getLogger("kvpage_runtime")

# A forward step that fails this many times in a row is not a passing fault: the engine stops.
MAX_CONSECUTIVE_STEP_FAILURES = 3


@dataclass
class _StepPlan:
    """Which rows of the step's flat hidden states get logits, and what each is for."""

    logits_indices: list[int] = field(default_factory=list)
    sample_seqs: list[Sequence] = field(default_factory=list)
    sample_logit_rows: list[int] = field(default_factory=list)
    forking: list[RequestGroup] = field(default_factory=list)
    beam_rows: list[tuple[str, int]] = field(default_factory=list)  # (beam id, logits row)
    # (sequence, logits row of its last token, its drafts): a row per draft follows
    speculative: list[tuple[Sequence, int, Drafts]] = field(default_factory=list)
    # (group, first prompt position, end position, first logits row)
    prompt_logprob_jobs: list[tuple[RequestGroup, int, int, int]] = field(default_factory=list)


# what a sequence emits in a step: (sequence, tokens, their logprobs or None each)
_Emitted = tuple[Sequence, list[int], list[TokenLogprobs | None]]


def _emitted(seqs: list[Sequence], sampled: SamplerOutput) -> list[_Emitted]:
    return [(seq, [token], [lp])
            for seq, token, lp in zip(seqs, sampled.token_ids, sampled.logprobs, strict=True)]


def _rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """logits[rows], without a copy in the common case where rows are 0..n-1."""
    if len(rows) == logits.shape[0] and rows == list(range(len(rows))):
        return logits
    return logits[rows]


def _prepare_kernels(device: str) -> threading.Thread:
    """Picks the kernel backend for `device` on a background thread: on the CPU that compiles
    the cpu backend's library the first time (seconds, in a compiler process), which then
    overlaps with loading the model."""
    thread = threading.Thread(target=select_backend, args=(device,), daemon=True,
                              name="kvpage-kernel-build")
    thread.start()
    return thread


def _start_workers(config: EngineConfig) -> TensorParallelDriver | None:
    """Tensor parallel: starts ranks 1.. (they load their shards meanwhile); None for one."""
    if config.tensor_parallel_size == 1:
        return None
    dtype = model_dtype(config.model, config.dtype, config.device, config.quantization)
    return TensorParallelDriver.start(
        config.tensor_parallel_size, config.distributed_executor_backend or "mp",
        model=config.model, dtype=str(dtype).removeprefix("torch."), device=config.device,
        quantization=config.quantization, int8_activations=config.int8_activations)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        started = time.perf_counter()
        kernels = _prepare_kernels(config.device)
        self.parallel = _start_workers(config)
        try:
            loaded = load_model(config.model, dtype=config.dtype, device=config.device,
                                quantization=config.quantization,
                                tp=self.parallel.tp if self.parallel else None,
                                int8_activations=config.int8_activations)
            if self.parallel is not None:
                self.parallel.connect()
        except BaseException:
            if self.parallel is not None:
                self.parallel.shutdown(graceful=False)
            raise
        kernels.join()
        self.load_seconds = time.perf_counter() - started
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        if config.tokenizer is not None:
            self.tokenizer = load_tokenizer(Path(config.tokenizer))
        if self.tokenizer is None:
            raise ModelLoadError(f"no tokenizer found for {config.model!r}: pass tokenizer=...")
        self.chat_template = loaded.chat_template
        self.eos_token_ids = frozenset(loaded.eos_token_ids)
        self.model_name = config.served_model_name or config.model or "SmolLM2-135M-Instruct"
        self.max_model_len = config.resolve_max_model_len(self.model_config.max_position_embeddings)
        self.device = torch.device(config.device)
        budget = plan_kv_cache(
            bytes_per_token=self.model_config.kv_cache_bytes_per_token(
                tensor_parallel_size=config.tensor_parallel_size),
            block_size=config.block_size, max_model_len=self.max_model_len,
            max_num_seqs=config.max_num_seqs, kv_cache_memory=config.kv_cache_memory,
            device=self.device)
        pool = BlockPool(budget.num_blocks, config.block_size,
                         enable_prefix_caching=config.enable_prefix_caching)
        # with a sliding window, blocks that fall out of it go back to the pool as requests move on
        self.cache = KVCacheManager(pool, sliding_window=self.model_config.cache_sliding_window)
        self.spec_config = (SpeculativeConfig.from_dict(config.speculative_config)
                            if config.speculative_config is not None else None)
        self.scheduler = Scheduler(self.cache, self._scheduler_config())
        self.lora = None
        if config.enable_lora:
            self.lora = LoRAManager(loaded.model, config.max_loras, config.max_lora_rank,
                                    config.max_cpu_loras, self.model_config.dtype, self.device)
        self.runner = ModelRunner(loaded.model, self.model_config, budget.num_blocks,
                                  config.block_size, self.device, self.model_config.dtype,
                                  self.lora, config.tensor_parallel_size)
        if self.parallel is not None:
            self.runner = self.parallel.attach(self.runner, budget.num_blocks, config.block_size)
        self.speculator = None
        if self.spec_config is not None:
            self.speculator = build_speculator(self.spec_config, self.model_config.vocab_size,
                                               budget.num_blocks, config.block_size, self.device,
                                               self.model_config.dtype)
        self.sampler = Sampler(config.seed, self.device)
        self.timings = StepTimings()
        self.num_preemptions = 0
        self.num_failed_steps = 0  # forward steps that raised (their requests failed)
        self.num_draft_tokens = 0  # speculative decoding: drafted, and of those accepted
        self.num_accepted_tokens = 0
        self._failures_in_a_row = 0
        self._decode_token = make_token_decoder(self.tokenizer)
        self._groups: dict[str, RequestGroup] = {}
        self._seqs: dict[str, Sequence] = {}
        self.beams = BeamSearches(self.scheduler, self.tokenizer, self.eos_token_ids)
        self._salt = itertools.count()

    def shutdown(self) -> None:
        """Stops the tensor-parallel workers, if any (also done at exit)."""
        if self.parallel is not None:
            self.parallel.shutdown()

    def _scheduler_config(self) -> SchedulerConfig:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        if not cfg.enable_chunked_prefill:
            budget = max(budget, self.max_model_len)
        lookahead = self.spec_config.num_speculative_tokens if self.spec_config else 0
        return SchedulerConfig(max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=budget,
                               max_model_len=self.max_model_len,
                               enable_chunked_prefill=cfg.enable_chunked_prefill,
                               policy=cfg.scheduling_policy, num_lookahead_tokens=lookahead,
                               max_loras=cfg.max_loras if cfg.enable_lora else None)

    # ---- requests -------------------------------------------------------------------------

    def tokenize(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        return [int(t) for t in prompt]

    def add_request(self, request_id: str, prompt: str | Seq[int],
                    params: SamplingParams | BeamSearchParams | None = None,
                    arrival_time: float | None = None, priority: int = 0,
                    lora_request: LoRARequest | None = None) -> None:
        """Validates and queues a request (a beam search with BeamSearchParams); raises
        InvalidRequestError when it cannot be served.

        ``priority`` orders requests under the "priority" scheduling policy (lower first).
        ``lora_request`` runs it with that adapter (registered on first use).
        """
        params = params or SamplingParams()
        if request_id in self._groups or request_id in self._seqs or request_id in self.beams:
            raise InvalidRequestError(f"request_id {request_id!r} is already in use")
        if priority != 0 and self.config.scheduling_policy != "priority":
            raise InvalidRequestError(f"priority is {priority}, but priority scheduling is not "
                                      "enabled (scheduling_policy='priority')")
        token_ids = self.tokenize(prompt)
        self._check_prompt(token_ids)
        lora_id = self._lora_key(lora_request)
        if isinstance(params, BeamSearchParams):
            return self._add_beam_search(request_id, prompt, token_ids, params, arrival_time,
                                         priority, lora_request)
        params.validate_vocab(self.model_config.vocab_size)
        group = RequestGroup(request_id, prompt if isinstance(prompt, str) else None, token_ids,
                             params, RequestMetrics(arrival_time or time.time()),
                             lora_request=lora_request)
        if params.prompt_logprobs is not None:
            group.prompt_logprobs = [None]
        group.seqs = [self._new_sequence(group, i) for i in range(params.n)]
        request = Request(request_id, token_ids,
                          max_tokens=min(params.max_tokens, self.max_model_len - len(token_ids)),
                          priority=priority, extra_keys=self._cache_keys(group),
                          lora_id=lora_id)
        try:
            self.scheduler.add_request(request)
        except RequestRejectedError as exc:
            raise InvalidRequestError(str(exc)) from exc
        self._groups[request_id] = group
        self._seqs[request_id] = group.seqs[0]

    def _add_beam_search(self, request_id: str, prompt: str | Seq[int], token_ids: list[int],
                         params: BeamSearchParams, arrival_time: float | None,
                         priority: int, lora_request: LoRARequest | None) -> None:
        try:
            self.beams.add(request_id, prompt if isinstance(prompt, str) else None, token_ids,
                           params, self.max_model_len - len(token_ids),
                           arrival_time or time.time(), priority, lora_request)
        except RequestRejectedError as exc:
            raise InvalidRequestError(str(exc)) from exc

    # ---- LoRA adapters ----------------------------------------------------------------------

    def add_lora(self, lora_request: LoRARequest) -> None:
        """Registers (and loads, checking it) an adapter; raises LoRAAdapterError if it cannot
        be served or InvalidRequestError if LoRA is not enabled."""
        self._lora_manager().register(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        """Forgets an adapter (requests already running with it finish as they are)."""
        return self._lora_manager().remove(lora_int_id)

    def list_loras(self) -> list[LoRARequest]:
        return [] if self.lora is None else list(self.lora.registered.values())

    def _lora_manager(self) -> LoRAManager:
        if self.lora is None:
            raise InvalidRequestError("LoRA adapters are not enabled: start the engine with "
                                      "enable_lora=True (kvpage serve --enable-lora)")
        return self.lora

    def _lora_key(self, lora_request: LoRARequest | None) -> str | None:
        if lora_request is None:
            return None
        manager = self._lora_manager()
        if manager.registered.get(lora_request.lora_int_id) != lora_request:
            manager.register(lora_request)
        return lora_request.cache_key

    def _check_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise InvalidRequestError("prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(f"prompt has {len(token_ids)} tokens, max_model_len is "
                                      f"{self.max_model_len} (prompt + output must fit)")
        vocab = self.model_config.vocab_size
        if max(token_ids) >= vocab or min(token_ids) < 0:
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")

    def _cache_keys(self, group: RequestGroup) -> tuple:
        """Prompt logprobs need every prompt position computed: a unique salt avoids prefix hits."""
        if group.prompt_logprobs is None:
            return ()
        return (("salt", f"prompt-logprobs-{next(self._salt)}"),)

    def _new_sequence(self, group: RequestGroup, index: int) -> Sequence:
        seq_id = group.request_id if index == 0 else f"{group.request_id}#{index}"
        params = group.params
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed + index)
        detok = IncrementalDetokenizer(self.tokenizer, group.prompt_token_ids,
                                       params.skip_special_tokens)
        return Sequence(seq_id, index, group, detok, generator,
                        logprobs=[] if params.logprobs is not None else None)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stops a request now; its blocks go back to the pool. Returns its final output."""
        group = self._groups.get(request_id)
        if group is None:
            return self.beams.abort(request_id)
        self._end(group, "abort")
        return self._finish_output(group)

    def _end(self, group: RequestGroup, finish_reason: str) -> None:
        """Finishes every unfinished sequence of the group; the scheduler frees their blocks."""
        for seq in group.seqs:
            if self._seqs.pop(seq.seq_id, None) is not None and not seq.finished:
                self.scheduler.abort_request(seq.seq_id)
            if not seq.finished:
                seq.finish_reason = finish_reason

    def _fail(self, group: RequestGroup, reason: str) -> None:
        """Fails one request (its output carries ``reason``); the others go on."""
        if group.error is None:
            logger.error("request %s failed: %s", group.request_id, reason)
            group.error = reason
            self._end(group, "error")

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups) or bool(self.beams)

    @property
    def num_requests(self) -> int:
        return len(self._groups) + len(self.beams)

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One forward pass; returns the outputs of requests that got tokens or finished."""
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        t1 = time.perf_counter()
        self.timings.schedule += t1 - t0
        self.num_preemptions += len(out.preempted_ids)
        if self.speculator is not None:
            self.speculator.begin_step(out.block_copies, out.preempted_ids + out.finished_ids)
        if out.is_empty:
            return []
        try:
            self.runner.copy_blocks(out.block_copies)
            drafts = self._propose(out.scheduled)
            plan = self._plan(out.scheduled, drafts)
            batch = self.runner.prepare(out.scheduled, {r: d.tokens for r, d in drafts.items()})
            t2 = time.perf_counter()
            logits = self.runner.execute(batch, plan.logits_indices)
        except EngineDeadError:
            raise
        except Exception as exc:
            return self._fail_step(exc)
        self._failures_in_a_row = 0
        t3 = time.perf_counter()
        emitted = self._sample(logits, plan) + self._verify(logits, plan)
        self._prompt_logprobs(plan, logits)
        for beam_id, row in plan.beam_rows:
            self.beams.report(beam_id, logits[row])
        t4 = time.perf_counter()
        touched = self._apply_samples(out, plan, emitted)
        outputs = [self._finish_output(g) for g in touched] + self.beams.advance()
        t5 = time.perf_counter()
        num_emitted = sum(len(tokens) for _, tokens, _ in emitted)
        self._record(t1, t2, t3, t4, t5, num_emitted)
        if self.speculator is not None:
            self.speculator.end_step(t5 - t0)
        return outputs

    def _fail_step(self, exc: Exception) -> list[RequestOutput]:
        """The shared forward step raised. It cannot be pinned to one request, so every request
        in flight fails, every block comes back and the prefix cache is emptied (a step that
        died midway may have written partial KV); then the engine serves new requests as
        before. Failing again and again ends the engine (EngineDeadError)."""
        self.num_failed_steps += 1
        self._failures_in_a_row += 1
        logger.error("engine step failed (%d in a row); failing the %d requests in flight",
                     self._failures_in_a_row, self.num_requests, exc_info=exc)
        if self._failures_in_a_row >= MAX_CONSECUTIVE_STEP_FAILURES:
            raise EngineDeadError(f"the engine step failed {self._failures_in_a_row} times in "
                                  f"a row, last with {exc!r}") from exc
        reason = f"the engine step serving it failed: {exc!r}"
        groups = list(self._groups.values())
        for group in groups:
            self._fail(group, reason)
        outputs = [self._finish_output(group) for group in groups]
        outputs += [self.beams.fail(request_id, reason) for request_id in self.beams.request_ids()]
        if not self.cache.reset_prefix_cache():
            raise EngineDeadError("the KV cache could not be reset after a failed step: "
                                  f"{self.cache.num_blocks - self.cache.num_free_blocks} blocks "
                                  "are still held") from exc
        return outputs

    def _propose(self, scheduled: list[ScheduledRequest]) -> dict[str, Drafts]:
        """Speculative drafts for the step's decode requests that may speculate: those whose
        sampling processes no logits (penalties, logit bias and min_tokens masking look at
        tokens the drafts would change)."""
        if self.speculator is None:
            return {}

        def row_if_allowed(request_id: str) -> SamplingRow | None:
            seq = self._seqs.get(request_id)
            if seq is None or processes_logits(row := self._sampling_row(seq)):
                return None
            return row

        return self.speculator.propose(scheduled, row_if_allowed, self.sampler.generator)

    def _plan(self, scheduled: list[ScheduledRequest], drafts: dict[str, Drafts]) -> _StepPlan:
        plan = _StepPlan()
        offset = 0
        now = time.time()
        for sr in scheduled:
            if self.beams.owns(sr.request_id):
                if not sr.is_prefill_chunk:
                    plan.beam_rows.append((sr.request_id, len(plan.logits_indices)))
                    plan.logits_indices.append(offset + sr.num_tokens - 1)
                offset += sr.num_tokens
                continue
            seq = self._seqs[sr.request_id]
            group = seq.group
            if group.metrics.first_scheduled_time is None:
                group.metrics.first_scheduled_time = now
            if group.wants_prompt_logprobs:
                self._plan_prompt_logprobs(plan, group, sr, offset)
            if (draft := drafts.get(sr.request_id)) is not None:  # a row per draft follows
                plan.speculative.append((seq, len(plan.logits_indices), draft))
                last = offset + sr.num_tokens - 1
                plan.logits_indices += range(last, last + len(draft.tokens) + 1)
                offset += sr.num_tokens + len(draft.tokens)
                continue
            if not sr.is_prefill_chunk:
                row = len(plan.logits_indices)
                plan.logits_indices.append(offset + sr.num_tokens - 1)
                targets = [seq]
                if len(group.seqs) > 1 and not group.forked:
                    targets = group.seqs
                    plan.forking.append(group)
                plan.sample_seqs += targets
                plan.sample_logit_rows += [row] * len(targets)
            offset += sr.num_tokens
        return plan

    @staticmethod
    def _plan_prompt_logprobs(plan: _StepPlan, group: RequestGroup, sr: ScheduledRequest,
                              offset: int) -> None:
        """Positions lo..hi-1 of this chunk predict prompt tokens lo+1..hi."""
        lo = sr.start
        hi = min(sr.start + sr.num_tokens, len(group.prompt_token_ids) - 1)
        if hi <= lo or lo + 1 != len(group.prompt_logprobs):
            return
        plan.prompt_logprob_jobs.append((group, lo, hi, len(plan.logits_indices)))
        plan.logits_indices += range(offset, offset + hi - lo)

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        params = seq.group.params
        blocked: list[int] = []
        if len(seq.token_ids) < params.min_tokens:
            blocked = list(params.stop_token_ids)
            if not params.ignore_eos:
                blocked += self.eos_token_ids
        return SamplingRow(params, seq.group.prompt_token_ids, seq.token_ids, seq.generator,
                           blocked)

    def _sample(self, logits: torch.Tensor, plan: _StepPlan) -> list[_Emitted]:
        """One token for each of ``plan.sample_seqs``. A batch that fails is sampled again row
        by row, so that a fault fails only the requests whose rows raise (they emit no token)."""
        rows = [self._sampling_row(seq) for seq in plan.sample_seqs]
        if not rows:
            return []
        logits = _rows(logits, plan.sample_logit_rows)
        try:
            return _emitted(plan.sample_seqs, self.sampler(logits, rows))
        except Exception as exc:
            logger.warning("sampling the batch failed (%r): sampling row by row", exc)
        emitted = []
        for i, (seq, row) in enumerate(zip(plan.sample_seqs, rows, strict=True)):
            try:
                emitted += _emitted([seq], self.sampler(logits[i : i + 1], [row]))
            except Exception as exc:
                self._fail(seq.group, f"sampling failed: {exc!r}")
                emitted.append((seq, [], []))  # nothing, but its failed output goes out
        return emitted

    def _verify(self, logits: torch.Tensor, plan: _StepPlan) -> list[_Emitted]:
        """The tokens each speculating sequence emits: its accepted drafts and one more."""
        emitted = []
        for seq, row, drafts in plan.speculative:
            try:
                target = logits[row : row + len(drafts.tokens) + 1].float()
                sampling = self._sampling_row(seq)
                tokens = self.speculator.verify(target, drafts, sampling, self.sampler.generator)
                emitted.append((seq, tokens, self._draft_logprobs(target, tokens, sampling)))
            except Exception as exc:
                self._fail(seq.group, f"verifying its drafts failed: {exc!r}")
                emitted.append((seq, [], []))  # nothing, but its failed output goes out
                continue
            metrics = seq.group.metrics
            metrics.num_draft_tokens += len(drafts.tokens)
            metrics.num_accepted_tokens += len(tokens) - 1
            self.num_draft_tokens += len(drafts.tokens)
            self.num_accepted_tokens += len(tokens) - 1
        return emitted

    @staticmethod
    def _draft_logprobs(target: torch.Tensor, tokens: list[int],
                        row: SamplingRow) -> list[TokenLogprobs | None]:
        """Logprobs of the emitted tokens, each from the target's logits at its position."""
        k = row.params.logprobs
        if k is None:
            return [None] * len(tokens)
        entries = top_logprobs(target[: len(tokens)], [k] * len(tokens))
        return [e.with_sampled(t) for e, t in zip(entries, tokens, strict=True)]

    def _prompt_logprobs(self, plan: _StepPlan, logits: torch.Tensor) -> None:
        for group, lo, hi, row in plan.prompt_logprob_jobs:
            try:
                k = group.params.prompt_logprobs
                entries = top_logprobs(logits[row : row + hi - lo], [k] * (hi - lo))
                targets = group.prompt_token_ids[lo + 1 : hi + 1]
                group.prompt_logprobs += [self._position(e.with_sampled(t))
                                          for e, t in zip(entries, targets, strict=True)]
            except Exception as exc:
                self._fail(group, f"computing its prompt logprobs failed: {exc!r}")

    def _position(self, lp: TokenLogprobs) -> PositionLogprobs:
        return {t: Logprob(v, r, self._decode_token(t)) for t, (v, r) in lp.entries().items()}

    def _apply_samples(self, out, plan: _StepPlan, emitted: list[_Emitted]) -> list[RequestGroup]:
        """Appends the emitted tokens (up to the one that stops a sequence), checks stops,
        updates the scheduler, forks n > 1 requests.

        A request whose token processing (detokenizing, stop checks) raises fails alone."""
        new_tokens: dict[str, list[int]] = {}
        finished: dict[str, FinishReason] = {}
        touched: dict[str, RequestGroup] = {}
        now = time.time()
        for seq, tokens, logprobs in emitted:
            group = seq.group
            touched[group.request_id] = group
            if group.error is not None:
                continue
            try:
                appended = self._append_tokens(seq, tokens, logprobs)
            except Exception as exc:
                self._fail(group, f"processing its output failed: {exc!r}")
                continue
            if seq.seq_id in self._seqs:
                new_tokens[seq.seq_id] = appended
                if seq.finished:
                    finished[seq.seq_id] = FinishReason(seq.finish_reason)
        forking_parents = {g.request_id for g in plan.forking}
        deferred = {rid: finished.pop(rid) for rid in forking_parents if rid in finished}
        self.scheduler.update_from_output(out, new_tokens, finished)
        for group in plan.forking:
            if group.error is None:
                self._fork(group)
        for rid in deferred:
            self.scheduler.abort_request(rid)
        for group in touched.values():
            metrics = group.metrics
            metrics.first_token_time = metrics.first_token_time or now
            metrics.last_token_time = now
        return list(touched.values())

    def _append_tokens(self, seq: Sequence, tokens: list[int],
                       logprobs: list[TokenLogprobs | None]) -> list[int]:
        """Appends tokens until one stops the sequence; returns those appended."""
        for i, (token, lp) in enumerate(zip(tokens, logprobs, strict=True)):
            self._append_token(seq, token, lp)
            if seq.finished:
                return tokens[: i + 1]
        return tokens

    def _append_token(self, seq: Sequence, token: int, lp: TokenLogprobs | None) -> None:
        seq.token_ids.append(token)
        if lp is not None:
            seq.logprobs.append(self._position(lp))
            seq.cumulative_logprob += lp.logprob
        params = seq.group.params
        n_out = len(seq.token_ids)
        decision = stop_by_token(params, token, n_out, self.eos_token_ids)
        delta = ""
        if decision is None or params.include_stop_str_in_output:
            delta = seq.detokenizer.push(token)
        decision = (decision or stop_by_string(params, seq.detokenizer.text, len(delta), n_out)
                    or stop_by_length(params, n_out, len(seq.group.prompt_token_ids) + n_out,
                                      self.max_model_len))
        if decision is not None:
            seq.finish_reason = decision.finish_reason
            seq.stop_reason = decision.stop_reason
            seq.text_end = decision.truncate_to

    def _fork(self, group: RequestGroup) -> None:
        """After the prompt: children share the parent's blocks, each with its own first token."""
        group.forked = True
        parent_id = group.seqs[0].seq_id
        for child in group.seqs[1:]:
            if child.finished:
                continue
            self.scheduler.fork_request(parent_id, child.seq_id, list(child.token_ids))
            self._seqs[child.seq_id] = child

    def _finish_output(self, group: RequestGroup) -> RequestOutput:
        if group.finished and self._groups.pop(group.request_id, None) is not None:
            group.metrics.finished_time = time.time()
            for seq in group.seqs:
                self._seqs.pop(seq.seq_id, None)
        return group.to_output()

    def _record(self, t1: float, t2: float, t3: float, t4: float, t5: float, n: int) -> None:
        tm = self.timings
        tm.prepare_inputs += t2 - t1
        tm.forward += t3 - t2
        tm.sample += t4 - t3
        tm.update += t5 - t4
        tm.steps += 1
        tm.output_tokens += n

    # ---- introspection --------------------------------------------------------------------

    def stats(self) -> EngineStats:
        cache = self.cache
        total, free = cache.num_blocks, cache.num_free_blocks
        return EngineStats(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=cache.usage(), prefix_cache_hit_rate=cache.stats.hit_rate,
            num_free_blocks=free, num_total_blocks=total, num_blocks_held=total - free,
            num_preemptions=self.num_preemptions, num_failed_steps=self.num_failed_steps,
            spec_decode_num_draft_tokens=self.num_draft_tokens,
            spec_decode_num_accepted_tokens=self.num_accepted_tokens,
            prefix_cache_queries=cache.stats.query_tokens,
            prefix_cache_hits=cache.stats.hit_tokens)
