"""`keplm evaluate` / `finetune` / `augment` as jobs: Ray tasks over tasks x seeds, MLflow runs nested
under the pretraining run, mean ± std summaries, failures recorded with one line."""

import json

import numpy as np
import pytest
import yaml

from conftest import DEMO
from test_downstream import make_tiny_bert, toy_set

from keplm.jobs import augment, evaluate, finetune
from keplm.models.downstream.augment import write_conll


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A directory shaped like a `keplm pretrain` output: model/, manifest.json, an MLflow run in sqlite."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("pretrain_out")
    chars = sorted({c for s in toy_set().sentences for c in s} | set("的了是在有和人这中大为上个我以要"))
    kg_chars = (DEMO / "kg" / "entities.tsv").read_text(encoding="utf-8") + (DEMO / "kg" / "aliases.tsv").read_text(encoding="utf-8")
    make_tiny_bert(root / "model", chars + sorted(set(kg_chars)))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("pretrain-exp")
    run_id = client.create_run(exp, run_name="pretrain-mlm").info.run_id
    (root / "manifest.json").write_text(json.dumps({"job": "pretrain", "counts": {"mlflow_run_id": run_id,
                                                                               "tracking_uri": uri}}))
    data = root / "data"
    write_conll(toy_set(3), data / "train.txt")
    write_conll(toy_set(), data / "dev.txt")
    (data / "bad.txt").write_text("这行没有标签\n也没有\n", encoding="utf-8")
    return {"root": root, "uri": uri, "run_id": run_id, "data": data}


def _config(tmp_path, data, tasks):
    cfg = {"ray": {"num_cpus": 2}, "evaluate": {"seeds": 2, "cpus_per_run": 0.9, "tasks": tasks},
           "finetune": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "max_seq_len": 64}}
    p = tmp_path / "eval.yaml"
    p.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return p


