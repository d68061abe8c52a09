"""Rewards a user can name: their own Python function, a sequence-classification reward model, or a built-in.

A user's function is called as TRL calls ``reward_funcs`` (by keyword: ``prompts``, ``completions``,
``completion_ids`` and the data's other columns), or by position in tilt's older form ``f(prompts, completions)``,
whichever its signature asks for (``tilt.rewards``). The built-ins and reward models here always score text.
``reward_from_specs`` builds a ``tilt.rewards.Rewards``: the weighted sum of one or more rewards, scored through
``tilt.rewards.score_rewards``, which stops the run on a reward that raises, returns the wrong number of values,
something that is not a number, or NaN/inf; ``score_rewards_masked`` here can instead skip and count the
non-finite samples.

A reward *spec* (what ``--reward`` takes, see ``reward_from_spec``):

* ``package.module:function`` - a function imported from an installed module;
* ``path/to/file.py:function`` - a function from a Python file;
* ``path/to/folder`` - a Hugging Face sequence-classification reward model saved there (safetensors only);
* ``sentiment`` - VADER's compound sentiment of the completion, in [-1, 1];
* ``length:chars`` / ``length:words``, optionally ``:TARGET`` - the completion's length, or minus its distance
  from TARGET;
* ``keywords:WORD,WORD`` - how many times the words occur (``keywords-present:...``: 1 if any does, else 0);
* ``regex:PATTERN`` - how many times the pattern matches (``regex-present:PATTERN``: 1 if it matches, else 0);
* ``WEIGHT*SPEC`` - a weighted term; ``reward_from_specs`` sums several (or takes ``weights=``).

A user function runs with the user's full permissions: only name code you trust.
"""
from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from tilt.rewards import RewardFn, Rewards, RewardTerm, score_rewards, score_rewards_nonfinite, unique_names

NONFINITE = ("error", "skip")


# --- a user's function -------------------------------------------------------------------------------------------
def import_reward(spec: str) -> RewardFn:
    """The callable named by ``module:function`` or ``path/to/file.py:function``.

    Raises FileNotFoundError for a missing file, ValueError for a malformed spec, a missing module or attribute,
    or an attribute that is not callable.
    """
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(f"a reward function is named as module:function or path/to/file.py:function; got {spec!r}")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise FileNotFoundError(f"reward file not found: {target!r} (from the reward spec {spec!r})")
        module_name = f"tilt_user_reward_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module  # so that pickling and dataclasses inside the file work
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[module_name]
            raise ValueError(f"the reward file {target!r} failed to load: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise ValueError(f"cannot import the reward module {target!r} (from {spec!r}): {exc}. Install it, run from "
                             "the folder that holds it, or name a file as path/to/file.py:function") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise ValueError(f"{target!r} has no attribute {name!r} (from the reward spec {spec!r})")
    if not callable(fn):
        raise ValueError(f"{spec!r} names a {type(fn).__name__}, not a function")
    return fn


# --- a reward model ----------------------------------------------------------------------------------------------
class SequenceClassifierReward:
    """r(x, y) = the reward model's logit for ``prompt + completion`` (label ``label_index`` when it has several).

    The text is the prompt followed directly by the completion, as the policy saw them; a reward model trained on
    chat-formatted text should be given chat-formatted prompts (``tilt.data`` renders them with the template).
    Texts longer than ``max_length`` tokens are cut from the left, keeping the completion. Batches are padded on
    the right: the model reads the logit at each text's last non-pad token, and models with absolute positions
    (GPT-2) would otherwise score a left-padded text differently from the same text alone.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 16, max_length: int | None = None, label_index: int = 0,
                 compute_dtype: torch.dtype | None = None):
        self.model = model.eval()
        self.compute_dtype = compute_dtype  # None, or autocast's dtype over float32 weights (as HFPolicy's)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.label_index = label_index
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ValueError("the reward model's tokenizer has neither a pad nor an EOS token to pad batches with")
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id  # the model finds each text's last token by it
        if not 0 <= label_index < model.config.num_labels:
            raise ValueError(f"label_index {label_index} is outside the model's {model.config.num_labels} labels")

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> Tensor:
        texts = [p + c for p, c in zip(prompts, completions)]
        scores = [self.scores(texts[start:start + self.batch_size]).double().cpu() for start in range(0, len(texts), self.batch_size)]
        return torch.cat(scores)  # (B,)

    def scores(self, texts: Sequence[str]) -> Tensor:
        """(B,) reward logits of whole texts in one batch, differentiable (used to train the reward model)."""
        device = next(self.model.parameters()).device
        sides = self.tokenizer.truncation_side, self.tokenizer.padding_side
        self.tokenizer.truncation_side, self.tokenizer.padding_side = "left", "right"
        try:
            batch = self.tokenizer(list(texts), return_tensors="pt", padding=True,
                                   truncation=self.max_length is not None, max_length=self.max_length)
        finally:
            self.tokenizer.truncation_side, self.tokenizer.padding_side = sides
        autocast = torch.autocast(device.type, dtype=self.compute_dtype, enabled=self.compute_dtype not in (None, torch.float32))
        with autocast:
            return self.model(**{k: v.to(device) for k, v in batch.items()}).logits[:, self.label_index].float()  # (B,)


def load_reward_model(path: str | Path, *, trust_remote_code: bool = False, device: str = "cpu", batch_size: int = 16,
                      max_length: int | None = None, label_index: int = 0) -> SequenceClassifierReward:
    """A sequence-classification reward model from a local folder. Weights load from safetensors only (a pickle
    file can run code when loaded); code shipped with the model runs only with ``trust_remote_code=True``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"reward model folder not found: {str(path)!r}")
    if not any(folder.glob("*.safetensors")) and not (folder / "model.safetensors.index.json").exists():
        found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise ValueError(f"no .safetensors weights in {str(path)!r} (it holds {found}); tilt loads only safetensors, "
                         "since pickled weights can run code. Convert them once with a tool you trust.")
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=trust_remote_code,
                                                               use_safetensors=True).to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return SequenceClassifierReward(model, tokenizer, batch_size=batch_size, max_length=max_length, label_index=label_index)


