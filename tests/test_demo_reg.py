"""Demonstration-regularised RL (Tiapkin et al. 2023; digest §3): the BC math, the exact tabular-MDP lab, the BC
recipe on a tabular policy, and the command line."""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math

import pytest
import torch

from tilt.lab import mdp as M
from tilt.lab.tabular import TabularPolicy, random_tabular_policy
from tilt.lab.world import TableReward, reward_table
from tilt.math.bc import bc_loss, floored_token_logprobs, label_smoothed_bc_loss
from tilt.math.preference import bradley_terry_loss
from tilt.math.target import kl_regularised_value
from tilt.recipes import bc, kl_rl

# --- math -------------------------------------------------------------------------------------------------


def test_bc_loss_counts_completion_tokens_only():
    tok = torch.log(torch.tensor([[0.5, 0.25, 0.1], [0.2, 0.4, 0.9]], dtype=torch.float64))
    mask = torch.tensor([[True, True, False], [False, True, True]])
    expected = torch.tensor([-math.log(0.5) - math.log(0.25), -math.log(0.4) - math.log(0.9)], dtype=torch.float64)
    torch.testing.assert_close(bc_loss(tok, mask), expected)


def test_label_smoothing_minimiser_and_add_one_equivalence():
    """At one context seen n times, the minimiser is (1 - eps) empirical + eps/V, and eps = V/(n+V) is add-one."""
    counts = torch.tensor([5.0, 0.0, 2.0, 1.0], dtype=torch.float64)
    n, vocab = int(counts.sum()), counts.numel()
    targets = torch.repeat_interleave(torch.arange(vocab), counts.long()).view(1, n)  # one sequence of n visits
    mask = torch.ones(1, n, dtype=torch.bool)
    for eps in (0.1, vocab / (n + vocab)):
        optimum = (1 - eps) * counts / n + eps / vocab
        logits = optimum.log().clone().requires_grad_(True)
        vocab_logprobs = torch.log_softmax(logits, -1).expand(1, n, vocab)
        label_smoothed_bc_loss(vocab_logprobs, targets, mask, smoothing=eps).sum().backward()
        assert logits.grad.abs().max() < 1e-10  # stationary point of a convex function: the minimiser
        assert optimum.min() >= eps / vocab - 1e-15
    add_one = M.behaviour_clone(counts.view(1, 1, vocab))[0, 0]
    torch.testing.assert_close((1 - vocab / (n + vocab)) * counts / n + 1 / (n + vocab), add_one)
    # eps = 0 is plain maximum likelihood
    vl = torch.log_softmax(torch.randn(2, 3, 5, dtype=torch.float64), -1)
    ids = torch.randint(0, 5, (2, 3))
    m = torch.tensor([[True, True, False], [True, False, False]])
    torch.testing.assert_close(label_smoothed_bc_loss(vl, ids, m, smoothing=0.0), bc_loss(vl.gather(-1, ids.unsqueeze(-1)).squeeze(-1), m))


def test_floored_logprobs_is_a_distribution_with_a_floor():
    vocab, floor = 5, 0.03
    logp = torch.log_softmax(3 * torch.randn(7, vocab, dtype=torch.float64), -1)
    q = floored_token_logprobs(logp, floor=floor, vocab=vocab).exp()
    torch.testing.assert_close(q.sum(-1), torch.ones(7, dtype=torch.float64))
    assert q.min() >= floor - 1e-15
    torch.testing.assert_close(q, (1 - vocab * floor) * logp.exp() + floor)
    assert floored_token_logprobs(logp, floor=0.0, vocab=vocab) is logp
    with pytest.raises(ValueError):
        floored_token_logprobs(logp, floor=0.2, vocab=vocab)


# --- the exact MDP lab ------------------------------------------------------------------------------------


def _enumerate_trajectories(mdp: M.TabularMDP, policy: torch.Tensor):
    """Every (states, actions) trajectory from state 0 with its probability under ``policy``."""
    H, S, A = mdp.rewards.shape
    out = []
    for actions in itertools.product(range(A), repeat=H):
        for nexts in itertools.product(range(S), repeat=H - 1):
            states = (0,) + nexts
            prob = 1.0
            for h in range(H):
                prob *= float(policy[h, states[h], actions[h]])
                if h + 1 < H:
                    prob *= float(mdp.transitions[h, states[h], actions[h], states[h + 1]])
            out.append((states, actions, prob))
    return out


