#!/usr/bin/env bash
# The process-value model's evaluation, one command (docs/model.md,
# "Scenario runs"): the simulated pump (e2e/src/pump.rs) with the agent
# capturing its tags from the wire, through the real agent end to end
# (capture -> windows -> model -> alarm). Needs root (the agent's probes).
#
#   scripts/pump-evaluation.sh OUT                  record normal operation, train, evaluate, report
#   scripts/pump-evaluation.sh --model DIR OUT      evaluate the model in DIR (e.g. model/pump) only
#
# Steps, each a command of its own:
#   1. scenarios pump-record (two seeds, NORMAL_MINUTES each: the pump's
#      normal operation, its drift, the HMI's speed changes)
#   2. model/run.sh train (value features only) -> OUT/model
#   3. scenarios pump-evaluate: ROUNDS rounds of all six process faults,
#      then EVAL_NORMAL_MINUTES of normal operation -> OUT/eval/report.md
#   4. model/run.sh report: plots and operating points -> OUT/eval/
#   5. model/run.sh compare: models over a history of windows -> OUT/eval/history.md
# Windows of 5 s, the HMI polling at 10 Hz. Takes about 3 h with the
# defaults (NORMAL_MINUTES=40 ROUNDS=2 EVAL_NORMAL_MINUTES=20), 1 h 40 min
# with --model (two rounds of faults take 78 min: the process recovers
# from bearing wear and cavitation for about 10 min each).
set -euo pipefail
cd "$(dirname "$0")/.."

model=""
if [[ "${1:-}" == "--model" ]]; then model="$(realpath "${2:?--model needs a directory}")"; shift 2; fi
out="${1:?usage: scripts/pump-evaluation.sh [--model DIR] OUT}"
mkdir -p "$out"
out="$(realpath "$out")"
normal_minutes="${NORMAL_MINUTES:-40}"
rounds="${ROUNDS:-2}"
eval_normal="${EVAL_NORMAL_MINUTES:-20}"
window_ms=5000

say() { printf '\033[1m[pump-evaluation]\033[0m %s\n' "$*" >&2; }

scripts/setup.sh
say "building release binaries"
cargo build --release --bins --locked >&2
run=target/release/scenarios

normals=()
if [[ -z "$model" ]]; then
  for seed in 1 2; do
    say "recording normal operation, seed $seed, $normal_minutes min"
    "$run" pump-record --minutes "$normal_minutes" --window-ms "$window_ms" --seed "$seed" --out "$out/normal-$seed"
    normals+=("$out/normal-$seed/features.csv")
  done
  say "training"
  model/run.sh train --out "$out/model" --normal "${normals[@]}" --include '^value_' --name pump \
    --about "scenarios pump-record, seeds 1 and 2, $normal_minutes min each, ${window_ms} ms windows, HMI at 10 Hz"
  model="$out/model"
fi
say "evaluating $model through the agent"
"$run" pump-evaluate --model "$model/anomaly.card.json" --out "$out/eval" --rounds "$rounds" \
  --fault-windows 24 --gap-windows 12 --normal-minutes "$eval_normal" --window-ms "$window_ms" --seed 11
model/run.sh report --model "$model/anomaly.card.json" --run "$out/eval"
if [[ ${#normals[@]} -gt 0 ]]; then
  model/run.sh compare --model "$model" --normal "${normals[@]}" --run "$out/eval" --out "$out/eval/history.md"
fi
say "report: $out/eval/report.md, plots and operating points beside it"
