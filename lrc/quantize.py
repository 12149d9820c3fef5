"""Stack quantisation on a low-rank model: ONNX Runtime's own quantisers on what lrc leaves dense.

After the low-rank pass a model holds two kinds of weight MatMul: lrc's factor pairs
``(X·A)·B`` (node metadata ``lrc.factor`` = ``A`` / ``B``) and the projections it left dense
(excluded roles, the attention block, anything not worth factorising). ``quantize_rest`` hands
the second kind to ONNX Runtime's quantisers and, by default, keeps the first kind as it is
(float, or lrc's own int8 form from ``compress(int8=...)``):

* ``mode="int8"``: ``onnxruntime.quantization.quantize_dynamic`` (weights int8, symmetric,
  per output channel by default; activations quantised at run time by ``DynamicQuantizeLinear``,
  ``MatMulInteger``; ORT fuses it into ``DynamicQuantizeMatMul`` on the CPU EP). Only ``MatMul``
  nodes with a constant weight are quantised (``op_types_to_quantize=["MatMul"]``,
  ``MatMulConstBOnly``): the embedding ``Gather`` and attention's activation products stay float.
* ``mode="int4"`` / ``"int8-weight"``: ``MatMulNBitsQuantizer`` — weight-only, block-wise
  (``block_size`` rows of K per scale), symmetric, ``com.microsoft.MatMulNBits`` with 4 or 8
  bits. ``accuracy_level=4`` on the CPU EP (int8 activations inside the kernel, the fast path).
  Runs on the CPU and CUDA EPs alike (no ``DynamicQuantizeLinear``).

``targets`` says which MatMuls are handed over: ``"rest"`` (all but lrc's factors; the default,
``exclude_factors=True``), ``"factors"`` (only lrc's factors: weight-only forms for the factors
themselves) or ``"all"`` (``exclude_factors=False``). Node names select them, so unnamed nodes
are given names first.

Folder in, folder out like ``compress`` (:mod:`lrc.graph.folder`): every ``*.onnx`` in the folder
is quantised, other files (tokenizer, configs) are copied, and the output appears only when
complete (temp + rename).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

from lrc.errors import LrcError
from lrc.graph.model import staging_dir
from lrc.graph import folder
from lrc.graph.locate import FACTOR_META, weight_matmul_nodes
from lrc.modelref import pick_file
from lrc.runtime import quantizers
from lrc.runtime.session import check_loads

MODES = ("int8", "int4", "int8-weight")
TARGETS = ("rest", "factors", "all")
_NBITS = {"int4": 4, "int8-weight": 8}
_BIG = 1_800_000_000  # above this the output is written with external data


def factor_node_names(proto, float_only: bool = True) -> list[str]:
    """Names of lrc's factor nodes (node metadata ``lrc.factor``) in an onnx ModelProto: the
    float factor MatMuls, or with ``float_only=False`` also the final ``Mul`` of lrc's int8
    dynamic form (the node that keeps the metadata)."""
    return [n.name for n in proto.graph.node
            if (n.op_type == "MatMul" or not float_only)
            and any(p.key == FACTOR_META for p in n.metadata_props)]


def _name_nodes(proto) -> int:
    """Give every unnamed node a unique name (the quantisers select nodes by name)."""
    taken = {n.name for n in proto.graph.node if n.name}
    k = 0
    for i, n in enumerate(proto.graph.node):
        if not n.name:
            name = f"{n.op_type}_lrcq_{i}"
            while name in taken:
                name += "_"
            n.name = name
            taken.add(name)
            k += 1
    return k


def _const_matmuls(proto) -> list[str]:
    """MatMuls whose weight (second input) is an initializer: what ORT's quantisers rewrite."""
    return [w.name for w in weight_matmul_nodes(proto)
            if w.op == "MatMul" and w.direct and w.weight_index == 1]


