"""Run directories: atomic checkpoints, exact resume after kill -9 / a crash mid-checkpoint / SIGTERM, clear errors.

The end-to-end tests train a tiny GPT-2 (built from a config, saved to a tmp folder) with ``tilt train kl-rl`` in
subprocesses, kill them in the ways a real run dies, resume, and compare every metric of every step with an
uninterrupted run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tilt.runs import directory as runs
from tilt.cli.train import EXIT_FAILED, EXIT_SIGNAL, main

REWARD_PY = '''
import os, time

def vowels(prompts, completions):
    delay = os.environ.get("SLOW_REWARD")
    if delay:
        time.sleep(float(delay))
    return [float(sum(ch in "aeiou" for ch in c)) for c in completions]

def broken(prompts, completions):
    raise RuntimeError("the reward exploded")

def nan(prompts, completions):
    return [float("nan") for c in completions]

CALLS = [0]

def breaks_later(prompts, completions):
    CALLS[0] += 1
    if CALLS[0] > 4:
        raise RuntimeError("the reward broke at call %d" % CALLS[0])
    return [1.0 for c in completions]
'''

STEPS = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model folder, a prompts file, a reward file and a config file."""
    from tilt.engine.tiny import char_tokenizer, tiny_gpt2

    root = tmp_path_factory.mktemp("world")
    tok = char_tokenizer()
    tiny_gpt2(len(tok), n_layer=1, n_embd=16, seed=3).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    prompts = ["the cat", "once upon", "my food is", "today we", "a story"]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (root / "reward.py").write_text(REWARD_PY)
    config = {
        "model": str(root / "model"), "reward": f"{root / 'reward.py'}:vowels", "prompts": str(root / "prompts.jsonl"),
        "beta": 0.1, "steps": STEPS, "prompts_per_step": 2, "samples_per_prompt": 2, "lr": 0.01, "seed": 5,
        "sampling": {"max_new_tokens": 6}, "checkpoint_every": 3, "keep_checkpoints": 2, "sample_every": 4,
        "sample_prompts": 2,
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def train(world, *extra: str) -> int:
    return main(["train", "kl-rl", "--config", str(world / "config.yaml"), *extra])


@pytest.fixture(scope="module")
def uninterrupted(world):
    run = world / "runs" / "uninterrupted"
    assert train(world, "--run-dir", str(run)) == 0
    return run


# --- the format --------------------------------------------------------------------------------------------------
def test_run_directory_holds_config_metrics_samples_checkpoints_and_final(world, uninterrupted):
    from transformers import AutoModelForCausalLM

    saved = yaml.safe_load((uninterrupted / "config.yaml").read_text())
    assert saved["recipe"] == "kl-rl" and saved["beta"] == 0.1 and saved["ref"] == saved["model"]
    assert saved["sampling"]["max_new_tokens"] == 6 and saved["optimizer"] == "adamw"  # defaults are resolved too
    metrics = runs.read_jsonl(uninterrupted / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert all({"reward", "kl_ref", "loss"} <= set(m) for m in metrics)
    samples = runs.read_jsonl(uninterrupted / "samples.jsonl")
    assert sorted({s["step"] for s in samples}) == [0, 4, 8, 12, 16]
    assert all(s["reward"] == sum(ch in "aeiou" for ch in s["completion"]) for s in samples)
    ckpts = runs.list_checkpoints(uninterrupted)
    assert [s for s, _ in ckpts] == [15, 16]  # keep_checkpoints = 2; the last step is always saved
    assert (uninterrupted / "checkpoints" / "latest").read_text().strip() == "step-00000016"
    final = AutoModelForCausalLM.from_pretrained(uninterrupted / "final", use_safetensors=True)
    last = AutoModelForCausalLM.from_pretrained(ckpts[-1][1], use_safetensors=True)
    start = AutoModelForCausalLM.from_pretrained(world / "model", use_safetensors=True)
    for (name, a), b, c in zip(final.state_dict().items(), last.state_dict().values(), start.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(final.state_dict().values(), start.state_dict().values()))
    suffixes = {p.suffix for p in uninterrupted.rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".jsonl", ".yaml", ".safetensors", ""}, suffixes  # nothing pickled


def test_optimizer_state_round_trips_exactly_without_pickle(tmp_path):
    from tilt.engine.tiny import char_tokenizer, tiny_gpt2

    tok = char_tokenizer()
    model = tiny_gpt2(len(tok), n_layer=1, n_embd=8)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    ids = torch.tensor([[3, 4, 5, 6]])

    def step(m, o):
        o.zero_grad()
        m(input_ids=ids, labels=ids).loss.backward()
        o.step()

    for _ in range(3):
        step(model, opt)
    for s in (3, 4, 5):
        folder = runs.save_checkpoint(tmp_path, s, model, tok, opt, keep=2)
    assert [s for s, _ in runs.list_checkpoints(tmp_path)] == [4, 5] and folder.name == "step-00000005"
    state, tensors = runs.load_trainer_state(folder)
    assert state["step"] == 5 and state["data_position"] == {"step": 5}
    twin = tiny_gpt2(len(tok), n_layer=1, n_embd=8, seed=99)
    twin.load_state_dict(model.state_dict())
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=0.5)  # wrong lr on purpose: the checkpoint's must win
    runs.restore_optimizer(twin_opt, state, tensors)
    assert twin_opt.param_groups[0]["lr"] == 0.01 and twin_opt.param_groups[0]["betas"] == (0.9, 0.999)
    for _ in range(2):
        step(model, opt)
        step(twin, twin_opt)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_a_half_written_checkpoint_is_never_listed_and_is_cleaned_up(tmp_path):
    from tilt.engine.tiny import char_tokenizer, tiny_gpt2

    tok = char_tokenizer()
    model = tiny_gpt2(len(tok), n_layer=1, n_embd=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    runs.save_checkpoint(tmp_path, 2, model, tok, opt)
    half = tmp_path / "checkpoints" / ".tmp-step-00000004-123"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    assert runs.latest_checkpoint(tmp_path).name == "step-00000002"
    runs.save_checkpoint(tmp_path, 4, model, tok, opt)
    assert not half.exists() and runs.latest_checkpoint(tmp_path).name == "step-00000004"


def test_resume_drops_rows_after_the_checkpoint_and_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "reward": s / 3}) + "\n" for s in range(1, 6)) + '{"step": 6, "rew')
    assert [r["step"] for r in runs.read_jsonl(path)] == [1, 2, 3, 4, 5]
    runs.truncate_jsonl(path, max_step=3)
    assert runs.read_jsonl(path) == [{"step": s, "reward": s / 3} for s in (1, 2, 3)]


