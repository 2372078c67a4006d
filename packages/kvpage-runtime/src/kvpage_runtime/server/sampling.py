"""Request fields -> the engine's ``SamplingParams`` (or ``BeamSearchParams``)."""

from __future__ import annotations

from kvpage_runtime.sampling import BeamSearchParams, SamplingParams
from kvpage_runtime.server.errors import APIError
from kvpage_runtime.server.protocol import _SamplingFields

# Request fields passed through unchanged when the client set them (None means "default").
_OPTIONAL = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
    "stop",
    "stop_token_ids",
)
_ALWAYS = ("n", "min_tokens", "ignore_eos", "skip_special_tokens", "include_stop_str_in_output")


def _logit_bias(raw: dict[str, float] | None) -> dict[int, float] | None:
    if not raw:
        return None
    try:
        return {int(token): float(bias) for token, bias in raw.items()}
    except ValueError:
        raise APIError("logit_bias keys must be token ids", param="logit_bias") from None


# sampling fields a beam search cannot honour, with the value that means "not used"
_NOT_WITH_BEAM_SEARCH = {
    "stream": False, "top_p": None, "top_k": None, "min_p": None, "presence_penalty": None,
    "frequency_penalty": None, "repetition_penalty": None, "logit_bias": None, "seed": None,
    "stop": None, "stop_token_ids": None, "min_tokens": 0,
}


def beam_search_params(request: _SamplingFields, *, max_tokens: int,
                       logprobs: int | None = None) -> BeamSearchParams:
    """``use_beam_search`` with ``n`` as the beam width (vLLM's extension); the sampling fields
    a beam search cannot honour get a 400 instead of being ignored."""
    used = [name for name, unused in _NOT_WITH_BEAM_SEARCH.items()
            if getattr(request, name) not in (unused, [], {})]
    if logprobs is not None:
        used.append("logprobs")
    for name in used:
        raise APIError(f"{name} cannot be used with use_beam_search", param=name)
    return BeamSearchParams(beam_width=request.n, max_tokens=max_tokens,
                            ignore_eos=request.ignore_eos, temperature=request.temperature or 0.0,
                            length_penalty=request.length_penalty)


def check_supported(request: _SamplingFields) -> None:
    """A 400 for the first known field the request uses that this server does not implement."""
    for name in request.unsupported_fields():
        raise APIError(f"{name} is not supported by this server", param=name,
                       code="unsupported_parameter")


def sampling_params(
    request: _SamplingFields,
    *,
    max_tokens: int,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    vocab_size: int | None = None,
) -> SamplingParams | BeamSearchParams:
    """Builds and validates the parameters (a beam search's with ``use_beam_search``); invalid
    values raise ``InvalidRequestError`` (a 400)."""
    if request.use_beam_search:
        wanted = logprobs if logprobs is not None else prompt_logprobs
        return beam_search_params(request, max_tokens=max_tokens, logprobs=wanted)
    fields = {
        name: getattr(request, name) for name in _OPTIONAL if getattr(request, name) is not None
    }
    fields.update({name: getattr(request, name) for name in _ALWAYS})
    params = SamplingParams(
        **fields,
        max_tokens=max_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        logit_bias=_logit_bias(request.logit_bias),
    )
    if vocab_size is not None:
        params.validate_vocab(vocab_size)
    return params
