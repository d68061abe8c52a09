"""tilt eval / tilt sample / tilt report, on tiny GPT-2s whose next-token distribution is a fixed unigram (so that
every sequence probability, the KL and the win rate are known exactly by enumeration), and on hand-written runs."""
import argparse
import itertools
import json
import math

import pytest
import torch

from tilt.cli import evaluate as eval_cli
from tilt.cli import report as report_cli
from tilt.engine.hf import HFPolicy, SamplingConfig
from tilt.engine.tiny import char_tokenizer, tiny_gpt2
from tilt.evaluation import EvalConfig, bootstrap_mean, evaluate, target_diagnostics
from tilt.lab.tabular import TabularPolicy, random_tabular_policy
from tilt.lab.world import TableReward
from tilt.math import exact
from tilt.math.infalign import exact_win_rate
from tilt.recipes import kl_rl
from tilt.report import build_report, load_run

ALPHABET = "ab"  # ids: <pad> 0, <eos> 1, <unk> 2, a 3, b 4
EOS, A, B = 1, 3, 4
T = 4  # max new tokens
LOGITS = {"flat": [-3.0, 0.0, -3.0, 0.0, 0.0], "likes_a": [-3.0, 0.0, -3.0, 1.5, 0.0],
          "flat_no_eos": [-3.0, -30.0, -3.0, 0.0, 0.0], "likes_a_no_eos": [-3.0, -30.0, -3.0, 1.5, 0.0]}
PROMPTS = ["ab", "b", "aab", "ba"]

REWARD_FILE = """
def count_a(prompts, completions, **columns):
    return [c.count("a") for c in completions]

def count_letter(prompts, completions, letter, **columns):
    return [c.count(l) for c, l in zip(completions, letter)]
"""


def unigram_gpt2(logits, alphabet=ALPHABET):
    """A GPT-2 whose output ignores its input: the final layer norm has zero gain and a bias chosen so that the
    logits are exactly ``logits`` (the tied unembedding has full row rank), i.e. tokens are i.i.d. softmax(logits)."""
    tok = char_tokenizer(alphabet)
    model = tiny_gpt2(len(tok), n_layer=1, n_embd=16, n_head=1, seed=0)
    w = model.lm_head.weight.detach().double()  # (V, E)
    target = torch.tensor(logits, dtype=torch.float64).unsqueeze(-1)
    bias = torch.linalg.lstsq(w, target).solution.squeeze(-1)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(bias.float())
    return model, tok


def token_logprobs_of(model):
    with torch.no_grad():
        return torch.log_softmax(model.lm_head(model.transformer.ln_f.bias).double(), -1)  # (V,)


def enumerate_sequences(vocab: int, max_len: int):
    """Every completion the sampler can produce: token tuples ending at the first EOS, or max_len tokens without one."""
    for n in range(1, max_len + 1):
        for seq in itertools.product(range(vocab), repeat=n):
            if EOS in seq[:-1]:
                continue
            if n < max_len and seq[-1] != EOS:
                continue
            yield seq


def exact_quantities(model_p, model_q):
    """Exact E_p[count of a], E_q[...], KL(p || q) and W(p > q) over all completions."""
    lp, lq = token_logprobs_of(model_p), token_logprobs_of(model_q)
    seqs = list(enumerate_sequences(len(lp), T))
    logp = torch.stack([lp[list(s)].sum() for s in seqs])
    logq = torch.stack([lq[list(s)].sum() for s in seqs])
    reward = torch.tensor([float(s.count(A)) for s in seqs], dtype=torch.float64)
    assert abs(logp.exp().sum().item() - 1) < 1e-9 and abs(logq.exp().sum().item() - 1) < 1e-9
    return {
        "reward_p": (logp.exp() * reward).sum().item(),
        "reward_q": (logq.exp() * reward).sum().item(),
        "kl": exact.kl(logp, logq).item(),
        "win_rate": exact_win_rate(logp.exp(), logq.exp(), reward).item(),
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    for name, logits in LOGITS.items():
        model, tok = unigram_gpt2(logits)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    model, tok = unigram_gpt2(LOGITS["flat"])  # the same weights in another folder: a second copy is loaded
    model.save_pretrained(root / "flat_copy")
    tok.save_pretrained(root / "flat_copy")
    model, tok = unigram_gpt2([-3.0, 0.0, -3.0, 0.0, 0.0, 0.0], alphabet="abc")
    model.save_pretrained(root / "other_vocab")
    tok.save_pretrained(root / "other_vocab")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "letter": "a"}) + "\n" for p in PROMPTS))
    (root / "rewards.py").write_text(REWARD_FILE)
    return root


