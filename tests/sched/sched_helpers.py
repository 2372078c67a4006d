"""Helpers for the scheduler tests: a scheduler over the real kvpage_cache.KVCacheManager and a fake model step."""

from __future__ import annotations

from collections.abc import Callable

from kvpage_cache import BlockPool, KVCacheManager
from kvpage_sched import Request, Scheduler, SchedulerConfig, SchedulerOutput

BLOCK_SIZE = 4


def make_sched(num_blocks: int = 64, prefix_caching: bool = True, sliding_window: int | None = None,
               **cfg) -> tuple[Scheduler, KVCacheManager]:
    cache = KVCacheManager(BlockPool(num_blocks, BLOCK_SIZE, enable_prefix_caching=prefix_caching),
                           sliding_window=sliding_window)
    cfg.setdefault("max_model_len", 256)
    return Scheduler(cache, SchedulerConfig(**cfg)), cache


def req(rid: str, prompt_len: int = 8, max_tokens: int = 4, base: int = 0, **kw) -> Request:
    """A request whose prompt is `prompt_len` consecutive ids from `base` (distinct per base)."""
    return Request(rid, list(range(base, base + prompt_len)), max_tokens, **kw)


def step(sched: Scheduler, token: int | Callable[[str], list[int]] = 7,
         finished: dict | None = None) -> SchedulerOutput:
    """schedule(), then feed one `token` to every request whose step reached its end."""
    out = sched.schedule()
    sample = token if callable(token) else (lambda rid: [token])
    new = {s.request_id: sample(s.request_id) for s in out.scheduled if not s.is_prefill_chunk}
    sched.update_from_output(out, new, finished or {})
    return out


def ids(out: SchedulerOutput) -> list[str]:
    return [s.request_id for s in out.scheduled]


def run_until_done(sched: Scheduler, max_steps: int = 10_000) -> int:
    for n in range(max_steps):
        if not sched.has_unfinished_requests():
            return n
        step(sched)
    raise AssertionError("requests did not finish")
