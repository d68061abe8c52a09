"""CTRL's calibration inside a run (docs/infalign.md): RUN/calibration.json, the cache, and the calibrated reward."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from tilt.runs import directory as runs

CALIBRATION_FILE = "calibration.json"
"""RUN/calibration.json: the calibration set a CTRL run trains with (``tilt.infalign.CalibrationSet`` as JSON)."""


def calibration_fingerprint(settings, sampling) -> dict:
    """What the reference samples of a calibration depend on besides m, seed and prompts: the reference and the
    reward as the config names them (not their weights or code), and the sampling settings. JSON values only, so
    that a saved fingerprint compares equal to a fresh one."""
    from dataclasses import asdict

    return {"reference": settings.ref, "reward": list(settings.reward), "sampling": asdict(sampling)}


def check_calibration_cache(calibration) -> None:
    """Before the run directory exists: the cache's folder exists and an existing cache file is readable."""
    from tilt.infalign import read_calibration

    if not calibration.active or calibration.calibration_cache is None:
        return
    cache = Path(calibration.calibration_cache)
    if not cache.parent.is_dir():
        raise FileNotFoundError(f"calibration_cache {str(cache)!r}: the folder {str(cache.parent)!r} does not exist")
    if cache.exists():
        read_calibration(cache)


def save_calibration_atomic(calibration_set, path: Path) -> None:
    """Write a calibration file through a temporary sibling and a rename, so readers never see half a file."""
    import os

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    calibration_set.save(tmp)
    runs.fsync_path(tmp)
    os.replace(tmp, path)
    runs.fsync_path(path.parent)


def calibrated_reward_for_run(run: Path, calibration, fingerprint: dict, ref, reward_fn, prompts: Sequence[Any], *,
                              main_rank: bool):
    """The CTRL reward of a run (digest §5(a)): the calibration of every distinct training prompt, from
    RUN/calibration.json when the run already has one (a resumed run never samples it again), else from
    ``calibration_cache`` when that was built with the same settings, else built with ``ref``; wrapped with the
    config's Phi. Returns (reward, how the calibration was obtained)."""
    from tilt import distributed
    from tilt.infalign import LoggedCalibratedReward, build_calibration, calibration_matches, distinct_prompts, read_calibration

    keyed = distinct_prompts(prompts)
    m, seed = calibration.calibration_samples, calibration.calibration_seed
    own = run / CALIBRATION_FILE
    cache = Path(calibration.calibration_cache) if calibration.calibration_cache is not None else None
    built = False
    cached = None
    if own.exists():
        calibration_set = read_calibration(own)
        if not calibration_matches(calibration_set, keyed, m, seed=seed, fingerprint=fingerprint):
            raise ValueError(f"{own} was not built for this run's reference, reward, sampling, m, seed or prompts; "
                             "delete it to build the calibration again")
        source = f"reused {own}"
    elif cache is not None and cache.exists() and calibration_matches(
            cached := read_calibration(cache), keyed, m, seed=seed, fingerprint=fingerprint):
        calibration_set, source = cached, f"read from the cache {cache}"
    else:
        if main_rank:
            why = "" if cached is None else f" (the cache {cache} was built with other settings and is replaced)"
            print(f"# calibration: sampling {m} reference completions of each of {len(keyed)} prompts ({m * len(keyed)} "
                  f"in all){why}", flush=True)
        # Under several processes every rank builds the same set: all samples come from one generator seeded with
        # calibration_seed, so the ranks agree (checked below) with nothing to broadcast; only rank 0 writes it.
        calibration_set = build_calibration(ref, reward_fn, keyed, m, seed=seed, fingerprint=fingerprint)
        built, source = True, "built"
    try:
        distributed.check_same_config({"calibration": distributed.config_hash(calibration_set.ref_rewards.tolist())})
    except distributed.ConfigMismatchError:
        raise RuntimeError("the processes built different calibration sets (non-deterministic sampling or reward); build it "
                           "once in one process with calibration_cache set, then relaunch with the same cache") from None
    distributed.barrier()  # every rank has read the files before rank 0 writes them
    if main_rank:
        if not own.exists():
            save_calibration_atomic(calibration_set, own)
        if built and cache is not None:
            save_calibration_atomic(calibration_set, cache)
            source += f", saved to the cache {cache}"
    distributed.barrier()
    return LoggedCalibratedReward(reward_fn, calibration_set, calibration.phi()), source