def policy_of(world, name):
    from tilt.engine.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(world / name))
    return HFPolicy(model, tok, SamplingConfig(max_new_tokens=T))


def count_a(prompts, completions, **columns):
    return [c.count("a") for c in completions]


def cli(argv, capsys):
    parser = argparse.ArgumentParser(prog="tilt")
    sub = parser.add_subparsers(required=True)
    eval_cli.add_parser(sub)
    report_cli.add_parser(sub)
    args = parser.parse_args([str(a) for a in argv])
    capsys.readouterr()
    assert args.run(args) == 0
    return capsys.readouterr().out


def eval_json(world, capsys, model, ref, *extra, samples=16, reward="count_a"):
    out = cli(["eval", "--model", world / model, "--ref", world / ref, "--prompts", world / "prompts.jsonl",
               "--reward", f"{world / 'rewards.py'}:{reward}", "--samples", samples, "--max-new-tokens", T, "--json", *extra], capsys)
    return json.loads(out)


def inside(value, interval):
    return interval[0] <= value <= interval[1]


# --- the math -------------------------------------------------------------------------------------------------------
def test_bootstrap_mean_is_the_mean_and_covers_the_truth():
    g = torch.Generator().manual_seed(0)
    est, low, high = bootstrap_mean(torch.full((3, 5), 2.5), generator=g, num_resamples=50)
    assert (est, low, high) == (2.5, 2.5, 2.5)
    values = torch.randn(4, 6, generator=g, dtype=torch.float64)
    assert bootstrap_mean(values, generator=g, num_resamples=50)[0] == pytest.approx(values.mean().item(), abs=1e-15)
    covered = 0
    for _ in range(100):  # 4 prompts x 16 samples of N(1, 1): the 95% interval covers 1 about 95+% of the time
        _, low, high = bootstrap_mean(1 + torch.randn(4, 16, generator=g, dtype=torch.float64), generator=g, num_resamples=300)
        covered += low <= 1 <= high
    assert covered >= 88


# --- tilt eval --------------------------------------------------------------------------------------------------------
def test_intervals_cover_the_exact_kl_reward_and_win_rate(world):
    truth = exact_quantities(unigram_gpt2(LOGITS["likes_a"])[0], unigram_gpt2(LOGITS["flat"])[0])
    assert truth["kl"] > 0.1 and truth["win_rate"] > 0.6  # the test has something to detect
    policy, ref = policy_of(world, "likes_a"), policy_of(world, "flat")
    m = evaluate(EvalConfig(samples_per_prompt=64, seed=1), policy, ref, count_a, PROMPTS).metrics
    assert inside(truth["kl"], m["kl_ref_ci"]) and inside(truth["kl"], m["kl_ref_k3_ci"])
    assert inside(truth["win_rate"], m["win_rate_ci"])
    assert inside(truth["reward_p"], m["reward_mean_ci"]) and inside(truth["reward_q"], m["ref_reward_mean_ci"])
    assert m["kl_ref"] == pytest.approx(truth["kl"], abs=0.15) and m["win_rate"] == pytest.approx(truth["win_rate"], abs=0.06)


