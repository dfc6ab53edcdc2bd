"""SpaCO's estimator, checked exactly by enumerating every selection with its probability (no sampling)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from tiny import grads_of, rel_error, tiny_batch, tiny_model

from engine.chunkwise import ChunkOptions, ChunkSchedule, chunkwise_backward, draw_chunks

K, CHUNK, SEQ = 5, 4, 20  # 5 chunks: 32 selections


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("LlamaConfig", torch.float64)
    ids, labels, mask = tiny_batch(seq=SEQ, pad_from=17, ignore=(3, 5))
    model.zero_grad(set_to_none=True)
    chunkwise_backward(
        model, ids, labels=labels, attention_mask=mask, schedule=ChunkSchedule(chunk_size=CHUNK)
    )
    return model, ids, labels, mask, grads_of(model)


def estimate(model, ids, labels, mask, selected, **kw):
    model.zero_grad(set_to_none=True)
    stats = chunkwise_backward(
        model,
        ids,
        labels=labels,
        attention_mask=mask,
        schedule=ChunkSchedule(chunk_size=CHUNK, mode="spaco", selected=selected, **kw),
    )
    grads = grads_of(model)
    # An empty selection adds nothing: its estimate is zero.
    return stats, grads or {n: torch.zeros_like(p) for n, p in model.named_parameters()}


def expectation(weighted_estimates):
    total = {}
    for w, g in weighted_estimates:
        for n, t in g.items():
            total[n] = total.get(n, 0) + w * t
    return total


@pytest.mark.parametrize("q", [0.5, 0.3])
def test_bernoulli_is_exactly_unbiased(setup, q):
    model, ids, labels, mask, seco = setup
    terms, uncompensated = [], []
    for bits in itertools.product([0, 1], repeat=K):
        sel = [c for c in range(K) if bits[c]]
        p = q ** len(sel) * (1 - q) ** (K - len(sel))
        terms.append((p, estimate(model, ids, labels, mask, sel, sample_prob=q)[1]))
        uncompensated.append(
            (p, estimate(model, ids, labels, mask, sel, sample_prob=q, compensation_cap=1.0)[1])
        )
    # Not 1e-12: HF's RMSNorm backprops in float32 even in a float64 model, so each selection's estimate is
    # rounded to float32 (SeCO against full backprop rounds the same totals, hence agrees to 1e-16).
    assert rel_error(expectation(terms), seco) <= 1e-6  # measured 2e-8 (q=0.5), 5e-8 (q=0.3)
    # Without the 1/q weights the same check fails: the test can tell a biased estimator.
    assert rel_error(expectation(uncompensated), seco) > 0.1


def enumerate_bernoulli(model, ids, labels, mask, probs, run_probs=None):
    """E[estimate] over every selection with non-zero probability, chunk c drawn with probs[c]; the estimates
    themselves weight chunk c by 1 / run_probs[c] (the same probs unless a test wants a wrong weighting)."""
    free = [c for c in range(K) if probs[c] < 1]
    terms = []
    for bits in itertools.product([0, 1], repeat=len(free)):
        dropped = {c for c, b in zip(free, bits) if not b}
        sel = [c for c in range(K) if c not in dropped]
        p = math.prod(probs[c] if c in sel else 1 - probs[c] for c in free)
        sched = ChunkSchedule(CHUNK, mode="spaco", chunk_probs=run_probs or probs, selected=sel)
        model.zero_grad(set_to_none=True)
        chunkwise_backward(model, ids, labels=labels, attention_mask=mask, schedule=sched)
        terms.append((p, grads_of(model)))
    return expectation(terms), len(terms)


def test_unequal_chunk_probs_are_exactly_unbiased(setup):
    """Importance-sampled SpaCO: chunk c kept with q_c, weighted 1/q_c on its loss and on its relay, so a
    path through c1..cp carries prod 1/q and survives with prod q."""
    model, ids, labels, mask, seco = setup
    probs = (1.0, 0.3, 0.8, 0.5, 1.0)
    got, n = enumerate_bernoulli(model, ids, labels, mask, probs)
    err = rel_error(got, seco)
    print(f"unequal q_c {probs}: relative error of the expectation {err:.2e}")
    assert n == 8 and err <= 1e-6  # float32 RMSNorm backward, as above
    # One global weight (the mean q) on the same draws is biased: the test can tell.
    wrong, _ = enumerate_bernoulli(model, ids, labels, mask, probs, run_probs=(0.72,) * K)
    print(f"same draws, one global weight: {rel_error(wrong, seco):.2e}")
    assert rel_error(wrong, seco) > 1e-2


def test_loss_chunks_always_policy_is_unbiased_and_skips_heads(setup):
    """SFT policy: chunks holding loss tokens get q = 1 (always back-propagated), the context q; pass 2 runs
    the LM head of context chunks on one token only."""
    model, ids, _, mask, _ = setup
    labels = torch.full_like(ids, -100)
    labels[0, 13:17] = ids[0, 13:17]  # loss targets in chunks 3 (row 0: tokens 13..16 predicted from 12..15)
    labels[1, 9:11] = ids[1, 9:11]  # and chunk 2
    model.zero_grad(set_to_none=True)
    chunkwise_backward(
        model, ids, labels=labels, attention_mask=mask, schedule=ChunkSchedule(chunk_size=CHUNK)
    )
    seco = grads_of(model)
    sched = ChunkSchedule(chunk_size=CHUNK, mode="spaco", sample_prob=0.4, loss_chunks="always")
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    has_loss = [bool((targets[:, s : s + CHUNK] != -100).any()) for s in range(0, SEQ, CHUNK)]
    assert has_loss == [False, False, True, True, False]
    probs = sched.probs(K, has_loss)
    assert probs == [0.4, 0.4, 1.0, 1.0, 0.4]
    got, n = enumerate_bernoulli(model, ids, labels, mask, tuple(probs))
    err = rel_error(got, seco)
    print(f"policy 'always' (q_c {probs}): relative error of the expectation {err:.2e}")
    assert n == 8 and err <= 1e-6
    # Drawn by the policy itself: loss chunks always in; heads of no-loss chunks see one token.
    head_tokens = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: head_tokens.append(i[0].shape[1]))
    try:
        for seed in range(4):
            model.zero_grad(set_to_none=True)
            head_tokens.clear()
            stats = chunkwise_backward(
                model,
                ids,
                labels=labels,
                attention_mask=mask,
                schedule=sched,
                options=ChunkOptions(fused_loss=False),  # the whole-chunk loss: the head sees the chunk
                generator=torch.Generator().manual_seed(seed),
            )
            assert {2, 3} <= set(stats.selected)
            assert sorted(head_tokens) == sorted([1] * (K + len(stats.selected) - 2) + [CHUNK] * 2)
    finally:
        hook.remove()


def test_sample_prob_one_is_seco_bit_for_bit(setup):
    model, ids, labels, mask, seco = setup
    stats, got = estimate(model, ids, labels, mask, None, sample_prob=1.0)
    assert stats.selected == list(range(K)) and stats.compensation == 1.0
    assert all(torch.equal(got[n], seco[n]) for n in seco)


@pytest.mark.parametrize("t", [1, 2, 3, 4, 5])
def test_fixed_t_of_k_bias_is_recorded(setup, t):
    """The paper's t-of-k draw with weight k/t: exact for single-chunk paths, biased for longer ones."""
    model, ids, labels, mask, seco = setup
    subsets = list(itertools.combinations(range(K), t))
    terms = [
        (1 / len(subsets), estimate(model, ids, labels, mask, list(s), sampler="fixed")[1]) for s in subsets
    ]
    bias = rel_error(expectation(terms), seco)
    print(f"fixed sampler k={K} t={t}: relative bias of the expected gradient {bias:.3e}")
    if t == K:
        assert bias <= 1e-12
    else:
        assert bias > 1e-3  # not zero: paths through 2+ chunks are under-weighted


