"""Quantised node forms: how a quantised weight MatMul (or embedding table) is written in ONNX.

A runtime runs some of these forms and not others; each runtime declares the ones it runs
(:data:`lrc.runtime.runtimes.RUNTIMES`, ``forms``) and the quantisation pass writes the form
its target declares for each scheme. The forms:

* weight MatMuls (:data:`FORMS`, ``Y = X·W``):

  - ``nbits``: ``com.microsoft.MatMulNBits`` — ONNX Runtime's block-wise 4/8-bit weight-only
    op (``accuracy_level`` 4: int8 compute on the CPU, the fast path); takes float16 inputs;
  - ``dq-block``: ``MatMul(X, DequantizeLinear(codes, scales, axis=0, block_size))`` — the same
    math in standard ONNX (int4 and blocks need opset 21);
  - ``dqmatmul``: ``com.microsoft.DynamicQuantizeMatMul`` — activations quantised per tensor at
    run time, int8 weights per output column (7 bits: |q| <= 63, see
    :mod:`lrc.graph.passes.int8`);
  - ``dynamic``: ``DynamicQuantizeLinear`` + ``MatMulInteger`` (standard, opset 10), the same
    codes;
  - ``dq-column``: ``MatMul(X, DequantizeLinear(int8, per-column scale, axis=1))`` (standard,
    opset 13), 8-bit weight-only;

* embedding tables (:data:`EMBEDDING_FORMS`, ``Gather(table, ids)``): ``gbq``
  (``com.microsoft.GatherBlockQuantized``, rows in blocks, 4 or 8 bits) and ``dq-row``
  (``Gather(DequantizeLinear(int8 table, one scale per row, axis=0), ids)``, 8 bits).

A :class:`QForm` says what it is (block-wise codes or per-column int8, float16 inputs, the
ONNX Runtime domain, the opset) and writes one node (``emit``); a new form is one entry here
and its test, and a runtime that runs it lists its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir

from lrc.graph.passes.lowrank import add_initializer, unique_name
from lrc.quantmath import BlockQuant, signed_codes

MS = "com.microsoft"
DQ_BLOCK_OPSET = 21  # DequantizeLinear's block_size and int4 arrived in opset 21

# emit(graph, target, codes, x, ctx) -> (the node computing Y, or None when the emitter put it
# in place itself, bytes stored); codes: a BlockQuant (block-wise) or (int8 [K, N], scale [N]);
# ctx: {"accuracy_level": int, "float": numpy dtype of the node's compute, "shared": dict}
Emit = Callable[[ir.Graph, object, object, ir.Value, dict], "tuple[ir.Node | None, int]"]


@dataclass(frozen=True)
class QForm:
    """One way of writing a quantised weight MatMul. ``blockwise``: block-wise codes along K
    (4 or 8 bits, a correction can ride in the same node: the concat form); otherwise int8 per
    output column. ``float16``: takes float16 activations. ``ms``: an ONNX Runtime contrib op.
    ``opset``: the standard opset it needs (0: any). ``title(bits, spec)``: the line a summary
    shows."""

    name: str
    help: str
    blockwise: bool
    float16: bool
    ms: bool
    emit: Emit
    title: Callable[[int, object], str]
    opset: int = 0


def scales_value(graph: ir.Graph, name: str, scales: np.ndarray, compute,
                 store: str) -> tuple[ir.Value, int]:
    """Block scales for an ONNX Runtime contrib op that multiplies in ``compute`` (a numpy
    float dtype), as an initializer: ``(value, bytes on disk)``. With ``store`` "float16" and
    a float32 op they are kept on disk in float16 and cast back in the graph (``Cast`` of an
    initializer: ONNX Runtime folds it when the session loads, so its kernels read float32
    scales as before; a float32 scale is 1 bit per weight at 4 bits in blocks of 32, a float16
    one half of that); otherwise in ``compute``. The Cast goes first in ``graph`` (it reads
    an initializer only)."""
    if store != "float16" or np.dtype(compute) != np.float32:
        v = add_initializer(graph, name, scales.astype(compute))
        return v, v.const_value.nbytes
    half = add_initializer(graph, f"{name}_f16", scales.astype(np.float16))
    out = ir.Value(name=unique_name(graph, name), type=ir.TensorType(ir.DataType.FLOAT),
                   shape=ir.Shape(scales.shape))
    cast = ir.Node("", "Cast", [half], outputs=[out], attributes=[
        ir.AttrInt64("to", ir.DataType.FLOAT.value)], name=f"{out.name}/lrc_cast")
    graph.insert_before(graph[0], cast)
    return out, half.const_value.nbytes


def scale_itemsize(compute, store: str) -> int:
    """Bytes of one block scale on disk (:func:`scales_value`)."""
    return 2 if store == "float16" else np.dtype(compute).itemsize


def _nbits(graph, t, bq: BlockQuant, x, ctx) -> tuple[ir.Node, int]:
    """``MatMulNBits(x, bq)``; accuracy_level is the pass's (one for every node); the scales
    stored as ``ctx["scales"]`` says (:func:`scales_value`)."""
    pv = add_initializer(graph, f"{t.weight.name}_Q{bq.bits}", bq.packed)
    sv, s_bytes = scales_value(graph, f"{t.weight.name}_scales", bq.scales.reshape(-1),
                               ctx["float"], ctx.get("scales", "float32"))
    attrs = [ir.AttrInt64("K", bq.k), ir.AttrInt64("N", bq.n), ir.AttrInt64("bits", bq.bits),
             ir.AttrInt64("block_size", bq.block_size)]
    if ctx["accuracy_level"]:
        attrs.append(ir.AttrInt64("accuracy_level", ctx["accuracy_level"]))
    node = ir.Node(MS, "MatMulNBits", [x, pv, sv], attributes=attrs, num_outputs=1,
                   name=t.name)
    return node, bq.packed.nbytes + s_bytes


def _dq_block(graph, t, bq: BlockQuant, x, ctx) -> tuple[ir.Node, int]:
    """``MatMul(x, DequantizeLinear(codes [K, N], scales [K/block, N], axis=0,
    block_size))``: the standard form of MatMulNBits' math (symmetric, zero point 0)."""
    cv = add_initializer(graph, f"{t.weight.name}_i{bq.bits}", signed_codes(bq))
    sv = add_initializer(graph, f"{t.weight.name}_scales", np.ascontiguousarray(bq.scales.T))
    w = ir.Value(name=unique_name(graph, f"{t.name}/lrc_dq_out"))
    dq = ir.Node("", "DequantizeLinear", [cv, sv], outputs=[w], name=f"{t.name}/lrc_dq",
                 attributes=[ir.AttrInt64("axis", 0),
                             ir.AttrInt64("block_size", bq.block_size)])
    t.node.graph.insert_before(t.node, dq)
    return ir.Node("", "MatMul", [x, w], num_outputs=1, name=t.name), bq.nbytes


