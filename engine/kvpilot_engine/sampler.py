"""Sampler: next tokens for a batch of logits rows, each row with its own SamplingParams.

Sampling uses the exponential race (argmax of p / E with E ~ Exp(1)), which draws exactly from p
and lets every row use its own generator: a seeded request gets the same tokens whatever else is
in the batch. Logprobs are those of the raw model distribution, before temperature and filters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpilot_engine.sampling_params import SamplingParams


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None  # of the sampled token, when logprobs were asked for
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), best first
    sampled_rank: int | None = None


class Sampler:
    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        default_generator: torch.Generator,
    ) -> list[SampleResult]:
        logits = logits.float()
        greedy = [p.greedy for p in params]
        tokens = torch.empty(len(params), dtype=torch.long, device=logits.device)
        if any(greedy):
            rows = [i for i, g in enumerate(greedy) if g]
            tokens[rows] = logits[rows].argmax(dim=-1)
        random_rows = [i for i, g in enumerate(greedy) if not g]
        if random_rows:
            tokens[random_rows] = self._sample(
                logits[random_rows],
                [params[i] for i in random_rows],
                [generators[i] for i in random_rows],
                default_generator,
            )
        token_list = tokens.tolist()
        results = [SampleResult(t) for t in token_list]

        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        if want:
            logprobs = torch.log_softmax(logits[want], dim=-1)
            k = max(params[i].logprobs or 0 for i in want)
            top_v, top_i = logprobs.topk(max(k, 1), dim=-1)
            for row, i in enumerate(want):
                tok = token_list[i]
                lp = logprobs[row, tok]
                results[i].logprob = float(lp)
                results[i].sampled_rank = int((logprobs[row] > lp).sum()) + 1
                n = params[i].logprobs or 0
                results[i].top_logprobs = list(
                    zip(top_i[row, :n].tolist(), top_v[row, :n].tolist(), strict=True)
                )
        return results

    def _sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        default_generator: torch.Generator,
    ) -> torch.Tensor:
        dev = logits.device
        temps = torch.tensor([p.temperature for p in params], device=dev)
        logits = logits / temps[:, None]
        vocab = logits.shape[-1]
        top_ks = [p.top_k if p.top_k > 0 else vocab for p in params]
        top_ps = [p.top_p for p in params]
        if any(k < vocab for k in top_ks) or any(p < 1.0 for p in top_ps):
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            if any(k < vocab for k in top_ks):
                k_t = torch.tensor([min(k, vocab) for k in top_ks], device=dev)
                kth = sorted_logits.gather(1, (k_t - 1)[:, None])
                sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
            if any(p < 1.0 for p in top_ps):
                probs = sorted_logits.softmax(dim=-1)
                # Drop a token once the mass before it already reaches top_p (the first stays).
                before = probs.cumsum(dim=-1) - probs
                p_t = torch.tensor(top_ps, device=dev)
                sorted_logits = sorted_logits.masked_fill(before >= p_t[:, None], float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        min_ps = [p.min_p for p in params]
        if any(m > 0.0 for m in min_ps):
            m_t = torch.tensor(min_ps, device=dev)
            keep = probs >= m_t[:, None] * probs.max(dim=-1, keepdim=True).values
            probs = (probs * keep).div_((probs * keep).sum(dim=-1, keepdim=True))
        noise = torch.empty_like(probs)
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=dev).exponential_(
                generator=default_generator
            )
        for i, g in enumerate(generators):
            if g is not None:
                noise[i].exponential_(generator=g)
        return (probs / noise).argmax(dim=-1)
