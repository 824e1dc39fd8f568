"""`keplm compare` (keplm.tuning.report) on runs logged the way the sweep/ablate driver and its trials log
them (keplm.tuning.sweep / trainable), in a real MLflow sqlite store: the objective's direction from the
parent's tune.mode, best first, swept-value columns, stopped trials' last values, n = 1 without a spread,
dot plots on the data's range, report.md's metadata. No Ray."""

import csv
import json
import re

import matplotlib.figure
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from keplm.tuning.report import Objective, compare, directions, lower_is_better

PNG = b"\x89PNG\r\n\x1a\n"
T0 = 1_700_000_000_000          # ms
SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    return MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'm.db'}")


def _parent(client, exp, job, params, name):
    run = client.create_run(exp, run_name=name, start_time=T0,
                            tags={"keplm.job": job, "keplm.sweep_key": "k", "mlflow.source.git.commit": SHA})
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return run.info.run_id


def _trial(client, exp, parent, job, name, params, metrics, status="FINISHED", tags=None, history=None):
    """A child run as pretrain_trial makes it: the config as params, per-step metrics, `objective` at the end."""
    rid = client.create_run(exp, run_name=name, start_time=T0 + 1000, tags={
        "mlflow.parentRunId": parent, "keplm.job": f"{job}-trial", "keplm.trial_id": name.split("-", 1)[1],
        "keplm.model": "smedbert", **(tags or {})}).info.run_id
    client.log_batch(rid, params=[Param(k, str(v)) for k, v in params.items()])
    ms = [Metric(k, float(v), T0 + 2000 + i, step) for i, (k, v, step) in enumerate(history or [])]
    ms += [Metric(k, float(v), T0 + 9000, 12) for k, v in metrics.items()]
    if ms:
        client.log_batch(rid, metrics=ms)
    if status != "RUNNING":
        client.set_terminated(rid, status=status, end_time=T0 + 61_000)
    return rid


def _sweep(client, name, metric, mode, trials):
    """A sweep's parent (params as run_tune logs them) and its trials: (id, K, lr, final value or None for a
    trial ASHA stopped, status)."""
    exp = client.create_experiment(name)
    parent = _parent(client, exp, "sweep", {
        "tune.param_space.K": "<ray.tune.search.sample.Categorical object at 0x7f>",
        "tune.param_space.lr": "<ray.tune.search.sample.Float object at 0x7f>",
        "tune.metric": metric, "tune.mode": mode, "tune.num_samples": len(trials),
        "sweep.space.K.choice": "[5, 10, 20]", "sweep.space.K.uniform": "",
        "sweep.space.lr.loguniform": "(1e-05, 0.001)",
        "sweep.objective": metric, "sweep.scheduler": "asha", "model.kind": "smedbert"}, f"sweep-{name}")
    ids = {}
    for tid, k, lr, value, status in trials:
        params = {"batches.k": k, "train.lr": lr, "model.lambda_mnem": 2.0, "sweep.objective": metric, "sweep.mode": ""}
        if value is None:           # stopped by ASHA at step 9: per-step metrics only, no objective
            ids[tid] = _trial(client, exp, parent, "sweep", f"trial-{tid}", params, {}, status="KILLED",
                              tags={"keplm.stopped_early": "true"},
                              history=[("val_mlm_loss", 7.4, 3), ("step", 3, 3), ("val_mlm_loss", 6.9, 6),
                                       ("step", 6, 6), ("val_mlm_loss", 6.61, 9), ("step", 9, 9), ("loss", 5.0, 9)])
        else:
            ids[tid] = _trial(client, exp, parent, "sweep", f"trial-{tid}", params,
                              {metric: value, "objective": value, "step": 12, "loss": value - 0.3}, status=status,
                              history=[(metric, value + 1, 4), (metric, value + 0.5, 8)])
    client.set_terminated(parent, end_time=T0 + 3_723_000)
    return parent, ids


