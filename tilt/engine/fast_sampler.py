"""A fast sampler: a reduced-precision copy q of the policy that draws the completions, corrected exactly by pi/q.

Decoding a 135M-parameter model reads every float32 weight once per new token, so a faster loop around the same
matrix products cannot go much faster (docs/performance.md). A copy of the policy whose linear layers are int8
(dynamic quantisation: int8 weights, activations quantised per call) or whose weights are bfloat16 reads a
quarter or a half of that. Its samples come from q, not from pi; the rollout records log q per token
(``Rollout.sample_token_logprobs``) and names the sampler (``Rollout.sampler``), and the recipes weight each
sequence by pi/q (``tilt.math.mismatch``), so that what they estimate is unchanged.

Kinds (``SamplingConfig.sampler``):

* ``exact``: the policy itself, as before.
* ``int8``: every ``nn.Linear`` replaced by a dynamically quantised one (``torch.ao.nn.quantized.dynamic.Linear``,
  per-output-channel symmetric int8 weights; the x86/fbgemm kernels). CPU only: on another device it falls back
  to ``bf16`` where that device supports bfloat16, else to ``exact``, with a warning. The other parameters
  (embeddings, norms) are shared with the policy, not copied.
* ``int8-smooth``: every ``nn.Linear`` replaced by a SmoothQuant-style int8 layer (Xiao et al. 2023, "SmoothQuant",
  arXiv:2211.10438): the input's channels are divided by smoothing factors s_j = max|x_j|^a / max|W_.j|^(1-a)
  (a = ``SMOOTHING_ALPHA``; the weight's columns multiplied by them, so the product is unchanged), the activations
  quantised per token (each row its own scale, not one scale per call) and the weights per output channel, and
  multiplied in int8 with int32 accumulation (``torch._int_mm``). The channel maxima max|x_j| come from one
  forward pass of the first batch's prompts through the policy when the copy is built, and are kept at refreshes
  (any positive factors give a valid proposal: pi/q corrects it; they only shape the rounding). CPU only, with
  int8's fallback. On SmolLM2-135M it decoded at 4/5 of ``int8``'s speed as a far closer proposal (docs/engine.md): the
  activation outliers that ruin one scale per call are moved into the weights, and each token gets its own range,
  so q of a token does not depend on the rest of the batch.
* ``fp16``: every ``nn.Linear`` replaced by one whose weights are packed as float16 (fbgemm's fp16 GEMM:
  activations and arithmetic stay float32, the weights take half the bytes). CPU only, with the same fallback as
  int8. Its proposal is close to the policy (SmolLM2-135M: 0.0015 nats per token), where int8's dynamic
  quantisation of the activations (per tensor, 7 bits on x86) is far off (0.7-2 nats per token: the model's
  activation outliers), which leaves the weights pi/q little effective sample size.
* ``bf16``: a bfloat16 copy of the whole model. Fast on CUDA devices that support bfloat16 and on CPUs with
  AVX-512 BF16 or AMX; elsewhere it runs (a warning says so) but is slow: bfloat16 matrix products on an
  AVX2-only CPU ran at ~1.4 GFLOP/s.
* ``auto``: decided from detected features and the model's size, without a timing run: ``exact`` when the
  model's linear layers hold fewer than ``AUTO_MIN_LINEAR_PARAMS`` parameters (small models are bound by
  per-layer overhead, not by reading weights, so a copy would add work and save none), carry LoRA adapters, or
  decode under bfloat16/float16 autocast already (the run's compute dtype: the model's own decode then reads half
  the bytes; in two demos from a fresh clone on an AVX-512 BF16 CPU the fp16 copy's steps took 7.5-8 s against
  7.2 s for the model's own bfloat16 decode);
  else ``fp16`` on a CPU with a quantised engine (int8 is faster but its proposal is too far from the policy, see
  above), ``bf16`` on a CUDA device that supports it, else ``exact``.

Refresh: the copy is rebuilt from the policy's weights at a ``sample`` call once they have changed, detected by
the parameters' in-place version counters (an optimizer step bumps them; torch's fused optimizers do not, so a
hook bumps them after every fused step: ``count_fused_optimizer_writes``), never while they stand still. Its
cost is kept in ``last_refresh_seconds`` (the recipes log it as ``sampler/refresh_seconds``). When:
``refresh_steps`` = N >= 1 refreshes after every N-th optimizer step (1: after each); 0 (the default) refreshes
once the time spent sampling with the copy since its last refresh reaches ``1 / REFRESH_BUDGET - 1`` times the
last refresh's cost, so that refreshing takes at most ``REFRESH_BUDGET`` of the sampling phase on the machine at
hand. Re-packing SmolLM2-135M's 211 linear layers took a little longer than sampling one step of 8 x 16 tokens
with the copy (docs/performance.md), so refreshing after every step would lose more than the copy gains.
A stale copy is still a proposal: the weights pi/q correct it exactly, and only their spread (the logged
ESS) grows as the policy moves away from it.
"""
from __future__ import annotations

