"""What ASHA saves: a 16-trial sweep on the demo with ASHA vs the same 16 trials run to the end (FIFO).
Prints one JSON line: optimizer steps run in all trials (`trial_steps`, read from each trial's MLflow run),
the saving (target >= 50 %), wall time, and whether the best trial of the full sweep survived ASHA
(ran to max_steps there).

Both sweeps evaluate the same 16 points of configs/sweep-demo.yaml's space (drawn once with a seeded
RNG and given as ``sweep.points_to_evaluate``), so the comparison is trial for trial; 24 steps per trial,
the sweep-demo settings: a report (checkpoint + val_mlm_loss) every 3 steps, ASHA grace 1 report,
reduction factor 3 (rungs at steps 3 and 9).

Asynchronous ASHA promotes a trial that is in the top third of those that reached its rung *so far*,
so what it saves depends on the order the trials arrive in (a run of ever-better arrivals is promoted
every time). The ASHA sweep is therefore run for ``--orders`` seeded permutations of the same points and
the saving is the mean over them (each order's figure is printed too); the FIFO sweep, whose cost and
results do not depend on order, runs once.

Synchronous successive halving (``sweep.scheduler: sha``, same rungs and reduction factor) makes the cut
on the whole population at each rung, so its saving and survivors should not depend on the order: it is
run for ``--sha-orders`` of the same permutations, and the line says whether they agreed. Its ideal cost
is sum over rungs of (trials at the rung x steps to the next rung); ``sha_ideal_trial_steps`` prints it
(16 trials, rungs 3 and 9, max 24: 16x3 + 5x6 + 1x15 = 93 of 384).

Steps are counted as run (one logged ``step`` value per optimizer step, re-runs after a resume included).

    python benchmarks/bench_sweep.py [--trials 16] [--steps 24] [--orders 3] [--sha-orders 2]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def draw_points(space: dict, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    points = []
    for _ in range(n):
        p = {}
        for k, spec in space.items():
            if "choice" in spec:
                p[k] = rng.choice(spec["choice"])
            elif "uniform" in spec:
                p[k] = rng.uniform(*spec["uniform"])
            elif "loguniform" in spec:
                lo, hi = spec["loguniform"]
                p[k] = math.exp(rng.uniform(math.log(lo), math.log(hi)))
            else:
                p[k] = rng.randint(*spec["randint"])
        points.append(p)
    return points


def run_sweep(out: Path, scheduler: str, points: list[dict], steps: int) -> tuple[dict, float]:
    cfg = out.with_suffix(".yaml")
    cfg.write_text(yaml.safe_dump({"extends": str(ROOT / "configs" / "sweep-demo.yaml"),
                                   "train": {"max_steps": steps},
                                   "sweep": {"scheduler": scheduler, "num_samples": len(points),
                                             "points_to_evaluate": points}}))
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "keplm.jobs.cli", "sweep", "--config", str(cfg), "--output", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1]), time.perf_counter() - t


def trial_table(out: Path) -> dict[str, tuple[int, float | None]]:
    """point (as JSON) -> (steps run, last val_mlm_loss) from the sweep's trials.csv."""
    import csv

    rows = {}
    with open(out / "trials.csv", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            rows[json.dumps(json.loads(row["config"]), sort_keys=True)] = (
                int(row["steps"]), float(row["val_mlm_loss"]) if row["val_mlm_loss"] else None)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--orders", type=int, default=3, help="ASHA sweeps, each over a seeded permutation of the points")
    ap.add_argument("--sha-orders", type=int, default=2, help="synchronous-halving sweeps, over the first permutations")
    args = ap.parse_args()
    demo = yaml.safe_load((ROOT / "configs" / "sweep-demo.yaml").read_text(encoding="utf-8"))
    points = draw_points(demo["sweep"]["space"], args.trials, args.seed)
    savings, survived, stopped, walls, best_asha = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        full, full_s = run_sweep(Path(tmp) / "fifo", "fifo", points, args.steps)
        t_full = trial_table(Path(tmp) / "fifo")
        best_key = min((k for k, v in t_full.items() if v[1] is not None), key=lambda k: t_full[k][1])
        for order in range(args.orders):
            shuffled = list(points)
            random.Random(order).shuffle(shuffled)
            asha, asha_s = run_sweep(Path(tmp) / f"asha{order}", "asha", shuffled, args.steps)
            t_asha = trial_table(Path(tmp) / f"asha{order}")
            savings.append(round(1 - asha["trial_steps"] / full["trial_steps"], 3))
            survived.append(t_asha.get(best_key, (0, None))[0] >= args.steps)
            stopped.append(sum(v[0] < args.steps for v in t_asha.values()))
            walls.append(round(asha_s, 1))
            best_asha.append(asha.get("best_value"))
        sha_steps, sha_survived, sha_kept, sha_walls = [], [], [], []
        for order in range(args.sha_orders):
            shuffled = list(points)
            random.Random(order).shuffle(shuffled)
            sha, sha_s = run_sweep(Path(tmp) / f"sha{order}", "sha", shuffled, args.steps)
            t_sha = trial_table(Path(tmp) / f"sha{order}")
            sha_steps.append(sha["trial_steps"])
            sha_survived.append(t_sha.get(best_key, (0, None))[0] >= args.steps)
            sha_kept.append(sorted(k for k, v in t_sha.items() if v[0] >= args.steps))
            sha_walls.append(round(sha_s, 1))
    out = {"bench": "sweep", "trials": args.trials, "max_steps": args.steps, "orders": args.orders,
           "trial_steps_fifo": full["trial_steps"], "asha_saving_per_order": savings,
           "asha_saving": round(statistics.mean(savings), 3), "target_saving": 0.5,
           "wall_s_fifo": round(full_s, 1), "wall_s_asha_per_order": walls,
           "trials_stopped_early_asha_per_order": stopped,
           "best_fifo_val_mlm_loss": t_full[best_key][1],
           "best_fifo_survived_asha_per_order": survived, "best_asha_val_mlm_loss_per_order": best_asha}
    if args.sha_orders:
        from keplm.tuning.halving import planned_steps, rung_milestones

        sc = demo["sweep"]
        rungs = rung_milestones(sc["grace_period"] * demo["train"]["checkpoint_every"], sc["reduction_factor"], args.steps)
        ideal = planned_steps(args.trials, rungs, sc["reduction_factor"], args.steps)
        out.update({"sha_rungs": rungs, "sha_ideal_trial_steps": ideal, "sha_trial_steps_per_order": sha_steps,
                    "sha_saving_per_order": [round(1 - x / full["trial_steps"], 3) for x in sha_steps],
                    "sha_saving": round(1 - statistics.mean(sha_steps) / full["trial_steps"], 3),
                    "sha_same_survivors_every_order": all(k == sha_kept[0] for k in sha_kept),
                    "best_fifo_survived_sha_per_order": sha_survived,
                    "wall_s_sha_per_order": sha_walls})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
