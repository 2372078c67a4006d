"""How many KV blocks to allocate, and a clear failure when one request cannot fit."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kvpage_runtime.errors import EngineConfigError

logger = logging.getLogger("kvpage_runtime")

GiB = 1 << 30
CPU_DEFAULT_CAP = 1 * GiB
CPU_DEFAULT_TOKENS_PER_SEQ = 2048
GPU_DEFAULT_FRACTION = 0.85


@dataclass(frozen=True)
class KVBudget:
    num_blocks: int
    block_size: int
    bytes_per_block: int

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block


def plan_kv_cache(*, bytes_per_token: int, block_size: int, max_model_len: int, max_num_seqs: int,
                  kv_cache_memory: int | float | None, device: torch.device) -> KVBudget:
    """Turns the memory setting into a block count; raises if max_model_len does not fit once."""
    bytes_per_block = bytes_per_token * block_size
    budget = _budget_bytes(kv_cache_memory, device, bytes_per_token, max_num_seqs, max_model_len)
    plan = KVBudget(int(budget // bytes_per_block), block_size, bytes_per_block)
    blocks_needed = -(-max_model_len // block_size)
    if plan.num_blocks < blocks_needed:
        need_mib = blocks_needed * bytes_per_block / (1 << 20)
        raise EngineConfigError(
            f"max_model_len={max_model_len} needs {blocks_needed} KV blocks ({need_mib:.1f} MiB) "
            f"but kv_cache_memory allows {plan.num_blocks} ({budget / (1 << 20):.1f} MiB): "
            f"raise kv_cache_memory or lower max_model_len")
    logger.info("KV cache: %d blocks of %d tokens = %d tokens, %.1f MiB on %s", plan.num_blocks,
                block_size, plan.num_tokens, plan.num_bytes / (1 << 20), device)
    return plan


def _budget_bytes(kv_cache_memory: int | float | None, device: torch.device, bytes_per_token: int,
                  max_num_seqs: int, max_model_len: int) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if kv_cache_memory is None or isinstance(kv_cache_memory, float):
            return free * (kv_cache_memory or GPU_DEFAULT_FRACTION)
        return kv_cache_memory
    if isinstance(kv_cache_memory, float):
        raise EngineConfigError("a fractional kv_cache_memory needs a GPU: give bytes on the CPU")
    if kv_cache_memory is not None:
        return kv_cache_memory
    wanted = bytes_per_token * max_num_seqs * min(max_model_len, CPU_DEFAULT_TOKENS_PER_SEQ)
    floor = bytes_per_token * max_model_len
    return max(min(wanted, CPU_DEFAULT_CAP), floor)
