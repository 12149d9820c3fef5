"""Low-rank rewrite: ``Y = X·W (+b)``  ->  ``Y = (X·A)·B (+b)``.

For every target chosen by the policy (see :mod:`lrc.graph.plan`, :mod:`lrc.graph.policy`) the
effective weight ``W [in, out]`` (the initializer, its transpose for ``Transpose``-fed or
``Gemm(transB=1)`` weights) is factored by a truncated SVD (or a data-aware factoriser) into
``A [in, r]`` and ``B [r, out]``. The graph gets a new ``MatMul(X, A)`` and the original node is
re-wired to multiply by ``B``:

* ``MatMul(X, W)``            -> ``MatMul(MatMul(X, A), B)``
* ``MatMul(X, Transpose(E))`` -> ``MatMul(MatMul(X, A), B)``; ``E`` stays if a ``Gather`` uses it
* ``Gemm(X, W, C, α, β, transB)`` -> ``Gemm(MatMul(X, A), B, C, α, β, transB=0)``

With ``Policy.group_inputs`` (``--group-inputs``) projections that read the same tensor and share
a ratio setting (Q/K/V after one norm, gate/up after another) are factored *jointly*: the SVD of
``[W_1 W_2 ...]`` gives one ``A [in, r]`` computed once and one ``B_i [r, out_i]`` per projection.
At equal parameters the joint rank is higher than each separate rank, and ``X·A`` runs once.

Float16 weights: the factors are computed in float32 (float64 for data-aware methods) and
stored once in the weight's dtype, so an fp16 model's factors are fp16 and its file halves with
the parameters. A weight the node reads through ``Cast`` (fp16 storage, float32 compute) gets
its factors through the same ``Cast``, one per factor, at the top of the main graph.

Because the original node keeps its output value, the output tensor name, its consumers and any
graph output are untouched. A·B is never folded back. A weight shared by several targets is
factored once and the factors are shared. Each weight is read, factored and released one at a
time, so memory holds the model plus one matrix's workspace. The pass never touches files: it
returns the model and a record of every node it rewrote or left alone, with the reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import onnx_ir as ir

from lrc.errors import opt, render
from lrc.factorize import Factors, factorize
from lrc.graph.locate import FACTOR_META, Target
from lrc.graph.plan import Plan, Unit, make_plan
from lrc.graph.policy import Policy
from lrc.graph.model import new_tensor

Factorizer = Callable[[Target, np.ndarray, int], Factors]
Progress = Callable[[int, int, str], None]


@dataclass
class Rewritten:
    name: str
    role: str
    block: int | None
    path: str
    shape: list[int]
    rank: int
    setting: str
    energy: float
    rel_error: float
    params_before: int
    params_after: int
    dtype: str
    method: str
    output: str
    shared_with: list[str] = field(default_factory=list)
    output_energy: float | None = None
    note: str | None = None
    tied: bool = False
    joint_with: list[str] = field(default_factory=list)  # --group-inputs: shares A with these


@dataclass
class Skipped:
    name: str
    role: str
    block: int | None
    shape: list[int]
    reason: str
    kind: str  # ineligible | excluded | unprofitable


@dataclass
class LowRankRecord:
    rewritten: list[Rewritten] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def totals(self) -> dict:
        seen: set[str] = set()
        before = after = 0
        for r in self.rewritten:  # a shared weight counts once
            key = r.shared_with[0] if r.shared_with and r.shared_with[0] in seen else r.name
            if key in seen:
                continue
            seen.add(r.name)
            seen.update(r.shared_with)
            before += r.params_before
            after += r.params_after
        kept = sum(r.params_before for r in self.rewritten if r.tied)
        return {"targets": len(self.rewritten) + len(self.skipped),
                "rewritten": len(self.rewritten), "skipped": len(self.skipped),
                "params_before": before, "params_after": after,
                "params_ratio": (after / before) if before else 1.0,
                # weights kept for another user (tied embedding): compute shrinks, storage not
                "params_kept_shared": kept,
                "stored_ratio": ((after + kept) / before) if before else 1.0}

    def to_dict(self) -> dict:
        return {"rewritten": [asdict(r) for r in self.rewritten],
                "skipped": [asdict(s) for s in self.skipped],
                "notes": list(self.notes), "totals": self.totals()}

    def summary_line(self) -> str:
        t = self.totals()
        kinds: dict[str, int] = {}
        for s in self.skipped:
            kinds[s.kind] = kinds.get(s.kind, 0) + 1
        extra = ", ".join(f"{v} {k}" for k, v in sorted(kinds.items()))
        return (f"rewrote {t['rewritten']} of {t['targets']} projections"
                + (f" ({extra} left dense)" if extra else "")
                + f"; projection params {t['params_before']:,} -> {t['params_after']:,}"
                  f" ({t['params_ratio']:.1%})"
                + (f", {t['params_kept_shared']:,} kept for shared users" if
                   t["params_kept_shared"] else ""))


def plain_svd(target: Target, w: np.ndarray, rank: int) -> Factors:
    return factorize(w, rank)


class LowRankPass(ir.passes.InPlacePass):
    """Factor every selected projection; ``self.record`` says what was done.

    ``plan``: the model's :class:`~lrc.graph.plan.Plan` when the caller made it already (the
    compress pipeline does, to gather statistics for exactly these targets); otherwise the pass
    plans itself. ``ensures``: every planned node now multiplies by its factor B."""

    def __init__(self, policy: Policy, factorizer: Factorizer | None = None,
                 progress: Progress | None = None, plan: Plan | None = None):
        super().__init__()
        self.policy = policy
        self.factorizer = factorizer or plain_svd
        self.progress = progress
        self.plan = plan
        self.record = LowRankRecord()
        self._items: list = []

    def requires(self, model: ir.Model) -> None:
        if self.plan is not None and self.plan.policy is not self.policy:
            raise ir.passes.PreconditionError("LowRankPass: the plan was made for another policy")
        if self.plan is not None and any(t.node.graph is None for t, *_ in self.plan.items):
            raise ir.passes.PreconditionError("LowRankPass: the plan's nodes are no longer in "
                                              "the model (plan it again)")

    def ensures(self, model: ir.Model) -> None:
        done = {r.name for r in self.record.rewritten}
        bad = [t.name for t, *_ in self._items if t.name not in done
               or t.node.metadata_props.get(FACTOR_META) != "B"]
        if bad:
            raise ir.passes.PostconditionError(f"LowRankPass left planned nodes unrewritten: {bad}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        plan = self.plan or make_plan(model, self.policy)
        for t, why, kind in plan.skipped:
            self._skip(t, why, kind)
        self._items = plan.items
        done = 0
        for unit in plan.units:
            t0 = unit.first
            w = unit.weight()
            f = unit.unscale(self.factorizer(t0, w, unit.rank))
            del w
            if unit.joint:
                self._rewrite_joint(graph, unit, f)
            else:
                a_val, b_val = self._factor_values(graph, t0, f)
                names = [it[0].name for it in unit.items]
                for t, r, setting, note in unit.items:
                    self._rewire(graph, t, a_val, b_val, f)
                    m, n = t.shape
                    self._record(t, f, setting, note, m * n, f.rank * (m + n),
                                 shared_with=[x for x in names if x != t.name])
                _drop_if_unused(graph, t0.weight)
            done += len(unit.items)
            if self.progress:
                self.progress(done, len(plan.items), t0.name)
        items = plan.items
        tied = [t for t, *_ in items if t.tied]
        if tied:
            n = sum(t.params for t in {t.weight_key: t for t in tied}.values())
            self.record.notes.append(
                f"{len(tied)} rewritten projection(s) share their weight with another node "
                f"(tied embedding): that weight stays, so the file grows by the factors while "
                + render(f"compute shrinks ({n:,} parameters kept; {opt('exclude', 'head')} "
                         f"avoids it)."))
        if any(t.dtype == "float16" for t, *_ in items):
            cast = any(t.cast_to is not None for t, *_ in items)
            self.record.notes.append(
                "float16 weights: factors are computed in float32 and stored as float16 like "
                "the weights they replace"
                + ("; weights the graph casts to float32 keep that Cast for their factors"
                   if cast else
                   "; ONNX Runtime's CPU EP runs fp16 MatMuls through fp32 casts it inserts "
                   "itself, CUDA runs them natively") + ".")
        return ir.passes.PassResult(model, modified=bool(items))

    def _record(self, t: Target, f: Factors, setting: str, note: str | None, before: int,
                after: int, shared_with=(), joint_with=()) -> None:
        m, n = t.shape
        self.record.rewritten.append(Rewritten(
            name=t.name, role=t.role, block=t.block, path=t.path, shape=[m, n],
            rank=f.rank, setting=setting, energy=round(f.energy, 6),
            rel_error=round(f.rel_error, 6), params_before=before, params_after=after,
            dtype=t.dtype, method=f.method, output=t.node.outputs[0].name,
            shared_with=list(shared_with), joint_with=list(joint_with),
            output_energy=None if f.output_energy is None else round(f.output_energy, 6),
            tied=t.tied,
            note="; ".join(x for x in (note, "weight also used by another node "
                                             "(kept for it)" if t.tied else None) if x) or None))

    def _rewrite_joint(self, graph: ir.Graph, unit: Unit, f: Factors) -> None:
        """One ``MatMul(X, A)`` before the first member; each member multiplies by its B."""
        t0 = unit.first
        m = t0.shape[0]
        n_all = sum(it[0].shape[1] for it in unit.items)
        base = t0.weight.name or t0.name
        a_val = self._computed(graph, t0, add_initializer(graph, f"{base}.lrc_Ajoint{f.rank}",
                                                          f.a))
        mid = ir.Value(name=unique_name(graph, f"{t0.name}/lrc_Ajoint_out"))
        meta = dict(t0.node.metadata_props)
        meta[FACTOR_META] = "A"
        a_node = ir.Node("", "MatMul", [t0.node.inputs[0], a_val], outputs=[mid],
                         name=f"{t0.name}/lrc_Ajoint", metadata_props=meta)
        t0.node.graph.insert_before(t0.node, a_node)
        names = [it[0].name for it in unit.items]
        a_left = f.rank * m
        for i, ((t, r, setting, note), sl) in enumerate(zip(unit.items, unit.b_slices())):
            wb = t.weight.name or t.name
            b_val = self._computed(graph, t, add_initializer(
                graph, f"{wb}{'_T' if t.transposed else ''}.lrc_B{f.rank}", f.b[:, sl]))
            _become_b(t.node, mid, b_val, f.rank)
            n = t.shape[1]
            # A's parameters are shared: each member carries its share (the last the rest)
            a_share = a_left if i == len(unit.items) - 1 else round(f.rank * m * n / n_all)
            a_left -= a_share
            self._record(t, f, setting, note, m * n, f.rank * n + a_share,
                         joint_with=[x for x in names if x != t.name])
            _drop_if_unused(graph, t.weight)

    def _skip(self, t: Target, reason: str | None, kind: str) -> None:
        self.record.skipped.append(Skipped(t.name, t.role, t.block, list(t.shape),
                                           reason or "", kind))

    def _factor_values(self, graph: ir.Graph, t: Target, f: Factors):
        base = t.weight.name or t.name
        suffix = "_T" if t.transposed else ""
        return [self._computed(graph, t, add_initializer(
                    graph, f"{base}{suffix}.lrc_{tag}{f.rank}", arr))
                for tag, arr in (("A", f.a), ("B", f.b))]

    def _computed(self, graph: ir.Graph, t: Target, val: ir.Value) -> ir.Value:
        """``val`` as the node multiplies it: through ``Cast(to=t.cast_to)`` when the weight
        reached the node through a Cast (fp16 storage, float32 compute), else as it is."""
        if t.cast_to is None:
            return val
        out = ir.Value(name=unique_name(graph, f"{val.name}_cast"), shape=val.shape,
                       type=ir.TensorType(t.cast_to))
        graph.insert_before(graph[0], ir.Node("", "Cast", [val], outputs=[out],
                                              attributes=[ir.AttrInt64("to", t.cast_to)],
                                              name=f"{val.name}/lrc_cast"))
        return out

    def _rewire(self, graph: ir.Graph, t: Target, a_val, b_val, f: Factors) -> None:
        node = t.node
        x = node.inputs[0]
        mid = ir.Value(name=unique_name(graph, f"{t.name}/lrc_A_out"))
        meta = dict(node.metadata_props)
        meta[FACTOR_META] = "A"
        a_node = ir.Node("", "MatMul", [x, a_val], outputs=[mid],
                         name=f"{t.name}/lrc_A", metadata_props=meta)
        node.graph.insert_before(node, a_node)  # the node's own (sub)graph
        _become_b(node, mid, b_val, f.rank)


def _become_b(node: ir.Node, mid: ir.Value, b_val: ir.Value, rank: int) -> None:
    """The projection node itself becomes the second factor: ``(X·A)·B``, marked as such."""
    node.replace_input_with(0, mid)
    node.replace_input_with(1, b_val)
    if node.op_type == "Gemm":
        node.attributes["transB"] = ir.AttrInt64("transB", 0)
    node.metadata_props[FACTOR_META] = "B"
    node.metadata_props["lrc.rank"] = str(rank)


def _drop_if_unused(graph: ir.Graph, weight: ir.Value) -> None:
    """Release the dense weight as soon as nothing uses it (streaming memory)."""
    if weight is None or weight.uses() or weight.is_graph_output():
        return
    name = weight.name
    if name in graph.initializers and graph.initializers[name] is weight:
        del graph.initializers[name]


def add_initializer(graph: ir.Graph, name: str, arr: np.ndarray) -> ir.Value:
    """Register ``arr`` as a new initializer under a name no value of ``graph`` has (kept on
    disk until the model is written when lrc loaded the model: :func:`lrc.graph.model.new_tensor`)."""
    name = unique_name(graph, name)
    v = ir.Value(name=name, const_value=new_tensor(graph, arr, name))
    v.shape = ir.Shape(arr.shape)
    v.dtype = v.const_value.dtype
    graph.register_initializer(v)
    return v


def unique_name(graph: ir.Graph, name: str) -> str:
    """``name``, or ``name_1``, ``name_2``... : the first no value of ``graph`` has yet (the set
    of used names is built once per graph and kept in ``graph.meta``)."""
    used = graph.meta.setdefault("lrc.names", None)
    if used is None:
        used = set()
        for n in graph:
            for v in n.outputs:
                used.add(v.name)
        used.update(graph.initializers)
        used.update(v.name for v in graph.inputs)
        graph.meta["lrc.names"] = used
    cand, i = name, 1
    while cand in used:
        cand = f"{name}_{i}"
        i += 1
    used.add(cand)
    return cand
