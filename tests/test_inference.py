"""Alignment as inference: f-divergence matching, DPG, importance-sampled diagnostics, QRS/rejection/SIR, GDC.

Exact values come from enumerating the lab's 27-sequence world (vocab 3, length 3).
"""
from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import poisson

from tilt.cli import main
from tilt.lab import drivers
from tilt.gdc import fit_coefficients, fit_target, log_indicator, pointwise_target
from tilt.lab.tabular import TabularPolicy, random_tabular_policy
from tilt.lab.world import TableReward, exact_report, reward_table
from tilt.math import exact, importance
from tilt.math.fdiv import (
    DIVERGENCES,
    f_divergence,
    f_divergence_loss,
    importance_weights,
    log_density_ratio,
    pseudo_reward,
    weighted_leave_one_out_baseline,
)
from tilt.math.pg import kl_shaped_reward, leave_one_out_advantage, reinforce_loss
from tilt.posterior import qrs_estimates, qrs_exact, rejection_sample, sir_sample
from tilt.recipes import dpg, kl_rl
from tilt.target import TiltedTarget

V, L, BETA = 3, 3, 0.3


def world(reward="count:2", seed=0, beta=BETA):
    ref = random_tabular_policy(V, L, seed=seed)
    rewards = reward_table(reward, V, L, reward_seed=seed)
    target = TiltedTarget(ref=ref, reward=TableReward(rewards, V, L), beta=beta)
    return ref, rewards, target, target.exact(ref.enumerate())


def grad_of(policy, scalar):
    (g,) = torch.autograd.grad(scalar, policy.logits)
    return g


# --- f-divergences -----------------------------------------------------------------------------------------------
def test_f_values_are_the_named_divergences():
    ref, _, _, ex = world()
    pi = random_tabular_policy(V, L, seed=5)
    lp, lt = pi.support_logprobs().detach(), ex.log_probs
    m = torch.logaddexp(lp, lt) - math.log(2)
    expected = {
        "forward-kl": exact.kl(lt, lp),
        "reverse-kl": exact.kl(lp, lt),
        "js": 0.5 * exact.kl(lp, m) + 0.5 * exact.kl(lt, m),
        "tv": exact.total_variation(lp, lt),
        "chi2": ((lt.exp() - lp.exp()) ** 2 / lp.exp()).sum(),
    }
    for name, fdiv in DIVERGENCES.items():
        assert f_divergence(fdiv, lp, lt).item() == pytest.approx(expected[name].item(), rel=1e-10), name
        assert f_divergence(fdiv, lt, lt).item() == pytest.approx(0.0, abs=1e-12), name


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("off_policy", [False, True])
def test_expected_loss_gradient_is_divergence_gradient(name, off_policy):
    """E_{y~q}[∇ loss(y)] with the weights pi/q used in code equals ∇D_f(pi || pi*), exactly; 0 at pi = pi*."""
    ref, _, target, ex = world()
    fdiv = DIVERGENCES[name]
    pi = random_tabular_policy(V, L, seed=7, scale=0.5)
    q = random_tabular_policy(V, L, seed=8) if off_policy else pi
    support = ref.enumerate()
    log_p_unnorm = target.log_weight(support)  # (N,)
    pi_star = TabularPolicy(V, L, logits=_tabular_logits_of(ex.log_probs[0]))
    assert exact.kl(ex.log_probs, pi_star.support_logprobs().detach()).item() < 1e-14
    for policy in (pi, pi_star):
        log_pi = policy.support_logprobs().view(-1)
        log_q = (q if off_policy else policy).support_logprobs().view(-1).detach()
        log_t = log_density_ratio(log_pi.detach(), log_p_unnorm, ex.log_z)
        adv = pseudo_reward(fdiv.fprime, log_t)
        w = importance_weights(log_pi.detach(), log_q)
        per_seq = f_divergence_loss(policy.token_logprobs(support), adv, w, support.completion_mask)
        g_loss = grad_of(policy, (log_q.exp() * per_seq).sum())
        g_true = grad_of(policy, f_divergence(fdiv, policy.support_logprobs(), ex.log_probs))
        if not (policy is pi_star and name == "tv"):  # TV is not differentiable at pi = pi*; 0 is a subgradient
            assert torch.allclose(g_loss, g_true, atol=1e-10), name
    assert g_loss.abs().max() < 1e-10  # the second policy is pi*: zero gradient


