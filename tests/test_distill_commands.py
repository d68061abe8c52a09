"""tilt train bond | bonbon | apo | qrpo on the run layer: each runs from its example file on the tiny model, and bad
input is refused before a run directory exists. (SIGTERM and an exact resume: tests/test_run_loop.py, with apo.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tilt.cli import main
from tilt.runs import directory as runs

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
COMMANDS = ("bond", "bonbon", "apo", "qrpo")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """The folder the examples name (tiny-model), as `python -m tilt.engine.tiny tiny-model` writes it."""
    from tilt.engine.tiny import char_tokenizer, tiny_gpt2

    root = tmp_path_factory.mktemp("distill")
    tok = char_tokenizer()
    tiny_gpt2(len(tok)).save_pretrained(root / "tiny-model")
    tok.save_pretrained(root / "tiny-model")
    return root


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_trains_two_steps_from_its_example(tiny_model, monkeypatch, capsys, command):
    import torch

    monkeypatch.chdir(tiny_model)  # the examples' model path is relative to the working directory
    run = tiny_model / f"run-{command}"
    assert main(["train", command, "--config", str(EXAMPLES / f"{command}_tiny.yaml"), "--run-dir", str(run),
                 "--steps", "2", "--sample_prompts", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = runs.read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and summary["steps"] == 2 and summary["loss"] == rows[-1]["loss"]
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    assert [r["step"] for r in runs.read_jsonl(run / "samples.jsonl")] == [0, 0, 2, 2]
    assert runs.latest_checkpoint(run).name == runs.checkpoint_name(2)
    assert runs.read_config(run)["recipe"] == command and runs.read_config(run)[command]["steps"] == 2
    before, after = weights(tiny_model / "tiny-model"), weights(run / "final")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # two updates moved the policy


@pytest.mark.parametrize("command, flags, message", [
    ("bond", ["--bond.n", "0"], "bond: n must be >= 1"),
    ("bond", ["--jeffreys_weight", "2"], "jeffreys_weight must be in [0, 1]"),
    ("bonbon", ["--bonbon.alpha", "1.5"], "alpha must be in [0, 1]"),
    ("apo", ["--value_samples", "0"], "value_samples and samples_per_prompt must be >= 1"),
    ("qrpo", ["--qrpo.sampling", "both"], "sampling must be 'reference' or 'policy'"),
    ("qrpo", ["--reward", "nonexistent_module_xyz:f"], "nonexistent_module_xyz"),
    ("apo", ["--prompts", "/nonexistent/prompts.jsonl"], "data file not found"),
    ("bonbon", ["--steps", "many"], "bonbon.steps must be an int"),
])
def test_bad_input_is_named_and_leaves_no_run_directory(tiny_model, monkeypatch, capsys, command, flags, message):
    monkeypatch.chdir(tiny_model)
    run = tiny_model / "runs" / f"bad-{command}"
    assert main(["train", command, "--config", str(EXAMPLES / f"{command}_tiny.yaml"), "--run-dir", str(run), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()


def test_several_processes_are_refused_before_anything_is_written(tiny_model, monkeypatch, capsys):
    monkeypatch.chdir(tiny_model)
    monkeypatch.setenv("WORLD_SIZE", "2")
    run = tiny_model / "runs" / "two"
    assert main(["train", "bonbon", "--config", str(EXAMPLES / "bonbon_tiny.yaml"), "--run-dir", str(run)]) == 2
    assert "runs in one process" in capsys.readouterr().err and not run.exists()
