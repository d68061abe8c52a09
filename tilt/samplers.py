"""Samplers that converge to the tilted target pi* ∝ pi_ref exp(Phi(r)/beta) as compute grows, with estimates of how
close they are (docs/samplers.md).

* ``suffix_mh``: independent Metropolis–Hastings with suffix resampling from pi_ref (QUEST, Faria & Smith 2024;
  QAlign, Faria & Smith 2025). Chains, burn-in, thinning, acceptance rate, autocorrelation-based effective sample
  size. The chain's law tends to pi*; the acceptance probability, with its length factor |y|/|y'|, is derived in
  ``tilt.math.mcmc``.
* ``smc``: sequential Monte Carlo over blocks of tokens, with a user's prefix reward as intermediate potential
  (``prefix_reward``; plain importance resampling without one), adaptive resampling when the effective sample size
  falls under a threshold, and an unbiased estimate of Z(x) = E_ref[exp(Phi(r)/beta)].

Both need only samples of pi_ref continuing a prefix, and rewards: no log-probability is ever computed (the
reference factors cancel). The reference must follow ``SuffixSampler``: ``tilt.engine.hf.HFPolicy`` does, and so does
the lab's ``tilt.lab.sequences.StoppingPolicy``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor

from tilt.math import mcmc
from tilt.math.importance import effective_sample_size as weights_ess
from tilt.rewards import score_rewards
from tilt.target import TiltedTarget


class SuffixSampler(Protocol):
    """A reference that continues prefixes: what both samplers draw from."""

    eos_ids: list  # token ids that end a completion
    max_length: int  # completion length limit, in tokens

    def sample_continuations(self, prompts: Sequence[Any], prefixes: Sequence[Sequence[int]], max_new_tokens: Sequence[int], *,
                             generator: torch.Generator | None = None) -> list[tuple[int, ...]]:
        """Each prefix (token ids of a completion's start) extended by samples of the policy until an EOS (kept) or
        ``max_new_tokens[b]`` new tokens; returns the whole completions' token ids."""
        ...

    def decode_tokens(self, rows: Sequence[Sequence[int]]) -> list:
        """Completions as the reward takes them (text for a language model)."""
        ...


def _phi(target: TiltedTarget, prompts: Sequence[Any], rows: Sequence[Sequence[int]]) -> Tensor:
    """(B,) float64 Phi(r(x, y)) of completions given as token ids."""
    return target.transform(score_rewards(target.reward, list(prompts), target.ref.decode_tokens(rows)).double())


def _ended(row: Sequence[int], eos_ids: Sequence[int], max_length: int) -> bool:
    return len(row) >= max_length or (len(row) > 0 and row[-1] in eos_ids)


# --- Metropolis–Hastings ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MHResult:
    """Chains of suffix-resampling MH, ``chains`` per prompt; chain rows are prompt-major (row p * chains + c).

    ``samples``: the kept states (after ``burn_in`` steps, every ``thin``-th) as (prompt, token ids) pairs, prompt by
    prompt, then chain by chain, then in time order; ``phi_trace`` (B, steps + 1) Phi(r) of each chain's state, the
    initial state first; ``accepted`` (B, steps) bool; ``final`` (B,) the last states' token ids."""

    samples: list
    phi_trace: Tensor
    accepted: Tensor
    final: list
    chains: int
    burn_in: int
    thin: int

    @property
    def acceptance_rate(self) -> float:
        """Accepted proposals over all proposals, every step (burn-in included)."""
        return self.accepted.double().mean().item()

    def kept_phi(self) -> Tensor:
        """(B, T_kept) Phi(r) of the kept states."""
        return self.phi_trace[:, 1 + self.burn_in:][:, :: self.thin]

    def effective_sample_size(self) -> list[float]:
        """Per prompt: autocorrelation-based ESS of Phi(r) over its chains' kept states (``tilt.math.mcmc``)."""
        kept = self.kept_phi()
        return [mcmc.effective_sample_size(g) for g in kept.reshape(-1, self.chains, kept.shape[-1])]


@torch.no_grad()
def suffix_mh(
    target: TiltedTarget,
    prompts: Sequence[Any],
    *,
    steps: int,
    chains: int = 1,
    burn_in: int = 0,
    thin: int = 1,
    generator: torch.Generator,
    length_correction: bool = True,
    on_step: Callable[[int, list], None] | None = None,
) -> MHResult:
    """Run ``chains`` chains per prompt for ``steps`` MH steps each, all chains of all prompts batched together.

    ``target.ref`` must follow ``SuffixSampler``. A chain starts from a sample of pi_ref; a step draws a cut i uniform
    in {0..|y|-1}, keeps y_<i, resamples the rest from pi_ref and accepts with probability
    min(1, exp((Phi(r(y')) - Phi(r(y)))/beta) |y|/|y'|). The states after steps burn_in, burn_in + thin, ... are the
    samples. ``on_step(t, states)`` sees the states after step t (the lab uses it). ``length_correction=False`` runs
    the wrong kernel that treats a uniform cut as symmetric (for the lab only).
    """
    if steps < 1 or chains < 1 or burn_in < 0 or thin < 1 or burn_in >= steps:
        raise ValueError(f"need steps >= 1, chains >= 1, thin >= 1 and 0 <= burn_in < steps; got steps={steps}, "
                         f"chains={chains}, thin={thin}, burn_in={burn_in}")
    ref = target.ref
    rows_prompts = [p for p in prompts for _ in range(chains)]
    b = len(rows_prompts)
    states = ref.sample_continuations(rows_prompts, [()] * b, [ref.max_length] * b, generator=generator)
    phi = _phi(target, rows_prompts, states)  # (B,)
    trace, accepted, kept = [phi], [], []
    for t in range(steps):
        lengths = torch.tensor([len(s) for s in states])  # (B,) EOS included
        cuts = (torch.rand(b, generator=generator, dtype=torch.float64) * lengths).long().clamp(max=lengths - 1)  # uniform in 0..|y|-1
        prefixes = [s[:i] for s, i in zip(states, cuts.tolist())]
        proposals = ref.sample_continuations(rows_prompts, prefixes, [ref.max_length - len(p) for p in prefixes], generator=generator)
        phi_new = _phi(target, rows_prompts, proposals)
        log_alpha = mcmc.suffix_mh_log_acceptance(phi_new, phi, torch.tensor([len(y) for y in proposals]), lengths,
                                                  beta=target.beta, length_correction=length_correction)
        accept = torch.log(torch.rand(b, generator=generator, dtype=torch.float64)) < log_alpha  # (B,)
        states = [y if a else s for s, y, a in zip(states, proposals, accept.tolist())]
        phi = torch.where(accept, phi_new, phi)
        trace.append(phi)
        accepted.append(accept)
        if t >= burn_in and (t - burn_in) % thin == 0:
            kept.append(states)
        if on_step is not None:
            on_step(t, states)
    samples = [(rows_prompts[i], kept[j][i]) for i in range(b) for j in range(len(kept))]
    return MHResult(samples=samples, phi_trace=torch.stack(trace, -1), accepted=torch.stack(accepted, -1), final=states,
                    chains=chains, burn_in=burn_in, thin=thin)


# --- sequential Monte Carlo ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SMCResult:
    """The final particles of SMC, ``particles`` per prompt, prompt-major; ``log_weights`` (P, N) their normalised
    log-weights; ``log_z`` (P,) log of the unbiased estimate Ẑ(x) (Ẑ is unbiased, log Ẑ is biased low);
    ``ess_trace`` (P, S) the effective sample size after each of the S blocks' reweighting, before resampling;
    ``resampled`` (P, S) bool, where a block resampled."""

    prompts: list
    completions: list
    log_weights: Tensor
    log_z: Tensor
    ess_trace: Tensor
    resampled: Tensor

    def draw(self, n: int, *, generator: torch.Generator) -> list[tuple[Any, tuple[int, ...]]]:
        """n outputs per prompt, drawn with replacement from the final weighted particles: (prompt, token ids) pairs."""
        p, k = self.log_weights.shape
        picks = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)  # (P, n)
        return [(self.prompts[i * k + j], self.completions[i * k + j]) for i in range(p) for j in picks[i].tolist()]


