"""What a user sees: the demo's console (stage lines, training progress, the closing summary, nothing from Ray or
the libraries, no colour codes), its log file, ``-v``; the line formats of the console and of a sweep's trial
events."""

import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

STAGES = ("prepare", "graph", "neighbours", "embed-transr", "train")


@pytest.fixture(scope="module")
def demo(demo_run):
    """The session's demo pretraining (conftest: 12 steps, a progress line every 4) -> (output, console lines)."""
    out, r = demo_run
    lines = r.stdout.splitlines()
    assert r.returncode == 0, "\n".join(lines[-40:])
    return out, lines


@pytest.mark.slow
def test_the_demo_console_is_keplm_s_own_lines(demo):
    out, lines = demo
    text = "\n".join(lines)
    assert len(lines) <= 40, text
    assert "\x1b[" not in text                                         # no colour codes into a pipe
    assert "(RayTrainWorker pid=" not in text and "(pid=" not in text   # no Ray worker lines
    assert not [line for line in lines if re.search(r"Warning|WARNING", line)], text   # no library warnings
    for stage in STAGES:   # one line when each stage starts, one when it ends
        starts = [line for line in lines if line.endswith(f"running stage {stage}") or f"running stage {stage}:" in line]
        assert len(starts) == 1, stage
        assert sum(f"stage {stage} done in " in line for line in lines) == 1, stage
    ends = {s: next(line for line in lines if f"stage {s} done in " in line) for s in STAGES}
    assert "documents" in ends["prepare"] and "entities" in ends["graph"] and "12 steps, loss " in ends["train"]
    progress = [line for line in lines if "train: step " in line]
    assert [re.search(r"step (\d+)/12", line).group(1) for line in progress] == ["4", "8", "12"]
    assert all(", loss " in line and " tokens/s, ETA " in line for line in progress)
    assert lines.index(progress[-1]) < lines.index(ends["train"])     # the last progress line came before the end
    # the closing summary: paths that exist, the MLflow run, the command to look at it; the JSON result last
    result = json.loads(lines[-1])
    summary = dict(re.match(r"  (\S+(?: \S+)*?)\s{2,}(.*)$", line).groups() for line in lines if line.startswith("  "))
    assert Path(summary["model"]) == out / "model" and (out / "model" / "config.json").is_file()
    assert summary["MLflow run"].startswith(result["mlflow_run_id"])
    assert summary["look at it"] == f"mlflow ui --backend-store-uri sqlite:///{(out / 'mlflow.db').resolve()}"
    assert (out / "mlflow.db").is_file()
    log_file = out / "logs" / "keplm.log"
    assert Path(summary["log file"]) == log_file and log_file.is_file()
    # what left the console is in the log file: Ray's lines, the workers' lines, the libraries'
    log = log_file.read_text(encoding="utf-8")
    assert "(RayTrainWorker pid=" in log and "Started a local Ray instance" in log and "\x1b[" not in log
    # warnings fixed at their source: read-only arrays into torch, PyKEEN's CPU batch size, Ray's exclude_resources
    for fixed in ("NumPy array is not writable", "Using automatic batch size", "exclude_resources"):
        assert fixed not in log, fixed


