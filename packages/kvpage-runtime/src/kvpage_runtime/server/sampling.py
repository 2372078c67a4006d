"""Request fields -> the engine's ``SamplingParams``."""

from __future__ import annotations

from kvpage_runtime.sampling import SamplingParams
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
) -> SamplingParams:
    """Builds and validates the parameters; invalid values raise ``InvalidRequestError`` (a 400)."""
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