def op_counts(path) -> dict[str, int]:
    """Node count per op type of an ONNX file (weights not loaded)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return dict(Counter(n.op_type for n in m.graph.node))


def _quantize_file(src: Path, dst: Path, mode: str, targets: str, per_channel: bool,
                   block_size: int, accuracy_level: int | None, symmetric: bool) -> dict:
    import onnx

    from lrc.graph.model import file_size, load_proto

    load_proto(src)  # validates the file and its external-data locations
    proto = onnx.load(str(src))
    named = _name_nodes(proto)
    factors = set(factor_node_names(proto))
    int8_factors = len(factor_node_names(proto, float_only=False)) - len(factors)
    weight_mm = _const_matmuls(proto)
    if targets == "rest":
        chosen = [n for n in weight_mm if n not in factors]
    elif targets == "factors":
        chosen = [n for n in weight_mm if n in factors]
    else:
        chosen = list(weight_mm)
    excluded = [n for n in weight_mm if n not in set(chosen)]
    ext = file_size(src) > _BIG
    t0 = time.perf_counter()
    if not chosen:
        onnx.save_model(proto, str(dst), save_as_external_data=ext,
                        location=dst.name + ".data" if ext else None)
    elif mode == "int8":
        quantizers.int8_dynamic(proto, dst, per_channel=per_channel, nodes=chosen,
                                exclude=excluded, matmul_only=True, external=ext)
    else:
        quantizers.matmul_nbits(proto, dst, bits=_NBITS[mode], block_size=block_size,
                                symmetric=symmetric, accuracy_level=accuracy_level,
                                exclude=excluded, external=ext)
    seconds = time.perf_counter() - t0
    ops = op_counts(dst)
    out = onnx.load(str(dst), load_external_data=False)
    left_float = [n.name for n in out.graph.node if n.op_type == "MatMul" and n.name in factors]
    return {"input": str(src), "output": str(dst), "mode": mode, "targets": targets,
            "weight_matmuls": len(weight_mm), "factor_matmuls": len(factors),
            "int8_factor_nodes": int8_factors,
            "quantized": len(chosen), "kept_float": len(excluded),
            "factors_left_float": len(left_float), "nodes_named": named,
            "ops": {k: v for k, v in sorted(ops.items()) if k in _QOPS},
            "size_before": file_size(src), "size_after": file_size(dst),
            "seconds": round(seconds, 2)}


_QOPS = {"MatMul", "MatMulInteger", "DynamicQuantizeLinear", "MatMulNBits", "DequantizeLinear",
         "DynamicQuantizeMatMul", "Gemm"}


def quantize(model, out, mode: str = "int8", *, targets: str = "rest", per_channel: bool = True,
             block_size: int = 32, accuracy_level: int | None = 4, symmetric: bool = True,
             force: bool = False, check: bool = True) -> dict:
    """Quantise the weight MatMuls selected by ``targets`` of ``model`` (file or folder) to ``out``.

    Returns a report dict (per file: counts, op types in the output, sizes, seconds); a folder
    gives ``{"models": {file: report}, ...}`` with the first file's fields at the top level."""
    if mode not in MODES:
        raise LrcError(f"quantize mode must be one of {', '.join(MODES)}, got {mode!r}")
    if targets not in TARGETS:
        raise LrcError(f"quantize targets must be one of {', '.join(TARGETS)}, got {targets!r}")
    if mode != "int8" and (block_size < 16 or block_size & (block_size - 1)):
        raise LrcError(f"block_size must be a power of two >= 16, got {block_size}")
    src, out = Path(model), Path(out)
    if not src.exists():
        raise LrcError(f"{src}: no such file or folder")

    def transform(f: Path, dst: Path) -> dict:
        report = _quantize_file(f, dst, mode, targets, per_channel, block_size, accuracy_level,
                                symmetric)
        if check:
            check_loads(dst)
        return report

    if src.is_dir():
        reports = folder.transform_folder(src, out, transform, force=force)
    else:
        reports = {out.name: _quantize_to_file(pick_file(src), out, transform, force)}
    first = next(iter(reports.values()))
    report = dict(first)
    if len(reports) > 1:
        report["models"] = reports
        report["size_before"] = sum(r["size_before"] for r in reports.values())
        report["size_after"] = sum(r["size_after"] for r in reports.values())
    report["summary"] = summary_line(report)
    return report


