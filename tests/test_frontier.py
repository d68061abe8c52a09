"""The KL–win-rate frontier: exact values by hand and by an independent implementation, the orderings the theory
implies, the estimate from reference samples against the exact frontier of a lab world, efficiency, the files, and
the commands."""
import argparse
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from tilt.frontier import Frontier, FrontierConfig, frontier_from_rewards, plot_frontier, task_prompts
from tilt.lab.frontier import frontier_world, sample_rewards
from tilt.math import frontier as F
from tilt.math.infalign import best_of_n_kl_closed_form, best_of_n_probs, exact_calibrated_reward, exact_win_rate

ROOT = Path(__file__).resolve().parent.parent
N_GRID = torch.tensor([1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256, 1024.0])
INV_R = torch.cat([torch.zeros(1), torch.logspace(-2, 3, 60)])
INV_C = torch.cat([torch.zeros(1), torch.logspace(-1, 4, 70)])


def stats_of(rewards, probs, q):
    below, at = F.reference_cdfs(rewards, probs)
    return F.policy_stats(q, probs, rewards, F.calibrated(below, at))


# --- exact values ----------------------------------------------------------------------------------------------------
def test_best_of_two_of_two_samples_by_hand():
    r = torch.tensor([[0.0, 1.0]])
    p = F.uniform_probs(r)
    below, at = F.reference_cdfs(r, p)
    q = F.best_of_n_policy(p, below, at, torch.tensor([2.0]))[0]
    assert q[0].tolist() == pytest.approx([0.25, 0.75])
    s = stats_of(r, p, q.unsqueeze(0))
    assert s["kl"].item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    assert s["win_rate"].item() == pytest.approx(0.25 * 0.25 + 0.75 * 0.75)  # C = (1/4, 3/4)
    assert s["ess"].item() == pytest.approx(1 / (0.25**2 + 0.75**2))


def test_best_of_two_with_a_tie_by_hand():
    r = torch.tensor([[0.0, 1.0, 0.0]])  # two samples tie at 0
    p = F.uniform_probs(r)
    below, at = F.reference_cdfs(r, p)
    assert F.calibrated(below, at)[0].tolist() == pytest.approx([1 / 3, 5 / 6, 1 / 3])
    q = F.best_of_n_policy(p, below, at, torch.tensor([2.0]))[0]
    assert q[0].tolist() == pytest.approx([2 / 9, 5 / 9, 2 / 9])  # the class {0, 0} gets (2/3)^2, shared equally
    assert stats_of(r, p, q.unsqueeze(0))["win_rate"].item() == pytest.approx(4 / 9 / 3 + 5 / 9 * 5 / 6)


def test_agrees_with_the_enumerated_best_of_n_and_win_rate():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 40, generator=g, dtype=torch.float64)
    probs /= probs.sum(-1, keepdim=True)
    rewards = torch.randint(0, 7, (3, 40), generator=g).double()  # many ties
    below, at = F.reference_cdfs(rewards, probs)
    assert F.calibrated(below, at) == pytest.approx(exact_calibrated_reward(rewards, probs))
    for n in (1, 2, 5, 16):
        q = F.best_of_n_policy(probs, below, at, torch.tensor([float(n)]))[0]
        assert q == pytest.approx(best_of_n_probs(probs, rewards, n))
        s = stats_of(rewards, probs, q.unsqueeze(0))
        assert s["win_rate"][0] == pytest.approx(exact_win_rate(q, probs, rewards))


