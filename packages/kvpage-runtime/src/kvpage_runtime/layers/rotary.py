"""Rotary position embeddings (half-rotation layout, as in Hugging Face Llama) with scaling variants.

The rotation itself is ``kvpage_kernels.rotary_embedding`` (one pass on the compiled CPU
backend); this module holds the frequencies and the per-position cos/sin table. With partial
rotary (Phi-4-mini) the table covers the first ``rotary_dim`` values of each head and the
kernel leaves the others as they are.

transformers recomputes the dynamic-NTK and LongRoPE frequencies at each forward from the
sequence's current length. A paged cache cannot follow it (the keys already cached keep the
rotation they were written with), so here, as in vLLM, they are chosen once, for the model's
whole context (``max_positions``)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from kvpage_runtime.errors import ModelLoadError, UnsupportedModelError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "dynamic",
                        "freq_factors")


def _exponents(dim: int) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim


def default_inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** _exponents(dim))


def llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths slowed by ``factor``, short kept, the middle blended."""
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def yarn_inv_freq(dim: int, theta: float, params: dict[str, Any],
                  max_positions: int) -> tuple[torch.Tensor, float]:
    """YaRN: frequencies interpolated by ``factor`` below a ramp of dimensions, kept above it
    (between ``beta_slow`` and ``beta_fast`` rotations over the original context), and the
    attention factor that scales cos and sin (from ``mscale``/``mscale_all_dim`` when both are
    given), as transformers computes them."""
    original = params.get("original_max_position_embeddings") or max_positions
    factor = params.get("factor") or max_positions / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else _yarn_mscale(factor))

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(params.get("beta_fast") or 32), correction_dim(
        params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolated = default_inv_freq(dim, theta)
    keep = 1 - ramp
    return extrapolated / factor * (1 - keep) + extrapolated * keep, attention_factor


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def longrope_inv_freq(dim: int, theta: float, params: dict[str, Any],
                      max_positions: int) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3, Phi-3.5, Phi-4-mini): each frequency divided by its own factor, from
    ``long_factor`` when the model's context exceeds ``original_max_position_embeddings``,
    else from ``short_factor``, and the attention factor that scales cos and sin:
    ``attention_factor``, else sqrt(1 + log(s) / log(original)) for s = ``factor`` or
    max_positions / original (1 when s <= 1), as transformers computes them.

    transformers takes the long factors once the sequence itself is longer than the original
    context; here the model's context decides, once (vLLM decides by its max_model_len)."""
    original = params["original_max_position_embeddings"]
    key = "long_factor" if max_positions > original else "short_factor"
    factors = _factors(params[key], dim, key)
    scale = params.get("factor") or max_positions / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = (1.0 if scale <= 1
                            else math.sqrt(1 + math.log(scale) / math.log(original)))
    return 1.0 / (factors * theta ** _exponents(dim)), attention_factor


def _factors(values: list[float], dim: int, key: str) -> torch.Tensor:
    """One factor per frequency of the rotary dimension ``dim``, as fp32."""
    factors = torch.tensor(values, dtype=torch.float32)
    if factors.shape != ((dim + 1) // 2,):
        raise ModelLoadError(f"rope_scaling {key} holds {factors.numel()} values; the rotary "
                             f"dimension {dim} needs {(dim + 1) // 2}")
    return factors


def dynamic_ntk_inv_freq(dim: int, theta: float, params: dict[str, Any],
                         max_positions: int) -> torch.Tensor:
    """Dynamic NTK: the base grown for the model's whole context L = ``max_positions`` past
    the original one, theta * (factor * L / original - (factor - 1)) ** (dim / (dim - 2)),
    with original = ``original_max_position_embeddings`` (the HF loader sets it to the config's
    max_position_embeddings and serves L = factor times that; absent, L: no growth).

    That is the base transformers computes for a sequence of length L, and vLLM's static one
    (its context is factor times the original). transformers keeps the unscaled base up to the
    original context and grows it with each longer sequence; here it is fixed once."""
    original = params.get("original_max_position_embeddings") or max_positions
    factor, length = params["factor"], max(max_positions, original)
    base = theta * ((factor * length / original) - (factor - 1)) ** (dim / (dim - 2))
    return default_inv_freq(dim, base)


def rope_inv_freq(dim: int, theta: float, scaling: dict[str, Any] | None,
                  max_positions: int) -> tuple[torch.Tensor, float]:
    """The inverse frequencies of the first ``dim`` values of each head (the rotary dimension),
    and the factor cos and sin are scaled by (1 but for YaRN and LongRoPE)."""
    inv_freq = default_inv_freq(dim, theta)
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / scaling["factor"], 1.0
    if rope_type == "llama3":
        return llama3_inv_freq(inv_freq, scaling), 1.0
    if rope_type == "yarn":
        return yarn_inv_freq(dim, theta, scaling, max_positions)
    if rope_type == "longrope":
        return longrope_inv_freq(dim, theta, scaling, max_positions)
    if rope_type == "dynamic":
        return dynamic_ntk_inv_freq(dim, theta, scaling, max_positions), 1.0
    if rope_type == "freq_factors":  # GGUF's rope_freqs: each frequency divided by its factor
        return inv_freq / _factors(scaling["factors"], dim, "factors"), 1.0
    raise UnsupportedModelError(
        f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


class RotaryEmbedding(nn.Module):
    """Holds cos/sin for every position up to ``max_positions``; a batch gathers its rows once.

    ``rotary_dim`` is the number of values of each head that rotate: head_dim, or fewer with
    partial rotary. ``lookup(positions)`` is called once per forward pass and its result shared
    by all layers.
    """

    def __init__(
        self,
        rotary_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict[str, Any] | None,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        inv_freq, attention_factor = rope_inv_freq(rotary_dim, theta, scaling, max_positions)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        cos_sin = (torch.cat((freqs.cos(), freqs.sin()), dim=-1) * attention_factor).to(dtype)
        self.register_buffer("cos_sin_cache", cos_sin.to(device), persistent=False)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for ``positions``, each shaped [num_tokens, 1, (rotary_dim + 1) // 2]."""
        cos, sin = self.cos_sin_cache.index_select(0, positions).unsqueeze(1).chunk(2, dim=-1)
        return cos, sin
