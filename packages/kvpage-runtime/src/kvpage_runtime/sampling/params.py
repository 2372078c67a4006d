"""SamplingParams: how one request decodes, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvpage_runtime.errors import InvalidRequestError

_MAX_LOGPROBS = 20
_GREEDY_EPS = 1e-5
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1  # each of the n sequences seeds with seed + index


def _check(ok: bool, name: str, allowed: str, value: object) -> None:
    if not ok:
        raise InvalidRequestError(f"{name} must be {allowed}, got {value!r}")


@dataclass
class SamplingParams:
    """Decoding parameters of one request (vLLM semantics).

    temperature 0 means greedy; top_k 0 or -1 means no top-k; stop strings are matched on the
    detokenized text and are not returned unless ``include_stop_str_in_output``.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check(isinstance(self.n, int) and self.n >= 1, "n", "an integer >= 1", self.n)
        _check(self.temperature >= 0.0, "temperature", ">= 0", self.temperature)
        _check(0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]", self.top_p)
        _check(isinstance(self.top_k, int) and (self.top_k >= 0 or self.top_k == -1), "top_k",
               "0 or -1 (off) or a positive integer", self.top_k)
        _check(0.0 <= self.min_p <= 1.0, "min_p", "in [0, 1]", self.min_p)
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "in [-2, 2]",
               self.presence_penalty)
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "in [-2, 2]",
               self.frequency_penalty)
        _check(self.repetition_penalty > 0.0, "repetition_penalty", "> 0", self.repetition_penalty)
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens",
               "an integer >= 1", self.max_tokens)
        _check(isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
               "min_tokens", f"an integer in [0, max_tokens={self.max_tokens}]", self.min_tokens)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, int) and 0 <= value <= _MAX_LOGPROBS),
                   name, f"None or an integer in [0, {_MAX_LOGPROBS}]", value)
        _check(self.seed is None or (isinstance(self.seed, int) and self.seed >= _INT64_MIN
                                     and self.seed + self.n - 1 <= _INT64_MAX),
               "seed", f"None or an integer in [-2**63, 2**63 - n] (n={self.n})", self.seed)
        self._normalize_stops()
        self._check_logit_bias()

    def _normalize_stops(self) -> None:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        _check(all(isinstance(s, str) and s for s in stops), "stop",
               "a non-empty string or a list of non-empty strings", self.stop)
        self.stop_strings = tuple(stops)
        ids = list(self.stop_token_ids or [])
        _check(all(isinstance(t, int) and t >= 0 for t in ids), "stop_token_ids",
               "a list of non-negative token ids", self.stop_token_ids)
        self.stop_token_ids = ids

    def _check_logit_bias(self) -> None:
        if not self.logit_bias:
            self.logit_bias = None
            return
        bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        _check(all(-100.0 <= v <= 100.0 for v in bias.values()), "logit_bias",
               "a map of token id to a bias in [-100, 100]", self.logit_bias)
        _check(all(k >= 0 for k in bias), "logit_bias", "keyed by non-negative token ids",
               self.logit_bias)
        self.logit_bias = bias

    def validate_vocab(self, vocab_size: int) -> None:
        """Checks the token ids named in the parameters against the model's vocabulary."""
        for name, ids in (("stop_token_ids", self.stop_token_ids),
                          ("logit_bias", list(self.logit_bias or ()))):
            bad = [t for t in ids if t >= vocab_size]
            _check(not bad, name, f"token ids in [0, {vocab_size})", bad)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def needs_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)
