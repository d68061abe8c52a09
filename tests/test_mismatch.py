"""Samples from a proposal q that is not the policy pi, corrected by pi/q (tilt.math.mismatch, tilt.recipes.kl_rl).

Exact tier: by enumeration of every group of K samples of a tiny world, the corrected step's expected gradient
equals the on-policy step's; the full-vocabulary KL penalty (``kl_penalty=full``) gives the same expected step as
k1 in the reward, with less variance. Lab tier: a sampler that perturbs the policy's logits with fixed noise, with the
correction, still trains the policy to pi*; without it, the same run lands elsewhere.
"""
import dataclasses
import itertools

import pytest
import torch

from tilt.lab.tabular import TabularPolicy, random_tabular_policy
from tilt.lab.world import TableReward, exact_report, reward_table
from tilt.math import mismatch
from tilt.math.pg import leave_one_out_advantage
from tilt.recipes import kl_rl


class PerturbedSampler:
    """A tabular policy trained as usual whose samples come from q = softmax(its logits + fixed noise): a proposal
    near the policy, like a reduced-precision copy, with log q recorded in the rollout."""

    def __init__(self, policy: TabularPolicy, noise: torch.Tensor):
        self.policy, self.noise = policy, noise

    def parameters(self):
        return self.policy.parameters()

    def token_logprobs(self, rollout):
        return self.policy.token_logprobs(rollout)

    def proposal(self) -> TabularPolicy:
        p = self.policy
        return TabularPolicy(p.vocab, p.length, p.contexts, p.logits.detach() + self.noise)

    def sample(self, prompts, samples_per_prompt, *, generator=None, prompt_seeds=None):
        rollout = self.proposal().sample(prompts, samples_per_prompt, generator=generator, prompt_seeds=prompt_seeds)
        return dataclasses.replace(rollout, sampled_from_policy=False, sampler="perturbed")


class FixedGroup:
    """A policy whose ``sample`` returns one given group of completions (for enumerating every group exactly)."""

    def __init__(self, policy: TabularPolicy, rollout):
        self.policy, self.rollout = policy, rollout

    def parameters(self):
        return self.policy.parameters()

    def token_logprobs(self, rollout):
        return self.policy.token_logprobs(rollout)

    def token_log_softmax(self, rollout):
        return self.policy.token_log_softmax(rollout)

    def sample(self, prompts, samples_per_prompt, *, generator=None, prompt_seeds=None):
        return self.rollout


def expected_step(policy, ref, table, sampler_logp, config, *, on_policy, second_moment=False):
    """E over every group of K samples drawn from ``sampler_logp`` (V^L,) of the change one SGD step (lr 1) makes
    to the policy's logits: minus the expected gradient of the recipe's loss. With ``second_moment``, also
    E[||change||^2], so that the variance of the step is E||change||^2 - ||E change||^2."""
    k = config.samples_per_prompt
    support = policy.all_sequences()  # (N, L)
    reward = TableReward(table, policy.vocab, policy.length)
    total = torch.zeros_like(policy.logits)
    square = 0.0
    for group in itertools.product(range(support.shape[0]), repeat=k):
        trial = policy.copy()
        ids = support[list(group)]  # (K, L)
        base = trial._rollout(torch.zeros(k, dtype=torch.long), ids, torch.zeros(ids.shape, dtype=torch.float64), k)
        q_tok = trial.token_logprobs(base).detach() if on_policy else token_logprobs_of(sampler_logp, policy, ids)
        rollout = dataclasses.replace(base, sample_token_logprobs=q_tok, sampled_from_policy=on_policy,
                                      sampler="exact" if on_policy else "perturbed")
        opt = torch.optim.SGD(trial.parameters(), lr=1.0)
        kl_rl.kl_rl_step(config, FixedGroup(trial, rollout), ref, reward, [0], opt, prompt_seeds=[0])
        prob = sampler_logp[list(group)].sum().exp()
        change = trial.logits.detach() - policy.logits.detach()
        total += prob * change
        square += prob * change.square().sum().item()
    return (total, square) if second_moment else total


def token_logprobs_of(seq_logp, policy, ids):
    """Per-token log-probs of the sequences ``ids`` under the distribution ``seq_logp`` over the support, as a
    tabular policy (the sequence sums are what matter)."""
    q = TabularPolicy.from_sequence_logprobs(policy.vocab, policy.length, seq_logp.view(1, -1))
    return q.token_logprobs(q._rollout(torch.zeros(ids.shape[0], dtype=torch.long), ids, torch.zeros(ids.shape, dtype=torch.float64), 1)).detach()


