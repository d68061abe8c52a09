"""Run directories: atomic checkpoints, exact resume after kill -9 / a crash mid-checkpoint / SIGTERM, clear errors.

The end-to-end tests train a tiny GPT-2 (built from a config, saved to a tmp folder) with ``tilt train kl-rl`` in
subprocesses, kill them in the ways a real run dies, resume, and compare every metric of every step with an
uninterrupted run.
"""
from __future__ import annotations

import errno
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
    assert saved["recipe"] == "kl-rl" and saved["kl_rl"]["beta"] == 0.1 and saved["run"]["ref"] == saved["run"]["model"]
    assert saved["sampling"]["max_new_tokens"] == 6 and saved["kl_rl"]["optimizer"] == "adamw"  # defaults are resolved too
    metrics = runs.read_jsonl(uninterrupted / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert all({"reward", "kl_ref", "loss"} <= set(m) for m in metrics)
    samples = runs.read_jsonl(uninterrupted / "samples.jsonl")
    assert sorted({s["step"] for s in samples}) == [0, 4, 8, 12, 16]
    assert all(s["reward"] == sum(ch in "aeiou" for ch in s["completion"]) for s in samples)
    ckpts = runs.list_checkpoints(uninterrupted)
    assert [s for s, _ in ckpts] == [15, 16]  # keep_checkpoints = 2; the last step is always saved
    assert not (uninterrupted / "checkpoints" / "latest").exists()  # the newest intact step-N folder is the truth
    for _, folder in ckpts:
        runs.verify_checkpoint(folder)  # every checkpoint carries the checksums of its files
    runs.verify_checkpoint(uninterrupted / "final")
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
    half = tmp_path / "checkpoints" / f".tmp-step-00000004-{_dead_pid()}"
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


def _dead_pid() -> int:
    """The pid of a process that has just ended (a stand-in for a writer that crashed)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


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
    from tilt.runs.config import ConfigError, build, parse_flags, resolve

    file = {"model": "m", "reward": ["2*length:chars", "regex:a"], "prompts": "p.jsonl", "beta": 1, "steps": 7,
            "sampling": {"max_new_tokens": 9}}
    flags = parse_flags("kl-rl", ["--beta", "0.25", "--top_k", "5", "--max_prompt_tokens", "none"])
    config = resolve("kl-rl", file, flags)
    assert config["kl_rl"]["beta"] == 0.25 and config["kl_rl"]["steps"] == 7 and config["run"]["ref"] == "m"  # override; file; ref = model
    assert config["run"]["reward"] == ["2*length:chars", "regex:a"] and config["kl_rl"]["samples_per_prompt"] == 4  # default
    assert {k: config["sampling"][k] for k in ("max_new_tokens", "temperature", "top_k", "top_p")} == \
        {"max_new_tokens": 9, "temperature": 1.0, "top_k": 5, "top_p": 1.0}
    assert config["data"]["max_prompt_tokens"] is None and config["recipe"] == "kl-rl"
    assert resolve("kl-rl", config, {}) == config  # a saved config resolves to itself (what --resume reads)
    for bad, message in [({"beta": "high"}, "kl_rl.beta must be a float"), ({"steps": 2.5}, "kl_rl.steps must be an int"),
                         ({"recipe": "dpo"}, "the config is for 'dpo', not tilt train kl-rl")]:
        with pytest.raises(ConfigError, match=message):
            resolve("kl-rl", {**file, **bad}, {})
    for bad, message in [({"samples_per_prompt": 1}, "samples_per_prompt must be >= 2"), ({"sampling": {"top_p": 2}}, "top_p")]:
        with pytest.raises(ConfigError, match=message):  # each section's own checks run when it is built
            build(resolve("kl-rl", {**file, **bad}, {}))
    with pytest.raises(ConfigError, match="tilt train kl-rl needs run.reward"):  # a reward-less run is refused by the command
        build(resolve("kl-rl", {**file, "reward": []}, {}))["run"].require("kl-rl", ("model", "reward", "prompts"))


def test_unknown_config_key_is_named_with_the_valid_ones(world, tmp_path, capsys):
    config = yaml.safe_load((world / "config.yaml").read_text())
    config["betta"] = 0.2
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    assert main(["train", "kl-rl", "--config", str(tmp_path / "c.yaml"), "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'betta'; did you mean 'beta'?" in err and "(sections: run, kl_rl, sampling," in err
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
    assert "cannot change kl_rl.beta" in capsys.readouterr().err


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
    assert runs.latest_checkpoint(run).name == "step-00000009"
    AutoModelForCausalLM.from_pretrained(ckpt_dir / "step-00000009", use_safetensors=True)  # intact, loadable

    # 3. resume, then SIGTERM: the step finishes, a checkpoint is saved, the process exits cleanly
    proc = _start(world, tmp_path, "c", resume, SLOW_REWARD="0.05")
    _wait_for(lambda: "resuming from" in (tmp_path / "c.err").read_text() and len(_steps(run)) >= 11, proc)
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


# --- one writer at a time ------------------------------------------------------------------------------------------
HOLD_LOCK = """
import sys, time
from tilt.runs import directory as runs
with runs.lock_run(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""

TRY_LOCK = """
import sys
from tilt.runs import directory as runs
sys.stdin.readline()  # go
try:
    with runs.lock_run(sys.argv[1]):
        print("acquired", flush=True)
except runs.RunLockedError as exc:
    print(exc, flush=True)
    sys.exit(3)
"""


def _python(code: str, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, **kw)


@pytest.mark.slow
def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_does_not_block(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder, second = _python(HOLD_LOCK, str(run)), _python(TRY_LOCK, str(run))  # both start (import) at once
    try:
        assert holder.stdout.readline().strip() == "locked"
        out, _ = second.communicate("go\n", timeout=60)
        assert second.returncode == 3, out
        assert f"in use by process {holder.pid}" in out and f"kill -TERM {holder.pid}" in out and "--resume" in out
        with pytest.raises(runs.RunLockedError, match=f"process {holder.pid}"):  # this process is refused as well
            with runs.lock_run(run):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder; the system releases its flock
        holder.wait(timeout=30)
    with runs.lock_run(run):  # the killed holder's lock is gone, though RUN/.lock is still there
        assert json.loads((run / runs.LOCK).read_text())["pid"] == os.getpid()


def test_taking_the_lock_removes_temporaries_of_dead_writers_only(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    dead, alive = _dead_pid(), os.getppid()
    stray = [run / "checkpoints" / f".tmp-step-00000007-{dead}", run / f".final.tmp-{dead}"]
    for folder in stray:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    (run / f".FAILED.tmp-{dead}").write_text("half")
    busy = run / "checkpoints" / f".tmp-step-00000008-{alive}"  # a live process's write in progress
    busy.mkdir()
    with runs.lock_run(run):
        assert not any(p.exists() for p in stray) and not (run / f".FAILED.tmp-{dead}").exists()
        assert busy.exists()


# --- the inputs of a run ---------------------------------------------------------------------------------------------
def _inputs(root: Path) -> dict:
    """What ``fingerprint_inputs`` is given for the run made of the files under ``root``."""
    return dict(data={"prompts": root / "prompts.jsonl"}, models={"model": root / "model"},
                rewards={"reward": [f"{root / 'reward.py'}:vowels", "0.5*length:chars", "tilt_test_reward_mod:score"]})


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    from tilt.engine.tiny import char_tokenizer, tiny_gpt2

    tok = char_tokenizer()
    tiny_gpt2(len(tok), n_layer=1, n_embd=8, seed=1).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    (tmp_path / "reward.py").write_text(REWARD_PY)
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "tilt_test_reward_mod.py").write_text("def score(p, c):\n    return [1.0 for _ in c]\n")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    config = {"beta": 0.1, "steps": 8, "sampling": {"top_k": 0}}
    return tmp_path, config, runs.fingerprint_inputs(config, **_inputs(tmp_path))


def test_unchanged_inputs_pass_and_the_fingerprint_round_trips_through_the_run(inputs):
    root, config, saved = inputs
    run = runs.create_run(root / "run", config, fingerprint=saved)
    assert runs.read_fingerprint(run) == saved
    runs.check_fingerprint(runs.read_fingerprint(run), runs.fingerprint_inputs(config, **_inputs(root)), accept=())
    files = saved["inputs"]["reward"]["files"]
    assert sorted(Path(f).name for f in files) == ["reward.py", "tilt_test_reward_mod.py"]  # built-ins have no file


@pytest.mark.parametrize("change, names", [
    ("data", ["prompts"]),
    ("beta", ["config.beta"]),
    ("nested", ["config.sampling.top_k"]),
    ("reward_file", ["reward"]),
    ("reward_module", ["reward"]),
    ("weights", ["model"]),
    ("model_config", ["model"]),
    ("everything", ["config.beta", "model", "prompts", "reward"]),
])
def test_a_changed_input_is_refused_by_name_and_accepted_when_named(inputs, change, names):
    from tilt.engine.tiny import tiny_gpt2

    root, config, saved = inputs
    if change in ("data", "everything"):
        (root / "prompts.jsonl").write_text('{"prompt": "a"}\n{"prompt": "c"}\n')  # same size, other content
    if change in ("beta", "everything"):
        config = {**config, "beta": 0.5}
    if change == "nested":
        config = {**config, "sampling": {"top_k": 5}}
    if change in ("reward_file", "everything"):
        (root / "reward.py").write_text(REWARD_PY.replace('"aeiou"', '"aeiouy"'))
    if change == "reward_module":
        (root / "mods" / "tilt_test_reward_mod.py").write_text("def score(p, c):\n    return [2.0 for _ in c]\n")
    if change in ("weights", "everything"):
        vocab = json.loads((root / "model" / "config.json").read_text())["vocab_size"]
        tiny_gpt2(vocab, n_layer=1, n_embd=8, seed=2).save_pretrained(root / "model")  # same shapes, other values
    if change == "model_config":
        cfg = json.loads((root / "model" / "config.json").read_text())
        (root / "model" / "config.json").write_text(json.dumps({**cfg, "layer_norm_epsilon": 1e-3}))
    current = runs.fingerprint_inputs(config, **_inputs(root))
    with pytest.raises(ValueError) as info:
        runs.check_fingerprint(saved, current, accept=())
    message = str(info.value)
    assert f"--accept-changes {','.join(names)}" in message
    for name in names:
        assert f"  {name}: " in message
    if change == "beta":
        assert "config.beta: 0.1 -> 0.5" in message
    runs.check_fingerprint(saved, current, accept=names)  # accepted when every change is named
    if len(names) > 1:
        with pytest.raises(ValueError, match=f"--accept-changes {names[-1]}$"):  # naming some leaves the others refused
            runs.check_fingerprint(saved, current, accept=names[:-1])
    if names[0].startswith("config."):
        runs.check_fingerprint(saved, current, accept=["config"] + names[1:])  # "config" accepts every config key


def test_accepting_an_input_that_does_not_exist_is_an_error(inputs):
    root, config, saved = inputs
    with pytest.raises(ValueError, match="names no input: promts; the inputs are config, model, prompts, reward"):
        runs.check_fingerprint(saved, saved, accept=["promts"])


# --- checksummed checkpoints -----------------------------------------------------------------------------------------
def _two_checkpoints(run: Path):
    from tilt.engine.tiny import char_tokenizer, tiny_gpt2

    tok = char_tokenizer()
    model = tiny_gpt2(len(tok), n_layer=1, n_embd=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 5)))
    for step in (2, 4):
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        runs.save_checkpoint(run, step, model, tok, opt, keep=0)
    return model


def _zero_middle(path: Path, n: int = 64) -> None:
    """Zero n bytes in the middle of a file (inside the tensor data of a safetensors file), keeping its size."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(n)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, named", [
    ("truncate", "model.safetensors: "),
    ("zero", "model.safetensors: its SHA-256 differs"),
    ("state", "trainer_state.safetensors: its SHA-256 differs"),
    ("delete", "config.json: missing"),
    ("manifest", "checksums.json is missing"),
])
def test_a_corrupt_newest_checkpoint_is_named_and_the_previous_one_used(tmp_path, capsys, damage, named):
    run = tmp_path / "run"
    _two_checkpoints(run)
    newest = run / "checkpoints" / "step-00000004"
    if damage == "truncate":
        weights = newest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "zero":
        _zero_middle(newest / "model.safetensors")
    elif damage == "state":
        _zero_middle(newest / runs.STATE_TENSORS)
    elif damage == "delete":
        (newest / "config.json").unlink()
    else:
        (newest / runs.MANIFEST).unlink()
    checkpoint, step = runs.prepare_resume(run)
    assert checkpoint.name == "step-00000002" and step == 2
    err = capsys.readouterr().err
    assert "checkpoint step-00000004 is corrupt" in err and named in err and "falling back to step-00000002" in err
    assert [s for s, _ in runs.list_checkpoints(run)] == [2] and (run / "checkpoints" / "corrupt-step-00000004").is_dir()
    assert [r["step"] for r in runs.read_jsonl(run / "metrics.jsonl")] == [1, 2]
    state, _ = runs.load_trainer_state(checkpoint)
    assert state["step"] == 2


def test_zeroed_weights_load_silently_without_the_checksums(tmp_path):
    """Why checksums are needed: safetensors reads a weights file whose tensor bytes were zeroed without error."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    _two_checkpoints(run)
    weights = run / "checkpoints" / "step-00000004" / "model.safetensors"
    before = {k: v.clone() for k, v in load_file(str(weights)).items()}  # load_file may map the file
    _zero_middle(weights)
    after = load_file(str(weights))  # no error
    assert any(not torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(runs.CorruptCheckpointError, match="model.safetensors"):
        runs.verify_checkpoint(weights.parent)
    with pytest.raises(runs.CorruptCheckpointError, match="trainer_state"):
        _zero_middle(weights.parent / runs.STATE_TENSORS)
        runs.load_trainer_state(weights.parent)


def test_no_intact_checkpoint_restarts_from_step_zero(tmp_path, capsys):
    run = tmp_path / "run"
    _two_checkpoints(run)
    for step in (2, 4):
        _zero_middle(run / "checkpoints" / runs.checkpoint_name(step) / "model.safetensors")
    assert runs.prepare_resume(run) == (None, 0)
    err = capsys.readouterr().err
    assert "step-00000004 is corrupt" in err and "step-00000002 is corrupt" in err and "restarting from step 0" in err


# --- a full disk ---------------------------------------------------------------------------------------------------
def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "trainer_state.safetensors")


def test_a_full_disk_during_a_checkpoint_leaves_failed_and_no_temporary_folder(tmp_path, monkeypatch):
    import safetensors.torch

    run = tmp_path / "run"
    model = _two_checkpoints(run)
    monkeypatch.setattr(safetensors.torch, "save_file", _no_space)
    with pytest.raises(runs.CheckpointWriteError) as info:
        runs.save_checkpoint(run, 6, model, None, torch.optim.SGD(model.parameters(), lr=0.1), keep=0)
    exc = info.value
    assert exc.__cause__ is None and exc.__suppress_context__ and exc.errno == errno.ENOSPC  # one error, no chain
    assert "No space left on device" in str(exc) and "checkpoints up to step-00000004 are intact" in str(exc)
    assert f"{run / runs.FAILED} holds this message" in str(exc)
    assert "No space left on device" in (run / runs.FAILED).read_text()
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")] == []
    assert [s for s, _ in runs.list_checkpoints(run)] == [2, 4]


def test_a_full_disk_that_cannot_even_take_failed_says_so(tmp_path, monkeypatch):
    import safetensors.torch

    run = tmp_path / "run"
    model = _two_checkpoints(run)
    monkeypatch.setattr(safetensors.torch, "save_file", _no_space)
    real_open = open

    def no_space_for_new_files(file, mode="r", *args, **kwargs):  # every new file fails, as on a full disk
        if "w" in mode and str(file).startswith(str(run)):
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_space_for_new_files)
    with pytest.raises(runs.CheckpointWriteError, match=f"not even {run / runs.FAILED} could be written"):
        runs.save_checkpoint(run, 6, model, None, torch.optim.SGD(model.parameters(), lr=0.1), keep=0)
    monkeypatch.undo()
    assert not (run / runs.FAILED).exists() and sorted(p.name for p in run.iterdir()) == ["checkpoints", "metrics.jsonl"]


