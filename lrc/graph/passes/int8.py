"""INT8 low-rank factors: store ``A`` and ``B`` as int8 with one scale per output column.

Quantisation is symmetric per column: ``s_j = max_i |F_ij| / 127``, ``Fq = round(F / s)``, so
``F ≈ Fq · diag(s)``. Two graph forms, because ONNX Runtime's execution providers differ:

* ``dynamic`` (default for the CPU EP): exactly the pattern ``quantize_dynamic`` emits, which
  ORT's CPU graph optimiser fuses into ``DynamicQuantizeMatMul``::

      Xq, xs, xz = DynamicQuantizeLinear(X)           # one per distinct input (Q/K/V share it)
      Y = Cast(MatMulInteger(Xq, Fq, xz, 0), float) * (xs * s)

  Integer GEMMs on u8·s8: the fastest CPU form we measured (see BENCHMARKS.md). But the CUDA EP
  has no ``DynamicQuantizeLinear`` kernel, so there these nodes fall back to the CPU with
  device copies around them (ORT issues #7745, #12229).
* ``qdq`` (for CUDA and other GPU EPs): weight-only ``DequantizeLinear(Fq, s, axis=1)`` feeding the
  ordinary ``MatMul``. Every EP has both kernels, nothing falls back; the win is storage, the
  compute stays in floating point.

Only MatMuls written by the low-rank pass (metadata ``lrc.factor``) are touched; the dense
projections are left for ONNX Runtime's own quantisers.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lrc.graph.locate import FACTOR_META

FORMS = ("dynamic", "qdq")


def quantize_columns(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-column int8: (int8 matrix, float32 scales) with ``f ≈ q * scales``."""
    f = np.asarray(f, dtype=np.float32)
    amax = np.abs(f).max(axis=0)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(f / scale), -127, 127).astype(np.int8)
    return q, scale


class Int8FactorsPass(ir.passes.InPlacePass):
    def __init__(self, form: str = "dynamic"):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"int8 form must be one of {FORMS}")
        self.form = form
        self.record: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = [n for n in ir.traversal.RecursiveGraphIterator(graph)
                 if n.op_type == "MatMul" and n.metadata_props.get(FACTOR_META)
                 and n.inputs[1] is not None and n.inputs[1].const_value is not None
                 and n.inputs[1].const_value.dtype == ir.DataType.FLOAT]
        quantized: dict[str, tuple[ir.Value, ir.Value]] = {}
        dql: dict[int, tuple[ir.Value, ir.Value, ir.Value]] = {}
        err2 = tot2 = 0.0
        bytes_before = bytes_after = 0
        for node in nodes:
            w_val = node.inputs[1]
            if w_val.name not in quantized:
                w = w_val.const_value.numpy()
                q, s = quantize_columns(w)
                err2 += float(np.sum((q * s - w) ** 2))
                tot2 += float(np.sum(w.astype(np.float64) ** 2))
                bytes_before += w.nbytes
                bytes_after += q.nbytes + s.nbytes
                qv = _init(graph, f"{w_val.name}_q", q)
                sv = _init(graph, f"{w_val.name}_scale", s)
                quantized[w_val.name] = (qv, sv)
            qv, sv = quantized[w_val.name]
            if self.form == "qdq":
                self._qdq(graph, node, qv, sv)
            else:
                self._dynamic(graph, node, qv, sv, dql)
        for name in list(quantized):
            v = graph.initializers.get(name)
            if v is not None and not v.uses():
                del graph.initializers[name]
        self.record = {
            "form": self.form, "factors": len(quantized), "nodes": len(nodes),
            "rel_error": float(np.sqrt(err2 / tot2)) if tot2 else 0.0,
            "bytes_before": bytes_before, "bytes_after": bytes_after,
            "summary": (f"{len(quantized)} factor matrices stored as int8 ({self.form} form), "
                        f"{bytes_before / 1e6:.1f} -> {bytes_after / 1e6:.1f} MB, "
                        f"weight rel error {np.sqrt(err2 / tot2) if tot2 else 0:.4f}"),
        }
        return ir.passes.PassResult(model, modified=bool(nodes))

    def _qdq(self, graph, node, qv, sv):
        out = ir.Value(name=_fresh(graph, f"{qv.name}_dq"))
        dq = ir.Node("", "DequantizeLinear", [qv, sv], attributes=[ir.AttrInt64("axis", 1)],
                     outputs=[out], name=f"{node.name}/dq")
        node.graph.insert_before(node, dq)
        node.replace_input_with(1, out)

    def _dynamic(self, graph, node, qv, sv, dql):
        x = node.inputs[0]
        key = (id(x), id(node.graph))  # a quantised input is shared only within one graph
        if key not in dql:
            outs = [ir.Value(name=_fresh(graph, f"{x.name}_{t}")) for t in ("q", "scale", "zp")]
            producer = ir.Node("", "DynamicQuantizeLinear", [x], outputs=outs,
                               name=f"{node.name}/dql")
            node.graph.insert_before(node, producer)
            dql[key] = tuple(outs)
        xq, xs, xz = dql[key]
        zp = _init(graph, f"{qv.name}_zp", np.zeros(qv.const_value.shape[1], np.int8))
        acc = ir.Value(name=_fresh(graph, f"{node.name}_int32"))
        mmi = ir.Node("", "MatMulInteger", [xq, qv, xz, zp], outputs=[acc], name=f"{node.name}/mmi")
        fl = ir.Value(name=_fresh(graph, f"{node.name}_f32"))
        cast = ir.Node("", "Cast", [acc], attributes=[ir.AttrInt64("to", 1)], outputs=[fl],
                       name=f"{node.name}/cast")
        sc = ir.Value(name=_fresh(graph, f"{node.name}_scale"))
        smul = ir.Node("", "Mul", [xs, sv], outputs=[sc], name=f"{node.name}/scale")
        node.graph.insert_before(node, [mmi, cast, smul])
        # The original MatMul node becomes the final Mul, keeping its output value and name.
        out = node.outputs[0]
        meta = dict(node.metadata_props)
        new = ir.Node("", "Mul", [fl, sc], num_outputs=1, name=node.name, metadata_props=meta)
        node.graph.insert_before(node, new)
        new.outputs[0].type, new.outputs[0].shape = out.type, out.shape
        out.replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
        node.graph.remove(node, safe=True)
        new.outputs[0].name = out.name


def _init(graph: ir.Graph, name: str, arr: np.ndarray) -> ir.Value:
    name = _fresh(graph, name)
    v = ir.Value(name=name, const_value=ir.tensor(arr, name=name))
    v.shape = ir.Shape(arr.shape)
    v.dtype = v.const_value.dtype
    graph.register_initializer(v)
    return v


def _fresh(graph: ir.Graph, name: str) -> str:
    from lrc.graph.passes.lowrank import _unique_name

    return _unique_name(graph, name)