import copy
import time
import warnings
from contextlib import contextmanager
from functools import lru_cache

import torch
from torch import Tensor, nn
from torch.autograd.graph import increment_version
from torch.optim.optimizer import register_optimizer_step_post_hook

SAMPLERS = ("exact", "int8", "int8-smooth", "fp16", "bf16", "auto")
REDUCED = ("int8", "int8-smooth", "fp16", "bf16")
SMOOTHING_ALPHA = 0.5  # SmoothQuant's migration strength (Xiao et al. 2023, Sec. 4: 0.5 suits most models)
AUTO_MIN_LINEAR_PARAMS = 20_000_000  # below this, decoding is overhead-bound (FACTS: ~1 ms per layer per call)
REFRESH_BUDGET = 0.2  # refresh_steps = 0: refreshing may take this fraction of the time spent sampling
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with native bfloat16 arithmetic


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (Linux); empty where that file cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bf16_is_fast(device: torch.device) -> bool:
    """True where bfloat16 arithmetic is native: a CUDA device that supports it, or a CPU with AVX-512 BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)
    return False


def int8_is_available(device: torch.device) -> bool:
    """True on a CPU with one of PyTorch's x86 quantised engines (dynamic int8 linear layers run only there)."""
    return device.type == "cpu" and any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm"))


def linear_parameter_count(model: nn.Module) -> int:
    """Parameters held by the model's ``nn.Linear`` layers (a tied LM head counts once per layer that uses it)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def resolve_sampler(kind: str, model: nn.Module, compute_dtype: torch.dtype | None = None) -> tuple[str, str]:
    """``(sampler, reason)``: the sampler ``kind`` stands for on this model and device (module docstring).
    ``compute_dtype``: the dtype the model's own decode runs in under autocast (None: its weights' dtype)."""
    if kind not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {kind!r}")
    device = next(model.parameters()).device
    if kind == "exact":
        return "exact", "requested"
    if kind == "auto":
        linear = linear_parameter_count(model)
        if hasattr(model, "peft_config"):
            return "exact", "the model carries LoRA adapters"
        if linear < AUTO_MIN_LINEAR_PARAMS:
            return "exact", f"{linear / 1e6:.1f}M parameters in linear layers: decoding is overhead-bound, not weight-bound"
        if compute_dtype in (torch.bfloat16, torch.float16):
            # the model's own decode already reads its weights in half precision; the fp16 copy measured slower there
            return "exact", f"the model itself already decodes in {str(compute_dtype).removeprefix('torch.')} under autocast"
        if int8_is_available(device):
            return "fp16", f"{device.type} with fbgemm: float16-packed linear weights"
        if bf16_is_fast(device):
            return "bf16", f"{device.type} with native bfloat16"
        return "exact", f"{device.type}: neither int8 kernels nor native bfloat16"
    if kind in ("int8", "int8-smooth", "fp16"):
        if int8_is_available(device):
            return kind, "requested"
        fallback = "bf16" if bf16_is_fast(device) else "exact"
        warnings.warn(f"sampler {kind!r} needs a CPU with a quantised engine; the model is on {device.type}: sampling with '{fallback}'")
        return fallback, f"{kind} unavailable on {device.type}"
    if not bf16_is_fast(device):
        warnings.warn(f"sampler 'bf16' on {device.type} without native bfloat16 (no {' / '.join(BF16_CPU_FLAGS)}): it runs, slowly")
    return "bf16", "requested"


@contextmanager
def _quiet_quantisation():
    """torch.ao's quantisation API warns that it is deprecated on every call (torch 2.13 still ships it; torchao is
    its successor); the warning says nothing about this use."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        yield