# --- built-ins ---------------------------------------------------------------------------------------------------
class VaderSentiment:
    """VADER's compound sentiment score of each completion, in [-1, 1] (Hutto & Gilbert, 2014); the prompt is
    ignored. The lexicon ships with the ``vaderSentiment`` package, so nothing is downloaded."""

    def __init__(self):
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise ImportError("the sentiment reward needs the vaderSentiment package: pip install 'tilt[real]'") from None

        self.analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
        return [float(self.analyzer.polarity_scores(c)["compound"]) for c in completions]


@dataclass(frozen=True)
class LengthReward:
    """The completion's length in characters or words (whitespace-separated); with a target T, -|length - T|."""

    unit: str = "chars"
    target: float | None = None

    def __post_init__(self):
        if self.unit not in ("chars", "words"):
            raise ValueError(f"length unit must be 'chars' or 'words'; got {self.unit!r}")

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
        lengths = [float(len(c) if self.unit == "chars" else len(c.split())) for c in completions]
        return lengths if self.target is None else [-abs(n - self.target) for n in lengths]


@dataclass(frozen=True)
class RegexReward:
    """How many times ``pattern`` matches the completion (``mode="count"``), or 1.0/0.0 for any match
    (``mode="presence"``)."""

    pattern: str
    mode: str = "count"
    ignore_case: bool = False

    def __post_init__(self):
        if self.mode not in ("count", "presence"):
            raise ValueError(f"mode must be 'count' or 'presence'; got {self.mode!r}")
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {self.pattern!r}: {exc}") from None

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
        rx = re.compile(self.pattern, re.IGNORECASE if self.ignore_case else 0)
        if self.mode == "presence":
            return [float(rx.search(c) is not None) for c in completions]
        return [float(sum(1 for _ in rx.finditer(c))) for c in completions]


def keyword_reward(keywords: Sequence[str], *, mode: str = "count", ignore_case: bool = True) -> RegexReward:
    """Occurrences of any of ``keywords`` as whole words (or 1.0/0.0 for presence), case-insensitive by default."""
    words = [k.strip() for k in keywords if k.strip()]
    if not words:
        raise ValueError("keyword_reward needs at least one non-empty keyword")
    pattern = r"(?<!\w)(?:" + "|".join(re.escape(w) for w in words) + r")(?!\w)"
    return RegexReward(pattern, mode=mode, ignore_case=ignore_case)


# --- specs -------------------------------------------------------------------------------------------------------
_WEIGHTED = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*\*\s*(.+)$", re.S)
BUILTIN_HEADS = ("length", "keywords", "keywords-present", "regex", "regex-present")
"""The built-in specs written ``HEAD:ARGUMENTS`` (besides ``sentiment``); anything else with a colon names a function."""


def split_weight(spec: str) -> tuple[float, str]:
    """``"0.5*length:chars"`` -> (0.5, "length:chars"); a spec without a weight has weight 1."""
    m = _WEIGHTED.match(spec)
    return (float(m.group(1)), m.group(2).strip()) if m else (1.0, spec)


_BUILT_IN = (VaderSentiment, LengthReward, RegexReward, SequenceClassifierReward)


