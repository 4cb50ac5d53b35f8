"""Speculator: the engine's side of speculative decoding, between steps.

Before a step it gives each decoding sequence its drafts (`Sequence.spec_token_ids`), as many as
the adaptive plan finds worth verifying; the scheduler budgets them, the model runner scores and
verifies them. After the step it is told how many each sequence had accepted, keeps the
acceptance estimates, the cost model and the counters behind vLLM's spec_decode metrics.

With a lookup proposer (n-gram, suffix), whose proposals cost next to nothing, a sequence that
verifies nothing still learns: its would-be drafts are kept as a shadow and checked against the
tokens it then generates, which is what verifying them would have accepted (the same token the
target samples; under rejection sampling a fixed draft token is accepted exactly when the target
samples it). A new sequence verifies only once it has such evidence of its own: the engine-wide
acceptance says little about the next request (a chat question after code edits), and a verify
step of rejected drafts costs several tokens' work. So free chat pays no rejected verify steps to
find out, and a request that was not drafting starts as soon as its text turns repetitive.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from kvpilot_engine.sequence import Sequence
from kvpilot_engine.spec_decode.adaptive import AcceptanceEstimate, StepCostModel, plan_drafts
from kvpilot_engine.spec_decode.config import SpeculativeConfig


class Proposer(Protocol):
    # Proposals cost next to nothing (a lookup): they may be made and checked without being
    # verified. False for a draft model, whose every proposal is a forward pass.
    free: bool

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[list[int]]:
        """Up to num_tokens[i] drafts to follow seqs[i]'s tokens."""
        ...

    def finish(self, seq: Sequence) -> None:
        """`seq` is done (its output can feed later proposals)."""
        ...


@dataclass
class Shadow:
    """Drafts proposed at `start` (the sequence's length then) but not verified; checked against
    the tokens generated after, as they come."""

    start: int
    draft: list[int]
    matched: int = 0  # leading drafts confirmed so far


@dataclass
class ShadowBackoff:
    """A sequence whose shadows keep missing is shadowed less and less often: proposals are
    cheap, not free, and a batch of 64 unpredictable sequences would pay them every step."""

    misses: int = 0
    next_at: int = 0  # the sequence length before which no new shadow is taken


MAX_SHADOW_GAP = 16  # tokens between shadows of a sequence that keeps missing


@dataclass
class SpecDecodeStats:
    """Cumulative, as vLLM's vllm:spec_decode_* counters."""

    num_drafts: int = 0  # verify steps of a sequence with at least one draft
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)  # [k] accepted at position k

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


