"""The fast sampler (tilt.engine.fast_sampler): a reduced-precision copy q of the policy draws the completions,
records log q, follows the trained weights, and KL-RL corrects its samples by pi/q in one forward pass."""
import warnings

import pytest
import torch
from torch import nn

from tilt.engine import fast_sampler
from tilt.engine.hf import HFPolicy, SamplingConfig
from tilt.engine.tiny import char_tokenizer, tiny_llama
from tilt.recipes import kl_rl

PROMPTS = ["ab", "hello there"]


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def policy_with(tokenizer, sampler, seed=0, refresh_steps=1):
    sampling = SamplingConfig(max_new_tokens=8, sampler=sampler, sampler_refresh_steps=refresh_steps)
    return HFPolicy(tiny_llama(len(tokenizer), seed=seed), tokenizer, sampling)


def sgd_step(policy, rollout):
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    (-policy.token_logprobs(rollout).sum()).backward()
    opt.step()


def copy_logprobs(policy, rollout):
    """(B, T) log-probs of the rollout under the policy's current sampler copy, scored by one full-sequence pass."""
    scorer = HFPolicy(policy.fast_sampler.copy, policy.tokenizer, SamplingConfig(sampler="exact"))
    with torch.no_grad():
        return scorer.token_logprobs(rollout).float()


@torch.no_grad()
def replayed_logprobs(model, rollout):
    """(B, T) log-probs of the rollout's tokens as ``model`` decodes them one token at a time over the whole batch
    with a KV cache. Dynamic int8 layers quantise each call's activations with that call's range, so this (not a
    full-sequence pass) is the distribution the sampler drew each token from."""
    from transformers import DynamicCache

    k = rollout.samples_per_prompt  # each distinct prompt is pre-filled once, as the sampler does
    ids, mask = rollout.prompt_ids[::k], rollout.prompt_mask[::k].long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
    logits, mask, positions = (x.repeat_interleave(k, 0) for x in (logits, mask, positions))
    cache.batch_repeat_interleave(k)
    out = []
    for t in range(rollout.completion_ids.shape[1]):
        y = rollout.completion_ids[:, t]
        out.append(torch.log_softmax(logits, -1).gather(-1, y[:, None])[:, 0])
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
        positions = positions[:, -1:] + 1
        logits = model(input_ids=y[:, None], attention_mask=mask, position_ids=positions, cache=cache, use_cache=True).logits[:, -1].float()
    return torch.stack(out, -1)


@pytest.mark.parametrize("kind", ["int8", "int8-smooth", "fp16", "bf16"])
def test_rollout_records_the_samplers_log_probs(tokenizer, kind):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 on a CPU without native bfloat16 warns that it is slow
        policy = policy_with(tokenizer, kind)
    policy.eos_ids = [-1]  # full-length rows: the running batch never shrinks, so a plain replay sees the same batches
    rollout = policy.sample(PROMPTS, 3, generator=torch.Generator().manual_seed(0))
    assert rollout.sampler == kind and rollout.from_proposal and not rollout.sampled_from_policy
    q = replayed_logprobs(policy.fast_sampler.copy, rollout)
    with torch.no_grad():
        pi = policy.token_logprobs(rollout)
    assert torch.allclose(rollout.sample_token_logprobs, q, atol=1e-5)
    gap = (rollout.sample_token_logprobs - pi).abs()
    assert gap.max() > 1e-6  # q is not pi ...
    assert gap.mean() < 0.1  # ... but close to it