def test_model_against_itself(world, capsys):
    for ref in ("flat", "flat_copy"):  # the same object, and a second copy loaded from another folder
        m = eval_json(world, capsys, "flat", ref)
        for key in ("reward_mean", "kl_ref", "win_rate"):
            assert isinstance(m[key], float)
        assert len(m["win_rate_ci"]) == 2 and m["win_rate_ci"][0] < m["win_rate_ci"][1]
        assert inside(0.5, m["win_rate_ci"]) and 0.3 < m["win_rate"] < 0.7
        assert inside(0.0, m["kl_ref_ci"]) and m["kl_ref"] == pytest.approx(0.0, abs=1e-5)
        assert inside(m["reward_mean"], m["ref_reward_mean_ci"]) or inside(m["ref_reward_mean"], m["reward_mean_ci"])
        assert m["prompts"] == len(PROMPTS) and m["samples_per_prompt"] == 16


def test_a_model_with_higher_reward_wins_and_has_positive_kl(world, capsys):
    m = eval_json(world, capsys, "likes_a", "flat", "--best-of", 4)
    assert m["reward_mean"] > m["ref_reward_mean"]
    assert m["win_rate_ci"][0] > 0.5 and m["kl_ref_ci"][0] > 0
    assert m["win_rate_bon"] > 0.5 and m["win_rate_won"] > 0.5 and m["best_of"] == 4
    reverse = eval_json(world, capsys, "flat", "likes_a")
    assert reverse["win_rate_ci"][1] < 0.5


def test_columns_of_the_data_reach_the_reward(world, capsys):
    by_column = eval_json(world, capsys, "likes_a", "flat", reward="count_letter")
    plain = eval_json(world, capsys, "likes_a", "flat")
    for key in ("reward_mean", "win_rate", "win_rate_ci", "kl_ref"):
        assert by_column[key] == plain[key]


def test_intervals_shrink_with_more_samples(world):
    policy, ref = policy_of(world, "likes_a"), policy_of(world, "flat")
    width = {}
    for k in (8, 64):
        m = evaluate(EvalConfig(samples_per_prompt=k, num_resamples=400), policy, ref, count_a, PROMPTS).metrics
        width[k] = {key: m[f"{key}_ci"][1] - m[f"{key}_ci"][0] for key in ("reward_mean", "kl_ref", "win_rate")}
    for key in width[8]:
        assert width[64][key] < 0.7 * width[8][key], key


def test_eval_table_and_clear_errors(world, capsys):
    out = cli(["eval", "--model", world / "likes_a", "--ref", world / "flat", "--prompts", world / "prompts.jsonl",
               "--reward", f"{world / 'rewards.py'}:count_a", "--samples", 8, "--max-new-tokens", T, "--best-of", 4], capsys)
    assert "win rate vs reference" in out and "best-of-4 win rate" in out and "KL(model || ref), k1" in out
    with pytest.raises(ValueError, match="multiple"):
        EvalConfig(samples_per_prompt=10, best_of=4)
    with pytest.raises(ValueError, match="different tokenizers"):
        eval_json(world, capsys, "flat", "other_vocab")
    with pytest.raises(FileNotFoundError):
        eval_json(world, capsys, "missing_model", "flat")


# --- tilt sample ------------------------------------------------------------------------------------------------------
def test_best_of_n_returns_the_highest_reward_sample(world, capsys):
    reward = f"{world / 'rewards.py'}:count_a"
    base = ["sample", "--model", world / "flat", "--prompts", world / "prompts.jsonl", "--reward", reward,
            "--max-new-tokens", T, "--n", 3, "--json"]
    best = json.loads(cli(base + ["--best-of", 4], capsys))
    assert best["mode"] == "best-of-n" and len(best["samples"]) == 3 * len(PROMPTS)
    assert any(len(set(r["candidate_rewards"])) > 1 for r in best["samples"])
    for r in best["samples"]:
        assert len(r["candidate_rewards"]) == 4
        assert r["reward"] == max(r["candidate_rewards"]) == r["candidate_rewards"][r["index"]] == r["completion"].count("a")
    worst = json.loads(cli(base + ["--worst-of", 4], capsys))
    for r in worst["samples"]:
        assert r["reward"] == min(r["candidate_rewards"]) == r["completion"].count("a")
    assert best["mean_reward"] > best["mean_candidate_reward"] > worst["mean_reward"]