@pytest.mark.slow
def test_evaluate_runs_tasks_x_seeds_nested_under_the_pretraining_run(ray_local, pretrained, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    data = pretrained["data"]
    cfg = _config(tmp_path, data, {
        "toy_ner": {"kind": "ner", "train": str(data / "train.txt"), "dev": str(data / "dev.txt"),
                    "test": str(data / "dev.txt"),
                    "finetune": {"head": "fc", "epochs": 4, "lr": 5e-3, "head_lr": 5e-2}},
        "synonyms": {"kind": "similarity", "kg": str(DEMO / "kg"), "max_queries": 20}})
    out = tmp_path / "eval"
    rc = evaluate.main(["--checkpoint", str(pretrained["root"] / "model"), "--config", str(cfg), "--output", str(out)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert sorted((r["task_name"], r["seed"]) for r in results) == [("synonyms", 0), ("synonyms", 1),
                                                                  ("toy_ner", 0), ("toy_ner", 1)]
    f1 = [r["test_f1"] for r in results if r["task_name"] == "toy_ner"]
    assert summary["toy_ner"]["test_f1_mean"] == pytest.approx(np.mean(f1))
    assert summary["toy_ner"]["test_f1_std"] == pytest.approx(np.std(f1, ddof=1))
    assert min(f1) > 0
    assert summary["toy_ner"]["runs"] == 2 and "acc_at_1_mean" in summary["synonyms"]

    client = MlflowClient(pretrained["uri"])
    parent = client.get_run(pretrained["run_id"])
    runs = client.search_runs([parent.info.experiment_id], "tags.`keplm.job` = 'evaluate'")
    assert len(runs) == 4
    assert all(r.data.tags["mlflow.parentRunId"] == pretrained["run_id"] for r in runs)
    by_id = {r.info.run_id: r for r in runs}
    for res in results:
        run = by_id[res["mlflow_run_id"]]
        assert run.info.status == "FINISHED" and run.data.tags["keplm.task"] == res["task_name"]
        key = "test_f1" if res["task_name"] == "toy_ner" else "acc_at_1"
        assert run.data.metrics[key] == pytest.approx(res[key])
    ner_run = by_id[next(r["mlflow_run_id"] for r in results if r["task_name"] == "toy_ner")]
    assert ner_run.data.params["finetune.head"] == "fc"            # the per-task override reached the run
    history = client.get_metric_history(ner_run.info.run_id, "dev_score")
    assert [m.step for m in history] == [3, 6, 9, 12]              # 12 sentences / batch 4 = 3 steps per epoch


@pytest.mark.slow
def test_a_failing_task_is_recorded_and_the_job_fails_with_one_line(ray_local, pretrained, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    data = pretrained["data"]
    cfg = _config(tmp_path, data, {"broken": {"kind": "ner", "train": str(data / "train.txt"), "dev": str(data / "bad.txt")}})
    out = tmp_path / "eval"
    rc = evaluate.main(["--checkpoint", str(pretrained["root"] / "model"), "--config", str(cfg), "--output", str(out),
                        "--seeds", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("keplm evaluate: error: 1 of 1 evaluation runs failed")
    assert "no usable examples" in err[-1] and "Traceback" not in "\n".join(err)
    run_id = json.loads((out / "results.json").read_text())[0]["mlflow_run_id"]
    assert MlflowClient(pretrained["uri"]).get_run(run_id).info.status == "FAILED"


def test_summary_is_mean_and_sample_std_over_successful_seeds():
    results = [{"task_name": "a", "ok": True, "test_f1": 0.5, "dev_f1": 0.4},
               {"task_name": "a", "ok": True, "test_f1": 0.7, "dev_f1": 0.6},
               {"task_name": "a", "ok": True, "test_f1": 0.9, "dev_f1": 0.5},
               {"task_name": "a", "ok": False, "error": "x"},
               {"task_name": "b", "ok": True, "acc_at_1": 0.25}]
    s = evaluate.summarise(results)
    assert s["a"]["runs"] == 3 and s["a"]["test_f1_mean"] == pytest.approx(0.7)
    assert s["a"]["test_f1_std"] == pytest.approx(0.2)              # sample std of 0.5, 0.7, 0.9
    assert s["a"]["dev_f1_std"] == pytest.approx(0.1)
    assert s["b"] == {"runs": 1, "acc_at_1_mean": 0.25, "acc_at_1_std": 0.0}


def test_evaluate_without_tasks_or_with_unknown_task_is_one_line(pretrained, tmp_path, capsys):
    rc = evaluate.main(["--checkpoint", str(pretrained["root"] / "model"), "--output", str(tmp_path / "e")])
    assert rc == 2 and "no evaluation tasks" in capsys.readouterr().err
    cfg = _config(tmp_path, pretrained["data"], {"a": {"kind": "similarity", "kg": str(DEMO / "kg")}})
    rc = evaluate.main(["--checkpoint", str(pretrained["root"] / "model"), "--config", str(cfg),
                        "--output", str(tmp_path / "e"), "--tasks", "a,b"])
    assert rc == 2 and "unknown task(s) ['b']" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("evaluate:\n  tasks:\n    x: {kind: ner, train: a.txt}\n")
    rc = evaluate.main(["--checkpoint", str(pretrained["root"] / "model"), "--config", str(bad), "--output", str(tmp_path / "e")])
    assert rc == 2 and "needs dev" in capsys.readouterr().err


@pytest.mark.slow
def test_augment_then_finetune_on_the_augmented_set(ray_local, pretrained, tmp_path, capsys):
    data = pretrained["data"]
    aug_dir = tmp_path / "aug"
    assert augment.main(["--checkpoint", str(pretrained["root"] / "model"), "--data", str(data / "train.txt"),
                         "--output", str(aug_dir), "--rate", "0.2"]) == 0
    manifest = json.loads((aug_dir / "manifest.json").read_text())
    assert manifest["counts"]["augment_original"] == 12 and manifest["counts"]["augment_generated"] == 12
    capsys.readouterr()
    out = tmp_path / "ft"
    rc = finetune.main(["--checkpoint", str(pretrained["root"] / "model"), "--train", str(data / "train.txt"),
                        "--augmented-train", str(aug_dir / "train.txt"), "--dev", str(data / "dev.txt"),
                        "--output", str(out), "--seeds", "1", "--head", "bilstm-crf", "--mode", "feature",
                        "finetune.epochs=1", "finetune.batch_size=8", "ray.num_cpus=2"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())[0]
    assert res["train_sentences"] == 24                            # original 12 + generated 12
    assert res["steps"] == 3
