"""``tilt demo``: align a model (the embedded SmolLM2-135M-Instruct by default) toward positive reviews, and measure
what changed: KL-regularised RL with a sentiment reward on short review openings, evaluated on held-out openings
during training (reward, KL to the reference, win rate against it, with bootstrap intervals), stopped at a KL
budget. The command (tilt/cli/demo.py) prints the tables; this module trains and measures."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


def demo_prompts() -> list[str]:
    """The shipped review openings (32): the first 24 train, the last 8 are held out for evaluation."""
    text = (Path(__file__).resolve().parent.parent / "assets" / "review_openings.jsonl").read_text(encoding="utf-8")
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class DemoConfig:
    """The demo's own settings (the model and the reward are in the run section: model embedded, reward sentiment)."""

    steps: int = field(default=24, metadata={"help": "training steps; sized for about 10 minutes on 2 CPU cores"})
    beta: float = field(default=0.1, metadata={"help": "KL coefficient"})
    kl_budget: float = field(default=4.0, metadata={"help": "KL(pi || pi_ref) budget in nats: training stops at the first evaluation over it and keeps the policy of the evaluation before"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    evals: int = field(default=6, metadata={"help": "evaluations during training, evenly spaced"})
    prompts_per_step: int = field(default=4, metadata={"help": "prompts per step"})
    samples_per_prompt: int = field(default=4, metadata={"help": "completions per prompt (the leave-one-out baseline needs 2)"})
    max_new_tokens: int = field(default=16, metadata={"help": "completion length limit (tokens)"})
    eval_samples: int = field(default=12, metadata={"help": "samples per held-out prompt, per side, in each evaluation"})
    seed: int = field(default=0, metadata={"help": "seed of prompt order, sampling and evaluation"})

    def __post_init__(self):
        if self.steps < 1 or self.evals < 1 or self.eval_samples < 2 or self.kl_budget <= 0:
            raise ValueError("steps and evals must be >= 1, eval_samples >= 2 and kl_budget > 0")

    def eval_steps(self) -> list[int]:
        return sorted({max(1, round(self.steps * (i + 1) / self.evals)) for i in range(self.evals)})
