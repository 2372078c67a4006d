"""Speculative decoding's configuration, spelled as vLLM's ``speculative_config``."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from kvpage_runtime.errors import EngineConfigError

METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    """``method``: "ngram" (drafts copied from the request's own prompt and output, after the
    latest earlier occurrence of its last ``prompt_lookup_max`` .. ``prompt_lookup_min``
    tokens) or "draft_model" (drafts from ``model``, a smaller model with the same
    vocabulary). ``num_speculative_tokens``: the most drafts per request and step.
    ``disable_by_batch_size``: no drafts in a step that runs this many requests or more (a
    large batch is compute-bound, and every drafted position then costs what a token does);
    None never disables. ``adaptive``: each step of only decode requests drafts the length
    (0, 1, 2, 4, .. k) that has emitted the most tokens per second in recent steps of as many
    requests (see ``spec_decode.adaptive``); False always drafts k. Which steps draft then
    depends on timings, and with it the random numbers a seeded request draws: for output
    that repeats run to run with a ``seed``, set it False."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    model: str | None = None
    disable_by_batch_size: int | None = None
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise EngineConfigError(f"speculative_config method must be one of {METHODS}, got "
                                    f"{self.method!r}")
        if not isinstance(self.num_speculative_tokens, int) or self.num_speculative_tokens < 1:
            raise EngineConfigError("speculative_config num_speculative_tokens must be an "
                                    f"integer >= 1, got {self.num_speculative_tokens!r}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise EngineConfigError(
                "speculative_config needs 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")
        if (self.method == "draft_model") != (self.model is not None):
            raise EngineConfigError('speculative_config: "model" names the draft model, and '
                                    'is needed exactly when method is "draft_model"')
        if not isinstance(self.adaptive, bool):
            raise EngineConfigError("speculative_config adaptive must be true or false, got "
                                    f"{self.adaptive!r}")
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise EngineConfigError("speculative_config disable_by_batch_size must be >= 1, got "
                                    f"{self.disable_by_batch_size}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SpeculativeConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise EngineConfigError(f"speculative_config has unknown keys {unknown}; known: "
                                    f"{sorted(known)}")
        if "method" not in raw or "num_speculative_tokens" not in raw:
            raise EngineConfigError('speculative_config needs "method" and '
                                    '"num_speculative_tokens"')
        return cls(**raw)
