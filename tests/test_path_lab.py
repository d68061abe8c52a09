"""tilt.lab.path: the exact path of an optimizer from pi_ref against the exact frontier, and ``tilt lab path``."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math

import pytest
import torch

from tilt.lab.path import PathConfig, exact_path, fisher_vector_product, prefix_occupancy
from tilt.lab.tabular import random_tabular_policy
from tilt.lab.world import reward_table

torch.set_num_threads(1)
SMALL = dict(vocab=4, length=3, contexts=2, scale=2.0)


def test_prefix_occupancy_is_the_mass_of_each_prefix_and_token():
    policy = random_tabular_policy(3, 3, 2, seed=1, scale=1.5)
    p = policy.support_logprobs().detach().exp()  # (C, 27)
    occ = prefix_occupancy(p, 3, 3)
    brute = torch.zeros_like(occ)
    seqs = policy.all_sequences()  # (N, L)
    rows = policy.prefix_index(seqs)  # (N, L): the prefix each token is drawn from
    for c in range(2):
        for i in range(seqs.shape[0]):
            for t in range(3):
                brute[c, rows[i, t], seqs[i, t]] += p[c, i]
    assert torch.allclose(occ, brute, atol=1e-12)


def test_the_natural_gradient_solves_the_dense_fisher_system():
    """g / occ(h, a) satisfies F x = g for the Fisher of the sequence distribution built from the score Jacobian."""
    vocab, length = 3, 2
    policy = random_tabular_policy(vocab, length, 1, seed=2, scale=1.0)
    rewards = reward_table("random", vocab, length, 1, reward_seed=3)
    logp = policy.support_logprobs()  # (1, N)
    p = logp.detach().exp()[0]
    jac = torch.stack([torch.autograd.grad(logp[0, i], policy.logits, retain_graph=True)[0].reshape(-1) for i in range(logp.shape[1])])
    fisher = jac.T @ (p.unsqueeze(-1) * jac)  # (P, P)
    (grad,) = torch.autograd.grad((logp.exp() * rewards).sum(), policy.logits)
    occ = prefix_occupancy(p.unsqueeze(0), vocab, length)
    natural = grad / occ
    assert torch.allclose(fisher @ natural.reshape(-1), grad.reshape(-1), atol=1e-10)
    v = torch.randn(grad.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    token_probs = torch.softmax(policy.logits.detach(), -1)
    assert torch.allclose(fisher_vector_product(p.unsqueeze(0), token_probs, v, vocab, length).reshape(-1), fisher @ v.reshape(-1), atol=1e-10)


@pytest.mark.parametrize("reward", ["random", "count:1"])
def test_the_natural_gradient_stays_on_the_reward_tilt_and_the_plain_gradient_does_not(reward):
    natural = exact_path(PathConfig(**SMALL, reward=reward, optimizer="natural"))
    sgd = exact_path(PathConfig(**SMALL, reward=reward, optimizer="sgd"))
    for kl in (0.1, 0.5, 1.0, 2.0):
        assert natural["read_off"][kl]["reward_efficiency"] == pytest.approx(1.0, abs=5e-3)
        assert sgd["read_off"][kl]["reward_efficiency"] < (0.95 if kl < 1 else 1.0)
        for path in (natural, sgd):  # nothing beats the frontier
            assert path["read_off"][kl]["efficiency"] <= 1 + 1e-3 and path["read_off"][kl]["reward_efficiency"] <= 1 + 1e-3
    assert natural["small_kl_efficiency"] == pytest.approx(1.0, abs=1e-9)
    # the first step's Fisher cosine predicts the path at small KL
    assert sgd["read_off"][0.01]["reward_efficiency"] == pytest.approx(sgd["small_kl_efficiency"], abs=0.03)
    assert natural["kl"][-1] > 2.0 and sgd["kl"][-1] > 2.0


def test_with_a_kl_coefficient_the_natural_flow_still_follows_the_tilt():
    path = exact_path(PathConfig(**SMALL, optimizer="natural", beta=0.05, max_kl=1.0))
    assert path["read_off"][0.5]["reward_efficiency"] == pytest.approx(1.0, abs=5e-3)
    assert math.isnan(path["read_off"][2.0]["reward_efficiency"])  # not reached: the path stopped at KL 1


def test_sampled_gradients_run_and_bad_settings_are_refused():
    path = exact_path(PathConfig(**SMALL, optimizer="adam", samples=8, max_kl=0.5, max_steps=3000))
    assert path["kl"][-1] > 0.5 and 0 < path["read_off"][0.1]["reward_efficiency"] <= 1.0
    # a noisy natural gradient at a large step overflows a rare prefix's logits: the path ends before it, finite
    wild = exact_path(PathConfig(**SMALL, optimizer="natural", samples=2, lr=5.0, max_steps=400, max_kl=1e9))
    assert wild["diverged_at"] is not None and wild["steps"] == wild["diverged_at"] - 1
    assert torch.isfinite(wild["kl"]).all() and torch.isfinite(wild["reward"]).all()
    with pytest.raises(ValueError, match="samples 1"):
        exact_path(PathConfig(**SMALL, samples=1))
    with pytest.raises(ValueError, match="optimizer 'lbfgs'"):
        exact_path(PathConfig(**SMALL, optimizer="lbfgs"))


def test_lab_path_command(capsys):
    from tilt.cli import path_lab

    assert set(path_lab.HELP) == {f.name for f in dataclasses.fields(PathConfig)}
    parser = argparse.ArgumentParser()
    path_lab.add_lab_parsers(parser.add_subparsers(dest="experiment", required=True))
    args = parser.parse_args("path --vocab 4 --contexts 2 --optimizer adam --max-kl 0.6 --json".split())
    assert args.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["path"]["kl"][0] == 0.0 and out["path"]["kl"][-1] > 0.6 and out["lr"] == 0.002
    assert 0.5 < out["read_off"]["0.5"]["reward_efficiency"] < 1.0
    args = parser.parse_args("path --vocab 4 --contexts 2 --max-kl 0.2".split())
    assert args.run(args) == 0
    text = capsys.readouterr().out
    assert "reward efficiency" in text and "Fisher cosine" in text
