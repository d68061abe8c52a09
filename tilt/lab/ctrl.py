"""The tabular CTRL lab: calibrate-and-transform RL on one prompt with K responses, checked exactly
(digest §5(e) E4.5).

The world: one prompt; K responses = a ``TabularPolicy`` with vocabulary K and length 1; pi_ref ~ Dirichlet(1)
over the responses; a reward r(y) ~ N(0, 1) per response (the digest's "Gaussian r"), distinct with probability 1.

The run:
  1. calibration: m samples from pi_ref, scored once (``tilt.infalign.build_calibration``);
  2. the CTRL reward R = Phi(C_hat) (``tilt.infalign.CalibratedReward``), or the raw reward r for ``raw``;
  3. beta such that the exact tilted policy pi_beta ∝ pi_ref exp(R/beta) has KL(pi_beta || pi_ref) = the budget;
  4. training with the KL-regularised recipe ``tilt.recipes.kl_rl`` on R, from pi_ref, at that beta;
  5. exact evaluation on the true reward r: KL, the standard win rate, and the inference-time win rate
     (procedure applied to the policy against the procedure applied to pi_ref), for the learned policy and for
     the exact tilted policy pi_beta (the target of step 4), next to the analytic value of the calibrated-space tool
     for the same transform at the same KL budget. The analytic value of ``raw`` is that of a reward that is
     exactly normal under pi_ref (the probit transform); the lab's r is only approximately so.
"""
from __future__ import annotations

import time

import torch
from tqdm import tqdm

from tilt.infalign import (
    CalibratedReward,
    analyze,
    build_calibration,
    inference_key,
    paper_scale_beta,
    procedure_transform,
    solve_beta,
    tune_t,
)
from tilt.lab.tabular import TabularPolicy
from tilt.lab.world import TableReward
from tilt.math import exact
from tilt.math.infalign import best_of_n_probs, exact_win_rate, worst_of_n_probs
from tilt.recipes import kl_rl
from tilt.recipes.common import derive_seed

CTRL_LR = 0.05
"""Adam on the logits, lr 0.05 decayed linearly to 0, as the lab's KL-RL default (tilt.lab.drivers.LAB_LR)."""
CTRL_STEPS = 2000
CTRL_BATCH = 64
TRANSFORMS = ("identity", "raw", "exp")


def ctrl_world(responses: int, seed: int) -> tuple[TabularPolicy, torch.Tensor]:
    """pi_ref ~ Dirichlet(1) over ``responses`` responses (logits = log of Exp(1) draws) and r ~ N(0, 1) per response.
    Returns (ref, rewards (1, K))."""
    g = torch.Generator().manual_seed(derive_seed(seed, "ctrl-world"))
    exp_draws = -torch.log1p(-torch.rand(responses, generator=g, dtype=torch.float64))  # Exp(1)
    ref = TabularPolicy(responses, 1, logits=exp_draws.log().view(1, 1, responses))
    rewards = torch.randn(1, responses, generator=g, dtype=torch.float64)
    return ref, rewards


def procedure_probs(procedure: str, probs: torch.Tensor, rewards: torch.Tensor, n: int) -> torch.Tensor:
    """Exact distribution of the procedure's output: best-of-n ('bon') or worst-of-n ('won'). (1, K) -> (1, K)."""
    return best_of_n_probs(probs, rewards, n) if procedure == "bon" else worst_of_n_probs(probs, rewards, n)


def exact_metrics(logp: torch.Tensor, ref_logp: torch.Tensor, rewards: torch.Tensor, procedure: str, n: int) -> dict[str, float]:
    """KL(pi || pi_ref), W(pi > pi_ref) and W(T(pi) > T(pi_ref)) on the true reward, exactly. logp, ref_logp, rewards: (1, K)."""
    p, q = logp.exp(), ref_logp.exp()
    return {
        "kl": exact.kl(logp, ref_logp).item(),
        "win_rate_standard": exact_win_rate(p, q, rewards).mean().item(),
        "win_rate_inference": exact_win_rate(
            procedure_probs(procedure, p, rewards, n), procedure_probs(procedure, q, rewards, n), rewards
        ).mean().item(),
    }


