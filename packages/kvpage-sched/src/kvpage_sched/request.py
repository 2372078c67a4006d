"""A generation request as the scheduler sees it: token ids, progress and status."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"

    def __str__(self) -> str:
        return self.value


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again: its KV was given back and will be recomputed
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED

    @classmethod
    def finished(cls, reason: FinishReason) -> RequestStatus:
        return _STATUS_OF_REASON[reason]


_FINISHED = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                       RequestStatus.FINISHED_ABORTED})
_STATUS_OF_REASON = {FinishReason.STOP: RequestStatus.FINISHED_STOPPED,
                     FinishReason.LENGTH: RequestStatus.FINISHED_LENGTH,
                     FinishReason.ABORT: RequestStatus.FINISHED_ABORTED}


@dataclass(eq=False, slots=True)
class Request:
    """One sequence to generate.

    `num_computed_tokens` counts the leading tokens of `all_token_ids` whose KV is in the cache.
    `extra_keys` are prefix-cache keys such as (("salt", "tenant1"),); a `lora_id` adds
    ("lora", lora_id) to them so that two adapters never share KV. `arrival_time` orders
    requests (any clock, the same for all; default time.monotonic()).
    """

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    priority: int = 0
    arrival_time: float | None = None
    extra_keys: tuple = ()
    lora_id: str | None = None
    output_token_ids: list[int] = field(init=False, default_factory=list)
    num_tokens: int = field(init=False, default=0)  # len(all_token_ids)
    num_computed_tokens: int = field(init=False, default=0)
    status: RequestStatus = field(init=False, default=RequestStatus.WAITING)
    finish_reason: FinishReason | None = field(init=False, default=None)
    num_preemptions: int = field(init=False, default=0)
    num_cached_tokens: int = field(init=False, default=-1)  # prefix hit at first admission
    cache_keys: tuple = field(init=False, default=())
    seq: int = field(init=False, default=0)  # order of add_request, breaks arrival-time ties
    num_committed_blocks: int = field(init=False, default=0)  # full blocks published to the prefix cache
    _all_token_ids: list[int] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self._all_token_ids = list(self.prompt_token_ids)
        self.num_tokens = len(self._all_token_ids)
        if self.arrival_time is None:
            self.arrival_time = time.monotonic()
        keys = tuple(self.extra_keys)
        if self.lora_id is not None and ("lora", self.lora_id) not in keys:
            keys += (("lora", self.lora_id),)
        self.cache_keys = keys

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt + output token ids (the live list: read, do not modify)."""
        return self._all_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status in _FINISHED

    def append_output(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)
        self._all_token_ids.extend(token_ids)
        self.num_tokens += len(token_ids)
