#!/usr/bin/env bash
# The long runs behind docs/results.md (hours each on a 2-core CPU), started or resumed in the
# background: every run is resumable and keeps its log (run.log) in its own run folder.
#
#   bash benchmarks/long_runs.sh trace   # lane 1: Gemma 3 270M averages over 200 known facts (docs/results.md#trace-average-gemma3)
#   bash benchmarks/long_runs.sh edits   # lane 2: the AlphaEdit sweep's last setting, then Gemma 500 MEMIT, AlphaEdit (docs/results.md#lifelong-runs)
#
# Each lane runs its commands one after another on THREADS threads (default 1); start each lane at most once
# (`pgrep -af factedit` shows what runs). A lane rerun after a kill goes on where the runs stopped.
# DRY_RUN=1 lists a lane's commands (with their run folders) instead of running them.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
export FACTEDIT_DATA_DIR=${FACTEDIT_DATA_DIR:-$(cd .. && pwd)/shared/data}
DATA=$FACTEDIT_DATA_DIR
C=$DATA/wiki/enwiki_sample.jsonl
D=$DATA/counterfact/counterfact_lite.json
R=docs/results

run() {  # run FOLDER COMMAND...: the command's output goes to FOLDER/run.log
  local folder=$1; shift
  if [ -n "${DRY_RUN:-}" ]; then echo "$folder: $*"; return 0; fi
  mkdir -p "$folder"
  echo "== $(date -u +%FT%TZ) $*" >> "$folder/run.log"
  "$@" >> "$folder/run.log" 2>&1
  local status=$?
  echo "== $(date -u +%FT%TZ) exit $status" >> "$folder/run.log"
}

case "${1:-}" in
  trace)
    run $R/avg-gemma3 $BIN/factedit trace-avg --threads ${THREADS:-1} --model gemma3-270m --facts "$DATA/known_1000.json" \
        --n 200 --kind all --out $R/avg-gemma3
    ;;
  edits)
    run $R/lifelong/sweep/layers-2-8-l2-0.1 $BIN/python benchmarks/alphaedit_sweep.py --model smollm2-135m \
        --threads 1 --n 200 --corpus "$C" --data "$D" --configs layers-2-8-l2-0.1 --out $R/lifelong/sweep
    for method in memit alphaedit; do
      run $R/lifelong/gemma3-$method-500 $BIN/factedit eval --threads 1 --corpus "$C" -m gemma3-270m \
          --method $method --dataset counterfact --data "$D" --n 500 --edits-per-batch 100 --sequential \
          -o $R/lifelong/gemma3-$method-500
    done
    ;;
  *)
    echo "usage: $0 trace|edits" >&2; exit 2 ;;
esac
