"""What a TRL user brings, through the commands: reward functions written as TRL documents them run unchanged as
``--reward file.py:function`` in ``tilt train kl-rl`` (several, with weights, each logged as rewards/<name>/mean),
a conversational prompts file trains as chats, an over-long prompt stops before the run directory exists, and
``tilt eval --reward A --reward B`` scores with the sum."""
from __future__ import annotations

import json
import string

import pytest
import yaml

from tilt.cli import main
from tilt.runs import directory as runs

REWARDS = '''
def reward_len(completions, **kwargs):
    return [-abs(3 - len(c)) for c in completions]


def think_format(prompts, completions, **kwargs):
    assert all(isinstance(p, list) and p[-1]["role"] == "user" for p in prompts), prompts
    return [1.0 if c[0]["content"].startswith("a") else 0.0 for c in completions]


def from_answer(completions, answer, **kwargs):
    return [float(a) for a in answer]
'''

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
CONTEXT = 48  # the tiny model's positions


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tilt.engine.tiny import char_tokenizer, tiny_gpt2

    root = tmp_path_factory.mktemp("trl")
    tok = char_tokenizer(string.ascii_lowercase + " .,!?:\n")
    tok.chat_template = CHAT_TEMPLATE
    tiny_gpt2(len(tok), n_layer=1, n_embd=16, n_positions=CONTEXT, seed=3).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "rewards.py").write_text(REWARDS)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": "2.5"}) + "\n" for p in ["ab", "cd", "ef"]))
    chats = [[{"role": "user", "content": c}] for c in ["hi", "go on", "say a"]]
    (root / "chats.jsonl").write_text("".join(json.dumps({"prompt": c}) + "\n" for c in chats))
    return root


def kl_rl(world, tmp_path, run: dict, *extra: str) -> list[str]:
    config = {"run": {"model": str(world / "model"), "checkpoint_every": 0, "sample_every": 0, "sample_prompts": 2, **run},
              "kl_rl": {"steps": 2, "prompts_per_step": 2, "samples_per_prompt": 2, "lr": "1e-3", "seed": 1},
              "sampling": {"max_new_tokens": 4}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["train", "kl-rl", "--config", str(path), "--run-dir", str(tmp_path / "run"), "--json", *extra]


def test_trl_reward_functions_run_unchanged_with_weights_and_log_each_function(world, tmp_path, capsys):
    specs = [f"{world / 'rewards.py'}:reward_len", f"{world / 'rewards.py'}:from_answer"]
    assert main(kl_rl(world, tmp_path, {"prompts": str(world / "prompts.jsonl"), "reward": specs,
                                        "reward_weights": [1.0, 0.5]})) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert summary["data_format"] == "prompts" and summary["data_inferred"] is True
    assert "prompt-only, standard (inferred)" in err
    rows = runs.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 2
    for row in rows:
        assert row["rewards/from_answer/mean"] == 2.5 and row["rewards/from_answer/std"] == 0.0  # the row's column
        assert row["rewards/reward_len/mean"] <= 0.0
        assert row["reward"] == pytest.approx(row["rewards/reward_len/mean"] + 0.5 * 2.5)  # the weighted sum


def test_a_conversational_prompts_file_trains_as_chats(world, tmp_path, capsys):
    spec = f"{world / 'rewards.py'}:think_format"  # reads completion[0]["content"], asserts chat prompts
    assert main(kl_rl(world, tmp_path, {"prompts": str(world / "chats.jsonl"), "reward": [spec]})) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["data_shape"] == "prompt-only, conversational"
    samples = runs.read_jsonl(tmp_path / "run" / "samples.jsonl")
    assert samples and all(s["prompt"].startswith("user: ") and s["prompt"].endswith("assistant: ") for s in samples)
    assert all("rewards/think_format/mean" not in r for r in runs.read_jsonl(tmp_path / "run" / "metrics.jsonl"))


def test_an_over_long_prompt_fails_naming_its_row_before_the_run_directory_exists(world, tmp_path, capsys):
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["ab", "cd", "e" * (CONTEXT - 2)]))
    assert main(kl_rl(world, tmp_path, {"prompts": str(path), "reward": ["length:chars"]})) != 0
    err = capsys.readouterr().err
    assert "row 3, field 'prompt'" in err and "+ 4 (max_new_tokens)" in err
    assert f"over the model's context (config.max_position_embeddings) of {CONTEXT} tokens" in err
    assert "row 1" not in err and "row 2" not in err
    assert not (tmp_path / "run").exists()


