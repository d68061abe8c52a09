"""Calling a user's reward the way TRL does, checking what comes back, and combining several with weights.

**Calling convention.** A reward is any callable returning one number per completion. It is called as its
signature asks (``calling_convention`` reads it with ``inspect.signature``; nothing is retried on TypeError):

* a function with a parameter named ``prompts``, ``completions`` or ``completion_ids``, or one that takes
  ``**kwargs`` and fewer than two positional parameters, is called **by keyword**, as TRL's
  trainers call ``reward_funcs``: ``f(prompts=..., completions=..., completion_ids=..., **columns)``, where
  ``columns`` are the data's other columns, one value per completion. Keywords it does not declare are left out
  unless it takes ``**kwargs``; ``completion_ids`` is passed only when the caller has them.
* any other function is called **by position**, tilt's older form: ``f(prompts, completions, **columns)``, the
  columns again limited to what it declares unless it takes ``**kwargs``.

With conversational data (``Rewards.for_data``), a user function receives each prompt as its list of messages and
each completion as ``[{"role": "assistant", "content": text}]``, as in TRL.

**Values.** Each value must be a real number (int, float, a numpy or torch scalar) or ``None``: ``None`` means
"this function does not score this sample". A bool or anything else is an error naming the function, the sample
and the value. A single function that leaves a sample unscored is an error; in a weighted sum (``Rewards``) the
sample gets the other functions' terms (TRL's ``nansum`` over functions), and a sample no function scores is an
error naming it. NaN/inf pass through the sum; ``score_rewards`` then rejects them (naming the sample) and
``tilt.reward_fns.score_rewards_masked`` can skip and count them instead.
"""
from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

RewardFn = Callable[..., Any]


class RewardError(RuntimeError):
    """A reward function raised, returned the wrong number of values, a value that is not a number, or NaN/inf."""


def _show(x: Any, limit: int = 200) -> str:
    s = repr(x)
    return s if len(s) <= limit else s[:limit] + "...'"


def reward_name(fn: RewardFn) -> str:
    """A readable name of a reward: its ``name`` attribute, its ``__name__``, or its class name."""
    name = getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return str(name)


# --- how to call a function --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CallingConvention:
    """How a reward function is called, read from its signature once."""

    by_keyword: bool  # True: f(prompts=..., completions=..., ...); False: f(prompts, completions, ...)
    accepts: frozenset[str] | None  # the keyword names it declares; None when it takes **kwargs (anything goes)
    required: frozenset[str]  # keyword parameters without a default, beyond prompts and completions


