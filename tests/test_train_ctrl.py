"""CTRL from the command line: ``tilt train kl-rl`` with a ``calibration:`` section.

A tiny GPT-2 (built from a config, saved to a tmp folder) is trained in-process. The calibration is counted by
wrapping ``tilt.infalign.build_calibration``; the reward the recipe sees is caught by wrapping
``tilt.recipes.kl_rl.train`` and checked against the quantile computed here by hand.
"""
from __future__ import annotations

import json
import math
from statistics import NormalDist

import pytest
import yaml

from tilt import infalign
from tilt.runs import directory as runs
from tilt.cli import main
from tilt.recipes import kl_rl

PROMPTS = ["the cat", "once upon", "my food is", "today we", "the cat"]  # a repeat is calibrated once
DISTINCT = ["the cat", "once upon", "my food is", "today we"]
M = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tilt.engine.tiny import char_tokenizer, tiny_gpt2

    root = tmp_path_factory.mktemp("ctrl")
    tok = char_tokenizer()
    tiny_gpt2(len(tok), n_layer=1, n_embd=16, seed=3).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return root


def write_config(world, name: str, calibration: dict | None, **top) -> str:
    config = {
        "model": str(world / "model"), "reward": "regex:[aeiou]", "prompts": str(world / "prompts.jsonl"),
        "beta": 0.1, "steps": 4, "prompts_per_step": 2, "samples_per_prompt": 2, "lr": 0.01, "seed": 5,
        "sampling": {"max_new_tokens": 6}, "checkpoint_every": 2, "sample_every": 2, "sample_prompts": 2, **top,
    }
    if calibration is not None:
        config["calibration"] = calibration
    path = world / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture
def spy(monkeypatch):
    """Counts calibration builds and keeps the reward each kl_rl.train call was given."""
    seen = {"builds": 0, "rewards": []}
    build, train = infalign.build_calibration, kl_rl.train

    def counting_build(*args, **kwargs):
        seen["builds"] += 1
        return build(*args, **kwargs)

    def catching_train(config, policy, ref, reward_fn, prompts, **kwargs):
        seen["rewards"].append(reward_fn)
        return train(config, policy, ref, reward_fn, prompts, **kwargs)

    monkeypatch.setattr(infalign, "build_calibration", counting_build)
    monkeypatch.setattr(kl_rl, "train", catching_train)
    return seen


def vowels(text: str) -> float:
    return float(sum(ch in "aeiou" for ch in text))


def quantile_by_hand(value: float, ref_row: list[float]) -> float:
    return sum(1.0 if z < value else 0.5 if z == value else 0.0 for z in ref_row) / len(ref_row)


# --- the reward the recipe optimises -------------------------------------------------------------------------------
@pytest.mark.parametrize("calibration, phi", [
    ({"transform": "identity"}, lambda u: u),
    ({"transform": "exp", "procedure": "bon", "t": 3.0}, lambda u: math.expm1(3.0 * u) / math.expm1(3.0)),
    ({"transform": "exp", "procedure": "won", "t": 2.0}, lambda u: -math.expm1(-2.0 * u) / -math.expm1(-2.0)),
    ({"transform": "probit"}, lambda u: NormalDist().inv_cdf(min(max(u, 1 / (4 * M)), 1 - 1 / (4 * M)))),
])
def test_the_recipe_trains_on_phi_of_the_quantile_among_reference_samples(world, tmp_path, spy, calibration, phi):
    run = tmp_path / "run"
    config = write_config(world, "phi", {**calibration, "calibration_samples": M, "calibration_seed": 1})
    assert main(["train", "kl-rl", "--config", config, "--run-dir", str(run)]) == 0
    saved = json.loads((run / "calibration.json").read_text())
    assert saved["prompts"] == DISTINCT and all(len(row) == M and row == sorted(row) for row in saved["ref_rewards"])
    assert all(v == int(v) and 0 <= v <= 6 for row in saved["ref_rewards"] for v in row)  # vowel counts of 6 characters
    assert saved["fingerprint"]["samples_per_prompt"] == M and saved["fingerprint"]["reward"] == ["regex:[aeiou]"]
    [reward] = spy["rewards"]
    assert isinstance(reward, infalign.CalibratedReward)
    rows = dict(zip(saved["prompts"], saved["ref_rewards"]))
    prompts = ["the cat", "once upon", "today we", "my food is", "the cat"]
    completions = ["zzz", "aeiou!", "a", "xx e", "aeiouaeiouaeiou"]  # below all, above all, in between
    got = reward(prompts, completions).tolist()
    want = [phi(quantile_by_hand(vowels(c), rows[p])) for p, c in zip(prompts, completions)]
    assert got == pytest.approx(want, abs=1e-12)
    metrics = runs.read_jsonl(run / "metrics.jsonl")
    assert all({"reward", "reward_raw", "reward_calibrated"} <= set(m) for m in metrics)
    assert all(0 <= m["reward_calibrated"] <= 1 and 0 <= m["reward_raw"] <= 6 for m in metrics)
    if calibration["transform"] == "identity":  # the optimised reward is C itself
        assert all(m["reward"] == pytest.approx(m["reward_calibrated"], abs=1e-6) for m in metrics)
    samples = runs.read_jsonl(run / "samples.jsonl")
    assert all(s["reward"] == vowels(s["completion"]) for s in samples)  # the sample table keeps the raw reward