def test_empirical_best_of_n_kl_is_below_the_closed_form():
    r = torch.randn(5, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    curves = F.frontier_curves(r, N_GRID, INV_R, INV_C)["best_of_n"]
    for n, kl in zip(N_GRID.tolist(), curves["kl"].tolist()):
        if n > 1:
            assert kl < best_of_n_kl_closed_form(int(n))
        assert kl <= math.log(64) + 1e-12


def test_the_calibrated_tilt_is_the_win_rate_frontier_and_the_reward_tilt_the_reward_frontier():
    probs, rewards = frontier_world(6, 120, seed=3, tie_step=0.2, zero_mass=0.3)
    curves = F.frontier_curves(rewards, N_GRID, INV_R, INV_C, probs=probs)
    grid = torch.linspace(0.05, 3.0, 30)
    at = {name: F.on_kl_grid(c, grid) for name, c in curves.items()}
    wr_star = at["tilt_calibrated"]["win_rate"]
    for other in ("best_of_n", "tilt_reward"):  # linear interpolation of a concave curve errs low: small slack
        assert (wr_star >= at[other]["win_rate"] - 2e-3).all(), other
    assert (at["tilt_reward"]["reward"] >= at["best_of_n"]["reward"] - 2e-3).all()
    assert (wr_star - at["tilt_reward"]["win_rate"]).max() > 0.01  # the tilts differ: the ordering could fail
    assert curves["tilt_calibrated"]["win_rate"][0].item() == pytest.approx(0.5)  # 1/beta = 0 is pi_ref itself


# --- the estimate from samples against the exact frontier --------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("tie_step,zero_mass,m", [(0.1, 0.4, 32), (0.0, 0.0, 64)])
def test_sampled_frontier_covers_the_exact_one_within_reach(tie_step, zero_mass, m):
    probs, rewards = frontier_world(16, 300, seed=0, tie_step=tie_step, zero_mass=zero_mass)
    exact = {k: F.on_kl_grid(c, torch.tensor([0.25, 0.5, 1.0, 1.5, 2.0]))
             for k, c in F.frontier_curves(rewards, N_GRID, INV_R, INV_C, probs=probs).items()}
    g = torch.Generator().manual_seed(1)
    samples = sample_rewards(probs, rewards, m, generator=g)
    kl = torch.tensor([0.25, 0.5, 1.0, 1.5, 2.0])
    assert kl.max() < F.reach_kl(m)
    boot = F.bootstrap_frontier(samples, kl, N_GRID, INV_R, INV_C, generator=g, num_resamples=100)
    for name in ("best_of_n", "tilt_calibrated"):
        e, b = exact[name]["win_rate"], boot[name]
        assert ((b["win_rate_low"] <= e) & (e <= b["win_rate_high"])).all(), (name, e, b)
    for name in ("best_of_n", "tilt_reward", "tilt_calibrated"):
        e, b = exact[name]["reward"][:3], boot[name]  # KL <= 1
        assert ((b["reward_low"][:3] <= e) & (e <= b["reward_high"][:3])).all(), (name, e, b)


# --- efficiency, the file and the plot --------------------------------------------------------------------------------
def test_efficiency_by_hand():
    assert F.efficiency(0.7, 0.9) == pytest.approx(0.5)
    assert F.efficiency(0.5, 0.8) == 0.0 and F.efficiency(0.4, 0.6) == pytest.approx(-1.0)
    assert math.isnan(F.efficiency(0.6, 0.5))
    t = F.efficiency(torch.tensor([0.6, 0.6]), torch.tensor([0.7, 0.5]))
    assert t[0].item() == pytest.approx(0.5) and math.isnan(t[1].item())


@pytest.fixture(scope="module")
def small_frontier():
    probs, rewards = frontier_world(12, 100, seed=5, tie_step=0.1, zero_mass=0.4)
    samples = sample_rewards(probs, rewards, 32, generator=torch.Generator().manual_seed(0))
    return frontier_from_rewards(samples, FrontierConfig(num_resamples=30), meta={"reward": "lab"}), samples


def test_frontier_file_round_trip_and_wr_star(small_frontier, tmp_path):
    f, samples = small_frontier
    g = F.frontier_curves(samples, torch.tensor(f.data["points"]["best_of_n"]["param"]),
                          torch.tensor(f.data["points"]["tilt_reward"]["param"]), torch.tensor(f.data["points"]["tilt_calibrated"]["param"]))
    back = Frontier.load(f.save(tmp_path / "frontier.json"))
    assert back.data == json.loads(json.dumps(f.data))
    assert back.wr_star(0.0) == pytest.approx(0.5)
    # at a point of the calibrated curve, WR* is that point's win rate
    i = int((g["tilt_calibrated"]["kl"] - 0.7).abs().argmin())
    kl_i, wr_i = g["tilt_calibrated"]["kl"][i].item(), g["tilt_calibrated"]["win_rate"][i].item()
    assert back.wr_star(kl_i) == pytest.approx(wr_i, abs=2e-3)
    assert math.isnan(back.wr_star(10.0))  # past the largest KL 32 samples can hold
    on = back.efficiency({"win_rate": wr_i, "kl_ref": kl_i, "win_rate_ci": [wr_i - 0.05, wr_i + 0.05], "kl_ref_ci": [kl_i - 0.1, kl_i + 0.1]})
    assert on["efficiency"] == pytest.approx(1.0, abs=0.02)
    assert on["efficiency_ci"][0] < 1 < on["efficiency_ci"][1]
    assert on["efficiency_ci_total"][0] <= on["efficiency_ci"][0] and on["efficiency_ci_total"][1] >= on["efficiency_ci"][1]
    half = back.efficiency({"win_rate": 0.5 + (wr_i - 0.5) / 2, "kl_ref": kl_i})
    assert half["efficiency"] == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="not a frontier file"):
        (tmp_path / "bad.json").write_text("{}")
        Frontier.load(tmp_path / "bad.json")


