"""Verification: which drafts a step's target samples accept.

The target model scores a speculating sequence's last token and its k drafts in one pass, and
every one of the k + 1 rows is sampled exactly as a plain decode step would sample it (same
logits processing, same per-request generator). Draft i is accepted while it equals the token
sampled at row i; the first row that disagrees contributes its own sample, and when all k agree
row k's sample is the bonus token.

With deterministic drafts (a proposal distribution q that is one-hot, as prompt lookup, the
suffix tree and a greedy draft model give) this is rejection sampling: the sampler's exponential
race picks the draft d with probability p(d), which is min(1, p(d)/q(d)); and given that it did
not pick d, its choice is distributed as p without d, renormalised, which is the residual
norm(max(0, p - q)). So every emitted token is distributed as the target's. Greedy is the case
p = one-hot(argmax), where this is plain token equality.

A seeded request draws its noise from its own generator, one vocabulary-sized draw per sampled
row. Rows past the first rejection are thrown away, so the generator is rewound to where it
would stand after the rows kept: the request consumes its stream exactly as without
speculation, and its tokens are the same as without speculation.
"""

from __future__ import annotations

import torch


def num_accepted(drafts: list[int], sampled: list[int]) -> int:
    """Leading drafts equal to the token sampled at their row (`sampled` has a row more)."""
    n = 0
    for d, t in zip(drafts, sampled, strict=False):
        if d != t:
            break
        n += 1
    return n


def rewind(generator: torch.Generator, state: torch.Tensor, num_draws: int, vocab: int) -> None:
    """Put `generator` where `num_draws` row draws from `state` leave it, as the Sampler draws
    them (one exponential_ over a vocabulary-sized row each)."""
    generator.set_state(state)
    scratch = torch.empty(vocab, device=generator.device)
    for _ in range(num_draws):
        scratch.exponential_(generator=generator)
