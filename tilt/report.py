"""A report of one training run, or several side by side: PNG plots and one self-contained HTML page a researcher
can lift figures and numbers from.

It reads the run directory format (see ``docs/eval_and_sample.md`` and ``docs/runs.md``):

* ``RUN/metrics.jsonl``: one JSON object per step, ``{"step": int, <metric>: float, ...}``; the reward is the first
  of ``reward``, ``reward_mean`` present, the KL the first of ``kl_ref``, ``kl``; every numeric key starting with
  ``win_rate`` is a win rate;
* ``RUN/samples.jsonl``: rows ``{"step": int, "prompt": str, "completion": str, "reward": float}``; the first step
  logged (0: the initial policy) is "before", the last is "after";
* ``RUN/config.yaml`` (optional): the recipe (``recipe``) or pipeline (``pipeline``) and the reward spec
  (``reward``) come from it; shown as text;
* ``RUN/evals.jsonl`` (optional): rows written by ``tilt eval --record RUN`` or by training (with a ``step``);
* ``RUN/summary.json`` (optional): the numbers measured after training (preference recipes);
* ``RUN/frontier.json`` (optional): the task's KL–win-rate frontier (``tilt.frontier``, written by ``tilt frontier``
  and copied there by ``tilt eval --frontier F --record RUN``): the page then draws the runs' evaluations over it
  (frontier.png), and evaluations carrying ``efficiency`` / ``frontier_win_rate`` show them in their table;
* a pipeline run (``tilt pipeline demo-rl`` / ``demo-rlhf``): ``RUN/stages/<stage>/`` (completed stages, each with
  its metrics.jsonl and ``stage.json``) and ``RUN/work/<stage>/`` (the stage in progress).

The page has, for several runs, a comparison per reward (runs optimising different rewards are never drawn on one
axis: a warning names them and each reward gets its own plots); then one section per run with the plots of its
recipe (KL-RL/CTRL, DPG, DPO, online DPO/XPO, reward model, behaviour cloning; a pipeline has one part per stage),
its posterior diagnostics (the ``target_*`` keys of KL-RL and online DPO/XPO, ``is_*`` of DPG), its evaluations and
samples. Curves over steps show the raw per-step values faintly, a trailing moving average as the line, and a band
of plus or minus one rolling standard deviation over the same window (the step-to-step spread, not a confidence
interval); an estimate logged with its own 95% interval (``*_lower``/``*_upper``) shows that interval as the band.
Divergences (KL, JS, TV: never negative in truth) are shown by :func:`show_divergence`: estimator named, interval
clipped at zero; metrics.jsonl keeps the raw values.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

REWARD_KEYS = ("reward", "reward_mean")
KL_KEYS = ("kl_ref", "kl")
WIN_RATE_PREFIX = "win_rate"
BOUND_SUFFIXES = ("_low", "_high", "_ci", "_stderr", "_lower", "_upper")
DASH = "–"
STAGE_ORDER = ("bc", "preferences", "reward_model", "rl")
MIN_SMOOTH_POINTS = 8  # fewer points are drawn as they are, without a moving average


# --- divergences: the one display of a signed estimate of a non-negative quantity --------------------------------
def show_divergence(value, interval: Sequence[float] | None = None, *, estimator: str, digits: int = 4) -> str:
    """Text for an estimate of a divergence (KL, JS, TV: zero or more in truth, though an unbiased estimator such as
    k1 comes out below zero by sampling noise): the estimate and its interval clipped at zero, the estimator named.
    A negative estimate shows as 0 followed by its raw value; a missing one as a dash. Used by the report's tables
    and the command line's summaries alike; metrics.jsonl keeps the raw values.

    >>> show_divergence(-0.0328, (-0.05, 0.01), estimator="k1")
    '0 [0, 0.01] (k1; raw estimate -0.0328)'
    """
    v = _number(value)
    if v is None:
        return f"{DASH} (not estimated)"
    shown = "0" if v < 0 else f"{v:.{digits}g}"
    bounds = [_number(b) for b in interval] if interval is not None and len(interval) == 2 else None
    if bounds is not None and None not in bounds:
        shown += f" [{_clip0(bounds[0], digits)}, {_clip0(bounds[1], digits)}]"
    note = f"; raw estimate {v:.{digits}g}" if v < 0 else ""
    return f"{shown} ({estimator}{note})"


def _clip0(x: float, digits: int) -> str:
    return "0" if x <= 0 else f"{x:.{digits}g}"


def divergence_estimator(key: str) -> str | None:
    """The estimator behind a logged divergence key, or None when ``key`` is not a divergence. k1/k3: Schulman's
    estimators of KL(pi || ref) on the policy's samples; SNIS/IS: self-normalised / plain importance sampling
    (``tilt.math.importance``)."""
    base = key.split("/")[-1]
    base = base[len("before_"):] if base.startswith("before_") else base
    if base in ("kl_ref_k3",):
        return "k3"
    if base in ("kl", "kl_ref", "kl_clone", "kl_init", "kl_start"):  # the pipelines' measure() names kl_<reference>
        return "k1"
    for prefix in ("target_", "is_"):
        if base.startswith(prefix):
            rest = base[len(prefix):]
            if rest in ("kl_target_policy",):
                return "SNIS"
            if rest in ("kl_policy_target", "tv", "js"):
                return "IS"
    return None


# --- reading -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """What a run directory (or one stage of a pipeline run) holds, read and checked."""

    path: Path
    name: str
    metrics: list  # dicts, one per logged step, in file order
    samples: list  # dicts {step, prompt, completion, reward}
    config_text: str | None
    evals: list = ()  # dicts written by ``tilt eval --record`` or by training, in file order
    config: dict | None = None  # config.yaml parsed
    summary: dict | None = None  # summary.json (a run) or stage.json (a stage)
    summary_name: str = "summary.json"
    recipe: str = "kl-rl"  # kl-rl, ctrl, dpg, dpo, online-dpo, xpo, reward-model, bc, preferences, demo-rl, demo-rlhf
    stages: tuple = ()  # a pipeline run's stages, as Runs, in pipeline order
    frontier: object = None  # tilt.frontier.Frontier read from RUN/frontier.json, or None


def read_jsonl(path: Path, *, require_step: bool = True) -> list[dict]:
    """The JSON objects of a JSON Lines file, blank lines skipped; a bad line is an error naming its number.
    With ``require_step``, every row needs an integer ``step``."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {number}: not valid JSON ({exc.msg}); a run file holds one JSON object per line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
            if require_step and (not isinstance(row.get("step"), int) or isinstance(row.get("step"), bool)):
                raise ValueError(f"{path}, line {number}: every row needs an integer 'step'; got {row.get('step')!r}")
            rows.append(row)
    return rows


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg})") from None
    return data if isinstance(data, dict) else None


def _read_config(path: Path) -> tuple[str | None, dict | None]:
    if not path.is_file():
        return None, None
    import yaml

    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        parsed = None  # shown as text; the recipe and reward are then inferred or unknown
    return text, parsed if isinstance(parsed, dict) else None


def _samples(path: Path) -> list[dict]:
    samples = read_jsonl(path) if path.is_file() else []
    for i, row in enumerate(samples):
        if "prompt" not in row or "completion" not in row:
            raise ValueError(f"{path}: sample row {i + 1} lacks 'prompt' or 'completion'")
    return samples


