"""The train loop in this process (LocalSession, run_in_process): its checkpoint store, exact resume, and the
same training as a 1-worker Ray Train run."""

from pathlib import Path

import pytest
import torch

from keplm.platform.train_session import LocalSession

from conftest import DEMO_TINY, REPO


def _checkpoint_dir(tmp_path: Path, text: str) -> Path:
    d = tmp_path / f"src-{text}"
    (d / "model").mkdir(parents=True)
    (d / "state.pt").write_text(text)
    return d


def test_local_checkpoints_are_numbered_kept_to_the_newest_and_reported_after_they_are_stored(tmp_path):
    seen = []
    session = LocalSession(tmp_path / "store", keep=2, on_report=lambda m: seen.append(
        (m["step"], [p.name for p in session.checkpoints()])))
    with session.resume_checkpoint() as d:
        assert d is None                                       # nothing stored yet: a fresh start
    for step in (1, 2, 3):
        session.report({"step": step}, _checkpoint_dir(tmp_path, str(step)))
    session.report({"step": 4}, None)                          # metrics only: no new checkpoint
    assert [p.name for p in session.checkpoints()] == ["checkpoint_000001", "checkpoint_000002"]
    # each report reached on_report once its checkpoint was stored, whole
    assert seen == [(1, ["checkpoint_000000"]), (2, ["checkpoint_000000", "checkpoint_000001"]),
                    (3, ["checkpoint_000001", "checkpoint_000002"]), (4, ["checkpoint_000001", "checkpoint_000002"])]
    assert session.last_metrics == {"step": 4}
    # a copy cut off mid-write (no final name) is neither resumed from nor counted
    (tmp_path / "store" / ".checkpoint_000003.partial").mkdir()
    again = LocalSession(tmp_path / "store", keep=2)
    with again.resume_checkpoint() as d:
        assert d.name == "checkpoint_000002" and (d / "state.pt").read_text() == "3"
    again.report({"step": 5}, _checkpoint_dir(tmp_path, "5"))
    assert [p.name for p in again.checkpoints()] == ["checkpoint_000002", "checkpoint_000003"]
    assert (again.checkpoints()[-1] / "state.pt").read_text() == "5"


@pytest.fixture(scope="module")
def one_worker(ray_local, demo_prepared, demo_stages):
    """The demo's SMedBERT with one worker on the session's demo stages: (config, training inputs)."""
    from keplm import config
    from keplm.models.pipeline import training_inputs

    def make(out: Path, *overrides: str):
        cfg = config.load(REPO / "configs" / "demo.yaml", [*DEMO_TINY, "train.max_steps=8", "train.num_workers=1",
                                                           "train.val_rows=32", *overrides])
        stages = {"prepare": demo_prepared, "neighbours": demo_stages / "nb", "embed": demo_stages / "transr"}
        return cfg, training_inputs(cfg, stages, out)

    return make


def _in_process(make, out: Path, *overrides: str):
    from keplm.models.setup import build_for_worker
    from keplm.platform.train_loop import run_in_process

    cfg, inputs = make(out, *overrides)
    reports: list[dict] = []
    result = run_in_process(cfg.train, inputs["files"], build_for_worker, inputs["context"], out, None, None,
                            cfg.batches.max_seq_len, inputs["val_files"], on_report=reports.append)
    return result, reports


def _losses(reports):
    return [(r["step"], round(r["loss"], 6), round(r["val_mlm_loss"], 6)) for r in reports]


def test_in_process_training_stopped_and_resumed_reports_what_the_uninterrupted_run_did(one_worker, tmp_path):
    full, reports = _in_process(one_worker, tmp_path / "full")
    assert [r["step"] for r in reports] == [4, 8] and reports[-1]["final"] and full.metrics == reports[-1]
    part, first = _in_process(one_worker, tmp_path / "cut", "train.stop_after_steps=4")
    assert [r["step"] for r in first] == [4] and not part.metrics["final"]
    resumed, rest = _in_process(one_worker, tmp_path / "cut")       # the same storage: resumes at step 4
    assert _losses(first + rest) == _losses(reports)
    for k, v in full.metrics.items():
        if k.startswith("data."):   # the collator's counts went on from the checkpoint's
            assert resumed.metrics[k] == v, k
    # a start with nothing left to train reports nothing and returns what the last checkpoint stored
    again, none = _in_process(one_worker, tmp_path / "full")
    assert none == [] and again.metrics == full.metrics
    with full.checkpoint.as_directory() as a, resumed.checkpoint.as_directory() as b:
        assert (Path(a) / "model" / "model.safetensors").read_bytes() == (Path(b) / "model" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_in_process_training_is_the_one_worker_ray_train_run(one_worker, tmp_path):
    from keplm.models.setup import build_for_worker
    from keplm.platform.train_loop import run_training

    local, reports = _in_process(one_worker, tmp_path / "local")
    cfg, inputs = one_worker(tmp_path / "ray")
    result = run_training(cfg.train, inputs["files"], build_for_worker, inputs["context"], tmp_path / "ray", None, None,
                          cfg.batches.max_seq_len, inputs["val_files"], name="one")
    assert result.error is None and result.metrics["step"] == 8
    for k in ("loss", "mlm_loss", "val_mlm_loss"):
        assert result.metrics[k] == pytest.approx(local.metrics[k], rel=1e-6), k
    # the same weights, up to float summation order (this process and the Ray worker run other thread counts,
    # and Adam's step turns a gradient near 0 of either sign into a step of about lr)
    from safetensors.torch import load_file

    with local.checkpoint.as_directory() as a, result.checkpoint.as_directory() as b:
        mine, theirs = (load_file(str(Path(d) / "model" / "model.safetensors")) for d in (a, b))
    assert mine.keys() == theirs.keys()
    diff = torch.cat([(mine[k] - theirs[k]).flatten() for k in mine]).norm()
    assert diff <= 1e-4 * torch.cat([mine[k].flatten() for k in mine]).norm()
