#!/usr/bin/env bash
# The #9 check in one call on one GPU: time the candidate VAE decoders (compiled recipes at chunk sizes), then
# run the end-to-end generation benchmark (student 4 steps vs teacher 50 × CFG) with the fastest of them.
#   [VARIANTS="taps_all@3 taps_all@7 taps_all@21"] [COMPILE_MODE=max-autotune-no-cudagraphs] bash bench/generation_suite.sh [OUT_DIR]
# ~5–7 min on an H100 (each decoder variant compiles for ~40 s; the teacher takes ~80 s). Prints the
# generation table last; the decoder table is in OUT_DIR/vae_decode.log.
set -u
out=${1:-bench_generation_out}
mode=(); [ -n "${COMPILE_MODE:-}" ] && mode=(--compile-mode "$COMPILE_MODE")
mkdir -p "$out"
# shellcheck disable=SC2086
python -u bench/vae_decode.py --compile --repeats 3 --variants ${VARIANTS:-taps_all@3 taps_all@7 taps_all@21} \
    "${mode[@]}" --best-to "$out/best_vae" 2>&1 | grep --line-buffered -v -i warn | tee "$out/vae_decode.log"
read -r recipe chunk < "$out/best_vae" || { recipe=taps_all; chunk=3; echo "no decoder timed; using $recipe@$chunk"; }
echo "fastest decoder: $recipe, $chunk latent frame(s) per chunk"
python -u bench/generation.py --vae-dtype bfloat16 --vae-compile --vae-recipe "$recipe" --vae-chunk-frames "$chunk" \
    ${COMPILE_MODE:+--vae-compile-mode "$COMPILE_MODE"} \
    --teacher-steps 50 --repeats 3 2>&1 | grep --line-buffered -v -i warn | tee "$out/generation.log"