def test_qrs_and_sir_weights_are_the_tilt(world, capsys):
    reward = f"{world / 'rewards.py'}:count_a"
    base = ["sample", "--model", world / "flat", "--prompts", world / "prompts.jsonl", "--reward", reward, "--max-new-tokens", T,
            "--json", "--beta", 0.5]
    qrs = json.loads(cli(base + ["--qrs-beta", 2.0, "--candidates", 64], capsys))  # one prompt per sampling call
    assert 0 < qrs["accepted"] < 4 * 64 and qrs["acceptance_rate"] == qrs["accepted"] / (4 * 64)
    assert {r["prompt"] for r in qrs["samples"]} == set(PROMPTS)
    for r in qrs["samples"]:  # proposal = reference: log w = r / beta
        assert r["log_weight"] == pytest.approx(r["reward"] / 0.5) and r["reward"] == r["completion"].count("a")
    sir = json.loads(cli(base + ["--sir", 32, "--n", 5], capsys))
    assert len(sir["samples"]) == 5 * len(PROMPTS) and 1 <= sir["ess"] <= 32
    for r in sir["samples"]:
        assert r["log_weight"] == pytest.approx(r["reward"] / 0.5)
    with pytest.raises(ValueError, match="--beta"):
        cli(["sample", "--model", world / "flat", "--prompt", "ab", "--reward", reward, "--sir", 4], capsys)
    with pytest.raises(ValueError, match="reward"):
        cli(["sample", "--model", world / "flat", "--prompt", "ab", "--best-of", 4], capsys)