def _quantize_to_file(src: Path, out: Path, transform, force: bool) -> dict:
    """One file: staged in a temporary folder beside ``out``, moved into place when complete."""
    folder.check_output(src, out, force)
    tmp = staging_dir(out)  # .OUT.tmp-PID-*: a killed run's is removed by the next
    try:
        dst = tmp / out.name
        report = transform(src, dst)
        data = tmp / (out.name + ".data")
        if data.exists():
            os.replace(data, out.parent / data.name)
        folder.replace(dst, out)
        report["output"] = str(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def quantize_rest(model, out, mode: str = "int8", exclude_factors: bool = True,
                  per_channel: bool = True, block_size: int = 32, **kw) -> dict:
    """Quantise what lrc left dense (``exclude_factors=True``) or every weight MatMul (False)
    with ONNX Runtime's quantisers; see the module docstring."""
    return quantize(model, out, mode, targets="rest" if exclude_factors else "all",
                    per_channel=per_channel, block_size=block_size, **kw)


def quantize_rest_inplace(path, mode: str = "int8", **kw) -> dict:
    """``quantize_rest`` replacing ``path`` (a file or folder ``compress`` just wrote): the
    result is built beside it and swapped in only when complete (external data keeps its name)."""
    path = Path(path)
    if not path.exists():
        raise LrcError(f"{path}: no such file or folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.q-", dir=path.parent))
    try:
        staged = tmp / path.name
        report = quantize_rest(path, staged, mode, **kw)
        if path.is_dir():
            old = tmp / (path.name + ".old")
            os.replace(path, old)
            os.replace(staged, path)
        else:
            os.replace(staged, path)
            data = tmp / (path.name + ".data")
            if data.exists():
                os.replace(data, path.with_name(data.name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for r in [report, *report.get("models", {}).values()]:
        r["output"] = str(path / Path(r["output"]).name) if path.is_dir() else str(path)
    return report


def summary_line(r: dict) -> str:
    what = {"rest": "dense MatMuls", "factors": "lrc factor MatMuls",
            "all": "weight MatMuls"}[r["targets"]]
    how = {"int8": "INT8 dynamic (ORT quantize_dynamic)", "int4": "4-bit MatMulNBits",
           "int8-weight": "8-bit MatMulNBits (weight-only)"}[r["mode"]]
    kept = f"{r['kept_float']} float weight MatMuls left as they were"
    if r.get("int8_factor_nodes"):
        kept += f", {r['int8_factor_nodes']} lrc int8 factor products untouched"
    return (f"quantised {r['quantized']} {what} to {how} ({r['weight_matmuls']} float weight "
            f"MatMuls, {r['factor_matmuls']} of them lrc factors); {kept}; "
            f"{r['size_before'] / 1e6:.1f} -> {r['size_after'] / 1e6:.1f} MB")


def to_float16(files: list, *, keep_io_types: bool = True) -> list[Path]:
    """Convert exported ``.onnx`` files to float16 in place (ONNX Runtime's converter,
    :func:`lrc.runtime.quantizers.float16`): each is written beside itself and renamed over it
    when complete; its float32 external data, if any, is removed after. The float32 weights
    must fit protobuf's 2 GB once loaded (the converter works on one message)."""
    from lrc.graph.model import PROTOBUF_LIMIT, external_files, file_size
    from lrc.runtime.quantizers import float16, quiet

    done = []
    for f in [Path(x) for x in files]:
        if file_size(f) > 2 * PROTOBUF_LIMIT:
            raise LrcError(f"{f.name}: {file_size(f) / 1e9:.1f} GB of float32 weights is more "
                           "than ONNX Runtime's float16 converter reads in one message; export "
                           "float32 and convert the layers yourself")
        data = [f.parent / loc for loc in external_files(f)]
        fd, tmp = tempfile.mkstemp(prefix=f".{f.name}.", suffix=".fp16.tmp", dir=f.parent)
        os.close(fd)
        try:
            with quiet():
                float16(f, tmp, keep_io_types=keep_io_types)
            os.replace(tmp, f)
        except Exception as e:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(e, LrcError):
                raise
            raise LrcError(f"{f.name}: float16 conversion failed ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from e
        for d in data:
            d.unlink(missing_ok=True)
        done.append(f)
    return done


__all__ = ["MODES", "TARGETS", "factor_node_names", "op_counts", "quantize", "quantize_rest", "to_float16",
           "quantize_rest_inplace", "summary_line"]