def int8_linear(linear: nn.Linear) -> nn.Module:
    """A dynamically quantised copy of ``linear``: weights int8, symmetric per output channel; bias float32."""
    with _quiet_quantisation():
        out = torch.ao.nn.quantized.dynamic.Linear(linear.in_features, linear.out_features, bias_=linear.bias is not None, dtype=torch.qint8)
        set_int8_weights(out, linear)
    return out


def fp16_linear(linear: nn.Linear) -> nn.Module:
    """A copy of ``linear`` with its weights packed as float16 for fbgemm's fp16 GEMM; float32 activations."""
    with _quiet_quantisation():
        out = torch.ao.nn.quantized.dynamic.Linear(linear.in_features, linear.out_features, bias_=linear.bias is not None, dtype=torch.float16)
        set_fp16_weights(out, linear)
    return out


def set_fp16_weights(packed: nn.Module, linear: nn.Linear) -> None:
    """Re-pack ``linear``'s current weights into ``packed`` as float16."""
    packed.set_weight_bias(linear.weight.detach().float(), linear.bias.detach().float() if linear.bias is not None else None)


def quantise_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 codes of each row of ``x`` (N, D) with its own scale: ``(codes (N, D) int8, scales (N, 1))``,
    x ~ codes * scales, scale = max |row| / 127."""
    row_max = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)  # (N, 1)
    return (x * (127.0 / row_max)).round_().to(torch.int8), row_max / 127.0  # |x| * 127 / max rounds to at most 127


def set_int8_weights(quantised: nn.Module, linear: nn.Linear) -> None:
    """Re-quantise ``linear``'s current weights into ``quantised`` (``quantise_rows``: scale = max |w| / 127 per output
    row)."""
    w = linear.weight.detach().float()  # (out, in)
    codes, scales = quantise_rows(w)  # half the time of quantize_per_channel
    q = torch._make_per_channel_quantized_tensor(codes, scales.squeeze(-1).double(), torch.zeros(w.shape[0], dtype=torch.long), 0)
    bias = linear.bias.detach().float() if linear.bias is not None else None
    quantised.set_weight_bias(q, bias)


def smoothing_factors(input_abs_max: Tensor, weight: Tensor, *, alpha: float = SMOOTHING_ALPHA) -> Tensor:
    """(in,) SmoothQuant's per-input-channel factors s_j = max|x_j|^alpha / max_i |W_ij|^(1 - alpha) for a weight
    (out, in) and its input's channel maxima (in,) (Xiao et al. 2023, eq. 4). x W^T = (x / s)(W diag(s))^T exactly;
    quantising x / s and W diag(s) shares the range of an outlier channel between activation and weight."""
    x_max = input_abs_max.float().clamp(min=1e-5)
    w_max = weight.detach().float().abs().amax(dim=0).clamp(min=1e-5)  # (in,)
    return (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


class SmoothInt8Linear(nn.Module):
    """y = (q(x / s) q(W diag(s))^T) + b: activations quantised per token, weights per output channel, int8 products
    with int32 accumulation (``torch._int_mm``), smoothing factors s (in,) fixed at construction (``smoothing_factors``).
    ``set_weights`` re-quantises a linear layer's current weights with the same factors."""

    def __init__(self, linear: nn.Linear, smoothing: Tensor):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("inv_smoothing", (1.0 / smoothing.float()).to(linear.weight.device))  # (in,)
        self.set_weights(linear)

    def set_weights(self, linear: nn.Linear) -> None:
        smoothed = linear.weight.detach().float() / self.inv_smoothing  # (out, in) W diag(s)
        codes, scales = quantise_rows(smoothed)  # per output channel
        self.weight_codes_t = codes.t().contiguous()  # (in, out) int8, the layout torch._int_mm takes
        self.weight_scales = scales.squeeze(-1)  # (out,)
        self.bias = linear.bias.detach().float().clone() if linear.bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        rows = (x.reshape(-1, self.in_features).float() * self.inv_smoothing)  # (N, in)
        codes, scales = quantise_rows(rows)
        y = torch._int_mm(codes, self.weight_codes_t) * scales * self.weight_scales  # (N, out) float32
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