def test_copy_is_refreshed_after_an_optimizer_step_and_only_then(tokenizer):
    policy = policy_with(tokenizer, "int8")
    first = policy.sample(PROMPTS, 2, generator=torch.Generator().manual_seed(1))
    assert policy.fast_sampler.refreshes == 1 and first.sampler_refresh_seconds > 0
    again = policy.sample(PROMPTS, 2, generator=torch.Generator().manual_seed(1))
    assert policy.fast_sampler.refreshes == 1 and again.sampler_refresh_seconds == 0.0
    assert torch.equal(first.completion_ids, again.completion_ids)

    sgd_step(policy, first)
    after = policy.sample(PROMPTS, 2, generator=torch.Generator().manual_seed(1))
    assert policy.fast_sampler.refreshes == 2 and after.sampler_refresh_seconds > 0
    # the refreshed copy is what a copy built from scratch from the updated weights would be
    fresh = fast_sampler.build_int8_copy(policy.model)
    scorer = HFPolicy(fresh, tokenizer, SamplingConfig(sampler="exact"))
    with torch.no_grad():
        expected = scorer.token_logprobs(after)
    assert torch.allclose(copy_logprobs(policy, after), expected.float(), atol=1e-6)
    stale = HFPolicy(fast_sampler.build_int8_copy(policy_with(tokenizer, "exact").model), tokenizer, SamplingConfig(sampler="exact"))
    with torch.no_grad():
        assert not torch.allclose(stale.token_logprobs(after), expected, atol=1e-3)


def test_auto_and_fallbacks(tokenizer, monkeypatch):
    model = tiny_llama(len(tokenizer))
    assert fast_sampler.resolve_sampler("auto", model)[0] == "exact"  # a tiny model is overhead-bound
    monkeypatch.setattr(fast_sampler, "AUTO_MIN_LINEAR_PARAMS", 0)
    expected = "fp16" if fast_sampler.int8_is_available(torch.device("cpu")) else ("bf16" if fast_sampler.bf16_is_fast(torch.device("cpu")) else "exact")
    assert fast_sampler.resolve_sampler("auto", model)[0] == expected
    # a model that already decodes under half-precision autocast keeps its own decode; an explicit choice still holds
    for half in (torch.bfloat16, torch.float16):
        assert fast_sampler.resolve_sampler("auto", model, half) == ("exact", f"the model itself already decodes in {str(half)[6:]} under autocast")
    assert fast_sampler.resolve_sampler("auto", model, torch.float32)[0] == expected
    if fast_sampler.int8_is_available(torch.device("cpu")):
        assert fast_sampler.resolve_sampler("fp16", model, torch.bfloat16)[0] == "fp16"
    monkeypatch.setattr(fast_sampler, "AUTO_MIN_LINEAR_PARAMS", 0)
    policy = HFPolicy(model, tokenizer, SamplingConfig(max_new_tokens=4), compute_dtype=torch.bfloat16)
    assert policy.sampler_kind == "exact" and policy.fast_sampler is None
    # where int8 kernels are missing (a CUDA device), int8 falls back to bf16 if native, else to exact, with a warning
    monkeypatch.setattr(fast_sampler, "int8_is_available", lambda device: False)
    for native, fallback in ((True, "bf16"), (False, "exact")):
        monkeypatch.setattr(fast_sampler, "bf16_is_fast", lambda device, native=native: native)
        with pytest.warns(UserWarning, match="int8"):
            assert fast_sampler.resolve_sampler("int8", model)[0] == fallback
    with pytest.raises(ValueError, match="sampler"):
        SamplingConfig(sampler="fp8")


