"""``tilt eval``: reward, KL to a reference and win rates of a model on held-out prompts, with intervals.
``tilt sample``: completions of a model, plain or through an inference procedure (best-of-N, worst-of-N,
quasi-rejection sampling, importance resampling).

Both take any local Hugging Face causal LM folder (a ``from_pretrained`` folder, such as a run's ``final/`` or a
checkpoint) or a hub id already in the local cache; weights load from safetensors only.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tilt.cli.output import fmt, print_json, table

DEFAULT_SAMPLES = 16


# --- shared -------------------------------------------------------------------------------------------------------
def _model_options(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--model", metavar="PATH", required=required, help="the model: a from_pretrained folder (e.g. RUN/final) or a cached hub id")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="T", help="completion length limit in tokens (default 32)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same samples (default 0)")
    p.add_argument("--batch-size", type=int, default=64, metavar="B", 
                   help="sequences per sampling call; lower it if memory runs out (default 64)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, metavar="N", 
                   help="token budget of a prompt; longer ones are cut from the left (default: no limit)")
    p.add_argument("--trust-remote-code", action="store_true", 
                   help="run code shipped with the model (off by default: only for models you trust)")


def _load_policy(spec: str, sampling, *, trust_remote_code: bool):
    from tilt.engine.hf import HFPolicy
    from tilt.engine.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(spec, trust_remote_code=trust_remote_code)
    return HFPolicy(model, tokenizer, sampling)


def _load_ref(spec: str | None, policy, model_spec: str, sampling, *, trust_remote_code: bool):
    """The reference: the policy object itself when it names the same model, else a second model that must share
    the policy's tokenizer (log-probs of one model's tokens under another's vocabulary mean nothing)."""
    if spec is None or Path(spec).expanduser().resolve() == Path(model_spec).expanduser().resolve():
        return policy
    ref = _load_policy(spec, sampling, trust_remote_code=trust_remote_code)
    if ref.tokenizer.get_vocab() != policy.tokenizer.get_vocab():
        raise ValueError(f"the reference {spec!r} and the model {model_spec!r} have different tokenizers; KL and "
                         "log-ratios need the same vocabulary: compare models fine-tuned from the same base")
    return ref


def _prompts(args, policy) -> tuple[list, dict, Any]:
    """(prompts, other columns, data) from --prompts FILE (the shape inferred from its columns and shown on stderr,
    rows read as the ``prompts`` shape, chats rendered with the tokenizer's template; each prompt plus
    --max-new-tokens checked against the model's context) or from --prompt TEXT (data None); --limit keeps the
    first rows."""
    from tilt.data import DataConfig
    from tilt.runs.setup import check_run_context, load_run_data

    if getattr(args, "prompt", None):
        check_run_context(list(args.prompt), policy.model.config, policy.tokenizer, max_new_tokens=args.max_new_tokens, path="--prompt")
        return list(args.prompt), {}, None
    config = DataConfig(fmt="prompts", max_prompt_tokens=args.max_prompt_tokens,
                        overlong="truncate" if args.max_prompt_tokens else "error")
    data = load_run_data(args.prompts, config, policy.tokenizer, log=lambda line: print(line, file=sys.stderr, flush=True))
    check_run_context(data, policy.model.config, policy.tokenizer, max_new_tokens=args.max_new_tokens, path=args.prompts)
    rows = data.rows[: args.limit] if args.limit else data.rows
    shared = set(rows[0]).intersection(*rows[1:]) - {"prompt", "messages"}
    return [r["prompt"] for r in rows], {k: [r[k] for r in rows] for k in sorted(shared)}, data


def _reward(specs, *, trust_remote_code: bool):
    """The sum of ``specs`` (``--reward A --reward B``; a weight as ``0.5*SPEC``), a ``tilt.rewards.Rewards``."""
    from tilt.reward_fns import reward_from_specs

    return reward_from_specs(specs, trust_remote_code=trust_remote_code)


def _bound(reward, data):
    """``reward`` bound to the prompts file's rows (``Rewards.for_data``): user functions get its columns and, for
    chats, messages, as TRL passes them. Unchanged without a file (--prompt)."""
    return reward.for_data(data) if data is not None and reward is not None else reward


