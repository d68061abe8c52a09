"""A report of one training run, or several side by side: PNG plots of reward, KL and their trade-off, and one
self-contained HTML page with the plots embedded and samples before and after training.

It reads the run directory format (see ``docs/eval_and_sample.md``):

* ``RUN/metrics.jsonl``: one JSON object per step, ``{"step": int, <metric>: float, ...}``; the reward is the first
  of ``reward``, ``reward_mean`` present, the KL the first of ``kl_ref``, ``kl``; every numeric key starting with
  ``win_rate`` is a win rate;
* ``RUN/samples.jsonl``: rows ``{"step": int, "prompt": str, "completion": str, "reward": float}``; the first step
  logged (0: the initial policy) is "before", the last is "after";
* ``RUN/config.yaml`` (optional): shown as text;
* ``RUN/evals.jsonl`` (optional): rows written by ``tilt eval --record RUN`` (its JSON object per evaluation).

Plots (one line per run; a lighter line is the raw per-step value when it is smoothed):

* ``reward.png``: reward against step;   ``kl.png``: KL(pi || pi_ref) against step;
* ``tradeoff.png``: reward against KL, the path of each run, its last point marked; with several runs, a dashed
  line joins the last points, sorted by KL (a reward-KL frontier across runs, e.g. a sweep over beta);
* ``win_rate.png`` (when a run logs win rates): win rate against KL likewise (InfAlign's comparison at matched KL);
* ``eval.png`` (when a run has evaluations): each evaluation's win rates against its KL, with both intervals as
  error bars; with several runs, a line per win rate joins each run's last evaluation, sorted by KL.
"""
from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

REWARD_KEYS = ("reward", "reward_mean")
KL_KEYS = ("kl_ref", "kl")
WIN_RATE_PREFIX = "win_rate"


@dataclass(frozen=True)
class Run:
    """What a run directory holds, read and checked."""

    path: Path
    name: str
    metrics: list  # dicts, one per logged step, in file order
    samples: list  # dicts {step, prompt, completion, reward}
    config_text: str | None
    evals: list = ()  # dicts written by ``tilt eval --record``, in file order


# --- reading -------------------------------------------------------------------------------------------------------
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


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory. Raises FileNotFoundError when it or its metrics.jsonl is missing, ValueError when the
    metrics hold no step or a line is malformed."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory not found: {str(run_dir)!r}")
    metrics_path = path / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} has no metrics.jsonl: is it a run directory? (training writes RUN/metrics.jsonl)")
    metrics = read_jsonl(metrics_path)
    if not metrics:
        raise ValueError(f"{metrics_path} holds no metrics: the run has not logged a step yet")
    samples_path = path / "samples.jsonl"
    samples = read_jsonl(samples_path) if samples_path.is_file() else []
    for i, row in enumerate(samples):
        if "prompt" not in row or "completion" not in row:
            raise ValueError(f"{samples_path}: sample row {i + 1} lacks 'prompt' or 'completion'")
    config_path = path / "config.yaml"
    config_text = config_path.read_text(encoding="utf-8", errors="replace") if config_path.is_file() else None
    evals_path = path / "evals.jsonl"
    evals = read_jsonl(evals_path, require_step=False) if evals_path.is_file() else []
    return Run(path=path, name=path.resolve().name, metrics=metrics, samples=samples, config_text=config_text, evals=evals)


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
    return sorted(k for k in keys if not k.endswith(("_low", "_high", "_ci", "_stderr")))


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