def test_plot_is_written(small_frontier, tmp_path):
    f, _ = small_frontier
    path = plot_frontier(f, tmp_path / "f.png", runs={"run": [{"kl_ref": 0.2, "win_rate": 0.6, "win_rate_ci": [0.55, 0.65]}]})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_reference_rewards_are_refused():
    with pytest.raises(ValueError, match="at least 2 samples"):
        frontier_from_rewards(torch.zeros(3, 1))
    bad = torch.zeros(3, 4)
    bad[2, 1] = math.nan
    with pytest.raises(ValueError, match="prompt 2"):
        frontier_from_rewards(bad)


# --- the task's prompts ------------------------------------------------------------------------------------------------
def test_shipped_openings_are_the_generators_output():
    spec = importlib.util.spec_from_file_location("make_openings", ROOT / "benchmarks" / "make_openings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, text in module.rendered().items():
        assert (ROOT / "tilt" / "assets" / name).read_text(encoding="utf-8") == text, name
    train, held = task_prompts("train"), task_prompts("heldout")
    assert len(train) >= 200 and len(held) >= 100
    assert not set(train) & set(held) and len(set(train)) == len(train)


# --- the commands --------------------------------------------------------------------------------------------------
def test_frontier_command_from_rewards_and_eval_efficiency(small_frontier, tmp_path, capsys):
    from tilt.cli import frontier as frontier_cli

    f, _ = small_frontier
    f.save(tmp_path / "old.json")
    parser = argparse.ArgumentParser(prog="tilt")
    sub = parser.add_subparsers(required=True)
    frontier_cli.add_parser(sub)
    args = parser.parse_args(["frontier", "--from-rewards", str(tmp_path / "old.json"), "--out", str(tmp_path / "new.json"),
                              "--resamples", "30"])
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert "calibrated-tilt WR (WR*)" in out and "beyond reach" in out
    new = Frontier.load(tmp_path / "new.json")
    assert new.data["ref_rewards"] == f.data["ref_rewards"] and (tmp_path / "new.png").exists()
    assert new.data["curves"]["tilt_calibrated"]["win_rate"] == f.data["curves"]["tilt_calibrated"]["win_rate"]


@pytest.mark.slow
def tiny_benchmark(tmp_path, method: str):
    """The benchmark module and its argv for ``method`` on a tiny model, with a frontier of 2 prompts x 8 samples."""
    from tilt.engine.hf import HFPolicy, SamplingConfig
    from tilt.engine.tiny import char_tokenizer, tiny_gpt2
    from tilt.frontier import draw_reference_rewards

    spec = importlib.util.spec_from_file_location("bench_frontier", ROOT / "benchmarks" / "frontier.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tok = char_tokenizer("abcdefghijklmnopqrstuvwxyz ,.;:'")
    model = tiny_gpt2(len(tok), n_layer=1, n_embd=16, n_head=1, seed=0)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "rw.py").write_text("def count_e(prompts, completions, **k):\n    return [float(c.count('e')) for c in completions]\n")
    from tilt.reward_fns import import_reward

    reward = import_reward(f"{tmp_path / 'rw.py'}:count_e")
    prompts = ["the movie was", "i opened the box"]
    rewards = draw_reference_rewards(HFPolicy(model, tok, SamplingConfig(max_new_tokens=6)), prompts, 8, reward, seed=0)
    frontier_from_rewards(rewards, FrontierConfig(num_resamples=20), meta={"max_new_tokens": 6}, prompts=prompts).save(tmp_path / "f.json")
    argv = ["--method", method, "--frontier", str(tmp_path / "f.json"), "--out", str(tmp_path / "runs"), "--model", str(tmp_path / "m"),
            "--reward", f"{tmp_path / 'rw.py'}:count_e", "--steps", "4", "--eval-every", "2", "--eval-samples", "2",
            "--prompts-per-step", "2", "--samples-per-prompt", "2", "--lr", "1e-2"]
    return bench, argv


def test_benchmark_runs_a_method_resumably_and_reads_off_kl(tmp_path, capsys):
    bench, argv = tiny_benchmark(tmp_path, "kl-rl")
    assert bench.main(argv) == 0
    rec = json.loads((tmp_path / "runs" / "kl-rl.json").read_text())
    assert rec["done"] and [e["step"] for e in rec["evals"]] == [0, 2, 4]
    assert rec["evals"][0]["kl_ref"] == 0.0 and rec["evals"][-1]["kl_ref"] > 0
    capsys.readouterr()
    assert bench.main(argv) == 0 and "already done" in capsys.readouterr().out
    assert bench.main(["--table", "--frontier", str(tmp_path / "f.json"), "--out", str(tmp_path / "runs")]) == 0
    table = capsys.readouterr().out
    assert table.count("kl-rl ") == 4 and "unfinished" not in table and (tmp_path / "runs" / "frontier.png").is_file()
    assert f"{rec['train_seconds']:.0f}" in table and rec["config"]["lr"] == 1e-2  # the settings are kept
    # read-off: linear between the two evaluations that bracket the KL
    f = Frontier.load(tmp_path / "f.json")
    evals = [{"step": 0, "seconds": 0.0, "kl_ref": 0.0, "win_rate": 0.5, "win_rate_ci": [0.4, 0.6], "reward_mean": 0.0, "reward_mean_ci": [0, 0]},
             {"step": 10, "seconds": 10.0, "kl_ref": 1.0, "win_rate": 0.7, "win_rate_ci": [0.6, 0.8], "reward_mean": 1.0, "reward_mean_ci": [0, 2]}]
    r = bench.read_off(evals, 0.5, f)
    assert r["win_rate"] == pytest.approx(0.6) and r["step"] == pytest.approx(5) and r["win_rate_ci"] == pytest.approx([0.5, 0.7])
    assert r["efficiency"] == pytest.approx(0.1 / (f.wr_star(0.5) - 0.5))
    assert bench.read_off(evals, 2.0, f) is None


@pytest.mark.slow
def test_benchmark_variants_sit_side_by_side(tmp_path, capsys):
    """--tag saves a variant next to the method's own run; --kl-penalty full and --lora reach the recipe and the model."""
    bench, argv = tiny_benchmark(tmp_path, "kl-rl")
    assert bench.main(argv + ["--tag", "full", "--kl-penalty", "full"]) == 0
    assert bench.main(argv + ["--tag", "lora", "--lora", "2"]) == 0
    runs = tmp_path / "runs"
    full, lora = (json.loads((runs / f"kl-rl.{t}.json").read_text()) for t in ("full", "lora"))
    assert not (runs / "kl-rl.json").exists()
    assert full["config"]["kl_penalty"] == "full" and lora["config"]["kl_penalty"] == "reward"
    assert full["name"] == "kl-rl.full" and lora["args"]["lora"] == 2
    assert full["evals"][-1]["kl_ref"] > 0 and lora["evals"][-1]["kl_ref"] != 0
    capsys.readouterr()
    assert bench.main(["--table", "--frontier", str(tmp_path / "f.json"), "--out", str(runs)]) == 0
    table = capsys.readouterr().out
    assert table.count("kl-rl.full ") == 4 and table.count("kl-rl.lora ") == 4


@pytest.mark.slow
def test_benchmark_optimizers_reach_the_recipe(tmp_path):
    """--optimizer sgd reaches KLRLConfig; --optimizer kfac trains the linear layers of a Llama alone, records its
    Fisher, and refuses a GPT-2 (Conv1D projections) with a message that says so."""
    from safetensors.torch import load_file

    from tilt.engine.tiny import char_tokenizer, tiny_llama

    bench, argv = tiny_benchmark(tmp_path, "kl-rl")
    runs = tmp_path / "runs"
    assert bench.main(argv + ["--tag", "sgd", "--optimizer", "sgd"]) == 0
    sgd = json.loads((runs / "kl-rl.sgd.json").read_text())
    assert sgd["config"]["optimizer"] == "sgd" and sgd["evals"][-1]["kl_ref"] != 0 and sgd["train_prompts"] == 240
    assert bench.main(argv + ["--tag", "own", "--train-on-eval"]) == 0  # trains on the frontier's 2 prompts
    assert json.loads((runs / "kl-rl.own.json").read_text())["train_prompts"] == 2
    with pytest.raises(ValueError, match="Conv1D"):
        bench.main(argv + ["--tag", "kfac-gpt2", "--optimizer", "kfac"])
    with pytest.raises(ValueError, match="Conv1D"):
        bench.main(argv + ["--tag", "lin-gpt2", "--linear-only"])
    tok = char_tokenizer("abcdefghijklmnopqrstuvwxyz ,.;:'")
    tiny_llama(len(tok), hidden_size=16, intermediate_size=32, heads=2, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id).save_pretrained(tmp_path / "m")
    kfac_argv = [a if a != "1e-2" else "0.05" for a in argv] + ["--tag", "kfac", "--optimizer", "kfac", "--fisher-samples", "8",
                                                                "--keep-weights"]
    assert bench.main(kfac_argv) == 0
    kfac = json.loads((runs / "kl-rl.kfac.json").read_text())
    assert kfac["config"]["optimizer"] == "kfac" and kfac["config"]["kl_per_step"] == 0.05
    assert kfac["config"]["fisher_sequences"] == 8 and kfac["evals"][-1]["kl_ref"] > 0
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(tmp_path / "m").state_dict()
    trained = load_file(kfac["weights"])
    moved = {k for k, v in trained.items() if k in initial and not torch.equal(v, initial[k])}
    assert moved and all(k.endswith("proj.weight") for k in moved)
    assert bench.main(argv + ["--tag", "lin", "--linear-only", "--keep-weights"]) == 0  # AdamW on the same parameters
    lin = json.loads((runs / "kl-rl.lin.json").read_text())
    assert lin["config"]["linear_only"] and lin["config"]["optimizer"] == "adamw"
    moved = {k for k, v in load_file(lin["weights"]).items() if k in initial and not torch.equal(v, initial[k])}
    assert moved and all(k.endswith("proj.weight") for k in moved)


@pytest.mark.slow
def test_benchmark_merges_kept_runs_and_walks_toward_the_reference(tmp_path, capsys):
    """--keep-weights saves each run; --method merge evaluates theta_ref + lam (mean theta_m - theta_ref): lam 0 is the
    reference itself (KL 0), lam 1 of one run that run's final policy; the merge's training time is its runs'."""
    from safetensors.torch import load_file

    bench, argv = tiny_benchmark(tmp_path, "kl-rl")
    runs = tmp_path / "runs"
    for seed in ("0", "1"):
        assert bench.main(argv + ["--tag", f"s{seed}", "--seed", seed, "--keep-weights"]) == 0
    s0 = json.loads((runs / "kl-rl.s0.json").read_text())
    assert s0["weights"] == str(runs / "kl-rl.s0.safetensors") and load_file(s0["weights"])
    base = argv[argv.index("--frontier"):argv.index("--steps")]  # frontier, out, model, reward
    assert bench.main(["--method", "merge", "--tag", "one", "--of", "kl-rl.s0", "--scales", "0", "1", *base,
                       "--eval-samples", "2"]) == 0
    one = json.loads((runs / "merge.one.json").read_text())
    assert [e["scale"] for e in one["evals"]] == [0.0, 1.0] and one["evals"][0]["kl_ref"] == 0.0
    assert one["evals"][1]["kl_ref"] > 0 and one["train_seconds"] == pytest.approx(s0["train_seconds"])
    assert bench.main(["--method", "merge", "--tag", "both", "--of", "kl-rl.s0", "kl-rl.s1", "--scales", "0", "0.5", "1", *base,
                       "--eval-samples", "2"]) == 0
    both = json.loads((runs / "merge.both.json").read_text())
    assert len(both["config"]["task_vector_cosines"]) == 1 and -1 <= both["config"]["task_vector_cosines"][0] < 1
    assert both["evals"][2]["kl_ref"] > 0 and both["done"]
    assert bench.main(["--method", "merge", "--tag", "diff", "--of", "kl-rl.s0", "kl-rl.s1", "--coefficients", "0.5", "-0.5",
                       "--scales", "0", "1", *base, "--eval-samples", "2"]) == 0
    diff = json.loads((runs / "merge.diff.json").read_text())
    assert diff["config"]["coefficients"] == [0.5, -0.5] and diff["evals"][1]["kl_ref"] != both["evals"][2]["kl_ref"]
    with pytest.raises(SystemExit):  # one coefficient per run
        bench.parse(["--method", "merge", "--of", "kl-rl.s0", "kl-rl.s1", "--coefficients", "1", *base])
    capsys.readouterr()
    assert bench.main(["--table", "--frontier", base[1], "--out", str(runs)]) == 0
    assert capsys.readouterr().out.count("merge.both ") == 4
    with pytest.raises(SystemExit, match="keep-weights"):
        bench.main(["--method", "merge", "--tag", "x", "--of", "kl-rl.missing", *base])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["vbon", "bond", "bonbon", "apo", "qrpo"])