# --- built once: resume and the cache --------------------------------------------------------------------------------
def test_calibration_is_built_once_and_a_resumed_run_reuses_it(world, tmp_path, spy):
    calibration = {"transform": "exp", "t": 4.0, "calibration_samples": M}
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(["train", "kl-rl", "--config", write_config(world, "once", calibration), "--run-dir", str(whole)]) == 0
    assert spy["builds"] == 1
    assert main(["train", "kl-rl", "--config", write_config(world, "once", calibration), "--run-dir", str(part),
                 "--steps", "2"]) == 0
    assert spy["builds"] == 2
    before = (part / "calibration.json").read_bytes(), (part / "calibration.json").stat().st_mtime_ns
    assert main(["train", "kl-rl", "--resume", str(part), "--steps", "4"]) == 0
    assert spy["builds"] == 2  # no reference sampling on resume
    assert ((part / "calibration.json").read_bytes(), (part / "calibration.json").stat().st_mtime_ns) == before
    assert (part / "calibration.json").read_bytes() == (whole / "calibration.json").read_bytes()  # same seed, same set
    # the resumed run optimised the same reward: its metrics are the uninterrupted run's, byte for byte
    assert (part / "metrics.jsonl").read_bytes() == (whole / "metrics.jsonl").read_bytes()
    saved = yaml.safe_load((part / "config.yaml").read_text())
    assert saved["calibration"]["transform"] == "exp" and saved["calibration"]["t"] == 4.0


def test_a_cache_is_reused_for_the_same_settings_and_rebuilt_for_others(world, tmp_path, spy, capsys):
    cache = tmp_path / "cache.json"
    calibration = {"transform": "identity", "calibration_samples": M, "calibration_cache": str(cache)}

    def run(name, *extra):
        return main(["train", "kl-rl", "--config", write_config(world, "cache", calibration, steps=1),
                     "--run-dir", str(tmp_path / name), *extra])

    assert run("a") == 0 and spy["builds"] == 1
    first = cache.read_bytes()
    assert (tmp_path / "a" / "calibration.json").read_bytes() == first
    assert run("b") == 0 and spy["builds"] == 1  # a cache hit: nothing sampled
    assert "read from the cache" in capsys.readouterr().err
    assert (tmp_path / "b" / "calibration.json").read_bytes() == first and cache.read_bytes() == first
    assert run("c", "--calibration-samples", str(M + 1)) == 0 and spy["builds"] == 2  # another m
    assert len(json.loads(cache.read_text())["ref_rewards"][0]) == M + 1  # the cache now holds the new set
    assert run("d", "--calibration-samples", str(M + 1), "--reward", "regex:[xyz]") == 0 and spy["builds"] == 3  # another reward
    assert json.loads(cache.read_text())["fingerprint"]["reward"] == ["regex:[xyz]"]
    assert run("e", "--calibration-samples", str(M + 1), "--reward", "regex:[xyz]", "--calibration-seed", "9") == 0
    assert spy["builds"] == 4  # another seed


# --- transform: none is the plain recipe ----------------------------------------------------------------------------
def test_transform_none_is_plain_kl_rl_on_the_raw_reward(world, tmp_path, spy):
    plain, none = tmp_path / "plain", tmp_path / "none"
    assert main(["train", "kl-rl", "--config", write_config(world, "plain", None), "--run-dir", str(plain)]) == 0
    explicit = {"transform": "none", "calibration_samples": 3, "calibration_seed": 7}
    assert main(["train", "kl-rl", "--config", write_config(world, "none", explicit), "--run-dir", str(none)]) == 0
    assert spy["builds"] == 0 and not any(isinstance(r, infalign.CalibratedReward) for r in spy["rewards"])
    assert not (plain / "calibration.json").exists() and not (none / "calibration.json").exists()
    for name in ("metrics.jsonl", "samples.jsonl"):
        assert (plain / name).read_bytes() == (none / name).read_bytes()
    assert "reward_raw" not in runs.read_jsonl(plain / "metrics.jsonl")[0]