def _tabular_logits_of(seq_logprobs):
    """Logits of the tabular policy whose sequence distribution is exp(seq_logprobs) (N = V^L), by marginalising."""
    probs = seq_logprobs.exp().view([V] * L)
    logits = torch.zeros(1, sum(V**t for t in range(L)), V, dtype=torch.float64)
    for t in range(L):
        marg = probs.sum(dim=tuple(range(t + 1, L))) if t + 1 < L else probs  # (V,)*(t+1)
        flat = marg.reshape(-1, V)  # prefixes of length t, in code order
        offset = sum(V**s for s in range(t))
        logits[0, offset : offset + flat.shape[0]] = torch.log(flat)
    return logits


def test_leave_one_out_baseline_is_unbiased_off_policy():
    """Exact expectation over all 27^2 pairs y1, y2 ~ q: the weighted leave-one-out baseline leaves ∇D_f unchanged."""
    ref, _, target, ex = world()
    pi, q = random_tabular_policy(V, L, seed=3, scale=0.5), random_tabular_policy(V, L, seed=4, scale=0.5)
    support = ref.enumerate()
    log_p = target.log_weight(support)
    log_pi = pi.support_logprobs().view(-1)
    log_q = q.support_logprobs().view(-1).detach()
    n = log_pi.shape[0]
    pairs = torch.cartesian_prod(torch.arange(n), torch.arange(n))  # (N², 2)
    prob = log_q.exp()[pairs].prod(-1)  # (N²,)
    for name in ("forward-kl", "js", "chi2"):
        fdiv = DIVERGENCES[name]
        adv = pseudo_reward(fdiv.fprime, log_density_ratio(log_pi.detach(), log_p, ex.log_z))[pairs]  # (N², 2)
        w = importance_weights(log_pi.detach(), log_q)[pairs]
        a = adv - weighted_leave_one_out_baseline(adv, w)
        coef = torch.zeros(n, dtype=torch.float64).index_add_(0, pairs.flatten(), (prob.unsqueeze(-1) * w * a / 2).flatten())
        g_est = grad_of(pi, -(coef * pi.support_logprobs().view(-1)).sum())
        g_true = grad_of(pi, f_divergence(fdiv, pi.support_logprobs(), ex.log_probs))
        assert torch.allclose(g_est, g_true, atol=1e-10), name


def test_reverse_kl_is_kl_regularised_rl_on_a_batch():
    """beta * (reverse-KL loss gradient) == KL-RL REINFORCE gradient, both with leave-one-out baselines, any log Z."""
    ref, rewards, target, _ = world()
    pi = random_tabular_policy(V, L, seed=2)
    roll = pi.sample([0, 0], 8, generator=torch.Generator().manual_seed(0))
    log_pi = roll.sample_seq_logprobs
    ref_seq = ref.token_logprobs(roll).detach().sum(-1)
    r = TableReward(rewards, V, L)(roll.prompts, roll.completions)
    shaped = kl_shaped_reward(r, log_pi, ref_seq, beta=BETA)
    g_rl = grad_of(pi, reinforce_loss(pi.token_logprobs(roll), leave_one_out_advantage(shaped.view(2, 8)).view(-1), roll.completion_mask).sum())
    log_t = log_density_ratio(log_pi, target.log_weight(roll), torch.tensor(0.123))
    pr = pseudo_reward(DIVERGENCES["reverse-kl"].fprime, log_t)
    w = torch.ones_like(pr)
    adv = pr - weighted_leave_one_out_baseline(pr.view(2, 8), w.view(2, 8)).view(-1)
    g_f = grad_of(pi, f_divergence_loss(pi.token_logprobs(roll), adv, w, roll.completion_mask).sum())
    assert torch.allclose(BETA * g_f, g_rl, atol=1e-10)