def test_benchmark_runs_the_best_of_n_and_regression_methods(tmp_path, method):
    """Each method of docs/bon_distillation.md and docs/apo.md trains through the benchmark and moves off pi_ref."""
    bench, argv = tiny_benchmark(tmp_path, method)
    assert bench.main(argv + ["--best-of", "2", "--calibration-samples", "4"]) == 0
    rec = json.loads((tmp_path / "runs" / f"{method}.json").read_text())
    assert rec["done"] and [e["step"] for e in rec["evals"]] == [0, 2, 4]
    assert rec["evals"][0]["kl_ref"] == 0.0 and abs(rec["evals"][-1]["kl_ref"]) > 0


@pytest.mark.slow
def test_eval_reports_efficiency_against_a_frontier(tmp_path, capsys):
    from test_evaluate import PROMPTS, T, count_a, unigram_gpt2

    from tilt.cli import evaluate as eval_cli
    from tilt.engine.hf import HFPolicy, SamplingConfig
    from tilt.frontier import draw_reference_rewards

    for name, logits in {"flat": [-3.0, 0.0, -3.0, 0.0, 0.0], "likes_a": [-3.0, 0.0, -3.0, 1.5, 0.0]}.items():
        model, tok = unigram_gpt2(logits)
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (tmp_path / "rw.py").write_text("def count_a(prompts, completions, **k):\n    return [c.count('a') for c in completions]\n")
    model, tok = unigram_gpt2([-3.0, 0.0, -3.0, 0.0, 0.0])
    rewards = draw_reference_rewards(HFPolicy(model, tok, SamplingConfig(max_new_tokens=T)), PROMPTS, 64, count_a, seed=0)
    frontier_from_rewards(rewards, FrontierConfig(num_resamples=50), prompts=PROMPTS).save(tmp_path / "f.json")
    parser = argparse.ArgumentParser(prog="tilt")
    eval_cli.add_parser(parser.add_subparsers(required=True))
    args = parser.parse_args(["eval", "--model", str(tmp_path / "likes_a"), "--ref", str(tmp_path / "flat"), "--prompts",
                              str(tmp_path / "prompts.jsonl"), "--reward", f"{tmp_path / 'rw.py'}:count_a", "--samples", "32",
                              "--max-new-tokens", str(T), "--frontier", str(tmp_path / "f.json"), "--json"])
    capsys.readouterr()
    assert args.run(args) == 0
    m = json.loads(capsys.readouterr().out)
    f = Frontier.load(tmp_path / "f.json")
    assert m["frontier_win_rate"] == pytest.approx(f.wr_star(m["kl_ref"]))
    assert m["efficiency"] == pytest.approx((m["win_rate"] - 0.5) / (m["frontier_win_rate"] - 0.5))
    assert 0 < m["efficiency"] <= 1.2  # a unigram tilt toward 'a' is near the frontier for a count of 'a', never far above
    assert m["efficiency_ci"][0] < m["efficiency"] < m["efficiency_ci"][1]


