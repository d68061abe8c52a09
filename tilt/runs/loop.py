"""One run loop for every training command: steps, metrics.jsonl, samples, trackers, checkpoint cadence, signals.

``RunLoop(...).run(train_fn)`` calls ``train_fn(on_step)`` (a recipe's ``train`` with ``on_step`` passed through).
After every step ``on_step`` appends the metrics row, logs it to the tracker, appends samples every
``sample_every`` steps, saves a checkpoint every ``checkpoint_every`` steps and at the last one, and turns a
SIGTERM/SIGINT received meanwhile into a clean stop: the step finishes, a checkpoint is saved, the exact resume
command is printed (with every field the resume must change, such as ``--kl_rl.steps``), and the exit code is 143
(SIGTERM) or 130 (SIGINT). A second signal stops at once. An error during training writes RUN/FAILED and exits 1.

``Signals`` is the handler itself; a command holds it for the whole run, so that long phases outside the training
steps (initial sampling, calibration, the final evaluation) can check ``signals.received`` and stop cleanly too.
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

EXIT_SIGNAL = {signal.SIGTERM: 143, signal.SIGINT: 130}
"""Exit codes after a clean stop on a signal (the shell's 128 + signal number): the run is unfinished but resumable."""
EXIT_FAILED = 1
"""Exit code of a run that stopped on an error during training (RUN/FAILED says which)."""


class Stop(Exception):
    """Raised from the step callback (or a phase) to leave the recipe's loop after a signal; ``args[0]``: steps done."""


class Signals:
    """SIGTERM/SIGINT handler for the duration of a ``with`` block: the first signal is remembered (``received``),
    a second one stops at once (KeyboardInterrupt)."""

    def __init__(self, what: str = "finishing this step, then saving a checkpoint"):
        self.what = what
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        self.received = signum
        print(f"\n# {signal.Signals(signum).name}: {self.what} (send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "Signals":
        self._previous = {s: signal.signal(s, self._handle) for s in EXIT_SIGNAL}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    @property
    def exit_code(self) -> int:
        return EXIT_SIGNAL[self.received]


def resume_command(command: str, run: Path, changed: Sequence[str] = ()) -> str:
    """The command that continues ``run``; ``changed``: flags the resume must repeat (``--kl_rl.steps 300``)."""
    return " ".join([f"tilt train {command} --resume {run}", *changed])


class RunLoop:
    """The steps of one training run (see the module docstring). ``save(step)`` writes a checkpoint (None: the
    command keeps no checkpoints); ``sample(step)`` returns samples.jsonl rows; ``extra(metrics)`` adds metrics
    computed outside the recipe; ``resume_flags``: fields a resume must repeat; ``passthrough``: exceptions that
    leave the loop to the caller instead of failing the run."""

    def __init__(self, command: str, run: Path, *, steps: int, start: int, signals: Signals,
                 save: Callable[[int], None] | None, checkpoint_every: int, tracker=None,
                 sample: Callable[[int], list[dict]] | None = None, sample_every: int = 0,
                 extra: Callable[[dict], dict] | None = None, shown: Sequence[str] = (), main_rank: bool = True,
                 resume_flags: Sequence[str] = (), barrier: Callable[[], None] = lambda: None,
                 passthrough: tuple[type[BaseException], ...] = ()):
        self.command, self.run_dir, self.steps, self.start = command, Path(run), steps, start
        self.signals, self.save_fn, self.checkpoint_every, self.tracker = signals, save, checkpoint_every, tracker
        self.sample, self.sample_every, self.extra, self.shown = sample, sample_every, extra, tuple(shown)
        self.main_rank, self.resume_flags, self.barrier = main_rank, tuple(resume_flags), barrier
        self.passthrough = passthrough  # exceptions the caller handles (a stop rule of its own), not failures
        self.last_saved = start if start else -1
        self.bar = None

    def save(self, step: int) -> None:
        if self.save_fn is not None and self.last_saved != step:
            self.save_fn(step)
            self.barrier()
            self.last_saved = step

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        from tilt.runs import directory as runs

        done = step + 1  # updates done; the row describes the update that produced the policy of step `done`
        if self.extra is not None:
            metrics = self.extra(metrics)
        if self.main_rank:
            runs.append_jsonl(self.run_dir / "metrics.jsonl", {"step": done, **metrics})
            if self.tracker is not None:
                self.tracker.log(done, metrics)
            self.bar.set_postfix({k: f"{metrics[k]:.3g}" for k in self.shown if k in metrics}, refresh=False)
            self.bar.update()
            if self.sample is not None and ((self.sample_every and done % self.sample_every == 0) or done == self.steps):
                for row in self.sample(done):
                    runs.append_jsonl(self.run_dir / "samples.jsonl", row)
        if (self.checkpoint_every and done % self.checkpoint_every == 0) or done == self.steps:
            self.save(done)
        if self.signals.received is not None:
            self.save(done)
            raise Stop(done)

    def stopped(self, done: int) -> int:
        """Print how the run stopped and how to continue; the exit code."""
        from tilt.runs import directory as runs

        if self.save_fn is not None:
            where = self.run_dir / runs.CHECKPOINTS / runs.checkpoint_name(done) if done else None
            print(f"# stopped by {self.signals.name} after step {done} of {self.steps}"
                  + (f"; checkpoint saved in {where}" if where is not None else "")
                  + f"\n# continue with: {resume_command(self.command, self.run_dir, self.resume_flags)}", file=sys.stderr, flush=True)
        else:
            print(f"# stopped by {self.signals.name} after step {done} of {self.steps}", file=sys.stderr, flush=True)
        return self.signals.exit_code

    def failed(self, exc: BaseException) -> int:
        from tilt.runs import directory as runs

        message = f"{type(exc).__name__}: {exc}"
        marked = runs.mark_failed(self.run_dir, message) if self.main_rank else True
        done = runs.latest_checkpoint(self.run_dir)
        where = f"its checkpoints up to {done.name} are intact" if done is not None else "it has no checkpoint yet"
        state = f"is marked failed ({self.run_dir / runs.FAILED})" if marked else "could not be marked failed"
        print(f"tilt: error: {message}\n# the run {self.run_dir} {state}; {where}. "
              f"Fix the cause, then: {resume_command(self.command, self.run_dir, self.resume_flags)}", file=sys.stderr, flush=True)
        return EXIT_FAILED

    def run(self, train_fn: Callable[[Callable[[int, dict], None]], Any]) -> int | None:
        """Run ``train_fn(on_step)``; returns an exit code when the run stopped early or failed, None when done."""
        from tqdm import tqdm

        if self.signals.received is not None:  # stopped during a phase before the first step
            return self.stopped(self.start)
        self.bar = tqdm(total=self.steps, initial=self.start, unit="step", desc=f"train {self.command}", file=sys.stderr,
                        dynamic_ncols=True, disable=not self.main_rank)
        try:
            train_fn(self.on_step)
        except Stop as stop:
            self.bar.close()
            return self.stopped(stop.args[0])
        except (KeyboardInterrupt, *self.passthrough):
            self.bar.close()
            raise
        except Exception as exc:  # noqa: BLE001 - any error during training marks the run failed, then is reported
            self.bar.close()
            return self.failed(exc)
        finally:
            if self.tracker is not None:
                self.tracker.close()
        self.bar.close()
        if self.start >= self.steps:
            self.save(self.steps)
        return None



class PhaseProgress:
    """A policy that counts the samples a long phase draws (the CTRL calibration) on a progress bar (stderr) and
    stops it with ``Stop`` once a signal has arrived; everything else is the wrapped policy's."""

    def __init__(self, policy, total: int, desc: str, signals: Signals, done: int = 0):
        from tqdm import tqdm

        self._policy, self._signals, self._done = policy, signals, done
        self.bar = tqdm(total=total, desc=desc, unit="sample", file=sys.stderr, dynamic_ncols=True, leave=False)

    def __getattr__(self, name):
        return getattr(self._policy, name)

    def sample(self, prompts, samples_per_prompt, **kwargs):
        if self._signals.received is not None:
            raise Stop(self._done)
        rollout = self._policy.sample(prompts, samples_per_prompt, **kwargs)
        self.bar.update(len(rollout))
        return rollout

    def close(self) -> None:
        self.bar.close()


def progress_or_stop(bar, signals: Signals, done: int):
    """A ``progress(n)`` callback (tilt.evaluation.evaluate) that advances ``bar`` and raises ``Stop(done)`` after a signal."""
    def progress(n: int) -> None:
        bar.update(n)
        if signals.received is not None:
            raise Stop(done)
    return progress