def test_random_mdp_draws_dirichlet_transitions():
    draws = M._gamma(torch.full((100_000,), 0.5, dtype=torch.float64), torch.Generator().manual_seed(0))
    assert abs(draws.mean().item() - 0.5) < 0.01 and abs(draws.var().item() - 0.5) < 0.02  # Gamma(0.5, 1)
    mdp = M.random_mdp(5, 4, 5, seed=0)
    torch.testing.assert_close(mdp.transitions.sum(-1), torch.ones(5, 5, 4, dtype=torch.float64))
    assert mdp.rewards.min() >= 0 and mdp.rewards.max() <= 1
    torch.testing.assert_close(M.random_mdp(5, 4, 5, seed=0).transitions, mdp.transitions)  # a function of the seed


def test_values_and_trajectory_kl_match_enumeration():
    mdp = M.random_mdp(2, 2, 3, seed=4)
    p = torch.softmax(torch.randn(3, 2, 2, dtype=torch.float64), -1)
    q = torch.softmax(torch.randn(3, 2, 2, dtype=torch.float64), -1)
    trajs = _enumerate_trajectories(mdp, p)
    assert abs(sum(t[2] for t in trajs) - 1) < 1e-12
    ret = sum(prob * sum(float(mdp.rewards[h, s[h], a[h]]) for h in range(3)) for s, a, prob in trajs)
    kl = sum(prob * sum(math.log(p[h, s[h], a[h]] / q[h, s[h], a[h]]) for h in range(3)) for s, a, prob in trajs if prob > 0)
    assert abs(float(M.policy_values(mdp, p)[0, 0]) - ret) < 1e-12
    assert abs(M.trajectory_kl(mdp, p, q) - kl) < 1e-12
    assert abs(M.trajectory_kl(mdp, p, p)) < 1e-15


def test_soft_value_iteration_is_the_regularised_optimum():
    mdp = M.random_mdp(4, 3, 4, seed=2)
    prior = torch.softmax(torch.randn(4, 4, 3, dtype=torch.float64), -1)
    lam = 0.3

    def reg_value(pi):
        return float(M.policy_values(mdp, pi)[0, 0]) - lam * M.trajectory_kl(mdp, pi, prior)

    policy, values = M.soft_value_iteration(mdp, prior, lam)
    assert abs(reg_value(policy) - float(values[0, 0])) < 1e-12  # V_lam(pi*) = V^pi* - lam KL_traj(pi* || prior)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        other = torch.softmax(policy.log() + 0.5 * torch.randn(policy.shape, generator=g, dtype=torch.float64), -1)
        assert reg_value(other) < float(values[0, 0])
    greedy, _ = M.soft_value_iteration(mdp, prior, 0.0)
    assert abs(float(M.policy_values(mdp, greedy)[0, 0]) - float(M.optimal_values(mdp)[1][0, 0])) < 1e-12


def test_expert_is_epsilon_optimal_and_clone_is_add_one():
    world = M.make_world(5, 4, 5, seed=0)
    assert 0 < world.epsilon_e < 0.1
    states = torch.tensor([[0, 1], [0, 2], [0, 1]])
    actions = torch.tensor([[1, 0], [1, 1], [2, 0]])
    counts = M.visit_counts(states, actions, 3, 3)
    clone = M.behaviour_clone(counts)
    torch.testing.assert_close(clone[0, 0], torch.tensor([1, 3, 2], dtype=torch.float64) / 6)
    torch.testing.assert_close(clone[1, 1], torch.tensor([3, 1, 1], dtype=torch.float64) / 5)
    torch.testing.assert_close(clone[1, 0], torch.full((3,), 1 / 3, dtype=torch.float64))  # unvisited: uniform


@pytest.mark.parametrize("shape,mdp_seed", [((5, 4, 5), 0), ((5, 4, 5), 3), ((3, 3, 4), 1), ((8, 3, 6), 2)])
def test_clone_trajectory_kl_falls_as_one_over_n(shape, mdp_seed):
    world = M.make_world(*shape, seed=mdp_seed)
    result = M.bc_rate(world, [300, 1000, 3000, 10000], seeds=5, seed=mdp_seed)
    assert -1.15 <= result["slope"] <= -0.85
    sah = shape[0] * shape[1] * shape[2]
    assert all(r["n_times_kl"] <= sah for r in result["rows"])  # N KL_traj = O(SAH)


