"""Rotary position embeddings (half-rotation layout, as in Hugging Face Llama) with scaling variants.

The rotation itself is ``kvpage_kernels.rotary_embedding`` (one pass on the compiled CPU
backend); this module holds the frequencies and the per-position cos/sin table."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from kvpage_runtime.errors import UnsupportedModelError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    return 1.0 / (theta**exponents)


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


def yarn_inv_freq(head_dim: int, theta: float, params: dict[str, Any],
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
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(params.get("beta_fast") or 32), correction_dim(
        params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolated = default_inv_freq(head_dim, theta)
    keep = 1 - ramp
    return extrapolated / factor * (1 - keep) + extrapolated * keep, attention_factor


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None,
                  max_positions: int) -> tuple[torch.Tensor, float]:
    """The inverse frequencies, and the factor cos and sin are scaled by (1 but for YaRN)."""
    inv_freq = default_inv_freq(head_dim, theta)
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / scaling["factor"], 1.0
    if rope_type == "llama3":
        return llama3_inv_freq(inv_freq, scaling), 1.0
    if rope_type == "yarn":
        return yarn_inv_freq(head_dim, theta, scaling, max_positions)
    raise UnsupportedModelError(
        f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


class RotaryEmbedding(nn.Module):
    """Holds cos/sin for every position up to ``max_positions``; a batch gathers its rows once.

    ``lookup(positions)`` is called once per forward pass and its result shared by all layers.
    """

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict[str, Any] | None,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        inv_freq, attention_factor = rope_inv_freq(head_dim, theta, scaling, max_positions)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        cos_sin = (torch.cat((freqs.cos(), freqs.sin()), dim=-1) * attention_factor).to(dtype)
        self.register_buffer("cos_sin_cache", cos_sin.to(device), persistent=False)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for ``positions``, each shaped [num_tokens, 1, head_dim // 2]."""
        cos, sin = self.cos_sin_cache.index_select(0, positions).unsqueeze(1).chunk(2, dim=-1)
        return cos, sin
