"""``tilt train dpo | online-dpo | xpo | reward-model`` on tiny models built from configs and saved to tmp folders.

Each command runs from a YAML file with a command-line override, writes its run directory, and does what it
says: DPO raises the chosen-vs-rejected margin of its pairs, online DPO and XPO raise the win rate against the
reference on a programmatic reward, the reward model ranks held-out pairs far above chance; bad input is refused
with an error naming the problem, before any run directory exists.
"""
from __future__ import annotations

import json
import random
import shutil
import signal

import pytest
import torch
import yaml

from tilt.runs import directory as runs
from tilt.cli import main as tilt_main


def main(argv: list[str]) -> int:
    return tilt_main(["train", *argv])

VOWELS, CONSONANTS = "aeiou", "bcdfgklmnprst"


def _word(rng: random.Random, letters: str, n: int) -> str:
    return "".join(rng.choice(letters) for _ in range(n))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny GPT-2 folder, a prompts file, and a preferences file whose chosen answers are vowels and rejected
    ones consonants (a preference a model can learn)."""
    from tilt.engine.tiny import char_tokenizer, tiny_gpt2

    root = tmp_path_factory.mktemp("pref")
    tok = char_tokenizer()
    tiny_gpt2(len(tok), n_layer=1, n_embd=16, seed=3).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rng = random.Random(0)
    prompts = [_word(rng, VOWELS + CONSONANTS + " ", 6) for _ in range(40)]
    rows = [{"prompt": p, "chosen": " " + _word(rng, VOWELS, 4), "rejected": " " + _word(rng, CONSONANTS, 4)} for p in prompts]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts[:8]))
    (root / "dpo.yaml").write_text(yaml.safe_dump({
        "recipe": "dpo", "model": str(root / "model"), "preferences": str(root / "pairs.jsonl"),
        "beta": 0.1, "epochs": 1, "pairs_per_step": 10, "lr": 0.003, "checkpoint_every": 2, "keep_checkpoints": 2}))
    (root / "online.yaml").write_text(yaml.safe_dump({
        "model": str(root / "model"), "prompts": str(root / "prompts.jsonl"), "reward": "regex:[aeiou]",
        "beta": 0.1, "steps": 30, "prompts_per_step": 8, "lr": 0.01, "seed": 1, "sampling": {"max_new_tokens": 6},
        "eval_samples_per_prompt": 8, "sample_prompts": 2}))
    (root / "rm.yaml").write_text(yaml.safe_dump({
        "recipe": "reward-model", "model": str(root / "model"), "preferences": str(root / "pairs.jsonl"),
        "held_out": 0.25, "epochs": 1.0, "pairs_per_step": 6, "lr": 0.003, "lr_schedule": "constant", "checkpoint_every": 0}))
    return root


def _summary(run) -> dict:
    return json.loads((run / "summary.json").read_text())


def _check_run_dir(run, steps: int) -> list[dict]:
    assert (run / "config.yaml").is_file() and (run / "final" / "config.json").is_file()
    assert (run / "final" / "model.safetensors").is_file()
    rows = runs.read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    return rows


@pytest.fixture(scope="module")
def dpo_run(world):
    run = world / "runs" / "dpo"
    assert main(["dpo", "--config", str(world / "dpo.yaml"), "--run-dir", str(run), "--epochs", "2"]) == 0
    return run


def test_dpo_runs_from_yaml_with_an_override_and_raises_the_margin_of_its_pairs(world, dpo_run):
    from tilt.runs.commands import pair_margins, preference_pairs
    from tilt.data import DataConfig, load_data
    from tilt.engine.hf import HFPolicy
    from tilt.engine.loading import load_model, load_tokenizer
    from tilt.recipes.dpo import reference_logprobs

    config = yaml.safe_load((dpo_run / "config.yaml").read_text())
    assert config["recipe"] == "dpo" and config["dpo"]["epochs"] == 2 and config["run"]["ref"] == str(world / "model")
    _check_run_dir(dpo_run, 8)  # 2 * 40 / 10 steps
    # The margin measured independently: the trained policy against the initial model, on every pair.
    tok = load_tokenizer(str(world / "model"))
    ref = HFPolicy(load_model(str(world / "model")), tok)
    rows = load_data(world / "pairs.jsonl", DataConfig(fmt="preferences")).rows
    pairs = preference_pairs(ref, rows)
    ref_lp = reference_logprobs(ref, pairs)
    assert pair_margins(ref, pairs, ref_lp, 0.1) == (0.0, 0.0)
    margin, accuracy = pair_margins(HFPolicy(load_model(str(dpo_run / "final")), tok), pairs, ref_lp, 0.1)
    assert margin > 0.05 and accuracy > 0.8
    summary = _summary(dpo_run)
    assert summary["reward_margin_before"] == 0.0 and summary["reward_margin_after"] == pytest.approx(margin, rel=1e-4)


def test_dpo_resumes_from_its_checkpoint_and_writes_the_same_metrics(world, dpo_run, tmp_path):
    run = tmp_path / "stopped"
    shutil.copytree(dpo_run, run)
    # The state of a run killed after step 6: its newest checkpoints are 4 and 6, nothing after.
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    shutil.rmtree(run / "checkpoints" / runs.checkpoint_name(8))
    (run / "checkpoints" / "latest").write_text(runs.checkpoint_name(6) + "\n")
    assert main(["dpo", "--resume", str(run)]) == 0
    full, resumed = runs.read_jsonl(dpo_run / "metrics.jsonl"), runs.read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    for a, b in zip(full, resumed):  # step_time is wall-clock time, the one value a resumed run does not reproduce
        assert {k: v for k, v in b.items() if k != "step_time"} == pytest.approx({k: v for k, v in a.items() if k != "step_time"}, rel=1e-5, abs=1e-7)
    # the summary of the resumed run is the uninterrupted run's, "before" metrics included (of the initial model)
    whole, after_resume = _summary(dpo_run), _summary(run)
    assert after_resume.keys() == whole.keys() and after_resume["reward_margin_before"] == 0.0
    numbers = {k for k, v in whole.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert {k: after_resume[k] for k in numbers} == pytest.approx({k: whole[k] for k in numbers}, rel=1e-5, abs=1e-7)
    assert {k: v for k, v in after_resume.items() if k not in numbers} == {k: v for k, v in whole.items() if k not in numbers}


@pytest.mark.parametrize("command,extra", [("online-dpo", []), ("xpo", ["--alpha", "0.001"])])
def test_online_dpo_and_xpo_raise_the_win_rate_against_the_reference(world, command, extra):
    from tilt.engine.hf import HFPolicy, SamplingConfig
    from tilt.engine.loading import load_model, load_tokenizer
    from tilt.evaluation import EvalConfig, evaluate
    from tilt.reward_fns import reward_from_specs

    run = world / "runs" / command
    assert main([command, "--config", str(world / "online.yaml"), "--run-dir", str(run), *extra]) == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    section = command.replace("-", "_")
    assert config[section]["scheme"] == command and config[section]["alpha"] == (0.001 if command == "xpo" else 0.0)
    rows = _check_run_dir(run, 30)
    assert {"loss", "preference_loss", "bonus", "policy_sample_win_rate", "kl_ref"} <= set(rows[0])
    assert (rows[-1]["bonus"] != 0) == (command == "xpo")
    samples = runs.read_jsonl(run / "samples.jsonl")
    assert [r["step"] for r in samples] == [0, 0, 30, 30]
    summary = _summary(run)
    assert summary["win_rate_ci"][0] > 0.5  # the CLI's own evaluation
    # and an independent one, with another seed: the trained policy against the initial model
    tok = load_tokenizer(str(world / "model"))
    sampling = SamplingConfig(max_new_tokens=6)
    policy = HFPolicy(load_model(str(run / "final")), tok, sampling)
    ref = HFPolicy(load_model(str(world / "model")), tok, sampling)
    prompts = [json.loads(line)["prompt"] for line in (world / "prompts.jsonl").read_text().splitlines()]
    m = evaluate(EvalConfig(samples_per_prompt=8, seed=7), policy, ref, reward_from_specs(["regex:[aeiou]"]), prompts).metrics
    assert m["win_rate_ci"][0] > 0.5 and m["reward_mean"] > m["ref_reward_mean"]


STOPPING_REWARD = '''import os, signal

CALLS = [0]


def vowels(prompts, completions):
    CALLS[0] += 1
    if str(CALLS[0]) == os.environ.get("STOP_AT_REWARD_CALL"):
        os.kill(os.getpid(), signal.SIGTERM)  # as if the user pressed stop during this step
    return [float(sum(ch in "aeiou" for ch in c)) for c in completions]
'''


@pytest.mark.parametrize("command,extra", [("online-dpo", []), ("xpo", ["--alpha", "0.01", "--regime", "cumulative", "--refit-steps", "2"]),
                                           # bfloat16 autocast: the samples are a proposal's, and stored pairs keep their pi/q
                                           ("xpo", ["--alpha", "0.01", "--regime", "cumulative", "--refit-steps", "2", "--dtype", "bfloat16"])])
def test_online_dpo_and_xpo_stopped_by_sigterm_resume_to_the_uninterrupted_run(world, tmp_path, monkeypatch, capsys, command, extra):
    """SIGTERM during step 4 of 8: the step finishes, a checkpoint is saved, exit 143; --resume then writes the
    metrics, samples, summary and final weights of the uninterrupted run, exactly (CPU)."""
    from safetensors.torch import load_file

    from tilt.runs.loop import EXIT_SIGNAL

    reward = tmp_path / "reward.py"
    reward.write_text(STOPPING_REWARD)
    args = [command, "--config", str(world / "online.yaml"), "--reward", f"{reward}:vowels", "--steps", "8",
            "--checkpoint-every", "3", "--eval-samples-per-prompt", "2", "--oracle", "bradley-terry", "--scale", "0.5", *extra]
    whole, run = tmp_path / "whole", tmp_path / "stopped"
    assert main([*args, "--run-dir", str(whole)]) == 0
    # the reward is called once for the step-0 samples, then twice a step (A and B): call 9 is in step 4 (1-based)
    monkeypatch.setenv("STOP_AT_REWARD_CALL", "9")
    assert main([*args, "--run-dir", str(run)]) == EXIT_SIGNAL[signal.SIGTERM]
    assert f"--resume {run}" in capsys.readouterr().err
    assert [s for s, _ in runs.list_checkpoints(run)] == [3, 4] and not (run / "final").exists()
    state = json.loads((run / "checkpoints" / runs.checkpoint_name(4) / runs.STATE_JSON).read_text())
    assert state["extra"]["recipe"] == command
    assert len(state["extra"].get("stored_pairs", {"rows": []})["rows"]) == (4 if "cumulative" in extra else 0)
    monkeypatch.delenv("STOP_AT_REWARD_CALL")
    assert main([command, "--resume", str(run), "--beta", "0.5"]) == 2  # the run's recipe cannot change
    assert f"cannot change {command.replace('-', '_')}.beta" in capsys.readouterr().err
    assert main([command, "--resume", str(run)]) == 0
    for name in ("metrics.jsonl", "samples.jsonl"):
        assert runs.read_jsonl(run / name) == runs.read_jsonl(whole / name), name
    assert [r["step"] for r in runs.read_jsonl(run / "metrics.jsonl")] == list(range(1, 9))
    assert _summary(run) == _summary(whole)
    resumed, uninterrupted = load_file(run / "final" / "model.safetensors"), load_file(whole / "final" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name, w in uninterrupted.items():
        assert torch.equal(resumed[name], w), name


def test_the_reward_model_ranks_held_out_pairs_far_above_chance_and_is_a_reward_spec(world):
    from tilt.reward_fns import reward_from_specs

    run = world / "runs" / "rm"
    assert main(["reward-model", "--config", str(world / "rm.yaml"), "--run-dir", str(run), "--epochs", "2"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["reward_model"]["epochs"] == 2.0
    rows = _check_run_dir(run, 10)  # ceil(2 * 30 / 6)
    summary = _summary(run)
    assert summary["train_pairs"] == 30 and summary["held_out_pairs"] == 10
    assert summary["accuracy_held_out"] >= 0.9 and rows[-1]["loss"] < rows[0]["loss"]
    reward = reward_from_specs([str(run / "final")])
    scores = reward(["x", "x"], [" aeiou", " bcdfg"])
    assert scores[0] > scores[1]


@pytest.mark.parametrize("command,args,message", [
    ("dpo", ["--preferences", "PREFIX/missing.jsonl"], "missing.jsonl"),
    ("dpo", ["--preferences", "PREFIX/prompts.jsonl"], "chosen"),
    ("dpo", ["--loss-type", "hinge"], "loss_type must be 'sigmoid' or 'ipo'"),
    ("dpo", ["--model", "PREFIX/nowhere"], "nowhere"),
    ("online-dpo", ["--alpha", "0.1"], "alpha is XPO's bonus"),
    ("online-dpo", ["--scheme", "xpo"], "use tilt train xpo"),
    ("xpo", ["--reward", "nosuchreward"], "nosuchreward"),
    ("xpo", ["--oracle", "judge"], "labels.oracle must be one of comparison, bradley-terry"),
    ("xpo", ["--prompts", ""], "tilt train xpo needs run.prompts"),
    ("dpo", ["--device", "tpu"], "run.device must be one of auto, cpu, cuda"),
    ("xpo", ["--alpha", "big"], "alpha must be a number"),
    ("reward-model", ["--held-out", "1.5"], "held_out must be in [0, 1)"),
])
def test_bad_input_gives_a_clear_error_and_no_run_directory(world, tmp_path, capsys, command, args, message):
    config = {"dpo": "dpo.yaml", "online-dpo": "online.yaml", "xpo": "online.yaml", "reward-model": "rm.yaml"}[command]
    run = tmp_path / "runs" / "bad"
    args = [a.replace("PREFIX", str(world)) for a in args]
    assert main([command, "--config", str(world / config), "--run-dir", str(run), *args]) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()


def test_unknown_keys_and_a_config_for_another_recipe_are_named(world, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**yaml.safe_load((world / "dpo.yaml").read_text()), "bta": 0.1}))
    assert main(["dpo", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'bta'; did you mean 'beta'?" in err
    assert main(["reward-model", "--config", str(world / "dpo.yaml")]) == 2
    assert "the config is for 'dpo', not tilt train reward-model" in capsys.readouterr().err


def test_alpha_and_beta_take_a_schedule_from_yaml_or_the_command_line():
    from tilt.runs.config import parse_flags, resolve

    base = {"run": {"model": "m", "prompts": "p", "reward": "length"}}
    assert resolve("xpo", {**base, "alpha": [0.1, 0.01]})["xpo"]["alpha"] == [0.1, 0.01]
    out = resolve("xpo", base, parse_flags("xpo", ["--alpha", "0.1,0.05", "--beta", "0.2"]))["xpo"]
    assert out["alpha"] == [0.1, 0.05] and out["beta"] == 0.2 and out["scheme"] == "xpo"
    assert resolve("online-dpo", base)["online_dpo"]["alpha"] == 0.0