def infer_recipe(config: dict | None, metrics: Sequence[dict]) -> str:
    """The recipe of a run: config.yaml's ``pipeline`` or ``recipe`` (CTRL when a calibration is active), else guessed
    from the metric keys."""
    if config:
        if isinstance(config.get("pipeline"), str):
            return config["pipeline"]
        recipe = str(config.get("recipe", "")).split(" ")[0].replace("_", "-")
        if recipe == "kl-rl" and isinstance(config.get("calibration"), dict) and config["calibration"].get("transform") not in (None, "none", ""):
            return "ctrl"
        if recipe:
            return recipe
    keys = {k for row in metrics for k in row}
    if "reward_calibrated" in keys:
        return "ctrl"
    if "preference_loss" in keys:
        return "xpo" if "bonus" in keys and any(_number(r.get("alpha")) for r in metrics) else "online-dpo"
    if "reward_margin" in keys or "rewards/chosen" in keys:
        return "dpo"
    if "log_z_running" in keys:
        return "dpg"
    if "margin" in keys and "accuracy" in keys:
        return "reward-model"
    if "tokens" in keys and "sequences" in keys:
        return "bc"
    return "kl-rl"


def _load_pipeline(path: Path, config_text: str | None, config: dict | None) -> Run:
    stages = []
    names = {p.name for root in ("stages", "work") if (path / root).is_dir() for p in (path / root).iterdir()
             if p.is_dir() and not p.name.startswith(".")}
    for stage in sorted(names, key=lambda s: (STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER), s)):
        done, work = path / "stages" / stage, path / "work" / stage
        folder = done if done.is_dir() else work
        metrics = read_jsonl(folder / "metrics.jsonl") if (folder / "metrics.jsonl").is_file() else []
        recipe = {"rl": "kl-rl", "reward_model": "reward-model"}.get(stage, stage)
        label = stage if folder == done else f"{stage} (in progress)"
        stages.append(Run(path=folder, name=label, metrics=metrics, samples=[], config_text=None,
                          summary=_read_json(folder / "stage.json"), summary_name="stage.json", recipe=recipe))
    if not stages:
        raise ValueError(f"{path} is a pipeline run with no stage yet (RUN/stages/ and RUN/work/ are empty): "
                         "the pipeline has not finished a step")
    rl = next((s for s in stages if s.name.startswith("rl")), None)
    pipeline = (config or {}).get("pipeline") or "pipeline"
    return Run(path=path, name=path.resolve().name, metrics=rl.metrics if rl else [], samples=_samples(path / "samples.jsonl"),
               config_text=config_text, evals=_evals(path), config=config, summary=None, recipe=str(pipeline), stages=tuple(stages),
               frontier=_frontier(path))


def _evals(path: Path) -> list[dict]:
    return read_jsonl(path / "evals.jsonl", require_step=False) if (path / "evals.jsonl").is_file() else []


def _frontier(path: Path):
    """RUN/frontier.json as a ``tilt.frontier.Frontier``, or None when the run holds none; a file that is not a
    frontier is an error naming it."""
    if not (path / "frontier.json").is_file():
        return None
    from tilt.frontier import Frontier

    return Frontier.load(path / "frontier.json")


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory (or a pipeline run's). Raises FileNotFoundError when it or its metrics.jsonl is missing,
    ValueError when the metrics hold no step or a line is malformed."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory not found: {str(run_dir)!r}")
    config_text, config = _read_config(path / "config.yaml")
    if (path / "stages").is_dir() or (path / "work").is_dir() or (config or {}).get("pipeline"):
        return _load_pipeline(path, config_text, config)
    metrics_path = path / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} has no metrics.jsonl: is it a run directory? (training writes RUN/metrics.jsonl)")
    metrics = read_jsonl(metrics_path)
    if not metrics:
        raise ValueError(f"{metrics_path} holds no metrics: the run has not logged a step yet")
    return Run(path=path, name=path.resolve().name, metrics=metrics, samples=_samples(path / "samples.jsonl"),
               config_text=config_text, evals=_evals(path), config=config, summary=_read_json(path / "summary.json"),
               recipe=infer_recipe(config, metrics), frontier=_frontier(path))


def reward_of(run: Run) -> str:
    """The reward a run optimises, as text, from its config.yaml: the ``reward`` spec(s), or the preferences file of
    an offline preference recipe; "unknown" when the config does not say."""
    config = run.config or {}
    if isinstance(config.get("run"), dict):  # the config shape of every command since the run layer: run: holds the data
        config = {**config, **config["run"]}
    reward = config.get("reward")
    if isinstance(reward, (list, tuple)) and reward:
        text = " + ".join(map(str, reward))
    elif isinstance(reward, str) and reward:
        text = reward
    elif config.get("preferences"):
        text = f"preferences {config['preferences']}"
    else:
        return "unknown (config.yaml names no reward)"
    if run.recipe == "demo-rlhf":
        text = f"reward model fitted to preferences labelled by {text}"
    return text


def _number(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def first_key(metrics: Sequence[dict], candidates: Sequence[str]) -> str | None:
    """The first of ``candidates`` that some row holds as a finite number."""
    for key in candidates:
        if any(_number(row.get(key)) is not None for row in metrics):
            return key
    return None


def win_rate_keys(metrics: Sequence[dict]) -> list[str]:
    """Every numeric metric named win_rate* (not the *_low/*_high/*_ci bounds)."""
    keys = {k for row in metrics for k, v in row.items() if k.startswith(WIN_RATE_PREFIX) and _number(v) is not None}
    return sorted(k for k in keys if not k.endswith(BOUND_SUFFIXES))


def series(metrics: Sequence[dict], *keys: str) -> list[tuple[float, ...]]:
    """(step, value of each key) for every row where all keys are finite numbers, ordered by step (a later row
    for the same step wins: a resumed run may log a step twice)."""
    by_step = {}
    for row in metrics:
        values = [_number(row.get(k)) for k in keys]
        if all(v is not None for v in values):
            by_step[row["step"]] = (float(row["step"]), *values)
    return [by_step[s] for s in sorted(by_step)]


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def rolling_std(values: Sequence[float], window: int) -> list[float]:
    """Trailing standard deviation (n - 1 in the denominator) over ``window`` points; 0 where fewer than 2."""
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1): i + 1]
        if len(part) < 2:
            out.append(0.0)
            continue
        m = sum(part) / len(part)
        out.append(math.sqrt(sum((v - m) ** 2 for v in part) / (len(part) - 1)))
    return out


