"""The tensor math against values derived by hand and against exact enumeration in the lab."""
import math

import pytest
import torch

from tilt.lab.tabular import TabularPolicy, random_tabular_policy
from tilt.lab.world import TableReward, reward_table
from tilt.math import exact
from tilt.math.kl import k1, k2, k3, sequence_kl, token_kl
from tilt.math.masking import completion_mask_from_eos, masked_sum
from tilt.math.pg import kl_shaped_reward, leave_one_out_advantage, ppo_clip_loss, reinforce_loss
from tilt.math.target import kl_regularised_value, log_normaliser, tilted_log_weight
from tilt.target import TiltedTarget


def test_kl_estimators_by_hand():
    lr = torch.tensor([0.0, math.log(2.0), -1.0])
    assert torch.allclose(k1(lr), lr)
    assert torch.allclose(k2(lr), torch.tensor([0.0, 0.5 * math.log(2.0) ** 2, 0.5]))
    # k3 = rho - 1 - log rho, rho = exp(-lr)
    assert torch.allclose(k3(lr), torch.tensor([0.0, 0.5 - 1 + math.log(2.0), math.e - 1 - 1.0]))
    assert (k3(torch.linspace(-5, 5, 101)) >= 0).all()


def test_eos_mask_convention():
    ids = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 0, 0, 0]])
    mask, truncated = completion_mask_from_eos(ids, torch.tensor([1]))
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True], [True, False, False, False]]
    assert truncated.tolist() == [False, True, False]
    assert masked_sum(torch.ones(3, 4), mask).tolist() == [2.0, 4.0, 1.0]


def test_leave_one_out_by_hand():
    r = torch.tensor([[1.0, 2.0, 6.0]])
    assert torch.allclose(leave_one_out_advantage(r), torch.tensor([[1 - 4.0, 2 - 3.5, 6 - 1.5]]))
    assert (leave_one_out_advantage(torch.full((2, 5), 0.7)) == 0).all()
    with pytest.raises(ValueError):
        leave_one_out_advantage(torch.ones(3, 1))


def test_shaped_reward_by_hand():
    out = kl_shaped_reward(torch.tensor([1.0]), torch.tensor([-2.0]), torch.tensor([-3.0]), beta=0.5)
    assert out.item() == pytest.approx(1.0 - 0.5 * 1.0)


def test_ppo_first_epoch_equals_reinforce_and_clip_stops_gradient():
    torch.manual_seed(0)
    logp = torch.randn(4, 5, requires_grad=True)
    mask = torch.rand(4, 5) > 0.3
    adv = torch.randn(4)
    g1 = torch.autograd.grad(reinforce_loss(logp, adv, mask).sum(), logp)[0]
    loss, frac = ppo_clip_loss(logp, logp.detach(), adv, mask, clip_eps=0.2)
    g2 = torch.autograd.grad(loss.sum(), logp)[0]
    assert torch.allclose(g1, g2)
    assert (frac == 0).all()
    # a ratio far above 1 + eps with a positive advantage contributes no gradient
    old = logp.detach() - 1.0
    loss, frac = ppo_clip_loss(logp, old, torch.ones(4), mask, clip_eps=0.2)
    assert torch.autograd.grad(loss.sum(), logp)[0].abs().max() == 0
    assert torch.allclose(frac[mask.any(-1)], torch.ones(int(mask.any(-1).sum())))


def lab_world(seed, vocab=3, length=3, contexts=2, beta=0.3):
    ref = random_tabular_policy(vocab, length, contexts, seed=seed)
    table = reward_table("random", vocab, length, contexts, reward_seed=seed + 100)
    target = TiltedTarget(ref=ref, reward=TableReward(table, vocab, length), beta=beta).exact(ref.enumerate())
    return ref, table, target


