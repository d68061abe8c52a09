"""Run directories that cannot be corrupted: the resolved config, metrics, samples, a fingerprint of the inputs,
an exclusive lock, and atomic, checksummed, resumable checkpoints.

Layout of a run directory RUN (docs/runs.md):

    RUN/config.yaml        the resolved config, exactly what the run trains with
    RUN/fingerprint.json   what the run's inputs were (config, data, model, reward source), checked on resume
    RUN/.lock              locked (flock) by the one process writing the run; holds that process's pid
    RUN/metrics.jsonl      one JSON object per step: {"step": s, <metric>: float, ...}, s = updates done (1-based)
    RUN/samples.jsonl      rows {"step", "prompt", "completion", "reward"}: the policy after s updates (0 = initial)
    RUN/checkpoints/step-NNNNNNNN/   from_pretrained folder (safetensors) + tokenizer + trainer_state.safetensors
                           (optimizer tensors) + trainer_state.json (step, data position, RNG, non-tensor state)
                           + checksums.json (size and SHA-256 of every other file, written last)
    RUN/final/             from_pretrained folder of the trained policy (with its checksums.json)
    RUN/FAILED             present only when the run stopped on an error: the error text

Atomicity: a checkpoint is written into a temporary folder inside RUN/checkpoints, its checksums last, every file
is fsync'ed, and the folder is renamed to step-NNNNNNNN (a rename is atomic on POSIX file systems). A crash at any
moment leaves every complete checkpoint intact; a half-written one is a temporary folder, never a step-NNNNNNNN
folder, and is removed on the next start. The newest step-NNNNNNNN folder whose checksums match is the one a
resume continues from; there is no pointer file to go stale.

Nothing is ever pickled: tensors go to safetensors, everything else to JSON, and loading reads only those.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Collection, Iterator, Mapping, Sequence

import torch
import yaml

CHECKPOINTS = "checkpoints"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
MANIFEST = "checksums.json"
"""Inside a checkpoint: {"format", "algorithm": "sha256", "files": {relative path: {"size", "sha256"}}}, written
after every other file, so a checkpoint whose manifest is missing or disagrees with a file is not intact."""
FAILED = "FAILED"
LOCK = ".lock"
FINGERPRINT = "fingerprint.json"
CORRUPT_PREFIX = "corrupt-"
"""A checkpoint found corrupt on resume is renamed to ``corrupt-step-NNNNNNNN`` (kept for inspection, never listed)."""
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
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave the half-written temporary behind
        raise
    fsync_path(path.parent)


def sha256_file(path: Path, *, chunk_bytes: int = 1 << 20) -> str:
    """The SHA-256 hex digest of a file's bytes, read in chunks (constant memory for a multi-GB weights file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _temporary_owner(name: str) -> int | None:
    """The pid a temporary name ends with (``.tmp-step-00000004-1234`` -> 1234), or None for any other name."""
    if not name.startswith(".") or not (".tmp-" in name or ".incomplete-" in name):
        return None
    tail = name.rpartition("-")[2]
    return int(tail) if tail.isdigit() else None


def remove_stray_temporaries(run_dir: str | Path) -> list[Path]:
    """Remove the temporary files and folders that a crashed (or disk-full) write left in RUN and RUN/checkpoints:
    hidden names ending in ``-PID`` whose process is no longer alive or is this one. Those of another live process
    (a writer in progress) are left alone. Returns what was removed."""
    run = Path(run_dir)
    removed = []
    for folder in (run, run / CHECKPOINTS):
        for p in sorted(folder.iterdir()) if folder.is_dir() else []:
            owner = _temporary_owner(p.name)
            if owner is None or (owner != os.getpid() and _pid_alive(owner)):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


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


