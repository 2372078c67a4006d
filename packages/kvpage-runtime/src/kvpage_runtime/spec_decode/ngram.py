"""The n-gram proposer: drafts copied from the request's own tokens (prompt lookup).

The last ``n`` tokens (``n`` from ``max_n`` down to ``min_n``) are looked for earlier in the
prompt and output; at their latest earlier occurrence, the tokens that followed are the
drafts. Text that repeats its context (editing, quoting, retrieval-augmented answers) is
drafted well; elsewhere usually nothing is found, and nothing is drafted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def propose(tokens: Sequence[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to ``k`` drafts following the latest earlier occurrence of the longest suffix of
    ``tokens`` (``max_n`` down to ``min_n`` tokens long) that occurs before; [] if none."""
    ids = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_n, len(ids) - 1), min_n - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)  # earlier starts only
        hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
        if hits.size:
            start = hits[-1] + n
            return ids[start : start + k].tolist()
    return []
