"""Expose intermediate tensors of an ONNX graph, or cut out the part that computes them.

The one home of this surgery (no ONNX Runtime here): calibration exposes each projection's
input, ``lrc eval --layers`` exposes the rewritten nodes' outputs (``expose``, on protobufs), the
sequential update cuts the graph into segments between projections (``layout`` and
``cut_segment``, on onnx-ir models), the sensitivity probe into tails that start where a
weight is first read by data (``data_flow``, ``tail_nodes``, ``tail_proto``, on protobufs
whose replaceable weights are graph inputs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from lrc.errors import LrcError
from lrc.graph.model import is_stored

__all__ = ["Layout", "Segment", "cut_segment", "data_flow", "expose", "has_subgraphs", "layout",
           "node_reads", "tail_nodes", "tail_proto", "value_reads"]


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Names a node reads, including outer-scope names used inside its subgraphs."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        subs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for sub in subs:
            for inner in sub.node:
                names.extend(node_reads(inner))
    return names


def expose(model: onnx.ModelProto, wanted: list[str], prune: bool) -> list[str]:
    """Make ``wanted`` graph outputs (in place). Returns those that must come from the session
    (graph inputs are excluded: they are read from the feeds)."""
    g = model.graph
    inputs = {i.name for i in g.input}
    inits = {i.name for i in g.initializer}
    producer: dict[str, int] = {}
    for idx, node in enumerate(g.node):
        for out in node.output:
            if out:
                producer[out] = idx
    missing = [t for t in wanted if t not in producer and t not in inputs]
    if missing:
        const = [t for t in missing if t in inits]
        if const:
            raise LrcError(f"{const[0]!r} is an initializer (a constant), not an activation")
        raise LrcError(
            f"tensor {missing[0]!r} is not produced in the main graph of the model"
            + (f" ({len(missing)} such names)" if len(missing) > 1 else "")
        )
    from_session = [t for t in wanted if t not in inputs]
    existing = {o.name for o in g.output}
    if prune:
        needed = set(from_session)
        stack = list(from_session)
        keep: set[int] = set()
        while stack:
            idx = producer.get(stack.pop())
            if idx is None or idx in keep:
                continue
            keep.add(idx)
            for name in node_reads(g.node[idx]):
                if name not in needed:
                    needed.add(name)
                    stack.append(name)
        kept_nodes = [n for i, n in enumerate(g.node) if i in keep]
        kept_inits = [t for t in g.initializer if t.name in needed]
        kept_sparse = [t for t in g.sparse_initializer if t.values.name in needed]
        kept_vi = [v for v in g.value_info if v.name in needed]
        del g.node[:]
        g.node.extend(kept_nodes)
        del g.initializer[:]
        g.initializer.extend(kept_inits)
        del g.sparse_initializer[:]
        g.sparse_initializer.extend(kept_sparse)
        del g.value_info[:]
        g.value_info.extend(kept_vi)
        old_outputs = {o.name: o for o in g.output}
        del g.output[:]
        for t in from_session:
            g.output.append(old_outputs.get(t) or onnx.ValueInfoProto(name=t))
    else:
        for t in from_session:
            if t not in existing:
                # No type needed: ONNX Runtime infers it.
                g.output.append(onnx.ValueInfoProto(name=t))
    return from_session


# --------------------------------------------------------------------------------------------
# Segments of an onnx-ir graph
# --------------------------------------------------------------------------------------------


def _subgraph_reads(node: ir.Node) -> list[ir.Value]:
    """Values read by nodes inside ``node``'s subgraphs (outer-scope reads included)."""
    out: list[ir.Value] = []
    for attr in node.attributes.values():
        graphs = []
        if attr.type == ir.AttributeType.GRAPH:
            graphs = [attr.value]
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs = list(attr.value)
        for g in graphs:
            for inner in g:
                out.extend(v for v in inner.inputs if v is not None)
                out.extend(_subgraph_reads(inner))
    return out


def value_reads(node: ir.Node) -> list[ir.Value]:
    """Values ``node`` reads, including those read inside its subgraphs (``node_reads`` on
    onnx-ir)."""
    return [v for v in node.inputs if v is not None] + _subgraph_reads(node)


