"""Claims the docs make about the math, checked by hand or by enumeration: IPO against TRL's length-normalised
IPO, and KL estimators used inside the reward."""
import pytest
import torch

from tilt.lab.tabular import random_tabular_policy
from tilt.math import exact
from tilt.math.kl import k1, k2, k3
from tilt.math.preference import ipo_loss, mean_token_logprobs


def test_ipo_summed_and_length_normalised_by_hand():
    # one pair: chosen 3 tokens, log pi = -6, log ref = -9; rejected 4 tokens, log pi = -8, log ref = -4; beta = 0.5
    pol_c, pol_r, ref_c, ref_r = (torch.tensor([v], dtype=torch.float64) for v in (-6.0, -8.0, -9.0, -4.0))
    n_c, n_r = torch.tensor([3]), torch.tensor([4])
    # summed (tilt): h = (-6 + 9) - (-8 + 4) = 7; target 1/(2 * 0.5) = 1; loss (7 - 1)^2 = 36
    assert ipo_loss(pol_c, pol_r, ref_c, ref_r, beta=0.5).item() == 36.0
    # per-token (TRL's DPOTrainer): h = (-2 + 3) - (-2 + 1) = 2; loss (2 - 1)^2 = 1
    normalised = [mean_token_logprobs(x, n) for x, n in ((pol_c, n_c), (pol_r, n_r), (ref_c, n_c), (ref_r, n_r))]
    assert ipo_loss(*normalised, beta=0.5).item() == 1.0
    with pytest.raises(ValueError, match="at least one counted token"):
        mean_token_logprobs(pol_c, torch.tensor([0]))


def _expected_score_grad(policy, weights):
    """Exact E_{y~pi}[weights(y) * grad log pi(y)] (weights held fixed): the score-function gradient."""
    logp = policy.support_logprobs()
    p = logp.detach().exp()
    return torch.autograd.grad((p * weights * logp).sum(-1).mean(), policy.logits)[0]


def test_k2_and_k3_inside_the_reward_do_not_give_the_kl_gradient():
    ref = random_tabular_policy(3, 3, 1, seed=11)
    pi = random_tabular_policy(3, 3, 1, seed=12)
    ref_logp = ref.support_logprobs().detach()
    log_ratio = pi.support_logprobs().detach() - ref_logp
    grad_kl = torch.autograd.grad(exact.kl(pi.support_logprobs(), ref_logp), pi.logits)[0]
    assert torch.allclose(_expected_score_grad(pi, k1(log_ratio)), grad_kl, atol=1e-12)
    for k in (k2, k3):
        assert (_expected_score_grad(pi, k(log_ratio)) - grad_kl).abs().max() > 1e-3
