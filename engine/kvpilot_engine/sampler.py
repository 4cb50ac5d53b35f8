"""Sampler: next tokens for a batch of logits rows, each row with its own SamplingParams.

Sampling uses the exponential race (argmax of p / E with E ~ Exp(1)), which draws exactly from p
and lets every row use its own generator: a seeded request gets the same tokens whatever else is
in the batch. Logprobs are those of the raw model distribution, before logit_bias, penalties,
temperature and filters (vLLM's default, `raw_logprobs`).

Before choosing, logit_bias is added, then the penalties are applied, in vLLM's order
(repetition, frequency, presence). Both work on the batched logits with index ops, and only on
the rows that ask for them: a batch without them pays nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvpilot_engine.device import to_device
from kvpilot_engine.sampling_params import SamplingParams
from kvpilot_engine.structured.backend import apply_token_bitmask


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
        token_ids: Sequence[list[int]] | None = None,
        num_prompt_tokens: Sequence[int] | None = None,
        token_bitmask: torch.Tensor | None = None,
        structured_rows: Sequence[int] = (),
    ) -> list[SampleResult]:
        """`token_ids[i]` is row i's prompt followed by its generated tokens so far, and
        `num_prompt_tokens[i]` where the prompt ends; only rows with penalties read them.
        `token_bitmask` (packed, one row per logits row) limits `structured_rows` to the tokens
        their grammars allow; the other rows are not touched."""
        raw = logits.float()
        logits = process_logits(raw, params, token_ids, num_prompt_tokens)
        if token_bitmask is not None and structured_rows:
            logits = logits.clone() if logits is raw else logits
            apply_token_bitmask(logits, token_bitmask, list(structured_rows))
        dev = logits.device
        greedy = [p.greedy for p in params]
        random_rows = [i for i, g in enumerate(greedy) if not g]
        # The one host sync of a step is reading the tokens out (tolist) at the end.
        tokens = logits.argmax(dim=-1)
        if random_rows:
            all_random = len(random_rows) == len(params)
            rows_t = None if all_random else to_device(random_rows, torch.long, dev)
            sampled = self._sample(
                logits if rows_t is None else logits.index_select(0, rows_t),
                [params[i] for i in random_rows],
                [generators[i] for i in random_rows],
                default_generator,
            )
            tokens = sampled if rows_t is None else tokens.index_copy(0, rows_t, sampled)
        token_list = tokens.tolist()
        results = [SampleResult(t) for t in token_list]

        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        if want:
            want_t = to_device(want, torch.long, dev)
            logprobs = torch.log_softmax(raw.index_select(0, want_t), dim=-1)
            k = max(params[i].logprobs or 0 for i in want)
            top_v, top_i = logprobs.topk(max(k, 1), dim=-1)
            lp = logprobs.gather(1, tokens.index_select(0, want_t)[:, None])
            ranks = (logprobs > lp).sum(dim=-1) + 1
            # One read-out for all rows, not a sync per value.
            lp_l, ranks_l = lp[:, 0].tolist(), ranks.tolist()
            top_v_l, top_i_l = top_v.tolist(), top_i.tolist()
            for row, i in enumerate(want):
                n = params[i].logprobs or 0
                results[i].logprob = lp_l[row]
                results[i].sampled_rank = ranks_l[row]
                results[i].top_logprobs = list(zip(top_i_l[row][:n], top_v_l[row][:n], strict=True))
        return results

    def _sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        default_generator: torch.Generator,
    ) -> torch.Tensor:
        dev = logits.device
        temps = to_device([p.temperature for p in params], torch.float32, dev)
        logits = logits / temps[:, None]
        vocab = logits.shape[-1]
        top_ks = [p.top_k if p.top_k > 0 else vocab for p in params]
        top_ps = [p.top_p for p in params]
        if any(k < vocab for k in top_ks) or any(p < 1.0 for p in top_ps):
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            if any(k < vocab for k in top_ks):
                k_t = to_device([min(k, vocab) for k in top_ks], torch.long, dev)
                kth = sorted_logits.gather(1, (k_t - 1)[:, None])
                sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
            if any(p < 1.0 for p in top_ps):
                probs = sorted_logits.softmax(dim=-1)
                # Drop a token once the mass before it already reaches top_p (the first stays).
                before = probs.cumsum(dim=-1) - probs
                p_t = to_device(top_ps, torch.float32, dev)
                sorted_logits = sorted_logits.masked_fill(before >= p_t[:, None], float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        min_ps = [p.min_p for p in params]
        if any(m > 0.0 for m in min_ps):
            m_t = to_device(min_ps, torch.float32, dev)
            keep = probs >= m_t[:, None] * probs.max(dim=-1, keepdim=True).values
            probs = (probs * keep).div_((probs * keep).sum(dim=-1, keepdim=True))
        noise = torch.empty_like(probs)
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if unseeded:
            draws = torch.empty(len(unseeded), probs.shape[1], device=dev).exponential_(
                generator=default_generator
            )
            noise.index_copy_(0, to_device(unseeded, torch.long, dev), draws)
        for i, g in enumerate(generators):
            if g is not None:
                noise[i].exponential_(generator=g)
        return (probs / noise).argmax(dim=-1)


def process_logits(
    logits: torch.Tensor,
    params: list[SamplingParams],
    token_ids: Sequence[list[int]] | None,
    num_prompt_tokens: Sequence[int] | None,
) -> torch.Tensor:
    """logit_bias, then the penalties; a new tensor when any row has them, else `logits` itself
    (which the logprobs still read raw)."""
    bias_rows = [i for i, p in enumerate(params) if p.logit_bias]
    penalty_rows = [i for i, p in enumerate(params) if p.has_penalties]
    if not bias_rows and not penalty_rows:
        return logits
    logits = logits.clone()
    if bias_rows:
        apply_logit_bias(logits, [params[i] for i in bias_rows], bias_rows)
    if penalty_rows:
        if token_ids is None or num_prompt_tokens is None:
            raise ValueError("penalties need each row's token ids and prompt length")
        apply_penalties(
            logits,
            [params[i] for i in penalty_rows],
            penalty_rows,
            [token_ids[i] for i in penalty_rows],
            [num_prompt_tokens[i] for i in penalty_rows],
        )
    return logits


def apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams], rows: list[int]) -> None:
    """Add each row's logit_bias in place: one index_add over the flattened [rows, vocab]."""
    vocab = logits.shape[-1]
    flat: list[int] = []
    values: list[float] = []
    for row, p in zip(rows, params, strict=True):
        bias = p.logit_bias or {}
        flat.extend(row * vocab + t for t in bias)
        values.extend(bias.values())
    dev = logits.device
    idx = to_device(flat, torch.long, dev)
    logits.view(-1).index_add_(0, idx, to_device(values, logits.dtype, dev))


