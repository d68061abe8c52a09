"""Learning from preferences: Bradley-Terry, DPO, IPO and the XPO exploration bonus (digest §1.4, §4).

Every function takes *sequence* log-probabilities, shape (B,): the sum over the counted completion tokens of
log pi(y_t | x, y_<t) (digest §6.2: sums, not means). Losses are *minimised* and returned per pair, shape (B,);
the caller reduces.

Notation: a pair (y+, y-) of completions of the same prompt x, y+ preferred; pi the policy, pi_ref the
reference, beta > 0 the KL coefficient, alpha >= 0 the XPO coefficient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tilt.math import winrate
from tilt.math.winrate import win_probability  # the one tie rule, used here for labels and win rates


def implicit_reward(seq_logprobs: Tensor, ref_seq_logprobs: Tensor, *, beta: float) -> Tensor:
    """r_pi(x, y) = beta * log(pi(y|x) / pi_ref(y|x)), the DPO reparameterisation (Rafailov et al. 2023; digest §1.4).

    pi is exactly the Gibbs solution pi_ref * exp(r_pi / beta) / Z of the KL-regularised problem with reward r_pi
    and Z = 1. In a deterministic token MDP, summed over a trajectory it equals r(tau) - V*(s_1) when pi = pi*
    (the soft-Bellman identity, digest §4(a) [R]). seq_logprobs, ref_seq_logprobs: (B,). Returns (B,).
    """
    return beta * (seq_logprobs - ref_seq_logprobs)


def dpo_margin(chosen_logprobs: Tensor, rejected_logprobs: Tensor, ref_chosen_logprobs: Tensor, ref_rejected_logprobs: Tensor) -> Tensor:
    """h = [log pi(y+) - log pi_ref(y+)] - [log pi(y-) - log pi_ref(y-)], the log-ratio margin (no beta). All (B,)."""
    return (chosen_logprobs - ref_chosen_logprobs) - (rejected_logprobs - ref_rejected_logprobs)


def dpo_sigmoid_loss(
    chosen_logprobs: Tensor, rejected_logprobs: Tensor, ref_chosen_logprobs: Tensor, ref_rejected_logprobs: Tensor, *, beta: float
) -> Tensor:
    """-log sigma(beta * h), the DPO loss per pair (Rafailov et al. 2023, eq. 7; digest §1.4), h from ``dpo_margin``.

    It is the Bradley-Terry negative log-likelihood of the label "y+ over y-" under the implicit reward r_pi.
    Gradient with respect to log pi(y+): -beta * sigma(-beta * h); with respect to log pi(y-): +beta * sigma(-beta * h).
    All arguments (B,); the reference ones carry no gradient. Returns (B,).
    """
    h = dpo_margin(chosen_logprobs, rejected_logprobs, ref_chosen_logprobs, ref_rejected_logprobs)
    return -F.logsigmoid(beta * h)


def ipo_loss(
    chosen_logprobs: Tensor, rejected_logprobs: Tensor, ref_chosen_logprobs: Tensor, ref_rejected_logprobs: Tensor, *, beta: float
) -> Tensor:
    """(h - 1/(2 beta))^2, the IPO loss per pair (Azar et al. 2023, eq. 17 with tau = beta; digest §4(b)). It
    regresses the margin h onto 1/(2 beta) instead of pushing it to infinity. All arguments (B,). Returns (B,).

    h is built from whatever log-probs are passed: tilt's recipes pass sums over the completion tokens, as TRL's
    online trainers do. TRL's offline ``DPOTrainer`` with ``loss_type="ipo"`` first divides each sequence's policy
    and reference log-prob by its number of tokens, so its margin is a per-token average and a beta tuned there
    does not carry over; pass ``mean_token_logprobs`` of all four arguments to get TRL's DPOTrainer value.
    """
    h = dpo_margin(chosen_logprobs, rejected_logprobs, ref_chosen_logprobs, ref_rejected_logprobs)
    return (h - 1.0 / (2.0 * beta)) ** 2


def mean_token_logprobs(seq_logprobs: Tensor, n_tokens: Tensor) -> Tensor:
    """log pi(y|x) / |y|: a sequence log-prob divided by its number of counted tokens (the length normalisation
    TRL's ``DPOTrainer`` applies before its IPO loss). seq_logprobs (B,) float, n_tokens (B,) counts >= 1.
    Returns (B,)."""
    if bool((n_tokens < 1).any()):
        raise ValueError("mean_token_logprobs needs at least one counted token in every sequence")
    return seq_logprobs / n_tokens.to(seq_logprobs.dtype)


def xpo_bonus(ref_sample_logprobs: Tensor, *, alpha: float) -> Tensor:
    """alpha * log pi(y~ | x) for a completion y~ drawn from pi_ref: XPO's exploration term (Xie et al. 2024, Algorithm 1;
    digest §4(a), §4(b)), added to the DPO loss that is *minimised*.

    Sign and effect: E_{y~ ~ pi_ref}[log pi(y~)] = -KL(pi_ref || pi) - H(pi_ref), so minimising this term raises
    KL(pi_ref || pi): it moves mass off the responses the reference typically produces and onto the rest. For a
    softmax pi = softmax(z) over responses, the gradient of the term is alpha * (e_{y~} - pi), so one descent step
    of size eta lowers the logit of y~ by eta * alpha * (1 - pi(y~)) and raises the logit of every other response y
    by eta * alpha * pi(y): in proportion to its mass, so pi(y~) falls and the mass it loses goes to the others,
    mostly to those pi already favours. This is optimism: a bonus for differing from pi_ref on its own samples.
    ref_sample_logprobs: (B,) with gradient. Returns (B,).
    """
    return alpha * ref_sample_logprobs


def bradley_terry_logprob(rewards_a: Tensor, rewards_b: Tensor, *, scale: float = 1.0) -> Tensor:
    """log P(a > b) = log sigma(scale * (r(a) - r(b))), the Bradley-Terry model (Bradley & Terry 1952; digest §1.4).

    rewards_a, rewards_b: (B,). Returns (B,). Its negative on (chosen, rejected) rewards is the reward-model loss.
    """
    return F.logsigmoid(scale * (rewards_a - rewards_b))


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """-log sigma(r(y+) - r(y-)), the negative Bradley-Terry log-likelihood of a labelled pair: the loss of a
    reward model (Ouyang et al. 2022, eq. 1). chosen_rewards, rejected_rewards: (B,). Returns (B,)."""
    return -bradley_terry_logprob(chosen_rewards, rejected_rewards)


def exact_win_rate(policy_logp: Tensor, other_logp: Tensor, rewards: Tensor, *, scale: float | None = None) -> Tensor:
    """P(y > y') with y ~ pi, y' ~ pi_other, exact over an enumerated support, averaged over contexts.

    policy_logp, other_logp, rewards: (C, N). ``scale`` as in ``win_probability`` (None: deterministic reward
    comparison, ties count half). Returns a scalar; 0.5 when the two policies are equal.
    """
    return winrate.exact_win_rate(policy_logp.exp(), other_logp.exp(), rewards, scale=scale).mean()
