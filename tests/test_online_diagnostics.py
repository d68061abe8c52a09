"""Online DPO's target diagnostics: with a Bradley-Terry oracle of scale s, each step estimates how far the policy is
from pi* ∝ pi_ref exp(s r / beta), on the tabular lab where pi* and log Z are exact."""
from dataclasses import replace

import pytest
import torch

from tilt.lab.tabular import TabularPolicy, random_tabular_policy
from tilt.lab.world import TableReward
from tilt.math import importance
from tilt.math.masking import masked_sum
from tilt.preferences import BradleyTerry, Judge, RewardComparison
from tilt.recipes import online_dpo
from tilt.recipes.common import derive_seed, prompt_indices, step_prompt_seeds

V, L, C = 3, 2, 2  # vocabulary, length, contexts: 9 sequences per context
PROMPTS = [0, 1]


def world(seed: int = 0):
    ref = random_tabular_policy(V, L, contexts=C, seed=seed)
    table = torch.rand(C, V**L, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64) * 2
    return ref, table, TableReward(table, V, L)


def exact_target(ref, table, *, scale: float, beta: float):
    """(log pi*, log Z) per context, by enumeration: pi* ∝ ref exp(scale * r / beta)."""
    with torch.no_grad():
        log_p = ref.support_logprobs() + scale * table / beta
    log_z = log_p.logsumexp(-1, keepdim=True)
    return log_p - log_z, log_z.squeeze(-1)


def run(policy, ref, oracle, *, scheme="online-dpo", steps=3, prompts_per_step=32, beta=0.5, lr=0.0, regime="streaming"):
    config = online_dpo.OnlineDPOConfig(scheme=scheme, alpha=0.0, beta=beta, steps=steps, prompts_per_step=prompts_per_step,
                                        lr=lr, optimizer="sgd", regime=regime)
    log = []
    online_dpo.train(config, policy, ref, oracle, PROMPTS, on_step=lambda s, m: log.append(m))
    return config, log


def test_bradley_terry_returns_the_labels_of_a_call_and_the_latent_rewards():
    _, table, reward = world()
    ref = random_tabular_policy(V, L, contexts=C, seed=3)
    a, b = ref.sample([0, 1] * 20, 1, generator=torch.Generator().manual_seed(1)), ref.sample([0, 1] * 20, 1, generator=torch.Generator().manual_seed(2))
    oracle = BradleyTerry(reward, scale=2.0)
    labels = oracle(a.prompts, a.completions, b.completions, generator=torch.Generator().manual_seed(7))
    again, r_a, r_b = oracle.labels_and_rewards(a.prompts, a.completions, b.completions, generator=torch.Generator().manual_seed(7))
    assert torch.equal(labels, again) and 0 < labels.mean() < 1
    assert torch.equal(r_a, reward(a.prompts, a.completions)) and torch.equal(r_b, reward(b.prompts, b.completions))
    assert not torch.equal(r_a, r_b)


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_a_policy_equal_to_the_target_has_zero_divergence_and_full_ess(scale):
    ref, table, reward = world()
    log_star, log_z = exact_target(ref, table, scale=scale, beta=0.5)
    star = TabularPolicy.from_sequence_logprobs(V, L, log_star)
    _, log = run(star, ref, BradleyTerry(reward, scale=scale))  # lr = 0: pi_t = pi* at every step
    for m in log:
        assert m["target_ess_fraction"] == pytest.approx(1.0, abs=1e-9) and m["target_ess"] == pytest.approx(2.0, abs=1e-9)
        assert m["target_log_z"] == pytest.approx(log_z.mean().item(), abs=1e-9)
        for key in ("kl_target_policy", "kl_policy_target", "tv", "js"):
            assert m[f"target_{key}"] == pytest.approx(0.0, abs=1e-9), key
    # the same policy under an oracle of another scale is away from that oracle's target: the scale enters pi*
    _, log = run(star, ref, BradleyTerry(reward, scale=2 * scale))
    assert all(m["target_kl_target_policy"] > 1e-3 and m["target_ess_fraction"] < 0.999 for m in log)


def test_logged_diagnostics_are_those_of_the_steps_own_samples():
    ref, table, reward = world()
    policy = random_tabular_policy(V, L, contexts=C, seed=5)
    config, log = run(policy, ref, BradleyTerry(reward, scale=1.5), steps=2, prompts_per_step=8)
    for step, m in enumerate(log):  # lr = 0: the policy is the same, and a step's samples are a function of the step
        batch = [PROMPTS[i] for i in prompt_indices(len(PROMPTS), step, 8, config.seed)]
        both = policy.sample(batch, 2, prompt_seeds=step_prompt_seeds(config.seed, step, range(8)))  # (2P,), grouped
        with torch.no_grad():
            log_pi = masked_sum(policy.token_logprobs(both), both.completion_mask).view(8, 2)
            log_ref = masked_sum(ref.token_logprobs(both), both.completion_mask).view(8, 2)
        rewards = reward(both.prompts, both.completions).view(8, 2)
        expected = importance.diagnostics(log_ref + 1.5 * rewards / 0.5, log_pi, log_pi)
        assert set(m) >= {f"target_{k}" for k in expected}
        for key, value in expected.items():
            assert m[f"target_{key}"] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        assert m["target_kl_target_policy"] > 0