def _flat_index(seqs: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """Position (row * vocab + token) of every token of every row, for the [rows, vocab] view."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    row = torch.repeat_interleave(torch.arange(len(seqs)), lengths)
    tokens = torch.tensor(list(itertools.chain.from_iterable(seqs)), dtype=torch.long)
    flat = row * vocab + tokens
    return flat.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else flat


def token_counts(seqs: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(seqs), vocab] float: how often each token occurs in each row's list (a scatter_add
    of ones, no loop over the vocabulary)."""
    counts = torch.zeros(len(seqs), vocab, dtype=torch.float32, device=device)
    idx = _flat_index(seqs, vocab, device)
    counts.view(-1).scatter_add_(0, idx, torch.ones(idx.shape, dtype=counts.dtype, device=device))
    return counts


def apply_penalties(
    logits: torch.Tensor,
    params: list[SamplingParams],
    rows: list[int],
    token_ids: list[list[int]],
    num_prompt_tokens: list[int],
) -> None:
    """Repetition, frequency and presence penalties on `rows` of `logits`, in place.

    Frequency and presence count the generated tokens only (OpenAI); repetition looks at the
    prompt too (vLLM, transformers)."""
    dev, vocab = logits.device, logits.shape[-1]
    outputs = [ids[n:] for ids, n in zip(token_ids, num_prompt_tokens, strict=True)]
    counts = token_counts(outputs, vocab, dev)
    rows_t = to_device(rows, torch.long, dev)
    sub = logits.index_select(0, rows_t)
    rep = [p.repetition_penalty for p in params]
    if any(r != 1.0 for r in rep):
        # The prompt only matters where the penalty is on; elsewhere its row is left empty.
        prompts = [
            ids[:n] if r != 1.0 else []
            for ids, n, r in zip(token_ids, num_prompt_tokens, rep, strict=True)
        ]
        seen = counts > 0
        seen.view(-1)[_flat_index(prompts, vocab, dev)] = True
        r_t = to_device(rep, torch.float32, dev)[:, None]
        sub = torch.where(seen, torch.where(sub > 0, sub / r_t, sub * r_t), sub)
    freq = to_device([p.frequency_penalty for p in params], torch.float32, dev)[:, None]
    pres = to_device([p.presence_penalty for p in params], torch.float32, dev)[:, None]
    sub = sub - freq * counts - pres * (counts > 0)
    logits.index_copy_(0, rows_t, sub)
