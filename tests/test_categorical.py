"""The two-level inverse-CDF draw picks the same token as the one-scan draw, and its log-prob is log-softmax's."""
import pytest
import torch

from tilt.math.categorical import sample_from_logits
from tilt.math.sampling import inverse_cdf_sample


@pytest.mark.parametrize("vocab, block", [(5, 256), (1000, 256), (1024, 256), (777, 16)])
def test_same_draw_as_one_scan(vocab, block):
    g = torch.Generator().manual_seed(vocab)
    logits = 3 * torch.randn(512, vocab, generator=g, dtype=torch.float64)
    uniforms = torch.rand(512, generator=g, dtype=torch.float64)
    y, logp = sample_from_logits(logits, uniforms, block=block)
    log_probs = torch.log_softmax(logits, -1)
    assert torch.equal(y, inverse_cdf_sample(log_probs.exp(), uniforms))
    assert torch.allclose(logp, log_probs.gather(-1, y[:, None]).squeeze(-1), atol=1e-9)


def test_zero_mass_tokens_are_never_drawn():
    logits = torch.full((4, 600), float("-inf"))
    logits[:, [3, 300, 301]] = torch.tensor([0.0, 1.0, -1.0])
    uniforms = torch.tensor([0.0, 0.5, 0.999999, 1.0 - 1e-12], dtype=torch.float64)
    y, logp = sample_from_logits(logits, uniforms, block=256)
    assert set(y.tolist()) <= {3, 300, 301}
    assert y[0] == 3 and y[-1] == 301  # u = 0 lands on the first positive-mass token, u -> 1 on the last
    assert torch.isfinite(logp).all()


def test_law_of_the_draw():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    n = 100_000
    y, _ = sample_from_logits(probs.log().repeat(n, 1), torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64), block=2)
    freq = torch.bincount(y, minlength=4).float() / n
    assert freq[1] == 0
    assert torch.allclose(freq, probs, atol=5e-3)