def test_regularised_gap_never_exceeds_the_bound():
    lams = [0.0, 0.003, 0.01, 0.1, 0.3, 1.0, 3.0, 10.0]
    checked = 0
    for mdp_seed, shape in [(0, (5, 4, 5)), (1, (5, 4, 5)), (2, (3, 3, 4)), (3, (8, 3, 6)), (4, (4, 6, 5))]:
        world = M.make_world(*shape, seed=mdp_seed)
        for n in (10, 30, 300, 3000):
            for replicate in range(2):
                for lam in lams:
                    r = M.demo_rl(world, n, lam, seed=mdp_seed, replicate=replicate)
                    assert r["gap"] <= r["bound"] + 1e-12, (mdp_seed, n, lam, r)
                    assert r["gap"] >= -1e-12
                    checked += 1
    assert checked == 5 * 4 * 2 * len(lams)


@pytest.mark.parametrize("mdp_seed", [0, 1, 2])
def test_regularisation_improves_on_the_clone_and_tends_to_it(mdp_seed):
    world = M.make_world(5, 4, 5, seed=mdp_seed)
    for n in (30, 300, 3000):
        small = M.demo_rl(world, n, 0.01, seed=mdp_seed)
        assert small["gap"] < small["bc_gap"]
        rows = [M.demo_rl(world, n, lam, seed=mdp_seed) for lam in (0.1, 1.0, 10.0, 100.0, 1000.0)]
        kls = [r["kl_policy_clone"] for r in rows]
        assert all(a > b for a, b in zip(kls, kls[1:]))  # the optimum moves toward the clone as lam grows
        assert kls[-1] < 1e-6
        assert abs(rows[-1]["gap"] - rows[-1]["bc_gap"]) < 1e-3 * max(rows[-1]["bc_gap"], 1e-3) + 1e-4


@pytest.mark.parametrize("mdp_seed", [0, 1, 6])
def test_rlhf_regularised_toward_the_clone(mdp_seed):
    world = M.make_world(5, 4, 5, seed=mdp_seed)
    prefs, moderate = [30, 300, 3000], 0.5
    out = M.demo_rlhf(world, 300, prefs, [0.0, moderate], seeds=5, seed=mdp_seed)
    gaps = {(r["preferences"], r["lam"]): r["gap"] for r in out["rows"]}
    curve = [gaps[(p, moderate)] for p in prefs]
    assert all(a > b for a, b in zip(curve, curve[1:])), curve  # falls with the number of preferences
    assert curve[-1] < out["bc_gap"]  # and ends below the clone
    for p in (30, 300):
        assert gaps[(p, 0.0)] > out["bc_gap"]  # greedy on the fitted reward: reward hacking when P is small
    for p in prefs:
        assert gaps[(p, moderate)] < gaps[(p, 0.0)]


def test_preferences_are_nested_and_reward_mle_is_stationary():
    world = M.make_world(3, 2, 3, seed=5)
    clone = M.clone_from_demos(world, 100, seed=5, replicate=0)
    d_small, o_small = M.sample_preferences(world.mdp, clone, 70, seed=5, replicate=0)
    d_big, o_big = M.sample_preferences(world.mdp, clone, 4000, seed=5, replicate=0)
    torch.testing.assert_close(d_big[:70], d_small)
    torch.testing.assert_close(o_big[:70], o_small)
    r_hat = M.fit_tabular_reward(d_big, o_big)
    w = r_hat.clone().requires_grad_(True)
    zeros = torch.zeros(len(o_big), dtype=torch.float64)
    sign = 2 * o_big - 1
    (bradley_terry_loss(sign * (d_big @ w), zeros).mean() + 0.5 * M.PREFERENCE_L2 * w.dot(w)).backward()
    assert w.grad.abs().max() < 1e-8
    # with many preferences the fitted return differences track the true ones
    true_margin, fit_margin = d_big @ world.mdp.rewards.reshape(-1), d_big @ r_hat
    corr = torch.corrcoef(torch.stack([true_margin, fit_margin]))[0, 1]
    assert corr > 0.9