def test_trial_event_lines():
    from keplm.tuning.events import best_table, trial_line

    assert trial_line("started", "a1_00001", config={"K": 10, "lr": 0.000312, "model.kind": "smedbert"}) == \
        "trial a1_00001 started: K=10 lr=0.000312 model.kind=smedbert"
    assert trial_line("resumed", "a1_00001", config={"K": 10}, step=9) == "trial a1_00001 resumed at step 9: K=10"
    assert trial_line("reported", "a1_00001", step=3, metric="val_mlm_loss", value=7.123456) == \
        "trial a1_00001 step 3: val_mlm_loss 7.1235"
    assert trial_line("stopped early", "a1_00001", step=9, metric="val_mlm_loss", value=7.1) == \
        "trial a1_00001 stopped early at step 9: val_mlm_loss 7.1000"
    assert trial_line("finished", "a1_00002", step=24, metric="val_mlm_loss", value=6.5) == \
        "trial a1_00002 finished at step 24: val_mlm_loss 6.5000"
    assert trial_line("failed", "a1_00003", step=3, error="ValueError: x") == \
        "trial a1_00003 failed at step 3: ValueError: x"
    trials = [{"trial_id": "a1_00001", "steps": 9, "val_mlm_loss": 7.1, "config": {"K": 10}, "error": None},
              {"trial_id": "a1_00002", "steps": 24, "val_mlm_loss": 6.5, "config": {"K": 5}, "error": None},
              {"trial_id": "a1_00003", "steps": 3, "val_mlm_loss": None, "config": {"K": 20}, "error": "boom"}]
    assert best_table(trials, "val_mlm_loss", "min") == [
        "best 2 of 3 trials by val_mlm_loss (lowest first):",
        "  trial     steps  val_mlm_loss  config",
        "  a1_00002  24     6.5000        K=5",
        "  a1_00001  9      7.1000        K=10"]
    assert best_table(trials, "val_mlm_loss", "max")[2].startswith("  a1_00001")


def test_the_trial_events_callback_logs_one_line_per_event(caplog):
    from keplm.tuning.events import TrialEvents

    cb = TrialEvents("val_mlm_loss", max_steps=24, can_stop_early=True)
    trial = SimpleNamespace(trial_id="t_00000", config={"K": 5}, last_result={},
                            get_error=lambda: ValueError("bad\nno rows"))
    with caplog.at_level(logging.INFO, logger="keplm"):
        cb.on_trial_start(0, [], trial)
        cb.on_trial_result(0, [], trial, {"step": 3, "val_mlm_loss": 7.25})
        cb.on_trial_result(0, [], trial, {"step": 9, "val_mlm_loss": 7.0, "done": True})   # the end line says it
        trial.last_result = {"step": 9, "val_mlm_loss": 7.0}
        cb.on_trial_complete(0, [], trial)
        cb.on_trial_start(0, [], trial)                                                    # SHA resumes it
        trial.last_result = {"step": 24, "val_mlm_loss": 6.0, "final": True}
        cb.on_trial_complete(0, [], trial)
        cb.on_trial_error(0, [], trial)
    assert [r.getMessage() for r in caplog.records] == [
        "trial t_00000 started: K=5", "trial t_00000 step 3: val_mlm_loss 7.2500",
        "trial t_00000 stopped early at step 9: val_mlm_loss 7.0000", "trial t_00000 resumed at step 9: K=5",
        "trial t_00000 finished at step 24: val_mlm_loss 6.0000", "trial t_00000 failed at step 24: no rows"]
    assert [r.levelname for r in caplog.records][-1] == "WARNING"


def test_a_session_shows_keplm_s_lines_and_logs_everything(tmp_path, capsys):
    from keplm.platform import console

    with console.Session("pretrain", tmp_path, verbose=False) as session:
        with console.stage("graph") as st:
            logging.getLogger("somelib").warning("a library warning")
            st["counts"] = "3 entities"
        console.worker_lines({"pid": 7, "actor_name": "RayTrainWorker", "ip": "h", "localhost": "h", "lines": [
            "[keplm] INFO keplm.platform.train_loop: train: step 2/6, loss 1.0000, 10 tokens/s, ETA 2 s",
            "Moving model to device: cpu"]})
        console.add_summary("model", "M")
        console.result('{"job": "pretrain"}')
        session.finish()
    err = capsys.readouterr().err.splitlines()
    assert [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in err[1:5]] == [
        "running stage graph", "stage graph done in 0.0 s: 3 entities",
        "train: step 2/6, loss 1.0000, 10 tokens/s, ETA 2 s", "keplm pretrain: done in 0.0 s"]
    assert err[5:] == ["  model     M", f"  log file  {tmp_path / 'logs' / 'keplm.log'}"]
    assert session.result_line == '{"job": "pretrain"}'
    log = (tmp_path / "logs" / "keplm.log").read_text()
    assert "WARNING somelib: a library warning" in log and "(RayTrainWorker pid=7) Moving model to device" in log
    assert "INFO keplm.platform.train_loop: train: step 2/6" in log
