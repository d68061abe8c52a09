"""The KL-regularised recipe on a tiny GPT-2 built from a config, with a programmatic reward."""
import pytest
import torch

from tilt.engine.hf import HFPolicy, SamplingConfig
from tilt.engine.tiny import char_tokenizer, tiny_gpt2
from tilt.recipes import kl_rl
from tilt.rewards import RewardError

PROMPTS = ["hello", "the cat", "a dog", "why"]


def share_of_a(prompts, completions):
    return [c.count("a") / max(len(c), 1) for c in completions]


def run(beta, steps=60):
    tok = char_tokenizer()
    policy = HFPolicy(tiny_gpt2(len(tok)), tok, SamplingConfig(max_new_tokens=8))
    ref = HFPolicy(tiny_gpt2(len(tok)), tok, SamplingConfig(max_new_tokens=8))
    cfg = kl_rl.KLRLConfig(beta=beta, steps=steps, prompts_per_step=4, samples_per_prompt=4, lr=3e-3)
    history = []
    kl_rl.train(cfg, policy, ref, share_of_a, PROMPTS, on_step=lambda s, m: history.append(m))
    q = steps // 4
    quarter = lambda key, i: sum(m[key] for m in history[i * q:(i + 1) * q]) / q  # noqa: E731
    return quarter


@pytest.mark.slow
def test_reward_rises_and_kl_levels_off_only_with_a_penalty():
    kl_reg, pure = run(0.1), run(0.0)
    assert kl_reg("reward", 3) > kl_reg("reward", 0) + 0.04
    assert pure("reward", 3) > pure("reward", 0) + 0.5
    # beta > 0: KL to the reference levels off; beta = 0: it keeps growing, far above
    assert kl_reg("kl_ref", 3) < 2.0 and kl_reg("kl_ref", 3) < 1.5 * kl_reg("kl_ref", 1)
    assert pure("kl_ref", 3) > 2.0 * pure("kl_ref", 1)
    assert pure("kl_ref", 3) > 5.0 * kl_reg("kl_ref", 3)


def test_a_reward_that_raises_or_returns_nan_names_the_sample():
    tok = char_tokenizer()
    policy = HFPolicy(tiny_gpt2(len(tok)), tok, SamplingConfig(max_new_tokens=4))
    cfg = kl_rl.KLRLConfig(steps=1, prompts_per_step=2, samples_per_prompt=2)

    def broken(prompts, completions):
        raise KeyError("label")

    with pytest.raises(RewardError, match=r"raised KeyError.*\n  on sample 0 of 4: prompt"):
        kl_rl.train(cfg, policy, policy, broken, PROMPTS)
    with pytest.raises(RewardError, match=r"not finite\) for sample 1: prompt"):
        kl_rl.train(cfg, policy, policy, lambda p, c: [0.0, float("nan"), 0.0, 0.0], PROMPTS)
    with pytest.raises(RewardError, match="returned 3 values for 4"):
        kl_rl.train(cfg, policy, policy, lambda p, c: [0.0] * 3, PROMPTS)


def test_reward_errors_name_the_sample_that_broke():
    from tilt.rewards import score_rewards

    def picky(prompts, completions):
        return [1.0 / (len(c) - 3) for c in completions]  # raises on a completion of length 3

    with pytest.raises(RewardError, match=r"ZeroDivisionError.*\n  on sample 2 of 3: prompt 'c', completion 'xyz'"):
        score_rewards(picky, ["a", "b", "c"], ["x", "xy", "xyz"])
    with pytest.raises(RewardError, match="not a sequence of floats"):
        score_rewards(lambda p, c: None, ["a"], ["b"])


def test_a_reduced_dtype_computes_in_it_and_keeps_float32_weights_that_train(tmp_path):
    """run.dtype bfloat16: the forward passes run in bfloat16 (log-probs differ from float32's) but the weights stay
    float32, so a step at lr 1e-5 moves every one that has a gradient; bfloat16 weights would keep most unchanged. Policy and
    reference compute alike (KL 0 before training), and rollouts are a proposal's (the decode rounds differently)."""
    from tilt.runs.config import RunConfig
    from tilt.runs.setup import load_policy_and_ref

    tok = char_tokenizer()
    tiny_gpt2(len(tok), seed=3).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    sampling = SamplingConfig(max_new_tokens=6)
    run_config = RunConfig(model=str(tmp_path / "m"), ref=str(tmp_path / "m"), device="cpu", dtype="bfloat16")
    policy, ref, _ = load_policy_and_ref(run_config, None, sampling, None)
    assert next(policy.model.parameters()).dtype == torch.float32 and policy.compute_dtype == torch.bfloat16
    rollout = policy.sample(PROMPTS, 2, generator=torch.Generator().manual_seed(0))
    assert not rollout.sampled_from_policy and rollout.from_proposal and rollout.sampler == "autocast"
    assert torch.equal(policy.token_logprobs(rollout), ref.token_logprobs(rollout))
    full32, _, _ = load_policy_and_ref(RunConfig(model=str(tmp_path / "m"), ref=str(tmp_path / "m"), device="cpu", dtype="float32"), None, sampling, None)
    assert (policy.token_logprobs(rollout) - full32.token_logprobs(rollout)).abs().max() > 1e-4  # bfloat16 arithmetic

    def moved_fraction(model):
        before = [p.detach().clone() for p in model.parameters()]
        cfg = kl_rl.KLRLConfig(steps=1, prompts_per_step=4, samples_per_prompt=2, lr=1e-5)
        kl_rl.train(cfg, HFPolicy(model, tok, sampling, compute_dtype=torch.bfloat16), ref, share_of_a, PROMPTS)
        changed = sum(int((p.detach() != b).sum()) for p, b in zip(model.parameters(), before))
        return changed / sum(b.numel() for b in before)

    # every weight with a gradient moves (unused position and token embeddings have none)
    moved32, moved16 = moved_fraction(policy.model), moved_fraction(tiny_gpt2(len(tok), seed=3).bfloat16())
    assert moved32 > 0.8 and moved16 < 0.5 * moved32, (moved32, moved16)
    print(f"moved by one step at lr 1e-5: float32 weights {moved32:.3f}, bfloat16 weights {moved16:.3f}")