def test_cpu_flags_decide_bf16(monkeypatch):
    monkeypatch.setattr(fast_sampler, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert not fast_sampler.bf16_is_fast(torch.device("cpu"))
    monkeypatch.setattr(fast_sampler, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert fast_sampler.bf16_is_fast(torch.device("cpu"))


def test_kl_rl_step_with_the_int8_sampler_scores_the_policy_once(tokenizer):
    """The correction's pi log-probs come from the update's own forward pass: one policy pass per step, as exact."""
    policy = policy_with(tokenizer, "int8")
    ref = policy_with(tokenizer, "exact")
    calls = []
    scoring = policy.token_logprobs
    policy.token_logprobs = lambda rollout: calls.append(len(rollout)) or scoring(rollout)
    config = kl_rl.KLRLConfig(beta=0.1, steps=2, prompts_per_step=2, samples_per_prompt=4, lr=1e-2)
    logged = []
    kl_rl.train(config, policy, ref, lambda prompts, completions: torch.tensor([c.count("a") / 8 for c in completions]), PROMPTS,
                on_step=lambda s, m: logged.append(m))
    assert calls == [8, 8]
    for m in logged:
        assert m["sampler/kl_q_pi"] != 0.0 and 0 < m["sampler/ess_fraction"] <= 1
        assert m["sampler/refresh_seconds"] > 0  # the second step's copy was refreshed after the first update


def test_refresh_every_n_steps_and_by_cost(tokenizer, monkeypatch):
    policy = policy_with(tokenizer, "int8", refresh_steps=2)
    rollout = policy.sample(PROMPTS, 2, generator=torch.Generator().manual_seed(1))
    counts = []
    for _ in range(4):
        sgd_step(policy, rollout)
        rollout = policy.sample(PROMPTS, 2, generator=torch.Generator().manual_seed(1))
        counts.append(policy.fast_sampler.refreshes)
    assert counts == [1, 2, 2, 3]  # built once, then after every second update

    by_cost = policy_with(tokenizer, "int8", refresh_steps=0)
    by_cost.sample(PROMPTS, 2)
    sampler = by_cost.fast_sampler
    sampler.last_refresh_seconds = 1.0  # pretend a refresh costs 1 s: due after 4 s of sampling (20% budget)
    sampler.sampling_seconds_since_refresh = 0.0
    sgd_step(by_cost, rollout)
    by_cost.sample(PROMPTS, 2)
    assert sampler.refreshes == 1  # weights changed, but little sampling time since the refresh
    sampler.sampling_seconds_since_refresh = 4.5
    by_cost.sample(PROMPTS, 2)
    assert sampler.refreshes == 2
    by_cost.sample(PROMPTS, 2)
    assert sampler.refreshes == 2  # nothing changed since


def test_smooth_int8_layer_moves_an_outlier_channel_into_the_weights():
    """SmoothQuant's factors leave the float product unchanged; quantised per token after smoothing, a layer whose
    input has one outlier channel (as LLM activations do) stays within 1% where one scale per call, or per-token
    scales without smoothing, do not; and a row's output does not depend on the other rows of the call."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    x = torch.randn(20, 64)
    x[:, 3] *= 60  # the outlier channel
    exact = linear(x).detach()
    smoothing = fast_sampler.smoothing_factors(x.abs().amax(0), linear.weight)
    with torch.no_grad():
        torch.testing.assert_close((x / smoothing) @ (linear.weight * smoothing).T + linear.bias, exact, rtol=1e-4, atol=1e-4)

    def error(layer):
        with torch.no_grad():
            return ((layer(x) - exact).norm() / exact.norm()).item()

    smooth = fast_sampler.SmoothInt8Linear(linear, smoothing)
    unsmoothed = fast_sampler.SmoothInt8Linear(linear, torch.ones(64))
    assert error(smooth) < 0.01
    assert error(unsmoothed) > 3 * error(smooth)
    assert error(fast_sampler.int8_linear(linear)) > 10 * error(smooth)
    with torch.no_grad():
        assert torch.equal(smooth(x[:1]), smooth(x)[:1])


def test_smooth_int8_copy_is_calibrated_once_and_requantised_at_refresh(tokenizer):
    policy = policy_with(tokenizer, "int8-smooth")
    with pytest.raises(ValueError, match="calibration"):
        fast_sampler.FastSampler(policy.model, "int8-smooth").refresh(policy.model)
    rollout = policy.sample(PROMPTS, 2, generator=torch.Generator().manual_seed(1))
    name = "model.layers.0.mlp.down_proj"
    layer = policy.fast_sampler.copy.get_submodule(name)
    smoothing = 1.0 / layer.inv_smoothing.clone()
    codes = layer.weight_codes_t.clone()
    sgd_step(policy, rollout)
    policy.sample(PROMPTS, 2, generator=torch.Generator().manual_seed(1))
    assert policy.fast_sampler.refreshes == 2
    assert torch.equal(1.0 / layer.inv_smoothing, smoothing)  # the calibrated factors are kept
    fresh = fast_sampler.SmoothInt8Linear(policy.model.get_submodule(name), smoothing)
    assert torch.equal(layer.weight_codes_t, fresh.weight_codes_t)  # the updated weights, re-quantised
    assert not torch.equal(layer.weight_codes_t, codes)


def test_a_fused_optimizer_step_makes_the_copy_stale():
    """torch's fused AdamW writes the weights without bumping their version counters; the sampler's hook bumps
    them, so the copy is rebuilt after a fused step as after any other (and not after a step that moved nothing)."""
    model = nn.Linear(4, 3)
    fast_sampler.FastSampler(model, "fp16")  # installs the hook
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    before = fast_sampler.weights_version(model)
    optimizer.step()  # no gradients: nothing written
    assert fast_sampler.weights_version(model) == before
    model(torch.ones(2, 4)).sum().backward()
    weights = model.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(model.weight, weights)
    assert fast_sampler.weights_version(model) != before


def test_build_optimizer_adamw_is_fused_and_matches_the_per_tensor_update():
    from tilt.recipes.common import build_optimizer

    torch.manual_seed(0)
    models = [nn.Linear(5, 3), nn.Linear(5, 3)]
    models[1].load_state_dict(models[0].state_dict())
    initial = models[0].weight.detach().clone()
    optimizers = [build_optimizer("adamw", models[0].parameters(), 1e-2),
                  torch.optim.AdamW(models[1].parameters(), lr=1e-2, weight_decay=0.0, foreach=False)]
    assert optimizers[0].defaults["fused"] is True
    x = torch.randn(8, 5)
    for _ in range(3):
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            (model(x) ** 2).sum().backward()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (models[0].weight - initial).abs().min() > 1e-3  # every weight moved: three steps of about lr each


def test_consumers_that_need_the_models_law_decode_with_the_model_itself(tokenizer):
    """``exact=True`` bypasses the configured copy: evaluation, best-of-N and calibration then get the model's own
    samples (of_the_model, the same tokens as a policy configured ``exact`` draws from the same seeds), and the copy
    is never built for them; a training rollout (``exact=False``) still comes from the copy."""
    from tilt.bon import best_of_n
    from tilt.evaluation import draw_scored
    from tilt.infalign import build_calibration

    reward = lambda prompts, completions: torch.tensor([float(c.count("a")) for c in completions])  # noqa: E731
    fast, plain = policy_with(tokenizer, "fp16"), policy_with(tokenizer, "exact")
    own = fast.sample(PROMPTS, 3, prompt_seeds=[1, 2], exact=True)
    assert own.sampled_from_policy and own.sampler == "exact" and fast.fast_sampler.copy is None
    assert torch.equal(own.completion_ids, plain.sample(PROMPTS, 3, prompt_seeds=[1, 2]).completion_ids)
    draws = draw_scored(fast, PROMPTS, 2, reward, generator=torch.Generator().manual_seed(0))  # raised on proposal samples before
    assert draws.rewards.shape == (2, 2)
    assert best_of_n(fast, PROMPTS, 4, reward, generator=torch.Generator().manual_seed(0)).rollout.sampled_from_policy
    build_calibration(fast, reward, PROMPTS, 3, seed=0)
    assert fast.fast_sampler.copy is None  # none of them built the copy
    proposal = fast.sample(PROMPTS, 3, prompt_seeds=[1, 2])
    assert proposal.sampler == "fp16" and proposal.from_proposal and not proposal.sampled_from_policy


def test_auto_is_the_default_and_resolves_to_exact_on_a_tiny_model(tokenizer):
    assert SamplingConfig().sampler == "auto"
    policy = HFPolicy(tiny_llama(len(tokenizer), seed=0), tokenizer, SamplingConfig(max_new_tokens=4))
    assert policy.sampler_kind == "exact" and policy.fast_sampler is None