def reward_from_spec(spec: str, *, trust_remote_code: bool = False, device: str = "cpu") -> RewardFn:
    """The reward a spec names (see the module docstring), as the bare callable. Built-in names come first, then an
    existing folder (a reward model), then ``module:function`` / ``file.py:function``."""
    head, _, rest = spec.partition(":")
    if spec == "sentiment":
        return VaderSentiment()
    if head == "length" and rest:
        unit, _, target = rest.partition(":")
        try:
            return LengthReward(unit, float(target) if target else None)
        except ValueError as exc:
            raise ValueError(f"bad length reward {spec!r}: {exc}; expected length:chars|words[:TARGET]") from None
    if head in ("keywords", "keywords-present") and rest:
        return keyword_reward(rest.split(","), mode="presence" if head.endswith("present") else "count")
    if head in ("regex", "regex-present") and rest:
        return RegexReward(rest, mode="presence" if head.endswith("present") else "count")
    if Path(spec).is_dir():
        return load_reward_model(spec, trust_remote_code=trust_remote_code, device=device)
    if ":" not in spec:
        raise FileNotFoundError(f"reward {spec!r} is neither a built-in (sentiment, length:..., keywords:..., regex:...), "
                                "a reward-model folder that exists, nor module:function")
    return import_reward(spec)


def _spec_name(spec: str, fn: RewardFn) -> str:
    """The log name of a spec's reward: a user function's name, a model folder's name, or the built-in's spec."""
    if isinstance(fn, SequenceClassifierReward):
        return Path(spec).resolve().name
    if isinstance(fn, _BUILT_IN):
        return spec
    return getattr(fn, "__name__", None) or spec.rpartition(":")[2]


def reward_from_specs(specs: Sequence[str], *, weights: Sequence[float] | None = None, trust_remote_code: bool = False,
                      device: str = "cpu") -> Rewards:
    """The weighted sum of the rewards the specs name, as a ``tilt.rewards.Rewards`` (a reward itself, and able to
    report each function's values). A weight is given either in the spec (``WEIGHT*SPEC``) or in ``weights`` (one
    per spec, as TRL's ``reward_weights``), not both; it is 1 when neither gives it. Each function is named in the
    logs (``rewards/<name>/mean``) by its function name, its model folder's name, or the built-in's spec."""
    if not specs:
        raise ValueError("no reward given; name at least one (module:function, a model folder, or a built-in)")
    if weights is not None and len(weights) != len(specs):
        raise ValueError(f"{len(weights)} reward weights for {len(specs)} rewards ({', '.join(specs)}): give one weight "
                         "per reward")
    parsed = []
    for k, spec in enumerate(specs):
        if _WEIGHTED.match(spec) and weights is not None:
            raise ValueError(f"the reward {spec!r} carries a weight and weights were given too: give it once")
        weight, inner = split_weight(spec)
        if weights is not None:
            weight = float(weights[k])
        fn = reward_from_spec(inner, trust_remote_code=trust_remote_code, device=device)
        parsed.append((weight, fn, _spec_name(inner, fn)))
    names = unique_names([name for _, _, name in parsed])
    return Rewards(tuple(RewardTerm(name=name, fn=fn, weight=w, text_only=isinstance(fn, _BUILT_IN))
                         for name, (w, fn, _) in zip(names, parsed)))


# --- scoring with non-finite samples skipped -------------------------------------------------------------------------
@dataclass(frozen=True)
class Scores:
    """Rewards of a batch, with the samples that count."""

    values: Tensor  # (B,) float64; 0.0 where valid_mask is False
    valid_mask: Tensor  # (B,) bool, True where the reward is finite and the sample counts
    n_skipped: int  # samples with a NaN/inf reward (always 0 with nonfinite="error")


def score_rewards_masked(reward_fn: RewardFn, prompts: Sequence[Any], completions: Sequence[Any], *,
                         nonfinite: str = "error", **columns: Any) -> Scores:
    """``tilt.rewards.score_rewards`` with a choice for NaN/inf rewards and the failing sample named.

    ``nonfinite="error"`` raises RewardError on a NaN/inf reward (naming the sample); ``"skip"`` returns those
    samples with ``valid_mask`` False, value 0.0 and counted in ``n_skipped``; the caller must leave them out
    of its averages (a mean over ``values[valid_mask]``). Every other problem (a reward that raises, the wrong
    number of values, values that are not numbers, an unscored sample) raises RewardError in both modes.
    """
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be 'error' or 'skip'; got {nonfinite!r}")
    if nonfinite == "error":
        values = score_rewards(reward_fn, prompts, completions, **columns)
        return Scores(values=values, valid_mask=torch.ones(len(values), dtype=torch.bool), n_skipped=0)
    raw = score_rewards_nonfinite(reward_fn, prompts, completions, **columns)
    valid = torch.isfinite(raw)
    return Scores(values=torch.where(valid, raw, torch.zeros_like(raw)), valid_mask=valid, n_skipped=int((~valid).sum()))