def _column_initializers(graph, t, qz) -> tuple[ir.Value, ir.Value, int]:
    q, s = qz
    qv = add_initializer(graph, f"{t.weight.name}_q8", q)
    sv = add_initializer(graph, f"{t.weight.name}_scale", s)
    return qv, sv, q.nbytes + s.nbytes


def _dqmatmul(graph, t, qz, x, ctx) -> tuple[ir.Node, int]:
    qv, sv, nbytes = _column_initializers(graph, t, qz)
    return ir.Node(MS, "DynamicQuantizeMatMul", [x, qv, sv], num_outputs=1, name=t.name), nbytes


def _standard_int8(which: str) -> Emit:
    """A plain MatMul on the int8 codes put in place, then rewritten by one of
    :mod:`lrc.graph.passes.int8`'s forms (``dynamic`` or ``qdq``)."""

    def emit(graph, t, qz, x, ctx) -> tuple[None, int]:
        from lrc.graph.passes.int8 import FORMS

        qv, sv, nbytes = _column_initializers(graph, t, qz)
        mm = ir.Node("", "MatMul", [x, qv], num_outputs=1, name=t.name)
        replace_node(t.node, mm)
        t.node = FORMS[which].rewrite(graph, mm, qv, sv, ctx["shared"])
        return None, nbytes

    return emit


def replace_node(old: ir.Node, new: ir.Node) -> None:
    """Put ``new`` where ``old`` is: ``new``'s output takes over ``old``'s output value's uses,
    graph outputs and name; ``old`` is removed."""
    out = old.outputs[0]
    old.graph.insert_before(old, new)
    nv = new.outputs[0]
    nv.type, nv.shape = out.type, out.shape
    out.replace_all_uses_with(nv, replace_graph_outputs=True)
    old.graph.remove(old, safe=True)
    nv.name = out.name


