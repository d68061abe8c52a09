"""Samplers of pi* checked exactly in the lab: suffix-resampling MH (its kernel leaves pi* invariant, its law tends
to pi*, the sampler follows the exact kernel) and SMC (its Ẑ is unbiased for Z, not for log Z); then each once on a
tiny Hugging Face model."""
import math

import pytest
import torch

from tilt.lab.samplers import prefix_count
from tilt.lab.sequences import StoppingPolicy, SupportReward, stopping_world
from tilt.math import exact, mcmc
from tilt.samplers import smc, suffix_mh
from tilt.target import TiltedTarget

BETA = 0.25


def _world(seed=0):
    world = stopping_world(vocab=3, length=4, seed=seed, eos=0)
    g = torch.Generator().manual_seed(seed + 100)
    values = torch.rand(len(world.support()), generator=g, dtype=torch.float64)
    return world, SupportReward(world, values), values


def _exact(world, values, beta=BETA):
    """log pi_ref (N,), log pi* (N,), log Z, computed by enumeration independently of the samplers."""
    log_ref = world.support_logprobs()
    log_w = log_ref + values / beta
    log_z = torch.logsumexp(log_w, 0)
    return log_ref, log_w - log_z, log_z


def _kernel(world, values, *, length_correction=True):
    tokens, lengths = world.support_tensors()
    return mcmc.suffix_mh_transition_matrix(tokens, lengths, world.prefix_logprobs(), values, beta=BETA, length_correction=length_correction)


def test_support_is_a_distribution_with_varied_lengths():
    world, _, _ = _world()
    log_ref = world.support_logprobs()
    _, lengths = world.support_tensors()
    assert abs(log_ref.exp().sum().item() - 1) < 1e-12
    assert set(lengths.tolist()) == {1, 2, 3, 4}


def test_mh_kernel_leaves_pi_star_invariant_and_the_uncorrected_one_does_not():
    world, _, values = _world()
    _, log_target, _ = _exact(world, values)
    target = log_target.exp()
    m = _kernel(world, values)
    assert torch.allclose(m.sum(-1), torch.ones_like(target), atol=1e-12)
    assert (m >= 0).all()
    assert (target @ m - target).abs().max().item() < 1e-12
    # treating the uniform cut as symmetric (no |y|/|y'|) has another stationary law when lengths differ
    wrong = _kernel(world, values, length_correction=False)
    stationary = mcmc.chain_marginals(target, wrong, 2000)[-1]
    assert (target @ wrong - target).abs().max().item() > 1e-3
    assert exact.total_variation(stationary.log().unsqueeze(0), log_target.unsqueeze(0)).item() > 0.01


def test_mh_chain_law_tends_to_pi_star():
    world, _, values = _world()
    log_ref, log_target, _ = _exact(world, values)
    marginals = mcmc.chain_marginals(log_ref.exp(), _kernel(world, values), 300)  # the chain starts from a sample of pi_ref
    tv = 0.5 * (marginals - log_target.exp()).abs().sum(-1)  # (301,)
    assert tv[0] > 0.2
    assert (tv[1:] <= tv[:-1] + 1e-12).all()  # TV to the stationary law never grows
    assert tv[-1] < 1e-4


def test_mh_sampler_follows_the_exact_kernel():
    """The empirical law of 4000 chains after 3 steps matches row-vector pi_ref M^3 (TV within sampling noise), and
    does not match the law of the uncorrected kernel."""
    world, reward, values = _world()
    log_ref, _, _ = _exact(world, values)
    target = TiltedTarget(ref=world, reward=reward, beta=BETA)
    chains, steps = 4000, 3
    res = suffix_mh(target, [0], steps=steps, chains=chains, generator=torch.Generator().manual_seed(1))
    index = {w: i for i, w in enumerate(world.support())}
    counts = torch.bincount(torch.tensor([index[s] for s in res.final]), minlength=len(index)).double()
    empirical = counts / counts.sum()
    right = mcmc.chain_marginals(log_ref.exp(), _kernel(world, values), steps)[-1]
    wrong = mcmc.chain_marginals(log_ref.exp(), _kernel(world, values, length_correction=False), steps)[-1]
    noise = 0.5 * (2 * right * (1 - right) / (math.pi * chains)).sqrt().sum().item()  # E TV of a multinomial, roughly
    assert 0.5 * (empirical - right).abs().sum().item() < 2.5 * noise
    assert 0.5 * (right - wrong).abs().sum().item() > 3 * noise  # the test can tell the two kernels apart
    assert 0.05 < res.acceptance_rate < 1
    assert res.phi_trace.shape == (chains, steps + 1)