def test_head_and_for_prompts_recompute_the_frontier_of_the_first_prompts():
    g = torch.Generator().manual_seed(3)
    rewards = torch.cat([torch.randint(0, 2, (3, 8), generator=g).double(), torch.randn(3, 8, generator=g)])  # ties, then none
    prompts = [f"p{i}" for i in range(6)]
    full = frontier_from_rewards(rewards, FrontierConfig(num_resamples=20), prompts=prompts, meta={"max_new_tokens": 7})
    head = full.head(3)
    # the frontier of the first three prompts' rows, not the whole set's: tied rewards are harder to win
    assert head.data["curves"] == frontier_from_rewards(rewards[:3], FrontierConfig(num_resamples=20)).data["curves"]
    assert head.wr_star(0.5) < full.wr_star(0.5) - 0.02
    assert head.data["prompts"] == prompts[:3] and head.data["meta"]["max_new_tokens"] == 7
    assert head.data["meta"]["prompts"] == 3 and full.head(6) is full
    assert full.for_prompts(prompts[:3]).data["ref_rewards"] == head.data["ref_rewards"]
    with pytest.raises(ValueError, match="prompt 1 differs"):
        full.for_prompts(["p0", "q1"])
    with pytest.raises(ValueError, match="has 6 prompts; 7 are evaluated"):
        full.for_prompts(prompts + ["p6"])
    with pytest.raises(ValueError, match="asked for the first 9"):
        full.head(9)


