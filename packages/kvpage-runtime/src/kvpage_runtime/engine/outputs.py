"""What the engine hands back: RequestOutput, CompletionOutput, Logprob, stats snapshots."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvpage_runtime.lora.request import LoRARequest


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One position: token id -> Logprob (the chosen token plus the top-k).
PositionLogprobs = dict[int, Logprob]


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_draft_tokens: int = 0  # speculative decoding: tokens drafted, and of those accepted
    num_accepted_tokens: int = 0


@dataclass
class CompletionOutput:
    """One of a request's n completions; text and token_ids are cumulative."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    error: str | None = None  # why the engine failed this request (its outputs end "error")
    lora_request: LoRARequest | None = None  # the adapter it ran with


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_hit_rate: float
    num_free_blocks: int
    num_total_blocks: int
    num_blocks_held: int
    num_preemptions: int = 0  # the counters below count since the engine started
    num_failed_steps: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found there
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0


@dataclass
class StepTimings:
    """Cumulative seconds spent in each part of the step loop (and step / token counts)."""

    schedule: float = 0.0
    prepare_inputs: float = 0.0
    forward: float = 0.0
    sample: float = 0.0
    update: float = 0.0  # detokenize, stop checks, scheduler update
    steps: int = 0
    output_tokens: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.schedule + self.prepare_inputs + self.forward + self.sample + self.update

    def split(self) -> dict[str, float]:
        """Fraction of the loop's time per part."""
        total = self.total or 1.0
        return {name: getattr(self, name) / total
                for name in ("schedule", "prepare_inputs", "forward", "sample", "update")}
