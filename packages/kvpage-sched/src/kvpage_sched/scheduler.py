"""Iteration-level (continuous batching) scheduler.

Each step decides, per request, how many tokens to compute: a prompt chunk, one decode token,
or one decode token plus lookahead slots, under a token budget and a sequence cap. With a
sliding-window cache, the blocks a request's later tokens can no longer attend to are given
back as soon as it moves past them. Running
requests go first; waiting ones are then admitted in policy order with their prefix-cache hit
counted as computed. When a running request cannot get a block, the lowest-priority, then
latest-arrived running request is preempted by recompute.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .config import SchedulerConfig
from .errors import RequestNotFoundError, RequestRejectedError
from .output import ScheduledRequest, SchedulerOutput, StepStats
from .policy import make_waiting_queue, victim_key
from .protocol import CacheManagerProtocol
from .request import FinishReason, Request, RequestStatus

RUNNING = RequestStatus.RUNNING


@dataclass(slots=True)
class _Step:
    """Budgets left and decisions made in the step being built."""

    token_budget: int
    seq_budget: int
    max_loras: int | None
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    loras: dict[str, int] = field(default_factory=dict)
    copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    hit_tokens: int = 0
    computing_blocks: set = field(default_factory=set)  # hashes of blocks admissions compute

    def lora_allows(self, req: Request) -> bool:
        return (self.max_loras is None or req.lora_id is None or req.lora_id in self.loras
                or len(self.loras) < self.max_loras)

    def add(self, req: Request, n: int, lookahead: int, new_blocks: list[int],
            block_ids: Sequence[int]) -> None:
        start = req.num_computed_tokens
        self.scheduled.append(ScheduledRequest(
            req, start, n, block_ids, new_blocks, start + n < req.num_tokens, lookahead))
        self.token_budget -= n + lookahead
        self.seq_budget -= 1
        if self.max_loras is not None and (lora := req.lora_id) is not None:
            self.loras[lora] = self.loras.get(lora, 0) + 1

    def drop(self, req: Request) -> None:
        """Undo `add` for a request preempted after it was scheduled."""
        index = next((i for i, s in enumerate(self.scheduled) if s.request is req), None)
        if index is None:
            return
        s = self.scheduled.pop(index)
        self.token_budget += s.num_tokens + s.num_lookahead_tokens
        self.seq_budget += 1
        if self.max_loras is not None and (lora := req.lora_id) is not None:
            self.loras[lora] -= 1
            if not self.loras[lora]:
                del self.loras[lora]


class Scheduler:
    def __init__(self, cache_manager: CacheManagerProtocol,
                 config: SchedulerConfig | None = None) -> None:
        self.cache = cache_manager
        self.config = config or SchedulerConfig()
        self.running: list[Request] = []
        self.waiting = make_waiting_queue(self.config.policy)
        self.num_preemptions = 0  # since creation
        self._requests: dict[str, Request] = {}
        self._victim_key = victim_key(self.config.policy)
        self._finished_ids: list[str] = []
        self._pending_copies: list[tuple[int, int]] = []
        self._seq = itertools.count()
        self._block_size = cache_manager.block_size
        self._max_model_len = self.config.max_model_len
        self._window = cache_manager.sliding_window

    # ---- requests in and out -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request; RequestRejectedError if it could never be served."""
        self._check_admissible(request)
        request.seq = next(self._seq)
        self._requests[request.request_id] = request
        self.waiting.push(request)

    def abort_request(self, request_id: str) -> None:
        self.abort_requests((request_id,))

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        """Abort in any state; unknown or finished ids are ignored."""
        for rid in request_ids:
            req = self._requests.get(rid)
            if req is not None and not req.is_finished:
                self._finish(req, FinishReason.ABORT)

    def fork_request(self, parent_id: str, child_id: str,
                     output_token_ids: list[int]) -> Request:
        """Start a sibling of `parent_id` (n > 1 sampling) whose output so far is `output_token_ids`.

        A running parent's KV blocks are shared (copy-on-write on the next write) and the child
        joins the running requests. A parent that holds no KV (waiting, preempted, finished)
        gives a waiting child that reuses the prompt through the prefix cache.
        """
        parent = self.get_request(parent_id)
        if child_id in self._requests:
            raise RequestRejectedError(f"request id {child_id!r} already exists")
        child = Request(child_id, parent.prompt_token_ids, parent.max_tokens, parent.priority,
                        parent.arrival_time, parent.extra_keys, parent.lora_id)
        child.append_output(list(output_token_ids))
        shared = parent.num_computed_tokens
        if parent.status is RUNNING:
            common = max(shared - parent.num_prompt_tokens, 0)
            if (child.num_tokens <= shared
                    or child.output_token_ids[:common] != parent.output_token_ids[:common]):
                raise RequestRejectedError(
                    f"fork {child_id!r}: its tokens must extend the {shared} tokens "
                    f"{parent_id!r} has computed")
        child.seq = next(self._seq)
        self._requests[child_id] = child
        if parent.status is RUNNING:
            self._pending_copies += self.cache.fork(parent_id, child_id)
            child.num_computed_tokens = shared
            child.num_committed_blocks = parent.num_committed_blocks
            child.status = RUNNING
            self.running.append(child)
        else:
            self.waiting.push_front(child)
        if self._tokens_left(child) <= 0:  # born complete: nothing to compute
            self._finish(child, FinishReason.LENGTH)
        return child

    def get_request(self, request_id: str) -> Request:
        """A live request, or one finished since the last schedule()."""
        try:
            return self._requests[request_id]
        except KeyError:
            raise RequestNotFoundError(f"no request {request_id!r}") from None

    def has_unfinished_requests(self) -> bool:
        return bool(self.running) or bool(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- one step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        step = _Step(cfg.max_num_batched_tokens, cfg.max_num_seqs, cfg.max_loras)
        skipped = self._schedule_running(step)
        if not step.preempted:  # memory is short: let the running requests drain first
            self._schedule_waiting(step, cfg.max_num_seqs - len(skipped) - len(step.scheduled))
        # Requests skipped this step (budget, cap, LoRA cap) go first next step.
        self.running = skipped + [s.request for s in step.scheduled]
        return self._output(step)

    def _schedule_running(self, step: _Step) -> list[Request]:
        skipped = []
        allocate, block_table = self.cache.allocate_slots, self.cache.block_table
        plain_decode = (1, 0) if not self.config.num_lookahead_tokens else None
        for req in self.running:  # rebuilt by schedule(); preemption only changes statuses
            if req.status is not RUNNING:  # preempted earlier in this loop
                continue
            if plain_decode and req.num_tokens - req.num_computed_tokens == 1 and step.token_budget:
                n, lookahead = plain_decode  # the common case, without a call
            else:
                n, lookahead = self._running_tokens(req, step.token_budget)
            if n == 0 or step.seq_budget == 0 or (
                    step.max_loras is not None and not step.lora_allows(req)):
                skipped.append(req)
                continue
            new_blocks = allocate(req.request_id, n, (), lookahead)
            if new_blocks is None:
                new_blocks = self._allocate_preempting(req, n, lookahead, step)
                if new_blocks is None:  # req preempted itself
                    continue
            step.add(req, n, lookahead, new_blocks, block_table(req.request_id))
        return [r for r in skipped if r.status is RUNNING]

    def _schedule_waiting(self, step: _Step, free_seqs: int) -> None:
        skipped = []  # other LoRA adapters than the step's: keep their place
        while self.waiting and free_seqs > 0 and step.token_budget > 0:
            req = self.waiting.peek()
            if not step.lora_allows(req):
                skipped.append(self.waiting.pop())
            elif self._admit(req, step):
                self.waiting.pop()
                free_seqs -= 1
            else:
                break  # head of line waits: nobody overtakes it
        for req in reversed(skipped):
            self.waiting.push_front(req)

    def _admit(self, req: Request, step: _Step) -> bool:
        hit = self.cache.lookup_prefix(req.request_id, req.all_token_ids, req.cache_keys)
        shared = self.config.defer_shared_prefixes and hit.next_block_hash is not None
        if shared and hit.next_block_hash in step.computing_blocks:
            return False  # an earlier admission computes that block now: next step it is a hit
        n = self._prefill_tokens(req.num_tokens - hit.num_tokens, step.token_budget)
        if n == 0:
            return False
        new_blocks = self.cache.allocate_slots(req.request_id, n, hit.block_ids)
        if new_blocks is None:
            return False
        if shared and n >= self._block_size:  # it computes (and then caches) that whole block
            step.computing_blocks.add(hit.next_block_hash)
        req.status = RUNNING
        req.num_computed_tokens = hit.num_tokens
        req.num_committed_blocks = hit.num_tokens // self._block_size
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = hit.num_tokens
        step.hit_tokens += hit.num_tokens
        step.add(req, n, 0, new_blocks, self.cache.block_table(req.request_id))
        return True

    def _allocate_preempting(self, req: Request, n: int, lookahead: int,
                             step: _Step) -> list[int] | None:
        """Slots for `req`, preempting until they fit; None when `req` itself was preempted."""
        while True:
            victim = max((r for r in self.running if r.status is RUNNING), key=self._victim_key)
            self._preempt(victim, step)
            if victim is req:
                return None
            new_blocks = self.cache.allocate_slots(req.request_id, n, (), lookahead)
            if new_blocks is not None:
                return new_blocks

    def _preempt(self, victim: Request, step: _Step) -> None:
        """Recompute later: give back every block, go to the front of the waiting queue."""
        lost = set(self.cache.block_table(victim.request_id))
        step.copies = [c for c in step.copies + self.cache.take_block_copies() if c[1] not in lost]
        self.cache.free(victim.request_id)
        step.drop(victim)
        step.preempted.append(victim.request_id)
        victim.status = RequestStatus.PREEMPTED
        victim.num_computed_tokens = 0
        victim.num_committed_blocks = 0
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.push_front(victim)

    def _running_tokens(self, req: Request, budget: int) -> tuple[int, int]:
        """(tokens, lookahead slots) a running request computes within `budget`."""
        remaining = req.num_tokens - req.num_computed_tokens
        if remaining > 1:
            return self._prefill_tokens(remaining, budget), 0
        if remaining == 0 or budget == 0:  # 0: its next token is decided elsewhere (beam search)
            return 0, 0
        lookahead = self.config.num_lookahead_tokens
        if lookahead:  # never more drafts than the budget or the tokens left to produce
            lookahead = max(min(lookahead, budget - 1, self._tokens_left(req) - 1), 0)
        return 1, lookahead

    def _prefill_tokens(self, remaining: int, budget: int) -> int:
        """Prompt tokens to compute now, or 0 to wait.

        Without chunked prefill a prompt waits for a step with room for all of it, except a
        resumed request longer than the whole budget, which is recomputed in chunks.
        """
        cfg = self.config
        if not cfg.enable_chunked_prefill and remaining <= cfg.max_num_batched_tokens:
            return remaining if remaining <= budget else 0
        return min(remaining, budget, cfg.max_prefill_chunk or remaining)

    def _output(self, step: _Step) -> SchedulerOutput:
        copies = self._pending_copies + step.copies + self.cache.take_block_copies()
        self._pending_copies = []
        finished, self._finished_ids = self._finished_ids, []
        for rid in finished:
            del self._requests[rid]
        scheduled = step.scheduled
        stats = StepStats(
            num_scheduled_tokens=self.config.max_num_batched_tokens - step.token_budget,
            num_scheduled_requests=len(scheduled), num_running=len(self.running),
            num_waiting=len(self.waiting), num_preempted=len(step.preempted),
            num_prefix_hit_tokens=step.hit_tokens, kv_usage=self.cache.usage(),
            prefix_hit_rate=self.cache.stats.hit_rate)
        return SchedulerOutput(scheduled, copies, step.preempted, finished, stats)

    # ---- results of a step ---------------------------------------------------------------

    def update_from_output(self, output: SchedulerOutput, new_token_ids: Mapping[str, list[int]],
                           finished: Mapping[str, FinishReason | str] | None = None) -> None:
        """Record a step's results.

        new_token_ids: sampled tokens of the requests whose step reached the end of their known
        tokens, usually one; with lookahead, the accepted drafts plus the bonus token (their KV
        is kept, the other lookahead slots are rolled back). Without lookahead, tokens beyond
        the first are computed next step. finished: requests the runtime stopped (EOS, stop
        string), with their reason. Requests reaching max_tokens or max_model_len finish with
        "length" here; tokens past those limits are dropped.
        """
        finished = finished or {}
        for s in output.scheduled:
            req = s.request
            if req.status is not RUNNING:  # aborted since schedule()
                continue
            left = self._advance(req, s, new_token_ids.get(req.request_id))
            reason = finished.get(req.request_id)
            if reason is None and left <= 0:
                reason = FinishReason.LENGTH
            if reason is not None:
                self._finish(req, FinishReason(reason))
        for rid, reason in finished.items():
            req = self._requests.get(rid)
            if req is not None and not req.is_finished:
                self._finish(req, FinishReason(reason))

    def _advance(self, req: Request, s: ScheduledRequest, tokens: list[int] | None) -> int:
        """Advance `req` past step `s`, publish the blocks it filled and record its sampled
        `tokens`; returns the output tokens it may still produce (1 after a prefill chunk,
        which samples nothing)."""
        req.num_computed_tokens = s.start + s.num_tokens
        if s.is_prefill_chunk:
            tokens, left = [], 1
        else:
            left = self._tokens_left(req)
            if not tokens:
                tokens = []
            elif len(tokens) > left:
                tokens = tokens[:left]
            if s.num_lookahead_tokens:  # accepted drafts have their KV: keep it, drop the rest
                req.num_computed_tokens += min(max(len(tokens) - 1, 0), s.num_lookahead_tokens)
                self.cache.truncate(req.request_id, req.num_computed_tokens)
        if req.num_computed_tokens >= (req.num_committed_blocks + 1) * self._block_size:
            self._commit_full_blocks(req, tokens)
        if self._window is not None:  # blocks no later token can attend to go back now
            self.cache.free_outside_window(req.request_id, req.num_computed_tokens)
        req.append_output(tokens)
        return left - len(tokens)

    def _commit_full_blocks(self, req: Request, pending: list[int]) -> None:
        """Publish the full blocks of `req`'s computed tokens: all_token_ids, then the first
        of `pending` (accepted drafts not appended yet). Called before the append, the common
        decode passes all_token_ids itself, without a copy."""
        computed = req.num_computed_tokens
        token_ids = req.all_token_ids
        if len(token_ids) != computed:
            token_ids = (token_ids + pending)[:computed]
        self.cache.commit_full_blocks(req.request_id, token_ids, req.cache_keys)
        req.num_committed_blocks = computed // self._block_size

    def _tokens_left(self, req: Request) -> int:
        """Output tokens `req` may still produce before finishing with "length" (a prompt of
        max_model_len tokens still gets one)."""
        left = min(req.max_tokens - len(req.output_token_ids),
                   self._max_model_len - req.num_tokens)
        return left if left > 0 or req.output_token_ids else 1

    def _finish(self, req: Request, reason: FinishReason) -> None:
        if req.status is RUNNING:
            self.cache.free(req.request_id)
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        req.status = RequestStatus.finished(reason)
        req.finish_reason = reason
        self._finished_ids.append(req.request_id)

    def _check_admissible(self, req: Request) -> None:
        cfg = self.config
        n = req.num_prompt_tokens
        if req.request_id in self._requests:
            raise RequestRejectedError(f"request id {req.request_id!r} already exists")
        if n == 0:
            raise RequestRejectedError("prompt is empty")
        if req.max_tokens < 1:
            raise RequestRejectedError(f"max_tokens must be >= 1, got {req.max_tokens}")
        if n > cfg.max_model_len:
            raise RequestRejectedError(
                f"prompt of {n} tokens exceeds max_model_len {cfg.max_model_len}")
        if not cfg.enable_chunked_prefill and n > cfg.max_num_batched_tokens:
            raise RequestRejectedError(
                f"prompt of {n} tokens exceeds max_num_batched_tokens "
                f"{cfg.max_num_batched_tokens} (chunked prefill is off)")
        peak = min(n + req.max_tokens, cfg.max_model_len) + cfg.num_lookahead_tokens
        if self._window is not None:  # it holds the window and the chunk being computed
            peak = min(peak, self._window + cfg.max_num_batched_tokens + 2 * self._block_size)
        if not self.cache.can_ever_fit(peak):
            raise RequestRejectedError(
                f"prompt of {n} tokens + max_tokens {req.max_tokens} needs KV for {peak} tokens, "
                f"more than the whole KV cache holds")
