"""tilt report on small synthetic run directories of every recipe and pipeline: what each page shows, that nothing
is blank, that divergences are clipped at zero, and that runs of different rewards are never drawn on one axis."""
from __future__ import annotations

import json
import math
import re

import pytest
import yaml

from test_evaluate import world  # noqa: F401  (the fixture of tiny unigram models, for tilt eval)
from tilt.report import build_report, divergence_estimator, load_run, reward_of

STEPS = 24


def _diagnostics(prefix: str, s: int) -> dict:
    kl = 0.5 / (1 + s)  # shrinks over training; its interval reaches below 0 as such estimates do
    out = {}
    for name, value, se in (("log_z", 1.2 + 0.01 * s, 0.05), ("kl_target_policy", kl, 0.4 * kl + 0.05),
                            ("kl_policy_target", 0.8 * kl, 0.3 * kl + 0.05), ("tv", 0.3 * kl, 0.05), ("js", 0.1 * kl, 0.05)):
        out.update({f"{prefix}{name}": value, f"{prefix}{name}_stderr": se, f"{prefix}{name}_lower": value - 1.96 * se,
                    f"{prefix}{name}_upper": value + 1.96 * se})
    out.update({f"{prefix}ess": 2.0 + s / STEPS, f"{prefix}ess_fraction": 0.5 + 0.4 * s / STEPS})
    return out


def _metrics(recipe: str, s: int) -> dict:
    wiggle = 0.05 * math.sin(3 * s)  # step-to-step noise, so that bands have a width
    if recipe in ("kl-rl", "ctrl"):
        row = {"reward": 0.1 + 0.02 * s + wiggle, "kl_ref": -0.03 if s == 1 else 0.01 * s, "kl_ref_k3": 0.01 * s, "loss": 1 / (1 + s),
               "entropy": 5 - 0.05 * s, "completion_length": 12.0, "grad_norm": 1 + wiggle, "frac_reward_zero_std": 0.0,
               **_diagnostics("target_", s)}
        if recipe == "ctrl":
            row.update(reward_raw=0.2 + 0.01 * s, reward_calibrated=0.5 + 0.01 * s)
        return row
    if recipe == "dpg":
        return {"reward": 0.1 + 0.02 * s, "kl_ref": 0.01 * s, "loss": 1 / (1 + s), "log_z_running": 1.0 + wiggle, "grad_norm": 1.0,
                "importance_weight_max": 1.0, **_diagnostics("is_", s)}
    if recipe == "dpo":
        margin = 0.05 * s + wiggle
        row = {"loss": math.log(2) - 0.01 * s, "reward_margin": margin, "accuracy": min(1, 0.5 + 0.02 * s), "rewards/chosen": margin / 2,
               "rewards/rejected": -margin / 2, "rewards/margins": margin, "rewards/accuracies": min(1, 0.5 + 0.02 * s),
               "logps/chosen": -20 + 0.1 * s, "logps/rejected": -20 - 0.1 * s, "grad_norm": 2 + wiggle, "learning_rate": 1e-6, "step_time": 0.1}
        if s % 8 == 0:
            row.update({"eval/loss": math.log(2) - 0.005 * s, "eval/accuracy": 0.5 + 0.01 * s, "eval/rewards/margins": 0.02 * s})
        return row
    if recipe in ("online-dpo", "xpo"):
        margin = 0.04 * s + wiggle
        return {"loss": 0.69 - 0.01 * s, "preference_loss": 0.69 - 0.01 * s, "bonus": -1e-4 if recipe == "xpo" else 0.0,
                "reward_margin": margin, "rewards/chosen": margin / 2, "rewards/rejected": -margin / 2, "rewards/margins": margin,
                "rewards/accuracies": 0.6, "alpha": 1e-5 if recipe == "xpo" else 0.0, "beta": 0.1, "pairs": 8.0,
                "policy_sample_win_rate": 0.5 + 0.01 * s, "tie_fraction": 0.1, "kl_ref": 0.02 * s, "grad_norm": 1.0,
                **_diagnostics("target_", s)}
    if recipe == "reward-model":
        return {"loss": 0.69 - 0.01 * s, "accuracy": 0.5 + 0.015 * s, "margin": 0.1 * s + wiggle, "grad_norm": 1.0}
    if recipe == "bc":
        return {"loss": 3 - 0.05 * s + wiggle, "tokens": 100.0, "sequences": 8.0, "grad_norm": 1.0}
    raise AssertionError(recipe)


