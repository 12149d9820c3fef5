"""Expose intermediate tensors of an ONNX graph, or cut out the part that computes them.

The one home of this surgery (no ONNX Runtime here): calibration exposes each projection's
input, ``lrc eval --layers`` exposes the rewritten nodes' outputs, the sequential update cuts
the graph into segments between projections.
"""

from __future__ import annotations

import onnx

from lrc.errors import LrcError


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
