"""Embedding tables stored quantised: ``Gather(table, ids)`` on a large float table.

In the form the target runtime declares for embeddings (:mod:`lrc.graph.passes.qforms`):

* ``gbq``: ``com.microsoft.GatherBlockQuantized`` with the table quantised along its rows in
  blocks of ``block_size`` (4 or 8 bits, symmetric: :func:`lrc.quantmath.quantize_blockwise`),
  one table for every Gather of it;
* ``dq-row``: ``Gather(DequantizeLinear(int8 table, one scale per row, axis=0), ids)``
  (float32 tables; a float16 one stays float16, with a note).

The table is a constant initializer, or — the tied layout of ONNX Runtime GenAI's model
builder, whose embedding reads ``Transpose`` of the head's ``[hidden, vocab]`` weight — the
transpose of one. It is quantised only when nothing but Gathers (and Transposes no one reads any
more: a tied head the quantisation pass already replaced) uses it, and holds at least
``EMBED_MIN`` values (positions and token types stay float). Rows are independent, so a 262k-row
vocabulary is quantised 4096 rows at a time. What was done goes into the quantisation's record
(``QuantRecord.embeddings``): the pass runs right after :class:`~lrc.graph.passes.quant.QuantizePass`.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lrc.graph.passes.lowrank import add_initializer, unique_name
from lrc.graph.passes.qforms import MS, replace_node, scales_value, table as _table
from lrc.graph.passes.quant import EMBED_MIN, EMBEDDING, QuantRecord, QuantSpec
from lrc.quantmath import quantize_blockwise, quantize_columns, valid_block_size


class EmbeddingPass(ir.passes.InPlacePass):
    """Quantise the large embedding tables (``spec.embedding`` bits, ``spec.block_size`` rows
    per block), recording each into ``record.embeddings``."""

    def __init__(self, spec: QuantSpec, record: QuantRecord, tied_codes: dict | None = None):
        super().__init__()
        self.spec = spec
        self.record = record
        # QuantizePass.tied_codes (filled when that pass runs): a tied head's codes
        self.tied_codes = tied_codes if tied_codes is not None else {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = len(self.record.embeddings)
        if self.spec.embedding != "float":
            self._embeddings(model.graph)
        return ir.passes.PassResult(model, modified=len(self.record.embeddings) > before)

    def _embeddings(self, graph: ir.Graph) -> None:
        bits = EMBEDDING[self.spec.embedding]
        standard = self.spec.embedding_form.name == "dq-row"
        bs = self.spec.block_size if valid_block_size(self.spec.block_size) else 32
        done: dict = {}
        for node in list(ir.traversal.RecursiveGraphIterator(graph)):
            if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
                continue
            tab = _table(node)
            if tab is None:
                continue
            table, tv = tab.value, tab.tensor
            if tv.dtype != ir.DataType.FLOAT and standard:
                note = (f"float16 embedding table {table.name!r} stays float16 (the standard "
                        f"form's per-row int8 is written for float32 tables only)")
                if note not in self.record.notes:
                    self.record.notes.append(note)
                continue
            fdt = np.float16 if tv.dtype == ir.DataType.FLOAT16 else np.float32
            v, k = tab.shape
            axis = node.attributes.get("axis")
            if v * k < EMBED_MIN or k % bs or (axis is not None and axis.as_int() != 0):
                continue
            if not tab.only_gathers():
                continue
            head = self.tied_codes.get(id(table))
            hbs = _block_of(head) if head is not None else bs  # the head's own block size
            if head is not None and not standard and self._shares(head, bits, hbs, k, tv):
                dv, sv = self._shared_table(graph, table, head, v, k, bits, hbs)
                _to_gbq(node, dv, sv, bits, hbs)
                self.record.embeddings.append({
                    "name": node.name, "table": table.name, "shape": [v, k], "bits": bits,
                    "block_size": hbs, "bytes_before": int(tv.nbytes), "bytes_after": 0,
                    "shared_with": head[0].name})
                tab.drop(graph)
                continue
            if standard:
                if id(table) not in done:
                    q, s = quantize_columns(tab.rows().T, 127)  # per row of the table
                    qv = add_initializer(graph, f"{table.name}_q8", np.ascontiguousarray(q.T))
                    sv = add_initializer(graph, f"{table.name}_rowscale", s)
                    out = ir.Value(name=unique_name(graph, f"{table.name}_dq"))
                    graph.insert_before(graph[0], ir.Node(
                        "", "DequantizeLinear", [qv, sv], outputs=[out],
                        attributes=[ir.AttrInt64("axis", 0)], name=f"{table.name}/lrc_dq"))
                    done[id(table)] = (out, q.nbytes + s.nbytes)
                out, nbytes = done[id(table)]
                node.replace_input_with(0, out)
                self.record.embeddings.append({
                    "name": node.name, "table": table.name, "shape": [v, k], "bits": 8,
                    "block_size": None, "bytes_before": int(tv.nbytes),
                    "bytes_after": int(nbytes)})
                tab.drop(graph)
                continue
            if id(table) not in done:  # one quantised table for every Gather of it
                # rows are independent: quantise 4096 at a time (a 262k-row vocabulary would
                # otherwise hold several float copies of the whole table at once)
                rows = tab.rows()
                parts = [quantize_blockwise(np.ascontiguousarray(rows[i:i + 4096].T,
                                                                 dtype=np.float32), bits, bs)
                         for i in range(0, v, 4096)]
                del rows
                packed = np.concatenate([p.packed.reshape(p.n, -1) for p in parts])
                scales = np.concatenate([p.scales for p in parts])
                del parts
                sv, s_bytes = scales_value(graph, f"{table.name}_gbq_scales", scales, fdt,
                                           self.spec.scales)
                done[id(table)] = (add_initializer(graph, f"{table.name}_gbq{bits}", packed),
                                   sv, packed.nbytes + s_bytes)
            dv, sv, nbytes = done[id(table)]
            _to_gbq(node, dv, sv, bits, bs)
            self.record.embeddings.append({
                "name": node.name, "table": table.name, "shape": [v, k], "bits": bits,
                "block_size": bs, "bytes_before": int(tv.nbytes), "bytes_after": int(nbytes)})
            tab.drop(graph)


    @staticmethod
    def _shares(head, bits: int, bs: int, k: int, tv) -> bool:
        """The tied head's MatMulNBits holds the table's codes: same bits, block size, width
        (its K is the table's, or the table's plus a concat correction's rows)."""
        node, k_w = head
        attr = {a.name: a.as_int() for a in node.attributes.values()
                if a.name in ("bits", "block_size", "K")}
        return (attr.get("bits") == bits and attr.get("block_size") == bs and k_w == k
                and attr.get("K", 0) >= k and not k % bs
                and node.inputs[2].dtype == tv.dtype)  # (float16 on disk: cast back)

    def _shared_table(self, graph: ir.Graph, table: ir.Value, head, v: int, k: int, bits: int,
                      bs: int) -> tuple[ir.Value, ir.Value]:
        """The head's packed codes ``[V, K'/bs, bs·bits/8]`` and scales ``[V·K'/bs]`` as a
        GatherBlockQuantized table ``[V, K·bits/8]`` with scales ``[V, K/bs]``: the first
        ``K/bs`` blocks of each row (the rest, when there are, are the concat correction's
        ``B``), sliced and reshaped in the graph — one copy of the codes on disk."""
        node, _ = head
        packed, scales = node.inputs[1], node.inputs[2]
        nb = int(packed.const_value.shape[1])
        kb = k // bs

        nodes: list[ir.Node] = []

        def const(name, arr):
            return add_initializer(graph, f"{table.name}_{name}", np.asarray(arr, np.int64))

        def op(kind, inputs, name):
            out = ir.Value(name=unique_name(graph, f"{table.name}/lrc_shared_{name}"))
            nodes.append(ir.Node("", kind, inputs, outputs=[out],
                                 name=f"{table.name}/lrc_shared_{name}"))
            return out

        data = packed
        if nb != kb:
            data = op("Slice", [packed, const("s0", [0, 0, 0]),
                                const("s1", [v, kb, bs * bits // 8])], "codes_slice")
        data = op("Reshape", [data, const("shape", [v, k * bits // 8])], "codes")
        sc = op("Reshape", [scales, const("sshape", [v, nb])], "scales_rows")
        if nb != kb:
            sc = op("Slice", [sc, const("t0", [0, 0]), const("t1", [v, kb])], "scales")
        cast = scales.producer()  # float16 scales on disk: after their Cast
        if cast is not None:
            graph.insert_after(cast, nodes)
        else:
            graph.insert_before(graph[0], nodes)
        return data, sc


def _block_of(head) -> int:
    """The block size a tied head's MatMulNBits was written with."""
    a = head[0].attributes.get("block_size")
    return a.as_int() if a is not None else 0


__all__ = ["EmbeddingPass"]


def _to_gbq(node: ir.Node, codes: ir.Value, scales: ir.Value, bits: int, bs: int) -> None:
    """``node`` (a Gather of a table) replaced by ``GatherBlockQuantized`` of the codes."""
    replace_node(node, ir.Node(MS, "GatherBlockQuantized", [codes, node.inputs[1], scales],
                               attributes=[ir.AttrInt64("bits", bits),
                                           ir.AttrInt64("block_size", bs),
                                           ir.AttrInt64("gather_axis", 0),
                                           ir.AttrInt64("quantize_axis", 1)],
                               num_outputs=1, name=node.name))