def test_reverse_kl_recipe_retraces_kl_rl():
    """The DPG recipe with reverse KL and SGD at lr*beta follows KL-RL's trajectory step for step."""
    ref, rewards, target, _ = world(reward="random")
    a, b = ref.copy(), ref.copy()
    kl_rl.train(kl_rl.KLRLConfig(beta=BETA, steps=30, prompts_per_step=1, samples_per_prompt=16, lr=0.5, optimizer="sgd"),
                a, ref, TableReward(rewards, V, L), [0])
    dpg.train(dpg.DPGConfig(divergence="reverse-kl", steps=30, prompts_per_step=1, samples_per_prompt=16, lr=0.5 * BETA,
                            optimizer="sgd", diagnostics_interval=0), b, target, [0])
    assert torch.allclose(a.logits, b.logits, atol=1e-10)
    assert (a.logits - ref.logits).abs().max() > 0.05  # it moved


def test_f_prime_is_finite_off_a_filter_except_reverse_kl():
    log_t = torch.tensor([math.inf])
    for name, fdiv in DIVERGENCES.items():
        assert torch.isfinite(fdiv.fprime(log_t)).all() == (name != "reverse-kl"), name


# --- DPG learning in the lab ---------------------------------------------------------------------------------------
LEARN = dict(steps=500, lr=0.1, batch=64)
"""Adam, lr 0.1 decayed linearly, 500 steps of 64: enough for every variant in the lab (docs/dpg.md)."""


def _train_dpg(target, ref, **over):
    policy = ref.copy()
    cfg = dict(steps=LEARN["steps"], prompts_per_step=1, samples_per_prompt=LEARN["batch"], lr=LEARN["lr"],
               lr_schedule="linear", diagnostics_interval=0)
    cfg.update(over)
    _, state = dpg.train(dpg.DPGConfig(**cfg), policy, target, [0])
    return policy, state


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode,divergence",
    [("on-policy", "forward-kl"), ("adaptive", "forward-kl"), ("on-policy", "reverse-kl"), ("on-policy", "js"), ("on-policy", "tv"), ("on-policy", "chi2")],
)
def test_dpg_reaches_the_posterior_on_random_rewards(mode, divergence):
    ref, rewards, target, ex = world(reward="random")
    policy, state = _train_dpg(target, ref, mode=mode, divergence=divergence)
    assert exact.kl(ex.log_probs, policy.support_logprobs().detach()).item() < 1e-3
    if mode == "adaptive":
        assert state.proposal_updates > 5  # the proposal was replaced along the way


@pytest.mark.slow
def test_kl_rl_reaches_the_posterior_on_random_rewards():
    ref, rewards, _, _ = world(reward="random")
    policy = ref.copy()
    cfg = kl_rl.KLRLConfig(beta=BETA, steps=LEARN["steps"], prompts_per_step=1, samples_per_prompt=LEARN["batch"], lr=LEARN["lr"], lr_schedule="linear")
    kl_rl.train(cfg, policy, ref, TableReward(rewards, V, L), [0])
    assert exact_report(policy, ref, rewards, BETA)["kl_target_policy"] < 1e-3


@pytest.mark.slow
def test_filter_dpg_matches_posterior_while_pure_rl_collapses():
    ref = random_tabular_policy(V, L, seed=0)
    b = reward_table("contains:2", V, L)
    target = pointwise_target(ref, TableReward(b, V, L))
    ex = target.exact(ref.enumerate())
    ref_lp = ref.support_logprobs().detach()
    assert torch.allclose(ex.log_probs.exp(), ref_lp.exp() * b / (ref_lp.exp() * b).sum())  # pi_ref * b / Z exactly
    policy, _ = _train_dpg(target, ref, steps=800)
    lp = policy.support_logprobs().detach()
    assert exact.kl(ex.log_probs, lp).item() < 1e-3
    rl = ref.copy()
    kl_rl.train(kl_rl.KLRLConfig(beta=0.0, steps=LEARN["steps"], prompts_per_step=1, samples_per_prompt=64, lr=LEARN["lr"],
                                 lr_schedule="linear"), rl, ref, TableReward(b, V, L), [0])
    lp_rl = rl.support_logprobs().detach()
    assert (lp_rl.exp() * (1 - b)).sum() < 1e-3  # all mass admissible...
    assert exact.kl(ex.log_probs, lp_rl).item() > 1.0  # ...but far from the posterior
    assert lp_rl.exp().max() > 1.5 * ex.log_probs.exp().max()  # concentrated on few admissible sequences
    with pytest.raises(ValueError, match="infinite"):
        _train_dpg(target, ref, steps=1, divergence="reverse-kl")


