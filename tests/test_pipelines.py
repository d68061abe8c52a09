"""Demonstration-regularised RL and RLHF pipelines on a tiny GPT-2 built from a config.

The task: demonstrations are 4-letter words over {a, b, c}; the programmatic reward counts the 'a's of a completion
(``regex:a``). Cloning must lower the demonstration NLL; RL toward the clone must raise the reward while the KL to
the clone stays under a budget (the interval's upper end), and the KL to the initial model is reported too.
"""
import json
import random

import pytest
import torch

from tilt.engine.hf import SamplingConfig
from tilt.engine.tiny import char_tokenizer, tiny_gpt2
from tilt.evaluation import EvalConfig
from tilt.pipelines.demo_rl import (DemoRLConfig, DemoRLHFConfig, PreferenceConfig, config_from_dict, config_to_dict, open_run,
                                    read_pairs, read_stage, run_demo_rl, run_demo_rlhf, stage_dir)
from tilt.recipes.bc import BCConfig
from tilt.recipes.kl_rl import KLRLConfig
from tilt.recipes.reward_model import RewardModelConfig

LAM = 1.0  # lambda: with it the KL to the clone ends near 2.3 nats on this task (0.1 spends about 10)
KL_BUDGET = 4.0  # nats of KL(pi || clone)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    tok = char_tokenizer()
    tiny_gpt2(len(tok)).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    rng = random.Random(0)
    with open(root / "demos.jsonl", "w") as f:
        for _ in range(24):
            prompt = "".join(rng.choice("bcdfg") for _ in range(3)) + " "
            f.write(json.dumps({"prompt": prompt, "completion": "".join(rng.choice("abc") for _ in range(4))}) + "\n")
    return root


def demo_config(files, **changes):
    base = dict(model=str(files / "base"), demonstrations=str(files / "demos.jsonl"), reward=("regex:a",), kl_budget=KL_BUDGET,
                eval_prompts=8, bc=BCConfig(steps=40, sequences_per_step=0, lr=3e-3),
                rl=KLRLConfig(beta=LAM, steps=20, prompts_per_step=4, samples_per_prompt=4, lr=3e-3),
                sampling=SamplingConfig(max_new_tokens=8), eval=EvalConfig(samples_per_prompt=8, num_resamples=200))
    return DemoRLConfig(**{**base, **changes})


def weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_config_round_trips_and_rejects_bad_keys(files, tmp_path):
    config = demo_config(files, bc=BCConfig(floor=0.01, vocab_size=34))
    assert config_from_dict("demo-rl", config_to_dict(config)) == config
    rlhf = DemoRLHFConfig(**{f: getattr(config, f) for f in config.__dataclass_fields__}, preferences=PreferenceConfig(pairs=10))
    assert config_from_dict("demo-rlhf", json.loads(json.dumps(config_to_dict(rlhf)))) == rlhf
    with pytest.raises(ValueError, match="unknown config key 'lamda'"):
        config_from_dict("demo-rl", {**config_to_dict(config), "lamda": 1})
    with pytest.raises(ValueError, match="bc.stepz"):
        config_from_dict("demo-rl", {**config_to_dict(config), "bc": {"stepz": 1}})
    with pytest.raises(ValueError, match="must set model"):
        DemoRLConfig(demonstrations="d.jsonl", reward=("regex:a",))
    with pytest.raises(ValueError, match="oracle"):
        PreferenceConfig(oracle="coin")
    with pytest.raises(ValueError, match="temperature 1"):
        demo_config(files, sampling=SamplingConfig(temperature=0.7))
    # a run directory belongs to one config
    open_run(tmp_path / "run", config)
    open_run(tmp_path / "run", config)  # the same config reopens it
    with pytest.raises(ValueError, match="another config"):
        open_run(tmp_path / "run", demo_config(files, rl=KLRLConfig(beta=0.5)))


def test_floor_needs_the_model_vocabulary(files, tmp_path):
    with pytest.raises(ValueError, match="set bc.vocab_size to 34"):
        run_demo_rl(demo_config(files, bc=BCConfig(steps=1, floor=0.01, vocab_size=40)), tmp_path / "run")


@pytest.mark.slow
def test_clone_lowers_demo_loss_and_rl_raises_reward_within_kl_budget(files, tmp_path):
    out = run_demo_rl(demo_config(files), tmp_path / "run")
    bc, rl = out["stages"]["bc"], out["stages"]["rl"]
    assert bc["demo_nll"] < 0.5 * bc["demo_nll_before"], bc  # 3.48 -> 0.87 nats per token
    # the reward rises: the intervals before and after do not overlap
    assert rl["reward_ci"][0] > rl["before_reward_ci"][1], rl
    # KL to the clone: 0 at the start (the policy is the clone), under the budget at the end, interval included
    assert rl["before_kl_clone"] == 0.0
    assert 0 < rl["kl_clone_ci"][0] and rl["kl_clone_ci"][1] < KL_BUDGET and rl["within_budget"], rl
    # KL to the initial (pre-cloning) model is reported; cloning already moved far from it
    assert rl["kl_init_ci"][0] > rl["kl_clone_ci"][1] and rl["before_kl_init"] > 1.0, rl
    # every stage left a from_pretrained folder and its per-step metrics
    from transformers import AutoModelForCausalLM

    for stage in ("bc", "rl"):
        folder = stage_dir(out["run_dir"], stage)
        AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
        assert len((folder / "metrics.jsonl").read_text().splitlines()) == (40 if stage == "bc" else 20)
        assert read_stage(out["run_dir"], stage) == out["stages"][stage]
    assert not (tmp_path / "run" / "work").exists() or not any((tmp_path / "run" / "work").iterdir())


