"""LoRA adapters through PEFT, and a reference policy that is the same model with its adapter disabled.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685, eq. 3) trains,
for each adapted weight W0 (d_out × d_in), a low-rank update

    h = W0 x + (alpha / r) · B A x,        A: r × d_in (random init), B: d_out × r (zero init)

with W0 frozen. Since B = 0 at initialisation, the adapted model starts equal to the base model, and the
base model is recovered at any time by switching the adapter off. tilt uses that for the reference policy of
KL-regularised methods: ``AdapterDisabledReference`` scores with the adapter disabled (PEFT's
``disable_adapter()`` context), so the reference costs no second copy of the base weights.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from tilt.engine.hf import HFPolicy, SamplingConfig
from tilt.rollout import Rollout


@dataclass(frozen=True)
class LoraSettings:
    r: int = field(default=16, metadata={"help": "rank of the update B·A; the LoRA paper (§7.2) found r as low as 1-8 "
                                                 "enough on GPT-3; 16 is a common default for small models"})
    alpha: float = field(default=32.0, metadata={"help": "scale numerator: the update is multiplied by alpha / r "
                                                          "(LoRA paper §4.1); alpha = 2r is a common choice, not from the paper"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input; 0 so that sampling-time and "
                                                           "scoring-time log-probs agree (HFPolicy runs in eval mode anyway)"})
    target_modules: tuple[str, ...] | None = field(default=None, metadata={
        "help": "names (last path component) of the linear layers to adapt; None = every linear layer but the "
                "output head, as QLoRA (Dettmers et al. 2023, §4) found necessary to match full fine-tuning"})

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and (isinstance(self.target_modules, str) or len(self.target_modules) == 0):
            raise ValueError("target_modules must be a non-empty tuple of module names, e.g. ('q_proj', 'v_proj'), or None")


def default_target_modules(model: PreTrainedModel) -> list[str]:
    """The names (last path component) of every linear layer of ``model`` except its output head.

    Per architecture this gives, e.g., Llama: q/k/v/o_proj, gate/up/down_proj; GPT-2: c_attn, c_proj, c_fc
    (GPT-2's ``Conv1D`` layers count as linear).
    """
    head = model.get_output_embeddings()
    names = set()
    for path, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and module is not head:
            names.add(path.rsplit(".", 1)[-1])
    head_names = {path.rsplit(".", 1)[-1] for path, module in model.named_modules() if module is head}
    names -= head_names  # a layer sharing the head's name elsewhere would otherwise adapt the head too
    if not names:
        raise ValueError(f"{type(model).__name__} has no linear layers besides its output head: name target_modules explicitly")
    return sorted(names)


def add_lora(model: PreTrainedModel, settings: LoraSettings = LoraSettings()):
    """``model`` wrapped with a fresh LoRA adapter (a ``peft.PeftModel``): only the adapter's A and B train.

    The wrapping is in place (PEFT replaces the target layers inside ``model``); the base weights are frozen,
    not copied.
    """
    from peft import LoraConfig, get_peft_model

    targets = list(settings.target_modules) if settings.target_modules is not None else default_target_modules(model)
    uses_conv1d = any(isinstance(m, Conv1D) and path.rsplit(".", 1)[-1] in targets for path, m in model.named_modules())
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets,
                        fan_in_fan_out=uses_conv1d, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def is_lora_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


class AdapterDisabledReference:
    """The reference policy pi_ref of a LoRA-adapted ``HFPolicy``: the same model with its adapter disabled.

    Follows the ``Policy`` protocol. Sampling and scoring run under ``torch.no_grad`` inside PEFT's
    ``disable_adapter()`` context, so they see exactly the frozen base weights, shared with the policy.
    Not thread-safe with the policy: do not score with both at the same time from two threads.
    """

    def __init__(self, policy: HFPolicy):
        if not is_lora_model(policy.model):
            raise TypeError("AdapterDisabledReference needs an HFPolicy whose model has a LoRA adapter (see add_lora)")
        self.policy = policy

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.policy.tokenizer

    @property
    def device(self) -> torch.device:
        return self.policy.device

    def parameters(self):
        """The frozen base weights (shared with the policy, not copied); the adapter's are left out."""
        return (p for name, p in self.policy.model.named_parameters() if "lora_" not in name)

    @torch.no_grad()
    def sample(self, prompts: Sequence, samples_per_prompt: int, *, generator: torch.Generator | None = None,
               prompt_seeds: Sequence[int] | None = None, exact: bool = False) -> Rollout:
        """Samples of the base model; the same arguments as ``HFPolicy.sample``."""
        seeds = {} if prompt_seeds is None else {"prompt_seeds": prompt_seeds}
        with self.policy.model.disable_adapter():
            return self.policy.sample(prompts, samples_per_prompt, generator=generator, exact=exact, **seeds)

    @torch.no_grad()
    def token_logprobs(self, rollout: Rollout) -> Tensor:
        """(B, T) log pi_ref(y_t | x, y_<t), 0 off the completion mask; never differentiable."""
        with self.policy.model.disable_adapter():
            return self.policy.token_logprobs(rollout)

    @torch.no_grad()
    def token_log_softmax(self, rollout: Rollout) -> Tensor:
        """(B, T, V) log pi_ref(. | x, y_<t) at every completion position; never differentiable."""
        with self.policy.model.disable_adapter():
            return self.policy.token_log_softmax(rollout)


def merged_model(model) -> PreTrainedModel:
    """A plain copy of a LoRA-adapted model with the update folded in, W = W0 + (alpha / r) B A, for saving with
    ``save_pretrained`` as an ordinary checkpoint. ``model`` itself is left unchanged (and keeps training)."""
    if not is_lora_model(model):
        raise TypeError("merged_model needs a model with a LoRA adapter (see add_lora)")
    return copy.deepcopy(model).merge_and_unload()


def policy_and_reference(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *,
                         sampling: SamplingConfig = SamplingConfig(), lora: LoraSettings | None = None):
    """``(policy, reference)`` for fine-tuning ``model``, both starting equal to it.

    With ``lora``: the policy is ``model`` with a new LoRA adapter, the reference the same model with the adapter
    disabled (one copy of the weights). Without: full fine-tuning, the reference a frozen deep copy.
    """
    if lora is not None:
        policy = HFPolicy(add_lora(model, lora), tokenizer, sampling)
        return policy, AdapterDisabledReference(policy)
    reference_model = copy.deepcopy(model).requires_grad_(False)
    return HFPolicy(model, tokenizer, sampling), HFPolicy(reference_model, tokenizer, sampling)
