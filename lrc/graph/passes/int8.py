"""INT8 low-rank factors: store ``A`` and ``B`` as int8 with one scale per output column.

Quantisation is symmetric per column: ``s_j = max_i |F_ij| / qmax``, ``Fq = round(F / s)``, so
``F ≈ Fq · diag(s)``; ``qmax`` is 127, or 63 for the dynamic form (see ``_U8S8_SAFE``). Two graph forms, because ONNX Runtime's execution providers differ:

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
projections are left for ONNX Runtime's own quantisers. The pass ``requires`` such factors (it
refuses a model the low-rank pass has not rewritten) and ``ensures`` none is left in float.

A new form is one entry in ``FORMS`` (a :class:`Form`: its name, the help line the CLI shows
and the function that rewrites one factor MatMul) and its test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir

from lrc.errors import LrcError, opt
from lrc.graph.locate import FACTOR_META
from lrc.graph.passes.lowrank import add_initializer, unique_name
from lrc.quantmath import quantize_columns


def factor_matmuls(graph: ir.Graph) -> list[ir.Node]:
    """The float factor MatMuls of the low-rank pass (metadata ``lrc.factor``, constant weight)."""
    return [n for n in ir.traversal.RecursiveGraphIterator(graph)
            if n.op_type == "MatMul" and n.metadata_props.get(FACTOR_META)
            and n.inputs[1] is not None and n.inputs[1].const_value is not None
            and n.inputs[1].const_value.dtype == ir.DataType.FLOAT]


class Int8FactorsPass(ir.passes.InPlacePass):
    """Store the low-rank factors as int8 in one of the ``FORMS``; ``self.record`` says how."""

    def __init__(self, form: str = "dynamic"):
        super().__init__()
        self.form = get_form(form)
        self.record: dict = {}

    def requires(self, model: ir.Model) -> None:
        if not factor_matmuls(model.graph) and any(
                n.op_type == "MatMul" and n.metadata_props.get(FACTOR_META)
                for n in ir.traversal.RecursiveGraphIterator(model.graph)):
            raise LrcError(f"{opt('int8')} on a float16 model: its factors are float16 and the "
                           "int8 forms (DynamicQuantizeLinear, MatMulInteger) take float32 "
                           f"activations; use {opt('quantize', 'int4')} or int8-weight "
                           "(MatMulNBits runs "
                           "float16) or compress the float32 export")
        if not factor_matmuls(model.graph):
            raise ir.passes.PreconditionError(
                "Int8FactorsPass needs the low-rank pass's float factors (MatMuls with node "
                f"metadata {FACTOR_META!r}); this model has none: run LowRankPass first")

    def ensures(self, model: ir.Model) -> None:
        left = [n.name for n in factor_matmuls(model.graph)]
        if left:
            raise ir.passes.PostconditionError(f"factor MatMuls left in float: {left[:5]}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = factor_matmuls(graph)
        quantized: dict[str, tuple[ir.Value, ir.Value]] = {}
        shared: dict = {}  # what a form builds once per input (the dynamic form's quantised X)
        err2 = tot2 = 0.0
        bytes_before = bytes_after = 0
        for node in nodes:
            w_val = node.inputs[1]
            if w_val.name not in quantized:
                w = w_val.const_value.numpy()
                q, s = quantize_columns(w, self.form.qmax)
                err2 += float(np.sum((q * s - w) ** 2))
                tot2 += float(np.sum(w.astype(np.float64) ** 2))
                bytes_before += w.nbytes
                bytes_after += q.nbytes + s.nbytes
                qv = add_initializer(graph, f"{w_val.name}_q", q)
                sv = add_initializer(graph, f"{w_val.name}_scale", s)
                quantized[w_val.name] = (qv, sv)
            qv, sv = quantized[w_val.name]
            self.form.rewrite(graph, node, qv, sv, shared)
        for name in list(quantized):
            v = graph.initializers.get(name)
            if v is not None and not v.uses():
                del graph.initializers[name]
        form = self.form.name
        self.record = {
            "form": form, "factors": len(quantized), "nodes": len(nodes),
            "rel_error": float(np.sqrt(err2 / tot2)) if tot2 else 0.0,
            "bytes_before": bytes_before, "bytes_after": bytes_after,
            "summary": (f"{len(quantized)} factor matrices stored as int8 ({form} form), "
                        f"{bytes_before / 1e6:.1f} -> {bytes_after / 1e6:.1f} MB, "
                        f"weight rel error {np.sqrt(err2 / tot2) if tot2 else 0:.4f}"),
        }
        return ir.passes.PassResult(model, modified=bool(nodes))


def _qdq(graph: ir.Graph, node: ir.Node, qv: ir.Value, sv: ir.Value, shared: dict) -> ir.Node:
    """Weight-only: ``MatMul(X, DequantizeLinear(Fq, s, axis=1))``. Returns the MatMul."""
    out = ir.Value(name=unique_name(graph, f"{qv.name}_dq"))
    dq = ir.Node("", "DequantizeLinear", [qv, sv], attributes=[ir.AttrInt64("axis", 1)],
                 outputs=[out], name=f"{node.name}/dq")
    node.graph.insert_before(node, dq)
    node.replace_input_with(1, out)
    return node


def _dynamic(graph: ir.Graph, node: ir.Node, qv: ir.Value, sv: ir.Value, dql: dict) -> ir.Node:
    """``Cast(MatMulInteger(DynamicQuantizeLinear(X), Fq), float) * (xs * s)``. Returns the
    final Mul (it takes ``node``'s place, output and name)."""
    x = node.inputs[0]
    key = (id(x), id(node.graph))  # a quantised input is shared only within one graph
    if key not in dql:
        outs = [ir.Value(name=unique_name(graph, f"{x.name}_{t}"))
            for t in ("q", "scale", "zp")]
        producer = ir.Node("", "DynamicQuantizeLinear", [x], outputs=outs,
                           name=f"{node.name}/dql")
        node.graph.insert_before(node, producer)
        dql[key] = tuple(outs)
    xq, xs, xz = dql[key]
    zp = add_initializer(graph, f"{qv.name}_zp", np.zeros(qv.const_value.shape[1], np.int8))
    acc = ir.Value(name=unique_name(graph, f"{node.name}_int32"))
    mmi = ir.Node("", "MatMulInteger", [xq, qv, xz, zp], outputs=[acc], name=f"{node.name}/mmi")
    fl = ir.Value(name=unique_name(graph, f"{node.name}_f32"))
    cast = ir.Node("", "Cast", [acc], attributes=[ir.AttrInt64("to", 1)], outputs=[fl],
                   name=f"{node.name}/cast")
    sc = ir.Value(name=unique_name(graph, f"{node.name}_scale"))
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
    return new


Rewrite = Callable[[ir.Graph, ir.Node, ir.Value, ir.Value, dict], ir.Node]


@dataclass(frozen=True)
class Form:
    """One int8 factor form: ``rewrite(graph, node, q, scale, shared)`` turns the float factor
    MatMul ``node`` into the form, given the int8 factor ``q`` and its per-column ``scale``
    (``shared``: a dict the form may keep per-model state in, e.g. one quantised input)."""

    name: str
    help: str
    rewrite: Rewrite
    qmax: int = 127  # largest |int8| the form stores


# u8 x s8 MatMulInteger runs on x86 CPUs without VNNI (AVX2, plain AVX-512) through VPMADDUBSW,
# which adds two u8*s8 products into a saturating int16: with weights up to 127 the pair reaches
# 255*127*2 > 32767 and results clip (measured on a 2-core AVX2 EPYC: max error 40921 on a
# 265645 dot product; a MiniLM with int8 factors fell to embedding cosine 0.04). 7-bit weights
# (|q| <= 63: 255*63*2 = 32130) never saturate — ORT's own remedy (quantize_dynamic's
# reduce_range) — at one bit of weight precision.
_U8S8_SAFE = 63


FORMS: dict[str, Form] = {f.name: f for f in (
    Form("dynamic", "DynamicQuantizeLinear+MatMulInteger, fastest on the CPU EP", _dynamic,
         qmax=_U8S8_SAFE),
    Form("qdq", "weight-only DequantizeLinear, for CUDA (no CPU fallback)", _qdq),
)}


def get_form(name: str) -> Form:
    """The :class:`Form` called ``name``; LrcError naming the known forms otherwise."""
    form = FORMS.get(name)
    if form is None:
        raise LrcError(f"int8 form must be {' or '.join(FORMS)}, got {name!r}")
    return form


def forms_help() -> str:
    """One line for ``--int8-form``: every form and what it is for."""
    return "; ".join(f"{f.name}: {f.help}" for f in FORMS.values()) + "."


__all__ = ["FORMS", "Form", "Int8FactorsPass", "factor_matmuls", "forms_help", "get_form",
           "quantize_columns"]
