"""The adaptive KL controller (Ziegler et al. 2019) and the KL budget in KL-regularised RL: the update by hand, an
exact resume, the budget stop, and in the lab where an adaptive-beta run lands relative to pi* at its final beta."""
import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from tilt.lab.kl_target import adaptive_beta_report
from tilt.lab.tabular import random_tabular_policy
from tilt.lab.world import TableReward, reward_table
from tilt.math import exact
from tilt.math.kl_control import adaptive_kl_beta, proportional_kl_error
from tilt.recipes import kl_rl
from tilt.recipes.common import KLControlState


def test_controller_update_by_hand():
    # KL 3 against a target of 2: error 0.5, clipped to 0.2; gain 64 / 10000
    assert adaptive_kl_beta(0.1, 3.0, target=2.0, horizon=10000, n_steps=64) == pytest.approx(0.1 * (1 + 0.2 * 0.0064), abs=1e-15)
    # KL 1.9: error -0.05, inside the clip
    assert adaptive_kl_beta(0.1, 1.9, target=2.0, horizon=10000, n_steps=64) == pytest.approx(0.1 * (1 - 0.05 * 0.0064), abs=1e-15)
    assert adaptive_kl_beta(0.3, 2.0, target=2.0, horizon=100, n_steps=10) == 0.3  # on target: unchanged
    assert proportional_kl_error(0.0, 1.0) == -0.2
    with pytest.raises(ValueError, match="target"):
        proportional_kl_error(1.0, 0.0)


def _lab(seed=0):
    ref = random_tabular_policy(3, 3, 1, seed=seed)
    rewards = reward_table("random", 3, 3, 1, reward_seed=seed + 1)
    return ref, rewards, TableReward(rewards, 3, 3)


def _config(**kw):
    base = dict(beta=0.5, steps=6, prompts_per_step=1, samples_per_prompt=16, lr=0.05, kl_target=0.3, kl_horizon=160.0)
    return kl_rl.KLRLConfig(**{**base, **kw})


def test_adaptive_run_resumes_bit_exactly(tmp_path):
    """6 steps in one go equal 3 steps, a checkpoint (policy, optimizer state, controller state through safetensors),
    and 3 more: same betas, same logits, bit for bit."""
    ref, _, reward = _lab()
    cfg = _config()
    whole, whole_betas = ref.copy(), []
    kl_rl.train(cfg, whole, ref, reward, [0], kl_state=KLControlState(beta=cfg.beta), on_step=lambda s, m: whole_betas.append(m["beta"]))

    first, betas = ref.copy(), []
    state = KLControlState(beta=cfg.beta)
    opt = kl_rl.train(kl_rl.KLRLConfig(**{**kl_rl.config_dict(cfg), "steps": 3}), first, ref, reward, [0], kl_state=state,
                      on_step=lambda s, m: betas.append(m["beta"]))
    save_file({"logits": first.logits.detach(), **state.state_tensors()}, str(tmp_path / "ckpt.safetensors"))
    opt_state = copy.deepcopy(opt.state_dict())

    saved = load_file(str(tmp_path / "ckpt.safetensors"))
    resumed = ref.copy()
    with torch.no_grad():
        resumed.logits.copy_(saved["logits"])
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=cfg.lr, weight_decay=0.0)
    opt2.load_state_dict(opt_state)
    kl_rl.train(cfg, resumed, ref, reward, [0], optimizer=opt2, start_step=3, kl_state=KLControlState.from_tensors(saved),
                on_step=lambda s, m: betas.append(m["beta"]))
    assert betas == whole_betas
    assert len(set(betas)) == 6  # beta moved every step
    assert torch.equal(resumed.logits, whole.logits)
    with pytest.raises(ValueError, match="kl_state"):
        kl_rl.train(cfg, ref.copy(), ref, reward, [0], start_step=3)


def test_fixed_beta_is_logged_and_unchanged():
    ref, _, reward = _lab()
    seen = []
    kl_rl.train(_config(kl_target=0.0, steps=3), ref.copy(), ref, reward, [0], on_step=lambda s, m: seen.append(m["beta"]))
    assert seen == [0.5, 0.5, 0.5]


def test_kl_budget_stops_at_the_first_step_over_it():
    ref, _, reward = _lab()
    cfg = _config(kl_target=0.0, beta=0.05, lr=0.2, steps=60, kl_budget=0.3)
    state, seen = KLControlState(beta=cfg.beta), []
    kl_rl.train(cfg, ref.copy(), ref, reward, [0], kl_state=state, on_step=lambda s, m: seen.append((s, m["kl_ref"], m["kl_budget_exceeded"])))
    last_step, last_kl, last_flag = seen[-1]
    assert last_step < 59 and state.budget_exceeded_step == last_step  # stopped early, and said where
    assert last_kl > 0.3 and last_flag == 1.0
    assert all(kl <= 0.3 and flag == 0.0 for _, kl, flag in seen[:-1])
    assert KLControlState.from_tensors(state.state_tensors()) == state


def test_config_rejects_a_controller_without_a_starting_beta():
    with pytest.raises(ValueError, match="beta = 0"):
        _config(beta=0.0)
    with pytest.raises(ValueError, match="kl_target"):
        _config(kl_target=-1.0)


@pytest.mark.slow
def test_adaptive_beta_lands_on_the_pi_star_with_the_target_kl():
    """From beta = 0.5, a KL target of 0.5 nats: after 400 steps (Adam, constant lr, K_beta = 0.1 as in Ziegler et al.
    §2.2) the final beta is within 5% of the beta whose exact pi* has KL 0.5 (about 0.23), that pi*'s KL is within
    0.05 nats of the target, and the policy is within KL 0.02 of the pi* at the final beta."""
    r = adaptive_beta_report(kl_target=0.5, beta=0.5, steps=400, batch=64, lr=0.05, lr_schedule="constant", gain=0.1)
    ref = random_tabular_policy(3, 3, 1, seed=0)  # the report's world, rebuilt to check its beta_for_target by hand
    rewards = reward_table("random", 3, 3, 1, reward_seed=1)
    log_p = ref.support_logprobs().detach() + rewards / r["beta_for_target"]
    log_p = log_p - log_p.logsumexp(-1, keepdim=True)
    assert exact.kl(log_p, ref.support_logprobs().detach()).item() == pytest.approx(0.5, abs=1e-9)
    assert abs(0.5 / r["beta_for_target"] - 1) > 0.5  # it had far to go
    assert abs(r["final_beta"] / r["beta_for_target"] - 1) < 0.05
    assert abs(r["target_kl_ref"] - 0.5) < 0.05
    assert r["kl_policy_target"] < 0.02
    assert r["betas"][0] == 0.5 and len(r["betas"]) == 400
