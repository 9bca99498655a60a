#!/usr/bin/env bash
# What of the 14B scale run (#10) two GPUs allow: rCM student steps over the 14B model's blocks (the whole model
# and its train state need 8 GPUs), FSDP=2 and CP=2, with the whole train state held, plus a DCP save and
# resume of that state. Prints each run's table; ~5 min on 2× H100.
#   [LAYERS=6] [DCP_DIR=/tmp/rcm_scale_ckpt] bash bench/scale_2gpu.sh [OUT_DIR] [extra args for bench/parallel_step.py]
set -u
out=${1:-bench_scale_out}; shift || true
layers=${LAYERS:-6}; dcp=${DCP_DIR:-/tmp/rcm_scale_ckpt}
mkdir -p "$out"; rm -rf "$dcp"
run() {  # name args for bench/parallel_step.py...
    local name=$1; shift
    timeout 420 torchrun --standalone --nproc_per_node=2 bench/parallel_step.py --model wan2.1-t2v-14B \
        --layers "$layers" --full-state --iters 3 --json "$out/$name.json" "$@" 2>&1 \
        | grep --line-buffered -v -i warn | tee "$out/$name.log" | tail -n 6
}
run fsdp2 --dp-shard 2 --dcp-dir "$dcp" "$@"
rm -rf "$dcp"
run cp2 --cp 2 "$@"
