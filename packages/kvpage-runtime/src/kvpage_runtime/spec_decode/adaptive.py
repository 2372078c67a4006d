"""Choosing how many tokens to draft per step from what drafts are accepted and what they cost.

Whether drafts pay depends on two things measured here, not assumed. The text: copy-heavy
output accepts most drafts, free text few. The machine and the batch: a step's time grows
little with its rows while reading the weights dominates (one decode step alone on the CPU),
and about linearly once the batch is large. So the chooser keeps

- the acceptance of each draft position ``i`` given that the ones before it were accepted,
  from every verified request (discounted counts, so that the last several hundred
  requests' steps weigh most; a position not yet seen takes the estimate of the one before
  it, the first one 1/2, which makes a longer draft worth trying while the shorter ones are
  accepted);
- the time of a step per draft length on the ladder 0, 1, 2, 4, .., k, separately for steps
  of 1, 2-3, 4-7, 8-15, ... decode requests (discounted means). Length 0 is timed first,
  then the others from the shortest; a length is timed, and timed again after
  ``retime_after`` steps of its group times how much slower than the fastest length it is (so that re-timing costs about
  1 / ``retime_after`` of the time), only while it could win by 5% at the least time its
  steps may take (that of the slowest shorter length timed: more drafts never cost less), so
  that when drafts are seldom accepted, or cost much, few steps are spent timing them; the
  shortest draft is re-timed when due in any case, which measures the acceptance again as
  the text changes (steps without drafts cannot).

A step drafts the length with the most expected tokens per second: expected tokens per
request (1 + the sum over positions of the chance that the drafts up to there are all
accepted) over the step's expected time, provided it beats drafting nothing by 5%. Length 0
is speculation switched off.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Timing:
    """Discounted sums of one draft length's step times in one group of batch sizes."""

    seconds: float = 0.0
    weight: float = 0.0
    steps: int = 0  # steps timed, not discounted
    last: int = 0  # the group's step count when it was last timed

    @property
    def mean(self) -> float:
        return self.seconds / self.weight


@dataclass
class DraftLengthChooser:
    max_k: int
    discount: float = 0.98  # each new step time multiplies a length's earlier ones by this
    acceptance_discount: float = 0.998  # each verified request, the earlier acceptance counts
    trials: int = 1  # steps each length is timed first (step times vary little)
    retime_after: int = 200  # steps of a group before a length is timed again (x its slowness)
    prior_weight: float = 1.0  # pseudo-observations pulling a position to the one before it
    _tries: list[float] = field(init=False)  # per draft position: requests verified there
    _hits: list[float] = field(init=False)  # and accepted there
    _timings: dict[int, dict[int, _Timing]] = field(default_factory=dict)
    _steps: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ladder = [0] + [k for k in (1, 2, 4, 8, 16, 32, 64) if k < self.max_k] + [self.max_k]
        self._tries = [0.0] * self.max_k
        self._hits = [0.0] * self.max_k

    @staticmethod
    def group(num_decode: int) -> int:
        """Steps with 1, 2-3, 4-7, 8-15, ... decode requests share their timings."""
        return num_decode.bit_length()

    def choose(self, num_decode: int) -> int:
        """The draft length for a step of ``num_decode`` decode requests."""
        group = self.group(num_decode)
        timings = self._timings.setdefault(group, {k: _Timing() for k in self.ladder})
        if timings[0].steps < self.trials:
            return 0  # the baseline first
        tokens = self.expected_tokens()
        timed = {k: t for k, t in timings.items() if t.steps >= self.trials}
        fastest = min(t.mean for t in timed.values())
        best = self._best(tokens, timed)
        step = self._steps.get(group, 0)
        floor = 0.0  # more drafts never cost less: a step takes at least a shorter one's time
        for k in self.ladder:  # the cheaper first: their acceptance bounds the longer ones'
            t = timings[k]
            due = k not in timed or step - t.last > self.retime_after * t.mean / fastest
            # timed (again) only if it could win by 5% at the least time it may take; the
            # shortest draft also when it is due, to measure the acceptance again (which
            # steps without drafts never do)
            could_win = tokens[k] / max(floor, fastest) > 1.05 * tokens[best] / timed[best].mean
            if due and (could_win or (k == self.ladder[1] and k in timed)):
                return k
            if k in timed:
                floor = max(floor, t.mean)
        return best

    @staticmethod
    def _best(tokens: dict[int, float], timed: dict[int, _Timing]) -> int:
        """The timed length with the most tokens per second; 0 unless that beats 0 by 5%
        (estimates are noisy, and a draft that only breaks even is not worth its risk)."""
        best = max(timed, key=lambda k: tokens[k] / timed[k].mean)
        return best if tokens[best] / timed[best].mean > 1.05 * tokens[0] / timed[0].mean else 0

    def expected_tokens(self) -> dict[int, float]:
        """Expected tokens a request emits in a step, per draft length of the ladder."""
        expected, reach, accept = [1.0], 1.0, 0.5
        for i in range(self.max_k):
            accept = (self._hits[i] + self.prior_weight * accept) / (
                self._tries[i] + self.prior_weight)
            reach *= accept
            expected.append(expected[-1] + reach)
        return {k: expected[k] for k in self.ladder}

    def record_drafts(self, k: int, accepted: int) -> None:
        """A request of a step that drafted up to ``k`` had ``accepted`` drafts accepted (0 also
        when it had none to offer): positions up to the first refusal were tried."""
        self._tries = [t * self.acceptance_discount for t in self._tries]
        self._hits = [h * self.acceptance_discount for h in self._hits]
        for i in range(min(accepted + 1, k)):
            self._tries[i] += 1
            self._hits[i] += i < accepted

    def record_step(self, num_decode: int, k: int, seconds: float) -> None:
        """A step of ``num_decode`` decode requests that drafted up to ``k`` took ``seconds``
        (scheduling to outputs)."""
        group = self.group(num_decode)
        timings = self._timings.get(group)
        if timings is None or k not in timings or seconds <= 0:
            return
        step = self._steps[group] = self._steps.get(group, 0) + 1
        timing = timings[k]
        timing.seconds = timing.seconds * self.discount + seconds
        timing.weight = timing.weight * self.discount + 1
        timing.steps += 1
        timing.last = step

    def best(self, num_decode: int) -> int | None:
        """The timed length preferred for steps of this size (None: none timed yet)."""
        timings = self._timings.get(self.group(num_decode))
        if not timings or timings[0].steps == 0:
            return None
        return self._best(self.expected_tokens(),
                          {k: t for k, t in timings.items() if t.steps})