def _window(n: int) -> int:
    return max(1, n // 20)


# --- plots ---------------------------------------------------------------------------------------------------------
def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global state, no display needed
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def plot_over_steps(runs: Sequence[Run], candidates: Sequence[str], ylabel: str, path: Path) -> bool:
    """One line per run of the first available metric in ``candidates`` against step; False when no run has it."""
    fig, ax = _figure()
    drawn = False
    for run, colour in zip(runs, _colours(len(runs))):
        key = first_key(run.metrics, candidates)
        if key is None:
            continue
        pts = series(run.metrics, key)
        steps, values = [p[0] for p in pts], [p[1] for p in pts]
        w = _window(len(values))
        if w > 1:
            ax.plot(steps, values, color=colour, alpha=0.25, linewidth=1)
            ax.plot(steps, smooth(values, w), color=colour, linewidth=2, label=f"{run.name} ({key}, mean of {w})")
        else:
            ax.plot(steps, values, color=colour, linewidth=2, marker="o", markersize=3, label=f"{run.name} ({key})")
        drawn = True
    if not drawn:
        return False
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return True


def plot_against_kl(runs: Sequence[Run], y_keys_of, ylabel: str, title: str, path: Path) -> bool:
    """y against KL for each run (its path over training, last point marked); with several runs, a dashed line
    through the last points sorted by KL. ``y_keys_of(run)`` lists the y metrics of a run. False if nothing to draw."""
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
            w = _window(len(pts))
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
    ax.set_xlabel("KL(pi || pi_ref)  (nats)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return True


EVAL_WIN_RATES = (("win_rate", "o", "standard"), ("win_rate_bon", "s", "best-of-N"), ("win_rate_won", "v", "worst-of-N"))


def _interval(row: dict, key: str) -> tuple[float, float] | None:
    ci = row.get(f"{key}_ci")
    if isinstance(ci, list) and len(ci) == 2 and all(_number(v) is not None for v in ci):
        return float(ci[0]), float(ci[1])
    return None


def plot_evals(runs: Sequence[Run], path: Path) -> bool:
    """Each evaluation's win rates against its KL, with intervals as error bars (``tilt eval --record``); with
    several runs, a dashed line per win rate through each run's last evaluation, sorted by KL."""
    fig, ax = _figure()
    lasts: dict[str, list[tuple[float, float]]] = {}
    drawn = False
    for run, colour in zip(runs, _colours(len(runs))):
        for i, row in enumerate(run.evals):
            kl = _number(row.get("kl_ref"))
            if kl is None:
                continue
            for key, marker, label in EVAL_WIN_RATES:
                y = _number(row.get(key))
                if y is None:
                    continue
                n = f"-{row['best_of']}" if key != "win_rate" and row.get("best_of") else ""
                xci, yci = _interval(row, "kl_ref"), _interval(row, key)
                ax.errorbar([kl], [y], xerr=[[kl - xci[0]], [xci[1] - kl]] if xci else None,
                            yerr=[[y - yci[0]], [yci[1] - y]] if yci else None, fmt=marker, color=colour, capsize=3,
                            label=f"{run.name if len(runs) > 1 else ''} {label.replace('-N', n)}".strip() if i == len(run.evals) - 1 else None)
                if i == len(run.evals) - 1:
                    lasts.setdefault(key, []).append((kl, y))
                drawn = True
    if not drawn:
        return False
    if len(runs) > 1:
        for key, pts in lasts.items():
            if len(pts) > 1:
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", color="grey", linewidth=1)
    ax.axhline(0.5, color="black", linewidth=0.6, alpha=0.5)
    ax.set_xlabel("KL(pi || pi_ref)  (nats, k1, from tilt eval)")
    ax.set_ylabel("win rate against pi_ref")
    ax.set_title("evaluations: win rates against KL, with intervals", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return True


def write_plots(runs: Sequence[Run], out_dir: Path) -> dict[str, Path]:
    """Every plot the runs allow, as PNG files in ``out_dir``: {name: path}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    made = {}
    plan = [
        ("reward", lambda p: plot_over_steps(runs, REWARD_KEYS, "mean reward", p)),
        ("kl", lambda p: plot_over_steps(runs, KL_KEYS, "KL(pi || pi_ref)  (nats)", p)),
        ("tradeoff", lambda p: plot_against_kl(runs, lambda r: [k for k in [first_key(r.metrics, REWARD_KEYS)] if k],
                                               "mean reward", "reward against KL", p)),
        ("win_rate", lambda p: plot_against_kl(runs, lambda r: win_rate_keys(r.metrics), "win rate against pi_ref",
                                               "win rate against KL (ties count 1/2)", p)),
        ("eval", lambda p: plot_evals(runs, p)),
    ]
    for name, draw in plan:
        path = out_dir / f"{name}.png"
        if draw(path):
            made[name] = path
        elif path.exists():
            path.unlink()  # left by an earlier report of runs that had this metric
    return made


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


# --- HTML ----------------------------------------------------------------------------------------------------------
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; width: 100%; }
th, td { border: 1px solid #ccc; padding: 0.35em 0.6em; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.text { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 0.9em; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; }
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _num(x) -> str:
    v = _number(x)
    return "-" if v is None else f"{v:.4g}"


def _summary_rows(run: Run) -> list[tuple[str, str, str]]:
    first, last = run.metrics[0], run.metrics[-1]
    keys = [k for k in (first_key(run.metrics, REWARD_KEYS), first_key(run.metrics, KL_KEYS)) if k] + win_rate_keys(run.metrics)
    rows = [("step", _e(first["step"]), _e(last["step"]))]
    for k in keys:
        pts = series(run.metrics, k)
        if pts:
            rows.append((_e(k), _num(pts[0][1]), _num(pts[-1][1])))
    return rows


def _samples_html(run: Run, max_prompts: int) -> str:
    first, last, pairs = before_after(run.samples, max_prompts)
    if not pairs:
        return "<p>No samples logged (RUN/samples.jsonl is missing or empty).</p>"
    if first == last:
        head = f"<p>Samples were logged at step {_e(first)} only.</p>"
    else:
        head = f"<p>Completions of the same prompts before training (step {_e(first)}) and after (step {_e(last)}).</p>"
    out = [head, "<table><tr><th>prompt</th><th>before</th><th>reward</th><th>after</th><th>reward</th></tr>"]
    for prompt, before, after in pairs:
        for i in range(max(len(before), len(after))):
            b = before[i] if i < len(before) else None
            a = after[i] if i < len(after) else None
            cells = [f'<td class="text">{_e(prompt)}</td>' if i == 0 else '<td></td>']
            for row in (b, a):
                cells.append(f'<td class="text">{_e(row["completion"]) if row else ""}</td>')
                cells.append(f'<td class="num">{_num(row.get("reward")) if row else ""}</td>')
            out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _evals_html(run: Run) -> str:
    if not run.evals:
        return ""
    cols = [("KL k1", "kl_ref"), ("reward", "reward_mean"), ("reference reward", "ref_reward_mean"), ("win rate", "win_rate"),
            ("best-of-N", "win_rate_bon"), ("worst-of-N", "win_rate_won")]
    head = "".join(f"<th>{_e(name)}</th>" for name, _ in cols)
    out = [f"<h3>Evaluations</h3><table><tr><th>model</th><th>reference</th><th>N</th>{head}</tr>"]
    for row in run.evals:
        cells = [f'<td class="text">{_e(row.get("model", ""))}</td>', f'<td class="text">{_e(row.get("ref", ""))}</td>',
                 f'<td class="num">{_e(row.get("best_of", "-"))}</td>']
        for _, key in cols:
            ci = _interval(row, key)
            cells.append(f'<td class="num">{_num(row.get(key))}' + (f" [{_num(ci[0])}, {_num(ci[1])}]" if ci else "") + "</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def render_html(runs: Sequence[Run], plots: dict[str, Path], *, max_prompts: int = 20) -> str:
    """The report page: every string from the runs is HTML-escaped; plots are embedded as base64 PNG."""
    title = "tilt report: " + ", ".join(r.name for r in runs)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{_e(title)}</h1>"]
    parts.append("<h2>Summary</h2>")
    for run in runs:
        rows = "".join(f"<tr><td>{k}</td><td class='num'>{a}</td><td class='num'>{b}</td></tr>" for k, a, b in _summary_rows(run))
        parts.append(f"<h3>{_e(run.name)}</h3><p><code>{_e(run.path)}</code>, {len(run.metrics)} logged steps</p>"
                     f"<table><tr><th>metric</th><th>first</th><th>last</th></tr>{rows}</table>" + _evals_html(run))
    captions = {"reward": "Reward over training", "kl": "KL(pi || pi_ref) over training",
                "tradeoff": "Reward against KL", "win_rate": "Win rate against KL",
                "eval": "Evaluations: win rate against KL"}
    parts.append("<h2>Plots</h2>")
    for name, path in plots.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"<h3>{_e(captions.get(name, name))}</h3><img alt='{_e(name)}' src='data:image/png;base64,{data}'>"
                     f"<p><a href='{_e(path.name)}'>{_e(path.name)}</a></p>")
    for run in runs:
        parts.append(f"<h2>Samples: {_e(run.name)}</h2>")
        parts.append(_samples_html(run, max_prompts))
        if run.config_text is not None:
            parts.append(f"<details><summary>config.yaml</summary><pre>{_e(run.config_text)}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def build_report(run_dir: str | Path, compare: Sequence[str | Path] = (), *, out_dir: str | Path | None = None,
                 max_prompts: int = 20) -> tuple[Path, dict[str, Path]]:
    """Read the run(s), write the PNGs and ``report.html`` into ``out_dir`` (default RUN_DIR/report) and return the
    path of the HTML page and {plot name: PNG path}."""
    runs = [load_run(run_dir)] + [load_run(c) for c in compare]
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # two runs with the same folder name: tell them apart by path
        runs = [Run(r.path, str(r.path), r.metrics, r.samples, r.config_text, r.evals) for r in runs]
    out = Path(out_dir) if out_dir is not None else runs[0].path / "report"
    plots = write_plots(runs, out)
    page = out / "report.html"
    tmp = page.with_suffix(".html.tmp")
    tmp.write_text(render_html(runs, plots, max_prompts=max_prompts), encoding="utf-8")
    tmp.replace(page)
    return page, plots
