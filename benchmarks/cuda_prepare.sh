#!/usr/bin/env bash
# Prepare, HERE, what the CUDA check carries to a GPU machine (see benchmarks/cuda.py's docstring):
#   gpu-carry/core-NN   onnxruntime-gpu 1.31.1 (stripped, .tar.xz), the onnx-ir wheel lrc is tested
#                       with, SmolLM2 dense as a graph skeleton + the GGUF blocks it was exported from
#   gpu-carry/mini-NN   MiniLM dense (optional on the device)
#   gpu-carry/SHA256SUMS, gpu-carry/CALLS.txt (the exact `run` calls to make)
# Each part < 55 MiB (a `run` call carries 64 MiB at most, the working tree included).
# Needs: network (pip download), the bundled models exported (make demo / make bench do it, or
# `lrc export smollm2-135m --exporter optimum -o DIR`), xz. Takes ~5-8 min on 2 cores (xz -9e of the CUDA library).
#   bash benchmarks/cuda_prepare.sh [SMOLLM2_DENSE_DIR] [MINILM_DENSE_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SMOL=${1:-bench-out/models/smollm2/dense}
MINI=${2:-bench-out/models/minilm/dense}
C=gpu-carry
S=$C/stage
PART=${PART:-57600000}   # bytes: 54.9 MiB (the brief's "under 55 MiB"; the call limit is 64 MiB)
ORT_WHEEL=onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl

for d in "$SMOL" "$MINI"; do
  [ -f "$d/model.onnx" ] || { echo "no $d/model.onnx: export the bundled models first" >&2; exit 1; }
done
mkdir -p "$S/dl" "$S/core/wheels" "$S/mini"

# 1. onnxruntime-gpu (CUDA 13 build) and the pure-Python wheels lrc needs beyond the device's image
if [ ! -f "$S/dl/$ORT_WHEEL" ]; then
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$S/dl" onnxruntime-gpu==1.31.1
fi
ONNXIR=$("$PY" -c "import importlib.metadata as m; print(m.version('onnx-ir'))")
ls "$S"/core/wheels/onnx_ir-"$ONNXIR"-*.whl >/dev/null 2>&1 || \
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$S/core/wheels" \
    "onnx-ir==$ONNXIR"

# 2. the wheel unpacked without what the Python module never loads (TensorRT provider, the C-API
#    libonnxruntime.so: onnxruntime_pybind11_state links neither), as one .tar.xz
if [ ! -f "$S/core/ort.tar.xz" ]; then
  rm -rf "$S/ort" && mkdir -p "$S/ort"
  (cd "$S/ort" && unzip -q "../dl/$ORT_WHEEL")
  rm -f "$S"/ort/onnxruntime/capi/libonnxruntime_providers_tensorrt.so \
        "$S"/ort/onnxruntime/capi/libonnxruntime.so.*
  tar -C "$S/ort" -cf - . | nice xz -9e -T2 > "$S/core/ort.tar.xz.tmp"
  mv "$S/core/ort.tar.xz.tmp" "$S/core/ort.tar.xz"
  rm -rf "$S/ort"
fi

# 3. the dense models: SmolLM2 from its GGUF's blocks (checked bit for bit), MiniLM as it is
if [ ! -f "$S/core/smollm2.tar.xz" ]; then
  rm -rf "$S/smol" && "$PY" benchmarks/cuda.py pack --smollm2 "$SMOL" --out "$S/smol"
  # round trip: the rebuilt SmolLM2 equals the export, tensor by tensor (unpack checks sha256s)
  rm -rf "$S/rebuilt" && "$PY" benchmarks/cuda.py unpack "$S/smol/smollm2" "$S/rebuilt" && rm -rf "$S/rebuilt"
  # the GGUF blocks shrink by 6.4 MB under xz, tokenizer.json by 3 MB: 5 parts instead of 6
  tar -C "$S/smol" -cf - smollm2 | nice xz -6 -T2 > "$S/core/smollm2.tar.xz.tmp"
  mv "$S/core/smollm2.tar.xz.tmp" "$S/core/smollm2.tar.xz" && rm -rf "$S/smol"
fi
[ -f "$S/mini/minilm/model.onnx.xz" ] || "$PY" benchmarks/cuda.py pack --minilm "$MINI" --out "$S/mini"

# 4. two tars, split into parts; a call carries one part and the working tree (64 MiB in all)
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1)
if [ $(( tree + PART + 2000000 )) -gt $(( 64 * 1048576 )) ]; then
  echo "working tree $tree B + part $PART B leave no margin under 64 MiB: set PART smaller" >&2; exit 1
fi
rm -f $C/core-?? $C/mini-?? $C/SHA256SUMS
tar -C "$S" -cf - core | split -b $PART -d -a 2 - $C/core-
tar -C "$S" -cf - mini | split -b $PART -d -a 2 - $C/mini-
(cd $C && sha256sum core-?? mini-?? > SHA256SUMS)

# 5. the calls a session with a GPU makes, in this order, back to back
parts=$(cd $C && ls core-?? mini-??)
last=$(echo "$parts" | tail -1)
{
  echo "# back to back, without pausing to read the replies (after ~30 s idle the machine and the parts"
  echo "# on it are gone). The last call: timeout_s and BUDGET (s; no model started after it) no more"
  echo "# than the reply's lease.budget_left_s allows (keep ~60 s spare)."
  first=1
  for p in $parts; do
    extra=""; [ $first = 1 ] && extra=', "gpu-carry/SHA256SUMS"'; first=0
    if [ "$p" = "$last" ]; then
      echo "run(command=\"BUDGET=420 bash benchmarks/cuda_device.sh all\", carry=[\"$C/$p\"$extra], timeout_s=540)"
    else
      echo "run(command=\"bash benchmarks/cuda_device.sh part $p\", carry=[\"$C/$p\"$extra], timeout_s=60)"
    fi
  done
  lastcore=$(cd $C && ls core-?? | tail -1)
  echo "# without MiniLM (~1 min less): the calls above before the one carrying $lastcore, then instead"
  echo "run(command=\"BUDGET=420 bash benchmarks/cuda_device.sh all\", carry=[\"$C/$lastcore\"], timeout_s=540)"
} > $C/CALLS.txt
echo "working tree $(( tree / 1048576 )) MiB; parts:"
ls -l $C/core-?? $C/mini-?? | awk '{printf "%s %.1f MiB\n", $NF, $5/1048576}'
echo "calls (also in $C/CALLS.txt):"
cat $C/CALLS.txt
