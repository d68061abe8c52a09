"""`tilt demo` end to end on a tiny model (the real demo uses the embedded 135M model: `make demo`)."""
import json
import math

import pytest
import torch

from tilt.cli import main
from tilt.engine.tiny import char_tokenizer, tiny_gpt2
from tilt.frontier import Frontier, task_prompts
from tilt.pipelines.demo import SHIPPED_FRONTIER, DemoConfig, demo_prompts, uses_shipped_frontier


def test_demo_prompts_ship_with_the_package():
    prompts = demo_prompts()
    assert len(prompts) == 32 and len(set(prompts)) == 32 and all(p.strip() for p in prompts)


@pytest.fixture
def tiny_folder(tmp_path):
    """A tiny GPT-2 and its character tokenizer, saved as a from_pretrained folder."""
    folder = tmp_path / "tiny"
    tok = char_tokenizer()
    tiny_gpt2(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_tiny_model(tiny_folder, tmp_path, capsys):
    folder = tiny_folder
    run = tmp_path / "run"
    assert main(["demo", "--model", str(folder), "--steps", "2", "--run-dir", str(run), "--eval-samples", "2", "--eval-every", "1"]) == 0
    out = capsys.readouterr().out
    for text in ("mean reward", "KL(pi || pi_ref)", "win rate against pi_ref", "before (", "after  (", "Report:"):
        assert text in out, text
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    steps = {json.loads(line)["step"] for line in (run / "samples.jsonl").read_text().splitlines()}
    assert steps == {0, 2}
    evals = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [1, 2] and "Reward, win rate and efficiency as KL grows" in out
    assert (run / "report" / "report.html").is_file() and (run / "final" / "config.json").is_file()
    assert (run / "frontier.png").is_file() and "efficiency (WR - 1/2) / (WR* - 1/2)" in out
    # a tiny model is not the shipped frontier's: the demo drew its own, on the first held-out openings
    frontier = Frontier.load(run / "frontier.json")
    assert frontier.data["prompts"] == task_prompts("heldout")[:DemoConfig().eval_prompts]
    assert frontier.data["meta"]["samples_per_prompt"] == DemoConfig().frontier_samples
    for e in evals:  # the efficiency is the ratio at the policy's own KL, read off the saved frontier
        star = frontier.wr_star(max(e["kl_ref"], 0.0))
        assert e["frontier_win_rate"] == pytest.approx(star)
        if star > 0.5:
            assert e["efficiency"] == pytest.approx((e["win_rate"] - 0.5) / (star - 0.5))
        else:  # at KL 0 nothing beats the reference: the ratio is undefined
            assert math.isnan(e["efficiency"])


@pytest.mark.slow
def test_the_demo_stops_at_its_time_budget_and_evaluates_the_policy_it_stopped_at(tiny_folder, tmp_path, capsys):
    folder = tiny_folder
    run = tmp_path / "run"
    # a budget that has run out after the first step: no evaluation is due (every 3 steps), yet step 1 is evaluated
    assert main(["demo", "--model", str(folder), "--steps", "5", "--eval-every", "3", "--minutes", "1e-9", "--run-dir", str(run),
                 "--eval-samples", "2", "--eval-prompts", "2", "--frontier-samples", "2"]) == 0
    out = capsys.readouterr().out
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert [json.loads(line)["step"] for line in (run / "evals.jsonl").read_text().splitlines()] == [1]
    assert "training stopped after step 1: the 1e-09-minute budget had run out" in out and "after 1 steps" in out


def test_demo_evaluation_schedule():
    d = DemoConfig(steps=25, eval_every=10)
    assert [s for s in range(1, 26) if d.evaluates_at(s, out_of_time=False)] == [10, 20, 25]
    assert d.evaluates_at(3, out_of_time=True)
    with pytest.raises(ValueError, match="minutes >= 0"):
        DemoConfig(minutes=-1)


def test_the_shipped_frontier_is_the_held_out_openings_and_used_only_where_it_applies():
    shipped = Frontier.load(SHIPPED_FRONTIER)
    meta = shipped.data["meta"]
    assert shipped.data["prompts"] == task_prompts("heldout")[:meta["prompts"]]
    assert (meta["model"], meta["reward"], meta["max_new_tokens"]) == ("embedded", "sentiment", DemoConfig().max_new_tokens)
    d = DemoConfig()
    assert uses_shipped_frontier(d, "embedded", "", ("sentiment",))
    assert uses_shipped_frontier(d, "embedded", "embedded", ("sentiment",))
    assert not uses_shipped_frontier(d, "embedded", "other-ref", ("sentiment",))
    assert not uses_shipped_frontier(d, "some/model", "", ("sentiment",))
    assert not uses_shipped_frontier(d, "embedded", "", ("sentiment", "length"))
    assert not uses_shipped_frontier(DemoConfig(max_new_tokens=16), "embedded", "", ("sentiment",))
    assert not uses_shipped_frontier(DemoConfig(eval_prompts=meta["prompts"] + 1), "embedded", "", ("sentiment",))


def test_a_frontier_of_other_openings_is_refused_before_anything_is_written(tiny_folder, tmp_path, capsys):
    from tilt.frontier import FrontierConfig, frontier_from_rewards

    folder = tiny_folder
    held_out = task_prompts("heldout")[:4]
    rewards = torch.arange(32.0).reshape(4, 8)
    other = [held_out[0], "a different opening", *held_out[2:]]
    frontier_from_rewards(rewards, FrontierConfig(num_resamples=10), prompts=other,
                          meta={"max_new_tokens": 24}).save(tmp_path / "f.json")
    run = tmp_path / "run"
    code = main(["demo", "--model", str(folder), "--steps", "1", "--eval_prompts", "4", "--frontier", str(tmp_path / "f.json"),
                 "--run-dir", str(run)])
    assert code != 0 and not run.exists()
    assert "prompt 1 differs" in capsys.readouterr().err
