"""Data-parallel and sharded training on ``torch.distributed``, launched by ``torchrun`` (or any launcher that sets
the same environment: ``accelerate launch``, SLURM, Kubernetes). No process management of our own.

Single process is the default: without ``WORLD_SIZE > 1`` in the environment, ``init`` creates no process group
and every helper here is the identity (a sum over one rank is the value itself), so the single-process code
path of a recipe is numerically what it was before this module existed.

What a recipe does under several processes (docs/distributed.md):

* **Sharding.** The step's global prompt list is cut into contiguous, equal shards by *prompt* position
  (``shard_positions``), so the K samples of a prompt stay on one rank (a leave-one-out baseline or a per-prompt
  quantile is never split). Each prompt is sampled from ``step_prompt_seeds(seed, step, global positions)``, so
  its completions are the same whatever the world size.
* **One reduction.** The loss of a rank is the sum of its per-sequence losses divided by the GLOBAL number of
  sequences; gradients are then summed across ranks (never averaged), so the update equals the single-process
  one to float precision, whatever the number of processes.
* **Metrics** are computed from per-sequence tensors gathered from every rank, in rank order, i.e. the global
  batch order: the same formula as in one process.
* **Gradient synchronisation** (``accumulate`` and ``reduce_gradients``) depends on how the model is held:
  a replicated module, plain or wrapped by ``wrap_ddp``, gets one explicit all-reduce (sum) of its gradients per
  optimiser step, after all its micro-batches (DDP's own reducer is kept out of the way with ``no_sync``: it
  averages instead of summing, and tying its sync to "the last micro-batch" proved fragile); a module sharded by
  ``shard_fsdp`` reduce-scatters in backward with the divide factor set to 1 (a sum).
* **Agreement.** ``check_same_config`` compares a hash of the config on every rank and raises
  ``ConfigMismatchError`` naming the ranks that differ. Every process group has a finite timeout, and a failed or
  timed-out collective of ours raises ``RankFailure`` saying that another rank died or hung.
* **Writing.** Only rank 0 writes logs and metrics (``is_main``); checkpoints are written by every rank with
  ``torch.distributed.checkpoint`` (each rank its own shards) and published by rank 0 (``save_checkpoint``).
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_ENV = "TILT_DIST_TIMEOUT_S"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_JSON = "trainer_state.json"
SHARDS = "shards"


class ConfigMismatchError(RuntimeError):
    """Ranks were launched with different configurations."""


class RankFailure(RuntimeError):
    """A collective failed or timed out: another rank died, hung or was never started."""


# --- process group ------------------------------------------------------------------------------------------------
def launched() -> bool:
    """True when a launcher asked for several processes (``WORLD_SIZE > 1`` in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init(timeout_s: float | None = None, backend: str | None = None) -> bool:
    """Join the process group described by the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT),
    only when ``WORLD_SIZE > 1``; otherwise do nothing. Returns whether a process group is active.

    ``timeout_s`` bounds the set-up and every collective (default ``TILT_DIST_TIMEOUT_S`` or 300 s; torch's own
    default waits 30 minutes). ``backend`` defaults to nccl when CUDA is available, gloo otherwise."""
    if not launched():
        return False
    if active():
        return True
    timeout_s = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)) if timeout_s is None else float(timeout_s)
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    except Exception as e:  # the rendezvous itself timed out or failed
        raise RankFailure(
            f"could not join the process group of {os.environ.get('WORLD_SIZE')} processes within {timeout_s:g} s "
            f"({type(e).__name__}: {e}); check that every rank was started with the same MASTER_ADDR/MASTER_PORT"
        ) from e
    return True


