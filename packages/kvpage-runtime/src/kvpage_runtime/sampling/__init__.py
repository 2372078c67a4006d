"""Sampling: parameters, the batched sampler and logprobs."""

from kvpage_runtime.sampling.logprobs import TokenLogprobs, top_logprobs
from kvpage_runtime.sampling.params import SamplingParams
from kvpage_runtime.sampling.sampler import Sampler, SamplerOutput, SamplingRow

__all__ = ["SamplingParams", "Sampler", "SamplerOutput", "SamplingRow", "TokenLogprobs", "top_logprobs"]