@pytest.mark.slow
def test_small_lambda_overspends_the_budget_and_another_start_is_measured(files, tmp_path):
    """The budget binds: lambda = 0.1 leaves the clone by far more than 4 nats. Starting from the initial model
    instead of the clone, the KL to the start (= the initial model) is 0 before training and the clone is far."""
    out = run_demo_rl(demo_config(files, rl=KLRLConfig(beta=0.1, steps=20, prompts_per_step=4, samples_per_prompt=4, lr=3e-3),
                                  start=str(files / "base")), tmp_path / "run")
    rl = out["stages"]["rl"]
    assert rl["kl_clone_ci"][0] > KL_BUDGET and not rl["within_budget"], rl
    assert rl["before_kl_start"] == 0.0 and rl["before_kl_init"] == 0.0 and rl["before_kl_clone"] > 1.0, rl
    assert rl["reward_ci"][0] > rl["before_reward_ci"][1], rl


class Killed(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("kill_stage, kill_step", [("rl", 7), ("bc", 12)])
def test_a_killed_pipeline_resumes_skipping_completed_stages_with_the_same_result(files, tmp_path, kill_stage, kill_step):
    config = demo_config(files, checkpoint_every=5, rl=KLRLConfig(beta=LAM, steps=10, prompts_per_step=4, samples_per_prompt=4, lr=3e-3),
                         bc=BCConfig(steps=20, sequences_per_step=8, lr=3e-3))
    whole = run_demo_rl(config, tmp_path / "whole")

    def kill(stage, step, metrics):
        if (stage, step) == (kill_stage, kill_step):
            raise Killed

    with pytest.raises(Killed):
        run_demo_rl(config, tmp_path / "cut", hook=kill)
    run = tmp_path / "cut"
    assert (read_stage(run, "bc") is not None) == (kill_stage == "rl")
    assert read_stage(run, "rl") is None and (run / "work" / kill_stage / "checkpoints").is_dir()
    bc_written = (stage_dir(run, "bc") / "stage.json").stat().st_mtime_ns if kill_stage == "rl" else None

    resumed_from = []
    again = run_demo_rl(config, run, hook=lambda stage, step, m: resumed_from.append((stage, step)))
    assert again["skipped"] == (["bc"] if kill_stage == "rl" else [])
    assert resumed_from[0] == (kill_stage, 6 if kill_stage == "rl" else 11)  # from the checkpoint at step 5 (10)
    if bc_written is not None:
        assert (stage_dir(run, "bc") / "stage.json").stat().st_mtime_ns == bc_written
    for stage in ("bc", "rl"):
        a, b = weights(stage_dir(whole["run_dir"], stage)), weights(stage_dir(run, stage))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
        assert (stage_dir(whole["run_dir"], stage) / "metrics.jsonl").read_text() == (stage_dir(run, stage) / "metrics.jsonl").read_text()
    assert again["stages"] == whole["stages"]
    # a third run trains nothing
    third = run_demo_rl(config, run, hook=lambda *a: pytest.fail("a completed pipeline trained again"))
    assert third["skipped"] == ["bc", "rl"]


@pytest.mark.slow
def test_rlhf_reward_model_beats_chance_on_held_out_pairs_and_rl_raises_the_oracle_reward(files, tmp_path):
    """With a floored clone (f = 0.001): the RL stage's reference is the floored clone, as fitted."""
    base = demo_config(files, rl=KLRLConfig(beta=0.1, steps=20, prompts_per_step=4, samples_per_prompt=4, lr=3e-3),
                       bc=BCConfig(steps=40, sequences_per_step=0, lr=3e-3, floor=1e-3, vocab_size=34))
    config = DemoRLHFConfig(**{f: getattr(base, f) for f in base.__dataclass_fields__}, preferences=PreferenceConfig(pairs=400, oracle="comparison"),
                            reward_model=RewardModelConfig(epochs=3, pairs_per_step=16, lr=3e-3))
    out = run_demo_rlhf(config, tmp_path / "run")
    prefs, rm, rl = out["stages"]["preferences"], out["stages"]["reward_model"], out["stages"]["rl"]
    train, held_out = read_pairs(out["run_dir"])
    assert len(train) == prefs["train"] and len(held_out) == prefs["held_out"] >= 50
    assert prefs["pairs"] + prefs["ties_dropped"] + prefs["identical_dropped"] == 400
    # every kept pair is ordered by the oracle's reward (the number of 'a's)
    assert all(p["chosen"].count("a") > p["rejected"].count("a") for p in train + held_out)
    # held-out accuracy above chance: 0.5 + 3 standard errors of a fair coin on this many pairs
    n = len(held_out)
    assert rm["accuracy_held_out"] > 0.5 + 3 * (0.25 / n) ** 0.5, rm
    assert rm["accuracy_held_out"] > rm["accuracy_held_out_before"], rm
    # RL toward the clone on the learned reward raises the learned reward and the oracle's
    assert rl["reward_ci"][0] > rl["before_reward_ci"][1], rl
    assert rl["oracle_reward_ci"][0] > rl["before_oracle_reward_ci"][1], rl
    # the clone against its floored self: a small positive KL before RL, a larger one after
    assert 0 < rl["before_kl_clone"] < 0.5 and rl["kl_clone"] > rl["before_kl_clone"], rl
    assert out["stages"]["bc"]["floor"] == 1e-3 and rl["kl_init_ci"][0] > 0


@pytest.mark.slow
def test_cli_config_file_overrides_and_resume(files, tmp_path, capsys):
    import yaml

    from tilt.cli import main

    config = demo_config(files, bc=BCConfig(steps=3, sequences_per_step=0, lr=3e-3),
                         rl=KLRLConfig(beta=LAM, steps=2, prompts_per_step=2, samples_per_prompt=2, lr=3e-3))
    path = tmp_path / "c.yaml"  # the pipeline's own flat shape: bare names resolve to their sections
    path.write_text(yaml.safe_dump({k: v for k, v in config_to_dict(config).items() if k != "pipeline"}))
    run = tmp_path / "run"
    assert main(["train", "demo-rl", "--config", str(path), "--run-dir", str(run), "--lam", "0.5", "--bc.steps", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stages"]["rl"]["lam"] == 0.5 and out["stages"]["bc"]["steps"] == 4 and out["skipped"] == []
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["rl"]["beta"] == 0.5 and saved["run"]["demonstrations"] == str(files / "demos.jsonl")
    assert main(["train", "demo-rl", "--resume", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == ["bc", "rl"]
    assert main(["train", "demo-rl", "--config", str(path), "--rl.steps", "two"]) == 2
    assert "--rl.steps must be an int" in capsys.readouterr().err


def test_bad_pipeline_input_leaves_no_run_directory(files, tmp_path, capsys):
    from tilt.cli import main

    run = tmp_path / "run"
    base = ["--model", str(files / "base"), "--demonstrations", str(files / "demos.jsonl"), "--reward", "regex:a",
            "--run-dir", str(run)]
    for extra, message in [(["--reward", "nosuchreward"], "nosuchreward"), (["--demonstrations", str(tmp_path / "no.jsonl")], "no.jsonl"),
                           (["--bc.lr", "fast"], "--bc.lr must be a float"), (["--rl.samples_per_prompt", "1"], "rl: samples_per_prompt")]:
        args = base + extra if extra[0] != "--reward" else [a if a != "regex:a" else extra[1] for a in base]
        assert main(["train", "demo-rl", *args]) == 2
        assert message in capsys.readouterr().err and not run.exists()


SIGTERM_REWARD = """import os, signal

CALLS = [0]


def a_count(prompts, completions):
    CALLS[0] += 1
    if str(CALLS[0]) == os.environ.get("STOP_AT_REWARD_CALL"):
        os.kill(os.getpid(), signal.SIGTERM)
    return [float(c.count("a")) for c in completions]
"""


@pytest.mark.slow
def test_sigterm_during_a_stage_checkpoints_exits_143_and_resume_reproduces_the_run(files, tmp_path, monkeypatch, capsys):
    from tilt.cli import main

    reward = tmp_path / "reward.py"
    reward.write_text(SIGTERM_REWARD)
    args = ["--model", str(files / "base"), "--demonstrations", str(files / "demos.jsonl"), "--reward", f"{reward}:a_count",
            "--bc.steps", "4", "--bc.sequences_per_step", "8", "--rl.steps", "6", "--rl.prompts_per_step", "2",
            "--rl.samples_per_prompt", "2", "--checkpoint_every", "2", "--eval_prompts", "2", "--eval.samples_per_prompt", "2",
            "--eval.num_resamples", "20", "--max_new_tokens", "4"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["train", "demo-rl", *args, "--run-dir", str(whole), "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    # reward calls: the before-measurement of the RL stage, then one per RL step; call 5 is in RL step 4 (of 6)
    monkeypatch.setenv("STOP_AT_REWARD_CALL", "5")
    assert main(["train", "demo-rl", *args, "--run-dir", str(cut)]) == 143
    err = capsys.readouterr().err
    assert f"tilt train demo-rl --resume {cut}" in err
    assert read_stage(cut, "bc") is not None and read_stage(cut, "rl") is None
    assert (cut / "work" / "rl" / "checkpoints").is_dir()
    monkeypatch.delenv("STOP_AT_REWARD_CALL")
    assert main(["train", "demo-rl", "--resume", str(cut), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["skipped"] == ["bc"] and again["stages"] == full["stages"]
    a, b = weights(stage_dir(whole, "rl")), weights(stage_dir(cut, "rl"))
    assert all(torch.equal(a[k], b[k]) for k in a)