def shutdown() -> None:
    """Leave the process group, if any, once every rank has come this far: a rank that tore its group down while
    another still held the connections aborted at exit ("terminate called without an active exception", gloo, seen
    once under load). If the barrier fails (a peer died), the group is still destroyed and the error raised.

    Modules that hold the group (FSDP2's state, DDP's reducer) often sit in reference cycles that only the garbage
    collector frees; left to the interpreter's finalisation, the group's worker threads are joined while Python is
    being torn down, the other way gloo has aborted at exit. So they are collected here, while Python is whole."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
            gc.collect()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on the one rank that writes logs, metrics and published checkpoints (rank 0)."""
    return rank() == 0


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn a failed or timed-out collective into a ``RankFailure`` that says what probably happened."""
    try:
        yield
    except (RuntimeError, dist.DistError) as e:  # gloo: 'Connection closed by peer', 'Timed out waiting ...'
        raise RankFailure(
            f"rank {rank()} of {world_size()}: {what} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "Another rank has died, raised an error or hung past the timeout; its own log names the cause. "
            "Relaunch the job (with --resume to continue from the latest checkpoint)."
        ) from e


def barrier() -> None:
    if active():
        with _collective("a barrier"):
            dist.barrier()


# --- sharding -----------------------------------------------------------------------------------------------------
def shard_positions(n: int, rank_: int | None = None, world: int | None = None) -> range:
    """The contiguous positions ``[r n / W, (r + 1) n / W)`` of a global list of ``n`` prompts that rank r works on.

    Shards are by prompt, so all K samples of a prompt stay on one rank. ``n`` must be a multiple of the world
    size: equal shards keep every rank's forward and backward passes in step (sharded models need that)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if n % world:
        raise ValueError(f"{n} prompts per step cannot be split evenly over {world} processes: "
                         f"use a multiple of {world} (e.g. {n + world - n % world})")
    size = n // world
    return range(rank_ * size, (rank_ + 1) * size)