@torch.no_grad()
def smc(
    target: TiltedTarget,
    prompts: Sequence[Any],
    *,
    particles: int,
    block_size: int = 0,
    prefix_reward: Callable | None = None,
    ess_threshold: float = 0.5,
    generator: torch.Generator,
) -> SMCResult:
    """Sequential Monte Carlo toward pi* with ``particles`` particles per prompt, all prompts batched together.

    Potentials psi_t of a particle after block t: Phi(r(x, y))/beta once it has ended (EOS or the length limit);
    before that, ``Phi(prefix_reward(x, prefix))/beta`` if a prefix reward is given, else 0. Particles are extended by
    ``block_size`` tokens from pi_ref (0: to the end, one block), reweighted by exp(psi_t - psi_{t-1}) (the proposal
    is pi_ref, so this is the whole incremental weight), and resampled (systematically) when the ESS falls under
    ``ess_threshold * particles``. The last block ends every particle, so psi_T = Phi(r)/beta: the intermediate
    potentials telescope away, and Ẑ = prod_t sum_i W_{t-1,i} g_{t,i} is unbiased for Z(x) = E_ref[exp(Phi(r)/beta)].
    Without a prefix reward (or with one block) it is importance resampling with Ẑ = mean exp(Phi(r)/beta).
    """
    if particles < 1 or block_size < 0 or not 0 <= ess_threshold <= 1:
        raise ValueError(f"need particles >= 1, block_size >= 0 and 0 <= ess_threshold <= 1; got {particles}, {block_size}, {ess_threshold}")
    ref, beta = target.ref, target.beta
    block = block_size or ref.max_length
    p, n = len(prompts), particles
    rows_prompts = [x for x in prompts for _ in range(n)]
    rows: list[tuple[int, ...]] = [()] * (p * n)
    psi = torch.zeros(p * n, dtype=torch.float64)  # (B,) potential of each particle's current prefix
    log_w = torch.full((p, n), -math.log(n), dtype=torch.float64)  # normalised weights carried into the next block
    log_z = torch.zeros(p, dtype=torch.float64)
    ess_trace, resampled = [], []
    while True:
        ended = [_ended(r, ref.eos_ids, ref.max_length) for r in rows]
        live = [i for i, e in enumerate(ended) if not e]
        if not live:
            break
        budget = [min(block, ref.max_length - len(rows[i])) for i in live]
        grown = ref.sample_continuations([rows_prompts[i] for i in live], [rows[i] for i in live], budget, generator=generator)
        rows = list(rows)
        for i, y in zip(live, grown):
            rows[i] = y
        psi_new = psi.clone()
        done_now = [i for i in live if _ended(rows[i], ref.eos_ids, ref.max_length)]
        going = [i for i in live if not _ended(rows[i], ref.eos_ids, ref.max_length)]
        if done_now:
            psi_new[done_now] = _phi(target, [rows_prompts[i] for i in done_now], [rows[i] for i in done_now]) / beta
        if going and prefix_reward is not None:
            texts = ref.decode_tokens([rows[i] for i in going])
            psi_new[going] = target.transform(score_rewards(prefix_reward, [rows_prompts[i] for i in going], texts).double()) / beta
        log_g = (psi_new - psi).view(p, n)  # (P, N) incremental weights; 0 for particles that had already ended
        log_z = log_z + mcmc.log_mean_incremental_weight(log_w, log_g)
        log_w = mcmc.normalise_log_weights(log_w + log_g)
        psi = psi_new
        ess = weights_ess(log_w)  # (P,)
        ess_trace.append(ess)
        last = all(_ended(r, ref.eos_ids, ref.max_length) for r in rows)
        redo = (ess < ess_threshold * n) & torch.tensor(not last)
        resampled.append(redo)
        if redo.any():
            ancestors = mcmc.systematic_resample(log_w, torch.rand(p, generator=generator, dtype=torch.float64))  # (P, N)
            ancestors = torch.where(redo.unsqueeze(-1), ancestors, torch.arange(n))
            flat = (ancestors + torch.arange(p).unsqueeze(-1) * n).flatten().tolist()
            rows, psi = [rows[i] for i in flat], psi[flat]
            log_w = torch.where(redo.unsqueeze(-1), torch.full_like(log_w, -math.log(n)), log_w)
    return SMCResult(prompts=rows_prompts, completions=rows, log_weights=log_w, log_z=log_z,
                     ess_trace=torch.stack(ess_trace, -1), resampled=torch.stack(resampled, -1))
