"""Pool the results of ``ctrl_bon_embedded.py`` over training seeds: one row per seed, then the mean gap in
best-of-N win rate (CTRL minus KL-RL) with a t interval over seeds, which counts the training run's own
variability (the per-seed paired intervals count only the evaluation's sampling noise).

    python experiments/ctrl_bon_summary.py runs/ctrl-bon-s0 runs/ctrl-bon-s1 runs/ctrl-bon-s2
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from scipy import stats

from tilt.cli.output import table


def main(folders: list[str]) -> int:
    if not folders:
        raise SystemExit(__doc__)
    missing = [f for f in folders if not (Path(f) / "result.json").is_file()]
    if missing:
        raise SystemExit(f"no result.json in {', '.join(missing)}: is the run finished? (ctrl_bon_embedded.py writes it last)")
    results = [json.loads((Path(f) / "result.json").read_text()) for f in folders]
    n = results[0]["args"]["n"]
    rows, gaps = [], []
    for f, r in zip(folders, results):
        gap = r["bon_gap_ctrl_minus_klrl"]
        gaps.append(gap[0])
        rows.append([f, r["args"]["seed"], f"{r['kl-rl']['kl_ref'][0]:.3f}", f"{r['ctrl']['kl_ref'][0]:.3f}",
                     f"{r['kl-rl']['win_rate_bon'][0]:.3f}", f"{r['ctrl']['win_rate_bon'][0]:.3f}",
                     f"{r['kl-rl']['win_rate'][0]:.3f}", f"{r['ctrl']['win_rate'][0]:.3f}",
                     f"{r['kl-rl']['win_rate_won'][0]:.3f}", f"{r['ctrl']['win_rate_won'][0]:.3f}",
                     f"{gap[0]:+.3f} [{gap[1]:+.3f}, {gap[2]:+.3f}]", "yes" if r["matched"] else "NO"])
    print(table(["run", "seed", "KL kl-rl", "KL ctrl", f"BoN{n} kl-rl", f"BoN{n} ctrl", "win kl-rl", "win ctrl",
                 f"WoN{n} kl-rl", f"WoN{n} ctrl", f"BoN{n} gap (paired 95%)", "KL matched"], rows))
    mean = statistics.fmean(gaps)
    if len(gaps) > 1:
        half = stats.t.ppf(0.975, len(gaps) - 1) * statistics.stdev(gaps) / len(gaps) ** 0.5
        print(f"\nmean best-of-{n} gap over {len(gaps)} seeds: {mean:+.3f}, 95% t interval over seeds "
              f"[{mean - half:+.3f}, {mean + half:+.3f}]; CTRL ahead in {sum(g > 0 for g in gaps)} of {len(gaps)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
