#!/usr/bin/env bash
# The paper-regime seed-2 spike (docs/proxy_paper_regime.md: d=256, batch 2048, lr 1e-3, eager
# MX; spike at step 7829) revisited from a saved state instead of 7829 steps per question:
# the MX run to step 7500 in stages of 2500 steps (each stage's state kept, so an interrupted run
# goes on from the last one), then, from the step-7500 state, three branches to step 8100: the
# study's placebo switch (block 0's linear weights to bf16, snapped), no switch (must spike at
# 7829 again, bit for bit), and the rule's norm=bf16 (snapped). Rerun to continue: finished
# stages and branches are skipped. Prints, per branch, the largest loss in steps 7500-8099.
#   benchmarks/paper_spike_branches.sh [DIR]     (default runs/paper_spike)
set -euo pipefail
dir=${1:-runs/paper_spike}
py=${PYTHON:-.venv/bin/python}
search=benchmarks/proxy_search.py
mkdir -p "$dir"
config=(--width 256 --batch-size 2048 --lr 1e-3 --scheme mxfp8_e4m3 --seed 2 --eager)
from=()
for step in 2500 5000 7500; do
  state=$dir/state_$step.pt
  if [ ! -f "$state" ]; then
    "$py" $search "${config[@]}" "${from[@]}" --threads 1 --steps $step --save-state $step \
      --state-file "$state.tmp" > "$dir/stage_$step.json"
    mv "$state.tmp" "$state"  # a killed stage leaves no state file that looks finished
  fi
  from=(--resume "$state")
done
branch() {  # name, extra arguments
  local name=$1; shift
  [ -f "$dir/$name.json" ] && return
  "$py" $search --resume "$dir/state_7500.pt" --threads 1 --steps 8100 \
    --save-losses "$dir/$name.losses.pt" "$@" > "$dir/$name.json.tmp"
  mv "$dir/$name.json.tmp" "$dir/$name.json"
}
branch placebo --switch-at 7500 --switch-to w=bf16,w_bp=bf16 \
  --switch-modules '*blocks.0.mlp.fc*' --snap
branch none
branch norm --switch-at 7500 --switch-to norm=bf16 --snap
"$py" - "$dir" <<'PY'
import sys, torch
for name in ("none", "norm", "placebo"):
    losses = torch.load(f"{sys.argv[1]}/{name}.losses.pt")[7500:]
    top = max(range(len(losses)), key=losses.__getitem__)
    print(f"{name}: largest loss in steps 7500-8099 {losses[top]:.4g} at step {7500 + top}; "
          f"loss at 8099 {losses[-1]:.4g}")
PY
