"""The run loop shared by every tilt train command (tilt.runs.loop, tilt.runs.commands): SIGTERM during a step
finishes it, saves a checkpoint, prints the exact resume command and exits 143; the resume reproduces the
uninterrupted run; changes a resume may make are written back to RUN/config.yaml; --json prints one object."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import yaml

from tilt.cli import main
from tilt.runs import directory as runs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tilt.engine.tiny import char_tokenizer, tiny_gpt2

    root = tmp_path_factory.mktemp("loop")
    tok = char_tokenizer()
    tiny_gpt2(len(tok), n_layer=1, n_embd=16, seed=3).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["ab", "cd", "ef", "gh"]))
    rows = [{"prompt": p, "chosen": " aei", "rejected": " bcd"} for p in ["ab", "cd", "ef", "gh", "ij", "kl"]]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = {"model": "model", "checkpoint_every": 2}  # relative: resolved against this folder
    configs = {
        "kl-rl": {"run": {**common, "prompts": "prompts.jsonl", "reward": "regex:[aeiou]", "sample_every": 2},
                  "kl_rl": {"steps": 4, "prompts_per_step": 2, "samples_per_prompt": 2, "lr": "1e-2", "seed": 1},
                  "sampling": {"max_new_tokens": 4}},
        "dpo": {"run": {**common, "preferences": "pairs.jsonl"}, "dpo": {"epochs": 2, "pairs_per_step": 3, "lr": "1e-2"}},
        "apo": {"run": {**common, "prompts": "prompts.jsonl", "reward": "regex:[aeiou]", "sample_every": 2},
                "apo": {"steps": 4, "prompts_per_step": 2, "samples_per_prompt": 2, "value_samples": 4, "beta": 0.5,
                        "value_beta": 0.5, "lr": "1e-2", "seed": 1},
                "sampling": {"max_new_tokens": 4}},
        "online-dpo": {"run": {**common, "prompts": "prompts.jsonl", "reward": "regex:[aeiou]", "sample_every": 2},
                       "online_dpo": {"steps": 4, "prompts_per_step": 2, "lr": "1e-2", "seed": 1},
                       "sampling": {"max_new_tokens": 4}, "eval": {"eval_samples_per_prompt": 2}},
        "xpo": {"run": {**common, "prompts": "prompts.jsonl", "reward": "regex:[aeiou]", "sample_every": 2},
                "xpo": {"steps": 4, "prompts_per_step": 2, "lr": "1e-2", "alpha": 0.01, "seed": 1},
                "sampling": {"max_new_tokens": 4}, "eval": {"eval_samples_per_prompt": 2}},
        "reward-model": {"run": {**common, "preferences": "pairs.jsonl"},
                         "reward_model": {"epochs": 2, "pairs_per_step": 2, "lr": "1e-2"}, "eval": {"held_out": 0.2}},
    }
    for command, config in configs.items():
        (root / f"{command}.yaml").write_text(yaml.safe_dump(config))
    return root


RECIPE_MODULES = {"kl-rl": "tilt.recipes.kl_rl", "dpo": "tilt.recipes.dpo", "reward-model": "tilt.recipes.reward_model",
                  "apo": "tilt.recipes.apo", "online-dpo": "tilt.recipes.online_dpo", "xpo": "tilt.recipes.online_dpo"}


def sigterm_at(monkeypatch, command: str, at_step: int) -> None:
    """Send SIGTERM to this process while the recipe's step ``at_step`` (1-based) is being reported."""
    import importlib

    module = importlib.import_module(RECIPE_MODULES[command])
    train = module.train

    def interrupted(*args, on_step=None, **kwargs):
        def hooked(step, metrics):
            if step + 1 == at_step:
                os.kill(os.getpid(), signal.SIGTERM)
            on_step(step, metrics)
        return train(*args, on_step=hooked, **kwargs)

    monkeypatch.setattr(module, "train", interrupted)


WALL_CLOCK = ("step_time",)
"""Metrics that measure time (DPO's step_time): the only ones two runs of the same steps may differ in."""