def _progress(total: int, what: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="seq", desc=what, disable=None, file=sys.stderr, leave=False)


def _short(text: str, width: int = 70) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 3] + "..."


# --- tilt eval ----------------------------------------------------------------------------------------------------
def add_eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="reward, KL to a reference and win rate against it, with confidence intervals, on held-out prompts",
        description="Sample --samples completions of every prompt from the model and from the reference, score them "
        "with the reward, and print: the mean reward of each, KL(model || reference) estimated from the model's "
        "samples (k1: the summed log-ratio, and k3), and the win rate of the model against the reference (ties count "
        "one half), each with a bootstrap interval. With --best-of N, also best-of-N against best-of-N and "
        "worst-of-N against worst-of-N. With --beta B, also how far the model is from the tilted target "
        "pi* ∝ ref·exp(reward/B), by importance sampling on its samples. JSON keys are explained in docs/eval_and_sample.md.",
        epilog="Example: tilt eval --model runs/r1/final --ref base_model --prompts heldout.jsonl "
        "--reward rewards.py:positivity --samples 16 --json",
    )
    p.add_argument("run_dir", nargs="?", metavar="RUN", default=None,
                   help="a run directory of tilt train: its model (RUN/final, else the newest intact checkpoint), reference, "
                   "reward, prompts and sampling settings, from RUN/config.yaml; the flags below override them")
    _model_options(p, required=False)
    p.add_argument("--ref", metavar="PATH", default=None, help="the reference model to compare with (same tokenizer), usually the starting point")
    p.add_argument("--prompts", metavar="FILE", default=None, help="held-out prompts: JSONL/CSV/Parquet with a 'prompt' (or chat 'messages') column")
    p.add_argument("--limit", type=int, default=0, metavar="P", help="use only the first P prompts (default: all)")
    p.add_argument("--reward", action="extend", nargs="+", default=None, metavar="SPEC",
                   help="module:function, file.py:function, a reward-model folder, sentiment, length:chars, keywords:a,b, "
                   "regex:PAT, or WEIGHT*SPEC; several are summed (--reward A B, or --reward A --reward B, as in tilt train)")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, metavar="K", help=f"completions per prompt from each model (default {DEFAULT_SAMPLES})")
    p.add_argument("--best-of", type=int, default=0, metavar="N", help="also report best-of-N and worst-of-N win rates (K must be a multiple of N)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples per interval (default 1000)")
    p.add_argument("--level", type=float, default=0.95, help="coverage of the intervals (default 0.95)")
    p.add_argument("--beta", type=float, default=None, metavar="B",
                   help="also estimate, from the model's samples, how far it is from the tilted target pi* ∝ ref·exp(reward/B): "
                   "log Z, KL both ways, TV, JS (95%% intervals) and the ESS, the target_* keys the KL-RL recipe logs (default: off)")
    p.add_argument("--record", metavar="RUN_DIR", default=None,
                   help="also append the JSON object to RUN_DIR/evals.jsonl, for `tilt report` (win rate against KL across runs); "
                   "with --frontier, also copy the frontier file to RUN_DIR/frontier.json when RUN_DIR has none")
    p.add_argument("--show", type=int, default=3, metavar="M", help="sample pairs printed below the table (default 3; not with --json)")
    p.add_argument("--frontier", metavar="FILE", default=None,
                   help="a frontier.json of the same reference, reward and prompts (`tilt frontier`): also report the efficiency "
                   "(WR - 1/2)/(WR*(KL) - 1/2) at the model's own KL")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from tilt.engine.hf import SamplingConfig
    from tilt.evaluation import EvalConfig, evaluate

    if args.record and not Path(args.record).is_dir():  # before any sampling
        raise FileNotFoundError(f"--record: run directory not found: {args.record!r}")
    if args.run_dir is None and args.reward and (Path(args.reward[-1]) / "config.yaml").is_file():
        raise ValueError(f"--reward took the run directory {args.reward[-1]!r} as a reward spec: name the run first "
                         f"(tilt eval {args.reward[-1]} --reward ...)")
    if args.run_dir is not None:
        from_run(args)
    missing = [name for name in ("model", "ref", "prompts", "reward") if getattr(args, name) is None]
    if missing:
        raise ValueError(f"tilt eval needs --{' --'.join(missing)} (or a run directory: tilt eval RUN)")
    args.max_new_tokens = 32 if args.max_new_tokens is None else args.max_new_tokens
    frontier = None
    if args.frontier:
        from tilt.frontier import Frontier

        frontier = Frontier.load(args.frontier)
    config = EvalConfig(samples_per_prompt=args.samples, best_of=args.best_of, num_resamples=args.resamples, level=args.level,
                        batch_size=args.batch_size, seed=args.seed, beta=args.beta)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)  # exact sampling: the KL is of the model itself
    reward_fn = _reward(args.reward, trust_remote_code=args.trust_remote_code)
    policy = _load_policy(args.model, sampling, trust_remote_code=args.trust_remote_code)
    ref = _load_ref(args.ref, policy, args.model, sampling, trust_remote_code=args.trust_remote_code)
    prompts, columns, data = _prompts(args, policy)
    if frontier is not None:  # before any sampling: WR*(KL) is an average over the same prompts
        frontier = frontier.for_prompts(prompts, where=str(args.frontier))
    reward_fn = _bound(reward_fn, data)
    with _progress(2 * len(prompts) * args.samples, "sampling") as bar:
        result = evaluate(config, policy, ref, reward_fn, prompts, columns=columns, progress=bar.update)
    m = result.metrics
    report = {"model": args.model, "ref": args.ref, "reward": args.reward if len(args.reward) > 1 else args.reward[0],
              "max_new_tokens": args.max_new_tokens, "seed": args.seed,
              **({"data_format": data.fmt, "data_inferred": data.inferred, "data_shape": data.shape} if data is not None else {}), **m}
    if frontier is not None:
        report.update(frontier.efficiency(m))
    if args.record:
        if frontier is not None:
            keep_frontier(args.record, frontier, args.frontier)
        record_eval(args.record, report)
    if args.json:
        print_json(report)
        return 0
    pct = f"{round(100 * args.level)}%"
    print(f"\n{args.model} against {args.ref}: {m['prompts']} prompts x {m['samples_per_prompt']} samples from each, "
          f"reward {report['reward']}\n")
    rows = [("mean reward, model", "reward_mean"), ("mean reward, reference", "ref_reward_mean"),
            ("KL(model || ref), k1", "kl_ref"), ("KL(model || ref), k3", "kl_ref_k3"), ("win rate vs reference", "win_rate")]
    if args.best_of:
        rows += [(f"best-of-{args.best_of} win rate", "win_rate_bon"), (f"worst-of-{args.best_of} win rate", "win_rate_won")]
    nonneg = lambda key, v: max(v, 0.0) if key.startswith(("kl_", "target_kl", "target_tv", "target_js")) else v  # noqa: E731
    print(table(["quantity", "estimate", f"{pct} low", f"{pct} high"],
                [(name, m[k], *(nonneg(k, v) for v in m[f"{k}_ci"])) for name, k in rows]))
    print("(a KL, TV or JS cannot be negative: its interval is shown clipped at 0; --json gives the raw bounds)")
    if frontier is not None:
        e = report
        print(f"\nefficiency {e['efficiency']:.3f} [{e['efficiency_ci'][0]:.3f}, {e['efficiency_ci'][1]:.3f}] "
              f"(with the KL's and the frontier's uncertainty [{e['efficiency_ci_total'][0]:.3f}, {e['efficiency_ci_total'][1]:.3f}]): "
              f"the best win rate at KL {m['kl_ref']:.3f} is {e['frontier_win_rate']:.3f}"
              + (" (beyond the frontier's reach: under-stated)" if e["beyond_reach"] else ""))
    if args.beta is not None:
        print(f"\ntilted target pi* ∝ ref·exp(reward/{fmt(args.beta)}), importance-sampled from the model's samples "
              "(95% delta-method intervals; read the ESS first)\n")
        target_rows = [("log Z (mean over prompts)", "target_log_z"), ("KL(pi* || model)", "target_kl_target_policy"),
                       ("KL(model || pi*)", "target_kl_policy_target"), ("TV(model, pi*)", "target_tv"), ("JS(model, pi*)", "target_js")]
        print(table(["quantity", "estimate", "95% low", "95% high"],
                    [(name, m[k], nonneg(k, m[f"{k}_lower"]), nonneg(k, m[f"{k}_upper"])) for name, k in target_rows]))
        print(f"ESS {m['target_ess']:.1f} of {m['samples_per_prompt']} samples per prompt ({100 * m['target_ess_fraction']:.0f}%)")
    print(f"\nmean length {m['completion_length']:.1f} tokens (reference {m['ref_completion_length']:.1f}); "
          f"{100 * m['truncated_fraction']:.0f}% hit the length limit (reference {100 * m['ref_truncated_fraction']:.0f}%)")
    for i in range(min(args.show, len(prompts))):
        print(f"\nprompt:    {_short(str(prompts[i]))}")
        print(f"  model:     [{fmt(result.policy.rewards[i, 0].item())}] {_short(result.policy.completions[i][0])}")
        print(f"  reference: [{fmt(result.ref.rewards[i, 0].item())}] {_short(result.ref.completions[i][0])}")
    return 0


