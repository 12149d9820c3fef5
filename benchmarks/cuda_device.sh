#!/usr/bin/env bash
# Runs ON the GPU machine (the `run` tool), from the repository root there. See benchmarks/cuda.py.
#   bash benchmarks/cuda_device.sh part core-01   check one carried part (parts stay while the
#                   machine is warm); once every core part is here, start `prep` in the
#                   background (setsid: it outlives the call) so that unpacking, installing and
#                   building SmolLM2's variants overlap the calls that carry the MiniLM parts
#   bash benchmarks/cuda_device.sh prep           unpack, install, build SmolLM2's variants
#   bash benchmarks/cuda_device.sh all            wait for / do prep, CUDA smoke test, then
#                   cuda.py run (CUDA tests, variants, placement, bench) -> $OUT: cuda-results.json,
#                   cuda-section.md, test_cuda.log, run.log, env.txt, prep.log
# MiniLM runs only when all mini-NN parts arrived. BUDGET (s from the start of `all`, default 420):
# no model is started after it (SmolLM2 first, then MiniLM);
# VARIANTS (comma-separated names) limits the variants; EP=cpu is for a dry run without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
C=gpu-carry
U=/tmp/lrc-gpu          # the unpacked payload
SITE=/tmp/lrc-site      # onnxruntime-gpu + wheels (PYTHONPATH, ahead of the image's onnxruntime)
WORK=/tmp/lrc-work      # dense models rebuilt, variants built
P=/tmp/lrc-prep         # prep's state: .started, .done, .log
OUT=${OUT:-/tmp/lrc-out}
PY=${PY:-python3}

have_all() {  # have_all core|mini: every part of that kind listed in SHA256SUMS is here and intact
  local kind=$1 ok=0
  [ -f $C/SHA256SUMS ] || return 1
  grep " $kind-" $C/SHA256SUMS > /tmp/lrc-sums.$kind || return 1
  while read -r _ name; do
    [ -f "$C/$name" ] || { echo "missing $name"; ok=1; }
  done < /tmp/lrc-sums.$kind
  [ $ok = 0 ] || return 1
  (cd $C && sha256sum --quiet -c /tmp/lrc-sums.$kind)
}

setup_env() {  # the CUDA 13 libraries of the image's torch wheels (cuBLAS, cudart, cuRAND, cuDNN)
  local libdirs
  libdirs=$($PY - <<'EOF'
import glob, os, sys
seen = []
for sp in sys.path:
    for pat in ("nvidia/*/lib", "nvidia/*/*/lib", "torch/lib"):
        for d in sorted(glob.glob(os.path.join(sp, pat))):
            if glob.glob(os.path.join(d, "*.so*")) and d not in seen:
                seen.append(d)
print(":".join(seen))
EOF
)
  export LD_LIBRARY_PATH="$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export PYTHONPATH="$SITE:$PWD"
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
}

untar_xz() {  # untar_xz FILE DIR (xz if the image has it, else Python's lzma)
  if command -v xz >/dev/null; then xz -dc -T0 "$1" | tar -x -C "$2"
  else $PY -c "import lzma,sys,tarfile; tarfile.open(fileobj=lzma.open(sys.argv[1])).extractall(sys.argv[2])" "$1" "$2"; fi
}

unpack_mini() {
  if [ ! -d $U/mini/minilm ] && have_all mini >/dev/null 2>&1; then cat $C/mini-?? | tar -x -C $U; fi
}