def test_dpg_config_validation():
    with pytest.raises(ValueError, match="divergence"):
        dpg.DPGConfig(divergence="kl")
    with pytest.raises(ValueError, match="samples_per_prompt"):
        dpg.DPGConfig(samples_per_prompt=1)
    with pytest.raises(ValueError, match="mode"):
        dpg.DPGConfig(mode="offline")


def exact_divergences(lp, ex) -> dict[str, float]:
    """By enumeration: log Z and the divergences between pi (log-probs lp, (1, N)) and pi* (ex.log_probs)."""
    lt = ex.log_probs
    m = torch.logaddexp(lp, lt) - math.log(2)
    return {
        "log_z": ex.log_z.item(),
        "kl_target_policy": exact.kl(lt, lp).item(),
        "kl_policy_target": exact.kl(lp, lt).item(),
        "tv": exact.total_variation(lp, lt).item(),
        "js": (0.5 * exact.kl(lp, m) + 0.5 * exact.kl(lt, m)).item(),
    }


def test_dpg_step_logs_diagnostics():
    """At lr 0 the policy stays pi_ref, so each logged diagnostic estimates a number known by enumeration."""
    ref, rewards, target, ex = world()
    policy = ref.copy()
    metrics = []
    dpg.train(dpg.DPGConfig(steps=2, prompts_per_step=1, samples_per_prompt=2048, lr=0.0), policy, target, [0],
              on_step=lambda s, m: metrics.append(m))
    assert torch.equal(policy.logits, ref.logits)  # lr 0: nothing moved
    lp, lt = ref.support_logprobs().detach(), ex.log_probs  # (1, 27) log pi_ref, log pi*
    truth = exact_divergences(lp, ex)
    last = metrics[-1]
    for name, value in truth.items():
        assert last[f"target_{name}"] == pytest.approx(value, abs=0.03), name
        assert last[f"target_{name}_lower"] <= value <= last[f"target_{name}_upper"], name
    assert last["log_z_running"] == pytest.approx(truth["log_z"], abs=0.03)  # pooled over both steps
    assert last["kl_ref"] == 0.0  # pi = pi_ref on every sample: log pi - log pi_ref is 0 exactly
    assert last["reward"] == pytest.approx(exact.expectation(lp, rewards).item(), abs=0.05)  # E_{pi_ref}[r]
    kish = 1.0 / ((lt - lp).exp() ** 2 * lp.exp()).sum().item()  # ESS / K -> 1 / E_q[w^2] for w = pi*/q, q = pi_ref
    assert last["target_ess_fraction"] == pytest.approx(kish, rel=0.1)


# --- importance-sampled diagnostics --------------------------------------------------------------------------------
def test_importance_intervals_cover_exact_values():
    """100 seeded repetitions of 512 samples: each 95% interval covers the exact value at least 90 times."""
    ref, _, target, ex = world()
    pi = random_tabular_policy(V, L, seed=11, scale=0.5)
    q = random_tabular_policy(V, L, seed=12, scale=0.5)
    support = ref.enumerate()
    log_p, log_pi, log_q = target.log_weight(support), pi.support_logprobs().view(-1).detach(), q.support_logprobs().view(-1).detach()
    truth = exact_divergences(log_pi.unsqueeze(0), ex)
    g = torch.Generator().manual_seed(0)
    idx = torch.multinomial(log_q.exp(), 100 * 512, replacement=True, generator=g).view(100, 512)
    args = (log_p[idx], log_q[idx], log_pi[idx])
    estimates = {
        "log_z": importance.log_normaliser(log_p[idx], log_q[idx]),
        "kl_target_policy": importance.kl_target_policy(*args),
        "kl_policy_target": importance.kl_policy_target(*args),
        "tv": importance.total_variation(*args),
        "js": importance.jensen_shannon(*args),
    }
    for name, est in estimates.items():
        covered = int(est.covers(truth[name]).sum())
        assert covered >= 90, (name, covered)
        assert abs(est.value.mean().item() - truth[name]) < 0.02, name  # and centred on the truth


