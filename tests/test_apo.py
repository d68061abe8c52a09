"""Regression to pi* with a known normaliser: A*-PO (V* from reference samples) and QRPO (the quantile reward, whose
log Z is closed-form), checked exactly in the lab and run on a tiny Hugging Face model."""
import itertools
import math

import pytest
import torch

from tilt.engine.hf import HFPolicy, SamplingConfig
from tilt.engine.tiny import char_tokenizer, tiny_gpt2
from tilt.lab.bon_distill import ExactCDF, quantile_target_log_probs, run_regression_lab
from tilt.lab.tabular import random_tabular_policy
from tilt.lab.world import TableReward, reward_table
from tilt.math import exact
from tilt.math.bon_target import (
    cdf_bounds,
    quantile_log_normaliser,
    quantile_reward,
    regression_loss,
    sample_cdf_bounds,
    soft_value,
)
from tilt.recipes import apo, qrpo


def test_regression_loss_by_hand_and_zero_at_the_posterior():
    beta = 0.5
    f64 = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    loss = regression_loss(f64(-1.0), f64(-2.0), f64(0.3), f64(0.1), beta=beta)
    assert loss.item() == pytest.approx((0.5 * 1.0 - 0.2) ** 2, rel=1e-12)
    # at pi* = pi_ref exp(r/beta)/Z with V = beta log Z, every sequence's residual is 0
    ref_logp = torch.log_softmax(torch.randn(7, dtype=torch.float64), -1)
    r = torch.rand(7, dtype=torch.float64)
    log_z = torch.logsumexp(ref_logp + r / beta, -1)
    post = ref_logp + r / beta - log_z
    assert regression_loss(post, ref_logp, r, beta * log_z.expand(7), beta=beta).abs().max().item() < 1e-28
    assert regression_loss(ref_logp, ref_logp, r, beta * log_z.expand(7), beta=beta).min().item() > 0


def test_soft_value_is_beta_log_mean_exp():
    r = torch.tensor([[0.0, 1.0, 3.0]], dtype=torch.float64)
    assert soft_value(r, beta=0.5).item() == pytest.approx(0.5 * math.log((1 + math.e**2 + math.e**6) / 3), rel=1e-12)


@pytest.mark.parametrize("beta", [0.05, 0.3, 2.0])
def test_quantile_normaliser_is_exact_with_ties(beta):
    """sum_y pi_ref(y) exp(R(y)/beta) = beta (exp(1/beta) - 1) for a discrete reward with ties, where the paper's plain
    CDF quantile F(r) = P(z <= r) does not give it."""
    probs = torch.tensor([0.1, 0.25, 0.05, 0.3, 0.2, 0.1], dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0, 1.0, 2.0, 0.0, 3.0], dtype=torch.float64)
    below, at = cdf_bounds(rewards, probs)
    z = (probs * (quantile_reward(below, at, beta=beta) / beta).exp()).sum().item()
    closed = beta * math.expm1(1 / beta)
    assert math.log(z) == pytest.approx(quantile_log_normaliser(beta), abs=1e-12)
    assert z == pytest.approx(closed, rel=1e-12)
    plain = (probs * (at / beta).exp()).sum().item()
    assert abs(math.log(plain) - math.log(closed)) > 1e-3


def test_quantile_reward_is_the_cdf_without_ties():
    f = torch.tensor([0.2, 0.9], dtype=torch.float64)
    assert torch.allclose(quantile_reward(f - 1e-13, f, beta=0.1), f, atol=1e-11)
    assert quantile_reward(f - 0.1, f, beta=0.1).sub(f).lt(0).all()  # a tie class lowers it inside [F-, F]


def test_sampled_quantile_normaliser_is_exact_over_calibration_draws():
    """Counting y as an (m+1)-th draw, E over m calibration rewards and y ~ pi_ref of exp(R/beta) is beta (e^(1/beta) - 1)
    exactly: enumerate every (z_1, z_2, z_3, y)."""
    probs, rewards, beta, m = [0.4, 0.35, 0.25], [0.0, 1.0, 1.0], 0.3, 3
    total = 0.0
    for tup in itertools.product(range(3), repeat=m + 1):
        below, at = sample_cdf_bounds(torch.tensor([[rewards[tup[m]]]]), torch.tensor([[rewards[i] for i in tup[:m]]]))
        total += math.prod(probs[i] for i in tup) * (quantile_reward(below, at, beta=beta) / beta).exp().item()
    assert math.log(total) == pytest.approx(quantile_log_normaliser(beta), abs=1e-12)


# --- the lab: training reaches pi* --------------------------------------------------------------------------------------

BETA = 0.5


def world():
    ref = random_tabular_policy(3, 2, 2, seed=1)
    table = reward_table("random", 3, 2, 2, reward_seed=2)
    return ref, table, TableReward(table, 3, 2)