def test_frontier_evaluation_reads_the_kl_over_the_whole_vocabulary():
    """evaluate_on_frontier's kl_ref is sum_t KL_t over the vocabulary: on unigram models, where the exact KL is known
    by enumeration, it and the k1 log-ratio (kl_ref_k1) both cover it, and its interval is several times narrower."""
    from test_evaluate import PROMPTS, T, count_a, exact_quantities, unigram_gpt2

    from tilt.engine.hf import HFPolicy, SamplingConfig
    from tilt.frontier import draw_reference_rewards, evaluate_on_frontier

    flat, tok = unigram_gpt2([-3.0, 0.0, -3.0, 0.0, 0.0])
    likes_a, _ = unigram_gpt2([-3.0, 0.0, -3.0, 1.5, 0.0])
    sampling = SamplingConfig(max_new_tokens=T)
    ref, policy = HFPolicy(flat, tok, sampling), HFPolicy(likes_a, tok, sampling)
    rewards = draw_reference_rewards(ref, PROMPTS, 16, count_a, seed=0)
    frontier = frontier_from_rewards(rewards, FrontierConfig(num_resamples=50), prompts=PROMPTS)
    m, draws = evaluate_on_frontier(frontier, policy, ref, count_a, samples_per_prompt=32, seed=1, num_resamples=400)
    exact_kl = exact_quantities(likes_a, flat)["kl"]
    assert exact_kl > 0.1
    assert m["kl_ref_ci"][0] <= exact_kl <= m["kl_ref_ci"][1], (m["kl_ref_ci"], exact_kl)
    assert m["kl_ref_k1_ci"][0] <= exact_kl <= m["kl_ref_k1_ci"][1], (m["kl_ref_k1_ci"], exact_kl)
    width = lambda key: m[f"{key}_ci"][1] - m[f"{key}_ci"][0]  # noqa: E731
    assert width("kl_ref") < 0.5 * width("kl_ref_k1"), (width("kl_ref"), width("kl_ref_k1"))
    assert m["frontier_win_rate"] == pytest.approx(frontier.wr_star(m["kl_ref"]))
    # per sample, the full KL is the conditional expectation of the log-ratio given the prefixes: same mean, less spread
    assert draws.seq_kl_full.var() < draws.seq_log_ratio.var()


