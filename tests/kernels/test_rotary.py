"""rotary_embedding on every backend against Hugging Face's formula (its Llama and Phi-3
``apply_rotary_pos_emb``), over the whole head and over part of it (partial rotary: the first
2 * half values of each head rotate, the rest pass unchanged); the cpu backend on every CPU
tier this machine offers."""

from __future__ import annotations

import pytest
import torch
from kvpage_kernels import KernelBackendUnavailable, rotary_embedding, select_backend

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (head_dim, half): whole heads, Phi-4-mini's 0.75 of 64, one rotated pair, an odd head_dim
SHAPES = [(64, 32), (64, 24), (16, 1), (10, 3)]
GPU = "cuda" if torch.cuda.is_available() else None


def hf_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb: cos and sin repeated over both halves of the
    rotated values, rotate_half, and the values past them concatenated back unchanged."""
    cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    rotary_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((rotated, x_pass), dim=-1)


def _inputs(tokens: int, head_dim: int, half: int, dtype: torch.dtype, device: str):
    """x as a view of the q and k heads of a fused projection, cos and sin [tokens, 1, half]
    views of one table, as the model passes them."""
    gen = torch.Generator().manual_seed(tokens * 1000 + head_dim + half)
    qkv = torch.randn(tokens, 7, head_dim, generator=gen).to(dtype)
    table = torch.randn(tokens, 2 * half, generator=gen).to(dtype)
    cos, sin = table.unsqueeze(1).chunk(2, dim=-1)
    return qkv[:, :5].to(device), cos.to(device), sin.to(device)


def _check(backend: str, device: str, dtype: torch.dtype, head_dim: int, half: int,
           tokens: int) -> None:
    x, cos, sin = _inputs(tokens, head_dim, half, dtype, device)
    expected = hf_rotary(x, cos, sin)
    actual = rotary_embedding(x, cos, sin, backend=backend)
    assert actual.shape == (tokens, 5, head_dim) and torch.equal(actual, expected)
    assert torch.equal(rotary_embedding(x, cos[:, 0], sin[:, 0], backend=backend), expected)
    assert torch.equal(actual[..., 2 * half:], x[..., 2 * half:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim, half", SHAPES)
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_cpu_backend_on_every_tier(cpu_tier, dtype, head_dim, half, tokens):
    _check(_available("cpu", "cpu"), "cpu", dtype, head_dim, half, tokens)


@pytest.mark.parametrize("backend, device", [
    ("reference", "cpu"), ("torch", "cpu"), ("triton", GPU or "cpu"), ("cupy", GPU),
    ("reference", GPU), ("torch", GPU)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim, half", SHAPES)
def test_other_backends(backend, device, dtype, head_dim, half):
    if device is None:
        pytest.skip("needs a CUDA device")
    _check(_available(backend, device), device, dtype, head_dim, half, tokens=7)


def _available(backend: str, device: str) -> str:
    try:
        return select_backend(device, backend)
    except KernelBackendUnavailable as e:
        pytest.skip(str(e))