@pytest.fixture(scope="module")
def min_sweep(client, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp_min")
    # ids in an order unrelated to the values; e's 1.0 is lowest but FAILED: left out
    parent, ids = _sweep(client, "sweep-min", "val_mlm_loss", "min", [
        ("00000", 10, "0.0003", 6.2, "FINISHED"), ("00001", 5, "0.001", 6.5, "FINISHED"),
        ("00002", 20, "3e-05", 6.0, "FINISHED"), ("00003", 20, "0.0002", None, "KILLED"),
        ("00004", 10, "0.0001", 1.0, "FAILED")])
    return compare(client, "sweep-min", out), out, parent, ids


def _row_line(md, variant):
    return next(line for line in md.splitlines() if line.startswith(f"| {variant} |"))


def test_a_min_mode_objective_ranks_the_lowest_first_and_bolds_it(min_sweep):
    res, out, parent, _ = min_sweep
    assert res["parent_run"] == parent and res["failed_left_out"] == 1 and res["stopped_runs"] == 1
    assert res["objective"] == {"metric": "val_mlm_loss", "mode": "min", "source": "the parent run's tune.mode"}
    assert [r["variant"] for r in res["rows"]] == ["trial-00002", "trial-00000", "trial-00001", "trial-00003"]
    assert res["best"]["objective"] == "trial-00002" and res["best"]["val_mlm_loss"] == "trial-00002"
    md = (out / "comparison.md").read_text()
    assert "objective (val_mlm_loss) ↓" in md and "val_mlm_loss ↓" in md and "↑" not in md.splitlines()[0]
    assert "| **6.0000** |" in _row_line(md, "trial-00002")
    assert "**" not in _row_line(md, "trial-00001")                 # the highest (worst) is not bold
    assert md.index("trial-00002") < md.index("trial-00000") < md.index("trial-00001") < md.index("trial-00003")


def test_swept_values_are_columns(min_sweep):
    res, out, _, _ = min_sweep
    assert res["knobs"] == ["K", "lr"]
    md = (out / "comparison.md").read_text()
    head = md.splitlines()[0]
    assert head.startswith("| trial | n | K | lr | objective (val_mlm_loss) ↓ |")
    assert _row_line(md, "trial-00002").startswith("| trial-00002 | 1 | 20 | 3e-05 | **6.0000** |")
    assert _row_line(md, "trial-00000").startswith("| trial-00000 | 1 | 10 | 0.0003 | 6.2000 |")
    with open(out / "comparison.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["variant"], r["K"], r["lr"]) for r in rows][:2] == [("trial-00002", "20", "3e-05"),
                                                                   ("trial-00000", "10", "0.0003")]


def test_a_stopped_trial_shows_its_last_value_and_step(min_sweep):
    res, out, _, _ = min_sweep
    row = next(r for r in res["rows"] if r["variant"] == "trial-00003")
    cell = row["objective"]
    assert (cell.mean, cell.step, cell.why, cell.partial) == (pytest.approx(6.61), 9, "stopped", 1)
    line = _row_line((out / "comparison.md").read_text(), "trial-00003")
    assert "| 6.6100 @ step 9 (stopped) |" in line and "**" not in line
    # its training loss (5.0, at step 9) is the lowest, but a stopped trial wins no column
    assert row["loss"].mean == pytest.approx(5.0) and res["best"]["loss"] == "trial-00002"
    with open(out / "comparison.csv", newline="", encoding="utf-8") as f:
        last = list(csv.DictReader(f))[-1]
    assert last["variant"] == "trial-00003" and last["objective_mean"] == "6.61" and "step 9 (stopped" in last["note"]


def test_n1_has_no_spread(min_sweep):
    res, out, _, _ = min_sweep
    md = (out / "comparison.md").read_text()
    assert "±" not in md.split("\n", 2)[2]          # one run per trial: values only
    assert all(r["objective"].std is None for r in res["rows"])
    with open(out / "comparison.csv", newline="", encoding="utf-8") as f:
        assert all(r["objective_std"] == "" for r in csv.DictReader(f))


def test_sweep_plots_exist_and_the_dot_axis_spans_the_data(client, tmp_path, monkeypatch):
    limits = {}
    save = matplotlib.figure.Figure.savefig

    def spy(fig, path, *a, **k):
        limits[str(path).rsplit("/", 1)[-1]] = fig.axes[0].get_xlim()
        return save(fig, path, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    _sweep(client, "sweep-plots", "val_mlm_loss", "min", [
        ("00000", 10, "0.0003", 6.2, "FINISHED"), ("00001", 5, "0.001", 6.5, "FINISHED"),
        ("00002", 20, "3e-05", 6.0, "FINISHED"), ("00003", 20, "0.0002", None, "KILLED")])
    res = compare(client, "sweep-plots", tmp_path)
    for name in ("dots_objective.png", "dots_val_mlm_loss.png", "sweep_K.png", "sweep_lr.png",
                 "sweep_parallel_coordinates.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 2000, name
        assert str(tmp_path / name) in res["files"]
    assert not list(tmp_path.glob("bars_*.png"))
    lo, hi = limits["dots_objective.png"]          # 6.0 .. 6.61 plus a margin, not a bar from 0
    assert 5.8 < lo < 6.0 and 6.61 < hi < 6.8
    logged = {a.path for a in client.list_artifacts(res["parent_run"], "compare")}
    assert {"compare/report.md", "compare/comparison.csv", "compare/dots_objective.png"} <= logged


def test_a_max_mode_objective_ranks_the_highest_first(client, tmp_path):
    _sweep(client, "sweep-max", "proxy_f1", "max", [
        ("00000", 10, "0.0003", 0.61, "FINISHED"), ("00001", 5, "0.001", 0.72, "FINISHED"),
        ("00002", 20, "3e-05", 0.55, "FINISHED")])
    res = compare(client, "sweep-max", tmp_path)
    assert [r["variant"] for r in res["rows"]] == ["trial-00001", "trial-00000", "trial-00002"]
    assert res["best"]["objective"] == "trial-00001" and res["best"]["proxy_f1"] == "trial-00001"
    assert res["best"]["loss"] == "trial-00002"                      # other columns keep their own direction
    md = (tmp_path / "comparison.md").read_text()
    assert "objective (proxy_f1) ↑" in md and "proxy_f1 ↑" in md and "loss ↓" in md
    assert "| **0.7200** |" in _row_line(md, "trial-00001")


def test_the_mode_falls_back_to_the_metric_name():
    assert lower_is_better("val_mlm_loss") and lower_is_better("ed_loss")
    for m in ("test_f1", "acc_at_1", "recall_at_5", "proxy_f1", "dev_f1"):
        assert not lower_is_better(m), m
    assert lower_is_better("proxy_f1", "min") and not lower_is_better("val_mlm_loss", "max")
    lower = directions(["objective", "val_mlm_loss", "test_f1"], Objective("val_mlm_loss", "min", "name"))
    assert lower == {"objective": True, "val_mlm_loss": True, "test_f1": False}


def test_probe_metrics_are_compared_higher_is_better(client, tmp_path):
    exp = client.create_experiment("probe")
    parent = _parent(client, exp, "ablate", {"tune.metric": "val_mlm_loss", "tune.mode": "min"}, "ablate-probe")
    for variant, (f1, acc, rec) in {"full": (0.8, 0.4, 0.7), "-x": (0.9, 0.5, 0.6)}.items():
        # as plain names and as an ablation's evaluated tasks log them (<task>.<metric>)
        _trial(client, exp, parent, "ablate", f"{variant}-t{variant}", {}, {
            "test_f1": f1, "acc_at_1": acc, "recall_at_5": rec, "probe.recall_at_5": 1 - rec,
            "probe.recall_at_5.treats": 0.5, "probe.recall_at_5_pooled": 0.1, "time.eval_probe_s": 30},
            tags={"keplm.variant": variant, "keplm.seed": "0"})
    res = compare(client, "probe", tmp_path)
    assert res["metrics"] == ["test_f1", "acc_at_1", "probe.recall_at_5", "recall_at_5"]
    assert res["best"] == {"test_f1": "-x", "acc_at_1": "-x", "recall_at_5": "full", "probe.recall_at_5": "-x"}
    md = (tmp_path / "comparison.md").read_text()
    assert "test_f1 ↑ | acc_at_1 ↑ | probe.recall_at_5 ↑ | recall_at_5 ↑" in md
    assert "eval_probe 1m 00s summed over 2 trials" in (tmp_path / "report.md").read_text()


@pytest.fixture(scope="module")
def ablation(client, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp_abl")
    exp = client.create_experiment("abl")
    parent = _parent(client, exp, "ablate", {
        "tune.param_space.variant": "{'grid_search': ['full', '-type_att', 'mlm']}",
        "tune.param_space.seed": "{'grid_search': [0, 1]}", "tune.metric": "val_mlm_loss", "tune.mode": "min",
        "tune.num_samples": 1, "ablate.seeds": 2, "model.kind": "smedbert"}, "ablate-out")
    client.log_metric(parent, "time.stages_smedbert_s", 75.0)     # as run_tune logs the stages' time
    for variant, vals in {"-type_att": [3.0, 3.2], "full": [2.0, 2.2], "mlm": [2.5]}.items():
        for seed, v in enumerate(vals):
            _trial(client, exp, parent, "ablate", f"{variant}-s{seed}", {"ablate.objective": "val_mlm_loss"},
                   {"val_mlm_loss": v, "objective": v, "proxy_f1": 1 - v / 10, "time.pretrain_s": 30.0},
                   tags={"keplm.variant": variant, "keplm.seed": str(seed)})
    _trial(client, exp, parent, "ablate", "broken-s0", {}, {"val_mlm_loss": 0.0}, status="FAILED",
           tags={"keplm.variant": "broken", "keplm.seed": "0"})
    client.set_terminated(parent, end_time=T0 + 3_723_000)
    res = compare(client, "abl", out, command="keplm ablate --model smedbert --config configs/sweep-demo.yaml "
                                              "--output runs/ablate ablate.seeds=2",
                  config_path="configs/sweep-demo.yaml", meta={"hardware": "1x H200", "dataset": "demo"})
    return res, out, parent


def test_ablation_table_mean_std_and_best_first(ablation):
    res, out, parent = ablation
    assert res["parent_run"] == parent and res["failed_left_out"] == 1 and res["knobs"] == []
    rows = {r["variant"]: r for r in res["rows"]}
    assert [r["variant"] for r in res["rows"]] == ["full", "mlm", "-type_att"]
    assert (rows["full"]["val_mlm_loss"].mean, rows["full"]["val_mlm_loss"].std) == pytest.approx((2.1, 0.141421356))
    assert rows["mlm"]["val_mlm_loss"].std is None and rows["mlm"]["val_mlm_loss"].n == 1
    md = (out / "comparison.md").read_text()
    assert md.splitlines()[0] == "| variant | n | objective (val_mlm_loss) ↓ | val_mlm_loss ↓ | proxy_f1 ↑ |"
    assert _row_line(md, "full") == "| full | 2 | **2.1000 ± 0.1414** | **2.1000 ± 0.1414** | **0.7900 ± 0.0141** |"
    assert _row_line(md, "mlm") == "| mlm | 1 | 2.5000 | 2.5000 | 0.7500 |"
    with open(out / "comparison.csv", newline="", encoding="utf-8") as f:
        rows_csv = list(csv.DictReader(f))
    assert rows_csv[0]["variant"] == "full" and rows_csv[0]["best_in"] == "objective;val_mlm_loss;proxy_f1"
    assert rows_csv[1]["val_mlm_loss_std"] == "" and rows_csv[2]["val_mlm_loss_std"] == "0.141421"


def test_ablation_report_carries_metadata_table_and_plot_links(ablation):
    res, out, parent = ablation
    report = out / "report.md"
    assert res["report"] == str(report)
    text = report.read_text()
    assert text.startswith("# ablate ablate-out\n")
    assert "- **command**: `keplm ablate --model smedbert --config configs/sweep-demo.yaml" in text
    assert "- **config**: `configs/sweep-demo.yaml`" in text
    assert f"- **git SHA**: `{SHA}`" in text
    assert "- **date**: 2023-11-14 22:13:20 UTC – 2023-11-14 23:15:23 UTC" in text
    wall = re.search(r"- \*\*wall time\*\*: (.*)", text).group(1)
    assert "ablate run 1h 02m 03s" in wall and "stages_smedbert: 1m 15s" in wall and "summed over 6 runs" in wall
    assert "pretrain 2m 30s summed over 5 trials" in wall
    assert "- **objective**: `val_mlm_loss`, lower is better (min, from the parent run's tune.mode)" in text
    assert "- **ablate.seeds**: `2`" in text and "- **hardware**: 1x H200" in text and "- **dataset**: demo" in text
    assert "- **runs**: 6 (1 FAILED, left out; 0 stopped early" in text
    assert "| full | 2 | **2.1000 ± 0.1414** |" in text            # the table
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links == ["dots_objective.png", "dots_val_mlm_loss.png", "dots_proxy_f1.png"]
    for link in links:
        assert (out / link).read_bytes().startswith(PNG)
    assert "[comparison.csv](comparison.csv)" in text and (out / "comparison.csv").is_file()


def test_the_job_passes_command_config_and_meta(client, tmp_path, capsys):
    from keplm.jobs.compare import main

    uri = client.tracking_uri
    rc = main(["--experiment", "abl", "--tracking-uri", uri, "--output", str(tmp_path),
               "--command", "keplm ablate --model smedbert", "--meta", "note=seed 2 rerun", "--meta", "gpu=none",
               "--meta", "git SHA=feedbeef (dirty)"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["rows"][0]["variant"] == "full" and res["rows"][0]["objective"]["std"] == pytest.approx(0.141421356)
    text = (tmp_path / "report.md").read_text()
    assert "- **command**: `keplm ablate --model smedbert`" in text
    assert "- **note**: seed 2 rerun" in text and "- **gpu**: none" in text
    assert "- **git SHA**: feedbeef (dirty)" in text and SHA not in text       # a meta entry replaces its namesake
    assert main(["--experiment", "abl", "--tracking-uri", uri, "--output", str(tmp_path), "--meta", "oops"]) == 2
