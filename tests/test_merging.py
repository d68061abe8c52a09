"""Weight averaging and interpolation toward the reference (tilt.math.merging): by hand, and the claim it rests on,
that averaging runs whose task vectors share a signal and differ in independent noise keeps the reward's gain and
sheds KL, checked exactly on a softmax policy."""
import math

import pytest
import torch

from tilt.math.merging import interpolate_task_vectors, task_vector_cosine


def _state(w, b, steps=0):
    return {"w": torch.tensor(w, dtype=torch.float32), "b": torch.tensor(b, dtype=torch.float32), "n": torch.tensor(steps)}


def test_interpolation_by_hand():
    ref = _state([[0.0, 1.0]], [2.0])
    a, c = _state([[1.0, 3.0]], [2.0]), _state([[3.0, -1.0]], [4.0])
    # mean of the task vectors: w (2, 0), b (1,); at lam 0.5: ref + (1, 0), (0.5,)
    half = interpolate_task_vectors(ref, [a, c], 0.5)
    assert half["w"].tolist() == [[1.0, 1.0]] and half["b"].tolist() == [2.5]
    assert half["n"].item() == 0 and half["w"].dtype == torch.float32
    assert interpolate_task_vectors(ref, [a], 1.0)["w"].tolist() == [[1.0, 3.0]]
    assert interpolate_task_vectors(ref, [a, c], 0.0)["b"].tolist() == [2.0]
    assert interpolate_task_vectors(ref, [a, c], 2.0)["w"].tolist() == [[4.0, 1.0]]  # extrapolation past the average
    # half-difference: task vectors w (1, 2) and (3, -2) -> (-1, 2); b (0,) and (2,) -> (-1,)
    diff = interpolate_task_vectors(ref, [a, c], 1.0, coefficients=[0.5, -0.5])
    assert diff["w"].tolist() == [[-1.0, 3.0]] and diff["b"].tolist() == [1.0]


def test_interpolation_refuses_states_that_do_not_match():
    ref = _state([[0.0, 1.0]], [2.0])
    with pytest.raises(ValueError, match="keys"):
        interpolate_task_vectors(ref, [{"w": ref["w"], "n": ref["n"]}], 1.0)
    with pytest.raises(ValueError, match="shape"):
        interpolate_task_vectors(ref, [_state([[0.0, 1.0, 2.0]], [2.0])], 1.0)
    with pytest.raises(ValueError, match="non-floating"):
        interpolate_task_vectors(ref, [_state([[0.0, 1.0]], [2.0], steps=3)], 1.0)
    with pytest.raises(ValueError, match="at least one"):
        interpolate_task_vectors(ref, [], 1.0)
    with pytest.raises(ValueError, match="one coefficient per"):
        interpolate_task_vectors(ref, [ref], 1.0, coefficients=[0.5, 0.5])


def test_cosine_by_hand():
    ref = _state([[0.0, 0.0]], [0.0])
    assert task_vector_cosine(ref, _state([[1.0, 0.0]], [0.0]), _state([[0.0, 2.0]], [0.0])) == 0.0
    assert task_vector_cosine(ref, _state([[1.0, 1.0]], [0.0]), _state([[2.0, 2.0]], [0.0])) == pytest.approx(1.0)
    # (1, 0, 1) against (1, 1, 0): 1 / (sqrt 2 sqrt 2)
    assert task_vector_cosine(ref, _state([[1.0, 0.0]], [1.0]), _state([[1.0, 1.0]], [0.0])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="zero"):
        task_vector_cosine(ref, ref, _state([[1.0, 0.0]], [0.0]))


def _kl_and_gain(logits, ref_logits, reward):
    p, q = torch.softmax(logits, -1), torch.log_softmax(ref_logits, -1)
    return float((p * (torch.log_softmax(logits, -1) - q)).sum()), float((p - torch.softmax(ref_logits, -1)) @ reward)


def test_averaging_independent_noise_sheds_kl_and_keeps_the_gain():
    """A softmax policy over 400 responses, logits theta. Four 'runs' move theta_ref by a shared step along the reward
    plus independent noise of twice its norm. Their average keeps the gain of one run (the noise is orthogonal to
    the reward on average) and spends far less KL; scaled back to one run's KL it gains more than any run does."""
    g = torch.Generator().manual_seed(0)
    n = 400
    ref_logits = torch.randn(n, generator=g, dtype=torch.float64)
    reward = torch.randn(n, generator=g, dtype=torch.float64)
    signal = 0.3 * (reward - reward.mean())
    runs = [ref_logits + signal + 2 * signal.norm() * (z := torch.randn(n, generator=g, dtype=torch.float64)) / z.norm() for _ in range(4)]
    ref_state, states = {"theta": ref_logits}, [{"theta": t} for t in runs]
    one = [_kl_and_gain(t, ref_logits, reward) for t in runs]
    merged = interpolate_task_vectors(ref_state, states, 1.0)["theta"]
    kl_merged, gain_merged = _kl_and_gain(merged, ref_logits, reward)
    mean_kl, mean_gain = sum(k for k, _ in one) / 4, sum(gn for _, gn in one) / 4
    assert kl_merged < 0.5 * mean_kl
    assert gain_merged > 0.8 * mean_gain
    # extrapolate the average until it spends one run's KL: its gain is then above every run's
    lo, hi = 1.0, 4.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        kl_mid, _ = _kl_and_gain(interpolate_task_vectors(ref_state, states, mid)["theta"], ref_logits, reward)
        lo, hi = (mid, hi) if kl_mid < mean_kl else (lo, mid)
    _, gain_at_kl = _kl_and_gain(interpolate_task_vectors(ref_state, states, lo)["theta"], ref_logits, reward)
    assert gain_at_kl > max(gn for _, gn in one)
    assert math.isfinite(gain_at_kl)
    # the runs' task vectors are mostly noise: their cosines are small but positive (the shared signal)
    cosines = [task_vector_cosine(ref_state, states[i], states[j]) for i in range(4) for j in range(i + 1, 4)]
    assert all(0.0 < c < 0.5 for c in cosines)
