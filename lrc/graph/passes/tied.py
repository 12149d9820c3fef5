"""Store a tied embedding once: the LM head reads the embedding table instead of its own copy.

A model with tied input / output embeddings computes ``logits = X·Eᵀ`` where ``E`` [V, H] is the
table an embedding ``Gather`` reads. Exporters sometimes write the head's weight as a second
initializer holding the same numbers -- ``W = Eᵀ`` [H, V] for ``MatMul(X, W)``, ``W = E`` for
``Gemm(X, W, transB=1)`` or ``MatMul(X, Transpose(W))`` -- which doubles the largest tensor of a
small LM on disk and in memory. Where the values are *exactly* equal (same dtype, same numbers),
the head is rewritten to read ``E`` itself:

* ``MatMul(X, W)``, ``W == Eᵀ``               ->  ``MatMul(X, Transpose(E))``
* ``MatMul(X, Transpose(W))``, ``W == E``     ->  ``MatMul(X, Transpose(E))``
* ``Gemm(X, W, transB=1)``, ``W == E``        ->  ``Gemm(X, E, transB=1)``
* ``Gemm(X, W, transB=0)``, ``W == Eᵀ``       ->  ``Gemm(X, E, transB=1)``

and ``W`` is dropped once nothing reads it. Outputs are bit-identical (the same numbers are
multiplied). ``Transpose(E)`` is what lrc's role detection already reads as a tied head
(:mod:`lrc.graph.locate`). ``record["shared"]`` lists each rewrite, ``record["left"]`` each
candidate left alone and why.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

_HEADS = ("MatMul", "Gemm")


def _init(v: ir.Value | None) -> ir.Value | None:
    """The 2-D value of an initializer that is not overridable as a graph input."""
    if v is None or not v.is_initializer() or v.is_graph_input() or v.const_value is None:
        return None
    shape = tuple(v.const_value.shape)
    return v if len(shape) == 2 else None


def _shape(v: ir.Value) -> tuple[int, ...]:
    return tuple(int(d) for d in v.const_value.shape)


def _equal(a: ir.Value, b: ir.Value, transposed: bool) -> bool:
    if a.const_value.dtype != b.const_value.dtype:
        return False
    x, y = a.const_value.numpy(), b.const_value.numpy()
    return np.array_equal(x, y.T if transposed else y)


class ShareTiedEmbedding(ir.passes.InPlacePass):
    """Rewrite heads that hold a copy of an embedding table to read the table (module docstring)."""

    def __init__(self):
        super().__init__()
        self.record: dict = {"shared": [], "left": [], "bytes_saved": 0}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        tables = []
        for node in graph:
            if node.op_type == "Gather" and node.inputs and _init(node.inputs[0]) is not None:
                if all(t is not node.inputs[0] for t in tables):
                    tables.append(node.inputs[0])
        if not tables:
            return ir.passes.PassResult(model, modified=False)
        dropped: list[ir.Value] = []
        for node in list(graph):
            if node.op_type in _HEADS and len(node.inputs) > 1 and node.inputs[1] is not None:
                self._head(graph, node, tables, dropped)
        for w in dropped:
            if not w.uses() and w.name in graph.initializers:
                self.record["bytes_saved"] += int(w.const_value.nbytes)
                graph.initializers.pop(w.name)
        return ir.passes.PassResult(model, modified=bool(self.record["shared"]))

    def _head(self, graph: ir.Graph, node: ir.Node, tables: list[ir.Value],
              dropped: list[ir.Value]) -> None:
        w_in = node.inputs[1]
        through = None  # a Transpose between the head and its weight
        if node.op_type == "MatMul" and w_in.producer() is not None:
            p = w_in.producer()
            perm = p.attributes.get("perm")
            if p.op_type != "Transpose" or (perm is not None and list(perm.as_ints()) != [1, 0]):
                return
            through, w_in = p, p.inputs[0]
        w = _init(w_in)
        if w is None or any(w is t for t in tables):
            return  # not a constant matrix, or already the table itself
        trans_b = node.op_type == "Gemm" and bool(
            node.attributes.get("transB") and node.attributes["transB"].as_int())
        # does W hold E (True) or Eᵀ (False) as the head reads it?
        as_is = trans_b or through is not None
        for e in tables:
            want = _shape(e) if as_is else _shape(e)[::-1]
            if _shape(w) != want:
                continue
            if not _equal(w, e, transposed=not as_is):
                self.record["left"].append({"node": node.name, "weight": w.name, "table": e.name,
                                            "reason": "same shape as the embedding, other values"})
                continue
            self._rewire(graph, node, through, w, e)
            dropped.append(w)
            self.record["shared"].append({"node": node.name, "op": node.op_type, "weight": w.name,
                                          "table": e.name, "shape": list(_shape(w))})
            return

    @staticmethod
    def _rewire(graph: ir.Graph, node: ir.Node, through: ir.Node | None, w: ir.Value,
                e: ir.Value) -> None:
        if through is not None:  # MatMul(X, Transpose(W)), W == E
            if len(through.outputs[0].uses()) == 1:
                through.replace_input_with(0, e)
                return
        if node.op_type == "Gemm":  # Gemm(X, E, transB=1)
            node.replace_input_with(1, e)
            node.attributes["transB"] = ir.AttrInt64("transB", 1)
            return
        t = ir.node("Transpose", [e], attributes={"perm": [1, 0]},
                    name=f"{node.name or 'head'}/tied_transpose")
        t.outputs[0].name = f"{e.name}_transposed_for_{node.name or 'head'}"
        t.outputs[0].dtype = e.dtype
        t.outputs[0].shape = ir.Shape(list(_shape(e))[::-1])
        graph.insert_before(node, t)
        node.replace_input_with(1, t.outputs[0])


__all__ = ["ShareTiedEmbedding"]