def test_a_full_disk_during_training_ends_in_one_message_and_failed(world, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = [0]

    def fails_on_the_second_checkpoint(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            _no_space()
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", fails_on_the_second_checkpoint)
    run = tmp_path / "run"
    assert train(world, "--run-dir", str(run), "--steps", "4", "--checkpoint-every", "2") == EXIT_FAILED
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("No space left on device") == 1 and "--resume" in err
    assert "No space left on device" in (run / runs.FAILED).read_text()
    assert not [p for p in run.rglob(".*") if p.name != runs.LOCK]
    assert [s for s, _ in runs.list_checkpoints(run)] == [2]


# --- resume restores the global RNGs that user code draws from --------------------------------------------------------
NOISY_REWARD_PY = '''
import os, random
import numpy as np
import torch

CALLS = [0]

def noisy(prompts, completions):
    """Vowels plus noise from all three global generators: the run's numbers depend on their states."""
    CALLS[0] += 1
    if CALLS[0] == int(os.environ.get("NOISY_REWARD_BREAK_AT_CALL", "0")):
        raise RuntimeError("stopped on purpose")
    return [sum(ch in "aeiou" for ch in c) + random.random() + float(np.random.rand()) + float(torch.rand(()))
            for c in completions]
'''


def _seed_globals(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.mark.slow
def test_resume_restores_the_global_rngs_a_reward_draws_from(world, tmp_path, monkeypatch):
    (tmp_path / "noisy.py").write_text(NOISY_REWARD_PY)
    args = ["--reward", f"{tmp_path / 'noisy.py'}:noisy", "--steps", "6", "--checkpoint-every", "3", "--sample-every", "0"]

    def stopped_then_resumed(name: str) -> Path:
        """Run until the reward raises at step 4 (call 1 = the step-0 samples, calls 2-4 = steps 1-3, after the
        checkpoint of step 3), then, with the global generators seeded anew, resume to the end."""
        run = tmp_path / name
        _seed_globals(0)
        monkeypatch.setenv("NOISY_REWARD_BREAK_AT_CALL", "5")
        assert train(world, "--run-dir", str(run), *args) == EXIT_FAILED
        assert runs.latest_checkpoint(run).name == "step-00000003"
        monkeypatch.delenv("NOISY_REWARD_BREAK_AT_CALL")
        _seed_globals(12345)  # a new process's generators start elsewhere
        assert main(["train", "kl-rl", "--resume", str(run)]) == 0
        return run

    _seed_globals(0)
    whole = tmp_path / "whole"
    assert train(world, "--run-dir", str(whole), *args) == 0
    resumed = stopped_then_resumed("resumed")
    for name in ("metrics.jsonl", "samples.jsonl"):
        assert (resumed / name).read_text() == (whole / name).read_text(), name

    # the test can fail: without restoring the generators, the resumed steps differ
    monkeypatch.setattr(runs, "restore_rng", lambda state, tensors: None)
    unrestored = stopped_then_resumed("unrestored")
    rows, expected = runs.read_jsonl(unrestored / "metrics.jsonl"), runs.read_jsonl(whole / "metrics.jsonl")
    assert rows[:3] == expected[:3] and rows[3]["reward"] != expected[3]["reward"]