CONFIGS = {"kl-rl": {"recipe": "kl-rl", "reward": ["sentiment"], "beta": 0.1},
           "ctrl": {"recipe": "kl-rl", "reward": ["sentiment"], "calibration": {"transform": "exp", "t": 4.0}},
           "dpg": {"recipe": "dpg", "reward": ["sentiment"]},
           "dpo": {"recipe": "dpo", "preferences": "prefs.jsonl", "beta": 0.1},
           "online-dpo": {"recipe": "online-dpo", "reward": ["length:chars"], "scheme": "online-dpo"},
           "xpo": {"recipe": "xpo", "reward": ["length:chars"], "scheme": "xpo"},
           "reward-model": {"recipe": "reward-model", "preferences": "prefs.jsonl"}}


def write_run(folder, recipe: str, *, reward=None, evals: list[dict] = (), steps: int = STEPS):
    folder.mkdir(parents=True)
    config = dict(CONFIGS[recipe])
    if reward is not None:
        config["reward"] = [reward]
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    with open(folder / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps({"step": s, **_metrics(recipe, s)}) + "\n")
    with open(folder / "samples.jsonl", "w") as f:
        for s in (0, steps):
            for p in ("The film was", "A long prompt " + "word " * 80):
                for k in range(2 if s == 0 else 1):  # fewer samples after: the table says so, no blank cell
                    f.write(json.dumps({"step": s, "prompt": p, "completion": f"{'x' * 300} at step {s}", "reward": s / 10 + k}) + "\n")
    with open(folder / "evals.jsonl", "w") as f:
        for row in evals:
            f.write(json.dumps(row) + "\n")
    if recipe in ("dpo", "reward-model"):
        (folder / "summary.json").write_text(json.dumps({"pairs": 12, "accuracy_before": 0.5, "accuracy_after": 0.8}))
    return folder


def _eval_row(step, kl, win, reward="sentiment", **extra):
    return {"step": step, "kl_ref": kl, "kl_ref_ci": [kl - 0.05, kl + 0.05], "reward_mean": 0.3, "reward_mean_ci": [0.2, 0.4],
            "ref_reward_mean": 0.1, "ref_reward_mean_ci": [0.0, 0.2], "win_rate": win, "win_rate_ci": [win - 0.1, win + 0.1],
            "reward": reward, **extra}


def write_pipeline(folder, pipeline: str, *, rl_in_progress: bool = False):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"pipeline": pipeline, "reward": ["sentiment"], "model": "m"}))
    stages = ["bc", "preferences", "reward_model", "rl"] if pipeline == "demo-rlhf" else ["bc", "rl"]
    for stage in stages:
        where = folder / ("work" if stage == "rl" and rl_in_progress else "stages") / stage
        where.mkdir(parents=True)
        recipe = {"rl": "kl-rl", "reward_model": "reward-model"}.get(stage, stage)
        if stage != "preferences":
            with open(where / "metrics.jsonl", "w") as f:
                for s in range(1, 13):
                    f.write(json.dumps({"step": s, **_metrics(recipe, s)}) + "\n")
        if not (stage == "rl" and rl_in_progress):
            marker = {"stage": stage, "steps": 12}
            if stage == "rl":
                marker.update(kl_clone=-0.01, kl_clone_ci=[-0.04, 0.02], reward=0.4, reward_ci=[0.3, 0.5], within_budget=True)
            if stage == "preferences":
                marker.update(pairs=20, train=16, held_out=4, oracle="bradley_terry")
            (where / "stage.json").write_text(json.dumps(marker))
    return folder


