"""A natural-gradient optimizer over a model's linear layers: K-FAC factors from the model's own samples, a trust
region in KL per step, momentum on the raw gradient (tilt.math.kfac gives the equations).

    opt = KFACNaturalGradient(linear_layers(model), kl_per_step=0.005)
    opt.fit_fisher(policy, rollouts)   # samples of the policy itself (y ~ pi): the true Fisher at the current policy
    ... loss.backward(); opt.step()    # theta <- theta - eta F^{-1} m,  eta such that 1/2 eta^2 m^T F^{-1} m = kl_per_step

Only the weights of the given ``nn.Linear`` layers are updated; the caller freezes every other parameter
(embeddings, norms), which K-FAC does not precondition here. ``lr`` of the parameter group is the KL per step, so a
recipe's learning-rate schedule scales the trust region. The factors are fitted when ``fit_fisher`` is called (once,
at the reference, in the frontier benchmark: the metric of KL(. || pi_ref) there) and kept until it is called again.
This optimizer serves the benchmark's question of where the KL goes (docs/frontier.md); its state (momentum and
factors) is not part of a tilt checkpoint.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from tilt.math.kfac import covariance_factor, damped_inverse, precondition, trust_region_scale


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    """The ``nn.Linear`` modules of ``model`` whose weight is not shared with an embedding (a tied LM head is the
    embedding matrix: its input-side factor would be (V, V)). Raises if there are none."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    layers = [m for m in model.modules() if isinstance(m, nn.Linear) and id(m.weight) not in embeddings]
    if not layers:
        raise ValueError("the model has no torch.nn.Linear layers besides a tied LM head (GPT-2's projections are "
                         "transformers' Conv1D, which this does not take)")
    return layers


class KFACNaturalGradient(torch.optim.Optimizer):
    """K-FAC natural gradient with a KL trust region on the weights of ``linears`` (see the module docstring).

    ``momentum``: exponential average of the raw gradient (bias-corrected, as Adam's first moment; 0.9 as Adam's
    beta1), preconditioned each step. ``damping``: relative Tikhonov damping of each factor (tilt.math.kfac.damped_inverse);
    large damping tends to (scaled) SGD, small to the exact K-FAC inverse."""

    def __init__(self, linears: Sequence[nn.Linear], kl_per_step: float, *, momentum: float = 0.9, damping: float = 0.1):
        if not linears:
            raise ValueError("no linear layers to precondition (tilt.engine.kfac.linear_layers lists a model's)")
        if not 0 <= momentum < 1 or damping <= 0 or kl_per_step < 0:
            raise ValueError(f"need 0 <= momentum < 1, damping > 0 and kl_per_step >= 0; got {momentum}, {damping}, {kl_per_step}")
        if any(m.bias is not None for m in linears):
            raise ValueError("a linear layer has a bias: this optimizer preconditions weights only")
        super().__init__([m.weight for m in linears], dict(lr=kl_per_step, momentum=momentum))
        self.linears = list(linears)
        self.damping = damping
        self.a_inverse: list[Tensor] = []
        self.g_inverse: list[Tensor] = []
        self.last_quadratic = math.nan
        self.last_step_length = math.nan

    def fit_fisher(self, policy, rollouts: Iterable) -> dict[str, float]:
        """Fit A = mean over counted positions of a a^T and G = sum over positions of g g^T per sequence, for every
        layer, from the gradient of sum_t log pi(y_t) of each rollout, whose completions must be the policy's own
        samples (``rollout.of_the_model``): with y ~ pi this is the Fisher, with y from elsewhere the "empirical
        Fisher", which is not a metric of the policy's KL. A counted position is a real prompt token or a completion
        token that predicts a counted one. Leaves every parameter's ``.grad`` at None."""
        a_sums = [None] * len(self.linears)
        g_sums = [None] * len(self.linears)
        counted = torch.zeros(())
        sequences = 0
        mask_now: list[Tensor] = []

        def forward_hook(i):
            def hook(module, inputs, output):
                if not mask_now:  # a forward pass outside the scoring of a rollout (the rollouts may be drawn lazily)
                    return
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).detach()
                s = covariance_factor(x, mask_now[0])
                a_sums[i] = s if a_sums[i] is None else a_sums[i] + s

                def grad_hook(grad):
                    s = covariance_factor(grad.reshape(-1, grad.shape[-1]))
                    g_sums[i] = s if g_sums[i] is None else g_sums[i] + s

                output.register_hook(grad_hook)
            return hook

        handles = [m.register_forward_hook(forward_hook(i)) for i, m in enumerate(self.linears)]
        try:
            for rollout in rollouts:
                if not rollout.of_the_model:
                    raise ValueError("fit_fisher needs the policy's own samples (y ~ pi); these came from another sampler")
                mask = torch.cat([rollout.prompt_mask, rollout.completion_mask[:, :-1]], dim=-1).reshape(-1)
                mask_now[:] = [mask]
                counted = counted + mask.float().sum()
                sequences += rollout.completion_ids.shape[0]
                policy.token_logprobs(rollout).sum().backward()
                mask_now.clear()
        finally:
            for h in handles:
                h.remove()
            for p in policy.parameters():
                p.grad = None
        if any(s is None for s in a_sums) or any(s is None for s in g_sums) or sequences == 0:
            raise ValueError("the Fisher pass reached no layer: give at least one rollout of the model these layers belong to")
        self.a_inverse = [damped_inverse(s / counted, self.damping) for s in a_sums]
        self.g_inverse = [damped_inverse(s / sequences, self.damping) for s in g_sums]
        return {"fisher_sequences": float(sequences), "fisher_positions": float(counted)}

    @torch.no_grad()
    def step(self, closure=None):
        if not self.a_inverse:
            raise RuntimeError("call fit_fisher before the first step: the preconditioner has no factors")
        group = self.param_groups[0]
        mu = group["momentum"]
        directions, quadratic = [], 0.0
        for weight, g_inv, a_inv in zip(group["params"], self.g_inverse, self.a_inverse):
            if weight.grad is None:
                continue
            state = self.state[weight]
            if not state:
                state["momentum"] = torch.zeros_like(weight)
                state["step"] = 0
            state["step"] += 1
            state["momentum"].mul_(mu).add_(weight.grad, alpha=1 - mu)
            m_hat = state["momentum"] / (1 - mu ** state["step"])
            d = precondition(m_hat, g_inv, a_inv)
            quadratic += float((m_hat.to(d.dtype) * d).sum())
            directions.append((weight, d))
        eta = trust_region_scale(quadratic, group["lr"])
        for weight, d in directions:
            weight.add_(d.to(weight.dtype), alpha=-eta)
        self.last_quadratic, self.last_step_length = quadratic, eta
        return None
