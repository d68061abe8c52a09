"""Weight averaging of fine-tuned policies and interpolation toward the reference: pure functions over state dicts.

The premise of averaging: two policies fine-tuned from the same initialisation theta_ref with different seeds share
the direction the reward pays for and differ in the directions their gradient noise took. Averaging their task
vectors theta_m - theta_ref keeps the first and shrinks the second (independent noise: its squared norm falls as
1/M), and since the KL to pi_ref is to second order a quadratic form in theta - theta_ref, whatever KL the noise
bought shrinks with it. (On the embedded model's openings task the noise bought almost none: docs/frontier.md.) Scaling the averaged task vector then walks the line from pi_ref through the merge:

    theta(lam) = theta_ref + lam * ( (1/M) sum_m theta_m  -  theta_ref )

lam = 1 is the plain average ("model soup", Wortsman et al. 2022, arXiv 2203.05482); lam < 1 with M = 1 is WiSE-FT's
interpolation toward the initialisation (Wortsman et al. 2022, arXiv 2109.01903); both together, merging rewarded
policies and then interpolating toward the initialisation, are WARP's stages 2 and 3 (Ramé et al. 2024, "WARP: On the
Benefits of Weight Averaged Rewarded Policies", arXiv 2406.16768, §3; WARP merges by spherical interpolation, SLERP,
where this is the linear average, and lam > 1 extrapolates past it).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor


def interpolate_task_vectors(ref_state: Mapping[str, Tensor], finetuned_states: Sequence[Mapping[str, Tensor]], lam: float, *,
                             coefficients: Sequence[float] | None = None) -> dict[str, Tensor]:
    """theta_ref + lam * sum_m c_m (theta_m - theta_ref), c_m = 1/M by default (the average), key by key, computed in
    float64 and returned in each tensor's own dtype. Other ``coefficients`` give other combinations of the task
    vectors: (1/2, -1/2) is the half-difference of two runs, the part their movements do not share. Floating tensors
    only are interpolated; any other tensor (an integer buffer) must be equal in every state and is taken from
    ``ref_state``. Every state must have the keys and shapes of ``ref_state``."""
    if not finetuned_states:
        raise ValueError("give at least one fine-tuned state to interpolate toward")
    m = len(finetuned_states)
    coefficients = [1.0 / m] * m if coefficients is None else [float(c) for c in coefficients]
    if len(coefficients) != m:
        raise ValueError(f"give one coefficient per fine-tuned state: {len(coefficients)} for {m}")
    out: dict[str, Tensor] = {}
    for i, state in enumerate(finetuned_states):
        if set(state) != set(ref_state):
            missing, extra = sorted(set(ref_state) - set(state)), sorted(set(state) - set(ref_state))
            raise ValueError(f"fine-tuned state {i} does not match the reference's keys (missing {missing[:3]}, extra {extra[:3]}): "
                             "merge only policies fine-tuned from the same model")
    for key, ref in ref_state.items():
        tensors = [state[key] for state in finetuned_states]
        for i, t in enumerate(tensors):
            if t.shape != ref.shape:
                raise ValueError(f"{key}: fine-tuned state {i} has shape {tuple(t.shape)}, the reference {tuple(ref.shape)}")
        if not torch.is_floating_point(ref):
            if any(not torch.equal(t, ref) for t in tensors):
                raise ValueError(f"{key}: a non-floating tensor differs between the states, so it cannot be interpolated")
            out[key] = ref.clone()
            continue
        base = ref.to(torch.float64)
        combined = sum(c * (t.to(torch.float64) - base) for c, t in zip(coefficients, tensors))
        out[key] = (base + lam * combined).to(ref.dtype)
    return out


def task_vector_cosine(ref_state: Mapping[str, Tensor], a_state: Mapping[str, Tensor], b_state: Mapping[str, Tensor]) -> float:
    """cos(theta_a - theta_ref, theta_b - theta_ref) over every floating tensor, flattened into one vector: how much of
    two runs' movement is shared (1: the same direction; 0: orthogonal, as independent noise would be)."""
    dot = norm_a = norm_b = 0.0
    for key, ref in ref_state.items():
        if not torch.is_floating_point(ref):
            continue
        base = ref.to(torch.float64)
        da, db = a_state[key].to(torch.float64) - base, b_state[key].to(torch.float64) - base
        dot += float((da * db).sum())
        norm_a += float((da * da).sum())
        norm_b += float((db * db).sum())
    if norm_a == 0.0 or norm_b == 0.0:
        raise ValueError("a state equals the reference: its task vector is zero and has no direction")
    return dot / (norm_a * norm_b) ** 0.5