def calling_convention(fn: RewardFn) -> CallingConvention:
    """Read how to call ``fn`` from ``inspect.signature`` (see the module docstring). Raises ValueError for a
    callable that can be called neither way (no ``completions`` parameter and fewer than two positional ones)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: the older positional form
        return CallingConvention(by_keyword=False, accepts=None, required=frozenset())
    params = list(sig.parameters.values())
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    accepts = None if var_kw else frozenset(p.name for p in named)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if {"prompts", "completions", "completion_ids"} & {p.name for p in named} or (var_kw and len(positional) < 2):
        required = frozenset(p.name for p in named if p.default is p.empty) - {"prompts", "completions"}
        return CallingConvention(by_keyword=True, accepts=accepts, required=required)
    if len(positional) < 2 and not any(p.kind is p.VAR_POSITIONAL for p in params):
        raise ValueError(
            f"cannot tell how to call the reward {reward_name(fn)}{sig}: name its parameters as TRL does "
            "(completions, and prompts or **kwargs: called by keyword) or take (prompts, completions) by position")
    required = frozenset(p.name for p in named[2:] if p.default is p.empty) if len(positional) >= 2 else frozenset()
    return CallingConvention(by_keyword=False, accepts=accepts, required=required)


def call_reward(fn: RewardFn, prompts: Sequence[Any], completions: Sequence[Any], *,
                convention: CallingConvention | None = None, **columns: Any) -> Any:
    """Call ``fn`` on a batch as its signature asks and return what it returned, unchecked. ``columns`` may hold
    ``completion_ids`` (a list of token-id lists, one per completion) and the data's other columns. Raises
    RewardError when ``fn`` requires a keyword that the caller does not have."""
    conv = convention or calling_convention(fn)
    missing = sorted(conv.required - set(columns))
    if missing:
        have = ", ".join(sorted(columns)) or "none"
        raise RewardError(
            f"the reward {reward_name(fn)} needs {', '.join(repr(m) for m in missing)}, which this caller does not pass "
            f"(it passes prompts, completions and: {have}). Add the column to the data, or give the parameter a default.")
    kwargs = columns if conv.accepts is None else {k: v for k, v in columns.items() if k in conv.accepts}
    if conv.by_keyword:
        batch = {"prompts": list(prompts), "completions": list(completions)}
        return fn(**{k: v for k, v in batch.items() if conv.accepts is None or k in conv.accepts}, **kwargs)
    return fn(list(prompts), list(completions), **kwargs)


# --- checking what came back -------------------------------------------------------------------------------------
def reward_values(raw: Any, prompts: Sequence[Any], completions: Sequence[Any], *, name: str) -> tuple[Tensor, Tensor]:
    """(values (B,) float64, scored_mask (B,) bool) from a reward's raw output: one real number or None per
    completion (None: not scored, value 0.0 there). NaN/inf are kept. Raises RewardError for a wrong count, a
    bool, or any value that is not a real number, naming the function, the sample and the value."""
    n = len(completions)
    if isinstance(raw, Tensor):
        if raw.dtype == torch.bool:
            raise RewardError(f"the reward {name} returned a tensor of bools ({_show(raw)}): return numbers "
                              "(for example float(x) or 1.0/0.0) so that True is not silently read as 1.0")
        if raw.is_complex():
            raise RewardError(f"the reward {name} returned complex numbers: {_show(raw)}")
        values = raw.detach().to("cpu", torch.float64).flatten()
        if values.numel() != n:
            raise RewardError(f"the reward {name} returned {values.numel()} values for {n} completions; "
                              "it must return one float per completion.")
        return values, torch.ones(n, dtype=torch.bool)
    if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Sequence) and not hasattr(raw, "__len__"):
        raise RewardError(f"the reward {name} returned {_show(raw)}, which is not a sequence of floats: it must return "
                          "one float (or None, for a sample it does not score) per completion.")
    items = list(raw)
    if len(items) != n:
        raise RewardError(f"the reward {name} returned {len(items)} values for {n} completions; "
                          "it must return one float per completion.")
    values = torch.zeros(n, dtype=torch.float64)
    scored = torch.ones(n, dtype=torch.bool)
    for i, v in enumerate(items):
        if v is None:
            scored[i] = False
            continue
        if isinstance(v, Tensor) and v.numel() == 1 and v.dtype != torch.bool:
            v = v.item()
        if isinstance(v, bool) or type(v).__name__ == "bool_" or not isinstance(v, numbers.Real):
            why = ("a bool, which tilt will not read as 1.0/0.0: return float(...)" if isinstance(v, bool) or
                   type(v).__name__ == "bool_" else "not a number")
            raise RewardError(f"the reward {name} returned {_show(v)} for sample {i} of {n} ({why}): prompt "
                              f"{_show(prompts[i])}, completion {_show(completions[i])}. Return one float (or None "
                              "for a sample it does not score) per completion.")
        values[i] = float(v)
    return values, scored


def _first_failing_sample(fn: RewardFn, conv: CallingConvention, prompts, completions, columns) -> int | None:
    """Index of the first sample on which ``fn`` raises when called alone, or None."""
    n = len(completions)
    for i in range(n):
        one = {k: [v[i]] if isinstance(v, (list, tuple)) and len(v) == n else v for k, v in columns.items()}
        try:
            call_reward(fn, [prompts[i]], [completions[i]], convention=conv, **one)
        except Exception:  # noqa: BLE001
            return i
    return None


def _call_checked(fn: RewardFn, conv: CallingConvention, prompts, completions, columns, *, name: str) -> tuple[Tensor, Tensor]:
    """``reward_values`` of ``call_reward``; an exception inside the reward becomes a RewardError naming the sample
    (each sample is then scored alone to find it, since a batched reward does not say which one failed)."""
    try:
        raw = call_reward(fn, prompts, completions, convention=conv, **columns)
    except RewardError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        i = _first_failing_sample(fn, conv, prompts, completions, columns)
        where = (f"sample {i} of {len(completions)}: prompt {_show(prompts[i])}, completion {_show(completions[i])}"
                 if i is not None else
                 f"a batch of {len(completions)} samples (each alone scores fine); first prompt {_show(prompts[0])}")
        raise RewardError(f"the reward function {name} raised {type(exc).__name__}: {exc}\n  on {where}.\n"
                          "  Fix the reward function or the data.") from exc
    return reward_values(raw, prompts, completions, name=name)


def _check_finite(values: Tensor, prompts, completions) -> None:
    bad = (~torch.isfinite(values)).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise RewardError(
            f"the reward is {values[i].item()} (not finite) for sample {i}: prompt {_show(prompts[i])}, "
            f"completion {_show(completions[i])}. {bad.numel()} of {len(completions)} samples in this batch are "
            "not finite. Fix the reward, or let the run skip such samples where the recipe offers it.")


def score_rewards(reward_fn: RewardFn, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> Tensor:
    """Call ``reward_fn`` on a batch (as its signature asks) and return its values as a float64 tensor (B,).

    Raises ``RewardError`` naming the first sample that broke it: an exception inside the reward, a wrong number
    of values, a value that is not a number (a bool included), a sample it leaves unscored (None), or NaN/inf.
    """
    values = score_rewards_nonfinite(reward_fn, prompts, completions, **columns)
    _check_finite(values, prompts, completions)
    return values


def score_rewards_nonfinite(reward_fn: RewardFn, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> Tensor:
    """``score_rewards`` with NaN/inf values returned as they are (the caller decides what to do with them);
    every other check applies. Returns (B,) float64."""
    name = reward_name(reward_fn)
    values, scored = _call_checked(reward_fn, calling_convention(reward_fn), prompts, completions, columns, name=name)
    if not scored.all():
        i = int((~scored).nonzero()[0])
        raise RewardError(f"the reward {name} returned None (not scored) for sample {i} of {len(completions)}: prompt "
                          f"{_show(prompts[i])}, completion {_show(completions[i])}. A sample needs a reward; None is "
                          "allowed only where another reward in a sum scores the sample.")
    return values


def score_rollout(reward_fn: RewardFn, rollout, **columns: Any) -> Tensor:
    """``score_rewards`` of a ``tilt.rollout.Rollout``, passing ``completion_ids`` (each completion's sampled token
    ids up to and including its EOS) as TRL does. Returns (B,) float64."""
    ids = [row[mask].tolist() for row, mask in zip(rollout.completion_ids.cpu(), rollout.completion_mask.cpu())]
    return score_rewards(reward_fn, rollout.prompts, rollout.completions, completion_ids=ids, **columns)


def score_rollout_by_function(reward_fn: RewardFn, rollout) -> "RewardScores":
    """``score_rollout`` keeping each function's values: a ``Rewards`` is called once through ``Rewards.score``
    (its total checked finite, as ``score_rewards`` does); any other reward is one function, named by
    ``reward_name``, that scored every sample. For ``reward_metrics`` next to the total."""
    if not isinstance(reward_fn, Rewards):
        total = score_rollout(reward_fn, rollout)
        name = reward_name(reward_fn)
        return RewardScores(total=total, values={name: total}, scored_mask={name: torch.ones(len(total), dtype=torch.bool)})
    ids = [row[mask].tolist() for row, mask in zip(rollout.completion_ids.cpu(), rollout.completion_mask.cpu())]
    scores = reward_fn.score(rollout.prompts, rollout.completions, completion_ids=ids)
    _check_finite(scores.total, rollout.prompts, rollout.completions)
    return scores


# --- several rewards, with weights ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RewardTerm:
    """One reward function of a sum, its weight and how it is called."""

    name: str  # unique within a Rewards; the metric key is rewards/<name>/mean
    fn: RewardFn
    weight: float = 1.0
    text_only: bool = False  # True for tilt's built-ins and reward models: always given text, never messages
    convention: CallingConvention | None = None  # read from the signature when None

    def __post_init__(self):
        if not math.isfinite(self.weight):
            raise ValueError(f"the weight of reward {self.name} must be a finite number; got {self.weight}")
        if self.convention is None:
            object.__setattr__(self, "convention", calling_convention(self.fn))


@dataclass(frozen=True)
class PromptContext:
    """What a reward sees of one data row besides the sampled completion."""

    prompt: Any  # the row's prompt as in the data: text, or a list of messages
    columns: Mapping[str, Any]  # the row's other columns
    row: int  # 1-based row number in the file


@dataclass(frozen=True)
class RewardScores:
    """Rewards of a batch: the weighted total and each function's own values."""

    total: Tensor  # (B,) float64: sum over the functions that scored a sample of weight * value (NaN/inf kept)
    values: dict  # name -> (B,) float64 values of that function, 0.0 where not scored
    scored_mask: dict  # name -> (B,) bool, True where that function scored the sample (did not return None)