def test_running_log_z_pools_batches():
    g = torch.Generator().manual_seed(1)
    log_w = torch.randn(300, generator=g, dtype=torch.float64)
    state = importance.RunningLogZ()
    for chunk in log_w.split(64):
        state = state.updated(chunk)
    whole = importance.log_normaliser(log_w, torch.zeros_like(log_w))
    assert state.log_z == pytest.approx(whole.value.item(), abs=1e-12)
    assert state.estimate().stderr.item() == pytest.approx(whole.stderr.item(), rel=1e-6)
    assert state.ess == pytest.approx(importance.effective_sample_size(log_w).item(), rel=1e-12)


def test_diagnostics_handle_a_filter():
    """With log P = -inf off the filter nothing is NaN: forward KL finite, reverse KL +inf if pi leaves the filter."""
    ref = random_tabular_policy(V, L, seed=0)
    b = reward_table("contains:2", V, L)
    target = pointwise_target(ref, TableReward(b, V, L))
    roll = ref.sample([0], 256, generator=torch.Generator().manual_seed(0))
    log_q = roll.sample_seq_logprobs.view(1, -1)
    d = importance.diagnostics(target.log_weight(roll).view(1, -1), log_q, log_q)
    assert all(not math.isnan(v) for v in d.values())
    assert math.isfinite(d["kl_target_policy"]) and d["kl_policy_target"] == math.inf


# --- posterior sampling -------------------------------------------------------------------------------------------
def test_qrs_exact_poisson_numbers():
    """Digest E1.5: q = Poisson(10), p = Poisson(11)."""
    k = torch.arange(0, 200, dtype=torch.float64).numpy()
    lp, lq = torch.tensor(poisson.logpmf(k, 11)).unsqueeze(0), torch.tensor(poisson.logpmf(k, 10)).unsqueeze(0)
    for beta_q, acc, tv, kl in [(0.5, 0.9995, 0.1229, 0.0481), (1.0, 0.8768, 0.0749, 0.0199), (2.0, 0.4982, 0.0035, 0.0005)]:
        e = qrs_exact(lp, lq, qrs_beta=beta_q)
        assert e.acceptance_rate == pytest.approx(acc, abs=1e-4)
        assert e.tv == pytest.approx(tv, abs=1e-4)
        assert e.kl_target_sampler == pytest.approx(kl, abs=1e-4)


def test_qrs_lab_estimates_match_exact_and_converge():
    rows = [drivers.run_qrs_lab(qrs_beta=qb, samples=20000) for qb in (2.0, 8.0, 30.0)]
    for row in rows:
        assert abs(row["acceptance_rate_estimate"] - row["acceptance_rate"]) < 0.01
        assert abs(row["tv_estimate"] - row["tv"]) < 0.01
        assert row["accepted_tv_sampler"] < 0.03  # the accepted samples follow p_beta
    assert rows[0]["tv"] > rows[1]["tv"] > rows[2]["tv"] == pytest.approx(0.0, abs=1e-12)  # 30 > max P/q = 28.03
    assert rows[2]["accepted_tv_target"] < 0.03  # and then pi* itself


def test_rejection_sampling_is_exact():
    ref, rewards, target, ex = world()
    log_m = rewards.max().item() / BETA
    cand = rejection_sample(target, [0], 40000, log_bound=log_m, generator=torch.Generator().manual_seed(0))
    rate = cand.keep.double().mean().item()
    assert rate == pytest.approx(math.exp(ex.log_z.item() - log_m), abs=0.01)  # Z / M
    codes = ref.sequence_code(cand.rollout.completion_ids)[cand.keep]
    hist = torch.bincount(codes, minlength=V**L).double() / cand.keep.sum()
    assert 0.5 * (hist - ex.log_probs.exp()[0]).abs().sum() < 0.03
    with pytest.raises(ValueError, match="bound"):
        rejection_sample(target, [0], 100, log_bound=0.0, generator=torch.Generator().manual_seed(0))


