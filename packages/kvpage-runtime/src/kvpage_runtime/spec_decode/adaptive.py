"""Choosing how many tokens to draft per step from what drafting has paid there.

Whether drafts pay depends on the hardware and the batch (a step's cost grows little with
its rows while weights dominate, one decode step alone on the CPU, and about linearly once
the batch is large) and on the text (copy-heavy output accepts most drafts, free text few).
Neither is known in advance, so it is measured: steps are grouped by their number of decode
requests (1, 2-3, 4-7, 8-15, ...), and each group keeps, for every draft length on the
ladder 0, 1, 2, 4, .., k, a moving average of the tokens per second its steps emitted. A step
drafts the length with the best average; each length is first tried a few times, and now and
then (``explore``) a neighbour of the best one is tried again, so that the choice follows a
workload that changes. Length 0 is speculation switched off for that batch size.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class _Rate:
    """A moving average of tokens per second, and how many steps it has seen."""

    value: float = 0.0
    steps: int = 0

    def add(self, sample: float, smoothing: float) -> None:
        self.steps += 1
        weight = max(smoothing, 1.0 / self.steps)  # the first samples are a plain mean
        self.value += weight * (sample - self.value)


@dataclass
class DraftLengthChooser:
    max_k: int
    seed: int = 0
    explore: float = 0.05  # the chance that a step tries a neighbour of the best length
    smoothing: float = 0.1  # weight of the newest step in a length's average
    trials: int = 3  # steps each length gets before the averages are compared
    _rates: dict[int, dict[int, _Rate]] = field(default_factory=dict)
    _random: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.ladder = [0] + [k for k in (1, 2, 4, 8, 16, 32, 64) if k < self.max_k] + [self.max_k]
        self._random = random.Random(self.seed)

    @staticmethod
    def group(num_decode: int) -> int:
        """Steps with 1, 2-3, 4-7, 8-15, ... decode requests share their statistics."""
        return num_decode.bit_length()

    def choose(self, num_decode: int) -> int:
        """The draft length for a step of ``num_decode`` decode requests."""
        rates = self._rates.setdefault(self.group(num_decode),
                                       {k: _Rate() for k in self.ladder})
        untried = [k for k in reversed(self.ladder) if rates[k].steps < self.trials]
        if untried:
            return untried[0]
        best = max(self.ladder, key=lambda k: rates[k].value)
        if self._random.random() < self.explore:
            i = self.ladder.index(best)
            neighbours = self.ladder[max(i - 1, 0) : i] + self.ladder[i + 1 : i + 2]
            return self._random.choice(neighbours)
        return best

    def record(self, num_decode: int, k: int, tokens: int, seconds: float) -> None:
        """A step of ``num_decode`` decode requests drafted up to ``k`` tokens each and emitted
        ``tokens`` in ``seconds`` (scheduling to outputs)."""
        rates = self._rates.get(self.group(num_decode))
        if rates is not None and k in rates and seconds > 0:
            rates[k].add(tokens / seconds, self.smoothing)

    def best(self, num_decode: int) -> int | None:
        """The length currently preferred for steps of this size (None: none measured)."""
        rates = self._rates.get(self.group(num_decode))
        if not rates or any(r.steps == 0 for r in rates.values()):
            return None
        return max(self.ladder, key=lambda k: rates[k].value)
