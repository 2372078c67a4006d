"""What one scheduling step hands the model runner: model-agnostic token ranges and blocks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .request import Request


@dataclass(slots=True)
class ScheduledRequest:
    """Compute `request.all_token_ids[start:start + num_tokens]` (positions start..start+num_tokens-1).

    block_ids is the request's whole block table: the cache's own list, not a copy, so read it
    before update_from_output() (which may roll lookahead slots back) and never change it.
    new_block_ids are the blocks allocated this step.
    num_lookahead_tokens speculative slots follow the computed tokens (decode steps only).
    is_prefill_chunk: the step stops short of the known tokens, so nothing is sampled for it.
    """

    request: Request
    start: int
    num_tokens: int
    block_ids: Sequence[int]
    new_block_ids: list[int]
    is_prefill_chunk: bool
    num_lookahead_tokens: int = 0

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass(slots=True)
class StepStats:
    num_scheduled_tokens: int = 0     # computed this step, lookahead slots included
    num_scheduled_requests: int = 0
    num_running: int = 0              # after the step's decisions
    num_waiting: int = 0
    num_preempted: int = 0
    num_prefix_hit_tokens: int = 0    # tokens of admitted requests found in the prefix cache
    kv_usage: float = 0.0             # used blocks / total
    prefix_hit_rate: float = 0.0      # cumulative, from the cache manager


@dataclass(slots=True)
class SchedulerOutput:
    """One step. Perform `block_copies` (copy-on-write, (src, dst)) before the forward pass.

    finished_ids: requests finished or aborted since the previous step (their blocks are
    already given back); they may be non-empty when nothing is scheduled.
    """

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)
    stats: StepStats = field(default_factory=StepStats)

    @property
    def is_empty(self) -> bool:
        """True when there is nothing to compute this step."""
        return not self.scheduled

    @property
    def num_scheduled_tokens(self) -> int:
        return self.stats.num_scheduled_tokens