@pytest.mark.parametrize("seed", range(5))
def test_kl_identity_for_random_policies(seed):
    beta = [0.1, 0.3, 1.0, 2.5, 0.05][seed]
    ref, table, target = lab_world(seed, beta=beta)
    for s in range(3):
        pi = random_tabular_policy(3, 3, 2, seed=1000 + 10 * seed + s, scale=2.0).support_logprobs().detach()
        j = kl_regularised_value(pi, ref.support_logprobs().detach(), table, beta=beta)
        lhs = j + beta * exact.kl(pi, target.log_probs)
        assert lhs.item() == pytest.approx(beta * target.log_z.mean().item(), abs=1e-9)
    # closed forms of digest §1.1 at pi = pi*
    ref_logp = ref.support_logprobs().detach()
    e_r = (target.log_probs.exp() * table).sum(-1)
    kl_star_ref = (target.log_probs.exp() * (target.log_probs - ref_logp)).sum(-1)
    assert torch.allclose(e_r - beta * kl_star_ref, beta * target.log_z, atol=1e-12)
    assert torch.allclose(kl_star_ref, e_r / beta - target.log_z, atol=1e-12)


def test_tilted_target_matches_brute_force():
    ref, table, target = lab_world(7, contexts=1, beta=0.4)
    logw = ref.support_logprobs().detach() + table / 0.4
    p = logw.exp() / logw.exp().sum(-1, keepdim=True)
    assert torch.allclose(target.log_probs.exp(), p, atol=1e-12)
    assert torch.allclose(target.log_z, log_normaliser(tilted_log_weight(ref.support_logprobs().detach(), table, beta=0.4)))
    with pytest.raises(ValueError):
        TiltedTarget(ref=ref, reward=TableReward(table, 3, 3), beta=0.0)


def test_tabular_from_sequence_logprobs_roundtrip():
    _, _, target = lab_world(3)
    pi = TabularPolicy.from_sequence_logprobs(3, 3, target.log_probs)
    assert torch.allclose(pi.support_logprobs(), target.log_probs, atol=1e-10)


def _expected_grad(policy, weights_fn):
    """Exact E_{y~pi}[ d/dtheta weights_fn(logp, y) ] with the sampling distribution held fixed (pathwise)."""
    logp = policy.support_logprobs()
    p = logp.detach().exp()
    value = (p * weights_fn(logp)).sum(-1).mean()
    return torch.autograd.grad(value, policy.logits)[0]


def test_kl_estimator_gradients_by_enumeration():
    """The docstring's claims in tilt.math.kl, checked exactly."""
    ref = random_tabular_policy(3, 3, 1, seed=11)
    pi = random_tabular_policy(3, 3, 1, seed=12)
    ref_logp = ref.support_logprobs().detach()
    logp = pi.support_logprobs()
    p = logp.detach().exp()
    # values
    kl_true = exact.kl(logp.detach(), ref_logp)
    assert (p * k1(logp.detach() - ref_logp)).sum().item() == pytest.approx(kl_true.item(), abs=1e-12)
    assert (p * k3(logp.detach() - ref_logp)).sum().item() == pytest.approx(kl_true.item(), abs=1e-12)
    assert abs((p * k2(logp.detach() - ref_logp)).sum().item() - kl_true.item()) > 1e-3  # k2 is biased
    # per-token k3 summed is unbiased for the sequence KL as well
    rollout = pi.enumerate()
    tok = pi.token_logprobs(rollout).detach()
    ref_tok = ref.token_logprobs(rollout).detach()
    tk3 = token_kl(k3, tok, ref_tok, rollout.completion_mask).view(1, -1)
    assert (p * tk3).sum().item() == pytest.approx(kl_true.item(), abs=1e-12)

    grad_reverse = torch.autograd.grad(exact.kl(pi.support_logprobs(), ref_logp), pi.logits)[0]
    grad_forward = torch.autograd.grad(exact.kl(ref_logp, pi.support_logprobs()), pi.logits)[0]
    # k1 in the reward (score function, detached): exact gradient of KL(pi||ref)
    g = _expected_grad(pi, lambda lp: k1(lp.detach() - ref_logp) * lp)
    assert torch.allclose(g, grad_reverse, atol=1e-12)
    # k1 in the loss: zero expected gradient
    assert _expected_grad(pi, lambda lp: k1(lp - ref_logp)).abs().max() < 1e-12
    # sequence k2 in the loss: exact gradient of KL(pi||ref)
    assert torch.allclose(_expected_grad(pi, lambda lp: sequence_kl(k2, lp, ref_logp)), grad_reverse, atol=1e-12)
    # sequence k3 in the loss: gradient of the forward KL(ref||pi)
    assert torch.allclose(_expected_grad(pi, lambda lp: sequence_kl(k3, lp, ref_logp)), grad_forward, atol=1e-12)
    # per-token k2 in the loss: biased for the sequence KL gradient
    def token_k2(_lp):
        return token_kl(k2, pi.token_logprobs(rollout), ref_tok, rollout.completion_mask).view(1, -1)
    assert (_expected_grad(pi, token_k2) - grad_reverse).abs().max() > 1e-3


