#!/usr/bin/env bash
# Every GPU check in one script, for a session that is lent a CUDA machine (DESIGN.md §8).
# Installs nothing: it uses the machine's own python with torch + triton, and this checkout on
# PYTHONPATH. Results go to $OUT (default ./gpu_out); the whole script stays under ~8 minutes.
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }

log "machine: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null) $(date -u)"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$OUT/summary.txt"

log "1. Triton on CUDA == torch path, bit for bit (tests/test_triton.py, no interpreter)"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_triton.py 2>&1 | tail -n 5 | tee -a "$OUT/summary.txt"

log "2. bf16->bf16 and fp32 throughput at 16384x16384 vs device copy bandwidth"
timeout 120 $PY -m mxprobe.app.cli bench --size 16384 --reps 10 2>&1 | tee "$OUT/quant_bench.txt" | tee -a "$OUT/summary.txt"

log "3. training step overhead: MX emulation vs bf16 / fp32"
timeout 120 $PY benchmarks/train_overhead.py --steps 20 2>&1 | tee "$OUT/train_overhead.txt" | tail -n 12 | tee -a "$OUT/summary.txt"

log "4. paper-scale proxy (L=4, d=512, batch 2048, lr 6e-4, 9000 steps): fp32 vs mxfp8_e4m3"
timeout 200 $PY -m mxprobe.app.cli proxy compare --config examples/configs/proxy_paper.yaml \
  --schemes fp32,mxfp8_e4m3 --seeds 0 --out "$OUT/proxy_paper" \
  --set trainer.accelerator=gpu --set trainer.devices=1 2>&1 | tail -n 20 | tee -a "$OUT/summary.txt"
cat "$OUT/proxy_paper/summary.csv" 2>/dev/null | tee -a "$OUT/summary.txt"
log "done $(date -u)"
