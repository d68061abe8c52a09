"""Inference-aware alignment (InfAlign, Balashankar et al. 2024; digest §5): the analytic tool in calibrated space,
the calibration cache, and the calibrate-and-transform reward.

CTRL (calibrate-and-transform RL, digest §5(a)) is *not* a trainer. It is the KL-regularised recipe
(``tilt.recipes.kl_rl``) run on the reward that ``CalibratedReward`` returns:

    R(x, y) = Phi(C(x, y)),  C(x, y) = quantile of r(x, y) among m reference samples of x (ties count 1/2)

so that the recipe's target is pi* ∝ pi_ref exp(Phi(C)/beta).

The analytic tool (digest §5(b) [D]): with u = C(x, y) ~ Uniform[0, 1] under pi_ref (continuous reward), the policy
pi ∝ pi_ref exp(Phi(C)/beta) induces on u the density p(u) = exp(Phi(u)/beta) / Z with CDF F, and

    KL(pi || pi_ref)         = ∫ p log p du
    standard win rate         = ∫ u p(u) du
    BoN_N(pi) vs BoN_N(ref)  = 1 - N ∫ F(v)^N v^(N-1) dv
    WoN_N(pi) vs WoN_N(ref)  = ∫ (1 - F(v))^N N (1 - v)^(N-1) dv

independent of pi_ref and of the reward model. The inference-time win rate compares the procedure applied to both
policies; the digest marks that reading [R] (§8), so the procedure-vs-plain-reference variants are reported too.
Integrals use the midpoint rule on ``GRID_POINTS`` cells.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from tilt.math.infalign import calibrated_reward, identity_transform, unit_exp_transform, unit_neg_exp_transform
from tilt.rewards import RewardFn, score_rewards
from tilt.rollout import Policy

Transform = Callable[[Tensor], Tensor]

GRID_POINTS = 1 << 15
"""Midpoint cells on [0, 1]: the closed forms for best-of-N of pi_ref are reproduced to < 1e-6 for N <= 32."""

PROCEDURES = ("bon", "won")


# --- transforms by name (for the command line) -------------------------------------------------------------------


def procedure_transform(procedure: str, name: str, t: float | None = None) -> Transform:
    """Phi for a procedure, on [0, 1]: ``identity``; ``exp`` = the procedure's exponential (exp(t u) for best-of-N,
    -exp(-t u) for worst-of-N, both mapped affinely onto [0, 1]); ``probit`` = the inverse normal CDF, i.e. plain
    RLHF on a raw reward that is standard normal under pi_ref (the digest's "raw-Gaussian" column, §5(b))."""
    if procedure not in PROCEDURES:
        raise ValueError(f"procedure must be 'bon' or 'won', got {procedure!r}")
    if name == "identity":
        return identity_transform
    if name == "probit":
        return torch.special.ndtri
    if name == "exp":
        if t is None or not t > 0:
            raise ValueError(f"the exp transform needs t > 0, got {t}")
        if procedure == "bon":
            return lambda u: unit_exp_transform(u, t=t)
        return lambda u: unit_neg_exp_transform(u, t=t)
    raise ValueError(f"transform must be identity, exp or probit, got {name!r}")


def paper_scale_beta(procedure: str, name: str, t: float | None, beta: float) -> float:
    """beta for the paper's unnormalised Phi (exp(t u) or -exp(-t u)) giving the same policy as ``beta`` with the
    [0, 1]-mapped Phi: beta * (exp(t) - 1), resp. beta * (1 - exp(-t)); ``beta`` itself for other transforms."""
    if name != "exp":
        return beta
    return beta * (math.expm1(t) if procedure == "bon" else -math.expm1(-t))


# --- the analytic tool -------------------------------------------------------------------------------------------


def grid(points: int = GRID_POINTS) -> Tensor:
    """(G,) float64 midpoints of G equal cells of [0, 1]."""
    return (torch.arange(points, dtype=torch.float64) + 0.5) / points


def calibrated_space_metrics(log_density: Tensor, n: int) -> dict[str, float]:
    """KL and win rates of the policy whose calibrated reward has density ∝ exp(log_density) on the midpoint grid.

    log_density: (G,) unnormalised log-density at ``grid(G)`` (-inf allowed). Returns kl, win_rate_standard
    (pi vs pi_ref), win_rate_bon / win_rate_won (procedure on both sides), win_rate_bon_vs_ref / win_rate_won_vs_ref
    (procedure on pi against one sample of pi_ref: ∫ (1 - F^N) dv and ∫ (1 - F)^N dv).
    """
    g = log_density.shape[-1]
    u = grid(g)
    h = 1.0 / g
    log_w = torch.log_softmax(log_density.to(torch.float64), dim=-1)  # cell masses
    w = log_w.exp()
    kl = torch.where(w > 0, w * (log_w - math.log(h)), torch.zeros_like(w)).sum()
    cdf = (torch.cumsum(w, -1) - 0.5 * w).clamp(0.0, 1.0)  # F at the midpoints
    bon = 1 - n * h * (cdf.pow(n) * u.pow(n - 1)).sum()
    won = n * h * ((1 - cdf).pow(n) * (1 - u).pow(n - 1)).sum()
    return {
        "kl": kl.item(),
        "win_rate_standard": (w * u).sum().item(),
        "win_rate_bon": bon.item(),
        "win_rate_won": won.item(),
        "win_rate_bon_vs_ref": (h * (1 - cdf.pow(n)).sum()).item(),
        "win_rate_won_vs_ref": (h * (1 - cdf).pow(n).sum()).item(),
    }


def tilted_metrics(transform: Transform, beta: float, n: int, points: int = GRID_POINTS) -> dict[str, float]:
    """``calibrated_space_metrics`` of pi ∝ pi_ref exp(Phi(C)/beta), beta > 0."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return calibrated_space_metrics(transform(grid(points)) / beta, n)


def solve_beta(
    kl_of_beta: Callable[[float], float], kl: float, *, low: float = 1e-12, high: float = 1e6, iterations: int = 200
) -> float:
    """beta with kl_of_beta(beta) = kl, by bisection on log beta (KL of a tilted family decreases in beta).

    Raises ValueError when the budget is out of reach in [low, high] (a saturating transform such as
    -exp(-t u) at large t cannot reach large KL: digest §5(b))."""
    if not kl > 0:
        raise ValueError(f"the KL budget must be > 0, got {kl}")
    lo, hi = math.log(low), math.log(high)
    if kl_of_beta(low) < kl:
        raise ValueError(f"KL {kl} is out of reach for this transform (at beta = {low:g} it is {kl_of_beta(low):.4g}); lower t or the budget")
    if kl_of_beta(high) > kl:
        raise ValueError(f"KL {kl} is below what beta = {high:g} gives ({kl_of_beta(high):.4g})")
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if kl_of_beta(math.exp(mid)) > kl:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13:
            break
    return math.exp(0.5 * (lo + hi))


def analyze(transform: Transform, n: int, kl: float, points: int = GRID_POINTS) -> dict[str, float]:
    """Solve beta so that KL(pi || pi_ref) = kl for pi ∝ pi_ref exp(Phi(C)/beta), and report its metrics
    (``calibrated_space_metrics`` keys plus ``beta``)."""
    phi = transform(grid(points))  # (G,)
    beta = solve_beta(lambda b: calibrated_space_metrics(phi / b, n)["kl"], kl)
    return {"beta": beta, **calibrated_space_metrics(phi / beta, n)}


def inference_key(procedure: str) -> str:
    """The metric key of a procedure's inference-time win rate."""
    return {"bon": "win_rate_bon", "won": "win_rate_won"}[procedure]


@dataclass(frozen=True)
class TunedT:
    """The result of ``tune_t``: the best t, its beta (Phi on [0, 1]), its inference-time win rate, and all of
    ``analyze``'s metrics at that t."""

    t: float
    beta: float
    win_rate_inference: float
    metrics: dict
    at_search_edge: bool  # True when the best t is the largest searched: a larger t may do better


def tune_t(
    procedure: str, n: int, kl: float, *, t_min: float = 0.05, t_max: float = 1000.0, grid_size: int = 48, points: int = 1 << 12
) -> TunedT:
    """The t of the procedure's exponential transform that maximises the inference-time win rate at KL = kl
    (digest §5(b): "choose t by this analytic sweep"). A log-spaced grid of t, then golden-section search
    between the best point's neighbours; t whose KL budget is out of reach are skipped. The search uses a
    coarser quadrature (``points``); the returned metrics are recomputed on ``GRID_POINTS``."""
    key = inference_key(procedure)

    def score(t: float) -> float:
        try:
            return analyze(procedure_transform(procedure, "exp", t), n, kl, points)[key]
        except ValueError:
            return -math.inf

    log_ts = torch.linspace(math.log(t_min), math.log(t_max), grid_size).tolist()
    scores = [score(math.exp(x)) for x in log_ts]
    best = max(range(grid_size), key=lambda i: scores[i])
    if scores[best] == -math.inf:
        raise ValueError(f"no t in [{t_min}, {t_max}] reaches KL {kl} for {procedure}")
    lo, hi = log_ts[max(best - 1, 0)], log_ts[min(best + 1, grid_size - 1)]
    inv_phi = (math.sqrt(5) - 1) / 2
    a, b = hi - inv_phi * (hi - lo), lo + inv_phi * (hi - lo)
    fa, fb = score(math.exp(a)), score(math.exp(b))
    for _ in range(40):
        if fa >= fb:
            hi, b, fb = b, a, fa
            a = hi - inv_phi * (hi - lo)
            fa = score(math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + inv_phi * (hi - lo)
            fb = score(math.exp(b))
    candidates = [(scores[best], log_ts[best]), (fa, a), (fb, b)]
    _, log_t = max(candidates)
    t = math.exp(log_t)
    metrics = analyze(procedure_transform(procedure, "exp", t), n, kl)
    return TunedT(t=t, beta=metrics["beta"], win_rate_inference=metrics[key], metrics=metrics, at_search_edge=best == grid_size - 1)


# --- calibration cache and the calibrate-and-transform reward ----------------------------------------------------


def prompt_key(prompt: Any) -> str:
    """A stable text key for any JSON-able prompt (an int, a string, a chat message list)."""
    return json.dumps(prompt, sort_keys=True, default=str)


@dataclass(frozen=True)
class CalibrationSet:
    """m reference samples per prompt, scored once: ``ref_rewards`` (P, m) sorted ascending per row, row i for
    ``prompts[i]``. ``fingerprint`` records what built it (reference, reward, m, seed), so a cache is reused only
    for the same ones."""

    prompts: list
    ref_rewards: Tensor
    fingerprint: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.ref_rewards.dim() != 2 or self.ref_rewards.shape[0] != len(self.prompts):
            raise ValueError(f"ref_rewards must be (P, m) with P = {len(self.prompts)}, got {tuple(self.ref_rewards.shape)}")

    @property
    def samples_per_prompt(self) -> int:
        return self.ref_rewards.shape[1]

    def rows(self, prompts: Sequence[Any]) -> Tensor:
        """(B, m) the reference rewards of each prompt. Raises KeyError naming a prompt that was not calibrated."""
        index = {prompt_key(p): i for i, p in enumerate(self.prompts)}
        try:
            idx = [index[prompt_key(p)] for p in prompts]
        except KeyError as exc:
            raise KeyError(f"prompt {exc.args[0][:200]} has no calibration samples; calibrate every training prompt") from None
        return self.ref_rewards[torch.tensor(idx, dtype=torch.long)]

    def save(self, path: str | Path) -> None:
        data = {"fingerprint": self.fingerprint, "prompts": self.prompts, "ref_rewards": self.ref_rewards.tolist()}
        Path(path).write_text(json.dumps(data))

    @staticmethod
    def load(path: str | Path) -> "CalibrationSet":
        data = json.loads(Path(path).read_text())
        return CalibrationSet(data["prompts"], torch.tensor(data["ref_rewards"], dtype=torch.float64), data["fingerprint"])


@torch.no_grad()
def build_calibration(
    ref: Policy,
    reward_fn: RewardFn,
    prompts: Sequence[Any],
    samples_per_prompt: int,
    *,
    seed: int,
    samples_per_call: int = 256,
    fingerprint: dict | None = None,
) -> CalibrationSet:
    """Draw ``samples_per_prompt`` (m) completions of each prompt from ``ref`` and score them once with
    ``reward_fn`` (digest §5(a), CTRL step 1; m was not retrieved from the paper, the lab uses 256 as in E4.5).
    Sampling goes ``samples_per_call`` completions at a time, from one generator seeded with ``seed``."""
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    generator = torch.Generator().manual_seed(seed)
    prompts = list(prompts)
    per_call = min(samples_per_prompt, samples_per_call)
    prompts_per_call = max(1, samples_per_call // samples_per_prompt)
    rows = []
    for start in range(0, len(prompts), prompts_per_call):
        chunk = prompts[start : start + prompts_per_call]
        parts = []  # each (len(chunk), k)
        done = 0
        while done < samples_per_prompt:
            k = min(per_call, samples_per_prompt - done)
            rollout = ref.sample(chunk, k, generator=generator, exact=True)
            parts.append(score_rewards(reward_fn, rollout.prompts, rollout.completions).view(len(chunk), k))
            done += k
        rows.append(torch.cat(parts, dim=1))
    ref_rewards = torch.cat(rows).sort(dim=-1).values  # (P, m)
    info = {"samples_per_prompt": samples_per_prompt, "seed": seed, **(fingerprint or {})}
    return CalibrationSet(prompts, ref_rewards, info)


def load_or_build_calibration(
    path: str | Path, ref: Policy, reward_fn: RewardFn, prompts: Sequence[Any], samples_per_prompt: int, *, seed: int, fingerprint: dict
) -> CalibrationSet:
    """The cached calibration at ``path`` if it was built with the same fingerprint (name the reference and the
    reward in it), m, seed and prompts; otherwise build it and write it there."""
    path = Path(path)
    if path.exists():
        cached = CalibrationSet.load(path)
        if calibration_matches(cached, prompts, samples_per_prompt, seed=seed, fingerprint=fingerprint):
            return cached
    built = build_calibration(ref, reward_fn, prompts, samples_per_prompt, seed=seed, fingerprint=fingerprint)
    built.save(path)
    return built


class CalibratedReward:
    """The CTRL reward: R(x, y) = Phi(C(x, y)), C the quantile of r(x, y) among the calibration samples of x, ties 1/2
    (digest §5(a)). Called like any reward, ``f(prompts, completions, **columns) -> (B,) float64``; hand it to
    ``tilt.recipes.kl_rl.train`` to run CTRL. ``transform`` is any increasing Phi on [0, 1] (identity by default)."""

    def __init__(self, reward_fn: RewardFn, calibration: CalibrationSet, transform: Transform = identity_transform):
        self.reward_fn = reward_fn
        self.calibration = calibration
        self.transform = transform

    def raw_and_calibrated(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> tuple[Tensor, Tensor]:
        """(B,) the raw reward r and (B,) C(x, y) of each completion, before the transform."""
        raw = score_rewards(self.reward_fn, prompts, completions, **columns)  # (B,)
        refs = self.calibration.rows(prompts)  # (B, m)
        return raw, calibrated_reward(raw.unsqueeze(-1), refs).squeeze(-1)

    def calibrated(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> Tensor:
        """(B,) C(x, y) of each completion, before the transform."""
        return self.raw_and_calibrated(prompts, completions, **columns)[1]

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> Tensor:
        return self.transform(self.calibrated(prompts, completions, **columns))


# --- CTRL from the command line ------------------------------------------------------------------------------------

CTRL_TRANSFORMS = ("none", "identity", "exp", "probit")


@dataclass(frozen=True)
class CalibrationConfig:
    """The ``calibration:`` section of ``tilt train kl-rl``: run CTRL (digest §5(a)) by training the KL-regularised
    recipe on R = Phi(C) instead of the raw reward r. ``transform: none`` (the default) trains on r itself."""

    transform: str = field(default="none", metadata={"help": "none: plain KL-RL on the raw reward (default); identity: the calibrated reward C "
                                                     "(calibrated RLHF, best for the standard win rate); exp: the procedure's exponential of C "
                                                     "mapped onto [0, 1] (needs t); probit: the inverse normal CDF of C"})
    procedure: str = field(default="bon", metadata={"help": "what transform exp aims at: bon (best-of-N, exp(t C)) or won (worst-of-N, -exp(-t C))"})
    t: float | None = field(default=None, metadata={"help": "exponent of transform exp (> 0; required by exp, left unset otherwise): pick it for "
                                                    "your N and KL budget with `tilt infalign tune-t` (the paper's t values were not retrieved)"})
    calibration_samples: int = field(default=32, metadata={"help": "m, reference completions per training prompt; 32 keeps calibration cheap on a CPU "
                                                           "(standard error of C <= 0.5/sqrt(m) = 0.09); `tilt lab ctrl` uses 256; the paper's m was not retrieved"})
    calibration_seed: int = field(default=0, metadata={"help": "seed of the one generator the calibration samples are drawn from"})
    calibration_cache: str | None = field(default=None, metadata={"help": "a JSON file to reuse the calibration from (and write it to) across runs with the "
                                                                  "same reference, reward, sampling, m, seed and prompts; None = only RUN/calibration.json"})

    def __post_init__(self):
        if self.transform not in CTRL_TRANSFORMS:
            raise ValueError(f"calibration.transform must be one of {', '.join(CTRL_TRANSFORMS)}; got {self.transform!r}")
        if self.procedure not in PROCEDURES:
            raise ValueError(f"calibration.procedure must be bon or won; got {self.procedure!r}")
        if self.transform == "exp" and (self.t is None or not self.t > 0):
            raise ValueError(f"calibration.transform exp needs t > 0 (got {self.t}); choose it for your N and KL budget with "
                             "`tilt infalign tune-t --procedure bon --n 4 --kl 0.5` and set calibration.t (or --t)")
        if self.transform != "exp" and self.t is not None:
            raise ValueError(f"calibration.t is used only by transform exp (transform is {self.transform!r}); remove t (--t none) or set transform: exp")
        if self.calibration_samples < 1:
            raise ValueError(f"calibration.calibration_samples must be >= 1; got {self.calibration_samples}")
        if self.calibration_cache == "":
            raise ValueError("calibration.calibration_cache must be a file path or null")

    @property
    def active(self) -> bool:
        """True when the run trains on the calibrated, transformed reward (CTRL)."""
        return self.transform != "none"

    def phi(self) -> Transform:
        """Phi on [0, 1] for this config (``procedure_transform``; probit bounded by ``bounded_probit``)."""
        if self.transform == "probit":
            m = self.calibration_samples
            return lambda u: bounded_probit(u, samples_per_prompt=m)
        return procedure_transform(self.procedure, self.transform, self.t)

    def describe(self) -> str:
        """What the run optimises, in words (for logs and the run summary)."""
        if not self.active:
            return "the raw reward r"
        if self.transform == "exp":
            what = f"exp({self.t:g} C) on [0, 1]" if self.procedure == "bon" else f"-exp(-{self.t:g} C) on [0, 1]"
        else:
            what = {"identity": "C", "probit": "probit(C)"}[self.transform]
        return f"the CTRL reward {what}, C = the quantile of r among {self.calibration_samples} reference samples of the prompt"


def bounded_probit(calibrated: Tensor, *, samples_per_prompt: int) -> Tensor:
    """ndtri(u) with u clamped to [1/(4m), 1 - 1/(4m)]. The empirical C lies on the grid k/(2m) and is 0 or 1 for a
    completion below or above all m reference samples, where ndtri is infinite; half a grid step keeps the reward
    finite and leaves every other value unchanged (a departure needed only by the empirical C)."""
    eps = 1.0 / (4 * samples_per_prompt)
    return torch.special.ndtri(calibrated.clamp(eps, 1.0 - eps))


def distinct_prompts(prompts: Sequence[Any]) -> list:
    """The prompts without repeats, in first-seen order (each is calibrated once)."""
    seen: dict[str, Any] = {}
    for p in prompts:
        seen.setdefault(prompt_key(p), p)
    return list(seen.values())


def calibration_matches(calibration: CalibrationSet, prompts: Sequence[Any], samples_per_prompt: int, *, seed: int, fingerprint: dict) -> bool:
    """Whether ``calibration`` was built with this m, seed and fingerprint, for exactly these prompts (the test
    ``load_or_build_calibration`` applies to its cache)."""
    want = {"samples_per_prompt": samples_per_prompt, "seed": seed, **fingerprint}
    return calibration.fingerprint == want and [prompt_key(p) for p in calibration.prompts] == [prompt_key(p) for p in prompts]


def read_calibration(path: str | Path) -> CalibrationSet:
    """``CalibrationSet.load`` with an error that names the file when it is not a calibration file."""
    try:
        return CalibrationSet.load(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a readable calibration file ({type(exc).__name__}: {exc}); delete it or point "
                         "calibration_cache elsewhere") from None


class LoggedCalibratedReward(CalibratedReward):
    """``CalibratedReward`` that also adds up, for logging, the raw reward r and the calibrated reward C of every
    completion it scores: ``take_sums()`` returns (sum of r, sum of C, count) since its last call. The mean of C
    over a policy's samples estimates its standard win rate against pi_ref (digest §5(a): W(pi > pi_ref) = E_pi[C])."""

    def __init__(self, reward_fn: RewardFn, calibration: CalibrationSet, transform: Transform = identity_transform):
        super().__init__(reward_fn, calibration, transform)
        self._sums = [0.0, 0.0, 0]

    def calibrated(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> Tensor:
        raw, c = self.raw_and_calibrated(prompts, completions, **columns)  # (B,), (B,)
        self._sums = [self._sums[0] + raw.sum().item(), self._sums[1] + c.sum().item(), self._sums[2] + raw.numel()]
        return c

    def take_sums(self) -> tuple[float, float, int]:
        sums, self._sums = self._sums, [0.0, 0.0, 0]
        return sums[0], sums[1], sums[2]