def smoothing_window(n: int) -> int:
    """Window of the moving average of n points: a tenth of them, at least 3; 1 (none) under MIN_SMOOTH_POINTS."""
    return 1 if n < MIN_SMOOTH_POINTS else max(3, n // 10)


# --- what each recipe shows ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Curve:
    key: str
    label: str
    bounds: tuple[str, str] | None = None  # keys of a logged 95% interval, drawn as the band


@dataclass(frozen=True)
class Panel:
    name: str
    title: str
    ylabel: str
    curves: tuple
    nonnegative: bool = False  # a divergence: bands clipped at 0
    why_missing: str = ""  # said when the run logged none of the curves


def _posterior_panels(prefix: str, why: str) -> list[Panel]:
    def est(name: str, label: str) -> Curve:
        key = f"{prefix}{name}"
        return Curve(key, label, (f"{key}_lower", f"{key}_upper"))

    return [
        Panel("log_z", "Posterior: log Z (mean over prompts)", "log Z", (est("log_z", "log Z"),), why_missing=why),
        Panel("kl_target", "Posterior: KL between pi and the target pi*", "nats",
              (est("kl_target_policy", "KL(pi* || pi), SNIS"), est("kl_policy_target", "KL(pi || pi*), IS")), True, why),
        Panel("tv_js", "Posterior: TV and JS between pi and pi*", "TV, JS (nats)",
              (est("tv", "TV(pi, pi*), IS"), est("js", "JS(pi, pi*), IS")), True, why),
        Panel("ess", "Posterior: effective sample size", "ESS / samples per prompt",
              (Curve(f"{prefix}ess_fraction", "ESS fraction (Kish)"),), why_missing=why),
    ]


GRAD = Panel("grad_norm", "Gradient norm (before clipping)", "total 2-norm", (Curve("grad_norm", "grad_norm"),),
             why_missing="older runs logged no gradient norm")
LR = Panel("learning_rate", "Learning rate", "learning rate", (Curve("learning_rate", "learning_rate"),),
           why_missing="older runs logged no learning rate")
KL_RL_DIAG_WHY = "KL-RL logs target_* only with beta > 0"
ONLINE_DIAG_WHY = "online DPO/XPO logs target_* only with a Bradley-Terry oracle and exact sampling"
DPO_PANELS = [
    Panel("loss", "Loss, train and held out", "loss", (Curve("loss", "train"), Curve("eval/loss", "held out"))),
    Panel("accuracy", "Accuracy: share of pairs with h > 0", "accuracy",
          (Curve("accuracy", "train"), Curve("eval/accuracy", "held out"))),
    Panel("margins", "Reward margin beta * h", "rewards/margins",
          (Curve("rewards/margins", "train"), Curve("reward_margin", "train (reward_margin)"), Curve("eval/rewards/margins", "held out"))),
    Panel("rewards", "Implicit rewards beta * log(pi / pi_ref)", "reward",
          (Curve("rewards/chosen", "chosen"), Curve("rewards/rejected", "rejected"),
           Curve("eval/rewards/chosen", "chosen, held out"), Curve("eval/rewards/rejected", "rejected, held out")),
          why_missing="older runs logged no rewards/chosen, rewards/rejected"),
    Panel("logps", "Sequence log-probabilities under pi", "log pi(y|x)",
          (Curve("logps/chosen", "chosen"), Curve("logps/rejected", "rejected")), why_missing="older runs logged no logps/*"),
    GRAD, LR,
]
RECIPE_PANELS: dict[str, list[Panel]] = {
    "kl-rl": [Panel("loss", "Loss", "loss", (Curve("loss", "loss"),)),
              Panel("entropy", "Entropy estimate: mean -log pi(y)", "nats", (Curve("entropy", "entropy"),)),
              Panel("length", "Completion length", "tokens", (Curve("completion_length", "mean length"),)),
              *_posterior_panels("target_", KL_RL_DIAG_WHY), GRAD],
    "dpg": [Panel("loss", "Loss", "loss", (Curve("loss", "loss"),)),
            Panel("log_z_running", "Running log Z estimate", "log Z", (Curve("log_z_running", "running log Z"),)),
            *_posterior_panels("is_", "DPG logs is_* every diagnostics_interval steps (0 = never)"), GRAD],
    "dpo": DPO_PANELS,
    "online-dpo": [Panel("loss", "Loss and its preference term", "loss",
                         (Curve("loss", "loss"), Curve("preference_loss", "preference term (decided pairs)"))),
                   Panel("bonus", "Exploration bonus alpha * log pi(y~)", "bonus", (Curve("bonus", "bonus (0 unless XPO)"),)),
                   *DPO_PANELS[1:4],
                   Panel("win_rate_policy", "Oracle: policy sample preferred, and ties", "share",
                         (Curve("policy_sample_win_rate", "policy sample preferred"), Curve("tie_fraction", "ties"))),
                   *_posterior_panels("target_", ONLINE_DIAG_WHY), GRAD],
    "reward-model": [Panel("loss", "Bradley-Terry loss", "loss", (Curve("loss", "loss"),)),
                     Panel("accuracy", "Training accuracy (a tie counts 1/2)", "accuracy", (Curve("accuracy", "accuracy"),)),
                     Panel("margin", "Reward margin r(chosen) - r(rejected)", "margin", (Curve("margin", "margin"),)), GRAD],
    "bc": [Panel("loss", "NLL per completion token", "nats / token", (Curve("loss", "loss"),)), GRAD],
    "preferences": [],
}
RECIPE_PANELS["ctrl"] = [Panel("ctrl_reward", "CTRL: raw reward r and calibrated C", "reward",
                               (Curve("reward_raw", "raw reward r"), Curve("reward_calibrated", "calibrated C"))),
                         *RECIPE_PANELS["kl-rl"]]
RECIPE_PANELS["xpo"] = RECIPE_PANELS["online-dpo"]
RECIPE_TITLES = {"kl-rl": "KL-regularised RL", "ctrl": "CTRL (KL-RL on a calibrated reward)", "dpg": "DPG (distribution matching)",
                 "dpo": "DPO (offline preferences)", "online-dpo": "online DPO", "xpo": "XPO (online DPO with exploration)",
                 "reward-model": "Bradley-Terry reward model", "bc": "behaviour cloning", "preferences": "preference collection",
                 "demo-rl": "demonstration-regularised RL (pipeline)", "demo-rlhf": "demonstration-regularised RLHF (pipeline)"}
POSTERIOR_PREFIX = {"kl-rl": "target_", "ctrl": "target_", "online-dpo": "target_", "xpo": "target_", "dpg": "is_"}


def _has(metrics: Sequence[dict], key: str) -> bool:
    return any(_number(row.get(key)) is not None for row in metrics)


# --- plots ---------------------------------------------------------------------------------------------------------
def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global state, no display needed
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.0), dpi=100)  # fixed margins: a constrained layout draws every figure twice
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.11, right=0.98, top=0.92, bottom=0.12)
    return fig, fig.add_subplot()


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _draw_curve(ax, metrics: Sequence[dict], curve: Curve, colour, label: str, *, nonnegative: bool) -> str | None:
    """One curve over steps: raw faint, moving average as the line, a band (the logged interval, else ± one rolling
    std). Returns how the band was made ("interval", "std", "none"), or None when the run has no such value."""
    bounded = curve.bounds is not None and _has(metrics, curve.bounds[0]) and _has(metrics, curve.bounds[1])
    pts = series(metrics, curve.key, *curve.bounds) if bounded else series(metrics, curve.key)
    if not pts:
        return None
    steps, values = [p[0] for p in pts], [p[1] for p in pts]
    w = smoothing_window(len(values))
    floor = 0.0 if nonnegative else -math.inf
    if bounded:
        low, high = [max(p[2], floor) for p in pts], [max(p[3], floor) for p in pts]
        ax.fill_between(steps, low, high, color=colour, alpha=0.18, linewidth=0)
        band = "interval"
    elif w > 1:
        mean, sd = smooth(values, w), rolling_std(values, w)
        ax.fill_between(steps, [max(m - s, floor) for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                        color=colour, alpha=0.18, linewidth=0)
        band = "std"
    else:
        band = "none"
    if w > 1:
        ax.plot(steps, values, color=colour, alpha=0.3, linewidth=0.8)
        ax.plot(steps, smooth(values, w), color=colour, linewidth=2, label=f"{label} (mean of {w})")
    else:
        ax.plot(steps, values, color=colour, linewidth=1.6, marker="o", markersize=3, label=label)
    return band


def plot_panel(runs_and_metrics: Sequence[tuple[str, Sequence[dict]]], panel: Panel, path: Path) -> set[str] | None:
    """Draw ``panel`` for each (label, metrics); None (nothing written) when no curve has data, else the kinds of band
    drawn."""
    fig, ax = _figure()
    n_lines = len(runs_and_metrics) * len(panel.curves)
    colours = iter(_colours(n_lines))
    bands = set()
    for run_label, metrics in runs_and_metrics:
        drawn_values = []
        for curve in panel.curves:
            colour = next(colours)
            values = series(metrics, curve.key)
            if values and values in drawn_values:  # the same numbers under another name (reward_margin, rewards/margins)
                continue
            drawn_values.append(values)
            label = f"{run_label}: {curve.label}" if run_label else curve.label
            band = _draw_curve(ax, metrics, curve, colour, label, nonnegative=panel.nonnegative)
            if band is not None:
                bands.add(band)
    if not bands:
        return None
    if panel.nonnegative:
        ax.axhline(0.0, color="black", linewidth=0.6, alpha=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.set_title(panel.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path)
    return bands


def plot_against_kl(runs: Sequence[Run], y_keys_of, ylabel: str, title: str, path: Path) -> bool:
    """y against KL for each run (its path over training, smoothed, last point marked); with several runs, a dashed
    line through the last points sorted by KL. ``y_keys_of(run)`` lists the y metrics of a run. False if nothing to draw."""
    fig, ax = _figure()
    finals: dict[str, list[tuple[float, float]]] = {}
    drawn = False
    for run, colour in zip(runs, _colours(len(runs))):
        kl_key = first_key(run.metrics, KL_KEYS)
        if kl_key is None:
            continue
        for y_key, style in zip(y_keys_of(run), ["-", "--", ":", "-."] * 4):
            pts = series(run.metrics, kl_key, y_key)
            if not pts:
                continue
            kls, ys = [p[1] for p in pts], [p[2] for p in pts]
            w = smoothing_window(len(pts))
            if w > 1:
                ax.scatter(kls, ys, color=colour, alpha=0.15, s=6)
                kls, ys = smooth(kls, w), smooth(ys, w)
            label = run.name if len(runs) > 1 else ""
            ax.plot(kls, ys, style, color=colour, linewidth=1.8, label=f"{label} {y_key}".strip())
            ax.plot(kls[-1:], ys[-1:], "o", color=colour, markersize=8, markeredgecolor="black")
            finals.setdefault(y_key, []).append((kls[-1], ys[-1]))
            drawn = True
    if not drawn:
        return False
    if len(runs) > 1:
        for y_key, pts in finals.items():
            if len(pts) > 1:
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", color="grey", linewidth=1,
                        label=f"last points across runs ({y_key})")
    ax.set_xlabel("KL(pi || pi_ref)  (nats, k1 on the step's samples)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path)
    return True


EVAL_WIN_RATES = (("win_rate", "o", "standard"), ("win_rate_bon", "s", "best-of-N"), ("win_rate_won", "v", "worst-of-N"))


def _interval(row: dict, key: str) -> tuple[float, float] | None:
    return _pair(row.get(f"{key}_ci"))


def _pair(ci) -> tuple[float, float] | None:
    """An interval [low, high] of two finite numbers, else None."""
    if isinstance(ci, list) and len(ci) == 2 and all(_number(v) is not None for v in ci):
        return float(ci[0]), float(ci[1])
    return None


def plot_evals(runs_evals: Sequence[tuple[str, Sequence[dict]]], path: Path) -> bool:
    """Each evaluation's win rates against its KL, with intervals as error bars (the KL interval clipped at 0); in
    the order of the evaluations a thin line joins a run's points; with several runs, a dashed line per win rate
    through each run's last evaluation, sorted by KL."""
    fig, ax = _figure()
    lasts: dict[str, list[tuple[float, float]]] = {}
    drawn = False
    for (name, evals), colour in zip(runs_evals, _colours(len(runs_evals))):
        for key, marker, label in EVAL_WIN_RATES:
            pts = []
            for i, row in enumerate(evals):
                kl, y = _number(row.get("kl_ref")), _number(row.get(key))
                if kl is None or y is None:
                    continue
                n = f"-{row['best_of']}" if key != "win_rate" and row.get("best_of") else ""
                xci, yci = _interval(row, "kl_ref"), _interval(row, key)
                xerr = [[max(kl - max(xci[0], 0.0), 0.0)], [max(xci[1] - kl, 0.0)]] if xci else None
                last = i == len(evals) - 1
                ax.errorbar([kl], [y], xerr=xerr, yerr=[[y - yci[0]], [yci[1] - y]] if yci else None, fmt=marker, color=colour,
                            capsize=3, label=f"{name} {label.replace('-N', n)}".strip() if last else None)
                pts.append((kl, y))
                drawn = True
            if len(pts) > 1:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=colour, linewidth=0.8, alpha=0.5)
            if pts:
                lasts.setdefault(key, []).append(pts[-1])
    if not drawn:
        return False
    if len(runs_evals) > 1:
        for key, pts in lasts.items():
            if len(pts) > 1:
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", color="grey", linewidth=1)
    ax.axhline(0.5, color="black", linewidth=0.6, alpha=0.5)
    ax.set_xlabel("KL(pi || pi_ref)  (nats, k1, interval clipped at 0)")
    ax.set_ylabel("win rate against pi_ref")
    ax.set_title("evaluations: win rates against KL, with intervals", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path)
    return True


# --- HTML pieces -----------------------------------------------------------------------------------------------------
_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; margin: 0.6em 0; }
table.wide { width: 100%; table-layout: fixed; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.55em; vertical-align: top; text-align: left; overflow-wrap: anywhere; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.key { overflow-wrap: normal; }
td.text { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 0.88em; }
.na { color: #888; }
.warn { background: #fff4d6; border: 1px solid #e0b400; padding: 0.6em 0.9em; margin: 1em 0; }
.note { color: #555; font-size: 0.92em; }
.figs { display: grid; grid-template-columns: repeat(auto-fill, minmax(440px, 1fr)); gap: 0.8em 1.2em; }
figure { margin: 0.6em 0; min-width: 0; } figcaption { color: #555; font-size: 0.85em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 0.8em; white-space: pre-wrap; overflow-wrap: anywhere; }
code { overflow-wrap: anywhere; }
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _na(reason: str) -> str:
    return f'<span class="na">{DASH} ({_e(reason)})</span>'


def _num(x, reason: str = "not logged") -> str:
    v = _number(x)
    return _na(reason) if v is None else _e(f"{v:.4g}")


def _value_html(key: str, value, interval=None, reason: str = "not logged", estimator: str | None = None) -> str:
    """A metric's value for a table: divergences through :func:`show_divergence` (``estimator`` names it when the row
    says, else :func:`divergence_estimator`), numbers with their interval."""
    estimator = estimator or divergence_estimator(key)
    if _number(value) is None:
        return _na(reason) if not isinstance(value, (str, bool)) else _e(value)
    if estimator is not None:
        return _e(show_divergence(value, interval, estimator=estimator))
    text = f"{_number(value):.4g}"
    if interval is not None and len(interval) == 2 and None not in [_number(b) for b in interval]:
        text += f" [{_number(interval[0]):.4g}, {_number(interval[1]):.4g}]"
    return _e(text)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, wide: bool = False, numeric_from: int = 1) -> str:
    """An HTML table inside a scrolling box; cells are HTML already. An empty cell is an error (nothing blank)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            cell = cell if str(cell).strip() else _na("empty")  # nothing blank: an absent value says why
            cells.append(f"<td class='{'num' if i >= numeric_from else 'key'}'>{cell}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cls = " class='wide'" if wide else ""
    return f"<div class='scroll'><table{cls}><tr>{head}</tr>{''.join(body)}</table></div>"


def _interval_of(row: dict, key: str):
    lo, hi = row.get(f"{key}_lower"), row.get(f"{key}_upper")
    if _number(lo) is not None and _number(hi) is not None:
        return (lo, hi)
    return _interval(row, key)


def metric_keys(metrics: Sequence[dict]) -> list[str]:
    """The numeric metrics of a run (interval bounds folded into their estimate), in first-seen order."""
    seen = {}
    for row in metrics:
        for k, v in row.items():
            if k != "step" and _number(v) is not None and not k.endswith(BOUND_SUFFIXES):
                seen.setdefault(k, None)
    return list(seen)


def _summary_table(metrics: Sequence[dict]) -> str:
    """Every numeric metric: first and last logged value, and the mean over the last tenth of the steps."""
    rows = []
    for k in metric_keys(metrics):
        pts = [row for row in metrics if _number(row.get(k)) is not None]
        tail = pts[-max(1, len(pts) // 10):]
        mean_tail = sum(_number(r[k]) for r in tail) / len(tail)
        rows.append((f"<code>{_e(k)}</code>", _value_html(k, pts[0][k], _interval_of(pts[0], k)),
                     _value_html(k, pts[-1][k], _interval_of(pts[-1], k)), _value_html(k, mean_tail)))
    return _table(["metric", "first", "last", "mean of the last tenth of the steps"], rows)


def _diagnostics_html(run: Run, prefix: str) -> str:
    """The posterior diagnostics at the last step that logged them, with their intervals."""
    rows_with = [row for row in run.metrics if _number(row.get(f"{prefix}log_z")) is not None]
    if not rows_with:
        return ""
    last = rows_with[-1]
    labels = [("log_z", "log Z (mean over prompts), IS"), ("kl_target_policy", "KL(pi* || pi)"), ("kl_policy_target", "KL(pi || pi*)"),
              ("tv", "TV(pi, pi*)"), ("js", "JS(pi, pi*)"), ("ess_fraction", "ESS as a fraction of the samples per prompt (Kish)")]
    rows = [(_e(label), _value_html(f"{prefix}{key}", last.get(f"{prefix}{key}"), _interval_of(last, f"{prefix}{key}")))
            for key, label in labels]
    return (f"<h4>Posterior diagnostics at step {_e(last['step'])} (95% delta-method intervals; read the ESS first)</h4>"
            + _table(["quantity", "estimate [95% interval] (estimator)"], rows))


def _dict_table(d: dict) -> str:
    """A summary.json / stage.json as a table; ``x_ci`` pairs fold into ``x``."""
    rows = []
    for k, v in d.items():
        if k.endswith("_ci") and k[:-3] in d:
            continue
        if isinstance(v, dict):
            v = json.dumps(v)
        if isinstance(v, list) and v and all(_number(x) is not None for x in v):
            cell = _e("[" + ", ".join(f"{x:.4g}" for x in v) + "]")
        elif isinstance(v, list):
            cell = _e(json.dumps(v)) if v else _na("empty list")
        else:
            cell = _value_html(k, v, d.get(f"{k}_ci"), reason="null") if not isinstance(v, str) else (_e(v) or _na("empty"))
        rows.append((f"<code>{_e(k)}</code>", cell))
    return _table(["quantity", "value"], rows)


FRONTIER_COLUMNS = (("WR*(KL)", "frontier_win_rate"), ("efficiency [95% interval]", "efficiency"))
"""Columns of the evaluations table when some evaluation was scored against a frontier (``tilt eval --frontier``)."""
NO_FRONTIER = "n/a: evaluated without --frontier"


def has_efficiency(evals: Sequence[dict]) -> bool:
    """Whether some evaluation carries the keys of ``tilt.frontier.Frontier.efficiency``."""
    return any(k in row for row in evals for _, k in FRONTIER_COLUMNS)


def _ci_text(row: dict, key: str) -> str:
    ci = _interval(row, key)
    return f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else ""


def _frontier_cell(row: dict, key: str) -> str:
    """WR* at the evaluation's KL, or its efficiency, with the interval; "n/a" with the reason where there is none."""
    if key not in row:
        return _na(NO_FRONTIER)
    v = _number(row[key])
    if v is None:  # NaN ("nan" once written): WR*(KL) is ½ at KL 0, and the ratio is undefined
        return _na("n/a: WR*(KL) = ½ at this KL, the ratio is undefined")
    text = _e(f"{v:.3g}{_ci_text(row, key)}")
    if key == "efficiency" and _pair(row.get("efficiency_ci_total")):
        lo, hi = _pair(row["efficiency_ci_total"])
        text += f"<br><span class='note'>{_e(f'[{lo:.3g}, {hi:.3g}] with the KL and frontier uncertainty')}</span>"
    if key == "frontier_win_rate" and row.get("beyond_reach") is True:
        text += "<br><span class='note'>beyond reach: under-stated</span>"
    return text


def last_evaluation_text(run: Run) -> str | None:
    """One sentence on the run's last evaluation (the last row of evals.jsonl): its win rate and KL with their
    intervals and, when it was scored against a frontier, its efficiency and WR* at its KL with theirs."""
    if not run.evals:
        return None
    row = run.evals[-1]
    step = row.get("step")
    where = f"step {step}" if step is not None else str(row.get("model") or "tilt eval --record")
    text = f"Last evaluation ({where}):"
    if _number(row.get("win_rate")) is not None:
        text += f" win rate {_number(row['win_rate']):.3g}{_ci_text(row, 'win_rate')} against the reference"
    if _number(row.get("kl_ref")) is not None:
        text += f" at KL {show_divergence(row['kl_ref'], _interval(row, 'kl_ref'), estimator=row.get('kl_estimator', 'k1'), digits=3)}"
    if "efficiency" not in row:
        return text + "; no efficiency (evaluated without a frontier: tilt eval --frontier FILE --record RUN adds it)."
    eff, star = _number(row.get("efficiency")), _number(row.get("frontier_win_rate"))
    text += (f"; efficiency (WR − ½)/(WR*(KL) − ½) = {eff:.3g}{_ci_text(row, 'efficiency')}" if eff is not None
             else "; efficiency undefined (WR*(KL) = ½ at this KL)")
    if _pair(row.get("efficiency_ci_total")):
        lo, hi = _pair(row["efficiency_ci_total"])
        text += f" ([{lo:.3g}, {hi:.3g}] with the KL's and the frontier's uncertainty)"
    if star is not None:
        text += f", where the frontier's best win rate is WR*(KL) = {star:.3g}{_ci_text(row, 'frontier_win_rate')}"
    if row.get("beyond_reach") is True:
        text += " (beyond the frontier's reach: WR* is under-stated there, the efficiency over-stated)"
    return text + "."


def _evals_html(run: Run) -> str:
    if not run.evals:
        return ""
    cols = [("KL(pi || ref)", "kl_ref"), ("reward", "reward_mean"), ("reference reward", "ref_reward_mean"), ("win rate", "win_rate"),
            ("best-of-N", "win_rate_bon"), ("worst-of-N", "win_rate_won")]
    frontier_cols = list(FRONTIER_COLUMNS) if has_efficiency(run.evals) else []
    rows = []
    for row in run.evals:
        step = row.get("step")
        model = row.get("model") or (f"the policy at step {step}" if step is not None else None)
        reward = row.get("reward")
        cells = [_e(step) if step is not None else _na("tilt eval --record: no step"),
                 _e(model) if model else _na("not recorded"),
                 _e(row["ref"]) if row.get("ref") else _na("not recorded"),
                 _e(" + ".join(reward) if isinstance(reward, list) else reward) if reward else _e(reward_of(run)),
                 _e(row["best_of"]) if row.get("best_of") else _na("no best-of-N")]
        for _, key in cols:
            reason = "no --best-of" if key in ("win_rate_bon", "win_rate_won") else "not measured"
            cells.append(_value_html(key, row.get(key), _interval(row, key), reason=reason,
                                     estimator=row.get("kl_estimator") if key == "kl_ref" else None))
        cells += [_frontier_cell(row, key) for _, key in frontier_cols]
        rows.append(cells)
    note = ("Each on held-out prompts against the reference; intervals are bootstrap intervals (KL's clipped at 0: the truth "
            "is never negative).")
    if frontier_cols:
        note += (" WR*(KL): the frontier's best win rate at the evaluation's KL; efficiency = (WR − ½)/(WR*(KL) − ½), its "
                 "interval from the win rate's, and below it the interval with the KL's and the frontier's uncertainty too.")
    return (f"<h4>Evaluations</h4><p class='headline'><b>{_e(last_evaluation_text(run))}</b></p><p class='note'>{_e(note)}</p>"
            + _table(["step", "model", "reference", "reward", "N"] + [c for c, _ in cols + frontier_cols], rows, numeric_from=5))


# --- the frontier ----------------------------------------------------------------------------------------------------
def frontier_evals(evals: Sequence[dict]) -> tuple[list[dict], bool]:
    """(the evaluations to draw over a frontier, whether they were scored against one): those carrying ``efficiency``
    when some do, else every one with a KL and a win rate; each reduced to ``kl_ref``, ``win_rate`` and a finite
    ``win_rate_ci`` (what ``tilt.frontier.plot_frontier`` reads)."""
    usable = [r for r in evals if _number(r.get("kl_ref")) is not None and _number(r.get("win_rate")) is not None]
    scored = [r for r in usable if "efficiency" in r]
    rows = []
    for r in scored or usable:
        ci = _interval(r, "win_rate")
        rows.append({"kl_ref": _number(r["kl_ref"]), "win_rate": _number(r["win_rate"]), **({"win_rate_ci": list(ci)} if ci else {})})
    return rows, bool(scored)


def _frontier_html(runs: Sequence[Run], plots: _Plots) -> str:
    """The first run's frontier (RUN/frontier.json) with every run's evaluations over it, and its caption."""
    frontier = runs[0].frontier
    if frontier is None:
        return ""
    from tilt.frontier import plot_frontier

    curves, notes, past = {}, [], 0
    right = max(frontier.kl)
    for run in runs:
        if run.frontier is not None and run.frontier.data != frontier.data:
            notes.append(f"{run.name} holds a frontier.json of its own, different from this one: its evaluations are not drawn")
            continue
        rows, scored = frontier_evals(run.evals)
        if not rows:
            continue
        label = run.name if scored else f"{run.name} (not scored against this frontier)"
        curves[label] = rows
        past += sum(r["kl_ref"] > right for r in rows)
    meta = frontier.data["meta"]
    m, level = meta["samples_per_prompt"], meta.get("level", 0.95)
    caption = (f"The KL–win-rate frontier of the task (frontier.json: {meta['prompts']} prompts, m = {m} reference samples "
               "each). Blue line: WR*(KL), the best win rate against pi_ref that any policy can reach at KL(pi || pi_ref) = "
               "KL, that of pi_ref tilted by the calibrated reward (the share of reference samples a completion beats); "
               f"blue band: the frontier's {round(100 * level)}% bootstrap interval. Dashed: best-of-N of pi_ref; dotted: "
               f"pi_ref tilted by the reward itself. Shaded grey: KL beyond reach of m = {m} samples (past "
               f"{frontier.reach_kl:.2f} nats = log m − 1), where the frontier rests on each prompt's top samples and is "
               "under-stated. Points: each run's evaluations in order (error bars: win-rate intervals); an evaluation's "
               "efficiency = (WR − ½)/(WR*(KL) − ½) at its own KL is 1 on the frontier and 0 for pi_ref.")
    if past:
        caption += f" {past} evaluation{'s lie' if past > 1 else ' lies'} past the right edge (KL above log m)."
    if not curves:
        caption += " No run has evaluations to draw (tilt eval RUN --frontier frontier.json --record RUN adds them)."
    if notes:
        caption += " " + "; ".join(notes) + "."
    fig = plots.custom("frontier", lambda path: plot_frontier(frontier, path, runs=curves), caption)
    return "<h2>Against the KL–win-rate frontier</h2>" + _grid([fig])


# --- samples -------------------------------------------------------------------------------------------------------
def before_after(samples: Sequence[dict], max_prompts: int = 20) -> tuple[int | None, int | None, list[tuple[str, list, list]]]:
    """(first step, last step, [(prompt, rows at the first step, rows at the last step)]) for the prompts sampled at
    both steps (or, with one step logged, at that step), in order of first appearance, at most ``max_prompts``."""
    if not samples:
        return None, None, []
    steps = sorted({row["step"] for row in samples})
    first, last = steps[0], steps[-1]
    groups: dict[str, tuple[list, list]] = {}
    for row in samples:
        key = str(row["prompt"])
        if row["step"] == first:
            groups.setdefault(key, ([], []))[0].append(row)
        elif row["step"] == last:
            groups.setdefault(key, ([], []))[1].append(row)
    pairs = [(p, b, a) for p, (b, a) in groups.items() if b and (a or first == last)]
    return first, last, pairs[:max_prompts]


def _samples_html(run: Run, max_prompts: int) -> str:
    first, last, pairs = before_after(run.samples, max_prompts)
    if not pairs:
        return "<p>No samples logged (RUN/samples.jsonl is missing or empty).</p>"
    if first == last:
        head = f"<p>Samples were logged at step {_e(first)} only.</p>"
    else:
        head = f"<p>Completions of the same prompts before training (step {_e(first)}) and after (step {_e(last)}).</p>"
    out = [head, "<div class='scroll'><table class='wide'><colgroup><col style='width:22%'><col style='width:31%'>"
           "<col style='width:8%'><col style='width:31%'><col style='width:8%'></colgroup>"
           "<tr><th>prompt</th><th>before</th><th>reward</th><th>after</th><th>reward</th></tr>"]
    for prompt, before, after in pairs:
        n = max(len(before), len(after))
        for i in range(n):
            b = before[i] if i < len(before) else None
            a = after[i] if i < len(after) else None
            cells = [f'<td class="text" rowspan="{n}">{_e(prompt) or _na("empty prompt")}</td>'] if i == 0 else []
            for row, when in ((b, "before"), (a, "after")):
                if row is None:
                    cells += [f"<td>{_na(f'fewer samples {when}')}</td>", f"<td>{_na('no sample')}</td>"]
                    continue
                cells.append(f'<td class="text">{_e(row["completion"]) or _na("empty completion")}</td>')
                cells.append(f'<td class="num">{_num(row.get("reward"), "no reward")}</td>')
            out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table></div>")
    return "\n".join(out)


# --- assembling the page ---------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def _figure_html(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f"<figure><img alt='{_e(path.stem)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{caption} <a href='{_e(path.name)}'>{_e(path.name)}</a></figcaption></figure>")


def _band_caption(bands: set[str], nonnegative: bool) -> str:
    parts = []
    if "std" in bands:
        parts.append("line: trailing moving average; band: ± one rolling standard deviation over the same window (the "
                     "step-to-step spread, not a confidence interval); faint: the raw per-step values")
    if "interval" in bands:
        parts.append("band: the 95% interval logged with each step's estimate; line: its trailing moving average; faint: "
                     "the raw per-step estimates")
    if "none" in bands:
        parts.append(f"fewer than {MIN_SMOOTH_POINTS} points: drawn as logged")
    if nonnegative:
        parts.append("bands clipped at 0")
    return _e("; ".join(parts) + ".")


class _Plots:
    """Writes the PNGs into one folder and remembers them by name."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.made = out_dir, {}

    def panel(self, name: str, runs_and_metrics, panel: Panel) -> str | None:
        path = self.out_dir / f"{name}.png"
        bands = plot_panel(runs_and_metrics, panel, path)
        if bands is None:
            return None
        self.made[name] = path
        return _figure_html(path, f"<b>{_e(panel.title)}</b>. " + _band_caption(bands, panel.nonnegative))

    def custom(self, name: str, draw, caption: str) -> str | None:
        path = self.out_dir / f"{name}.png"
        if not draw(path):
            return None
        self.made[name] = path
        return _figure_html(path, _e(caption))


def _grid(figures) -> str:
    """Figures side by side, as many per row as fit (two at 1280 px)."""
    shown = [f for f in figures if f]
    return "<div class='figs'>" + "\n".join(shown) + "</div>" if shown else ""


def _recipe_html(run: Run, prefix: str, plots: _Plots) -> str:
    """The plots of the run's recipe, each left out with a sentence when the run logged none of its curves."""
    figs, missing = [], []
    for panel in RECIPE_PANELS.get(run.recipe, RECIPE_PANELS["kl-rl"]):
        fig = plots.panel(f"{prefix}-{panel.name}", [("", run.metrics)], panel)
        if fig is None:
            keys = ", ".join(c.key for c in panel.curves)
            missing.append(f"<li>{_e(panel.title)}: this run logged none of {_e(keys)}"
                           + (f" ({_e(panel.why_missing)})" if panel.why_missing else "") + ".</li>")
        else:
            figs.append(fig)
    out = [_grid(figs)]
    if missing:
        out.append("<p class='note'>Not drawn, for want of data:</p><ul class='note'>" + "".join(missing) + "</ul>")
    return "\n".join(out)


def _run_body(run: Run, prefix: str, plots: _Plots, *, overview: bool) -> str:
    """A run's (or a stage's) section: what it is, its summary table, its diagnostics, its recipe's plots."""
    parts = []
    if overview:  # a pipeline's RL stage among compared runs: its own reward and KL curves
        parts.append(_grid(plots.panel(f"{prefix}-{panel.name}", [("", run.metrics)], panel) for panel in _overview_panels()))
    if run.metrics:
        parts.append(f"<h4>Metrics ({len(run.metrics)} logged steps)</h4>" + _summary_table(run.metrics))
    else:
        parts.append("<p>No per-step metrics (this stage trains nothing, or has not logged a step yet).</p>")
    diag_prefix = POSTERIOR_PREFIX.get(run.recipe)
    if diag_prefix:
        why = {"is_": "DPG logs them every diagnostics_interval steps", "target_": ONLINE_DIAG_WHY if "dpo" in run.recipe or
               run.recipe == "xpo" else KL_RL_DIAG_WHY}[diag_prefix]
        parts.append(_diagnostics_html(run, diag_prefix) or
                     f"<p class='note'>No posterior diagnostics: this run logged no {diag_prefix}* keys ({_e(why)}).</p>")
    if run.summary:
        parts.append(f"<h4>Measured after training ({_e(run.summary_name)})</h4>" + _dict_table(run.summary))
    parts.append(_recipe_html(run, prefix, plots))
    return "\n".join(parts)


def _overview_panels() -> list[Panel]:
    return [Panel("reward", "Reward over training", "mean reward", tuple(Curve(k, k) for k in REWARD_KEYS)),
            Panel("kl", "KL(pi || pi_ref) over training", "nats", (Curve("kl_ref", "k1"), Curve("kl_ref_k3", "k3"), Curve("kl", "kl")), True)]


def reward_groups(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs grouped by the reward they optimise (:func:`reward_of`), in order of first appearance."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(reward_of(run), []).append(run)
    return groups


def _comparison_html(runs: Sequence[Run], plots: _Plots) -> str:
    groups = reward_groups(runs)
    parts = ["<h2>Comparison</h2>"]
    if len(groups) > 1:
        listing = "".join(f"<li><b>{_e(reward)}</b>: {_e(', '.join(r.name for r in group))}</li>" for reward, group in groups.items())
        parts.append("<div class='warn'><b>These runs optimise different rewards.</b> Rewards, win rates and divergences from "
                     "different targets are not comparable, so each reward has its own plots below:<ul>" + listing + "</ul></div>")
    for gi, (reward, group) in enumerate(groups.items()):
        suffix = "" if gi == 0 else f"-{gi + 1}"
        parts.append(f"<h3>Reward: {_e(reward)} ({len(group)} run{'s' if len(group) > 1 else ''})</h3>")
        labelled = [(r.name, r.metrics) for r in group]
        figs = [plots.panel(f"{p.name}{suffix}", labelled, p) for p in _overview_panels()]
        figs.append(plots.custom(f"tradeoff{suffix}", lambda p: plot_against_kl(
            group, lambda r: [k for k in [first_key(r.metrics, REWARD_KEYS)] if k], "mean reward", "reward against KL", p),
            "Reward against KL over training, smoothed, each run's last point marked; the dashed line joins the runs' last "
            "points sorted by KL (the reward-KL frontier of a sweep)."))
        figs.append(plots.custom(f"win_rate{suffix}", lambda p: plot_against_kl(
            group, lambda r: win_rate_keys(r.metrics), "win rate against pi_ref", "win rate against KL (ties count 1/2)", p),
            "Win rates logged during training against KL."))
        evals = [(r.name, r.evals) for r in group if r.evals]
        figs.append(plots.custom(f"eval{suffix}", lambda p: plot_evals(evals, p),
                                 "Win rate against KL across evaluations (error bars: bootstrap intervals); the dashed line "
                                 "joins each run's last evaluation, sorted by KL."))
        parts.append(_grid(figs))
        if not evals:
            parts.append("<p class='note'>No evaluations recorded (tilt eval --record RUN adds them): no win rate against KL "
                         "across evaluations.</p>")
    return "\n".join(parts)


def _single_run_overview(run: Run, plots: _Plots) -> str:
    parts = []
    metrics = run.metrics
    figs = [plots.panel(p.name, [("", metrics)], p) for p in _overview_panels()]
    figs.append(plots.custom("tradeoff", lambda p: plot_against_kl(
        [run], lambda r: [k for k in [first_key(r.metrics, REWARD_KEYS)] if k], "mean reward", "reward against KL", p),
        "Reward against KL over training, smoothed; the last point is marked."))
    figs.append(plots.custom("win_rate", lambda p: plot_against_kl(
        [run], lambda r: win_rate_keys(r.metrics), "win rate against pi_ref", "win rate against KL (ties count 1/2)", p),
        "Win rates logged during training against KL."))
    groups: dict[str, list[dict]] = {}
    for row in run.evals:
        reward = row.get("reward")
        groups.setdefault(" + ".join(reward) if isinstance(reward, list) else str(reward or reward_of(run)), []).append(row)
    if len(groups) > 1:
        parts.append("<div class='warn'><b>The evaluations of this run use different rewards</b> ("
                     + _e("; ".join(groups)) + "): each reward has its own plot.</div>")
    for gi, (reward, rows) in enumerate(groups.items()):
        figs.append(plots.custom("eval" if gi == 0 else f"eval-{gi + 1}", lambda p, rows=rows: plot_evals([("", rows)], p),
                                 f"Evaluations scored by {reward}: win rate against KL, one point per evaluation in order "
                                 "(error bars: bootstrap intervals, KL's clipped at 0)."))
    parts.append(_grid(figs))
    if not any(figs):
        parts.append("<p class='note'>This run logged no reward or KL: its recipe's plots follow.</p>")
    return "\n".join(parts)


def render_report(runs: Sequence[Run], out_dir: Path, *, max_prompts: int = 20) -> tuple[str, dict[str, Path]]:
    """(the HTML page, {plot name: PNG path}) for ``runs``; PNGs are written into ``out_dir``. Every string from the
    runs is HTML-escaped; plots are embedded as base64 PNG, so the page stands alone."""
    plots = _Plots(out_dir)
    title = "tilt report: " + ", ".join(r.name for r in runs)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><meta name='viewport' content='width=device-width'>"
             f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>", f"<h1>{_e(title)}</h1>",
             "<p class='note'>Curves over steps: faint, the raw per-step values; line, a trailing moving average over a tenth "
             f"of the steps (at least 3; none under {MIN_SMOOTH_POINTS} points); band, ± one rolling standard deviation over "
             "the same window, or the 95% interval logged with the estimate where there is one (posterior diagnostics). "
             "Divergences (KL, TV, JS) show their estimator; their intervals are clipped at 0, while metrics.jsonl keeps the "
             "raw values (an unbiased estimator such as k1 can fall below 0).</p>"]
    overview = [(_e(r.name), _e(RECIPE_TITLES.get(r.recipe, r.recipe)), _e(reward_of(r)),
                 _e(r.metrics[-1]["step"]) if r.metrics else _na("no steps"), f"<code>{_e(r.path)}</code>") for r in runs]
    headers = ["run", "recipe", "reward", "last step", "path"]
    if any(has_efficiency(r.evals) for r in runs):  # the efficiency of each run's last evaluation, side by side
        headers.append("efficiency, last evaluation")
        overview = [(*cells, _frontier_cell(r.evals[-1], "efficiency") if r.evals else _na("no evaluation"))
                    for cells, r in zip(overview, runs)]
    parts.append(_table(headers, overview, numeric_from=3))
    parts.append(_frontier_html(runs, plots))
    if len(runs) > 1:
        parts.append(_comparison_html(runs, plots))
    for i, run in enumerate(runs):
        prefix = f"{i + 1}-{_slug(run.name)}"
        parts.append(f"<h2>{_e(run.name)}: {_e(RECIPE_TITLES.get(run.recipe, run.recipe))}</h2>")
        if len(runs) == 1:
            parts.append(_single_run_overview(run, plots))
        if run.stages:
            parts.append("<p>A pipeline run: one part per stage, in order (RUN/stages/&lt;stage&gt;; a stage still training "
                         "is read from RUN/work/&lt;stage&gt;).</p>")
            for stage in run.stages:
                parts.append(f"<h3>Stage {_e(stage.name)}: {_e(RECIPE_TITLES.get(stage.recipe, stage.recipe))}</h3>")
                parts.append(_run_body(stage, f"{prefix}-{_slug(stage.name)}", plots, overview=stage.recipe == "kl-rl" and len(runs) > 1))
        else:
            parts.append(_run_body(run, prefix, plots, overview=False))
        parts.append(_evals_html(run))
        parts.append(f"<h3>Samples: {_e(run.name)}</h3>" + _samples_html(run, max_prompts))
        if run.config_text is not None:
            parts.append(f"<details><summary>config.yaml</summary><pre>{_e(run.config_text)}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p), plots.made


def build_report(run_dir: str | Path, compare: Sequence[str | Path] = (), *, out_dir: str | Path | None = None,
                 max_prompts: int = 20) -> tuple[Path, dict[str, Path]]:
    """Read the run(s), write the PNGs and ``report.html`` into ``out_dir`` (default RUN_DIR/report) and return the
    path of the HTML page and {plot name: PNG path}."""
    runs = [load_run(run_dir)] + [load_run(c) for c in compare]
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # two runs with the same folder name: tell them apart by path
        runs = [dataclasses.replace(r, name=str(r.path)) for r in runs]
    out = Path(out_dir) if out_dir is not None else runs[0].path / "report"
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.png"):  # left by an earlier report of runs that had other metrics
        stale.unlink()
    page_html, plots = render_report(runs, out, max_prompts=max_prompts)
    page = out / "report.html"
    tmp = page.with_suffix(".html.tmp")
    tmp.write_text(page_html, encoding="utf-8")
    tmp.replace(page)
    return page, plots