def test_recipe_estimator_is_the_exact_gradient_and_vanishes_at_the_optimum():
    beta = 0.3
    ref, table, target = lab_world(5, contexts=1, beta=beta)
    ref_logp = ref.support_logprobs().detach()
    pi = random_tabular_policy(3, 3, 1, seed=21)
    logp = pi.support_logprobs()
    shaped = kl_shaped_reward(table, logp.detach(), ref_logp, beta=beta)
    baseline = (logp.detach().exp() * shaped).sum()
    estimator = -(logp.detach().exp() * (shaped - baseline) * logp).sum()  # E[reinforce_loss]
    g_est = torch.autograd.grad(estimator, pi.logits)[0]
    g_true = torch.autograd.grad(-kl_regularised_value(pi.support_logprobs(), ref_logp, table, beta=beta), pi.logits)[0]
    assert torch.allclose(g_est, g_true, atol=1e-12)

    # at pi = pi*, every sampled leave-one-out advantage is zero: the estimator has zero variance
    star = TabularPolicy.from_sequence_logprobs(3, 3, target.log_probs)
    rollout = star.sample([0], 64, generator=torch.Generator().manual_seed(0))
    seq = star.token_logprobs(rollout).sum(-1)
    ref_seq = ref.token_logprobs(rollout).sum(-1)
    rewards = TableReward(table, 3, 3)(rollout.prompts, rollout.completions)
    adv = leave_one_out_advantage(kl_shaped_reward(rewards, seq.detach(), ref_seq.detach(), beta=beta).view(1, -1))
    assert adv.abs().max().item() < 1e-12
    grad = torch.autograd.grad(reinforce_loss(star.token_logprobs(rollout), adv.view(-1), rollout.completion_mask).mean(), star.logits)[0]
    assert grad.abs().max().item() < 1e-12


def test_entropy_floor_is_the_least_kl_at_that_entropy():
    """No distribution with a given entropy is closer to q than the tempered q^lam with that entropy (2000 Dirichlet
    draws over 6 outcomes, sharper and flatter than q); the tempered one has the target entropy and is q at lam 1."""
    from tilt.math.kl import entropy, entropy_floor_kl

    g = torch.Generator().manual_seed(0)
    log_q = torch.log_softmax(2.0 * torch.randn(6, generator=g, dtype=torch.float64), -1)
    p = torch.distributions.Dirichlet(torch.full((6,), 0.7, dtype=torch.float64)).sample((2000,))
    log_p = p.clamp(min=1e-300).log()
    kl = (p * (log_p - log_q)).sum(-1)
    floor, lam = entropy_floor_kl(log_q.expand(2000, -1), entropy(log_p))
    assert bool((floor <= kl + 1e-9).all()) and float((kl - floor).min()) < 0.05  # a bound, and nearly reached
    assert bool((lam > 1).any() and (lam < 1).any())
    tempered = torch.log_softmax(lam[:, None] * log_q, -1)
    torch.testing.assert_close(entropy(tempered), entropy(log_p), atol=1e-9, rtol=0)
    same, lam_same = entropy_floor_kl(log_q, entropy(log_q))
    assert float(same) < 1e-12 and abs(float(lam_same) - 1) < 1e-9