def test_sir_matches_its_exact_law_and_converges():
    ref, _, target, ex = world()
    log_q = ref.support_logprobs().view(-1).detach()
    w = (target.log_weight(ref.enumerate()) - log_q).exp()
    q = log_q.exp()
    share = w.unsqueeze(1) / (w.unsqueeze(1) + w.unsqueeze(0))  # P(return y1 | y1, y2)
    law = 2 * (q.unsqueeze(1) * q.unsqueeze(0) * share).sum(1)  # two candidates, one draw
    cand = sir_sample(target, [0] * 20000, 2, 1, generator=torch.Generator().manual_seed(0))
    codes = ref.sequence_code(cand.rollout.completion_ids[cand.indices])
    hist = torch.bincount(codes, minlength=V**L).double() / len(cand.indices)
    assert 0.5 * (hist - law).abs().sum() < 0.03
    assert 0.5 * (law - ex.log_probs.exp()[0]).abs().sum() > 0.1  # two candidates are not enough...
    big = sir_sample(target, [0], 20000, 20000, generator=torch.Generator().manual_seed(1))
    hist = torch.bincount(ref.sequence_code(big.rollout.completion_ids[big.indices]), minlength=V**L).double() / 20000
    assert 0.5 * (hist - ex.log_probs.exp()[0]).abs().sum() < 0.03  # ...many are


# --- GDC -------------------------------------------------------------------------------------------------------------
def _gdc_world(feature="contains:2"):
    ref = random_tabular_policy(V, L, seed=0)
    phi = reward_table(feature, V, L)  # (1, N)
    return ref, phi, ref.support_logprobs().detach()


def test_gdc_solver_finds_the_exact_root_by_enumeration():
    ref, phi, ref_lp = _gdc_world("count:2")
    root = brentq(lambda l: ((torch.softmax(ref_lp + l * phi, -1) * phi).sum() - 0.5).item(), -50, 50, xtol=1e-13)
    fit = fit_coefficients(phi.unsqueeze(-1), ref_lp, torch.tensor([0.5]), tolerance=1e-12)
    assert fit.coefficients.item() == pytest.approx(root, abs=1e-8)
    # the I-projection: every other distribution with E[phi] = 0.5 is further from pi_ref
    p_star = torch.softmax(ref_lp + root * phi, -1)
    kl_star = exact.kl(p_star.log(), ref_lp)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        hi, lo = torch.rand(V**L, generator=g, dtype=torch.float64) * (phi[0] > 0.5), torch.rand(V**L, generator=g, dtype=torch.float64) * (phi[0] < 0.5)
        hi, lo = hi / hi.sum(), lo / lo.sum()
        mh, ml = (hi * phi[0]).sum(), (lo * phi[0]).sum()
        mix = ((0.5 - ml) / (mh - ml)) * hi + ((mh - 0.5) / (mh - ml)) * lo  # E_mix[phi] = 0.5
        assert (mix * phi[0]).sum().item() == pytest.approx(0.5, abs=1e-12)
        assert exact.kl(torch.log(mix).unsqueeze(0), ref_lp) > kl_star


def test_gdc_sampled_fit_errors_match_their_standard_errors():
    """disco's setting, 2^9 samples: the fit solves its sample equation to 1e-5 and its error is that of the samples.
    Note: the sampling error of lambda with 512 samples is ~0.09 here (its standard error), not 1e-2."""
    ref, phi, ref_lp = _gdc_world()
    root = brentq(lambda l: ((torch.softmax(ref_lp + l * phi, -1) * phi).sum() - 0.5).item(), -50, 50, xtol=1e-13)
    within = 0
    for seed in range(20):
        target, fit = fit_target(ref, [TableReward(phi, V, L)], [0.5], [0], generator=torch.Generator().manual_seed(seed))
        assert fit.max_error < 1e-5
        within += abs(fit.coefficients.item() - root) < 2.5 * fit.stderr.item()
    assert within >= 17
    many = fit_target(ref, [TableReward(phi, V, L)], [0.5], [0], generator=torch.Generator().manual_seed(0), n_samples=2**16)[1]
    assert abs(many.coefficients.item() - root) < 3 * many.stderr.item() < 0.03


def test_pointwise_constraint_is_a_filter():
    assert log_indicator(torch.tensor([0.0, 1.0])).tolist() == [-math.inf, 0.0]
    with pytest.raises(ValueError, match="0 or 1"):
        log_indicator(torch.tensor([0.5]))