def create_run(run_dir: str | Path, config: dict, initial_samples: Sequence[dict] = (), *,
               fingerprint: dict | None = None) -> Path:
    """Create RUN with its config.yaml (and the step-0 samples, and ``fingerprint.json`` when a fingerprint of the
    inputs is given, see ``fingerprint_inputs``), all at once: the files are written into a hidden sibling folder
    which is then renamed to RUN, so RUN never exists half-made. Refuses an existing non-empty RUN."""
    run = Path(run_dir)
    if run.exists() and (not run.is_dir() or any(run.iterdir())):
        raise ValueError(f"run directory {str(run)!r} already exists: continue it with --resume {run}, "
                              "or choose another --run-dir")
    run.parent.mkdir(parents=True, exist_ok=True)
    for stray in run.parent.glob(f".{run.name}.incomplete-*"):  # left by a creation that crashed
        owner = _temporary_owner(stray.name)
        if owner is not None and (owner == os.getpid() or not _pid_alive(owner)):
            shutil.rmtree(stray, ignore_errors=True)
    tmp = run.parent / f".{run.name}.incomplete-{os.getpid()}"
    tmp.mkdir()
    (tmp / CHECKPOINTS).mkdir()
    (tmp / "config.yaml").write_text(dump_config(config), encoding="utf-8")
    if fingerprint is not None:
        (tmp / FINGERPRINT).write_text(json.dumps(fingerprint, indent=1, sort_keys=True) + "\n", encoding="utf-8")
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


def mark_failed(run_dir: str | Path, message: str) -> bool:
    """Write RUN/FAILED with the error; the run's complete checkpoints stay usable (--resume clears the mark).

    Returns False, instead of raising, when even that cannot be written (a full disk): the caller then says so
    in its one error message, rather than ending in a second traceback."""
    try:
        write_atomic(Path(run_dir) / FAILED, message.rstrip() + "\n")
    except OSError:
        return False
    return True


def clear_failed(run_dir: str | Path) -> None:
    (Path(run_dir) / FAILED).unlink(missing_ok=True)


# --- one writer at a time -----------------------------------------------------------------------------------------
class RunLockedError(RuntimeError):
    """Another live process holds the run directory's lock."""


