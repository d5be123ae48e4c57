#!/usr/bin/env bash
# The one-GPU benchmarks (training, evaluation) and the GPU tests on the device machine (one H200), each under a
# time limit. Run from anywhere: it changes to the repository root and runs each benchmark as a module. Carried
# wheels (.whl/, see benchmarks/README.md) are installed to /tmp/site first. Logs and JSON results go to $OUT
# (7 files at most).
#   STAGES="train eval tests" TRAIN_SIZES=E4B,31B EVAL_SIZES=E4B,31B benchmarks/run_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTORCH_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
for stage in ${STAGES:-train eval tests}; do
    case $stage in
        train) timeout "${TRAIN_TIMEOUT:-480}" python3 -m benchmarks.gpu_train_bench --sizes "${TRAIN_SIZES:-E4B,31B}" \
                   --variants "${TRAIN_VARIANTS:-}" --out "$OUT" --profile --deadline-s "${TRAIN_DEADLINE:-400}" --flops-sizes "${FLOPS_SIZES:-}" \
                   2>&1 | tee "$OUT/train.log" ;;
        eval) timeout "${EVAL_TIMEOUT:-150}" python3 -m benchmarks.gpu_eval_bench --sizes "${EVAL_SIZES:-E4B,31B}" --batches "${EVAL_BATCHES:-3}" \
                  --out "$OUT" 2>&1 | tee "$OUT/eval.log" ;;
        tests) timeout "${TESTS_TIMEOUT:-200}" python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider \
                   2>&1 | tee "$OUT/gpu_tests.log" ;;
    esac
done
