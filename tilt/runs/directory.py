"""Run directories that survive: the resolved config, metrics, samples and atomic, resumable checkpoints.

Layout of a run directory RUN (docs/runs.md):

    RUN/config.yaml        the resolved config, exactly what the run trains with
    RUN/metrics.jsonl      one JSON object per step: {"step": s, <metric>: float, ...}, s = updates done (1-based)
    RUN/samples.jsonl      rows {"step", "prompt", "completion", "reward"}: the policy after s updates (0 = initial)
    RUN/checkpoints/step-NNNNNNNN/   from_pretrained folder (safetensors) + tokenizer + trainer_state.safetensors
                           (optimizer tensors) + trainer_state.json (step, data position, RNG, non-tensor state)
    RUN/checkpoints/latest a text file naming the newest complete checkpoint
    RUN/final/             from_pretrained folder of the trained policy
    RUN/FAILED             present only when the run stopped on an error: the error text

Atomicity: a checkpoint is written into a temporary folder inside RUN/checkpoints, every file is fsync'ed, the
folder is renamed to step-NNNNNNNN (a rename is atomic on POSIX file systems), and only then is ``latest``
replaced (write a temporary file, fsync, rename). A crash at any moment leaves every complete checkpoint intact;
a half-written one is a temporary folder, never a step-NNNNNNNN folder, and is removed by the next save.

Nothing is ever pickled: tensors go to safetensors, everything else to JSON, and loading reads only those.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
FAILED = "FAILED"
FORMAT_VERSION = 1
CRASH_ENV = "TILT_TEST_CRASH_IN_CHECKPOINT"
"""Test hook: when set to a step number, the process SIGKILLs itself halfway through writing that step's
checkpoint (after the weights, before the trainer state and the rename), to test that a crash mid-write is safe."""


# --- small file-system helpers ------------------------------------------------------------------------------------
def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then the folders themselves (so their entries are on disk too)."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            fsync_path(Path(root) / name)
    for root, dirs, files in os.walk(folder, topdown=False):
        fsync_path(Path(root))


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: write a temporary sibling, fsync it, rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def append_jsonl(path: Path, row: dict) -> None:
    """Append one JSON line and flush it to disk (a crash loses at most this line, half-written)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, allow_nan=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    """The complete rows of a JSONL file; a trailing half-written line (a crash mid-append) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8").split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i >= len(lines) - 2:  # the last line, cut short by a crash
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return rows


def truncate_jsonl(path: Path, *, max_step: int) -> None:
    """Keep the complete rows with ``step <= max_step`` (what a checkpoint at max_step had seen), atomically."""
    path = Path(path)
    if path.exists():
        rows = [r for r in read_jsonl(path) if r["step"] <= max_step]
        write_atomic(path, "".join(json.dumps(r, allow_nan=True) + "\n" for r in rows))


# --- the run directory ----------------------------------------------------------------------------------------------
def dump_config(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False, allow_unicode=True)


def create_run(run_dir: str | Path, config: dict, initial_samples: list[dict] = ()) -> Path:
    """Create RUN with its config.yaml (and the step-0 samples), all at once: the files are written into a hidden
    sibling folder which is then renamed to RUN, so RUN never exists half-made. Refuses an existing non-empty RUN."""
    run = Path(run_dir)
    if run.exists() and (not run.is_dir() or any(run.iterdir())):
        raise ValueError(f"run directory {str(run)!r} already exists: continue it with --resume {run}, "
                              "or choose another --run-dir")
    run.parent.mkdir(parents=True, exist_ok=True)
    tmp = run.parent / f".{run.name}.incomplete-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    (tmp / CHECKPOINTS).mkdir()
    (tmp / "config.yaml").write_text(dump_config(config), encoding="utf-8")
    (tmp / "metrics.jsonl").write_text("", encoding="utf-8")
    (tmp / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in initial_samples), encoding="utf-8")
    fsync_tree(tmp)
    if run.exists():
        run.rmdir()  # empty, checked above
    os.replace(tmp, run)
    fsync_path(run.parent)
    return run


def read_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run directory: it has no config.yaml")
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ValueError(f"{path} does not hold a mapping")
    return config


def mark_failed(run_dir: str | Path, message: str) -> None:
    """Write RUN/FAILED with the error; the run's complete checkpoints stay usable (--resume clears the mark)."""
    write_atomic(Path(run_dir) / FAILED, message.rstrip() + "\n")