def test_mh_burn_in_thin_and_sample_bookkeeping():
    world, reward, _ = _world()
    target = TiltedTarget(ref=world, reward=reward, beta=BETA)
    res = suffix_mh(target, [0, 0], steps=10, chains=3, burn_in=4, thin=2, generator=torch.Generator().manual_seed(0))
    assert len(res.samples) == 2 * 3 * 3  # steps 4, 6, 8 of six chains
    assert res.kept_phi().shape == (6, 3)
    assert torch.allclose(res.kept_phi()[:, -1], res.phi_trace[:, 9])
    with pytest.raises(ValueError, match="burn_in"):
        suffix_mh(target, [0], steps=3, burn_in=3, generator=torch.Generator())


def test_systematic_resampling_copies_each_particle_floor_or_ceil_of_n_w_times():
    w = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    for u in (0.0, 0.37, 0.99):
        ancestors = mcmc.systematic_resample(w.log(), torch.tensor([u, u]))
        counts = torch.stack([torch.bincount(a, minlength=4) for a in ancestors]).double()
        assert ((counts - 4 * w).abs() < 1).all()  # floor or ceil of N W_i
        assert counts[1].tolist() == [0, 0, 4, 0]  # a zero-weight particle is never copied


def test_ess_of_independent_and_ar1_chains():
    g = torch.Generator().manual_seed(0)
    iid = torch.randn(4, 4000, generator=g, dtype=torch.float64)
    assert abs(mcmc.effective_sample_size(iid) / iid.numel() - 1) < 0.15
    phi = 0.8
    noise = torch.randn(4, 20000, generator=g, dtype=torch.float64)
    ar = torch.zeros_like(noise)
    for t in range(1, noise.shape[1]):
        ar[:, t] = phi * ar[:, t - 1] + noise[:, t]
    expected = ar.numel() * (1 - phi) / (1 + phi)
    assert abs(mcmc.effective_sample_size(ar) / expected - 1) < 0.2


_prefix_count = prefix_count(1, 4)  # a prefix potential: the fraction of token 1 so far (any potential works)


@pytest.mark.parametrize("prefix_reward, block", [(None, 0), (_prefix_count, 1)])
def test_smc_z_estimate_is_unbiased_for_z_not_log_z(prefix_reward, block):
    """3000 independent SMC runs (as 3000 prompts) of 4 particles: the mean of Ẑ is within 3 standard errors of the
    exact Z; the mean of log Ẑ is below log Z by more than 3 of its standard errors (Jensen)."""
    world, reward, values = _world()
    _, _, log_z = _exact(world, values)
    target = TiltedTarget(ref=world, reward=reward, beta=BETA)
    reps = 3000
    res = smc(target, [0] * reps, particles=4, block_size=block, prefix_reward=prefix_reward, ess_threshold=0.9,
              generator=torch.Generator().manual_seed(3))
    z_hat = res.log_z.exp()
    z = log_z.exp().item()
    assert abs(z_hat.mean().item() - z) < 3 * z_hat.std().item() / math.sqrt(reps)
    assert res.log_z.mean().item() < log_z.item() - 3 * res.log_z.std().item() / math.sqrt(reps)
    if prefix_reward is not None:
        assert res.resampled.any()  # resampling happened, and Ẑ stayed unbiased through it
    assert torch.allclose(res.log_weights.logsumexp(-1), torch.zeros(reps, dtype=torch.float64), atol=1e-12)


@pytest.mark.slow
def test_smc_output_tends_to_pi_star():
    """The law of one draw from the final weighted particles, averaged over 1000 runs: TV to pi* falls from about 0.4
    with 2 particles to about 0.06 with 32 (the rest is the runs' own noise)."""
    world, reward, values = _world()
    _, log_target, _ = _exact(world, values)
    target = TiltedTarget(ref=world, reward=reward, beta=BETA)
    index = {w: i for i, w in enumerate(world.support())}
    tvs = []
    for particles in (2, 32):
        res = smc(target, [0] * 1000, particles=particles, block_size=1, prefix_reward=_prefix_count, generator=torch.Generator().manual_seed(5))
        law = torch.zeros(len(index), dtype=torch.float64)  # the law of one draw from each run, averaged over runs
        law.index_add_(0, torch.tensor([index[w] for w in res.completions]), res.log_weights.view(-1).exp() / 1000)
        tvs.append(exact.total_variation(law.log().unsqueeze(0), log_target.unsqueeze(0)).item())
    assert tvs[1] < 0.1 < 0.3 < tvs[0]


