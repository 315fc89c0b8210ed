#!/usr/bin/env bash
# Every GPU check of the project in one run, for a CUDA machine whose python3 holds torch, triton and
# transformers (no model download: the QAD steps train random models of real shapes).
#
#   bash bench/gpu.sh [RESULTS_DIR]     # default: $OUT if set, else gpu-results; ~5 min on an H100/H200
#
# Writes pytest.txt (the Triton kernels against the torch reference, natively, and the native engine's forward
# on CUDA against its CPU kernels), kernels.txt (the W4A16 GEMM vs BF16 matmul), qad.txt (QAD steps with the
# Triton fake-quant kernels vs the same steps unquantized: issue 5's "<= 1.3x") and decode.txt (the native
# engine's decode step on CUDA, student and teacher, eager and compiled, 1 to 32 sequences).
set -uo pipefail
results=${1:-${OUT:-gpu-results}}
mkdir -p "$results"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# the nvfp4.* package from this checkout, without dependencies (the machine has torch, triton, transformers; no network)
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$results/device.txt"

timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_triton.py 2>&1 | tee "$results/pytest.txt"
timeout 300 python3 bench/kernels.py 2>&1 | tee "$results/kernels.txt"
for run in "smollm2-135m --batch 1 --seq-len 128" "smollm2-135m --batch 8 --seq-len 512" "llama-1b --batch 8 --seq-len 512"; do
    for scheme in nvfp4-a16 nvfp4; do
        # shellcheck disable=SC2086  # $run holds several arguments
        timeout 300 python3 bench/qad.py --device cuda --baseline --steps 10 --scheme "$scheme" --random $run 2>&1 \
            | grep -v -E "^(Loading|USDT)"
    done
done | tee "$results/qad.txt"
timeout 400 python3 bench/decode_step.py --random smollm2-135m --device cuda --batches 1,8,32 2>&1 \
    | grep -v -E "^(Loading|USDT)" | tee "$results/decode.txt"