@pytest.mark.slow
def test_apo_with_exact_values_reaches_the_posterior():
    """A*-PO with beta_1 = beta_2 and the exact V*(x) = beta log Z(x): KL to pi* below 1e-6 (the per-sample gradient
    vanishes at pi*, so Adam converges to it with no noise floor)."""
    report = run_regression_lab("apo", beta=BETA, seed=1)
    assert report["kl_target_policy"] < 1e-6 and report["kl_policy_target"] < 1e-6, report
    assert report["residual_abs_last"] < 1e-3 < report["residual_abs_first"]


@pytest.mark.slow
def test_apo_with_sampled_values_stops_short_of_the_posterior():
    """V* from m = 8 reference samples (stage 1) is biased, so the fixed point is near pi* but not at it: the exact KL
    is far above the exact-V* run's 1e-6 and well below the reference's."""
    report = run_regression_lab("apo", beta=BETA, seed=1, value_samples=8)
    assert 1e-5 < report["kl_target_policy"] < 0.5 * report["start_kl_target_policy"], report


@pytest.mark.slow
@pytest.mark.parametrize("sampling", ["reference", "policy"])
def test_qrpo_reaches_the_quantile_posterior(sampling):
    """QRPO with the exact CDF of a world with tied rewards: log Z is the closed form, and training reaches
    pi* ∝ pi_ref exp(R/beta) to 1e-6 in KL, from reference (offline) or policy samples."""
    ref = random_tabular_policy(3, 2, 2, seed=3)
    table = (reward_table("random", 3, 2, 2, reward_seed=4) * 3).floor()  # the run's world: ties
    target = quantile_target_log_probs(ref, table, BETA)
    assert torch.allclose(target.exp().sum(-1), torch.ones(2, dtype=torch.float64), atol=1e-12)  # the closed-form Z normalises
    report = run_regression_lab("qrpo", beta=BETA, seed=3, levels=3, sampling=sampling)
    assert report["target_kl_ref"] == pytest.approx(exact.kl(target, ref.support_logprobs().detach()).item(), abs=1e-12)
    assert report["kl_target_policy"] < 1e-6 and report["kl_policy_target"] < 1e-6, report


def test_regression_micro_batching_does_not_change_the_update():
    ref, table, reward = world()
    results = []
    for micro in (0, 5):
        policy = ref.copy()
        cfg = qrpo.QRPOConfig(beta=BETA, steps=1, prompts_per_step=2, samples_per_prompt=10, lr=0.1, optimizer="sgd", micro_batch_size=micro)
        qrpo.train(cfg, policy, ref, reward, [0, 1], cdf=ExactCDF(ref, table))
        results.append(policy.logits.detach().clone())
    assert torch.allclose(results[0], results[1], atol=1e-12)
    assert not torch.allclose(results[0], ref.logits)


def test_configs_reject_bad_values():
    with pytest.raises(ValueError, match="value_beta"):
        apo.APOConfig(value_beta=0.0)
    with pytest.raises(ValueError, match="sampling"):
        qrpo.QRPOConfig(sampling="both")
    with pytest.raises(ValueError, match="optimizer"):
        apo.APOConfig(optimizer="adam")
    with pytest.raises(ValueError, match="prompts_per_step"):
        qrpo.QRPOConfig(prompts_per_step=0)
    assert apo.num_steps(apo.APOConfig(steps=5)) == 5 and qrpo.num_steps(qrpo.QRPOConfig(steps=9)) == 9


# --- a tiny Hugging Face model ------------------------------------------------------------------------------------------

PROMPTS = ["hello", "the cat"]


def share_of_a(prompts, completions):
    return [c.count("a") / max(len(c), 1) for c in completions]


@pytest.mark.parametrize("recipe,cfg", [
    (apo, apo.APOConfig(steps=2, prompts_per_step=2, samples_per_prompt=2, value_samples=4, lr=1e-3)),
    (qrpo, qrpo.QRPOConfig(steps=2, prompts_per_step=2, samples_per_prompt=2, calibration_samples=4, lr=1e-3)),
    (qrpo, qrpo.QRPOConfig(sampling="policy", steps=2, prompts_per_step=2, samples_per_prompt=2, calibration_samples=4, lr=1e-3)),
])
def test_runs_on_a_tiny_hf_model(recipe, cfg):
    tok = char_tokenizer()
    policy = HFPolicy(tiny_gpt2(len(tok)), tok, SamplingConfig(max_new_tokens=6))
    ref = HFPolicy(tiny_gpt2(len(tok)), tok, SamplingConfig(max_new_tokens=6))
    before = [p.detach().clone() for p in policy.parameters()]
    history = []
    recipe.train(cfg, policy, ref, share_of_a, PROMPTS, on_step=lambda s, m: history.append(m))
    assert len(history) == 2 and all(math.isfinite(v) for m in history for v in m.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_lab_command_json(capsys):
    import json

    from tilt.cli import main

    assert main(["lab", "regress", "--method", "qrpo", "--levels", "3", "--steps", "3", "--batch", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kl_target_policy"] < out["start_kl_target_policy"]
    assert out["residual_abs_last"] < out["residual_abs_first"]