FORMS: dict[str, QForm] = {f.name: f for f in (
    QForm("nbits", "com.microsoft.MatMulNBits, block-wise 4/8-bit", True, True, True, _nbits,
          lambda bits, s: f"{bits}-bit MatMulNBits, block {s.block_size}, accuracy_level "
                          f"{s.accuracy_level}"),
    QForm("dq-block", "block-wise DequantizeLinear (opset 21) + MatMul", True, False, False,
          _dq_block, lambda bits, s: f"{bits}-bit DequantizeLinear, block {s.block_size} (opset "
                                     f"{DQ_BLOCK_OPSET}) + MatMul", opset=DQ_BLOCK_OPSET),
    QForm("dqmatmul", "com.microsoft.DynamicQuantizeMatMul, int8 per column", False, False,
          True, _dqmatmul,
          lambda bits, s: "INT8 dynamic (DynamicQuantizeMatMul, 7-bit per-column weights)"),
    QForm("dynamic", "DynamicQuantizeLinear + MatMulInteger", False, False, False,
          _standard_int8("dynamic"),
          lambda bits, s: "INT8 dynamic (DynamicQuantizeLinear + MatMulInteger, 7-bit "
                          "per-column weights)"),
    QForm("dq-column", "per-column DequantizeLinear + MatMul, 8-bit weight-only", False, False,
          False, _standard_int8("qdq"),
          lambda bits, s: "8-bit per-column DequantizeLinear + MatMul"),
)}


@dataclass(frozen=True)
class EmbeddingForm:
    """One way of writing a quantised embedding table: the bits it stores, whether it is an
    ONNX Runtime contrib op, the words a summary uses."""

    name: str
    bits: tuple[int, ...]
    ms: bool
    title: str


EMBEDDING_FORMS: dict[str, EmbeddingForm] = {f.name: f for f in (
    EmbeddingForm("gbq", (4, 8), True, "GatherBlockQuantized"),
    EmbeddingForm("dq-row", (8,), False, "per-row DequantizeLinear + Gather"),
)}


def default_forms() -> dict[str, str]:
    """Each scheme's ONNX Runtime form, the pass's default when no runtime names its own:
    the first contrib-op form that fits the scheme (block-wise for int4 / int8-weight, per
    column for int8)."""
    first = {True: next(f.name for f in FORMS.values() if f.ms and f.blockwise),
             False: next(f.name for f in FORMS.values() if f.ms and not f.blockwise)}
    return {"int4": first[True], "int8-weight": first[True], "int8": first[False],
            "embedding": next(f.name for f in EMBEDDING_FORMS.values() if f.ms)}


class Table:
    """A Gather's table: a constant ``[V, K]`` initializer, or — the tied layout of ONNX Runtime
    GenAI's model builder — ``Transpose`` of the head's ``[K, V]`` weight, once the head
    MatMul no longer reads it (quantised). ``value`` is the initializer either way."""

    def __init__(self, value: ir.Value, transpose: ir.Node | None):
        self.value, self.transpose = value, transpose
        self.tensor = value.const_value
        d = [int(x) for x in self.tensor.shape]
        self.shape = (d[1], d[0]) if transpose is not None else (d[0], d[1])

    def rows(self) -> np.ndarray:
        """The table, ``[V, K]``."""
        a = self.tensor.numpy()
        return np.ascontiguousarray(a.T) if self.transpose is not None else a

    def only_gathers(self) -> bool:
        """Nothing but Gathers (and Transposes no one reads any more) reads the table."""
        if self.transpose is None:
            return all(u.op_type == "Gather" or (u.op_type == "Transpose"
                                                 and not u.outputs[0].uses())
                       for u, _ in self.value.uses())
        out = self.transpose.outputs[0]
        return (not out.is_graph_output() and all(u.op_type == "Gather" for u, _ in out.uses())
                and all(u.op_type == "Transpose" for u, _ in self.value.uses()))

    def drop(self, graph: ir.Graph) -> None:
        """The float table, once no Gather reads it (nor the quantised head's old Transpose)."""
        for u, _ in list(self.value.uses()):
            if u.op_type == "Transpose" and not u.outputs[0].uses() \
                    and not u.outputs[0].is_graph_output():
                u.graph.remove(u, safe=True)
        if not self.value.uses() and graph.initializers.get(self.value.name) is self.value:
            del graph.initializers[self.value.name]


def table(node: ir.Node) -> Table | None:
    """The float table ``node`` (a Gather) reads, direct or through a Transpose of a constant;
    None for anything else."""
    table = node.inputs[0]
    if table is None:
        return None
    transpose = None
    if table.const_value is None:
        tp = table.producer()
        perm = tp.attributes.get("perm") if tp is not None else None
        if (tp is None or tp.op_type != "Transpose" or tp.domain not in ("", "ai.onnx")
                or tp.inputs[0] is None or tp.inputs[0].const_value is None
                or (perm is not None and list(perm.as_ints()) != [1, 0])):
            return None
        table, transpose = tp.inputs[0], tp
    tv = table.const_value
    if len(tv.shape) != 2 or tv.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
        return None
    return Table(table, transpose)


__all__ = ["DQ_BLOCK_OPSET", "EMBEDDING_FORMS", "EmbeddingForm", "FORMS", "MS", "QForm",
           "Table", "default_forms", "replace_node", "table"]
