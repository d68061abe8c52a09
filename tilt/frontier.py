"""The KL–win-rate frontier of a task, from reference samples alone, and how close a trained policy gets to it.

For a reference model pi_ref, a reward r and held-out prompts: draw m samples of each prompt from pi_ref, score
them once, and compute (``tilt.math.frontier``, exactly on each prompt's empirical reference distribution) the
win rate against pi_ref and the mean reward, as functions of KL(pi || pi_ref), of

* best-of-N of pi_ref (``best_of_n``);
* the tilted policies pi ∝ pi_ref exp(r/beta) (``tilt_reward``), the optimum of mean reward at each KL;
* the tilted policies of the calibrated reward C (``tilt_calibrated``), the optimum of the win rate at each KL
  (InfAlign's identity transform: W(pi > pi_ref) = E_pi[C] is linear in pi), i.e. the frontier WR*(KL).

``Frontier`` holds the curves (with bootstrap intervals and ESS), saves and loads them as JSON, interpolates
``wr_star(kl)``, and scores a policy's evaluation by its efficiency (WR - 1/2)/(WR*(KL) - 1/2).
``plot_frontier`` draws the band with runs' evaluations over it. See docs/frontier.md.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from tilt.math import frontier as fmath
from tilt.recipes.common import derive_seed
from tilt.rewards import RewardFn
from tilt.rollout import Policy

ASSETS = Path(__file__).resolve().parent / "assets"
CURVES = ("best_of_n", "tilt_reward", "tilt_calibrated")
FORMAT = "tilt-frontier/1"


def task_prompts(split: str) -> list[str]:
    """The shipped openings task (docs/frontier.md): ``train`` (240 openings) or ``heldout`` (120)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    text = (ASSETS / f"openings_{split}.jsonl").read_text(encoding="utf-8")
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


@torch.no_grad()
def draw_reference_rewards(ref: Policy, prompts: Sequence[Any], samples_per_prompt: int, reward_fn: RewardFn, *,
                           seed: int = 0, batch_size: int = 64,
                           progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """(P, m) rewards of m samples of each prompt from ``ref`` (``tilt.evaluation.draw_scored``), from one generator
    seeded by ``seed``. Only the rewards enter the frontier."""
    from tilt.evaluation import draw_scored

    g = torch.Generator().manual_seed(derive_seed(seed, "frontier", "ref"))
    return draw_scored(ref, list(prompts), samples_per_prompt, reward_fn, generator=g, batch_size=batch_size,
                       progress=progress).rewards


# --- the frontier from reference rewards -------------------------------------------------------------------------
N_GRID = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128, 192, 256, 512, 1024, 4096)
"""Values of N for best-of-N; past m the empirical best-of-N only piles onto each prompt's top samples."""
KL_POINTS = 121
"""Points of the KL grid the curves and intervals are read at: even in sqrt(KL) from 0 to log m, so that the grid is
fine near 0, where the win rate rises like sqrt(KL) and linear interpolation on an even grid errs most."""


@dataclass(frozen=True)
class FrontierConfig:
    """How the frontier is computed from the reference rewards."""

    num_resamples: int = field(default=500, metadata={"help": "bootstrap resamples behind the intervals (500: the curves are "
                                                       "smooth, and each resample recomputes all of them)"})
    level: float = field(default=0.95, metadata={"help": "coverage of the intervals"})
    seed: int = field(default=0, metadata={"help": "seed of the bootstrap"})
    inv_beta_points: int = field(default=90, metadata={"help": "points of the log-spaced grid of 1/beta of each tilt"})

    def __post_init__(self):
        if self.num_resamples < 10:
            raise ValueError(f"num_resamples must be >= 10, got {self.num_resamples}")
        if not 0 < self.level < 1:
            raise ValueError(f"level must be in (0, 1), got {self.level}")
        if self.inv_beta_points < 4:
            raise ValueError(f"inv_beta_points must be >= 4, got {self.inv_beta_points}")


