"""Printing results: JSON for machines, aligned tables for people."""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Sequence


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or (1e-3 <= abs(value) < 1e4):
            return f"{value:.4f}"
        return f"{value:.3e}" if math.isfinite(value) else str(value)
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(map(str, headers))] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def strict_json(obj: Any) -> Any:
    """``obj`` with non-finite floats written as the strings "inf", "-inf" and "nan", so the output is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def print_json(obj: Any) -> None:
    print(json.dumps(strict_json(obj), indent=2, sort_keys=True, allow_nan=False))


def run_parsed(args) -> int:
    """Run a parsed command (``args.run(args)``). Bad input (ValueError, a missing file, a missing package) and a run
    directory locked by another process print one ``tilt: error:`` line and exit 2, the same for every entry point. A multi-process run whose peer died
    (``tilt.distributed.RankFailure``) prints its line and exits 3 at once: its checkpoints are already on disk, and
    tearing down a broken process group can abort the process (SIGABRT) and bury the message."""
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"tilt: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from tilt.distributed import RankFailure
        from tilt.runs.directory import RunLockedError

        if isinstance(exc, RunLockedError):  # another process writes this run: nothing was touched
            print(f"tilt: error: {exc}", file=sys.stderr)
            return 2
        if not isinstance(exc, RankFailure):
            raise
        print(f"tilt: error: {exc}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(3)