@pytest.mark.parametrize("kl_penalty,estimator", [("reward", "k1"), ("loss", "k2"), ("full", "k1")])
def test_corrected_gradient_equals_the_on_policy_gradient_in_expectation(kl_penalty, estimator):
    """Untruncated weights: E_q[step] = E_pi[step] exactly; truncated at cap 1 it is not (the bias the docs state)."""
    ref = random_tabular_policy(2, 2, seed=1)
    policy = random_tabular_policy(2, 2, seed=2, scale=0.7)
    table = reward_table("random", 2, 2, reward_seed=3)
    noise = 0.5 * torch.randn(policy.logits.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    q_logp = TabularPolicy(2, 2, 1, policy.logits.detach() + noise).support_logprobs()[0]  # (4,)
    pi_logp = policy.support_logprobs()[0].detach()
    assert (q_logp - pi_logp).abs().max() > 0.1  # a real mismatch

    def config(weighting, cap):
        return kl_rl.KLRLConfig(beta=0.3, steps=1, prompts_per_step=1, samples_per_prompt=2, lr=1.0, optimizer="sgd",
                                kl_penalty=kl_penalty, kl_estimator=estimator, importance_weighting=weighting, importance_cap=cap)

    on_policy = expected_step(policy, ref, table, pi_logp, config("truncated", 2.0), on_policy=True)
    corrected = expected_step(policy, ref, table, q_logp, config("truncated", 1e9), on_policy=False)
    uncorrected = expected_step(policy, ref, table, q_logp, config("none", 2.0), on_policy=False)
    capped = expected_step(policy, ref, table, q_logp, config("truncated", 1.0), on_policy=False)
    assert on_policy.abs().max() > 1e-3
    assert torch.allclose(corrected, on_policy, atol=1e-12, rtol=1e-9)
    assert (uncorrected - on_policy).abs().max() > 1e-3
    assert (capped - on_policy).abs().max() > 1e-3


@pytest.mark.parametrize("micro_batch_size", [0, 1])
def test_full_vocabulary_kl_gives_the_exact_gradient_with_less_variance(micro_batch_size):
    """kl_penalty=full (sum_t KL_t in the reward plus its pathwise gradient) has the same expected step as k1 in the
    reward, the exact gradient of E[r] - beta KL, whether its passes are shared (one micro-batch) or recomputed
    (micro-batches of one). Its step's variance is lower here, where the KL matters (beta 1, rewards in [0, 0.1))."""
    ref = random_tabular_policy(2, 3, seed=1)
    policy = random_tabular_policy(2, 3, seed=2, scale=1.5)
    table = 0.1 * reward_table("random", 2, 3, reward_seed=3)
    pi_logp = policy.support_logprobs()[0].detach()

    def config(kl_penalty, beta=1.0):
        return kl_rl.KLRLConfig(beta=beta, steps=1, prompts_per_step=1, samples_per_prompt=2, lr=1.0, optimizer="sgd",
                                kl_penalty=kl_penalty, micro_batch_size=micro_batch_size)

    exact, exact_sq = expected_step(policy, ref, table, pi_logp, config("reward"), on_policy=True, second_moment=True)
    full, full_sq = expected_step(policy, ref, table, pi_logp, config("full"), on_policy=True, second_moment=True)
    assert exact.abs().max() > 1e-2
    assert torch.allclose(full, exact, atol=1e-12, rtol=1e-9)
    reward_only = expected_step(policy, ref, table, pi_logp, config("reward", beta=0.0), on_policy=True)
    assert (exact - reward_only).abs().max() > 1e-2  # the KL's share of the step is not negligible
    var_exact, var_full = exact_sq - exact.square().sum().item(), full_sq - full.square().sum().item()
    print(f"variance of the step: k1 in the reward {var_exact:.4g}, full {var_full:.4g}")
    assert var_full < 0.8 * var_exact, (var_full, var_exact)


def test_weights_and_baseline():
    log_w = torch.tensor([[0.0, 0.0, 0.0], [0.5, -1.0, 2.0]], dtype=torch.float64)
    values = torch.tensor([[1.0, 2.0, 6.0], [1.0, 2.0, 6.0]], dtype=torch.float64)
    sn = mismatch.self_normalised_weights(log_w)
    assert torch.allclose(sn.mean(-1), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(mismatch.truncated_weights(log_w, cap=2.0)[1], torch.tensor([0.5, -1.0, 2.0]).double().exp().clamp(max=2.0))
    ones = torch.ones_like(values)
    assert torch.allclose(mismatch.weighted_leave_one_out_advantage(values, ones), leave_one_out_advantage(values))
    w = log_w.exp()
    a = mismatch.weighted_leave_one_out_advantage(values, w)
    # by hand, sample 0 of group 1: 1 - (w1*2 + w2*6)/(w1 + w2)
    assert torch.isclose(a[1, 0], 1 - (w[1, 1] * 2 + w[1, 2] * 6) / (w[1, 1] + w[1, 2]))
    assert mismatch.kl_proposal_policy(log_w)[1].item() == pytest.approx(-(0.5 - 1.0 + 2.0) / 3)
    assert mismatch.ess_fraction(log_w)[0].item() == pytest.approx(1.0)
    assert mismatch.ess_fraction(log_w)[1].item() < 0.8
    assert mismatch.truncated_fraction(log_w, cap=2.0)[1].item() == pytest.approx(1 / 3)


def run_perturbed_lab(weighting: str, steps: int):
    vocab, length, beta = 3, 3, 0.3
    ref = random_tabular_policy(vocab, length, seed=0)
    policy = ref.copy()
    table = reward_table("random", vocab, length, reward_seed=1)
    noise = 0.4 * torch.randn(policy.logits.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    sampler = PerturbedSampler(policy, noise)
    config = kl_rl.KLRLConfig(beta=beta, steps=steps, prompts_per_step=1, samples_per_prompt=64, lr=0.05, lr_schedule="linear",
                              kl_penalty="loss", kl_estimator="k2", importance_weighting=weighting, importance_cap=50.0)
    logged = []
    kl_rl.train(config, sampler, ref, TableReward(table, vocab, length), [0], on_step=lambda s, m: logged.append(m))
    return exact_report(policy, ref, table, beta), logged


@pytest.mark.slow
def test_perturbed_sampler_reaches_the_target_only_with_the_correction():
    corrected, logged = run_perturbed_lab("truncated", 600)
    uncorrected, _ = run_perturbed_lab("none", 600)
    assert corrected["kl_target_policy"] < 1e-3, corrected
    assert uncorrected["kl_target_policy"] > 1e-2, uncorrected
    assert all(m["sampler/kl_q_pi"] > 0 for m in logged[-10:])
    assert all(0 < m["sampler/ess_fraction"] < 1 for m in logged[-10:])
