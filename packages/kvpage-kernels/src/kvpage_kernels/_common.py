"""Small helpers shared by the backends."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .errors import KernelInputError

Pairs = Sequence[tuple[int, int]] | torch.Tensor


def check_inner_contiguous(t: torch.Tensor, name: str) -> None:
    """Raw kernels address the last (head_dim) dimension with unit stride."""
    if t.stride(-1) != 1:
        raise KernelInputError(f"{name} must have a unit stride in its last (head_dim) dimension")


def apply_softcap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Logit soft-capping: softcap * tanh(scores / softcap) (identity when softcap is None)."""
    if softcap is None:
        return scores
    return torch.tanh(scores / softcap) * softcap


def pairs_to_lists(pairs: Pairs) -> tuple[list[int], list[int]]:
    """(src ids, dst ids) from a list of (src, dst) pairs or an int tensor of shape [n, 2]."""
    if isinstance(pairs, torch.Tensor):
        rows = pairs.reshape(-1, 2).tolist()
    else:
        rows = [tuple(p) for p in pairs]
    return [int(s) for s, _ in rows], [int(d) for _, d in rows]


def pairs_to_tensors(pairs: Pairs, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(src, dst) int64 index tensors on `device`."""
    if isinstance(pairs, torch.Tensor):
        both = pairs.reshape(-1, 2).to(device=device, dtype=torch.long)
        return both[:, 0], both[:, 1]
    src, dst = pairs_to_lists(pairs)
    return (torch.tensor(src, dtype=torch.long, device=device),
            torch.tensor(dst, dtype=torch.long, device=device))


def copy_blocks_indexed(kv_caches, src_dst: Pairs) -> None:
    """Block copies as one gather + scatter per cache tensor (every copy reads the old values)."""
    if not kv_caches:
        return
    src, dst = pairs_to_tensors(src_dst, kv_caches[0][0].device)
    if src.numel() == 0:
        return
    for k_cache, v_cache in kv_caches:
        k_cache[dst] = k_cache[src]
        v_cache[dst] = v_cache[src]


def swap_blocks_indexed(src_cache: torch.Tensor, dst_cache: torch.Tensor, mapping: Pairs) -> None:
    """Copies blocks between two caches that may live on different devices."""
    src, dst = pairs_to_tensors(mapping, src_cache.device)
    if src.numel() == 0:
        return
    # a device-to-host copy must complete before the host reads it: non_blocking only to CUDA
    blocks = src_cache[src].to(dst_cache.device, non_blocking=dst_cache.is_cuda)
    dst_cache[dst.to(dst_cache.device)] = blocks


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   residual: torch.Tensor | None = None):
    """RMSNorm with Hugging Face's numerics (fp32 statistics; in half types the normalized
    value is rounded before the weight scales it), after adding `residual` when given:
    returns norm(x) or (norm(x + residual), x + residual)."""
    if residual is not None:
        x = x + residual
    shape = (x.shape[-1],)
    if x.dtype == torch.float32:
        normed = F.rms_norm(x, shape, weight, eps)
    else:
        normed = F.rms_norm(x.float(), shape, None, eps).to(x.dtype) * weight
    return normed if residual is None else (normed, x)


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] along the last dimension."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_embedding_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x [tokens, heads, head_dim] in the half-rotation layout (as Hugging Face Llama):
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin); cos, sin [tokens, (1,) head_dim // 2]."""
    cos, sin = cos.reshape(x.shape[0], 1, -1), sin.reshape(x.shape[0], 1, -1)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def argmax_torch(x: torch.Tensor) -> torch.Tensor:
    """Row-wise index of the first maximum (max().indices: several times faster than argmax
    on the CPU)."""
    return x.max(dim=-1).indices