# --- checks of a page ------------------------------------------------------------------------------------------------
def _cells(text: str) -> list[str]:
    return re.findall(r"<td[^>]*>(.*?)</td>", text, flags=re.S)


def check_page(page) -> str:
    text = page.read_text()
    cells = _cells(text)
    assert cells and all(c.strip() for c in cells), "an empty table cell"
    assert not re.search(r"src='data:image/png;base64,'", text)  # no empty image
    for png in page.parent.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for cell in cells:  # a divergence's interval never shows a negative end
        if "(k1" in cell or "(SNIS" in cell or "(IS" in cell:
            assert not re.search(r"\[-", cell), cell
    return text


def _diagnostics_numbers(text: str) -> list[float]:
    section = text.split("Posterior diagnostics at step", 1)[1].split("</table>", 1)[0]
    return [float(x) for x in re.findall(r"<td class='num'>(-?[0-9.]+(?:e-?\d+)?)", section)]


@pytest.mark.slow  # about a dozen PNGs per page
@pytest.mark.parametrize("recipe", ["kl-rl", "ctrl", "dpg", "dpo", "online-dpo", "xpo", "reward-model"])
def test_the_page_of_every_recipe(tmp_path, recipe):
    run = write_run(tmp_path / recipe, recipe)
    assert load_run(run).recipe == recipe
    page, plots = build_report(run)
    text = check_page(page)
    assert text.count("data:image/png;base64,") == len(plots) > 0
    if recipe in ("kl-rl", "ctrl", "dpg", "online-dpo", "xpo"):  # the posterior diagnostics, with numbers
        numbers = _diagnostics_numbers(text)
        assert len(numbers) >= 6, numbers
        assert "KL(pi* || pi)" in text and "ESS as a fraction" in text
        assert any(name.endswith(("-kl_target", "-ess", "-log_z")) for name in plots)
    if recipe in ("kl-rl", "ctrl"):
        assert "raw estimate -0.03" in text  # the negative k1 of step 1, shown as 0 with its raw value
    if recipe == "ctrl":
        assert any(name.endswith("-ctrl_reward") for name in plots)
    if recipe == "dpo":
        for key in ("accuracy", "rewards/chosen", "rewards/rejected", "rewards/margins", "eval/loss", "logps/chosen"):
            assert f"<code>{key}</code>" in text
        assert {"1-dpo-accuracy", "1-dpo-margins", "1-dpo-rewards", "1-dpo-loss"} <= set(plots)
        assert "summary.json" in text
    if recipe == "xpo":
        assert "1-xpo-bonus" in plots and "Exploration bonus" in text
    if recipe == "reward-model":
        assert {"1-reward-model-loss", "1-reward-model-accuracy"} <= set(plots)
    assert "band: ± one rolling standard deviation" in text


