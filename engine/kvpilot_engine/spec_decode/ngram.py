"""Prompt lookup: draft the tokens that followed the last occurrence of the sequence's suffix.

No model: the sequence's own tokens (prompt and output) are the draft source, which pays when
the output repeats the input (editing code, quoting a document). The longest suffix of length
prompt_lookup_max down to prompt_lookup_min that occurs earlier wins; among its occurrences the
most recent, whose continuation is the likeliest to still be current.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    def __init__(self, min_n: int, max_n: int, max_context: int = 4096):
        self.min_n = min_n
        self.max_n = max_n
        # Lookups scan the last max_context tokens only, bounding a step's cost on long contexts.
        self.max_context = max_context

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        if k <= 0 or len(token_ids) <= self.min_n:
            return []
        ctx = np.asarray(token_ids[-self.max_context :], dtype=np.int64)
        n_ctx = len(ctx)
        for n in range(min(self.max_n, n_ctx - 1), self.min_n - 1, -1):
            suffix = ctx[-n:]
            # Windows that start before the suffix itself and are followed by a token.
            windows = sliding_window_view(ctx[: n_ctx - 1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n
                return ctx[start : start + k].tolist()
        return []