# --- bad input: a clear error and no run directory ----------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
    (["--prompts", "/nonexistent/prompts.jsonl"], "data file not found"),
    (["--reward", "REWARD:broken"], "the reward exploded"),
    (["--reward", "REWARD:nan"], "not finite"),
    (["--reward", "REWARD:missing"], "has no attribute 'missing'"),
    (["--steps", "many"], "steps must be an int"),
    (["--tracker", "neptune"], "tracker must be one of none, tensorboard, wandb, mlflow"),
    (["--tracker", "tensorboard"], "needs the tensorboard package"),
])
def test_bad_input_gives_a_clear_error_and_no_run_directory(world, tmp_path, capsys, override, message):
    import importlib.util

    if "tensorboard" in override and importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    override = [o.replace("REWARD", str(world / "reward.py")) for o in override]
    run = tmp_path / "runs" / "bad"
    assert train(world, "--run-dir", str(run), *override) == 2
    assert message in capsys.readouterr().err
    assert not run.exists() and not (run.parent.exists() and any(run.parent.iterdir()))


def test_an_existing_run_directory_is_never_overwritten(world, uninterrupted, capsys):
    before = (uninterrupted / "metrics.jsonl").read_text()
    assert train(world, "--run-dir", str(uninterrupted)) == 2
    assert "--resume" in capsys.readouterr().err and (uninterrupted / "metrics.jsonl").read_text() == before


def test_the_config_resolves_file_then_overrides_then_defaults():
    from tilt.cli.train import resolve

    file = {"model": "m", "reward": ["2*length:chars", "regex:a"], "prompts": "p.jsonl", "beta": 1, "steps": 7,
            "sampling": {"max_new_tokens": 9}}
    config = resolve("kl-rl", file, {"beta": "0.25", "top_k": "5", "max_prompt_tokens": "none"})
    assert config["beta"] == 0.25 and config["steps"] == 7 and config["ref"] == "m"  # override; file; ref = model
    assert config["reward"] == ["2*length:chars", "regex:a"] and config["samples_per_prompt"] == 4  # default
    assert config["sampling"] == {"max_new_tokens": 9, "temperature": 1.0, "top_k": 5, "top_p": 1.0}
    assert config["data"]["max_prompt_tokens"] is None and config["recipe"] == "kl-rl"
    assert resolve("kl-rl", config, {}) == config  # a saved config resolves to itself (what --resume reads)
    for bad, message in [({"beta": "high"}, "beta must be a float"), ({"steps": 2.5}, "steps must be an int"),
                         ({"samples_per_prompt": 1}, "samples_per_prompt must be >= 2"), ({"recipe": "dpo"}, "for recipe 'dpo'"),
                         ({"sampling": {"top_p": 2}}, "top_p"), ({"reward": []}, "reward must be")]:
        with pytest.raises(ValueError, match=message):
            resolve("kl-rl", {**file, **bad}, {})


def test_unknown_config_key_is_named_with_the_valid_ones(world, tmp_path, capsys):
    config = yaml.safe_load((world / "config.yaml").read_text())
    config["betta"] = 0.2
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    assert main(["train", "kl-rl", "--config", str(tmp_path / "c.yaml"), "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'betta'" in err and "beta" in err and "samples_per_prompt" in err
    assert not run.exists()
    config.pop("betta")
    config["sampling"]["temprature"] = 0.5
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "kl-rl", "--config", str(tmp_path / "c.yaml"), "--run-dir", str(run)]) == 2
    assert "sampling.temprature" in capsys.readouterr().err and not run.exists()


