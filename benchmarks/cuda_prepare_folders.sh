#!/usr/bin/env bash
# Carry lrc folders built HERE to the GPU machine and time them there as they are (after the
# parts of cuda_prepare.sh, which bring onnxruntime-gpu): fold-NN parts (< 55 MiB each) of one
# tar of the folders, their sums added to gpu-carry/SHA256SUMS.
#   bash benchmarks/cuda_prepare_folders.sh LABEL NAME=DIR [NAME=DIR ...]   (the first: the reference)
# e.g. the builder's int4 against lrc's --target-size 88 of the builder's fp32 (make demo's step 6):
#   bash benchmarks/cuda_prepare_folders.sh smollm2-builder builder-int4=demo-out/builder-int4 \
#        lrc-88=demo-out/builder-lrc
# Then, on the device, back to back: the core parts as in CALLS.txt (VARIANTS=dense before the
# first: prep then builds nothing it will not time), the fold parts, and
#   FOLDERS="LABEL=NAME:NAME ..." bash benchmarks/cuda_device.sh folders
# (gpu-carry/CALLS-folders.txt lists them); then here:
#   python benchmarks/cuda.py render --results benchmarks/cuda-results.json --results FILES_AT/cuda-results.json
set -euo pipefail
cd "$(dirname "$0")/.."
C=gpu-carry
PART=${PART:-57600000}
label=$1; shift
[ -f $C/SHA256SUMS ] || { echo "run benchmarks/cuda_prepare.sh first (onnxruntime-gpu parts)" >&2; exit 1; }
S=$C/stage/fold && rm -rf $S && mkdir -p $S
specs=()
for nd in "$@"; do
  name=${nd%%=*}; dir=${nd#*=}
  [ -f "$dir/model.onnx" ] || { echo "no $dir/model.onnx" >&2; exit 1; }
  mkdir -p $S/$name
  for f in "$dir"/*; do  # the graph, its data and the configs; no lrc report files
    case $(basename "$f") in *.onnx|*.onnx.data|*.data|*.json) ln -s "$(realpath "$f")" $S/$name/ ;; esac
  done
  specs+=("$label=$name:$name")
done
rm -f $C/fold-??
tar -C $S -chf - . | split -b $PART -d -a 2 - $C/fold-
grep -v " fold-" $C/SHA256SUMS > $C/SHA256SUMS.tmp || true
(cd $C && sha256sum fold-??) >> $C/SHA256SUMS.tmp && mv $C/SHA256SUMS.tmp $C/SHA256SUMS
{
  echo "# back to back (the machine forgets everything ~30 s after a call)"
  first=1
  for p in $(cd $C && ls core-??); do
    extra=""; [ $first = 1 ] && extra=', "gpu-carry/SHA256SUMS"'; first=0
    echo "run(command=\"VARIANTS=dense bash benchmarks/cuda_device.sh part $p\", carry=[\"$C/$p\"$extra], timeout_s=60)"
  done
  for p in $(cd $C && ls fold-??); do
    echo "run(command=\"bash benchmarks/cuda_device.sh part $p\", carry=[\"$C/$p\"], timeout_s=60)"
  done
  echo "run(command=\"FOLDERS='${specs[*]}' bash benchmarks/cuda_device.sh folders\", timeout_s=420)"
} > $C/CALLS-folders.txt
ls -l $C/fold-?? | awk '{printf "%s %.1f MiB\n", $NF, $5/1048576}'
cat $C/CALLS-folders.txt
