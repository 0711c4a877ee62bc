#!/usr/bin/env bash
# Every GPU check in one script, for a session that is lent a CUDA machine.
# Installs nothing: it uses the machine's own python with torch + triton, and this checkout on
# PYTHONPATH. Results go to $OUT (default ./gpu_out); the whole script stays under ~8 minutes.
#   bash benchmarks/gpu_check.sh
# DRY_RUN=1 runs every step at toy size on the CPU (tests/test_gpu_check.py does, so the script
# works the first time a GPU comes). A failing step is logged as FAILED; the exit code counts them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
DRY_RUN=${DRY_RUN:-0}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
failures=0
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
check() { local rc=$?; if [ "$rc" -ne 0 ]; then log "FAILED (exit $rc)"; failures=$((failures + 1)); fi; }

if [ "$DRY_RUN" = 1 ]; then
  DEVICE=cpu
  TRITON=(--collect-only)  # the suite runs tests/test_triton.py itself, under the interpreter
  BENCH=(--size 256 --reps 1 --threads 1)
  TRAIN=(--steps 1 --warmup 1 --eager --d 32 --batch 64 --layers 1 --tf-d 32 --tf-layers 1
         --tf-batch 2 --seq 16 --threads 1)
  PAPER=(--dry-run --jobs 2)
else
  DEVICE=cuda
  TRITON=()
  BENCH=(--size 16384 --reps 10)
  TRAIN=(--steps 20)
  PAPER=(--jobs 4)
fi

log "machine: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo no GPU) $(date -u) dry_run=$DRY_RUN"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$OUT/summary.txt"
check

log "1. Triton on CUDA == torch path, bit for bit; TF32 tensor-core products exact (tests/test_triton.py, tests/test_gemm.py)"
timeout 150 $PY -m pytest -q -p no:cacheprovider "${TRITON[@]}" tests/test_triton.py tests/test_gemm.py 2>&1 | tail -n 5 | tee -a "$OUT/summary.txt"
check

log "2. bf16->bf16 and fp32 throughput vs device copy bandwidth"
timeout 120 $PY -m mxprobe.app.cli bench --device $DEVICE "${BENCH[@]}" 2>&1 | tee "$OUT/quant_bench.txt" | tee -a "$OUT/summary.txt"
check

log "3. training step overhead: MX emulation vs bf16 / fp32"
timeout 120 $PY benchmarks/train_overhead.py --device $DEVICE "${TRAIN[@]}" 2>&1 | tee "$OUT/train_overhead.txt" | tail -n 12 | tee -a "$OUT/summary.txt"
check

log "4. paper-scale proxy (L=4, d=512, batch 2048, lr 6e-4, 9000 steps): 5 seeds x fp32, MX, two ablations"
timeout 330 $PY benchmarks/paper_proxy.py --device $DEVICE --out "$OUT/paper_proxy" "${PAPER[@]}" 2>&1 | tail -n 12 | tee -a "$OUT/summary.txt"
check

log "done $(date -u), $failures failed step(s)"
exit "$failures"
