"""Speculative decoding's parts on their own: the n-gram lookup, the config, the adaptive plan,
the scheduler's draft budget and the KV rollback, and rejection sampling's exactness.

The distribution test runs the real ModelRunner and Sampler over a stand-in model, a Markov
chain (the logits depend only on the last token), because its exact output distribution is
known in closed form: the emitted tokens of many speculative runs are compared with it by a
chi-square test whose threshold is fixed here, and the same test on a verifier that accepts every
draft must fail it.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from kvpilot_engine.block_manager import BlockManager
from kvpilot_engine.config import EngineArgs, ModelConfig
from kvpilot_engine.model_runner import ModelRunner
from kvpilot_engine.sampling_params import SamplingParams
from kvpilot_engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from kvpilot_engine.sequence import Sequence, SequenceStatus
from kvpilot_engine.spec_decode import SpeculativeConfig
from kvpilot_engine.spec_decode.adaptive import AcceptanceEstimate, StepCostModel, plan_drafts
from kvpilot_engine.spec_decode.ngram import NgramProposer
from kvpilot_engine.spec_decode.verify import num_accepted

# ---- n-gram lookup ---------------------------------------------------------------------------


def test_ngram_continues_the_latest_longest_match():
    p = NgramProposer(min_n=2, max_n=3)
    #        0  1  2  3  4  5  6  7  8  9  10
    toks = [1, 2, 3, 4, 9, 2, 3, 5, 7, 2, 3]
    # [2, 3] occurs at 1 and 5; the latest (5) is followed by 5, 7.
    assert p.propose(toks, 2) == [5, 7]
    # The 3-gram [9, 2, 3] beats the 2-grams when it matches.
    assert p.propose([9, 2, 3, 8, 1, 2, 3, 6, 9, 2, 3], 3) == [8, 1, 2]
    assert p.propose([1, 2, 3, 4], 3) == []  # no earlier occurrence
    assert p.propose(toks, 0) == []
    # A continuation shorter than k at the end of the context is all there is.
    assert p.propose([5, 6, 5, 6], 4) == [5, 6]


def test_speculative_config_parsing():
    assert SpeculativeConfig.parse(None) is None
    assert SpeculativeConfig.parse("{}") is None
    cfg = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 3}')
    assert cfg is not None and cfg.num_speculative_tokens == 3
    assert EngineArgs(speculative_config={"method": "suffix"}).speculative_config.method == "suffix"
    for bad, word in [
        ('{"method": "medusa"}', "method"),
        ('{"num_speculative_tokens": 0}', "num_speculative_tokens"),
        ('{"prompt_lookup_min": 5, "prompt_lookup_max": 2}', "prompt_lookup_min"),
        ('{"method": "draft_model"}', "model"),
        ('{"lookahead": 2}', "unknown keys"),
        ("{not json", "JSON"),
        ("[1]", "object"),
    ]:
        with pytest.raises(ValueError, match=word):
            SpeculativeConfig.parse(bad)


# ---- the adaptive plan -----------------------------------------------------------------------


def test_plan_drafts_pays_only_where_acceptance_beats_the_cost():
    # A CPU-like cost: a step's fixed part is worth 40 tokens of work.
    c0, c1 = 0.040, 0.001
    # Single stream, high acceptance: all drafts. Low acceptance: none.
    assert plan_drafts([5], [0.9], 1, c0, c1) == [5]
    assert plan_drafts([5], [0.02], 1, c0, c1) == [0]
    # Mixed batch: the accepting sequence gets more than the one that misses.
    plan = plan_drafts([5, 5], [0.8, 0.1], 2, c0, c1)
    assert plan[0] > plan[1]
    # At a large batch tokens are no longer cheap next to the step: no drafts.
    assert plan_drafts([5] * 256, [0.5] * 256, 256, c0, c1) == [0] * 256
    # Nothing to draft for non-decoding sequences.
    assert plan_drafts([0, 3], [0.9, 0.9], 2, c0, c1)[0] == 0


def test_cost_model_fits_step_times():
    m = StepCostModel()
    for n in [1, 6, 2, 11, 4, 1, 6, 3] * 5:
        m.observe(n, 0.03 + 0.002 * n)
    assert m.c0 == pytest.approx(0.03, rel=1e-3)
    assert m.c1 == pytest.approx(0.002, rel=1e-3)


def test_acceptance_estimate_follows_the_text():
    est = AcceptanceEstimate(accepted=1.0, rejected=1.0)
    for _ in range(10):
        est.update(4, 4)
    assert est.alpha > 0.9
    for _ in range(10):
        est.update(4, 0)
    assert est.alpha < 0.15


# ---- scheduling drafts and rolling back ------------------------------------------------------


def _decoding_seq(bm: BlockManager, prompt_len: int, seq_id: int = 0) -> Sequence:
    seq = Sequence(
        seq_id=seq_id,
        request_id=str(seq_id),
        index=0,
        token_ids=list(range(1, prompt_len + 2)),
        num_prompt_tokens=prompt_len,
        sampling_params=SamplingParams(max_tokens=64),
        status=SequenceStatus.RUNNING,
    )
    assert bm.allocate_slots(seq, prompt_len)
    seq.num_computed_tokens = prompt_len
    return seq


def test_scheduler_budgets_drafts_and_drops_them_when_short():
    bm = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=6)
    a = _decoding_seq(bm, 7, 0)  # 8 tokens, 7 computed: 2 blocks
    sched.running.append(a)
    a.spec_token_ids = [11, 12, 13, 14, 15, 16, 17]
    out = sched.schedule()
    # The budget (6) leaves room for 5 drafts after the decode token.
    assert out.scheduled[0].spec_token_ids == [11, 12, 13, 14, 15]
    assert out.num_batched_tokens == 6 and out.num_spec_tokens == 5
    assert out.num_decode_tokens == 1 and out.num_prefill_tokens == 0
    assert len(a.block_table) == 4  # 7 computed + 1 + 5 drafts = 13 tokens
    # Rollback: two drafts accepted, the rest rejected; the engine's bookkeeping.
    sched.update(out)
    a.token_ids += [11, 12, 99]
    a.num_computed_tokens += 2
    bm.cache_full_blocks(a)
    bm.trim(a, len(a))
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5
    bm.check_invariants([a])
    # A pool too short for the drafts schedules the decode alone rather than preempting.
    bm2 = BlockManager(num_blocks=2, block_size=4)
    sched2 = Scheduler(bm2, max_num_seqs=4, max_num_batched_tokens=64)
    b = _decoding_seq(bm2, 6, 1)
    sched2.running.append(b)
    b.spec_token_ids = [1, 2, 3, 4]
    out = sched2.schedule()
    assert not out.preempted and out.scheduled[0].spec_token_ids == []
    assert out.scheduled[0].num_tokens == 1


def test_trim_keeps_registered_blocks_and_returns_fresh_ones_first():
    bm = BlockManager(num_blocks=6, block_size=4)
    seq = _decoding_seq(bm, 8)
    bm.cache_full_blocks(seq)
    assert bm.allocate_slots(seq, 1 + 6)  # 15 tokens: 4 blocks
    bm.trim(seq, 9)
    assert len(seq.block_table) == 3
    assert bm.num_cached_blocks == 2
    bm.check_invariants([seq])
    bm.free(seq)
    bm.check_invariants([])


# ---- verification --------------------------------------------------------------------------


def test_num_accepted_is_the_agreeing_prefix():
    assert num_accepted([4, 5, 6], [4, 5, 6, 7]) == 3
    assert num_accepted([4, 5, 6], [4, 9, 6, 7]) == 1
    assert num_accepted([4, 5, 6], [1, 5, 6, 7]) == 0
    assert num_accepted([], [3]) == 0


V = 6  # the stand-in's vocabulary


class MarkovChainLM:
    """Stand-in for a model (the test's oracle needs a closed-form distribution): the logits of
    a position are a fixed row chosen by its input token."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def __call__(self, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        return torch.nn.functional.one_hot(input_ids, V).float()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.table


def _runner(table: torch.Tensor) -> ModelRunner:
    cfg = ModelConfig(
        architecture="llama",
        vocab_size=V,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=4096,
    )
    return ModelRunner(
        MarkovChainLM(table), cfg, 32768, 4, torch.device("cpu"), torch.float32, seed=1
    )


def _target(table: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    logits = table / temperature
    kth = logits.topk(top_k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf")).softmax(dim=-1)


def _speculative_samples(
    runner: ModelRunner, params: list[SamplingParams], length: int
) -> list[tuple[int, ...]]:
    """Each sequence starts at token 0 and decodes `length` tokens, every step verifying three
    drafts from a fixed guess (right or wrong by chance); the engine's loop in miniature."""
    bm = BlockManager(num_blocks=32768, block_size=4, enable_prefix_caching=False)
    seqs = []
    for i, p in enumerate(params):
        seq = Sequence(i, str(i), 0, [0, 0], 1, p, status=SequenceStatus.RUNNING)
        assert bm.allocate_slots(seq, 1)
        seq.num_computed_tokens = 1
        seqs.append(seq)
    while True:
        live = [s for s in seqs if s.num_output_tokens < length + 1]
        if not live:
            break
        out = SchedulerOutput()
        for s in live:
            last = s.token_ids[-1]
            spec = [(last * 2 + 1 + j) % V for j in range(3)]
            assert bm.allocate_slots(s, 1 + len(spec))
            out.scheduled.append(ScheduledSeq(s, 1, spec))
        results = runner.execute(out)
        for s in live:
            s.num_computed_tokens += 1
            got = results[s.seq_id]
            assert 1 <= len(got) <= 4
            s.token_ids += [r.token_id for r in got]
            s.num_computed_tokens += len(got) - 1
            bm.trim(s, len(s))
    # token_ids[1] is the prompt's sampled first token; the speculative part follows it.
    return [tuple(s.token_ids[2 : 2 + length]) for s in seqs]


def _chi_square_pvalue(samples: list[tuple[int, ...]], probs: dict[tuple[int, ...], float]):
    n = len(samples)
    counts: dict[tuple[int, ...], int] = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    impossible = sum(c for cell, c in counts.items() if probs.get(cell, 0.0) == 0.0)
    stat = sum((counts.get(c, 0) - n * p) ** 2 / (n * p) for c, p in probs.items() if p > 0)
    dof = sum(1 for p in probs.values() if p > 0) - 1
    pvalue = float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(stat / 2.0)))
    return pvalue, impossible


# Fixed before running: the test fails below this p-value (or on any impossible sequence).
P_THRESHOLD = 1e-3


def test_rejection_sampling_preserves_the_target_distribution(monkeypatch):
    torch.manual_seed(0)
    table = torch.randn(V, V) * 1.5
    temperature, top_k, length = 0.8, 4, 3
    p = _target(table, temperature, top_k)
    # The first emitted token follows the prompt's sampled token, which sequences share only
    # by chance; condition on token_ids[1] by grouping, so the oracle is exact per group.
    n = 6000
    params = [
        # Half seeded (their generators are rewound), half from the runner's default stream.
        SamplingParams(temperature=temperature, top_k=top_k, seed=i if i % 2 else None)
        for i in range(n)
    ]

    def oracle_for(first: int) -> dict[tuple[int, ...], float]:
        out = {}
        for cell in itertools.product(range(V), repeat=length):
            prob, prev = 1.0, first
            for t in cell:
                prob *= float(p[prev, t])
                prev = t
            out[cell] = prob
        return out

    def run(runner: ModelRunner) -> list[float]:
        samples = _speculative_samples(runner, params, length)
        # Each sequence's token_ids[1] was set to 0 above, so every run shares one oracle.
        pvalue, impossible = _chi_square_pvalue(samples, oracle_for(0))
        return [pvalue, impossible]

    pvalue, impossible = run(_runner(table))
    assert impossible == 0
    assert pvalue > P_THRESHOLD, f"speculative samples differ from the target: p={pvalue:.2e}"

    # The test has power: a verifier that accepts every draft is caught.
    import kvpilot_engine.model_runner as mr

    monkeypatch.setattr(mr, "num_accepted", lambda drafts, sampled: len(drafts))
    pvalue, impossible = run(_runner(table))
    assert impossible > 0 or pvalue < P_THRESHOLD


def test_seeded_rows_consume_their_stream_as_without_speculation():
    """A seeded request gets the tokens it would get without drafts, whatever is accepted."""
    torch.manual_seed(1)
    table = torch.randn(V, V)
    params = [SamplingParams(temperature=1.0, seed=1234 + i) for i in range(64)]
    with_spec = _speculative_samples(_runner(table), params, 8)

    runner = _runner(table)
    bm = BlockManager(num_blocks=32768, block_size=4, enable_prefix_caching=False)
    plain = []
    for i, prm in enumerate(params):
        seq = Sequence(i, str(i), 0, [0, 0], 1, prm, status=SequenceStatus.RUNNING)
        assert bm.allocate_slots(seq, 1)
        seq.num_computed_tokens = 1
        while seq.num_output_tokens < 9:
            assert bm.allocate_slots(seq, 1)
            got = runner.execute(SchedulerOutput([ScheduledSeq(seq, 1)]))[seq.seq_id]
            seq.num_computed_tokens += 1
            seq.token_ids.append(got[0].token_id)
        plain.append(tuple(seq.token_ids[2:10]))
    assert with_spec == plain


def test_server_exports_vllm_spec_decode_counters():
    from kvpilot_engine.llm_engine import EngineStats
    from kvpilot_engine.server.metrics import ServerMetrics
    from prometheus_client import generate_latest

    m = ServerMetrics("smollm2")
    m.baseline(EngineStats())
    m.on_step(
        EngineStats(
            spec_num_drafts=3,
            spec_num_draft_tokens=12,
            spec_num_accepted_tokens=7,
            spec_accepted_per_pos=(3, 2, 1, 1),
        ),
        0,
        True,
    )
    m.on_step(
        EngineStats(
            spec_num_drafts=4,
            spec_num_draft_tokens=16,
            spec_num_accepted_tokens=8,
            spec_accepted_per_pos=(4, 2, 1, 1),
        ),
        0,
        True,
    )
    text = generate_latest(m.registry).decode()
    assert 'vllm:spec_decode_num_drafts_total{model_name="smollm2"} 4.0' in text
    assert 'vllm:spec_decode_num_draft_tokens_total{model_name="smollm2"} 16.0' in text
    assert 'vllm:spec_decode_num_accepted_tokens_total{model_name="smollm2"} 8.0' in text
    per_pos = 'vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="smollm2",position='
    assert per_pos + '"0"} 4.0' in text
    assert per_pos + '"3"} 1.0' in text


def test_suffix_index_drafts_from_itself_then_recent_outputs():
    from kvpilot_engine.spec_decode.suffix import SuffixSpeculation

    cfg = SpeculativeConfig(method="suffix", prompt_lookup_min=2, prompt_lookup_max=4)
    sp = SuffixSpeculation(cfg)

    def seq(i: int, tokens: list[int], prompt: int) -> Sequence:
        return Sequence(i, str(i), 0, tokens, prompt, SamplingParams())

    a = seq(0, [1, 2, 3, 4, 5, 6, 7, 2, 3], 5)
    assert sp.propose([a], [3]) == [[4, 5, 6]]  # its own earlier [2, 3]
    a.token_ids += [4, 5]
    assert sp.propose([a], [2]) == [[6, 7]]  # the index grew with the output
    sp.finish(a)
    # Another request whose prompt ends with an n-gram of a's output (and not of its own).
    b = seq(1, [9, 9, 6, 7], 4)
    assert sp.propose([b], [3]) == [[2, 3, 4]]
    assert sp.propose([seq(2, [8, 8, 8, 1], 4)], [3]) == [[]]
    # Evicted outputs are no longer drafted from.
    small = SuffixSpeculation(SpeculativeConfig(method="suffix", suffix_cache_requests=1))
    small.finish(seq(3, [1, 2, 10, 11, 12], 2))
    small.finish(seq(4, [5, 6, 20, 21, 22], 2))
    assert small.propose([seq(5, [10, 11], 2)], [1]) == [[]]
    assert small.propose([seq(6, [20, 21], 2)], [1]) == [[22]]


# ---- shadow drafts: learning acceptance without verifying ------------------------------------


def _shadowed(tokens: list[int], seq_id: int) -> Sequence:
    """A sequence decoding after `tokens` (its prompt), one output token in."""
    seq = Sequence(
        seq_id=seq_id,
        request_id=str(seq_id),
        index=0,
        token_ids=list(tokens),
        num_prompt_tokens=len(tokens) - 1,
        sampling_params=SamplingParams(max_tokens=64),
        status=SequenceStatus.RUNNING,
    )
    seq.num_computed_tokens = len(tokens) - 1
    return seq


def test_a_new_sequence_shadows_before_it_verifies_and_learns_from_it():
    from kvpilot_engine.spec_decode.speculator import NgramSpeculation, Speculator

    cfg = SpeculativeConfig(method="ngram", num_speculative_tokens=4, prompt_lookup_min=2)
    spec = Speculator(cfg, NgramSpeculation(cfg), max_model_len=4096)
    # A cheap token and an engine-wide history of full acceptance: drafts would pay.
    spec.cost.c0, spec.cost.c1 = 0.05, 0.001
    spec.prior.accepted, spec.prior.rejected = 50.0, 1.0
    text = [5, 6, 7, 8, 9, 10, 11, 12]
    copy = _shadowed([*text, 5, 6], 0)  # a copy has begun: the lookup drafts 7, 8, 9, 10
    chat = _shadowed([*text, 40, 41, 5, 6], 1)  # drafts 7, 8, 9, 10 too, but will not follow
    spec.propose([copy, chat])
    # No evidence of their own yet: nothing verified, both shadowed.
    assert copy.spec_token_ids == [] and chat.spec_token_ids == []
    assert spec._shadows[0].draft == [7, 8, 9, 10] and spec._shadows[1].draft == [7, 8, 9, 10]
    # One step later the copy generated the draft's first token, the chat something else.
    copy.token_ids.append(7)
    copy.num_computed_tokens += 1
    chat.token_ids.append(99)
    chat.num_computed_tokens += 1
    spec.propose([copy, chat])
    assert copy.spec_token_ids == [8, 9, 10, 11]  # drafts from the copy's own evidence
    assert chat.spec_token_ids == []  # a miss, with nothing verified to learn it
    assert spec._estimate(chat).alpha < 0.5 < spec._estimate(copy).alpha
    assert 1 not in spec._shadows  # settled at the miss
    assert spec.stats.num_draft_tokens == 0  # shadows are not counted as drafts
    # A sequence that keeps missing is shadowed less often: after a miss, not at once.
    chat.token_ids.append(5)
    chat.token_ids.append(6)
    chat.num_computed_tokens += 2
    back = spec._backoff[1]
    assert back.misses == 1 and back.next_at == len(chat) - 1
    spec.on_finished(chat)
    assert 1 not in spec._backoff and 1 not in spec._estimates


def test_a_draft_model_is_never_shadowed():
    from kvpilot_engine.spec_decode.speculator import Speculator

    class Counting:
        free = False
        draft_cost = 0.0
        calls = 0

        def propose(self, seqs, num_tokens):
            Counting.calls += 1
            return [[7] * k for k in num_tokens]

        def finish(self, seq):
            pass

    cfg = SpeculativeConfig(method="ngram", num_speculative_tokens=3)
    spec = Speculator(cfg, Counting(), max_model_len=4096)
    spec.cost.c0, spec.cost.c1 = 0.05, 0.001
    seq = _shadowed([5, 6, 7, 5, 6], 0)
    spec.propose([seq])
    # Without shadows the first step verifies on the engine-wide prior, as before.
    assert seq.spec_token_ids == [7, 7, 7] and not spec._shadows
