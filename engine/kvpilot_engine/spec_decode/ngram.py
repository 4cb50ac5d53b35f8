"""Prompt lookup: draft the tokens that followed the last occurrence of the sequence's suffix.

No model: the sequence's own tokens (prompt and output) are the draft source, which pays when
the output repeats the input (editing code, quoting a document). The longest suffix of length
prompt_lookup_max down to prompt_lookup_min that occurs earlier wins; among its occurrences the
most recent, whose continuation is the likeliest to still be current.
"""

from __future__ import annotations

import numpy as np


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
        # Every match ends on an earlier occurrence of the last token: find those once, then
        # extend them backwards (cheaper than comparing every window of every length).
        ends = np.flatnonzero(ctx[:-1] == ctx[-1])
        for n in range(min(self.max_n, n_ctx - 1), self.min_n - 1, -1):
            cand = ends[ends >= n - 1]
            for t in range(1, n):
                if not len(cand):
                    break
                cand = cand[ctx[cand - t] == ctx[-1 - t]]
            if len(cand):
                start = int(cand[-1]) + 1
                return ctx[start : start + k].tolist()
        return []
