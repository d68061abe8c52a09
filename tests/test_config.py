"""The one config resolver of every tilt train command (tilt.runs.config): typed coercion, aliases, did-you-mean,
paths against the config file's folder, the same bad-input errors everywhere, and --help without heavy imports."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tilt.cli import main
from tilt.runs import config as cfg

COMMANDS = list(cfg.COMMANDS)
RECIPE_SECTION = {c: list(cfg.section_specs(c))[1] for c in COMMANDS}
LR_SECTION = {**RECIPE_SECTION, "demo-rl": "rl", "demo-rlhf": "rl"}


def invocation(command: str) -> list[str]:
    return ["demo"] if command == "demo" else ["train", command]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_fields_read_from_source_equal_the_imported_dataclasses(command):
    for section in cfg.COMMANDS[command]:
        from_source = [s for s in cfg.class_fields(section.ref)]
        imported = cfg.real_fields(section.ref)
        assert [(s.name, s.type, s.default, s.help) for s in from_source] == [(s.name, s.type, s.default, s.help) for s in imported]


def test_yaml_text_and_flag_text_get_the_same_coercion():
    assert cfg.coerce("kl_rl.lr", "1e-5", "float") == 1e-5  # PyYAML reads 1e-5 as a string
    assert yaml.safe_load("lr: 1e-5")["lr"] == "1e-5"
    assert cfg.coerce("x", 3, "float") == 3.0 and isinstance(cfg.coerce("x", 3, "float"), float)
    assert cfg.coerce("x", "7", "int") == 7 and cfg.coerce("x", "none", "int | None") is None
    assert cfg.coerce("x", "yes", "bool") is True and cfg.coerce("x", False, "bool") is False
    assert cfg.coerce("x", "a", "tuple[str, ...]") == ("a",) and cfg.coerce("x", ["a", "b"], "tuple[str, ...]") == ("a", "b")
    assert cfg.coerce("x", "1,0.5", "tuple[float, ...] | None") == (1.0, 0.5)
    assert cfg.coerce("x", "0.1,0.05", "Any") == [0.1, 0.05] and cfg.coerce("x", "0.1", "Any") == 0.1
    for value, type_text, message in [("high", "float", "x must be a float"), (2.5, "int", "x must be an int"),
                                      (True, "int", "x must be an int"), ("maybe", "bool", "x must be a bool"),
                                      (None, "int", "cannot be null"), (3, "str", "x must be a str")]:
        with pytest.raises(cfg.ConfigError, match=message):
            cfg.coerce("x", value, type_text)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_the_same_run_section_and_lr_as_text(command):
    run = {"model": "m", "ref": "r", "reward": ["regex:a", "length:chars"], "reward_weights": [1.0, 0.5], "prompts": "p.jsonl",
           "preferences": "q.jsonl", "demonstrations": "d.jsonl", "device": "cpu", "dtype": "float32", "checkpoint_every": 3,
           "tracker": "none"}
    config = cfg.resolve(command, {"run": run, LR_SECTION[command]: {"lr": "1e-5"}})
    built = cfg.build(config)
    assert built["run"].reward == ("regex:a", "length:chars") and built["run"].reward_weights == (1.0, 0.5)
    assert built["run"].checkpoint_every == 3 and built[LR_SECTION[command]].lr == 1e-5
    assert cfg.resolve(command, config) == config  # a saved config resolves to itself (what --resume reads)


def test_file_then_flags_then_defaults_and_bare_names():
    file = {"run": {"model": "m", "reward": "regex:a"}, "beta": 1, "kl_rl": {"steps": 7}, "sampling": {"max_new_tokens": 9}}
    flags = cfg.parse_flags("kl-rl", ["--beta", "0.25", "--sampling.top_k", "5", "--max-prompt-tokens=none",
                                      "--reward", "regex:b", "--reward", "length:chars"])
    config = cfg.resolve("kl-rl", file, flags)
    assert config["kl_rl"]["beta"] == 0.25 and config["kl_rl"]["steps"] == 7 and config["kl_rl"]["samples_per_prompt"] == 4
    assert config["sampling"] == {"max_new_tokens": 9, "temperature": 1.0, "top_k": 5, "top_p": 1.0, "sampler": "auto",
                                  "sampler_refresh_steps": 0}
    assert config["data"]["max_prompt_tokens"] is None and config["run"]["ref"] == "m"  # ref defaults to model
    assert config["run"]["reward"] == ["regex:b", "length:chars"]  # --reward A --reward B keeps both


def test_trl_spellings_are_aliases_where_they_map():
    flags = cfg.parse_flags("kl-rl", ["--learning_rate", "2e-5", "--num_generations", "6", "--max_completion_length", "16",
                                      "--max_prompt_length", "30", "--max_steps", "9"])
    assert flags == {"kl_rl.lr": "2e-5", "kl_rl.samples_per_prompt": "6", "sampling.max_new_tokens": "16",
                     "data.max_prompt_tokens": "30", "kl_rl.steps": "9"}
    assert cfg.aliases_of("dpo")["per_device_train_batch_size"] == "dpo.pairs_per_step"
    assert "per_device_train_batch_size" not in cfg.aliases_of("kl-rl")  # TRL counts completions there, not prompts
    assert "max_steps" not in cfg.aliases_of("dpo")  # DPO counts epochs
    config = cfg.resolve("dpo", {"learning_rate": 3e-6, "run": {"model": "m"}})
    assert config["dpo"]["lr"] == 3e-6
    assert "learning_rate = dpo.lr" in cfg.fields_help("dpo")


def test_unknown_keys_get_one_error_with_a_suggestion():
    with pytest.raises(cfg.ConfigError, match=r"unknown config key 'betta'; did you mean 'beta'\?"):
        cfg.resolve("kl-rl", {"betta": 0.1})
    with pytest.raises(cfg.ConfigError, match=r"'sampling.temprature'; did you mean 'sampling.temperature'\?"):
        cfg.resolve("xpo", {"sampling": {"temprature": 0.5}})
    with pytest.raises(cfg.ConfigError, match=r"'--sampling.max_new_tokns'; did you mean '--sampling.max_new_tokens'\?"):
        cfg.parse_flags("dpo-rl" if False else "kl-rl", ["--sampling.max_new_tokns", "3"])
    with pytest.raises(cfg.ConfigError, match="several sections.*bc.steps or rl.steps"):
        cfg.parse_flags("demo-rl", ["--steps", "3"])
    with pytest.raises(cfg.ConfigError, match="is for 'dpo', not tilt train kl-rl"):
        cfg.resolve("kl-rl", {"recipe": "dpo"})


def test_a_dataclass_check_names_its_section():
    with pytest.raises(cfg.ConfigError, match="^kl_rl: samples_per_prompt must be >= 2"):
        cfg.build(cfg.resolve("kl-rl", {"kl_rl": {"samples_per_prompt": 1}}))
    with pytest.raises(cfg.ConfigError, match="run.dtype must be one of"):
        cfg.build(cfg.resolve("dpo", {"run": {"dtype": "int8"}}))
    with pytest.raises(cfg.ConfigError, match="2 weights for 1 reward"):
        cfg.build(cfg.resolve("kl-rl", {"run": {"reward": "regex:a", "reward_weights": [1, 2]}}))


def test_paths_in_a_config_file_resolve_against_its_folder(tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "prompts.jsonl").write_text('{"prompt": "a"}\n')
    (folder / "r.py").write_text("def f(prompts, completions):\n    return [0.0] * len(completions)\n")
    file = {"run": {"model": "embedded", "prompts": "prompts.jsonl", "reward": ["r.py:f", "regex:a"], "ref": "missing-dir"},
            "calibration": {"calibration_cache": "cal.json"}}
    config = cfg.resolve("kl-rl", file, {}, base_dir=folder)
    assert config["run"]["prompts"] == str(folder / "prompts.jsonl")
    assert config["run"]["reward"] == [f"{folder / 'r.py'}:f", "regex:a"]
    assert config["run"]["model"] == "embedded" and config["run"]["ref"] == "missing-dir"  # not there: left as written
    assert config["calibration"]["calibration_cache"] == str(folder / "cal.json")  # an output: always the file's folder
    flags = cfg.parse_flags("kl-rl", ["--prompts", "prompts.jsonl"])
    assert cfg.resolve("kl-rl", file, flags, base_dir=folder)["run"]["prompts"] == "prompts.jsonl"  # flags: the cwd


@pytest.mark.parametrize("command", COMMANDS)
def test_bad_yaml_is_one_error_with_exit_2_and_no_run_directory(command, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  model: [unclosed\n")
    run = tmp_path / "run"
    assert main([*invocation(command), "--config", str(bad), "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tilt: error: {bad}, line 3, column 1: not valid YAML: expected ',' or ']', but got '<stream end>'"]
    assert not run.exists()
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert main([*invocation(command), "--config", str(tmp_path / "list.yaml"), "--run-dir", str(run)]) == 2
    assert "must hold a mapping" in capsys.readouterr().err and not run.exists()
    (tmp_path / "key.yaml").write_text("run:\n  modle: x\n")
    assert main([*invocation(command), "--config", str(tmp_path / "key.yaml"), "--run-dir", str(run)]) == 2
    assert "unknown config key 'run.modle'; did you mean 'run.model'?" in capsys.readouterr().err and not run.exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_help_shows_each_default(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*invocation(command), "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for section, specs in cfg.section_specs(command).items():
        for name, spec in specs.items():
            assert f"--{section}.{name}" in out
    assert out.count("(default: ") >= sum(len(s) for s in cfg.section_specs(command).values())


def test_help_imports_neither_torch_nor_transformers():
    code = ("import sys\nfrom tilt.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['train', 'kl-rl', '--help'], ['train', 'demo-rlhf', '--help'],\n"
            "             ['demo', '--help'], ['lab', '--help'], ['lab', 'dpg', '--help'], ['eval', '--help'], ['infalign', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(Path(__file__).parents[1]),
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_auto_dtype_never_picks_bfloat16_on_a_cpu_without_native_support():
    import torch

    from tilt.runs.setup import cpu_flags, pick_dtype

    avx2 = "processor : 0\nflags : fpu sse2 avx avx2 fma\n"
    amx = "processor : 0\nflags : fpu avx2 avx512f avx512_bf16 amx_bf16\n"
    assert cpu_flags(avx2) == {"fpu", "sse2", "avx", "avx2", "fma"}
    assert pick_dtype("auto", "cpu", cpuinfo=avx2) == torch.float32
    assert pick_dtype("auto", "cpu", cpuinfo=amx) == torch.bfloat16
    assert pick_dtype("float16", "cpu", cpuinfo=avx2) == torch.float16