# --- reductions ---------------------------------------------------------------------------------------------------
def all_sum(values: Sequence[float]) -> list[float]:
    """Sums over ranks of a few floats (float64); the values themselves in one process."""
    if not active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    with _collective("an all-reduce of metrics"):
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_sum_int(value: int) -> int:
    """Sum over ranks of an integer count (e.g. the global number of sequences of a step)."""
    if not active():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.long)
    with _collective("an all-reduce of a count"):
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def all_gather_cat(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Each tensor (same shape on every rank) concatenated along dim 0 in rank order, i.e. in global batch order.
    In one process, the tensors themselves (no copy): metrics computed from them are unchanged."""
    if not active():
        return tensors
    out = []
    with _collective("an all-gather of per-sequence metrics"):
        for t in tensors:
            t = t.detach().contiguous()
            dtype = t.dtype
            send = t.to(torch.uint8) if dtype == torch.bool else t  # gloo has no bool all-gather
            parts = [torch.empty_like(send) for _ in range(world_size())]
            dist.all_gather(parts, send)
            out.append(torch.cat(parts).to(dtype))
    return tuple(out)


def all_reduce_mean_metrics(metrics: dict[str, float], weight: float = 1.0) -> dict[str, float]:
    """Weighted mean over ranks of a dict of floats (same keys on every rank), for metrics that are means over a
    rank's samples: weight each rank by its number of samples. The dict itself in one process."""
    if not active():
        return dict(metrics)
    keys = sorted(metrics)
    sums = all_sum([metrics[k] * weight for k in keys] + [weight])
    return {k: s / sums[-1] for k, s in zip(keys, sums[:-1])}


# --- agreement ----------------------------------------------------------------------------------------------------
def config_hash(config: Any) -> str:
    """sha256 of a config (or any JSON-like value: the prompts) as canonical JSON (sorted keys; other values by repr)."""
    text = json.dumps(config, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def check_same_config(config: dict[str, Any]) -> None:
    """Raise ``ConfigMismatchError`` on every rank unless all ranks hold the same config (compared by hash)."""
    if not active():
        return
    digest = bytes.fromhex(config_hash(config))
    mine = torch.tensor(list(digest), dtype=torch.uint8)
    parts = [torch.empty_like(mine) for _ in range(world_size())]
    with _collective("the config check"):
        dist.all_gather(parts, mine)
    hashes = [bytes(p.tolist()).hex()[:12] for p in parts]
    if len(set(hashes)) > 1:
        differ = [r for r, h in enumerate(hashes) if h != hashes[0]]
        raise ConfigMismatchError(
            f"rank {rank()}: the ranks were launched with different configs (config hashes by rank: {hashes}; "
            f"ranks {differ} differ from rank 0). Launch every rank with the same config file and flags."
        )


# --- models: replicate, DDP, FSDP2 --------------------------------------------------------------------------------
def _model_of(policy_or_model) -> torch.nn.Module | None:
    if isinstance(policy_or_model, torch.nn.Module):
        return policy_or_model
    model = getattr(policy_or_model, "model", None)
    return model if isinstance(model, torch.nn.Module) else None


def _is_ddp(model) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def _is_fsdp(model) -> bool:
    if model is None:
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def replicate(model: torch.nn.Module) -> torch.nn.Module:
    """Broadcast parameters and buffers from rank 0, so that every replica starts identical. In place."""
    if active():
        with _collective("the broadcast of initial weights"), torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=0)
    return model


def wrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """``DistributedDataParallel`` around ``model`` (weights broadcast from rank 0 at construction). Recipes run its
    backward passes under ``no_sync`` and sum the gradients once per step with ``reduce_gradients`` (see above).

    Buffers are synced at construction but not re-broadcast at every forward: sampling runs a different number of
    forward passes on each rank, and a collective per forward would then hang. The model itself is unchanged.
    In one process, returns the model."""
    if not active():
        return model
    import inspect

    ddp_args = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in ddp_args else {"broadcast_buffers": False}
    return torch.nn.parallel.DistributedDataParallel(model, **no_buffer_sync)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (an FSDP2 module is its own module)."""
    return model.module if _is_ddp(model) else model


def shard_fsdp(model: torch.nn.Module, *, blocks: Sequence[torch.nn.Module] = ()) -> torch.nn.Module:
    """Shard a model in place with FSDP2 (``torch.distributed.fsdp.fully_shard``): each module of ``blocks`` (e.g.
    the transformer layers) is its own unit, then the root. Gradients are summed across ranks (divide factor 1).
    In one process, returns the model unchanged."""
    if not active():
        return model
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    for module in model.modules():
        if _is_fsdp(module):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)
    return model


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated decoder layers of a Hugging Face causal LM (GPT-2 ``transformer.h``, Llama ``model.layers``)."""
    for path in ("transformer.h", "model.layers", "gpt_neox.layers", "model.decoder.layers"):
        obj = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return list(obj)
    return []


@contextlib.contextmanager
def gathered(model: torch.nn.Module) -> Iterator[None]:
    """Keep an FSDP2 model's parameters all-gathered for the duration (no collective per forward pass).

    Needed for sampling: ranks stop generating at different lengths, so they run different numbers of forward
    passes, and per-forward all-gathers would deadlock. Costs the memory of the full parameters while inside."""
    fsdp_modules = [m for m in model.modules() if _is_fsdp(m)]
    if not fsdp_modules or not active():
        yield
        return
    with _collective("the all-gather of sharded weights for sampling"):
        for m in fsdp_modules:
            m.unshard()
    model.set_reshard_after_forward(False, recurse=True)
    try:
        yield
    finally:
        for m in fsdp_modules:
            m.reshard()
        model.set_reshard_after_forward(True, recurse=True)
        model.set_reshard_after_forward(False, recurse=False)  # FSDP2's default: the root keeps its weights after forward


class ShardedPolicy:
    """A policy whose model is sharded with FSDP2, through the ``Policy`` protocol: ``sample`` runs with the
    weights gathered (see ``gathered``), scoring and training use the sharded model. Recipes are unchanged."""

    def __init__(self, policy):
        self.policy = policy

    @property
    def model(self):
        return self.policy.model

    def sample(self, prompts, samples_per_prompt, *, generator=None, prompt_seeds=None, exact=False):
        with gathered(self.policy.model):
            return self.policy.sample(prompts, samples_per_prompt, generator=generator, prompt_seeds=prompt_seeds, exact=exact)

    def token_logprobs(self, rollout):
        return self.policy.token_logprobs(rollout)

    def token_log_softmax(self, rollout):
        return self.policy.token_log_softmax(rollout)

    def parameters(self):
        return self.policy.parameters()

    def __getattr__(self, name):  # tokenizer, sampling, rollout_from_ids, ...
        return getattr(self.policy, name)


# --- gradients ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def accumulate(policy, *, sync: bool) -> Iterator[None]:
    """Context for one micro-batch's backward. ``sync=False`` on every micro-batch but the last of an optimiser
    step: an FSDP2 model then skips its reduce-scatter (gradients accumulate locally). Replicated modules, plain or
    DDP (under ``no_sync``), never sync in backward: ``reduce_gradients`` sums once per step."""
    model = _model_of(policy)
    if not active() or model is None:
        yield
    elif _is_ddp(model):
        with model.no_sync():
            yield
    elif _is_fsdp(model):
        model.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def reduce_gradients(policy, parameters: Sequence[torch.nn.Parameter]) -> None:
    """Sum the step's gradients over ranks, for replicated modules (plain or DDP); FSDP2 already did it in backward.

    One flattened all-reduce for all gradients. A parameter without a gradient on some ranks only (unused by their
    shard) gets a zero gradient there; one without a gradient on every rank keeps none, as in one process.
    Nothing in one process."""
    if not active():
        return
    if _is_fsdp(_model_of(policy)):
        return
    parameters = [p for p in parameters if p.requires_grad]
    has_grad = torch.tensor([p.grad is not None for p in parameters], dtype=torch.uint8)
    with _collective("the all-reduce of gradient presence"):
        dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    for p, used in zip(parameters, has_grad.tolist()):
        if used and p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    with _collective("the all-reduce of gradients"):
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def as_float(norm) -> float:
    """A gradient norm as a float (FSDP2 returns a replicated DTensor)."""
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


# --- checkpoints (torch.distributed.checkpoint) and export --------------------------------------------------------
def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """torch.distributed.checkpoint warns that it assumes a single process when there is no process group: it is
    the intended default here."""
    import warnings

    with warnings.catch_warnings():
        if not active():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any] | None = None) -> Path:
    """A distributed checkpoint of ``model`` and ``optimizer`` after ``step`` completed steps; every rank calls it.

    Every rank writes its own shards (``torch.distributed.checkpoint``; replicated tensors are written once) into
    a temporary folder; after a barrier, rank 0 writes ``trainer_state.json`` ({"step": step, **state}), renames
    the folder to ``RUN/checkpoints/step-NNNNNNNN`` and then points ``RUN/checkpoints/latest`` at it. A crash at
    any moment leaves the previous checkpoint intact and published."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".partial")
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _collective("writing a distributed checkpoint"), _quiet_single_process():
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / SHARDS))
    barrier()
    if is_main():
        _write_atomic(tmp / STATE_JSON, json.dumps({"step": step, **(state or {})}, sort_keys=True))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(final.parent / LATEST, final.name + "\n")
    barrier()
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The published checkpoint named by ``RUN/checkpoints/latest``, or None."""
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / STATE_JSON).exists():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def load_checkpoint(checkpoint: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore ``model`` and ``optimizer`` (already built, wrapped or sharded as when saved; any world size that
    the sharding supports) from a checkpoint written by ``save_checkpoint``; returns its trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    checkpoint = Path(checkpoint)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    with _collective("reading a distributed checkpoint"), _quiet_single_process():
        dcp.load(state, checkpoint_id=str(checkpoint / SHARDS))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return json.loads((checkpoint / STATE_JSON).read_text())


def full_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """The full (unsharded, unwrapped-name) model state dict on CPU, on rank 0; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    with _collective("gathering the full weights"):
        return get_model_state_dict(model, options=options)


def export_pretrained(model: torch.nn.Module, folder: str | Path, tokenizer=None) -> Path | None:
    """Write an ordinary ``from_pretrained`` folder (safetensors) of a plain, DDP or FSDP2 Hugging Face model.

    Every rank calls it (the weights are gathered); rank 0 rebuilds the model from its config on CPU, loads the
    gathered weights and saves. Returns the folder on rank 0, None elsewhere."""
    from transformers import AutoModelForCausalLM

    weights = full_state_dict(model)
    folder = Path(folder)
    if is_main():
        config = unwrap(model).config
        dtype = next((w.dtype for w in weights.values() if w.is_floating_point()), torch.float32)
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
        missing, unexpected = plain.load_state_dict(weights, strict=False)
        tied = set(getattr(plain, "_tied_weights_keys", None) or ())
        if unexpected or [k for k in missing if k not in tied]:
            raise RuntimeError(f"exported weights do not fit the model: missing {missing}, unexpected {unexpected}")
        plain.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    barrier()
    return folder if is_main() else None
