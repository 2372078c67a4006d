"""Scheduler configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import SchedulerConfigError

Policy = Literal["fcfs", "priority"]


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits and policies of one scheduler.

    max_num_seqs: most requests running (and scheduled in one step).
    max_num_batched_tokens: token budget of one step (prompt chunks, decode and lookahead tokens).
    max_model_len: longest sequence (prompt + output); longer prompts are rejected, generation
        stops with "length" when a request reaches it.
    enable_chunked_prefill: split prompts over several steps to fit the remaining budget; when
        off, a prompt that does not fit the remaining budget waits for the next step.
    max_prefill_chunk: most prompt tokens one request computes in one step (None: no cap).
    policy: "fcfs" (arrival order) or "priority" (lower value first, then arrival order).
    num_lookahead_tokens: speculative slots reserved after each decode token.
    max_loras: most distinct LoRA adapters in one step (None: no cap).
    defer_shared_prefixes: a waiting request whose first uncached block is computed in this
        step by a request admitted before it waits for the next step, where that block is a
        prefix-cache hit, instead of computing it again (a burst of prompts that share a
        system prompt computes it once). Blocks are recognized by the cache's block hashes
        (``PrefixHit.next_block_hash``), so nothing is deferred when the cache keeps no
        prefixes.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    max_prefill_chunk: int | None = None
    policy: Policy = "fcfs"
    num_lookahead_tokens: int = 0
    max_loras: int | None = None
    defer_shared_prefixes: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise SchedulerConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.policy not in ("fcfs", "priority"):
            raise SchedulerConfigError(f"policy must be 'fcfs' or 'priority', got {self.policy!r}")
        if self.max_prefill_chunk is not None and self.max_prefill_chunk < 1:
            raise SchedulerConfigError(f"max_prefill_chunk must be >= 1, got {self.max_prefill_chunk}")
        if self.max_loras is not None and self.max_loras < 1:
            raise SchedulerConfigError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.num_lookahead_tokens < 0:
            raise SchedulerConfigError(
                f"num_lookahead_tokens must be >= 0, got {self.num_lookahead_tokens}")
        if self.max_num_batched_tokens < 1 + self.num_lookahead_tokens:
            raise SchedulerConfigError(
                f"max_num_batched_tokens {self.max_num_batched_tokens} cannot hold one decode token "
                f"+ {self.num_lookahead_tokens} lookahead tokens")