@dataclass
class Layout:
    """Where each node of a graph sits and which activations cross a position.

    Keys are ``id()`` of onnx-ir nodes and values (values are not hashable by name alone)."""

    nodes: list[ir.Node]
    pos: dict[int, int]                    # id(node) -> position
    prod: dict[int, int]                   # id(value) -> producer position (-1: graph input)
    last_use: dict[int, int]               # id(value) -> last reading position
    values: dict[int, ir.Value]            # id(value) -> value (activations and graph inputs)
    static: set[int]                       # ids of Constant-node outputs (recomputed, not carried)

    def crossing(self, cut: int) -> list[ir.Value]:
        """Activations produced before ``cut`` and read at or after it (graph inputs included)."""
        return [self.values[k] for k, p in self.prod.items()
                if p < cut <= self.last_use.get(k, -2) and k not in self.static]


_NOT_FOLDABLE = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                 "Multinomial", "Bernoulli", "Dropout"}


def _is_initializer(graph: ir.Graph, v: ir.Value) -> bool:
    return v.is_initializer() or (v.name in graph.initializers and graph.initializers[v.name] is v)


def ancestors(graph: ir.Graph, nodes) -> set[int]:
    """ids of ``nodes`` and of every main-graph node whose outputs they need, directly or not
    (what a walk up to the last of them has to compute; nothing that only feeds graph outputs
    after it, like the float32 casts of a converted model's KV-cache outputs)."""
    keep = {id(n) for n in nodes}
    todo = list(nodes)
    while todo:
        n = todo.pop()
        for v in value_reads(n):
            p = v.producer()
            if p is not None and p.graph is graph and id(p) not in keep:
                keep.add(id(p))
                todo.append(p)
    return keep


def layout(graph: ir.Graph, keep: set[int] | None = None) -> Layout:
    """The Layout of ``graph``'s main nodes, in their (topological) order; with ``keep`` (ids,
    e.g. :func:`ancestors` of some nodes) only those nodes: a value read by nothing kept is not
    carried past its producer. ``static``: values
    that do not depend on the inputs (Constant nodes, and nodes reading only initializers and
    static values, like an exporter's ``Transpose`` of a tied embedding): a segment recomputes
    them instead of the state carrying one copy per batch (a 49152 x 576 table per batch)."""
    nodes = [n for n in graph if keep is None or id(n) in keep]
    pos = {id(n): i for i, n in enumerate(nodes)}
    prod: dict[int, int] = {}
    values: dict[int, ir.Value] = {}
    static: set[int] = set()
    for v in graph.inputs:
        prod[id(v)] = -1
        values[id(v)] = v
    for i, n in enumerate(nodes):
        reads = value_reads(n)
        folds = (n.op_type not in _NOT_FOLDABLE and n.domain in ("", "ai.onnx")
                 and not _subgraph_reads(n) and not any(
                     a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                     for a in n.attributes.values())
                 and all(id(v) in static or (id(v) not in prod and _is_initializer(graph, v))
                         for v in reads))
        for v in n.outputs:
            prod[id(v)] = i
            values[id(v)] = v
            if folds:
                static.add(id(v))
    last_use: dict[int, int] = {}
    for i, n in enumerate(nodes):
        for v in value_reads(n):
            if id(v) in prod:  # initializers and unknown outer values are not tracked
                last_use[id(v)] = i
    return Layout(nodes, pos, prod, last_use, values, static)


@dataclass
class Segment:
    """A standalone model computing part of a graph: it reads ``inputs`` (the state at its start)
    and returns ``outputs``; ``n_nodes`` of the original nodes were kept."""

    proto: onnx.ModelProto
    inputs: list[str]
    outputs: list[str]
    n_nodes: int


def _no_trans_b(n: ir.Node, p: onnx.NodeProto) -> None:
    """A Gemm whose weight is replaced by an ``[in, out]`` matrix: ``transB=0``."""
    if n.op_type == "Gemm":
        for at in p.attribute:
            if at.name == "transB":
                at.i = 0