def run_ctrl_lab(
    *,
    responses: int = 200,
    procedure: str = "bon",
    n: int = 4,
    kl: float = 0.5,
    transform: str = "exp",
    t: float | None = None,
    calibration_samples: int = 256,
    seed: int = 0,
    steps: int = CTRL_STEPS,
    batch: int = CTRL_BATCH,
    lr: float = CTRL_LR,
    progress: bool = False,
) -> dict:
    """One CTRL (or raw-reward KL-RL) run in the tabular world; returns the report described in docs/infalign.md."""
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
    if procedure not in ("bon", "won"):
        raise ValueError(f"procedure must be 'bon' or 'won', got {procedure!r}")
    if n < 1 or responses < 2 or calibration_samples < 1:
        raise ValueError("need --n >= 1, --responses >= 2 and --calibration-samples >= 1")
    start = time.perf_counter()
    ref, rewards = ctrl_world(responses, seed)
    reward = TableReward(rewards, responses, 1)
    support = ref.enumerate()
    ref_logp = ref.support_logprobs().detach()  # (1, K)

    if transform != "exp":
        t = None
    elif t is None:
        t = tune_t(procedure, n, kl).t
    if transform == "raw":
        train_reward, analytic_name = reward, "probit"
    else:
        calibration = build_calibration(ref, reward, [0], calibration_samples, seed=derive_seed(seed, "calibration"))
        train_reward = CalibratedReward(reward, calibration, procedure_transform(procedure, transform, t))
        analytic_name = transform
    reward_table = torch.as_tensor(train_reward(support.prompts, support.completions), dtype=torch.float64).view(1, -1)

    def tilted_logp(beta: float) -> torch.Tensor:
        return torch.log_softmax(ref_logp + reward_table / beta, dim=-1)

    beta = solve_beta(lambda b: exact.kl(tilted_logp(b), ref_logp).item(), kl)

    policy = ref.copy()
    config = kl_rl.KLRLConfig(
        beta=beta, steps=steps, prompts_per_step=1, samples_per_prompt=batch, lr=lr, lr_schedule="linear", seed=seed
    )
    bar = tqdm(total=steps, desc="lab ctrl", unit="step", disable=not progress)
    kl_rl.train(config, policy, ref, train_reward, [0], on_step=lambda s, m: bar.update())
    bar.close()

    with torch.no_grad():
        learned = exact_metrics(policy.support_logprobs(), ref_logp, rewards, procedure, n)
    target_logp = tilted_logp(beta)
    target = exact_metrics(target_logp, ref_logp, rewards, procedure, n)
    analytic = analyze(procedure_transform(procedure, analytic_name, t), n, kl)
    key = inference_key(procedure)
    bon_ref = exact_metrics(torch.log(procedure_probs("bon", ref_logp.exp(), rewards, n)), ref_logp, rewards, procedure, n)
    return {
        "procedure": procedure,
        "n": n,
        "responses": responses,
        "transform": transform,
        "t": t,
        "kl_budget": kl,
        "calibration_samples": None if transform == "raw" else calibration_samples,
        "seed": seed,
        "steps": steps,
        "batch": batch,
        "beta": beta,
        "beta_paper_scale": beta if transform == "raw" else paper_scale_beta(procedure, transform, t, beta),
        # the learned policy, exact on the true reward
        "kl": learned["kl"],
        "win_rate_standard": learned["win_rate_standard"],
        "win_rate_inference": learned["win_rate_inference"],
        "kl_target_policy": exact.kl(target_logp, policy.support_logprobs().detach()).item(),
        # the exact tilted policy for the same (calibrated, transformed) reward and beta
        "target_kl": target["kl"],
        "target_win_rate_standard": target["win_rate_standard"],
        "target_win_rate_inference": target["win_rate_inference"],
        # the calibrated-space analytic tool, same transform, at the KL budget
        "analytic_transform": analytic_name,
        "analytic_kl": analytic["kl"],
        "analytic_win_rate_standard": analytic["win_rate_standard"],
        "analytic_win_rate_inference": analytic[key],
        # best-of-n of pi_ref in this finite world, as a reference point
        "bon_ref_kl": bon_ref["kl"],
        "bon_ref_win_rate_standard": bon_ref["win_rate_standard"],
        "seconds": round(time.perf_counter() - start, 3),
    }
