"""The one place lrc creates ONNX Runtime sessions.

Every caller (eval, bench, calibration, the sequential update, generate, verify, the output
checks, tune) opens its sessions here, so every session gets the same rules:

* intra- and inter-op thread spinning off: with several sessions alive in one process, the idle
  spinning threads of one session otherwise steal the cores of the next (a prototype measured
  impossible 6.5x speedups with spinning on);
* a model given as a :class:`~lrc.modelref.ModelRef` or a path is run from the reference's file
  (:func:`lrc.modelref.resolve`: the same folder rules as every command); given as bytes or a
  ``ModelProto``, its external data is found beside ``path`` (the file it came from), or in the
  folder ``path``'s weights were spilled to (:func:`lrc.graph.model.external_folder`: a large
  single file loaded by ``lrc.graph.model``); the session keeps the reference
  (``session.lrc_ref``): feeds read the model's configuration from it;
* a provider is named by alias or ORT name (:mod:`lrc.runtime.providers`); a GPU provider gets the
  CPU EP behind it for unsupported nodes, and ``strict`` refuses a session that silently fell
  back to the CPU for everything (missing CUDA libraries);
* ORT's errors become one line of ``LrcError``.

``numpy_dtype`` is the one map from ORT's type strings ("tensor(float)") to numpy.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lrc.errors import LrcError
from lrc.runtime.providers import lookup

_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
    "tensor(bfloat16)": np.float32,  # best effort: numpy has no bfloat16
}


def numpy_dtype(ort_type: str, default=np.float32) -> np.dtype:
    """numpy dtype of an ORT type string such as ``tensor(float16)``."""
    t = _NUMPY.get(ort_type, default)
    return np.dtype(t) if t is not None else None


def options(threads: int | None = None, *, inter_op: int | None = None,
            optimization: str | None = None, profile_prefix: str | None = None,
            external_folder: str | os.PathLike | None = None, log_severity: int | None = None,
            prepack: bool = True, arena: bool = True):
    """``SessionOptions`` with spinning off. ``optimization``: None (ORT's default, all),
    "disable", "basic", "extended" or "all". ``prepack=False``: weights are not copied into
    ORT's packed layouts (a session that is only loaded, never timed, then keeps memory-mapped
    external weights mapped instead of holding a second copy). ``arena=False``: no CPU memory
    arena (each tensor malloc'd and freed; for sessions that run a few batches and are closed,
    like calibration's and the update's segments: an arena per session kept ~500 MB resident
    over SmolLM2's update, benchmarks/memory.py)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = int(threads)
    if inter_op:
        so.inter_op_num_threads = int(inter_op)
    if optimization is not None:
        levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        so.graph_optimization_level = levels[optimization]
    # ORT logs a failed session's error on stderr before raising it (as LrcError's one line):
    # only fatal messages, unless asked
    so.log_severity_level = int(log_severity) if log_severity is not None else (
        2 if os.environ.get("LRC_DEBUG") else 4)
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    if not arena:
        so.enable_cpu_mem_arena = False
        so.enable_mem_pattern = False
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    if external_folder is not None:
        # a model passed as bytes finds its external data (left on disk) in its file's folder
        so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                    str(Path(external_folder).resolve()))
    return so


