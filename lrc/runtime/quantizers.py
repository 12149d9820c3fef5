"""The one home of calls into ONNX Runtime's own model tools: ``quantize_dynamic`` (INT8
DynamicQuantizeLinear + MatMulInteger), ``MatMulNBitsQuantizer`` (block-wise 2-8 bit weight-only)
and the transformer optimizer (fusions). ``lrc quantize`` / ``--quantize-rest``, ``lrc tune`` and
``lrc bench --baselines`` all go through these functions.

``model`` arguments are a path or an ``onnx.ModelProto``; outputs are written to ``dst``
(external data beside it when ``external``).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path


class _DropPreprocessHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in str(record.msg)


@contextlib.contextmanager
def quiet():
    """ONNX Runtime's quantisers are chatty on the root logger: ``quantize_dynamic`` logs
    "Please consider pre-processing" (calling ``logging.basicConfig`` when there is no handler)
    and importing ``matmul_nbits_quantizer`` runs ``logging.basicConfig(level=INFO)``, after
    which every node it touches prints a line. Drop the hint, keep the quantiser's own logger at
    WARNING, and undo any root-logger configuration made meanwhile."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    nbits = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    nbits_level = nbits.level
    nbits.setLevel(logging.WARNING)
    flt, null = _DropPreprocessHint(), None
    root.addFilter(flt)
    if not root.handlers:
        null = logging.NullHandler()
        root.addHandler(null)
    try:
        yield
    finally:
        root.removeFilter(flt)
        root.handlers[:] = handlers
        root.setLevel(level)
        nbits.setLevel(nbits_level)


def int8_dynamic(model, dst, *, per_channel: bool = True, nodes=None, exclude=None,
                 matmul_only: bool = False, external: bool = False) -> Path:
    """ORT's ``quantize_dynamic`` (QInt8 weights). ``matmul_only``: quantise only MatMuls with a
    constant weight (lrc's quantize_rest); otherwise ORT's default op list (the embedding
    Gather too, as a user running ``quantize_dynamic`` gets: the baseline)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    kw = {}
    if matmul_only:
        kw = {"op_types_to_quantize": ["MatMul"], "extra_options": {"MatMulConstBOnly": True}}
    with quiet():
        quantize_dynamic(model if not isinstance(model, Path) else str(model), str(dst),
                         per_channel=per_channel, weight_type=QuantType.QInt8,
                         nodes_to_quantize=nodes, nodes_to_exclude=exclude,
                         use_external_data_format=external, **kw)
    return Path(dst)


def matmul_nbits(model, dst, *, bits: int = 4, block_size: int = 32, symmetric: bool = True,
                 accuracy_level: int | None = None, exclude=None, external: bool = False) -> Path:
    """ORT's ``MatMulNBitsQuantizer`` (RTN, block-wise) on the MatMuls with a constant weight."""
    import onnx

    with quiet():
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        proto = onnx.load(str(model)) if isinstance(model, (str, Path)) else model
        q = MatMulNBitsQuantizer(proto, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                 accuracy_level=accuracy_level, nodes_to_exclude=exclude or [],
                                 op_types_to_quantize=("MatMul",))
        q.process()
        q.model.save_model_to_file(str(dst), use_external_data_format=external)
    return Path(dst)


def transformer_optimized(model, dst, *, model_type: str, num_heads: int = 0,
                          hidden_size: int = 0, use_gpu: bool = False,
                          external: bool = False) -> Path:
    """ORT's transformer optimizer (attention / layer-norm / GELU fusions) for ``model_type``."""
    from onnxruntime.transformers.optimizer import optimize_model

    m = optimize_model(str(model), model_type=model_type, num_heads=num_heads,
                       hidden_size=hidden_size, use_gpu=use_gpu)
    m.save_model_to_file(str(dst), use_external_data_format=external)
    return Path(dst)


def float16(model, dst, *, keep_io_types: bool = True) -> Path:
    """ONNX Runtime's float16 converter (``onnxruntime.transformers.float16``): weights and
    compute in float16; with ``keep_io_types`` the graph's inputs and outputs stay float32
    behind Casts (feeds and KV caches are built as for the float32 model). ``model``: a path
    (its external data is read) or an ``onnx.ModelProto``; written to ``dst`` as one file
    (the float16 model is half the size: one file up to 4 GB of float32 weights)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = onnx.load(str(model)) if not hasattr(model, "graph") else model
    m16 = convert_float_to_float16(proto, keep_io_types=keep_io_types)
    del proto
    onnx.save_model(m16, str(dst))
    return Path(dst)