def _lock_holder(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        holder = json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


@contextlib.contextmanager
def lock_run(run_dir: str | Path) -> Iterator[Path]:
    """Hold RUN's exclusive lock for the ``with`` block: ``fcntl.flock`` on ``RUN/.lock``, which then holds this
    process's pid, host, start time and command line.

    A second process (or a second ``lock_run`` on the same run) gets ``RunLockedError`` naming the holder's pid and
    what to do. The operating system releases a flock when its holder dies, however it dies, so a lock left by a
    crashed or killed process never blocks; ``RUN/.lock`` itself needs no cleaning up. Once the lock is held, the
    temporary files a crashed writer left behind are removed (``remove_stray_temporaries``). flock may be
    unsupported or advisory-only on some network file systems: the error then says so.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{str(run)!r} is not a run directory (it does not exist)")
    fd = os.open(run / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    held = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            pid = holder.get("pid", "unknown")
            where = "" if holder.get("host") in (None, socket.gethostname()) else f" on host {holder['host']}"
            since = f", since {holder['since']}" if "since" in holder else ""
            command = f", running `{holder['command']}`" if holder.get("command") else ""
            raise RunLockedError(
                f"run directory {str(run)!r} is in use by process {pid}{where}{since}{command}. Two processes writing "
                f"one run would corrupt it: wait for process {pid} to finish, or stop it (kill -TERM {pid}: it saves "
                f"a checkpoint and exits), then resume with --resume {run}. A lock whose process has died is released "
                f"by the system, so there is no lock file to delete.") from None
        except OSError as exc:
            raise OSError(exc.errno, f"cannot lock run directory {str(run)!r} ({os.strerror(exc.errno or 0)}): the file "
                                     "system does not support flock; use a local disk for the run directory") from None
        held = True
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv)}
        with contextlib.suppress(OSError):  # the lock is what matters; the note may not fit on a full disk
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode("utf-8"), 0)
        remove_stray_temporaries(run)
        yield run
    finally:
        if held:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # still ours: the next holder writes its own note
        os.close(fd)  # releases the flock


# --- what a run was made from -------------------------------------------------------------------------------------
FINGERPRINT_FORMAT = 1
WHOLE_FILE_BYTES = 16 << 20
"""Model files up to this size are hashed whole; larger ones (weights) by size, mtime and the SHA-256 of their first
and last MiB, which is cheap for a many-GB folder and still catches a rewritten, truncated or replaced file."""
SAMPLE_BYTES = 1 << 20


def _file_digest(path: Path, *, whole: bool) -> dict:
    stat = path.stat()
    if whole or stat.st_size <= WHOLE_FILE_BYTES:
        return {"size": stat.st_size, "sha256": sha256_file(path)}
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(SAMPLE_BYTES))
        f.seek(max(stat.st_size - SAMPLE_BYTES, 0))
        digest.update(f.read(SAMPLE_BYTES))
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sample_sha256": digest.hexdigest()}


def _tree_digest(path: Path, *, whole: bool) -> dict[str, dict]:
    """{relative file name: digest} of a file ("" names the file itself) or of every file under a folder (hidden
    ones and ``__pycache__`` excepted)."""
    if path.is_file():
        return {"": _file_digest(path, whole=whole)}
    files = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if p.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            files[rel.as_posix()] = _file_digest(p, whole=whole)
    return files


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.loads(json.dumps(value, default=str))  # as it reads back from JSON
    return out


def reward_sources(spec: str) -> list[Path]:
    """The files a reward spec's behaviour comes from: ``file.py:function`` -> the file; ``module:function`` -> the
    module's source file (found without importing it); a reward-model folder -> the folder; ``WEIGHT*SPEC`` -> those
    of SPEC. Built-ins (``sentiment``, ``length:...``, ``keywords:...``, ``regex:...``) have none: their spec, in
    the config, says everything."""
    import importlib.util

    from tilt.reward_fns import BUILTIN_HEADS, split_weight

    inner = split_weight(spec)[1]
    head, sep, _ = inner.partition(":")
    if inner == "sentiment" or (sep and head in BUILTIN_HEADS):
        return []
    if Path(inner).is_dir():
        return [Path(inner)]
    target = inner.rpartition(":")[0]
    if target.endswith(".py"):
        return [Path(target)] if Path(target).is_file() else []
    try:
        found = importlib.util.find_spec(target) if target else None
    except (ImportError, ValueError):
        found = None
    return [Path(found.origin)] if found is not None and found.origin and Path(found.origin).is_file() else []


def fingerprint_inputs(config: Mapping[str, Any], *, data: Mapping[str, str | Path] | None = None,
                       models: Mapping[str, str | Path] | None = None,
                       rewards: Mapping[str, Sequence[str]] | None = None) -> dict:
    """A fingerprint of what a run is made from, saved as RUN/fingerprint.json and compared on resume
    (``check_fingerprint``). Each input has a name, the name ``--accept-changes`` takes:

    * ``config``: every value of the resolved config (nested keys dotted: ``sampling.top_k``);
    * ``data`` {name: file or folder}: the SHA-256 of every byte (e.g. ``{"prompts": "p.jsonl"}``);
    * ``models`` {name: folder}: its small files (config.json, tokenizer, ...) hashed whole, its weight files by
      size, modification time and a hash of their first and last MiB (``WHOLE_FILE_BYTES``); a name that is not a
      local path (a hub id) is recorded as text;
    * ``rewards`` {name: specs}: the SHA-256 of each spec's source files (``reward_sources``).

    Paths are recorded resolved; pass the ones the run reads (after resolving them against the config's folder).
    """
    inputs: dict[str, dict] = {"config": {"kind": "config", "values": _flatten(config)}}
    for kind, named, whole in (("data", data, True), ("model", models, False)):
        for name, path in (named or {}).items():
            p = Path(path)
            if not p.exists():
                if kind == "data":
                    raise FileNotFoundError(f"data file not found: {str(p)!r} (input {name!r})")
                inputs[name] = {"kind": kind, "path": str(path), "files": {}}
                continue
            inputs[name] = {"kind": kind, "path": str(p.resolve()), "files": _tree_digest(p, whole=whole)}
    for name, specs in (rewards or {}).items():
        files: dict[str, dict] = {}
        for spec in [specs] if isinstance(specs, str) else specs:
            for source in reward_sources(spec):
                for rel, digest in _tree_digest(source, whole=not source.is_dir()).items():
                    files[str(source.resolve() / rel) if rel else str(source.resolve())] = digest
        inputs[name] = {"kind": "reward", "files": files}
    return {"format": FINGERPRINT_FORMAT, "inputs": inputs}


def save_fingerprint(run_dir: str | Path, fingerprint: dict) -> None:
    write_atomic(Path(run_dir) / FINGERPRINT, json.dumps(fingerprint, indent=1, sort_keys=True) + "\n")


def read_fingerprint(run_dir: str | Path) -> dict | None:
    """RUN/fingerprint.json, or None for a run made before runs were fingerprinted."""
    path = Path(run_dir) / FINGERPRINT
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def fingerprint_changes(saved: dict, current: dict) -> dict[str, str]:
    """{name: what changed} between two fingerprints; config keys are named one by one (``config.beta``)."""
    changes: dict[str, str] = {}
    old, new = saved.get("inputs", {}), current.get("inputs", {})
    for name in sorted(set(old) | set(new)):
        if name not in new or name not in old:
            changes[name] = "no longer given" if name not in new else "not in the saved fingerprint"
            continue
        a, b = old[name], new[name]
        if a.get("kind") == "config":
            va, vb = a["values"], b["values"]
            for key in sorted(set(va) | set(vb)):
                if va.get(key, "<absent>") != vb.get(key, "<absent>"):
                    changes[f"config.{key}"] = f"{_short(va.get(key, '<absent>'))} -> {_short(vb.get(key, '<absent>'))}"
            continue
        parts = []
        if a.get("path") != b.get("path"):
            parts.append(f"path {a.get('path')} -> {b.get('path')}")
        fa, fb = a.get("files", {}), b.get("files", {})
        for rel in sorted(set(fa) | set(fb)):
            label = rel or b.get("path") or a.get("path")
            if rel not in fb:
                parts.append(f"{label} removed")
            elif rel not in fa:
                parts.append(f"{label} added")
            elif fa[rel] != fb[rel]:
                what = "size" if fa[rel].get("size") != fb[rel].get("size") else "content"
                if what == "content" and "mtime_ns" in fa[rel] and fa[rel].get("sample_sha256") == fb[rel].get("sample_sha256"):
                    what = "modification time"
                parts.append(f"{label} ({what} changed)")
        if parts:
            changes[name] = "; ".join(parts[:4]) + (f"; and {len(parts) - 4} more" if len(parts) > 4 else "")
    return changes


def check_fingerprint(saved: dict, current: dict, *, accept: Collection[str] = ()) -> None:
    """Refuse to resume a run whose inputs changed: a ValueError naming every changed input that ``accept`` does
    not name, and the ``--accept-changes`` flag that would accept them all. ``accept`` holds input names
    (``prompts``, ``model``, ``reward``, ``config`` for every config key) or single config keys (``config.beta``).
    A name in ``accept`` that is no input is an error too (a typo must not accept nothing silently)."""
    known = set(current.get("inputs", {})) | set(saved.get("inputs", {}))
    changes = fingerprint_changes(saved, current)
    unknown = sorted(a for a in accept if a not in known and a not in changes and not a.startswith("config."))
    if unknown:
        raise ValueError(f"--accept-changes names no input: {', '.join(unknown)}; the inputs are {', '.join(sorted(known))} "
                         "(or config.KEY for one config key)")
    refused = {name: what for name, what in changes.items()
               if name not in accept and not (name.startswith("config.") and "config" in accept)}
    if refused:
        lines = "\n".join(f"  {name}: {what}" for name, what in refused.items())
        raise ValueError(f"the run's inputs changed since it was started:\n{lines}\nResume with the inputs it was started "
                         f"with, or accept these changes: --accept-changes {','.join(refused)}")


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
class CheckpointWriteError(OSError):
    """A checkpoint (or the final model) could not be written; the message says what was cleaned up and whether
    RUN/FAILED could be written."""


class CorruptCheckpointError(ValueError):
    """A checkpoint's files disagree with its checksums (truncated, zeroed, edited or missing)."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first, as (step, folder). Temporary and corrupt-* folders are not
    listed. Complete is not intact: ``verify_checkpoint`` checks the bytes."""
    folder = Path(run_dir) / CHECKPOINTS
    out = []
    for p in folder.glob("step-*") if folder.is_dir() else []:
        tail = p.name[len("step-"):]
        if p.is_dir() and tail.isdigit():
            out.append((int(tail), p))
    return sorted(out)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (a step-N folder exists only once written whole), unverified; None when
    there is none. ``newest_intact_checkpoint`` also checks its checksums."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def write_manifest(folder: Path) -> dict:
    """Write ``folder/checksums.json``: the size and SHA-256 of every other file under ``folder``."""
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {"format": FORMAT_VERSION, "algorithm": "sha256", "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def verify_checkpoint(folder: str | Path, *, only: Collection[str] | None = None) -> None:
    """Raise CorruptCheckpointError naming the first file of ``folder`` that is missing, of the wrong size
    (truncated) or whose SHA-256 differs (zeroed or edited bytes), or a missing or unreadable checksums.json.
    ``only``: check just these files (relative names) of the manifest."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = "is missing" if not (folder / MANIFEST).exists() else f"is unreadable ({type(exc).__name__})"
        raise CorruptCheckpointError(f"{folder}: its checksums file {MANIFEST} {reason}") from None
    for rel, want in files.items():
        if only is not None and rel not in only:
            continue
        path = folder / rel
        if not path.is_file():
            raise CorruptCheckpointError(f"{path}: missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != want["size"]:
            raise CorruptCheckpointError(f"{path}: {size} bytes, {want['size']} when written (truncated or replaced)")
        if sha256_file(path) != want["sha256"]:
            raise CorruptCheckpointError(f"{path}: its SHA-256 differs from the one written (bytes zeroed or changed)")


def newest_intact_checkpoint(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint whose checksums match (None when none does), and the newer ones skipped as corrupt,
    each with the reason naming the bad file, newest first."""
    skipped = []
    for _, folder in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(folder)
        except CorruptCheckpointError as exc:
            skipped.append((folder, str(exc)))
            continue
        return folder, skipped
    return None, skipped


def _write_failure(run_dir: Path, tmp: Path, what: str, exc: OSError) -> CheckpointWriteError:
    """After an OSError while writing ``what`` into ``tmp``: remove ``tmp``, try to write RUN/FAILED, and build
    the one error that says all of it (raised ``from None``: no chain of tracebacks)."""
    shutil.rmtree(tmp, ignore_errors=True)
    cause = f"{exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")
    if exc.errno == errno.ENOSPC:
        cause += "; free some space"
    intact = latest_checkpoint(run_dir)
    kept = f"the checkpoints up to {intact.name} are intact" if intact is not None else "the run has no checkpoint yet"
    message = f"could not write {what}: {cause}. The partial copy was removed; {kept}"
    if mark_failed(run_dir, message):
        message += f"; {Path(run_dir) / FAILED} holds this message"
    else:
        message += f"; not even {Path(run_dir) / FAILED} could be written"
    return CheckpointWriteError(exc.errno or 0, message)


def save_checkpoint(run_dir: str | Path, step: int, model, tokenizer, optimizer: torch.optim.Optimizer, *,
                    extra: dict | None = None, keep: int = 2, extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint ``step`` atomically (see the module docstring), then delete all but the ``keep`` newest
    checkpoints (0 = keep all).

    Saved: the model (safetensors) and tokenizer, the optimizer state (tensors in trainer_state.safetensors,
    the rest in trainer_state.json), ``step`` (updates done, which is also the data position: the recipes draw
    a step's prompts as a pure function of the step), the global RNG states, ``extra`` (JSON), ``extra_tensors``
    (in trainer_state.safetensors under their own names, which must not start with ``optimizer.`` or ``rng.``; read
    back with ``load_trainer_state``), and, last, checksums.json. Any OSError (a full disk) removes the temporary folder, writes RUN/FAILED if it can, and is
    raised as one CheckpointWriteError that says so.
    """
    from safetensors.torch import save_file

    run = Path(run_dir)
    folder = run / CHECKPOINTS
    final = folder / checkpoint_name(step)
    tmp = folder / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stray_temporaries(run)  # left by a crash mid-write
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
        for name, value in (extra_tensors or {}).items():
            if name in tensors or name.startswith(("optimizer.", "rng.")):
                raise ValueError(f"extra tensor name {name!r} clashes with the optimizer or RNG state; rename it")
            tensors[name] = value.detach().cpu().contiguous()
        save_file(tensors, str(tmp / STATE_TENSORS))
        state = {"format": FORMAT_VERSION, "step": step, "data_position": {"step": step}, "rng": rng,
                 "optimizer": optim_tree, "extra": extra or {}}
        (tmp / STATE_JSON).write_text(json.dumps(state, indent=1), encoding="utf-8")
        write_manifest(tmp)
        fsync_tree(tmp)
        if final.exists():  # a checkpoint of this step from before a resume: set it aside first
            aside = folder / f".tmp-old-{final.name}-{os.getpid()}"
            os.replace(final, aside)
            shutil.rmtree(aside)
        os.replace(tmp, final)
        fsync_path(folder)
    except OSError as exc:
        raise _write_failure(run, tmp, f"checkpoint {final}", exc) from None
    if keep > 0:
        for _, old in list_checkpoints(run)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(checkpoint: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(trainer_state.json, trainer_state.safetensors tensors) of a checkpoint, after checking those two files
    against its checksums (CorruptCheckpointError otherwise); reads no pickle."""
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    verify_checkpoint(checkpoint, only=(STATE_JSON, STATE_TENSORS))
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
    """RUN/final/: a from_pretrained folder of the trained policy, with its checksums, written atomically like a
    checkpoint (and failing like one on a full disk)."""
    run = Path(run_dir)
    final = run / "final"
    tmp = run / f".final.tmp-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_manifest(tmp)
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(run)
    except OSError as exc:
        raise _write_failure(run, tmp, f"the final model {final}", exc) from None
    return final


def prepare_resume(run_dir: str | Path) -> tuple[Path | None, int]:
    """The newest intact checkpoint and its step, or (None, 0) when there is none (the run restarts from the
    initial model); the metrics and samples written after that step are dropped (the resumed run writes them
    again, identically).

    Each newer checkpoint that fails its checksums is named in a warning on stderr and renamed to
    ``corrupt-step-NNNNNNNN`` (kept for inspection, never listed again). Temporary files left by a crash are removed.
    """
    run = Path(run_dir)
    remove_stray_temporaries(run)
    checkpoint, skipped = newest_intact_checkpoint(run)
    for folder, reason in skipped:
        aside = folder.with_name(CORRUPT_PREFIX + folder.name)
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(folder, aside)
        fallback = f"falling back to {checkpoint.name}" if checkpoint is not None else "no intact checkpoint is left: restarting from step 0"
        print(f"# warning: checkpoint {folder.name} is corrupt and was skipped ({reason}); it is kept as {aside.name}; "
              f"{fallback}", file=sys.stderr, flush=True)
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