def open_session(model, *, threads: int | None = None, provider: str = "cpu",
                 inter_op: int | None = None, optimization: str | None = None,
                 profile_prefix: str | None = None, log_severity: int | None = None,
                 path: str | os.PathLike | None = None, strict: bool = False, what: str = "",
                 prepack: bool = True, arena: bool = True, ref=None):
    """An ``onnxruntime.InferenceSession`` for ``model``: a model reference, a .onnx file or a
    model folder, the serialized bytes of a model, or an ``onnx.ModelProto``. ``path`` names the
    file bytes came from (external data beside it), ``ref`` the reference they belong to (the
    model's configuration). The session remembers its file as ``session.lrc_path`` (None for
    bytes without ``path``) and its reference as ``session.lrc_ref``."""
    import onnxruntime as ort

    data = None
    if isinstance(model, (bytes, bytearray)):
        data = bytes(model)
    elif hasattr(model, "SerializeToString"):
        data = model.SerializeToString()
    else:
        from lrc.modelref import resolve

        ref = resolve(model)
        path = ref.need_file("a session")
    external = None
    if data is not None and path is not None:
        from lrc.graph.model import external_folder

        external = external_folder(path)  # beside the file, or where its weights were spilled
    so = options(threads, inter_op=inter_op, optimization=optimization,
                 profile_prefix=profile_prefix, external_folder=external,
                 log_severity=log_severity, prepack=prepack, arena=arena)
    prov = lookup(provider).name
    fp16 = None  # float16 inputs, when the graph says so without a session (see below)
    if prov == "CPUExecutionProvider":
        graph = model.graph if hasattr(model, "SerializeToString") else (
            ref.graph.graph if data is None else None)
        if graph is not None:
            fp16 = float16_inputs(graph)
            if fp16:  # see below: decided from the graph, one session instead of two
                so.enable_mem_reuse = False
    providers = [prov] if prov == "CPUExecutionProvider" else [prov, "CPUExecutionProvider"]
    label = str(path) if path is not None else "the model"
    try:
        sess = ort.InferenceSession(data if data is not None else str(path), so, providers=providers)
        if prov == "CPUExecutionProvider" and fp16 is None and _float16_inputs(sess):
            # float16 inputs on the CPU EP (the model builder's fp16 graphs): ORT inserts Casts
            # around ops without float16 kernels and its memory planner then re-uses one of
            # their buffers across sequence lengths — the second decode step fails with "Shape
            # mismatch attempting to re-use buffer {1,1,576} != {1,6,576}" (ORT 1.32, in ORT
            # GenAI too, which cannot turn reuse off). Without buffer reuse they run.
            so.enable_mem_reuse = False
            sess = ort.InferenceSession(data if data is not None else str(path), so,
                                        providers=providers)
    except Exception as e:  # ORT raises its own exception types
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        via = "" if prov == "CPUExecutionProvider" else f" with {prov}"
        raise LrcError(f"onnxruntime cannot load {label}{what}{via}: {msg}") from e
    if strict and prov not in sess.get_providers():
        raise LrcError(f"{label}: {prov} is listed as available but the session fell back to "
                       f"{sess.get_providers()} (missing CUDA/cuDNN libraries?)")
    sess.lrc_path = str(path) if path is not None else None
    sess.lrc_ref = ref
    return sess


def _float16_inputs(sess) -> bool:
    return any(i.type == "tensor(float16)" for i in sess.get_inputs())


def float16_inputs(graph) -> bool:
    """A graph input (not an initializer) of type float16, read from the graph (an
    ``onnx.GraphProto``) itself: the model builder's fp16 graphs, which ORT's CPU EP fails
    with buffer reuse on (see :func:`open_session`)."""
    import onnx

    inits = {t.name for t in graph.initializer}
    return any(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
               for i in graph.input if i.name not in inits)


_ONNX_DOMAIN_OPS: set[str] = set()


def onnx_domain_ops() -> frozenset[str]:
    """The operators ONNX Runtime registers in the ONNX domain (its own among them:
    ``SimplifiedLayerNormalization``, ``RotaryEmbedding`` ...): what the onnx checker may not
    know and a session will run (:func:`lrc.graph.model.structural_check`)."""
    if not _ONNX_DOMAIN_OPS:
        from onnxruntime.capi import onnxruntime_pybind11_state as C

        _ONNX_DOMAIN_OPS.update(s.name for s in C.get_all_operator_schema()
                                if s.domain in ("", "ai.onnx"))
    return frozenset(_ONNX_DOMAIN_OPS)


def check_loads(path: str | os.PathLike) -> dict:
    """Can ONNX Runtime's CPU EP load the file (no graph optimisation, no weight prepacking, one
    thread)? A large single file is loaded as its graph with the weights in the spill folder
    (:func:`lrc.graph.model.spill`): ORT then maps them instead of copying the file's weights
    into memory next to the parsed protobuf."""
    from lrc.graph.model import spilled_proto
    from lrc.modelref import resolve

    p = resolve(path).need_file("a session")
    spilled = spilled_proto(p)
    if spilled is not None:
        proto, _keep = spilled  # _keep: the spill folder, alive while the session loads
        data = proto.SerializeToString()
        del proto
        open_session(data, path=p, threads=1, optimization="disable", log_severity=3,
                     prepack=False)
    else:
        open_session(p, threads=1, optimization="disable", log_severity=3, prepack=False)
    return {"ort_cpu_session": "ok"}