def test_the_reference_itself_gives_log_z_estimates_consistent_with_the_exact_one():
    ref, table, reward = world()
    _, log_z = exact_target(ref, table, scale=1.0, beta=0.5)
    _, log = run(ref.copy(), ref, BradleyTerry(reward, scale=1.0), steps=20, prompts_per_step=64)
    estimates = torch.tensor([m["target_log_z"] for m in log], dtype=torch.float64)  # each a mean over 64 prompts
    # with pi = pi_ref, w = exp(r / beta) and a prompt's estimate is log((w1 + w2)/2), y1, y2 ~ pi_ref: its exact mean,
    # by enumerating the pairs, lies below log Z (Jensen: K = 2 is few); the step means must scatter around it
    with torch.no_grad():
        log_ref = ref.support_logprobs()  # (C, N)
    log_w = table / 0.5
    pair_logp = log_ref.unsqueeze(-1) + log_ref.unsqueeze(-2)  # (C, N, N)
    pair_est = torch.logaddexp(log_w.unsqueeze(-1), log_w.unsqueeze(-2)) - torch.log(torch.tensor(2.0, dtype=torch.float64))
    expected = (pair_logp.exp() * pair_est).sum((-1, -2)).mean().item()
    assert log_z.mean().item() - expected > 0.1  # the bias is there to see
    se = estimates.std().item() / len(estimates) ** 0.5
    assert abs(estimates.mean().item() - expected) < 4 * se, (estimates.mean().item(), expected, se)
    assert all(m["target_kl_policy_target"] > 0 and 0.5 <= m["target_ess_fraction"] <= 1 for m in log)


@pytest.mark.parametrize("scheme,oracle", [("online-dpo", "comparison"), ("online-dpo", "judge"), ("pairs", "comparison"), ("xpo", "judge")])
def test_nothing_is_logged_without_a_finite_target(scheme, oracle):
    ref, _, reward = world()
    oracles = {"comparison": RewardComparison(reward), "judge": Judge(lambda p, a, b: "a")}
    _, log = run(ref.copy(), ref, oracles[oracle], scheme=scheme, steps=2, prompts_per_step=4)
    assert log and not any(key.startswith("target_") for m in log for key in m)


def mixture_estimates(log_pi, log_ref, table, *, scale: float, beta: float):
    """Every pair (y, y~) of each context enumerated, y ~ pi and y~ ~ pi_ref, as (C, N, N, 2) log P, log q, log pi with
    the mixture proposal q = (pi + pi_ref)/2, and the pair's probability pi(y) pi_ref(y~) (C, N, N)."""
    n = log_pi.shape[-1]

    def pair(x):  # (C, N) -> (C, N, N, 2): [x(y), x(y~)]
        return torch.stack([x.unsqueeze(-1).expand(-1, n, n), x.unsqueeze(-2).expand(-1, n, n)], -1)

    log_p, lp, lr = pair(log_ref + scale * table / beta), pair(log_pi), pair(log_ref)
    log_q = torch.logaddexp(lp, lr) - torch.log(torch.tensor(2.0, dtype=torch.float64))
    return log_p, log_q, lp, (log_pi.unsqueeze(-1) + log_ref.unsqueeze(-2)).exp()


@pytest.mark.parametrize("scheme", ["pairs", "xpo"])
def test_pairs_with_the_target_policy_estimate_kl_as_the_error_of_log_z_and_agree_with_enumeration(scheme):
    ref, table, reward = world()
    scale, beta = 1.5, 0.5
    log_star, log_z = exact_target(ref, table, scale=scale, beta=beta)
    star = TabularPolicy.from_sequence_logprobs(V, L, log_star)
    _, log = run(star, ref, BradleyTerry(reward, scale=scale), scheme=scheme, steps=20, prompts_per_step=64, beta=beta)
    # pi = pi*: P/pi = Z, so each sample's KL(pi* || pi) term is u (log Z - log Z-hat) and the estimate is exactly the
    # error of the log Z one; the mixture weights P/q are not constant (ESS < 2), so that error is not 0. Each step
    # holds every prompt equally often (64 draws of 2 prompts, by epochs), so its mean log Z is log_z.mean().
    for m in log:
        assert m["target_kl_target_policy"] + m["target_log_z"] == pytest.approx(log_z.mean().item(), abs=1e-9)
        assert m["target_ess"] < 2 - 1e-3 and abs(m["target_kl_target_policy"]) > 1e-6
    with torch.no_grad():
        log_p, log_q, log_pi, prob = mixture_estimates(star.support_logprobs(), ref.support_logprobs(), table, scale=scale, beta=beta)
    # the balance heuristic's Z-hat = [P(y)/q(y) + P(y~)/q(y~)]/2 is unbiased: its exact mean over the pairs is Z
    z_hat = (log_p - log_q).exp().mean(-1)  # (C, N, N)
    assert torch.allclose((prob * z_hat).sum((-1, -2)), log_z.exp(), rtol=1e-12)
    # each logged estimate's step means scatter around its exact expectation over the pairs (bias included)
    estimators = {"log_z": lambda: importance.log_normaliser(log_p, log_q),
                  "kl_target_policy": lambda: importance.kl_target_policy(log_p, log_q, log_pi),
                  "kl_policy_target": lambda: importance.kl_policy_target(log_p, log_q, log_pi),
                  "tv": lambda: importance.total_variation(log_p, log_q, log_pi)}
    for key, estimator in estimators.items():
        expected = (prob * estimator().value).sum((-1, -2)).mean().item()
        estimates = torch.tensor([m[f"target_{key}"] for m in log], dtype=torch.float64)
        se = estimates.std().item() / len(estimates) ** 0.5
        assert abs(estimates.mean().item() - expected) < 4 * se, (key, estimates.mean().item(), expected, se)
    assert log_z.mean().item() - (prob * importance.log_normaliser(log_p, log_q).value).sum((-1, -2)).mean().item() > 0  # Jensen


