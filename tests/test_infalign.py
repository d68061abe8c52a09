"""Inference-aware alignment: calibration, transforms, best-of-N / worst-of-N, win rates, the analytic tool and the
tabular CTRL lab (digest §5(b), §5(e))."""
from __future__ import annotations

import argparse
import itertools
import json
import math

import pytest
import torch

from tilt.bon import best_of_n, evaluate_win_rates, worst_of_n
from tilt.infalign import (
    CalibratedReward,
    CalibrationSet,
    analyze,
    build_calibration,
    calibrated_space_metrics,
    grid,
    load_or_build_calibration,
    paper_scale_beta,
    procedure_transform,
    tune_t,
)
from tilt.lab.ctrl import ctrl_world, run_ctrl_lab
from tilt.lab.tabular import TabularPolicy
from tilt.lab.world import TableReward
from tilt.math import exact
from tilt.math.infalign import (
    best_of_n_kl_closed_form,
    best_of_n_probs,
    best_of_n_values,
    best_of_n_win_rate_closed_form,
    bootstrap_win_rate,
    bootstrap_win_rate_difference,
    calibrated_reward,
    exact_calibrated_reward,
    exact_win_rate,
    exp_transform,
    neg_exp_transform,
    pairwise_win_rate,
    unit_exp_transform,
    unit_neg_exp_transform,
    worst_of_n_probs,
)


def dirichlet_probs(k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    e = -torch.log1p(-torch.rand(k, generator=g, dtype=torch.float64))
    return (e / e.sum()).view(1, k)


# --- closed forms of best-of-N of pi_ref ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 16, 32])
def test_bon_of_ref_continuous_matches_closed_forms(n):
    """Density of u under BoN_N(pi_ref) is N u^(N-1): KL = log N - (N-1)/N, W(BoN > ref) = N/(N+1) (digest §5(b))."""
    m = calibrated_space_metrics((n - 1) * torch.log(grid()), n)
    assert abs(m["kl"] - best_of_n_kl_closed_form(n)) < 1e-4
    assert abs(m["win_rate_standard"] - best_of_n_win_rate_closed_form(n)) < 1e-4
    # BoN_N of BoN_N(pi_ref) is BoN_{N^2}(pi_ref); it beats BoN_N(pi_ref) with probability N^2/(N^2 + N)
    assert abs(m["win_rate_bon"] - n * n / (n * n + n)) < 1e-4


def sorted_bon_formula(probs: torch.Tensor, rewards: torch.Tensor, n: int) -> torch.Tensor:
    """The digest's formula BoN(y_(i)) = F_i^N - F_{i-1}^N on responses sorted by (distinct) reward."""
    order = rewards.argsort()
    f = probs[order].cumsum(0)
    f_prev = torch.cat([torch.zeros(1, dtype=torch.float64), f[:-1]])
    out = torch.empty_like(probs)
    out[order] = f.pow(n) - f_prev.pow(n)
    return out


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_bon_of_ref_discrete_strictly_below_closed_forms(n):
    probs = dirichlet_probs(200, seed=n)
    rewards = torch.randn(1, 200, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    bon = best_of_n_probs(probs, rewards, n)
    torch.testing.assert_close(bon[0], sorted_bon_formula(probs[0], rewards[0], n), rtol=0, atol=1e-14)
    assert abs(bon.sum().item() - 1) < 1e-12
    kl = exact.kl(bon.log(), probs.log()).item()
    wr = exact_win_rate(bon, probs, rewards).item()
    assert kl < best_of_n_kl_closed_form(n) and wr < best_of_n_win_rate_closed_form(n)
    # a finite set loses little: the gap is at most of the order of the largest atom
    assert best_of_n_kl_closed_form(n) - kl < 0.05 and best_of_n_win_rate_closed_form(n) - wr < 0.01


def enumerate_procedure(probs, rewards, n, pick):
    """Exact distribution of the procedure by enumerating all K^N tuples, first index on ties."""
    k = probs.shape[-1]
    out = torch.zeros(k, dtype=torch.float64)
    for tup in itertools.product(range(k), repeat=n):
        chosen = tup[pick(torch.tensor([rewards[j].item() for j in tup])).item()]
        out[chosen] += math.prod(probs[j].item() for j in tup)
    return out


@pytest.mark.parametrize("n", [1, 2, 3])
def test_bon_and_won_probs_match_enumeration_with_ties(n):
    probs = torch.tensor([0.1, 0.25, 0.05, 0.3, 0.2, 0.1], dtype=torch.float64)
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.5, 0.0, 2.0], dtype=torch.float64)
    for fn, pick in ((best_of_n_probs, torch.argmax), (worst_of_n_probs, torch.argmin)):
        got = fn(probs.view(1, -1), rewards.view(1, -1), n)[0]
        torch.testing.assert_close(got, enumerate_procedure(probs, rewards, n, pick), rtol=0, atol=1e-14)


