"""The policy engine on tiny Hugging Face models built from configs: sampling, masking and scoring agree."""
import pytest
import torch

from tilt.engine.hf import HFPolicy, SamplingConfig
from tilt.engine.tiny import char_tokenizer, tiny_gpt2, tiny_llama

PROMPTS = ["hi", "hello there, friend", "a", "the cat sat on"]


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama])
def test_scored_logprobs_equal_sampling_logprobs(tokenizer, make_model):
    policy = HFPolicy(make_model(len(tokenizer)), tokenizer, SamplingConfig(max_new_tokens=48))
    rollout = policy.sample(PROMPTS, 4, generator=torch.Generator().manual_seed(0))
    # the batch must exercise what the test is about: mixed prompt lengths, early EOS and truncation
    assert rollout.prompt_mask.sum(-1).unique().numel() == len(PROMPTS)
    assert rollout.truncated.any() and (~rollout.truncated).any()
    scored = policy.token_logprobs(rollout)
    assert (scored - rollout.sample_token_logprobs).abs().max().item() < 1e-5
    assert rollout.sampled_from_policy


def test_mask_convention(tokenizer):
    policy = HFPolicy(tiny_gpt2(len(tokenizer)), tokenizer, SamplingConfig(max_new_tokens=48))
    r = policy.sample(PROMPTS, 4, generator=torch.Generator().manual_seed(1))
    eos = torch.tensor(policy.eos_ids)
    for ids, mask, trunc in zip(r.completion_ids, r.completion_mask, r.truncated):
        n = int(mask.sum())
        is_eos = torch.isin(ids, eos)
        if trunc:
            assert n == ids.shape[0] and not is_eos.any()
        else:
            assert is_eos[n - 1] and not is_eos[: n - 1].any()  # the first EOS is the last counted token
            assert (ids[n:] == policy.pad_id).all()
    assert (r.sample_token_logprobs[~r.completion_mask] == 0).all()
    assert (r.sample_token_logprobs[r.completion_mask] < 0).all()


def test_left_padding_does_not_change_logprobs(tokenizer):
    """A completion's log-prob is the same scored alone or next to a much longer prompt."""
    policy = HFPolicy(tiny_llama(len(tokenizer)), tokenizer)
    completions = [[5, 6, 7, 1], [8, 9, 1]]
    together = policy.token_logprobs(policy.rollout_from_ids(["ab", "a much longer prompt than the other"], completions))
    alone = policy.token_logprobs(policy.rollout_from_ids(["ab"], completions[:1]))
    assert torch.allclose(together[0, :4], alone[0, :4], atol=1e-5)
    assert together[1, 3] == 0  # padding after the end of the second completion


def test_rollout_from_ids_scores_what_was_sampled(tokenizer):
    policy = HFPolicy(tiny_gpt2(len(tokenizer)), tokenizer, SamplingConfig(max_new_tokens=16))
    r = policy.sample(PROMPTS[:2], 3, generator=torch.Generator().manual_seed(2))
    ids = [row[m].tolist() for row, m in zip(r.completion_ids, r.completion_mask)]
    again = policy.rollout_from_ids(r.prompts, ids)
    assert torch.equal(again.completion_mask.sum(-1), r.completion_mask.sum(-1))
    assert torch.allclose(policy.token_logprobs(again).sum(-1), r.sample_seq_logprobs, atol=1e-5)
    assert again.completions == r.completions


def test_top_k_one_is_greedy_and_flagged_off_policy(tokenizer):
    model = tiny_gpt2(len(tokenizer))
    policy = HFPolicy(model, tokenizer, SamplingConfig(max_new_tokens=8, top_k=1))
    r = policy.sample(["hello"], 3, generator=torch.Generator().manual_seed(0))
    assert not r.sampled_from_policy
    assert (r.completion_ids == r.completion_ids[0]).all()  # greedy: all samples equal
    assert (r.sample_token_logprobs == 0).all()  # log-prob under the sampled (one-token) distribution
    assert (HFPolicy(model, tokenizer).token_logprobs(r)[r.completion_mask] < 0).all()  # the model's own are not 0


def test_gradients_flow_through_scoring(tokenizer):
    policy = HFPolicy(tiny_gpt2(len(tokenizer)), tokenizer, SamplingConfig(max_new_tokens=6))
    r = policy.sample(["abc"], 2, generator=torch.Generator().manual_seed(0))
    policy.token_logprobs(r).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())


def test_sampling_is_reproducible_with_a_generator(tokenizer):
    policy = HFPolicy(tiny_gpt2(len(tokenizer)), tokenizer, SamplingConfig(max_new_tokens=12))
    a = policy.sample(PROMPTS, 2, generator=torch.Generator().manual_seed(5))
    b = policy.sample(PROMPTS, 2, generator=torch.Generator().manual_seed(5))
    c = policy.sample(PROMPTS, 2, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert not torch.equal(a.completion_ids, c.completion_ids)


def test_sampling_config_validation():
    with pytest.raises(ValueError):
        SamplingConfig(temperature=0)
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0)


def test_prompt_seeds_make_a_prompts_samples_independent_of_its_batch(tokenizer):
    policy = HFPolicy(tiny_gpt2(len(tokenizer)), tokenizer, SamplingConfig(max_new_tokens=12))
    together = policy.sample(PROMPTS, 3, prompt_seeds=[10, 11, 12, 13])
    apart = policy.sample(PROMPTS[2:], 3, prompt_seeds=[12, 13])
    assert together.completions[6:] == apart.completions
    assert torch.allclose(together.sample_token_logprobs[6:, :apart.completion_ids.shape[1]], apart.sample_token_logprobs, atol=1e-5)


def test_inverse_cdf_sampling_has_the_right_law():
    from tilt.math.sampling import inverse_cdf_sample

    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3]]).repeat(200_000, 1)
    y = inverse_cdf_sample(probs, torch.rand(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    freq = torch.bincount(y, minlength=5).double() / y.numel()
    assert freq[0] == 0 and freq[2] == 0  # zero-probability tokens never drawn
    assert torch.allclose(freq, probs[0].double(), atol=4e-3)
    assert inverse_cdf_sample(probs[:1], torch.zeros(1)).item() == 1  # u = 0 still lands on a positive-mass token
