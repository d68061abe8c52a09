"""The one two-level bootstrap (tilt.math.bootstrap) and the one tie rule and exact win rate (tilt.math.winrate)."""
from __future__ import annotations

import pytest
import torch

from tilt.math import infalign, preference, winrate
from tilt.math.bootstrap import bootstrap_mean, two_level_bootstrap


def test_the_interval_covers_the_population_mean_across_prompts():
    """Prompts drawn from a population (mean mu_p ~ N(0, 1)) with noisy samples: the 95% interval of the mean covers
    the population mean 0 in close to 95 of 100 data sets (a percentile interval on 24 prompts), while an
    interval that resampled only samples (ignoring the spread between prompts) would be far too narrow."""
    g = torch.Generator().manual_seed(0)
    covered, inner_only = 0, 0
    for _ in range(100):
        values = torch.randn(24, 1, generator=g, dtype=torch.float64) + 0.5 * torch.randn(24, 16, generator=g, dtype=torch.float64)
        est, low, high = bootstrap_mean(values, generator=g, num_resamples=400)
        assert low <= est <= high and est == pytest.approx(values.mean().item(), abs=1e-12)
        covered += low < 0 < high
        lo, hi = two_level_bootstrap(lambda w: torch.einsum("rpk,pk->rp", w[0], values), 24, [16], generator=g,
                                     num_resamples=400)
        assert lo == pytest.approx(low, abs=0.35) and hi == pytest.approx(high, abs=0.35)  # the same scheme
        flat = values.view(1, -1)  # one "prompt": only the inner level, prompts' spread ignored
        _, flat_low, flat_high = bootstrap_mean(flat, generator=g, num_resamples=400)
        inner_only += flat_low < 0 < flat_high
    assert covered >= 86, covered
    assert inner_only < 60, inner_only


def test_degenerate_data_give_a_degenerate_interval_and_bad_input_is_refused():
    g = torch.Generator().manual_seed(1)
    assert bootstrap_mean(torch.full((3, 4), 2.5), generator=g, num_resamples=20) == (2.5, 2.5, 2.5)
    assert bootstrap_mean(torch.tensor([[1.0]]), generator=g, num_resamples=20) == (1.0, 1.0, 1.0)  # one prompt, one sample
    with pytest.raises(ValueError, match="level"):
        bootstrap_mean(torch.ones(2, 2), generator=g, level=1.5)
    with pytest.raises(ValueError, match=r"\(P, K\)"):
        bootstrap_mean(torch.ones(4), generator=g)


def test_one_tie_rule_everywhere():
    a = torch.tensor([1.0, 0.0, 2.0, 3.0])
    b = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert winrate.win_probability(a, b).tolist() == [1.0, 0.0, 0.5, 0.5]
    assert winrate.win_probability(a.long(), b.long()).tolist() == [1.0, 0.0, 0.5, 0.5]  # integers too, as float
    assert preference.win_probability is winrate.win_probability
    assert infalign.pairwise_win_rate(a.view(1, -1), b.view(1, -1)).item() == pytest.approx(
        sum(float(x > y) + 0.5 * float(x == y) for x in a.tolist() for y in b.tolist()) / 16)


def test_one_exact_win_rate_with_ties_and_bradley_terry():
    rewards = torch.tensor([[0.0, 1.0, 1.0]], dtype=torch.float64)  # a tie between the last two
    p = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)
    q = torch.tensor([[0.6, 0.2, 0.2]], dtype=torch.float64)
    # by hand: p wins when it picks a 1 and q a 0 (0.8 * 0.6), ties count half: 0.2 * 0.6 (0 vs 0) + 0.8 * 0.4 (1 vs 1)
    by_hand = 0.8 * 0.6 + 0.5 * (0.2 * 0.6 + 0.8 * 0.4)
    assert infalign.exact_win_rate(p, q, rewards).item() == pytest.approx(by_hand, abs=1e-12)
    assert preference.exact_win_rate(p.log(), q.log(), rewards).item() == pytest.approx(by_hand, abs=1e-12)
    assert (winrate.exact_win_rate(p, q, rewards) + winrate.exact_win_rate(q, p, rewards)).item() == pytest.approx(1.0)
    s = 2.0
    bt = sum(p[0, i] * q[0, j] * torch.sigmoid(s * (rewards[0, i] - rewards[0, j])) for i in range(3) for j in range(3))
    assert winrate.exact_win_rate(p, q, rewards, scale=s).item() == pytest.approx(bt.item(), abs=1e-12)
