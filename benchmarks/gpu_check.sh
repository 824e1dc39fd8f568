#!/usr/bin/env bash
# The GPU check: what to run in the few minutes a GPU is lent (15 minutes of device time in all, the machine's
# start included; one command at most 10). Installs what it needs, then runs, in this order, each part under
# its own time cap and the whole under --budget seconds:
#
#   install   carried wheels (.whl/*.whl) into a private folder; PyPI only for what is still missing
#   mlm_step  plain BERT-base MLM step, bf16, seq 512, 64 rows, encoder layers compiled: tokens/s and MFU
#             (benchmarks/bench_pretrain.py --gpu-kinds mlm --gpu-modes compiled)
#   variants  what bounds that step, one change at a time (bench_pretrain.py --variants)
#   models    the knowledge models' step times against plain MLM (benchmarks/bench_models.py --skip-cpu)
#   ablation  the GPU ablation recipe (keplm ablate --config configs/ablation-gpu.yaml), if time is left:
#             it needs ray, mlflow, pykeen... and ../shared/data (or shared/data in the checkout)
#
# Each part prints one JSON line as it ends, {"gpu_check": PART, "status": ok|timeout|failed|skipped,
# "seconds", "cap_s", "dry_run", "result": the benchmark's own JSON line}, so a run cut off still reports
# the parts before; with $OUT set each line is also written to $OUT/gpu_check_PART.json, all output to
# $OUT/gpu_check.log and the ablation's report to $OUT/ablation_report.tar.gz. A last line
# {"gpu_check": "done", ...} sums up.
#
#   benchmarks/gpu_check.sh [--dry-run] [--budget SECONDS] [--parts mlm_step,variants,models,ablation]
#   benchmarks/gpu_check.sh --fetch-wheels     # here, with network: the wheels the device image lacks -> .whl/
#
# --dry-run (or GPU_CHECK_DRY_RUN=1): on CPU, tiny shapes, a few steps, the ablation shrunk to one variant of
# the demo; checks that every part runs (tests/test_gpu_check.py), its figures mean nothing.
# On the device tool (docs/benchmarks.md#gpu-check):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY_RUN:-0}
BUDGET=${GPU_CHECK_BUDGET:-540}          # the device tool's 600 s per command, less a margin to write the results
PARTS=mlm_step,variants,models,ablation
FETCH=0

while (($#)); do
  case $1 in
    --dry-run) DRY=1 ;;
    --budget) BUDGET=$2; shift ;;
    --parts) PARTS=$2; shift ;;
    --fetch-wheels) FETCH=1 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# What the device image lacks for mlm_step, variants and models (its Python is 3.12 with torch, transformers,
# safetensors, PyYAML and regex; docs/benchmarks.md#gpu-check): keplm's config tree needs pydantic, and a
# typing-extensions as new as pydantic's own.
WHEELS=(pydantic pydantic-core annotated-types typing-inspection typing-extensions)

if ((FETCH)); then
  # the versions installed here, as wheels for the device's CPython 3.12 on x86-64 Linux
  mkdir -p .whl
  specs=$("$PY" -c 'import importlib.metadata as m, sys; print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' \
          "${WHEELS[@]}") || exit 1
  # shellcheck disable=SC2086
  exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $specs
fi

# scratch (the ablation's runs, the wheels' install): GPU_CHECK_WORK, kept; else a temporary folder, removed at the end
WORK=${GPU_CHECK_WORK:-}
KEEP_WORK=${WORK:+1}
[[ -n $WORK ]] && mkdir -p "$WORK" || WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
SITE=$WORK/site
LOG=${OUT:+$OUT/gpu_check.log}
LOG=${LOG:-$WORK/gpu_check.log}
[[ -n ${OUT:-} ]] && mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
START=$EPOCHREALTIME
declare -A STATUS=()

elapsed() { "$PY" -c "import sys; print(round(float(sys.argv[1]) - float(sys.argv[2]), 1))" "$EPOCHREALTIME" "$1"; }
left() { "$PY" -c "import sys; print(int($BUDGET - (float(sys.argv[1]) - float(sys.argv[2]))))" "$EPOCHREALTIME" "$START"; }