def test_a_reward_that_breaks_during_training_marks_the_run_failed_and_keeps_its_checkpoints(world, tmp_path, capsys):
    run = tmp_path / "run"
    rc = train(world, "--run-dir", str(run), "--reward", f"{world / 'reward.py'}:breaks_later", "--checkpoint-every", "1")
    assert rc == EXIT_FAILED
    err = capsys.readouterr().err
    assert "the reward broke at call 5" in err and "--resume" in err
    assert "the reward broke" in (run / runs.FAILED).read_text()
    # call 1 = the step-0 samples, calls 2-4 = steps 1-3, call 5 = step 4
    assert [m["step"] for m in runs.read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
    assert runs.latest_checkpoint(run).name == "step-00000003"


def test_resume_refuses_to_change_the_recipe(world, uninterrupted, capsys):
    assert main(["train", "kl-rl", "--resume", str(uninterrupted), "--beta", "0.5"]) == 2
    assert "cannot change beta" in capsys.readouterr().err


# --- runs that survive: kill -9, a crash mid-checkpoint, SIGTERM, then resume -------------------------------------
def _start(world, tmp_path, name, args, **env):
    out, err = (open(tmp_path / f"{name}.{s}", "w") for s in ("out", "err"))
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **env}
    cmd = [sys.executable, "-m", "tilt.cli.train", "train", "kl-rl", *args]
    return subprocess.Popen(cmd, stdout=out, stderr=err, env=full_env, cwd=str(Path(__file__).parents[1]))


def _wait_for(predicate, proc, timeout=90.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before the test could interrupt it"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.01)


def _steps(run):
    return [m["step"] for m in runs.read_jsonl(run / "metrics.jsonl")]


@pytest.mark.slow
def test_kill_9_crash_mid_checkpoint_and_sigterm_then_resume_equal_an_uninterrupted_run(world, uninterrupted, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    resume = ["--resume", str(run)]

    # 1. kill -9 in the middle of training
    proc = _start(world, tmp_path, "a", ["--config", str(world / "config.yaml"), "--run-dir", str(run)], SLOW_REWARD="0.05")
    _wait_for(lambda: len(_steps(run)) >= 4 if run.exists() else False, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert 4 <= len(_steps(run)) < 12

    # 2. resume, and die by SIGKILL halfway through writing the checkpoint of step 12
    proc = _start(world, tmp_path, "b", resume, **{runs.CRASH_ENV: "12"})
    assert proc.wait(timeout=90) == -signal.SIGKILL
    ckpt_dir = run / "checkpoints"
    assert not (ckpt_dir / "step-00000012").exists() and list(ckpt_dir.glob(".tmp-step-00000012-*"))
    assert (ckpt_dir / "latest").read_text().strip() == "step-00000009"
    AutoModelForCausalLM.from_pretrained(ckpt_dir / "step-00000009", use_safetensors=True)  # intact, loadable

    # 3. resume, then SIGTERM: the step finishes, a checkpoint is saved, the process exits cleanly
    proc = _start(world, tmp_path, "c", resume, SLOW_REWARD="0.05")
    _wait_for(lambda: "resuming from" in (tmp_path / "c.out").read_text() and len(_steps(run)) >= 11, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == EXIT_SIGNAL[signal.SIGTERM]
    stopped_at = _steps(run)[-1]
    assert stopped_at < STEPS and runs.latest_checkpoint(run).name == runs.checkpoint_name(stopped_at)
    assert f"--resume {run}" in (tmp_path / "c.err").read_text()

    # 4. resume to the end
    proc = _start(world, tmp_path, "d", resume)
    assert proc.wait(timeout=90) == 0, (tmp_path / "d.err").read_text()[-2000:]
    for name in ("metrics.jsonl", "samples.jsonl"):  # every value of every step, as text (NaN == NaN too)
        assert (run / name).read_text() == (uninterrupted / name).read_text(), name
    a = AutoModelForCausalLM.from_pretrained(run / "final", use_safetensors=True).state_dict()
    b = AutoModelForCausalLM.from_pretrained(uninterrupted / "final", use_safetensors=True).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (run / runs.FAILED).exists()


def test_a_run_that_failed_before_its_first_checkpoint_resumes_from_the_start(world, tmp_path):
    run = tmp_path / "run"
    assert train(world, "--run-dir", str(run), "--reward", f"{world / 'reward.py'}:breaks_later", "--checkpoint-every", "0") == EXIT_FAILED
    before = (run / "metrics.jsonl").read_text()
    assert runs.latest_checkpoint(run) is None and [m["step"] for m in runs.read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
    # the reward's call counter restarts with the process; on resume there are no step-0 samples, so it breaks at step 5
    assert main(["train", "kl-rl", "--resume", str(run)]) == EXIT_FAILED
    after = (run / "metrics.jsonl").read_text()
    assert after.startswith(before) and [m["step"] for m in runs.read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4]