@dataclass(frozen=True)
class Rewards:
    """The weighted sum of reward functions, called as TRL calls ``reward_funcs`` with ``reward_weights``:
    total(x, y) = sum over the functions f_i that score (x, y) of w_i * f_i(x, y).

    A ``Rewards`` is itself a reward ``(prompts, completions, **columns) -> (B,) float64`` (``__call__``), so every
    recipe takes it; ``score`` also returns each function's values, and ``reward_metrics`` turns those into
    ``rewards/<name>/mean`` and ``/std`` log keys. ``for_data`` binds it to data rows, so that a recipe that passes
    only the prompt text it sampled from still gives each function the row's columns and, for conversational data,
    messages.
    """

    terms: tuple[RewardTerm, ...]
    contexts: Mapping[Any, PromptContext] | None = None  # rendered prompt -> its row, set by for_data
    conversational: bool = False  # set by for_data: user functions get messages, not text

    def __post_init__(self):
        if not self.terms:
            raise ValueError("no reward given; name at least one (module:function, a model folder, or a built-in)")
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique (they key the logs); got {names}")

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.terms]

    def for_data(self, data) -> "Rewards":
        """This reward bound to ``data`` (a ``tilt.data.Data``): when called with a prompt exactly as it appears in
        ``data.rows[i]["prompt"]``, each function receives that row's other columns by keyword and, when the data are
        conversational, the row's messages as the prompt and ``[{"role": "assistant", "content": text}]`` as the
        completion. Raises ValueError when two rows share a prompt but differ in their other columns (the reward
        could not tell which row a sample came from)."""
        from tilt.data import reward_columns

        contexts: dict[Any, PromptContext] = {}
        for number, row in zip(data.row_numbers, data.rows):
            key = _key(row["prompt"])
            ctx = PromptContext(prompt=row.get("messages", row["prompt"]), columns=reward_columns(row), row=number)
            seen = contexts.get(key)
            if seen is not None and seen.columns != ctx.columns:
                raise ValueError(f"rows {seen.row} and {number} have the same prompt but different columns "
                                 f"({_show(dict(seen.columns))} and {_show(dict(ctx.columns))}), so a reward could not tell "
                                 "which row a completion answers; make the prompts distinct or drop one row")
            contexts.setdefault(key, ctx)
        return replace(self, contexts=contexts, conversational=bool(getattr(data, "conversational", False)))

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> Tensor:
        return self.score(prompts, completions, **columns).total

    def score(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> RewardScores:
        """Every function on the batch and their weighted total (see the class docstring). ``columns`` given here
        (and ``completion_ids``) override those ``for_data`` looks up. Raises RewardError for a function that
        raises or returns something other than numbers/None, and for a sample that no function scores."""
        prompts, completions = list(prompts), list(completions)
        n = len(completions)
        user_prompts, user_completions, user_columns = self._user_view(prompts, completions, columns)
        total = torch.zeros(n, dtype=torch.float64)
        any_scored = torch.zeros(n, dtype=torch.bool)
        values, scored_masks = {}, {}
        for term in self.terms:
            if term.text_only:
                args = (prompts, completions, {**self._columns(prompts), **columns})
            else:
                args = (user_prompts, user_completions, user_columns)
            v, scored = _call_checked(term.fn, term.convention, *args, name=term.name)
            values[term.name], scored_masks[term.name] = v, scored
            total += torch.where(scored, term.weight * v, torch.zeros_like(v))
            any_scored |= scored
        if not any_scored.all():
            i = int((~any_scored).nonzero()[0])
            raise RewardError(f"no reward function scored sample {i} of {n} (every one of {', '.join(self.names)} "
                              f"returned None): prompt {_show(prompts[i])}, completion {_show(completions[i])}. Make at "
                              "least one function score every sample.")
        return RewardScores(total=total, values=values, scored_mask=scored_masks)

    def _columns(self, prompts: list) -> dict:
        """The bound rows' columns, one value per sample (empty when not bound or no row has columns)."""
        if self.contexts is None:
            return {}
        ctxs = [self._context(p) for p in prompts]
        names = sorted({k for c in ctxs if c is not None for k in c.columns})
        return {k: [c.columns.get(k) if c is not None else None for c in ctxs] for k in names}

    def _context(self, prompt) -> PromptContext | None:
        try:
            return self.contexts.get(_key(prompt))
        except TypeError:
            return None

    def _user_view(self, prompts: list, completions: list, columns: dict) -> tuple[list, list, dict]:
        """Prompts, completions and columns as a user function sees them (TRL's layout)."""
        cols = {**self._columns(prompts), **columns}
        if not self.conversational:
            return prompts, completions, cols
        shown = []
        for p in prompts:
            ctx = self._context(p) if self.contexts is not None else None
            shown.append(ctx.prompt if ctx is not None else p)
        return shown, [[{"role": "assistant", "content": c}] for c in completions], cols


def _key(prompt: Any) -> Any:
    """A hashable key of a prompt (text, a token tuple, or a list of messages)."""
    if isinstance(prompt, list):
        return tuple(tuple(sorted(m.items())) if isinstance(m, dict) else m for m in prompt)
    return prompt


def reward_metrics(scores: RewardScores, *, prefix: str = "rewards/") -> dict[str, float]:
    """``{prefix}<name>/mean`` and ``{prefix}<name>/std`` of each function over the samples it scored (TRL's keys),
    and ``{prefix}<name>/scored`` (the fraction it scored) for a function that left some unscored. Mean and std
    are NaN for a function that scored nothing in the batch; std is the sample standard deviation (n - 1)."""
    out: dict[str, float] = {}
    for name, v in scores.values.items():
        mask = scores.scored_mask[name]
        kept = v[mask]
        out[f"{prefix}{name}/mean"] = kept.mean().item() if kept.numel() else math.nan
        out[f"{prefix}{name}/std"] = kept.std().item() if kept.numel() > 1 else (0.0 if kept.numel() else math.nan)
        if not mask.all():
            out[f"{prefix}{name}/scored"] = mask.double().mean().item()
    return out


def unique_names(names: Sequence[str]) -> list[str]:
    """``names`` with a repeated name suffixed _2, _3, ... in order of appearance."""
    out, counts = [], {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
        out.append(n if counts[n] == 1 else f"{n}_{counts[n]}")
    return out