# emit PART RC SECONDS CAP [REASON]: one JSON line from the part's stdout (its last JSON line) and stderr
emit() {
  local line
  line=$("$PY" - "$1" "$2" "$3" "$4" "$DRY" "$WORK/$1.stdout" "$WORK/$1.stderr" "${5:-}" <<'EOF'
import json, sys
part, rc, secs, cap, dry, out, err, reason = sys.argv[1:]
rc = int(rc)
result = None
try:
    lines = open(out, encoding="utf-8", errors="replace").read().splitlines()
except OSError:
    lines = []
for text in reversed(lines):
    if text.startswith("{"):
        try:
            result = json.loads(text)
            break
        except ValueError:
            pass
if reason:
    status = "skipped"
elif rc in (124, 137):
    status = "timeout"
elif rc == 0 and result is not None:
    status = "ok"
else:
    status = "failed"
line = {"gpu_check": part, "status": status, "seconds": float(secs), "cap_s": int(cap), "dry_run": dry == "1",
        "result": result}
if reason:
    line["reason"] = reason
if status in ("failed", "timeout"):
    line["rc"] = rc
    try:
        line["stderr_tail"] = open(err, encoding="utf-8", errors="replace").read()[-800:]
    except OSError:
        pass
print(json.dumps(line, ensure_ascii=False))
EOF
)
  echo "$line"
  STATUS[$1]=$("$PY" -c 'import json, sys; print(json.loads(sys.argv[1])["status"])' "$line")
  [[ -n ${OUT:-} ]] && echo "$line" >"$OUT/gpu_check_$1.json"
  { echo "== $1: $line"; cat "$WORK/$1.stdout" "$WORK/$1.stderr" 2>/dev/null; } >>"$LOG"
}

# part NAME CAP MIN command...: run under min(CAP, what the budget leaves); skipped when under MIN s are left
part() {
  local name=$1 cap=$2 min=$3 t0 rc remaining
  shift 3
  [[ ,$PARTS, == *,$name,* ]] || return 0
  remaining=$(left)
  if ((remaining < min)); then
    : >"$WORK/$name.stdout"
    emit "$name" 0 0 0 "${remaining}s of the ${BUDGET}s budget left, the part needs at least ${min}s"
    return 0
  fi
  ((cap > remaining)) && cap=$remaining
  t0=$EPOCHREALTIME
  timeout -k 10 "$cap" "$@" >"$WORK/$name.stdout" 2>"$WORK/$name.stderr"
  rc=$?
  emit "$name" "$rc" "$(elapsed "$t0")" "$cap"
}