# --- the BC recipe on a tabular policy -------------------------------------------------------------------


def _empirical_min_nll(policy: TabularPolicy, demos) -> float:
    """The infimum of the per-token NLL: the empirical conditional entropy of the demonstrations."""
    idx = policy.prefix_index(demos.completion_ids)  # (B, L)
    ctx = demos.prompt_ids[:, :1].expand_as(idx)
    flat = ((ctx * policy.num_prefixes + idx) * policy.vocab + demos.completion_ids).reshape(-1)
    counts = torch.zeros(policy.contexts * policy.num_prefixes * policy.vocab, dtype=torch.float64)
    counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
    counts = counts.view(-1, policy.vocab)
    freq = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    return float(-(torch.where(counts > 0, counts * freq.log(), 0.0)).sum() / counts.sum())


def _demos(n: int = 150):
    expert = random_tabular_policy(3, 3, contexts=2, seed=1, scale=2.0)
    return expert, expert.sample([0, 1], n, generator=torch.Generator().manual_seed(0))


def test_bc_recipe_reaches_the_maximum_likelihood_clone():
    _, demos = _demos()
    clone = TabularPolicy(3, 3, contexts=2)
    config = bc.BCConfig(steps=300, sequences_per_step=0, lr=0.1)
    start = bc.demonstration_nll(config, clone, demos)
    assert abs(start - math.log(3)) < 1e-12
    losses = []
    bc.train(config, clone, demos, on_step=lambda s, m: losses.append(m["loss"]))
    final = bc.demonstration_nll(config, clone, demos)
    floor = _empirical_min_nll(clone, demos)
    assert losses[0] == pytest.approx(start)
    assert final < start and final - floor < 2e-3


