"""``tilt demo``: align a model (the embedded SmolLM2-135M-Instruct by default) toward positive continuations of short
review openings, and measure how close it got to the best achievable: KL-regularised RL with a sentiment reward on
the openings task (docs/frontier.md: 240 training and 120 held-out openings), evaluated during training on held-out
openings against the task's frontier (win rate against the reference, KL to it, mean reward, efficiency
(WR - 1/2)/(WR*(KL) - 1/2), each with a bootstrap interval), stopped at a KL budget. The command (tilt/cli/demo.py)
prints the tables; this module holds its settings, prompts and frontier."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED_FRONTIER = ASSETS / "frontier_openings_m32.json"
"""The frontier of the first 100 held-out openings: 32 samples of each from the embedded model, 24 new tokens, scored
by the sentiment reward (`tilt frontier --model embedded --reward sentiment --limit 100 --samples 32
--max-new-tokens 24`; docs/frontier.md)."""


def demo_prompts() -> list[str]:
    """The short review openings of earlier versions of the demo (32), still used by examples and tests."""
    text = (ASSETS / "review_openings.jsonl").read_text(encoding="utf-8")
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class DemoConfig:
    """The demo's own settings (the model and the reward are in the run section: model embedded, reward sentiment).
    Defaults measured on the frontier benchmark (docs/frontier.md, "the demo's defaults")."""

    steps: int = field(default=60, metadata={"help": "most training steps (60: where KL-RL at lr 1e-5 reached about 1.7 nats on the "
                                                 "frontier benchmark, docs/frontier.md); the time budget may stop it earlier"})
    minutes: float = field(default=5.0, metadata={"help": "training time budget in minutes, evaluations included: training stops "
                                                   "after the first step past it, evaluated there (0 = none). 2 cores with native "
                                                   "bfloat16 run about 50 steps in it (about 6 s a step with the evaluations); 2 "
                                                   "AVX2 cores about 12 (23 s a step), so that the demo ends within 10 minutes "
                                                   "there"})
    beta: float = field(default=0.05, metadata={"help": "KL coefficient (0.05: TRL's RLOO default, and the recipe's)"})
    kl_budget: float = field(default=2.0, metadata={"help": "KL(pi || pi_ref) budget in nats: training stops at the first evaluation "
                                                    "over it and keeps the policy of the evaluation before"})
    lr: float = field(default=1e-5, metadata={"help": "AdamW learning rate (1e-5: the recipe's; 2e-5 measured worse, docs/frontier.md)"})
    warmup_steps: int = field(default=0, metadata={"help": "steps of linear learning-rate warm-up"})
    eval_every: int = field(default=10, metadata={"help": "steps between held-out evaluations; the last step (or the one where the "
                                                      "time budget runs out) is evaluated too"})
    prompts_per_step: int = field(default=8, metadata={"help": "training openings per step (drawn from the 240)"})
    samples_per_prompt: int = field(default=4, metadata={"help": "completions per opening (the leave-one-out baseline needs 2)"})
    max_new_tokens: int = field(default=24, metadata={"help": "completion length limit (tokens); 24 is the shipped frontier's"})
    eval_prompts: int = field(default=16, metadata={"help": "held-out openings evaluated (the first ones of the frontier's)"})
    eval_samples: int = field(default=6, metadata={"help": "policy samples per held-out opening in each evaluation"})
    frontier: str = field(default="", metadata={"help": "a frontier.json of these held-out openings (`tilt frontier`); empty = "
                                                "the shipped one when model, reference, reward and max_new_tokens are the "
                                                "demo's, else one drawn here from frontier_samples reference samples"})
    frontier_samples: int = field(default=16, metadata={"help": "reference samples per held-out opening when the frontier is drawn here"})
    seed: int = field(default=0, metadata={"help": "seed of prompt order, sampling and evaluation"})

    def __post_init__(self):
        if self.steps < 1 or self.eval_every < 1 or self.eval_samples < 1 or self.kl_budget <= 0 or self.minutes < 0:
            raise ValueError("steps, eval_every and eval_samples must be >= 1, kl_budget > 0 and minutes >= 0")
        if not 1 <= self.eval_prompts <= 120:
            raise ValueError(f"eval_prompts must be in 1..120 (the held-out openings), got {self.eval_prompts}")
        if self.frontier_samples < 2:
            raise ValueError(f"frontier_samples must be >= 2, got {self.frontier_samples}")

    def evaluates_at(self, step: int, out_of_time: bool) -> bool:
        """Whether the held-out evaluation runs after ``step`` (1-based): every ``eval_every`` steps, at the last step,
        and at the step where the time budget ran out."""
        return step % self.eval_every == 0 or step == self.steps or out_of_time


def uses_shipped_frontier(config: DemoConfig, model: str, ref: str, reward: tuple[str, ...]) -> bool:
    """Whether the shipped frontier describes this demo: the same reference model, reward and completion length, and
    no more held-out openings than it holds. (LoRA's reference, the adapter-disabled model, is the same model.)"""
    from tilt.frontier import Frontier

    meta = Frontier.load(SHIPPED_FRONTIER).data["meta"]
    return (model == meta["model"] and ref in ("", meta["model"]) and tuple(reward) == (meta["reward"],)
            and config.max_new_tokens == meta["max_new_tokens"] and config.eval_prompts <= meta["prompts"])
