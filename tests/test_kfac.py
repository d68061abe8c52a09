"""K-FAC natural gradient (tilt.math.kfac, tilt.engine.kfac): the preconditioner is the Kronecker solve, the factors
are the true Fisher's where K-FAC is exact (one linear layer under a softmax, one position), and a step moves the KL
by its trust region."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tilt.engine.hf import HFPolicy, SamplingConfig
from tilt.engine.kfac import KFACNaturalGradient, linear_layers
from tilt.engine.tiny import char_tokenizer, tiny_llama
from tilt.math.kfac import damped_inverse, precondition, trust_region_scale


def spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d + 3, d, generator=g, dtype=torch.float64)
    return x.T @ x / (d + 3)


def test_precondition_is_the_damped_kronecker_solve():
    a, g = spd(4, 0), spd(3, 1)
    grad = torch.randn(3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    damping = 0.2
    a_d = a + damping * torch.linalg.eigvalsh(a).mean() * torch.eye(4, dtype=torch.float64)
    g_d = g + damping * torch.linalg.eigvalsh(g).mean() * torch.eye(3, dtype=torch.float64)
    vec = grad.T.reshape(-1)  # column-major vec
    dense = torch.linalg.solve(torch.kron(a_d, g_d), vec)
    got = precondition(grad, damped_inverse(g, damping), damped_inverse(a, damping))
    torch.testing.assert_close(got.T.reshape(-1), dense, rtol=1e-10, atol=1e-12)


def test_damped_inverse_refuses_zero_damping_and_a_zero_factor():
    with pytest.raises(ValueError, match="damping"):
        damped_inverse(spd(3, 0), 0.0)
    with pytest.raises(ValueError, match="zero"):
        damped_inverse(torch.zeros(3, 3), 0.1)


def test_trust_region_scale_gives_the_predicted_kl():
    eta = trust_region_scale(quadratic=8.0, kl_per_step=0.01)
    assert 0.5 * eta ** 2 * 8.0 == pytest.approx(0.01)
    assert trust_region_scale(0.0, 0.01) == 0.0


class SoftmaxLinear(nn.Module):
    """log pi(y) = log softmax(W a)_y with one fixed input a at the counted position (and a padding position whose
    input is garbage and never reaches the output): the model where the K-FAC Fisher A ⊗ G is exact."""

    def __init__(self, a, pad, classes):
        super().__init__()
        self.a, self.pad = a, pad
        self.linear = nn.Linear(a.shape[0], classes, bias=False, dtype=torch.float64)
        torch.nn.init.normal_(self.linear.weight, std=0.5, generator=torch.Generator().manual_seed(3))

    def probs(self):
        with torch.no_grad():
            return torch.softmax(self.linear.weight @ self.a, -1)

    def token_logprobs(self, rollout):
        b = rollout.completion_ids.shape[0]
        inputs = torch.stack([self.pad.expand(b, -1), self.a.expand(b, -1)], dim=1)  # (B, 2 positions, d)
        logits = self.linear(inputs)[:, 1]  # the padding position's output is not used
        return torch.log_softmax(logits, -1).gather(-1, rollout.completion_ids)  # (B, 1)


def draws(model, n, seed, of_the_model=True):
    y = torch.multinomial(model.probs(), n, replacement=True, generator=torch.Generator().manual_seed(seed))
    return SimpleNamespace(completion_ids=y[:, None], completion_mask=torch.ones(n, 1, dtype=torch.bool),
                           prompt_mask=torch.tensor([[False, True]]).expand(n, -1), of_the_model=of_the_model)


def test_fisher_factors_are_the_true_fisher_of_a_softmax_layer():
    a = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    model = SoftmaxLinear(a, pad=torch.tensor([50.0, 50.0, 50.0], dtype=torch.float64), classes=4)
    opt = KFACNaturalGradient([model.linear], kl_per_step=0.01, damping=1e-3)
    rollouts = [draws(model, 5000, seed) for seed in range(4)]
    info = opt.fit_fisher(model, rollouts)
    assert info == {"fisher_sequences": 20000.0, "fisher_positions": 20000.0}  # the padding position is not counted
    a_factor = torch.outer(a, a)
    a_d = a_factor + 1e-3 * torch.linalg.eigvalsh(a_factor).mean() * torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(opt.a_inverse[0].double(), torch.linalg.inv(a_d), rtol=2e-3, atol=1e-2)
    p = model.probs()
    exact_g = torch.diag(p) - torch.outer(p, p)  # E_y[(e_y - p)(e_y - p)^T]: the Fisher of the logits
    g_factor = torch.linalg.pinv(opt.g_inverse[0].double()) - 1e-3 * torch.linalg.eigvalsh(exact_g).mean() * torch.eye(4, dtype=torch.float64)
    assert (g_factor - exact_g).abs().max() < 0.02  # 20000 draws: standard errors about 0.003
    assert model.linear.weight.grad is None


def test_a_step_moves_the_kl_by_its_trust_region():
    a = torch.tensor([0.3, 1.0], dtype=torch.float64)
    model = SoftmaxLinear(a, pad=torch.zeros(2, dtype=torch.float64), classes=5)
    opt = KFACNaturalGradient([model.linear], kl_per_step=1e-3, damping=1e-4)
    opt.fit_fisher(model, [draws(model, 20000, 0)])
    p_before = model.probs()
    reward = torch.tensor([0.0, 1.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    loss = -(torch.softmax(model.linear(a), -1) * reward).sum()  # a gradient with no part along the softmax's null direction
    loss.backward()
    opt.step()
    p_after = model.probs()
    kl = float((p_before * (p_before / p_after).log()).sum())
    assert kl == pytest.approx(1e-3, rel=0.1)
    assert float((p_after * reward).sum()) > float((p_before * reward).sum())


def test_fisher_needs_the_models_own_samples_and_a_step_needs_factors():
    model = SoftmaxLinear(torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), classes=3)
    opt = KFACNaturalGradient([model.linear], kl_per_step=1e-3)
    with pytest.raises(RuntimeError, match="fit_fisher"):
        opt.step()
    with pytest.raises(ValueError, match="own samples"):
        opt.fit_fisher(model, [draws(model, 10, 0, of_the_model=False)])


@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
def test_on_a_llama_the_linear_layers_move_and_nothing_else(compute_dtype):
    """Also under bfloat16 autocast (the hooks run inside the autocast forward): the factors stay float32."""
    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer), hidden_size=32, intermediate_size=64)
    layers = linear_layers(model)
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down per layer; the tied LM head is the embedding
    trained = {id(m.weight) for m in layers}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)
    policy = HFPolicy(model, tokenizer, SamplingConfig(max_new_tokens=6), compute_dtype=compute_dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = KFACNaturalGradient(layers, kl_per_step=0.01)
    g = torch.Generator().manual_seed(0)
    opt.fit_fisher(policy, [policy.sample(["ab", "hello"], 4, generator=g, exact=True)])
    assert {t.dtype for t in opt.a_inverse + opt.g_inverse} == {torch.float32}
    rollout = policy.sample(["ab", "hello"], 4, generator=g, exact=True)
    with policy.autocast():
        loss = (-policy.token_logprobs(rollout).sum(-1) * torch.linspace(-1, 1, 8)).mean()
    loss.backward()
    opt.step()
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all(k.endswith("proj.weight") for k in moved)
    assert len(moved) == 14
    assert 0.5 * opt.last_step_length ** 2 * opt.last_quadratic == pytest.approx(0.01)
