"""Counters of the prefix cache and of copy-on-write."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(slots=True)
class CacheStats:
    """Prefix lookups count once per admission, at the request's first allocate_slots, however
    often the request was looked up while it waited. A preempted request admitted again counts
    again: its hit is what spares the recompute."""

    queries: int = 0  # lookups adopted by a first allocate_slots: one per admission
    query_tokens: int = 0  # prompt tokens those lookups covered
    hits: int = 0  # adopted lookups that hit at least one block
    hit_tokens: int = 0  # tokens served from the cache
    evictions: int = 0  # cached blocks reused for other content
    cow_copies: int = 0  # copy-on-write block copies queued

    @property
    def hit_rate(self) -> float:
        """Fraction of looked-up prompt tokens served from the cache."""
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    @property
    def request_hit_rate(self) -> float:
        """Fraction of lookups that hit at least one block."""
        return self.hits / self.queries if self.queries else 0.0

    def reset(self) -> None:
        for field in fields(self):
            setattr(self, field.name, 0)
