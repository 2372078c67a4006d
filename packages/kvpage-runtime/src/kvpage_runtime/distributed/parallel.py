"""A model shard's place in its tensor-parallel group, and the collectives its layers call.

Megatron-style tensor parallelism: each of ``size`` ranks holds a slice of every layer.
Column-parallel layers (QKV, gate/up) hold a slice of the outputs, row-parallel ones (o_proj,
down_proj) a slice of the inputs and sum their partial products with one all-reduce; the
vocabulary of the embedding and LM head is split in equal parts (the last padded), so
logits are gathered on the driver (rank 0). ``TensorParallel()`` is the single-rank group,
whose collectives do nothing: models built without a group run as they always did.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvpage_runtime.errors import EngineConfigError


@dataclass
class CommStats:
    """Seconds the driver spent in collectives (waiting for slower ranks included), how many
    it ran, and seconds spent sending each step's inputs."""

    collective_seconds: float = 0.0
    collectives: int = 0
    message_seconds: float = 0.0


@dataclass(frozen=True)
class HeadSplit:
    """One rank's attention heads: ``num_heads`` query heads from ``q_start`` and
    ``num_kv_heads`` KV heads from ``kv_start`` (a KV head is replicated on several ranks
    when the model has fewer KV heads than ranks)."""

    num_heads: int
    num_kv_heads: int
    q_start: int
    kv_start: int


@dataclass
class TensorParallel:
    """Rank ``rank`` of ``size``. ``group`` is the torch.distributed group of the activations'
    collectives (gloo on the CPU, NCCL on CUDA); it is set once the ranks have met
    (``distributed.worker.connect``), after the shard may already have been loaded, and so is
    ``shm_all_reduce`` where CPU ranks share a machine (``shm_all_reduce``)."""

    rank: int = 0
    size: int = 1
    group: Any = None
    shm_all_reduce: Any = None  # a SharedMemoryAllReduce, or None
    stats: CommStats = field(default_factory=CommStats)

    def split(self, total: int, what: str) -> tuple[int, int]:
        """This rank's (start, count) of ``total`` items split evenly; an error naming the
        counts when they do not divide."""
        if total % self.size:
            raise EngineConfigError(
                f"tensor_parallel_size={self.size} does not divide the model's {total} {what}: "
                f"choose a size that divides {total}")
        count = total // self.size
        return self.rank * count, count

    def padded_split(self, total: int) -> tuple[int, int, int]:
        """This rank's (start, count, padded count) of ``total`` items cut into ``size``
        parts of ceil(total / size): the vocabulary, whose size rarely divides."""
        part = -(-total // self.size)
        start = min(self.rank * part, total)
        return start, min(part, total - start), part

    def heads(self, num_heads: int, num_kv_heads: int) -> HeadSplit:
        """Query heads split evenly; KV heads split evenly too, or, when there are fewer KV
        heads than ranks, each rank holds the one its query heads use (as vLLM does)."""
        q_start, q_count = self.split(num_heads, "attention heads")
        if num_kv_heads >= self.size:
            kv_start, kv_count = self.split(num_kv_heads, "KV heads")
        elif self.size % num_kv_heads:
            raise EngineConfigError(
                f"tensor_parallel_size={self.size} is neither a divisor nor a multiple of the "
                f"model's {num_kv_heads} KV heads")
        else:
            kv_start, kv_count = self.rank * num_kv_heads // self.size, 1
        return HeadSplit(q_count, kv_count, q_start, kv_start)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over the ranks, in place."""
        if self.size > 1:
            started = time.perf_counter()
            if self.shm_all_reduce is not None and self.shm_all_reduce.fits(x):
                self.shm_all_reduce(x)
            else:
                torch.distributed.all_reduce(x, group=self.group)
            self._count(started)
        return x

    def gather_to_driver(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every rank's ``x`` concatenated along the last dimension, on rank 0 (None on the
        others)."""
        if self.size == 1:
            return x
        started = time.perf_counter()
        x = x.contiguous()
        if self.shm_all_reduce is not None and self.shm_all_reduce.fits(x):
            gathered = self.shm_all_reduce.gather(x)
        else:
            parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
            torch.distributed.gather(x, parts, dst=0, group=self.group)
            gathered = torch.cat(parts, dim=-1) if parts is not None else None
        self._count(started)
        return gathered

    def _count(self, started: float) -> None:
        self.stats.collective_seconds += time.perf_counter() - started
        self.stats.collectives += 1