def test_bc_gradient_does_not_depend_on_the_micro_batch_split():
    _, demos = _demos(20)
    grads = []
    for micro in (0, 7):
        policy = random_tabular_policy(3, 3, contexts=2, seed=3)
        config = bc.BCConfig(steps=1, sequences_per_step=0, lr=0.0, optimizer="sgd", micro_batch_size=micro, floor=0.05, vocab_size=3)
        opt = torch.optim.SGD(policy.parameters(), lr=0.0)
        bc.bc_step(config, policy, demos, opt)
        grads.append(policy.logits.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_bc_ignores_masked_tokens():
    _, demos = _demos(10)
    mask = demos.completion_mask.clone()
    mask[:, -1] = False  # the last token is, say, prompt or padding: it must not count
    masked = dataclasses.replace(demos, completion_mask=mask)
    policy = random_tabular_policy(3, 3, contexts=2, seed=3)
    config = bc.BCConfig()
    tok = policy.token_logprobs(demos).detach()
    expected = float(-tok[:, :-1].sum() / tok[:, :-1].numel())
    assert bc.demonstration_nll(config, policy, masked) == pytest.approx(expected, abs=1e-12)


def test_floored_clone_as_reference_of_kl_rl():
    """Clone with a floor, then KL-regularised RL toward the floored clone: the exact objective rises."""
    expert, demos = _demos()
    clone = TabularPolicy(3, 3, contexts=2)
    floor = 0.02
    bc.train(bc.BCConfig(steps=150, sequences_per_step=64, lr=0.1, floor=floor, vocab_size=3), clone, demos)
    ref = bc.FlooredPolicy(clone, floor=floor, vocab=3)
    full = clone.enumerate()
    ref_tok = ref.token_logprobs(full)
    assert ref_tok.exp().min() >= floor - 1e-15
    ref_logp = ref_tok.sum(-1).view(2, -1)  # (C, V^L)
    torch.testing.assert_close(ref_logp.exp().sum(-1), torch.ones(2, dtype=torch.float64))
    rewards = reward_table("count:2", 3, 3, 2)
    beta = 0.1
    policy = clone.copy()
    with torch.no_grad():
        before = kl_regularised_value(policy.support_logprobs(), ref_logp, rewards, beta=beta).item()
    config = kl_rl.KLRLConfig(beta=beta, steps=60, prompts_per_step=2, samples_per_prompt=16, lr=0.05)
    kl_rl.train(config, policy, ref, TableReward(rewards, 3, 3), [0, 1])
    with torch.no_grad():
        after = kl_regularised_value(policy.support_logprobs(), ref_logp, rewards, beta=beta).item()
    assert after > before + 0.01


def test_bc_config_validation():
    with pytest.raises(ValueError, match="vocab_size"):
        bc.BCConfig(floor=0.01)
    with pytest.raises(ValueError):
        bc.BCConfig(lr_schedule="cosine")


# --- command line -----------------------------------------------------------------------------------------


def _run_cli(argv, capsys) -> dict:
    from tilt.cli import demo_reg

    parser = argparse.ArgumentParser()
    demo_reg.add_lab_parsers(parser.add_subparsers(dest="experiment", required=True))
    args = parser.parse_args(argv)
    assert args.run(args) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_json_contract(capsys):
    out = _run_cli(["demo-bc", "--demos", "300,1000,3000,10000", "--seeds", "3", "--seed", "1", "--json"], capsys)
    assert out["demos"] == [300, 1000, 3000, 10000] and len(out["kl_traj"]) == 4
    assert -1.15 <= out["slope"] <= -0.85
    out = _run_cli(["demo-rl", "--states", "4", "--actions", "3", "--horizon", "4", "--demos", "100", "--lam", "0.2", "--json"], capsys)
    assert out["gap"] <= out["bound"] and out["bound"] == pytest.approx(out["epsilon_e"] + 0.2 * out["kl_traj"])
    assert out["bc_gap"] > out["gap"]
    out = _run_cli(["demo-rlhf", "--demos", "300", "--preferences", "30,300", "--lam", "0,0.5", "--seeds", "2", "--json"], capsys)
    assert {(g["preferences"], g["lam"]) for g in out["gaps"]} == {(30, 0.0), (30, 0.5), (300, 0.0), (300, 0.5)}
    assert out["bc_gap"] > 0


def test_bc_on_a_language_model_counts_the_completion_tokens_only():
    """On a GPT-2: the BC loss and gradient equal transformers' own causal-LM loss over the completion tokens (+ EOS)
    with the prompt's labels ignored (-100), one unpadded row at a time; counting the prompt tokens too would give
    another loss, so the comparison can fail."""
    from tilt.engine.hf import HFPolicy
    from tilt.engine.tiny import char_tokenizer, tiny_gpt2
    from tilt.pipelines.demo_rl import demonstration_rollout

    tok = char_tokenizer()
    policy = HFPolicy(tiny_gpt2(len(tok), n_layer=1, n_embd=16, seed=4), tok)
    rows = [{"prompt": "the cat sat", "completion": "on a mat"}, {"prompt": "hi", "completion": "there you"},
            {"prompt": "a long prompt here", "completion": "ok"}]  # prompts of different lengths: left padding
    demos = demonstration_rollout(policy, rows)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)  # lr 0: the step leaves the gradient, moves nothing
    metrics = bc.bc_step(bc.BCConfig(sequences_per_step=0), policy, demos, optimizer)
    params = [p for p in policy.parameters()]
    grads = [p.grad.clone() for p in params]

    def hf_loss(count_prompt: bool) -> torch.Tensor:
        total, tokens = 0.0, 0
        for r in rows:
            prompt = tok(r["prompt"])["input_ids"]
            completion = tok(r["completion"], add_special_tokens=False)["input_ids"] + [policy.eos_ids[0]]
            ids = torch.tensor([prompt + completion])
            labels = ids.clone() if count_prompt else torch.tensor([[-100] * len(prompt) + completion])
            n = int((labels[:, 1:] != -100).sum())  # transformers shifts the labels by one and averages over these
            total = total + policy.model(input_ids=ids, labels=labels).loss * n
            tokens += n
        return total / tokens

    expected = hf_loss(count_prompt=False)
    assert metrics["tokens"] == sum(len(r["completion"]) + 1 for r in rows)
    assert metrics["loss"] == pytest.approx(expected.item(), abs=1e-5)
    assert abs(hf_loss(count_prompt=True).item() - expected.item()) > 1e-3  # counting the prompt too: 100x the tolerance
    for p, g, want in zip(params, grads, torch.autograd.grad(expected, params)):
        torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-4)