# --- calibration ---------------------------------------------------------------------------------------------------


def test_calibrated_reward_matches_definition_with_ties():
    g = torch.Generator().manual_seed(0)
    ref = torch.randint(0, 5, (3, 40), generator=g).double()
    ys = torch.randint(-1, 6, (3, 7), generator=g).double()
    got = calibrated_reward(ys, ref)
    want = torch.tensor([[sum((z < y) + 0.5 * (z == y) for z in ref[i].tolist()) / 40 for y in ys[i].tolist()] for i in range(3)], dtype=torch.float64)
    torch.testing.assert_close(got, want.double(), rtol=0, atol=1e-15)


def test_mean_calibrated_reward_under_ref_is_one_half_with_ties():
    g = torch.Generator().manual_seed(1)
    probs = dirichlet_probs(30, seed=3)
    rewards = torch.randint(0, 4, (1, 30), generator=g).double()  # heavy ties
    c = exact_calibrated_reward(rewards, probs)
    assert abs((probs * c).sum().item() - 0.5) < 1e-15
    samples = torch.randint(0, 3, (5, 101), generator=g).double()  # empirical: the calibration set itself
    assert torch.allclose(calibrated_reward(samples, samples).mean(-1), torch.full((5,), 0.5, dtype=torch.float64), atol=1e-15, rtol=0)


def test_calibration_makes_policies_and_win_rates_invariant_to_increasing_maps():
    ref, rewards = ctrl_world(60, seed=4)
    g_rewards = torch.exp(3 * rewards) + rewards.pow(3)  # strictly increasing
    reward, g_reward = TableReward(rewards, 60, 1), TableReward(g_rewards, 60, 1)
    cal = build_calibration(ref, reward, [0], 64, seed=5)
    g_cal = build_calibration(ref, g_reward, [0], 64, seed=5)
    support = ref.enumerate()
    ref_logp = ref.support_logprobs().detach()
    phi = procedure_transform("bon", "exp", 6.0)
    tilted = []
    for r_fn, c in ((reward, cal), (g_reward, g_cal)):
        r_ctrl = CalibratedReward(r_fn, c, phi)(support.prompts, support.completions).view(1, -1)
        tilted.append(torch.log_softmax(ref_logp + r_ctrl / 0.3, -1))
    torch.testing.assert_close(tilted[0], tilted[1], rtol=0, atol=1e-12)
    p = tilted[0].exp()
    q = ref_logp.exp()
    for n in (1, 4):
        a = exact_win_rate(best_of_n_probs(p, rewards, n), best_of_n_probs(q, rewards, n), rewards)
        b = exact_win_rate(best_of_n_probs(p, g_rewards, n), best_of_n_probs(q, g_rewards, n), g_rewards)
        assert abs(a.item() - b.item()) < 1e-12
    # raw-reward RLHF is not invariant
    raw = [torch.log_softmax(ref_logp + r / 0.3, -1) for r in (rewards, g_rewards)]
    assert exact.kl(raw[0], raw[1]).item() > 1e-3


