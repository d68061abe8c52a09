"""Demonstration-regularised RL and RLHF on Hugging Face causal LMs (Tiapkin et al. 2023; digest §3).

Two pipelines, each a short sequence of existing recipes; the only new thing is the order and the reference:

* ``run_demo_rl``: **clone** the demonstrations (``tilt.recipes.bc``: maximum likelihood on completion tokens,
  optionally with the probability floor q = (1 - V f) pi + f), then **KL-regularised RL toward the clone**
  (``tilt.recipes.kl_rl`` with ``ref`` = the clone, floored when f > 0, and beta = lambda = ``rl.beta``), maximising

      E_{x, y~pi}[r(x, y)] - lambda * KL(pi(.|x) || pi_BC(.|x)),

  starting from the clone (``start: clone``) or from any other model (``start: <model>``).
* ``run_demo_rlhf``: clone; **collect preferences** on pairs (y_a, y_b) sampled from the clone and labelled by an
  oracle (``tilt.preferences``: a Bradley–Terry draw on the reward, digest §3(a) step 3 [R], or a deterministic
  comparison); **fit a Bradley–Terry reward** (``tilt.recipes.reward_model``: a scalar head on a causal-LM backbone,
  ``AutoModelForSequenceClassification(num_labels=1)``); then KL-regularised RL toward the clone with the fitted
  reward (no pessimism term: the KL to the clone is what keeps the policy where the preference data are).

Departures from the paper: the paper plans exactly (tabular) or explores online (UCBVI-Ent+); here the RL stage is
the REINFORCE/PPO recipe on sampled completions. The paper's preference protocol is [R] (digest §3(a)): pairs from
the clone, labels Bradley–Terry on the true reward (``oracle: bradley_terry``, scale 1 as in its Assumption 4).
The paper's lambda ≍ eps / eps_KL has constants the digest did not retrieve (§3(c)); the default lambda is the
recipe's beta default.

Run directory (docs/demo_rl.md): RUN/config.yaml (the resolved config, ``pipeline`` naming the pipeline), and per
stage RUN/stages/<stage>/, written whole into a temporary sibling folder and renamed into place (atomic on POSIX),
holding the stage's from_pretrained model and tokenizer (``preferences`` holds pairs.jsonl instead), its per-step
metrics.jsonl, and ``stage.json``: the stage's summary metrics. A stage whose folder exists is complete and is
skipped on a rerun. While a stage trains, RUN/work/<stage>/ holds its metrics and its checkpoints
(``tilt.runs.directory.save_checkpoint``, every ``checkpoint_every`` steps); a rerun resumes the stage from the newest one
and, on CPU, reproduces the uninterrupted run (every recipe draws its batches and samples as pure functions of the
step). The RL stage's folder is the trained policy.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from tilt import distributed
from tilt.runs import directory as runs
from tilt.engine.hf import SamplingConfig
from tilt.evaluation import EvalConfig
from tilt.recipes.bc import BCConfig
from tilt.recipes.kl_rl import KLRLConfig
from tilt.recipes.reward_model import RewardModelConfig

STAGES = "stages"
WORK = "work"
MARKER = "stage.json"
ORACLES = ("bradley_terry", "comparison")

Hook = Callable[[str, int, dict], Any]
"""``hook(stage, step, metrics)``, called after every training step of every stage (step = updates done); a true
return value stops the run there: the stage saves a checkpoint and ``tilt.runs.loop.Stop(step)`` is raised."""


# --- configs ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PreferenceConfig:
    """How the RLHF pipeline collects preference pairs on samples of the clone."""

    pairs: int = field(default=256, metadata={"help": "pairs to draw (two completions of one prompt each), before dropping ties"})
    oracle: str = field(default="bradley_terry", metadata={
        "help": "who labels a pair, from the pipeline's reward: 'bradley_terry' (A wins with probability sigma(scale (r_A - r_B)), "
                "the paper's preference model, Assumption 4 [R]) or 'comparison' (A wins when r_A > r_B)"})
    oracle_scale: float = field(default=1.0, metadata={"help": "scale of the Bradley-Terry oracle; 1 as in the paper's sigma(r1 - r0)"})
    held_out: float = field(default=0.2, metadata={"help": "share of the kept pairs held out to measure the reward model's accuracy"})
    seed: int = field(default=0, metadata={"help": "seed of the prompts, the samples and the oracle's draws"})

    def __post_init__(self):
        if self.pairs < 2:
            raise ValueError(f"preferences.pairs must be >= 2, got {self.pairs}")
        if self.oracle not in ORACLES:
            raise ValueError(f"preferences.oracle must be one of {', '.join(ORACLES)}, got {self.oracle!r}")
        if not self.oracle_scale > 0:
            raise ValueError(f"preferences.oracle_scale must be > 0, got {self.oracle_scale}")
        if not 0 < self.held_out < 1:
            raise ValueError(f"preferences.held_out must lie in (0, 1), got {self.held_out}")


@dataclass(frozen=True)
class DemoRLConfig:
    """Demonstration-regularised RL: clone, then KL-regularised RL toward the clone (lambda = ``rl.beta``)."""

    model: str = field(default="", metadata={"help": "the initial model (cloned into; the 'initial model' of the KL report): a from_pretrained folder or a cached hub id"})
    demonstrations: str = field(default="", metadata={"help": "demonstrations file, rows {prompt, completion} or {messages} (tilt.data format demonstrations)"})
    reward: tuple = field(default=(), metadata={"help": "reward spec(s) (tilt.reward_fns); in demo-rlhf this is the oracle's reward, never seen by the RL stage"})
    prompts: str = field(default="", metadata={"help": "prompts file of the RL stage (format prompts); empty = the demonstrations' prompts"})
    start: str = field(default="clone", metadata={"help": "where the RL stage starts: 'clone' (Tiapkin et al. 2023) or another model spec"})
    kl_budget: float = field(default=0.0, metadata={"help": "KL(pi || clone) budget in nats: the RL stage reports whether the upper end of the KL interval lies under it; 0 = no budget"})
    eval_prompts: int = field(default=16, metadata={"help": "how many prompts (the first of the RL prompts) the before/after measurements use"})
    checkpoint_every: int = field(default=0, metadata={"help": "checkpoint a training stage every this many steps (RUN/work/<stage>); 0 = only the finished stage is kept"})
    bc: BCConfig = field(default_factory=BCConfig, metadata={"help": "behaviour cloning (tilt.recipes.bc.BCConfig)"})
    rl: KLRLConfig = field(default_factory=KLRLConfig, metadata={"help": "the RL stage (tilt.recipes.kl_rl.KLRLConfig); rl.beta is lambda"})
    sampling: SamplingConfig = field(default_factory=SamplingConfig, metadata={"help": "sampling of every stage (must be exact: temperature 1, no top-k/top-p)"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "the before/after measurements (tilt.evaluation.EvalConfig)"})

    def __post_init__(self):
        missing = [n for n in ("model", "demonstrations") if not getattr(self, n)] + ([] if self.reward else ["reward"])
        if missing:
            raise ValueError(f"the pipeline config must set {', '.join(missing)}")
        if not isinstance(self.reward, tuple) or not all(isinstance(s, str) and s for s in self.reward):
            raise ValueError(f"reward must be a tuple of spec strings, got {self.reward!r}")
        if not self.start:
            raise ValueError("start must be 'clone' or a model spec")
        if self.kl_budget < 0 or self.eval_prompts < 1 or self.checkpoint_every < 0:
            raise ValueError("kl_budget >= 0, eval_prompts >= 1 and checkpoint_every >= 0 are required")
        if not self.sampling.exact:
            raise ValueError("the pipeline samples the policy itself: use temperature 1 without top-k/top-p")


@dataclass(frozen=True)
class DemoRLHFConfig(DemoRLConfig):
    """Demonstration-regularised RLHF: clone, preferences on clone samples, Bradley-Terry reward, RL toward the clone."""

    reward_backbone: str = field(default="clone", metadata={"help": "backbone of the reward model: 'clone' (the usual RLHF choice, Ouyang et al. 2022 start from the SFT model) or a model spec"})
    preferences: PreferenceConfig = field(default_factory=PreferenceConfig, metadata={"help": "preference collection"})
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig, metadata={"help": "reward fitting (tilt.recipes.reward_model.RewardModelConfig)"})


SECTIONS: dict[str, type] = {"bc": BCConfig, "rl": KLRLConfig, "sampling": SamplingConfig, "eval": EvalConfig,
                             "preferences": PreferenceConfig, "reward_model": RewardModelConfig}
PIPELINES: dict[str, type] = {"demo-rl": DemoRLConfig, "demo-rlhf": DemoRLHFConfig}


def config_to_dict(config: DemoRLConfig) -> dict:
    """The config as plain YAML-able values, with ``pipeline`` naming it (what RUN/config.yaml holds)."""
    name = "demo-rlhf" if isinstance(config, DemoRLHFConfig) else "demo-rl"
    out: dict[str, Any] = {"pipeline": name}
    for f in fields(config):
        value = getattr(config, f.name)
        out[f.name] = asdict(value) if f.name in SECTIONS else (list(value) if isinstance(value, tuple) else value)
    return out


def config_from_dict(pipeline: str, data: Mapping[str, Any]) -> DemoRLConfig:
    """A config from a mapping (a YAML file's): top-level fields and one mapping per section. Unknown keys are errors."""
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {pipeline!r}; known: {', '.join(PIPELINES)}")
    cls = PIPELINES[pipeline]
    known = {f.name for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key == "pipeline":
            if value != pipeline:
                raise ValueError(f"the config is for pipeline {value!r}, not {pipeline!r}")
            continue
        if key not in known:
            raise ValueError(f"unknown config key {key!r} for {pipeline}; valid keys: {', '.join(sorted(known))}")
        if key in SECTIONS:
            if value is None:  # an empty section in YAML: its defaults
                continue
            if not isinstance(value, Mapping):
                raise ValueError(f"{key} must be a mapping of its fields, got {value!r}")
            names = {f.name for f in fields(SECTIONS[key])}
            bad = sorted(set(value) - names)
            if bad:
                raise ValueError(f"unknown config key {key}.{bad[0]}; {key} takes: {', '.join(sorted(names))}")
            kwargs[key] = SECTIONS[key](**value)
        elif key == "reward":
            kwargs[key] = (value,) if isinstance(value, str) else tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


# --- the run directory -----------------------------------------------------------------------------------------------
def stage_dir(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / STAGES / stage


def read_stage(run_dir: str | Path, stage: str) -> dict | None:
    """The ``stage.json`` of a completed stage, or None when the stage has not completed."""
    marker = stage_dir(run_dir, stage) / MARKER
    return json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None


def open_run(run_dir: str | Path, config: DemoRLConfig, saved_config: Mapping[str, Any] | None = None, *, stack=None) -> Path:
    """Create RUN with its config.yaml, or reopen it when it holds the same config (a rerun); another config is an
    error, since the completed stages would then belong to a different run."""
    run = Path(run_dir)
    wanted = dict(saved_config) if saved_config is not None else config_to_dict(config)
    if (run / "config.yaml").is_file():
        saved = runs.read_config(run)
        if saved != json.loads(json.dumps(wanted)):
            diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
            raise ValueError(f"{run} holds a run with another config (differs in: {', '.join(diff)}); "
                             "resume it with its own config, or choose another run directory")
    elif distributed.is_main():  # under torchrun, rank 0 writes the run
        runs.create_run(run, wanted)
    if stack is not None and distributed.is_main():  # hold the run's lock until the caller's ``with`` ends
        stack.enter_context(runs.lock_run(run))
    distributed.barrier()
    return run


def _commit_stage(run: Path, stage: str, write: Callable[[Path], None], marker: dict) -> dict:
    """Write a stage's folder whole in a temporary sibling (``write(folder)``, the work metrics, ``stage.json``),
    fsync it and rename it into place; then drop the stage's work folder. Under torchrun rank 0 writes, the others wait."""
    if not distributed.is_main():
        distributed.barrier()
        return marker
    root = run / STAGES
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{stage}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    work = run / WORK / stage
    if (work / "metrics.jsonl").is_file():
        shutil.copyfile(work / "metrics.jsonl", tmp / "metrics.jsonl")
    (tmp / MARKER).write_text(json.dumps(marker, indent=1, allow_nan=True) + "\n", encoding="utf-8")
    runs.fsync_tree(tmp)
    final = root / stage
    if final.exists():  # never complete (it would have been skipped): a leftover without a marker
        shutil.rmtree(final)
    os.replace(tmp, final)
    runs.fsync_path(root)
    shutil.rmtree(work, ignore_errors=True)
    distributed.barrier()
    return marker


def _open_work(run: Path, stage: str) -> tuple[Path, Path | None, int]:
    """The stage's work folder, its newest checkpoint and that checkpoint's step ((None, 0) for a fresh start).
    Under torchrun rank 0 prepares the folder; the others then read the same checkpoint."""
    work = run / WORK / stage
    checkpoint, step = None, 0
    if distributed.is_main():
        if work.is_dir():
            checkpoint, step = runs.prepare_resume(work)
        else:
            work.mkdir(parents=True)
            (work / "metrics.jsonl").write_text("", encoding="utf-8")
    distributed.barrier()
    if not distributed.is_main() and work.is_dir():
        checkpoint = runs.newest_intact_checkpoint(work)[0]
        step = 0 if checkpoint is None else int(json.loads((checkpoint / runs.STATE_JSON).read_text(encoding="utf-8"))["step"])
    return work, checkpoint, step


def _step_logger(work: Path, stage: str, total: int, every: int, save: Callable[[int], None], hook: Hook | None):
    main = distributed.is_main()

    def checkpoint(done: int) -> None:  # rank 0 writes; every rank waits for it
        if main:
            save(done)
        distributed.barrier()

    def on_step(step: int, metrics: dict) -> None:
        done = step + 1
        if main:
            runs.append_jsonl(work / "metrics.jsonl", {"step": done, **metrics})
        if every and done % every == 0 and done < total:
            checkpoint(done)
        if hook is not None and hook(stage, done, metrics) and done < total:  # asked to stop: checkpoint first
            from tilt.runs.loop import Stop

            checkpoint(done)
            raise Stop(done)
    return on_step


def _replicated(model):
    """Rank 0's weights on every rank, in DDP (the recipes reduce gradients themselves); unchanged in one process."""
    return distributed.wrap_ddp(distributed.replicate(model))


# --- pieces ----------------------------------------------------------------------------------------------------------
def demonstration_rollout(policy, rows: Sequence[Mapping[str, str]]):
    """The demonstrations as a rollout: each completion's tokens followed by EOS (so the clone learns to stop);
    ``completion_mask`` is True on those tokens only, never on the prompt."""
    eos = policy.eos_ids[0]
    ids = [policy.tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [eos] for r in rows]
    return policy.rollout_from_ids([r["prompt"] for r in rows], ids)


def _load_policy(spec: str, sampling: SamplingConfig, *, frozen: bool = False):
    from tilt.engine.hf import HFPolicy
    from tilt.engine.loading import load_model, load_tokenizer

    model = load_model(spec)
    if frozen:
        model.requires_grad_(False)
    return HFPolicy(model, load_tokenizer(spec), sampling)


def _output_vocab(policy) -> int:
    return int(policy.model.get_output_embeddings().weight.shape[0])


def _reference(config: DemoRLConfig, clone):
    """The RL stage's reference: the clone, floored as it was fitted when ``bc.floor`` > 0."""
    from tilt.recipes.bc import FlooredPolicy

    return FlooredPolicy(clone, floor=config.bc.floor, vocab=config.bc.vocab_size) if config.bc.floor > 0 else clone


def _check_floor_vocab(config: DemoRLConfig, policy) -> None:
    if config.bc.floor > 0 and config.bc.vocab_size != _output_vocab(policy):
        raise ValueError(f"bc.vocab_size is {config.bc.vocab_size} but the model has {_output_vocab(policy)} output tokens: "
                         f"set bc.vocab_size to {_output_vocab(policy)}")


def _rl_prompts(config: DemoRLConfig, tokenizer, demo_data, model_config):
    """(prompts of the RL stage, their data): the prompts file (shape inferred and shown) or the demonstrations'
    distinct prompts, each checked to fit the model's context with ``sampling.max_new_tokens``."""
    from tilt.data import DataConfig
    from tilt.runs.setup import check_run_context, load_run_data

    data = load_run_data(config.prompts, DataConfig(fmt="prompts"), tokenizer, log=_log) if config.prompts else demo_data
    check_run_context(data, model_config, tokenizer, max_new_tokens=config.sampling.max_new_tokens,
                      path=config.prompts or config.demonstrations)
    if config.prompts:
        return [r["prompt"] for r in data.rows], data
    return list(dict.fromkeys(r["prompt"] for r in data.rows)), data  # distinct, in file order


def measure(eval_config: EvalConfig, policy, prompts: Sequence[str], reward_fn, *, refs: Mapping[str, Any],
            extra_rewards: Mapping[str, Any] | None = None) -> dict:
    """Mean reward and KL(policy || ref) for every ref in ``refs``, each with its bootstrap interval
    (``tilt.evaluation.bootstrap_mean``, two-level percentile), on K = ``eval.samples_per_prompt`` samples of each
    prompt. Every ref sees the same samples (one generator seed). Keys: ``reward``, ``kl_<name>`` (k1, the
    sequence log-ratio), ``<name>_reward`` for each extra reward, each with ``*_ci`` = [low, high]."""
    from tilt.evaluation import bootstrap_mean, draw_scored
    from tilt.recipes.common import derive_seed
    from tilt.rewards import score_rewards

    k, out = eval_config.samples_per_prompt, {}
    boot = torch.Generator().manual_seed(derive_seed(eval_config.seed, "pipeline", "bootstrap"))

    def put(name: str, values: torch.Tensor) -> None:
        mean, low, high = bootstrap_mean(values, generator=boot, num_resamples=eval_config.num_resamples, level=eval_config.level)
        out[name], out[f"{name}_ci"] = mean, [low, high]

    draws = None
    for name, ref in refs.items():
        g = torch.Generator().manual_seed(derive_seed(eval_config.seed, "pipeline", "samples"))
        draws = draw_scored(policy, prompts, k, reward_fn, generator=g, batch_size=eval_config.batch_size, ref=ref)
        put(f"kl_{name}", draws.seq_log_ratio)
    if draws is None:
        g = torch.Generator().manual_seed(derive_seed(eval_config.seed, "pipeline", "samples"))
        draws = draw_scored(policy, prompts, k, reward_fn, generator=g, batch_size=eval_config.batch_size)
    put("reward", draws.rewards)
    for name, fn in (extra_rewards or {}).items():
        flat = [c for row in draws.completions for c in row]
        values = score_rewards(fn, [p for p in prompts for _ in range(k)], flat).view(len(prompts), k)
        put(f"{name}_reward", values)
    out["completion_length"] = draws.lengths.double().mean().item()
    return out


# --- stages ----------------------------------------------------------------------------------------------------------
def _stage_bc(config: DemoRLConfig, run: Path, demo_rows, hook: Hook | None) -> dict:
    from tilt.engine.loading import load_model
    from tilt.recipes import bc
    from tilt.recipes.common import build_optimizer

    policy = _load_policy(config.model, config.sampling)
    _check_floor_vocab(config, policy)
    demos = demonstration_rollout(policy, demo_rows)
    nll_before = bc.demonstration_nll(config.bc, policy, demos)
    work, checkpoint, start = _open_work(run, "bc")
    if checkpoint is not None:
        policy.model = load_model(str(checkpoint)).eval()
    policy.model = _replicated(policy.model)
    optimizer = build_optimizer(config.bc.optimizer, policy.parameters(), config.bc.lr)
    if checkpoint is not None:
        state, tensors = runs.load_trainer_state(checkpoint)
        runs.restore_optimizer(optimizer, state, tensors)
        runs.restore_rng(state, tensors)

    def save(step: int) -> None:
        runs.save_checkpoint(work, step, distributed.unwrap(policy.model), policy.tokenizer, optimizer, keep=1, extra={"stage": "bc"})

    on_step = _step_logger(work, "bc", config.bc.steps, config.checkpoint_every, save, hook)
    bc.train(config.bc, policy, demos, optimizer=optimizer, start_step=start, on_step=on_step)
    policy.model = distributed.unwrap(policy.model)
    marker = {"stage": "bc", "steps": config.bc.steps, "demonstrations": len(demos), "tokens": int(demos.completion_mask.sum()),
              "demo_nll_before": nll_before, "demo_nll": bc.demonstration_nll(config.bc, policy, demos),
              "floor": config.bc.floor}

    def write(folder: Path) -> None:
        policy.model.save_pretrained(folder, safe_serialization=True)
        policy.tokenizer.save_pretrained(folder)

    return _commit_stage(run, "bc", write, marker)


def _stage_preferences(config: DemoRLHFConfig, run: Path, prompts: Sequence[str]) -> dict:
    from tilt.preferences import BradleyTerry, RewardComparison
    from tilt.recipes.common import derive_seed, prompt_indices
    from tilt.reward_fns import reward_from_specs

    cfg = config.preferences
    clone = _load_policy(str(stage_dir(run, "bc")), config.sampling, frozen=True)
    truth = reward_from_specs(list(config.reward))
    oracle = (BradleyTerry(truth, scale=cfg.oracle_scale) if cfg.oracle == "bradley_terry" else RewardComparison(truth, ties="tie"))
    chosen_prompts = [prompts[i] for i in prompt_indices(len(prompts), 0, cfg.pairs, cfg.seed)]
    sampler = torch.Generator().manual_seed(derive_seed(cfg.seed, "preferences", "samples"))
    labeller = torch.Generator().manual_seed(derive_seed(cfg.seed, "preferences", "oracle"))
    pairs, ties, identical = [], 0, 0
    for s in range(0, len(chosen_prompts), 32):
        chunk = chosen_prompts[s:s + 32]
        rollout = clone.sample(chunk, 2, generator=sampler, exact=True)  # (2 * len(chunk),): a prompt's two samples are adjacent
        a, b = rollout.completions[0::2], rollout.completions[1::2]
        labels = oracle(chunk, a, b, generator=labeller)  # (n,) 1 = A preferred, 0 = B, 0.5 = tie
        for prompt, ya, yb, label in zip(chunk, a, b, labels.tolist()):
            if ya == yb:
                identical += 1  # the same text twice: no ordering to learn
            elif label == 0.5:
                ties += 1
            else:
                pairs.append({"prompt": prompt, "chosen": ya if label == 1.0 else yb, "rejected": yb if label == 1.0 else ya})
    n_held = max(1, round(cfg.held_out * len(pairs)))
    if len(pairs) - n_held < 1:
        raise ValueError(f"only {len(pairs)} of {cfg.pairs} pairs are not ties or identical completions: draw more pairs "
                         "(preferences.pairs) or sample longer completions")
    rows = [{**p, "split": "train" if i < len(pairs) - n_held else "held_out"} for i, p in enumerate(pairs)]
    marker = {"stage": "preferences", "drawn": cfg.pairs, "pairs": len(pairs), "train": len(pairs) - n_held,
              "held_out": n_held, "ties_dropped": ties, "identical_dropped": identical, "oracle": cfg.oracle}

    def write(folder: Path) -> None:
        (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    return _commit_stage(run, "preferences", write, marker)


def read_pairs(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(train pairs, held-out pairs) of a completed preferences stage."""
    rows = runs.read_jsonl(stage_dir(run_dir, "preferences") / "pairs.jsonl")
    strip = lambda r: {k: r[k] for k in ("prompt", "chosen", "rejected")}  # noqa: E731
    return [strip(r) for r in rows if r["split"] == "train"], [strip(r) for r in rows if r["split"] == "held_out"]


def _stage_reward_model(config: DemoRLHFConfig, run: Path, hook: Hook | None) -> dict:
    from transformers import AutoModelForSequenceClassification

    from tilt.engine.loading import load_tokenizer, resolve_model_path
    from tilt.recipes import reward_model
    from tilt.recipes.common import build_optimizer, derive_seed
    from tilt.reward_fns import SequenceClassifierReward

    cfg = config.reward_model
    backbone = str(stage_dir(run, "bc")) if config.reward_backbone == "clone" else resolve_model_path(config.reward_backbone)
    train_pairs, held_out = read_pairs(run)
    work, checkpoint, start = _open_work(run, "reward_model")
    torch.manual_seed(derive_seed(cfg.seed, "reward_head"))  # the new scalar head's initialisation
    model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1, use_safetensors=True)
    reward = SequenceClassifierReward(model, load_tokenizer(backbone))
    accuracy_before = reward_model.accuracy(reward, held_out)
    if checkpoint is not None:
        reward.model = AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=1, use_safetensors=True).eval()
    reward.model = _replicated(reward.model)
    optimizer = build_optimizer("adamw", reward.model.parameters(), cfg.lr)
    if checkpoint is not None:
        state, tensors = runs.load_trainer_state(checkpoint)
        runs.restore_optimizer(optimizer, state, tensors)
        runs.restore_rng(state, tensors)
    steps = max(1, math.ceil(cfg.epochs * len(train_pairs) / cfg.pairs_per_step))  # as reward_model.train counts them

    def save(step: int) -> None:
        runs.save_checkpoint(work, step, distributed.unwrap(reward.model), reward.tokenizer, optimizer, keep=1,
                             extra={"stage": "reward_model"})

    on_step = _step_logger(work, "reward_model", steps, config.checkpoint_every, save, hook)
    reward_model.train(cfg, reward, train_pairs, optimizer=optimizer, start_step=start, on_step=on_step)
    reward.model = distributed.unwrap(reward.model)
    marker = {"stage": "reward_model", "steps": steps, "train_pairs": len(train_pairs), "held_out_pairs": len(held_out),
              "accuracy_train": reward_model.accuracy(reward, train_pairs),
              "accuracy_held_out": reward_model.accuracy(reward, held_out), "accuracy_held_out_before": accuracy_before}

    def write(folder: Path) -> None:
        reward.model.save_pretrained(folder, safe_serialization=True)
        reward.tokenizer.save_pretrained(folder)

    return _commit_stage(run, "reward_model", write, marker)


def _stage_rl(config: DemoRLConfig, run: Path, prompts: Sequence[str], reward_fn, hook: Hook | None,
              oracle_reward=None) -> dict:
    from tilt.engine.loading import load_model, resolve_model_path
    from tilt.recipes import kl_rl
    from tilt.recipes.common import build_optimizer

    clone = _load_policy(str(stage_dir(run, "bc")), config.sampling, frozen=True)
    ref = _reference(config, clone)
    initial = _load_policy(config.model, config.sampling, frozen=True)
    start_spec = str(stage_dir(run, "bc")) if config.start == "clone" else resolve_model_path(config.start)
    policy = _load_policy(start_spec, config.sampling)
    refs = {"clone": ref, "init": initial}
    if config.start != "clone":
        refs["start"] = _load_policy(start_spec, config.sampling, frozen=True)
    extra = {"oracle": oracle_reward} if oracle_reward is not None else {}
    eval_prompts = list(prompts[: config.eval_prompts])
    before = measure(config.eval, policy, eval_prompts, reward_fn, refs=refs, extra_rewards=extra)

    work, checkpoint, start = _open_work(run, "rl")
    if checkpoint is not None:
        policy.model = load_model(str(checkpoint)).eval()
    policy.model = _replicated(policy.model)
    optimizer = build_optimizer(config.rl.optimizer, policy.parameters(), config.rl.lr)
    if checkpoint is not None:
        state, tensors = runs.load_trainer_state(checkpoint)
        runs.restore_optimizer(optimizer, state, tensors)
        runs.restore_rng(state, tensors)

    def save(step: int) -> None:
        runs.save_checkpoint(work, step, distributed.unwrap(policy.model), policy.tokenizer, optimizer, keep=1, extra={"stage": "rl"})

    on_step = _step_logger(work, "rl", config.rl.steps, config.checkpoint_every, save, hook)
    kl_rl.train(config.rl, policy, ref, reward_fn, prompts, optimizer=optimizer, start_step=start, on_step=on_step)
    policy.model = distributed.unwrap(policy.model)
    after = measure(config.eval, policy, eval_prompts, reward_fn, refs=refs, extra_rewards=extra)
    marker = {"stage": "rl", "steps": config.rl.steps, "lam": config.rl.beta, "start": config.start,
              "kl_budget": config.kl_budget, **after, **{f"before_{k}": v for k, v in before.items()}}
    if config.kl_budget > 0:
        marker["within_budget"] = bool(after["kl_clone_ci"][1] <= config.kl_budget)

    def write(folder: Path) -> None:
        policy.model.save_pretrained(folder, safe_serialization=True)
        policy.tokenizer.save_pretrained(folder)

    return _commit_stage(run, "rl", write, marker)


# --- the pipelines -----------------------------------------------------------------------------------------------------
def _log(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)


def _demo_rows(config: DemoRLConfig):
    """(tokenizer, demonstration data, the model's config): the demonstrations read (shape inferred and shown),
    each prompt plus its completion checked to fit the model's context."""
    from transformers import AutoConfig

    from tilt.data import DataConfig
    from tilt.engine.loading import load_tokenizer, resolve_model_path
    from tilt.runs.setup import check_run_context, load_run_data

    tokenizer = load_tokenizer(config.model)
    data = load_run_data(config.demonstrations, DataConfig(fmt="demonstrations"), tokenizer, log=_log)
    if not data.rows:
        raise ValueError(f"{config.demonstrations} holds no demonstrations")
    model_config = AutoConfig.from_pretrained(resolve_model_path(config.model), trust_remote_code=False)
    check_run_context(data, model_config, tokenizer, max_new_tokens=None, path=config.demonstrations)
    return tokenizer, data, model_config


def _run_stage(run: Path, stage: str, skipped: list, fn: Callable[[], dict]) -> dict:
    """A completed stage's marker (the stage is skipped), or the marker of the stage run now."""
    marker = read_stage(run, stage)
    if marker is not None:
        skipped.append(stage)
        return marker
    return fn()


def run_demo_rl(config: DemoRLConfig, run_dir: str | Path, *, hook: Hook | None = None,
                saved_config: Mapping[str, Any] | None = None, stack=None) -> dict:
    """Clone the demonstrations, then KL-regularised RL toward the clone; see the module docstring.

    ``run_dir`` is created, or reopened when it holds the same config: completed stages are skipped and a stage
    that was interrupted resumes from its newest checkpoint. Returns {"run_dir", "stages": {stage: its stage.json},
    "skipped": [stages found complete]}."""
    from tilt.reward_fns import reward_from_specs

    if isinstance(config, DemoRLHFConfig):
        raise TypeError("this is a demo-rlhf config: call run_demo_rlhf")
    tokenizer, demo_data, model_config = _demo_rows(config)  # every input is checked before the run directory is made
    demo_rows = demo_data.rows
    prompts, prompt_data = _rl_prompts(config, tokenizer, demo_data, model_config)
    reward_fn = reward_from_specs(list(config.reward)).for_data(prompt_data)  # the rows' columns and chats
    run = open_run(run_dir, config, saved_config, stack=stack)
    skipped, stages = [], {}
    stages["bc"] = _run_stage(run, "bc", skipped, lambda: _stage_bc(config, run, demo_rows, hook))
    stages["rl"] = _run_stage(run, "rl", skipped, lambda: _stage_rl(config, run, prompts, reward_fn, hook))
    return {"run_dir": str(run), "pipeline": "demo-rl", "stages": stages, "skipped": skipped}


def run_demo_rlhf(config: DemoRLHFConfig, run_dir: str | Path, *, hook: Hook | None = None,
                  saved_config: Mapping[str, Any] | None = None, stack=None) -> dict:
    """Clone; preference pairs on clone samples labelled by the oracle (from ``config.reward``); a Bradley-Terry
    reward model; KL-regularised RL toward the clone with that reward. The RL stage reports the learned reward and
    the oracle's (``oracle_reward``) before and after. Resumable like ``run_demo_rl``."""
    from tilt.reward_fns import load_reward_model, reward_from_specs

    if not isinstance(config, DemoRLHFConfig):
        raise TypeError("run_demo_rlhf needs a DemoRLHFConfig")
    tokenizer, demo_data, model_config = _demo_rows(config)  # every input is checked before the run directory is made
    demo_rows = demo_data.rows
    prompts, prompt_data = _rl_prompts(config, tokenizer, demo_data, model_config)
    reward_from_specs(list(config.reward))
    run = open_run(run_dir, config, saved_config, stack=stack)
    skipped, stages = [], {}
    stages["bc"] = _run_stage(run, "bc", skipped, lambda: _stage_bc(config, run, demo_rows, hook))
    stages["preferences"] = _run_stage(run, "preferences", skipped, lambda: _stage_preferences(config, run, prompts))
    stages["reward_model"] = _run_stage(run, "reward_model", skipped, lambda: _stage_reward_model(config, run, hook))
    oracle = reward_from_specs(list(config.reward)).for_data(prompt_data)
    stages["rl"] = _run_stage(run, "rl", skipped, lambda: _stage_rl(
        config, run, prompts, load_reward_model(stage_dir(run, "reward_model")), hook, oracle_reward=oracle))
    return {"run_dir": str(run), "pipeline": "demo-rlhf", "stages": stages, "skipped": skipped}


# --- the command (tilt train demo-rl | demo-rlhf) ---------------------------------------------------------------------
def config_from_sections(command: str, config: Mapping[str, Any], sections: Mapping[str, Any]) -> DemoRLConfig:
    """The pipeline config of a resolved ``tilt train demo-rl | demo-rlhf`` config (tilt.runs.config): the run
    section's model, demonstrations, reward, prompts and checkpoint cadence, the pipeline's own section, and the
    stage sections."""
    run = sections["run"]
    run.require(command, ("model", "demonstrations", "reward"))
    own = dict(config["pipeline"])
    weights = run.reward_weights or (None,) * len(run.reward)  # a weight goes into its spec (0.5*SPEC)
    reward = tuple(spec if w is None else f"{w}*{spec}" for w, spec in zip(weights, run.reward))
    kwargs: dict[str, Any] = dict(model=run.model, demonstrations=run.demonstrations, reward=reward,
                                  prompts=run.prompts, checkpoint_every=run.checkpoint_every, **own)
    for name in SECTIONS:
        if name in sections:
            kwargs[name] = sections[name]
    return PIPELINES[command](**kwargs)


def run_pipeline_command(config: Mapping[str, Any], sections: Mapping[str, Any], run_dir: str | Path, *, resume: bool,
                         signals, stack=None) -> dict | int:
    """Run ``tilt train demo-rl | demo-rlhf``: the summary (every stage's stage.json), or the exit code of a run
    stopped by a signal (143/130, after a checkpoint) or failed during training (1, RUN/FAILED)."""
    import sys

    from tilt.runs.loop import EXIT_FAILED, Stop, resume_command

    command = config["recipe"]
    pipeline_config = config_from_sections(command, config, sections)
    run = Path(run_dir)
    if resume and not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} is not a run directory (no config.yaml)")
    fn = run_demo_rlhf if command == "demo-rlhf" else run_demo_rl
    distributed.init()  # under torchrun (WORLD_SIZE > 1) only: every stage replicated over the ranks, rank 0 writes
    main = distributed.is_main()
    try:
        result = fn(pipeline_config, run, hook=lambda stage, step, metrics: signals.received is not None,
                    saved_config=config, stack=None if resume else stack)
        world = distributed.world_size()
        distributed.shutdown()
        return {**result, "world_size": world} if main else 0
    except Stop as stop:
        if main:
            print(f"# stopped by {signals.name} at step {stop.args[0]} of a stage; checkpoint saved\n"
                  f"# continue with: {resume_command(command, run)}", file=sys.stderr, flush=True)
        return signals.exit_code
    except Exception as exc:  # noqa: BLE001 - after the run directory exists, an error marks the run failed
        if not (run / "config.yaml").is_file():
            raise  # bad input, found before anything was written
        message = f"{type(exc).__name__}: {exc}"
        if main:
            runs.mark_failed(run, message)
        print(f"tilt: error: {message}\n# the run {run} is marked failed ({run / runs.FAILED}); fix the cause, then: "
              f"{resume_command(command, run)}", file=sys.stderr, flush=True)
        return EXIT_FAILED
