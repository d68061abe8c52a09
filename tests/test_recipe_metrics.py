"""Metrics the recipes log: the gradient norm is measured clipping or not; DPO's held-out pairs and TRL's keys; a
constant reward warns once; divergences are displayed clipped at zero with their estimator."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from tilt.lab.tabular import random_tabular_policy
from tilt.lab.world import TableReward, reward_table
from tilt.math.masking import masked_sum
from tilt.math.preference import dpo_sigmoid_loss
from tilt.preferences import Judge
from tilt.recipes import dpo, kl_rl, online_dpo
from tilt.recipes.common import ConstantRewardWarning, prompt_indices
from tilt.report import show_divergence


def _kl_rl_run(max_grad_norm: float, reward=None, steps: int = 3) -> list[dict]:
    ref = random_tabular_policy(3, 2, 2, seed=0)
    policy = random_tabular_policy(3, 2, 2, seed=1)
    reward = reward or TableReward(reward_table("random", 3, 2, 2, reward_seed=1), 3, 2)
    config = kl_rl.KLRLConfig(beta=0.2, steps=steps, prompts_per_step=2, samples_per_prompt=8, lr=0.1, optimizer="sgd",
                              max_grad_norm=max_grad_norm)
    log = []
    kl_rl.train(config, policy, ref, reward, [0, 1], on_step=lambda s, m: log.append(m))
    return log


def test_grad_norm_is_measured_without_clipping_and_equals_the_clipped_runs_norm():
    free = _kl_rl_run(0.0)
    loose = _kl_rl_run(1e9)  # clipping on, never binding: the same updates, norm from torch's clip_grad_norm_
    assert all(m["grad_norm"] > 0 for m in free)
    assert [m["grad_norm"] for m in free] == pytest.approx([m["grad_norm"] for m in loose], rel=1e-12)
    tight = _kl_rl_run(1e-3)  # clipping binds: the logged norm is the one before clipping, above the threshold
    assert tight[0]["grad_norm"] == pytest.approx(free[0]["grad_norm"], rel=1e-12) and tight[0]["grad_norm"] > 1e-3
    assert all(m["learning_rate"] == 0.1 for m in free)


# --- DPO -----------------------------------------------------------------------------------------------------------
def _pairs(policy, context: int, n: int, seed: int) -> dpo.PreferencePairs:
    """n pairs of distinct sequences of one context of the tabular policy, consistently labelled: the chosen one is the
    earlier in code order (a total order, so the labels can all be learnt)."""
    everything = policy.enumerate()
    per_context = policy.vocab ** policy.length
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(per_context, (n,), generator=g)
    b = (a + 1 + torch.randint(per_context - 1, (n,), generator=g)) % per_context  # never equal to a
    offset = context * per_context
    return dpo.PreferencePairs(everything.take(torch.minimum(a, b) + offset), everything.take(torch.maximum(a, b) + offset))


def test_dpo_logs_trl_keys_and_evaluates_held_out_pairs_only():
    ref = random_tabular_policy(3, 2, 2, seed=0)
    policy = ref.copy()
    train_pairs, eval_pairs = _pairs(ref, 0, 12, seed=1), _pairs(ref, 1, 6, seed=2)  # contexts 0 and 1: separate tables
    config = dpo.DPOConfig(beta=0.5, epochs=2, pairs_per_step=4, lr=0.5, optimizer="sgd", eval_every=2)
    log = []
    dpo.train(config, policy, ref, train_pairs, eval_pairs=eval_pairs, on_step=lambda s, m: log.append(m))
    assert len(log) == 6
    with_eval = [i for i, m in enumerate(log) if "eval/loss" in m]
    assert with_eval == [1, 3, 5]  # every eval_every = 2 steps, and the last
    # The held-out pairs are of context 1, which training never touches (the tabular policy's contexts share no
    # parameter): were they trained on, their loss would move off log 2 and their margins off 0.
    for i in with_eval:
        assert log[i]["eval/loss"] == pytest.approx(math.log(2), abs=1e-12)
        assert log[i]["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-12)
    assert log[-1]["loss"] < math.log(2) - 0.05  # while the training pairs were learnt
    with torch.no_grad():  # eval/logps/chosen by hand: the mean log pi of the held-out chosen completions
        lp = masked_sum(policy.token_logprobs(eval_pairs.chosen), eval_pairs.chosen.completion_mask)
    assert log[-1]["eval/logps/chosen"] == pytest.approx(lp.mean().item(), rel=1e-12)
    # TRL's keys at step 0, by hand: pi = pi_ref, so both implicit rewards are 0 and logps are pi_ref's
    first = log[0]
    idx = torch.tensor(prompt_indices(len(train_pairs), 0, 4, config.seed))
    chosen = train_pairs.chosen.take(idx)
    with torch.no_grad():
        ref_c = masked_sum(ref.token_logprobs(chosen), chosen.completion_mask)
    assert first["logps/chosen"] == pytest.approx(ref_c.mean().item(), rel=1e-12)
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0 and first["rewards/accuracies"] == 0.0
    for m in log:
        assert m["rewards/margins"] == pytest.approx(m["reward_margin"], abs=1e-12)
        assert m["rewards/margins"] == pytest.approx(m["rewards/chosen"] - m["rewards/rejected"], abs=1e-12)
        assert m["rewards/accuracies"] == pytest.approx(m["accuracy"]) and m["grad_norm"] > 0 and m["step_time"] >= 0
    assert log[-1]["rewards/accuracies"] > 0.5 and log[-1]["learning_rate"] == 0.5


def test_dpo_eval_loss_matches_the_loss_by_hand_on_moved_pairs():
    """Held-out pairs of the trained context: eval/loss is the mean sigmoid loss of the final policy on them."""
    ref = random_tabular_policy(3, 2, 1, seed=3)
    policy = ref.copy()
    train_pairs, eval_pairs = _pairs(ref, 0, 8, seed=4), _pairs(ref, 0, 5, seed=5)
    log = []
    dpo.train(dpo.DPOConfig(beta=0.5, epochs=1, pairs_per_step=4, lr=0.5, optimizer="sgd"), policy, ref, train_pairs,
              eval_pairs=eval_pairs, on_step=lambda s, m: log.append(m))
    assert "eval/loss" not in log[0] and "eval/loss" in log[-1]  # eval_every = 0: after the last step only
    with torch.no_grad():
        lp = [masked_sum(p.token_logprobs(r), r.completion_mask) for p in (policy, ref) for r in (eval_pairs.chosen, eval_pairs.rejected)]
    expected = dpo_sigmoid_loss(lp[0], lp[1], lp[2], lp[3], beta=0.5).mean().item()
    assert log[-1]["eval/loss"] == pytest.approx(expected, rel=1e-10) and expected != pytest.approx(math.log(2), abs=1e-3)


# --- a constant reward --------------------------------------------------------------------------------------------
def _warnings_of(fn) -> list:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [w for w in caught if issubclass(w.category, ConstantRewardWarning)]


def test_a_constant_reward_warns_once_and_a_varying_one_never():
    constant = TableReward(torch.ones(2, 9, dtype=torch.float64), 3, 2)
    caught = _warnings_of(lambda: _kl_rl_run(0.0, reward=constant, steps=6))
    assert len(caught) == 1 and "no learning signal" in str(caught[0].message) and "step 2" in str(caught[0].message)
    log = _kl_rl_run(0.0, reward=constant, steps=2)
    assert [m["frac_reward_zero_std"] for m in log] == [1.0, 1.0]
    assert _warnings_of(lambda: _kl_rl_run(0.0, steps=6)) == []
    assert _warnings_of(lambda: _kl_rl_run(0.0, reward=constant, steps=2)) == []  # two steps: not yet "a few"


def test_an_oracle_that_always_ties_warns_in_online_dpo():
    ref = random_tabular_policy(3, 2, seed=1)
    config = online_dpo.OnlineDPOConfig(scheme="online-dpo", alpha=0.0, beta=0.5, steps=4, prompts_per_step=8, lr=0.1)
    tie = Judge(lambda prompt, a, b: "tie")
    caught = _warnings_of(lambda: online_dpo.train(config, ref.copy(), ref, tie, [0]))
    assert len(caught) == 1


# --- the display of a divergence ----------------------------------------------------------------------------------
def test_divergences_are_shown_clipped_at_zero_with_their_estimator():
    assert show_divergence(-0.0328, (-0.05, 0.01), estimator="k1") == "0 [0, 0.01] (k1; raw estimate -0.0328)"
    assert show_divergence(0.25, (-0.1, 0.6), estimator="SNIS") == "0.25 [0, 0.6] (SNIS)"
    assert show_divergence(0.25, None, estimator="k3") == "0.25 (k3)"
    assert show_divergence(float("nan"), estimator="k1").startswith("–")


def test_tilt_sample_says_when_it_shortens_text(capsys):
    from tilt.cli.evaluate import _print_samples

    long_text = "word " * 40  # 200 characters
    rows = [{"prompt": "p", "completion": long_text, "reward": 1.0}, {"prompt": "p", "completion": "short", "reward": 0.0}]
    _print_samples({"mode": "plain", "model": "m"}, rows)
    out = capsys.readouterr().out
    assert long_text not in out and "1 of the texts above are cut to 100 characters" in out and "--full-text" in out
    _print_samples({"mode": "plain", "model": "m"}, rows, full_text=True)
    out = capsys.readouterr().out
    assert long_text in out and "cut to" not in out
    _print_samples({"mode": "plain", "model": "m"}, rows[1:])
    assert "cut to" not in capsys.readouterr().out  # nothing shortened, nothing said
