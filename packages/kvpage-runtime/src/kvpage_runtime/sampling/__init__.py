"""Sampling: parameters, the batched sampler and logprobs."""

from kvpage_runtime.sampling.beam_search import (
    BeamSearchOutput,
    BeamSearchParams,
    BeamSearchSequence,
)
from kvpage_runtime.sampling.logprobs import TokenLogprobs, top_logprobs
from kvpage_runtime.sampling.params import SamplingParams
from kvpage_runtime.sampling.sampler import Sampler, SamplerOutput, SamplingRow

__all__ = ["BeamSearchOutput", "BeamSearchParams", "BeamSearchSequence", "SamplingParams",
           "Sampler", "SamplerOutput", "SamplingRow", "TokenLogprobs", "top_logprobs"]
