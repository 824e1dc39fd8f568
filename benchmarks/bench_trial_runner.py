"""What training in the trial's own process saves: the same demo sweep with ``sweep.train_in_trial`` on (each
1-worker trial trains in its Tune trial process, reused by the next trial) and off (each trial a Ray Train
run: a controller and a worker process per trial, and per halving rung). Prints one JSON line: the sweeps'
wall times (median and spread of ``--rounds`` interleaved rounds, the Ray Train baseline in the same run),
the ratio, and whether every trial's last val_mlm_loss agreed between the two (same points, same seeds).

By default: 4 trials of configs/sweep-demo.yaml's space (drawn once, seeded, as points_to_evaluate), FIFO,
6 steps each, 2 at a time; ``--scheduler sha`` (rungs at 3 and 9 with ``--steps 12``) adds rung pauses.

    python benchmarks/bench_trial_runner.py [--trials 4] [--steps 6] [--rounds 3] [--scheduler fifo]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sweep import ROOT, draw_points, trial_table  # noqa: E402


def run_sweep(out: Path, points: list[dict], steps: int, scheduler: str, in_trial: bool) -> float:
    cfg = out.with_suffix(".yaml")
    cfg.write_text(yaml.safe_dump({"extends": str(ROOT / "configs" / "sweep-demo.yaml"), "train": {"max_steps": steps},
                                   "sweep": {"scheduler": scheduler, "num_samples": len(points),
                                             "points_to_evaluate": points, "train_in_trial": in_trial}}))
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "keplm.jobs.cli", "sweep", "--config", str(cfg), "--output", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scheduler", default="fifo", choices=["fifo", "sha", "asha"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    demo = yaml.safe_load((ROOT / "configs" / "sweep-demo.yaml").read_text(encoding="utf-8"))
    points = draw_points(demo["sweep"]["space"], args.trials, args.seed)
    walls: dict[str, list[float]] = {"in_trial": [], "ray_train": []}
    agree = True
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            tables = {}
            # interleaved, the first runner alternating, so a drift in the host's speed falls on both
            for name in (("in_trial", "ray_train") if i % 2 == 0 else ("ray_train", "in_trial")):
                out = Path(tmp) / f"{name}{i}"
                walls[name].append(run_sweep(out, points, args.steps, args.scheduler, name == "in_trial"))
                tables[name] = trial_table(out)
            a, b = tables["in_trial"], tables["ray_train"]
            agree &= a.keys() == b.keys() and all(
                a[k][0] == b[k][0] and (a[k][1] is None) == (b[k][1] is None)
                and (a[k][1] is None or abs(a[k][1] - b[k][1]) <= 1e-4 * abs(b[k][1])) for k in a)
    med = {k: statistics.median(v) for k, v in walls.items()}
    print(json.dumps({"bench": "trial_runner", "date": date.today().isoformat(), "machine": platform.machine(),
                      "cpus": __import__("os").cpu_count(), "trials": args.trials, "max_steps": args.steps,
                      "scheduler": args.scheduler, "rounds": args.rounds,
                      "wall_s_in_trial": round(med["in_trial"], 1), "wall_s_ray_train": round(med["ray_train"], 1),
                      "spread_s_in_trial": [round(min(walls["in_trial"]), 1), round(max(walls["in_trial"]), 1)],
                      "spread_s_ray_train": [round(min(walls["ray_train"]), 1), round(max(walls["ray_train"]), 1)],
                      "speedup": round(med["ray_train"] / med["in_trial"], 2),
                      "same_trial_results": agree}))


if __name__ == "__main__":
    main()