def cut_segment(model: ir.Model, lay: Layout, start: int, stop: int, wanted: Sequence[ir.Value],
                input_dtypes: Mapping[str, np.dtype],
                lowrank: Mapping[int, tuple[np.ndarray, np.ndarray, str]] | None = None) -> Segment:
    """Nodes [start, stop) of ``lay`` as a standalone model reading the state at ``start`` and
    producing those of ``wanted`` it computes (only the nodes they need are kept; Constant nodes
    they read are copied in). ``input_dtypes`` gives each state tensor's numpy dtype.

    ``lowrank`` maps id(node) to ``(A, B, base)`` for projections in the range to rewrite as
    ``MatMul(MatMul(X, A), B)`` (a Gemm keeps its bias and gets ``transB=0``), the same rewrite
    as :class:`lrc.graph.passes.lowrank.LowRankPass`; the factors become initializers
    ``{base}.lrcupd_A`` / ``{base}.lrcupd_B``. ``(W, None, base)``: the node multiplies by
    ``W`` ``[in, out]`` instead (``{base}.lrcupd_W``; what a quantised node computes, in float)."""
    lowrank = lowrank or {}
    produced = {id(v) for n in lay.nodes[start:stop] for v in n.outputs}
    outputs = [v.name for v in wanted if id(v) in produced]
    # Backward reachability inside the range from the wanted outputs.
    need = {id(v) for v in wanted if id(v) in produced}
    keep: list[ir.Node] = []
    consts: dict[int, ir.Node] = {}
    for n in reversed(lay.nodes[start:stop]):
        if not any(id(v) in need for v in n.outputs):
            continue
        keep.append(n)
        for v in value_reads(n):
            need.add(id(v))
    keep.reverse()
    inputs: list[str] = []
    inits: dict[str, ir.Value] = {}
    seen_in: set[str] = set()
    g = model.graph

    def add_static(v: ir.Value) -> None:
        """Copy in the nodes computing a static value (and the initializers they read)."""
        at = lay.prod[id(v)]
        if at in consts:
            return
        node = v.producer()
        consts[at] = node
        for u in value_reads(node):
            if id(u) in lay.static:
                add_static(u)
            elif _is_initializer(g, u):
                inits[u.name] = u

    for k in need:
        if k in produced or k not in lay.values:  # computed in the range: its node is kept
            continue
        v = lay.values[k]
        if k in lay.static:
            add_static(v)
        elif v.name not in seen_in:
            seen_in.add(v.name)
            inputs.append(v.name)
    for n in keep:
        for v in value_reads(n):
            if v.is_initializer() or (v.name in g.initializers and g.initializers[v.name] is v):
                inits[v.name] = v
    protos: list[onnx.NodeProto] = [ir.serde.serialize_node(c) for _, c in sorted(consts.items())]
    extra_inits: list[onnx.TensorProto] = []
    for n in keep:
        f = lowrank.get(id(n))
        p = ir.serde.serialize_node(n)
        if f is not None and f[1] is None:
            w, _, base = f
            p.input[1] = f"{base}.lrcupd_W"
            _no_trans_b(n, p)
            extra_inits.append(onnx.numpy_helper.from_array(np.ascontiguousarray(w), p.input[1]))
        elif f is not None:
            a, b, base = f
            a_name, b_name = f"{base}.lrcupd_A", f"{base}.lrcupd_B"
            mid = f"{p.name or p.output[0]}/lrcupd_A_out"
            protos.append(helper.make_node("MatMul", [p.input[0], a_name], [mid],
                                           name=f"{p.name}/lrcupd_A"))
            p.input[0] = mid
            p.input[1] = b_name
            _no_trans_b(n, p)
            extra_inits.append(onnx.numpy_helper.from_array(np.ascontiguousarray(a), a_name))
            extra_inits.append(onnx.numpy_helper.from_array(np.ascontiguousarray(b), b_name))
        protos.append(p)
    used = {i for p in protos for i in node_reads(p)}
    init_protos = []
    for name, v in inits.items():
        if name in used:
            if is_stored(v.const_value):  # a pass's new weight in a temporary file: inline
                tp = onnx.numpy_helper.from_array(v.const_value.numpy(), name)
            else:
                tp = ir.serde.serialize_tensor(v.const_value)
            tp.name = name
            init_protos.append(tp)
    init_protos.extend(extra_inits)
    in_vi = [helper.make_tensor_value_info(
        nm, helper.np_dtype_to_tensor_dtype(np.dtype(input_dtypes[nm])), None) for nm in inputs]
    out_vi = [onnx.ValueInfoProto(name=nm) for nm in outputs]
    graph = helper.make_graph(protos, "lrc_segment", in_vi, out_vi, init_protos)
    proto = helper.make_model(graph, opset_imports=[
        helper.make_opsetid(dom, ver) for dom, ver in model.opset_imports.items()])
    proto.ir_version = max(int(model.ir_version or 8), 8)
    for fn in model.functions.values():
        proto.functions.append(ir.serde.serialize_function(fn))
    return Segment(proto, inputs, outputs, len(keep))


