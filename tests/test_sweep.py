"""Sweeps, ablations and comparisons: search-space config, Tune + Train trials on the demo logged to a
real `mlflow server`, the paper-style table's arithmetic, plots."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from keplm import config
from keplm.platform.errors import ConfigError
from keplm.tuning.report import compare
from keplm.tuning.trainable import trial_config, trial_overrides

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def keplm(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "keplm.jobs.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=1500, cwd=ROOT)
    if check:
        assert r.returncode == 0, r.stderr[-4000:]
    return r


def last_json(r):
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ config

def test_space_accepts_the_papers_knobs_and_refuses_stage_keys():
    cfg = config.load(ROOT / "configs" / "sweep-demo.yaml")
    assert set(cfg.sweep.space) == {"K", "lambda1", "lambda2", "corruption_rate", "lr"}
    overrides, _ = trial_overrides({"K": 20, "lambda1": 1.5, "corruption_rate": 0.2, "train.warmup_ratio": 0.05}, None)
    assert overrides == {"batches.k": 20, "model.lambda_mnem": 1.5, "batches.mask_rate": 0.2, "train.warmup_ratio": 0.05}
    trial = trial_config(config.dump(cfg), overrides)
    assert (trial.batches.k, trial.model.lambda_mnem, trial.batches.mask_rate) == (20, 1.5, 0.2)
    assert trial.model.hidden_size == cfg.model.hidden_size        # everything else is the base config
    for bad, msg in (("sweep.space={pepr.alpha: {uniform: [0.1, 0.5]}}", "would need its stage rebuilt"),
                     ("sweep.space={K: {uniform: [5, 1]}}", "low must be below high"),
                     ("sweep.space={K: {choice: [5], uniform: [1, 2]}}", "exactly one of"),
                     ("sweep.objective=proxy_f1", "needs sweep.proxy_task")):
        with pytest.raises(ConfigError, match=msg):
            config.load(ROOT / "configs" / "sweep-demo.yaml", [bad])


def test_a_rerun_reuses_and_counts_the_parent_run_or_starts_one_in_another_store(tmp_path, caplog):
    from keplm.tuning.sweep import _parent_run, sweep_key

    cfg = config.load(ROOT / "configs" / "sweep-demo.yaml")
    a, b = (f"sqlite:///{tmp_path / name}.db" for name in ("a", "b"))
    parts = sweep_key(cfg)
    first = _parent_run(MlflowClient(a), cfg, tmp_path, "sweep", {"metric": "loss"}, "k", parts, a)
    assert _parent_run(MlflowClient(a), cfg, tmp_path, "sweep", {"metric": "loss"}, "k", parts, a) == first
    assert MlflowClient(a).get_run(first).data.tags["keplm.invocations"] == "2"
    # the same sweep, logged elsewhere (MLFLOW_TRACKING_URI is not part of the key): a new parent run there
    with caplog.at_level("WARNING"):
        moved = _parent_run(MlflowClient(b), cfg, tmp_path, "sweep", {"metric": "loss"}, "k", parts, b)
    assert moved != first and first in caplog.text and a in caplog.text
    assert MlflowClient(b).get_run(moved).data.params["tune.metric"] == "loss"
    assert json.loads((tmp_path / "mlflow_parent.json").read_text())["tracking_uri"] == b


def test_ablation_overrides_set_variant_and_seed():
    overrides, tags = trial_overrides({"variant": "-know_loss", "seed": 1}, "smedbert")
    assert overrides == {"model.use_knowledge_loss": False, "train.seed": 1, "batches.seed": 1}
    assert tags == {"keplm.variant": "-know_loss", "keplm.seed": "1"}
    assert trial_overrides({"variant": "ernie", "seed": 0}, "smedbert")[0]["model.kind"] == "ernie"


def test_an_ablation_builds_stages_only_for_the_kinds_its_variants_train():
    from keplm.tuning.space import ABLATION_GRIDS
    from keplm.tuning.sweep import kinds_in

    cfg = config.load(ROOT / "configs" / "sweep-demo.yaml")          # model.kind smedbert
    grid = ABLATION_GRIDS["smedbert"]
    assert kinds_in(cfg, [grid["mlm"]], with_base=False) == {"mlm"}        # no PEPR / TransR for a plain MLM
    assert kinds_in(cfg, [grid["-type_att"], grid["ernie"]], with_base=False) == {"smedbert", "ernie"}
    # a sweep keeps the base kind: a point of its search may leave model.kind as it is
    assert kinds_in(cfg, [{"model.kind": "mlm"}]) == {"mlm", "smedbert"} and kinds_in(cfg, []) == {"smedbert"}


def test_a_resumed_trial_reuses_its_mlflow_run(tmp_path):
    from keplm.tuning.trainable import resumed_run

    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp = client.create_experiment("e")
    parent = client.create_run(exp, run_name="sweep").info.run_id
    other = client.create_run(exp, tags={"keplm.trial_id": "t1"}).info.run_id       # not a child of this sweep
    child = client.create_run(exp, tags={"mlflow.parentRunId": parent, "keplm.trial_id": "t1",
                                         "keplm.stopped_early": "true"}).info.run_id
    client.set_terminated(child, status="KILLED")
    client.set_tag(child, "keplm.interrupted", "true")
    assert resumed_run(client, parent, "t2") is None                                   # a new trial: a new run
    assert resumed_run(client, parent, "t1") == child != other
    run = client.get_run(child)
    assert run.info.status == "RUNNING" and not {"keplm.stopped_early", "keplm.interrupted"} & set(run.data.tags)


def _interrupt_driver_at(step: int):
    """A trainable that reports 40 steps and, at ``step``, sends the Tune driver SIGUSR1 (Tune's own stop
    signal, handled like Ctrl-C); sent from inside a trial, it can only arrive while fit() runs."""
    import os
    import signal
    import time

    from ray import tune

    driver = os.getpid()

    def trainable(config):
        for i in range(1, 41):
            time.sleep(0.1)
            tune.report({"step": i, "loss": config["x"] / i})
            if i == step and config["x"] == 1:
                os.kill(driver, signal.SIGUSR1)
    return trainable


@pytest.mark.slow
@pytest.mark.parametrize("interrupt", [False, True])
def test_unfinished_trials_tells_an_interrupted_experiment_from_a_finished_one(ray_local, tmp_path, interrupt):
    from ray import tune

    from keplm.tuning.sweep import unfinished_trials

    tuner = tune.Tuner(tune.with_resources(_interrupt_driver_at(3 if interrupt else 0), {"cpu": 0.5}),
                       param_space={"x": tune.grid_search([1, 2, 3])},
                       tune_config=tune.TuneConfig(metric="loss", mode="min", max_concurrent_trials=2),
                       run_config=tune.RunConfig(name="e", storage_path=str(tmp_path), verbose=0))
    grid = tuner.fit()
    # in memory Tune's cleanup has marked the trials it was running TERMINATED either way
    assert all(not r.error for r in grid)
    left = unfinished_trials(str(tmp_path / "e"), expected=3)
    if not interrupt:
        assert left is None
        assert unfinished_trials(str(tmp_path / "e"), expected=4) == []   # a trial the searcher never made
    else:
        cut = next(r for r in grid if r.config["x"] == 1)                 # the trial that sent the signal
        assert cut.metrics["trial_id"] in left and cut.metrics["step"] < 40


class _Result:
    def __init__(self, trial_id, config, step, loss, error=None):
        self.metrics = {"trial_id": trial_id, "step": step, "val_mlm_loss": loss}
        self.config, self.error, self.path = config, error, f"/x/pretrain_trial_{trial_id}_0"


def test_an_interrupted_sweep_is_recorded_as_such_and_its_resume_finishes_it(tmp_path):
    """finish() on a sweep stopped with one trial still live: parent and that trial KILLED + interrupted,
    the trial an early-stopping scheduler stopped KILLED + stopped_early, no best config, exit 130; the
    resumed sweep's finish() ends the parent FINISHED, untagged, with the best config."""
    from keplm.platform.config import dump_config
    from keplm.tuning.sweep import SweepInterrupted, finish

    cfg = config.load(ROOT / "configs" / "sweep-demo.yaml", ["train.max_steps=12"])
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp = client.create_experiment("e")
    parent = client.create_run(exp, tags={"keplm.job": "sweep"}).info.run_id
    runs = {}
    for tid, last in (("a", 12), ("b", 6), ("c", 3)):
        runs[tid] = client.create_run(exp, tags={"mlflow.parentRunId": parent, "keplm.trial_id": tid}).info.run_id
        for step in range(1, last + 1):
            client.log_metric(runs[tid], "step", step, step=step)
    client.set_terminated(runs["a"])                                   # ran to max_steps
    grid = [_Result("a", {"K": 10, "lr": 1e-3}, 12, 6.5), _Result("b", {"K": 5, "lr": 2e-3}, 6, 7.0),
            _Result("c", {"K": 20, "lr": 3e-4}, 3, 7.5)]
    out = tmp_path / "out"
    out.mkdir()
    args = (cfg, out, "sweep", grid, client, parent, dump_config(cfg), None, "val_mlm_loss", "min")
    with pytest.raises(SweepInterrupted, match="1 trial.*unfinished.*run the same command again") as exc:
        finish(*args, unfinished=["c"])
    assert exc.value.exit_code == 130
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["unfinished_trials"] == 1 and summary["stopped_early"] == 1
    assert summary["trial_steps"] == 12 + 6 + 3 and not (out / "best_config.yaml").exists()
    p = client.get_run(parent)
    assert p.info.status == "KILLED" and p.data.tags["keplm.interrupted"] == "true"
    b, c = client.get_run(runs["b"]), client.get_run(runs["c"])
    assert b.info.status == c.info.status == "KILLED"
    assert "keplm.stopped_early" in b.data.tags and "keplm.interrupted" not in b.data.tags
    assert "keplm.interrupted" in c.data.tags and "keplm.stopped_early" not in c.data.tags

    # the rerun resumes c to the end (its run reopened, as resumed_run does) and finishes
    client.update_run(runs["c"], status="RUNNING")
    client.delete_tag(runs["c"], "keplm.interrupted")
    for step in range(4, 13):
        client.log_metric(runs["c"], "step", step, step=step)
    client.set_terminated(runs["c"])
    grid[2] = _Result("c", {"K": 20, "lr": 3e-4}, 12, 6.0)
    summary = finish(*args, unfinished=None)
    assert "interrupted" not in summary and summary["best_trial"] == "c" and summary["stopped_early"] == 1
    p = client.get_run(parent)
    assert p.info.status == "FINISHED" and "keplm.interrupted" not in p.data.tags
    assert config.load(out / "best_config.yaml").batches.k == 20

    # b logged a later objective to MLflow than Tune's last result for it (stopped between its log and its
    # report): the summary ranks by what MLflow holds, as the user comparing the child runs does
    client.log_metric(runs["b"], "val_mlm_loss", 5.5, step=6)
    summary = finish(*args, unfinished=None)
    assert summary["best_trial"] == "b" and summary["best_value"] == pytest.approx(5.5)
    assert config.load(out / "best_config.yaml").batches.k == 5