def metric_rows(run) -> list[dict]:
    """RUN/metrics.jsonl without the wall-clock metrics; every other value exactly as written."""
    return [{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in runs.read_jsonl(run / "metrics.jsonl")]


def weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("command", ["kl-rl", "dpo", "reward-model", "apo", "online-dpo", "xpo"])
def test_sigterm_checkpoints_exits_143_and_the_resume_reproduces_the_uninterrupted_run(world, tmp_path, monkeypatch, capsys, command):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    config = str(world / f"{command}.yaml")
    assert main(["train", command, "--config", config, "--run-dir", str(whole), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["run_dir"] == str(whole)
    with monkeypatch.context() as patch:
        sigterm_at(patch, command, 3)
        assert main(["train", command, "--config", config, "--run-dir", str(cut)]) == 143
    err = capsys.readouterr().err
    assert f"checkpoint saved in {cut / runs.CHECKPOINTS / runs.checkpoint_name(3)}" in err
    assert f"# continue with: tilt train {command} --resume {cut}\n" in err
    assert not (cut / "final").exists() and [r["step"] for r in runs.read_jsonl(cut / "metrics.jsonl")] == [1, 2, 3]
    assert main(["train", command, "--resume", str(cut), "--json"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert metric_rows(cut) == metric_rows(whole)
    assert (cut / "samples.jsonl").read_text() == (whole / "samples.jsonl").read_text()
    drop = ("run_dir", "final", "use_as_reward")
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in summary.items() if k not in drop}
    a, b = weights(whole / "final"), weights(cut / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_may_change_steps_which_are_written_back_and_repeated_in_the_hint(world, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    config = str(world / "kl-rl.yaml")
    assert main(["train", "kl-rl", "--config", config, "--run-dir", str(run), "--steps", "2"]) == 0
    assert main(["train", "kl-rl", "--resume", str(run), "--beta", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "cannot change kl_rl.beta" in err and "--accept-changes kl_rl.beta" in err
    with monkeypatch.context() as patch:
        sigterm_at(patch, "kl-rl", 3)
        assert main(["train", "kl-rl", "--resume", str(run), "--steps", "5"]) == 143
    assert "--resume " + str(run) + " --kl_rl.steps 5" in capsys.readouterr().err
    assert yaml.safe_load((run / "config.yaml").read_text())["kl_rl"]["steps"] == 5  # written back
    assert main(["train", "kl-rl", "--resume", str(run)]) == 0  # the plain resume continues to step 5
    assert [r["step"] for r in runs.read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert main(["train", "kl-rl", "--resume", str(run), "--beta", "0.5", "--accept-changes", "beta"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["kl_rl"]["beta"] == 0.5


def test_an_error_during_training_marks_the_run_failed(world, tmp_path, monkeypatch, capsys):
    import tilt.recipes.dpo as dpo

    train = dpo.train

    def broken(*args, on_step=None, **kwargs):
        def hooked(step, metrics):
            on_step(step, metrics)
            if step + 1 == 2:
                raise RuntimeError("the disk went away")
        return train(*args, on_step=hooked, **kwargs)

    monkeypatch.setattr(dpo, "train", broken)
    run = tmp_path / "run"
    assert main(["train", "dpo", "--config", str(world / "dpo.yaml"), "--run-dir", str(run)]) == 1
    err = capsys.readouterr().err
    assert "RuntimeError: the disk went away" in err and f"tilt train dpo --resume {run}" in err
    assert "the disk went away" in (run / runs.FAILED).read_text() and runs.latest_checkpoint(run).name == runs.checkpoint_name(2)


def test_lora_and_the_run_section_from_flags_train_on_cpu(world, tmp_path, capsys):
    """The device-agnostic path on CPU: device/dtype from flags, a LoRA adapter, the reference = adapter disabled;
    RUN/final is a merged ordinary model that differs from the base."""
    run = tmp_path / "run"
    assert main(["train", "kl-rl", "--config", str(world / "kl-rl.yaml"), "--run-dir", str(run), "--steps", "2",
                 "--device", "cpu", "--dtype", "auto", "--lora.r", "4", "--lora.alpha", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["lora"]["r"] == 4 and saved["run"]["device"] == "cpu" and saved["run"]["ref"] == ""
    final, base = weights(run / "final"), weights(world / "model")
    assert not any("lora" in k for k in final) and final.keys() == base.keys()
    assert any(not torch.equal(final[k], base[k]) for k in base) and out["steps"] == 2
    # step 1 samples the initial policy: the adapter starts at zero, so the adapter-disabled reference is the same model
    assert runs.read_jsonl(run / "metrics.jsonl")[0]["kl_ref"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_a_second_writer_is_refused_and_changed_inputs_need_accepting(world, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "dpo", "--config", str(world / "dpo.yaml"), "--run-dir", str(run), "--epochs", "1"]) == 0
    assert (run / runs.FINGERPRINT).is_file()
    with runs.lock_run(run):  # another writer holds the run
        assert main(["train", "dpo", "--resume", str(run)]) == 2
        assert f"process {os.getpid()}" in capsys.readouterr().err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["dpo"]["beta"] = 0.7  # edited between stop and resume
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert main(["train", "dpo", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "config.dpo.beta" in err and "--accept-changes" in err
    assert main(["train", "dpo", "--resume", str(run), "--accept-changes", "beta", "--json"]) == 0
    assert runs.read_fingerprint(run)["inputs"]["config"]["values"]["dpo.beta"] == 0.7  # accepted: the run's input now


@pytest.mark.slow
def test_tilt_eval_reads_the_run_model_reference_reward_prompts_and_sampling(world, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "kl-rl", "--config", str(world / "kl-rl.yaml"), "--run-dir", str(run), "--steps", "2",
                 "--max_new_tokens", "3"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--samples", "2", "--resamples", "20", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == str(run / "final") and report["ref"] == str(world / "model")
    assert report["reward"] == "regex:[aeiou]" and report["max_new_tokens"] == 3 and report["prompts"] == 4
    assert main(["eval", str(run), "--samples", "2", "--resamples", "20", "--reward", "regex:b", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["reward"] == "regex:b"  # a flag overrides the run's setting
    assert main(["eval", str(tmp_path), "--json"]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_an_adaptive_beta_run_stopped_and_resumed_equals_the_uninterrupted_one_betas_included(world, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    flags = ["--config", str(world / "kl-rl.yaml"), "--kl_target", "0.01", "--beta", "0.5", "--kl_horizon", "4"]
    assert main(["train", "kl-rl", *flags, "--run-dir", str(whole)]) == 0
    betas = [r["beta"] for r in runs.read_jsonl(whole / "metrics.jsonl")]
    assert betas[0] == 0.5 and len(set(betas)) == len(betas)  # the controller moved beta every step
    with monkeypatch.context() as patch:
        sigterm_at(patch, "kl-rl", 2)
        assert main(["train", "kl-rl", *flags, "--run-dir", str(cut)]) == 143
    saved = load_file(str(cut / runs.CHECKPOINTS / runs.checkpoint_name(2) / runs.STATE_TENSORS))
    assert saved["kl_control.beta"].item() == betas[2]  # the checkpoint holds the beta of the next step
    assert main(["train", "kl-rl", "--resume", str(cut)]) == 0
    capsys.readouterr()
    assert (cut / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()
    a, b = weights(whole / "final"), weights(cut / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_kl_budget_stops_the_run_and_final_holds_the_last_policy_measured_within_it(world, tmp_path, capsys):
    free, capped = tmp_path / "free", tmp_path / "capped"
    config = ["--config", str(world / "kl-rl.yaml"), "--steps", "6", "--keep_checkpoints", "0"]
    assert main(["train", "kl-rl", *config, "--checkpoint_every", "1", "--run-dir", str(free)]) == 0
    kl = [r["kl_ref"] for r in runs.read_jsonl(free / "metrics.jsonl")]
    # the first step (0-based s >= 2) whose KL estimate is above every earlier one: a budget at that earlier maximum
    # stops the run there, and the last policy measured within it is the one step s - 1 sampled (s - 1 updates)
    s = next(i for i in range(2, len(kl)) if kl[i] > max(kl[:i]))
    budget = max(kl[:s])
    capsys.readouterr()
    assert main(["train", "kl-rl", *config, "--kl_budget", repr(budget), "--run-dir", str(capped), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = runs.read_jsonl(capped / "metrics.jsonl")
    assert [r["kl_budget_exceeded"] for r in rows] == [0.0] * s + [1.0]  # stopped at the step that exceeded it
    assert "last policy measured within the budget" in summary["kl_budget"] and f"the one of step {s - 1} (" in summary["kl_budget"]
    kept, final = weights(free / runs.CHECKPOINTS / runs.checkpoint_name(s - 1)), weights(capped / "final")
    assert kept.keys() == final.keys() and all(torch.equal(kept[k], final[k]) for k in kept)
    newest = weights(capped / runs.CHECKPOINTS / runs.checkpoint_name(s + 1))
    assert any(not torch.equal(newest[k], final[k]) for k in final)  # not the newest policy
