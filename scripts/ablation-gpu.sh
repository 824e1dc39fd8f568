#!/usr/bin/env bash
# The GPU ablation (configs/ablation-gpu.yaml): SMedBERT Table 4 + baselines + the not-pretrained backbone on the
# real corpus and KG, one seed, on one GPU in about 10 minutes; the report lands in docs/results/ablation-gpu/.
# Run from the repository root with keplm installed and ../shared/data beside it:
#   bash scripts/ablation-gpu.sh [OUTPUT_DIR] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/ablation-gpu}
shift || true
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no nvidia-smi: is a GPU present?" >&2
exec keplm ablate --model smedbert --config configs/ablation-gpu.yaml --output "$out" "$@"