def clear_failed(run_dir: str | Path) -> None:
    (Path(run_dir) / FAILED).unlink(missing_ok=True)


# --- optimizer state without pickle ------------------------------------------------------------------------------
def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """A JSON tree of ``obj``; every tensor goes to ``tensors`` under a name and is referenced by it. Dict keys
    and tuples keep their types (optimizer state is keyed by int)."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _encode(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot save a {type(obj).__name__} at {path} without pickling it")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """The global RNGs (Python, torch CPU, NumPy if loaded) as (JSON part, tensors). The recipes draw no global
    randomness (their sampling and prompt order are pure functions of the step); this is for user code, such as
    a reward that calls ``random``."""
    version, internal, gauss = random.getstate()
    state: dict = {"python": [version, list(internal), gauss]}
    tensors = {"rng.torch": torch.get_rng_state()}
    np = sys.modules.get("numpy")
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [name, pos, has_gauss, cached]
        tensors["rng.numpy"] = torch.from_numpy(keys.astype("int64"))
    return state, tensors


def set_rng_state(state: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(tensors["rng.torch"])
    if "numpy" in state:
        import numpy as np

        name, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, tensors["rng.numpy"].numpy().astype("uint32"), pos, has_gauss, cached))


# --- checkpoints -------------------------------------------------------------------------------------------------
def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first, as (step, folder). Temporary folders are not listed."""
    folder = Path(run_dir) / CHECKPOINTS
    out = []
    for p in folder.glob("step-*") if folder.is_dir() else []:
        tail = p.name[len("step-"):]
        if p.is_dir() and tail.isdigit() and (p / STATE_JSON).is_file():
            out.append((int(tail), p))
    return sorted(out)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder ``latest`` names, or (if ``latest`` is missing or stale after a crash between the rename and its
    update) the newest complete checkpoint; None when there is none."""
    found = list_checkpoints(run_dir)
    if not found:
        return None
    return found[-1][1]  # a step-N folder exists only once complete, so the newest one is always safe


def save_checkpoint(run_dir: str | Path, step: int, model, tokenizer, optimizer: torch.optim.Optimizer, *,
                    extra: dict | None = None, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically (see the module docstring), point ``latest`` at it, and delete all
    but the ``keep`` newest checkpoints (0 = keep all).

    Saved: the model (safetensors) and tokenizer, the optimizer state (tensors in trainer_state.safetensors,
    the rest in trainer_state.json), ``step`` (updates done, which is also the data position: the recipes draw
    a step's prompts as a pure function of the step), the global RNG states, and ``extra`` (JSON).
    """
    from safetensors.torch import save_file

    folder = Path(run_dir) / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".tmp-*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    final = folder / checkpoint_name(step)
    tmp = folder / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    tmp.mkdir()
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if os.environ.get(CRASH_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    tensors: dict[str, torch.Tensor] = {}
    optim_tree = _encode(optimizer.state_dict(), tensors, "optimizer")
    rng, rng_tensors = rng_state()
    tensors.update(rng_tensors)
    save_file(tensors, str(tmp / STATE_TENSORS))
    state = {"format": FORMAT_VERSION, "step": step, "data_position": {"step": step}, "rng": rng,
             "optimizer": optim_tree, "extra": extra or {}}
    (tmp / STATE_JSON).write_text(json.dumps(state, indent=1), encoding="utf-8")
    fsync_tree(tmp)
    if final.exists():  # a complete checkpoint of this step from before a resume: set it aside first
        aside = folder / f".tmp-old-{final.name}-{os.getpid()}"
        os.replace(final, aside)
        shutil.rmtree(aside)
    os.replace(tmp, final)
    fsync_path(folder)
    write_atomic(folder / LATEST, final.name + "\n")
    if keep > 0:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(checkpoint: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(trainer_state.json, trainer_state.safetensors tensors) of a checkpoint; reads no pickle."""
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    state = json.loads((checkpoint / STATE_JSON).read_text(encoding="utf-8"))
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{checkpoint} has trainer state format {state.get('format')!r}; this tilt reads {FORMAT_VERSION}")
    return state, load_file(str(checkpoint / STATE_TENSORS))


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Load a saved optimizer state into ``optimizer`` (built over the same parameters, in the same order)."""
    saved = _decode(state["optimizer"], tensors)
    if len(saved["param_groups"]) != len(optimizer.param_groups) or any(
        len(a["params"]) != len(b["params"]) for a, b in zip(saved["param_groups"], optimizer.param_groups)
    ):
        raise ValueError("the checkpoint's optimizer state does not match the model's parameters")
    optimizer.load_state_dict(saved)


def restore_rng(state: dict, tensors: dict[str, torch.Tensor]) -> None:
    set_rng_state(state["rng"], tensors)


def save_final(run_dir: str | Path, model, tokenizer) -> Path:
    """RUN/final/: a from_pretrained folder of the trained policy, written atomically like a checkpoint."""
    run = Path(run_dir)
    final = run / "final"
    tmp = run / f".final.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(run)
    return final


def prepare_resume(run_dir: str | Path) -> tuple[Path | None, int]:
    """The checkpoint to resume from and its step, or (None, 0) when the run stopped before its first checkpoint
    (it then restarts from the initial model); the metrics and samples written after that step are dropped (the
    resumed run writes them again, identically)."""
    run = Path(run_dir)
    checkpoint = latest_checkpoint(run)
    step = 0 if checkpoint is None else int(json.loads((checkpoint / STATE_JSON).read_text(encoding="utf-8"))["step"])
    truncate_jsonl(run / "metrics.jsonl", max_step=step)
    truncate_jsonl(run / "samples.jsonl", max_step=step)
    return checkpoint, step


# --- trackers ----------------------------------------------------------------------------------------------------
TRACKERS = ("none", "tensorboard", "wandb", "mlflow")


class Tracker:
    """Metrics go to RUN/metrics.jsonl always; a tracker sends them to one more place too."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def _need(module: str, package: str, name: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"tracker {name!r} needs the {package} package, which is not installed: pip install {package}, "
                          "or use tracker: none") from None


class _TensorBoard(Tracker):
    def __init__(self, run_dir: Path, config: dict):
        _need("tensorboard", "tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + dump_config(config) + "```")

    def log(self, step, metrics):
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def close(self):
        self.writer.close()


class _WandB(Tracker):
    def __init__(self, run_dir: Path, config: dict):
        self.wandb = _need("wandb", "wandb", "wandb")
        self.run = self.wandb.init(config=config, dir=str(run_dir), name=run_dir.name, resume="allow", id=_run_id(run_dir))

    def log(self, step, metrics):
        self.run.log(dict(metrics), step=step)

    def close(self):
        self.run.finish()


class _MLflow(Tracker):
    def __init__(self, run_dir: Path, config: dict):
        self.mlflow = _need("mlflow", "mlflow", "mlflow")
        self.mlflow.start_run(run_name=run_dir.name)
        self.mlflow.log_params({k: str(v) for k, v in config.items()})

    def log(self, step, metrics):
        self.mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=step)

    def close(self):
        self.mlflow.end_run()


def _run_id(run_dir: Path) -> str:
    import hashlib

    return hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]


def check_tracker(name: str) -> None:
    """Raise before the run starts if the tracker is unknown or its package is missing."""
    if name not in TRACKERS:
        raise ValueError(f"tracker must be one of {', '.join(TRACKERS)}; got {name!r}")
    needs = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
    if name in needs:
        _need(*needs[name], name)


def open_tracker(name: str, run_dir: str | Path, config: dict) -> Tracker:
    check_tracker(name)
    cls = {"none": Tracker, "tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}[name]
    return Tracker() if cls is Tracker else cls(Path(run_dir), config)
