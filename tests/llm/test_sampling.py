"""The token sampler: validated settings, a counter-based draw per (seed, position), greedy
as the temperature-0 case, top-k / top-p supports, and frequencies that follow the
distribution."""

from __future__ import annotations

import math

import pytest
import torch

from tether.core.errors import ConfigError
from tether.partitioner.llm import (SamplingParams, choose_token, choose_tokens, sampling_probs,
                                    uniform)


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"), ({"temperature": "1"}, "temperature"),
    ({"top_k": -1}, "top_k"), ({"top_k": 2.0}, "top_k"), ({"top_k": True}, "top_k"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_p": float("nan")}, "top_p"),
    ({"seed": -1}, "seed"), ({"seed": 1 << 64}, "seed"), ({"seed": 1.0}, "seed"),
])
def test_invalid_settings_are_refused_in_one_line_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError) as info:
        SamplingParams(**kwargs)
    text = str(info.value)
    assert text.startswith(field) and "\n" not in text


def test_settings_are_frozen_and_resolved_seeds_are_fresh():
    sp = SamplingParams(temperature=1, top_p=1)
    assert isinstance(sp.temperature, float) and sp.seed is None and not sp.greedy
    with pytest.raises(AttributeError):
        sp.seed = 3  # type: ignore[misc]
    seeds = {sp.resolved().seed for _ in range(8)}
    assert None not in seeds and len(seeds) == 8
    assert SamplingParams(temperature=1, seed=5).resolved().seed == 5
    assert SamplingParams().resolved().seed is None        # greedy needs no seed


def test_the_draw_is_a_pure_function_of_seed_and_position():
    draws = [uniform(7, t) for t in range(2000)]
    assert draws == [uniform(7, t) for t in range(2000)]
    assert all(0.0 <= u < 1.0 for u in draws)
    assert len(set(draws)) == len(draws)
    assert [uniform(8, t) for t in range(50)] != draws[:50]
    mean = sum(draws) / len(draws)                       # uniform: mean 1/2, sd 1/sqrt(12 n)
    assert abs(mean - 0.5) < 4 / math.sqrt(12 * len(draws))
    lag = sum((a - 0.5) * (b - 0.5) for a, b in zip(draws, draws[1:])) / len(draws)
    assert abs(lag) < 4 / (12 * math.sqrt(len(draws)))   # consecutive positions uncorrelated
    with pytest.raises(ConfigError):
        uniform(7, -1)


def test_temperature_zero_is_the_argmax_whatever_the_filters_and_seed():
    torch.manual_seed(0)
    for _ in range(20):
        logits = torch.randn(50)
        token, p = choose_token(logits, SamplingParams(0.0, top_k=3, top_p=0.2, seed=9), 4)
        assert token == int(logits.argmax())
        assert p == pytest.approx(float(logits.softmax(-1).max()))


def test_top_k_one_and_a_tiny_top_p_are_greedy_at_any_temperature():
    torch.manual_seed(1)
    for t in range(30):
        logits = torch.randn(64) * 3
        best = int(logits.argmax())
        assert choose_token(logits, SamplingParams(5.0, top_k=1, seed=t), t)[0] == best
        assert choose_token(logits, SamplingParams(5.0, top_p=1e-6, seed=t), t)[0] == best


def test_filters_keep_exactly_their_support():
    logits = torch.tensor([3.0, 2.5, 2.0, 0.0, -1.0, -5.0])
    top2 = sampling_probs(logits, SamplingParams(1.0, top_k=2, seed=0))
    assert (top2 > 0).tolist() == [True, True, False, False, False, False]
    assert float(top2.sum()) == pytest.approx(1.0)
    full = logits.double().softmax(-1)
    need = float(full[0] + 0.5 * full[1])                 # needs the first two tokens, no more
    nucleus = sampling_probs(logits, SamplingParams(1.0, top_p=need, seed=0))
    assert (nucleus > 0).tolist() == [True, True, False, False, False, False]
    assert float(nucleus[0] / nucleus[1]) == pytest.approx(float(full[0] / full[1]))
    hot = sampling_probs(logits, SamplingParams(100.0, seed=0))
    cold = sampling_probs(logits, SamplingParams(0.05, seed=0))
    assert float(hot.max() - hot.min()) < 0.1 and float(cold.max()) > 0.99


def test_frequencies_follow_the_distribution():
    logits = torch.tensor([1.0, 0.0, 2.0, -1.0, 0.5])
    sp = SamplingParams(0.8, seed=123)
    n = 4000
    counts = torch.zeros(5)
    for t in range(n):
        counts[choose_token(logits, sp, t)[0]] += 1
    expected = sampling_probs(logits, sp) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.5, (counts.tolist(), expected.tolist())   # 4 dof: p = 0.001


def test_the_same_seed_repeats_and_other_seeds_differ():
    torch.manual_seed(2)
    logits = torch.randn(30, 100)
    sp = SamplingParams(1.0, seed=42)
    first = [choose_token(row, sp, t)[0] for t, row in enumerate(logits)]
    assert first == [choose_token(row, sp, t)[0] for t, row in enumerate(logits)]
    other = [choose_token(row, SamplingParams(1.0, seed=43), t)[0] for t, row in enumerate(logits)]
    assert first != other


def test_a_batch_row_chooses_what_it_would_alone():
    torch.manual_seed(3)
    logits = torch.randn(4, 40)
    settings = [SamplingParams(), SamplingParams(0.7, seed=1), SamplingParams(1.3, top_k=5, seed=2),
                SamplingParams(1.0, top_p=0.5, seed=3)]
    positions = [3, 9, 4, 17]
    got = choose_tokens(logits, settings, positions)
    assert got == [choose_token(r, s, t) for r, s, t in zip(logits, settings, positions)]
    with pytest.raises(ConfigError):
        choose_tokens(logits, settings[:3], positions)


def test_sampling_without_a_resolved_seed_is_refused():
    with pytest.raises(ConfigError, match="resolved"):
        choose_token(torch.randn(10), SamplingParams(1.0), 0)


def test_logits_without_a_finite_distribution_are_refused():
    with pytest.raises(ConfigError, match="finite"):
        choose_token(torch.full((5,), float("nan")), SamplingParams(1.0, top_p=0.9, seed=1), 0)


def test_a_flat_distribution_needs_the_whole_vocabulary_for_its_nucleus():
    """The nucleus search grows its partial sort up to the whole vocabulary when needed."""
    logits = torch.zeros(5000)
    logits[:3] = torch.tensor([0.3, 0.2, 0.1])
    probs = sampling_probs(logits, SamplingParams(1.0, top_p=0.999, seed=0))
    assert int((probs > 0).sum()) >= 4990
    full = logits.double().softmax(-1)
    order = full.sort(descending=True, stable=True)
    needed = int((order.values.cumsum(0) - order.values < 0.999).sum())
    assert int((probs > 0).sum()) == needed