def test_stopping_policy_rejects_bad_eos():
    with pytest.raises(ValueError, match="eos"):
        StoppingPolicy(stopping_world().table, 7)


# --- a tiny Hugging Face model -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_policy():
    from tilt.engine.hf import HFPolicy, SamplingConfig
    from tilt.engine.tiny import char_tokenizer, tiny_gpt2

    tokenizer = char_tokenizer()
    return HFPolicy(tiny_gpt2(len(tokenizer)), tokenizer, SamplingConfig(max_new_tokens=6))


def _length_reward(prompts, completions, **_):
    return [len(c) / 10 for c in completions]


def test_hf_continuations_keep_the_prefix_and_respect_the_limit(tiny_policy):
    g = torch.Generator().manual_seed(0)
    first = tiny_policy.sample_continuations(["ab", "cde"], [(), ()], [6, 6], generator=g)
    prefixes = [first[0][:2], first[1][:1]]
    out = tiny_policy.sample_continuations(["ab", "cde"], prefixes, [4, 5], generator=g)
    for prefix, row, limit in zip(prefixes, out, [4, 5]):
        assert row[: len(prefix)] == tuple(prefix)
        new = row[len(prefix):]
        assert 1 <= len(new) <= limit
        assert all(t not in tiny_policy.eos_ids for t in new[:-1])
        assert len(new) == limit or new[-1] in tiny_policy.eos_ids


def test_hf_mh_and_smc_run(tiny_policy):
    target = TiltedTarget(ref=tiny_policy, reward=_length_reward, beta=0.5)
    res = suffix_mh(target, ["ab", "cd"], steps=4, chains=2, burn_in=1, generator=torch.Generator().manual_seed(0))
    assert len(res.samples) == 2 * 2 * 3 and len(res.effective_sample_size()) == 2
    assert all(1 <= len(y) <= 6 for _, y in res.samples)
    out = smc(target, ["ab"], particles=4, block_size=2, prefix_reward=_length_reward, generator=torch.Generator().manual_seed(0))
    assert out.log_weights.shape == (1, 4) and torch.isfinite(out.log_z).all()
    assert len(out.draw(3, generator=torch.Generator().manual_seed(0))) == 3


REWARD_FILE = """
def count_a(prompts, completions, **columns):
    return [c.count("a") for c in completions]
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_policy):
    root = tmp_path_factory.mktemp("samplers")
    tiny_policy.model.save_pretrained(root / "tiny")
    tiny_policy.tokenizer.save_pretrained(root / "tiny")
    (root / "rewards.py").write_text(REWARD_FILE)
    return root


def _sample_cli(capsys, *argv):
    import json

    from tilt.cli import main

    capsys.readouterr()
    assert main([str(a) for a in argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_tilt_sample_mh_and_smc(model_dir, capsys):
    base = ["sample", "--model", model_dir / "tiny", "--prompt", "ab", "--prompt", "ba", "--reward", f"{model_dir / 'rewards.py'}:count_a",
            "--beta", 0.5, "--max-new-tokens", 6, "--json"]
    mh = _sample_cli(capsys, *base, "--mh", 6, "--n", 3)
    assert mh["mode"] == "mh" and len(mh["samples"]) == 2 * 3
    assert 0 <= mh["acceptance_rate"] <= 1 and mh["ess"] > 0 and mh["burn_in"] == 3
    assert all(r["reward"] == r["completion"].count("a") for r in mh["samples"])
    smc_out = _sample_cli(capsys, *base, "--smc", 8, "--block-size", 2, "--prefix-reward", "--n", 2)
    assert smc_out["mode"] == "smc" and len(smc_out["samples"]) == 2 * 2
    assert math.isfinite(smc_out["log_z"]) and 1 <= smc_out["final_ess"] <= 8
    assert all(r["reward"] == r["completion"].count("a") for r in smc_out["samples"])
    from tilt.cli import main

    assert main([str(a) for a in base] + ["--mh", "4", "--burn-in", "4"]) == 2
    assert "--burn-in must be >= 0 and below --mh 4" in capsys.readouterr().err


def test_lab_mh_command_reports_the_exact_chain(capsys):
    import json

    from tilt.cli import main

    assert main(["lab", "mh", "--steps", "100", "--chains", "300", "--sampled-steps", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["invariance_residual"] < 1e-12 < 1e-3 < r["invariance_residual_uncorrected"]
    tv = list(r["tv_by_step"].values())
    assert tv == sorted(tv, reverse=True) and tv[-1] < 1e-3
    assert r["tv_stationary_uncorrected"] > 0.05
