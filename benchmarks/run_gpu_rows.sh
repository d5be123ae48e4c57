#!/usr/bin/env bash
# Training-benchmark rows, one process each (for peak memory per row), optionally beside a tiny-model recipe
# sweep on the same GPU (peak memory is per process, so the sweep does not disturb it, but then the rows' speeds
# mean nothing). Run from anywhere: it changes to the repository root and runs each benchmark as a module.
# WHEELS: a folder of carried wheels, as for run_gpu.sh. For example:
#   SWEEP_VARIANTS="main main_r64 ..." TRAIN_VARIANTS="ours-q-mb1-r16-adam8 ours-qv-mb1-r16-adam8" bash benchmarks/run_gpu_rows.sh
#   TRAIN_SIZE=E4B TRAIN_TIMEOUT=270 PROFILE=--profile TRAIN_VARIANTS="ours-bf16 ours-bf16-compile" bash benchmarks/run_gpu_rows.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-bench-out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${WHEELS:-.whl}"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
read -r -a sweep_variants <<< "${SWEEP_VARIANTS:-}"
read -r -a profile <<< "${PROFILE:-}"
[ ${#sweep_variants[@]} -gt 0 ] && OMP_NUM_THREADS=1 timeout "${SWEEP_TIMEOUT:-540}" python3 -m benchmarks.tiny_init_sweep --variants "${sweep_variants[@]}" \
    --seeds 0 1 2 --steps "${SWEEP_STEPS:-516}" --eval-every 129 --test-size 0 --device cuda --parallel "${SWEEP_PARALLEL:-15}" \
    > "$OUT/sweep.log" 2>&1 &
# One process per row: run in one process, the rows after an 8-bit-optimizer row measured 0.5-8 GB higher
# peaks than alone (memory left behind by an earlier row counts in the next row's peak).
read -r -a train_variants <<< "${TRAIN_VARIANTS:-}"
for variant in "${train_variants[@]}"; do
    PYTORCH_ALLOC_CONF=expandable_segments:True timeout "${TRAIN_TIMEOUT:-150}" python3 -m benchmarks.gpu_train_bench \
        --sizes "${TRAIN_SIZE:-31B}" --variants "$variant" --out "$OUT/$variant" "${profile[@]}" 2>&1 | grep -v -i warn | tee -a "$OUT/train.log"
done
wait
if [ -f "$OUT/sweep.log" ]; then tail -40 "$OUT/sweep.log"; fi