def _grids(ref_rewards: torch.Tensor, points: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N grid, 1/beta grid for r, 1/beta grid for C). 1/beta spans 1e-2..1e4 in units of 1/sd(r) (C: of 1), from 0
    (pi_ref) to where each prompt's weight sits on its top samples."""
    scale = ref_rewards.double().std().item()
    scale = scale if scale > 0 else 1.0
    grid = torch.cat([torch.zeros(1, dtype=torch.float64), torch.logspace(-2, 4, points, dtype=torch.float64)])
    return torch.tensor(N_GRID, dtype=torch.float64), grid / scale, grid * 3.0


def _floats(x: torch.Tensor) -> list:
    return [None if math.isnan(v) else v for v in x.double().tolist()]


@dataclass(frozen=True)
class Frontier:
    """A task's frontier (see the module docstring), as saved in frontier.json (docs/frontier.md lists the keys)."""

    data: dict

    @property
    def kl(self) -> list[float]:
        return self.data["kl"]

    @property
    def reach_kl(self) -> float:
        return self.data["meta"]["reach_kl"]

    def curve(self, name: str) -> dict:
        if name not in CURVES:
            raise KeyError(f"no curve {name!r}; the curves are {', '.join(CURVES)}")
        return self.data["curves"][name]

    def at(self, kl: float, name: str = "tilt_calibrated", key: str = "win_rate") -> float:
        """A curve's value at ``kl``, linear between grid points; NaN beyond the largest KL the curve reaches."""
        values = [math.nan if v is None else v for v in self.curve(name)[key]]
        return fmath.interpolate(torch.tensor([float(kl)]), torch.tensor(self.kl), torch.tensor(values)).item()

    def wr_star(self, kl: float) -> float:
        """WR*(KL): the best achievable win rate against pi_ref at KL(pi || pi_ref) = ``kl`` nats (the calibrated tilt)."""
        return self.at(kl)

    def efficiency(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Efficiency of an evaluated policy (``tilt.evaluation.evaluate``'s metrics: ``win_rate``, ``kl_ref`` and
        their ``_ci``): (WR - 1/2)/(WR*(KL) - 1/2) at the policy's own KL.

        * ``efficiency_ci``: from the policy's win-rate interval, WR* held at its estimate;
        * ``efficiency_ci_total``: the widest the ratio gets over the policy's win-rate and KL intervals and the
          frontier's own interval (conservative: every end combined);
        * ``frontier_win_rate`` (and ``_ci``): WR* at the policy's KL; ``beyond_reach``: the KL is past what m
          reference samples resolve (``tilt.math.frontier.reach_kl``), and the frontier there is under-stated."""
        wr, kl = float(metrics["win_rate"]), float(metrics["kl_ref"])
        wr_low, wr_high = metrics.get("win_rate_ci", (wr, wr))
        kl_low, kl_high = metrics.get("kl_ref_ci", (kl, kl))
        star = self.wr_star(max(kl, 0.0))
        star_low = self.at(max(kl_low, 0.0), key="win_rate_low")
        star_high = self.at(max(kl_high, 0.0), key="win_rate_high")
        ratio = [fmath.efficiency(w, s) for w in (wr_low, wr_high) for s in (star_low, star_high)]
        finite = [r for r in ratio if not math.isnan(r)]
        return {
            "efficiency": fmath.efficiency(wr, star),
            "efficiency_ci": [fmath.efficiency(wr_low, star), fmath.efficiency(wr_high, star)],
            "efficiency_ci_total": [min(finite), max(finite)] if len(finite) == len(ratio) else [math.nan, math.nan],
            "frontier_win_rate": star,
            "frontier_win_rate_ci": [self.at(max(kl, 0.0), key="win_rate_low"), self.at(max(kl, 0.0), key="win_rate_high")],
            "beyond_reach": kl > self.reach_kl,
        }

    def table(self, kls: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 3.0)) -> tuple[list[str], list[list]]:
        """(header, rows) of the printed table: for each KL, each curve's win rate, the reward tilt's mean reward and
        the calibrated tilt's ESS."""
        header = ["KL", "best-of-N WR", "tilted WR", "calibrated-tilt WR (WR*)", "tilted reward", "ESS (WR*)", "note"]
        rows = []
        for kl in kls:
            def cell(name, key="win_rate"):
                v, lo, hi = self.at(kl, name, key), self.at(kl, name, f"{key}_low"), self.at(kl, name, f"{key}_high")
                return "n/a" if math.isnan(v) else f"{v:.3f} [{lo:.3f}, {hi:.3f}]"
            ess = self.at(kl, "tilt_calibrated", "ess")
            rows.append([f"{kl:g}", cell("best_of_n"), cell("tilt_reward"), cell("tilt_calibrated"),
                         cell("tilt_reward", "reward"), "n/a" if math.isnan(ess) else f"{ess:.1f}",
                         "beyond reach" if kl > self.reach_kl else ""])
        return header, rows

    def head(self, prompts: int, config: "FrontierConfig | None" = None) -> "Frontier":
        """The frontier of the first ``prompts`` prompts only (recomputed from their stored reference rewards), for an
        evaluation on those prompts: WR*(KL) is an average over prompts, so it must be the same prompts' average."""
        rewards = torch.tensor(self.data["ref_rewards"], dtype=torch.float64)
        if not 1 <= prompts <= rewards.shape[0]:
            raise ValueError(f"the frontier has {rewards.shape[0]} prompts; asked for the first {prompts}")
        if prompts == rewards.shape[0]:
            return self
        meta = {k: v for k, v in self.data["meta"].items() if k not in _COMPUTED_META}
        names = self.data.get("prompts")
        own = self.data["meta"]  # the same bootstrap as the whole frontier's, unless told otherwise
        config = config or FrontierConfig(num_resamples=own["num_resamples"], level=own["level"], seed=own["bootstrap_seed"])
        return frontier_from_rewards(rewards[:prompts], config, meta=meta,
                                     prompts=names[:prompts] if names is not None else None)

    def for_prompts(self, prompts: Sequence[Any], where: str = "the frontier") -> "Frontier":
        """The frontier of exactly ``prompts``, which must be its own first len(prompts) prompts in order (an
        evaluation with ``--limit`` keeps the first ones); raises naming the first prompt that differs."""
        own = self.data.get("prompts")
        if own is None:
            if len(prompts) != self.data["meta"]["prompts"]:
                raise ValueError(f"{where} does not list its prompts and has {self.data['meta']['prompts']}, not "
                                 f"{len(prompts)}: rebuild it with `tilt frontier` on the same prompts")
            return self
        if len(prompts) > len(own):
            raise ValueError(f"{where} has {len(own)} prompts; {len(prompts)} are evaluated: evaluate at most {len(own)} "
                             "or rebuild the frontier on these prompts")
        for i, (mine, theirs) in enumerate(zip(own, prompts)):
            if mine != theirs:
                raise ValueError(f"prompt {i} differs from {where}'s ({str(theirs)[:60]!r} against {str(mine)[:60]!r}): the "
                                 "frontier must be of the same prompts, in the same order")
        return self.head(len(prompts))

    def save(self, path: str | Path) -> Path:
        """Write the frontier as JSON, atomically (a temporary file, then a rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, allow_nan=False))
        tmp.replace(path)
        return path

    @staticmethod
    def load(path: str | Path) -> "Frontier":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the frontier file {str(path)!r}: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{str(path)!r} is not a frontier file (format {FORMAT}); build one with `tilt frontier`")
        return Frontier(data)


_COMPUTED_META = ("prompts", "samples_per_prompt", "reach_kl", "level", "num_resamples", "bootstrap_seed", "ref_reward_mean",
                  "tie_fraction")
"""Meta keys frontier_from_rewards computes; the others (model, reward, max_new_tokens, ...) describe the task."""


def frontier_from_rewards(ref_rewards: torch.Tensor, config: FrontierConfig = FrontierConfig(), *,
                          meta: Mapping[str, Any] | None = None, prompts: Sequence[Any] | None = None) -> Frontier:
    """The frontier of reference rewards (P, m): m samples of each of P prompts from pi_ref, scored once."""
    ref_rewards = torch.as_tensor(ref_rewards, dtype=torch.float64)
    if ref_rewards.dim() != 2 or ref_rewards.shape[1] < 2 or ref_rewards.shape[0] < 1:
        raise ValueError(f"reference rewards must be (prompts, samples) with at least 2 samples per prompt; got {tuple(ref_rewards.shape)}")
    if not torch.isfinite(ref_rewards).all():
        row = int((~torch.isfinite(ref_rewards)).any(-1).nonzero()[0])
        raise ValueError(f"reference rewards of prompt {row} are not all finite; fix the reward")
    p, m = ref_rewards.shape
    n_grid, inv_r, inv_c = _grids(ref_rewards, config.inv_beta_points)
    kl_grid = torch.linspace(0.0, math.sqrt(math.log(m)), KL_POINTS, dtype=torch.float64).square()
    curves = fmath.frontier_curves(ref_rewards, n_grid, inv_r, inv_c)
    g = torch.Generator().manual_seed(derive_seed(config.seed, "frontier", "bootstrap"))
    boot = fmath.bootstrap_frontier(ref_rewards, kl_grid, n_grid, inv_r, inv_c, generator=g,
                                    num_resamples=config.num_resamples, level=config.level)
    out_curves, points = {}, {}
    for name, curve in curves.items():
        grid_values = fmath.on_kl_grid(curve, kl_grid)
        out_curves[name] = {k: _floats(v) for k, v in {**grid_values, **boot[name]}.items()}
        points[name] = {k: _floats(v) for k, v in curve.items()}
    ties = (ref_rewards.unsqueeze(-1) == ref_rewards.unsqueeze(-2)).double().mean().item()
    data = {
        "format": FORMAT,
        "meta": {"prompts": p, "samples_per_prompt": m, "reach_kl": fmath.reach_kl(m), "level": config.level,
                 "num_resamples": config.num_resamples, "bootstrap_seed": config.seed,
                 "ref_reward_mean": ref_rewards.mean().item(), "tie_fraction": ties, **(meta or {})},
        "kl": kl_grid.tolist(),
        "curves": out_curves,
        "points": points,
        "prompts": list(prompts) if prompts is not None else None,
        "ref_rewards": ref_rewards.tolist(),
    }
    return Frontier(data)


# --- a policy against the frontier --------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_on_frontier(frontier: Frontier, policy: Policy, ref: Policy, reward_fn: RewardFn, *, samples_per_prompt: int,
                         seed: int, num_resamples: int = 500) -> tuple[dict[str, Any], Any]:
    """Held-out evaluation of ``policy`` on the frontier's own prompts, against the frontier's own reference samples:
    ``samples_per_prompt`` samples of each prompt from ``policy`` (``tilt.evaluation.draw_scored``), then

    * ``kl_ref``: KL(pi || pi_ref), the mean over samples of sum_t KL_t, the next-token KL over the whole vocabulary at
      each sampled prefix (``tilt.math.kl.full_token_kl``; the frontier's KL axis is the same quantity). It has the
      expectation of the k1 log-ratio, kept as ``kl_ref_k1``, and far less spread: on the embedded model's openings
      its interval is several times narrower. Policies without ``token_log_softmax`` get k1 in ``kl_ref``;
    * ``reward_mean``; ``win_rate``: W(pi > pi_ref) against the m stored reference rewards of each prompt, ties
      counted half (``tilt.math.infalign.bootstrap_win_rate``);
    * each with a two-level bootstrap interval (``_ci``), and the efficiency keys of ``Frontier.efficiency``.

    The reference is used only to score the policy's samples (a forward pass); it is never sampled. Returns
    (metrics, the draws)."""
    from tilt.evaluation import draw_scored
    from tilt.math.bootstrap import bootstrap_mean
    from tilt.math.infalign import bootstrap_win_rate

    prompts = frontier.data.get("prompts")
    if prompts is None:
        raise ValueError("this frontier file does not list its prompts; rebuild it with `tilt frontier`")
    ref_rewards = torch.tensor(frontier.data["ref_rewards"], dtype=torch.float64)
    full = hasattr(policy, "token_log_softmax") and hasattr(ref, "token_log_softmax")
    draws = draw_scored(policy, prompts, samples_per_prompt, reward_fn, ref=ref, full_kl=full,
                        generator=torch.Generator().manual_seed(derive_seed(seed, "frontier-eval", "sample")))
    boot = dict(generator=torch.Generator().manual_seed(derive_seed(seed, "frontier-eval", "bootstrap")),
                num_resamples=num_resamples)
    metrics: dict[str, Any] = {}
    kl = draws.seq_kl_full if draws.seq_kl_full is not None else draws.seq_log_ratio
    for key, (value, low, high) in (("kl_ref", bootstrap_mean(kl, **boot)),
                                    ("kl_ref_k1", bootstrap_mean(draws.seq_log_ratio, **boot)),
                                    ("reward_mean", bootstrap_mean(draws.rewards, **boot)),
                                    ("win_rate", bootstrap_win_rate(draws.rewards, ref_rewards, **boot))):
        metrics[key], metrics[f"{key}_ci"] = value, [low, high]
    metrics["kl_estimator"] = "full vocabulary" if draws.seq_kl_full is not None else "k1"  # what kl_ref is
    metrics.update(frontier.efficiency(metrics))
    return metrics, draws


# --- the plot ------------------------------------------------------------------------------------------------------
def plot_frontier(frontier: Frontier, path: str | Path, *, runs: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                  title: str | None = None) -> Path:
    """Save a PNG of win rate against KL(pi || pi_ref): the frontier WR* (the calibrated tilt) as a band (its
    interval), best-of-N and the reward tilt as lines, the region past ``reach_kl`` shaded, and each run of
    ``runs`` ({label: [evaluation metrics, ...]} with ``kl_ref``, ``win_rate`` and optionally their ``_ci``, in
    training order) as a line of points with error bars. matplotlib is imported here only."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global state, no display needed
    from matplotlib.figure import Figure

    many = len(runs or {}) > 4  # a sweep: the legend goes beside the axes, the runs take 20 distinct colours
    fig = Figure(figsize=(10, 5) if many else (7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    kl = frontier.kl

    def ys(name, key):
        return [math.nan if v is None else v for v in frontier.curve(name)[key]]

    ax.fill_between(kl, ys("tilt_calibrated", "win_rate_low"), ys("tilt_calibrated", "win_rate_high"), color="tab:blue", alpha=0.25, lw=0)
    ax.plot(kl, ys("tilt_calibrated", "win_rate"), color="tab:blue", label="frontier WR* (calibrated tilt)")
    ax.plot(kl, ys("best_of_n", "win_rate"), color="tab:green", ls="--", label="best-of-N of pi_ref")
    ax.plot(kl, ys("tilt_reward", "win_rate"), color="tab:orange", ls=":", label="tilt by the reward")
    ax.axvspan(frontier.reach_kl, max(kl), color="grey", alpha=0.15, lw=0,
               label=f"beyond reach of m = {frontier.data['meta']['samples_per_prompt']} samples")
    for i, (label, evals) in enumerate((runs or {}).items()):
        xs = [e["kl_ref"] for e in evals]
        wr = [e["win_rate"] for e in evals]
        err = None
        if all("win_rate_ci" in e for e in evals):
            err = [[w - e["win_rate_ci"][0] for w, e in zip(wr, evals)], [e["win_rate_ci"][1] - w for w, e in zip(wr, evals)]]
        colour = matplotlib.colormaps["tab20"](i % 20) if many else f"C{(i + 3) % 10}"
        ax.errorbar(xs, wr, yerr=err, marker="o", ms=4, capsize=2, label=label, color=colour)
    ax.axhline(0.5, color="black", lw=0.5)
    ax.set_xlabel("KL(pi || pi_ref), nats")
    ax.set_ylabel("win rate against pi_ref")
    ax.set_ylim(0.45, 1.0)
    ax.set_xlim(0, max(kl))
    ax.set_title(title or f"KL–win-rate frontier ({frontier.data['meta']['prompts']} prompts)")
    if many:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