def test_missing_data_is_said_not_drawn_blank(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:  # an older DPO run: no TRL keys, no gradient norm
        for s in range(1, 5):
            f.write(json.dumps({"step": s, "loss": 0.6, "reward_margin": 0.1 * s, "accuracy": 0.6}) + "\n")
    page, plots = build_report(run)
    text = check_page(page)
    assert load_run(run).recipe == "dpo" and "reward" not in plots and "kl" not in plots
    assert "Not drawn, for want of data" in text and "older runs logged no rewards/chosen" in text
    assert "No samples logged" in text and "fewer than 8 points: drawn as logged" in text


@pytest.mark.slow  # two pages of three and two runs
def test_compared_runs_with_different_rewards_are_flagged_and_drawn_apart(tmp_path):
    a = write_run(tmp_path / "a", "kl-rl", evals=[_eval_row(12, 0.1, 0.6), _eval_row(24, 0.3, 0.7)])
    b = write_run(tmp_path / "b", "kl-rl", reward="length:chars")
    c = write_run(tmp_path / "c", "kl-rl", evals=[_eval_row(24, 0.5, 0.8)])
    page, plots = build_report(a, [b, c])
    text = check_page(page)
    assert "These runs optimise different rewards" in text
    assert {"reward", "kl", "eval", "reward-2", "kl-2"} <= set(plots) and "eval-2" not in plots  # b has no evaluations
    section = text.split("Reward: length:chars", 1)[1].split("<h3>", 1)[0]
    assert "reward-2.png" in section and "reward.png" not in section
    assert reward_of(load_run(a)) == reward_of(load_run(c)) == "sentiment"
    # the shape runs write now: the reward and the preferences sit in the run: section
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.yaml").write_text(yaml.safe_dump({"recipe": "kl-rl", "run": {"reward": ["sentiment", "length:chars"]}}))
    (tmp_path / "d" / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.1}) + "\n")
    assert reward_of(load_run(tmp_path / "d")) == "sentiment + length:chars"
    (tmp_path / "d" / "config.yaml").write_text(yaml.safe_dump({"recipe": "dpo", "run": {"reward": [], "preferences": "p.jsonl"}}))
    assert reward_of(load_run(tmp_path / "d")) == "preferences p.jsonl"
    same, _ = build_report(a, [c], out_dir=tmp_path / "same")
    assert "different rewards" not in same.read_text()