def from_run(args: argparse.Namespace) -> None:
    """Fill the unset options of ``tilt eval RUN`` from the run: the trained model (RUN/final, else the newest intact
    checkpoint; a pipeline's RL stage), its reference, reward, prompts and completion length."""
    from tilt.runs import directory as runs

    run = Path(args.run_dir)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{str(run)!r} is not a run directory of tilt train (no config.yaml)")
    config = runs.read_config(run)
    section = config.get("run") or {}
    if not section:
        raise ValueError(f"{run}/config.yaml has no run: section (a run of an older tilt): give --model, --ref, --prompts and --reward")
    pipeline = (run / "stages").is_dir() or config.get("recipe", "").startswith("demo")
    if args.model is None:
        if pipeline:
            model = run / "stages" / "rl"
        elif (run / "final").is_dir():
            model = run / "final"
        else:
            model, _ = runs.newest_intact_checkpoint(run)
        if model is None or not Path(model).is_dir():
            raise FileNotFoundError(f"{run} has no trained model yet (no final/ and no intact checkpoint)")
        args.model = str(model)
    if args.ref is None:
        args.ref = str(run / "stages" / "bc") if pipeline else (section.get("ref") or section.get("model"))
    if args.prompts is None:
        args.prompts = section.get("prompts") or None
    if args.reward is None and section.get("reward"):
        weights = section.get("reward_weights")
        specs = list(section["reward"])
        args.reward = specs if not weights else [f"{w}*{s}" for w, s in zip(weights, specs)]
    if args.max_new_tokens is None and isinstance(config.get("sampling"), dict):
        args.max_new_tokens = config["sampling"].get("max_new_tokens")
    print(f"# tilt eval {run}: model {args.model}, reference {args.ref}, prompts {args.prompts}, reward "
          f"{args.reward}", file=sys.stderr, flush=True)