# ---------------------------------------------------------------- the sensitivity probe's tails

def data_flow(proto: onnx.ModelProto, data_inputs: set[str], weights: set[str]):
    """``(data, producer, first_use)``: the tensors that depend on the data inputs (tokens,
    masks, cache), each produced tensor's node index, and per weight the first node that reads
    it through data (a weight only Transposed or cast first is read where its result meets the
    data)."""
    data, producer, derived = set(data_inputs), {}, {}
    first_use: dict[str, int] = {}
    for i, node in enumerate(proto.graph.node):
        reads = set()
        for x in node.input:
            reads |= {x} if x in weights else derived.get(x, set())
        is_data = any(x in data for x in node.input)
        for y in node.output:
            producer[y] = i
            if is_data:
                data.add(y)
            elif reads:
                derived[y] = reads
        if is_data:
            for w in reads:
                first_use.setdefault(w, i)
    return data, producer, first_use


def tail_nodes(proto: onnx.ModelProto, cut: int, data: set[str], producer: dict,
            outputs: list[str]) -> tuple[list[int], list[str]]:
    """``(node indices, boundary)``: the nodes ``outputs`` need when the data tensors made
    before node ``cut`` are given (``boundary``, the ones they read); nodes before the cut that
    no data reaches (a weight's Transpose, a constant) are kept and recomputed."""
    nodes = proto.graph.node
    keep, boundary, seen = set(), [], set()
    stack = list(outputs)
    while stack:
        t = stack.pop()
        if t in seen or not t:
            continue
        seen.add(t)
        i = producer.get(t)
        if i is None:
            continue  # a graph input or an initializer
        if i < cut and t in data:
            boundary.append(t)
            continue
        if i not in keep:
            keep.add(i)
            stack.extend(nodes[i].input)
    return sorted(keep), sorted(boundary)


def has_subgraphs(proto: onnx.ModelProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for n in proto.graph.node for a in n.attribute)


def tail_proto(proto: onnx.ModelProto, keep: list[int], boundary: dict[str, np.ndarray],
                outputs: list[str]) -> onnx.ModelProto:
    """The model of nodes ``keep`` with the ``boundary`` tensors as inputs (typed from the
    dense run's arrays) beside the graph inputs they read."""
    g = proto.graph
    nodes = [g.node[i] for i in keep]
    read = {x for n in nodes for x in n.input}
    inits = [t for t in g.initializer if t.name in read]
    inputs = [i for i in g.input if i.name in read]
    inputs += [helper.make_tensor_value_info(
        n, helper.np_dtype_to_tensor_dtype(a.dtype), None) for n, a in boundary.items()]
    typed = {o.name: o for o in g.output}
    outs = [typed.get(n) or onnx.ValueInfoProto(name=n) for n in outputs]  # ORT types them
    made = {y for n in nodes for y in n.output}
    graph = helper.make_graph(nodes, f"{g.name}_tail", inputs, outs, initializer=inits,
                              value_info=[v for v in g.value_info if v.name in made])
    sub = onnx.ModelProto(ir_version=proto.ir_version, producer_name=proto.producer_name)
    sub.opset_import.extend(proto.opset_import)
    sub.functions.extend(proto.functions)
    sub.graph.CopyFrom(graph)
    return sub