@torch.no_grad()
def input_channel_maxima(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
    """{name: (in,) max |x_j| over the real tokens} of the input of every ``nn.Linear`` of ``model`` in one forward
    pass of ``input_ids`` (P, Tp) left-padded, ``attention_mask`` (P, Tp) bool, True on real tokens."""
    maxima: dict[str, Tensor] = {}
    real = attention_mask.reshape(-1)  # (P * Tp,)

    def record(name):
        def hook(module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            x = x[real] if x.shape[0] == real.shape[0] else x  # the LM head sees the last position only
            m = x.float().abs().amax(dim=0)
            maxima[name] = torch.maximum(maxima[name], m) if name in maxima else m
        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(record(name)) for name in _linear_names(model)]
    try:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        model(input_ids=input_ids, attention_mask=attention_mask.long(), position_ids=positions, logits_to_keep=1)  # no (P, Tp, V) logits
    finally:
        for h in handles:
            h.remove()
    return maxima


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def build_int8_copy(model: nn.Module, kind: str = "int8", input_maxima: dict[str, Tensor] | None = None) -> nn.Module:
    """The model with every ``nn.Linear`` quantised (``kind`` 'int8', 'fp16', or 'int8-smooth' with ``input_maxima``
    from ``input_channel_maxima``); every other parameter and buffer is *shared* with ``model`` (deep-copied
    structure, same tensors), so only the linear layers need refreshing."""
    if kind == "int8-smooth" and input_maxima is None:
        raise ValueError("an int8-smooth copy needs the input channel maxima of a calibration pass (input_channel_maxima)")
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    out = copy.deepcopy(model, memo)
    for name in _linear_names(model):
        linear = model.get_submodule(name)
        if kind == "int8-smooth":
            layer = SmoothInt8Linear(linear, smoothing_factors(input_maxima[name], linear.weight))
        else:
            layer = int8_linear(linear) if kind == "int8" else fp16_linear(linear)
        _set_module(out, name, layer)
    return out.eval()


def weights_version(model: nn.Module) -> tuple[int, ...]:
    """The parameters' in-place version counters: they change whenever an optimizer (or ``load_state_dict``)
    writes to the weights, so a changed tuple means the sampler copy is stale."""
    return tuple(p._version for p in model.parameters())


def bump_versions_after_fused_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Optimizer step post-hook: a fused step (``fused=True``) writes the parameters in one kernel without bumping
    their version counters, unlike the per-tensor and foreach paths; bump those of the parameters it updated."""
    if optimizer.defaults.get("fused", False):  # torch's own defaults dict: only some optimizers have the key
        increment_version([p for group in optimizer.param_groups for p in group["params"] if p.grad is not None])


@lru_cache(maxsize=1)
def count_fused_optimizer_writes() -> None:
    """Install ``bump_versions_after_fused_step`` for every optimizer of the process, once: a fast sampler sees the
    weights change through their version counters whichever optimizer the user hands a recipe."""
    register_optimizer_step_post_hook(bump_versions_after_fused_step)


class FastSampler:
    """The reduced-precision copy of a policy's model that samples for it. ``kind`` is 'int8', 'int8-smooth', 'fp16' or 'bf16' (resolved:
    see ``resolve_sampler``). ``model_for_sampling(policy_model)`` refreshes the copy if the weights have changed
    and returns it."""

    def __init__(self, model: nn.Module, kind: str, refresh_steps: int = 0):
        if kind not in REDUCED:
            raise ValueError(f"a fast sampler is one of {REDUCED}, got {kind!r}")
        if refresh_steps < 0:
            raise ValueError(f"refresh_steps must be >= 0 (0 = by cost), got {refresh_steps}")
        count_fused_optimizer_writes()
        self.kind, self.refresh_steps = kind, refresh_steps
        self.copy: nn.Module | None = None
        self.version: tuple[int, ...] | None = None  # the weights the copy was made from
        self.seen: tuple[int, ...] | None = None  # the weights at the latest sample call
        self.updates_since_refresh = 0  # weight changes seen at sample calls since the latest refresh
        self.sampling_seconds_since_refresh = 0.0  # time spent sampling with the copy since the latest refresh
        self.last_refresh_seconds = 0.0  # wall time of the latest build or refresh
        self.refreshes = 0

    def refresh(self, model: nn.Module, calibration: tuple[Tensor, Tensor] | None = None) -> float:
        """Bring the copy up to date with ``model``'s weights (building it the first time); returns the seconds taken.
        ``calibration`` (prompt ids (P, Tp), mask (P, Tp) bool): the inputs whose activations set an int8-smooth copy's
        smoothing factors when it is built (``input_channel_maxima``); ignored otherwise."""
        start = time.perf_counter()
        with torch.no_grad():
            if self.copy is None and self.kind == "bf16":
                self.copy = copy.deepcopy(model).to(torch.bfloat16).eval()
            elif self.copy is None:  # build_int8_copy refuses an int8-smooth copy without its calibration
                maxima = input_channel_maxima(model, *calibration) if self.kind == "int8-smooth" and calibration is not None else None
                self.copy = build_int8_copy(model, self.kind, maxima)
            elif self.kind == "int8-smooth":
                for name in _linear_names(model):
                    self.copy.get_submodule(name).set_weights(model.get_submodule(name))
            elif self.kind in ("int8", "fp16"):
                setter = set_int8_weights if self.kind == "int8" else set_fp16_weights
                with _quiet_quantisation():
                    for name in _linear_names(model):
                        setter(self.copy.get_submodule(name), model.get_submodule(name))
            else:
                mine = dict(self.copy.named_parameters())
                for name, p in model.named_parameters():
                    mine[name].copy_(p)  # cast to bfloat16
        self.version = self.seen = weights_version(model)
        self.updates_since_refresh, self.sampling_seconds_since_refresh = 0, 0.0
        self.last_refresh_seconds = time.perf_counter() - start
        self.refreshes += 1
        return self.last_refresh_seconds

    def due(self) -> bool:
        """Whether the weights changed since the copy was made and the refresh rule (module docstring) calls for it."""
        if self.updates_since_refresh == 0:
            return False
        if self.refresh_steps:
            return self.updates_since_refresh >= self.refresh_steps
        return self.sampling_seconds_since_refresh >= self.last_refresh_seconds * (1 / REFRESH_BUDGET - 1)

    def model_for_sampling(self, model: nn.Module, calibration: tuple[Tensor, Tensor] | None = None) -> nn.Module:
        """The copy, refreshed first if it was never built or if ``due()`` after noting whether ``model``'s weights changed
        (``calibration``: see ``refresh``)."""
        if self.copy is not None:
            version = weights_version(model)
            if version != self.seen:
                self.seen, self.updates_since_refresh = version, self.updates_since_refresh + 1
        if self.copy is None or self.due():
            self.refresh(model, calibration)
        return self.copy

    def record_sampling(self, seconds: float) -> None:
        """Note the time a ``sample`` call spent with the copy (the cost rule's measure of what the copy is used for)."""
        self.sampling_seconds_since_refresh += seconds
