"""Sequential joint update: low-rank factors fitted to the inputs the compressed model produces.

Whitening (SVD-LLM) fits each projection ``Y = X·W`` on the inputs ``X_o`` of the *original*
model. Once earlier projections are compressed, the model feeds each projection a different
input ``X_c``. The joint update fits the factors of every projection to what it will see:

    minimise ||X_c A B - X_o W||_F  over rank-r A [in, r], B [r, out]

With ``C = X_cᵀ X_c`` and ``M = X_cᵀ X_o`` (float64 sums over calibration tokens) the unconstrained
optimum is ``W* = C⁻¹ M W`` and, since ``||X_c (AB - W*)||`` differs from the objective by a
constant, the best rank-r fit is the whitened truncated SVD of ``chol(C)ᵀ W*``, i.e.
``lrc.factorize.whiten_factor(W, C, r, w_target=W*)``. ``C`` is damped by ``λ = damp·mean(diag C)``
towards the original weight: ``W* = (C + λI)⁻¹ (M + λI) W`` (so ``W* = W`` whenever ``X_c = X_o``).
Default ``damp=0.1``: on SmolLM2-135M (0.78 of projection params, 16k mixed calibration tokens)
news / docs perplexity was 138 / 58 at 0.01, 130 / 56 at 0.1, 147 / 65 at 0.5 (whitening alone
250 / 99, dense 35 / 19).

Residual target. A projection whose output is added to the residual stream (``h + X·W``:
attention ``o_proj``, MLP ``down_proj``) is fitted to ``X_o W + (h_o - h_c)`` instead: it also
makes up the error the compressed residual stream ``h_c`` already carries, so the block's output
(not only the projection's) matches the original's. The extra term is ``E = X_cᵀ(h_o - h_c)``,
added to the right-hand side. Measured by hand on SmolLM2 (0.8, ``--group-inputs``, 16k tokens),
news / docs perplexity: MLP only 240 / 95 -> 95 / 44; all projections but the head 119 / 52 ->
100 / 46. Without it the update made MLP-only compression worse than whitening alone (156 / 61).

How it runs (about two forward passes over the calibration set, not one per block):

* The graph's nodes are cut, in their (topological) order, into *stages*: a stage starts at a
  projection whose input is computed after the current cut (Q/K/V share one input, so they form
  one stage; then O, gate/up, down, and the next layer's Q/K/V). At each cut the tensors crossing
  it (the residual stream, a norm's output, rotary cos/sin, the attention mask, graph inputs...)
  are the whole state the rest of the graph needs; every stage's projections read their input
  from that state.
* The prefix before the first cut runs once per calibration batch. Then, stage by stage:
  accumulate ``C`` and ``M`` from the compressed state (``X_c``) and the original state
  (``X_o``), factor the stage's projections, and run the segment up to the next cut twice — the
  original segment on the original state, and the segment rewritten with the new factors on the
  compressed state — each as its own small ONNX Runtime session, keeping only the next cut's
  state. So every projection sees inputs produced by the model with *all* earlier projections
  (including earlier ones of its own block) already compressed.
* The factors are then written into the model by :class:`lrc.passes.lowrank.LowRankPass` (a
  factoriser that looks them up), so the result uses exactly lrc's rewrite; the segments
  replicate that rewrite (``MatMul(MatMul(X, A), B)``, Gemm with ``transB=0``).
* With ``Policy.group_inputs`` the projections reading one tensor (Q/K/V, gate/up) are one
  unit (:func:`lrc.passes.lowrank.plan_units`): they share ``X_c`` and ``X_o``, so the joint fit
  is the same formula applied to ``[W_1 W_2 ...]`` (norm-balanced), split into one B each.

Memory: the state at one cut for both models (SmolLM2-135M at 16k tokens: ~80 MB per model)
plus one stage's ``C`` and ``[C M]`` sums. Nothing in here knows about a particular model family:
stages come from the graph, roles and blocks from :func:`lrc.passes.locate.locate`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from lrc.errors import LrcError
from lrc.graph.expose import node_reads
from lrc.factorize import Factors, whiten_factor
from lrc.graph.locate import Target, locate
from lrc.graph.passes.lowrank import LowRankPass, Unit, _effective_weight, plan_items
from lrc.graph.passes.lowrank import plan_units as _plan_units
from lrc.graph.policy import Policy

log = logging.getLogger(__name__)

__all__ = ["plan_targets", "sequential_factors", "sequential_factorizer", "sequential_update",
           "UpdateStats"]

Progress = Callable[[int, int], None]  # (projections done, total), like calib_progress

_NP_TO_ONNX = {np.dtype(np.float32): onnx.TensorProto.FLOAT,
               np.dtype(np.float16): onnx.TensorProto.FLOAT16,
               np.dtype(np.float64): onnx.TensorProto.DOUBLE,
               np.dtype(np.int64): onnx.TensorProto.INT64,
               np.dtype(np.int32): onnx.TensorProto.INT32,
               np.dtype(np.int8): onnx.TensorProto.INT8,
               np.dtype(np.uint8): onnx.TensorProto.UINT8,
               np.dtype(np.bool_): onnx.TensorProto.BOOL}

_IR_TO_ORT = {ir.DataType.FLOAT: "tensor(float)", ir.DataType.FLOAT16: "tensor(float16)",
              ir.DataType.DOUBLE: "tensor(double)", ir.DataType.INT64: "tensor(int64)",
              ir.DataType.INT32: "tensor(int32)", ir.DataType.BOOL: "tensor(bool)",
              ir.DataType.INT8: "tensor(int8)", ir.DataType.UINT8: "tensor(uint8)"}


# --------------------------------------------------------------------------------------------
# Plan: which targets get which rank (the same decisions LowRankPass makes)
# --------------------------------------------------------------------------------------------


def plan_units(model: ir.Model, policy: Policy) -> list[Unit]:
    """The factorisations LowRankPass will make (same planning code), in graph order."""
    return _plan_units(plan_items(locate(model), policy), policy)


def plan_targets(model: ir.Model, policy: Policy) -> list[tuple[Target, int]]:
    """(target, rank) for every projection the policy rewrites, in graph order (the rank of its
    factorisation: a joint group's rank for members of one)."""
    return [(it[0], u.rank) for u in plan_units(model, policy) for it in u.items]


# --------------------------------------------------------------------------------------------
# Graph analysis: positions, crossing tensors, stages
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


def _reads(node: ir.Node) -> list[ir.Value]:
    return [v for v in node.inputs if v is not None] + _subgraph_reads(node)


@dataclass
class _Layout:
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


def _layout(graph: ir.Graph) -> _Layout:
    nodes = list(graph)
    pos = {id(n): i for i, n in enumerate(nodes)}
    prod: dict[int, int] = {}
    values: dict[int, ir.Value] = {}
    static: set[int] = set()
    for v in graph.inputs:
        prod[id(v)] = -1
        values[id(v)] = v
    for i, n in enumerate(nodes):
        for v in n.outputs:
            prod[id(v)] = i
            values[id(v)] = v
            if n.op_type == "Constant" and not n.inputs:
                static.add(id(v))
    last_use: dict[int, int] = {}
    for i, n in enumerate(nodes):
        for v in _reads(n):
            if id(v) in prod:  # initializers and unknown outer values are not tracked
                last_use[id(v)] = i
    return _Layout(nodes, pos, prod, last_use, values, static)


@dataclass
class _Stage:
    cut: int                       # position of the stage's first projection
    targets: list[tuple[Target, int]] = field(default_factory=list)


def _stages(lay: _Layout, plan: list[tuple[Target, int]]) -> list[_Stage]:
    """Group planned targets: a new stage starts when a target's input is computed at or after
    the current cut (so each stage's inputs are all part of the state at its cut)."""
    items = sorted(plan, key=lambda it: lay.pos[id(it[0].node)])
    stages: list[_Stage] = []
    for t, r in items:
        x = t.node.inputs[0]
        p = lay.prod.get(id(x), -1)
        if not stages or p >= stages[-1].cut:
            stages.append(_Stage(lay.pos[id(t.node)]))
        stages[-1].targets.append((t, r))
    return stages


# --------------------------------------------------------------------------------------------
# Segments as ONNX Runtime sessions
# --------------------------------------------------------------------------------------------


class _Segment:
    """Nodes [start, stop) of the graph as a standalone model reading the state at ``start`` and
    producing the crossing tensors at ``stop`` that it computes. ``factors`` maps id(target node)
    to (Factors, weight name) for projections in the range to rewrite as ``(X·A)·B``."""

    def __init__(self, model: ir.Model, lay: _Layout, start: int, stop: int,
                 wanted: list[ir.Value], state_dtypes: dict[str, np.dtype],
                 factors: dict[int, tuple[Factors, str]] | None = None,
                 threads: int | None = None):
        factors = factors or {}
        produced = {id(v) for n in lay.nodes[start:stop] for v in n.outputs}
        self.outputs = [v.name for v in wanted if id(v) in produced]
        # Backward reachability inside the range from the wanted outputs.
        need = {id(v) for v in wanted if id(v) in produced}
        keep: list[ir.Node] = []
        consts: dict[int, ir.Node] = {}
        for n in reversed(lay.nodes[start:stop]):
            if not any(id(v) in need for v in n.outputs):
                continue
            keep.append(n)
            for v in _reads(n):
                need.add(id(v))
        keep.reverse()
        inputs: list[str] = []
        inits: dict[str, ir.Value] = {}
        seen_in: set[str] = set()
        for k in need:
            if k in produced or k not in lay.values:
                continue
            v = lay.values[k]
            if k in lay.static:
                consts[lay.prod[k]] = v.producer()
            elif v.name not in seen_in:
                seen_in.add(v.name)
                inputs.append(v.name)
        g = model.graph
        for n in keep:
            for v in _reads(n):
                if v.is_initializer() or (v.name in g.initializers and g.initializers[v.name] is v):
                    inits[v.name] = v
        protos: list[onnx.NodeProto] = [ir.serde.serialize_node(c) for _, c in sorted(consts.items())]
        extra_inits: list[onnx.TensorProto] = []
        for n in keep:
            f = factors.get(id(n))
            p = ir.serde.serialize_node(n)
            if f is not None:
                fac, base = f
                a_name, b_name = f"{base}.lrcupd_A", f"{base}.lrcupd_B"
                mid = f"{p.name or p.output[0]}/lrcupd_A_out"
                protos.append(helper.make_node("MatMul", [p.input[0], a_name], [mid],
                                               name=f"{p.name}/lrcupd_A"))
                p.input[0] = mid
                p.input[1] = b_name
                if n.op_type == "Gemm":
                    for a in p.attribute:
                        if a.name == "transB":
                            a.i = 0
                extra_inits.append(onnx.numpy_helper.from_array(np.ascontiguousarray(fac.a), a_name))
                extra_inits.append(onnx.numpy_helper.from_array(np.ascontiguousarray(fac.b), b_name))
            protos.append(p)
        used = {i for p in protos for i in node_reads(p)}
        init_protos = []
        for name, v in inits.items():
            if name in used:
                tp = ir.serde.serialize_tensor(v.const_value)
                tp.name = name
                init_protos.append(tp)
        init_protos.extend(extra_inits)
        in_vi = [helper.make_tensor_value_info(nm, _NP_TO_ONNX[np.dtype(state_dtypes[nm])], None)
                 for nm in inputs]
        out_vi = [onnx.ValueInfoProto(name=nm) for nm in self.outputs]
        graph = helper.make_graph(protos, "lrc_segment", in_vi, out_vi, init_protos)
        proto = helper.make_model(graph, opset_imports=[
            helper.make_opsetid(dom, ver) for dom, ver in model.opset_imports.items()])
        proto.ir_version = max(int(model.ir_version or 8), 8)
        for fn in model.functions.values():
            proto.functions.append(ir.serde.serialize_function(fn))
        self.inputs = inputs
        self.n_nodes = len(keep)
        self.session = _ort_session(proto.SerializeToString(), threads) if self.outputs else None

    def run(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.session is None:
            return {}
        outs = self.session.run(self.outputs, {k: state[k] for k in self.inputs})
        return dict(zip(self.outputs, outs))


def _ort_session(data: bytes, threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


class _InputArg:  # what lrc.feeds.text_feeds reads from a session's inputs
    def __init__(self, v: ir.Value):
        self.name = v.name
        self.type = _IR_TO_ORT.get(v.dtype, "tensor(float)")
        self.shape = [d if isinstance(d, int) else str(d) for d in (v.shape or [])]


class _FeedShim:
    """Enough of an InferenceSession for ``lrc.feeds.text_feeds`` (inputs and model path)."""

    def __init__(self, model: ir.Model, path: str | None):
        self._inputs = [_InputArg(v) for v in model.graph.inputs]
        self.lrc_path = path

    def get_inputs(self):
        return self._inputs

    def get_outputs(self):
        return []


# --------------------------------------------------------------------------------------------
# The update
# --------------------------------------------------------------------------------------------


@dataclass
class UpdateStats:
    stages: int = 0
    segments_nodes: int = 0
    batches: int = 0
    tokens: int = 0
    seconds_forward: float = 0.0
    seconds_gram: float = 0.0
    seconds_factor: float = 0.0
    seconds_total: float = 0.0
    per_target: dict = field(default_factory=dict)  # name -> {"shift": ..., "out_energy": ...}

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        for k in list(d):
            if k.startswith("seconds"):
                d[k] = round(d[k], 2)
        return d


def _batch_feeds(model: ir.Model, model_path, batches, batch_windows: int) -> list[dict]:
    """Feeds dicts: dicts pass through; token-id windows of one length are stacked
    ``batch_windows`` at a time and turned into feeds by ``lrc.feeds.text_feeds``."""
    from lrc.runtime.feeds import text_feeds

    out: list[dict] = []
    shim = _FeedShim(model, str(model_path) if model_path else None)
    pending: dict[int, list[np.ndarray]] = {}

    def flush(length):
        rows = pending.pop(length)
        out.append(text_feeds(shim, np.concatenate(rows, axis=0)))

    for b in batches:
        if isinstance(b, dict):
            out.append(b)
            continue
        a = np.asarray(b, dtype=np.int64)
        a = a[None, :] if a.ndim == 1 else a
        pending.setdefault(a.shape[1], []).append(a)
        if sum(x.shape[0] for x in pending[a.shape[1]]) >= batch_windows:
            flush(a.shape[1])
    for length in list(pending):
        flush(length)
    return out


def _rows(x: np.ndarray, mask) -> np.ndarray:
    from lrc.calibration.stats import _row_mask

    sel = _row_mask(x, mask)
    r = x.reshape(-1, x.shape[-1])
    return r[sel] if sel is not None else r


def joint_factor(w: np.ndarray, c: np.ndarray, m: np.ndarray, rank: int,
                 damp: float = 0.1, e: np.ndarray | None = None) -> Factors:
    """Best rank-``rank`` ``A B`` for ``||X_c A B - X_o W||`` given ``C = X_cᵀX_c``,
    ``M = X_cᵀX_o`` (damped towards ``W`` by ``λ = damp·mean(diag C)``). With
    ``e = X_cᵀ(h_o - h_c)`` the target is ``X_o W + h_o - h_c`` instead: the projection also
    makes up the error the residual stream ``h`` it is added to already carries."""
    c = 0.5 * (c + c.T)
    lam = damp * max(float(np.mean(np.diag(c))), 1e-12)
    cd = c + lam * np.eye(len(c))
    w64 = np.asarray(w, dtype=np.float64)
    rhs = m @ w64 + lam * w64
    if e is not None:
        rhs = rhs + e
    try:
        from scipy.linalg import cho_factor, cho_solve

        w_star = cho_solve(cho_factor(cd, lower=True), rhs)
    except Exception:  # no scipy, or not PD: a general solve
        w_star = np.linalg.solve(cd, rhs)
    f = whiten_factor(w, cd, rank, w_target=w_star)
    f.method = "svd-llm+update"
    return f


def sequential_factors(model: ir.Model, policy: Policy, batches: Iterable, *,
                       model_path=None, damp: float = 0.1, batch_windows: int = 8,
                       threads: int | None = None, progress: Progress | None = None,
                       precision: str = "float32", residual: bool = True,
                       ) -> tuple[dict[tuple, Factors], UpdateStats]:
    """Factors for every planned projection, keyed by ``(*weight_key, rank)`` like the groups
    of LowRankPass. ``batches``: feeds dicts, or token-id windows ([L] or [1, L]) from which
    feeds are built. The model is not modified. ``precision``: dtype of each batch's
    ``X_cᵀ[X_c X_o]`` product (sums over batches are float64 either way); ``"float32"`` is about
    twice as fast as ``"float64"``."""
    if precision not in ("float32", "float64"):
        raise LrcError(f"precision must be 'float32' or 'float64', not {precision!r}")
    work = np.dtype(precision)
    t_start = time.perf_counter()
    st = UpdateStats()
    units = plan_units(model, policy)
    plan = [(it[0], u.rank) for u in units for it in u.items]
    unit_of = {id(it[0].node): u for u in units for it in u.items}
    if not plan:
        return {}, st
    lay = _layout(model.graph)
    stages = _stages(lay, plan)
    st.stages = len(stages)
    feeds = _batch_feeds(model, model_path, batches, batch_windows)
    if not feeds:
        raise LrcError("no calibration batches")
    st.batches = len(feeds)
    masks = [f.get("attention_mask") for f in feeds]
    dtypes: dict[str, np.dtype] = {}

    def note_dtypes(states):
        for s in states:
            for k, v in s.items():
                dtypes.setdefault(k, np.asarray(v).dtype)

    # Prefix: graph inputs -> state at the first cut (identical for both models).
    first = stages[0].cut
    wanted = lay.crossing(first)
    note_dtypes(feeds)
    prefix = _Segment(model, lay, 0, first, wanted, dtypes, threads=threads)
    t0 = time.perf_counter()
    state_o = []
    for f in feeds:
        s = {v.name: f[v.name] for v in wanted if v.name in f}
        s.update(prefix.run(f))
        state_o.append(s)
    st.seconds_forward += time.perf_counter() - t0
    del prefix
    state_c = [dict(s) for s in state_o]
    note_dtypes(state_o)
    st.tokens = int(sum(_rows(s[stages[0].targets[0][0].node.inputs[0].name], m).shape[0]
                        for s, m in zip(state_o, masks)))

    factors: dict[tuple, Factors] = {}   # (*weight_key, rank) -> Factors
    by_node: dict[int, tuple[Factors, str]] = {}  # id(target node) -> (factors, base name)
    all_plan_nodes = {id(t.node): (t, r) for t, r in plan}
    n_done = 0
    for si, stage in enumerate(stages):
        # 1. C = X_cᵀX_c and M = X_cᵀX_o for each distinct input of the stage's new factors.
        todo = [(t, r) for t, r in stage.targets if unit_of[id(t.node)].key() not in factors]
        xnames = list(dict.fromkeys(t.node.inputs[0].name for t, _ in todo))
        t0 = time.perf_counter()
        sums: dict[str, np.ndarray] = {}
        shift: dict[str, float] = {}
        for name in xnames:
            acc = None
            num = den = 0.0
            for so, sc, m in zip(state_o, state_c, masks):
                xo = _rows(np.asarray(so[name]), m).astype(work)
                xc = _rows(np.asarray(sc[name]), m).astype(work)
                blk = (np.ascontiguousarray(xc.T) @ np.concatenate([xc, xo], axis=1))
                blk = blk.astype(np.float64, copy=False)
                acc = blk if acc is None else acc + blk
                num += float(np.sum((xc - xo).astype(np.float64) ** 2))
                den += float(np.sum(xo.astype(np.float64) ** 2))
            sums[name] = acc
            shift[name] = (num / den) ** 0.5 if den > 0 else 0.0
        # E = X_cᵀ(h_o - h_c) for projections whose output is added to a residual stream h
        # that the state carries (attention o_proj, MLP down_proj): see joint_factor.
        resid: dict[int, np.ndarray] = {}
        for t, _ in todo if residual else ():
            h = _residual_input(t, state_o[0])
            if h is None or unit_of[id(t.node)].joint:
                continue
            e = None
            for so, sc, m in zip(state_o, state_c, masks):
                xc = _rows(np.asarray(sc[t.node.inputs[0].name]), m).astype(work)
                ho, hc = np.asarray(so[h]), np.asarray(sc[h])
                if ho.shape[:-1] != np.asarray(sc[t.node.inputs[0].name]).shape[:-1]:
                    e = None  # not one row per token (a broadcast): leave the plain target
                    break
                dh = _rows(ho, m).astype(work) - _rows(hc, m).astype(work)
                blk = (np.ascontiguousarray(xc.T) @ dh).astype(np.float64, copy=False)
                e = blk if e is None else e + blk
            if e is not None:
                resid[id(t.node)] = e
        st.seconds_gram += time.perf_counter() - t0
        # 2. Factor.
        t0 = time.perf_counter()
        for t, r in todo:
            u = unit_of[id(t.node)]
            if u.key() in factors:
                continue
            name = t.node.inputs[0].name  # a joint unit's members all read this input
            acc = sums[name]
            d = acc.shape[0]
            f_raw = joint_factor(u.weight(), acc[:, :d], acc[:, d:], r, damp=damp,
                                 e=resid.get(id(t.node)))
            factors[u.key()] = f_raw  # what LowRankPass's factoriser returns (it unscales)
            f = u.unscale(f_raw)
            for it in u.items:
                st.per_target[it[0].name] = {"input_shift": round(shift[name], 5),
                                             "output_energy": round(float(f.output_energy or 0), 6),
                                             "residual_target": id(it[0].node) in resid}
            for it, sl in zip(u.items, u.b_slices() if u.joint else [None] * len(u.items)):
                mt = it[0]
                base = (mt.weight.name or mt.name) + ("_T" if mt.transposed else "")
                fm = f if sl is None else dataclasses.replace(f, b=np.ascontiguousarray(f.b[:, sl]))
                by_node[id(mt.node)] = (fm, base)
        for t, r in stage.targets:  # a weight factored in an earlier stage (shared weights)
            if id(t.node) not in by_node:
                base = (t.weight.name or t.name) + ("_T" if t.transposed else "")
                by_node[id(t.node)] = (factors[unit_of[id(t.node)].key()], base)
        del sums
        st.seconds_factor += time.perf_counter() - t0
        n_done += len(stage.targets)
        # 3. Advance both states to the next cut.
        if si + 1 < len(stages):
            nxt = stages[si + 1].cut
            wanted = lay.crossing(nxt)
            wnames = [v.name for v in wanted]
            # factors for every planned projection in the range (a shared weight may recur)
            fac_here = {id(n): by_node[id(n)] for n in lay.nodes[stage.cut:nxt]
                        if id(n) in by_node and id(n) in all_plan_nodes}
            seg_o = _Segment(model, lay, stage.cut, nxt, wanted, dtypes, threads=threads)
            seg_c = _Segment(model, lay, stage.cut, nxt, wanted, dtypes, factors=fac_here,
                             threads=threads)
            st.segments_nodes += seg_o.n_nodes
            t0 = time.perf_counter()
            for i in range(len(feeds)):
                for states, seg in ((state_o, seg_o), (state_c, seg_c)):
                    s = states[i]
                    new = seg.run(s)
                    states[i] = {k: (new[k] if k in new else s[k]) for k in wnames}
            st.seconds_forward += time.perf_counter() - t0
            note_dtypes(state_o[:1])
            del seg_o, seg_c
        if progress:
            progress(n_done, len(plan))
    st.seconds_total = time.perf_counter() - t_start
    return factors, st


def _residual_input(t: Target, state: dict) -> str | None:
    """Name of the tensor ``h`` in ``Add(h, X·W)`` (either order) when ``t``'s output feeds
    nothing but that Add and ``h`` is part of the carried state; None otherwise."""
    out = t.node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add" or len(add.inputs) != 2:
        return None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    if other is None or other.name not in state:
        return None
    shape_o, shape_h = out.shape, other.shape
    if shape_o is not None and shape_h is not None and len(shape_o) != len(shape_h):
        return None  # a broadcast add (a bias), not a residual stream
    return other.name


def lookup_factorizer(factors: dict[tuple, Factors], fallback=None):
    """A LowRankPass factoriser returning precomputed factors (``fallback`` for others)."""

    def factor(t: Target, w: np.ndarray, rank: int) -> Factors:
        f = factors.get((*t.weight_key, rank))
        if f is None:
            if fallback is None:
                raise LrcError(f"no precomputed factors for {t.name} at rank {rank}")
            return fallback(t, w, rank)
        return f

    return factor


def sequential_factorizer(model: ir.Model, model_path, policy: Policy, texts: Sequence[str], *,
                          n_tokens: int = 16384, seq_len: int = 256, tokenizer=None,
                          damp: float = 0.1, threads: int | None = None,
                          progress: Progress | None = None):
    """``(factorizer, info)`` for ``LowRankPass`` / ``lrc.compress``: the joint update computed
    on ``texts`` (tokenised like ``lrc.calibrate.cached_stats`` does)."""
    from lrc.calibration.stats import _tokenizer_path, token_batches

    tok = _tokenizer_path(model_path, tokenizer)
    windows = token_batches(tok, list(texts), n_tokens=n_tokens, seq_len=seq_len, bos=True)
    factors, st = sequential_factors(model, policy, windows, model_path=model_path, damp=damp,
                                     threads=threads, progress=progress)
    info = {"method": "svd-llm+update", "tokens": st.tokens, "seq_len": seq_len,
            "damp": damp, **{k: v for k, v in st.to_dict().items() if k != "per_target"},
            "per_target": st.per_target}
    return lookup_factorizer(factors), info


def sequential_update(model_path, policy: Policy, *, calib_texts: Sequence[str],
                      n_tokens: int = 16384, seq_len: int = 256, tokenizer=None,
                      damp: float = 0.1, threads: int | None = None,
                      progress: Progress | None = None) -> tuple[ir.Model, dict]:
    """Load ``model_path``, compute the joint-update factors and rewrite the model with them.
    Returns ``(ir.Model, report)`` like ``lrc.compress``."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    from lrc.graph.model import load, resolve_model_path

    path = resolve_model_path(model_path)
    model = load(path)
    factorizer, info = sequential_factorizer(model, path, policy, calib_texts, n_tokens=n_tokens,
                                             seq_len=seq_len, tokenizer=tokenizer, damp=damp,
                                             threads=threads, progress=progress)
    lr = LowRankPass(policy, factorizer=factorizer)
    lr(model)
    RemoveUnusedNodesPass()(model)
    report = lr.record.to_dict()
    report["summary"] = lr.record.summary_line()
    report["method"] = "svd-llm+update"
    report["calibration"] = info
    return model, report