# --- tilt report ------------------------------------------------------------------------------------------------------
def write_run(folder, *, scale=1.0, steps=12, win_rates=True):
    folder.mkdir(parents=True)
    with open(folder / "metrics.jsonl", "w") as f:
        for s in range(steps):
            kl = scale * 0.05 * s
            row = {"step": s, "reward": 0.1 + math.sqrt(kl), "kl_ref": kl, "loss": 1.0 / (s + 1)}
            if win_rates and s % 3 == 0:
                row.update(win_rate=0.5 + kl / 4, win_rate_low=0.4, win_rate_bon=0.5 + kl / 3)
            f.write(json.dumps(row) + "\n")
    with open(folder / "samples.jsonl", "w") as f:
        for s in (0, steps // 2, steps):
            for p in ["The film was", "<b>bold</b> & 'odd'"]:
                f.write(json.dumps({"step": s, "prompt": p, "completion": f"at step {s}: <script>alert(1)</script>", "reward": s / 10}) + "\n")
    (folder / "config.yaml").write_text("recipe: kl_rl\nnote: <i>not html</i>\n")


def test_report_writes_pngs_and_an_escaped_html_page(tmp_path, capsys):
    write_run(tmp_path / "run_a")
    write_run(tmp_path / "run_b", scale=2.0, win_rates=False)
    out = cli(["report", tmp_path / "run_a", "--compare", tmp_path / "run_b"], capsys)
    page = tmp_path / "run_a" / "report" / "report.html"
    assert out.strip() == str(page)
    from matplotlib.image import imread

    for name in ("reward", "kl", "tradeoff", "win_rate"):
        png = page.parent / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width = imread(png).shape[:2]
        assert height > 200 and width > 300
    text = page.read_text()
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; &#x27;odd&#x27;" in text and "&lt;i&gt;not html&lt;/i&gt;" in text
    assert text.count("data:image/png;base64,") == 6  # the four comparison plots, and each run's loss (its recipe's page)
    assert "at step 0:" in text and "at step 12:" in text and "at step 6:" not in text  # before = first, after = last
    assert "run_a" in text and "run_b" in text


def test_report_without_win_rates_or_samples(tmp_path):
    write_run(tmp_path / "run", win_rates=False)
    (tmp_path / "run" / "samples.jsonl").unlink()
    page, plots = build_report(tmp_path / "run", out_dir=tmp_path / "out")
    assert sorted(plots) == ["1-run-loss", "kl", "reward", "tradeoff"] and not (tmp_path / "out" / "win_rate.png").exists()
    assert "No samples logged" in page.read_text()


def test_report_fails_clearly_on_a_missing_or_empty_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory not found"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        load_run(tmp_path / "empty")
    (tmp_path / "empty" / "metrics.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no metrics"):
        load_run(tmp_path / "empty")
    (tmp_path / "empty" / "metrics.jsonl").write_text('{"step": 0, "reward": 1}\n{"step": 1, "rew\n')
    with pytest.raises(ValueError, match="line 2"):
        load_run(tmp_path / "empty")


def test_recorded_evaluations_reach_the_report(world, tmp_path, capsys):
    write_run(tmp_path / "run", win_rates=False)
    recorded = [eval_json(world, capsys, model, "flat", "--best-of", 4, "--record", tmp_path / "run", samples=8)
                for model in ("flat", "likes_a")]
    run = load_run(tmp_path / "run")
    assert [row["win_rate"] for row in run.evals] == [m["win_rate"] for m in recorded]
    assert run.evals[1]["win_rate_ci"] == recorded[1]["win_rate_ci"]
    page, plots = build_report(tmp_path / "run")
    assert "eval" in plots and "win_rate" not in plots
    text = page.read_text()
    assert "Evaluations" in text and f"{recorded[1]['kl_ref']:.4g}" in text
    with pytest.raises(FileNotFoundError, match="--record"):
        eval_json(world, capsys, "flat", "flat", "--record", tmp_path / "nope", samples=4)


# --- the tilted-target diagnostics (--beta) ---------------------------------------------------------------------------
def tabular_setting(beta: float):
    """Two contexts, V = L = 3: a reference, a random reward table, and the exact pi* ∝ ref exp(r/beta) per context."""
    ref = random_tabular_policy(3, 3, contexts=2, seed=4)
    table = torch.rand(2, 27, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2
    with torch.no_grad():
        log_p = ref.support_logprobs() + table / beta  # (C, N) log P
    log_z = log_p.logsumexp(-1, keepdim=True)  # (C, 1)
    return ref, table, TableReward(table, 3, 3), log_p - log_z, log_z.squeeze(-1)


def exact_target_diagnostics(log_pi, log_star, log_z):
    """The exact values behind the target_* estimates, averaged over contexts as the estimates are."""
    log_m = torch.logaddexp(log_pi, log_star) - math.log(2)
    return {"log_z": log_z.mean().item(), "kl_target_policy": exact.kl(log_star, log_pi).item(),
            "kl_policy_target": exact.kl(log_pi, log_star).item(), "tv": exact.total_variation(log_pi, log_star).item(),
            "js": (0.5 * exact.kl(log_pi, log_m) + 0.5 * exact.kl(log_star, log_m)).item()}


def test_target_diagnostics_agree_with_the_kl_rl_recipe_on_the_same_samples():
    beta = 0.5
    ref, _, reward, _, _ = tabular_setting(beta)
    policy = random_tabular_policy(3, 3, contexts=2, seed=6)
    config = kl_rl.KLRLConfig(beta=beta, samples_per_prompt=8, prompts_per_step=4, optimizer="sgd", lr=0.0)
    prompts, seeds = [0, 1, 1, 0], [11, 12, 13, 14]
    logged = kl_rl.kl_rl_step(config, policy, ref, reward, prompts, torch.optim.SGD(policy.parameters(), lr=0.0), seeds)
    rollout = policy.sample(prompts, 8, prompt_seeds=seeds)  # the step's samples again (seeded by prompt)
    with torch.no_grad():
        log_ratio = policy.token_logprobs(rollout).sum(-1) - ref.token_logprobs(rollout).sum(-1)
    ours = target_diagnostics(reward(rollout.prompts, rollout.completions).view(4, 8), log_ratio.view(4, 8), beta=beta)
    recipe = {key: value for key, value in logged.items() if key.startswith("target_")}
    assert len(recipe) == 22 and set(ours) == set(recipe)
    assert recipe["target_kl_target_policy"] > 0.05 and recipe["target_ess_fraction"] < 0.9  # pi is not pi*
    for key, value in recipe.items():
        assert ours[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_eval_target_diagnostics_cover_the_exact_values():
    beta = 1.0
    ref, _, reward, log_star, log_z = tabular_setting(beta)
    star = TabularPolicy.from_sequence_logprobs(3, 3, log_star)
    other = random_tabular_policy(3, 3, contexts=2, seed=6, scale=0.5)
    for name, policy in (("ref", ref), ("other", other)):
        with torch.no_grad():
            truth = exact_target_diagnostics(policy.support_logprobs(), log_star, log_z)
        assert truth["kl_target_policy"] > 0.1 and truth["tv"] > 0.1, name  # there is something to estimate
        covered = dict.fromkeys(truth, 0)
        for seed in range(10):  # 95% intervals: about 9.5 of 10 seeds cover (over 40 seeds, 38 to 40 of 40 per key)
            m = evaluate(EvalConfig(samples_per_prompt=400, num_resamples=10, seed=seed, beta=beta), policy, ref, reward, [0, 1]).metrics
            for key, value in truth.items():
                covered[key] += m[f"target_{key}_lower"] <= value <= m[f"target_{key}_upper"]
            assert 0 < m["target_ess_fraction"] < 0.9 and m["beta"] == beta
        assert min(covered.values()) >= 8, (name, covered)
    config = EvalConfig(samples_per_prompt=400, num_resamples=10, beta=beta)
    m = evaluate(config, star, ref, reward, [0, 1]).metrics  # pi = pi*: every weight pi*/pi is Z
    assert m["target_log_z"] == pytest.approx(log_z.mean().item(), abs=1e-9) and m["target_log_z_stderr"] < 1e-9
    assert m["target_ess_fraction"] == pytest.approx(1.0, abs=1e-9) and m["target_ess"] == pytest.approx(400, abs=1e-6)
    for key in ("kl_target_policy", "kl_policy_target", "tv", "js"):
        assert m[f"target_{key}"] == pytest.approx(0.0, abs=1e-9), key


def test_eval_beta_flag_on_a_model_that_is_its_target(world, capsys):
    # without EOS every completion has T tokens, and a unigram law tilted by exp(1.5 * count of a) is the unigram law
    # with logit +1.5 on a: the model is pi* ∝ ref exp(r / beta) for beta = 1/1.5 exactly (up to the e^-30 EOS mass)
    m = eval_json(world, capsys, "likes_a_no_eos", "flat_no_eos", "--beta", 1 / 1.5)
    assert m["target_ess_fraction"] == pytest.approx(1.0, abs=1e-4) and m["target_kl_target_policy"] == pytest.approx(0.0, abs=1e-4)
    exact_log_z = T * math.log((math.exp(1.5) + 1 + 2 * math.exp(-3)) / (2 + 2 * math.exp(-3)))  # per token, over T
    assert m["target_log_z"] == pytest.approx(exact_log_z, abs=1e-4)
    away = eval_json(world, capsys, "flat_no_eos", "flat_no_eos", "--beta", 1 / 1.5)  # pi = pi_ref
    assert away["target_log_z_lower"] <= exact_log_z <= away["target_log_z_upper"]
    assert away["target_kl_target_policy_lower"] > 0.1 and away["target_ess_fraction"] < 0.9
    out = cli(["eval", "--model", world / "likes_a", "--ref", world / "flat", "--prompts", world / "prompts.jsonl",
               "--reward", f"{world / 'rewards.py'}:count_a", "--samples", 8, "--max-new-tokens", T, "--beta", 0.5], capsys)
    assert "KL(pi* || model)" in out and "ESS" in out and "tilted target" in out
    assert "target_log_z" not in eval_json(world, capsys, "likes_a", "flat", samples=4)  # off without --beta
    with pytest.raises(ValueError, match="beta must be > 0"):
        EvalConfig(beta=0.0)
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        EvalConfig(samples_per_prompt=1, beta=1.0)