# --- bad values --------------------------------------------------------------------------------------------------------
BASE = {"model": "m", "reward": "regex:a", "prompts": "p.jsonl"}


@pytest.mark.parametrize("calibration, message", [
    ({"transform": "exp"}, r"exp needs t > 0.*tilt infalign tune-t"),
    ({"transform": "exp", "t": -1.0}, "exp needs t > 0"),
    ({"transform": "cubic"}, "transform must be one of none, identity, exp, probit; got 'cubic'"),
    ({"transform": "exp", "t": 2.0, "procedure": "median"}, "procedure must be bon or won"),
    ({"transform": "identity", "t": 2.0}, r"t is used only by transform exp.*--t none"),
    ({"transform": "identity", "calibration_samples": 0}, "calibration_samples must be >= 1"),
    ({"transform": "identity", "calibration_samples": 2.5}, "calibration.calibration_samples must be an int"),
    ({"m": 3}, r"unknown config key 'calibration.m'; did you mean 'calibration.t'\?"),
])
def test_bad_calibration_values_are_named(calibration, message):
    from tilt.runs.config import build, resolve

    with pytest.raises(ValueError, match=message):
        build(resolve("kl-rl", {**BASE, "calibration": calibration}))


def test_bad_calibration_input_leaves_no_run_directory(world, tmp_path, capsys):
    run = tmp_path / "run"
    config = write_config(world, "bad", {"transform": "exp"})
    assert main(["train", "kl-rl", "--config", config, "--run-dir", str(run)]) == 2
    assert "needs t > 0" in capsys.readouterr().err and not run.exists()
    missing = {"transform": "identity", "calibration_cache": str(tmp_path / "no-such-folder" / "c.json")}
    assert main(["train", "kl-rl", "--config", write_config(world, "bad", missing), "--run-dir", str(run)]) == 2
    assert "no-such-folder" in capsys.readouterr().err and not run.exists()
    (tmp_path / "broken.json").write_text("{not json")
    broken = {"transform": "identity", "calibration_cache": str(tmp_path / "broken.json")}
    assert main(["train", "kl-rl", "--config", write_config(world, "bad", broken), "--run-dir", str(run)]) == 2
    assert "not a readable calibration file" in capsys.readouterr().err and not run.exists()


STOPPING_REWARD = """import os, signal

CALLS = [0]


def vowels(prompts, completions):
    CALLS[0] += 1
    if str(CALLS[0]) == os.environ.get("STOP_AT_REWARD_CALL"):
        os.kill(os.getpid(), signal.SIGTERM)
    return [float(sum(ch in "aeiou" for ch in c)) for c in completions]
"""


@pytest.mark.slow
def test_sigterm_during_the_calibration_stops_cleanly_and_the_resume_reproduces_the_run(world, tmp_path, monkeypatch, capsys):
    reward = tmp_path / "reward.py"
    reward.write_text(STOPPING_REWARD)
    calibration = {"transform": "identity", "calibration_samples": M}
    config = write_config(world, "stop", calibration, reward=f"{reward}:vowels")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["train", "kl-rl", "--config", config, "--run-dir", str(whole)]) == 0
    monkeypatch.setenv("STOP_AT_REWARD_CALL", "2")  # call 1: the step-0 samples; call 2: scoring the calibration
    assert main(["train", "kl-rl", "--config", config, "--run-dir", str(cut)]) == 143
    err = capsys.readouterr().err
    assert "calibration" in err and f"# continue with: tilt train kl-rl --resume {cut}" in err
    assert (cut / "calibration.json").is_file() and runs.list_checkpoints(cut) == []
    monkeypatch.delenv("STOP_AT_REWARD_CALL")
    assert main(["train", "kl-rl", "--resume", str(cut)]) == 0
    assert (cut / "metrics.jsonl").read_bytes() == (whole / "metrics.jsonl").read_bytes()
    assert (cut / "calibration.json").read_bytes() == (whole / "calibration.json").read_bytes()