# --- command line ----------------------------------------------------------------------------------------------------
def _cli(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return json.loads(out.getvalue())


def test_cli_dpg_prints_the_kl_rl_keys():
    dpg_out = _cli(["lab", "dpg", "--steps", "3", "--mode", "adaptive", "--divergence", "js", "--json"])
    klrl_out = _cli(["lab", "kl-rl", "--steps", "3", "--json"])
    assert set(klrl_out) <= set(dpg_out)
    assert dpg_out["kl_target_policy"] > 0 and "target_kl_target_policy_upper" in dpg_out


def test_cli_qrs_and_gdc_contract():
    q = _cli(["lab", "qrs", "--vocab", "3", "--length", "3", "--beta", "0.3", "--reward", "count:2", "--qrs-beta", "5", "--samples", "20000", "--json"])
    assert abs(q["acceptance_rate"] - q["acceptance_rate_estimate"]) < 0.01 and abs(q["tv"] - q["tv_estimate"]) < 0.01
    assert {"kl_target_sampler"} <= set(q)
    g = _cli(["lab", "gdc", "--feature", "count:2", "--moment", "0.5", "--samples", "512", "--json"])
    assert g["moment"] == pytest.approx(0.5, abs=3 * 0.1)  # sampling error of the fit, see the test above
    assert {"coefficient", "exact_coefficient"} <= set(g)


# --- a transformer with an enumerable support ------------------------------------------------------------------------
GPT_T, GPT_BETA, GPT_PROMPT = 3, 1.0, "a"


@pytest.fixture(scope="module")
def gpt_world():
    """Two tiny random GPT-2s over <pad>, <eos>, <unk>, a, b with 3 new tokens: 85 possible completions."""
    import itertools

    from tilt.engine.hf import HFPolicy, SamplingConfig
    from tilt.engine.tiny import char_tokenizer, tiny_gpt2

    tok = char_tokenizer("ab")
    n_vocab, eos = len(tok), tok.eos_token_id
    sampling = SamplingConfig(max_new_tokens=GPT_T)
    ref = HFPolicy(tiny_gpt2(n_vocab, seed=0), tok, sampling)
    pol = HFPolicy(tiny_gpt2(n_vocab, seed=1), tok, sampling)

    def reward(prompts, completions, **_):
        return [c.count("a") / GPT_T for c in completions]

    target = TiltedTarget(ref=ref, reward=reward, beta=GPT_BETA)
    others = [i for i in range(n_vocab) if i != eos]
    seqs = [list(b) + [eos] for k in range(GPT_T) for b in itertools.product(others, repeat=k)]
    seqs += [list(b) for b in itertools.product(others, repeat=GPT_T)]
    support = ref.rollout_from_ids([GPT_PROMPT] * len(seqs), seqs, samples_per_prompt=len(seqs))
    with torch.no_grad():
        log_pi = pol.token_logprobs(support).sum(-1).double().unsqueeze(0)  # (1, 85)
        log_ref = ref.token_logprobs(support).sum(-1).double().unsqueeze(0)
    assert log_pi.exp().sum().item() == pytest.approx(1.0, abs=1e-5)  # the support is complete
    return dict(ref=ref, pol=pol, target=target, support=support, log_pi=log_pi, log_ref=log_ref, exact=target.exact(support))


@pytest.mark.slow
def test_gpt2_importance_intervals_cover_exact_values(gpt_world):
    """100 seeded groups of 512 samples from pi_ref (off-policy): each 95% interval covers the exact value >= 90 times;
    QRS estimates from the same samples match the exact ones to 0.01."""
    w = gpt_world
    ex, lp = w["exact"], w["log_pi"]
    lt = ex.log_probs.double()
    m = torch.logaddexp(lp, lt) - math.log(2)
    truth = {
        "log_z": ex.log_z.item(),
        "kl_target_policy": exact.kl(lt, lp).item(),
        "kl_policy_target": exact.kl(lp, lt).item(),
        "tv": exact.total_variation(lp, lt).item(),
        "js": (0.5 * exact.kl(lp, m) + 0.5 * exact.kl(lt, m)).item(),
    }
    roll = w["ref"].sample([GPT_PROMPT] * 100, 512, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        log_q = roll.sample_seq_logprobs.double().view(100, 512)
        log_pi = w["pol"].token_logprobs(roll).sum(-1).double().view(100, 512)
        log_p = w["target"].log_weight(roll).double().view(100, 512)
    estimates = {
        "log_z": importance.log_normaliser(log_p, log_q),
        "kl_target_policy": importance.kl_target_policy(log_p, log_q, log_pi),
        "kl_policy_target": importance.kl_policy_target(log_p, log_q, log_pi),
        "tv": importance.total_variation(log_p, log_q, log_pi),
        "js": importance.jensen_shannon(log_p, log_q, log_pi),
    }
    for name, est in estimates.items():
        assert int(est.covers(truth[name]).sum()) >= 90, name
    for qrs_beta in (1.0, 1.5):
        q_exact = qrs_exact(ex.log_weights.double(), w["log_ref"], qrs_beta=qrs_beta)
        q_est = qrs_estimates((log_p - log_q).view(1, -1), qrs_beta=qrs_beta)
        assert abs(q_est["acceptance_rate"].item() - q_exact.acceptance_rate) < 0.01
        assert abs(q_est["tv"].item() - q_exact.tv) < 0.01


def test_gpt2_expected_loss_gradient_is_divergence_gradient(gpt_world):
    """On the transformer, for every f: sum_y q(y) ∇loss(y), weights pi/q, equals ∇D_f(pi || pi*) by enumeration."""
    w = gpt_world
    pol, support, ex = w["pol"], w["support"], w["exact"]
    params = [p for p in pol.parameters()]
    log_q = w["log_ref"].view(-1)  # proposal pi_ref
    log_p = ex.log_weights.double().view(-1)
    for name, fdiv in DIVERGENCES.items():
        tok = pol.token_logprobs(support)  # (85, T) with grad
        log_pi = tok.sum(-1).double()
        log_t = log_density_ratio(log_pi.detach(), log_p, ex.log_z.double())
        weights = importance_weights(log_pi.detach(), log_q)
        loss = (log_q.exp() * f_divergence_loss(tok.double(), pseudo_reward(fdiv.fprime, log_t), weights, support.completion_mask)).sum()
        g_loss = torch.autograd.grad(loss, params)
        g_true = torch.autograd.grad(f_divergence(fdiv, pol.token_logprobs(support).sum(-1).double().unsqueeze(0), ex.log_probs.double()), params)
        for a, b in zip(g_loss, g_true):
            assert torch.allclose(a.double(), b.double(), rtol=1e-3, atol=1e-6), name


@pytest.mark.parametrize("mode", dpg.MODES)
def test_gpt2_dpg_moves_toward_the_posterior(gpt_world, mode):
    """The recipe runs unchanged on a Hugging Face model: 40 steps halve the exact KL(pi* || pi) from pi_ref."""
    from tilt.engine.hf import HFPolicy
    from tilt.engine.tiny import tiny_gpt2

    w = gpt_world
    ref = w["ref"]
    policy = HFPolicy(tiny_gpt2(len(ref.tokenizer), seed=0), ref.tokenizer, ref.sampling)  # starts at pi_ref

    def kl_target_policy():
        with torch.no_grad():
            return exact.kl(w["exact"].log_probs.double(), policy.token_logprobs(w["support"]).sum(-1).double().unsqueeze(0)).item()

    before = kl_target_policy()
    cfg = dpg.DPGConfig(mode=mode, steps=40, prompts_per_step=1, samples_per_prompt=64, lr=1e-2, proposal_update_interval=8, diagnostics_interval=10)
    dpg.train(cfg, policy, w["target"], [GPT_PROMPT])
    assert kl_target_policy() < 0.5 * before


def test_gpt2_tempered_proposal_is_weighted_by_what_was_sampled(gpt_world):
    """A proposal sampled at temperature 1.5: the weights use the tempered log-probs, so log Z is still right."""
    from tilt.engine.hf import HFPolicy, SamplingConfig
    from tilt.posterior import draw_candidates

    w = gpt_world
    hot = HFPolicy(w["ref"].model, w["ref"].tokenizer, SamplingConfig(max_new_tokens=GPT_T, temperature=1.5))
    rollout, log_w = draw_candidates(w["target"], [GPT_PROMPT], 4096, generator=torch.Generator().manual_seed(0), proposal=hot)
    assert not rollout.sampled_from_policy
    est = importance.log_normaliser(log_w, torch.zeros_like(log_w))
    assert abs(est.value.item() - w["exact"].log_z.item()) < 4 * est.stderr.item() < 0.05