def test_the_demo_evaluations_table_has_steps_and_no_blank_cells(tmp_path):
    run = write_run(tmp_path / "demo", "kl-rl", evals=[_eval_row(4, 0.02, 0.55), _eval_row(8, -0.01, 0.5)])
    page, plots = build_report(run)
    text = check_page(page)
    table = text.split("<h4>Evaluations</h4>", 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr>(.*?)</tr>", table, flags=re.S)[1:]
    assert [_cells(r)[0] for r in rows] == ["4", "8"]
    assert "the policy at step 4" in rows[0] and "not recorded" in rows[0]  # the reference was not written by training
    assert "0 [0, 0.04] (k1; raw estimate -0.01)" in rows[1]
    assert "eval" in plots


def test_a_separate_reward_per_evaluation_is_drawn_apart(tmp_path):
    run = write_run(tmp_path / "r", "kl-rl", evals=[_eval_row(None, 0.1, 0.6), _eval_row(None, 0.2, 0.4, reward="length:chars")])
    page, plots = build_report(run)
    text = check_page(page)
    assert "use different rewards" in text and {"eval", "eval-2"} <= set(plots)
    assert "tilt eval --record: no step" in text


@pytest.mark.slow
@pytest.mark.parametrize("pipeline,in_progress", [("demo-rl", False), ("demo-rlhf", False), ("demo-rl", True)])
def test_pipeline_runs_show_every_stage(tmp_path, pipeline, in_progress):
    run = write_pipeline(tmp_path / pipeline, pipeline, rl_in_progress=in_progress)
    loaded = load_run(run)
    assert loaded.recipe == pipeline and loaded.metrics  # the RL stage's metrics are the run's
    page, plots = build_report(run)
    text = check_page(page)
    for stage in (["bc", "preferences", "reward_model", "rl"] if pipeline == "demo-rlhf" else ["bc", "rl"]):
        assert f"<h3>Stage {stage}" in text
    assert "1-" + pipeline + "-bc-loss" in plots and "reward" in plots and "kl" in plots
    assert "Posterior diagnostics at step" in text
    if in_progress:
        assert "rl (in progress)" in text
    else:
        assert "stage.json" in text and "0 [0, 0.02] (k1; raw estimate -0.01)" in text  # kl_clone, clipped
    if pipeline == "demo-rlhf":
        assert "reward model fitted to preferences labelled by sentiment" in text


def test_divergence_keys_name_their_estimator():
    assert [divergence_estimator(k) for k in ("kl_ref", "kl_ref_k3", "target_kl_target_policy", "is_js", "kl_clone",
                                               "before_kl_init", "reward", "target_log_z", "target_ess_fraction", "kl_budget")] == \
        ["k1", "k3", "SNIS", "IS", "k1", "k1", None, None, None, None]


# --- efficiency and the frontier ---------------------------------------------------------------------------------
def small_frontier(prompts: int = 6, samples: int = 16):
    """A frontier of random reference rewards (P, m), with few bootstrap resamples: only its format matters here."""
    import torch

    from tilt.frontier import FrontierConfig, frontier_from_rewards

    rewards = torch.randn(prompts, samples, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return frontier_from_rewards(rewards, FrontierConfig(num_resamples=20), prompts=[f"p{i}" for i in range(prompts)])


def _evals_table_rows(text: str) -> tuple[str, list[list[str]]]:
    table = text.split("<h4>Evaluations</h4>", 1)[1].split("</table>", 1)[0]
    return table, [_cells(r) for r in re.findall(r"<tr>(.*?)</tr>", table, flags=re.S)[1:]]


@pytest.mark.slow  # two runs' pages with a dozen PNGs
def test_evaluations_against_a_frontier_show_efficiency_and_are_drawn_over_it(tmp_path, monkeypatch):
    import base64

    import tilt.frontier

    frontier = small_frontier()
    plain, scored = _eval_row(4, 0.3, 0.58), _eval_row(8, 0.6, 0.66)
    scored.update(frontier.efficiency(scored))
    run = write_run(tmp_path / "demo", "kl-rl", evals=[plain, scored])
    frontier.save(run / "frontier.json")
    other_row = _eval_row(24, 0.2, 0.55)
    other = write_run(tmp_path / "other", "kl-rl", evals=[other_row])
    drawn = {}
    real_plot = tilt.frontier.plot_frontier

    def spy(f, path, *, runs=None, title=None):
        drawn.update(runs)
        return real_plot(f, path, runs=runs, title=title)

    monkeypatch.setattr(tilt.frontier, "plot_frontier", spy)
    page, plots = build_report(run, [other])
    text = check_page(page)

    table, rows = _evals_table_rows(text)
    assert "<th>WR*(KL)</th>" in table and "<th>efficiency [95% interval]</th>" in table
    assert all("n/a: evaluated without --frontier" in cell for cell in rows[0][-2:])  # the plain evaluation
    e, star = scored["efficiency"], scored["frontier_win_rate"]
    assert 0 < e < 2 and 0.5 < star < 1
    assert rows[1][-1].startswith(f"{e:.3g} [{scored['efficiency_ci'][0]:.3g}, {scored['efficiency_ci'][1]:.3g}]")
    assert rows[1][-2].startswith(f"{star:.3g} [{scored['frontier_win_rate_ci'][0]:.3g}, ")
    headline = re.search(r"<p class='headline'><b>(.*?)</b></p>", text).group(1)
    assert "step 8" in headline and f"= {e:.3g} [" in headline and f"WR*(KL) = {star:.3g} [" in headline
    assert "efficiency, last evaluation" in text  # the overview: this run's last efficiency, the other run's "n/a"

    png = page.parent / "frontier.png"
    assert plots["frontier"] == png and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"src='data:image/png;base64,{base64.b64encode(png.read_bytes()).decode('ascii')}'" in text
    caption = text.split("<h2>Against the KL–win-rate frontier</h2>", 1)[1].split("</figcaption>", 1)[0]
    assert "frontier.png" in caption and "beyond reach of m = 16 samples" in caption and "(WR − ½)/(WR*(KL) − ½)" in caption
    assert "95% bootstrap interval" in caption
    # the run's scored evaluation is its curve (the plain one was not scored against this frontier); the compared
    # run, with no frontier of its own, is drawn and labelled as not scored
    assert drawn == {"demo": [{k: scored[k] for k in ("kl_ref", "win_rate", "win_rate_ci")}],
                     "other (not scored against this frontier)": [{k: other_row[k] for k in ("kl_ref", "win_rate", "win_rate_ci")}]}


def test_no_frontier_no_frontier_plot_nor_columns(tmp_path):
    run = write_run(tmp_path / "r", "kl-rl", evals=[_eval_row(4, 0.3, 0.58)])
    page, plots = build_report(run)
    text = check_page(page)
    assert "frontier" not in plots and not (page.parent / "frontier.png").exists()
    assert "WR*(KL)</th>" not in text and "Against the KL–win-rate frontier" not in text
    assert "no efficiency (evaluated without a frontier" in text


@pytest.mark.slow  # one evaluation of tiny models and one report
def test_eval_record_with_a_frontier_writes_efficiency_and_keeps_the_frontier(tmp_path, capsys, world):
    from test_evaluate import PROMPTS, T, cli, count_a, policy_of

    from tilt.cli.evaluate import keep_frontier
    from tilt.frontier import Frontier, FrontierConfig, draw_reference_rewards, frontier_from_rewards

    rewards = draw_reference_rewards(policy_of(world, "flat"), PROMPTS, 16, count_a, seed=0)
    frontier_file = frontier_from_rewards(rewards, FrontierConfig(num_resamples=20), prompts=PROMPTS).save(tmp_path / "f.json")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward": 0.1 * s, "kl_ref": 0.01 * s}) + "\n" for s in (1, 2)))
    cli(["eval", "--model", world / "likes_a", "--ref", world / "flat", "--prompts", world / "prompts.jsonl",
         "--reward", f"{world / 'rewards.py'}:count_a", "--samples", 8, "--resamples", 50, "--max-new-tokens", T,
         "--frontier", frontier_file, "--record", run, "--json"], capsys)
    row = json.loads((run / "evals.jsonl").read_text().splitlines()[-1])
    for key in ("efficiency", "efficiency_ci", "efficiency_ci_total", "frontier_win_rate", "frontier_win_rate_ci", "beyond_reach"):
        assert key in row, key
    assert row["frontier_win_rate"] == pytest.approx(Frontier.load(frontier_file).wr_star(row["kl_ref"]))
    assert Frontier.load(run / "frontier.json").data == Frontier.load(frontier_file).data
    assert sorted(p.name for p in run.iterdir()) == ["evals.jsonl", "frontier.json", "metrics.jsonl"]  # no temporary left

    page, plots = build_report(run)
    text = check_page(page)
    assert "frontier" in plots and "<th>efficiency [95% interval]</th>" in text

    other = small_frontier().save(tmp_path / "other.json")  # a run keeps the frontier it holds, and says so
    capsys.readouterr()
    kept = (run / "frontier.json").read_bytes()
    keep_frontier(str(run), Frontier.load(other), str(other))
    assert (run / "frontier.json").read_bytes() == kept
    assert "differs from the frontier of --frontier" in capsys.readouterr().err

    # an evaluation of the first prompt only is scored against, and keeps, the frontier of that prompt
    first = tmp_path / "first"
    first.mkdir()
    cli(["eval", "--model", world / "likes_a", "--ref", world / "flat", "--prompts", world / "prompts.jsonl", "--limit", 1,
         "--reward", f"{world / 'rewards.py'}:count_a", "--samples", 8, "--resamples", 50, "--max-new-tokens", T,
         "--frontier", frontier_file, "--record", first, "--json"], capsys)
    row = json.loads((first / "evals.jsonl").read_text().splitlines()[-1])
    kept = Frontier.load(first / "frontier.json")
    assert kept.data["prompts"] == PROMPTS[:1] and kept.data["ref_rewards"] == rewards[:1].tolist()
    assert row["frontier_win_rate"] == pytest.approx(kept.wr_star(max(row["kl_ref"], 0.0)))