class Speculator:
    def __init__(self, config: SpeculativeConfig, proposer: Proposer, max_model_len: int):
        self.config = config
        self.proposer = proposer
        self.max_model_len = max_model_len
        self.stats = SpecDecodeStats(accepted_per_pos=[0] * config.num_speculative_tokens)
        self.cost = StepCostModel()
        # The engine-wide acceptance, a new sequence's first estimate. Starts optimistic so a
        # workload gets tried; it falls within a few steps where lookups miss.
        self.prior = AcceptanceEstimate(accepted=1.0, rejected=1.0, decay=0.95)
        self._estimates: dict[int, AcceptanceEstimate] = {}
        # Sequences with acceptance evidence of their own (a verify step or a checked shadow).
        self._evidence: set[int] = set()
        self._shadows: dict[int, Shadow] = {}
        self._backoff: dict[int, ShadowBackoff] = {}

    def _max_drafts(self, seq: Sequence) -> int:
        if seq.num_uncomputed_tokens != 1 or seq.num_output_tokens == 0:
            return 0  # a prefill (or a recompute after preemption) is not decoding
        params = seq.sampling_params
        left = (params.max_tokens or 0) - seq.num_output_tokens - 1
        room = self.max_model_len - len(seq) - 1
        return max(0, min(self.config.num_speculative_tokens, left, room))

    def propose(self, running: list[Sequence], prefill_tokens: int = 0) -> None:
        """Set every running sequence's drafts for the coming step."""
        cfg = self.config
        caps = [self._max_drafts(s) for s in running]
        decoding = sum(1 for c in caps if c > 0)
        if not decoding or (cfg.disable_by_batch_size and decoding > cfg.disable_by_batch_size):
            for s in running:
                s.spec_token_ids = []
            return
        shadowing = cfg.adaptive and self.proposer.free
        if shadowing:
            for s in running:
                self._check_shadow(s)
        alphas = [self._estimate(s).alpha for s in running]
        wanted = caps
        if cfg.adaptive:
            if shadowing:
                # No evidence of its own yet: shadow, do not verify (see the module's doc).
                own = self._evidence
                caps = [c if s.seq_id in own else 0 for s, c in zip(running, caps, strict=True)]
            # Plan before proposing, with every cap available: a draft model's cost is then
            # only paid for drafts the plan wants.
            base = sum(1 for s in running if s.num_uncomputed_tokens == 1) + prefill_tokens
            # A draft model's proposals cost a step of it per draft; lookups next to nothing.
            draft_cost = getattr(self.proposer, "draft_cost", 0.0)
            caps = plan_drafts(caps, alphas, base, self.cost.c0, self.cost.c1, draft_cost)
        if shadowing:
            self._take_shadows(running, wanted, caps)
        idx = [i for i, c in enumerate(caps) if c > 0]
        drafts = self.proposer.propose([running[i] for i in idx], [caps[i] for i in idx])
        for s in running:
            s.spec_token_ids = []
        for i, d in zip(idx, drafts, strict=True):
            running[i].spec_token_ids = d[: caps[i]]

    def _take_shadows(self, running: list[Sequence], wanted: list[int], plan: list[int]) -> None:
        """Shadow drafts for the decoding sequences that verify none this step."""
        for s, w, p in zip(running, wanted, plan, strict=True):
            if w == 0 or p > 0 or s.seq_id in self._shadows:
                continue
            back = self._backoff.setdefault(s.seq_id, ShadowBackoff())
            if len(s) < back.next_at:
                continue
            (draft,) = self.proposer.propose([s], [self.config.num_speculative_tokens])
            if draft:
                self._shadows[s.seq_id] = Shadow(len(s), draft)

    def _check_shadow(self, seq: Sequence) -> None:
        """Credit the shadow's drafts the sequence has since generated; settle it at the first
        one it did not, or once all were generated."""
        sh = self._shadows.get(seq.seq_id)
        if sh is None:
            return
        actual = seq.token_ids[sh.start : sh.start + len(sh.draft)]
        j = sh.matched
        while j < len(actual) and actual[j] == sh.draft[j]:
            j += 1
        missed = j < len(actual)
        if j == sh.matched and not missed:
            return  # nothing generated since the last check
        # Credited as they come, so a sequence that turns repetitive starts drafting after one
        # step rather than after the whole shadow.
        self._estimate(seq).observe(j - sh.matched, missed)
        self.prior.observe(j - sh.matched, missed)
        self._evidence.add(seq.seq_id)
        sh.matched = j
        back = self._backoff.setdefault(seq.seq_id, ShadowBackoff())
        if missed:
            back.misses += 1
            back.next_at = len(seq) + min(MAX_SHADOW_GAP, 2 ** (back.misses - 1))
        elif j:
            back.misses = 0
        if missed or j == len(sh.draft):
            del self._shadows[seq.seq_id]

    def _estimate(self, seq: Sequence) -> AcceptanceEstimate:
        est = self._estimates.get(seq.seq_id)
        if est is None:
            est = AcceptanceEstimate(self.prior.accepted, self.prior.rejected)
            # Scale the prior to one observation's weight, so a sequence's own acceptance
            # takes over quickly.
            total = est.accepted + est.rejected
            if total > 0:
                est.accepted, est.rejected = est.accepted / total, est.rejected / total
            self._estimates[seq.seq_id] = est
        return est

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        self.cost.observe(num_tokens, seconds)

    def on_verified(self, seq: Sequence, num_drafts: int, num_accepted: int) -> None:
        st = self.stats
        st.num_drafts += 1
        st.num_draft_tokens += num_drafts
        st.num_accepted_tokens += num_accepted
        for pos in range(num_accepted):
            st.accepted_per_pos[pos] += 1
        self._estimate(seq).update(num_drafts, num_accepted)
        self.prior.update(num_drafts, num_accepted)
        self._evidence.add(seq.seq_id)
        self._shadows.pop(seq.seq_id, None)  # verified past it: its positions are stale

    def on_finished(self, seq: Sequence) -> None:
        self._estimates.pop(seq.seq_id, None)
        self._evidence.discard(seq.seq_id)
        self._shadows.pop(seq.seq_id, None)
        self._backoff.pop(seq.seq_id, None)
        self.proposer.finish(seq)


class NgramSpeculation:
    """Proposer adapter for the n-gram lookup (it needs nothing but a sequence's tokens)."""

    free = True

    def __init__(self, config: SpeculativeConfig):
        from kvpilot_engine.spec_decode.ngram import NgramProposer

        self.lookup = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[list[int]]:
        return [self.lookup.propose(s.token_ids, k) for s, k in zip(seqs, num_tokens, strict=True)]

    def finish(self, seq: Sequence) -> None:
        pass
