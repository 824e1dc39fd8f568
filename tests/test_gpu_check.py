"""benchmarks/gpu_check.sh: the GPU check's dry run on CPU prints each part's JSON line, in order, with its keys."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def gpu_check(tmp_path, *args, timeout=600):
    env = dict(os.environ, OUT=str(tmp_path / "out"), GPU_CHECK_WORK=str(tmp_path / "work"), PYTHON=sys.executable)
    r = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=timeout)
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    return r, lines


def test_budget_skips_parts_and_every_line_is_json(tmp_path):
    r, lines = gpu_check(tmp_path, "--dry-run", "--parts", "models", "--budget", "0", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [x["gpu_check"] for x in lines] == ["install", "models", "done"]
    install, models, done = lines
    assert install["status"] == "ok" and install["result"]["missing"] == [] and "torch" in install["result"]
    assert models["status"] == "skipped" and "budget" in models["reason"] and models["result"] is None
    assert done["parts"] == {"install": "ok", "models": "skipped"}
    # each line also lands under $OUT
    assert json.loads((tmp_path / "out" / "gpu_check_models.json").read_text()) == models
    r = subprocess.run(["bash", str(SCRIPT), "--no-such-flag"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown argument" in r.stderr


@pytest.mark.slow
def test_dry_run_runs_every_part_and_reports_its_keys(tmp_path):
    """About 3 minutes on 2 cores: the compiled step and the variants (torch.compile on CPU), the knowledge
    models at the tiny shape, and a one-trial ablation of the demo through keplm ablate."""
    r, lines = gpu_check(tmp_path, "--dry-run")
    assert r.returncode == 0, r.stderr[-2000:]
    by = {x["gpu_check"]: x for x in lines}
    assert [x["gpu_check"] for x in lines] == ["install", "mlm_step", "variants", "models", "ablation", "done"]
    for name in ("install", "mlm_step", "variants", "models", "ablation"):
        line = by[name]
        assert line["status"] == "ok", line
        assert line["dry_run"] is True and line["seconds"] >= 0 and isinstance(line["result"], dict)
        assert json.loads((tmp_path / "out" / f"gpu_check_{name}.json").read_text()) == line
    step = by["mlm_step"]["result"]
    assert step["gpu_best"] == "compiled" and step["gpu_mlm_tokens_per_s"] > 0 and 0 < step["gpu_mlm_mfu"]
    variants = by["variants"]["result"]
    for tag in ("eager_synced", "eager_queued", "eager_no_dropout", "compiled_default_queued"):
        assert variants[f"variant_{tag}_tokens_per_s"] > 0 and f"variant_{tag}_mfu" in variants
    run = by["models"]["result"]["runs"][0]
    for name in ("smedbert", "kebiolm", "embert", "smedbert_embert"):
        assert run[f"{name}_vs_bert_mlm"] > 0
    ablation = by["ablation"]["result"]
    assert ablation["job"] == "ablate" and ablation["trials"] == 1 and ablation["failed"] == 0
    assert by["done"]["parts"] == {n: "ok" for n in ("install", "mlm_step", "variants", "models", "ablation")}
    assert (tmp_path / "out" / "ablation_report.tar.gz").stat().st_size > 0
    assert "== models:" in (tmp_path / "out" / "gpu_check.log").read_text()