def test_eval_sums_repeated_rewards(world, capsys):
    model = str(world / "model")

    def reward_mean(*specs: str) -> float:
        args = ["eval", "--model", model, "--ref", model, "--prompts", str(world / "prompts.jsonl"), "--samples", "2",
                "--max-new-tokens", "4", "--resamples", "20", "--json"]
        for s in specs:
            args += ["--reward", s]
        assert main(args) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["reward"] == (list(specs) if len(specs) > 1 else specs[0])
        return report["reward_mean"]

    vowels, length = reward_mean("regex:[aeiou]"), reward_mean("length:chars")
    column = reward_mean(f"{world / 'rewards.py'}:from_answer")  # the file's column reaches the function
    assert column == 2.5
    assert reward_mean("regex:[aeiou]", "length:chars") == pytest.approx(vowels + length)  # same seed, same samples
    args = ["eval", "--model", model, "--ref", model, "--prompts", str(world / "prompts.jsonl"), "--samples", "2",
            "--max-new-tokens", "4", "--resamples", "20", "--json", "--reward", "regex:[aeiou]", "length:chars"]
    assert main(args) == 0  # --reward A B, as tilt train takes it
    report = json.loads(capsys.readouterr().out)
    assert report["reward"] == ["regex:[aeiou]", "length:chars"] and report["reward_mean"] == pytest.approx(vowels + length)


def test_demo_rl_checks_the_context_and_reads_the_prompts_file_as_inferred(world, tmp_path, capsys):
    from tilt.data import DataError
    from tilt.pipelines.demo_rl import DemoRLConfig, run_demo_rl

    demos = tmp_path / "demos.jsonl"
    rows = [{"prompt": "ab", "completion": " cd"}, {"prompt": "ef", "completion": " " + "g" * CONTEXT}]
    demos.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = DemoRLConfig(model=str(world / "model"), demonstrations=str(demos), reward=("regex:a",))
    with pytest.raises(DataError, match=r"row 2, field 'prompt': .* \(its longest reply\)"):
        run_demo_rl(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    demos.write_text(json.dumps(rows[0]) + "\n")
    long_prompts = tmp_path / "prompts.jsonl"
    long_prompts.write_text(json.dumps({"prompt": "ab"}) + "\n" + json.dumps({"prompt": "e" * CONTEXT}) + "\n")
    with pytest.raises(DataError, match=r"row 2, field 'prompt': .* \(max_new_tokens\)"):
        run_demo_rl(DemoRLConfig(model=str(world / "model"), demonstrations=str(demos), reward=("regex:a",),
                                 prompts=str(long_prompts)), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert f"# data: {demos}: 1 rows, prompt-completion, standard (inferred)" in capsys.readouterr().err


def test_pipelines_take_the_run_sections_reward_weights():
    from tilt.pipelines.demo_rl import config_from_sections
    from tilt.reward_fns import reward_from_specs
    from tilt.runs import config as cfg

    resolved = cfg.resolve("demo-rl", {"run": {"model": "m", "demonstrations": "d.jsonl", "reward": ["regex:a", "length:chars"],
                                                "reward_weights": [2.0, 0.5]}}, {})
    pipeline = config_from_sections("demo-rl", resolved, cfg.build(resolved))
    assert pipeline.reward == ("2.0*regex:a", "0.5*length:chars")
    assert reward_from_specs(list(pipeline.reward))(["p"], ["aab"]).tolist() == [2.0 * 2 + 0.5 * 3]


def test_preference_commands_infer_implicit_prompts_and_record_the_shape(world, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"  # TRL's implicit prompt: chosen and rejected share their opening words
    pairs.write_text("".join(json.dumps({"chosen": f"{p} aei", "rejected": f"{p} bcd"}) + "\n" for p in ["ab", "cd", "ef", "gh"]))
    for command, section in (("dpo", {"dpo": {"epochs": 1, "pairs_per_step": 2}, "eval": {"held_out": 0.25}}),
                             ("reward-model", {"reward_model": {"epochs": 1, "pairs_per_step": 2}, "eval": {"held_out": 0.25}})):
        config = tmp_path / f"{command}.yaml"
        config.write_text(yaml.safe_dump({"run": {"model": str(world / "model"), "preferences": str(pairs), "checkpoint_every": 0},
                                          **section}))
        assert main(["train", command, "--config", str(config), "--run-dir", str(tmp_path / command), "--json"]) == 0, command
        out, err = capsys.readouterr()
        summary = json.loads(out)
        assert summary["data_format"] == "preferences" and summary["data_inferred"] is True, command
        assert summary["data_shape"] == "preference (implicit prompt), standard", command
        assert "preference (implicit prompt), standard (inferred)" in err


def test_sample_gives_chats_to_a_conversational_reward_and_checks_the_context(world, capsys):
    model = str(world / "model")
    spec = f"{world / 'rewards.py'}:think_format"  # fails unless prompts are chats and completions messages
    assert main(["sample", "--model", model, "--prompts", str(world / "chats.jsonl"), "--reward", spec,
                 "--max-new-tokens", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [s["reward"] for s in report["samples"]] == [1.0 if s["completion"].startswith("a") else 0.0 for s in report["samples"]]
    assert main(["sample", "--model", model, "--prompt", "e" * CONTEXT, "--max-new-tokens", "3"]) != 0
    assert "row 1, field 'prompt'" in capsys.readouterr().err