@pytest.mark.parametrize("scheme,regime,refit_steps", [("pairs", "streaming", 1), ("xpo", "cumulative", 2)])
def test_logged_pairs_diagnostics_are_those_of_the_mixture_with_the_policy_before_its_update(scheme, regime, refit_steps):
    ref, table, reward = world()
    policy = random_tabular_policy(V, L, contexts=C, seed=5)
    config = online_dpo.OnlineDPOConfig(scheme=scheme, alpha=0.1 if scheme == "xpo" else 0.0, beta=0.5, steps=3, prompts_per_step=8,
                                        lr=0.5, optimizer="sgd", regime=regime, refit_steps=refit_steps)
    optimizer, stored = None, [] if regime == "cumulative" else None
    for step in range(config.steps):  # one step at a time (a resumed run), to keep the policy of before each update
        before = policy.copy()
        log = []
        optimizer = online_dpo.train(replace(config, steps=step + 1), policy, ref, BradleyTerry(reward, scale=1.5), PROMPTS,
                                     optimizer=optimizer, start_step=step, stored=stored, on_step=lambda s, m: log.append(m))
        (m,) = log
        batch = [PROMPTS[i] for i in prompt_indices(len(PROMPTS), step, 8, config.seed)]
        seeds = step_prompt_seeds(config.seed, step, range(8))
        a = before.sample(batch, 1, prompt_seeds=seeds)
        b = ref.sample(batch, 1, prompt_seeds=[derive_seed(s, "reference") for s in seeds])
        rewards = torch.stack([reward(a.prompts, a.completions), reward(b.prompts, b.completions)], -1)  # (8, 2)

        def by_hand(pi):
            with torch.no_grad():
                log_pi = torch.stack([masked_sum(pi.token_logprobs(r), r.completion_mask) for r in (a, b)], -1)  # (8, 2)
                log_ref = torch.stack([masked_sum(ref.token_logprobs(r), r.completion_mask) for r in (a, b)], -1)
            log_q = torch.logaddexp(log_pi, log_ref) - torch.log(torch.tensor(2.0, dtype=torch.float64))
            return importance.diagnostics(log_ref + 1.5 * rewards / 0.5, log_q, log_pi)

        expected = by_hand(before)
        assert set(m) >= {f"target_{k}" for k in expected}
        for key, value in expected.items():
            assert m[f"target_{key}"] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        after = by_hand(policy)  # the update moved the policy: its log-probs would give other values
        assert abs(after["kl_target_policy"] - m["target_kl_target_policy"]) > 1e-6


def test_pairs_diagnostics_need_the_policy_log_prob_of_the_reference_sample():
    ref, _, reward = world()
    config = online_dpo.OnlineDPOConfig(scheme="pairs", alpha=0.0, prompts_per_step=4)
    pairs = online_dpo.collect_pairs(config, ref.copy(), ref, BradleyTerry(reward), [0, 1, 0, 1], [1, 2, 3, 4], torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="ref_sample_logprob"):
        online_dpo.target_diagnostics(pairs, scale=1.0, beta=0.5)


def test_cumulative_regime_logs_the_fresh_pairs_diagnostics_while_training():
    ref, table, reward = world()
    log_star, _ = exact_target(ref, table, scale=1.0, beta=0.5)
    policy = ref.copy()
    _, log = run(policy, ref, BradleyTerry(reward, scale=1.0), steps=30, prompts_per_step=32, lr=0.5, regime="cumulative")
    # with K = 2 the self-normalised estimates sit well below the exact KL (module docstring of the recipe), so only
    # their trend is checked: the mean of the first five steps against the last five
    first, last = (sum(m["target_kl_target_policy"] for m in part) / 5 for part in (log[:5], log[-5:]))
    with torch.no_grad():
        exact_start = (log_star.exp() * (log_star - ref.support_logprobs())).sum(-1).mean().item()
        exact_end = (log_star.exp() * (log_star - policy.support_logprobs())).sum(-1).mean().item()
    assert exact_end < exact_start and last < first  # training toward pi* lowers both the exact and the estimated KL