def keep_frontier(run_dir: str, frontier, source: str) -> Path:
    """Save the frontier an evaluation was scored against (``source``'s, cut to the evaluated prompts) as
    RUN_DIR/frontier.json, for `tilt report` to draw the run's evaluations over it; atomically (``Frontier.save``). A run
    that holds one already keeps it, and a different one is named on stderr (the efficiency recorded then refers to
    --frontier, not to RUN_DIR's frontier)."""
    from tilt.frontier import Frontier

    target = Path(run_dir) / "frontier.json"
    if target.exists():
        if Frontier.load(target).data != json.loads(json.dumps(frontier.data)):
            print(f"# {target} differs from the frontier of --frontier {source} on these prompts: kept as it is; this "
                  "evaluation's efficiency is against --frontier", file=sys.stderr, flush=True)
        return target
    return frontier.save(target)


def record_eval(run_dir: str, report: dict) -> Path:
    """Append ``report`` as one line of RUN_DIR/evals.jsonl (one write of the whole line, then a flush)."""
    from tilt.cli.output import strict_json

    folder = Path(run_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"--record: run directory not found: {run_dir!r}")
    path = folder / "evals.jsonl"
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(strict_json(report), allow_nan=False) + "\n")
        f.flush()
    return path


# --- tilt sample --------------------------------------------------------------------------------------------------
def add_sample_parser(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="sample completions: plain, best-of-N, worst-of-N, quasi-rejection or importance resampling",
        description="Print completions of each prompt. Plain sampling draws --n per prompt. Inference procedures "
        "(need --reward): --best-of N returns the highest-reward of N samples, --worst-of N the lowest, --n times per "
        "prompt. Samplers of the tilted target pi* ∝ pi_ref exp(r/beta) (need --reward and --beta; the reference is "
        "--ref, or the model itself): --qrs-beta Q keeps each of --candidates samples with probability "
        "min(1, w/Q), w = pi*/model up to a constant (quasi-rejection sampling); --sir K draws --n of K candidates in "
        "proportion to w (sampling-importance-resampling).",
        epilog="Example: tilt sample --model base --prompt 'The movie was' --best-of 8 --reward sentiment --n 2",
    )
    _model_options(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", metavar="FILE", help="prompts file (JSONL/CSV/Parquet with a 'prompt' or 'messages' column)")
    src.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt; repeat for several")
    p.add_argument("--limit", type=int, default=0, metavar="P", help="use only the first P prompts of --prompts (default: all)")
    p.add_argument("--n", type=int, default=1, help="outputs per prompt (plain, best-of, worst-of, sir) (default 1)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--best-of", type=int, default=0, metavar="N", help="best-of-N: keep the highest-reward of N samples")
    how.add_argument("--worst-of", type=int, default=0, metavar="N", help="worst-of-N: keep the lowest-reward of N samples")
    how.add_argument("--qrs-beta", type=float, default=None, metavar="Q", 
                     help="quasi-rejection sampling toward pi* with parameter Q > 0 (larger: closer to pi*, fewer accepted)")
    how.add_argument("--sir", type=int, default=0, metavar="K", help="sampling-importance-resampling toward pi* from K candidates per prompt")
    how.add_argument("--mh", type=int, default=0, metavar="STEPS",
                     help="Metropolis-Hastings toward pi* with suffix resampling from the reference (QUEST): --n chains per prompt, "
                          "STEPS steps each; prints each chain's last state, the acceptance rate and the effective sample size")
    how.add_argument("--smc", type=int, default=0, metavar="PARTICLES",
                     help="sequential Monte Carlo toward pi* with PARTICLES particles per prompt over --block-size token blocks; "
                          "prints --n draws from the final particles and the estimate of log Z")
    p.add_argument("--burn-in", type=int, default=None, metavar="B", help="--mh: steps left out of the effective sample size (default STEPS // 2)")
    p.add_argument("--block-size", type=int, default=0, metavar="T",
                   help="--smc: tokens per block; 0 = the whole completion in one block, i.e. importance resampling (default 0)")
    p.add_argument("--prefix-reward", action="store_true",
                   help="--smc: score unfinished prefixes with --reward too (as the intermediate potential; VADER can score any text)")
    p.add_argument("--ess-threshold", type=float, default=0.5, metavar="F",
                   help="--smc: resample when the effective sample size falls under F x PARTICLES (default 0.5)")
    p.add_argument("--reward", action="extend", nargs="+", metavar="SPEC",
                   help="reward spec(s) (as in tilt eval; several are summed); scores plain samples too")
    p.add_argument("--ref", metavar="PATH", default=None, help="reference (prior) of pi* for --qrs-beta / --sir (default: the model)")
    p.add_argument("--beta", type=float, default=None, help="KL coefficient (temperature) of pi* for --qrs-beta / --sir")
    p.add_argument("--candidates", type=int, default=16, metavar="K", help="candidates per prompt for --qrs-beta (default 16)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1: the model itself)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass; 1 = off (default)")
    p.add_argument("--out", metavar="FILE.jsonl", default=None, help="also write the samples as JSON Lines {prompt, completion, reward}")
    p.add_argument("--full-text", action="store_true",
                   help="print prompts and completions whole (default: cut to 100 characters, newlines shown as \\n, and said so)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=run_sample)


def add_parser(sub) -> None:
    """Adds ``tilt eval`` and ``tilt sample``."""
    add_eval_parser(sub)
    add_sample_parser(sub)


def _sample_mode(args) -> str:
    if args.best_of:
        return "best-of-n"
    if args.worst_of:
        return "worst-of-n"
    if args.qrs_beta is not None:
        return "qrs"
    if args.sir:
        return "sir"
    if args.mh:
        return "mh"
    if args.smc:
        return "smc"
    return "plain"


def _check_sample_args(args, mode: str) -> None:
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if mode != "plain" and not args.reward:
        raise ValueError(f"{mode} needs a reward: add --reward SPEC")
    if mode in ("best-of-n", "worst-of-n") and (args.best_of or args.worst_of) < 1:
        raise ValueError("N of best-of-N / worst-of-N must be >= 1")
    if mode == "mh" and not 0 <= (args.mh // 2 if args.burn_in is None else args.burn_in) < args.mh:
        raise ValueError(f"--burn-in must be >= 0 and below --mh {args.mh}, got {args.burn_in}")
    if mode == "smc" and (args.block_size < 0 or not 0 <= args.ess_threshold <= 1):
        raise ValueError("--block-size must be >= 0 and --ess-threshold between 0 and 1")
    if mode in ("qrs", "sir", "mh", "smc"):
        if args.beta is None or not args.beta > 0:
            raise ValueError(f"{mode} samples pi* ∝ pi_ref exp(r/beta): give --beta > 0")
        if mode == "qrs" and not args.qrs_beta > 0:
            raise ValueError(f"--qrs-beta must be > 0, got {args.qrs_beta}")
        if mode == "qrs" and args.candidates < 1:
            raise ValueError(f"--candidates must be >= 1, got {args.candidates}")
    elif args.ref is not None or args.beta is not None:
        raise ValueError("--ref and --beta only apply to --qrs-beta, --sir, --mh and --smc")


def run_sample(args: argparse.Namespace) -> int:
    import torch

    with torch.no_grad():
        return _run_sample(args)


def _run_sample(args: argparse.Namespace) -> int:
    import torch

    from tilt.engine.hf import SamplingConfig

    args.max_new_tokens = 32 if args.max_new_tokens is None else args.max_new_tokens
    mode = _sample_mode(args)
    _check_sample_args(args, mode)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    reward_fn = _reward(args.reward, trust_remote_code=args.trust_remote_code) if args.reward else None
    policy = _load_policy(args.model, sampling, trust_remote_code=args.trust_remote_code)
    prompts, _, data = _prompts(args, policy)
    reward_fn = _bound(reward_fn, data)  # each prompt's columns and chat reach user functions
    g = torch.Generator().manual_seed(args.seed)
    report: dict = {"model": args.model, "mode": mode, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "seed": args.seed}
    per_prompt = {"plain": args.n, "best-of-n": args.n * (args.best_of or 1), "worst-of-n": args.n * (args.worst_of or 1),
                  "qrs": args.candidates, "sir": args.sir, "mh": args.n, "smc": args.smc}[mode]  # sequences sampled per prompt
    step = max(1, args.batch_size // per_prompt)
    chunks = [prompts[i:i + step] for i in range(0, len(prompts), step)]
    if mode == "plain":
        rows = _sample_plain(policy, chunks, args.n, reward_fn, g, report)
    elif mode in ("best-of-n", "worst-of-n"):
        rows = _sample_best_or_worst(policy, chunks, args, mode, reward_fn, g, report)
    else:
        ref = _load_ref(args.ref, policy, args.model, SamplingConfig(max_new_tokens=args.max_new_tokens),
                        trust_remote_code=args.trust_remote_code)
        sampler = _sample_posterior if mode in ("qrs", "sir") else _sample_mcmc
        rows = sampler(policy, ref, chunks, args, mode, reward_fn, g, report)
    report["samples"] = rows
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({k: r[k] for k in ("prompt", "completion", "reward") if k in r}, ensure_ascii=False) + "\n")
    if args.json:
        print_json(report)
        return 0
    _print_samples(report, rows, full_text=args.full_text)
    return 0


def _sample_plain(policy, chunks, n, reward_fn, g, report) -> list[dict]:
    import torch

    from tilt.rewards import score_rewards

    report["n"] = n
    rows = []
    for chunk in chunks:
        rollout = policy.sample(chunk, n, generator=g, exact=True)
        rewards = score_rewards(reward_fn, rollout.prompts, rollout.completions).tolist() if reward_fn else None
        for i, (x, y) in enumerate(zip(rollout.prompts, rollout.completions)):
            rows.append({"prompt": x, "completion": y, **({"reward": rewards[i]} if rewards is not None else {})})
    return rows


def _sample_best_or_worst(policy, chunks, args, mode, reward_fn, g, report) -> list[dict]:
    """--n selections per prompt, each the best (worst) of N fresh samples (tilt.bon)."""
    import torch

    from tilt.bon import best_of_n, worst_of_n

    n = args.best_of or args.worst_of
    report.update({"n": args.n, "best_of" if mode == "best-of-n" else "worst_of": n})
    pick = best_of_n if mode == "best-of-n" else worst_of_n
    rows, chosen, candidates = [], [], []
    for chunk in chunks:
        repeated = [x for x in chunk for _ in range(args.n)]
        sel = pick(policy, repeated, n, reward_fn, generator=g)
        for i, x in enumerate(repeated):
            rows.append({"prompt": x, "completion": sel.completions[i], "reward": sel.rewards[i].item(),
                         "index": int(sel.index[i]), "candidate_rewards": sel.all_rewards[i].tolist()})
        chosen.append(sel.rewards)
        candidates.append(sel.all_rewards.flatten())
    report["mean_reward"] = torch.cat(chosen).mean().item()
    report["mean_candidate_reward"] = torch.cat(candidates).mean().item()
    return rows


def _sample_posterior(policy, ref, chunks, args, mode, reward_fn, g, report) -> list[dict]:
    """QRS or SIR toward pi* ∝ ref exp(r/beta), with the model as the proposal (tilt.posterior)."""
    import torch

    from tilt.math.importance import effective_sample_size
    from tilt.posterior import qrs_estimates, quasi_rejection_sample, sir_sample
    from tilt.rewards import score_rewards
    from tilt.target import TiltedTarget

    target = TiltedTarget(ref, reward_fn, args.beta)
    report.update(beta=args.beta, ref=args.ref or args.model)
    rows, log_weights, kept_count = [], [], 0
    k = args.candidates if mode == "qrs" else args.sir
    for chunk in chunks:
        if mode == "qrs":
            cand = quasi_rejection_sample(target, chunk, k, qrs_beta=args.qrs_beta, generator=g, proposal=policy)
            kept = cand.keep.nonzero().flatten().tolist()
        else:
            cand = sir_sample(target, chunk, k, args.n, generator=g, proposal=policy)
            kept = cand.indices.tolist()
        log_weights.append(cand.log_weights.view(len(chunk), k))
        kept_count += len(kept)
        ro = cand.rollout
        rewards = score_rewards(reward_fn, [ro.prompts[i] for i in kept], [ro.completions[i] for i in kept]).tolist() if kept else []
        for j, i in enumerate(kept):
            rows.append({"prompt": ro.prompts[i], "completion": ro.completions[i], "reward": rewards[j],
                         "log_weight": cand.log_weights[i].item()})
    log_w = torch.cat(log_weights)  # (P, K)
    report["candidates"] = k
    if mode == "qrs":
        est = qrs_estimates(log_w, qrs_beta=args.qrs_beta)
        report.update(qrs_beta=args.qrs_beta, accepted=kept_count, acceptance_rate=kept_count / log_w.numel(),
                      acceptance_rate_estimate=est["acceptance_rate"].mean().item(), tv_estimate=est["tv"].mean().item(),
                      kl_target_sampler_estimate=est["kl_target_sampler"].mean().item())
    else:
        report.update(n=args.n, ess=effective_sample_size(log_w).mean().item())
    return rows


def _sample_mcmc(policy, ref, chunks, args, mode, reward_fn, g, report) -> list[dict]:
    """MH or SMC toward pi* ∝ ref exp(r/beta), drawing only from the reference (tilt.samplers); ``policy`` is unused."""
    import torch

    from tilt.rewards import score_rewards
    from tilt.samplers import smc, suffix_mh
    from tilt.target import TiltedTarget

    target = TiltedTarget(ref, reward_fn, args.beta)
    burn_in = args.mh // 2 if args.burn_in is None else args.burn_in
    report.update(beta=args.beta, ref=args.ref or args.model, n=args.n)
    rows, stats = [], {"acceptance": [], "ess": [], "log_z": [], "final_ess": [], "resampled": []}
    for chunk in chunks:
        if mode == "mh":
            res = suffix_mh(target, chunk, steps=args.mh, chains=args.n, burn_in=burn_in, generator=g)
            picked = list(zip([x for x in chunk for _ in range(args.n)], res.final))
            stats["acceptance"].append(res.accepted.double().mean(-1))
            stats["ess"] += res.effective_sample_size()
        else:
            res = smc(target, chunk, particles=args.smc, block_size=args.block_size, ess_threshold=args.ess_threshold,
                      prefix_reward=reward_fn if args.prefix_reward else None, generator=g)
            picked = res.draw(args.n, generator=g)
            stats["log_z"].append(res.log_z)
            stats["final_ess"].append(res.ess_trace[:, -1])
            stats["resampled"].append(res.resampled.double().sum(-1))
        texts = ref.decode_tokens([y for _, y in picked])
        rewards = score_rewards(reward_fn, [x for x, _ in picked], texts).tolist()
        rows += [{"prompt": x, "completion": t, "reward": r} for (x, _), t, r in zip(picked, texts, rewards)]
    if mode == "mh":
        report.update(steps=args.mh, burn_in=burn_in, acceptance_rate=torch.cat(stats["acceptance"]).mean().item(),
                      ess=sum(stats["ess"]) / len(stats["ess"]))
    else:
        report.update(particles=args.smc, block_size=args.block_size, prefix_reward=bool(args.prefix_reward),
                      log_z=torch.cat(stats["log_z"]).mean().item(), final_ess=torch.cat(stats["final_ess"]).mean().item(),
                      resamplings=torch.cat(stats["resampled"]).mean().item())
    return rows


def _print_samples(report: dict, rows: list[dict], *, full_text: bool = False) -> None:
    mode = report["mode"]
    head = {"plain": "samples", "best-of-n": f"best of {report.get('best_of')}", "worst-of-n": f"worst of {report.get('worst_of')}",
            "qrs": f"quasi-rejection sampling (Q = {report.get('qrs_beta')}, beta = {report.get('beta')})",
            "sir": f"importance resampling from {report.get('candidates')} candidates (beta = {report.get('beta')})",
            "mh": f"Metropolis-Hastings, {report.get('steps')} suffix-resampling steps per chain (beta = {report.get('beta')})",
            "smc": f"sequential Monte Carlo, {report.get('particles')} particles (beta = {report.get('beta')})"}[mode]
    print(f"\n{report['model']}: {head}\n")
    last, cut = None, 0

    def shown(text: str) -> str:
        nonlocal cut
        if full_text:
            return text
        cut += len(text.replace("\n", "\\n")) > 100
        return _short(text, 100)

    for r in rows:
        if r["prompt"] != last:
            print(f"prompt: {shown(str(r['prompt']))}")
            last = r["prompt"]
        score = f"[{fmt(r['reward'])}] " if "reward" in r else ""
        print(f"  {score}{shown(r['completion'])}")
    if cut:
        print(f"\n({cut} of the texts above are cut to 100 characters; --full-text prints them whole, --json and --out keep them whole)")
    if mode == "qrs":
        print(f"\naccepted {report['accepted']} of {report['prompts'] * report['candidates']} candidates "
              f"(rate {report['acceptance_rate']:.3f}); estimated TV(pi*, sampler) {report['tv_estimate']:.3f}, "
              f"KL(pi* || sampler) {report['kl_target_sampler_estimate']:.3f}")
    elif mode == "sir":
        print(f"\neffective sample size of the candidates: {report['ess']:.2f} of {report['candidates']} per prompt")
    elif mode == "mh":
        print(f"\nacceptance rate {report['acceptance_rate']:.3f}; effective sample size of the reward after {report['burn_in']} "
              f"burn-in steps {report['ess']:.1f} per prompt ({report['n']} chains)")
    elif mode == "smc":
        print(f"\nmean log Z estimate {report['log_z']:.4f}; final effective sample size {report['final_ess']:.2f} of "
              f"{report['particles']}; {report['resamplings']:.1f} resamplings per prompt")
    elif mode in ("best-of-n", "worst-of-n"):
        print(f"\nmean reward {report['mean_reward']:.4f} (mean over all candidates {report['mean_candidate_reward']:.4f})")