prep() {
  local t0; t0=$(date +%s)
  have_all core || { echo "FATAL: core parts missing or damaged (machine recycled between calls?)"; return 1; }
  rm -rf $U $SITE && mkdir -p $U $SITE
  cat $C/core-?? | tar -x -C $U || return 1
  unpack_mini
  untar_xz $U/core/ort.tar.xz $SITE || return 1
  untar_xz $U/core/smollm2.tar.xz $U/core || return 1
  $PY -m pip install -q --no-index --no-deps --no-compile --target $SITE $U/core/wheels/*.whl || return 1
  echo "unpacked and installed in $(( $(date +%s) - t0 )) s"
  setup_env
  $PY benchmarks/cuda.py build --work $WORK --model smollm2=$U/core/smollm2 \
    ${VARIANTS:+--variants $VARIANTS} || return 1
  echo "prep done in $(( $(date +%s) - t0 )) s"
}

case "${1:-}" in
part)
  [ -f $C/SHA256SUMS ] || { echo "no $C/SHA256SUMS: carry it with the first part"; exit 1; }
  (cd $C && grep " $2\$" SHA256SUMS | sha256sum --quiet -c -) && echo "part $2 ok"
  echo "parts here: $(cd $C && ls core-?? mini-?? 2>/dev/null | tr '\n' ' ')"
  if [ ! -f $P.started ] && have_all core >/dev/null 2>&1; then
    touch $P.started
    setsid bash -c "bash '$0' prep > $P.log 2>&1; echo \$? > $P.done" < /dev/null > /dev/null 2>&1 &
    echo $! > $P.pid
    echo "all core parts here: prep started in the background ($P.log)"
  fi
  exit 0 ;;
prep) prep; exit $? ;;
folders)  # time carried folders (fold-NN parts: a tar of DIRs) as they are, the first the reference
  t0=$(date +%s); mkdir -p "$OUT"
  while [ -f $P.started ] && [ ! -f $P.done ] && [ $(( $(date +%s) - t0 )) -lt 300 ]; do sleep 2; done
  [ -d $SITE/onnxruntime ] || { echo "FATAL: onnxruntime-gpu not installed (prep: $(cat $P.done 2>/dev/null))"; tail -5 $P.log; exit 1; }
  have_all fold || { echo "FATAL: fold parts missing or damaged"; exit 1; }
  rm -rf /tmp/lrc-fold && mkdir -p /tmp/lrc-fold && cat $C/fold-?? | tar -x -C /tmp/lrc-fold || exit 1
  setup_env
  args=()
  for spec in ${FOLDERS:?FOLDERS=LABEL=NAME:DIR,... relative to the tar}; do
    args+=(--prebuilt "${spec%%:*}:/tmp/lrc-fold/${spec#*:}")
  done
  $PY benchmarks/cuda.py run --ep cuda --no-tests --out "$OUT" --work /tmp/lrc-work2 "${args[@]}" 2>&1 | tee "$OUT/run.log"
  rc=${PIPESTATUS[0]}; echo "cuda.py exit $rc; this call $(( $(date +%s) - t0 )) s"; exit $rc ;;
all) ;;
*) echo "usage: $0 part NAME | prep | all | folders"; exit 2 ;;
esac

t0=$(date +%s)
mkdir -p "$OUT"
if [ -f $P.started ]; then
  while [ ! -f $P.done ] && kill -0 "$(cat $P.pid)" 2>/dev/null && [ $(( $(date +%s) - t0 )) -lt 400 ]; do
    sleep 2
  done
  echo "background prep: exit $(cat $P.done 2>/dev/null || echo 'still running')"
  cp $P.log "$OUT/prep.log" 2>/dev/null
  [ "$(cat $P.done 2>/dev/null)" = 0 ] || { tail -20 $P.log; prep 2>&1 | tee "$OUT/prep.log" || exit 1; }
else
  prep 2>&1 | tee "$OUT/prep.log"
  [ "${PIPESTATUS[0]}" = 0 ] || exit 1
fi
unpack_mini
setup_env
models=(--model smollm2=$U/core/smollm2)
[ -d $U/mini/minilm ] && models+=(--model minilm=$U/mini/minilm) || echo "MiniLM not carried: SmolLM2 only"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  $PY -c "import onnxruntime as o, onnx, onnx_ir, numpy; print('onnxruntime', o.__version__, o.__file__); print('providers', o.get_available_providers()); print('onnx', onnx.__version__, 'onnx_ir', onnx_ir.__version__, 'numpy', numpy.__version__)" 2>&1
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  # one MatMul on CUDA with the CPU fallback forbidden: does the EP find its libraries?
  $PY - <<'EOF' 2>&1
import numpy as np, onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
w = numpy_helper.from_array(np.ones((8, 8), np.float32), "w")
g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [w])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)  # onnx 1.23 writes IR 14 by default; ORT 1.31 reads <= 13
so = ort.SessionOptions(); so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
try:
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CUDAExecutionProvider"])
    print("CUDA smoke:", s.get_providers(), float(s.run(None, {"x": np.ones((2, 8), np.float32)})[0].sum()))
except Exception as e:
    print("CUDA smoke FAILED:", str(e)[:600])
EOF
} | tee "$OUT/env.txt"

left=$(( ${BUDGET:-420} - ($(date +%s) - t0) ))   # BUDGET counts from the start of this call
$PY benchmarks/cuda.py run --ep "${EP:-cuda}" --out "$OUT" --work $WORK --budget-s $left \
  ${VARIANTS:+--variants $VARIANTS} "${models[@]}" 2>&1 | tee "$OUT/run.log"
rc=${PIPESTATUS[0]}
echo "cuda.py exit $rc; this call $(( $(date +%s) - t0 )) s"
exit $rc
