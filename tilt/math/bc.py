"""Behaviour cloning (Tiapkin et al. 2023, "Demonstration-Regularized RL"; digest §3).

Behaviour cloning (BC) is maximum likelihood on expert demonstrations, counted on completion tokens only
(the prompt is given, not imitated). The paper needs more than plain maximum likelihood: the clone becomes
the reference of a KL-regularised step, KL(pi || pi_BC), and its trajectory KL to the expert must stay finite,
so every action needs a probability bounded away from zero. In the tabular case the paper adds a logarithmic
regulariser ([V-text], a summary of the paper: "maximum likelihood estimation with logarithmic regularization
... ensures minimum probability for all actions"):

    pi_BC = argmax_pi  sum_i sum_h log pi_h(a_h^i | s_h^i)  +  sum_{h,s,a} log pi_h(a | s)

whose closed form [D] is add-one (Laplace) smoothing, pi_BC_h(a|s) = (N_h(s,a) + 1) / (N_h(s) + A).
``tilt.lab.mdp.behaviour_clone`` implements that closed form.

For a model trained by gradient, two per-token forms of the same idea are given here:

* ``label_smoothed_bc_loss``: the regulariser added at every visited token:
  -(1 - eps) log pi(y_t) - (eps / V) sum_a log pi(a). At one context seen n times its minimiser [D] is
  (1 - eps) * empirical + eps / V, so every token keeps probability >= eps / V. It equals the add-one
  closed form (n_a + 1)/(n + V) exactly when eps = V / (n + V); for language, where a context is seen once,
  that is eps = V / (1 + V), and a smaller eps is a weaker form of the same regulariser. It needs the
  log-probabilities of the whole vocabulary, which the ``Policy`` protocol does not expose.
* ``floored_token_logprobs`` + ``bc_loss``: a probability floor by mixture, q = (1 - V f) pi + f, so that
  q(a) >= f for every token; cloning is then maximum likelihood of q, and q (not pi) is the reference of the
  RL step. It needs only the log-probabilities of the demonstrated tokens, so it works on any ``Policy``.

Departure from the paper: the paper regularises every (h, s, a), visited or not; a language model can only be
regularised at the contexts it is trained on, and relies on the floor (or on the softmax) elsewhere.

Every loss here is minimised, returned per sequence (B,), and summed over the counted tokens of a sequence;
the caller reduces over the batch. Every ``*_mask`` is True where a token counts.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from tilt.math.masking import masked_sum


def bc_loss(token_logprobs: Tensor, completion_mask: Tensor) -> Tensor:
    """Negative log-likelihood of the demonstrated completion: -sum_t log pi(y_t | x, y_<t), completion tokens only.

    token_logprobs: (B, T) with grad; completion_mask: (B, T) bool, True on completion tokens that count
    (prompt tokens and padding are False). Returns (B,), not reduced.
    """
    return -masked_sum(token_logprobs, completion_mask)


def label_smoothed_bc_loss(vocab_logprobs: Tensor, target_ids: Tensor, completion_mask: Tensor, *, smoothing: float) -> Tensor:
    """Label-smoothed BC: sum_t [ -(1 - eps) log pi(y_t) - (eps / V) sum_a log pi(a) ] over completion tokens.

    The second term is the paper's logarithmic regulariser sum_a log pi(a | s) (see the module docstring),
    weighted eps / V per visited token. Minimiser at a context [D]: (1 - eps) * empirical + eps / V.

    vocab_logprobs: (B, T, V) log pi(. | x, y_<t), with grad; target_ids: (B, T) long; completion_mask:
    (B, T) bool. smoothing = eps in [0, 1). Returns (B,), not reduced. eps = 0 gives ``bc_loss``.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must lie in [0, 1), got {smoothing}")
    vocab = vocab_logprobs.shape[-1]
    target = vocab_logprobs.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)  # (B, T)
    uniform = vocab_logprobs.sum(-1) / vocab  # (B, T) mean over the vocabulary of log pi(a)
    per_token = -(1.0 - smoothing) * target - smoothing * uniform
    return masked_sum(per_token, completion_mask)


def floored_token_logprobs(token_logprobs: Tensor, *, floor: float, vocab: int) -> Tensor:
    """log q(y_t) with q = (1 - V f) pi + f: the policy mixed with the uniform distribution so that every token
    has probability at least f. Elementwise; ``token_logprobs`` any shape. f = 0 returns the input.

    Needs 0 <= f < 1/V (f = 1/V would be the uniform distribution, whatever pi is).
    """
    if not 0.0 <= floor < 1.0 / vocab:
        raise ValueError(f"floor must lie in [0, 1/vocab) = [0, {1.0 / vocab:.4g}), got {floor}")
    if floor == 0.0:
        return token_logprobs
    # log((1 - V f) e^l + f) = logaddexp(log(1 - V f) + l, log f), stable for very negative l.
    return torch.logaddexp(token_logprobs + math.log1p(-vocab * floor), torch.full_like(token_logprobs, math.log(floor)))

