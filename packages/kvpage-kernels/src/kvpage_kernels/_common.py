"""Small helpers shared by the backends."""

from __future__ import annotations

from collections.abc import Sequence

import torch

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