install() {
  local t0=$EPOCHREALTIME
  {
    shopt -s nullglob
    local wheels=("$ROOT"/.whl/*.whl) missing
    if ((${#wheels[@]} && !DRY)); then   # a dry run uses this environment as it is
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
        && export PYTHONPATH="$PYTHONPATH:$SITE"
    fi
    missing=$("$PY" -c '
import importlib.util
need = {"torch": "torch", "pydantic": "pydantic", "yaml": "pyyaml", "transformers": "transformers",
        "safetensors": "safetensors", "regex": "regex"}
print(" ".join(p for m, p in need.items() if importlib.util.find_spec(m) is None))')
    if [[ -n $missing && $DRY == 0 ]]; then   # PyPI, where the machine reaches it: a few seconds, else fails fast
      # shellcheck disable=SC2086
      timeout 90 "$PY" -m pip install -q --retries 0 --timeout 5 --target "$SITE" $missing \
        && [[ $PYTHONPATH != *"$SITE"* ]] && export PYTHONPATH="$PYTHONPATH:$SITE"
    fi
    "$PY" - "${#wheels[@]}" "$missing" <<'EOF'
import importlib.util, json, platform, sys
info = {"python": platform.python_version(), "wheels_carried": int(sys.argv[1]),
        "missing_before_pypi": sys.argv[2].split()}
info["missing"] = [m for m in ("torch", "pydantic", "yaml", "transformers", "safetensors", "regex")
                   if importlib.util.find_spec(m) is None]
# what the ablation needs beyond that (keplm's own dependencies)
info["ablation_missing"] = [m for m in ("ray", "mlflow", "pykeen", "jieba", "ahocorasick_rs", "optuna", "pyarrow",
                                        "seqeval", "torchcrf", "rapidfuzz", "sklearn", "networkx", "pandas",
                                        "matplotlib") if importlib.util.find_spec(m) is None]
if "torch" not in info["missing"]:
    import torch
    info.update(torch=torch.__version__, cuda=torch.cuda.is_available(),
                device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
print(json.dumps(info))
EOF
  } >"$WORK/install.stdout" 2>"$WORK/install.stderr"
  emit install $? "$(elapsed "$t0")" 0
}

# the ablation's prerequisites: its dependencies importable and its data where the recipe reads it
ablation_ready() {
  local missing
  missing=$("$PY" -c '
import importlib.util
print(" ".join(m for m in ("ray", "mlflow", "pykeen", "jieba", "ahocorasick_rs", "optuna", "seqeval", "torchcrf",
                            "rapidfuzz") if importlib.util.find_spec(m) is None))')
  if [[ -n $missing ]]; then
    echo "missing Python packages: $missing (keplm's dependencies; install keplm on the machine or carry them)"
    return
  fi
  if ((!DRY)) && [[ ! -d ../shared/data/kg ]]; then
    if [[ -d shared/data/kg ]]; then
      ln -sfn "$ROOT/shared" ../shared 2>/dev/null || echo "shared/data is in the checkout but ../shared cannot be made"
    else
      echo "no ../shared/data (configs/ablation-gpu.yaml reads the real corpus and KG from there)"
    fi
  fi
}

ablation() {
  local why cap=$1 min=$2
  [[ ,$PARTS, == *,ablation,* ]] || return 0
  why=$(ablation_ready)
  if [[ -n $why ]]; then
    : >"$WORK/ablation.stdout"
    emit ablation 0 0 0 "$why"
    return 0
  fi
  local report=$WORK/ablation/report
  if ((DRY)); then   # the launch path on the demo: one variant, one seed, 2 steps, one evaluation task
    part ablation "$cap" "$min" "$PY" -m keplm.jobs.ablate --model smedbert --config configs/sweep-demo.yaml \
      --output "$WORK/ablation" "ablate.variants=[mlm]" ablate.seeds=1 train.max_steps=2 train.checkpoint_every=2 \
      "evaluate.tasks={sim: {kind: similarity, kg: 'keplm://data/demo/kg', max_queries: 20}}" "ablate.evaluate=[sim]" \
      "ablate.report_dir=$report" "ablate.report_metrics=[sim.acc_at_1, val_mlm_loss]"
  else
    part ablation "$cap" "$min" "$PY" -m keplm.jobs.ablate --model smedbert --config configs/ablation-gpu.yaml \
      --output "$WORK/ablation" "ablate.report_dir=$report"
  fi
  if [[ -n ${OUT:-} && -d $report ]]; then
    tar -C "$WORK/ablation" -czf "$OUT/ablation_report.tar.gz" report
  fi
}

install
if ((!DRY)) && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  echo "gpu_check.sh: no CUDA device (or no torch) here; --dry-run checks the parts on CPU" >&2
  exit 1
fi
if ((DRY)); then
  # parts: name, cap s, least s left to start it; tiny shapes on CPU
  part mlm_step 240 10 "$PY" benchmarks/bench_pretrain.py --skip-cpu --dry-run --gpu-kinds mlm --gpu-modes compiled --steps 2
  part variants 240 10 "$PY" benchmarks/bench_pretrain.py --skip-cpu --skip-gpu-figures --variants --steps 2
  # bench_models' own CLI has no tiny-only CPU run (it always adds BERT-base on CPU): its run() at the tiny shape
  part models 240 10 "$PY" -c '
import json, sys, torch
sys.path.insert(0, "benchmarks")
import bench_models
r = bench_models.run("tiny", 2, 64, torch.device("cpu"), torch.float32, 1, 0)
print(json.dumps({"bench": "models", "dry_run": True, "runs": [r]}))'
  ablation 300 10
else
  part mlm_step 150 40 "$PY" benchmarks/bench_pretrain.py --skip-cpu --gpu-kinds mlm --gpu-modes compiled --steps 20 --gpu-batch 64
  part variants 180 40 "$PY" benchmarks/bench_pretrain.py --skip-cpu --skip-gpu-figures --variants --steps 10 --gpu-batch 64
  part models 240 60 "$PY" benchmarks/bench_models.py --skip-cpu
  ablation 600 120
fi

summary=$("$PY" -c '
import json, sys
parts = dict(a.split("=", 1) for a in sys.argv[2:])
print(json.dumps({"gpu_check": "done", "seconds": float(sys.argv[1]), "parts": parts}))' \
  "$(elapsed "$START")" $(for k in "${!STATUS[@]}"; do echo "$k=${STATUS[$k]}"; done))
echo "$summary"
[[ -n ${OUT:-} ]] && echo "$summary" >>"$OUT/gpu_check.log"
[[ -n $KEEP_WORK ]] || rm -rf "$WORK"
exit 0
