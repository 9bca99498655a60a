#!/usr/bin/env bash
# The #5 benchmark in one go on a 2-GPU host: one GPU, FSDP=2 and CP=2 (eager, then with compiled blocks),
# each against the one-GPU run of the same mode; prints one Markdown table last.
#   [MODES="eager compile"] bash bench/parallel_suite.sh [OUT_DIR] [extra args for bench/parallel_step.py]
set -u
out=${1:-bench_parallel_out}; shift || true
mkdir -p "$out"
run() {  # name nproc args for bench/parallel_step.py...
    local name=$1 nproc=$2; shift 2
    timeout 240 torchrun --standalone --nproc_per_node="$nproc" bench/parallel_step.py --json "$out/$name.json" "$@" "${EXTRA[@]}" \
        >"$out/$name.log" 2>&1 || echo "$name failed (see $out/$name.log)"
    tail -n 1 "$out/$name.log"
}
baseline() { python -c "import json,sys; print(json.load(open(sys.argv[1]))['samples_per_s'])" "$1" 2>/dev/null || echo 0; }
EXTRA=("$@")
for mode in ${MODES:-eager compile}; do
    flag=(); [ "$mode" = compile ] && flag=(--compile)
    run "${mode}_1gpu" 1 "${flag[@]}"
    b=$(baseline "$out/${mode}_1gpu.json")
    run "${mode}_fsdp2" 2 --dp-shard 2 --baseline "$b" "${flag[@]}"
    run "${mode}_cp2" 2 --cp 2 --baseline "$b" "${flag[@]}"
done
python - "$out" <<'PY'
import json, pathlib, sys
rows = [json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))]
if rows:
    r = rows[0]
    print(f"\n{r['device']}; torch {r['torch']}; {r['tokens_per_sample']} tokens/sample; checkpoint every {r['ac_every']} block(s)")
print("| blocks | GPUs | dp_shard × cp | step time (s) | peak memory / GPU (GiB) | samples/s | scaling vs 1 GPU |")
print("|---|---:|---|---:|---:|---:|---:|")
for r in sorted(rows, key=lambda r: (r["compile"], r["gpus"], r["cp"])):
    s = f"{r['scaling_vs_1gpu']:.2f}" if r["scaling_vs_1gpu"] else "–"
    print(f"| {'compiled' if r['compile'] else 'eager'} | {r['gpus']} | {r['dp_shard']} × {r['cp']} | {r['step_time_s']:.3f} | "
          f"{r['peak_memory_gib']:.1f} | {r['samples_per_s']:.3f} | {s} |")
PY