@pytest.mark.slow
def test_kl_decomposition_splits_the_kl_at_the_entropy_floor(tmp_path, capsys):
    """benchmarks/kl_decomposition.py: the reference at a temperature spends its whole KL on its entropy (floor share
    1); a perturbed policy has a floor no larger than its KL; the reference itself has KL 0."""
    from safetensors.torch import save_model

    from tilt.engine.tiny import char_tokenizer, tiny_llama

    spec = importlib.util.spec_from_file_location("kl_decomposition", ROOT / "benchmarks" / "kl_decomposition.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    tok = char_tokenizer("abcdefghijklmnopqrstuvwxyz ,.;:'")
    model = tiny_llama(len(tok), hidden_size=16, intermediate_size=32, heads=2, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.no_grad():  # logits far from uniform (the tied embedding is the LM head), so that tempering costs KL
        model.get_input_embeddings().weight.mul_(20.0)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    save_model(model, str(tmp_path / "moved.safetensors"))
    (tmp_path / "rw.py").write_text("def count_e(prompts, completions, **k):\n    return [float(c.count('e')) for c in completions]\n")
    out = tmp_path / "rows.json"
    assert script.main(["--model", str(tmp_path / "m"), "--reward", f"{tmp_path / 'rw.py'}:count_e", "--weights",
                        str(tmp_path / "moved.safetensors"), "--scales", "0", "1", "--temperatures", "0.7", "--prompts", "8",
                        "--samples", "2", "--max-new-tokens", "5", "--out", str(out)]) == 0
    tempered, ref_itself, moved = json.loads(out.read_text())["rows"]
    assert tempered["kl"] > 0.05 and tempered["floor_share"] == pytest.approx(1.0, abs=1e-3)
    assert abs(ref_itself["kl"]) < 1e-5 and ref_itself["floor"] < 1e-5
    assert moved["kl"] > 0.05 and 0 <= moved["floor"] <= moved["kl"] + 1e-9
    assert "entropy floor" in capsys.readouterr().out


def test_goal_check_says_how_far_the_runs_are_from_the_goals():
    spec = importlib.util.spec_from_file_location("bench_frontier_goals", ROOT / "benchmarks" / "frontier.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def rec(method, eff, lo, hi, done=True, own=False):
        return {"method": method, "done": done, "args": {"train_on_eval": own},
                "read_off": {"1.0": {"efficiency": eff, "efficiency_ci": [lo, hi]}}}

    records = {"kl-rl": rec("kl-rl", 0.45, 0.3, 0.6), "ctrl": rec("ctrl", 0.55, 0.4, 0.7),
               "kl-rl.own": rec("kl-rl", 0.99, 0.95, 1.0, own=True),  # trained on the evaluated prompts: not held out
               "dpg": rec("dpg", 0.97, 0.9, 1.0, done=False),  # unfinished
               "trl-rloo": rec("trl-rloo", 0.2, 0.1, 0.29)}
    lines = bench.goal_check(records)
    assert "ctrl 0.55 [0.40, 0.70] against 0.9: short by 0.35 (the interval's top is 0.20 short)" in lines[1]
    assert "kl-rl 0.45 [0.30, 0.60] against 0.7: short by 0.25 (the interval's top is 0.10 short)" in lines[2]
    assert "difference +0.35: the intervals separate" in lines[3]
    records["trl-rloo"] = rec("trl-rloo", 0.5, 0.35, 0.8)
    records["kl-rl"] = rec("kl-rl", 0.75, 0.72, 0.9)
    lines = bench.goal_check(records)
    assert "kl-rl 0.75 [0.72, 0.90] against 0.7: met" in lines[2] and "short by 0.15, within the interval" in lines[1]
    assert "the intervals overlap" in lines[3]
    assert "no TRL run" in bench.goal_check({"kl-rl": rec("kl-rl", 0.5, 0.4, 0.6)})[-1]