def fixed(budget, **kw):
    return ChunkSchedule(chunk_size=CHUNK, mode="spaco", sampler="fixed", budget=budget, **kw)


def bernoulli(q, **kw):
    return ChunkSchedule(chunk_size=CHUNK, mode="spaco", sample_prob=q, **kw)


def test_fixed_draw_with_budget_and_generator_is_reproducible():
    draws = [draw_chunks(fixed(4), 16, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert draws[0] == draws[1] and len(draws[0].selected) == 4 and draws[0].weights == [4.0] * 4
    capped = draw_chunks(fixed(4, compensation_cap=2.0), 16, torch.Generator().manual_seed(3))
    assert capped.weights == [2.0] * 4


def test_bernoulli_draw_frequency_and_rank_agreement():
    # Same seed on every rank, same draw; over many draws each chunk is picked with probability q.
    a = draw_chunks(bernoulli(0.25), 8, torch.Generator().manual_seed(11))
    b = draw_chunks(bernoulli(0.25), 8, torch.Generator().manual_seed(11))
    assert a == b and set(a.weights) <= {4.0}
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(8)
    n = 4000
    for _ in range(n):
        for c in draw_chunks(bernoulli(0.25), 8, g).selected:
            counts[c] += 1
    assert torch.allclose(counts / n, torch.full((8,), 0.25), atol=5 * math.sqrt(0.25 * 0.75 / n))


def test_spaco_loss_is_the_exact_full_loss():
    model = tiny_model("LlamaConfig", torch.float32)
    ids, labels, mask = tiny_batch()
    hf = model(input_ids=ids, labels=labels, attention_mask=mask).loss.item()
    for mode, kw in (("seco", {}), ("spaco", {"sample_prob": 0.25})):
        stats = chunkwise_backward(
            model,
            ids,
            labels=labels,
            attention_mask=mask,
            schedule=ChunkSchedule(chunk_size=8, mode=mode, **kw),
            generator=torch.Generator().manual_seed(0),
        )
        assert stats.loss == pytest.approx(hf, rel=1e-6), mode
        assert stats.num_tokens == int((labels[:, 1:] != -100).sum())
