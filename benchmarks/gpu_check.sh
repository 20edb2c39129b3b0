#!/usr/bin/env bash
# The GPU path in one table (benchmarks/gpu_check.py): a HuBERT Base training step in fp32, bf16 and fp16
# (+GradScaler) with SDPA attention (audio s/s, model FLOP/s and its share of the GPU's peak), batch_size=auto's
# choice and the peak memory training at it reaches, gradient checkpointing's memory saving, a 1-round
# simulation with federation.client_num_gpus 0.5 and the s3prl load check of its model. Under 8 minutes on an
# H100/H200-class GPU. Without CUDA it runs the CPU parts with the demo's model (fp32 and bf16 steps of 2 x 2.5 s
# crops; batch_size=auto with a 1 GiB budget; checkpointing; s3prl on a fresh model) and prints
# "skipped (no CUDA): ..." for the rest. Sets up .venv first (scripts/setup_env.sh).
#   benchmarks/gpu_check.sh                    # the machine's defaults
#   benchmarks/gpu_check.sh --size base        # HuBERT Base on a CPU too (a bf16 step: minutes without bf16 units)
#   benchmarks/gpu_check.sh --smoke            # the smallest CPU run (1 crop of 1 s, 1 step; .ci/run runs it)
#   benchmarks/gpu_check.sh --help             # sizes, batch, crop seconds, budget, --skip
set -euo pipefail
source "$(dirname "$0")/../scripts/setup_env.sh"
cd "$_FEDHUBERT_ROOT"
exec python benchmarks/gpu_check.py "$@"