# ------------------------------------------------------------------ compare arithmetic

def _log_ablation(client, values: dict[str, list[float]]):
    exp = client.create_experiment("abl")
    parent = client.create_run(exp, run_name="ablate-x", tags={"keplm.job": "ablate"}).info.run_id
    for variant, vals in values.items():
        for seed, v in enumerate(vals):
            rid = client.create_run(exp, run_name=f"{variant}-{seed}", tags={
                "mlflow.parentRunId": parent, "keplm.variant": variant, "keplm.seed": str(seed)}).info.run_id
            client.log_metric(rid, "val_mlm_loss", v)
            client.log_metric(rid, "proxy_f1", 1 - v / 10)
            client.set_terminated(rid)
    bad = client.create_run(exp, run_name="broken", tags={"mlflow.parentRunId": parent, "keplm.variant": "broken"})
    client.log_metric(bad.info.run_id, "val_mlm_loss", 0.0)     # lowest, but FAILED: must not win
    client.set_terminated(bad.info.run_id, status="FAILED")
    return parent


@pytest.mark.parametrize("store", ["file", "sqlite"])
def test_compare_table_means_stds_best_and_plots(tmp_path, store, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")   # MLflow 3 keeps file stores behind this switch
    uri = (tmp_path / "mlruns").as_uri() if store == "file" else f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    parent = _log_ablation(client, {"full": [2.0, 2.2, 2.4], "-type_att": [3.0, 3.0], "mlm": [2.5]})
    res = compare(client, "abl", tmp_path / "cmp")
    assert res["parent_run"] == parent and res["failed_left_out"] == 1
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"full", "-type_att", "mlm"} and rows["full"]["n"] == 3
    assert rows["full"]["val_mlm_loss"][:2] == pytest.approx((2.2, 0.2))    # sample std
    assert rows["-type_att"]["val_mlm_loss"][:2] == pytest.approx((3.0, 0.0))
    assert rows["mlm"]["proxy_f1"].mean == pytest.approx(0.75) and rows["mlm"]["proxy_f1"].std is None   # n = 1
    assert [r["variant"] for r in res["rows"]] == ["full", "mlm", "-type_att"]   # best first
    assert res["best"] == {"val_mlm_loss": "full", "proxy_f1": "full"}   # lowest loss, highest F1
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| full | 3 | **2.2000 ± 0.2000** |" in md
    csv_rows = (tmp_path / "cmp" / "comparison.csv").read_text().splitlines()
    assert csv_rows[0].startswith("variant,n,val_mlm_loss_mean,val_mlm_loss_std")
    for name in ("dots_val_mlm_loss.png", "dots_proxy_f1.png"):
        data = (tmp_path / "cmp" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 2000
    logged = {a.path for a in client.list_artifacts(parent, "compare")}
    assert {"compare/comparison.md", "compare/report.md", "compare/dots_val_mlm_loss.png"} <= logged


# ------------------------------------------------------------------ real sweeps (Tune + Train + MLflow server)

@pytest.fixture(scope="module")
def demo_sweep(tmp_path_factory, mlflow_server):
    """4 trials of the demo sweep (OptunaSearch + ASHA, a rung at step 3) against a real mlflow server. The
    first trial is forced (points_to_evaluate) to a batch no worker can fill, so it must raise (and TPE may
    pick that batch again: 4 trials leave at least 2 that finish, for the plots)."""
    out = tmp_path_factory.mktemp("sweep")
    base = yaml.safe_load((ROOT / "configs" / "sweep-demo.yaml").read_text(encoding="utf-8"))
    space = {**base["sweep"]["space"], "train.batch_size": {"choice": [4, 100000]}}
    forced = {"K": 10, "lambda1": 2.0, "lambda2": 4.0, "corruption_rate": 0.15, "lr": 1e-3, "train.batch_size": 100000}
    cfg = out / "sweep.yaml"
    cfg.write_text(yaml.safe_dump({
        "extends": str(ROOT / "configs" / "sweep-demo.yaml"),
        "tracking": {"uri": mlflow_server, "experiment": "sweep-test"},
        "train": {"max_steps": 6, "checkpoint_every": 3},
        # one rerun of a failed trial (sweep.max_failures): the unfillable batch fails again, and counts once
        "sweep": {"num_samples": 4, "space": space, "points_to_evaluate": [forced], "max_failures": 1}},
        allow_unicode=True))
    r = keplm("sweep", "--config", cfg, "--output", out / "run")
    return out / "run", r, mlflow_server


@pytest.mark.slow
def test_sweep_logs_parent_and_children_and_writes_a_loadable_best_config(demo_sweep):
    out, r, uri = demo_sweep
    res = last_json(r)
    assert res["trials"] == 4 and res["failed"] >= 1                         # the forced trial raised; the sweep went on
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sweep-test")
    parents = client.search_runs([exp.experiment_id], "tags.`keplm.job` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.run_id == res["parent_run"]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{res['parent_run']}'")
    assert len(children) == 4
    statuses = sorted(c.info.status for c in children)
    assert statuses.count("FAILED") == res["failed"] and "RUNNING" not in statuses
    # exactly the trials with the unfillable batch failed (TPE may pick it again after the forced one)
    assert all((c.info.status == "FAILED") == (c.data.params["train.batch_size"] == "100000") for c in children)
    done = [c for c in children if c.info.status == "FINISHED"]
    assert done and all("val_mlm_loss" in c.data.metrics and "objective" in c.data.metrics for c in done)
    best = min((c for c in children if c.info.status != "FAILED"), key=lambda c: c.data.metrics["val_mlm_loss"])
    assert res["best_value"] == pytest.approx(best.data.metrics["val_mlm_loss"])
    # per-step metrics of a trial reached its child run
    hist = client.get_metric_history(done[0].info.run_id, "loss")
    assert [m.step for m in hist][:3] == [1, 2, 3]
    # the best config is what keplm pretrain loads, with the best trial's values in it
    cfg = config.load(out / "best_config.yaml")
    assert cfg.batches.k == int(best.data.params["batches.k"])
    assert cfg.train.lr == pytest.approx(float(best.data.params["train.lr"]))
    assert cfg.model.kind == "smedbert" and cfg.prepare.kg == "keplm://data/demo/kg"
    assert {"best_config.yaml", "trials.csv"} <= {a.path for a in client.list_artifacts(res["parent_run"])}


@pytest.mark.slow
def test_rerunning_a_finished_sweep_restores_it_and_compare_plots_it(demo_sweep, tmp_path):
    out, r, uri = demo_sweep
    cfg = out.parent / "sweep.yaml"
    again = keplm("sweep", "--config", cfg, "--output", out)
    assert "resuming the Tune experiment" in again.stderr
    assert last_json(again)["parent_run"] == last_json(r)["parent_run"] and last_json(again)["trials"] == 4
    tags = MlflowClient(uri).get_run(last_json(r)["parent_run"]).data.tags
    assert tags["keplm.invocations"] == "2" and "keplm.invocation.2" not in tags     # counted; nothing differed
    c = keplm("compare", "--experiment", "sweep-test", "--tracking-uri", uri, "--output", tmp_path / "cmp")
    res = last_json(c)
    assert res["job"] == "sweep" and res["failed_left_out"] == last_json(r)["failed"]
    assert len(res["rows"]) == 4 - last_json(r)["failed"]
    for name in ("sweep_K.png", "sweep_lr.png", "sweep_parallel_coordinates.png", "dots_val_mlm_loss.png"):
        data = (tmp_path / "cmp" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 2000, name
    # another sweep on the same output: a new Tune experiment and parent run, not a restore of the first
    # (2 trials: the first is the forced failing point, so the second must finish for the sweep to succeed)
    other = keplm("sweep", "--config", cfg, "--output", out, "sweep.num_samples=2")
    assert "resuming the Tune experiment" not in other.stderr
    anew = next(line for line in other.stderr.splitlines() if "sweeping anew" in line)
    assert "sweep.num_samples" in anew
    res = last_json(other)
    assert res["parent_run"] != last_json(r)["parent_run"] and res["trials"] == 2
    client = MlflowClient(uri)
    assert client.get_run(last_json(r)["parent_run"]).info.status == "FINISHED"    # the first sweep's record stays
    assert len(list((out / "tune").iterdir())) == 2


@pytest.mark.slow
def test_synchronous_halving_pauses_at_rungs_and_resumes_survivors_exactly(tmp_path):
    """3 trials, rungs at steps 3 and 9 (rf 3), max 9: all 3 run to 3, the best 3 // 3 = 1 by its loss at
    step 3 resumes to 9, so exactly 3 x 3 + 6 = 15 optimizer steps run: no trial trains on while it waits
    at a rung, and the survivor resumes from its rung checkpoint in the same MLflow run."""
    cfg = tmp_path / "sha.yaml"
    cfg.write_text(yaml.safe_dump({"extends": str(ROOT / "configs" / "sweep-demo.yaml"), "train": {"max_steps": 9},
                                   "sweep": {"scheduler": "sha", "num_samples": 3}}))
    res = last_json(keplm("sweep", "--config", cfg, "--output", tmp_path / "run"))
    assert res["trials"] == 3 and res["failed"] == 0 and res["stopped_early"] == 2
    assert res["trial_steps"] == 3 * 3 + 6
    uri = f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    client = MlflowClient(uri)
    children = client.search_runs([client.get_experiment_by_name("keplm").experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{res['parent_run']}'")
    at3 = {c.info.run_id: next(m.value for m in client.get_metric_history(c.info.run_id, "val_mlm_loss") if m.step == 3)
           for c in children}
    winner = min(at3, key=at3.get)
    for c in children:
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "step")]
        if c.info.run_id == winner:
            assert c.info.status == "FINISHED" and steps == list(range(1, 10))   # one run, no step twice
            assert res["best_value"] == pytest.approx(c.data.metrics["val_mlm_loss"])
        else:
            assert steps == [1, 2, 3] and c.info.status == "KILLED"
            assert c.data.tags["keplm.stopped_early"] == "true"


@pytest.mark.slow
def test_ctrl_c_leaves_an_interrupted_sweep_that_the_same_command_resumes(tmp_path):
    """SIGINT to `keplm sweep` while trials train: exit 130 with one line, the parent and the cut-off
    trials KILLED + keplm.interrupted, no best config; the same command then resumes and finishes it."""
    import signal
    import time

    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump({"extends": str(ROOT / "configs" / "sweep-demo.yaml"),
                                   "train": {"max_steps": 12}, "sweep": {"num_samples": 2, "scheduler": "fifo"}}))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "keplm.jobs.cli", "sweep", "--config", str(cfg), "--output", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    deadline = time.monotonic() + 600

    def steps_logged() -> int:
        if not (out / "mlflow_parent.json").is_file():   # not before the job has made its store and parent run
            return 0
        try:
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`keplm.trial_id` != ''")
        except Exception:   # noqa: BLE001 - a read that met the job's write lock: ask again
            return 0
        return max((int(r.data.metrics.get("step", 0)) for r in runs), default=0)

    while steps_logged() < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended before a trial trained"
        time.sleep(1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "keplm sweep: error: sweep interrupted with" in err and "run the same command again" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["unfinished_trials"] >= 1
    assert not (out / "best_config.yaml").exists()
    parent = client.get_run(summary["parent_run"])
    assert parent.info.status == "KILLED" and parent.data.tags["keplm.interrupted"] == "true"
    exp = [parent.info.experiment_id]
    cut = client.search_runs(exp, "tags.`keplm.interrupted` = 'true' and tags.`keplm.trial_id` != ''")
    assert cut and all(r.info.status == "KILLED" and "keplm.stopped_early" not in r.data.tags for r in cut), \
        [(r.data.tags["keplm.trial_id"], r.info.status, sorted(t for t in r.data.tags if t.startswith("keplm."))) for r in cut]
    c = keplm("compare", "--experiment", "keplm", "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}",
              "--output", tmp_path / "cmp")
    assert last_json(c)["interrupted_runs"] == len(cut) and "cut off by an interrupted sweep" in c.stderr

    res = last_json(keplm("sweep", "--config", cfg, "--output", out))
    assert res["parent_run"] == summary["parent_run"] and res["trials"] == 2 and res["failed"] == 0
    assert "interrupted" not in res and (out / "best_config.yaml").is_file()
    parent = client.get_run(res["parent_run"])
    assert parent.info.status == "FINISHED" and "keplm.interrupted" not in parent.data.tags
    children = client.search_runs(exp, f"tags.`mlflow.parentRunId` = '{res['parent_run']}'")
    assert len(children) == 2                                   # the cut-off trials went on in their own runs
    for c in children:
        assert c.info.status == "FINISHED" and not {"keplm.interrupted", "keplm.stopped_early"} & set(c.data.tags)
        assert int(c.data.metrics["step"]) == 12


def test_a_trial_that_raises_after_tune_stopped_it_counts_as_killed_not_failed(monkeypatch):
    """Tune stops a trial without waiting for its thread (an interrupted sweep, a scheduler's STOP); an error
    the thread raises afterwards must not turn the cut-off trial's MLflow run FAILED."""
    import inspect
    import threading

    from ray.train._internal import session
    from ray.tune.trainable.function_trainable import FunctionTrainable

    from keplm.tuning.trainable import stopped_by_tune

    class LiveSession:
        stop_event = threading.Event()

    monkeypatch.setattr(session, "_session", LiveSession())
    assert not stopped_by_tune()                        # a trial that raises on its own: FAILED
    LiveSession.stop_event.set()                        # what _TrainSession.finish does when Tune stops it
    assert stopped_by_tune()
    monkeypatch.setattr(session, "_session", None)      # what FunctionTrainable.cleanup leaves behind
    assert stopped_by_tune()
    # the private pieces this reads are still what the installed Ray does on a stop
    assert "self.stop_event.set()" in inspect.getsource(session._TrainSession.finish)
    assert "shutdown_session()" in inspect.getsource(FunctionTrainable.cleanup)


DEMO_EVAL = ("evaluate.tasks={sim: {kind: similarity, kg: 'keplm://data/demo/kg', max_queries: 20}, "
             "probe: {kind: probe, kg: 'keplm://data/demo/kg', max_queries_per_relation: 4, max_answer_tokens: 4}}")


@pytest.mark.slow
def test_ablate_runs_the_grid_with_seeds_evaluates_each_trial_and_reports(tmp_path):
    report = tmp_path / "report"
    r = keplm("ablate", "--model", "smedbert", "--config", "configs/sweep-demo.yaml", "--output", tmp_path / "abl",
              "ablate.variants=[-know_loss, none]", "ablate.seeds=2", "train.max_steps=8",
              "train.checkpoint_every=4", DEMO_EVAL, "ablate.evaluate=[sim, probe]", f"ablate.report_dir={report}",
              "ablate.report_metrics=[sim.acc_at_1, probe.recall_at_5, val_mlm_loss, mlm_loss]")
    res = last_json(r)
    assert res["trials"] == 4 and res["failed"] == 0
    uri = f"sqlite:///{tmp_path / 'abl' / 'mlflow.db'}"
    client = MlflowClient(uri)
    children = client.search_runs([client.get_experiment_by_name("keplm").experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{res['parent_run']}'")
    by_variant: dict[str, list] = {}
    for ch in children:
        by_variant.setdefault(ch.data.tags["keplm.variant"], []).append(ch)
        assert ch.info.status == "FINISHED"
        # every trial's model was evaluated on each task, logged to its own run
        assert {"sim.acc_at_1", "probe.recall_at_5"} <= set(ch.data.metrics), ch.data.tags["keplm.variant"]
        assert 0 <= ch.data.metrics["sim.acc_at_1"] <= 1 and 0 <= ch.data.metrics["probe.recall_at_5"] <= 1
    # the not-pretrained variant trains nothing: no step, no loss; the others trained 8 steps
    assert all("mlm_loss" not in ch.data.metrics for ch in by_variant["none"]) and len(by_variant["none"]) == 2
    assert all(ch.data.metrics["step"] == 8 for ch in by_variant["-know_loss"]) and len(by_variant["-know_loss"]) == 2
    # seeds give different models: the untrained backbones differ between seeds 0 and 1
    weights = {}
    for ch in by_variant["none"]:
        from safetensors.torch import load_file

        trial_dir = tmp_path / "abl" / "trials" / ch.data.tags["keplm.trial_id"] / "model"
        weights[ch.data.tags["keplm.seed"]] = load_file(str(trial_dir / "model.safetensors"))
    key = "bert.embeddings.word_embeddings.weight"
    assert not torch.equal(weights["0"][key], weights["1"][key])
    # the report the ablation wrote: every variant, mean ± std over its 2 seeds, how to reproduce it
    md = (report / "report.md").read_text(encoding="utf-8")
    for variant in ("-know_loss", "none"):
        assert f"| {variant} |" in md, variant
    assert "keplm ablate" in md and "configs/sweep-demo.yaml" in md and "±" in md
    assert (report / "dots_sim.acc_at_1.png").is_file() or any(report.glob("dots_*.png"))
    c = last_json(keplm("compare", "--experiment", "keplm", "--tracking-uri", uri, "--output", tmp_path / "cmp"))
    rows = {row["variant"]: row for row in c["rows"]}
    assert set(rows) == {"-know_loss", "none"} and rows["-know_loss"]["n"] == rows["none"]["n"] == 2
    # the ablation removed SMedBERT's knowledge losses (the full model logs them: the demo sweep's trials, the
    # pretrain tests' run); MLM and SOP remain
    assert {"mlm_loss", "sop_loss"} <= set(rows["-know_loss"]) and not {"mnem_loss", "mmem_loss"} & set(rows["-know_loss"])
    vals = sorted(ch.data.metrics["val_mlm_loss"] for ch in by_variant["-know_loss"])
    assert rows["-know_loss"]["val_mlm_loss"]["mean"] == pytest.approx(sum(vals) / 2)


@pytest.mark.slow
def test_embert_ablation_removes_its_objectives(tmp_path):
    r = keplm("ablate", "--model", "embert", "--config", "configs/sweep-demo.yaml", "--output", tmp_path / "abl",
              "ablate.variants=[-consistency, -all]", "ablate.seeds=1", "train.max_steps=4",
              "train.checkpoint_every=4")
    res = last_json(r)
    assert res["trials"] == 2 and res["failed"] == 0
    uri = f"sqlite:///{tmp_path / 'abl' / 'mlflow.db'}"
    c = last_json(keplm("compare", "--experiment", "keplm", "--tracking-uri", uri, "--output", tmp_path / "cmp"))
    rows = {row["variant"]: row for row in c["rows"]}
    assert set(rows) == {"-consistency", "-all"} and "mlm_loss" in rows["-all"]
    assert "cecp_loss" not in rows["-consistency"] and {"est_loss", "bem_loss"} <= set(rows["-consistency"])
    assert not {"cecp_loss", "est_loss", "bem_loss"} & set(rows["-all"])


@pytest.mark.parametrize("model", ["smedbert", "kebiolm", "embert"])
def test_every_ablation_variant_is_a_valid_config(model):
    from keplm.tuning.space import ABLATION_GRIDS

    base = config.dump(config.load(ROOT / "configs" / "sweep-demo.yaml", [f"model.kind={model}"]))
    for variant, over in ABLATION_GRIDS[model].items():
        overrides, tags = trial_overrides({"variant": variant, "seed": 0}, model)
        cfg = trial_config(base, overrides)
        for key, value in over.items():
            section, name = key.split(".")
            assert getattr(getattr(cfg, section), name) == value, (variant, key)
        assert tags["keplm.variant"] == variant


def test_ablation_eval_task_paths_are_resolved_in_the_driver(monkeypatch):
    """Tune runs each trial in its own working directory: a task's relative paths must be absolute before."""
    from keplm.tuning.sweep import absolute_paths

    monkeypatch.chdir(ROOT)
    task = absolute_paths({"kind": "ner", "train": "../shared/data/ner/x/train.txt.gz", "dev": "dev.txt",
                           "test": None, "kg": "keplm://data/demo/kg", "format": "conll"})
    assert task["train"] == str((ROOT / ".." / "shared/data/ner/x/train.txt.gz").resolve())
    assert task["dev"] == str(ROOT / "dev.txt") and task["test"] is None and task["format"] == "conll"
    assert Path(task["kg"]).is_dir() and Path(task["kg"]).is_absolute()