def test_calibration_cache_roundtrip_and_reuse(tmp_path):
    ref = TabularPolicy(5, 2, contexts=3, logits=torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    table = torch.rand(3, 25, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    calls = []

    def reward(prompts, completions):
        calls.append(len(completions))
        return TableReward(table, 5, 2)(prompts, completions)

    path = tmp_path / "cal.json"
    first = load_or_build_calibration(path, ref, reward, [0, 1, 2], 100, seed=3, fingerprint={"reference": "r", "reward": "t"})
    assert first.ref_rewards.shape == (3, 100) and sum(calls) == 300
    again = load_or_build_calibration(path, ref, reward, [0, 1, 2], 100, seed=3, fingerprint={"reference": "r", "reward": "t"})
    assert sum(calls) == 300  # reused: the reward was not called again
    torch.testing.assert_close(again.ref_rewards, first.ref_rewards, rtol=0, atol=0)
    load_or_build_calibration(path, ref, reward, [0, 1, 2], 100, seed=3, fingerprint={"reference": "r", "reward": "other"})
    assert sum(calls) == 600  # another reward: rebuilt
    assert torch.equal(CalibrationSet.load(path).rows([2, 0]), first.ref_rewards[[2, 0]])
    with pytest.raises(KeyError):
        first.rows([7])
    # the calibration samples come from the right prompts: their mean reward is close to E_ref[r]
    expected = (ref.support_logprobs().exp() * table).sum(-1)
    assert (first.ref_rewards.mean(-1) - expected).abs().max() < 0.1


# --- transforms ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.5, 4.0, 20.0])
def test_unit_transforms_are_affine_maps_of_the_paper_transforms(t):
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(unit_exp_transform(u, t=t), (exp_transform(u, t=t) - 1) / math.expm1(t), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(unit_neg_exp_transform(u, t=t), (neg_exp_transform(u, t=t) + 1) / (1 - math.exp(-t)), rtol=1e-12, atol=1e-13)
    # same tilted policy with the paper's Phi at paper_scale_beta
    ref_logp = torch.log_softmax(torch.randn(101, generator=torch.Generator().manual_seed(2), dtype=torch.float64), -1)
    for proc, paper in (("bon", exp_transform), ("won", neg_exp_transform)):
        beta = 0.2
        unit = torch.log_softmax(ref_logp + procedure_transform(proc, "exp", t)(u) / beta, -1)
        orig = torch.log_softmax(ref_logp + paper(u, t=t) / paper_scale_beta(proc, "exp", t, beta), -1)
        torch.testing.assert_close(unit, orig, rtol=0, atol=1e-10)
    assert torch.isfinite(unit_exp_transform(u, t=2000.0)).all() and torch.isfinite(unit_neg_exp_transform(u, t=2000.0)).all()


def test_identity_is_optimal_for_the_standard_win_rate_at_fixed_kl():
    g = torch.Generator().manual_seed(0)
    for kl in (0.1, 0.5, 1.0):
        best = analyze(procedure_transform("bon", "identity"), 4, kl, points=1 << 12)["win_rate_standard"]
        others = [procedure_transform("bon", "probit")]
        for t in (0.3 + 20 * torch.rand(4, generator=g)).tolist():
            others += [procedure_transform("bon", "exp", t), procedure_transform("won", "exp", t)]
        for phi in others:
            try:
                wr = analyze(phi, 4, kl, points=1 << 12)["win_rate_standard"]
            except ValueError:  # KL out of reach for a saturating transform
                continue
            assert wr <= best + 1e-9
        probit = analyze(others[0], 4, kl, points=1 << 12)["win_rate_standard"]
        assert probit < best - 1e-3  # and strictly below for a clearly non-affine Phi


# --- the analytic tool ---------------------------------------------------------------------------------------------


def test_analyze_matches_kl_budget_and_identity_numbers():
    bon = analyze(procedure_transform("bon", "identity"), 4, 0.5)
    assert abs(bon["kl"] - 0.5) < 1e-9
    assert abs(bon["win_rate_bon"] - 0.800) < 1e-3 and abs(bon["win_rate_won"] - 0.886) < 1e-3
    # N = 1: the procedure is plain sampling, so all three win rates agree
    one = analyze(procedure_transform("bon", "exp", 3.0), 1, 0.3)
    assert abs(one["win_rate_bon"] - one["win_rate_standard"]) < 1e-6 and abs(one["win_rate_won"] - one["win_rate_standard"]) < 1e-6


@pytest.fixture(scope="module")
def tuned_n4():
    """The tuned exponential transforms for N = 4 at KL = 0.5, shared by the analytic and the lab tests."""
    return {"bon": tune_t("bon", 4, 0.5), "won": tune_t("won", 4, 0.5)}


@pytest.mark.slow
def test_tuned_exponential_beats_identity_n4_kl05(tuned_n4):
    """Digest §5(b): N = 4, KL = 0.5: BoN 0.873 (t ≈ 12.6) vs 0.800; WoN 0.948 (t ≈ 9.7) vs 0.886."""
    bon, won = tuned_n4["bon"], tuned_n4["won"]
    assert abs(bon.win_rate_inference - 0.873) < 2e-3 and 10 < bon.t < 15
    assert abs(won.win_rate_inference - 0.948) < 2e-3 and 8 < won.t < 12
    assert abs(bon.metrics["kl"] - 0.5) < 1e-9 and abs(won.metrics["kl"] - 0.5) < 1e-9
    # t is a maximiser: nearby t do no better
    for proc, tuned in (("bon", bon), ("won", won)):
        for factor in (0.7, 1.4):
            other = analyze(procedure_transform(proc, "exp", tuned.t * factor), 4, 0.5)
            assert other[f"win_rate_{proc}"] < tuned.win_rate_inference


# --- sampling procedures and sampled win rates ---------------------------------------------------------------------


def test_best_and_worst_of_n_sampling_match_exact_distribution():
    ref = TabularPolicy(6, 1, logits=torch.log(dirichlet_probs(6, seed=9)).view(1, 1, 6))
    table = torch.tensor([[0.3, 0.1, 0.3, 0.9, -1.0, 0.5]], dtype=torch.float64)  # a tie
    reward = TableReward(table, 6, 1)
    probs = ref.support_logprobs().exp().detach()
    for sample, exact_probs in ((best_of_n, best_of_n_probs), (worst_of_n, worst_of_n_probs)):
        sel = sample(ref, [0] * 20000, 3, reward, generator=torch.Generator().manual_seed(0))
        assert torch.equal(sel.rewards, sel.all_rewards.gather(1, sel.index[:, None])[:, 0])
        assert torch.equal(sel.rewards, reward(sel.prompts, sel.completions))
        want_extreme = sel.all_rewards.amax(1) if sample is best_of_n else sel.all_rewards.amin(1)
        assert torch.equal(sel.rewards, want_extreme)
        freq = torch.bincount(torch.tensor([c[0] for c in sel.completions]), minlength=6).double() / 20000
        assert (freq - exact_probs(probs, table, 3)[0]).abs().max() < 0.015


def test_sampled_win_rates_and_bootstrap():
    a = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    b = torch.tensor([[2.0, 2.0]], dtype=torch.float64)
    assert pairwise_win_rate(a, b).item() == pytest.approx((0 + 0.5 + 0.5 + 0 + 1 + 1) / 6)
    est, low, high = bootstrap_win_rate(a + 10, b, generator=torch.Generator().manual_seed(0), num_resamples=50)
    assert (est, low, high) == (1.0, 1.0, 1.0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 200, generator=g, dtype=torch.float64) + 0.5, torch.randn(4, 200, generator=g, dtype=torch.float64)
    est, low, high = bootstrap_win_rate(x, y, generator=g, num_resamples=200)
    true = torch.distributions.Normal(0, 1).cdf(torch.tensor(0.5 / math.sqrt(2))).item()  # P(X > Y)
    assert low < est < high and low < true < high and high - low < 0.15
    assert torch.equal(best_of_n_values(torch.tensor([[1.0, 5.0, 2.0, 0.0]]), 2), torch.tensor([[5.0, 2.0]]))


def test_paired_win_rate_difference_shares_the_reference_draws():
    g = torch.Generator().manual_seed(4)
    ref = torch.randn(6, 64, generator=g, dtype=torch.float64)
    a = torch.randn(6, 48, generator=g, dtype=torch.float64) + 0.6
    b = torch.randn(6, 32, generator=g, dtype=torch.float64) + 0.2
    est, low, high = bootstrap_win_rate_difference(a, b, ref, generator=g, num_resamples=300)
    assert est == pytest.approx(pairwise_win_rate(a, ref).mean().item() - pairwise_win_rate(b, ref).mean().item(), abs=1e-12)
    normal = torch.distributions.Normal(0, 1)
    true = (normal.cdf(torch.tensor(0.6 / math.sqrt(2))) - normal.cdf(torch.tensor(0.2 / math.sqrt(2)))).item()
    assert 0 < low < est < high and low < true < high
    back, low_back, high_back = bootstrap_win_rate_difference(b, a, ref, generator=g, num_resamples=300)
    assert back == pytest.approx(-est, abs=1e-12) and low_back < -est < high_back
    same, low_same, high_same = bootstrap_win_rate_difference(a, a.clone(), ref, generator=g, num_resamples=300)
    assert same == 0 and low_same < 0 < high_same  # the same draws: no gap, and the interval is not degenerate
    with pytest.raises(ValueError, match="one row per prompt"):
        bootstrap_win_rate_difference(a[:5], b, ref, generator=g)


def test_evaluate_win_rates_against_exact():
    ref, rewards = ctrl_world(20, seed=2)
    policy = TabularPolicy(20, 1, logits=(ref.logits.detach() + 2 * rewards.view(1, 1, -1)))
    reward = TableReward(rewards, 20, 1)
    out = evaluate_win_rates(policy, ref, reward, [0], n=4, groups=200, generator=torch.Generator().manual_seed(3), num_resamples=200)
    p, q = policy.support_logprobs().exp().detach(), ref.support_logprobs().exp().detach()
    exact_bon = exact_win_rate(best_of_n_probs(p, rewards, 4), best_of_n_probs(q, rewards, 4), rewards).item()
    exact_std = exact_win_rate(p, q, rewards).item()
    exact_kl = exact.kl(p.log(), q.log()).item()
    assert out["win_rate_bon_low"] < exact_bon < out["win_rate_bon_high"]
    assert out["win_rate_standard_low"] < exact_std < out["win_rate_standard_high"]
    assert out["kl_low"] < exact_kl < out["kl_high"]


# --- the tabular CTRL lab ------------------------------------------------------------------------------------------


def _lab(**kw):
    """A lab run short enough for tests: 800 steps at lr 0.15 reach KL(tilted || learned) < 0.03 in every case here."""
    return run_ctrl_lab(steps=800, lr=0.15, calibration_samples=256, **kw)


def _check_learned(run, kl):
    assert abs(run["target_kl"] - kl) < 1e-9  # beta solved on the exact tilted policy
    assert abs(run["kl"] - kl) < 0.02  # the learned policy lands on the budget
    assert abs(run["win_rate_inference"] - run["analytic_win_rate_inference"]) < 0.01
    assert abs(run["target_win_rate_inference"] - run["analytic_win_rate_inference"]) < 0.01


@pytest.mark.slow
def test_lab_ctrl_n4_kl05_order_and_analytic(tuned_n4):
    """Digest E4.5, learned with the kl_rl recipe on the CTRL reward (m = 256): within 0.01 of the analytic numbers
    (0.873 / 0.800 for BoN, 0.948 / 0.886 for WoN), and BoN exp > raw > identity, WoN exp > identity > raw."""
    runs = {
        (p, tr): _lab(procedure=p, transform=tr, t=tuned_n4[p].t if tr == "exp" else None, seed=0)
        for p in ("bon", "won")
        for tr in ("exp", "raw", "identity")
    }
    for p in ("bon", "won"):
        _check_learned(runs[p, "exp"], 0.5)
        _check_learned(runs[p, "identity"], 0.5)
        assert abs(runs[p, "raw"]["kl"] - 0.5) < 0.02
    for key in ("win_rate_inference", "target_win_rate_inference"):
        assert runs["bon", "exp"][key] > runs["bon", "raw"][key] + 0.01 > runs["bon", "identity"][key] + 0.02
        assert runs["won", "exp"][key] > runs["won", "identity"][key] + 0.02 > runs["won", "raw"][key] + 0.03


@pytest.mark.slow
@pytest.mark.parametrize("procedure,n,kl,seed", [("bon", 2, 0.25, 2), ("won", 8, 0.25, 4), ("won", 2, 1.0, 6)])
def test_lab_ctrl_other_n_kl_seeds(procedure, n, kl, seed):
    t = tune_t(procedure, n, kl, grid_size=24).t
    ctrl = _lab(procedure=procedure, n=n, kl=kl, transform="exp", t=t, seed=seed)
    ident = _lab(procedure=procedure, n=n, kl=kl, transform="identity", seed=seed)
    _check_learned(ctrl, kl)
    _check_learned(ident, kl)
    assert ctrl["win_rate_inference"] > ident["win_rate_inference"] + 0.005


@pytest.mark.slow
def test_worst_of_8_calibration_noise_at_m_256():
    """Worst-of-8 depends on the lowest quantiles, which 256 calibration samples resolve coarsely: over 8 seeds
    the exact tilted policy on the calibrated reward is within 0.01 of the analytic win rate on average, but
    single seeds stray by up to ~0.025 (seed 3: -0.023). Learning adds little on top (tested above)."""
    runs = [run_ctrl_lab(procedure="won", n=8, kl=0.25, transform="identity", seed=s, calibration_samples=256, steps=0)
            for s in range(8)]
    errors = torch.tensor([r["target_win_rate_inference"] - r["analytic_win_rate_inference"] for r in runs])
    assert errors.abs().mean() < 0.01
    assert errors.abs().max() < 0.03


def test_lab_large_t_needs_more_responses():
    """BoN, N = 8, KL = 1: the tuned t ≈ 55 puts the policy on the top quantiles, which 200 Dirichlet responses resolve
    too coarsely (exact tilted 0.948 vs analytic 0.974); with 1000 responses the exact tilted policy is within 0.01."""
    small = run_ctrl_lab(procedure="bon", n=8, kl=1.0, transform="exp", t=54.8, seed=5, steps=0, responses=200)
    large = run_ctrl_lab(procedure="bon", n=8, kl=1.0, transform="exp", t=54.8, seed=5, steps=0, responses=1000)
    assert small["analytic_win_rate_inference"] - small["target_win_rate_inference"] > 0.01
    assert abs(large["analytic_win_rate_inference"] - large["target_win_rate_inference"]) < 0.01


def test_cli_analyze_and_lab_json(capsys):
    from tilt.cli import infalign

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    infalign.add_parser(sub)
    lab = sub.add_parser("lab").add_subparsers(dest="experiment", required=True)
    infalign.add_lab_parsers(lab)

    args = parser.parse_args("infalign analyze --procedure won --n 4 --transform exp --t 9.7 --kl 0.5 --json".split())
    assert args.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert abs(out["kl"] - 0.5) < 1e-9 and out["win_rate_inference"] == out["win_rate_won"]
    assert abs(out["win_rate_inference"] - 0.948) < 2e-3 and out["beta"] > 0

    args = parser.parse_args("lab ctrl --responses 30 --procedure bon --n 2 --kl 0.3 --transform identity "
                             "--calibration-samples 64 --seed 1 --steps 300 --lr 0.15 --json".split())
    assert args.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("kl", "win_rate_inference", "analytic_win_rate_inference", "target_win_rate_inference", "beta"):
        assert key in out
    assert abs(out["target_kl"] - 0.3) < 1e-9 and abs(out["kl"] - 0.3) < 0.05
