#!/usr/bin/env bash
# The whole paper for one model: tables 1-4 as four multiruns, then the report.
#   bash sweeps/paper.sh qwen0.5            (any model config: gemma2, qwen1.5, qwen3, smollm2, ...)
#   bash sweeps/paper.sh gemma2 tracker=none hydra/launcher=slurm   (extra overrides go to every run)
set -euo pipefail
MODEL=${1:-qwen0.5}
shift || true
OUT=${LAC_PAPER_OUT:-outputs/paper/$MODEL}
for t in 1 2 3 4; do
  python -m lac.run -m +sweep=paper_table$t model="$MODEL" hydra.sweep.dir="$OUT/table$t" "$@"
done
python -m lac.report "$OUT" --out "$OUT/report"
