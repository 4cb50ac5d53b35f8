"""Suffix decoding: drafts from an index of every suffix (up to a depth) of the prompt, this
request's output and recent requests' outputs, as SuffixDecoding / Arctic Inference do.

The index maps each n-gram (prompt_lookup_min <= n <= prompt_lookup_max) to where it last
ended, in the sequence itself or in one of the last `suffix_cache_requests` finished outputs,
so a lookup costs O(depth) dictionary probes whatever the context length: the longest n-gram
ending the sequence that occurs before is found, and what followed it is the draft. The
sequence's own text wins over the shared outputs (it is the likelier source for the same
n-gram); between shared outputs, the most recent.
"""

from __future__ import annotations

from collections import OrderedDict

from kvpilot_engine.sequence import Sequence
from kvpilot_engine.spec_decode.config import SpeculativeConfig

# (tokens, position after the n-gram) of the latest occurrence.
_Hit = tuple[list[int], int]


class SuffixIndex:
    """n-gram -> latest continuation, built incrementally over one token list."""

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self.table: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # n-grams ending before this position are in the table

    def extend(self, tokens: list[int], upto: int) -> None:
        """Index every n-gram that ends before position `upto` (its continuation starts there)."""
        for end in range(max(self.indexed, self.min_n), upto + 1):
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self.table[tuple(tokens[end - n : end])] = end
        self.indexed = max(self.indexed, upto + 1)


class SuffixSpeculation:
    free = True  # lookups: proposals may be made without verifying them

    def __init__(self, config: SpeculativeConfig):
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max
        self.keep = config.suffix_cache_requests
        self._own: dict[int, SuffixIndex] = {}
        # Finished outputs, oldest first, and the shared index over them.
        self._recent: OrderedDict[int, list[int]] = OrderedDict()
        self._shared: dict[tuple[int, ...], tuple[int, int]] = {}  # -> (request serial, end)
        self._serial = 0

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[list[int]]:
        return [self._one(s, k) for s, k in zip(seqs, num_tokens, strict=True)]

    def _one(self, seq: Sequence, k: int) -> list[int]:
        tokens = seq.token_ids
        idx = self._own.get(seq.seq_id)
        if idx is None:
            idx = self._own[seq.seq_id] = SuffixIndex(self.min_n, self.max_n)
        # n-grams whose continuation exists (the one ending the sequence is left out: it
        # would match itself).
        idx.extend(tokens, len(tokens) - 1)
        for n in range(min(self.max_n, len(tokens)), self.min_n - 1, -1):
            key = tuple(tokens[-n:])
            end = idx.table.get(key)
            if end is not None and end < len(tokens):
                return tokens[end : end + k]
            hit = self._shared.get(key)
            if hit is not None:
                serial, end = hit
                source = self._recent.get(serial)
                if source is None:  # evicted: drop lazily
                    del self._shared[key]
                    continue
                if end < len(source):
                    return source[end : end + k]
        return []

    def finish(self, seq: Sequence) -> None:
        self._own.pop(seq.seq_id, None)
        if self.keep == 0 or seq.num_output_tokens == 0:
            return
        self._serial += 1
        # The output with the prompt's tail before it, so its first tokens can be found too.
        tokens = seq.token_ids[max(0, seq.num_prompt_tokens - self.max_n) :]
        self._recent[self._serial] = tokens
        for end in range(self.min_n, len(tokens)):
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self._shared[tuple(tokens[end - n : end])] = (self._serial, end)
        while len(self._recent) > self.keep:
            self._recent.popitem(last=False)
        # Lazy deletion leaves stale keys; rebuild when they outnumber the live ones.
        if len(self._shared) > 4 * sum(len(t) for t in self._recent.values()) * self.max_n:
            self._rebuild()

    def _rebuild(self) -> None:
        self._shared = {}
        for serial, tokens in self._recent.items():
            for end in range(self.min_n, len(tokens)):
                for n in range(self.min_n, min(self.max_n, end) + 1):
                    self._shared[tuple(tokens[end - n : end])] = (serial, end)
